"""The policy's side of a step: prompts encoded with their images, batched generation, and
per-token log-probs, on a Rollout (r1v/rollout.py). Shapes: see grpo.py."""

import contextlib

import torch
from torch.utils.checkpoint import checkpoint

from r1v.cli import UserError
from r1v.model import VISION_TOKENS, base_of, special_tokens
from r1v.rollout import Rollout, encoder_outputs  # noqa: F401 - policy.Rollout, as before


def encode_prompts(processor, examples, group_size, device="cpu"):
    """The prompt fields of a Rollout: B prompts left-padded, each repeated G times, each image's
    patches once, shared by its G sequences (detail 12)."""
    enc = processor(text=[ex["prompt"] for ex in examples], images=[ex["image"] for ex in examples],
                    padding=True, padding_side="left", return_tensors="pt")   # on the CPU
    vision_start = processor.tokenizer.convert_tokens_to_ids(VISION_TOKENS[2])
    grids = enc["image_grid_thw"]                                              # (images, 3)
    patches = torch.split(enc["pixel_values"].to(device),
                          grids.prod(-1).tolist())                             # images x (p_i, D)
    per_prompt = torch.split(torch.arange(len(grids)),
                             (enc["input_ids"] == vision_start).sum(1).tolist())  # B x (i,)
    slots = [i for images in per_prompt for _ in range(group_size) for i in images.tolist()]
    text = {k: enc[k].repeat_interleave(group_size, dim=0).to(device)          # (N, P)
            for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    return {**text, "images": [patches[i] for i in slots],
            "image_grid_thw": grids[slots].to(device)}


def answer_rollout(processor, examples, completions, device="cpu"):
    """A Rollout of the examples with the given completion texts, each ended by EOS: for
    supervised steps (--objective sft, the demo's format warm-up)."""
    tok, tokens = processor.tokenizer, special_tokens(processor)
    ids = [tok(t, add_special_tokens=False)["input_ids"] + [tokens.eos] for t in completions]
    width = max(map(len, ids))
    completion_ids = torch.tensor([x + [tokens.pad] * (width - len(x)) for x in ids])  # (N, C)
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])       # (N, C)
    return Rollout.from_encoding(encode_prompts(processor, examples, 1, device),
                                 completion_ids.to(device), mask.to(device), tokens.vision_start)


def vision_trainable(model):
    return any(p.requires_grad for name, p in model.named_parameters() if ".visual." in name)


def image_features(model, images, image_grid_thw):
    """The vision tower's output (1 + L, tokens_i, H) for each image, computed once per distinct
    image tensor (detail 12): the merged features, then Qwen3-VL's L DeepStack layers' (added to
    the first L language-model layers; L = 0 for Qwen2-VL and Qwen2.5-VL)."""
    base = base_of(model)
    first = {}                               # id of an image tensor -> the first slot showing it
    for slot, image in enumerate(images):
        first.setdefault(id(image), slot)
    slots = list(first.values())
    grids = image_grid_thw[torch.tensor(slots, device=image_grid_thw.device)]  # (images, 3)
    out = base.model.get_image_features(torch.cat([images[s] for s in slots]), grids)
    layers = [out.pooler_output, *(getattr(out, "deepstack_features", None) or [])]
    features = [torch.stack(per_layer) for per_layer in zip(*layers)]  # (1 + L, tokens_i, H)
    found = {id(images[s]): f for s, f in zip(slots, features)}
    return [found[id(image)] for image in images]


