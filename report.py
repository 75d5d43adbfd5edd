"""The "aha moment" figure and a table of final and peak values, from runs' metrics.jsonl.

    python report.py runs/seed0 runs/seed1 runs/seed2 --out aha.png    # and aha.md
    python report.py runs/demo --smooth 10 --table results.md

A panel per metric against the step, what each kind of run logs (GRPO: the rewards, completion
length, reflection, KL, held-out accuracy; grounding adds the boxes per answer, Acc@0.5 or mAP;
SFT: its loss and token accuracy): each run a thin line; several runs of one kind (seeds) add
their mean and a band (std or min-max across runs), at each step over the runs that logged it, so
runs of different lengths mix. The table: each run's final and peak values, raw, and their mean
± std across runs of one kind. Both are written as new files, or over report.py's own earlier
ones, never over another file.
"""

import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backend_bases import FigureCanvasBase
from matplotlib.figure import Figure  # no pyplot: no screen and no global figure state
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from r1v import cli
from r1v import runs as runs_io
from r1v.cli import UserError, flag

REWARD = "mean over completions"
GENERATED = {  # what every GRPO run logs of its completions
    "rewards/format/mean": ("Format reward", REWARD),
    "completions/mean_length": ("Completion length", "tokens, mean"),
    "completions/reflection_ratio": ("Self-reflection", "fraction of completions"),
    "kl": ("KL to the reference", "k3 KL per token"),
}
PANELS = {  # each kind of run: {metric: (title, y label)}, in the order drawn
    "choice": {"rewards/accuracy/mean": ("Accuracy reward", REWARD), **GENERATED,
               "eval/accuracy": ("Held-out accuracy", "greedy, strict")},
    "rec": {"rewards/iou/mean": ("IoU reward", REWARD), **GENERATED,
            "boxes/per_answer": ("Boxes per answer", "mean; the gold has one"),
            "eval/accuracy": ("Held-out Acc@0.5", "greedy, IoU >= 0.5")},
    "ovd": {"rewards/detection/mean": ("Detection reward", REWARD), **GENERATED,
            "boxes/per_answer": ("Boxes per answer", "mean over completions"),
            "eval/mAP": ("Held-out mAP", "greedy, COCO mAP@[.5:.95]")},
    "sft": {"loss": ("SFT loss", "answer tokens' mean NLL"),
            "mean_token_accuracy": ("Answer token accuracy", "fraction of answer tokens"),
            "eval/accuracy": ("Held-out accuracy", "greedy, strict")},
}
PANEL_KEYS = {key for panels in PANELS.values() for key in panels}
PHRASES = "completions/reflection/"  # + each key of metrics.REFLECTION_KEYS, in one panel
PHRASES_PANEL = ("Reflection by phrase", "fraction of completions")
RUN_COLORS, PHRASE_COLORS = colormaps["tab10"], colormaps["Dark2"]


@dataclass
class ReportConfig:
    out: str = flag("aha.png", "the figure; its suffix picks the format (.png, .pdf, .svg)")
    table: str | None = flag(None, "the markdown table", default_help="--out with .md")
    band: str = flag("std", "the band around the runs' mean: std across runs, or min-max",
                     choices=("std", "minmax"))
    smooth: int = flag(1, "draw a centred moving average over this many steps (1: none); the "
                          "table stays raw", min=1)

    def __post_init__(self):  # before any file is read
        cli.check_values(self)
        formats = FigureCanvasBase.get_supported_filetypes()
        if Path(self.out).suffix[1:].lower() not in formats:
            raise UserError(f"--out {self.out}: the suffix picks the format, one of "
                            f"{', '.join(formats)}")


