"""R1-Zero GRPO for Qwen2-VL on one GPU, with LoRA or QLoRA.

    python train.py --demo --output_dir runs/demo          # tiny model, synthetic data, CPU, a few minutes
    python train.py --output_dir runs/sat                  # the paper's recipe (Qwen2-VL-2B base on SAT) with LoRA

Each step: sample B prompts -> generate G completions per prompt in ONE batched call -> score them with the
rule-based rewards and turn the rewards into group advantages -> update the LoRA weights on micro-batches
(num_iterations passes) -> log, and every few steps checkpoint. `train(cfg)` below reads in that order.
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import re
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data
import eval as evaluation
import grpo
import rewards


@dataclass
class Config:
    # what to train, on what
    model: str = field(default="Qwen/Qwen2-VL-2B", metadata={"help": "hub id or local folder of a Qwen2-VL model (the BASE model, as in the paper)"})
    dataset: str = field(default="array/SAT", metadata={"help": "'synthetic', a .jsonl file (image, question, choices, answer), or a hub id / local folder in SAT's schema"})
    dataset_split: str = field(default="train", metadata={"help": "split of a hub or folder dataset"})
    dataset_limit: int = field(default=15000, metadata={"help": "use the first N rows (the paper: 15000); for 'synthetic', how many to make; 0 = all"})
    synthetic_tasks: list = field(default_factory=lambda: list(data.SYNTHETIC_TASKS), metadata={"help": "question types of the synthetic dataset"})
    synthetic_image_size: int = field(default=112, metadata={"help": "side in pixels of synthetic images (28 pixels = one visual token)"})
    min_pixels: int = field(default=3136, metadata={"help": "images smaller than this many pixels are upscaled"})
    max_pixels: int = field(default=401408, metadata={"help": "images larger than this are downscaled (401408 = 512 visual tokens)"})
    output_dir: str = field(default="runs/r1zero", metadata={"help": "where metrics, samples, config and checkpoints go"})
    seed: int = field(default=42, metadata={"help": "seeds the data order, option shuffling, sampling and LoRA init"})
    demo: bool = field(default=False, metadata={"help": "offline demo: build a tiny Qwen2-VL and train it on synthetic data on CPU (flags you give still win)"})
    # GRPO
    num_generations: int = field(default=8, metadata={"help": "G, completions per prompt"})
    prompts_per_step: int = field(default=8, metadata={"help": "B, prompts per step (N = B*G completions)"})
    micro_batch_size: int = field(default=8, metadata={"help": "sequences per forward/backward pass; gradients accumulate over N / this"})
    max_steps: int = field(default=0, metadata={"help": "steps to train; 0 = num_train_epochs over the dataset"})
    num_train_epochs: float = field(default=2.0, metadata={"help": "epochs over the dataset when max_steps is 0"})
    num_iterations: int = field(default=1, metadata={"help": "mu, optimizer updates per generation batch (>1 reuses the stored sampling log-probs)"})
    beta: float = field(default=0.04, metadata={"help": "KL coefficient (k3 estimator, reference = the model with its adapter disabled); 0 = no reference pass"})
    epsilon_low: float = field(default=0.2, metadata={"help": "lower clip range of the ratio"})
    epsilon_high: float = field(default=0.2, metadata={"help": "upper clip range (DAPO's clip-higher uses 0.28)"})
    loss_type: str = field(default="grpo", metadata={"help": "aggregation over tokens: grpo | bnpo | dapo | dr_grpo"})
    scale_rewards: str = field(default="group", metadata={"help": "advantage scaling: group | batch | none (Dr. GRPO)"})
    reward_funcs: list = field(default_factory=lambda: ["format", "accuracy"], metadata={"help": "rewards by name, or path/to/file.py:function"})
    reward_weights: list = field(default=None, metadata={"help": "one weight per reward (default all 1.0)"})
    # sampling
    max_prompt_length: int = field(default=1024, metadata={"help": "longest prompt in tokens, image tokens included; a longer one is an error"})
    max_completion_length: int = field(default=700, metadata={"help": "most new tokens per completion"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (log-probs use the same)"})
    top_k: int = field(default=50, metadata={"help": "top-k sampling (0 = off)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling (1.0 = off)"})
    # optimisation
    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW peak learning rate (the paper's 1e-6 is for a full fine-tune)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    lr_scheduler: str = field(default="linear", metadata={"help": "after warmup: linear (decay to 0, the paper) | constant"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "fraction of updates with linear warmup from 0"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})
    lora_r: int = field(default=64, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=128, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (0 keeps the policy ratio exact across passes)"})
    train_vision: bool = field(default=False, metadata={"help": "also train the whole vision tower (a trainable copy that disable_adapter() swaps back for the reference); frozen otherwise"})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: language model in 4-bit NF4 (bitsandbytes); vision tower and lm_head stay unquantised"})
    use_liger: bool = field(default=False, metadata={"help": "compute the loss with Liger's fused linear GRPO loss (chunked, never builds the logits); stats then give only the combined clip ratio"})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "recompute activations in backward: less memory, ~30%% more time"})
    logp_chunk_size: int = field(default=1024, metadata={"help": "completion tokens per vocabulary-projection chunk when computing log-probs"})
    # evaluation during training
    eval_steps: int = field(default=0, metadata={"help": "every N steps, greedy accuracy on held-out prompts is logged as eval/accuracy (0 = never)"})
    eval_limit: int = field(default=64, metadata={"help": "held-out prompts per evaluation"})
    eval_dataset: str = field(default=None, metadata={"help": "held-out prompts: default SAT's 'val' split, or synthetic rows of another seed; a .jsonl for your own task"})
    # logging and checkpoints
    log_samples_steps: int = field(default=10, metadata={"help": "every N steps write a few prompt/completion/reward samples to samples.jsonl"})
    num_samples: int = field(default=4, metadata={"help": "samples written each time"})
    save_steps: int = field(default=100, metadata={"help": "checkpoint every N steps (0 = only at the end)"})
    save_total_limit: int = field(default=3, metadata={"help": "keep the newest K checkpoints (0 = all)"})
    resume: str = field(default=None, metadata={"help": "continue from a checkpoint: 'latest' (newest complete one in output_dir) or its path; a bare --resume means latest"})
    max_nonfinite_steps: int = field(default=5, metadata={"help": "stop after this many consecutive steps with a non-finite loss or gradient"})

    def __post_init__(self):
        if self.loss_type not in grpo.LOSS_TYPES:
            raise ValueError(f"--loss_type must be one of {grpo.LOSS_TYPES}, got {self.loss_type!r}")
        if self.lr_scheduler not in ("linear", "constant"):
            raise ValueError(f"--lr_scheduler must be linear or constant, got {self.lr_scheduler!r}")
        if self.scale_rewards not in grpo.SCALES:
            raise ValueError(f"--scale_rewards must be one of {grpo.SCALES}, got {self.scale_rewards!r}")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"--reward_weights has {len(self.reward_weights)} values for "
                             f"{len(self.reward_funcs)} --reward_funcs")
        for name in ("num_generations", "prompts_per_step", "micro_batch_size", "num_iterations",
                     "max_completion_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1")
        if self.num_generations < 2:
            raise ValueError("--num_generations must be at least 2: advantages compare completions of a prompt")


# Settings of the offline demo (see README "The demo"); flags given on the command line override them.
DEMO = dict(dataset="synthetic", synthetic_tasks=["background"], synthetic_image_size=56, dataset_limit=5000,
            num_generations=8, prompts_per_step=16, micro_batch_size=128, max_steps=200, max_completion_length=8,
            temperature=0.3, learning_rate=3e-3, lr_scheduler="constant", beta=0.04, lora_r=16, lora_alpha=32,
            train_vision=True, save_steps=100, gradient_checkpointing=False, log_samples_steps=50)


def config_parser(cls, description):
    """An argparse parser with one flag per field of the dataclass `cls`, its help from the field. Flags not
    given are left out of the namespace, so the dataclass defaults (or the demo's) apply."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kwargs = dict(help=f"{f.metadata['help']} (default: {default})", default=argparse.SUPPRESS)
        if f.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.type is list:
            kwargs["nargs"] = "+"
            kwargs["type"] = float if f.name == "reward_weights" else str
        elif f.name == "resume":
            kwargs.update(nargs="?", const="latest", type=str)
        else:
            kwargs["type"] = f.type if f.default is not None else str
        parser.add_argument(f"--{f.name}", **kwargs)
    return parser


def parse_config(argv=None):
    """The command line is the Config dataclass; --demo first applies the demo's settings, given flags win."""
    given = vars(config_parser(Config, __doc__).parse_args(argv))
    return Config(**{**(DEMO if given.get("demo") else {}), **given})


# --- model -----------------------------------------------------------------------------------------------------

LM_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def load_base_model(cfg, device):
    """The base model (bf16 on GPU, fp32 on CPU; optionally 4-bit NF4) and its processor."""
    from transformers import AutoProcessor, BitsAndBytesConfig, Qwen2VLForConditionalGeneration

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    quantization = None
    if cfg.load_in_4bit:
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=["model.visual", "lm_head"])
    try:
        processor = AutoProcessor.from_pretrained(cfg.model)
        model = Qwen2VLForConditionalGeneration.from_pretrained(cfg.model, dtype=dtype, quantization_config=quantization,
                                                                device_map={"": device})
    except OSError as e:
        raise SystemExit(f"--model {cfg.model!r}: cannot load it ({e}). Without hub access, give a local folder "
                         "or run the offline demo: python train.py --demo") from e
    if cfg.load_in_4bit and device.type == "cpu":
        # bitsandbytes 0.50 repacks 4-bit weights for AVX512-BF16 CPUs on the first no-grad eval forward (our
        # generate) and keeps them so; the repacked path then fails in the training backward. Keep the training layout.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    return model, processor


