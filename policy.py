"""The model side: loading (LoRA, QLoRA), generation, per-token log-probs, and the `Rollout`.

The `Rollout` holds the tensors of one generation batch and is the one place that knows the
batch and vision layout: how to cut it into micro-batches (each sequence keeps its images), trim
padding, and build the model's forward inputs. Shapes: see grpo.py.
"""

import contextlib
import dataclasses
import warnings
from typing import NamedTuple

import torch

import data
import grpo
from cli import UserError

# LoRA on the language model only (detail 13): a regex over module names, so a vision tower
# with the same projection names (Qwen2.5-VL's) is never touched.
LM_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# The model families, by the model_type of their config: both have the same module names
# (model.visual, model.language_model, lm_head) and forward inputs for images.
MODEL_CLASSES = {"qwen2_vl": "Qwen2VLForConditionalGeneration",
                 "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


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


# --- loading ------------------------------------------------------------------------------------

def load_processor(name, flag="--model"):
    from transformers import AutoProcessor

    data.check_source(name, flag)
    try:
        return AutoProcessor.from_pretrained(name)
    except OSError as e:
        raise UserError(f"{flag} {name!r}: cannot load its processor ({e}). Without hub access, "
                        "give a local folder (HF_HUB_OFFLINE=1 skips the retries), or run "
                        "the offline demo: python train.py --demo") from e


def model_family(name, flag="--model"):
    """The checkpoint's model_type, read from its config rather than guessed from its name (a
    fine-tune can be called anything): the key of the class to build in MODEL_CLASSES."""
    from transformers import AutoConfig

    data.check_source(name, flag)
    try:
        family = AutoConfig.from_pretrained(name).model_type
    except (OSError, ValueError) as e:  # ValueError: a config.json transformers cannot parse
        raise UserError(f"{flag} {name!r}: cannot load its config ({e}). Without hub access, "
                        "give a local folder (HF_HUB_OFFLINE=1 skips the retries), or run "
                        "the offline demo: python train.py --demo") from e
    if family not in MODEL_CLASSES:
        raise UserError(f"{flag} {name!r}: model_type {family!r} is not supported; "
                        f"supported: {', '.join(MODEL_CLASSES)}")
    return family


# How a family answers: Qwen2.5-VL in pixels of the image it sees, Qwen2-VL in 0-1000 (data.py);
# Qwen2.5-VL was released as Instruct models only, so `auto` gives it its chat template.
BOX_FRAMES = {"qwen2_vl": "norm1000", "qwen2_5_vl": "pixels"}
PROMPT_FORMATS = ("auto", "r1", "chat")


def model_view(name, prompt_format, min_pixels, max_pixels, flag="--model"):
    """How model `name` sees a row (data.View): the prompt template (r1: the paper's base-model
    prompt; chat: the checkpoint's chat template around the image and question) and box frame."""
    family = model_family(name, flag)
    template = data.PROMPT_TEMPLATE
    if prompt_format == "chat" or (prompt_format == "auto" and family == "qwen2_5_vl"):
        processor = load_processor(name, flag)
        if not getattr(processor, "chat_template", None):
            raise UserError(f"{flag} {name!r} has no chat template: use --prompt_format r1")
        marker = "\x00question\x00"  # rendered once, then filled per row like the r1 prompt
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": marker}]}]
        template = processor.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=False).replace(marker, "{question}")
    return data.View(min_pixels, max_pixels, template, BOX_FRAMES[family])


def load_base_model(name, device, load_in_4bit=False, flag="--model"):
    """The base model of its family (bf16 on GPU, fp32 on CPU; optionally 4-bit NF4) and its
    processor."""
    import transformers

    model_class = getattr(transformers, MODEL_CLASSES[model_family(name, flag)])
    processor = load_processor(name, flag)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    quantization = None
    if load_in_4bit:  # the vision tower and lm_head stay unquantised, named in full (REFERENCE 5)
        quantization = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=["model.visual", "lm_head"])
    try:
        model = model_class.from_pretrained(
            name, dtype=dtype, quantization_config=quantization, device_map={"": device})
    except OSError as e:
        raise UserError(f"{flag} {name!r}: cannot load it ({e})") from e
    if load_in_4bit and device.type == "cpu":
        # bitsandbytes 0.50 repacks 4-bit weights for AVX512-BF16 CPUs on the first no-grad
        # forward (our generate) and keeps them so; the repacked path then fails in the training
        # backward. Keep the training layout.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    return model, processor


