"""Helpers the model tests share (test_policy.py, test_qwen25.py, test_qwen3.py): a non-zero LoRA
adapter, prompts built with a checkpoint's chat template, a Rollout of fixed completions, a count
of the vision tower's calls."""

import torch
from PIL import Image

from r1v import model as models
from r1v import policy, synthetic


def randomise_lora(model):
    """A non-zero adapter (peft starts lora_B at zero), so that disabling it matters."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model


def chat_examples(processor, sizes):
    """Prompts built with the chat template, one image each, sizes (width, height) in pixels."""
    questions = [synthetic.SYNTHETIC_QUESTIONS[k] for k in ("background", "count", "color")]
    examples = []
    for (w, h), question, color in zip(sizes, questions, ["red", "green", "blue"]):
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": question}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True,
                                               tokenize=False)
        examples.append({"prompt": prompt, "image": Image.new("RGB", (w, h), color)})
    return examples


def fixed_rollout(processor, examples):
    """A Rollout of the examples with fixed completions (no generation needed)."""
    enc = policy.encode_prompts(processor, examples, 1)
    completion_ids = torch.tensor([processor.tokenizer.convert_tokens_to_ids(["red", "blue"])]
                                  * len(examples))                             # (N, C)
    return policy.Rollout.from_encoding(enc, completion_ids, torch.ones_like(completion_ids),
                                        models.special_tokens(processor).vision_start)


def count_vision_calls(model):
    """A list that gets an item each time the vision tower runs, and the hook to remove."""
    calls = []
    visual = models.base_of(model).model.visual
    return calls, visual.register_forward_hook(lambda module, args, out: calls.append(1))


def plain_completions(model, processor, examples, group_size, gen_config):
    """The completion ids (N, C) of the model's own generate on pixels, each prompt and its
    image repeated `group_size` times: what policy.generate's shared features must equal."""
    enc = processor(text=[ex["prompt"] for ex in examples for _ in range(group_size)],
                    images=[ex["image"] for ex in examples for _ in range(group_size)],
                    padding=True, padding_side="left", return_tensors="pt")
    model.eval()  # as policy.generate does: gradient checkpointing would turn the cache off
    with torch.no_grad():
        out = model.generate(**enc, generation_config=gen_config)
    return out[:, enc["input_ids"].shape[1]:]
