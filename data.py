"""Dataset rows, the paper's prompt and images. No model, no processor.

Every dataset is a lazy sequence of example dicts: `image` (PIL, resized for the model),
`question` (the text the model sees), `choices` (option texts, shuffled with a seed), `answer`
(the gold option text), `prompt` (the full prompt, image placeholder first). An image is decoded
when its row is used; `check_rows` reads every row once before training, without decoding pixels.

Sources: SAT from the hub (`array/SAT`) or a local folder of the same schema, and a JSONL file of
a user's own task. (The synthetic set of the offline demo lives in demo.py.)
"""

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


def question_text(question, choices):
    """The paper's question: `Answer in natural language. {q} Choose between the following
    options: a, b or c`."""
    options = choices[0] if len(choices) == 1 else ", ".join(choices[:-1]) + " or " + choices[-1]
    return f"Answer in natural language. {question} Choose between the following options: {options}"


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


def check_fields(question, choices, answer):
    """A row's text fields, as the prompt needs them."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError("the question is empty or not a string")
    if (not isinstance(choices, (list, tuple)) or len(choices) < 2
            or not all(isinstance(c, str) and c.strip() for c in choices)):
        raise ValueError(f"choices must be a list of at least 2 non-empty strings, got {choices!r}")
    if answer not in choices:
        raise ValueError(f"the answer {answer!r} is not among the choices {list(choices)}")


def make_example(image, question, choices, answer, rng, min_pixels, max_pixels):
    """Validate one row and build its example dict. `rng` shuffles the options (None: keep)."""
    check_fields(question, choices, answer)
    choices = list(choices)
    if rng is not None:
        rng.shuffle(choices)
    text = question_text(question, choices)
    return {"image": fit_image(image, min_pixels, max_pixels), "question": text,
            "choices": choices, "answer": answer, "prompt": PROMPT_TEMPLATE.format(question=text)}


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
    """Example dicts from `read(i)`, row i's raw (image, question, choices, answer). Options are
    shuffled with a seed per row unless `shuffle` is off."""

    def __init__(self, name, size, read, where, seed, min_pixels, max_pixels, shuffle=True):
        super().__init__(name, size, self.build, where)
        self.read, self.seed, self.shuffle = read, seed, shuffle
        self.min_pixels, self.max_pixels = min_pixels, max_pixels

    def build(self, i):
        image, question, choices, answer = self.read(i)
        rng = random.Random(self.seed * 1_000_003 + i) if self.shuffle else None  # (detail 14)
        return make_example(decode_image(image), question, choices, answer, rng,
                            self.min_pixels, self.max_pixels)

    def check(self, i):
        """Row i's fields and image, without decoding it; returns (question, visual tokens)."""
        try:
            image, question, choices, answer = self.read(i)
            check_fields(question, choices, answer)
            width, height = verified_size(image)
        except Exception as e:
            raise UserError(f"{self.where(i)}: {e}") from e
        return (question_text(question, choices),
                image_tokens(width, height, self.min_pixels, self.max_pixels))


def check_rows(examples, desc="checking rows"):
    """Every row's fields and image, before any model is loaded; a bar for large datasets.
    Returns, per row, (question text, visual tokens) for the prompt-length check."""
    rows = range(len(examples))
    return [examples.check(i) for i in tqdm(rows, desc=desc, disable=len(rows) < 2000,
                                            dynamic_ncols=True)]


# --- SAT ----------------------------------------------------------------------------------------

SAT_COLUMNS = ("image_bytes", "question", "answers", "correct_answer")


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


def load_sat(source="array/SAT", split="train", limit=15000, seed=0, min_pixels=MIN_PIXELS,
             max_pixels=MAX_PIXELS, flag="--dataset"):
    """SAT (hub id or a local folder of its schema): the first `limit` rows, single-image ones."""
    import datasets
    import pyarrow.compute

    ds = load_hub_dataset(source, flag, split=split)
    missing = [c for c in SAT_COLUMNS if c not in ds.column_names]
    if missing:
        raise UserError(f"{flag} {source!r} split {split!r} lacks the SAT columns {missing}; "
                        f"it has {ds.column_names}")
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    inner = getattr(ds.features["image_bytes"], "feature", None)
    if isinstance(inner, datasets.Image):  # count images without decoding them
        ds = ds.cast_column("image_bytes", datasets.List(datasets.Image(decode=False)))
    # Count images per row on the memory-mapped Arrow column, without reading them into Python.
    counts = pyarrow.compute.list_value_length(ds.with_format("arrow")["image_bytes"])
    rows = [i for i, n in enumerate(counts.to_pylist()) if n == 1]
    if not rows:
        raise UserError(f"{flag} {source!r} split {split!r} has no single-image rows")

    def read(i):
        row = ds[rows[i]]
        return row["image_bytes"][0], row["question"], row["answers"], row["correct_answer"]

    return Examples(f"{source}[{split}]", len(rows), read,
                    lambda i: f"{source}[{split}] row {rows[i] + 1}", seed, min_pixels, max_pixels)


# --- a user's JSONL -----------------------------------------------------------------------------

JSONL_FIELDS = ("image", "question", "choices", "answer")


def load_jsonl(path, limit=0, seed=0, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
               flag="--dataset"):
    """A user's task: one JSON object a line with `image` (a path relative to the file),
    `question`, `choices`, `answer` (one of the choices). Blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag}: file {str(path)!r} does not exist")
    rows = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{line_no}: not valid JSON ({e})") from e
        if not isinstance(row, dict):
            raise UserError(f"{path}:{line_no}: not a JSON object")
        missing = [k for k in JSONL_FIELDS if k not in row]
        if missing:
            raise UserError(f"{path}:{line_no}: missing field(s) {missing}")
        if not isinstance(row["image"], str):
            raise UserError(f"{path}:{line_no}: image must be a path, got {row['image']!r}")
        rows.append((line_no, row))
        if limit and len(rows) == limit:
            break
    if not rows:
        raise UserError(f"{flag} {path}: no rows")

    def read(i):
        row = rows[i][1]
        return path.parent / row["image"], row["question"], row["choices"], row["answer"]

    return Examples(str(path), len(rows), read, lambda i: f"{path}:{rows[i][0]}", seed,
                    min_pixels, max_pixels)


def load_examples(dataset, split="train", limit=15000, seed=0, min_pixels=MIN_PIXELS,
                  max_pixels=MAX_PIXELS, flag="--dataset"):
    """A .jsonl file, or a hub id / local folder in SAT's schema."""
    if dataset.endswith(".jsonl"):
        return load_jsonl(dataset, limit, seed, min_pixels, max_pixels, flag)
    return load_sat(dataset, split, limit, seed, min_pixels, max_pixels, flag)


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
