"""data.py and r1v/rows.py, images.py, jsonl.py, hub.py: prompts, images, SAT and JSONL rows,
every row checked, the prompt order."""

import json
import random

import pytest
from PIL import Image

import data
from r1v import images
from r1v import rows as stored


def test_question_text_and_prompt_are_the_papers():
    assert data.question_text("Where?", ["left", "right", "up"]) == (
        "Answer in natural language. Where? Choose between the following options: left, right or up"
    )
    assert data.question_text("Where?", ["left", "right"]).endswith("options: left or right")
    fields = dict(question="Where?", choices=["left", "right"], answer="left")
    ex = data.make_example(Image.new("RGB", (56, 56)), fields, random.Random(0))
    assert ex["prompt"] == (
        "<|vision_start|><|image_pad|><|vision_end|>A conversation between User and Assistant. "
        "The user asks a question about the image, and the Assistant solves it. The assistant "
        "first thinks about the reasoning process in the mind and then provides the user with "
        "the answer.\nUser: "
        + ex["question"]
        + " \nAssistant: Let me solve this step by step.\n<think>"
    )


def test_fit_image_respects_the_pixel_budget_and_the_28_pixel_grid():
    image = images.fit_image(Image.new("RGB", (1000, 700)), 3136, 401408)
    assert image.width % 28 == 0 and image.height % 28 == 0 and image.width * image.height <= 401408
    small = images.fit_image(Image.new("L", (20, 20)), 3136, 401408)
    assert small.mode == "RGB" and small.width * small.height >= 3136


@pytest.mark.parametrize(
    "bad,message",
    [
        (dict(answer="up"), "not among the choices"), (dict(choices=["left"]), "at least 2"),
        (dict(question=""), "question is empty"),
    ],
)
def test_make_example_rejects_bad_rows(bad, message):
    row = dict(question="Where?", choices=["left", "right"], answer="left") | bad
    with pytest.raises(ValueError, match=message):
        data.make_example(Image.new("RGB", (56, 56)), row, random.Random(0))


def _png_bytes(size=(64, 48), color="red"):
    import io

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def make_sat_folder(root, rows):
    """A local dataset in SAT's hub schema: image_bytes is a list of images."""
    import datasets

    features = datasets.Features(
        {
            "image_bytes": datasets.List(datasets.Image()), "question": datasets.Value("string"),
            "answers": datasets.List(datasets.Value("string")),
            "question_type": datasets.Value("string"), "correct_answer": datasets.Value("string"),
        }
    )
    ds = datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features=features)
    (root / "data").mkdir(parents=True)
    ds.to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    return str(root)


def sat_rows():
    return [
        dict(
            image_bytes=[{"bytes": _png_bytes()}],
            question="Is the cup left or right of the plate?", answers=["left", "right"],
            question_type="other_static", correct_answer="right",
        ),
        dict(
            image_bytes=[{"bytes": _png_bytes()}, {"bytes": _png_bytes()}],
            question="Did the camera move?", answers=["yes", "no"], question_type="ego_movement",
            correct_answer="yes",
        ),
        dict(
            image_bytes=[{"bytes": _png_bytes((2000, 1500), "blue")}], question="How many chairs?",
            answers=["1", "2", "3"], question_type="count", correct_answer="2",
        ),
    ]


def test_sat_from_a_local_folder_of_the_hub_schema(tmp_path):
    source = make_sat_folder(tmp_path / "sat", sat_rows())
    ds = data.load_examples(source, "train", limit=15000, seed=1)
    assert len(ds) == 2  # the two-image row is dropped
    first, big = ds[0], ds[1]
    assert first["answer"] == "right" and sorted(first["choices"]) == ["left", "right"]
    assert first["question"].startswith(
        "Answer in natural language. Is the cup left or right of the plate?"
    )
    assert big["image"].width * big["image"].height <= 401408 and big["image"].width % 28 == 0
    again = data.load_examples(source, "train", limit=15000, seed=1)
    assert [again[i]["choices"] for i in range(2)] == [ds[i]["choices"] for i in range(2)]
    assert (
        len(data.load_examples(source, "train", limit=1, seed=1)) == 1
    )  # the first N rows, then single-image only


