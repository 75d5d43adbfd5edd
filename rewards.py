"""Rule-based rewards: plain functions `(completion: str, example: dict) -> float`, a registry.

`completion` is the decoded text the model wrote after the prompt (the paper's prompt ends with
"<think>", so it does not include that tag; a chat prompt does not); `example` is the dataset row
(data.py): `answer` is the gold option text, `choices` the options. The grounding rewards read
boxes [x1, y1, x2, y2] in the frame the model answers in (pixels of the resized image for
Qwen2.5-VL, 0-1000 for Qwen2-VL; data.py converts): `iou` reads `box` (one box, referring
expressions), `detection` reads `boxes` (a list of {"bbox_2d": [...], "label": str},
open-vocabulary detection).

Adding a reward is a function and a line:

    def short_reward(completion, example):
        return 1.0 if len(completion) < 400 else 0.0

    REWARDS["short"] = short_reward      # then: --reward_funcs format accuracy short

or, without touching this file: `--reward_funcs format accuracy path/to/my_rewards.py:short_reward`.
A reward that raises scores 0.0 for that completion and is counted in `rewards/<name>/errors`;
the first exception of each reward is shown once.
"""

import contextlib
import importlib.util
import io
import json
import math
import re
import traceback
from pathlib import Path

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cli import UserError

FORMAT_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)

# The "aha moment" signal: self-reflection phrases, matched case-insensitively as whole words,
# grouped under a few keys so the reflection curve can be broken down by kind of phrase.
REFLECTION_GROUPS = {
    "wait": ("wait",),
    "recheck": ("re-check", "recheck"),
    "double_check": ("double-check", "double check"),
    "reconsider": ("reconsider",),
    "reevaluate": ("re-evaluate", "re-examine"),
    "verify": ("let me check", "let me verify"),
    "second_thought": ("on second thought",),
    "mistake": ("i made a mistake", "that is not right", "that's not right"),
}
REFLECTION_KEYS = tuple(REFLECTION_GROUPS)  # the order metrics are logged and drawn in
REFLECTION_PHRASES = tuple(p for phrases in REFLECTION_GROUPS.values() for p in phrases)
# One pattern per key, not one for all: a single scan's non-overlapping matches could hide a key.
REFLECTION_RES = {key: re.compile(r"\b(" + "|".join(map(re.escape, phrases)) + r")\b",
                                  re.IGNORECASE)
                  for key, phrases in REFLECTION_GROUPS.items()}


def format_reward(completion, example):
    """1.0 if the answer is exactly `<think>...</think> <answer>...</answer>`. The "<think>" the
    paper's prompt ends with counts as written; a chat prompt ends without it."""
    forced = "<think>" if example.get("prompt", "<think>").endswith("<think>") else ""
    return 1.0 if FORMAT_RE.fullmatch(forced + completion) else 0.0


def extract_answer(completion):
    """The stripped content of the FIRST <answer>...</answer>, else the whole stripped text."""
    match = ANSWER_RE.search(completion)
    return (match.group(1) if match else completion).strip()


def accuracy_reward(completion, example):
    """1.0 if the extracted answer equals the gold option text exactly (the paper's rule)."""
    return 1.0 if extract_answer(completion) == example["answer"] else 0.0


NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
BOX_RE = re.compile(r"\[" + ",".join([NUMBER] * 4) + r"\]")
FENCE_RE = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.DOTALL)


def parse_box(text):
    """The first [x1, y1, x2, y2] inside the FIRST <answer>...</answer>, as 4 floats, or None.

    A bare list, {"bbox_2d": [...]} and [{"bbox_2d": [...], "label": ...}] all qualify."""
    answer = ANSWER_RE.search(text)
    box = answer and BOX_RE.search(answer.group(1))
    return [float(v) for v in box.groups()] if box else None


def box_iou(a, b):
    """Intersection over union of two [x1, y1, x2, y2] boxes; an inverted box has area 0."""
    def area(x1, y1, x2, y2):
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)
    inter = area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    union = area(*a) + area(*b) - inter
    return inter / union if union > 0 else 0.0


