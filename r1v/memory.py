"""Will it fit? A training step's CUDA memory, estimated on any machine before any download.

The model is built from its config alone as fake tensors (shapes and dtypes, no storage:
r1v/fakes.py); then the project's own generation (vision tower, chunked prefill), one decode
step on a full KV cache, the no-grad log-prob passes and two updates of two micro-batches each
(AdamW's moments live) run on a worst-case batch, while torch's MemTracker counts the live
storages in CUDA's 512-byte blocks. Worst case: every image at --max_pixels, every completion
--max_completion_length long, prompts of PROMPT_TEXT_TOKENS text tokens around the image.
Data-dependent steps (micro-batch trimming, M-RoPE positions) run on the real inputs first.
"""

import math

import torch

from r1v import fakes, images, policy
from r1v import model as models

GiB = 2**30
PROMPT_TEXT_TOKENS = 110  # the paper's prompt and a SAT question, about (Qwen2-VL's tokenizer)
NOT_MODELLED_GIB = 1.5    # what a real run adds on top, typically (see NOT_MODELLED)
NOT_MODELLED = ("the CUDA context (0.3-0.5 GiB, outside torch's count), the caching allocator's "
                "fragmentation (reserved above allocated: 0.5-1.5 GiB), cuBLAS/Triton workspaces "
                "(tens of MiB), bitsandbytes' temporaries (QLoRA's weights count as NF4 storage), "
                "Liger's Triton kernels (they save less than the modules they replace: the "
                "estimate errs high), the compiled decode step's CUDA graph pool (its "
                "intermediate buffers: a decode step's activations, tens of MiB)")
KINDS = {"Parameter": "weights", "Buffer": "weights", "Gradient": "gradients",
         "Optstate": "optimizer", "Activation": "activations", "Temp": "backward temporaries",
         "Other": "batch"}


