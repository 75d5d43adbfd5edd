"""A dataset's rows as they are stored, read lazily and checked: their fields by task type,
their images (r1v/images.py), prompt lengths; a row that fails mid-run replaced. A user's JSONL
file: r1v/jsonl.py."""

import dataclasses
import functools
import random
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from tqdm import tqdm

from r1v import grounding
from r1v.cli import UserError
from r1v.images import decode_image, image_tokens, turned_note, verified_size

# What reading a bad file raises: OSError, and ValueError (the image library's errors become one).
READ_ERRORS = (OSError, ValueError)
TASK_FIELDS = {"choice": ("question", "choices", "answer"), "rec": ("phrase", "box"),
               "ovd": ("labels", "boxes")}


def task_type(fields):
    """choice, rec or ovd: the task most of whose fields the row has."""
    have = {task: sum(name in fields for name in names) for task, names in TASK_FIELDS.items()}
    task = max(have, key=have.get)
    if have[task]:
        return task
    raise ValueError("the row has none of the fields of a task: "
                     + "; ".join(f"{t}: {list(n)}" for t, n in TASK_FIELDS.items()))


def _strings(values, at_least):
    return (isinstance(values, (list, tuple)) and len(values) >= at_least
            and all(isinstance(v, str) and v.strip() for v in values))


def check_fields(fields, size=None):
    """A row's fields, as its task needs them; `size` (width, height) of its image. Returns the
    task type."""
    task = task_type(fields)
    missing = [k for k in TASK_FIELDS[task] if k not in fields]
    if missing:
        raise ValueError(f"a {task} row needs the field(s) {missing}")
    if task == "choice":
        if not _strings([fields["question"]], 1):
            raise ValueError("the question is empty or not a string")
        if not _strings(fields["choices"], 2):
            raise ValueError(f"choices must be a list of at least 2 non-empty strings, got "
                             f"{fields['choices']!r}")
        if fields["answer"] not in fields["choices"]:
            raise ValueError(f"the answer {fields['answer']!r} is not among the choices "
                             f"{list(fields['choices'])}")
        twice = [c for i, c in enumerate(fields["choices"]) if c in fields["choices"][:i]]
        if twice:  # the model could not say which of the two it means
            raise ValueError(f"the choices hold {twice[0]!r} twice")
        _check_answerable("answer", fields["answer"])
    elif task == "rec":
        if not _strings([fields["phrase"]], 1):
            raise ValueError("the phrase is empty or not a string")
        grounding.check_box(fields["box"], size)
    else:
        labels, boxes = fields["labels"], fields["boxes"]
        if not isinstance(labels, list) or not _strings(labels, 1):
            raise ValueError(f"labels must be a non-empty list of strings, got {labels!r}")
        for label in labels:
            _check_answerable("label", label)
        if not isinstance(boxes, list):
            raise ValueError(f"boxes must be a list, got {boxes!r}")
        for k, box in enumerate(boxes, 1):
            if not isinstance(box, dict) or box.get("label") not in labels:
                raise ValueError(f"box {k} must be {{\"bbox_2d\": [...], \"label\": ...}} with a "
                                 f"label from {labels}, got {box!r}")
            grounding.check_box(box.get("bbox_2d"), size, f"box {k}'s bbox_2d")
    return task


def _check_answerable(what, text):
    """Gold text a completion writes between <answer> and </answer>: the first </answer> ends
    the answer read, so a gold holding a tag never scores (and SFT would train on it)."""
    for tag in ("</answer>", "<answer>"):
        if tag in text:
            raise ValueError(f"the {what} {text!r} holds {tag}: no completion could answer it")


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
        except READ_ERRORS as e:  # what a bad file raises; anything else is a bug, shown whole
            raise UserError(f"{self.where(i)}: {e}") from e


