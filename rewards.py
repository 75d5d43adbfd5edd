"""Rule-based rewards: plain functions `(completion: str, example: dict) -> float`, a registry.

`completion` is the decoded text the model wrote after the prompt (the prompt ends with "<think>",
so it does not include that tag); `example` is the dataset row (`answer` is the gold option text,
`choices` the options).

Adding a reward is a function and a line:

    def short_reward(completion, example):
        return 1.0 if len(completion) < 400 else 0.0

    REWARDS["short"] = short_reward      # then: --reward_funcs format accuracy short

or, without touching this file: `--reward_funcs format accuracy path/to/my_rewards.py:short_reward`.
A reward that raises scores 0.0 for that completion and is counted in `rewards/<name>/errors`;
the first exception of each reward is shown once.
"""

import importlib.util
import math
import re
import traceback
from pathlib import Path

from cli import UserError

FORMAT_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)

# The "aha moment" signal: self-reflection phrases, matched case-insensitively as whole words.
REFLECTION_PHRASES = ("wait", "re-check", "recheck", "double-check", "double check", "reconsider",
                      "re-evaluate", "re-examine", "let me check", "let me verify",
                      "on second thought", "i made a mistake", "that is not right",
                      "that's not right")
REFLECTION_RE = re.compile(r"\b(" + "|".join(map(re.escape, REFLECTION_PHRASES)) + r")\b",
                           re.IGNORECASE)


def format_reward(completion, example):
    """1.0 if "<think>" + completion is exactly `<think>...</think> <answer>...</answer>`."""
    return 1.0 if FORMAT_RE.fullmatch("<think>" + completion) else 0.0


def extract_answer(completion):
    """The stripped content of the FIRST <answer>...</answer>, else the whole stripped text."""
    match = ANSWER_RE.search(completion)
    return (match.group(1) if match else completion).strip()


def accuracy_reward(completion, example):
    """1.0 if the extracted answer equals the gold option text exactly (the paper's rule)."""
    return 1.0 if extract_answer(completion) == example["answer"] else 0.0


REWARDS = {"format": format_reward, "accuracy": accuracy_reward}


def is_reflective(completion):
    return REFLECTION_RE.search(completion) is not None


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