def worst_case_rollout(config, prompts, group_size, completion_tokens, min_pixels, max_pixels,
                       text_tokens=PROMPT_TEXT_TOKENS):
    """The real (CPU) Rollout of B prompts x G completions at the worst case: each prompt an
    image at --max_pixels and `text_tokens` of text, each completion its full length."""
    side = math.isqrt(max_pixels)
    patch = config.vision_config.patch_size  # 14 pixels; Qwen3-VL's 16
    width, height = images.fitted_size(side, side, min_pixels, max_pixels, 2 * patch)
    grid = [1, height // patch, width // patch]  # patches, merged 2x2 into visual tokens
    visual = grid[1] * grid[2] // 4
    ids = ([config.vision_start_token_id] + [config.image_token_id] * visual
           + [config.vision_end_token_id] + [1000] * text_tokens)  # 1000: a word, any
    N = prompts * group_size
    prompt_ids = torch.tensor([ids] * N)                                       # (N, P)
    patches = torch.zeros(grid[1] * grid[2], 3 * 2 * patch * patch)  # fp32, as the processor's
    pictures = [torch.zeros_like(patches) for _ in range(prompts)]
    return policy.Rollout(
        prompt_ids, torch.ones_like(prompt_ids), (prompt_ids == config.image_token_id).long(),
        [pictures[i // group_size] for i in range(N)], torch.tensor([grid] * N), torch.ones(N),
        torch.full((N, completion_tokens), 1000), torch.ones(N, completion_tokens, dtype=int))


def generation(model, fake, positions, prefill_chunk_size, bf16_adapter, cache_length=None,
               copies=None):
    """policy.generate's passes: the vision tower once per image, the prefill in chunks of
    prompt tokens into a KV cache, the last position's logits (generate's logits_to_keep).
    With `cache_length` the cache is the run's static one (r1v/decode.py), whole from the
    first token, as the adapter's cast `copies` are (kept by the caller); else it grows with the
    tokens."""
    from transformers import DynamicCache, StaticCache

    (N, P), text = fake.prompt_ids.shape, model.config.get_text_config()
    with policy.evaluating(model), policy.adapter_dtype(model, bf16_adapter, copies):
        policy.image_features(model, fake.images, fake.image_grid_thw)
        if cache_length:
            cache = StaticCache(config=text, max_cache_len=cache_length)
            cache.early_initialization(N, *models.base_of(model)._get_static_cache_init_shape(),
                                       bf16_adapter, "cpu")
        else:
            cache = DynamicCache(config=text)
        for start in range(0, P, prefill_chunk_size or P):
            end = min(P, start + (prefill_chunk_size or P))
            positions["now"] = fake.positions[:, :, start:end]
            model(input_ids=fake.prompt_ids[:, start:end], past_key_values=cache, use_cache=True,
                  mm_token_type_ids=fake.mm_token_type_ids[:, start:end], logits_to_keep=1,
                  image_grid_thw=fake.image_grid_thw if start == 0 else None,
                  mm_encoder_outputs=policy.encoder_outputs(fake.image_features)
                  if start == 0 else None)
    return cache


def decode_step(model, fake, positions, completion_tokens, bf16_adapter, cache=None,
                copies=None):
    """The last decode step: a token per sequence on the full KV cache (P + C - 1 tokens; the
    static `cache`, if given, already holds them all)."""
    from transformers import DynamicCache

    text = model.config.get_text_config()
    N, P = fake.prompt_ids.shape
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    static, cache = cache is not None, cache or DynamicCache(config=text)
    for layer in range(0 if static else text.num_hidden_layers):
        kv = [torch.empty(N, text.num_key_value_heads, P + completion_tokens - 1, head_dim,
                          dtype=torch.bfloat16) for _ in range(2)]
        cache.update(*kv, layer)
        del kv
    positions["now"] = fake.positions[:, :, -1:]
    with policy.evaluating(model), policy.adapter_dtype(model, bf16_adapter, copies):
        model(input_ids=fake.completion_ids[:, -1:], past_key_values=cache, use_cache=True,
              mm_token_type_ids=torch.zeros_like(fake.completion_ids[:, -1:]), logits_to_keep=1)


# The flags of train.py's Config a plan reads: the step's shape, the model's, the chunk sizes.
FLAGS = ("model", "prompts_per_step", "num_generations", "max_completion_length",
         "micro_batch_size", "min_pixels", "max_pixels", "lora_r", "lora_alpha", "load_in_4bit",
         "train_vision", "gradient_checkpointing", "logp_chunk_size", "prefill_chunk_size",
         "beta", "num_iterations", "static_cache", "compile_decode", "generation_batch_size")


def plan(loss_fn, *, model, prompts_per_step, num_generations, max_completion_length,
         micro_batch_size, min_pixels, max_pixels, lora_r, lora_alpha, load_in_4bit,
         train_vision, gradient_checkpointing, logp_chunk_size, prefill_chunk_size, beta,
         num_iterations, static_cache=False, compile_decode=False, generation_batch_size=0):
    """The estimated peak of each phase of a step (its bytes, their breakdown and largest live
    tensors, where it is reached) and the adapter's bytes, for the flags of a run (FLAGS).
    `loss_fn(model, micro_batch)` is the trainer's own micro-batch loss, (loss, stats)."""
    config = models.load_config(model)

    def rollout_of(prompts):
        return worst_case_rollout(config, prompts, num_generations, max_completion_length,
                                  min_pixels, max_pixels)
    rollout = rollout_of(prompts_per_step)
    micro = [mb for _, mb in rollout.micro_batches(micro_batch_size)][:2]  # the rest alike
    per_call = min(prompts_per_step, generation_batch_size // num_generations or prompts_per_step)
    call = rollout_of(per_call)  # one generate call's; the earlier calls' images stay with it
    earlier = rollout_of(prompts_per_step - per_call) if per_call < prompts_per_step else None
    with fakes.faking() as mode:
        fake_model = fakes.fake_policy(config, mode, lora_r=lora_r, lora_alpha=lora_alpha,
                                       load_in_4bit=load_in_4bit, train_vision=train_vision,
                                       gradient_checkpointing=gradient_checkpointing)
        params = [p for p in fake_model.parameters() if p.requires_grad]
        with mode, fakes.given_positions(fake_model, mode) as positions:
            phases, copies = run_step(
                fake_model, params, mode, positions, call, micro, loss_fn,
                max_completion_length, logp_chunk_size, prefill_chunk_size, reference=beta != 0,
                old_logps=num_iterations > 1, features=not train_vision,
                static_cache=static_cache or compile_decode, earlier=earlier)
    # the adapter: its fp32 weights and, kept with the static cache, their bf16 copy
    return phases, sum(math.ceil(p.numel() * p.element_size() / 512) * 512
                       for p in [*params, *copies.values()])


def run_step(model, params, mode, positions, rollout, micro, loss_fn, completion_tokens,
             logp_chunk_size, prefill_chunk_size, reference, old_logps, features,
             static_cache=False, earlier=None):
    """A step's phases on the fake model under one tracker, each phase's peak its own (the
    generation's on the last generate call's `rollout`, the `earlier` calls' images and
    features alive); and the adapter's bf16 copies that generation keeps with a static cache."""
    fake = fakes.faked(mode, rollout, model)
    earlier = fakes.faked(mode, earlier, model) if earlier else None
    batches = [fakes.faked(mode, mb, model, with_features=features) for mb in micro]
    for mb in batches:
        mb.advantages = torch.zeros(len(mb))
        mb.ref_logp = torch.zeros(mb.completion_ids.shape) if reference else None
        mb.old_logp = torch.zeros(mb.completion_ids.shape) if old_logps else None
    optimizer = torch.optim.AdamW(params, lr=1e-5, foreach=True)  # as on CUDA
    tracker, phases = fakes.Tracker(), {}
    tracker.track_external(model, optimizer, *fake.images, *fake.image_features,
                           *(earlier.images + earlier.image_features + [
                               t for t in vars(earlier).values() if isinstance(t, torch.Tensor)]
                             if earlier else []),
                           *[t for mb in batches for t in (mb.ref_logp, mb.old_logp)
                             if t is not None])
    bf16 = model.get_input_embeddings().weight.dtype
    with tracker:
        for p in params:  # AdamW's moments: live from the first update on
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tracker.start_phase()
        length = fake.prompt_ids.shape[1] + completion_tokens if static_cache else None
        copies = {} if static_cache else None  # r1v/decode.py keeps the adapter's cast too
        cache = generation(model, fake, positions, prefill_chunk_size, bf16, length, copies)
        cache = cache if length else None  # the run's static cache lives on; a growing one is
        phases["generation"] = tracker.start_phase()  # rebuilt whole by decode_step
        decode_step(model, fake, positions, completion_tokens, bf16, cache, copies)
        phases["decode"] = tracker.start_phase()
        for mb in batches if reference or old_logps else ():
            positions["now"] = mb.positions
            with policy.evaluating(model), model.disable_adapter():  # the reference's pass
                policy.token_logps(model, mb, 1.0, logp_chunk_size)
        phases["log-probs"] = tracker.start_phase()
        model.train()
        for _ in range(2):
            for mb in batches:
                positions["now"] = mb.positions
                loss_fn(model, mb)[0].backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        phases["update"] = tracker.start_phase()
    return phases, copies or {}


def gib(n):  # exact: bytes over a power of two
    return n / GiB


def kinds(parts):
    """A tracker's bytes by reference type, summed by what they are (KINDS)."""
    out = {}
    for reftype, n in parts.items():
        out[KINDS[reftype]] = out.get(KINDS[reftype], 0) + n
    return out


def report(planned, gpu_memory_gib=None, settings=None):
    """The plan of `planned(**changes)` (a run's `settings` with `changes`: the phases' peaks,
    the adapter's bytes) as memory_plan.json holds it, printed; if it does not fit, the
    estimates of the settings that would make it fit."""
    if gpu_memory_gib is None:
        gpu_memory_gib = (torch.cuda.get_device_properties(0).total_memory / GiB
                          if torch.cuda.is_available() else 16)
    phases, adapter = planned()
    top = max(phases, key=lambda p: phases[p]["total"])
    parts, steady = kinds(phases[top]["parts"]), kinds(phases["update"]["parts"])
    result = {"peak_gib": gib(phases[top]["total"]), "peak_phase": top,
              "phases": {p: gib(v["total"]) for p, v in phases.items()},
              "gpu_memory_gib": round(gpu_memory_gib, 2), "not_modelled_gib": NOT_MODELLED_GIB,
              "fits": phases[top]["total"] / GiB + NOT_MODELLED_GIB <= gpu_memory_gib,
              "fixed_gib": {"weights": gib(steady["weights"] - adapter), "adapter": gib(adapter),
                            "gradients": gib(steady.get("gradients", 0)),
                            "optimizer": gib(steady["optimizer"])},
              "at_peak_gib": {k: gib(v) for k, v in parts.items()},
              "largest_at_peak": [{"gib": gib(n), "kind": KINDS[kind]}
                                  for n, kind in phases[top]["largest"]],
              "peak_where": phases[top]["where"], "not_modelled": NOT_MODELLED}
    print(describe(result))
    if not result["fits"]:
        result["alternatives"] = alternatives(planned, gpu_memory_gib, result["peak_gib"],
                                              settings or {})
    return result


def alternatives(planned, gpu_memory_gib, now, settings):
    """Settings that may lower the run's peak `now` (GiB), each planned and printed with its
    saving: a smaller micro-batch, QLoRA, an eager decode step (no static cache kept), fewer
    sequences a generate call (a quarter of the groups: a quarter of the KV cache), smaller
    images, smaller vocabulary and prefill chunks; none that the run's `settings` already
    have."""
    group, prompts = settings.get("num_generations", 8), settings.get("prompts_per_step", 8)
    calls = group * max(1, prompts // 4)  # sequences a generate call: a quarter of the groups
    smaller = calls < min(group * prompts, settings.get("generation_batch_size") or calls + 1)
    options = [dict(micro_batch_size=2), dict(micro_batch_size=1), dict(load_in_4bit=True),
               dict(compile_decode=False),  # the static cache then goes after generation
               *([dict(generation_batch_size=calls)] if smaller else []),
               dict(logp_chunk_size=256, prefill_chunk_size=128), dict(max_pixels=200704),
               dict(load_in_4bit=True, micro_batch_size=2, logp_chunk_size=256)]
    found = []
    print("planning the settings that may lower it, each as long as the plan above:", flush=True)
    for changes in options:
        if all(settings.get(k) == v for k, v in changes.items()):
            continue  # the run's own: its plan is the one above
        phases, _ = planned(**changes)
        peak = max(v["total"] for v in phases.values()) / GiB
        found.append({"change": " ".join(f"--{k} {v}" if v is not True else f"--{k}"
                                         for k, v in changes.items()),
                      "peak_gib": peak, "fits": peak + NOT_MODELLED_GIB <= gpu_memory_gib})
        print(f"  with {found[-1]['change']}: {peak:.2f} GiB ({peak - now:+.2f})"
              f"{', fits' if found[-1]['fits'] else ''}")
    return found


def describe(result):
    """The plan in a few lines, for a person."""
    lines = [f"  {phase:<10} {peak:6.2f} GiB" + ("   <- the peak" if phase ==
                                                 result["peak_phase"] else "")
             for phase, peak in result["phases"].items()]
    fixed = ", ".join(f"{k} {v:.2f}" for k, v in result["fixed_gib"].items())
    at_peak = ", ".join(f"{k} {v:.2f}" for k, v in result["at_peak_gib"].items())
    largest = ", ".join(f"{t['gib']:.2f} ({t['kind']})" for t in result["largest_at_peak"])
    total = result["peak_gib"] + NOT_MODELLED_GIB
    return "\n".join(["estimated CUDA memory of a step, by phase:", *lines,
                      f"fixed (GiB): {fixed}", f"at the peak (GiB): {at_peak}",
                      f"largest tensors alive at the peak (GiB): {largest}",
                      f"where: {', '.join(result['peak_where'])}",
                      f"verdict: {result['peak_gib']:.2f} GiB + ~{NOT_MODELLED_GIB} GiB not "
                      f"modelled = {total:.1f} of {result['gpu_memory_gib']:.0f} GiB: "
                      + ("fits" if result["fits"] else "does not fit"),
                      f"not modelled: {NOT_MODELLED}"])


def plan_run(cfg, loss, model=None):
    """--plan_memory: the run of train.py's `cfg`, planned with the trainer's own micro-batch
    `loss(model, mb, cfg, num_sequences, num_tokens)` (on `model`'s config, if given, not
    --model's); memory_plan.json in its --output_dir."""
    import dataclasses
    import json

    from r1v import runs

    cfg = dataclasses.replace(cfg, use_liger=cfg.use_liger is not False,  # a CUDA run's
                              compile_decode=cfg.compile_decode is not False)  # defaults
    # What can fail at once does, before the minute-long plan: the config, the lengths, the folder.
    models.check_positions(models.load_config(model or cfg.model),
                           cfg.max_prompt_length + cfg.max_completion_length,
                           "--max_prompt_length + --max_completion_length")
    out = runs.writable_dir(cfg.output_dir, "--output_dir")
    print(f"planning a step of {cfg.model} as fake tensors (no weights): about a minute on a "
          "CPU for a 2B model, longer for larger ones", flush=True)

    def planned(**changes):
        run = dataclasses.replace(cfg, **changes)
        flags = {k: getattr(run, k) for k in FLAGS}
        return plan(lambda peft_model, mb: loss(peft_model, mb, run, len(mb), 1),
                    **{**flags, "model": model or run.model})
    result = report(planned, cfg.gpu_memory_gib, dataclasses.asdict(cfg))
    path = out / "memory_plan.json"
    runs.write_atomic(path, json.dumps({**result, "settings": dataclasses.asdict(cfg)}, indent=2))
    print(f"the plan is in {path}")
    return result
