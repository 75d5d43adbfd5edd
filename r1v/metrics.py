"""What a step logs (README "Metrics"): the reference library's names for what was generated and
how it scored, the "aha moment" signal (self-reflection phrases), metrics.jsonl and samples; and
the scores eval.py reports (CV-Bench's micro and official scores, Acc@IoU, mAP) and its table."""

import contextlib
import dataclasses
import json
import math
import re
import time
import traceback

import numpy as np
import torch
from tqdm import tqdm

from r1v import answers, cli, grounding

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
# One pattern per key, not one for all: a single scan's non-overlapping matches could hide a key.
REFLECTION_RES = {key: re.compile(r"\b(" + "|".join(map(re.escape, phrases)) + r")\b",
                                  re.IGNORECASE)
                  for key, phrases in REFLECTION_GROUPS.items()}


def reflection_keys(completion):
    """The keys of REFLECTION_GROUPS whose phrases occur in `completion` (whole words, any
    case), as a set: "Wait, let me re-check." -> {"wait", "recheck"}."""
    return {key for key, pattern in REFLECTION_RES.items() if pattern.search(completion)}


@dataclasses.dataclass
class Scored:
    """The completions of a generation batch and what they scored, on the host. Each process
    scores its share; `gathered` joins the shares, so that the metrics and samples are the
    whole batch's, the same whatever the number of processes."""
    texts: list
    examples: list      # the example each completion answers
    total: list         # the weighted sum of the rewards
    parts: dict         # reward name -> its unweighted values
    errors: dict        # reward name -> calls that raised
    lengths: list       # completion tokens, EOS included
    terminated: list    # ended by EOS (not clipped at --max_completion_length)

    def gathered(self, procs):
        """Every process's share, in process order (the images stay behind)."""
        mine = dataclasses.replace(self, examples=[{k: v for k, v in ex.items() if k != "image"}
                                                   for ex in self.examples])
        shares = procs.gather(mine)

        def joined(name):  # one list from each process's list
            return [x for s in shares for x in getattr(s, name)]
        lists = {f: joined(f) for f in ("texts", "examples", "total", "lengths", "terminated")}
        return Scored(**lists,
                      parts={n: [x for s in shares for x in s.parts[n]] for n in self.parts},
                      errors={n: sum(s.errors[n] for s in shares) for n in self.errors})


def completion_lengths(rollout, eos_ids):
    """Each completion's tokens (EOS included) and whether it ended by an EOS: (N,) lists."""
    ids = rollout.completion_ids
    terminated = torch.isin(ids, torch.as_tensor(eos_ids, device=ids.device)).any(1)   # (N,)
    return rollout.completion_mask.sum(1).tolist(), terminated.tolist()


