"""Checkpoints, exact resume, Ctrl-C, non-finite steps and QLoRA, on the tiny model on CPU."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import data
import grpo
import train
from r1v import checkpoints, runs
from r1v.cli import UserError

ROOT = Path(__file__).resolve().parents[1]
COMPARED = (
    "reward", "reward_std", "loss", "kl", "grad_norm", "learning_rate", "completions/mean_length",
    "rewards/length/mean", "rewards/format/mean", "clip_ratio/low_mean", "clip_ratio/high_mean",
)


def run_args(model_dir, out, reward_file, **extra):
    args = [
        "--model", model_dir, "--dataset", "synthetic", "--dataset_limit", "64",
        "--synthetic_image_size", "56", "--output_dir", str(out), "--num_generations", "4",
        "--prompts_per_step", "2", "--micro_batch_size", "4", "--max_completion_length", "6",
        "--lora_r", "4", "--lora_alpha", "8", "--learning_rate", "1e-2", "--beta", "0.04",
        "--num_iterations", "2", "--reward_funcs", "format", f"{reward_file}:length",
        "--log_samples_steps", "1",
    ]
    for key, value in extra.items():
        args += [f"--{key}"] + ([] if value is True else [str(value)])
    return args


@pytest.fixture
def reward_file(tmp_path):
    path = (
        tmp_path / "my_rewards.py"
    )  # a random model never earns format or accuracy: give it a signal
    path.write_text("def length(completion, example):\n    return len(completion) / 10\n")
    return path


def start(args):
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def wait_for(predicate, process, timeout=300):
    deadline = time.time() + timeout
    while not predicate():
        assert process.poll() is None, "".join(filter(None, process.communicate()))[-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_metrics(tmp_path, tiny_model_dir, reward_file):
    straight = tmp_path / "straight"
    p = start(run_args(tiny_model_dir, straight, reward_file, max_steps=6, save_steps=2))
    assert p.wait(600) == 0, p.communicate()[1][-3000:]

    killed = tmp_path / "killed"
    args = run_args(tiny_model_dir, killed, reward_file, max_steps=6, save_steps=2)
    p = start(args)
    wait_for(lambda: (killed / "checkpoint-2").is_dir(), p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    p = start(args + ["--resume"])
    assert p.wait(600) == 0, p.communicate()[1][-3000:]

    a, b = metrics(straight), metrics(killed)
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]  # no gap, no duplicate
    for x, y in zip(a, b):
        for key in COMPARED:
            assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-9), (x["step"], key)
    assert {int(p.name.split("-")[1]) for p in killed.glob("checkpoint-*")} == {2, 4, 6}


def test_interrupted_checkpoint_writes_are_ignored(tmp_path):
    for name, complete in [
        ("checkpoint-2", True), ("checkpoint-4", False), (".tmp-checkpoint-6", True),
        ("checkpoint-10", True),
    ]:
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / "trainer_state.pt").write_bytes(b"x")
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == \
        ["checkpoint-2", "checkpoint-10"]


def test_save_total_limit_and_atomic_write(tmp_path, tiny_model_dir):
    cfg = train.parse_config(
        [
            "--model", tiny_model_dir, "--output_dir", str(tmp_path), "--save_total_limit", "2",
            "--lora_r", "2", "--lora_alpha", "4",
        ]
    )
    model = train.load_model(cfg, torch.device("cpu"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    sampler = data.PromptSampler(10, 2, 0)
    state = {"optimizer": optimizer.state_dict(), "sampler": sampler.state_dict()}
    for step in (1, 2, 3):
        checkpoints.save_checkpoint(tmp_path, step, model, state, {}, cfg.save_total_limit)
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == \
        ["checkpoint-2", "checkpoint-3"]
    assert not list(tmp_path.glob(".tmp-*"))
    assert (tmp_path / "checkpoint-3" / "adapter_model.safetensors").is_file()
    # killed once trainer_state.pt is written, before config.json: nothing complete-looking
    real_save = torch.save

    def killed_after(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        raise KeyboardInterrupt

    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(torch, "save", killed_after)
        checkpoints.save_checkpoint(tmp_path, 4, model, state, {}, cfg.save_total_limit)
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == \
        ["checkpoint-2", "checkpoint-3"]
    assert not (tmp_path / "checkpoint-4").exists()
    assert {p: p.read_bytes() for p in before} == before  # the kept checkpoints as they were


def test_save_total_limit_never_deletes_the_checkpoint_just_written(tmp_path, tiny_model_dir):
    """A resume skipped a later, torn checkpoint-9 (power lost after its rename): the rotation
    keeps the newest up to this step, not the torn one in place of the new."""
    cfg = train.parse_config(["--model", tiny_model_dir, "--lora_r", "2", "--lora_alpha", "4"])
    model = train.load_model(cfg, torch.device("cpu"))
    (tmp_path / "checkpoint-9").mkdir()
    (tmp_path / "checkpoint-9" / "trainer_state.pt").write_bytes(b"")  # torn
    for step in (3, 4):
        checkpoints.save_checkpoint(tmp_path, step, model, {}, {}, keep=1)
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == \
        ["checkpoint-4", "checkpoint-9"]


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, tiny_model_dir):
    cfg = train.parse_config(
        [
            "--model", tiny_model_dir, "--dataset", "synthetic", "--dataset_limit", "16",
            "--output_dir", str(tmp_path), "--resume",
        ]
    )
    with pytest.raises(UserError, match="no complete checkpoint"):
        train.train(cfg)
    # killed before its first checkpoint: without --resume alone, it "already holds a run"
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(UserError, match="start afresh without --resume and with --overwrite"):
        train.train(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])  # SIGTERM: a preemption
def test_ctrl_c_saves_a_resumable_checkpoint(tmp_path, tiny_model_dir, reward_file, signum):
    out = tmp_path / "run"
    args = run_args(tiny_model_dir, out, reward_file, max_steps=50, save_steps=0)
    p = start(args)
    wait_for(
        lambda: (out / "metrics.jsonl").is_file()
        and (out / "metrics.jsonl").read_text().count("\n") >= 1,
        p,
    )
    p.send_signal(signum)
    # scripts can tell an interrupted run from a finished one, and by which signal
    assert p.wait(300) == 128 + signum
    out_text = "".join(p.communicate())
    assert "stopping after this step" in out_text and "interrupted at step" in out_text
    (checkpoint,) = checkpoints.list_checkpoints(out)
    stopped_at = int(checkpoint.name.split("-")[1])
    assert stopped_at < 50 and [m["step"] for m in metrics(out)] == list(range(1, stopped_at + 1))
    p = start(
        run_args(tiny_model_dir, out, reward_file, max_steps=stopped_at + 2, save_steps=0)
        + ["--resume"]
    )
    assert p.wait(300) == 0, p.communicate()[1][-3000:]
    assert [m["step"] for m in metrics(out)] == list(range(1, stopped_at + 3))


def _tiny_train_config(model_dir, out, reward_file, **extra):
    return train.parse_config(run_args(model_dir, out, reward_file, **extra))


def test_a_non_finite_loss_is_skipped_and_counted(
    tmp_path, tiny_model_dir, reward_file, monkeypatch
):
    real_loss, calls = grpo.policy_loss, {"n": 0}

    def nan_on_second_step(*args, **kwargs):
        calls["n"] += 1
        loss, stats = real_loss(*args, **kwargs)
        # step 2's micro-batches are calls 5..8 (2 micro-batches x 2 iterations per step)
        return (loss * float("nan"), stats) if 5 <= calls["n"] <= 8 else (loss, stats)

    monkeypatch.setattr(grpo, "policy_loss", nan_on_second_step)
    out = tmp_path / "run"
    train.train(_tiny_train_config(tiny_model_dir, out, reward_file, max_steps=3, save_steps=0))
    rows = metrics(out)
    assert [m["nonfinite_steps"] for m in rows] == [
        0, 2, 2,
    ]  # both updates of step 2 skipped, then training goes on
    # no update of step 2 was made: no loss, no gradient norm (null: JSON has no NaN)
    assert rows[1]["loss"] is None and rows[1]["grad_norm"] is None and rows[2]["loss"] is not None
    assert "NaN" not in (out / "metrics.jsonl").read_text()
    assert all(
        torch.isfinite(p).all()
        for p in torch.load(out / "checkpoint-3" / "trainer_state.pt", weights_only=True)[
            "optimizer"
        ]["state"][0].values()
        if isinstance(p, torch.Tensor)
    )


def test_a_run_that_keeps_diverging_stops_with_its_last_checkpoint_intact(
    tmp_path, tiny_model_dir, reward_file, monkeypatch
):
    real_loss, calls = grpo.policy_loss, {"n": 0}

    def nan_after_step_two(*args, **kwargs):
        calls["n"] += 1
        loss, stats = real_loss(*args, **kwargs)
        return (loss * float("nan"), stats) if calls["n"] > 8 else (loss, stats)

    monkeypatch.setattr(grpo, "policy_loss", nan_after_step_two)
    out = tmp_path / "run"
    cfg = _tiny_train_config(
        tiny_model_dir, out, reward_file, max_steps=20, save_steps=2, max_nonfinite_steps=3
    )
    with pytest.raises(UserError, match="consecutive steps had a non-finite loss"):
        train.train(cfg)
    assert [p.name for p in checkpoints.list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    from safetensors.torch import load_file

    good, after = load_file(out / "checkpoint-2" / "adapter_model.safetensors"), load_file(
        out / "checkpoint-4" / "adapter_model.safetensors"
    )
    assert all(
        torch.equal(good[k], after[k]) for k in good
    )  # the NaN steps never reached the weights


@pytest.mark.slow
def test_qlora_trains_on_cpu_and_its_adapter_loads_back(tmp_path, tiny_model_dir, reward_file):
    from peft import PeftModel
    from transformers import Qwen2VLForConditionalGeneration

    out = tmp_path / "qlora"
    cfg = _tiny_train_config(
        tiny_model_dir, out, reward_file, max_steps=2, save_steps=0, load_in_4bit=True
    )
    model = train.load_model(cfg, torch.device("cpu"))
    kinds = {type(m).__name__ for n, m in model.named_modules() if "language_model" in n}
    assert "Linear4bit" in kinds
    assert not any(
        type(m).__name__ == "Linear4bit"
        for n, m in model.named_modules()
        if "visual" in n or "lm_head" in n
    )
    del model
    train.train(cfg)
    rows = metrics(out)
    assert len(rows) == 2 and all(r["nonfinite_steps"] == 0 for r in rows) and rows[-1]["kl"] > 0
    base = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir)
    loaded = PeftModel.from_pretrained(base, out / "checkpoint-2")
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in loaded.named_parameters())


def test_a_full_disk_at_a_checkpoint_is_one_line_and_loses_nothing(
    tmp_path, tiny_model_dir, reward_file, monkeypatch
):
    real, calls, listed = torch.save, [], []

    def full_disk(obj, path, *args, **kwargs):  # what torch.save raises when the disk is full
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"PK torn")  # the file as far as it got
            # a kill now resumes here
            listed.extend(p.name for p in checkpoints.list_checkpoints(out))
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64")
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"step 2: cannot write .*checkpoint-2 \(.*enforce fail"
                       r".*MiB free there\)\. Kept: metrics.jsonl up to step 2, .*checkpoint-1;"):
        train.train(_tiny_train_config(tiny_model_dir, out, reward_file, max_steps=3,
                                       save_steps=1))
    assert listed == ["checkpoint-1"]  # the torn write never looked like a checkpoint
    assert [p.name for p in checkpoints.list_checkpoints(out)] == ["checkpoint-1"]
    assert not list(out.glob(".tmp-*")) and [m["step"] for m in metrics(out)] == [1, 2]
    monkeypatch.setattr(torch, "save", real)  # space freed
    train.train(_tiny_train_config(tiny_model_dir, out, reward_file, max_steps=3, save_steps=1,
                                   resume=True))
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]


def test_a_resume_with_a_new_horizon_decays_on_from_where_the_rate_was(
    tmp_path, tiny_model_dir, reward_file, capsys
):
    """6 steps of 2 updates (12), resumed at step 3 with --max_steps 12 (24): the rate goes on
    from its value, linearly to 0 at the new end, never back up (detail 3 of the schedule)."""
    out = tmp_path / "run"
    train.train(_tiny_train_config(tiny_model_dir, out, reward_file, max_steps=6, save_steps=3))
    first = [m["learning_rate"] for m in metrics(out)]
    shutil.move(out / "checkpoint-6", tmp_path / "checkpoint-6")  # back to step 3, as told to
    train.train(_tiny_train_config(tiny_model_dir, out, reward_file, max_steps=12, save_steps=3,
                                   resume=out / "checkpoint-3"))
    rates = [m["learning_rate"] for m in metrics(out)]
    peak = 1e-2
    assert rates[:4] == pytest.approx(first[:4])  # step 4 uses update 6: 1 - 6/12 of the peak
    assert rates[3:] == pytest.approx([peak * 0.5 * (24 - u) / 18 for u in range(6, 24, 2)])
    assert "decays from 0.5 x its peak to 0 over the 18 updates left" in capsys.readouterr().out


def test_a_resume_with_nothing_left_to_train_changes_nothing(tmp_path, tiny_model_dir,
                                                              reward_file, capsys, monkeypatch):
    """A finished run resumed again (a job retried) ends at once; a checkpoint past the
    horizon is an error. Either way every file stays as it was, the log's later steps too."""
    out = tmp_path / "run"
    train.train(_tiny_train_config(tiny_model_dir, out, reward_file, max_steps=4, save_steps=2))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    monkeypatch.setattr(train, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    for horizon, at in ((4, "checkpoint-4"), (2, "checkpoint-2")):  # the last step, an earlier
        capsys.readouterr()
        assert train.train(_tiny_train_config(tiny_model_dir, out, reward_file, save_steps=2,
                                              max_steps=horizon, resume=out / at)) is None
        assert f"nothing left to train: {out / at} is the run's last step; raise --max_steps" \
            in capsys.readouterr().out
    with pytest.raises(UserError, match="checkpoint-4 is at step 4, past the run's last, 3: "
                       "raise --max_steps to go on"):
        train.train(_tiny_train_config(tiny_model_dir, out, reward_file, max_steps=3,
                                       save_steps=2, resume=out / "checkpoint-4"))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} \
        == before  # the log keeps steps 3 and 4