def load_model(cfg, device):
    """The base model with a fresh LoRA adapter on the language model (and the vision tower if asked)."""
    from peft import LoraConfig, get_peft_model

    model, processor = load_base_model(cfg, device)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=LM_LORA_TARGETS, modules_to_save=["visual"] if cfg.train_vision else None)
    model = get_peft_model(model, lora)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model, processor


def special_ids(processor):
    tok = processor.tokenizer
    vision = [tok.convert_tokens_to_ids(t) for t in
              ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")]
    return tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id, vision


# --- the phases of a step -------------------------------------------------------------------------------------

def generation_config(processor, max_new_tokens, greedy=False, temperature=1.0, top_k=50, top_p=1.0):
    """Every sampling field set here: unset ones would come from the checkpoint's generation_config (the released
    VisualThinker checkpoint has top_k 1, which makes every completion of a group identical). Vision tokens are
    suppressed: a sampled <|image_pad|> would crash the next forward."""
    from transformers import GenerationConfig

    eos, pad, vision_ids = special_ids(processor)
    sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_k=top_k or None,
                                                         top_p=top_p, min_p=None, typical_p=1.0)
    return GenerationConfig(**sampling, repetition_penalty=1.0, no_repeat_ngram_size=0, num_beams=1,
                            max_new_tokens=max_new_tokens, min_new_tokens=0, eos_token_id=eos, pad_token_id=pad,
                            suppress_tokens=vision_ids, use_cache=True)


