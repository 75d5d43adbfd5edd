"""Tiny random Qwen2-VL, Qwen2.5-VL and Qwen3-VL models with offline word-level tokenizers,
saved as ordinary model folders: the offline demo's, the tests', the benchmark's smoke test.

A tiny model has the real architecture (M-RoPE, the vision tower with its 2x2 patch merger, the
Qwen special tokens; Qwen3-VL's 16-pixel patches and DeepStack layers) and goes through exactly
the loading code a real checkpoint does. Its vocabulary is the words of the texts it is built
from.
"""

import re

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (AutoModelForImageTextToText, PreTrainedTokenizerFast, Qwen2_5_VLConfig,
                          Qwen2_5_VLProcessor, Qwen2VLConfig, Qwen2VLImageProcessor,
                          Qwen2VLProcessor, Qwen2VLVideoProcessor, Qwen3VLConfig,
                          Qwen3VLProcessor, Qwen3VLVideoProcessor)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
TAGS = ["<think>", "</think>", "<answer>", "</answer>"]


def build_tokenizer(texts, exact=False, eos_token="<|endoftext|>"):
    """A word-level tokenizer whose vocabulary is every word and punctuation run in `texts`.
    `exact`: every word, punctuation mark and whitespace run is a token and decoding joins them
    as they were, so a JSON answer decodes to valid JSON (plain word-level decoding puts a space
    between all tokens). `eos_token`: Qwen3-VL's Instruct tokenizers end on <|im_end|>."""
    pattern = r"\s+|\w+|[^\w\s]" if exact else r"\w+|[^\w\s]+"
    words = sorted({w for t in texts for w in re.findall(pattern, t)})
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + ["[UNK]"] + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    if exact:
        core.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
        core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]",
                                  eos_token=eos_token, pad_token="<|endoftext|>",
                                  padding_side="left")
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tok.add_tokens(TAGS)  # ordinary tokens: they survive decode(skip_special_tokens=True)
    return tok


def qwen2vl_config(tok, hidden, intermediate, layers, heads, kv_heads, mrope_section, vision,
                   rope_theta=10000.0, vocab_size=None, config_class=Qwen2VLConfig, tied=True):
    """A Qwen2-VL config around `tok`'s special tokens (or a dict of their ids); Qwen2.5-VL's
    (`config_class`) has the same fields, but in `vision`: depth, hidden_size (the tower's
    width), intermediate_size, num_heads, out_hidden_size (the language model's width),
    window_size (pixels), fullatt_block_indexes."""
    ids = tok if isinstance(tok, dict) else {t: tok.convert_tokens_to_ids(t)
                                             for t in SPECIAL_TOKENS}
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
        tie_word_embeddings=tied)


# The released architectures (REFERENCE 4; Qwen2.5-VL's from their config.json), with Qwen's
# token ids: configs without weights, for --plan_memory and the benchmark, offline.
QWEN_IDS = dict(zip(SPECIAL_TOKENS, (151643, 151644, 151645, 151652, 151653, 151655, 151656)))
VISION_2_5 = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                  window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
ARCHITECTURES = {  # config class, text (hidden, intermediate, layers, heads, KV heads), vision,
    "qwen2-vl-2b": (Qwen2VLConfig, (1536, 8960, 28, 12, 2), dict(  # vocabulary, tied embeddings
        depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4), 151936, True),
    "qwen2.5-vl-3b": (Qwen2_5_VLConfig, (2048, 11008, 36, 16, 2),
                      {**VISION_2_5, "out_hidden_size": 2048}, 151936, True),
    "qwen2.5-vl-7b": (Qwen2_5_VLConfig, (3584, 18944, 28, 28, 4),
                      {**VISION_2_5, "out_hidden_size": 3584}, 152064, False),
}