class PhaseTimer:
    """Wall seconds of a step's phases (`time/<phase>` in metrics.jsonl), the GPU's queued work
    waited for at each end: CUDA runs asynchronously, and a phase's time is its kernels'."""

    def __init__(self, device, phases=("generation", "logp", "update")):
        self.device, self.seconds = device, dict.fromkeys(phases, 0.0)

    @contextlib.contextmanager
    def __call__(self, phase):
        self._wait()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._wait()
            self.seconds[phase] += time.perf_counter() - start

    def _wait(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def metrics(self, generated_tokens):
        """The phases' times, the tokens generated and their rate in generation."""
        generation = self.seconds["generation"]
        return {**{f"time/{k}": v for k, v in self.seconds.items()},
                "generated_tokens": generated_tokens,
                "tokens_per_second": generated_tokens / generation if generation else 0.0}


def rollout_metrics(scored, group_size):
    """The reference library's metric names for what was generated and how it scored; for
    grounding, the boxes per answer against the gold count (the hack VLM-R1 saw: many boxes)."""
    rewards_t = torch.tensor(scored.total)                                     # (N,)
    group_std = rewards_t.view(-1, group_size).std(1)                          # (B,)
    lengths = torch.tensor(scored.lengths, dtype=torch.float)                  # (N,)
    eos_seen = torch.tensor(scored.terminated)                                 # (N,)
    metrics = {"reward": rewards_t.mean().item(), "reward_std": group_std.mean().item(),
               "frac_reward_zero_std": (group_std < 1e-6).float().mean().item()}
    for name, values in scored.parts.items():
        v = torch.tensor(values)
        metrics[f"rewards/{name}/mean"] = v.mean().item()
        metrics[f"rewards/{name}/std"] = v.std().item()
        metrics[f"rewards/{name}/errors"] = scored.errors[name]
    terminated = lengths[eos_seen] if eos_seen.any() else torch.zeros(1)  # as TRL: 0 if none
    reflections = [reflection_keys(t) for t in scored.texts]
    metrics.update({"completions/mean_length": lengths.mean().item(),
                    "completions/max_length": lengths.max().item(),
                    "completions/min_length": lengths.min().item(),
                    "completions/clipped_ratio": (~eos_seen).float().mean().item(),
                    "completions/mean_terminated_length": terminated.mean().item(),
                    "completions/max_terminated_length": terminated.max().item(),
                    "completions/min_terminated_length": terminated.min().item(),
                    "completions/reflection_ratio": float(np.mean([bool(r) for r in reflections]))})
    for key in REFLECTION_KEYS:  # which phrases make the curve (VisualThinker issue 12)
        metrics[f"completions/reflection/{key}"] = float(np.mean([key in r for r in reflections]))
    if scored.examples[0]["task_type"] != "choice":
        metrics["boxes/per_answer"] = float(np.mean([answers.count_boxes(t)
                                                     for t in scored.texts]))
        metrics["boxes/gold"] = float(np.mean([len(ex["boxes"]) if "boxes" in ex else 1
                                               for ex in scored.examples]))  # rec: one box
    return metrics


def count_step(counters, procs, rollout, skipped, nonfinite, stop_requested):
    """The whole batch's counts after a step (tokens seen, rows skipped); True if any process
    was asked to stop (Ctrl-C)."""
    seen = rollout.prompt_mask.sum() + rollout.completion_mask.sum()
    tokens, skipped, stop = (int(x) for x in procs.sum([seen, skipped, int(stop_requested)]))
    counters["num_tokens"] += tokens
    counters["skipped_rows"] += skipped
    counters["nonfinite_steps"] += nonfinite
    counters["consecutive_nonfinite"] = counters["consecutive_nonfinite"] + 1 if nonfinite else 0
    return bool(stop)


def report_once():
    """A printer that shows each kind of problem once: the first of its kind, in full."""
    seen = set()

    def report(kind, message):
        if kind not in seen:
            seen.add(kind)
            tqdm.write(f"warning: {message} (further ones are only counted)")
    return report


def on_reward_error(report):
    """What to do when a reward raises: show the first error of each reward (`report`)."""
    def on_error(name, error):
        summary = "".join(traceback.format_exception(error, limit=-2)).rstrip()
        report(f"reward {name}", f"reward {name!r} raised; it scores 0.0 and is counted in "
                                 f"rewards/{name}/errors:\n{summary}\n")
    return on_error


class FirstErrors:
    """rewards.score_completions' `on_error`: passes each error to `report(name, error)` and
    keeps each reward's first, to stop a run whose reward raised on every completion of its
    first step."""

    def __init__(self, report):
        self.report, self.first = report, {}

    def __call__(self, name, error):
        self.first.setdefault(name, error)
        self.report(name, error)

    def check_first_step(self, errors, calls):
        """`errors` {name: calls that raised} of the first step's `calls` completions."""
        for name, count in errors.items():
            if calls and count == calls:
                error = self.first.get(name)
                raise cli.UserError(f"reward {name!r} raised on all {calls} completions of the "
                                    "first step, so it would only ever score 0; its first error: "
                                    f"{type(error).__name__}: {error}")


def write_logs(out, metrics, scored, samples_every, num_samples, gold_of, group_size):
    """One line to metrics.jsonl (a number that is not finite as null: JSON has no NaN), a short
    one to the terminal; every `samples_every` steps (and the first), the whole groups of the
    first `num_samples` prompts to samples.jsonl (README "Metrics"), with what each reward saw:
    enough to score them again with other rewards (`train.py --rescore`)."""
    row = {k: None if isinstance(v, float) and not math.isfinite(v) else v
           for k, v in metrics.items()}
    step, samples = row["step"], []
    if scored and samples_every and (step % samples_every == 0 or step == 1):
        samples = [sample_line(step, i // group_size, scored, i, gold_of)
                   for i in range(min(num_samples * group_size, len(scored.texts)))]
    for name, lines in (("metrics.jsonl", [row]), ("samples.jsonl", samples)):
        if not lines:  # no samples this step: the file is not even opened
            continue
        path = out / name
        with cli.user_error(f"cannot write {path}", OSError, hint="; the checkpoints are "
                            "intact: free space and continue with --resume"), open(path, "a") as f:
            f.writelines(json.dumps(line, allow_nan=False) + "\n" for line in lines)
    tqdm.write(short_line(row))


def sample_line(step, group, scored, i, gold_of):
    """Completion i of a step as samples.jsonl keeps it: its group (the prompt's place in the
    step), the question and gold for a reader, its rewards and their weighted total, and the
    example its rewards saw (the image left out; its token count, `completion_tokens`, in)."""
    example = scored.examples[i]
    return {"step": step, "group": group, "question": example["question"],
            "answer": gold_of(example), "completion": scored.texts[i], "reward": scored.total[i],
            "rewards": {n: v[i] for n, v in scored.parts.items()},
            "example": {k: v for k, v in example.items() if k != "image"}}


WATCHED = {"kl": "kl", "loss": "loss", "mean_token_accuracy": "token_accuracy",
           "grad_norm": "grad_norm", "completions/mean_length": "length",
           "eval/accuracy": "eval/accuracy", "eval/mAP": "eval/mAP", "step_time": "seconds"}


SHORT = {"generation": "gen"}  # the step line stays one terminal line


def short_line(row):
    """The few numbers a person watches, of a metrics row (all of them: metrics.jsonl): the
    total reward and each reward's mean, the loss's, and where the step's seconds went."""
    taken = {"reward", *WATCHED.values()}  # the reward `length` is not the completions' length
    means = [k for k in row if k.startswith("rewards/") and k.endswith("/mean")]
    parts = {"reward": "reward",
             **{k: k.removesuffix("/mean") if k.split("/")[1] in taken else k.split("/")[1]
                for k in means},
             **WATCHED}
    line = f"step {row['step']}: " + " ".join(
        f"{name}={row[k]:{'.3g' if k == 'step_time' else '.4g'}}" for k, name in parts.items()
        if isinstance(row.get(k), (int, float)))
    phases = {SHORT.get(k[5:], k[5:]): v for k, v in row.items() if k.startswith("time/") and v}
    if phases and isinstance(row.get("step_time"), (int, float)):
        line += " (" + ", ".join(f"{k} {v:.2g}" for k, v in phases.items()) + ")"
    return line


CVBENCH_TASKS = ("Count", "Relation", "Depth", "Distance")


def percent_correct(rows):  # of no rows: None (null in summary.json, which holds no NaN)
    return 100.0 * sum(bool(r["correct"]) for r in rows) / len(rows) if rows else None


def mean_of(*scores):  # a score of categories one of which had no items is None too
    return None if None in scores else sum(scores) / len(scores)


def detection_map(rows):
    """COCO mAP@[.5:.95] in percent over every image of the rows (unparsed answers: no boxes)."""
    return 100.0 * grounding.coco_ap([r["detections"] or [] for r in rows],
                                     [r["gold"] for r in rows])


def score_cvbench(rows):
    """CV-Bench scores in percent from rows with `source`, `task`, `correct`.

    micro    accuracy over all items (the number the paper reports, 59.47)
    official ((acc_ADE20K + acc_COCO) / 2 + acc_Omni3D) / 2   (CV-Bench's own overall score)
    2D, 3D   (acc_ADE20K + acc_COCO) / 2 and acc_Omni3D
    Count, Relation, Depth, Distance: accuracy per task
    """
    by_source = {s: percent_correct([r for r in rows if r["source"] == s])
                 for s in ("ADE20K", "COCO", "Omni3D")}
    acc_2d = mean_of(by_source["ADE20K"], by_source["COCO"])
    scores = {"micro": percent_correct(rows), "official": mean_of(acc_2d, by_source["Omni3D"]),
              "2D": acc_2d, "3D": by_source["Omni3D"]}
    scores.update({task: percent_correct([r for r in rows if r["task"] == task])
                   for task in CVBENCH_TASKS})
    return scores


def summarize(rows, benchmark):
    """summary.json: the item count, unparsed answers and the scores of the rows' task, with
    their units (multiple choice: percent)."""
    summary = {"n": len(rows),
               "mean_response_chars": sum(len(r["response"]) for r in rows) / max(1, len(rows))}
    task, n = (rows[0]["task_type"] if rows else "choice"), max(1, len(rows))
    if task == "rec":
        return {**summary, "unparsed": sum(r["box"] is None for r in rows),
                "scores": {"Acc@0.5": percent_correct(rows),
                           "mean_IoU": 100 * sum(r["iou"] for r in rows) / n},
                "units": {"Acc@0.5": "%", "mean_IoU": "% (IoU x 100)"}}
    if task == "ovd":
        return {**summary, "unparsed": sum(r["detections"] is None for r in rows),
                "scores": {"mAP": detection_map(rows),
                           "boxes_per_image": sum(len(r["detections"] or []) for r in rows) / n,
                           "gold_per_image": sum(len(r["gold"]) for r in rows) / n},
                "units": {"mAP": "%", "boxes_per_image": "boxes", "gold_per_image": "boxes"}}
    lenient = [{**r, "correct": r["correct_lenient"]} for r in rows]
    scores = score_cvbench if benchmark == "cvbench" else lambda x: {"micro": percent_correct(x)}
    return {**summary, "unparsed": sum(r["choice"] is None for r in rows),
            "unparsed_lenient": sum(r["choice_lenient"] is None for r in rows),
            "strict": scores(rows), "lenient": scores(lenient)}


def cell(score, width):  # a score of no items (None): "-"
    return f"{'-' if score is None else f'{score:.2f}':>{width}}"


def format_table(summary):
    """eval.py's table of a summary: one row of scores (grounding, detection), or a row per
    parser (multiple choice)."""
    if "scores" in summary:
        scores = summary["scores"]
        return ("".join(f"{k:>16}" for k in scores) + "\n"
                + "".join(f"{summary['units'][k]:>16}" for k in scores) + "\n"
                + "".join(cell(v, 16) for v in scores.values())
                + f"\nitems {summary['n']}, no parsable answer: {summary['unparsed']}, mean "
                f"response length {summary['mean_response_chars']:.0f} chars")
    keys = list(summary["strict"])
    lines = [f"{'parser':<9}" + "".join(f"{k:>10}" for k in keys) + "   (percent)"]
    for parser in ("strict", "lenient"):
        lines.append(f"{parser:<9}" + "".join(cell(summary[parser][k], 10) for k in keys))
    lines.append(f"items {summary['n']}, no parsable <answer>: {summary['unparsed']} (lenient: "
                 f"{summary['unparsed_lenient']}), mean response length "
                 f"{summary['mean_response_chars']:.0f} chars")
    return "\n".join(lines)