@torch.no_grad()
def generate_rollouts(model, processor, examples, cfg, device):
    """ONE batched generate for all N = B*G completions. Returns the batch tensors and the completion texts."""
    eos, pad, vision_ids = special_ids(processor)
    enc = data.encode_prompts(processor, examples, cfg.num_generations).to(device)
    prompt_len = enc["input_ids"].shape[1]
    if prompt_len > cfg.max_prompt_length:
        raise ValueError(f"a prompt is {prompt_len} tokens, over --max_prompt_length {cfg.max_prompt_length}; "
                         "lower --max_pixels or raise --max_prompt_length")
    gen = generation_config(processor, cfg.max_completion_length, False, cfg.temperature, cfg.top_k, cfg.top_p)
    model.eval()
    out = model.generate(**enc, generation_config=gen)                             # (N, P + C)
    completion_ids = out[:, prompt_len:]                                            # (N, C)
    mask = grpo.completion_mask(completion_ids, eos)                                # (N, C)
    texts = processor.batch_decode([ids[m.bool()] for ids, m in zip(completion_ids, mask)], skip_special_tokens=True)
    return data.sequence_batch(enc, completion_ids, mask, vision_ids[2]), texts


def completion_hidden(model, batch):
    """Final hidden states at the positions that predict the completion tokens, and the output projection.
    `model` is a peft model or a plain Qwen2VLForConditionalGeneration."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.model(**data.model_inputs(batch), use_cache=False).last_hidden_state  # (n, P+C, H)
    P, C = batch["prompt_ids"].shape[1], batch["completion_ids"].shape[1]
    return hidden[:, P - 1:P + C - 1], base.lm_head.weight                         # (n, C, H), (V, H)


def sequence_logps(model, batch, cfg):
    """Per-token log-probs of the completions (n, C), projecting only the completion positions to the vocabulary."""
    hidden, weight = completion_hidden(model, batch)
    return grpo.completion_logps(hidden, weight, batch["completion_ids"], cfg.temperature, cfg.logp_chunk_size)


def liger_loss(model, mb, cfg, num_tokens):
    """The same loss through Liger's fused linear GRPO loss: projection, log-softmax and loss chunk by chunk."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    loss_fn = LigerFusedLinearGRPOLoss(beta=cfg.beta, compiled=False, use_ref_model=cfg.beta != 0.0, chunk_size=1,
                                       epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high,
                                       loss_type=cfg.loss_type, max_completion_length=cfg.max_completion_length,
                                       temperature=cfg.temperature)
    hidden, weight = completion_hidden(model, mb)
    loss, metrics = loss_fn(hidden, weight, mb["completion_ids"], mb["completion_mask"], mb["advantages"],
                            ref_per_token_logps=mb.get("ref_logp"), old_per_token_logps=mb.get("old_logp"),
                            num_items_in_batch=num_tokens)
    return loss, {"kl": metrics[0].item() if cfg.beta != 0.0 else 0.0, "clip_ratio/region_mean": metrics[-1].item()}