def qwen3vl_config(tok, hidden, intermediate, layers, heads, kv_heads, head_dim, mrope_section,
                   vision, rope_theta=5e6, vocab_size=None, tied=True):
    """A Qwen3-VL config around `tok`'s special tokens (or a dict of their ids): the text model
    has its own head_dim and interleaved M-RoPE; `vision`: depth, hidden_size, intermediate_size,
    num_heads, out_hidden_size (the language model's width), deepstack_visual_indexes (the ViT
    layers whose merged features are added to the first language-model layers),
    num_position_embeddings (a square grid of learned positions)."""
    ids = tok if isinstance(tok, dict) else {t: tok.convert_tokens_to_ids(t)
                                             for t in SPECIAL_TOKENS}
    return Qwen3VLConfig(
        text_config=dict(vocab_size=vocab_size or len(tok), hidden_size=hidden,
                         intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=head_dim, max_position_embeddings=262144,
                         rope_parameters=dict(rope_type="default", rope_theta=rope_theta,
                                              mrope_section=mrope_section,
                                              mrope_interleaved=True),
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                           hidden_act="gelu_pytorch_tanh", **vision),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tied)


# Qwen3-VL (Instruct and Thinking share an architecture): the 4B's numbers and the 8B's vision
# tower were checked against public copies of their config.json; the 2B's language model is
# Qwen3-1.7B's (its public config: 2048, 6144, 28 layers, 16 heads, 8 KV heads, tied) and the
# 8B's Qwen3-8B's; at these numbers the 8B has 8.77B parameters, its published count (the 2B
# 2.13B).
VISION_3_SMALL = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                      num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17])
VISION_3_8B = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                   num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24])
ARCHITECTURES_3 = {  # text (hidden, intermediate, layers, heads, KV heads), vision, tied
    "qwen3-vl-2b": ((2048, 6144, 28, 16, 8), {**VISION_3_SMALL, "out_hidden_size": 2048}, True),
    "qwen3-vl-4b": ((2560, 9728, 36, 32, 8), {**VISION_3_SMALL, "out_hidden_size": 2560}, True),
    "qwen3-vl-8b": ((4096, 12288, 36, 32, 8), {**VISION_3_8B, "out_hidden_size": 4096}, False),
}


def architecture(name, ids=QWEN_IDS):
    """The config of a released architecture (ARCHITECTURES, ARCHITECTURES_3), its token ids
    `ids`."""
    if name in ARCHITECTURES_3:
        text, vision, tied = ARCHITECTURES_3[name]
        return qwen3vl_config(ids, *text, 128, [24, 20, 20], vision, vocab_size=151936,
                              tied=tied)
    config_class, text, vision, vocab, tied = ARCHITECTURES[name]
    return qwen2vl_config(ids, *text, [16, 24, 24], vision, rope_theta=1e6, vocab_size=vocab,
                          config_class=config_class, tied=tied)


# Qwen2.5-VL and Qwen3-VL checkpoints are Instruct models: their prompts go through a chat
# template. The turns of Qwen's, without videos and picture numbering.
CHAT_TURNS = (
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAT_TEMPLATE = (  # Qwen2.5-VL's: a default system message
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}" + CHAT_TURNS)
CHAT_WORDS = "system You are a helpful assistant. user"  # in the vocabulary: no [UNK] in prompts
# Qwen3-VL Instruct's: no default system message (a Thinking checkpoint's also opens the
# assistant's turn with "<think>\n").
CHAT_TEMPLATE_3 = "{% for message in messages %}" + CHAT_TURNS


def save_processor(folder, tok, max_pixels, family="qwen2_vl", chat_template=None):
    """A Qwen2-VL or Qwen2.5-VL processor (14-pixel patches merged 2x2, the same image processor)
    or a Qwen3-VL one (16-pixel patches merged 2x2, pixels scaled to [-1, 1]) around `tok`,
    saved into `folder`."""
    if family == "qwen3_vl":
        factor = 32
        image_processor = Qwen2VLImageProcessor(
            min_pixels=factor * factor, max_pixels=max_pixels, patch_size=16,
            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
        processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tok,
                                     video_processor=Qwen3VLVideoProcessor())
    else:
        processor_class = {"qwen2_vl": Qwen2VLProcessor, "qwen2_5_vl": Qwen2_5_VLProcessor}[family]
        image_processor = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=max_pixels)
        processor = processor_class(image_processor=image_processor, tokenizer=tok,
                                    video_processor=Qwen2VLVideoProcessor())
    processor.chat_template = chat_template
    processor.save_pretrained(folder)