@contextlib.contextmanager
def quiet_peft():
    """peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model:
    a FutureWarning on every run that the user can do nothing about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
        yield


def add_lora(model, r, alpha, dropout=0.0, train_vision=False, gradient_checkpointing=True):
    """A fresh LoRA adapter on the language model; with `train_vision`, a trainable copy of the
    vision tower that `disable_adapter()` swaps back (detail 5)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=LM_LORA_TARGETS,
                      modules_to_save=["visual"] if train_vision else None)
    with quiet_peft():
        model = get_peft_model(model, lora)
    if gradient_checkpointing:
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


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

    # transformers 5 folds M-RoPE's sections into cos/sin and then applies the plain rotation,
    # a module-level function: Liger's plain RoPE kernel replaces it for the whole process.
    for module in (modeling_qwen2_vl, modeling_qwen2_5_vl):
        module.apply_rotary_pos_emb = liger_rotary_pos_emb
    patched = 0
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):      # Qwen2VLRMSNorm, Qwen2_5_VLRMSNorm
            liger._patch_rms_norm_module(module)
        elif isinstance(module, torch.nn.LayerNorm):          # Qwen2-VL's vision tower
            liger._patch_layer_norm_module(module)
        elif hasattr(module, "gate_proj") and isinstance(getattr(module, "act_fn", None),
                                                          SiLUActivation):  # SwiGLU MLPs
            liger._patch_swiglu_module(module, LigerSwiGLUMLP)
        else:
            continue
        patched += 1
    return patched


# --- the batch ----------------------------------------------------------------------------------

