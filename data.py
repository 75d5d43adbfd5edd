"""Datasets, the prompt, images and batches.

Every dataset yields example dicts: `image` (PIL, resized for the model), `question` (the question text the model
sees), `choices` (option texts, shuffled with a seed), `answer` (the gold option text), `prompt` (the full
prompt text, image placeholder first). Datasets are lazy sequences: an image is decoded when its row is used.

Sources: SAT from the hub (`array/SAT`) or a local copy of the same schema, a JSONL of a user's own task, and a
synthetic spatial set of coloured shapes made offline from a seed.
"""

import io
import json
import random
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from qwen_vl_utils import smart_resize

VISION_TOKENS = "<|vision_start|><|image_pad|><|vision_end|>"
# The paper's base-model prompt, built by hand: no chat template (REFERENCE.md section 1).
PROMPT_TEMPLATE = (VISION_TOKENS + "A conversation between User and Assistant. The user asks a question about the "
                   "image, and the Assistant solves it. The assistant first thinks about the reasoning process in "
                   "the mind and then provides the user with the answer.\nUser: {question} \nAssistant: Let me "
                   "solve this step by step.\n<think>")
PATCH_FACTOR = 28  # one LLM token per 28x28 pixels (14-pixel patches, merged 2x2)


def question_text(question, choices):
    """The paper's question: `Answer in natural language. {q} Choose between the following options: a, b or c`."""
    options = choices[0] if len(choices) == 1 else ", ".join(choices[:-1]) + " or " + choices[-1]
    return f"Answer in natural language. {question} Choose between the following options: {options}"


def fit_image(image, min_pixels, max_pixels):
    """RGB, resized (aspect kept) so both sides are multiples of 28 and the area is within [min, max] pixels."""
    image = image.convert("RGB")
    height, width = smart_resize(image.height, image.width, PATCH_FACTOR, min_pixels, max_pixels)
    return image if (width, height) == image.size else image.resize((width, height), Image.BICUBIC)


def make_example(image, question, choices, answer, rng, min_pixels, max_pixels, build_question=True):
    """Validate one row and build its example dict. `rng` shuffles the options."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError("the question is empty or not a string")
    if not isinstance(choices, (list, tuple)) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"choices must be a list of at least 2 strings, got {choices!r}")
    if answer not in choices:
        raise ValueError(f"the answer {answer!r} is not among the choices {list(choices)}")
    choices = list(choices)
    rng.shuffle(choices)
    text = question_text(question, choices) if build_question else question
    return {"image": fit_image(image, min_pixels, max_pixels), "question": text, "choices": choices,
            "answer": answer, "prompt": PROMPT_TEMPLATE.format(question=text)}


def decode_image(value):
    """A PIL image from what a dataset stores: PIL, raw bytes, {'bytes': ...} or {'path': ...}, or a file path."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        image = Image.open(io.BytesIO(value))
    elif isinstance(value, (str, Path)):
        image = Image.open(value)
    else:
        raise ValueError(f"cannot read an image from a {type(value).__name__}")
    image.load()
    return image


class Examples(torch.utils.data.Dataset):
    """A lazy list of examples: `make(i)` builds row i; any error names the source and the row."""

    def __init__(self, name, size, make):
        self.name, self.size, self.make = name, size, make

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        try:
            return self.make(i)
        except Exception as e:
            raise ValueError(f"{self.name} row {i}: {e}") from e


# --- SAT ------------------------------------------------------------------------------------------------------

SAT_COLUMNS = ("image_bytes", "question", "answers", "correct_answer")


def load_sat(source="array/SAT", split="train", limit=15000, seed=0, min_pixels=3136, max_pixels=401408):
    """SAT (hub id or a local folder of the same schema): the first `limit` rows, single-image rows only."""
    import datasets

    ds = datasets.load_dataset(source, split=split)
    missing = [c for c in SAT_COLUMNS if c not in ds.column_names]
    if missing:
        raise ValueError(f"dataset {source!r} split {split!r} lacks the SAT columns {missing}; "
                         f"it has {ds.column_names}")
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    feature = ds.features["image_bytes"]
    inner = getattr(feature, "feature", None)
    if isinstance(inner, datasets.Image):  # count images without decoding them
        ds = ds.cast_column("image_bytes", datasets.List(datasets.Image(decode=False)))
    ds = ds.filter(lambda images: len(images) == 1, input_columns="image_bytes")
    if len(ds) == 0:
        raise ValueError(f"dataset {source!r} split {split!r} has no single-image rows")

    def make(i):
        row = ds[i]
        return make_example(decode_image(row["image_bytes"][0]), row["question"], row["answers"],
                            row["correct_answer"], random.Random(seed * 1_000_003 + i), min_pixels, max_pixels)

    return Examples(f"{source}[{split}]", len(ds), make)


# --- local JSONL ----------------------------------------------------------------------------------------------

