"""report.py on metrics files written here: the figure, the table by hand, the errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from r1v import cli
import report

ROOT = Path(__file__).resolve().parents[1]

ACC, FMT, KL, EVAL = "rewards/accuracy/mean", "rewards/format/mean", "kl", "eval/accuracy"


def write_run(folder, columns, torn=False):
    """RUN/metrics.jsonl from {metric: [value per step, None where not logged]}, steps 1, 2..."""
    folder.mkdir()
    steps = max(len(values) for values in columns.values())
    rows = [{"step": step, **{key: values[step - 1] for key, values in columns.items()
                              if step <= len(values) and values[step - 1] is not None}}
            for step in range(1, steps + 1)]
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if torn:  # killed mid-write: half a line, no newline
        text += json.dumps({"step": steps + 1, ACC: 0.99})[:20]
    (folder / "metrics.jsonl").write_text(text)
    return str(folder)


@pytest.fixture
def runs(tmp_path):
    """Three seeds: b is shorter, has no KL and a torn last line; only a is evaluated, on
    steps 2 and 3; no run logs the reflection ratio."""
    return [
        write_run(tmp_path / "a", {ACC: [0.2, 0.5, 0.4], FMT: [0.0, 1.0, 1.0],
                                   "completions/mean_length": [50, 30, 80], KL: [0, 0.01, 0.03],
                                   EVAL: [None, 0.3, 0.35]}),
        write_run(tmp_path / "b", {ACC: [0.3, 0.7], FMT: [0.5, 1.0],
                                   "completions/mean_length": [40, 60]}, torn=True),
        write_run(tmp_path / "c", {ACC: [0.1, 0.1, 0.1, 0.4], FMT: [1.0, 0.5, 1.0, 1.0],
                                   "completions/mean_length": [45, 45, 45, 45],
                                   KL: [0, 0.02, 0.02, 0.05]}),
    ]


def section(table, title):
    """The rows of one metric: from its title to the next title."""
    lines = table.splitlines()[2:]
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {title} |"))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith("|  |")),
               len(lines))
    return lines[start:end]


def test_figure_and_table_by_hand(runs, tmp_path, capsys):
    out = tmp_path / "figs" / "aha.png"
    report.main([*runs, "--out", str(out)])
    captured = capsys.readouterr()
    table = (tmp_path / "figs" / "aha.md").read_text()
    assert captured.out == table
    # Final: the last step logged; peak: the largest value, at the first step that reached it.
    # Finals 0.4, 0.7, 0.4: mean 0.5, sample std sqrt((0.01 + 0.04 + 0.01) / 2) = 0.1732.
    # Peaks 0.5, 0.7, 0.4: mean 0.5333, sample std sqrt(0.046667 / 2) = 0.1528.
    assert section(table, "Accuracy reward") == [
        "| Accuracy reward | a | 0.4 | 3 | 0.5 | 2 |",
        "|  | b | 0.7 | 2 | 0.7 | 2 |",  # the torn step 3 is not there
        "|  | c | 0.4 | 4 | 0.4 | 4 |",
        "|  | mean ± std (3 runs) | 0.5 ± 0.1732 | | 0.5333 ± 0.1528 | |",
    ]
    assert section(table, "Format reward")[2] == "|  | c | 1 | 4 | 1 | 1 |"
    # b has no KL: the mean is over a and c. Finals 0.03, 0.05; peaks the same.
    assert section(table, "KL to the reference") == [
        "| KL to the reference | a | 0.03 | 3 | 0.03 | 3 |",
        "|  | c | 0.05 | 4 | 0.05 | 4 |",
        "|  | mean ± std (2 runs) | 0.04 ± 0.01414 | | 0.04 ± 0.01414 | |",
    ]
    assert section(table, "Held-out accuracy") == [  # only a is evaluated: no mean row
        "| Held-out accuracy | a | 0.35 | 3 | 0.35 | 3 |"]
    assert "Self-reflection" not in table
    assert "warning: " in captured.err and "b/metrics.jsonl:3: skipping a torn last line" \
        in captured.err
    assert "note: no run logs completions/reflection_ratio; left out" in captured.err
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] >= 1500 and image.size[1] >= 600
        image.verify()
    assert out.stat().st_size > 30_000  # lines were drawn, not an empty canvas


def test_smoothing_changes_the_figure_not_the_table(runs, tmp_path):
    for k in (1, 3):
        report.main([*runs, "--out", str(tmp_path / f"k{k}.png"), "--smooth", str(k),
                     "--band", "minmax", "--table", str(tmp_path / f"k{k}.md")])
    assert (tmp_path / "k1.md").read_text() == (tmp_path / "k3.md").read_text()
    assert (tmp_path / "k1.png").read_bytes() != (tmp_path / "k3.png").read_bytes()


def test_one_run_and_the_reflection_phrases(tmp_path):
    run = write_run(tmp_path / "solo", {ACC: [0.1, 0.2], "completions/reflection_ratio": [0, 0.5],
                                        "completions/reflection/wait": [0, 0.5],
                                        "completions/reflection/verify": [0, 0]})
    report.main([run, "--out", str(tmp_path / "solo.pdf")])
    assert (tmp_path / "solo.pdf").read_bytes().startswith(b"%PDF")
    table = (tmp_path / "solo.md").read_text()
    assert "mean ± std" not in table and "| Self-reflection | solo | 0.5 | 2 | 0.5 | 2 |" in table


@pytest.mark.parametrize(
    "steps,values,k,expected",
    [
        ([1, 2, 3, 4, 5], [1, 2, 4, 8, 16], 1, [1, 2, 4, 8, 16]),
        ([1, 2, 3, 4, 5], [1, 2, 4, 8, 16], 3, [1.5, 7 / 3, 14 / 3, 28 / 3, 12]),  # fewer at ends
        ([1, 2, 3], [1, 2, 4], 2, [1.5, 3, 4]),  # even: the step and the next
        ([10, 20, 21], [1, 2, 4], 3, [1, 3, 3]),  # a window of steps, not of logged values
    ],
)
def test_smooth(steps, values, k, expected):
    assert report.smooth(np.array(steps), np.array(values, float), k) == pytest.approx(expected)


def test_across_runs_of_different_lengths():
    curves = [(np.array([1, 2, 3]), np.array([1.0, 2.0, 3.0])),
              (np.array([1, 2]), np.array([3.0, 6.0]))]
    steps, mean, low, high = report.aggregate(curves, "std")
    assert steps.tolist() == [1, 2, 3] and mean == pytest.approx([2, 4, 3])
    # sample std of (1, 3) is sqrt(2), of (2, 6) sqrt(8); one run at step 3: no band there
    assert (high - mean)[:2] == pytest.approx([2 ** 0.5, 8 ** 0.5]) and np.isnan(high[2])
    _, _, low, high = report.aggregate(curves, "minmax")
    assert low.tolist() == [1, 2, 3] and high.tolist() == [3, 6, 3]


def error_of(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.run(report.main, argv)
    err = capsys.readouterr().err.splitlines()  # a note may come first, never a traceback
    assert exit_info.value.code == 2 and err[-1].startswith("error: ")
    assert not any(line.startswith(("error", "Traceback")) for line in err[:-1])
    return err[-1]


def test_one_line_errors(runs, tmp_path, capsys):
    missing = tmp_path / "no-run"
    missing.mkdir()
    assert f"error: {missing}: no metrics.jsonl" in error_of([runs[0], str(missing)], capsys)
    bad = tmp_path / "bad"
    write_run(bad, {ACC: [0.1, 0.2, 0.3]})
    lines = (bad / "metrics.jsonl").read_text().splitlines()
    (bad / "metrics.jsonl").write_text("\n".join([lines[0], "{oops", lines[2]]) + "\n")
    assert f"{bad / 'metrics.jsonl'}:2: not JSON" in error_of([str(bad)], capsys)  # not the last
    (bad / "metrics.jsonl").write_text('{"step": 1}\n{"kl": 0.1}\n')
    assert "metrics.jsonl:2: no integer \"step\"" in error_of([str(bad)], capsys)
    assert "--smooth must be at least 1" in error_of([runs[0], "--smooth", "0"], capsys)
    out = tmp_path / "aha.nope"
    assert f"--out {out}: the suffix picks" in error_of([runs[0], "--out", str(out)], capsys)
    (tmp_path / "taken.png").mkdir()  # a folder where the figure goes
    assert f"--out {tmp_path / 'taken.png'}: " in error_of(
        [runs[0], "--out", str(tmp_path / "taken.png")], capsys)


def test_the_command_line(runs, tmp_path):
    """As a user runs it: cli.run exits with status 2 and one line naming the folder."""
    missing = str(tmp_path / "typo")
    result = subprocess.run([sys.executable, "report.py", runs[0], missing], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"error: {missing}: no metrics.jsonl here; give the --output_dir " \
                            "of a run\n"


def test_odd_metrics_files(tmp_path, capsys):
    run = write_run(tmp_path / "big", {ACC: [0.1, 0.2], FMT: [1.0, 1.0]})
    path = Path(run) / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[1][:-1] + ', "huge": ' + "9" * 400 + "}\n")
    report.main([run, "--out", str(tmp_path / "big.png")])  # a value no float holds: left out
    assert "| Accuracy reward | big | 0.2 | 2 | 0.2 | 2 |" in capsys.readouterr().out
    two = write_run(tmp_path / "two", {ACC: [0.1, 0.2]})
    path = Path(two) / "metrics.jsonl"
    path.write_text(path.read_text() * 2)  # steps 1 2 1 2: two runs into one folder
    assert "metrics.jsonl:3: step 1 after step 2" in error_of([two], capsys)


def test_a_report_never_writes_over_a_runs_files(runs, tmp_path, capsys):
    before = {p: p.read_bytes() for r in runs for p in Path(r).iterdir()}
    metrics = str(Path(runs[0]) / "metrics.jsonl")
    assert f"--table {metrics} is a run's own file" in error_of([*runs, "--table", metrics],
                                                                 capsys)
    config = Path(runs[1]) / "config.json"
    assert "is a run's own file" in error_of([*runs, "--table", str(config)], capsys)
    same = str(tmp_path / "x.png")
    assert "is the figure's --out" in error_of([*runs, "--out", same, "--table", same], capsys)
    assert {p: p.read_bytes() for r in runs for p in Path(r).iterdir()} == before
    assert not config.exists()


def test_a_report_writes_over_no_file_it_did_not_write(runs, tmp_path, capsys):
    """Only new files, or report.py's own earlier figure and table: never a checkpoint's file."""
    checkpoint = Path(runs[0]) / "checkpoint-2"
    checkpoint.mkdir()
    adapter = checkpoint / "adapter_config.json"
    adapter.write_text('{"r": 8}\n')
    picture = tmp_path / "mine.png"
    Image.new("RGB", (4, 4)).save(picture)
    notes = tmp_path / "notes.md"
    notes.write_text("my notes\n")
    before = {p: p.read_bytes() for p in (adapter, picture, notes)}
    assert f"--table {adapter}: " in error_of([*runs, "--out", str(tmp_path / "a.png"),
                                                 "--table", str(adapter)], capsys)
    assert f"--out {picture}: " in error_of([*runs, "--out", str(picture)], capsys)
    assert f"--table {notes}: " in error_of([*runs, "--out", str(tmp_path / "a.png"),
                                               "--table", str(notes)], capsys)
    assert {p: p.read_bytes() for p in before} == before
    assert not (tmp_path / "a.png").exists()
    # a new name in a checkpoint's folder, asked for; then the same command again, over its own
    for _ in range(2):
        report.main([*runs, "--out", str(checkpoint / "aha.svg")])
    assert (checkpoint / "aha.md").read_text().startswith("| metric | run |")
    assert sorted(p.name for p in checkpoint.iterdir()) == ["adapter_config.json", "aha.md",
                                                            "aha.svg"]
    report.main([*runs, "--out", str(tmp_path / "aha.jpg")])  # no room for a mark: new only
    assert "holds no mark" in error_of([*runs, "--out", str(tmp_path / "aha.jpg")], capsys)


def test_the_same_run_twice_is_refused(runs, tmp_path, capsys):
    """One run given twice is not two seeds: by another path, or through a link."""
    a = Path(runs[0])
    (tmp_path / "x").mkdir()
    (tmp_path / "link").symlink_to(a)
    for again in (f"{tmp_path}/x/../a/", str(tmp_path / "link")):
        error = error_of([runs[0], runs[1], again, "--out", str(tmp_path / "r.png")], capsys)
        assert error.startswith(f"error: {again} is {runs[0]} again") and "once" in error
    assert not (tmp_path / "r.png").exists()


def test_an_sft_run(tmp_path, capsys):
    """SFT logs its loss and token accuracy, no reward: those are drawn."""
    run = write_run(tmp_path / "sft", {"loss": [2.0, 1.0, 0.5], "mean_token_accuracy":
                                       [0.3, 0.6, 0.9], EVAL: [None, None, 0.5],
                                       "grad_norm": [1.0, 1.0, 1.0]})
    report.main([run, "--out", str(tmp_path / "sft.png")])
    table = (tmp_path / "sft.md").read_text()
    assert section(table, "SFT loss") == ["| SFT loss | sft | 0.5 | 3 | 2 | 1 |"]
    assert section(table, "Answer token accuracy") == [
        "| Answer token accuracy | sft | 0.9 | 3 | 0.9 | 3 |"]
    assert "| Held-out accuracy | sft | 0.5 | 3 |" in table
    assert "note: " not in capsys.readouterr().err  # it logs all an SFT run logs


@pytest.mark.parametrize("task", ["rec", "ovd"])
def test_a_grounding_run(task, tmp_path):
    """rec: the IoU reward, the boxes per answer and Acc@0.5; ovd: detection and mAP."""
    reward, held = (("rewards/iou/mean", EVAL) if task == "rec"
                    else ("rewards/detection/mean", "eval/mAP"))
    run = write_run(tmp_path / task, {reward: [0.1, 0.4], FMT: [0.5, 1.0],
                                      "boxes/per_answer": [3.0, 1.0], held: [None, 0.6],
                                      "completions/mean_length": [30, 40], KL: [0, 0.1]})
    report.main([run, "--out", str(tmp_path / f"{task}.png")])
    table = (tmp_path / f"{task}.md").read_text()
    title = "IoU reward" if task == "rec" else "Detection reward"
    assert section(table, title) == [f"| {title} | {task} | 0.4 | 2 | 0.4 | 2 |"]
    assert section(table, "Boxes per answer") == [f"| Boxes per answer | {task} | 1 | 2 | 3 | 1 |"]
    held_title = "Held-out Acc@0.5" if task == "rec" else "Held-out mAP"
    assert section(table, held_title) == [f"| {held_title} | {task} | 0.6 | 2 | 0.6 | 2 |"]
    assert "Accuracy reward" not in table


def test_a_custom_reward_and_runs_of_two_kinds(runs, tmp_path):
    """A reward of one's own gets its panel; an SFT run beside GRPO runs adds its panels after
    theirs (the first run's kind first)."""
    mine = write_run(tmp_path / "mine", {FMT: [0.5, 1.0], "rewards/brevity/mean": [0.2, 0.6],
                                         "rewards/brevity/std": [0.1, 0.1]})
    sft = write_run(tmp_path / "sft", {"loss": [2.0, 1.0], "mean_token_accuracy": [0.3, 0.6]})
    report.main([runs[0], mine, sft, "--out", str(tmp_path / "r.png")])
    table = (tmp_path / "r.md").read_text()
    assert section(table, "Reward brevity") == ["| Reward brevity | mine | 0.6 | 2 | 0.6 | 2 |"]
    titles = [line.split(" | ")[0][2:] for line in table.splitlines()[2:]
              if not line.startswith("|  |")]
    assert titles[0] == "Accuracy reward" and titles.index("Held-out accuracy") < titles.index(
        "SFT loss")


def test_a_grpo_runs_loss_is_no_sft_loss(runs, tmp_path):
    """GRPO logs `loss` too (its policy loss, near 0): beside an SFT run it is not drawn nor
    tabled as "SFT loss", nor averaged with the SFT run's NLL; runs of two kinds are no seeds,
    so no metric gets their mean."""
    grpo = write_run(tmp_path / "grpo", {ACC: [0.2, 0.5], FMT: [1.0, 1.0], "loss": [1e-4, 2e-4],
                                         EVAL: [None, 0.4], "rewards/iou/mean": [0.1, 0.3]})
    sft = write_run(tmp_path / "sft", {"loss": [2.0, 1.0], "mean_token_accuracy": [0.3, 0.6],
                                       EVAL: [None, 0.5]})
    report.main([grpo, sft, "--out", str(tmp_path / "r.png")])
    table = (tmp_path / "r.md").read_text()
    assert section(table, "SFT loss") == ["| SFT loss | sft | 1 | 2 | 2 | 1 |"]
    assert section(table, "Held-out accuracy") == [  # no seeds of one run: no mean
        "| Held-out accuracy | grpo | 0.4 | 2 | 0.4 | 2 |", "|  | sft | 0.5 | 2 | 0.5 | 2 |"]
    assert section(table, "Reward iou") == ["| Reward iou | grpo | 0.3 | 2 | 0.3 | 2 |"]
