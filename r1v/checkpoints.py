"""Checkpoints: written atomically (a torn one is never taken for whole), the newest K kept, and
read back for an exact resume that keeps its settings and inputs: the adapter, the optimizer,
the schedule, the data order and every process's random state."""

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from r1v.adapters import check_adapter
from r1v.cli import UserError
from r1v.schedule import continue_schedule

# The keys every checkpoint's trainer_state.pt has (train.evaluate_and_save writes them).
TRAINER_STATE = {"step", "optimizer", "scheduler", "sampler", "rng", "counters"}


def changed(saved, current, keys):
    """The keys among `keys` whose values differ between two records of settings (a key the
    saved one lacks, from an older version, counts as kept)."""
    return [k for k in keys if k in current and saved.get(k, current[k]) != current[k]]


def rng_state():
    """This process's RNG states as tensors and plain values: a checkpoint loads with
    weights_only (numpy's keys, an array, would need numpy's code to unpickle)."""
    name, keys, *rest = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), *map(float, rest)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's GPU only
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(out, step, model, state, config, keep=0):
    """checkpoint-<step>/: the LoRA adapter (loadable with peft), the trainer `state` (optimizer,
    scheduler, data order, the RNG states of every process, counters) and the `config`. Written
    into a temporary folder and renamed when complete: a crash or a full disk mid-write leaves no
    complete-looking checkpoint. `keep` > 0: only the newest `keep` stay."""
    final, tmp = Path(out) / f"checkpoint-{step}", Path(out) / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        torch.save({**state, "step": step}, tmp / "trainer_state.pt")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    except (OSError, RuntimeError) as e:  # torch.save says a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        kept = list_checkpoints(out)
        free = shutil.disk_usage(out).free / 2**20
        raise UserError(f"step {step}: cannot write {final} ({getattr(e, 'strerror', None) or e}; "
                        f"{free:.0f} MiB free there). Kept: metrics.jsonl up to step {step}, "
                        f"{kept[-1] if kept else 'no checkpoint'}; free space and continue "
                        "with --resume") from e
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    # the newest `keep` up to this step: a later one is a torn leftover a resume skipped, and
    # counting it would delete the checkpoint just written
    done = [c for c in list_checkpoints(out) if int(c.name.split("-")[1]) <= step]
    for old in done[:-keep] if keep > 0 else ():
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out):
    """Complete checkpoints, oldest first (temporary folders of interrupted writes are not)."""
    found = [p for p in Path(out).glob("checkpoint-*")
             if re.fullmatch(r"checkpoint-\d+", p.name) and (p / "trainer_state.pt").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def read_checkpoint(path):
    """(trainer state, saved config) of a checkpoint; ValueError naming the file if unreadable."""
    path = Path(path)
    for name in ("trainer_state.pt", "config.json"):
        if not (path / name).is_file():
            raise ValueError(f"{path / name} is missing")
    check_adapter(path)
    try:  # weights_only: tensors and plain values, never a pickle's code (a shared checkpoint)
        state = torch.load(path / "trainer_state.pt", weights_only=True)
        saved = json.loads((path / "config.json").read_text())
    except pickle.UnpicklingError as e:  # names code to run; a UserError: never skipped
        if "Unsupported operand" not in str(e):  # else a torn file, as below
            raise UserError(f"--resume: {path / 'trainer_state.pt'} holds more than tensors and "
                            "plain values (an older version's, or not a checkpoint of ours: "
                            "code could run): not loaded; resume from one this version wrote, "
                            "or start afresh") from e
        raise ValueError(f"{path}: trainer_state.pt cannot be read ({e})") from e
    except Exception as e:
        raise ValueError(f"{path}: trainer_state.pt or config.json cannot be read ({e})") from e
    missing = TRAINER_STATE - set(state) if isinstance(state, dict) else TRAINER_STATE
    if missing:  # another trainer's file, say: named now, not a KeyError once the model loaded
        raise ValueError(f"{path / 'trainer_state.pt'} is not a trainer state (no "
                         f"{', '.join(sorted(missing))})")
    if not isinstance(saved, dict) or not isinstance(saved.get("inputs", {}), dict):
        raise ValueError(f"{path / 'config.json'} is not a run's config")
    return state, saved


def find_checkpoint(out, resume):
    """(path, state, saved config) of the checkpoint to resume from: the newest readable one in
    `out` (unreadable ones are skipped with a warning), or the one `resume` names."""
    if resume != "latest":
        try:
            return Path(resume), *read_checkpoint(resume)
        except UserError:
            raise
        except ValueError as e:
            raise UserError(f"--resume {resume}: {e}") from e
    for path in reversed(list_checkpoints(out)):
        try:
            return path, *read_checkpoint(path)
        except UserError:
            raise
        except ValueError as e:
            tqdm.write(f"warning: skipping {path}: {e}")
    logged = (Path(out) / "metrics.jsonl").is_file()  # killed before its first checkpoint
    raise UserError(f"--resume: no complete checkpoint in {out}; start afresh without --resume"
                    + (" and with --overwrite (no checkpoint kept its logged steps)" if logged
                       else ""))


def to_resume(out, resume, current, resumable, max_steps, inputs):
    """The checkpoint --resume continues, checked (find_checkpoint, check_resumable, the
    `inputs`' hashes); None when it is the run's last step, `max_steps` (a job retried): every
    file as it was."""
    path, state, saved = checkpoint = find_checkpoint(out, resume)
    check_resumable(path, saved, current, resumable)
    edited = changed(saved.get("inputs", {}), inputs, inputs)  # none recorded: an older run's
    if edited and not current["allow_changed_inputs"]:
        raise UserError(f"--resume {path}: {', '.join(edited)} changed since the checkpoint "
                        "(another SHA-256): restore it, or add --allow_changed_inputs to go on "
                        "with it as it is now")
    if edited:
        tqdm.write(f"note: going on with {', '.join(edited)} as edited since the checkpoint")
    links = [p for p in Path(out).glob("checkpoint-*")
             if p.is_symlink() and not (p / "trainer_state.pt").is_file()]
    for link in links:  # saving the step over it would fail, and lose the step
        if re.fullmatch(r"checkpoint-\d+", link.name) and int(link.name[11:]) > state["step"]:
            raise UserError(f"--resume: {link} is a link to {os.readlink(link)}, which holds no "
                            "checkpoint (a disk not mounted?): mount it to go on from it, or "
                            f"remove the link to go on from {path.name}")
    if state["step"] > max_steps:
        raise UserError(f"--resume: {path} is at step {state['step']}, past the run's last, "
                        f"{max_steps}: raise --max_steps to go on")
    if state["step"] == max_steps:
        tqdm.write(f"nothing left to train: {path} is the run's last step; raise --max_steps "
                   "to go on")
        return None
    later = [c for c in list_checkpoints(out) if int(c.name.split("-")[1]) > state["step"]]
    # "latest": the later ones are unreadable, and warned of; another folder's: --overwrite
    # clears this folder's run (runs.held_run)
    if later and resume != "latest" and os.path.samefile(path.parent, out):
        raise UserError(f"--resume {path}: the run went on to {later[-1].name}; to go back to "
                        f"step {state['step']}, move {', '.join(c.name for c in later)} out of "
                        f"{out} first (the log past it is cut); to go on, --resume alone")
    return checkpoint


def check_resumable(path, saved, current, resumable):
    """A resume must keep every setting the saved state depends on (all but `resumable`)."""
    differ = changed(saved, current, [k for k in current if k not in resumable])
    if differ:
        changes = ", ".join(f"--{k} {saved.get(k)} -> {current[k]}" for k in differ)
        raise UserError(f"--resume {path}: settings differ from the checkpoint's ({changes}); "
                        "use the same ones, or a new --output_dir")
    notes = changed(saved, current, sorted(set(resumable) - {
        "resume", "overwrite", "output_dir", "allow_changed_inputs"}))
    if notes:
        tqdm.write(f"note: changed since the checkpoint: {', '.join(notes)}")


def restore(path, state, model, optimizer, scheduler, sampler, rank=0, world=1, seed=0):
    """Load a checkpoint's adapter and trainer state, and process `rank`'s RNG state: a resume
    with as many processes as the run had continues it exactly. Returns its step."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    continue_schedule(scheduler)
    sampler.load_state_dict(state["sampler"])
    rng = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # older: one
    if len(rng) == world:
        set_rng_state(rng[rank])
    else:  # the weights, optimizer, schedule and prompt order still continue exactly
        torch.manual_seed(seed + 1_000 * (rank + 1) + state["step"])  # new, per process
        if rank == 0:
            tqdm.write(f"note: {path} was written by {len(rng)} process(es), this run has "
                       f"{world}: the sampling continues with new random numbers; launch "
                       f"{len(rng)} process(es) to continue the run exactly")
    if rank == 0:
        tqdm.write(f"resumed from {path} at step {state['step']}")
    return state["step"]
