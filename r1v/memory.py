"""Will it fit? A training step's CUDA memory, estimated on any machine before any download.

The model is built from its config alone on the meta device, and its tensors become fake ones
(torch's FakeTensorMode: shapes and dtypes, no storage); then the project's own generation
(vision tower, chunked prefill), one decode step on a full KV cache, the no-grad log-prob passes
and two updates of two micro-batches each (AdamW's moments live) run on a worst-case batch,
while torch's MemTracker counts the live storages, each rounded up to the CUDA caching
allocator's 512-byte blocks. Worst case: every image at --max_pixels, every completion
--max_completion_length long, prompts of PROMPT_TEXT_TOKENS text tokens around the image.
Data-dependent steps (micro-batch trimming, M-RoPE positions) run on the real inputs first.
"""

import contextlib
import dataclasses
import math
import os

import torch
from torch._subclasses import fake_tensor
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.distributed._tools import mem_tracker

from r1v import model as models
from r1v import policy, rows

GiB = 2**30
PROMPT_TEXT_TOKENS = 110  # the paper's prompt and a SAT question, about (Qwen2-VL's tokenizer)
NOT_MODELLED_GIB = 1.5    # what a real run adds on top, typically (see NOT_MODELLED)
NOT_MODELLED = ("the CUDA context (0.3-0.5 GiB, outside torch's count), the caching allocator's "
                "fragmentation (reserved above allocated: 0.5-1.5 GiB), cuBLAS/Triton workspaces "
                "(tens of MiB), bitsandbytes' temporaries (QLoRA's weights count as NF4 storage), "
                "Liger's Triton kernels (they save less than the modules they replace: the "
                "estimate errs high)")
KINDS = {"Parameter": "weights", "Buffer": "weights", "Gradient": "gradients",
         "Optstate": "optimizer", "Activation": "activations", "Temp": "backward temporaries",
         "Other": "batch"}


class Tracker(mem_tracker.MemTracker):
    """MemTracker with the peak of each phase, its breakdown and largest live tensors; gradient
    hooks on trainable parameters only (register_hook fails on frozen ones)."""

    peak = {"total": 0}

    def start_phase(self):
        self.peak = {"total": 0}

    def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
        out = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
        for param in module.parameters() if install_grad_hooks else ():
            if param.requires_grad and self._param_to_grad_hook_handles.get(param) is None:
                def grad_hook(grad):
                    self._update_and_maybe_create_winfos(grad, mem_tracker._MemRefType.GRAD)
                self._param_to_grad_hook_handles[param] = (
                    param.register_hook(grad_hook),
                    param.register_post_accumulate_grad_hook(lambda p: grad_hook(p.grad)))
        return out

    def _pre_fw_hook(self, module, inputs):
        root = set(self._mod_tracker.parents) - {self._mod_tracker.get_known_fqn(module)}
        if not self._mod_tracker.is_bw and root == {"Global"}:
            self.reset_mod_stats()  # the model called again: a prefill chunk, a micro-batch
        super()._pre_fw_hook(module, inputs)

    def _pre_bw_hook(self, module, args):  # per-module stats are not used: a module whose
        if module in self.memory_tracking:  # forward ran before a reset needs none
            super()._pre_bw_hook(module, args)

    def _post_bw_hook(self, module, args):
        if module in self.memory_tracking:
            super()._post_bw_hook(module, args)

    def _update_peak_stats(self, peak_state):  # the whole tracker's only: per module is slow
        for snap in self._curr_mem_snap.values():
            if snap[mem_tracker._TOTAL_KEY] > self.peak["total"]:
                live = sorted((w.mem_consumed, w.reftype.value) for w, _ in self._WINFO.values())
                self.peak = {"total": snap[mem_tracker._TOTAL_KEY],
                             "parts": {k.value: v for k, v in snap.items()
                                       if k != mem_tracker._TOTAL_KEY and v},
                             "largest": live[-5:][::-1],
                             "where": sorted(self._mod_tracker.parents)[-1:]}