@contextlib.contextmanager
def evaluating(model):
    """Inside: eval mode (gradient checkpointing would turn the KV cache off), no gradients;
    then the mode the model had."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def adapter_dtype(model, dtype, copies=None):
    """Inside, the LoRA weights in `dtype` (None: as they are), for generation in the base's
    compute dtype: the adapter then runs on each layer's bf16 input, not an fp32 copy of it
    (1.3 GiB at one MLP projection at the paper's settings). After, the very fp32 tensors the
    optimizer updates are back: training's numerics are untouched. `copies` (a dict) keeps the
    cast weights between calls, at the same addresses: what a CUDA graph replays."""
    kept = [(p, p.data) for name, p in model.named_parameters()
            if "lora_" in name and dtype is not None and p.dtype != dtype]
    for p, data in kept:
        if copies is None:
            p.data = data.to(dtype)
            continue
        if p not in copies:
            copies[p] = torch.empty_like(data, dtype=dtype)
        p.data = copies[p].copy_(data)
    try:
        yield
    finally:
        for p, data in kept:
            p.data = data


def generation_config(processor, eos_ids=None, *, max_new_tokens, greedy=False,
                      temperature=1.0, top_k=50, top_p=1.0, prefill_chunk_size=256):
    """Every sampling field set, top_k 0 = off, vision tokens suppressed (detail 10); generation
    ends at any of `eos_ids` (default: the tokenizer's EOS). The prompts are prefilled
    `prefill_chunk_size` tokens at a time (0: at once): the prefill's activations scale with it.
    transformers never compiles here: r1v/decode.py compiles the decode step alone."""
    from transformers import GenerationConfig

    tokens = special_tokens(processor)
    sampling = (dict(do_sample=False) if greedy else
                dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p,
                     typical_p=1.0))
    return GenerationConfig(**sampling, repetition_penalty=1.0, no_repeat_ngram_size=0,
                            num_beams=1, max_new_tokens=max_new_tokens, min_new_tokens=0,
                            eos_token_id=list(eos_ids or [tokens.eos]), pad_token_id=tokens.pad,
                            suppress_tokens=list(tokens.vision), use_cache=True,  # (detail 10)
                            prefill_chunk_size=prefill_chunk_size or None, disable_compile=True)


def generate(model, processor, examples, gen_config, group_size=1, max_prompt_length=None,
             decoder=None):
    """ONE batched generate for the G completions of each of the B prompts (detail 11), for
    training and evaluation; with a `decoder` (r1v/decode.py), on its static KV cache and
    compiled decode step. Returns the Rollout (its completion_mask is the caller's to make,
    grpo.completion_mask) and the completion texts."""
    enc = encode_prompts(processor, examples, group_size, model.device)
    P, longest = enc["input_ids"].shape[1], int(enc["attention_mask"].sum(1).max())
    if max_prompt_length and longest > max_prompt_length:
        raise UserError(f"a prompt is {longest} tokens, over --max_prompt_length "
                        f"{max_prompt_length}; lower --max_pixels or raise --max_prompt_length")
    cache = decoder and {"past_key_values": decoder.cache_for(
        len(enc["input_ids"]), P, gen_config.max_new_tokens)}
    with evaluating(model), adapter_dtype(model, model.get_input_embeddings().weight.dtype,
                                          decoder and decoder.adapter_copies):
        features = image_features(model, enc["images"], enc["image_grid_thw"])  # once per image
        out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                             mm_token_type_ids=enc["mm_token_type_ids"],
                             image_grid_thw=enc["image_grid_thw"],
                             mm_encoder_outputs=encoder_outputs(features),
                             generation_config=gen_config, **(cache or {}))  # (N, P + C)
    completion_ids = out[:, P:]                                                # (N, C)
    # After its EOS a sequence holds only padding: special tokens, which decoding skips.
    texts = processor.batch_decode(completion_ids, skip_special_tokens=True)
    rollout = Rollout.from_encoding(enc, completion_ids, None, special_tokens(processor)
                                    .vision_start)
    if not vision_trainable(model):  # the same features serve every pass of this step
        rollout.image_features = features
    return rollout, texts


def generate_in_calls(model, processor, examples, gen_config, group_size, batch_size=0,
                      max_prompt_length=None, decoder=None):
    """`generate` in calls of at most `batch_size` sequences (0: one call), each group whole in
    one call: the KV cache then holds `batch_size` sequences, not all N. With a `decoder` a
    short call (the last; a preview's short batch) is filled up with copies of its last prompt,
    dropped: every call has the cache's shape. The Rollout and texts are as one call's (greedy:
    the same tokens)."""
    per_call = min(batch_size // group_size or len(examples), len(examples))  # prompts
    if decoder:  # its cache's prompts (sized by the run's calls), not fewer: no new cache
        per_call = max(per_call, decoder.batch_size // group_size)
    parts, texts = [], []
    for start in range(0, len(examples), per_call):
        batch = examples[start:start + per_call]
        filled = batch + batch[-1:] * (per_call - len(batch)) if decoder else batch
        rollout, out = generate(model, processor, filled, gen_config, group_size,
                                max_prompt_length, decoder)
        kept = len(batch) * group_size
        parts.append(rollout.select(0, kept) if kept < len(rollout) else rollout)
        texts += out[:kept]
    if len(parts) == 1:
        return parts[0], texts
    return Rollout.concat(parts, special_tokens(processor).pad), texts


def completion_hidden(model, rollout):
    """Final hidden states at the positions that predict the completion tokens (n, C, H), and
    the output projection (V, H). `model` is a peft model or a plain Qwen-VL."""
    base = base_of(model)
    features = rollout.image_features or image_features(model, rollout.images,
                                                        rollout.image_grid_thw)
    hidden = base.model(**rollout.model_inputs(features),
                        use_cache=False).last_hidden_state                     # (n, P+C, H)
    P, C = rollout.prompt_ids.shape[1], rollout.completion_ids.shape[1]
    return hidden[:, P - 1:P + C - 1], base.lm_head.weight


def _token_logps(hidden, weight, ids, temperature, with_stats):
    logits = (hidden @ weight.T).float() / temperature                # (n, V) (detail 8)
    logps = logits.log_softmax(-1)                                      # (n, V)
    logp = torch.gather(logps, 1, ids.unsqueeze(1)).squeeze(1)          # (n,)
    if not with_stats:
        return logp
    entropy = -(logps.exp() * logps).sum(-1).detach()                   # (n,) metrics only
    return logp, entropy, (logps.argmax(-1) == ids).float()             # (n,) each


def completion_logps(hidden, weight, completion_ids, temperature=1.0, chunk_size=1024,
                     with_stats=False):
    """log pi(c_t | prompt, c_<t) at the sampling temperature (detail 8), (N, C), from the final
    hidden states (N, C, H) at the positions that PREDICT the completion tokens and the output
    projection `weight` (V, H), `chunk_size` tokens at a time under activation checkpointing: at
    most a (chunk_size, V) block of logits exists, forward and backward (detail 9).
    `with_stats`: also, from the same chunks, without gradient, each token's entropy
    -sum_v p_v log p_v and whether it is the most likely one: (logp, entropy, top1)."""
    N, C, H = hidden.shape
    flat_hidden, flat_ids = hidden.reshape(N * C, H), completion_ids.reshape(N * C)  # (N*C, H)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    chunks = []
    for start in range(0, N * C, chunk_size):
        args = (flat_hidden[start:start + chunk_size], weight,
                flat_ids[start:start + chunk_size], temperature, with_stats)
        chunks.append(checkpoint(_token_logps, *args, use_reentrant=False) if needs_grad
                      else _token_logps(*args))                                # (detail 9)
    if not with_stats:
        return torch.cat(chunks).view(N, C)                                    # (N, C)
    return tuple(torch.cat(parts).view(N, C) for parts in zip(*chunks))       # (N, C) each


def token_logps(model, rollout, temperature=1.0, chunk_size=1024, with_stats=False):
    """Per-token log-probs of the completions (n, C), with gradients (see completion_logps)."""
    hidden, weight = completion_hidden(model, rollout)
    return completion_logps(hidden, weight, rollout.completion_ids, temperature, chunk_size,
                            with_stats)


def rollout_logps(model, rollout, micro_batch_size, temperature=1.0, chunk_size=1024):
    """Per-token log-probs (N, C) of a whole rollout, without gradients, by micro-batches."""
    out = torch.zeros(rollout.completion_ids.shape, device=rollout.completion_ids.device)
    with evaluating(model):
        for start, mb in rollout.micro_batches(micro_batch_size):
            logp = token_logps(model, mb, temperature, chunk_size)             # (n, C') C' <= C
            out[start:start + logp.shape[0], :logp.shape[1]] = logp
    return out


def sft_loss(model, mb, num_tokens, chunk_size=1024):
    """The completions' negative log-likelihood as this micro-batch's share of a token mean over
    `num_tokens` (--objective sft, the demo's warm-up), and its token means of the token accuracy
    (the reference library's SFT name) and entropy."""
    logp, entropy, top1 = token_logps(model, mb, 1.0, chunk_size, True)        # (n, C)
    mask = mb.completion_mask
    return -(logp * mask).sum() / num_tokens, {
        "mean_token_accuracy": float((top1 * mask).sum() / mask.sum()),
        "entropy": float((entropy * mask).sum() / mask.sum())}