def iou_reward(completion, example):
    """IoU of the answered box with `example["box"]`, 0.0 if none parses. Unlike VLM-R1
    (arXiv 2504.07615), whose regex takes integers only, float coordinates count too."""
    box = parse_box(completion)
    return box_iou(box, example["box"]) if box else 0.0


def parse_detections(text):
    """The FIRST answer as a JSON list of {"bbox_2d": [4 numbers], "label": str}, or None if
    there is no answer or any part is malformed. The answer "None" (VLM-R1's prompt asks for it
    when nothing is there) is an empty list, like `[]`. A ```json fence is allowed."""
    answer = ANSWER_RE.search(text)
    if not answer:
        return None
    content = answer.group(1).strip()
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


def coco_ap(predictions, golds):
    """COCO AP@[.50:.95] (pycocotools) over images i = 1..n: `predictions[i]` and `golds[i]` are
    lists of {"bbox_2d": [x1, y1, x2, y2], "label": str}. Every prediction has score 1.0; one
    whose label is in no gold is not scored. 0.0 where AP is undefined (no gold box)."""
    labels = sorted({g["label"] for boxes in golds for g in boxes})
    category = {label: k for k, label in enumerate(labels, 1)}

    def annotations(images, **extra):
        anns = []
        for image_id, boxes in enumerate(images, 1):
            for d in boxes:
                if d["label"] in category:
                    x1, y1, x2, y2 = map(float, d["bbox_2d"])
                    # An inverted box gets area 0, a false positive: with its negative area
                    # COCOeval would ignore it, a free pass for writing x2 < x1.
                    w, h = max(0.0, x2 - x1), max(0.0, y2 - y1)
                    anns.append({"id": len(anns) + 1, "image_id": image_id, "bbox": [x1, y1, w, h],
                                 "category_id": category[d["label"]], "area": w * h,
                                 "iscrowd": 0, **extra})
        return anns

    gt_anns, dt_anns = annotations(golds), annotations(predictions, score=1.0)
    if not gt_anns or not dt_anns:  # AP undefined, or 0: no call into pycocotools
        return 0.0
    coco_gt, coco_dt = COCO(), COCO()
    coco_gt.dataset = {"images": [{"id": i} for i in range(1, len(golds) + 1)],
                       "categories": [{"id": k, "name": n} for n, k in category.items()],
                       "annotations": gt_anns}
    coco_dt.dataset = {**coco_gt.dataset, "annotations": dt_anns}
    # Equal scores keep the order written: cocoeval.py sorts with np.argsort(-scores,
    # kind="mergesort"), which is stable (per image, then across images: image 1 first).
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco_gt.createIndex()
        coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    ap = float(evaluator.stats[0])
    return ap if ap >= 0 else 0.0  # -1 is COCOeval's "undefined"


def detection_reward(completion, example):
    """VLM-R1's odLength: COCO AP of the answer against `example["boxes"]`, times
    min(1, n_gold / n_pred) with n_pred counting every box (listing many boxes does not pay).
    1.0 if both are empty, 0.0 if one is or the answer does not parse."""
    predictions, gold = parse_detections(completion), example["boxes"]
    if predictions is None or bool(predictions) != bool(gold):
        return 0.0
    if not gold:
        return 1.0
    return coco_ap([predictions], [gold]) * min(1.0, len(gold) / len(predictions))


def count_boxes(completion):
    """Boxes in the answer: the detections, else 1 if a single box parses, else 0."""
    detections = parse_detections(completion)
    return len(detections) if detections is not None else int(parse_box(completion) is not None)


LENGTH_REWARD_PER_TOKEN = 0.001


