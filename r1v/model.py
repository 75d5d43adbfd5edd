"""Loading a model: its config and processor (one hub probe), its chat prompt, the base weights
(bf16 on GPU, fp32 on CPU, optionally 4-bit NF4), the LoRA adapter on its language model; and
Liger-Kernel's Triton kernels in it (CUDA only) and fused linear GRPO loss."""

import contextlib
import warnings
from typing import NamedTuple

import torch

from r1v import hub
from r1v.cli import UserError, user_error

# LoRA on the language model only (detail 13): a regex over module names, so a vision tower
# with the same projection names (Qwen2.5-VL's) is never touched.
LM_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# The families, by their config's model_type, and the frame each answers boxes in: Qwen2.5-VL
# in pixels of the image it sees, Qwen2-VL and Qwen3-VL in 0-1000 (REFERENCE 6, 9, 11). All
# have the same module names (model.visual, model.language_model, lm_head) and image inputs.
BOX_FRAMES = {"qwen2_vl": "norm1000", "qwen2_5_vl": "pixels", "qwen3_vl": "norm1000"}
# Released as Instruct (and Thinking) models only: prompted through their chat template.
CHAT_FAMILIES = ("qwen2_5_vl", "qwen3_vl")
PROMPT_FORMATS = ("auto", "r1", "chat")
VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
# Keys of a config.json that a run, a plan and an evaluation read: one missing would take
# transformers' default (another model's size) and fail later with a traceback, or not at all.
CONFIG_KEYS = ("vision_config", "image_token_id", "vision_start_token_id", "vision_end_token_id")
TEXT_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "vocab_size", "max_position_embeddings")
VISION_KEYS = ("depth", "num_heads")


def hub_hint():
    return (f". Without hub access, give a local folder ({hub.offline_hint()}), or run the "
            "offline demo: python train.py --demo")


class SpecialTokens(NamedTuple):
    eos: int
    pad: int
    vision: tuple  # ids of VISION_TOKENS: never sampled, and <|vision_start|> counts images

    @property
    def vision_start(self):
        return self.vision[2]


def special_tokens(processor):
    tok = processor.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return SpecialTokens(tok.eos_token_id, pad, tuple(tok.convert_tokens_to_ids(VISION_TOKENS)))


def load_config(name, flag="--model"):
    """The checkpoint's config; its family is read from it, not guessed from the name (a
    fine-tune can be called anything)."""
    from transformers import AutoConfig

    hub.check_source(name, flag)
    # ValueError: a config.json transformers cannot parse
    with user_error(f"{flag} {name!r}: cannot load its config", OSError, ValueError,
                    hint=hub_hint()):
        config = AutoConfig.from_pretrained(name)
    if config.model_type not in BOX_FRAMES:
        raise UserError(f"{flag} {name!r}: model_type {config.model_type!r} is not supported; "
                        f"supported: {', '.join(BOX_FRAMES)}")
    raw = config.get_config_dict(name)[0]  # the file's keys, before transformers' defaults
    text = {**raw, **raw.get("text_config", {})}  # older configs hold the text keys on top
    missing = [k for k in CONFIG_KEYS if k not in raw] + [
        k for k in TEXT_KEYS if k not in text] + [
        f"vision_config.{k}" for k in VISION_KEYS if "vision_config" in raw
        and k not in raw["vision_config"]]
    if missing:
        raise UserError(f"{flag} {name!r}: its config.json lacks {', '.join(missing)}; give "
                        "the folder of a whole Qwen2-VL, Qwen2.5-VL or Qwen3-VL checkpoint")
    return config


def patch_factor(config):
    """Pixels per side of one visual token: the patch, merged 2x2 (28 for Qwen2-VL and
    Qwen2.5-VL's 14-pixel patches, 32 for Qwen3-VL's 16-pixel ones)."""
    vision = config.vision_config
    return vision.patch_size * vision.spatial_merge_size


