"""A tiny, randomly initialised Qwen2-VL with a tiny word-level tokenizer, built offline.

The demo and the tests use it in place of `Qwen/Qwen2-VL-2B`. It has the real architecture (M-RoPE, the vision
tower with its 2x2 patch merger, the Qwen special tokens) and is saved as an ordinary model folder, so it goes
through exactly the loading code a real checkpoint does: `from_pretrained(folder)`.

Its vocabulary is the words of the prompts and answers it will see, so a prompt tokenizes to whole words.
`warm_up_format` then teaches it the answer FORMAT with uniformly random answers (never the correct one), so a
freshly built demo model writes `</think> <answer> X </answer>` but sits at chance accuracy: any rise in
accuracy during the demo comes from the GRPO updates.
"""

import re

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                          Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
TAGS = ["<think>", "</think>", "<answer>", "</answer>"]


def build_tokenizer(texts):
    """A word-level tokenizer whose vocabulary is every word and punctuation run in `texts`."""
    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]+", t)})
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + ["[UNK]"] + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", padding_side="left")
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tok.add_tokens(TAGS)  # ordinary tokens: they survive decode(skip_special_tokens=True)
    return tok


def build_tiny_model(folder, texts, hidden=64, layers=2, seed=0):
    """Build and save a tiny random Qwen2-VL, its tokenizer and processor into `folder`; return the folder."""
    tok = build_tokenizer(texts)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    heads = 4
    half = hidden // heads // 2  # M-RoPE splits half the head dim into (time, height, width) sections
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2,
                         max_position_embeddings=2048,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                              mrope_section=[half // 4, half * 3 // 8, half - half // 4 - half * 3 // 8]),
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|endoftext|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=2, mlp_ratio=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|endoftext|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(folder)
    save_processor(folder, tok, max_pixels=28 * 28 * 64)
    return folder


def save_processor(folder, tok, max_pixels):
    """A Qwen2-VL processor (image processor with 14-pixel patches merged 2x2) around `tok`, saved into `folder`."""
    image_processor = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=max_pixels)
    Qwen2VLProcessor(image_processor=image_processor, tokenizer=tok,
                     video_processor=Qwen2VLVideoProcessor()).save_pretrained(folder)


def warm_up_format(folder, examples, steps=100, batch_size=16, lr=3e-3, seed=0):
    """Teach the freshly built model the answer FORMAT by supervised steps on completions
    `</think> <answer> X </answer><eos>` where X is a UNIFORMLY RANDOM option, never the gold one: the model
    learns to answer with an option, and nothing about which one is right."""
    import random

    import data
    import grpo
    import train
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    model = Qwen2VLForConditionalGeneration.from_pretrained(folder)
    tok = processor.tokenizer
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        batch_examples = [examples[rng.randrange(len(examples))] for _ in range(batch_size)]
        targets = [f"</think> <answer> {rng.choice(ex['choices'])} </answer>" for ex in batch_examples]
        enc = data.encode_prompts(processor, batch_examples, 1)
        ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in targets]
        width = max(map(len, ids))
        completion_ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids])  # (N, C)
        completion_mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])    # (N, C)
        batch = data.sequence_batch(enc, completion_ids, completion_mask, tok.convert_tokens_to_ids("<|vision_start|>"))
        logp = grpo.completion_logps(*train.completion_hidden(model, batch), completion_ids)  # (N, C)
        loss = -(logp * completion_mask).sum() / completion_mask.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)
    return loss.item()


def build_demo_model(folder, cfg):
    """The demo's base model: tiny, random, then warmed up (see `warm_up_format`). Reused if `folder` already holds one (a resumed
    demo starts from the same base)."""
    import json
    from pathlib import Path

    import data

    folder = Path(folder)
    done = folder / "demo_base.json"
    if not done.is_file():
        build_tiny_model(folder, data.synthetic_vocabulary(), seed=cfg.seed)
        # Warm-up rows come from a different seed than the training rows.
        examples = data.synthetic_dataset(256, cfg.seed + 1, tuple(cfg.synthetic_tasks), cfg.synthetic_image_size)
        loss = warm_up_format(folder, examples, seed=cfg.seed)
        done.write_text(json.dumps({"warmup_final_loss": loss}))
    return str(folder)