def test_sat_errors_name_the_dataset_and_row(tmp_path):
    rows = sat_rows()
    rows[0]["correct_answer"] = "up"
    source = make_sat_folder(tmp_path / "bad", rows)
    ds = data.load_examples(source, "train", limit=0)
    with pytest.raises(ValueError, match=r"row 1: the answer 'up' is not among the choices"):
        ds[0]
    with pytest.raises(ValueError, match=r"row 1: the answer 'up' is not among the choices"):
        stored.check_rows(ds)


def test_sat_missing_columns(tmp_path):
    import datasets

    root = tmp_path / "wrong"
    (root / "data").mkdir(parents=True)
    datasets.Dataset.from_dict({"question": ["q"]}).to_parquet(str(root / "data" / "train.parquet"))
    with pytest.raises(ValueError, match="lacks the SAT columns"):
        data.load_examples(str(root), "train")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_loads_relative_images(tmp_path):
    Image.new("RGB", (80, 60), "green").save(tmp_path / "a.png")
    path = write_jsonl(
        tmp_path / "task.jsonl",
        [
            {
                "image": "a.png", "question": "What color?", "choices": ["green", "red"],
                "answer": "green",
            }
        ],
    )
    ds = data.load_examples(str(path))
    assert len(ds) == 1 and ds[0]["answer"] == "green" and ds[0]["image"].size[0] % 28 == 0


@pytest.mark.parametrize(
    "row,message",
    [
        (
            {"image": "a.png", "question": "q", "choices": ["x", "y"]},
            r"task.jsonl:2: missing field\(s\) \['answer'\]",
        ),
        (
            {"image": "a.png", "question": "q", "choices": ["x", "y"], "answer": "z"},
            "task.jsonl:2: the answer 'z'",
        ),
        (
            {"image": "nope.png", "question": "q", "choices": ["x", "y"], "answer": "x"},
            "task.jsonl:2: image .* does not exist",
        ),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, row, message):
    Image.new("RGB", (80, 60)).save(tmp_path / "a.png")
    good = {"image": "a.png", "question": "q", "choices": ["x", "y"], "answer": "x"}
    path = write_jsonl(tmp_path / "task.jsonl", [good, row])
    with pytest.raises(ValueError, match=message):
        stored.check_rows(data.load_examples(str(path)))


def test_jsonl_with_a_byte_order_mark_crlf_ends_and_an_image_too_thin_for_the_model(tmp_path):
    """A BOM (some editors write one) and \r\n line ends are text; an image whose sides differ
    over 200-fold, which the processor refuses, is its row's error, not a traceback."""
    Image.new("RGB", (80, 60)).save(tmp_path / "a.png")
    Image.new("RGB", (3000, 10)).save(tmp_path / "thin.png")
    good = {"image": "a.png", "question": "q", "choices": ["x", "y"], "answer": "x"}
    path = tmp_path / "task.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"".join(json.dumps(r).encode() + b"\r\n"
                                                 for r in (good, good)))
    assert len(stored.check_rows(data.load_examples(str(path)))) == 2
    write_jsonl(path, [good, {**good, "image": "thin.png"}])
    with pytest.raises(ValueError, match=r"task.jsonl:2: a 3000x10 image is not one the model "
                       r"takes \(absolute aspect ratio must be smaller than 200"):
        stored.check_rows(data.load_examples(str(path)))


def test_a_local_file_not_named_jsonl_is_refused_as_such(tmp_path):
    path = tmp_path / "task.JSONL"
    path.write_text("{}\n")
    with pytest.raises(ValueError, match=r"--dataset .*task.JSONL: a file of rows must be JSON "
                       r"lines named \*.jsonl"):
        data.load_examples(str(path), flag="--dataset")


def test_jsonl_unreadable_image_is_named(tmp_path):
    (tmp_path / "a.png").write_bytes(b"not a png")
    path = write_jsonl(
        tmp_path / "task.jsonl",
        [{"image": "a.png", "question": "q", "choices": ["x", "y"], "answer": "x"}],
    )
    ds = data.load_examples(str(path))
    with pytest.raises(ValueError, match="task.jsonl:1"):
        ds[0]
    with pytest.raises(ValueError, match="task.jsonl:1: the image cannot be read"):
        stored.check_rows(ds)


