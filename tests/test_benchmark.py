"""The GPU benchmark script, smoke-tested on CPU with the tiny model (it measures nothing here)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_script_runs_every_variant():
    done = subprocess.run(
        [
            sys.executable, str(ROOT / "benchmarks" / "grpo_step.py"), "--tiny", "--steps", "1",
            "--prompts", "2", "--G", "2", "--completion_tokens", "4", "--image_side", "56",
            "--micro_batch_size", "4",
        ],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["variant"] for r in rows] == ["lora", "lora+liger", "qlora+liger"]
    for r in rows:
        assert r["step_time_s"] > 0 and r["generation_s"] > 0 and r["tokens_per_s"] > 0
    assert not (ROOT / "benchmarks" / "results" / "cpu.json").exists()
