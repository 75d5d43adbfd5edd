"""Helpers the family tests share (test_qwen25.py, test_qwen3.py): a non-zero LoRA adapter and
prompts built with a checkpoint's chat template."""

import torch
from PIL import Image

from r1v import synthetic


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
