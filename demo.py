"""The offline demo (`python train.py --demo`): its settings, and its base model, a tiny random
Qwen2-VL (a Qwen2.5-VL for the synthetic grounding tasks, r1v/tiny.py) warmed up on the answer
format.

`warm_up_format` teaches it the answer FORMAT with uniformly random answers, drawn without looking
at the gold (never drawing the gold would teach it to avoid the right one: 0.02 at the start), so
a freshly built demo model writes `</think> <answer> X </answer>` but sits at chance: any
rise in accuracy (or IoU) during the demo comes from the GRPO updates.
"""

import contextlib
import json
import random
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

import data
from r1v import grounding, model, policy, synthetic, tiny

MODEL = "demo"  # --model demo: build the tiny model into OUTPUT_DIR/demo-base (or reuse it)
# The demo's model names and the family each builds (None: Qwen2-VL for multiple choice,
# Qwen2.5-VL for grounding): the same demo on the newer families.
MODELS = {MODEL: None, "demo-qwen2.5-vl": "qwen2_5_vl", "demo-qwen3-vl": "qwen3_vl"}
# The demos' settings (README "The demo" says why each); flags given on the command line win.
DEMO = dict(model=MODEL, dataset="synthetic", synthetic_tasks=["background"],
            synthetic_image_size=56, dataset_limit=5000, num_generations=8, prompts_per_step=16,
            micro_batch_size=128, max_steps=200, max_completion_length=8, temperature=0.3,
            learning_rate=3e-3, lr_scheduler="constant", beta=0.04, lora_r=16, lora_alpha=32,
            train_vision=True, save_steps=100, gradient_checkpointing=False,
            log_samples_steps=50, cpu_threads=1)


def synthetic_vocabulary(grounding_tasks=False):
    """Every text a synthetic prompt or answer can contain: the demo tokenizer is built from it
    (grounding adds the box questions, JSON and the numbers 0-1000)."""
    words = list(synthetic.COLORS) + list(synthetic.SHAPES) + ["left", "right", "above",
                                                                "below", "1", "2", "3", "4"]
    texts = [data.PROMPT_TEMPLATE, data.question_text("x", ["a", "b"])]
    if grounding_tasks:
        texts += [grounding.REC_QUESTION, grounding.OVD_QUESTION, "the []",
                  '[{"bbox_2d": [1, 2, 3, 4], "label": "circle"}]', " ".join(map(str, range(1001)))]
    return texts + list(synthetic.SYNTHETIC_QUESTIONS.values()) + words + tiny.TAGS


def synthetic_dataset(size=1000, seed=0, tasks=synthetic.CHOICE_TASKS, image_size=112,
                      view=data.View()):
    """The demo's coloured shapes as examples (data.load_examples' `synthetic`)."""
    return data.load_examples("synthetic", limit=size, seed=seed, view=view, tasks=tasks,
                              image_size=image_size)


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
    processor = model.load_processor(str(folder))
    tuned = model.load_base_model(str(folder), torch.device("cpu")).train()
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(tuned.parameters(), lr=lr)
    for _ in tqdm(range(steps), desc="demo: format warm-up", dynamic_ncols=True):
        batch = [examples[rng.randrange(len(examples))] for _ in range(batch_size)]
        targets = [data.answer_completion(ex, random_answer(rng, ex, examples)) for ex in batch]
        rollout = policy.answer_rollout(processor, batch, targets)
        loss, _ = policy.sft_loss(tuned, rollout, rollout.completion_mask.sum())  # one batch
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    tuned.save_pretrained(folder)
    return loss.item()


def build_untrained(folder, seed, tasks, weights=True, family=None):
    """The demo's tiny random model, tokenizer and processor, before the warm-up: of `family`, or
    a Qwen2-VL for multiple choice, a Qwen2.5-VL (pixel boxes, chat prompt) for grounding
    (weights=False: its config and processor, all a prompt's length needs)."""
    grounding_tasks = synthetic.synthetic_task_type(tasks) != "choice"
    family = family or ("qwen2_5_vl" if grounding_tasks else "qwen2_vl")
    # Only JSON boxes need whitespace as tokens: a choice answer then fits the demo's 8 tokens.
    return str(tiny.build_tiny_model(folder, synthetic_vocabulary(grounding_tasks), seed=seed,
                                     family=family, weights=weights, exact=grounding_tasks))


@contextlib.contextmanager
def model_files(name, seed, tasks):
    """`name`; for a demo's model (MODELS), which its run builds only after every check, a
    temporary folder with its config and processor (build_untrained): all a prompt's length or
    the memory plan needs."""
    if name not in MODELS:
        yield name
        return
    with tempfile.TemporaryDirectory() as folder:
        yield build_untrained(folder, seed, tasks, weights=False, family=MODELS[name])


def build_demo_model(folder, seed, tasks, image_size, family=None):
    """The demo's base model: tiny, random, then warmed up (see `warm_up_format`); of `family`,
    or a Qwen2-VL for multiple choice, a Qwen2.5-VL (pixel boxes, chat prompt) for grounding.
    Reused if `folder` already holds one, so a resumed demo starts from the same base."""
    folder = Path(folder)
    done = folder / "demo_base.json"
    if not done.is_file():
        build_untrained(folder, seed, tasks, family=family)
        # Warm-up rows come from another seed than the training rows.
        view = data.model_view(model.load_config(str(folder)), model.load_processor(str(folder)),
                               "auto", 0, image_size * image_size)
        examples = synthetic_dataset(256, seed + 1, tuple(tasks), image_size, view)
        loss = warm_up_format(folder, examples, seed=seed)
        done.write_text(json.dumps({"warmup_final_loss": loss}))
    return str(folder)


if __name__ == "__main__":  # this file holds the demo's parts; train.py runs it
    import sys

    print("demo.py holds the demo's settings and model; run the demo with\n"
          "  python train.py --demo --output_dir runs/demo    (README \"The demo\")",
          file=sys.stderr)
    sys.exit(2)