@contextlib.contextmanager
def faking():
    """Fake tensors on the CPU device (on a CUDA build without a GPU, a fake CUDA backward
    fails, and SDPA on fake CUDA tensors picks the math kernel; the CPU flash kernel saves what
    CUDA's does), with what they need to run the model's code; all undone after."""
    info, item = mem_tracker._WeakRefInfo._calculate_mem_consumed, FakeTensor.item
    to_float, to_bool = FakeTensor.__float__, FakeTensor.__bool__
    limit = fake_tensor.CONSTANT_NUMEL_LIMIT
    mem_tracker._WeakRefInfo._calculate_mem_consumed = (
        lambda self: math.ceil(self.size * self.element_size / 512) * 512)  # CUDA's blocks
    # A loss statistic's value: any number (1: AdamW's step); a constant's (the image grid's
    # and what the vision tower derives from it) its own, as with no fake tensors.
    FakeTensor.item = lambda self: 1.0 if self.constant is None else item(self)
    FakeTensor.__float__ = lambda self: float(self.item())
    FakeTensor.__bool__ = lambda self: bool(self.item())
    fake_tensor.CONSTANT_NUMEL_LIMIT = 4096
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)  # no swap of fake params
    check = os.environ.get("TRANSFORMERS_DISABLE_TORCH_CHECK")
    os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = "1"  # its checks read fake values
    try:
        yield FakeTensorMode(allow_non_fake_inputs=True)
    finally:
        mem_tracker._WeakRefInfo._calculate_mem_consumed, FakeTensor.item = info, item
        FakeTensor.__float__, FakeTensor.__bool__ = to_float, to_bool
        fake_tensor.CONSTANT_NUMEL_LIMIT = limit
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
        os.environ.pop("TRANSFORMERS_DISABLE_TORCH_CHECK") if check is None else None


