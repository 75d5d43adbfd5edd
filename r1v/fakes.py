"""Fake tensors that count as CUDA's would, for the memory plan (r1v/memory.py): the model built
on the meta device with fake parameters, inputs faked from real ones, torch's MemTracker with the
peak of each phase; what the model's code needs to run on them, patched only inside `faking`.

Fake tensors sit on the CPU device: on a CUDA build without a GPU, a fake CUDA backward fails
and SDPA on fake CUDA tensors picks the math kernel; on CPU it picks the flash kernel, which saves
what CUDA's does. Storages are counted in CUDA's caching allocator's 512-byte blocks.
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
from r1v import policy


class Tracker(mem_tracker.MemTracker):
    """MemTracker with the peak of each phase, its breakdown and largest live tensors; gradient
    hooks on trainable parameters only (register_hook fails on frozen ones)."""

    peak = {"total": 0}

    def start_phase(self):
        """The peak since the last call (a phase's), and a new count from now."""
        peak, self.peak = self.peak, {"total": 0}
        return peak

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
    fake_tensor.CONSTANT_NUMEL_LIMIT = 1 << 16
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
        if check is None:
            del os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"]
        else:
            os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = check


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
            model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
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
    layers = 1 + len(getattr(model.config.vision_config, "deepstack_visual_indexes", ()))
    if with_features:  # as policy.image_features leaves them: (1 + L, tokens_i, H)
        shared = {key: torch.empty(layers, n, hidden, dtype=torch.bfloat16)
                  for key, n in tokens.items()}
        fake.image_features = [shared[id(t)] for t in rollout.images]
    return fake


def on_real_grid(function, mode):
    """`function` of the vision tower's helpers, run on the real image grid (a fake constant's
    value): they index by data-dependent masks, which fake tensors cannot. What it returns is
    made fake constants, whose values later steps read (window and sequence lengths); each a
    tensor of its own, not a view (a view's base would be made fake without its values)."""
    def run(grid, *args, **kwargs):
        with unset_fake_temporarily():
            out = function(grid.constant if isinstance(grid, FakeTensor) else grid, *args,
                           **kwargs)
            out = torch.utils._pytree.tree_map_only(
                torch.Tensor, lambda t: t.clone() if t._is_view() else t, out)
        return torch.utils._pytree.tree_map_only(
            torch.Tensor, lambda t: mode.fake_tensor_converter.from_real_tensor(
                mode, t, make_constant=True), out)
    return run


VISION_HELPERS = ("get_vision_position_ids", "get_vision_attention_seqlens",
                  "get_vision_window_index", "get_vision_interpolation_indices_and_weights")


def deepstack_added(self, hidden_states, visual_pos_masks, visual_embeds):
    """Qwen3-VL's DeepStack addition without its boolean indexing, whose output shape depends on
    the mask's values (fake tensors cannot run it): the same sum, through a temporary of the
    hidden states' size, as the clone the original makes."""
    mask = visual_pos_masks.to(hidden_states.device)[..., None]
    embeds = visual_embeds.to(hidden_states.device, hidden_states.dtype)
    return hidden_states + torch.zeros_like(hidden_states).masked_scatter(mask, embeds)


@contextlib.contextmanager
def given_positions(model, mode):
    """Inside, the model takes its M-RoPE positions from `positions["now"]` (computed on the
    real inputs), runs without an attention mask (the worst-case batch has no padding), and its
    vision tower's helpers run on the real grid."""
    inner = models.base_of(model).model
    modeling = __import__(type(inner).__module__, fromlist=["create_causal_mask"])
    kept = {name: getattr(modeling, name) for name in ("create_causal_mask", *VISION_HELPERS)
            if hasattr(modeling, name)}
    compute, positions = type(inner).compute_3d_position_ids, {}
    type(inner).compute_3d_position_ids = lambda self, **kwargs: positions["now"]
    modeling.create_causal_mask = lambda **kwargs: None
    for name in VISION_HELPERS:
        if name in kept:
            setattr(modeling, name, on_real_grid(kept[name], mode))
    text_model = type(inner.language_model)
    deepstack = getattr(text_model, "_deepstack_process", None)  # Qwen3-VL's
    if deepstack:
        text_model._deepstack_process = deepstack_added
    try:
        yield positions
    finally:
        type(inner).compute_3d_position_ids = compute
        if deepstack:
            text_model._deepstack_process = deepstack
        for name, function in kept.items():
            setattr(modeling, name, function)
