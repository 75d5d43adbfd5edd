"""A dataset's rows as they are stored, read lazily and checked: their fields by task type, their
images (opened and verified without decoding pixels), a user's JSONL file, prompt lengths."""

import array
import codecs
import dataclasses
import functools
import hashlib
import io
import json
import random
import warnings
import zlib
from pathlib import Path
from typing import Callable, NamedTuple

import numpy
import torch
from PIL import Image, UnidentifiedImageError
from qwen_vl_utils import smart_resize
from tqdm import tqdm

from r1v import grounding
from r1v.cli import UserError

PATCH_FACTOR = 28  # one LLM token per 28x28 pixels (14-pixel patches, merged 2x2); Qwen3-VL: 32
MIN_PIXELS, MAX_PIXELS = 3136, 401408  # the paper's: at least 4, at most 512 visual tokens
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


def fitted_size(width, height, min_pixels, max_pixels, factor=PATCH_FACTOR):
    """(width, height) after resizing: aspect kept, sides multiples of `factor` (a visual
    token's side), area in [min, max]."""
    try:
        height, width = smart_resize(height, width, factor, min_pixels, max_pixels)
    except ValueError as e:  # e.g. a side over 200 times the other: the processor's limit
        raise ValueError(f"a {width}x{height} image is not one the model takes ({e})") from e
    return width, height