def micro_batches(batch, size):
    """Consecutive slices of `size` sequences with their vision inputs, the all-padding columns trimmed."""
    N = batch["prompt_ids"].shape[0]
    for start in range(0, N, size):
        mb = data.slice_sequences(batch, start, min(start + size, N))
        first = int(mb["prompt_mask"].any(0).int().argmax())  # left padding shared by every row
        last = int(mb["completion_mask"].any(0).nonzero().max()) + 1
        for key in ("prompt_ids", "prompt_mask", "mm_token_type_ids"):
            mb[key] = mb[key][:, first:]
        for key in ("completion_ids", "completion_mask", "old_logp", "ref_logp"):
            if key in mb:
                mb[key] = mb[key][:, :last]
        yield start, mb


@torch.no_grad()
def batch_logps(model, batch, cfg):
    """Log-probs (N, C) of the whole batch without gradients, micro-batch by micro-batch."""
    model.eval()
    out = torch.zeros(batch["completion_ids"].shape, device=batch["completion_ids"].device)  # (N, C)
    for start, mb in micro_batches(batch, cfg.micro_batch_size):
        logp = sequence_logps(model, mb, cfg)                                       # (n, C') C' <= C trimmed
        out[start:start + logp.shape[0], :logp.shape[1]] = logp
    return out


