"""How much a reward would teach, before a run spends hours on it (README "Prototyping a
reward"): the figures of `reward_preview.json`, from the completions `train.py
--preview_rewards N` samples, or those a run logged (`--rescore RUN/samples.jsonl`).

A group whose completions all score the same has advantages all 0: its step learns nothing from
it. `zero_variance_groups` is the fraction of such groups; a reward near 1.0 there gives no
signal on this model, however right it is.
"""

import itertools
import json
from pathlib import Path

import numpy as np

from r1v import cli, runs
from r1v.cli import UserError

EXAMPLES = 4   # prompts whose highest- and lowest-scoring completions the report shows
ZERO_STD = 1e-6  # a group's std below this is no signal (metrics' frac_reward_zero_std too)


def first_prompts(sampler, n):
    """The row indices of the run's first `n` prompts, in the batches its steps draw them in
    (the last one cut at `n`); more than its first epoch holds is an error."""
    epoch = sampler.size // sampler.batch_size * sampler.batch_size
    if n > epoch:
        raise UserError(f"--preview_rewards {n}: the run's first epoch has {epoch} prompts "
                        f"(the dataset's rows in whole batches of --prompts_per_step "
                        f"{sampler.batch_size}); preview at most {epoch}")
    batches = []
    while sum(map(len, batches)) < n:
        batches.append(sampler.next_batch()[:n - sum(map(len, batches))])
    return batches


def figures(values, errors, groups):
    """A reward's (or the total's) mean, std (as rewards/<name>/std), extremes, the calls
    that raised and the fraction of groups in which every completion scored the same."""
    values = np.asarray(values, dtype=float)                                   # (N,)
    flat = [values[g].std(ddof=1) < ZERO_STD if len(g) > 1 else True for g in groups]
    std = float(values.std(ddof=1)) if len(values) > 1 else None  # of one score: undefined
    return {"mean": float(values.mean()), "std": std,
            "min": float(values.min()), "max": float(values.max()), "errors": errors,
            "zero_variance_groups": float(np.mean(flat))}


def correlation(a, b):
    """Pearson's r over completions; None where a reward does not vary (r is undefined)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.std() < ZERO_STD or b.std() < ZERO_STD:
        return None
    return float(np.clip(np.corrcoef(a, b)[0, 1], -1.0, 1.0))


def extremes(group, texts, total, parts):
    """A group's highest- and lowest-scoring completions (by the total), each with its scores."""
    def shown(i):
        return {"completion": texts[i], "reward": total[i],
                "rewards": {name: values[i] for name, values in parts.items()}}
    ordered = sorted(group, key=lambda i: total[i])
    return {"highest": shown(ordered[-1]), "lowest": shown(ordered[0])}


def summarize(texts, total, parts, errors, groups, shown, settings):
    """reward_preview.json: each reward's figures and the weighted total's, the correlation of
    each pair over completions, and the extremes of the first groups. `groups` are lists of
    completion indices (a prompt's G completions); `shown[k]` what names group k for a reader
    (its question, gold and, rescored, step)."""
    return {"prompts": len(groups), "num_generations": max(map(len, groups)),
            "rewards": {name: figures(values, errors[name], groups)
                        for name, values in parts.items()},
            "total": figures(total, sum(errors.values()), groups),
            "correlation": {f"{a}|{b}": correlation(parts[a], parts[b])
                            for a, b in itertools.combinations(parts, 2)},
            "examples": [{**shown[k], **extremes(g, texts, total, parts)}
                         for k, g in enumerate(groups[:EXAMPLES])],
            "settings": settings}


def of_batches(scored, group_size, gold_of, settings):
    """The report of a preview's generation batches (metrics.Scored, whole groups of
    `group_size` completions each); `gold_of(example)` is what a reader is shown as right."""
    texts = [t for s in scored for t in s.texts]
    examples = [ex for s in scored for ex in s.examples[::group_size]]  # a group's prompt
    parts = {name: [v for s in scored for v in s.parts[name]] for name in scored[0].parts}
    errors = {name: sum(s.errors[name] for s in scored) for name in parts}
    groups = [list(range(k, k + group_size)) for k in range(0, len(texts), group_size)]
    return summarize(texts, [t for s in scored for t in s.total], parts, errors, groups,
                     [{"question": ex["question"], "answer": gold_of(ex)} for ex in examples],
                     settings)


