"""The GPU benchmark script, smoke-tested on CPU with the tiny model (it measures nothing here)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "grpo_step.py"


def load_script():
    spec = importlib.util.spec_from_file_location("grpo_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_flag_is_explained():
    assert all(action.help for action in load_script().build_parser()._actions)


@pytest.mark.slow
def test_benchmark_script_runs_every_variant(tmp_path):
    # 12 new tokens: generation is then mostly decode steps, so its time stays above the
    # prefill-only repeat's even on a busy CPU. 2-sequence micro-batches: TRL accumulates two
    # passes per optimizer step, ours cuts the batch in two. One thread a process: on a shared
    # 2-core machine torch's two threads wait on each other (a tiny matmul then takes ~15 ms).
    B, G, C = 2, 2, 12
    (tmp_path / "lora+liger.json").write_text('{"peak_gib": 8.5}')  # a plan, of one variant
    done = subprocess.run(
        [
            sys.executable, str(SCRIPT), "--tiny", "--steps", "1", "--prompts", str(B),
            "--G", str(G), "--completion_tokens", str(C), "--image_side", "56",
            "--micro_batch_size", "2", "--out", str(tmp_path), "--plan_dir", str(tmp_path),
            "--cpu_compile", "--compile_backend", "eager",  # the compiled decode, rehearsed
        ],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["variant"] for r in rows] == list(load_script().VARIANTS)
    # the plan beside the measured peak: its own variant's only
    assert [r["plan_peak_gib"] for r in rows] == [None, 8.5, None, None, None, None]
    # the decode step compiled once, without a break, where the trainer compiles it (in calls
    # of one group too: every call the cache's shape)
    assert [r.get("decode_compiles") for r in rows] == [1, 1, 0, 1, 1, None]
    assert [r.get("decode_graph_breaks") for r in rows] == [0, 0, 0, 0, 0, None]
    calls = rows[3]  # lora+liger-calls: a quarter of the groups a call, here one: B calls
    assert calls["variant"] == "lora+liger-calls"
    assert calls["vision_by_phase"]["generation"]["calls"] == B
    assert rows[1]["vision_by_phase"]["generation"]["calls"] == 1
    saved = json.loads((tmp_path / "cpu.json").read_text())
    assert saved == rows and "plan's estimate GiB" in (tmp_path / "cpu.md").read_text()
    for r in rows:
        assert r["step_time_s"] > 0 and r["generation_s"] > 0 and r["tokens_per_s"] > 0
        assert r["completion_tokens"] == C  # EOS held back in TRL too
        assert r["decode_ms_per_step"] > 0 and r["bandwidth_gb_s"] > 0
        assert 0 < r["floor_ms_per_step"] < r["decode_ms_per_step"]  # a floor, not a guess
        assert r["peak_allocated_gib"] is None and r["memory_gib"] is None  # CUDA only
        phases = r["vision_by_phase"]
        assert r["vision_calls_per_step"] == sum(p["calls"] for p in phases.values()) >= 1
        assert r["images_encoded_per_step"] == sum(p["images"] for p in phases.values())
        # Generation encodes each image once per completion (B x G), or once per prompt (B)
        # when the G completions share it; the log-prob and update passes encode them again
        # in either way, or reuse generation's features (0).
        assert phases["generation"]["images"] in (B, B * G)
        assert phases["logp"]["images"] in (0, B, B * G)
        assert phases["update"]["images"] in (0, B, B * G)
    trl = rows[-1]
    # TRL repeats each prompt's image G times and encodes it in every pass: generation, the
    # reference's log-probs and the update, each pass in micro-batches of 2 sequences.
    assert trl["images_encoded_per_step"] == 3 * B * G
    assert trl["vision_calls_per_step"] == 1 + 2 * (B * G // 2)
    assert trl["settings"]["gradient_accumulation_steps"] == 2
    assert not (ROOT / "benchmarks" / "results" / "cpu.json").exists()
