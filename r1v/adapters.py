"""A LoRA adapter folder checked before any model loads: whole (its config, weights as long as
their header says) and, for eval.py's --adapter, fitting the base model (its family, layers,
sizes and rank), read from the safetensors header."""

import json
import re
from pathlib import Path


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


def trained_with(folder, key):
    """The setting `key` of the run that wrote the checkpoint `folder` (its config.json), or
    None: an adapter from elsewhere has none."""
    try:
        saved = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return saved.get(key) if isinstance(saved, dict) else None
