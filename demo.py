"""The offline demo: a tiny random Qwen2-VL (a Qwen2.5-VL for the synthetic grounding tasks) with
a tiny word-level tokenizer, synthetic sets of coloured shapes, the demo's settings, and the format
warm-up.

The tiny model has the real architecture (M-RoPE, the vision tower with its 2x2 patch merger,
the Qwen special tokens) and is saved as an ordinary model folder, so it goes through exactly the
loading code a real checkpoint does. Its vocabulary is the words of the prompts and answers it
will see. `warm_up_format` teaches it the answer FORMAT with uniformly random answers (never the
gold one), so a freshly built demo model writes `</think> <answer> X </answer>` but sits at
chance: any rise in accuracy (or IoU) during the demo comes from the GRPO updates.
"""

import dataclasses
import json
import random
import re
from pathlib import Path

import torch
import transformers
from PIL import Image, ImageDraw
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (AutoProcessor, PreTrainedTokenizerFast, Qwen2_5_VLConfig,
                          Qwen2_5_VLProcessor, Qwen2VLConfig, Qwen2VLImageProcessor,
                          Qwen2VLProcessor, Qwen2VLVideoProcessor)

import data
import policy
from cli import UserError

MODEL = "demo"  # --model demo: build the tiny model into OUTPUT_DIR/demo-base (or reuse it)
# The demos' settings (README "The demo" says why each); flags given on the command line win.
DEMO = dict(model=MODEL, dataset="synthetic", synthetic_tasks=["background"],
            synthetic_image_size=56, dataset_limit=5000, num_generations=8, prompts_per_step=16,
            micro_batch_size=128, max_steps=200, max_completion_length=8, temperature=0.3,
            learning_rate=3e-3, lr_scheduler="constant", beta=0.04, lora_r=16, lora_alpha=32,
            train_vision=True, save_steps=100, gradient_checkpointing=False,
            log_samples_steps=50)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
TAGS = ["<think>", "</think>", "<answer>", "</answer>"]


# --- synthetic spatial questions ----------------------------------------------------------------

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
    cells = max(2, image_size // data.PATCH_FACTOR)
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


def synthetic_dataset(size=1000, seed=0, tasks=CHOICE_TASKS, image_size=112, view=data.View()):
    """Coloured shapes with spatial questions or boxes, made deterministically from `seed`; tasks
    cycle row by row. Images are used at their size, whatever `view`'s pixel budget."""
    task = synthetic_task_type(tasks)
    if size < 1:
        raise UserError("--dataset_limit: the synthetic set needs a number of rows (>= 1)")

    def read(i):
        return synthetic_row(random.Random(seed * 1_000_003 + i), tasks[i % len(tasks)],
                             image_size)

    view = dataclasses.replace(view, min_pixels=0, max_pixels=image_size * image_size)
    return data.Examples(f"synthetic(seed={seed})", size, read,
                         lambda i: f"synthetic(seed={seed}) row {i + 1}", seed, view, task,
                         shuffle=False)


def synthetic_vocabulary(grounding=False):
    """Every text a synthetic prompt or answer can contain: the demo tokenizer is built from it
    (grounding adds the box questions, JSON and the numbers 0-1000)."""
    words = list(COLORS) + list(SHAPES) + ["left", "right", "above", "below", "1", "2", "3", "4"]
    texts = [data.PROMPT_TEMPLATE, data.question_text("x", ["a", "b"])]
    if grounding:
        texts += [data.REC_QUESTION, data.OVD_QUESTION, "the []",
                  '[{"bbox_2d": [1, 2, 3, 4], "label": "circle"}]', " ".join(map(str, range(1001)))]
    return texts + list(SYNTHETIC_QUESTIONS.values()) + words + TAGS


# --- the tiny model -----------------------------------------------------------------------------

def build_tokenizer(texts, exact=False):
    """A word-level tokenizer whose vocabulary is every word and punctuation run in `texts`.
    `exact`: every word, punctuation mark and whitespace run is a token and decoding joins them
    as they were, so a JSON answer decodes to valid JSON (plain word-level decoding puts a space
    between all tokens)."""
    pattern = r"\s+|\w+|[^\w\s]" if exact else r"\w+|[^\w\s]+"
    words = sorted({w for t in texts for w in re.findall(pattern, t)})
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + ["[UNK]"] + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    if exact:
        core.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
        core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]",
                                  eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                  padding_side="left")
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tok.add_tokens(TAGS)  # ordinary tokens: they survive decode(skip_special_tokens=True)
    return tok


def qwen2vl_config(tok, hidden, intermediate, layers, heads, kv_heads, mrope_section, vision,
                   rope_theta=10000.0, vocab_size=None, config_class=Qwen2VLConfig):
    """A Qwen2-VL config around `tok`'s special tokens (the tiny model's and the benchmark's).
    Qwen2.5-VL's config (`config_class`) has the same fields, except in `vision`."""
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    eos = ids["<|endoftext|>"]
    return config_class(
        text_config=dict(vocab_size=vocab_size or len(tok), hidden_size=hidden,
                         intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=32768,
                         rope_parameters=dict(rope_type="default", rope_theta=rope_theta,
                                              mrope_section=mrope_section),
                         bos_token_id=eos, eos_token_id=eos, pad_token_id=eos),
        vision_config=dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, **vision),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True)