def encode_prompts(processor, examples, group_size, device="cpu", pad_to_multiple_of=None):
    """Tokenize B prompts with their images, left-padded: the text repeated G times
    (prompt-major), each image's patches once. The G sequences of a prompt share its image
    tensors, so that the vision tower sees each image once (detail 12). Returns the prompt
    fields of a Rollout."""
    enc = processor(text=[ex["prompt"] for ex in examples], images=[ex["image"] for ex in examples],
                    padding=True, padding_side="left", pad_to_multiple_of=pad_to_multiple_of,
                    return_tensors="pt").to(device)
    vision_start = processor.tokenizer.convert_tokens_to_ids(VISION_TOKENS[2])
    grids = enc["image_grid_thw"]                                              # (images, 3)
    patches = torch.split(enc["pixel_values"], grids.prod(-1).tolist())      # images x (p_i, D)
    per_prompt = torch.split(torch.arange(len(grids)),
                             (enc["input_ids"] == vision_start).sum(1).tolist())  # B x (i,)
    slots = [i for images in per_prompt for _ in range(group_size) for i in images.tolist()]
    text = {k: enc[k].repeat_interleave(group_size, dim=0)                     # (N, P)
            for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    return {**text, "images": [patches[i] for i in slots], "image_grid_thw": grids[slots]}


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


def base_of(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def vision_trainable(model):
    return any(p.requires_grad for name, p in model.named_parameters() if ".visual." in name)


def image_features(model, images, image_grid_thw):
    """The vision tower's output for each image (tokens_i, H), computed once per DISTINCT image
    tensor: the G sequences of a prompt share theirs (detail 12)."""
    base = base_of(model)
    first = {}                               # id of an image tensor -> the first slot showing it
    for slot, image in enumerate(images):
        first.setdefault(id(image), slot)
    slots = list(first.values())
    features = base.model.get_image_features(torch.cat([images[s] for s in slots]),
                                             image_grid_thw[slots]).pooler_output
    found = {id(images[s]): f for s, f in zip(slots, features)}
    return [found[id(image)] for image in images]


def encoder_outputs(features):
    """Image features in the form the model's forward and generate take them instead of pixels
    (`mm_encoder_outputs`), so that they are not computed again."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return {"image": BaseModelOutputWithPooling(pooler_output=tuple(features))}


@dataclasses.dataclass
class Rollout:
    """The tensors of a generation batch of N sequences, prompt-major."""
    prompt_ids: torch.Tensor         # (N, P) left-padded
    prompt_mask: torch.Tensor        # (N, P)
    mm_token_type_ids: torch.Tensor  # (N, P) 1 at image tokens
    images: list                     # per image of each sequence, its patches (p_i, D), shared
    image_grid_thw: torch.Tensor     # (images, 3) one row per image of each sequence
    images_per_seq: torch.Tensor     # (N,)
    completion_ids: torch.Tensor     # (N, C)
    completion_mask: torch.Tensor    # (N, C) up to and including the first EOS
    image_features: list = None      # like `images`, the features (tokens_i, H) of a frozen tower
    advantages: torch.Tensor = None  # (N,)
    old_logp: torch.Tensor = None    # (N, C) the sampling policy's, when num_iterations > 1
    ref_logp: torch.Tensor = None    # (N, C) the reference's, when beta != 0

    @classmethod
    def from_encoding(cls, enc, completion_ids, completion_mask, vision_start_id):
        return cls(enc["input_ids"], enc["attention_mask"], enc["mm_token_type_ids"],
                   enc["images"], enc["image_grid_thw"],
                   (enc["input_ids"] == vision_start_id).sum(1), completion_ids, completion_mask)

    def __len__(self):
        return self.prompt_ids.shape[0]

    def select(self, start, end):
        """Sequences [start, end) with the images that belong to them (detail 12)."""
        first, last = int(self.images_per_seq[:start].sum()), int(self.images_per_seq[:end].sum())
        rows = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        rows = {k: v[start:end] if v is not None else None for k, v in rows.items()}
        rows.update(images=self.images[first:last], image_grid_thw=self.image_grid_thw[first:last],
                    image_features=self.image_features and self.image_features[first:last])
        return Rollout(**rows)

    def trimmed(self):
        """The same sequences without the columns that are padding in every row."""
        first = int(self.prompt_mask.any(0).int().argmax())  # left padding shared by all rows
        last = int(self.completion_mask.any(0).nonzero().max()) + 1

        def cut(x):
            return x[:, :last] if x is not None else None
        return dataclasses.replace(
            self, prompt_ids=self.prompt_ids[:, first:], prompt_mask=self.prompt_mask[:, first:],
            mm_token_type_ids=self.mm_token_type_ids[:, first:],
            completion_ids=cut(self.completion_ids), completion_mask=cut(self.completion_mask),
            old_logp=cut(self.old_logp), ref_logp=cut(self.ref_logp))

    def micro_batches(self, size):
        """(start, micro-batch) for consecutive slices of `size` sequences, padding trimmed."""
        for start in range(0, len(self), size):
            yield start, self.select(start, min(start + size, len(self))).trimmed()

    def model_inputs(self, features=None):
        """Forward kwargs for prompt + completion: the images as their `features` (one per image,
        see image_features), else as pixels, each sequence's own (the vision tower then runs once
        per sequence). transformers >= 5 needs mm_token_type_ids over the WHOLE sequence (zeros
        over the completion) to place the M-RoPE positions."""
        completion_types = torch.zeros_like(self.completion_ids)
        images = ({"mm_encoder_outputs": encoder_outputs(features)} if features is not None
                  else {"pixel_values": torch.cat(self.images)})
        return {"input_ids": torch.cat([self.prompt_ids, self.completion_ids], 1),       # (N, P+C)
                "attention_mask": torch.cat([self.prompt_mask, self.completion_mask], 1),
                "mm_token_type_ids": torch.cat([self.mm_token_type_ids, completion_types], 1),
                "image_grid_thw": self.image_grid_thw, **images}


# --- generation ---------------------------------------------------------------------------------

def generation_config(processor, *, max_new_tokens, greedy=False, temperature=1.0, top_k=50,
                      top_p=1.0, static_cache=False):
    """Every sampling field set here (detail 10): unset ones would come from the checkpoint's
    generation_config (the released VisualThinker checkpoint has top_k 1, which makes every
    completion of a group identical). Vision tokens are suppressed: a sampled <|image_pad|>
    would crash the next forward. With `static_cache`, transformers compiles the decode step
    on CUDA (a fixed-size KV cache keeps its shapes fixed)."""
    from transformers import GenerationConfig

    tokens = special_tokens(processor)
    sampling = (dict(do_sample=False) if greedy else
                dict(do_sample=True, temperature=temperature, top_k=top_k or None, top_p=top_p,
                     min_p=None, typical_p=1.0))
    return GenerationConfig(**sampling, repetition_penalty=1.0, no_repeat_ngram_size=0,
                            num_beams=1, max_new_tokens=max_new_tokens, min_new_tokens=0,
                            eos_token_id=tokens.eos, pad_token_id=tokens.pad,
                            suppress_tokens=list(tokens.vision), use_cache=True,  # (detail 10)
                            cache_implementation="static" if static_cache else None)


@torch.no_grad()
def generate(model, processor, examples, gen_config, group_size=1, max_prompt_length=None):
    """ONE batched generate for the G completions of each of the B prompts (detail 11), used by
    training and evaluation alike. Returns the Rollout and the completion texts."""
    tokens = special_tokens(processor)
    # A static cache is sized by the prompt length: padding it to a multiple of 64 tokens lets
    # the compiled decode step be reused across steps instead of recompiled for every length.
    static = gen_config.cache_implementation == "static"
    enc = encode_prompts(processor, examples, group_size, model.device, 64 if static else None)
    P, longest = enc["input_ids"].shape[1], int(enc["attention_mask"].sum(1).max())
    if max_prompt_length and longest > max_prompt_length:
        raise UserError(f"a prompt is {longest} tokens, over --max_prompt_length "
                        f"{max_prompt_length}; lower --max_pixels or raise --max_prompt_length")
    was_training = model.training
    model.eval()
    features = image_features(model, enc["images"], enc["image_grid_thw"])  # once per image
    out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                         mm_token_type_ids=enc["mm_token_type_ids"],
                         image_grid_thw=enc["image_grid_thw"],
                         mm_encoder_outputs=encoder_outputs(features),
                         generation_config=gen_config)                 # (N, P + C) (detail 11)
    model.train(was_training)
    completion_ids = out[:, P:]                                                # (N, C)
    mask = grpo.completion_mask(completion_ids, tokens.eos)                    # (N, C)
    texts = processor.batch_decode([ids[m.bool()] for ids, m in zip(completion_ids, mask)],
                                   skip_special_tokens=True)
    rollout = Rollout.from_encoding(enc, completion_ids, mask, tokens.vision_start)
    if not vision_trainable(model):  # the same features serve every pass of this step
        rollout.image_features = features
    return rollout, texts


# --- log-probs and the loss ---------------------------------------------------------------------

def completion_hidden(model, rollout):
    """Final hidden states at the positions that predict the completion tokens (n, C, H), and
    the output projection (V, H). `model` is a peft model or a plain Qwen2-VL."""
    base = base_of(model)
    features = rollout.image_features or image_features(model, rollout.images,
                                                        rollout.image_grid_thw)
    hidden = base.model(**rollout.model_inputs(features),
                        use_cache=False).last_hidden_state                     # (n, P+C, H)
    P, C = rollout.prompt_ids.shape[1], rollout.completion_ids.shape[1]
    return hidden[:, P - 1:P + C - 1], base.lm_head.weight


def token_logps(model, rollout, temperature=1.0, chunk_size=1024, with_stats=False):
    """Per-token log-probs of the completions (n, C), with gradients; only completion positions
    are projected to the vocabulary (detail 9). `with_stats`: and their entropy and token
    accuracy (see grpo.completion_logps)."""
    hidden, weight = completion_hidden(model, rollout)
    return grpo.completion_logps(hidden, weight, rollout.completion_ids, temperature, chunk_size,
                                 with_stats)


@torch.no_grad()
def rollout_logps(model, rollout, micro_batch_size, temperature=1.0, chunk_size=1024):
    """Per-token log-probs (N, C) of a whole rollout, without gradients, micro-batch by
    micro-batch (for the reference and the sampling policy)."""
    was_training = model.training
    model.eval()
    out = torch.zeros(rollout.completion_ids.shape, device=rollout.completion_ids.device)
    for start, mb in rollout.micro_batches(micro_batch_size):
        logp = token_logps(model, mb, temperature, chunk_size)                 # (n, C') C' <= C
        out[start:start + logp.shape[0], :logp.shape[1]] = logp
    model.train(was_training)
    return out


def liger_loss(model, mb, temperature, num_sequences, num_tokens, beta=0.0, eps_low=0.2,
               eps_high=0.2, loss_type="grpo", max_completion_length=None):
    """grpo.policy_loss through Liger's fused linear GRPO loss: projection, log-softmax and loss
    chunk by chunk. Liger normalises grpo, bnpo and dr_grpo by the micro-batch's sequences; the
    factor n / N makes them whole-batch normalisers, as in grpo.aggregate."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    loss_fn = LigerFusedLinearGRPOLoss(
        beta=beta, compiled=False, use_ref_model=beta != 0.0, chunk_size=1, epsilon_low=eps_low,
        epsilon_high=eps_high, loss_type=loss_type, max_completion_length=max_completion_length,
        temperature=temperature)
    hidden, weight = completion_hidden(model, mb)
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


