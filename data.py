"""A dataset row becomes a prompt: the question, the image as the model sees it, the gold answer.

Every dataset is a lazy sequence of example dicts. All have `image` (PIL, resized for the model),
`task_type`, `question` (the text the model sees) and `prompt` (the full prompt). By task type:
  choice  `choices` (option texts, shuffled with a seed), `answer` (the gold option text)
  rec     `phrase`, `box` (the gold [x1, y1, x2, y2] in the frame the model answers in)
  ovd     `labels` (categories asked for), `boxes` ([{"bbox_2d": [...], "label": ...}], same frame)
Grounding rows also keep `gold_box` / `gold_boxes` in original-image pixels, `original_size` and
`frame_size`, to map answers back. An image is decoded when its row is used; every row is
checked once before training, without decoding pixels (r1v/rows.py, images.py, jsonl.py).

Sources: SAT (`array/SAT`) and RefCOCO (`lmms-lab/RefCOCO`, `RefCOCOplus`, `RefCOCOg`) from the
hub or a local folder of their schema (r1v/hub.py), JSONL files of a user's own task, and the
offline demo's synthetic shapes (r1v/synthetic.py).
"""

import dataclasses
import json

import torch

from r1v import grounding, hub, images, jsonl, model, rows, synthetic
from r1v.cli import UserError

VISION_TOKENS = "<|vision_start|><|image_pad|><|vision_end|>"
# The paper's base-model prompt, built by hand: no chat template (REFERENCE.md section 1).
PROMPT_TEMPLATE = (VISION_TOKENS + "A conversation between User and Assistant. The user asks a "
                   "question about the image, and the Assistant solves it. The assistant first "
                   "thinks about the reasoning process in the mind and then provides the user with "
                   "the answer.\nUser: {question} \nAssistant: Let me solve this step by step.\n"
                   "<think>")


def question_text(question, choices):
    """The paper's question: `Answer in natural language. {q} Choose between the following
    options: a, b or c`."""
    options = choices[0] if len(choices) == 1 else ", ".join(choices[:-1]) + " or " + choices[-1]
    return f"Answer in natural language. {question} Choose between the following options: {options}"


def question_of(fields):
    """The text the model is asked, from a checked row: the paper's, or VLM-R1's for boxes."""
    task = rows.task_type(fields)
    if task == "choice":
        return question_text(fields["question"], fields["choices"])
    if task == "rec":
        return grounding.REC_QUESTION.format(phrase=fields["phrase"].strip().rstrip("."))
    return grounding.OVD_QUESTION.format(labels=", ".join(fields["labels"]))


@dataclasses.dataclass(frozen=True)
class View:
    """How the model sees a row: the image's pixel budget, the prompt (a template holding
    `{question}`), the frame its boxes are written in (r1v/grounding.py) and the pixels per side
    of one of its visual tokens (model.patch_factor)."""
    min_pixels: int = images.MIN_PIXELS
    max_pixels: int = images.MAX_PIXELS
    template: str = PROMPT_TEMPLATE
    frame: str = "pixels"
    patch_factor: int = images.PATCH_FACTOR

    def prompt(self, question):
        return self.template.replace("{question}", question)  # a chat template has braces too


def model_view(config, processor, prompt_format, min_pixels, max_pixels):
    """How a model sees a row: the paper's r1 prompt, or (chat; auto for Qwen2.5-VL and
    Qwen3-VL, released as Instruct models only) its chat template around the image and question;
    its box frame and visual token size."""
    family = config.model_type
    chat = prompt_format == "chat" or (prompt_format == "auto" and family in model.CHAT_FAMILIES)
    return View(min_pixels, max_pixels, model.chat_prompt(processor) if chat else PROMPT_TEMPLATE,
                model.BOX_FRAMES[family], model.patch_factor(config))


