"""Several processes (torchrun, accelerate launch; gloo on CPU) and the trackers (--report_to):
the same update as one process, a demo that learns, exact resume, files written once."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from r1v import checkpoints, processes
from r1v.cli import UserError
from test_checkpoint import metrics, wait_for

ROOT = Path(__file__).resolve().parents[1]
COMPARED = ("reward", "reward_std", "loss", "kl", "grad_norm", "entropy", "num_tokens",
            "rewards/accuracy/mean", "completions/mean_length", "learning_rate")


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            "2", *map(str, args)]


def accelerate_launch(*args):
    with socket.socket() as s:  # a free port for the processes to meet on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(port), *map(str, args)]


def run(command, timeout=900):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(list(map(str, command)), capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


def tensorboard_scalars(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_share_splits_a_batch_in_order_whatever_the_number_of_processes():
    items = list(range(10))
    for world in (1, 2, 3, 4):
        shares = [processes.share(items, rank, world) for rank in range(world)]
        assert sum(shares, []) == items  # contiguous, in order: data order does not change
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert [processes.share(list(range(16)), r, 2) for r in (0, 1)] == [list(range(8)),
                                                                         list(range(8, 16))]
    assert processes.share(range(3), 3, 4) == range(3, 3)  # more processes than items: none


@pytest.mark.slow
def test_sigterm_stops_after_the_step_as_ctrl_c_does():
    # a cluster's preemption sends SIGTERM: the step's work is saved, as on Ctrl-C
    for signum in (signal.SIGINT, signal.SIGTERM):
        before = signal.getsignal(signum)
        with processes.stop_on_signals(main_process=False) as stop:
            os.kill(os.getpid(), signum)
            assert stop["requested"] and stop["status"] == 128 + signum
        assert signal.getsignal(signum) is before


def test_two_processes_make_the_one_process_update(tmp_path, tiny_model_dir):
    """The same batch of 8, one process vs two (4 + 4, cut into micro-batches of 3 differently):
    equal gradients and stats, for the GRPO loss, DAPO's through Liger, QLoRA and SFT."""
    worker = ROOT / "tests" / "one_update.py"
    one = run([sys.executable, worker, tiny_model_dir, tmp_path / "one.pt"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run(torchrun(worker, tiny_model_dir, tmp_path / "two.pt"))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert set(a) == set(b) == {"grpo", "dapo+liger", "qlora", "sft"}
    for case in a:
        for x, y in zip(a[case]["grads"], b[case]["grads"], strict=True):
            assert torch.allclose(x, y, rtol=1e-4, atol=1e-7), case
        grad = torch.cat([g.flatten() for g in a[case]["grads"]])
        assert grad.norm() > 1e-3, case  # a real gradient, not two zeros
        for key, value in a[case]["stats"].items():
            assert b[case]["stats"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (case, key)


@pytest.fixture(scope="module")
def two_process_demo(tmp_path_factory):
    """The demo as in the README's "More GPUs": torchrun, 2 processes, to tensorboard."""
    out = tmp_path_factory.mktemp("demo2")
    result = run(torchrun(ROOT / "train.py", "--demo", "--output_dir", out,
                          "--report_to", "tensorboard"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@pytest.mark.slow
def test_two_process_demo_learns_with_one_metrics_line_per_step(two_process_demo, tmp_path):
    out, result = two_process_demo
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 201))
    accuracy = [r["rewards/accuracy/mean"] for r in rows]
    assert sum(accuracy[:10]) / 10 <= 0.45  # from chance (0.25)...
    assert sum(accuracy[-10:]) / 10 >= 0.85, f"last 10 steps: {sum(accuracy[-10:]) / 10:.3f}"
    assert result.stdout.count("done: 200 steps") == 1  # the first process alone prints
    # the whole batch's counts, gathered: the same prompts as one process's first 2 steps
    alone = run([sys.executable, ROOT / "train.py", "--demo", "--output_dir", tmp_path,
                 "--max_steps", 2])
    assert alone.returncode == 0, alone.stderr[-3000:]
    for key in ("num_tokens", "completions/mean_length", "epoch", "skipped_rows"):
        assert [r[key] for r in metrics(tmp_path)] == [r[key] for r in rows[:2]], key
    assert {p.name for p in out.glob("checkpoint-*")} == {"checkpoint-100", "checkpoint-200"}
    state = torch.load(out / "checkpoint-200" / "trainer_state.pt", weights_only=True)
    assert len(state["rng"]) == 2  # each process's own sampling stream, to resume exactly
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted({s["step"] for s in samples}) == [1, 50, 100, 150, 200]
    assert len(samples) == 5 * 4 * 8  # --num_samples prompts x G each time, written once


@pytest.mark.slow
def test_tensorboard_gets_every_step_of_a_two_process_run(two_process_demo):
    out, _ = two_process_demo
    rows = metrics(out)
    reward = tensorboard_scalars(out / "r1v", "reward")
    assert [step for step, _ in reward] == list(range(1, 201))
    assert [v for _, v in reward] == pytest.approx([r["reward"] for r in rows], rel=1e-6)
    assert len(tensorboard_scalars(out / "r1v", "rewards/accuracy/mean")) == 200


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_to_the_same_metrics(two_process_demo, tmp_path):
    """Killed (the whole launcher) after its step-4 checkpoint, resumed under the other
    launcher: the first 8 steps equal the uninterrupted run's. Then resumed by one process: it
    says what it cannot continue exactly, and goes on."""
    straight = metrics(two_process_demo[0])
    out = tmp_path / "killed"
    args = ["--demo", "--output_dir", out, "--max_steps", 8, "--save_steps", 4,
            "--eval_steps", 4, "--eval_limit", 5]  # 3 + 2 held-out prompts, greedy
    p = subprocess.Popen(torchrun(ROOT / "train.py", *args), cwd=ROOT, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wait_for(lambda: (out / "checkpoint-4").is_dir(), p, timeout=600)
    workers = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True)
    for group in [*map(int, workers.stdout.split()), p.pid]:  # mid-run: the processes, each in
        with contextlib.suppress(ProcessLookupError):        # a session of its own (torchrun's),
            os.killpg(group, signal.SIGKILL)                 # and the launcher
    p.wait()
    resumed = run(accelerate_launch(ROOT / "train.py", *args, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoint-4'}" in resumed.stdout + resumed.stderr
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 9))  # no gap, no duplicate
    for x, y in zip(straight[:8], rows, strict=False):
        for key in COMPARED:
            assert y[key] == pytest.approx(x[key], rel=1e-6, abs=1e-9), (x["step"], key)
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [4, 8]

    alone = run([sys.executable, ROOT / "train.py", "--demo", "--output_dir", out,
                 "--max_steps", 10, "--save_steps", 5, "--resume"])
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert "written by 2 process(es), this run has 1" in alone.stdout + alone.stderr
    assert [r["step"] for r in metrics(out)] == list(range(1, 11))


@pytest.mark.slow
def test_ctrl_c_to_one_process_stops_both_after_the_same_step_with_a_checkpoint(tmp_path):
    p = subprocess.Popen(torchrun(ROOT / "train.py", "--demo", "--output_dir", tmp_path,
                                  "--max_steps", 100), cwd=ROOT, start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wait_for(lambda: (tmp_path / "metrics.jsonl").is_file()
             and (tmp_path / "metrics.jsonl").read_text().count("\n") >= 2, p, timeout=600)
    workers = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True)
    os.kill(int(workers.stdout.split()[-1]), signal.SIGINT)  # the second process only
    output = p.communicate(timeout=300)[0]
    assert output.count("interrupted at step") == 1
    (checkpoint,) = checkpoints.list_checkpoints(tmp_path)
    stopped_at = int(checkpoint.name.split("-")[1])
    assert [r["step"] for r in metrics(tmp_path)] == list(range(1, stopped_at + 1))
    assert stopped_at < 100


@pytest.mark.slow
def test_a_batch_that_does_not_split_over_the_processes_is_a_one_line_error(tmp_path):
    result = run(torchrun(ROOT / "train.py", "--demo", "--output_dir", tmp_path,
                          "--prompts_per_step", 3))
    assert result.returncode != 0
    assert "error: --prompts_per_step 3 does not split over 2 processes" in result.stderr
    assert result.stderr.count("error: ") == 1  # the first process says it; the launcher adds
    assert "Traceback" not in result.stderr.split("error: --prompts_per_step")[0]


def tiny_args(model_dir, out, *extra):
    return ["--model", model_dir, "--dataset", "synthetic", "--dataset_limit", "16",
            "--synthetic_image_size", "56", "--output_dir", str(out), "--num_generations", "2",
            "--prompts_per_step", "2", "--max_completion_length", "4", "--lora_r", "4",
            "--lora_alpha", "8", "--no-gradient_checkpointing", *map(str, extra)]


def test_tensorboard_logs_the_metrics_and_a_resume_drops_what_came_after_its_checkpoint(
        tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    train.main(tiny_args(tiny_model_dir, out, "--max_steps", 3, "--save_steps", 2,
                         "--report_to", "tensorboard"))
    assert [s for s, _ in tensorboard_scalars(out / "r1v", "reward")] == [1, 2, 3]
    first = tensorboard_scalars(out / "r1v", "loss")
    assert list((out / "r1v").glob("*/hparams.yml"))  # the config, as the run's hyper-parameters
    shutil.move(out / "checkpoint-3", tmp_path / "checkpoint-3")  # back to step 2, as told to
    train.main(tiny_args(tiny_model_dir, out, "--max_steps", 3, "--resume",
                         out / "checkpoint-2", "--report_to", "tensorboard"))
    again = tensorboard_scalars(out / "r1v", "loss")
    assert [s for s, _ in again] == [1, 2, 3]  # step 3 once: the resumed run's
    assert again[:2] == first[:2]
    assert [r["loss"] for r in metrics(out)] == pytest.approx([v for _, v in again], rel=1e-6)


def test_a_tracker_not_installed_is_a_one_line_error(tiny_model_dir, tmp_path, monkeypatch):
    import accelerate.accelerator

    monkeypatch.setattr(accelerate.accelerator, "filter_trackers", lambda *_: [])  # as if absent
    out = tmp_path / "run"
    with pytest.raises(UserError, match="--report_to tensorboard: tensorboard is not installed"):
        train.main(tiny_args(tiny_model_dir, out, "--max_steps", 1, "--report_to", "tensorboard"))
    assert not out.exists()  # no run trained, logged nowhere


def test_wandb_offline_logs_the_run(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    train.main(tiny_args(tiny_model_dir, out, "--max_steps", 2, "--save_steps", 0,
                         "--report_to", "wandb"))
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
