"""Synthetic rows of coloured shapes, made deterministically from a seed: the offline demo's
data (`--dataset synthetic`), multiple-choice questions about the picture, or boxes to find."""

import random

from PIL import Image, ImageDraw

from r1v import images, rows
from r1v.cli import UserError

COLORS = {"red": (220, 30, 30), "green": (30, 170, 30), "blue": (30, 60, 220),
          "yellow": (230, 200, 20)}
SHAPES = ("circle", "square", "triangle")
CHOICE_TASKS = ("leftright", "abovebelow", "count", "bigger", "color", "background")
# locate: "the red circle" -> its box (rec); detect: every shape of two kinds -> boxes (ovd)
SYNTHETIC_TASKS = CHOICE_TASKS + ("locate", "detect")
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


def _spots(rng, cells, n, distinct_axis=None):
    """n distinct grid cells; with `distinct_axis` (0 = x, 1 = y) the first two differ on it."""
    grid = [(x, y) for x in range(cells) for y in range(cells)]
    spots = rng.sample(grid, n)
    while distinct_axis is not None and spots[0][distinct_axis] == spots[1][distinct_axis]:
        spots = rng.sample(grid, n)
    return spots


def synthetic_row(rng, task, image_size):
    """One synthetic (image, fields), fields as data.py's rows. Shapes sit in distinct cells of a
    grid whose cells are 28 pixels (one visual token) wide, so each is whole inside one token."""
    cells = max(2, image_size // images.PATCH_FACTOR)
    cell = image_size / cells
    n_shapes = {"count": rng.randint(1, min(4, cells * cells)), "color": 1,
                "background": 1}.get(task, 2)
    if task in ("locate", "detect"):  # drawn after the line above: choice rows stay as they were
        n_shapes = rng.randint(1, 2 if task == "locate" else min(3, cells * cells))
    spots = _spots(rng, cells, n_shapes, {"leftright": 0, "abovebelow": 1}.get(task))
    colors = (rng.sample(sorted(COLORS), n_shapes) if n_shapes <= len(COLORS)
              else [rng.choice(sorted(COLORS))] * n_shapes)
    shapes = [rng.choice(SHAPES) for _ in range(n_shapes)]
    radii = [cell * 0.38] * n_shapes
    if task == "bigger":
        radii = [cell * 0.45, cell * 0.22] if rng.random() < 0.5 else [cell * 0.22, cell * 0.45]
    background = (rng.choice([c for c in sorted(COLORS) if c not in colors])
                  if task == "background" else None)
    image = Image.new("RGB", (image_size, image_size),
                      COLORS[background] if background else "white")
    draw = ImageDraw.Draw(image)
    for (x, y), color, shape, r in zip(spots, colors, shapes, radii):
        _draw(draw, shape, COLORS[color], (x + 0.5) * cell, (y + 0.5) * cell, r)
    names = [f"{c} {s}" for c, s in zip(colors, shapes)]
    boxes = [[round((x + 0.5) * cell - r), round((y + 0.5) * cell - r), round((x + 0.5) * cell + r),
              round((y + 0.5) * cell + r)] for (x, y), r in zip(spots, radii)]
    if task == "locate":
        return image, {"phrase": f"the {names[0]}", "box": boxes[0]}
    if task == "detect":  # two kinds asked, whether drawn or not
        labels = rng.sample(SHAPES, 2)
        return image, {"labels": labels, "boxes": [{"bbox_2d": b, "label": s}
                                                   for b, s in zip(boxes, shapes) if s in labels]}
    if task in ("count", "color", "background"):  # the gold option and 1-3 others
        gold, pool = ((str(n_shapes), ["1", "2", "3", "4"]) if task == "count"
                      else (background or colors[0], sorted(COLORS)))
        choices = [gold] + rng.sample([c for c in pool if c != gold], rng.randint(1, 3))
        question = SYNTHETIC_QUESTIONS[task].format(shape=shapes[0])
    else:
        question = SYNTHETIC_QUESTIONS[task].format(a=names[0], b=names[1])
        if task == "leftright":
            choices, gold = ["left", "right"], "left" if spots[0][0] < spots[1][0] else "right"
        elif task == "abovebelow":
            choices, gold = ["above", "below"], "above" if spots[0][1] < spots[1][1] else "below"
        else:
            choices, gold = names, names[0] if radii[0] > radii[1] else names[1]
    rng.shuffle(choices)  # the same generator goes on shuffling the options
    return image, {"question": question, "choices": choices, "answer": gold}


def synthetic_task_type(tasks):
    """choice, rec or ovd: the one task type of the synthetic `tasks`."""
    unknown = [t for t in tasks if t not in SYNTHETIC_TASKS]
    if unknown:
        raise UserError(f"--synthetic_tasks: unknown task(s) {unknown}; "
                        f"known: {list(SYNTHETIC_TASKS)}")
    kinds = {{"locate": "rec", "detect": "ovd"}.get(t, "choice") for t in tasks}
    if len(kinds) != 1:
        raise UserError(f"--synthetic_tasks {' '.join(tasks)}: mixes task types {sorted(kinds)}; "
                        "multiple-choice, locate and detect tasks train apart")
    return kinds.pop()


def source(size=1000, seed=0, tasks=CHOICE_TASKS, image_size=112):
    """`size` synthetic rows (r1v/rows.py's Source); tasks cycle row by row."""
    task = synthetic_task_type(tasks)
    if size < 1:
        raise UserError("--dataset_limit: the synthetic set needs a number of rows (>= 1)")
    name = f"synthetic(seed={seed})"
    return rows.Source(name, size, lambda i: synthetic_row(random.Random(seed * 1_000_003 + i),
                                                           tasks[i % len(tasks)], image_size),
                       lambda i: f"{name} row {i + 1}", task)