def accumulate_gradients(model, rollout, micro_batch_size, temperature=1.0, chunk_size=1024,
                         use_liger=False, num_sequences=None, num_tokens=None, **loss_kwargs):
    """Forward and backward over the micro-batches of a generation batch. The loss normalisers
    are the whole batch's (detail 6), so the micro-batches' gradients add up to the batch's
    however it is cut: `num_sequences` and `num_tokens` (completion tokens) default to this
    rollout's; with several processes, the totals over all of them (detail 15). `loss_kwargs` go
    to grpo.policy_loss. Returns (loss, stats): this rollout's share of the batch's loss, and of
    the stats as token means over the batch (with the plain loss, the policy's `entropy` too),
    and the lowest / highest micro-batch clip ratios."""
    model.train()
    num_sequences = num_sequences or len(rollout)
    num_tokens = num_tokens or rollout.completion_mask.sum()
    loss_sum, stats_sum, low, high = 0.0, {}, [], []
    for _, mb in rollout.micro_batches(micro_batch_size):
        if use_liger:
            loss, stats = liger_loss(model, mb, temperature, num_sequences, num_tokens,
                                     **loss_kwargs)
        else:
            logp, entropy, _ = token_logps(model, mb, temperature, chunk_size, True)  # (n, C)
            loss, stats = grpo.policy_loss(logp, mb.old_logp, mb.ref_logp, mb.advantages,
                                           mb.completion_mask, num_sequences=num_sequences,
                                           num_tokens=num_tokens, **loss_kwargs)
            mask = mb.completion_mask
            stats["entropy"] = float((entropy * mask).sum() / mask.sum())
            low.append(stats["clip_ratio/low_mean"])
            high.append(stats["clip_ratio/high_mean"])
        loss.backward()
        loss_sum += loss.item()
        share = float(mb.completion_mask.sum() / num_tokens)
        for key, value in stats.items():
            stats_sum[key] = stats_sum.get(key, 0.0) + value * share
    if low:  # TRL takes these across processes; one process here: across micro-batches
        stats_sum.update({"clip_ratio/low_min": min(low), "clip_ratio/high_max": max(high)})
    return loss_sum, stats_sum


def accumulate_sft_gradients(model, rollout, micro_batch_size, chunk_size=1024, num_tokens=None):
    """Forward and backward of the completions' negative log-likelihood (--objective sft), a
    token mean over the whole batch (`num_tokens`, default this rollout's), so the micro-batches
    add up to it. Returns (loss, stats): the token accuracy (the reference library's SFT name)
    and entropy."""
    model.train()
    num_tokens = float(num_tokens or rollout.completion_mask.sum())
    loss_sum, hits, entropy = 0.0, 0.0, 0.0
    for _, mb in rollout.micro_batches(micro_batch_size):
        logp, token_entropy, top1 = token_logps(model, mb, 1.0, chunk_size, True)  # (n, C)
        mask = mb.completion_mask
        loss = -(logp * mask).sum() / num_tokens
        loss.backward()
        loss_sum += loss.item()
        hits += float((top1 * mask).sum())
        entropy += float((token_entropy * mask).sum())
    return loss_sum, {"mean_token_accuracy": hits / num_tokens, "entropy": entropy / num_tokens}