def qwen2_5_vl_config(tok, hidden, intermediate, layers, heads, kv_heads, mrope_section, vision,
                      **kwargs):
    """A Qwen2.5-VL config around `tok`'s special tokens. Its `vision` names differ from
    Qwen2-VL's: depth, hidden_size (the tower's width), intermediate_size, num_heads,
    out_hidden_size (the language model's width), window_size (pixels), fullatt_block_indexes."""
    return qwen2vl_config(tok, hidden, intermediate, layers, heads, kv_heads, mrope_section,
                          vision, config_class=Qwen2_5_VLConfig, **kwargs)


# Qwen2.5-VL checkpoints are Instruct models: their prompts go through a chat template. This is
# Qwen's, without videos and picture numbering.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAT_WORDS = "system You are a helpful assistant. user"  # in the vocabulary: no [UNK] in prompts


def save_processor(folder, tok, max_pixels, family="qwen2_vl", chat_template=None):
    """A Qwen2-VL or Qwen2.5-VL processor (14-pixel patches merged 2x2, the same image processor)
    around `tok`, saved into `folder`."""
    processor_class = {"qwen2_vl": Qwen2VLProcessor, "qwen2_5_vl": Qwen2_5_VLProcessor}[family]
    image_processor = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=max_pixels)
    processor = processor_class(image_processor=image_processor, tokenizer=tok,
                                video_processor=Qwen2VLVideoProcessor())
    processor.chat_template = chat_template
    processor.save_pretrained(folder)


def build_tiny_model(folder, texts, hidden=64, layers=2, seed=0, family="qwen2_vl"):
    """Build and save a tiny random Qwen2-VL, its tokenizer and processor into `folder`; with
    family="qwen2_5_vl", a tiny Qwen2.5-VL whose processor has a chat template."""
    instruct = family == "qwen2_5_vl"
    tok = build_tokenizer(texts + [CHAT_WORDS] if instruct else texts, exact=instruct)
    half = hidden // 4 // 2  # M-RoPE splits half the head dim into (time, height, width)
    section = [half // 4, half * 3 // 8, half - half // 4 - half * 3 // 8]
    if family == "qwen2_vl":
        config = qwen2vl_config(tok, hidden, 2 * hidden, layers, 4, 2, section,
                                dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=2,
                                     mlp_ratio=2))
    elif family == "qwen2_5_vl":
        # 56-pixel windows (2x2 merged tokens): a larger image spans several, so the windowed
        # block 0 and the full-attention block 1 both matter.
        config = qwen2_5_vl_config(tok, hidden, 2 * hidden, layers, 4, 2, section,
                                   dict(depth=2, hidden_size=32, intermediate_size=64,
                                        num_heads=2, out_hidden_size=hidden, window_size=56,
                                        fullatt_block_indexes=[1]))
    else:
        raise ValueError(f"family {family!r}: not one of {list(policy.MODEL_CLASSES)}")
    torch.manual_seed(seed)
    model = getattr(transformers, policy.MODEL_CLASSES[family])(config)
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    save_processor(folder, tok, max_pixels=28 * 28 * 64, family=family,
                   chat_template=CHAT_TEMPLATE if instruct else None)
    return folder


def random_answer(rng, example, examples):
    """An answer in the example's format, drawn without looking at its gold: a random option,
    or the boxes of another random row (whose shapes lie elsewhere)."""
    if example["task_type"] == "choice":
        return rng.choice(example["choices"])
    return data.answer_of(examples[rng.randrange(len(examples))])


def warm_up_format(folder, examples, steps=100, batch_size=16, lr=3e-3, seed=0):
    """Teach the freshly built model the answer FORMAT by supervised steps on completions
    `</think> <answer> X </answer><eos>` where X is a UNIFORMLY RANDOM answer, never chosen for
    being gold: the model learns to answer with an option (a box), nothing about which is right."""
    processor = AutoProcessor.from_pretrained(folder)
    model = transformers.AutoModelForImageTextToText.from_pretrained(folder)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        batch = [examples[rng.randrange(len(examples))] for _ in range(batch_size)]
        targets = [data.answer_completion(ex, random_answer(rng, ex, examples)) for ex in batch]
        rollout = policy.answer_rollout(processor, batch, targets)
        loss, _ = policy.accumulate_sft_gradients(model, rollout, batch_size)  # one micro-batch
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)
    return loss


def build_demo_model(folder, seed, tasks, image_size):
    """The demo's base model: tiny, random, then warmed up (see `warm_up_format`); a Qwen2-VL for
    multiple choice, a Qwen2.5-VL (pixel boxes, chat prompt) for grounding. Reused if `folder`
    already holds one, so a resumed demo starts from the same base."""
    folder = Path(folder)
    done = folder / "demo_base.json"
    if not done.is_file():
        grounding = synthetic_task_type(tasks) != "choice"
        build_tiny_model(folder, synthetic_vocabulary(grounding), seed=seed,
                         family="qwen2_5_vl" if grounding else "qwen2_vl")
        # Warm-up rows come from another seed than the training rows.
        view = policy.model_view(str(folder), "auto", 0, image_size * image_size)
        examples = synthetic_dataset(256, seed + 1, tuple(tasks), image_size, view)
        loss = warm_up_format(folder, examples, seed=seed)
        done.write_text(json.dumps({"warmup_final_loss": loss}))
    return str(folder)
