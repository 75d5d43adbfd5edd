"""Nothing a user has is lost or mixed up: run folders (one run a folder, locked), the logs in
them (a torn last line is dropped), files written atomically, the hashes of a run's inputs.
Checkpoints and resume: r1v/checkpoints.py."""

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

from tqdm import tqdm

from r1v.cli import UserError

RUN_FILES = ("config.json", "metrics.jsonl", "samples.jsonl", "demo-base")


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