def update(model, optimizer, scheduler, batch, cfg):
    """num_iterations optimizer updates on one generation batch. Returns the averaged loss stats and grad norm;
    an update whose loss or gradient is not finite is skipped (counted in stats["nonfinite"])."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_micro = math.ceil(batch["prompt_ids"].shape[0] / cfg.micro_batch_size)
    num_tokens = batch["completion_mask"].sum()  # dapo normalises by the tokens of the whole generation batch
    totals, count, loss_sum, grad_norms, nonfinite = {}, 0, 0.0, [], 0
    for _ in range(cfg.num_iterations):
        loss_is_finite = True
        for _, mb in micro_batches(batch, cfg.micro_batch_size):
            if cfg.use_liger:
                loss, stats = liger_loss(model, mb, cfg, num_tokens)
            else:
                logp = sequence_logps(model, mb, cfg)                               # (n, C)
                loss, stats = grpo.policy_loss(
                    logp, mb.get("old_logp"), mb.get("ref_logp"), mb["advantages"], mb["completion_mask"],
                    beta=cfg.beta, eps_low=cfg.epsilon_low, eps_high=cfg.epsilon_high, loss_type=cfg.loss_type,
                    max_completion_length=cfg.max_completion_length, num_tokens=num_tokens)
            loss = loss if cfg.loss_type == "dapo" else loss / n_micro  # micro-batches add up to the batch loss
            loss_is_finite &= bool(torch.isfinite(loss))
            loss.backward()
            loss_sum += loss.item()
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value
            count += 1
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        if loss_is_finite and torch.isfinite(grad_norm):
            optimizer.step()
            scheduler.step()
            grad_norms.append(grad_norm.item())
        else:  # never let a NaN/inf reach the weights
            nonfinite += 1
        optimizer.zero_grad(set_to_none=True)
    stats = {key: value / count for key, value in totals.items()}
    stats["loss"] = loss_sum / cfg.num_iterations
    stats["grad_norm"] = float(np.mean(grad_norms)) if grad_norms else float("nan")
    stats["nonfinite"] = nonfinite
    return stats


def rollout_metrics(batch, texts, total, parts, errors, eos_id, cfg):
    """The reference library's metric names for what was generated and how it scored."""
    G = cfg.num_generations
    rewards_t = torch.tensor(total)                                                 # (N,)
    group_std = rewards_t.view(-1, G).std(1)                                        # (B,)
    lengths = batch["completion_mask"].sum(1).float()                               # (N,)
    eos_seen = (batch["completion_ids"] == eos_id).any(1)
    metrics = {"reward": rewards_t.mean().item(), "reward_std": group_std.mean().item(),
               "frac_reward_zero_std": (group_std < 1e-6).float().mean().item()}
    for name, values in parts.items():
        v = torch.tensor(values)
        metrics[f"rewards/{name}/mean"] = v.mean().item()
        metrics[f"rewards/{name}/std"] = v.std().item()
        metrics[f"rewards/{name}/errors"] = errors[name]
    metrics.update({"completions/mean_length": lengths.mean().item(),
                    "completions/max_length": lengths.max().item(),
                    "completions/min_length": lengths.min().item(),
                    "completions/clipped_ratio": (~eos_seen).float().mean().item(),
                    "completions/reflection_ratio": float(np.mean([rewards.is_reflective(t) for t in texts]))})
    return metrics


def held_out_examples(cfg):
    """Eval examples for eval/accuracy: `--eval_dataset`, else the training source's held-out rows."""
    if cfg.eval_dataset:
        source, split, seed = cfg.eval_dataset, "val", cfg.seed
    elif cfg.dataset == "synthetic":
        source, split, seed = "synthetic", None, cfg.seed + 1_000  # other rows: other seed
    elif not cfg.dataset.endswith(".jsonl"):
        source, split, seed = cfg.dataset, "val", cfg.seed
    else:
        raise ValueError("--eval_steps with a .jsonl --dataset needs --eval_dataset (a held-out .jsonl)")
    rows = data.load_examples(source, split, cfg.eval_limit, seed, cfg.min_pixels, cfg.max_pixels,
                              cfg.synthetic_tasks, cfg.synthetic_image_size)
    return [{**rows[i], "id": str(i), "task": "held-out", "source": source, "lettered": False,
             "gold": rows[i]["choices"].index(rows[i]["answer"])} for i in range(min(len(rows), cfg.eval_limit))]


