"""Dataset rows, prompts, images and boxes. No model, no processor.

Every dataset is a lazy sequence of example dicts. All have `image` (PIL, resized for the model),
`task_type`, `question` (the text the model sees) and `prompt` (the full prompt). By task type:
  choice  `choices` (option texts, shuffled with a seed), `answer` (the gold option text)
  rec     `phrase`, `box` (the gold [x1, y1, x2, y2] in the frame the model answers in)
  ovd     `labels` (categories asked for), `boxes` ([{"bbox_2d": [...], "label": ...}], same frame)
Grounding rows also keep `gold_box` / `gold_boxes` in original-image pixels, `original_size` and
`frame_size`, to map answers back (see `scale_box`). An image is decoded when its row is used;
`check_rows` reads every row once before training, without decoding pixels.

Sources: SAT (`array/SAT`) and RefCOCO (`lmms-lab/RefCOCO`, `RefCOCOplus`, `RefCOCOg`) from the
hub or a local folder of their schema, and JSONL files of a user's own task (choice, rec or ovd
rows). (The synthetic sets of the offline demos live in demo.py.)
"""

import dataclasses
import io
import json
import os
import random
import socket
import urllib.parse
from pathlib import Path

import torch
from PIL import Image
from qwen_vl_utils import smart_resize
from tqdm import tqdm

from cli import UserError

VISION_TOKENS = "<|vision_start|><|image_pad|><|vision_end|>"
# The paper's base-model prompt, built by hand: no chat template (REFERENCE.md section 1).
PROMPT_TEMPLATE = (VISION_TOKENS + "A conversation between User and Assistant. The user asks a "
                   "question about the image, and the Assistant solves it. The assistant first "
                   "thinks about the reasoning process in the mind and then provides the user with "
                   "the answer.\nUser: {question} \nAssistant: Let me solve this step by step.\n"
                   "<think>")
PATCH_FACTOR = 28  # one LLM token per 28x28 pixels (14-pixel patches, merged 2x2)
MIN_PIXELS, MAX_PIXELS = 3136, 401408  # the paper's: at least 4, at most 512 visual tokens


# VLM-R1's grounding questions (REFERENCE.md section 9). Detection asks in their evaluation's
# words, with the answer format of their odLength task spelled out.
REC_QUESTION = ("Please provide the bounding box coordinate of the region this sentence "
                "describes: {phrase}. First output the thinking process in <think> </think> tags "
                "and then output the final answer in <answer> </answer> tags. Output the final "
                "answer in JSON format.")
OVD_QUESTION = ("Please carefully check the image and detect the following objects: {labels}. "
                "First output the thinking process in <think> </think> tags and then output the "
                "final answer in <answer> </answer> tags: a JSON list of "
                '{{"bbox_2d": [x1, y1, x2, y2], "label": "name"}}, or [] if there are none.')
TASK_FIELDS = {"choice": ("question", "choices", "answer"), "rec": ("phrase", "box"),
               "ovd": ("labels", "boxes")}
# The frame a model answers boxes in (REFERENCE.md sections 6, 9): Qwen2.5-VL in pixels of the
# resized image it sees, Qwen2-VL in 0-1000 of the image's width and height.
FRAMES = ("pixels", "norm1000")


def question_text(question, choices):
    """The paper's question: `Answer in natural language. {q} Choose between the following
    options: a, b or c`."""
    options = choices[0] if len(choices) == 1 else ", ".join(choices[:-1]) + " or " + choices[-1]
    return f"Answer in natural language. {question} Choose between the following options: {options}"


def task_type(fields):
    """choice, rec or ovd: the task most of whose fields the row has."""
    have = {task: sum(name in fields for name in names) for task, names in TASK_FIELDS.items()}
    task = max(have, key=have.get)
    if have[task]:
        return task
    raise ValueError("the row has none of the fields of a task: "
                     + "; ".join(f"{t}: {list(n)}" for t, n in TASK_FIELDS.items()))


def fitted_size(width, height, min_pixels, max_pixels):
    """(width, height) after resizing: aspect kept, sides multiples of 28, area in [min, max]."""
    height, width = smart_resize(height, width, PATCH_FACTOR, min_pixels, max_pixels)
    return width, height