def test_missing_dataset_file_and_empty_dataset(tmp_path):
    with pytest.raises(ValueError, match="--dataset"):
        data.load_examples(str(tmp_path / "none.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.jsonl: no rows"):
        data.load_examples(str(empty))
    with pytest.raises(ValueError, match="fewer than one batch"):
        data.PromptSampler(2, 8, 0)


def test_prompt_sampler_resumes_the_same_order_across_epochs():
    a = data.PromptSampler(10, 3, seed=5)
    first = [a.next_batch() for _ in range(4)]
    b = data.PromptSampler(10, 3, seed=5)
    b.next_batch()
    state = b.state_dict()
    c = data.PromptSampler(10, 3, seed=5)
    c.load_state_dict(state)
    assert [c.next_batch() for _ in range(3)] == first[1:]
    assert sorted(sum(first[:3], [])) == sorted(
        set(sum(first[:3], []))
    )  # no repeats within an epoch
    assert a.epoch == 1  # the 4th batch of 3 from 10 rows starts epoch 1


GOOD = {"image": "a.png", "question": "q", "choices": ["x", "y"], "answer": "x"}


@pytest.mark.parametrize(
    "row,message",
    [
        ({**GOOD, "choices": ["x", "a</answer>"], "answer": "a</answer>"},
         "the answer 'a</answer>' holds </answer>: no completion could answer it"),
        ({**GOOD, "choices": ["<answer>x", "y"], "answer": "<answer>x"},
         "the answer '<answer>x' holds <answer>: no completion could answer it"),
        ({**GOOD, "choices": ["x", "y", "x"]}, r"the choices hold 'x' twice"),
        ({"image": "a.png", "labels": ["cat</answer>"], "boxes": []},
         "the label 'cat</answer>' holds </answer>"),
    ],
)
def test_a_row_whose_gold_cannot_be_answered_is_refused(tmp_path, row, message):
    """An answer holding </answer> never scores (SFT trains on a broken target); of two equal
    choices, the model cannot say which it means."""
    Image.new("RGB", (80, 60)).save(tmp_path / "a.png")
    good = GOOD if "question" in row else {"image": "a.png", "labels": ["cat"], "boxes": []}
    path = write_jsonl(tmp_path / "task.jsonl", [good, row])
    with pytest.raises(ValueError, match="task.jsonl:2: " + message):
        stored.check_rows(data.load_examples(str(path)))


@pytest.mark.parametrize(
    "line,key",
    [
        ('{"image": "a.png", "question": "q", "choices": ["x", "y"], "answer": "x", '
         '"answer": "y"}', "answer"),
        ('{"image": "a.png", "labels": ["cat"], "boxes": [{"bbox_2d": [1, 1, 9, 9], '
         '"label": "cat", "label": "dog"}]}', "label"),
    ],
)
def test_a_row_with_a_key_twice_is_refused(tmp_path, line, key):
    """json.loads keeps the last of two equal keys: which one the user meant is a guess."""
    path = tmp_path / "task.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=f"task.jsonl:1: the key '{key}' appears twice"):
        data.load_examples(str(path))


def test_jsonl_rows_are_read_from_the_file_when_used(tmp_path):
    """A file of 200,000 rows held as dicts took 2.8 GB: the rows stay in the file, each read
    again (and parsed) when used, under 1 KB a row held; one edited since is not used."""
    import tracemalloc

    Image.new("RGB", (80, 60)).save(tmp_path / "a.png")
    rows = [{**GOOD, "question": f"Which letter is row {i} about, x or y?"} for i in range(4000)]
    path = write_jsonl(tmp_path / "task.jsonl", rows)
    tracemalloc.start()
    ds = data.load_examples(str(path), limit=0)
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(ds) == 4000 and held < 100 * len(ds)
    assert ds[3999]["question"].startswith("Answer in natural language. Which letter is row 3999")
    text = path.read_text()
    path.write_text(text.replace("row 7 about", "row 8 about"))  # the same length
    with pytest.raises(ValueError, match="task.jsonl:8: the row changed since"):
        ds[7]
    assert "row 8 about" in ds[8]["question"]  # the rows around it are read as before


def test_prompt_lengths_are_counted_exactly_in_parts(tiny_model_dir):
    """200,000 prompts tokenized at once held 2.4 GB of ids: a part at a time, the fast
    tokenizer's own counts; the same lengths, the row named past the first part."""
    from r1v import model

    tokenizer = model.load_processor(tiny_model_dir).tokenizer
    view = data.View()
    questions = [data.question_text("What color is it?", ["red", "blue"])] * 1500
    questions[1200] = data.question_text("What color is the big shape on the left?",
                                         ["red", "blue"])
    visual = [(q, 7) for q in questions]
    longest = len(tokenizer(view.prompt(questions[1200]))["input_ids"]) - 1 + 7
    stored.check_prompt_lengths(tokenizer, visual, "task", view, longest)
    with pytest.raises(ValueError, match=f"task: row 1201's prompt is {longest} tokens, over "
                       f"--max_prompt_length {longest - 1}"):
        stored.check_prompt_lengths(tokenizer, visual, "task", view, longest - 1)


def one_row(tmp_path, image, **fields):
    """A JSONL task of one row whose image is `image` (a file name in tmp_path)."""
    row = {"image": image, "question": "q", "choices": ["x", "y"], "answer": "x", **fields}
    return str(write_jsonl(tmp_path / "task.jsonl", [row]))


def shown(tmp_path, image, **fields):
    """What the model is shown of `image` (checked first): an RGB numpy array."""
    import numpy

    ds = data.load_examples(one_row(tmp_path, image, **fields))
    stored.check_rows(ds)
    return numpy.asarray(ds[0]["image"]).astype(int)


def test_images_of_every_mode_are_shown_as_a_viewer_shows_them(tmp_path):
    """16-bit grey is scaled to 8 bits (PIL's own conversion clips it to white), transparent
    pixels are white (as qwen_vl_utils shows RGBA; not the colour stored under them), CMYK and
    an animation's first frame are their colours, a 1x1 image is upscaled."""
    import numpy

    grey = numpy.full((56, 56), 32768, numpy.uint16)  # mid-grey in 16 bits
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    assert abs(shown(tmp_path, "grey16.png").mean() - 127) < 1
    Image.new("LA", (56, 56), (40, 0)).save(tmp_path / "la.png")  # fully transparent dark grey
    assert shown(tmp_path, "la.png").min() == 255
    Image.new("RGBA", (56, 56), (255, 0, 0, 0)).save(tmp_path / "rgba.png")
    assert shown(tmp_path, "rgba.png").min() == 255
    palette = Image.new("P", (56, 56), 0)
    palette.putpalette([0, 0, 255] * 256)
    palette.save(tmp_path / "p.png", transparency=0)
    assert shown(tmp_path, "p.png").min() == 255
    Image.new("RGB", (56, 56), "red").convert("CMYK").save(tmp_path / "cmyk.jpg")
    assert (shown(tmp_path, "cmyk.jpg").mean(axis=(0, 1)) > [240, -1, -1]).all()
    assert (shown(tmp_path, "cmyk.jpg").mean(axis=(0, 1)) < [256, 16, 16]).all()
    frames = [Image.new("RGB", (56, 56), c).convert("P") for c in ("green", "blue")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    red, green, blue = shown(tmp_path, "anim.gif")[0, 0]  # the first frame's (web palette)
    assert green > 100 and red < 50 and blue < 50
    Image.new("RGB", (1, 1), "blue").save(tmp_path / "dot.png")
    assert shown(tmp_path, "dot.png").shape == (56, 56, 3)


def test_a_photo_is_shown_upright_as_its_exif_orientation_says_and_boxes_are_in_that_frame(
        tmp_path):
    """A phone's portrait photo: landscape pixels and EXIF orientation 6 (turn a quarter
    clockwise), upright in every viewer and in datasets' and transformers' loaders. The model is
    shown it upright, its box is checked and scaled in the upright frame, and a box that fits
    the stored pixels only says so."""
    import numpy

    pixels = numpy.zeros((56, 112, 3), numpy.uint8)  # stored: 112 wide, 56 high
    pixels[:, :56] = (255, 0, 0)  # the stored left half red: upright, the top half
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "photo.jpg", exif=exif, quality=95)
    image = shown(tmp_path, "photo.jpg")
    assert image.shape == (112, 56, 3)
    assert image[:50, :, 0].mean() > 200 and image[62:, :, 0].mean() < 50  # red on top
    rec = {"image": "photo.jpg", "phrase": "the red half", "box": [0, 0, 56, 56]}
    ds = data.load_examples(str(write_jsonl(tmp_path / "rec.jsonl", [rec])))
    assert stored.check_rows(ds)[0][1] == 8  # 56x112 upright: 2x4 visual tokens
    assert ds[0]["original_size"] == (56, 112) and ds[0]["gold_box"] == [0, 0, 56, 56]
    stored_frame = {**rec, "box": [0, 0, 112, 56]}  # the whole stored image: too wide upright
    ds = data.load_examples(str(write_jsonl(tmp_path / "rec.jsonl", [stored_frame])))
    with pytest.raises(ValueError, match=r"rec.jsonl:1: box \[0, 0, 112, 56\] lies outside the "
                       r"56x112 image as shown, upright: its EXIF orientation 6 turns the "
                       r"112x56 pixels stored"):
        stored.check_rows(ds)


@pytest.mark.parametrize("fault,message", [
    ("jpeg cut short", r"the image cannot be read \(image file is truncated"),
    ("gif cut short", r"the image cannot be read \(image file is truncated"),
    ("empty file", r"the image cannot be read \(an empty file\)"),
    ("not an image", r"the image cannot be read \(not an image file Pillow knows\)"),
    ("32-bit floats", r"the image holds 32-bit floating-point numbers \(mode F\)"),
    ("too many pixels", r"the image cannot be read \(Image size .* Pillow opens no larger "
                        r"image: downscale it"),
    ("a dangling link", r"image '.*gone.png' is a link to 'nowhere.png', which does not exist"),
])
def test_an_image_that_cannot_be_shown_is_named_before_training(tmp_path, monkeypatch, fault,
                                                                 message):
    """Before any model loads: PIL's verify() reads only a PNG through, so a JPEG cut short (an
    interrupted copy) passed the check and failed mid-run."""
    import io

    def cut(image, fmt):
        buf = io.BytesIO()
        image.save(buf, fmt)
        return buf.getvalue()[:len(buf.getvalue()) * 2 // 3]
    noise = Image.effect_noise((64, 48), 60).convert("RGB")
    files = {"jpeg cut short": ("a.jpg", cut(noise, "JPEG")),
             "gif cut short": ("a.gif", cut(noise, "GIF")),
             "empty file": ("a.png", b""), "not an image": ("a.png", b"hello")}
    if fault in files:
        name, content = files[fault]
        (tmp_path / name).write_bytes(content)
    elif fault == "32-bit floats":
        name = "a.tiff"
        Image.new("F", (56, 56), 0.5).save(tmp_path / name)
    elif fault == "too many pixels":
        name = "a.png"
        Image.new("1", (300, 300)).save(tmp_path / name)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 300 // 3)  # 2x it is an error
    else:
        name = "gone.png"
        (tmp_path / name).symlink_to("nowhere.png")
    with pytest.raises(ValueError, match="task.jsonl:1: " + message):
        stored.check_rows(data.load_examples(one_row(tmp_path, name)))


def test_a_whole_jpeg_passes_with_bytes_after_its_end_and_a_large_one_without_a_warning(
        tmp_path, monkeypatch, recwarn):
    """A motion photo is a JPEG with its video after the JPEG's end: the JPEG is whole. An image
    over PIL's decompression-bomb warning threshold (but under its error) is downscaled like any
    other, no warning printed."""
    import io

    buf = io.BytesIO()
    Image.effect_noise((64, 48), 60).convert("RGB").save(buf, "JPEG")
    (tmp_path / "motion.jpg").write_bytes(buf.getvalue() + b"\x00\x00\x00\x18ftypmp42" * 50)
    assert shown(tmp_path, "motion.jpg").shape == (56, 56, 3)
    Image.new("1", (300, 300)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 300 - 1)
    assert shown(tmp_path, "big.png").shape == (308, 308, 3)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_a_jsonl_written_by_hand_or_by_other_tools(tmp_path):
    """Numbers as options are their JSON text; a byte order mark at the start of any line (files
    put together) is skipped."""
    Image.new("RGB", (56, 56)).save(tmp_path / "a.png")
    counting = {"image": "a.png", "question": "How many?", "choices": [1, 2, 3.5], "answer": 2}
    bom = b"\xef\xbb\xbf"
    path = tmp_path / "task.jsonl"
    path.write_bytes(bom + json.dumps(counting).encode() + b"\n" + bom
                     + json.dumps({**counting, "answer": "3.5"}).encode() + b"\r\n")
    ds = data.load_examples(str(path))
    stored.check_rows(ds)
    assert ds[0]["answer"] == "2" and sorted(ds[0]["choices"]) == ["1", "2", "3.5"]
    assert ds[0]["question"].endswith("options: " + ", ".join(ds[0]["choices"][:2]) + " or "
                                      + ds[0]["choices"][2])
    assert ds[1]["answer"] == "3.5"


@pytest.mark.parametrize("line,message", [
    (b'[{"image": "a.png"}]', "not a JSON object but a list"),
    (b"null", "not a JSON object but null"),
    (b'"a.png"', "not a JSON object but a string"),
    (b'{"image": "a.png", "question": "\\ud83c?", "choices": ["x", "y"], "answer": "x"}',
     r"the field 'question' holds '\\ud83c', half of a UTF-16 surrogate pair"),
    (b'{"image": "a.png", "phrase": "p", "box": [1, 2, ' + b"9" * 400 + b', 4]}',
     r"a number of 400 digits \(999999999999...\)"),
    (b'{"image": "a.png", "phrase": "p", "box": [1, 2, ' + b"9" * 5000 + b', 4]}',
     r"a number of 5000 digits"),
    (b'{"image": "a.png", "x": ' + b"[" * 100000 + b"]" * 100000 + b"}",
     r"not valid JSON \(nested too deeply\)"),
    (b'{"image": "", "question": "q", "choices": ["x", "y"], "answer": "x"}',
     "image must be the path of a file, got ''"),
    (b'{"image": "https://example.com/a.png", "question": "q", "choices": ["x", "y"], '
     b'"answer": "x"}', r"image must be the path of a file on this machine"),
    (b'{"image": "sub\\\\a.png", "question": "q", "choices": ["x", "y"], "answer": "x"}',
     r"image '.*sub\\\\a.png' does not exist \(a Windows path\? write it with / between "
     r"folders\)"),
])
def test_jsonl_lines_that_are_no_row_are_named(tmp_path, line, message):
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (56, 56)).save(tmp_path / "a.png")
    Image.new("RGB", (56, 56)).save(tmp_path / "sub" / "a.png")
    path = tmp_path / "task.jsonl"
    path.write_bytes(line + b"\n")
    with pytest.raises(ValueError, match="task.jsonl:1: " + message):
        stored.check_rows(data.load_examples(str(path)))


def test_a_utf16_file_and_paths_relative_to_the_current_folder_are_explained(tmp_path,
                                                                             monkeypatch):
    row = {"image": "images/a.png", "question": "q", "choices": ["x", "y"], "answer": "x"}
    (tmp_path / "data").mkdir()
    path = tmp_path / "data" / "task.jsonl"
    path.write_bytes((json.dumps(row) + "\n").encode("utf-16"))
    with pytest.raises(ValueError, match=r"task.jsonl:1: not UTF-8 text .*; it is UTF-16 \(its "
                       r"byte order mark says\): save it as UTF-8"):
        data.load_examples(str(path))
    write_jsonl(path, [row])
    (tmp_path / "images").mkdir()
    Image.new("RGB", (56, 56)).save(tmp_path / "images" / "a.png")
    monkeypatch.chdir(tmp_path)  # images/a.png is there from here, not from data/
    with pytest.raises(ValueError, match=r"data/task.jsonl:1: image 'data/images/a.png' does not "
                       r"exist: image paths are relative to the JSONL file's folder, and "
                       r"'images/a.png' is relative to the current one"):
        stored.check_rows(data.load_examples("data/task.jsonl"))