class Examples(Rows):
    """The example dicts of a dataset's stored rows (`source`), built by `make(image, fields,
    rng, view)` (data.make_example) as `view` (data.View) says; `question(fields)` is what the
    model is asked (data.question_of). Options are shuffled with a seed per row unless `shuffle`
    is off (detail 14)."""

    def __init__(self, source, seed, view, make, question, shuffle=True):
        super().__init__(source.name, source.size, self.build, source.where)
        self.read, self.task_type, self.seed, self.view = source.read, source.task, seed, view
        self.make_example, self.question, self.shuffle = make, question, shuffle
        self.fingerprint = source.fingerprint
        # Rows often share an image file: each is opened and verified once a check.
        self.file_size = functools.lru_cache(maxsize=4096)(verified_size)

    def shown_as(self, view):
        """From now on, build rows with `view`'s prompt, box frame and visual token size, known
        once the model is (rows are checked before, without them); the pixel budget stays this
        set's."""
        self.view = dataclasses.replace(self.view, template=view.template, frame=view.frame,
                                        patch_factor=view.patch_factor)
        return self

    def build(self, i):
        image, fields = self.read(i)
        rng = random.Random(self.seed * 1_000_003 + i) if self.shuffle else None  # (detail 14)
        return self.make_example(decode_image(image), fields, rng, self.view)

    def check(self, i):
        """Row i's fields and image, without decoding it; returns (question, visual tokens)."""
        try:
            image, fields = self.read(i)
            size = self.file_size(image) if isinstance(image, Path) else verified_size(image)
            if check_fields(fields, size) != self.task_type:
                raise ValueError(f"a {task_type(fields)} row among {self.task_type} rows")
            tokens = image_tokens(*size, self.view.min_pixels, self.view.max_pixels,
                                  self.view.patch_factor)
        except grounding.OutsideImage as e:
            raise UserError(f"{self.where(i)}: {e}{turned_note(image)}") from e
        except READ_ERRORS as e:  # image_tokens: an image the model cannot take (its shape)
            raise UserError(f"{self.where(i)}: {e}") from e
        return self.question(fields), tokens


class Source(NamedTuple):
    """A dataset's stored rows, all of one `task` type: `read(i)` gives row i's (image, fields),
    `where(i)` names it in errors; `fingerprint` says what the rows hold (a file's hash)."""
    name: str
    size: int
    read: Callable
    where: Callable
    task: str
    fingerprint: str = ""


def check_rows(examples, desc="checking rows", progress=True):
    """Every row's fields and image, before any model is loaded; a bar for large datasets
    (with `progress`). Returns, per row, (question text, visual tokens) for the prompt-length
    check."""
    rows = range(len(examples))
    shown = progress and len(rows) >= 2000
    return [examples.check(i) for i in tqdm(rows, desc=desc, disable=not shown,
                                            dynamic_ncols=True)]


def check_prompt_lengths(tokenizer, rows, name, view, max_prompt_length):
    """Every prompt's length (its image's tokens known from its size) against the limit; `rows`
    as check_rows returns them, prompted as `view` (data.View) says. Returns the longest."""
    longest = 0
    for start in range(0, len(rows), 1000):  # at once, 200,000 prompts' ids took 2.4 GB
        part = rows[start:start + 1000]
        counts = token_counts(tokenizer, [view.prompt(q) for q, _ in part])
        for i, (count, (_, visual)) in enumerate(zip(counts, part), start):
            length = count - 1 + visual  # the one <|image_pad|> becomes `visual` tokens
            if length > max_prompt_length:
                raise UserError(f"{name}: row {i + 1}'s prompt is {length} tokens, over "
                                f"--max_prompt_length {max_prompt_length}; lower --max_pixels "
                                "or raise --max_prompt_length")
            longest = max(longest, length)
    return longest


def token_counts(tokenizer, texts):
    """How many tokens `tokenizer` makes of each text. A fast tokenizer's own encoder, when it
    neither truncates nor pads, counts them without making Python lists of the ids: three times
    faster for the prompts of 200,000 rows."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.truncation or backend.padding:
        return [len(ids) for ids in tokenizer(texts, return_attention_mask=False)["input_ids"]]
    return [len(encoding) for encoding in backend.encode_batch_fast(texts)]


def take(examples, indices, report):
    """The examples at `indices`; a row that fails now (a file deleted mid-run) is replaced by
    the next readable one, reported once. Returns them and how many rows were skipped."""
    taken, skipped = [], 0
    for i in indices:
        for j in range(i, i + len(examples)):
            try:
                taken.append(examples[j % len(examples)])
                break
            except UserError as e:
                skipped += 1
                report("row", f"skipped a row that cannot be read now: {e}")
        else:
            raise UserError(f"{examples.name}: no row can be read any more")
    return taken, skipped
