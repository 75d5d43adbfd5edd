"""A user's task as a JSONL file: one JSON object a line, `image` a path relative to the file.
The file is read once through and each row checked as far as it can be without its image; the
rows stay in the file (its byte offsets kept), read again when used."""

import array
import codecs
import hashlib
import json
import zlib
from pathlib import Path

from r1v.cli import UserError
from r1v.rows import TASK_FIELDS, Source, task_type


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
