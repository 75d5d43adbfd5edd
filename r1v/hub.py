"""Hub datasets, from the hub or a local folder of their schema: SAT (training, evaluation),
RefCOCO/+/g (grounding) and CV-Bench (the paper's benchmark; both of its hub layouts)."""

import socket
import urllib.parse
from pathlib import Path

from r1v import images
from r1v import rows as stored
from r1v.cli import UserError

SAT_COLUMNS = ("image_bytes", "question", "answers", "correct_answer")
REFCOCO_COLUMNS = ("image", "answer", "bbox")  # answer: the expressions; bbox: COCO [x, y, w, h]
REFCOCO = {"refcoco": "lmms-lab/RefCOCO", "refcoco+": "lmms-lab/RefCOCOplus",
           "refcocog": "lmms-lab/RefCOCOg"}
CVBENCH = "nyu-visionx/CV-Bench"
CVBENCH_COLUMNS = ("idx", "task", "source", "image", "prompt", "choices", "answer")
LETTERS = "ABCDEFGH"


def check_source(source, flag):
    """True for a path on this machine; False for a hub id, tried only if the hub answers within
    seconds (the libraries would retry for minutes). A missing local path is an error."""
    from huggingface_hub import constants

    if Path(source).is_file():  # a hub dataset on disk is a folder
        raise UserError(f"{flag} {source}: a file of rows must be JSON lines named *.jsonl "
                        "(README \"Your own task\"); a folder is read as a hub dataset")
    if Path(source).exists():
        return True
    if source.count("/") != 1 or source.startswith((".", "/", "~")) or Path(source).suffix:
        raise UserError(f"{flag} {source}: does not exist (nor is it a hub id like 'owner/name')")
    if not constants.HF_HUB_OFFLINE:
        endpoint = urllib.parse.urlparse(constants.ENDPOINT)
        try:
            socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=3).close()
        except OSError as e:
            raise UserError(f"{flag} {source}: the hub cannot be reached ({e}); pass a local "
                            "folder, or set HF_HUB_OFFLINE=1 to use the local hub cache") from e
    return False


def offline_hint():
    """What to say of HF_HUB_OFFLINE after a hub error: how it helps, or, already set, that
    only the local hub cache was read (never to set what is set)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set: only the local hub cache was read"
    return "HF_HUB_OFFLINE=1 skips the retries"


def load_hub_dataset(source, flag, **kwargs):
    """`datasets.load_dataset` on a local folder or a hub id, with one-line errors."""
    import datasets

    local = check_source(source, flag)
    try:
        return datasets.load_dataset(source, **kwargs)
    except Exception as e:
        if local:
            raise UserError(f"{flag} {source}: cannot load it ({type(e).__name__}: {e})") from e
        raise UserError(f"{flag} {source}: cannot load it from the hub ({type(e).__name__}). "
                        "Without hub access, pass a local folder of the same schema "
                        f"({offline_hint()})") from e


def list_lengths(ds, column):
    """Items per row of a list column, read on the memory-mapped Arrow table (no images decoded)."""
    import pyarrow.compute

    return pyarrow.compute.list_value_length(ds.with_format("arrow")[column]).to_pylist()


def undecoded(ds, column):
    """`column` with its images left as bytes: rows are checked without decoding pixels."""
    import datasets

    feature = ds.features[column]
    if isinstance(getattr(feature, "feature", None), datasets.Image):
        return ds.cast_column(column, datasets.List(datasets.Image(decode=False)))
    if isinstance(feature, datasets.Image):
        return ds.cast_column(column, datasets.Image(decode=False))
    return ds


def load_source(source, split, limit=0, flag="--dataset"):
    """A hub id or local folder in SAT's schema (choice rows, single-image ones kept) or
    RefCOCO's (rec rows, one per referring expression; `refcoco`, `refcoco+` and `refcocog`
    name theirs); the first `limit` rows (0 = all)."""
    source = REFCOCO.get(source, source)
    ds = load_hub_dataset(source, flag, split=split)
    name = f"{source}[{split}]"
    if all(c in ds.column_names for c in SAT_COLUMNS):
        ds = undecoded(ds.select(range(min(limit or len(ds), len(ds)))), "image_bytes")
        rows = [(i, 0) for i, n in enumerate(list_lengths(ds, "image_bytes")) if n == 1]

        def read(i):
            row = ds[rows[i][0]]
            return row["image_bytes"][0], {"question": row["question"], "choices": row["answers"],
                                           "answer": row["correct_answer"]}
        task = "choice"
    elif all(c in ds.column_names for c in REFCOCO_COLUMNS):
        ds = undecoded(ds, "image")
        rows = [(i, k) for i, n in enumerate(list_lengths(ds, "answer")) for k in range(n)]
        rows = rows[:limit or len(rows)]

        def read(i):
            row, k = ds[rows[i][0]], rows[i][1]
            x, y, w, h = row["bbox"]
            return row["image"], {"phrase": row["answer"][k], "box": [x, y, x + w, y + h]}
        task = "rec"
    else:
        lacks = {name: [c for c in columns if c not in ds.column_names]
                 for name, columns in (("SAT", SAT_COLUMNS), ("RefCOCO", REFCOCO_COLUMNS))}
        raise UserError(f"{flag} {source!r} split {split!r} lacks the SAT columns {lacks['SAT']}"
                        f" (or RefCOCO's {lacks['RefCOCO']}); it has {ds.column_names}")
    if not rows:
        raise UserError(f"{flag} {name}: no usable rows")
    return stored.Source(name, len(rows), read, lambda i: f"{name} row {rows[i][0] + 1}", task,
                         ds._fingerprint)


def read_cvbench(source=CVBENCH, limit=0):
    """CV-Bench's table, its columns checked. Both hub layouts load: the single test.parquet
    (before 2025-04-01) and test_2d.parquet + test_3d.parquet (after); `source` is a hub id or a
    local folder."""
    ds = load_hub_dataset(source, "--dataset", data_files={"test": "test*.parquet"},
                          split="test")
    missing = [c for c in CVBENCH_COLUMNS if c not in ds.column_names]
    if missing:
        raise UserError(f"--dataset {source}: not CV-Bench, it lacks the columns {missing}")
    return ds.select(range(min(limit, len(ds)))) if limit else ds


def cvbench_items(ds, source, view):
    """CV-Bench rows as eval items, prompted as `view` (data.View) says (the row's `prompt` is
    the question, its options lettered); each row is checked when it is used."""
    def make(i):
        row = ds[i]
        letter = row["answer"].strip("() ")
        if letter not in LETTERS[:len(row["choices"])]:
            raise ValueError(f"the answer {row['answer']!r} names none of the "
                             f"{len(row['choices'])} choices")
        image = images.fit_image(images.decode_image(row["image"]), view.min_pixels,
                                 view.max_pixels, view.patch_factor)
        return {"id": f"{row.get('type', '')}-{row['idx']}", "task": row["task"],
                "source": row["source"], "image": image, "task_type": "choice",
                "prompt": view.prompt(row["prompt"]), "choices": list(row["choices"]),
                "gold": LETTERS.index(letter), "lettered": True}

    return stored.Rows(f"{source}[test]", len(ds), make, lambda i: f"{source}[test] row {i + 1}")