def parameter_shapes(config):
    """{name: shape} of the base model's parameters, built from its config on the meta device
    (no storage: a fraction of a second for a 2B model): what an adapter must fit."""
    import transformers

    with torch.device("meta"):
        base = transformers.AutoModelForImageTextToText.from_config(config)
    return {name: tuple(p.shape) for name, p in base.named_parameters()}


def model_class(config):
    """The class name AutoModelForImageTextToText loads for `config` (peft records an adapter's
    base class by this name)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(config.model_type)


def check_positions(config, tokens, what):
    """`tokens` (a prompt and completion's most) within the text model's positions: past them
    RoPE runs on positions never trained, and a step takes hours."""
    limit = config.get_text_config().max_position_embeddings
    if tokens > limit:
        raise UserError(f"{what} = {tokens} tokens, past the model's {limit} positions "
                        "(max_position_embeddings): lower it")


def eos_ids(name, processor):
    """Every token id that ends a completion: the tokenizer's EOS, and those the checkpoint's
    generation config lists (an Instruct model ends on <|im_end|> and <|endoftext|>)."""
    from transformers import GenerationConfig

    try:
        listed = GenerationConfig.from_pretrained(name).eos_token_id
    except OSError:  # the checkpoint has no generation_config.json
        listed = None
    listed = [] if listed is None else listed if isinstance(listed, list) else [listed]
    return sorted({processor.tokenizer.eos_token_id, *listed})


def load_processor(name, flag="--model"):
    from transformers import AutoProcessor

    with user_error(f"{flag} {name!r}: cannot load its processor", OSError, ValueError,
                    hint=hub_hint()):  # ValueError: a folder without the processor's files
        return AutoProcessor.from_pretrained(name)


def chat_prompt(processor):
    """The checkpoint's chat template around an image and `{question}` (filled per row)."""
    if not getattr(processor, "chat_template", None):
        raise UserError("--model has no chat template: use --prompt_format r1")
    marker = "\x00question\x00"  # rendered once, then filled per row like the r1 prompt
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": marker}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True,
                                         tokenize=False).replace(marker, "{question}")


def load_base_model(name, device, load_in_4bit=False, flag="--model"):
    """The base model of its family, bf16 on GPU, fp32 on CPU; `load_in_4bit`: the language
    model in 4-bit NF4 (QLoRA), the vision tower and lm_head unquantised (REFERENCE 5)."""
    import transformers

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    quantization = None
    if load_in_4bit:
        quantization = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=["model.visual", "lm_head"])
    with user_error(f"{flag} {name!r}: cannot load it", OSError):
        model = transformers.AutoModelForImageTextToText.from_pretrained(
            name, dtype=dtype, quantization_config=quantization, device_map={"": device})
    # Sampling is what generation_config (r1v/policy.py) says, nothing else: transformers fills
    # the fields left unset from the checkpoint's own (VisualThinker's has top_k 1, REFERENCE 5).
    model.generation_config = transformers.GenerationConfig()
    if load_in_4bit and device.type == "cpu":
        # bitsandbytes 0.50 repacks 4-bit weights for AVX512-BF16 CPUs on the first no-grad
        # forward (our generate) and keeps them so; the repacked path then fails in the training
        # backward. Keep the training layout.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    return model


@contextlib.contextmanager
def quiet_peft():
    """peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model:
    a FutureWarning on every run that the user can do nothing about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
        yield


def add_lora(model, r, alpha, dropout=0.0, train_vision=False, gradient_checkpointing=True):
    """A fresh LoRA adapter on the language model; with `train_vision`, a trainable copy of the
    vision tower that `disable_adapter()` swaps back (detail 5). What trains is fp32, on a bf16
    base too: AdamW's updates under 1/256 of a bf16 weight round away (the tower's patch
    embedding casts its input to its own dtype, and its features go in at the base's)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=LM_LORA_TARGETS,
                      modules_to_save=["visual"] if train_vision else None)
    with quiet_peft():
        model = get_peft_model(model, lora)  # the adapter in fp32 (autocast_adapter_dtype)
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:  # the tower's copy
            param.data = param.data.float()
    if gradient_checkpointing:
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def load_policy(name, device, *, lora_r, lora_alpha, lora_dropout=0.0, load_in_4bit=False,
                use_liger=False, train_vision=False, gradient_checkpointing=True):
    """The model a run trains: the base (Liger's kernels on CUDA) with a fresh LoRA adapter."""
    model = load_base_model(name, device, load_in_4bit)
    if use_liger and device.type == "cuda":  # Triton kernels: no CPU version
        apply_liger_kernels(model)
    return add_lora(model, lora_r, lora_alpha, lora_dropout, train_vision, gradient_checkpointing)


