"""Nothing a user has is lost or mixed up: run folders, the logs in them (a torn last line is
dropped), checkpoints written atomically, and an exact resume that keeps its settings."""

import contextlib
import fcntl
import hashlib
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

from r1v.cli import UserError
from r1v.schedule import continue_schedule

RUN_FILES = ("config.json", "metrics.jsonl", "samples.jsonl", "demo-base")
# The keys every checkpoint's trainer_state.pt has (train.evaluate_and_save writes them).
TRAINER_STATE = {"step", "optimizer", "scheduler", "sampler", "rng", "counters"}


def writable_dir(path, flag):
    """Create `path` if needed; a file in the way or no permission is a one-line error."""
    if not str(path).strip():  # Path("") is the working folder: not what a user meant
        raise UserError(f"{flag} is empty: name a folder")
    if (path := Path(path)).exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot create it ({e.strerror})") from e
    if not os.access(path, os.W_OK):
        raise UserError(f"{flag} {path} is not writable")
    return path


def held_run(out, resume, overwrite):
    """The files of the run `out` already holds, which --overwrite clears once every check has
    passed (none with --resume). A run is never reused silently, nor a config.json not a run's,
    nor a checkpoint (its config.json would be written over; its run's rotation deletes it)."""
    checkpoint = next((p for p in (out, *out.resolve().parents)
                       if (p / "trainer_state.pt").is_file()), None)
    if checkpoint:
        raise UserError(f"--output_dir {out} is {'inside ' if checkpoint != out else ''}the "
                        f"checkpoint {checkpoint}: choose another --output_dir (to continue its "
                        "run, --output_dir RUN --resume)")
    if (out / "config.json").is_file() and b'"objective"' not in (out / "config.json").read_bytes():
        raise UserError(f"--output_dir {out}: its config.json is not a run's (a model's?); "
                        "choose another --output_dir")
    held = [p.name for p in out.iterdir()
            if p.name == "metrics.jsonl" or p.name.startswith(("checkpoint-", ".tmp-checkpoint-"))]
    # --resume PATH of another folder's run would mix that run's steps into this one's log
    other = resume not in (None, "latest") and (Path(resume) / "trainer_state.pt").is_file() \
        and not os.path.samefile(Path(resume).parent, out)
    if not held or (resume and not other):
        return []
    held += [p.name for p in out.iterdir() if p.name in RUN_FILES and p.name not in held]
    if not overwrite:
        raise UserError(f"--output_dir {out} already holds a run ({', '.join(sorted(held))}); "
                        + (f"--resume {resume} is another run's checkpoint: resume it into a new "
                           "--output_dir, or add --overwrite to replace this run" if other else
                           "add --resume to continue it, --overwrite to start afresh, or choose "
                           "another --output_dir"))
    return sorted(held)


def check_kept(out, held, inputs):
    """--overwrite clears `held` from `out`: refused if one of the run's `inputs` ({flag: path},
    say --model RUN/demo-base) is among them, as the run would then load what it deleted."""
    for flag, path in inputs.items():
        found = path and Path(path).exists() and Path(path).resolve()
        for name in held if found else ():
            cleared = out / name  # a link goes, not what it points to
            if not cleared.is_symlink() and cleared.resolve() in (found, *found.parents):
                raise UserError(f"--overwrite would delete {flag} {path} (in {cleared}): move it "
                                "out of --output_dir first, or choose another --output_dir")


def clear(out, names):
    for name in names:
        path = out / name  # a link (to an archive disk, say) goes, not what it points to
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


@contextlib.contextmanager
def locked(folder, flag):
    """`folder` (created if needed) is this process's alone while inside: a run or evaluation
    started into it meanwhile is a one-line error naming the holder. The lock is the kernel's
    (flock), so a process that dies holds nothing; its pid, left in the file, is noted."""
    new = not Path(folder).exists()
    folder = writable_dir(folder, flag)
    with open(folder / ".lock", "a+") as f:
        f.seek(0)
        holder = f.read().strip()
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise UserError(f"{flag} {folder} is in use by process {holder or '?'}: wait for it "
                            f"to end, or choose another {flag}") from e
        if holder:
            tqdm.write(f"note: {folder} was locked by process {holder}, which has ended")
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield folder
        finally:
            f.truncate(0)
            if new and [p.name for p in folder.iterdir()] == [".lock"]:  # failed at its checks
                shutil.rmtree(folder)  # a folder it made, holding only the lock's file, goes