def make_example(image, fields, rng, view=View()):
    """Validate one row and build its example dict as `view` says. `rng` shuffles the options
    (None: keep them in order)."""
    task = rows.check_fields(fields, image.size)
    fitted = images.fit_image(image, view.min_pixels, view.max_pixels, view.patch_factor)
    example = {"image": fitted, "task_type": task}
    if task == "choice":
        choices = list(fields["choices"])
        if rng is not None:
            rng.shuffle(choices)
        fields = {**fields, "choices": choices}
        example.update(choices=choices, answer=fields["answer"])
    else:
        size = grounding.frame_size(view.frame, fitted.size)
        example.update(original_size=image.size, frame_size=size)
        if task == "rec":
            example.update(phrase=fields["phrase"], gold_box=list(fields["box"]),
                           box=grounding.scale_box(fields["box"], image.size, size))
        else:
            example.update(labels=list(fields["labels"]), gold_boxes=fields["boxes"],
                           boxes=[{"bbox_2d": grounding.scale_box(b["bbox_2d"], image.size, size),
                                   "label": b["label"]} for b in fields["boxes"]])
    question = question_of(fields)
    return {**example, "question": question, "prompt": view.prompt(question)}


def gold_of(example):
    """What a row counts as right, for sample dumps."""
    return example.get("answer", example.get("box", example.get("boxes")))


def answer_of(example):
    """The gold answer as a completion writes it: the option, or the box(es) in the model's
    frame as JSON with integer coordinates (the form VLM-R1's prompt asks for)."""
    if example["task_type"] == "choice":
        return example["answer"]
    if example["task_type"] == "rec":
        return json.dumps([round(v) for v in example["box"]])
    return json.dumps([{"bbox_2d": [round(v) for v in b["bbox_2d"]], "label": b["label"]}
                       for b in example["boxes"]])


def answer_completion(example, answer=None):
    """A completion in the answer format with an empty thought: `</think> <answer> X </answer>`
    (the gold answer unless `answer` is given), opened with <think> when the prompt does not end
    with it (an Instruct model's chat prompt; a Thinking model's ends with "<think>\n"). What
    --objective sft trains on, and the demo's format warm-up."""
    opening = "" if example["prompt"].rstrip().endswith("<think>") else "<think> "
    answer = answer_of(example) if answer is None else answer
    return f"{opening}</think> <answer> {answer} </answer>"


def load_examples(dataset, split="train", limit=15000, seed=0, view=View(), flag="--dataset",
                  tasks=synthetic.CHOICE_TASKS, image_size=112):
    """A .jsonl file of a user's task, a hub id / local folder in SAT's or RefCOCO's schema, or
    `synthetic`: `limit` rows of the demo's `tasks`, images of `image_size` used at their size."""
    if dataset == "synthetic":  # used at their size
        view = dataclasses.replace(view, min_pixels=0, max_pixels=image_size * image_size)
        source, shuffle = synthetic.source(limit, seed, tuple(tasks), image_size), False
    else:
        source, shuffle = (jsonl.load_jsonl(dataset, limit, flag) if dataset.endswith(".jsonl")
                           else hub.load_source(dataset, split, limit, flag)), True
    return rows.Examples(source, seed, view, make_example, question_of, shuffle)


class PromptSampler:
    """Prompt indices in a fresh seeded permutation each epoch. Its state (epoch, position) is all
    it takes to continue the same order after a restart."""

    def __init__(self, size, batch_size, seed):
        if size < batch_size:
            raise UserError(f"the dataset has {size} rows, fewer than one batch of {batch_size} "
                            "prompts (--prompts_per_step)")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.epoch, self.position = 0, 0

    def next_batch(self):
        if self.position + self.batch_size > self.size:  # drop the ragged tail, next epoch
            self.epoch, self.position = self.epoch + 1, 0
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator)
        batch = order[self.position:self.position + self.batch_size].tolist()
        self.position += self.batch_size
        return batch

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state):
        self.epoch, self.position = state["epoch"], state["position"]