def load_jsonl(path, seed=0, min_pixels=3136, max_pixels=401408):
    """A user's task: one JSON object a line with `image` (path, relative to the file), `question`, `choices`,
    `answer` (one of the choices). Fields and image paths are checked for every line before training starts."""
    path = Path(path)
    rows = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from e
        missing = [k for k in ("image", "question", "choices", "answer") if k not in row]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}")
        image_path = path.parent / row["image"]
        if not image_path.is_file():
            raise ValueError(f"{where}: image {str(image_path)!r} does not exist")
        if row["answer"] not in row["choices"]:
            raise ValueError(f"{where}: the answer {row['answer']!r} is not among the choices {row['choices']}")
        rows.append((where, image_path, row))

    def make(i):
        where, image_path, row = rows[i]
        try:
            return make_example(decode_image(image_path), row["question"], row["choices"], row["answer"],
                                random.Random(seed * 1_000_003 + i), min_pixels, max_pixels)
        except Exception as e:
            raise ValueError(f"{where}: {e}") from e

    return Examples(str(path), len(rows), make)


# --- synthetic spatial questions ------------------------------------------------------------------------------

COLORS = {"red": (220, 30, 30), "green": (30, 170, 30), "blue": (30, 60, 220), "yellow": (230, 200, 20)}
SHAPES = ("circle", "square", "triangle")
SYNTHETIC_TASKS = ("leftright", "abovebelow", "count", "bigger", "color", "background")
SYNTHETIC_QUESTIONS = {
    "leftright": "Is the {a} to the left or to the right of the {b}?",
    "abovebelow": "Is the {a} above or below the {b}?",
    "count": "How many shapes are in the image?",
    "bigger": "Which is bigger, the {a} or the {b}?",
    "color": "What color is the {shape}?",
    "background": "What color is the background?",
}


def _draw(draw, shape, color, cx, cy, r):
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)


def synthetic_row(rng, task, image_size):
    """One synthetic (image, question, choices, answer). Shapes sit in distinct cells of a grid whose cells are
    28 pixels (one visual token) wide, so each shape is whole inside one token's patch."""
    cells = max(2, image_size // PATCH_FACTOR)
    cell = image_size / cells
    n_shapes = {"count": rng.randint(1, min(4, cells * cells)), "color": 1, "background": 1}.get(task, 2)
    spots = rng.sample([(x, y) for x in range(cells) for y in range(cells)], n_shapes)
    if task == "leftright":
        while spots[0][0] == spots[1][0]:
            spots = rng.sample([(x, y) for x in range(cells) for y in range(cells)], 2)
    if task == "abovebelow":
        while spots[0][1] == spots[1][1]:
            spots = rng.sample([(x, y) for x in range(cells) for y in range(cells)], 2)
    colors = rng.sample(sorted(COLORS), n_shapes) if n_shapes <= len(COLORS) else [rng.choice(sorted(COLORS))] * n_shapes
    shapes = [rng.choice(SHAPES) for _ in range(n_shapes)]
    radii = [cell * 0.38] * n_shapes
    if task == "bigger":
        radii = [cell * 0.45, cell * 0.22] if rng.random() < 0.5 else [cell * 0.22, cell * 0.45]
    background = rng.choice([c for c in sorted(COLORS) if c not in colors]) if task == "background" else None
    image = Image.new("RGB", (image_size, image_size), COLORS[background] if background else "white")
    draw = ImageDraw.Draw(image)
    for (x, y), color, shape, r in zip(spots, colors, shapes, radii):
        _draw(draw, shape, COLORS[color], (x + 0.5) * cell, (y + 0.5) * cell, r)
    names = [f"{c} {s}" for c, s in zip(colors, shapes)]
    if task in ("count", "color", "background"):  # the gold option and 1-3 others
        gold, pool = (str(n_shapes), ["1", "2", "3", "4"]) if task == "count" else (background or colors[0], sorted(COLORS))
        choices = [gold] + rng.sample([c for c in pool if c != gold], rng.randint(1, 3))
        return image, SYNTHETIC_QUESTIONS[task].format(shape=shapes[0]), choices, gold
    question = SYNTHETIC_QUESTIONS[task].format(a=names[0], b=names[1])
    if task == "leftright":
        return image, question, ["left", "right"], "left" if spots[0][0] < spots[1][0] else "right"
    if task == "abovebelow":
        return image, question, ["above", "below"], "above" if spots[0][1] < spots[1][1] else "below"
    return image, question, names, names[0] if radii[0] > radii[1] else names[1]


def synthetic_dataset(size=1000, seed=0, tasks=SYNTHETIC_TASKS, image_size=112):
    """Coloured shapes and spatial questions, made deterministically from `seed`; tasks cycle row by row."""
    unknown = [t for t in tasks if t not in SYNTHETIC_TASKS]
    if unknown:
        raise ValueError(f"--synthetic_tasks: unknown task(s) {unknown}; known: {list(SYNTHETIC_TASKS)}")

    def make(i):
        rng = random.Random(seed * 1_000_003 + i)
        image, question, choices, answer = synthetic_row(rng, tasks[i % len(tasks)], image_size)
        return make_example(image, question, choices, answer, rng, 0, image_size * image_size)

    return Examples(f"synthetic(seed={seed})", size, make)


def synthetic_vocabulary():
    """Every text a synthetic prompt or answer can contain: the tiny demo tokenizer is built from it."""
    words = list(COLORS) + list(SHAPES) + ["left", "right", "above", "below", "1", "2", "3", "4"]
    texts = [PROMPT_TEMPLATE, question_text("x", ["a", "b"])] + list(SYNTHETIC_QUESTIONS.values()) + words
    return texts + ["<think>", "</think>", "<answer>", "</answer>"]


def load_examples(dataset, split="train", limit=15000, seed=0, min_pixels=3136, max_pixels=401408,
                  synthetic_tasks=SYNTHETIC_TASKS, synthetic_image_size=112):
    """Dispatch on `dataset`: "synthetic", a .jsonl file, or a hub id / local folder in SAT's schema."""
    if dataset == "synthetic":
        return synthetic_dataset(limit or 1000, seed, tuple(synthetic_tasks), synthetic_image_size)
    if dataset.endswith(".jsonl"):
        if not Path(dataset).is_file():
            raise ValueError(f"--dataset: file {dataset!r} does not exist")
        return load_jsonl(dataset, seed, min_pixels, max_pixels)
    return load_sat(dataset, split, limit, seed, min_pixels, max_pixels)


# --- prompt order and batches ---------------------------------------------------------------------------------

class PromptSampler:
    """Prompt indices in a fresh seeded permutation each epoch. Its state (epoch, position) is all it takes to
    continue the same order after a restart."""

    def __init__(self, size, batch_size, seed):
        if size < batch_size:
            raise ValueError(f"the dataset has {size} rows, fewer than one batch of {batch_size} prompts")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.epoch, self.position = 0, 0

    def next_batch(self):
        if self.position + self.batch_size > self.size:  # drop the ragged tail, start the next epoch
            self.epoch, self.position = self.epoch + 1, 0
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        batch = order[self.position:self.position + self.batch_size].tolist()
        self.position += self.batch_size
        return batch

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state):
        self.epoch, self.position = state["epoch"], state["position"]


