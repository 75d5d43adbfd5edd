"""data.py and r1v/rows.py, r1v/hub.py: prompts, images, SAT and JSONL rows, every row checked,
the prompt order."""

import json
import random

import pytest
from PIL import Image

import data
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
    image = stored.fit_image(Image.new("RGB", (1000, 700)), 3136, 401408)
    assert image.width % 28 == 0 and image.height % 28 == 0 and image.width * image.height <= 401408
    small = stored.fit_image(Image.new("L", (20, 20)), 3136, 401408)
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