def describe(report):
    """The report's figures as a short table, with what a flat reward means."""
    width = max(12, *map(len, report["rewards"]))  # names cut short could read the same
    lines = [f"{'':<{width}}{'mean':>8}{'std':>8}{'min':>8}{'max':>8}{'errors':>8}"
             "  zero-variance groups"]
    for name, f in [*report["rewards"].items(), ("total", report["total"])]:
        lines.append(f"{name:<{width}}" + "".join(f"{'-':>8}" if f[k] is None else f"{f[k]:>8.3f}"
                                                  for k in ("mean", "std", "min", "max"))
                     + f"{f['errors']:>8}  {f['zero_variance_groups']:.2f}")
    lines += [f"correlation {pair}: " + ("undefined (one does not vary)" if r is None
                                         else f"{r:.3f}")
              for pair, r in report["correlation"].items()]
    flat = report["total"]["zero_variance_groups"]
    if flat > 0:
        lines.append(f"{flat:.0%} of the groups scored the same in every completion: their "
                     "advantages are 0, a step learns nothing from them")
    return "\n".join(lines)


def write(report, out):
    """reward_preview.json into `out` (atomic: an earlier one is replaced whole), the table
    printed; the only file a preview writes beside the demo's model."""
    path = Path(out) / "reward_preview.json"
    runs.write_atomic(path, json.dumps(report, indent=2, allow_nan=False))
    print(f"{report['prompts']} prompts x {report['num_generations']} completions:\n"
          f"{describe(report)}\nthe report is in {path}")
    return report


def read_samples(path):
    """The completions a run logged (samples.jsonl), grouped by step and prompt: a list of
    groups, each a list of its lines. A file written before the lines carried their example
    and group cannot be rescored: an error naming the line."""
    if not Path(path).is_file():
        raise UserError(f"--rescore {path}: no such file (give a run's samples.jsonl)")
    with cli.user_error(f"--rescore {path}: cannot read it", OSError, UnicodeDecodeError):
        lines, _ = runs.read_log(path)  # a last line torn by a kill is dropped
    groups, last = {}, None
    for number, line in lines:
        if not isinstance(line, dict) or not {"step", "completion"} <= line.keys():
            raise UserError(f"--rescore {path}:{number}: not a line of a run's samples.jsonl")
        if not isinstance(line.get("example"), dict):  # an older run's lines had no group either
            raise UserError(f"--rescore {path}:{number}: the sample has no 'example' (what its "
                            "rewards saw), so it cannot be scored again: samples.jsonl of a "
                            "run from before they were logged")
        if not (isinstance(line["step"], int) and isinstance(line.get("group"), int)
                and isinstance(line["completion"], str)):
            raise UserError(f"--rescore {path}:{number}: not a line of a run's samples.jsonl "
                            "(an integer step and group, a text completion)")
        key = (line["step"], line["group"])
        if key in groups and key != last:  # a group's lines are written together, once a step
            raise UserError(f"--rescore {path}:{number}: step {key[0]}'s group {key[1]} comes "
                            "twice: the samples of more than one run? rescore one run's file")
        groups.setdefault(key, []).append(line)
        last = key
    if not groups:
        raise UserError(f"--rescore {path}: no samples in it")
    return list(groups.values())


def rescore(groups, reward_funcs, weights, score_completions, on_error=None):
    """Every logged completion scored by `reward_funcs` (rewards.score_completions), each with
    the example its run's rewards saw: (texts, total, parts, errors, index groups, shown)."""
    lines = [line for group in groups for line in group]
    texts = [line["completion"] for line in lines]
    total, parts, errors = score_completions(texts, [line["example"] for line in lines],
                                             reward_funcs, weights, on_error)
    starts = np.cumsum([0] + [len(g) for g in groups])
    indices = [list(range(a, b)) for a, b in zip(starts[:-1], starts[1:])]
    shown = [{"step": g[0]["step"], "question": g[0].get("question"),
              "answer": g[0].get("answer")} for g in groups]
    return texts, total, parts, errors, indices, shown