def base_of(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# --- Liger-Kernel ------------------------------------------------------------------------------

def apply_liger_kernels(model):
    """Liger's Triton kernels (CUDA only) in place of the RMSNorms, LayerNorms, SwiGLU MLPs and
    the rotary embedding, module by module: liger-kernel 0.8.5's one-call patch for Qwen2-VL
    fails on transformers 5.23 (REFERENCE 5). Each module keeps its weights and LoRA layers;
    only its forward changes. Returns the number of modules patched."""
    from liger_kernel.transformers import monkey_patch as liger
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP
    from transformers.activations import SiLUActivation
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl
    from transformers.models.qwen2_vl import modeling_qwen2_vl
    from transformers.models.qwen3_vl import modeling_qwen3_vl

    # transformers 5 folds M-RoPE's sections (Qwen3-VL's interleaved too) into cos/sin and then
    # applies the plain rotation, a module-level function: Liger's plain RoPE kernel replaces it
    # for the whole process (as liger-kernel's own Qwen3-VL patch does).
    for module in (modeling_qwen2_vl, modeling_qwen2_5_vl, modeling_qwen3_vl):
        module.apply_rotary_pos_emb = liger_rotary_pos_emb
    patched = 0
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):      # Qwen2VLRMSNorm, Qwen3VLTextRMSNorm
            liger._patch_rms_norm_module(module)  # each keeps its own epsilon
        elif isinstance(module, torch.nn.LayerNorm):          # Qwen2-VL's vision tower
            liger._patch_layer_norm_module(module)
        elif hasattr(module, "gate_proj") and isinstance(getattr(module, "act_fn", None),
                                                          SiLUActivation):  # SwiGLU MLPs
            liger._patch_swiglu_module(module, LigerSwiGLUMLP)
        else:
            continue
        patched += 1
    return patched


def liger_grpo_loss(hidden, weight, mb, temperature, num_sequences, num_tokens, beta=0.0,
                    eps_low=0.2, eps_high=0.2, loss_type="grpo", max_completion_length=None):
    """grpo.policy_loss through Liger's fused linear GRPO loss: projection, log-softmax and loss
    chunk by chunk, from the completion positions' `hidden` states (n, C, H) and the output
    projection `weight` (V, H). Liger normalises grpo, bnpo and dr_grpo by the micro-batch's
    sequences; the factor n / N makes them whole-batch normalisers, as in grpo.aggregate. Its
    metrics hold only the combined clip ratio: no low/high means, no per-sequence extremes."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    loss_fn = LigerFusedLinearGRPOLoss(
        beta=beta, compiled=False, use_ref_model=beta != 0.0, chunk_size=1, epsilon_low=eps_low,
        epsilon_high=eps_high, loss_type=loss_type, max_completion_length=max_completion_length,
        temperature=temperature)
    # Liger divides dapo's normaliser by the number of processes, for DDP's gradient mean; the
    # trainer sums the processes' gradients (detail 15), so the normaliser goes in times that.
    processes = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    loss, metrics = loss_fn(hidden, weight, mb.completion_ids, mb.completion_mask, mb.advantages,
                            ref_per_token_logps=mb.ref_logp, old_per_token_logps=mb.old_logp,
                            num_items_in_batch=num_tokens * processes)
    if loss_type != "dapo":
        loss = loss * len(mb) / num_sequences
    return loss, {"kl": metrics[0].item() if beta != 0.0 else 0.0,
                  "clip_ratio/region_mean": metrics[-1].item()}