def test_a_resume_from_before_the_runs_newest_checkpoint_is_refused(tmp_path, tiny_model_dir,
                                                                    reward_file):
    """--resume D/checkpoint-2 of a run that went on to checkpoint-4 would cut the log of steps
    3-4 and leave checkpoint-4 of another branch beside the new ones: refused, files kept."""
    out = tmp_path / "run"
    train.train(_tiny_train_config(tiny_model_dir, out, reward_file, max_steps=4, save_steps=2))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    with pytest.raises(UserError, match=r"--resume .*checkpoint-2: the run went on to "
                       r".*checkpoint-4; .* move checkpoint-4 out of .*run first"):
        train.train(_tiny_train_config(tiny_model_dir, out, reward_file, max_steps=6,
                                       save_steps=2, resume=out / "checkpoint-2"))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} \
        == before


def test_a_schedule_resumed_at_its_new_last_update_does_not_divide_by_zero():
    from r1v import schedule

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    state = {"schedule": {"warmup": 0, "total": 200, "knot": None},
             "scheduler": {"last_epoch": 100}}
    scheduler, saved = schedule.lr_schedule(optimizer, "linear", 0.0, 100, state)
    assert saved["knot"] is None and scheduler.get_last_lr() == [1e-3]


@pytest.mark.slow
def test_a_second_run_into_a_folder_in_use_is_refused(tmp_path, tiny_model_dir, reward_file):
    out = tmp_path / "run"
    first = start(run_args(tiny_model_dir, out, reward_file, max_steps=500, save_steps=0))
    wait_for(lambda: (out / "metrics.jsonl").is_file()
             and (out / "metrics.jsonl").read_text().count("\n") >= 1, first)
    second = subprocess.run(
        [sys.executable, str(ROOT / "train.py"),
         *run_args(tiny_model_dir, out, reward_file, max_steps=2, overwrite=True)],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert second.returncode == 2 and second.stderr.strip().splitlines() == [
        f"error: --output_dir {out} is in use by process {first.pid}: wait for it to end, or "
        "choose another --output_dir"]
    assert first.poll() is None  # the first run goes on, its files untouched
    first.kill()
    first.wait()
    resumed = subprocess.run(
        [sys.executable, str(ROOT / "train.py"),
         *run_args(tiny_model_dir, out, reward_file, max_steps=2, overwrite=True)],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"locked by process {first.pid}, which has ended" in resumed.stdout


def files_of(folder):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != ".lock"}


def one_error_line(capsys, argv):
    """`python train.py ARGV` in-process, as the command line runs it: its one `error:` line."""
    from r1v import cli

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.run(train.main, [str(a) for a in argv])
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.splitlines() if line.strip() and "checking" not in line]
    assert exit_info.value.code == 2 and len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and "Traceback" not in stderr
    return lines[0]