def image_tokens(width, height, min_pixels, max_pixels):
    """How many visual tokens the model sees for an image of this size."""
    width, height = fitted_size(width, height, min_pixels, max_pixels)
    return (width // PATCH_FACTOR) * (height // PATCH_FACTOR)


def fit_image(image, min_pixels, max_pixels):
    """RGB, resized as `fitted_size` says."""
    image = image.convert("RGB")
    size = fitted_size(image.width, image.height, min_pixels, max_pixels)
    return image if size == image.size else image.resize(size, Image.BICUBIC)


def frame_size(frame, image_size):
    """(width, height) of the frame boxes are written in, for an image of `image_size` as the
    model sees it."""
    return tuple(image_size) if frame == "pixels" else (1000, 1000)


def scale_box(box, from_size, to_size):
    """[x1, y1, x2, y2] from a frame of `from_size` (width, height) to one of `to_size`."""
    sx, sy = to_size[0] / from_size[0], to_size[1] / from_size[1]
    return [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]


def check_box(box, size, what="box"):
    """4 finite numbers x1 < x2, y1 < y2, inside an image of `size` (1 pixel of slack)."""
    if (not isinstance(box, (list, tuple)) or len(box) != 4
            or not all(isinstance(v, (int, float)) and v == v for v in box)):
        raise ValueError(f"{what} must be [x1, y1, x2, y2], 4 numbers, got {box!r}")
    x1, y1, x2, y2 = box
    if not (x1 < x2 and y1 < y2):
        raise ValueError(f"{what} {list(box)} needs x1 < x2 and y1 < y2 (corners, not [x, y, w, "
                         "h])")
    if size and (min(x1, y1) < -1 or x2 > size[0] + 1 or y2 > size[1] + 1):
        raise ValueError(f"{what} {list(box)} lies outside the {size[0]}x{size[1]} image")


def check_fields(fields, size=None):
    """A row's fields, as its task needs them; `size` (width, height) of its image. Returns the
    task type."""
    task = task_type(fields)
    missing = [k for k in TASK_FIELDS[task] if k not in fields]
    if missing:
        raise ValueError(f"a {task} row needs the field(s) {missing}")
    if task == "choice":
        question, choices = fields["question"], fields["choices"]
        if not isinstance(question, str) or not question.strip():
            raise ValueError("the question is empty or not a string")
        if (not isinstance(choices, (list, tuple)) or len(choices) < 2
                or not all(isinstance(c, str) and c.strip() for c in choices)):
            raise ValueError(f"choices must be a list of at least 2 non-empty strings, got "
                             f"{choices!r}")
        if fields["answer"] not in choices:
            raise ValueError(f"the answer {fields['answer']!r} is not among the choices "
                             f"{list(choices)}")
    elif task == "rec":
        if not isinstance(fields["phrase"], str) or not fields["phrase"].strip():
            raise ValueError("the phrase is empty or not a string")
        check_box(fields["box"], size)
    else:
        labels, boxes = fields["labels"], fields["boxes"]
        if (not isinstance(labels, list) or not labels
                or not all(isinstance(x, str) and x.strip() for x in labels)):
            raise ValueError(f"labels must be a non-empty list of strings, got {labels!r}")
        if not isinstance(boxes, list):
            raise ValueError(f"boxes must be a list, got {boxes!r}")
        for k, box in enumerate(boxes, 1):
            if not isinstance(box, dict) or box.get("label") not in labels:
                raise ValueError(f"box {k} must be {{\"bbox_2d\": [...], \"label\": ...}} with a "
                                 f"label from {labels}, got {box!r}")
            check_box(box.get("bbox_2d"), size, f"box {k}'s bbox_2d")
    return task


def question_of(fields):
    """The text the model is asked, from a checked row."""
    task = task_type(fields)
    if task == "choice":
        return question_text(fields["question"], fields["choices"])
    if task == "rec":
        return REC_QUESTION.format(phrase=fields["phrase"].strip().rstrip("."))
    return OVD_QUESTION.format(labels=", ".join(fields["labels"]))


@dataclasses.dataclass(frozen=True)
class View:
    """How the model sees a row: the image's pixel budget, the prompt (a template holding
    `{question}`) and the frame its boxes are written in."""
    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS
    template: str = PROMPT_TEMPLATE
    frame: str = "pixels"


def make_example(image, fields, rng, view=View()):
    """Validate one row and build its example dict as `view` says. `rng` shuffles the options
    (None: keep them in order)."""
    task = check_fields(fields, image.size)
    fitted = fit_image(image, view.min_pixels, view.max_pixels)
    example = {"image": fitted, "task_type": task}
    if task == "choice":
        choices = list(fields["choices"])
        if rng is not None:
            rng.shuffle(choices)
        fields = {**fields, "choices": choices}
        example.update(choices=choices, answer=fields["answer"])
    else:
        size = frame_size(view.frame, fitted.size)
        example.update(original_size=image.size, frame_size=size)
        if task == "rec":
            example.update(phrase=fields["phrase"], gold_box=list(fields["box"]),
                           box=scale_box(fields["box"], image.size, size))
        else:
            example.update(labels=list(fields["labels"]), gold_boxes=fields["boxes"],
                           boxes=[{"bbox_2d": scale_box(b["bbox_2d"], image.size, size),
                                   "label": b["label"]} for b in fields["boxes"]])
    question = question_of(fields)
    # replace, not format: a chat template may hold braces of its own
    return {**example, "question": question,
            "prompt": view.template.replace("{question}", question)}


def gold_of(example):
    """What a row counts as right, for sample dumps."""
    return example.get("answer", example.get("box", example.get("boxes")))


def answer_of(example):
    """The gold answer as a completion writes it: the option, or the box(es) in the model's
    frame as JSON with integer coordinates (the form VLM-R1's prompt asks for)."""
    if example["task_type"] == "choice":
        return example["answer"]
    if example["task_type"] == "rec":
        return json.dumps([round(v) for v in example["box"]])
    return json.dumps([{"bbox_2d": [round(v) for v in b["bbox_2d"]], "label": b["label"]}
                       for b in example["boxes"]])


def answer_completion(example, answer=None):
    """A completion in the answer format with an empty thought: `</think> <answer> X </answer>`
    (the gold answer unless `answer` is given), opened with <think> when the prompt does not end
    with it (a chat prompt). What --objective sft trains on, and the demo's format warm-up."""
    opening = "" if example["prompt"].endswith("<think>") else "<think> "
    answer = answer_of(example) if answer is None else answer
    return f"{opening}</think> <answer> {answer} </answer>"


def open_image(value):
    """A PIL image, not yet decoded, from what a dataset stores: PIL, raw bytes,
    {'bytes': ...} or {'path': ...}, or a file path."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (str, Path)):
        if Path(value).is_dir():
            raise ValueError(f"image {str(value)!r} is a directory")
        if not Path(value).is_file():
            raise ValueError(f"image {str(value)!r} does not exist")
    elif not isinstance(value, (bytes, bytearray)):
        raise ValueError(f"cannot read an image from a {type(value).__name__}")
    try:
        return Image.open(io.BytesIO(value) if isinstance(value, (bytes, bytearray)) else value)
    except Exception as e:
        raise ValueError(f"the image cannot be read ({e})") from e


def decode_image(value):
    image = open_image(value)
    image.load()
    return image


def verified_size(value):
    """(width, height) of a stored image, checked to be a readable image without decoding it."""
    image = open_image(value)
    if isinstance(value, Image.Image):
        return image.size
    try:
        image.verify()  # reads the file through: truncated or corrupt data fails here
    except Exception as e:
        raise ValueError(f"the image cannot be read ({e})") from e
    return image.size


class Rows(torch.utils.data.Dataset):
    """A lazy list: `make(i)` builds row i when it is used; `where(i)` names it in errors
    (`file:line`, or `dataset row k`, 1-based)."""

    def __init__(self, name, size, make, where):
        self.name, self.size, self.make, self.where = name, size, make, where

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        if not 0 <= i < self.size:
            raise IndexError(i)
        try:
            return self.make(i)
        except UserError:  # already names its row
            raise
        except Exception as e:
            raise UserError(f"{self.where(i)}: {e}") from e


class Examples(Rows):
    """Example dicts from `read(i)`, row i's raw (image, fields), all of one `task` type, built as
    `view` says. Options are shuffled with a seed per row unless `shuffle` is off."""

    def __init__(self, name, size, read, where, seed, view, task="choice", shuffle=True):
        super().__init__(name, size, self.build, where)
        self.read, self.seed, self.view, self.task_type = read, seed, view, task
        self.shuffle = shuffle

    def shown_as(self, view):
        """From now on, build rows with `view`'s prompt and box frame, known once the model is
        (rows are checked before, without them); the pixel budget stays this set's."""
        self.view = dataclasses.replace(self.view, template=view.template, frame=view.frame)
        return self

    def build(self, i):
        image, fields = self.read(i)
        rng = random.Random(self.seed * 1_000_003 + i) if self.shuffle else None  # (detail 14)
        return make_example(decode_image(image), fields, rng, self.view)

    def check(self, i):
        """Row i's fields and image, without decoding it; returns (question, visual tokens)."""
        try:
            image, fields = self.read(i)
            size = verified_size(image)
            if check_fields(fields, size) != self.task_type:
                raise ValueError(f"a {task_type(fields)} row among {self.task_type} rows")
        except Exception as e:
            raise UserError(f"{self.where(i)}: {e}") from e
        return (question_of(fields),
                image_tokens(*size, self.view.min_pixels, self.view.max_pixels))


def check_rows(examples, desc="checking rows", progress=True):
    """Every row's fields and image, before any model is loaded; a bar for large datasets
    (with `progress`). Returns, per row, (question text, visual tokens) for the prompt-length
    check."""
    rows = range(len(examples))
    shown = progress and len(rows) >= 2000
    return [examples.check(i) for i in tqdm(rows, desc=desc, disable=not shown,
                                            dynamic_ncols=True)]


# --- hub datasets: SAT, RefCOCO -----------------------------------------------------------------

SAT_COLUMNS = ("image_bytes", "question", "answers", "correct_answer")
REFCOCO_COLUMNS = ("image", "answer", "bbox")  # answer: the expressions; bbox: COCO [x, y, w, h]
REFCOCO = {"refcoco": "lmms-lab/RefCOCO", "refcoco+": "lmms-lab/RefCOCOplus",
           "refcocog": "lmms-lab/RefCOCOg"}


def check_source(source, flag):
    """True for a path on this machine; False for a hub id, tried only if the hub answers within
    seconds (the libraries would retry for minutes). A missing local path is an error."""
    from huggingface_hub import constants

    if Path(source).exists():
        return True
    if source.count("/") != 1 or source.startswith((".", "/", "~")) or Path(source).suffix:
        raise UserError(f"{flag} {source}: does not exist (nor is it a hub id like 'owner/name')")
    if not constants.HF_HUB_OFFLINE:
        endpoint = urllib.parse.urlparse(constants.ENDPOINT)
        try:
            socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=3).close()
        except OSError as e:
            raise UserError(f"{flag} {source}: the hub cannot be reached ({e}); pass a local "
                            "folder, or set HF_HUB_OFFLINE=1 to use the local hub cache") from e
    return False