def read_metrics(run):
    """{metric: (steps, values)} from RUN/metrics.jsonl, finite numbers only, by step."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run}: no metrics.jsonl here; give the --output_dir of a run")
    with cli.user_error(str(path), OSError, UnicodeDecodeError):  # unreadable, or not text
        lines, torn = runs_io.read_log(path)
    if torn:  # the run was killed mid-write: its other lines are good
        print(f"warning: {path}:{torn}: skipping a torn last line", file=sys.stderr)
    series, last = {}, 0
    for number, row in lines:
        if not isinstance(row, dict) or type(row.get("step")) is not int:
            raise UserError(f"{path}:{number}: no integer \"step\"")
        if row["step"] <= last:
            raise UserError(f"{path}:{number}: step {row['step']} after step {last}: the metrics "
                            "of two runs in one file? Give each run its own --output_dir")
        last = row["step"]
        for key, value in row.items():
            if key != "step" and (value := finite(value)) is not None:
                series.setdefault(key, []).append((last, value))
    if last == 0:
        raise UserError(f"{path}: no steps logged")
    return {key: tuple(np.array(c) for c in zip(*pairs)) for key, pairs in series.items()}


def finite(value):
    """A metric's value as a finite float, else None (null, a bool, a string, an int too large
    for a float)."""
    if type(value) not in (int, float):
        return None
    try:
        return float(value) if math.isfinite(value) else None
    except OverflowError:
        return None


def smooth(steps, values, k):
    """The mean of the values logged within the k steps centred on each step."""
    if k <= 1:
        return values
    lo = np.searchsorted(steps, steps - (k - 1) // 2, "left")
    hi = np.searchsorted(steps, steps + k // 2, "right")
    sums = np.concatenate([[0.0], np.cumsum(values)])
    return (sums[hi] - sums[lo]) / (hi - lo)


def aggregate(curves, band):
    """(steps, mean, low, high) over the runs that logged each step; std needs two runs."""
    steps = np.unique(np.concatenate([s for s, _ in curves]))
    grid = np.full((len(curves), len(steps)), np.nan)                         # (runs, steps)
    for row, (s, v) in zip(grid, curves):
        row[np.searchsorted(steps, s)] = v
    mean, n = np.nanmean(grid, 0), (~np.isnan(grid)).sum(0)
    if band == "minmax":
        return steps, mean, np.nanmin(grid, 0), np.nanmax(grid, 0)
    var = np.nansum((grid - mean) ** 2, 0) / np.maximum(n - 1, 1)
    std = np.where(n > 1, np.sqrt(var), np.nan)
    return steps, mean, mean - std, mean + std


def kind_of(run):
    """The kind of run (a key of PANELS), from a metric only that kind logs."""
    if "mean_token_accuracy" in run:
        return "sft"
    if "rewards/detection/mean" in run or "eval/mAP" in run:
        return "ovd"
    return "rec" if "boxes/per_answer" in run else "choice"


def own_metrics(run):
    """A run's metrics less those another kind's panels draw and its own do not: a GRPO run's
    policy loss is no "SFT loss" beside an SFT run, nor averaged with its NLL. A reward means
    the same in every run: kept."""
    own = PANELS[kind_of(run)]
    return {key: v for key, v in run.items()
            if key in own or key not in PANEL_KEYS or key.startswith("rewards/")}


def alike(runs, key):
    """Whether the runs that log `key` are of one kind: an SFT and a GRPO run, or a grounding
    and a multiple-choice one, are no seeds of one experiment, and get no mean together."""
    return len({kind_of(run) for run in runs if key in run}) == 1


def draw(runs, names, panels, titles, cfg):
    """One figure: a panel per metric, in two rows when more than three."""
    rows = 1 if len(panels) <= 3 else 2
    cols = math.ceil(len(panels) / rows)
    fig = Figure(figsize=(4.8 * cols, 3.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, key in zip(axes, panels):
        if key == PHRASES:
            draw_phrases(ax, runs, cfg.smooth)
        else:
            draw_runs(ax, [run.get(key) for run in runs], cfg, alike(runs, key))
        title, ylabel = titles.get(key, PHRASES_PANEL)
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        flat = key != PHRASES and not any(run[key][1].any() for run in runs if key in run)
        ax.set_ylim(0, 1 if flat else max(ax.get_ylim()[1], 1e-3))  # every metric drawn is >= 0
        if flat:  # an axis of its own for a line at 0, and a word
            ax.text(0.5, 0.5, "0 at every step", transform=ax.transAxes, ha="center")
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=RUN_COLORS(i), lw=1.5) for i in range(len(runs))]
    labels = list(names)
    if len(runs) > 1:
        handles += [Line2D([], [], color="black", lw=2), Patch(color="black", alpha=0.15)]
        labels += ["mean of runs", "std across runs" if cfg.band == "std" else "min-max of runs"]
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 6))
    smoothing = f", moving average over {cfg.smooth} steps" if cfg.smooth > 1 else ""
    fig.suptitle(f"Training dynamics, {len(runs)} run{'s' * (len(runs) > 1)}{smoothing}")
    return fig


def draw_runs(ax, series, cfg, seeds=True):
    """Each run that logged the metric (`series[i]` is run i's, or None) as a thin line; with
    several `seeds` (runs of one kind), their mean (black) and band (grey) on top."""
    several, curves = len(series) > 1, []
    for i, run in enumerate(series):
        if run is not None:
            steps, values = run
            curves.append((steps, smooth(steps, values, cfg.smooth)))
            ax.plot(*curves[-1], color=RUN_COLORS(i), lw=0.9 if several else 1.8,
                    alpha=0.7 if several else 1.0, ms=3,
                    marker="o" if len(steps) < 30 else None)  # a lone evaluation shows
    if several and seeds:
        steps, mean, low, high = aggregate(curves, cfg.band)
        ax.fill_between(steps, low, high, color="black", alpha=0.15, lw=0)
        ax.plot(steps, mean, color="black", lw=2)


def draw_phrases(ax, runs, k):
    """The reflection ratio broken down by phrase: each phrase's mean over the runs, in colours
    of their own; phrases no completion ever had are left out."""
    phrases = [key for key in list_metrics(runs) if key.startswith(PHRASES)
               and any(key in run and run[key][1].any() for run in runs)]
    for i, phrase in enumerate(phrases):
        steps, mean, _, _ = aggregate([run[phrase] for run in runs if phrase in run], "std")
        ax.plot(steps, smooth(steps, mean, k), color=PHRASE_COLORS(i), lw=1.2,
                label=phrase[len(PHRASES):])
    if phrases:
        ax.legend(fontsize="small", ncol=2, loc="upper left",
                  title="mean of runs" if len(runs) > 1 else None, title_fontsize="small")


def list_metrics(runs):  # in the order first logged: the trainer's order
    return list(dict.fromkeys(key for run in runs for key in run))


TABLE_HEADER = "| metric | run | final | at step | peak | at step |"


def format_table(runs, names, keys, titles):
    """Markdown: each run's final and peak value of each metric; mean ± std over the runs."""
    lines = [TABLE_HEADER,
             "|---|---|---:|---:|---:|---:|"]
    for key in keys:
        finals, peaks, title = [], [], titles[key][0]
        for name, run in zip(names, runs):
            if key in run:
                steps, values = run[key]
                top = int(np.argmax(values))  # the first step that reached the peak
                finals.append(values[-1])
                peaks.append(values[top])
                lines.append(f"| {title} | {name} | {values[-1]:.4g} | {steps[-1]} "
                             f"| {values[top]:.4g} | {steps[top]} |")
                title = ""
        if len(finals) > 1 and alike(runs, key):
            lines.append(f"|  | mean ± std ({len(finals)} runs) | {format_mean_std(finals)} "
                         f"| | {format_mean_std(peaks)} | |")
    return "\n".join(lines) + "\n"


def format_mean_std(values):  # the sample std: seeds sample the runs one could have had
    return f"{np.mean(values):.4g} ± {np.std(values, ddof=1):.4g}"


def main(argv=None):
    parser = cli.build_parser(ReportConfig, __doc__)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="a run's --output_dir, with its metrics.jsonl; several: seeds")
    given = vars(parser.parse_args(argv))
    check_distinct(given["runs"])
    run_dirs = [Path(d) for d in given.pop("runs")]
    cfg = ReportConfig(**given)
    out = Path(cfg.out)
    table_path = Path(cfg.table) if cfg.table else out.with_suffix(".md")
    check_outputs(run_dirs, out, table_path)
    runs = [own_metrics(read_metrics(d)) for d in run_dirs]
    names = [d.resolve().name for d in run_dirs]
    if len(set(names)) < len(names):  # seeds/a/run and seeds/b/run: the names as given
        names = [str(d) for d in run_dirs]
    logged = list_metrics(runs)
    titles = {}  # each kind's panels, the first run's kind first, then rewards of one's own
    for kind in dict.fromkeys(kind_of(run) for run in runs):
        titles.update({k: v for k, v in PANELS[kind].items() if k not in titles})
    for key in logged:
        if (own := re.fullmatch(r"rewards/([^/]+)/mean", key)) and key not in titles:
            titles[key] = (f"Reward {own.group(1)}", REWARD)
    panels = [key for key in titles if key in logged]
    if absent := [key for key in titles if key not in logged]:
        print(f"note: no run logs {', '.join(absent)}; left out", file=sys.stderr)
    if any(key.startswith(PHRASES) and any(key in run and run[key][1].any() for run in runs)
           for key in logged):  # an empty panel when no completion ever reflected says nothing
        panels.append(PHRASES)
    if not panels:
        raise UserError(f"no run logs any of {', '.join(titles)}")
    text = format_table(runs, names, [key for key in panels if key in titles], titles)
    figure = draw(runs, names, panels, titles, cfg)
    runs_io.write_atomic(out, lambda tmp: save_figure(figure, tmp), f"--out {out}")
    runs_io.write_atomic(table_path, text, f"--table {table_path}")
    print(text, end="")
    print(f"wrote {out} and {table_path}", file=sys.stderr)


