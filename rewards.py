"""Rule-based rewards: plain functions `(completion: str, example: dict) -> float`, a registry.

`completion` is the decoded text the model wrote after the prompt (the paper's prompt ends with
"<think>", so it does not include that tag; a chat prompt does not); `example` is the dataset row
(data.py): `answer` is the gold option text, `choices` the options. The grounding rewards read
boxes [x1, y1, x2, y2] in the frame the model answers in (pixels of the resized image for
Qwen2.5-VL, 0-1000 for Qwen2-VL and Qwen3-VL; data.py converts): `iou` reads `box` (one box,
referring expressions), `detection` reads `boxes` (a list of {"bbox_2d": [...], "label": str},
open-vocabulary detection).

Adding a reward is a function and a line:

    def short_reward(completion, example):
        return 1.0 if len(completion) < 400 else 0.0

    REWARDS["short"] = short_reward      # then: --reward_funcs format accuracy short

or, without touching this file: `--reward_funcs format accuracy path/to/my_rewards.py:short_reward`.
A reward gets its own copy of the example: what it changes there, no other call sees. Whatever
it raises (SystemExit too; only Ctrl-C stops the run) scores 0.0 for that completion and is
counted in `rewards/<name>/errors`; the first exception of each reward is shown once, and a
reward that raises on every completion of the run's first step stops it.
"""

import copy
import inspect
import math
import re

from r1v import answers, cli, grounding
from r1v.cli import UserError

FORMAT_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)


def format_reward(completion, example):
    """1.0 if the answer is exactly `<think>...</think> <answer>...</answer>`. The "<think>" the
    paper's prompt (or a Thinking model's chat prompt, "<think>\n") ends with counts as written;
    an Instruct model's chat prompt ends without it."""
    forced = "<think>" if example.get("prompt", "<think>").rstrip().endswith("<think>") else ""
    return 1.0 if FORMAT_RE.fullmatch(forced + completion) else 0.0


def extract_answer(completion):
    """The stripped content of the FIRST <answer>...</answer>, else the whole stripped text."""
    answer = answers.first_answer(completion)
    return (completion if answer is None else answer).strip()


def accuracy_reward(completion, example):
    """1.0 if the extracted answer equals the gold option text exactly (the paper's rule), both
    stripped as R1-V does (a gold ' left' could never score)."""
    return 1.0 if extract_answer(completion) == example["answer"].strip() else 0.0


def iou_reward(completion, example):
    """IoU of the answered box with `example["box"]`, 0.0 if none parses. Unlike VLM-R1
    (arXiv 2504.07615), whose regex takes integers only, float coordinates count too."""
    box = answers.parse_box(completion)
    return grounding.box_iou(box, example["box"]) if box else 0.0


def detection_reward(completion, example):
    """VLM-R1's odLength: COCO AP of the answer against `example["boxes"]`, times
    min(1, n_gold / n_pred) with n_pred counting every box (listing many boxes does not pay).
    1.0 if both are empty, 0.0 if one is or the answer does not parse."""
    predictions, gold = answers.parse_detections(completion), example["boxes"]
    if predictions is None or bool(predictions) != bool(gold):
        return 0.0
    if not gold:
        return 1.0
    return grounding.coco_ap([predictions], [gold]) * min(1.0, len(gold) / len(predictions))


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


def load_reward(spec):
    """A registry name (`accuracy`) or `path/to/file.py:function` -> (name, function)."""
    if spec in REWARDS:
        return spec, REWARDS[spec]
    if ":" not in spec:
        raise UserError(f"--reward_funcs: unknown reward {spec!r}; known: {sorted(REWARDS)}, "
                        "or give path/to/file.py:function")
    name, func = cli.import_function(spec, "--reward_funcs")
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):  # a builtin that does not say: it is tried on the first step
        return name, func
    try:
        signature.bind("completion", {})
    except TypeError:  # every call would raise: hours of training on zeros
        raise UserError(f"--reward_funcs {spec!r}: {name}{signature} does not take the expected "
                        "(completion, example) -> float") from None
    return name, func


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
                value = func(completion, own_copy(example))
                if isinstance(value, (str, bytes)):  # float("1") is 1.0: a text is no score
                    raise TypeError(f"reward returned {type(value).__name__} {value!r}, "
                                    "not a number")
                value = float(value)
                if not math.isfinite(value):
                    raise ValueError(f"non-finite reward {value}")
            except KeyboardInterrupt:  # Ctrl-C is the user's, not the reward's
                raise
            except BaseException as e:  # sys.exit() in a reward would end the run as a success
                value = 0.0
                errors[name] += 1
                if on_error is not None:
                    on_error(name, e)
            parts[name].append(value)
    total = [sum(weights[name] * parts[name][i] for name in reward_funcs)
             for i in range(len(completions))]
    return total, parts, errors


def own_copy(example):
    """A copy of `example` down to its nested lists (boxes, choices), for one reward call; the
    image is shared: copying its pixels for every call would cost more than the rewards."""
    image = example.get("image")
    return copy.deepcopy(example, {id(image): image})