def image_tokens(width, height, min_pixels, max_pixels, factor=PATCH_FACTOR):
    """How many visual tokens the model sees for an image of this size."""
    width, height = fitted_size(width, height, min_pixels, max_pixels, factor)
    return (width // factor) * (height // factor)


def fit_image(image, min_pixels, max_pixels, factor=PATCH_FACTOR):
    """RGB (`to_rgb`), resized as `fitted_size` says."""
    image = to_rgb(image)
    size = fitted_size(image.width, image.height, min_pixels, max_pixels, factor)
    return image if size == image.size else image.resize(size, Image.BICUBIC)


SIXTEEN_BITS = ("I;16", "I;16L", "I;16B", "I;16N")  # grey, 0-65535


def to_rgb(image):
    """RGB as the model takes it: transparent pixels on white (as qwen_vl_utils shows an RGBA
    image; the colour hidden under them is no part of the picture), 16-bit grey scaled to 8
    bits (PIL's own conversion clips it: all but the darkest 1/256 of the range turns white)."""
    if image.mode in SIXTEEN_BITS or image.mode == "I":  # "I": a 16-bit PNG (verified_size)
        grey = numpy.asarray(image).astype(numpy.int64).clip(0, 65535) // 257
        return Image.fromarray(grey.astype(numpy.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in image.info:
        image = image.convert("RGBA")
        white = Image.new("RGB", image.size, (255, 255, 255))
        white.paste(image, mask=image.getchannel("A"))
        return white
    return image.convert("RGB")


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


def _stored(value):
    """What a dataset stores for an image as bytes or a Path: raw bytes, {'bytes': ...} or
    {'path': ...}, or a file path; a PIL image as it is."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str):
        value = Path(value)
    if not isinstance(value, (Path, bytes, bytearray, Image.Image)):
        raise ValueError(f"cannot read an image from a {type(value).__name__}")
    return value


def _missing(path):
    """Why the file `path` is not there, with what the user more likely meant."""
    if path.is_dir():
        return f"image {str(path)!r} is a directory"
    if path.is_symlink():
        return f"image {str(path)!r} is a link to {str(path.readlink())!r}, which does not exist"
    why = f"image {str(path)!r} does not exist"
    if "\\" in str(path) and Path(str(path).replace("\\", "/")).is_file():
        why += " (a Windows path? write it with / between folders)"
    return why


def open_image(value):
    """A PIL image, not yet decoded, from what a dataset stores (`_stored`)."""
    value = _stored(value)
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, Path) and not value.is_file():
        raise ValueError(_missing(value))
    try:
        with warnings.catch_warnings():  # the model sees at most --max_pixels of any image
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(value if isinstance(value, Path) else io.BytesIO(value))
    except Image.DecompressionBombError as e:
        raise ValueError(f"the image cannot be read ({e} Pillow opens no larger image: "
                         "downscale it; the model sees at most --max_pixels of it)") from e
    except UnidentifiedImageError as e:  # PIL's message names a BytesIO object, not the file
        what = "an empty file" if _size(value) == 0 else "not an image file Pillow knows"
        raise ValueError(f"the image cannot be read ({what})") from e
    except Exception as e:  # the image library's errors
        raise ValueError(f"the image cannot be read ({e})") from e


def _size(value):
    return value.stat().st_size if isinstance(value, Path) else len(value)


ORIENTATION = 0x0112  # EXIF: how the stored pixels turn upright
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
           4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
           6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}  # as PIL.ImageOps.exif_transpose turns them


def orientation(image):
    """The EXIF orientation (1-8; 1 when none) of an opened image, read without decoding it:
    a phone stores a portrait photo as landscape pixels and this tag, which every viewer
    applies (and datasets' and transformers' image loaders: the model is shown the photo as a
    person sees it, and a box is in that frame). A PNG's eXIf chunk counts when it comes
    before the pixels (as the PNG specification puts it), the only place read without
    decoding them."""
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Corrupt EXIF data": then no orientation
            value = image.getexif().get(ORIENTATION, 1)
    except Exception:  # a malformed EXIF block is metadata the image does without
        return 1
    return value if value in UPRIGHT else 1


def upright(image, turn):
    """`image` turned as its EXIF orientation `turn` says, the tag dropped (so never turned
    twice)."""
    if turn not in UPRIGHT:
        return image
    turned = image.transpose(UPRIGHT[turn])
    turned.info.pop("exif", None)
    return turned


def upright_size(size, turn):
    """(width, height) of an image of `size` once turned upright."""
    return tuple(reversed(size)) if turn in (5, 6, 7, 8) else tuple(size)


def decode_image(value):
    """The image decoded, upright (its EXIF orientation applied)."""
    image = open_image(value)
    try:
        image.load()
    except Exception as e:  # the image library's errors, a truncated file's among them
        raise ValueError(f"the image cannot be read ({e})") from e
    turn = orientation(image)
    if getattr(image, "n_frames", 1) > 1:  # an animation keeps its file open: its first
        first = image.copy()               # frame is the picture
        image.close()
        image = first
    return upright(image, turn)


def verified_size(value):
    """(width, height) of a stored image, upright, checked to be a readable image the model
    can be shown: a PNG's chunks verified, a JPEG's end found (decoded at 1/8 scale where it is
    not), other formats (rare in datasets) decoded."""
    image = open_image(value)
    size = upright_size(image.size, orientation(image))
    if isinstance(value, Image.Image):
        return size
    with image:  # closes its file
        if image.mode in ("I", "F") and not (image.mode == "I" and image.format == "PNG"):
            kind = "integers" if image.mode == "I" else "floating-point numbers"
            raise ValueError(f"the image holds 32-bit {kind} (mode {image.mode}), whose range "
                             "of values is unknown: save it with 8 or 16 bits a channel")
        jpeg = image.format in ("JPEG", "MPO")
        try:
            if image.format == "PNG":
                image.verify()  # reads the file through: truncated or corrupt data fails here
            elif not (jpeg and _last_bytes(_stored(value)) == b"\xff\xd9"):
                # A JPEG's data ends with its EOI marker (FF D9, never inside the coded data):
                # one that does not end so is cut short, or has bytes after its end (a motion
                # photo's video): decoding tells which. PIL's verify() checks no other format.
                if jpeg:
                    image.draft(image.mode, (1, 1))  # at 1/8 scale: a fraction of the work
                image.load()
        except Exception as e:
            raise ValueError(f"the image cannot be read ({e})") from e
    return size


def _last_bytes(value):
    if isinstance(value, Path):
        with open(value, "rb") as f:
            f.seek(max(0, value.stat().st_size - 2))
            return f.read(2)
    return bytes(value[-2:])


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


def turned_note(value):
    """What to add to a box's error where the image is turned upright by its EXIF orientation:
    the box may be in the stored pixels' frame."""
    image = open_image(value)
    turn, (width, height) = orientation(image), image.size
    if image is not value:  # opened here
        image.close()
    if turn == 1:
        return ""
    return (f" as shown, upright: its EXIF orientation {turn} turns the {width}x{height} pixels "
            "stored (boxes are in the frame a viewer shows)")


class Source(NamedTuple):
    """A dataset's stored rows, all of one `task` type: `read(i)` gives row i's (image, fields),
    `where(i)` names it in errors; `fingerprint` says what the rows hold (a file's hash)."""
    name: str
    size: int
    read: Callable
    where: Callable
    task: str
    fingerprint: str = ""


def _unique_keys(pairs):
    """json's object_pairs_hook: an object, refused if a key is in it twice (json.loads keeps
    the last; which one the user meant is a guess)."""
    row = dict(pairs)
    if len(row) < len(pairs):
        keys = [k for k, _ in pairs]
        raise ValueError(f"the key {next(k for k in keys if keys.count(k) > 1)!r} appears twice")
    return row


JSON_KINDS = {list: "a list", str: "a string", int: "a number", float: "a number",
              bool: "true or false", type(None): "null"}
MAX_DIGITS = 100  # a longer integer is no value of a row (Python refuses to read 4,300 digits)


def _json_int(text):
    """json's parse_int: an integer, refused past MAX_DIGITS digits."""
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise ValueError(f"a number of {len(text.lstrip('-'))} digits ({text[:12]}...)")
    return int(text)


def _check_text(row):
    """Every string in a parsed row is text: an escaped half of a UTF-16 surrogate pair
    (\\ud83c without its other half) parses into a string no tokenizer or file takes."""
    stack = [(f"the field {key!r}", value) for key, value in row.items()]
    while stack:  # not recursive: json nests as deep as the stack allows
        where, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"{where} holds {value[e.start]!r}, half of a UTF-16 surrogate "
                                 "pair without its other half: not text") from e
        elif isinstance(value, (dict, list)):
            stack.extend((where, v) for v in (value.values() if isinstance(value, dict)
                                              else value))


def _as_text(value):
    """A number where an option's text goes (`"answer": 3`, `"choices": [1, 2, 3]`) is the
    text JSON writes it as ("3"); anything else (true, a list...) is left to the checks."""
    return json.dumps(value) if type(value) in (int, float) else value


def parse_jsonl_row(line, task=None):
    """One line of a JSONL file (bytes) -> (its row, its task), as far as the row can be checked
    without its image; `task` the file's, from its first row. Numbers among a choice row's
    choices and answer are their text."""
    try:
        row = json.loads(line.decode("utf-8"), object_pairs_hook=_unique_keys,
                         parse_int=_json_int)
    except RecursionError as e:
        raise ValueError("not valid JSON (nested too deeply)") from e
    if not isinstance(row, dict):
        raise ValueError(f"not a JSON object but {JSON_KINDS.get(type(row), 'something else')}")
    _check_text(row)
    row_task = task_type(row)
    if task and row_task != task:
        raise ValueError(f"a {row_task} row in a file of {task} rows (one task a file)")
    missing = [k for k in ("image",) + TASK_FIELDS[row_task] if k not in row]
    if missing:
        raise ValueError(f"missing field(s) {missing} of a {row_task} row")
    image = row["image"]
    if not isinstance(image, str) or not image.strip():
        raise ValueError(f"image must be the path of a file, got {image!r}")
    if "://" in image or image.startswith("data:"):
        raise ValueError(f"image must be the path of a file on this machine (relative to the "
                         f"JSONL file's folder, or absolute), got {image[:80]!r}")
    if row_task == "choice":
        row["answer"] = _as_text(row["answer"])
        if isinstance(row["choices"], list):
            row["choices"] = [_as_text(c) for c in row["choices"]]
    return row, row_task


class JsonlRows:
    """The rows of a JSONL file, kept in the file: per row its byte offset, line number and
    CRC (20 bytes, where the parsed dicts took some 10 KB), read again and parsed when used."""

    def __init__(self, path, task):
        self.path, self.task, self.file = path, task, None
        self.offsets, self.lines, self.crcs = array.array("q"), array.array("q"), array.array("I")

    def add(self, offset, line_no, line):
        self.offsets.append(offset)
        self.lines.append(line_no)
        self.crcs.append(zlib.crc32(line))

    def read(self, i):
        """Row i's (image path, fields); the row as checked, or ValueError."""
        if self.file is None:  # open once: the check reads every row (a file replaced since
            self.file = open(self.path, "rb")  # is still read as it was, the row checked)
        self.file.seek(self.offsets[i])
        line = self.file.readline()
        if zlib.crc32(line) != self.crcs[i]:  # the file was edited: this is not the row checked
            raise ValueError("the row changed since the file was read; restart to use it")
        row, _ = parse_jsonl_row(line, self.task)
        image = self.path.parent / row["image"]
        if not image.exists() and self.path.parent != Path() and Path(row["image"]).exists():
            raise ValueError(f"image {str(image)!r} does not exist: image paths are relative to "
                             f"the JSONL file's folder, and {row['image']!r} is relative to the "
                             "current one")
        return image, row

    def where(self, i):
        return f"{self.path}:{self.lines[i]}"


def load_jsonl(path, limit=0, flag="--dataset"):
    """A user's task, one JSON object a line, `image` a path relative to the file, and
    choice: `question`, `choices`, `answer` (one of the choices; numbers are their JSON text);
    rec: `phrase`, `box` ([x1, y1, x2, y2] in original pixels);
    ovd: `labels` (the categories asked for), `boxes` ([{"bbox_2d": [...], "label": ...}]).
    Every row of a file has the task of the first. Blank lines, and a byte order mark at a line's
    start, are skipped. The file is read once through here, its rows checked as far as they can
    be without their images; a row is read again when used."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag}: file {str(path)!r} does not exist")
    rows, digest, offset = None, hashlib.sha256(), 0
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):  # only \n ends a line (U+2028...)
            digest.update(line)
            start, offset = offset, offset + len(line)
            if line.startswith(codecs.BOM_UTF8):  # some editors write one (at each line of
                start, line = start + 3, line[3:]  # files put together)
            try:
                if not line.decode("utf-8").strip():
                    continue
                _, task = parse_jsonl_row(line, rows and rows.task)
            except UnicodeDecodeError as e:
                utf16 = line_no == 1 and line.startswith((codecs.BOM_UTF16_LE,
                                                          codecs.BOM_UTF16_BE))
                raise UserError(f"{path}:{line_no}: not UTF-8 text ({e.reason} at byte "
                                f"{start + e.start})" + ("; it is UTF-16 (its byte order "
                                                          "mark says): save it as UTF-8"
                                                          if utf16 else "")) from e
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{line_no}: not valid JSON ({e})") from e
            except ValueError as e:
                raise UserError(f"{path}:{line_no}: {e}") from e
            rows = rows or JsonlRows(path, task)
            rows.add(start, line_no, line)
            if limit and len(rows.offsets) == limit:
                break
        while chunk := f.read(1 << 24):  # the fingerprint is the whole file's
            digest.update(chunk)
    if rows is None:
        raise UserError(f"{flag} {path}: no rows")
    return Source(str(path), len(rows.offsets), rows.read, rows.where, rows.task,
                  digest.hexdigest())


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