def build_tiny_model(folder, texts, hidden=64, layers=2, seed=0, family="qwen2_vl",
                     weights=True, exact=None):
    """Build and save a tiny random Qwen2-VL, its tokenizer and processor into `folder`; with
    family="qwen2_5_vl" or "qwen3_vl", a tiny Instruct model whose processor has a chat template
    (Qwen3-VL's tokenizer ends on <|im_end|>, as the released one); weights=False: its
    config.json and processor only; `exact`: build_tokenizer's (None: for an Instruct model)."""
    instruct = family in ("qwen2_5_vl", "qwen3_vl")
    exact = instruct if exact is None else exact
    tok = build_tokenizer(texts + [CHAT_WORDS] if instruct else texts, exact=exact,
                          eos_token="<|im_end|>" if family == "qwen3_vl" else "<|endoftext|>")
    half = hidden // 4 // 2  # M-RoPE splits half the head dim into (time, height, width)
    section = [half // 4, half * 3 // 8, half - half // 4 - half * 3 // 8]
    eos_ids = [tok.eos_token_id]
    if family == "qwen3_vl":
        # Two DeepStack layers (ViT blocks 0 and 1 into language-model layers 0 and 1): the
        # features computed once per image must carry both; one language-model layer more, as
        # an addition after the last layer reaches only the image's own positions. A 4x4 grid
        # of learned positions.
        config = qwen3vl_config(tok, hidden, 2 * hidden, layers + 1, 4, 2, hidden // 4,
                                [half // 2, half // 4, half // 4],
                                dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                     out_hidden_size=hidden, num_position_embeddings=16,
                                     deepstack_visual_indexes=[0, 1]))
        eos_ids = [tok.eos_token_id, tok.convert_tokens_to_ids("<|endoftext|>")]  # as released
    elif family == "qwen2_vl":
        config = qwen2vl_config(tok, hidden, 2 * hidden, layers, 4, 2, section,
                                dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=2,
                                     mlp_ratio=2))
    elif family == "qwen2_5_vl":
        # 56-pixel windows (2x2 merged tokens): a larger image spans several, so the windowed
        # block 0 and the full-attention block 1 both matter.
        config = qwen2vl_config(tok, hidden, 2 * hidden, layers, 4, 2, section,
                                dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                     out_hidden_size=hidden, window_size=56,
                                     fullatt_block_indexes=[1]), config_class=Qwen2_5_VLConfig)
    else:
        raise ValueError(f"family {family!r}: not one of qwen2_vl, qwen2_5_vl, qwen3_vl")
    if weights:
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config)
        model.generation_config.eos_token_id = eos_ids if len(eos_ids) > 1 else eos_ids[0]
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(folder)
    else:
        config.save_pretrained(folder)
    factor = 32 if family == "qwen3_vl" else 28
    template = {"qwen2_5_vl": CHAT_TEMPLATE, "qwen3_vl": CHAT_TEMPLATE_3}.get(family)
    save_processor(folder, tok, max_pixels=factor * factor * 64, family=family,
                   chat_template=template)
    return folder


if __name__ == "__main__":  # python -m r1v.tiny qwen2-vl-2b FOLDER: an architecture's config
    import sys

    names = [*ARCHITECTURES, *ARCHITECTURES_3]
    if len(sys.argv) != 3 or sys.argv[1] not in names:
        sys.exit(f"usage: python -m r1v.tiny {{{','.join(names)}}} FOLDER")
    architecture(sys.argv[1]).save_pretrained(sys.argv[2])
    print(f"wrote {sys.argv[2]}/config.json ({sys.argv[1]}; no weights, no processor)")