def write_atomic(path, content, what=None):
    """`content` (text, or a function that writes a given path) into `path` through a temporary
    file and a rename: a kill or a full disk leaves the old file whole, never a torn one. An
    error is one line naming `what` (default: the path)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")  # the same suffix: a figure's format
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(content) if isinstance(content, str) else content(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{what or path}: cannot write it ({e.strerror or e}); what was there "
                        "is kept") from e


def read_log(path):
    """The rows of one of our JSONL logs, [(line, row)], and the number of a last line torn by
    a kill mid-write (dropped), or None; any other line that is not JSON is an error."""
    lines, rows = Path(path).read_text().split("\n"), []  # only \n ends a line (U+2028...)
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except ValueError as e:
            if number == len(lines) or (number == len(lines) - 1 and not lines[-1]):
                return rows, number
            raise UserError(f"{path}:{number}: not JSON ({e})") from e
    return rows, None


def truncate_log(path, last_step):
    """Keep the lines of steps up to `last_step`, so a resumed run has no gap and no duplicate
    step (a line torn by a kill mid-write is dropped too)."""
    if path.is_file():
        keep = [row for _, row in read_log(path)[0]
                if isinstance(row, dict) and row.get("step", last_step + 1) <= last_step]
        write_atomic(path, "".join(json.dumps(row) + "\n" for row in keep))  # a kill: all kept


def changed(saved, current, keys):
    """The keys among `keys` whose values differ between two records of settings (a key the
    saved one lacks, from an older version, counts as kept)."""
    return [k for k in keys if k in current and saved.get(k, current[k]) != current[k]]


# --- checkpoints --------------------------------------------------------------------------------

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


def input_hashes(dataset, eval_dataset, reward_specs):
    """The SHA-256 of each file a run reads rows or rewards from (a .jsonl, a reward's .py), by
    flag and path: config.json records only the paths, and a resume checks the content."""
    files = [("--dataset", dataset), ("--eval_dataset", eval_dataset)] + [
        ("--reward_funcs", spec.rpartition(":")[0]) for spec in reward_specs if ":" in spec]
    return {f"{flag} {path}": file_hash(path) for flag, path in files
            if path and Path(path).is_file()}


def file_hash(path):
    """The SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def check_adapter(folder, shapes=None, model="--model", base_class=None):
    """ValueError unless `folder` holds a whole peft adapter: its config, and weights whose file
    is as long as its header says (a truncated copy keeps the header, not all the tensors); with
    the base `model`'s parameter `shapes` ({name: shape}) and class name, one that fits it
    (adapter_fits)."""
    folder = Path(folder)
    path = folder / "adapter_model.safetensors"
    if not folder.is_dir():
        raise ValueError("a file, not an adapter's folder" if folder.exists() else "no such folder")
    steps = [p for p in folder.glob("checkpoint-*") if p.name[11:].isdigit()]
    if steps and not (folder / "adapter_config.json").exists():  # the run, not a checkpoint
        last = max(steps, key=lambda p: int(p.name[11:]))
        raise ValueError(f"a run's folder: give one of its checkpoints, as {last}")
    for needed in (folder / "adapter_config.json", path):
        if not needed.is_file():
            raise ValueError(f"{needed} is missing")
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        tensors = [t for k, t in header.items() if k != "__metadata__"]
        end = max([t["data_offsets"][1] for t in tensors] + [0])
        if not all(isinstance(t["shape"], list) for t in tensors):
            raise ValueError("a tensor's shape is not a list")
    except (OSError, ValueError, KeyError, TypeError) as e:  # not a safetensors file
        raise ValueError(f"{path} cannot be read ({e})") from e
    if path.stat().st_size < 8 + size + end:
        raise ValueError(f"{path} is truncated ({path.stat().st_size} bytes of {8 + size + end})")
    if shapes is not None:
        try:
            config = json.loads((Path(folder) / "adapter_config.json").read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{Path(folder) / 'adapter_config.json'} cannot be read ({e})") from e
        if not isinstance(config, dict):
            raise ValueError(f"{Path(folder) / 'adapter_config.json'} is not a peft config")
        adapter_fits(config, header, shapes, model, base_class)


def adapter_fits(config, header, shapes, model, base_class=None):
    """ValueError unless an adapter (its adapter_config.json `config`, its safetensors `header`)
    fits the base `model` of parameter `shapes` and class `base_class`: trained on that class
    (as peft records it), each target module one of its modules, each tensor one of its layers
    with its sizes, each LoRA of rank r. Peft finds these only once the model has loaded, as a
    traceback."""
    # Another family's adapter can have every name and size right (Qwen2-VL-7B's language
    # model is Qwen2.5-VL-7B's shape): it would load silently and score as noise.
    trained_on = (config.get("auto_mapping") or {}).get("base_model_class")
    if base_class and trained_on and trained_on != base_class:
        raise ValueError(f"it was trained on a {trained_on}, but {model} is a {base_class} "
                         "(an adapter of another model family)")
    modules = {n.rsplit(".", 1)[0]: s for n, s in shapes.items() if n.endswith(".weight")}
    targets = config.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":  # peft: a regex, matched in full
        if not any(re.fullmatch(targets, n) for n, s in modules.items() if len(s) == 2):
            raise ValueError(f"adapter_config.json's target modules {targets!r} match no linear "
                             f"layer of {model}")
    for target in targets if isinstance(targets, list) else ():  # peft: names, or their ends
        if not any(n == target or n.endswith(f".{target}") for n in modules):
            raise ValueError(f"adapter_config.json's target module {target!r} is no module of "
                             f"{model}")
    for key in sorted(k for k in header if k != "__metadata__"):
        shape, name = tuple(header[key]["shape"]), key.removeprefix("base_model.model.")
        lora = re.fullmatch(r"(.+)\.lora_([AB])\.weight", name)
        if not lora and ".lora_" in name:  # DoRA's magnitudes, LoRA on embeddings: not checked
            continue
        known = modules if lora else shapes
        found = find_renamed(lora.group(1) if lora else name, known)
        if found is None:
            raise ValueError(f"its weights name {lora.group(1) if lora else name}, which {model} "
                             "does not have (an adapter of another base model?)")
        if not lora:  # a module trained whole (modules_to_save: --train_vision)
            if shape != known[found]:
                raise ValueError(f"{found} is {list(shape)} here, {list(known[found])} in {model}")
            continue
        a = lora.group(2) == "A"  # lora_A: (r, inputs), lora_B: (outputs, r)
        rank, size = (shape[0], shape[1]) if a else (shape[1], shape[0])
        if rank != config.get("r") and not config.get("rank_pattern"):
            raise ValueError(f"adapter_config.json says r {config.get('r')}, but its weights have "
                             f"rank {rank} ({key} is {list(shape)})")
        if len(known[found]) == 2 and size != known[found][1 if a else 0]:
            raise ValueError(f"{found} takes {size} {'inputs' if a else 'outputs'} here, "
                             f"{known[found][1 if a else 0]} in {model} (an adapter of another "
                             "base model?)")


def find_renamed(name, names):
    """`name` among `names`, also under another prefix: transformers renamed Qwen2-VL's modules
    (model.layers -> model.language_model.layers, visual -> model.visual); peft maps them."""
    if name in names:
        return name
    tail = name.split(".", 1)[-1]
    found = [n for n in names if n.endswith(f".{name}") or n.endswith(f".{tail}")]
    return found[0] if len(found) == 1 else None


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
