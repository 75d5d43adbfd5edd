"""Reading what a completion answers: the content of its FIRST <answer>...</answer>, read as an
option (strict, or the paper's lenient way), one box, or a list of detections."""

import json
import math
import re

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
LETTERS = "ABCDEFGH"
NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
BOX_RE = re.compile(r"\[" + ",".join([NUMBER] * 4) + r"\]")
FENCE_RE = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.DOTALL)


def first_answer(text):
    """The content of the first <answer>...</answer>, or None if there is none."""
    match = ANSWER_RE.search(text)
    return match.group(1) if match else None


def _norm(text):
    return re.sub(r"\s+", " ", text).strip().strip(".").strip().lower()


def _match(text, choices, lettered):
    """Index of the option `text` names exactly: a letter `A`, `(A)`, `A.` (lettered options
    only) or the option text, as written before any case and spacing (of the options `Left`
    and `left`, `left` names the second, as the training's accuracy reward reads it)."""
    written, text = text.strip(), _norm(text)
    letter = re.fullmatch(r"\(?([a-h])\)?[.:]?", text)
    if lettered and letter and LETTERS.lower().index(letter.group(1)) < len(choices):
        return LETTERS.lower().index(letter.group(1))
    if written in (stripped := [c.strip() for c in choices]):
        return stripped.index(written)
    if lettered:  # "(A) 3" names both
        text = re.sub(r"^\(?[a-h]\)\s*", "", text)
    for i, choice in enumerate(choices):
        if text == _norm(choice):
            return i
    return None


def parse_choice(response, choices, lettered=True, lenient=False):
    """The index of the chosen option, or None if the response names none.

    strict: only the content of the FIRST <answer>...</answer> counts, and it must name exactly
    one option. lenient (the paper's looser behaviour): without a tag the whole response is read,
    and a letter in parentheses or an option text found anywhere in it counts (the first found).
    """
    tagged = first_answer(response)
    if tagged is not None:
        found = _match(tagged, choices, lettered)
        if found is not None or not lenient:
            return found
    elif not lenient:
        return None
    text = response if tagged is None else tagged
    found = _match(text, choices, lettered)
    if found is not None:
        return found
    if lettered:
        letter = re.search(r"\(([A-H])\)", text)
        if letter and LETTERS.index(letter.group(1)) < len(choices):
            return LETTERS.index(letter.group(1))
    # Not inside a word on either side; \b would ask a word character at the ends of `(x)` or
    # `C++` and never find them. Of options found at one place, the longest: `3.5`, not `3`.
    hits = [(m.start(), -len(m.group()), i) for i, c in enumerate(choices) if _norm(c)
            for m in [re.search(r"(?<!\w)" + re.escape(_norm(c)) + r"(?!\w)", _norm(text))] if m]
    return min(hits)[2] if hits else None


def parse_box(text):
    """The first [x1, y1, x2, y2] inside the first answer, as 4 floats, or None. A bare list,
    {"bbox_2d": [...]} and [{"bbox_2d": [...], "label": ...}] all qualify."""
    box = BOX_RE.search(first_answer(text) or "")
    return [float(v) for v in box.groups()] if box else None


def parse_detections(text):
    """The first answer as a JSON list of {"bbox_2d": [4 numbers], "label": str}, or None if
    there is no answer or any part is malformed. The answer "None" (VLM-R1's prompt asks for it
    when nothing is there) is an empty list, like `[]`. A ```json fence is allowed."""
    content = first_answer(text)
    if content is None:
        return None
    content = content.strip()
    if content.lower() == "none":
        return []
    fence = FENCE_RE.fullmatch(content)
    try:
        items = json.loads(fence.group(1) if fence else content)
    except ValueError:
        return None
    if not isinstance(items, list):
        return None
    detections = []
    for item in items:
        box = item.get("bbox_2d") if isinstance(item, dict) else None
        if not (isinstance(box, list) and len(box) == 4 and isinstance(item.get("label"), str)
                and all(type(v) in (int, float) and math.isfinite(v) for v in box)):
            return None  # bool is not a coordinate: type(), not isinstance
        detections.append({"bbox_2d": [float(v) for v in box], "label": item["label"]})
    return detections


def count_boxes(completion):
    """Boxes in the answer: the detections, else 1 if a single box parses, else 0."""
    detections = parse_detections(completion)
    return len(detections) if detections is not None else int(parse_box(completion) is not None)