class NF4Linear(torch.nn.Linear):
    """The memory of bitsandbytes' Linear4bit (NF4, double quantization, bf16 compute): the
    weight stored as 4 bits a value, an 8-bit absmax a block of 64 and an fp32 one a block of 256
    absmaxes; the forward and the backward each dequantize a transient bf16 weight."""

    def __init__(self, linear):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        n = linear.weight.numel()
        self.weight = torch.nn.Parameter(torch.empty(n // 2, dtype=torch.uint8, device="meta"),
                                         requires_grad=False)
        self.register_buffer("absmax", torch.empty(n // 64, dtype=torch.uint8, device="meta"))
        self.register_buffer("absmax2", torch.empty(max(1, n // 16384), device="meta"))
        self.bias = linear.bias

    def forward(self, x):
        return _Dequantized.apply(x, self)


class _Dequantized(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        w = torch.empty(layer.out_features, layer.in_features, dtype=x.dtype, device=x.device)
        return torch.nn.functional.linear(x, w, layer.bias)

    @staticmethod
    def backward(ctx, grad):
        layer = ctx.layer
        w = torch.empty(layer.out_features, layer.in_features, dtype=grad.dtype,
                        device=grad.device)
        return grad @ w, None


def fake_policy(config, mode, *, lora_r, lora_alpha, load_in_4bit, train_vision,
                gradient_checkpointing):
    """The model as load_policy makes it on CUDA (bf16, the fp32 LoRA adapter), built on the
    meta device, its parameters and buffers then fake ones (a tied one once)."""
    from transformers import AutoModelForImageTextToText

    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config)
    finally:
        torch.set_default_dtype(torch.float32)
    for layer in model.model.language_model.layers if load_in_4bit else ():
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear:
                    setattr(parent, name, NF4Linear(child))
    model = models.add_lora(model, lora_r, lora_alpha, 0.0, train_vision, gradient_checkpointing)
    fakes = {}
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is not None and id(t) not in fakes:
                    fake = mode.fake_tensor_converter.from_meta_and_device(mode, t.data, "cpu")
                    fakes[id(t)] = (torch.nn.Parameter(fake, t.requires_grad)
                                    if isinstance(t, torch.nn.Parameter) else fake)
                if t is not None:
                    store[name] = fakes[id(t)]
    return model


def worst_case_rollout(config, prompts, group_size, completion_tokens, min_pixels, max_pixels,
                       text_tokens=PROMPT_TEXT_TOKENS):
    """The real (CPU) Rollout of B prompts x G completions at the worst case: each prompt an
    image at --max_pixels and `text_tokens` of text, each completion its full length."""
    side = math.isqrt(max_pixels)
    width, height = rows.fitted_size(side, side, min_pixels, max_pixels)
    grid = [1, height // 14, width // 14]  # 14-pixel patches, merged 2x2 into visual tokens
    visual = grid[1] * grid[2] // 4
    ids = ([config.vision_start_token_id] + [config.image_token_id] * visual
           + [config.vision_end_token_id] + [1000] * text_tokens)  # 1000: a word, any
    N = prompts * group_size
    prompt_ids = torch.tensor([ids] * N)                                       # (N, P)
    patches = torch.zeros(grid[1] * grid[2], 3 * 2 * 14 * 14)  # fp32, as the processor's
    images = [torch.zeros_like(patches) for _ in range(prompts)]
    return policy.Rollout(
        prompt_ids, torch.ones_like(prompt_ids), (prompt_ids == config.image_token_id).long(),
        [images[i // group_size] for i in range(N)], torch.tensor([grid] * N), torch.ones(N),
        torch.full((N, completion_tokens), 1000), torch.ones(N, completion_tokens, dtype=int))


def faked(mode, rollout, model, with_features=True):
    """A real Rollout with fake tensors (shared ones once; the grid stays real, the vision tower
    reads its values), the M-RoPE positions computed on the real inputs, and the features a
    frozen vision tower would have left on it."""
    fakes, rows_ = {}, {}
    for f in dataclasses.fields(rollout):
        v = getattr(rollout, f.name)
        if isinstance(v, list):
            v = [fakes.setdefault(id(t), mode.from_tensor(t)) for t in v]
        elif isinstance(v, torch.Tensor):  # the grid a constant: its values are read
            v = mode.fake_tensor_converter.from_real_tensor(
                mode, v, make_constant=f.name == "image_grid_thw")
        rows_[f.name] = v
    fake = policy.Rollout(**rows_)
    with unset_fake_temporarily():  # on the real inputs
        tokens = {id(t): int(g.prod()) // 4 for t, g in zip(rollout.images, rollout.image_grid_thw)}
        inputs = rollout.model_inputs()
        positions = models.base_of(model).model.get_rope_index(
            inputs["input_ids"], image_grid_thw=inputs["image_grid_thw"],
            attention_mask=inputs["attention_mask"],
            mm_token_type_ids=inputs["mm_token_type_ids"])[0]                  # (3, N, P+C)
    fake.positions = mode.from_tensor(positions)
    hidden = model.config.get_text_config().hidden_size
    if with_features:
        shared = {key: torch.empty(n, hidden, dtype=torch.bfloat16) for key, n in tokens.items()}
        fake.image_features = [shared[id(t)] for t in rollout.images]
    return fake


@contextlib.contextmanager
def given_positions(model):
    """Inside, the model takes its M-RoPE positions from `positions["now"]` (computed on the
    real inputs) and runs without an attention mask (the worst-case batch has no padding)."""
    inner = models.base_of(model).model
    modeling = __import__(type(inner).__module__, fromlist=["create_causal_mask"])
    compute, mask = type(inner).compute_3d_position_ids, modeling.create_causal_mask
    positions = {}
    type(inner).compute_3d_position_ids = lambda self, **kwargs: positions["now"]
    modeling.create_causal_mask = lambda **kwargs: None
    try:
        yield positions
    finally:
        type(inner).compute_3d_position_ids, modeling.create_causal_mask = compute, mask


def generation(model, fake, positions, prefill_chunk_size, bf16_adapter):
    """policy.generate's passes: the vision tower once per image, the prefill in chunks of
    prompt tokens into a KV cache, the last position's logits."""
    from transformers import DynamicCache

    P = fake.prompt_ids.shape[1]
    with policy.evaluating(model), policy.adapter_dtype(model, bf16_adapter):
        policy.image_features(model, fake.images, fake.image_grid_thw)
        cache = DynamicCache(config=model.config.get_text_config())
        for start in range(0, P, prefill_chunk_size or P):
            end = min(P, start + (prefill_chunk_size or P))
            positions["now"] = fake.positions[:, :, start:end]
            model(input_ids=fake.prompt_ids[:, start:end], past_key_values=cache, use_cache=True,
                  mm_token_type_ids=fake.mm_token_type_ids[:, start:end], logits_to_keep=1,
                  image_grid_thw=fake.image_grid_thw if start == 0 else None,
                  mm_encoder_outputs=policy.encoder_outputs(fake.image_features)
                  if start == 0 else None)
    return cache


def decode_step(model, fake, positions, completion_tokens, bf16_adapter):
    """The last decode step: a token per sequence on the full KV cache (P + C - 1 tokens)."""
    from transformers import DynamicCache

    text = model.config.get_text_config()
    N, P = fake.prompt_ids.shape
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    cache = DynamicCache(config=text)
    for layer in range(text.num_hidden_layers):
        kv = [torch.empty(N, text.num_key_value_heads, P + completion_tokens - 1, head_dim,
                          dtype=torch.bfloat16) for _ in range(2)]
        cache.update(*kv, layer)
        del kv
    positions["now"] = fake.positions[:, :, -1:]
    with policy.evaluating(model), policy.adapter_dtype(model, bf16_adapter):
        model(input_ids=fake.completion_ids[:, -1:], past_key_values=cache, use_cache=True,
              mm_token_type_ids=torch.zeros_like(fake.completion_ids[:, -1:]), logits_to_keep=1)


def plan(name, loss_fn, *, prompts, group_size, completion_tokens, micro_batch_size,
         min_pixels, max_pixels, lora_r, lora_alpha, load_in_4bit=False, train_vision=False,
         gradient_checkpointing=True, logp_chunk_size=1024, prefill_chunk_size=256,
         reference=True, old_logps=False):
    """The estimated peak of each phase of a step (bytes) and at each: its breakdown, largest
    live tensors and where it is reached. `loss_fn(model, micro_batch)` is the trainer's own
    micro-batch loss, (loss, stats)."""
    config = models.load_config(name)
    rollout = worst_case_rollout(config, prompts, group_size, completion_tokens, min_pixels,
                                 max_pixels)
    micro = [mb for _, mb in rollout.micro_batches(micro_batch_size)][:2]  # the rest alike
    with faking() as mode:
        model = fake_policy(config, mode, lora_r=lora_r, lora_alpha=lora_alpha,
                            load_in_4bit=load_in_4bit, train_vision=train_vision,
                            gradient_checkpointing=gradient_checkpointing)
        params = [p for p in model.parameters() if p.requires_grad]
        bf16 = model.get_input_embeddings().weight.dtype
        with mode, given_positions(model) as positions:
            fake = faked(mode, rollout, model)
            batches = [faked(mode, mb, model, with_features=not train_vision) for mb in micro]
            for mb in batches:
                mb.advantages = torch.zeros(len(mb))
                mb.ref_logp = torch.zeros(mb.completion_ids.shape) if reference else None
                mb.old_logp = torch.zeros(mb.completion_ids.shape) if old_logps else None
            optimizer = torch.optim.AdamW(params, lr=1e-5, foreach=True)  # as on CUDA
            tracker, phases = Tracker(), {}
            tracker.track_external(model, optimizer, *fake.images, *fake.image_features,
                                   *[t for mb in batches for t in (mb.ref_logp, mb.old_logp)
                                     if t is not None])
            with tracker:
                for p in params:  # AdamW's moments: live from the first update on
                    p.grad = torch.zeros_like(p)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                for phase in ("generation", "decode", "log-probs", "update"):
                    tracker.start_phase()
                    if phase == "generation":
                        del_cache = generation(model, fake, positions, prefill_chunk_size, bf16)
                        del del_cache
                    elif phase == "decode":
                        decode_step(model, fake, positions, completion_tokens, bf16)
                    for update in range(2 if phase == "update" else 1 if phase == "log-probs"
                                        else 0):
                        model.train(phase == "update")
                        for mb in batches:
                            positions["now"] = mb.positions
                            if phase == "update":
                                loss_fn(model, mb)[0].backward()
                            else:
                                with torch.no_grad(), model.disable_adapter():
                                    policy.token_logps(model, mb, 1.0, logp_chunk_size)
                        if phase == "update":
                            torch.nn.utils.clip_grad_norm_(params, 1.0)
                            optimizer.step()
                            optimizer.zero_grad(set_to_none=True)
                    phases[phase] = tracker.peak
    adapter = sum(math.ceil(p.numel() * p.element_size() / 512) * 512 for p in params)
    return phases, adapter


def gib(n):  # exact: bytes over a power of two
    return n / GiB


def kinds(parts):
    """A tracker's bytes by reference type, summed by what they are (KINDS)."""
    out = {}
    for reftype, n in parts.items():
        out[KINDS[reftype]] = out.get(KINDS[reftype], 0) + n
    return out


def report(planned, gpu_memory_gib=None):
    """The plan of `planned(**changes)` (a run's settings with `changes`: the phases' peaks,
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
        result["alternatives"] = alternatives(planned, gpu_memory_gib)
    return result


def alternatives(planned, gpu_memory_gib):
    """Settings that lower the peak, each planned: a smaller micro-batch, QLoRA, smaller images,
    smaller vocabulary and prefill chunks, checkpointing."""
    options = [dict(micro_batch_size=2), dict(micro_batch_size=1), dict(load_in_4bit=True),
               dict(logp_chunk_size=256, prefill_chunk_size=128), dict(max_pixels=200704),
               dict(load_in_4bit=True, micro_batch_size=2, logp_chunk_size=256)]
    found = []
    for changes in options:
        phases, _ = planned(**changes)
        peak = max(v["total"] for v in phases.values()) / GiB
        found.append({"change": " ".join(f"--{k} {v}" if v is not True else f"--{k}"
                                         for k, v in changes.items()),
                      "peak_gib": peak, "fits": peak + NOT_MODELLED_GIB <= gpu_memory_gib})
        print(f"  with {found[-1]['change']}: {peak:.2f} GiB"
              f"{' (fits)' if found[-1]['fits'] else ''}")
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