def encode_prompts(processor, examples, group_size):
    """Tokenize B prompts, each repeated G times (prompt-major), left-padded, with their images.

    Returns the processor's tensors: input_ids, attention_mask, mm_token_type_ids (N, P), and the vision inputs
    pixel_values (patches of all images, in sequence order) and image_grid_thw (one row per image).
    """
    texts = [ex["prompt"] for ex in examples for _ in range(group_size)]
    images = [ex["image"] for ex in examples for _ in range(group_size)]
    return processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")


def sequence_batch(enc, completion_ids, completion_mask, vision_start_id):
    """The batch layout the trainer works on: the processor's prompt tensors (N, P) and vision inputs, the
    completions (N, C), and how many images each sequence has (for `slice_sequences`)."""
    return {"prompt_ids": enc["input_ids"], "prompt_mask": enc["attention_mask"],
            "mm_token_type_ids": enc["mm_token_type_ids"], "pixel_values": enc["pixel_values"],
            "image_grid_thw": enc["image_grid_thw"], "completion_ids": completion_ids, "completion_mask": completion_mask,
            "images_per_seq": (enc["input_ids"] == vision_start_id).sum(1)}


def slice_sequences(batch, start, end):
    """Rows [start, end) of a batch whose tensors are (N, ...) per sequence, with the vision inputs that belong
    to them: `pixel_values` holds the patches of every image back to back, `image_grid_thw` one row per image,
    and `images_per_seq` (N,) how many images each sequence has. This is the one place that knows that layout."""
    image_counts = batch["images_per_seq"]
    first_image, last_image = int(image_counts[:start].sum()), int(image_counts[:end].sum())
    patches = batch["image_grid_thw"].prod(-1)                                      # (n_images,)
    first_patch, last_patch = int(patches[:first_image].sum()), int(patches[:last_image].sum())
    out = {}
    for key, value in batch.items():
        if key == "pixel_values":
            out[key] = value[first_patch:last_patch]
        elif key == "image_grid_thw":
            out[key] = value[first_image:last_image]
        elif isinstance(value, torch.Tensor):
            out[key] = value[start:end]
        else:
            out[key] = value
    return out


def model_inputs(batch):
    """The forward kwargs for prompt + completion: transformers >= 5 needs mm_token_type_ids over the WHOLE
    sequence (zeros over the completion) to place the M-RoPE positions of the image tokens."""
    completion_ids = batch["completion_ids"]
    return {"input_ids": torch.cat([batch["prompt_ids"], completion_ids], 1),                # (N, P+C)
            "attention_mask": torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1),  # (N, P+C)
            "mm_token_type_ids": torch.cat([batch["mm_token_type_ids"], torch.zeros_like(completion_ids)], 1),
            "pixel_values": batch["pixel_values"], "image_grid_thw": batch["image_grid_thw"]}