class Payload:
    """What a shared checkpoint could carry: unpickling it runs code (here: makes a file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("resume", ["latest", "checkpoint-2"])
def test_a_checkpoint_that_would_run_code_is_refused_unloaded(tmp_path, tiny_model_dir,
                                                              reward_file, capsys, resume):
    """A trainer_state.pt carrying a pickle payload (the newest, which `latest` would otherwise
    skip to resume from the one before): refused in one line naming it; nothing ran."""
    out, marker = tmp_path / "run", tmp_path / "pwned"
    train.train(_tiny_train_config(tiny_model_dir, out, reward_file, max_steps=2, save_steps=1))
    state = out / "checkpoint-2" / "trainer_state.pt"
    torch.save({"step": 2, "rng": Payload(marker)}, state)
    before = files_of(out)
    line = one_error_line(capsys, run_args(tiny_model_dir, out, reward_file, max_steps=4)
                          + ["--resume"] + ([] if resume == "latest" else [out / resume]))
    assert str(state) in line and "not loaded" in line, line
    assert not marker.exists() and files_of(out) == before
    torch.load(state, weights_only=False)  # the payload was live: this very load runs it
    assert marker.exists()


def test_a_checkpoint_holds_only_tensors_and_plain_values(tmp_path, tiny_model_dir,
                                                          reward_file):
    out = tmp_path / "run"
    train.train(_tiny_train_config(tiny_model_dir, out, reward_file, max_steps=1))
    state = torch.load(out / "checkpoint-1" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 1 and len(state["rng"]) == 1 and "numpy" in state["rng"][0]


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    import random

    import numpy as np

    torch.save(checkpoints.rng_state(), tmp_path / "rng.pt")
    draws = (random.random(), np.random.rand(), np.random.randn(), torch.rand(1).item())
    checkpoints.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), np.random.randn(), torch.rand(1).item()) == draws


@pytest.mark.parametrize("mount_point", [False, True])
def test_a_newest_checkpoint_on_a_disk_not_mounted_is_named_before_anything_changes(
    tmp_path, tiny_model_dir, reward_file, capsys, mount_point
):
    """checkpoint-3 a link to an archive disk not mounted (its target missing, or an empty
    mount point): resuming from checkpoint-2 would crash saving step 3 over the link and lose
    that step; refused, the link named, files kept."""
    out, target = tmp_path / "run", tmp_path / "unmounted" / "checkpoint-3"
    train.train(_tiny_train_config(tiny_model_dir, out, reward_file, max_steps=2, save_steps=1))
    if mount_point:
        target.mkdir(parents=True)
    (out / "checkpoint-3").symlink_to(target)
    before = files_of(out)
    line = one_error_line(capsys, run_args(tiny_model_dir, out, reward_file, max_steps=4,
                                           save_steps=1) + ["--resume"])
    assert f"{out / 'checkpoint-3'} is a link to {target}, which holds no checkpoint" in line
    assert "mount" in line and "remove the link" in line
    assert files_of(out) == before and (out / "checkpoint-3").is_symlink()
    assert not list(out.glob(".tmp-*"))


def test_extending_a_finished_run_decays_again_from_the_peak(tmp_path, tiny_model_dir,
                                                             reward_file, capsys, monkeypatch):
    """A finished linear schedule's rate is 0: a run resumed past its end with a higher
    --max_steps decays again from --learning_rate to 0 at the new end (2 steps of 2 updates
    extended to 4: updates 4-7 at 4/4, 3/4, 2/4, 1/4 of the peak); the adapter moves, and the
    logged rate is the one the optimizer used."""
    out, peak, used = tmp_path / "run", 1e-2, []
    train.train(_tiny_train_config(tiny_model_dir, out, reward_file, max_steps=2))
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        used.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    capsys.readouterr()
    train.train(_tiny_train_config(tiny_model_dir, out, reward_file, max_steps=4, resume=True))
    assert used == pytest.approx([peak * k / 4 for k in (4, 3, 2, 1)])
    assert [m["learning_rate"] for m in metrics(out)] == pytest.approx(
        [peak, peak / 2, used[0], used[2]])
    assert "decays again from its peak" in capsys.readouterr().out
    from safetensors.torch import load_file

    before, after = (load_file(out / f"checkpoint-{s}" / "adapter_model.safetensors")
                     for s in (2, 4))
    assert all(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)


@pytest.mark.parametrize("edited", ["--dataset", "--eval_dataset", "--reward_funcs"])
def test_a_resume_with_rows_or_a_reward_edited_since_is_refused(tmp_path, tiny_model_dir,
                                                                  reward_file, capsys, edited):
    """config.json records only their paths; their hashes too now: an edit since the checkpoint
    is one line naming the file, files kept; --allow_changed_inputs goes on with it."""
    from test_errors import write_task

    out = tmp_path / "run"
    files = {"--dataset": write_task(tmp_path / "rows"),
             "--eval_dataset": write_task(tmp_path / "held", rows=2), "--reward_funcs": reward_file}
    argv = run_args(tiny_model_dir, out, reward_file, max_steps=1, dataset=files["--dataset"],
                    eval_dataset=files["--eval_dataset"], eval_steps=1)
    train.train(train.parse_config(argv))
    with open(files[edited], "a") as f:
        f.write("\n" if edited != "--reward_funcs" else "# edited\n")
    before = files_of(out)
    resumed = run_args(tiny_model_dir, out, reward_file, max_steps=2, dataset=files["--dataset"],
                       eval_dataset=files["--eval_dataset"], eval_steps=1, resume=True)
    line = one_error_line(capsys, resumed)
    assert f"{edited} {files[edited]} changed since" in line and "--allow_changed_inputs" in line
    assert files_of(out) == before
    train.train(train.parse_config(resumed + ["--allow_changed_inputs"]))
    assert [m["step"] for m in metrics(out)] == [1, 2]
    assert f"{edited} {files[edited]}" in capsys.readouterr().out  # noted


def test_a_checkpoint_of_another_trainer_is_named(tmp_path, tiny_model_dir, reward_file,
                                                  capsys):
    """A trainer_state.pt weights_only loads, or a config.json, that is not ours (another
    trainer's) is named in one line before the model loads, not a KeyError after."""
    out = tmp_path / "run"
    train.train(_tiny_train_config(tiny_model_dir, out, reward_file, max_steps=1))
    state, config = (out / "checkpoint-1" / name for name in ("trainer_state.pt", "config.json"))
    kept = state.read_bytes()
    torch.save({"step": 1, "weights": torch.zeros(2)}, state)
    before = files_of(out)
    argv = run_args(tiny_model_dir, out, reward_file, max_steps=2) + ["--resume", state.parent]
    line = one_error_line(capsys, argv)
    assert "checkpoint-1/trainer_state.pt is not a trainer state (no counters, optimizer" in line
    state.write_bytes(kept)
    config.write_text("[]")  # JSON, not a run's settings
    assert f"{config} is not a run's config" in one_error_line(capsys, argv)
    assert files_of(out) == {**before, state: kept, config: b"[]"}


def test_overwrite_removes_a_link_to_an_archived_checkpoint_not_what_it_points_to(tmp_path):
    """--overwrite clears the run's files; a checkpoint linked from an archive disk goes as a
    link (was: rmtree refusing a link, a traceback after the checks), the archive kept."""
    out, archived = tmp_path / "run", tmp_path / "archive" / "checkpoint-3"
    archived.mkdir(parents=True)
    (archived / "trainer_state.pt").write_bytes(b"kept")
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "checkpoint-3").symlink_to(archived)
    (out / "checkpoint-4").symlink_to(tmp_path / "unmounted")
    held = runs.held_run(out, resume=None, overwrite=True)
    assert held == ["checkpoint-3", "checkpoint-4", "metrics.jsonl"]
    runs.clear(out, held)
    assert list(out.iterdir()) == [] and (archived / "trainer_state.pt").read_bytes() == b"kept"
