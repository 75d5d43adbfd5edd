"""The offline demo, run exactly as a new user runs it: `python train.py --demo --output_dir DIR`."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    start = time.time()
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--demo", "--output_dir", str(out)],
                            capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, time.time() - start


def accuracy(rows):
    return sum(r["rewards/accuracy/mean"] for r in rows) / len(rows)


@pytest.mark.slow
def test_demo_runs_in_five_minutes_and_starts_at_chance(demo_run):
    rows, seconds = demo_run
    assert seconds < 300, f"the demo took {seconds:.0f} s"
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    # the warm-up answers with a uniformly random colour: chance is 0.25
    assert 0.15 <= accuracy(rows[:10]) <= 0.40
    assert sum(r["rewards/format/mean"] for r in rows[:10]) / 10 > 0.9


@pytest.mark.slow
def test_demo_accuracy_rises_from_chance_to_085(demo_run):
    rows, _ = demo_run
    assert accuracy(rows[-10:]) >= 0.85, f"last 10 steps: {accuracy(rows[-10:]):.3f}"