def check_distinct(run_dirs):
    """One run given twice (`base`, `x/../base/`, a link to it) would count as two seeds."""
    seen = {}
    for run in run_dirs:
        if (path := Path(run).resolve()) in seen:
            raise UserError(f"{run} is {seen[path]} again ({path}): give each run once")
        seen[path] = run


def check_outputs(run_dirs, out, table_path):
    """The figure and the table go to new files, or over report.py's own earlier ones: never
    over a run's file, a checkpoint's, or any file report.py did not write."""
    kept = {(d / name).resolve() for d in run_dirs for name in runs_io.RUN_FILES}
    for flag_name, path in (("--out", out), ("--table", table_path)):
        if path.resolve() in kept:  # the report's inputs, and the runs' other files
            raise UserError(f"{flag_name} {path} is a run's own file: choose another path")
    if out.resolve() == table_path.resolve():
        raise UserError(f"--table {table_path} is the figure's --out: choose another path")
    for flag_name, path, ours in (("--out", out, is_our_figure),
                                  ("--table", table_path, is_our_table)):
        if path.is_dir():
            raise UserError(f"{flag_name} {path}: a folder; name a file in it")
        if path.exists() and not ours(path):
            unmarked = path == out and out.suffix[1:].lower() not in CREATOR_FORMATS
            raise UserError(f"{flag_name} {path}: a file report.py did not write, kept as it is; "
                            "name a new file" + (f" (a {out.suffix} holds no mark of report.py: "
                                                 "it is never replaced)" if unmarked else ""))


# A figure carries this as its creator, where the format has one: a later report knows it may
# replace the file. A format without one (jpg...) is written only as a new file.
CREATOR = "report.py of r1v"
CREATOR_FORMATS = ("png", "pdf", "svg", "eps", "ps")


def save_figure(figure, path):
    fmt = Path(path).suffix[1:].lower()
    metadata = {"Creator": CREATOR} if fmt in CREATOR_FORMATS else None
    figure.savefig(path, dpi=150, metadata=metadata)


def is_our_figure(path):
    with cli.user_error(f"--out {path}", OSError):
        if path.stat().st_size > 100 * 2**20:  # no figure of ours is this large
            return False
        return CREATOR.encode() in path.read_bytes()


def is_our_table(path):
    with cli.user_error(f"--table {path}", OSError):
        with open(path, "rb") as f:
            return f.read(len(TABLE_HEADER) + 1) == TABLE_HEADER.encode() + b"\n"


if __name__ == "__main__":
    cli.run(main)
