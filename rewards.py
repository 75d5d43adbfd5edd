"""Rule-based rewards: plain functions `(completion: str, example: dict) -> float`, and a registry.

`completion` is the decoded text the model wrote after the prompt (the prompt ends with "<think>", so it does
not include that tag); `example` is the dataset row (`answer` is the gold option text, `choices` the options).

Adding a reward is a function and a line:

    def short_reward(completion, example):
        return 1.0 if len(completion) < 400 else 0.0

    REWARDS["short"] = short_reward          # then: python train.py --reward_funcs format accuracy short

or, without touching this file: `--reward_funcs format accuracy path/to/my_rewards.py:short_reward`.
A reward that raises scores 0.0 for that completion and is counted in `rewards/<name>/errors`.
"""

import importlib.util
import math
import re
from pathlib import Path

FORMAT_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)

# The "aha moment" signal: self-reflection phrases, matched case-insensitively as whole words.
REFLECTION_PHRASES = ("wait", "re-check", "recheck", "double-check", "double check", "reconsider",
                      "re-evaluate", "re-examine", "let me check", "let me verify", "on second thought",
                      "i made a mistake", "that is not right", "that's not right")
REFLECTION_RE = re.compile(r"\b(" + "|".join(re.escape(p) for p in REFLECTION_PHRASES) + r")\b", re.IGNORECASE)


def format_reward(completion, example):
    """1.0 if "<think>" + completion is exactly `<think>...</think> <answer>...</answer>`, nothing after."""
    return 1.0 if FORMAT_RE.fullmatch("<think>" + completion) else 0.0


def extract_answer(completion):
    """The stripped content of the FIRST <answer>...</answer>, or the whole stripped completion if none."""
    match = ANSWER_RE.search(completion)
    return (match.group(1) if match else completion).strip()


def accuracy_reward(completion, example):
    """1.0 if the extracted answer equals the gold option text exactly (the paper's rule), else 0.0."""
    return 1.0 if extract_answer(completion) == example["answer"] else 0.0


REWARDS = {"format": format_reward, "accuracy": accuracy_reward}


def is_reflective(completion):
    return REFLECTION_RE.search(completion) is not None


def load_reward(spec):
    """A registry name (`accuracy`) or `path/to/file.py:function` -> (name, function). Errors name the spec."""
    if spec in REWARDS:
        return spec, REWARDS[spec]
    if ":" not in spec:
        raise ValueError(f"--reward_funcs: unknown reward {spec!r}; known: {sorted(REWARDS)}, "
                         "or give path/to/file.py:function")
    path, _, func_name = spec.rpartition(":")
    if not Path(path).is_file():
        raise ValueError(f"--reward_funcs {spec!r}: file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ValueError(f"--reward_funcs {spec!r}: {path!r} has no function {func_name!r}")
    return func_name, func


def score_completions(completions, examples, reward_funcs, weights):
    """Score every completion with every reward.

    `reward_funcs` is {name: function}, `weights` {name: float}. Returns (total, parts, errors): total[i] is the
    weighted sum for completion i, parts[name][i] the unweighted reward, errors[name] how many calls raised or
    returned something that is not a finite number (each of those scores 0.0).
    """
    parts = {name: [] for name in reward_funcs}
    errors = {name: 0 for name in reward_funcs}
    for completion, example in zip(completions, examples):
        for name, func in reward_funcs.items():
            try:
                value = float(func(completion, example))
                if not math.isfinite(value):
                    raise ValueError(f"non-finite reward {value}")
            except Exception:
                value = 0.0
                errors[name] += 1
            parts[name].append(value)
    total = [sum(weights[name] * parts[name][i] for name in reward_funcs) for i in range(len(completions))]
    return total, parts, errors