def load_hub_dataset(source, flag, **kwargs):
    """`datasets.load_dataset` on a local folder or a hub id, with one-line errors."""
    import datasets

    local = check_source(source, flag)
    try:
        return datasets.load_dataset(source, **kwargs)
    except Exception as e:
        if local:
            raise UserError(f"{flag} {source}: cannot load it ({type(e).__name__}: {e})") from e
        raise UserError(f"{flag} {source}: cannot load it from the hub ({type(e).__name__}). "
                        "Without hub access, pass a local folder of the same schema "
                        "(HF_HUB_OFFLINE=1 skips the retries)") from e


def list_lengths(ds, column):
    """Items per row of a list column, read on the memory-mapped Arrow table (no images decoded)."""
    import pyarrow.compute

    return pyarrow.compute.list_value_length(ds.with_format("arrow")[column]).to_pylist()


def undecoded(ds, column):
    """`column` with its images left as bytes: rows are checked without decoding pixels."""
    import datasets

    feature = ds.features[column]
    if isinstance(getattr(feature, "feature", None), datasets.Image):
        return ds.cast_column(column, datasets.List(datasets.Image(decode=False)))
    if isinstance(feature, datasets.Image):
        return ds.cast_column(column, datasets.Image(decode=False))
    return ds


def load_hub_examples(source, split, limit=0, seed=0, view=View(), flag="--dataset"):
    """A hub id or local folder in SAT's schema (choice rows, single-image ones kept) or
    RefCOCO's (rec rows, one per referring expression); the first `limit` rows (0 = all)."""
    ds = load_hub_dataset(source, flag, split=split)
    name = f"{source}[{split}]"
    if all(c in ds.column_names for c in SAT_COLUMNS):
        ds = undecoded(ds.select(range(min(limit or len(ds), len(ds)))), "image_bytes")
        rows = [i for i, n in enumerate(list_lengths(ds, "image_bytes")) if n == 1]

        def read(i):
            row = ds[rows[i]]
            return row["image_bytes"][0], {"question": row["question"], "choices": row["answers"],
                                           "answer": row["correct_answer"]}
        task = "choice"
    elif all(c in ds.column_names for c in REFCOCO_COLUMNS):
        ds = undecoded(ds, "image")
        rows = [(i, k) for i, n in enumerate(list_lengths(ds, "answer")) for k in range(n)]
        rows = rows[:limit or len(rows)]

        def read(i):
            row, k = ds[rows[i][0]], rows[i][1]
            x, y, w, h = row["bbox"]
            return row["image"], {"phrase": row["answer"][k], "box": [x, y, x + w, y + h]}
        task = "rec"
    else:
        lacks = {name: [c for c in columns if c not in ds.column_names]
                 for name, columns in (("SAT", SAT_COLUMNS), ("RefCOCO", REFCOCO_COLUMNS))}
        raise UserError(f"{flag} {source!r} split {split!r} lacks the SAT columns {lacks['SAT']}"
                        f" (or RefCOCO's {lacks['RefCOCO']}); it has {ds.column_names}")
    if not rows:
        raise UserError(f"{flag} {name}: no usable rows")

    def where(i):
        return f"{name} row {(rows[i][0] if task == 'rec' else rows[i]) + 1}"
    return Examples(name, len(rows), read, where, seed, view, task)