def length_reward(completion, example):
    """0.001 per completion token, uncapped: the naive length reward VisualThinker-R1-Zero tried
    and reported as ineffective at eliciting reasoning. Their code counted the Qwen2-VL tokens
    of the decoded completion.

    A reward has no tokenizer, so what is counted is `example["completion_tokens"]` when the
    trainer puts it there (each completion's own count, so the G completions of a prompt need G
    dicts), else the whitespace-separated words of `completion`: fewer than its tokens (an
    English word is about 1.3 tokens, a tag such as `</think>` several)."""
    tokens = example.get("completion_tokens")
    return LENGTH_REWARD_PER_TOKEN * (len(completion.split()) if tokens is None else tokens)


REWARDS = {"format": format_reward, "accuracy": accuracy_reward, "iou": iou_reward,
           "detection": detection_reward, "length": length_reward}


def reflection_keys(completion):
    """The keys of REFLECTION_GROUPS whose phrases occur in `completion` (whole words, any
    case), as a set: "Wait, let me re-check." -> {"wait", "recheck"}. A trainer logs, per
    step, `completions/reflection/<key>` = the fraction of completions whose set holds the key,
    for each key of REFLECTION_KEYS."""
    return {key for key, pattern in REFLECTION_RES.items() if pattern.search(completion)}


def is_reflective(completion):
    """True if the completion has any reflection phrase: `reflection_keys` is not empty."""
    return bool(reflection_keys(completion))


def load_reward(spec):
    """A registry name (`accuracy`) or `path/to/file.py:function` -> (name, function)."""
    if spec in REWARDS:
        return spec, REWARDS[spec]
    if ":" not in spec:
        raise UserError(f"--reward_funcs: unknown reward {spec!r}; known: {sorted(REWARDS)}, "
                        "or give path/to/file.py:function")
    path, _, func_name = spec.rpartition(":")
    if not Path(path).is_file():
        raise UserError(f"--reward_funcs {spec!r}: file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # the user's file: say where it broke, not our traceback
        line = getattr(e, "lineno", None) or traceback.extract_tb(e.__traceback__)[-1].lineno
        raise UserError(f"--reward_funcs {spec!r}: {path}:{line}: "
                        f"{type(e).__name__}: {e}") from e
    func = getattr(module, func_name, None)
    if not callable(func):
        raise UserError(f"--reward_funcs {spec!r}: {path!r} has no function {func_name!r}")
    return func_name, func


def load_rewards(specs, weights=None):
    """The rewards of `--reward_funcs` and their weights: ({name: function}, {name: weight})."""
    weights = [1.0] * len(specs) if weights is None else list(weights)
    if len(weights) != len(specs):
        raise UserError(f"--reward_weights has {len(weights)} values for {len(specs)} "
                        "--reward_funcs")
    funcs = {}
    for spec in specs:
        name, func = load_reward(spec)
        if name in funcs:  # their metrics would merge under one name
            raise UserError(f"--reward_funcs: two rewards are named {name!r}; "
                            "rename one function")
        funcs[name] = func
    return funcs, dict(zip(funcs, weights))


def score_completions(completions, examples, reward_funcs, weights, on_error=None):
    """Score every completion with every reward.

    `reward_funcs` is {name: function}, `weights` {name: float}. Returns (total, parts, errors):
    total[i] is the weighted sum for completion i, parts[name][i] the unweighted reward,
    errors[name] how many calls raised or returned something that is not a finite number (each
    of those scores 0.0; `on_error(name, exception)` is called for each).
    """
    parts = {name: [] for name in reward_funcs}
    errors = {name: 0 for name in reward_funcs}
    for completion, example in zip(completions, examples):
        for name, func in reward_funcs.items():
            try:
                value = float(func(completion, example))
                if not math.isfinite(value):
                    raise ValueError(f"non-finite reward {value}")
            except Exception as e:
                value = 0.0
                errors[name] += 1
                if on_error is not None:
                    on_error(name, e)
            parts[name].append(value)
    total = [sum(weights[name] * parts[name][i] for name in reward_funcs)
             for i in range(len(completions))]
    return total, parts, errors