# --- checkpoints --------------------------------------------------------------------------------------------------

def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir, step, model, optimizer, scheduler, sampler, counters, cfg):
    """checkpoint-<step>/: the LoRA adapter (loadable with peft), optimizer, scheduler, RNG and data state.
    Written into a temporary folder and renamed when complete: a crash mid-write leaves no complete-looking one."""
    final = Path(output_dir) / f"checkpoint-{step}"
    tmp = Path(output_dir) / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
                "sampler": sampler.state_dict(), "step": step, "counters": counters}, tmp / "trainer_state.pt")
    (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if cfg.save_total_limit > 0:
        for old in list_checkpoints(output_dir)[:-cfg.save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir):
    """Complete checkpoints, oldest first (temporary folders of interrupted writes are not listed)."""
    found = [p for p in Path(output_dir).glob("checkpoint-*")
             if re.fullmatch(r"checkpoint-\d+", p.name) and (p / "trainer_state.pt").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def load_checkpoint(path, model, optimizer, scheduler, sampler):
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(Path(path) / "adapter_model.safetensors"))
    state = torch.load(Path(path) / "trainer_state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    sampler.load_state_dict(state["sampler"])
    set_rng_state(state["rng"])
    return state["step"], state["counters"]


def truncate_jsonl(path, last_step):
    """Keep the lines of steps up to `last_step`, so a resumed run has no gap and no duplicate step (a line torn
    by a kill mid-write is dropped too)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    path.write_text("".join(line + "\n" for line in keep))


def lr_factor(update, warmup, total, kind):
    """Multiplier of the peak learning rate at optimizer update `update` (0-based)."""
    if update < warmup:
        return (update + 1) / warmup
    return 1.0 if kind == "constant" else max(0.0, (total - update) / (total - warmup))


@contextlib.contextmanager
def stop_on_sigint():
    """While inside, Ctrl-C (SIGINT) only sets a flag: the loop finishes its step, checkpoints and exits."""
    stop = {"requested": False}
    previous = signal.signal(signal.SIGINT, lambda *_: stop.update(requested=True))
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


# --- the loop ---------------------------------------------------------------------------------------------------------

def train(cfg):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise SystemExit(f"--output_dir {out} is not writable")
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    # Check everything that can be checked before a model is loaded: rewards, dataset rows, images.
    reward_funcs = dict(rewards.load_reward(spec) for spec in cfg.reward_funcs)
    weights = dict(zip(reward_funcs, cfg.reward_weights or [1.0] * len(reward_funcs)))
    if cfg.demo:
        import tiny
        cfg = dataclasses.replace(cfg, model=tiny.build_demo_model(out / "demo-base", cfg))
    dataset = data.load_examples(cfg.dataset, cfg.dataset_split, cfg.dataset_limit, cfg.seed, cfg.min_pixels,
                                 cfg.max_pixels, cfg.synthetic_tasks, cfg.synthetic_image_size)
    for i in range(min(len(dataset), 8)):
        dataset[i]
    held_out = held_out_examples(cfg) if cfg.eval_steps else []
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))

    model, processor = load_model(cfg, device)
    eos_id = special_ids(processor)[0]
    steps_per_epoch = len(dataset) // cfg.prompts_per_step
    max_steps = cfg.max_steps or max(1, int(cfg.num_train_epochs * steps_per_epoch))
    total_updates = max_steps * cfg.num_iterations
    warmup = int(cfg.warmup_ratio * total_updates)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: lr_factor(u, warmup, total_updates, cfg.lr_scheduler))
    sampler = data.PromptSampler(len(dataset), cfg.prompts_per_step, cfg.seed)

    start_step, counters = 0, {"nonfinite_steps": 0, "consecutive_nonfinite": 0}
    if cfg.resume:
        found = list_checkpoints(out) if cfg.resume == "latest" else [Path(cfg.resume)]
        if not found or not (found[-1] / "trainer_state.pt").is_file():
            raise SystemExit(f"--resume {cfg.resume}: no complete checkpoint in {out if cfg.resume == 'latest' else cfg.resume}")
        start_step, counters = load_checkpoint(found[-1], model, optimizer, scheduler, sampler)
        print(f"resumed from {found[-1]} at step {start_step}")
    for name in ("metrics.jsonl", "samples.jsonl"):
        truncate_jsonl(out / name, start_step)

    with stop_on_sigint() as stop:
        bar = tqdm(range(start_step + 1, max_steps + 1), initial=start_step, total=max_steps, desc="GRPO", dynamic_ncols=True)
        for step in bar:
            t0 = time.time()
            # 1. sample prompts
            examples = [dataset[i] for i in sampler.next_batch()]
            # 2. generate G completions per prompt, one batched call
            batch, texts = generate_rollouts(model, processor, examples, cfg, device)
            # 3. score them; advantages within each group
            group_examples = [ex for ex in examples for _ in range(cfg.num_generations)]
            total, parts, errors = rewards.score_completions(texts, group_examples, reward_funcs, weights)
            batch["advantages"] = grpo.group_advantages(torch.tensor(total, device=device), cfg.num_generations,
                                                        cfg.scale_rewards)              # (N,)
            if cfg.num_iterations > 1:
                batch["old_logp"] = batch_logps(model, batch, cfg)                      # (N, C) sampling policy
            if cfg.beta != 0.0:
                with model.disable_adapter():
                    batch["ref_logp"] = batch_logps(model, batch, cfg)                  # (N, C) initial model
            # 4. update
            learning_rate = scheduler.get_last_lr()[0]
            stats = update(model, optimizer, scheduler, batch, cfg)
            skipped = stats.pop("nonfinite")
            counters["nonfinite_steps"] += skipped
            counters["consecutive_nonfinite"] = counters["consecutive_nonfinite"] + 1 if skipped else 0
            # 5. log, checkpoint
            metrics = {"step": step, "epoch": round(step / max(1, steps_per_epoch), 4),
                       **rollout_metrics(batch, texts, total, parts, errors, eos_id, cfg), **stats,
                       "nonfinite_steps": counters["nonfinite_steps"], "learning_rate": learning_rate,
                       "step_time": time.time() - t0}
            if cfg.eval_steps and (step % cfg.eval_steps == 0 or step == max_steps):
                metrics["eval/accuracy"] = evaluation.accuracy_on(model, processor, held_out, cfg.micro_batch_size,
                                                                  cfg.max_completion_length)
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            if cfg.log_samples_steps and (step % cfg.log_samples_steps == 0 or step == 1):
                with open(out / "samples.jsonl", "a") as f:
                    for i in range(min(cfg.num_samples, len(texts))):
                        f.write(json.dumps({"step": step, "question": group_examples[i]["question"],
                                            "answer": group_examples[i]["answer"], "completion": texts[i],
                                            "rewards": {n: parts[n][i] for n in parts}}) + "\n")
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", step_time=f"{metrics['step_time']:.2f}s")
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
            if counters["consecutive_nonfinite"] >= cfg.max_nonfinite_steps:
                raise SystemExit(f"step {step}: {counters['consecutive_nonfinite']} consecutive steps had a non-finite loss "
                                 f"or gradient; stopping. The weights were never updated with them: the last checkpoint "
                                 f"in {out} is good. Try a lower --learning_rate.")
            if (cfg.save_steps and step % cfg.save_steps == 0) or step == max_steps or stop["requested"]:
                path = save_checkpoint(out, step, model, optimizer, scheduler, sampler, counters, cfg)
                if stop["requested"]:
                    tqdm.write(f"interrupted: saved {path}; continue with the same command plus --resume")
                    break
        bar.close()
    return out


def main(argv=None):
    cfg = parse_config(argv)
    try:
        train(cfg)
    except ValueError as e:  # bad input: say what and where, without a traceback
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