# --- a user's JSONL -----------------------------------------------------------------------------

def load_jsonl(path, limit=0, seed=0, view=View(), flag="--dataset"):
    """A user's task, one JSON object a line, `image` a path relative to the file, and
    choice: `question`, `choices`, `answer` (one of the choices);
    rec: `phrase`, `box` ([x1, y1, x2, y2] in original pixels);
    ovd: `labels` (the categories asked for), `boxes` ([{"bbox_2d": [...], "label": ...}]).
    Every row of a file has the task of the first. Blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag}: file {str(path)!r} does not exist")
    rows, task = [], None
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
            row_task = task_type(row)
            task = task or row_task
            if row_task != task:
                raise ValueError(f"a {row_task} row in a file of {task} rows (one task a file)")
            missing = [k for k in ("image",) + TASK_FIELDS[task] if k not in row]
            if missing:
                raise ValueError(f"missing field(s) {missing} of a {task} row")
            if not isinstance(row["image"], str):
                raise ValueError(f"image must be a path, got {row['image']!r}")
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{line_no}: not valid JSON ({e})") from e
        except ValueError as e:
            raise UserError(f"{path}:{line_no}: {e}") from e
        rows.append((line_no, row))
        if limit and len(rows) == limit:
            break
    if not rows:
        raise UserError(f"{flag} {path}: no rows")

    def read(i):
        row = rows[i][1]
        return path.parent / row["image"], row

    return Examples(str(path), len(rows), read, lambda i: f"{path}:{rows[i][0]}", seed, view,
                    task)


def load_examples(dataset, split="train", limit=15000, seed=0, view=View(), flag="--dataset"):
    """A .jsonl file, or a hub id / local folder in SAT's or RefCOCO's schema."""
    if dataset.endswith(".jsonl"):
        return load_jsonl(dataset, limit, seed, view, flag)
    return load_hub_examples(REFCOCO.get(dataset, dataset), split, limit, seed, view, flag)


# --- the order of prompts -----------------------------------------------------------------------

class PromptSampler:
    """Prompt indices in a fresh seeded permutation each epoch. Its state (epoch, position) is all
    it takes to continue the same order after a restart."""

    def __init__(self, size, batch_size, seed):
        if size < batch_size:
            raise UserError(f"the dataset has {size} rows, fewer than one batch of {batch_size} "
                            "prompts (--prompts_per_step)")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.epoch, self.position = 0, 0

    def next_batch(self):
        if self.position + self.batch_size > self.size:  # drop the ragged tail, next epoch
            self.epoch, self.position = self.epoch + 1, 0
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator)
        batch = order[self.position:self.position + self.batch_size].tolist()
        self.position += self.batch_size
        return batch

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state):
        self.epoch, self.position = state["epoch"], state["position"]


def writable_dir(path, flag):
    """Create `path` if needed; a file in the way or no permission is a one-line error."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot create it ({e.strerror})") from e
    if not os.access(path, os.W_OK):
        raise UserError(f"{flag} {path} is not writable")
    return path
