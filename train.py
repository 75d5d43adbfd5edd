"""R1-Zero GRPO for Qwen2-VL on one GPU, with LoRA or QLoRA.

    python train.py --demo --output_dir runs/demo   # tiny model, synthetic data, CPU, minutes
    python train.py --output_dir runs/sat           # the paper's recipe: Qwen2-VL-2B base on SAT
    torchrun --nproc_per_node 4 train.py ...        # 4 GPUs, the same run (README "More GPUs")

Each step: sample B prompts -> generate G completions per prompt in ONE batched call -> score
them with the rule-based rewards and turn the rewards into group advantages -> update the LoRA
weights on micro-batches (num_iterations passes) -> log, and every few steps checkpoint.
`train(cfg)` reads in that order. The numbers (detail N) point to the README's implementation
details.
"""

import contextlib
import dataclasses
import json
import random
import re
import shutil
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from peft import set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm import tqdm

import cli
import data
import demo
import eval as evaluation
import grpo
import policy
import rewards
from cli import UserError, flag


# The rewards of a run that names none: the format and the task's own (rewards.py).
TASK_REWARDS = {"choice": ["format", "accuracy"], "rec": ["format", "iou"],
                "ovd": ["format", "detection"]}


@dataclass
class Config:
    # what to train, on what
    model: str = flag("Qwen/Qwen2-VL-2B", "hub id or local folder of a Qwen2-VL or Qwen2.5-VL "
                      "model; 'demo' builds the tiny offline one")
    dataset: str = flag("array/SAT", "hub id or folder in SAT's or RefCOCO's schema, a .jsonl "
                        "(choice, rec or ovd rows: README), or 'synthetic'")
    dataset_split: str = flag("train", "split of a hub or folder dataset")
    dataset_limit: int = flag(15000, "first N rows (0 = all); synthetic: rows to make", min=0)
    synthetic_tasks: list[str] = flag(list(demo.CHOICE_TASKS), "synthetic question types: "
                                      f"{', '.join(demo.CHOICE_TASKS)} (multiple choice), "
                                      "locate (rec) or detect (ovd)")
    synthetic_image_size: int = flag(112, "side of synthetic images (28 pixels = 1 token)", min=1)
    min_pixels: int = flag(data.MIN_PIXELS, "smaller images are upscaled", min=1)
    max_pixels: int = flag(data.MAX_PIXELS, "larger images are downscaled (512 tokens)", min=1)
    prompt_format: str = flag("auto", "r1: the paper's base-model prompt; chat: the checkpoint's "
                              "chat template; auto: chat for Qwen2.5-VL (Instruct), else r1",
                              choices=policy.PROMPT_FORMATS)
    output_dir: str = flag("runs/r1zero", "metrics, samples, config and checkpoints go here")
    overwrite: bool = flag(False, "start afresh in an --output_dir that holds a run")
    seed: int = flag(42, "seeds data order, option shuffling, sampling and LoRA init")
    # GRPO
    objective: str = flag("grpo", "grpo: RL on the rewards (the paper); sft: supervised "
                          "fine-tuning on the gold answers in the answer format (its baseline)",
                          choices=("grpo", "sft"))
    num_generations: int = flag(8, "G, completions per prompt (2+ to compare)", min=2)
    prompts_per_step: int = flag(8, "B, prompts per step (N = B*G completions)", min=1)
    micro_batch_size: int = flag(8, "sequences per forward/backward (same math)", min=1)
    max_steps: int = flag(0, "steps to train; 0 = num_train_epochs over the dataset", min=0)
    num_train_epochs: float = flag(2.0, "epochs over the dataset when max_steps is 0")
    num_iterations: int = flag(1, "mu, optimizer updates per generation batch", min=1)
    beta: float = flag(0.04, "KL coefficient (k3, to the adapter-disabled model); 0 = no KL", min=0)
    epsilon_low: float = flag(0.2, "lower clip range of the ratio", min=0)
    epsilon_high: float = flag(0.2, "upper clip range (DAPO's clip-higher: 0.28)", min=0)
    loss_type: str = flag("grpo", "token aggregation (detail 6)", choices=grpo.LOSS_TYPES)
    scale_rewards: str = flag("group", "advantage std (detail 1)", choices=grpo.SCALES)
    reward_funcs: list[str] | None = flag(None, "rewards by name or file.py:function",
                                          default_help="format and, by the rows' task, accuracy "
                                          "(choice), iou (rec) or detection (ovd)")
    reward_weights: list[float] | None = flag(None, "one weight per reward",
                                              default_help="all 1.0")
    # sampling
    max_prompt_length: int = flag(1024, "longest prompt in tokens, image tokens included", min=1)
    max_completion_length: int = flag(700, "most new tokens per completion", min=1)
    temperature: float = flag(1.0, "sampling temperature; log-probs use it too (detail 8)")
    top_k: int = flag(50, "top-k sampling (0 = off)", min=0)
    top_p: float = flag(1.0, "nucleus sampling (1.0 = off)")
    # optimisation
    learning_rate: float = flag(1e-5, "AdamW peak learning rate (paper: 1e-6, full fine-tune)")
    weight_decay: float = flag(0.0, "AdamW weight decay", min=0)
    lr_scheduler: str = flag("linear", "after warmup: linear decay to 0 (the paper) or constant",
                             choices=("linear", "constant"))
    warmup_ratio: float = flag(0.0, "fraction of updates with linear warmup from 0")
    max_grad_norm: float = flag(1.0, "gradient clipping", min=0)
    lora_r: int = flag(64, "LoRA rank", min=1)
    lora_alpha: int = flag(128, "LoRA alpha")
    lora_dropout: float = flag(0.0, "LoRA dropout (0 keeps the ratio exact across passes)", min=0)
    train_vision: bool = flag(False, "also train the vision tower (frozen otherwise)")
    load_in_4bit: bool = flag(False, "QLoRA: the language model in 4-bit NF4")
    use_liger: bool | None = flag(None, "Liger: its fused linear GRPO loss, and on CUDA its "
                                  "Triton kernels (norms, RoPE, SwiGLU)",
                                  default_help="on with CUDA, off on CPU")
    gradient_checkpointing: bool = flag(True, "recompute activations: less memory, more time")
    logp_chunk_size: int = flag(1024, "completion tokens per vocabulary-projection chunk", min=1)
    static_cache: bool = flag(False, "static KV cache in generation: on CUDA transformers compiles "
                              "the decode step (the first steps compile, minutes)")
    # evaluation during training
    eval_steps: int = flag(0, "every N steps log eval/accuracy (0 = never)", min=0)
    eval_limit: int = flag(64, "held-out prompts per evaluation", min=1)
    eval_dataset: str | None = flag(None, "held-out prompts: a .jsonl, hub id or folder",
                                    default_help="SAT's val split, or other synthetic rows")
    # logging and checkpoints
    log_samples_steps: int = flag(10, "every N steps write samples.jsonl (0 = never)", min=0)
    num_samples: int = flag(4, "samples written each time", min=1)
    save_steps: int = flag(100, "checkpoint every N steps (0 = only at the end)", min=0)
    save_total_limit: int = flag(3, "keep the newest K checkpoints (0 = all)", min=0)
    resume: str | None = flag(None, "continue from the newest checkpoint in output_dir, or PATH",
                              nargs="?", const="latest", default_help="no")
    max_nonfinite_steps: int = flag(5, "stop after N consecutive non-finite steps", min=1)
    report_to: str = flag("none", "also log the metrics to tensorboard (in OUTPUT_DIR/r1v) or "
                          "wandb, through accelerate", choices=("none", "tensorboard", "wandb"))

    def __post_init__(self):
        cli.check_values(self)
        if not self.temperature > 0:
            raise UserError("--temperature must be above 0 (GRPO samples; the log-probs "
                            "divide by it)")
        if not 0 < self.top_p <= 1 or not 0 <= self.warmup_ratio < 1:
            raise UserError("--top_p must be in (0, 1] and --warmup_ratio in [0, 1)")
        if not self.max_steps and not self.num_train_epochs > 0:
            raise UserError("--num_train_epochs must be above 0 when --max_steps is 0")
        if self.min_pixels > self.max_pixels:
            raise UserError(f"--min_pixels {self.min_pixels} is above --max_pixels "
                            f"{self.max_pixels}")
        funcs = self.reward_funcs or TASK_REWARDS["choice"]  # every task has two by default
        if self.reward_weights is not None and len(self.reward_weights) != len(funcs):
            raise UserError(f"--reward_weights has {len(self.reward_weights)} values for "
                            f"{len(funcs)} --reward_funcs")


def parse_config(argv=None):
    """The command line is the Config; --demo applies demo.DEMO first, the flags given win."""
    return cli.parse(Config, argv, __doc__, presets={"demo": demo.DEMO})


# Settings that may change on --resume: they do not touch the saved state.
RESUMABLE = {"max_steps", "num_train_epochs", "output_dir", "overwrite", "resume", "eval_steps",
             "eval_limit", "eval_dataset", "log_samples_steps", "num_samples", "save_steps",
             "save_total_limit", "max_nonfinite_steps", "micro_batch_size", "logp_chunk_size",
             "gradient_checkpointing", "use_liger", "static_cache", "report_to"}
RUN_FILES = ("config.json", "metrics.jsonl", "samples.jsonl")


def load_model(cfg, device, model_name=None):
    """The base model (`model_name`, default --model), Liger's kernels on CUDA, a fresh LoRA
    adapter."""
    model, processor = policy.load_base_model(model_name or cfg.model, device, cfg.load_in_4bit)
    if cfg.use_liger and device.type == "cuda":  # Triton kernels: no CPU version
        policy.apply_liger_kernels(model)
    model = policy.add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                            cfg.train_vision, cfg.gradient_checkpointing)
    return model, processor


# --- processes (detail 15) ----------------------------------------------------------------------
# `accelerate launch` or `torchrun` starts one copy of this program per GPU (or CPU process). Each
# takes its share of the step's prompts, generates and scores their completions, and the update
# sums the gradients over the processes. With one process, every function here is the identity.

def start_processes(cfg):
    """This process's Accelerator: joined to the others under a launcher (NCCL on GPUs, gloo on
    CPU), alone otherwise; it holds the --report_to tracker."""
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), project_dir=cfg.output_dir,
                              log_with=None if cfg.report_to == "none" else cfg.report_to)
    if cfg.prompts_per_step % accelerator.num_processes:
        raise UserError(f"--prompts_per_step {cfg.prompts_per_step} does not split over "
                        f"{accelerator.num_processes} processes (each takes the same number of "
                        "whole prompts): use a multiple of the number of processes")
    return accelerator


def share(items, rank, world):
    """Process `rank`'s contiguous share of `items` (the first shares one longer when uneven): a
    prompt's G completions stay on the process that got the prompt."""
    size, extra = divmod(len(items), world)
    start = rank * size + min(rank, extra)
    return items[start:start + size + (rank < extra)]


def sum_over_processes(tensors):
    """In place: each tensor becomes its sum over the processes."""
    if torch.distributed.is_initialized():
        for t in tensors:
            torch.distributed.all_reduce(t)
    return tensors


def sum_gradients(params):
    """Each gradient becomes its sum over the processes: the losses were normalised by the whole
    batch's totals, so the sum is the one-process gradient (detail 15). DDP would do it during
    the backward, but the policy runs through generate, the inner model (for the chunked
    projection) and disable_adapter, which a DDP wrapper does not see; one sum per update is
    the same arithmetic."""
    if torch.distributed.is_initialized():
        for p in params:
            if p.grad is None:  # the same collectives on every process
                p.grad = torch.zeros_like(p)
        sum_over_processes([p.grad for p in params])


def start_equal(params):
    """Process 0's trainable weights on every process. The seed makes them equal already; this
    is DDP's guarantee, so that summed gradients move one and the same model."""
    if torch.distributed.is_initialized():
        for p in params:
            torch.distributed.broadcast(p.data, src=0)


def start_tracker(accelerator, cfg, out, start_step):
    """--report_to's run: the config as its hyper-parameters; tensorboard's event files in
    OUTPUT_DIR/r1v, where a resumed run drops what was logged after its checkpoint."""
    if cfg.report_to == "none":
        return
    config = {k: v if isinstance(v, (int, float, str, bool)) else str(v)  # tensorboard's types
              for k, v in dataclasses.asdict(cfg).items()}
    try:
        accelerator.init_trackers("r1v", config, init_kwargs={
            "tensorboard": {"purge_step": start_step + 1},
            "wandb": {"name": out.name, "dir": str(out)}})
    except Exception as e:  # wandb without a login, a tracker's own checks
        raise UserError(f"--report_to {cfg.report_to}: cannot start it ({e}); for wandb: "
                        "`wandb login`, or WANDB_MODE=offline") from e


# --- data ---------------------------------------------------------------------------------------

def load_dataset(cfg, source, split, limit, seed, flag_name, view):
    if source == "synthetic":
        return demo.synthetic_dataset(limit, seed, tuple(cfg.synthetic_tasks),
                                      cfg.synthetic_image_size, view)
    return data.load_examples(source, split, limit, seed, view, flag_name)


def held_out_examples(cfg, view, task_type):
    """Held-out rows for eval/accuracy (checked, of the training rows' task type):
    `--eval_dataset`, else the training source's (SAT's val split; synthetic rows of another
    seed)."""
    if cfg.eval_dataset:
        source, split, seed = cfg.eval_dataset, "val", cfg.seed
    elif cfg.dataset == "synthetic":
        source, split, seed = "synthetic", None, cfg.seed + 1_000  # other rows: other seed
    elif not cfg.dataset.endswith(".jsonl"):
        source, split, seed = cfg.dataset, "val", cfg.seed
    else:
        raise UserError("--eval_steps with a .jsonl --dataset needs --eval_dataset "
                        "(a held-out .jsonl)")
    flag_name = "--eval_dataset" if cfg.eval_dataset else "--dataset"
    examples = load_dataset(cfg, source, split, cfg.eval_limit, seed, flag_name, view)
    data.check_rows(examples, "checking held-out rows")
    if examples.task_type != task_type:
        raise UserError(f"--eval_dataset {source}: {examples.task_type} rows, but the training "
                        f"rows are {task_type}")
    return examples


def check_prompt_lengths(processor, rows, name, template, max_prompt_length):
    """Every prompt's length (its image's tokens known from its size) against the limit."""
    prompts = [template.replace("{question}", q) for q, _ in rows]
    for i, (ids, (_, visual)) in enumerate(zip(processor.tokenizer(prompts)["input_ids"], rows)):
        length = len(ids) - 1 + visual  # the one <|image_pad|> becomes `visual` tokens
        if length > max_prompt_length:
            raise UserError(f"{name}: row {i + 1}'s prompt is {length} tokens, over "
                            f"--max_prompt_length {max_prompt_length}; lower --max_pixels or "
                            "raise --max_prompt_length")


def next_examples(dataset, indices, report):
    """The examples of a step; a row that fails now (a file deleted mid-run) is replaced by
    the next readable one, reported once. Returns them and how many rows were skipped."""
    examples, skipped = [], 0
    for i in indices:
        for j in range(i, i + len(dataset)):
            try:
                examples.append(dataset[j % len(dataset)])
                break
            except UserError as e:
                skipped += 1
                report("row", f"skipped a row that cannot be read now: {e}")
        else:
            raise UserError(f"{dataset.name}: no row can be read any more")
    return examples, skipped


# --- the update ---------------------------------------------------------------------------------

def add_old_and_ref_logps(model, rollout, cfg):
    """The sampling policy's log-probs, when --num_iterations > 1 reuses them (detail 3), and
    the reference's, the model with its adapter disabled (detail 5)."""
    def logps():
        return policy.rollout_logps(model, rollout, cfg.micro_batch_size, cfg.temperature,
                                    cfg.logp_chunk_size)
    if cfg.num_iterations > 1:
        rollout.old_logp = logps()                                    # (N, C) (detail 3)
    if cfg.beta != 0.0:
        with model.disable_adapter():                                          # (detail 5)
            rollout.ref_logp = logps()                                         # (N, C)


def optimizer_step(params, optimizer, scheduler, loss, max_grad_norm):
    """Clip and step; a non-finite loss or gradient never reaches the weights. Returns the
    gradient norm, or None for a skipped update."""
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    finite = np.isfinite(loss) and bool(torch.isfinite(grad_norm))
    if finite:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm.item() if finite else None


def update(model, optimizer, scheduler, rollout, cfg):
    """--num_iterations optimizer updates on one generation batch (this process's share of it).
    Returns the loss stats and the gradient norm (means over the updates, of the whole batch)
    and how many were skipped as non-finite."""
    params = [p for p in model.parameters() if p.requires_grad]
    num_sequences, num_tokens = sum_over_processes(  # the whole batch's normalisers (detail 15)
        [torch.tensor(len(rollout), device=rollout.completion_mask.device),
         rollout.completion_mask.sum()])
    losses, grad_norms, stats = [], [], {}
    for iteration in range(cfg.num_iterations):
        if cfg.objective == "sft":
            loss, iteration_stats = policy.accumulate_sft_gradients(
                model, rollout, cfg.micro_batch_size, cfg.logp_chunk_size, num_tokens)
        else:
            loss, iteration_stats = policy.accumulate_gradients(
                model, rollout, cfg.micro_batch_size, cfg.temperature, cfg.logp_chunk_size,
                cfg.use_liger, num_sequences, num_tokens, beta=cfg.beta, eps_low=cfg.epsilon_low,
                eps_high=cfg.epsilon_high, loss_type=cfg.loss_type,
                max_completion_length=cfg.max_completion_length)
        loss, iteration_stats = gather_stats(loss, iteration_stats)
        sum_gradients(params)
        for key, value in iteration_stats.items():  # the mean over the iterations
            stats[key] = stats.get(key, 0.0) + value / cfg.num_iterations
        grad_norm = optimizer_step(params, optimizer, scheduler, loss, cfg.max_grad_norm)
        losses.append(loss)
        if grad_norm is not None:
            grad_norms.append(grad_norm)
    return {**stats, "loss": float(np.mean(losses)),
            "grad_norm": float(np.mean(grad_norms)) if grad_norms else float("nan"),
            "nonfinite": cfg.num_iterations - len(grad_norms)}


def gather_stats(loss, stats):
    """The whole batch's loss and stats from the processes' shares: each is a share of a
    whole-batch mean, so they add up; the clip ratios' extremes are the extremes."""
    shares = gather_object([(loss, stats)])
    reduce = {"clip_ratio/low_min": min, "clip_ratio/high_max": max}
    return (sum(loss for loss, _ in shares),
            {k: reduce.get(k, sum)(s[k] for _, s in shares) for k in stats})


def lr_factor(index, warmup, total, kind):
    """Multiplier of the peak learning rate at optimizer update `index` (0-based)."""
    if index < warmup:
        return (index + 1) / warmup
    return 1.0 if kind == "constant" else max(0.0, (total - index) / (total - warmup))


@dataclass
class Scored:
    """The completions of a generation batch and what they scored, on the host. Each process
    scores its share; `gathered` joins the shares, so that the metrics and samples are the
    whole batch's, the same whatever the number of processes."""
    texts: list
    examples: list      # the example each completion answers
    total: list         # the weighted sum of the rewards
    parts: dict         # reward name -> its unweighted values
    errors: dict        # reward name -> calls that raised
    lengths: list       # completion tokens, EOS included
    terminated: list    # ended by EOS (not clipped at --max_completion_length)

    def gathered(self):
        """Every process's share, in process order (the images stay behind)."""
        mine = dataclasses.replace(self, examples=[{k: v for k, v in ex.items() if k != "image"}
                                                   for ex in self.examples])
        shares = gather_object([mine])

        def joined(values):  # one list from each process's list
            return [x for share_values in values for x in share_values]
        lists = {f: joined(getattr(s, f) for s in shares)
                 for f in ("texts", "examples", "total", "lengths", "terminated")}
        return Scored(**lists, parts={n: joined(s.parts[n] for s in shares) for n in self.parts},
                      errors={n: sum(s.errors[n] for s in shares) for n in self.errors})


def completion_lengths(rollout, eos_id):
    """Each completion's tokens (EOS included) and whether it ended by EOS: (N,) lists."""
    terminated = (rollout.completion_ids == eos_id).any(1)                     # (N,)
    return rollout.completion_mask.sum(1).tolist(), terminated.tolist()


def completion_examples(examples, lengths, terminated, group_size):
    """The example each completion answers, with its token count (EOS not counted) for rewards
    that need it (`length`): G dicts per prompt, sharing the prompt's values."""
    return [{**examples[i // group_size], "completion_tokens": n - ended}
            for i, (n, ended) in enumerate(zip(lengths, terminated))]


def rollout_metrics(scored, group_size):
    """The reference library's metric names for what was generated and how it scored; for
    grounding, the boxes per answer against the gold count (the hack VLM-R1 saw: many boxes)."""
    rewards_t = torch.tensor(scored.total)                                     # (N,)
    group_std = rewards_t.view(-1, group_size).std(1)                          # (B,)
    lengths = torch.tensor(scored.lengths, dtype=torch.float)                  # (N,)
    eos_seen = torch.tensor(scored.terminated)                                 # (N,)
    metrics = {"reward": rewards_t.mean().item(), "reward_std": group_std.mean().item(),
               "frac_reward_zero_std": (group_std < 1e-6).float().mean().item()}
    for name, values in scored.parts.items():
        v = torch.tensor(values)
        metrics[f"rewards/{name}/mean"] = v.mean().item()
        metrics[f"rewards/{name}/std"] = v.std().item()
        metrics[f"rewards/{name}/errors"] = scored.errors[name]
    terminated = lengths[eos_seen] if eos_seen.any() else torch.zeros(1)  # as TRL: 0 if none
    reflections = [rewards.reflection_keys(t) for t in scored.texts]
    metrics.update({"completions/mean_length": lengths.mean().item(),
                    "completions/max_length": lengths.max().item(),
                    "completions/min_length": lengths.min().item(),
                    "completions/clipped_ratio": (~eos_seen).float().mean().item(),
                    "completions/mean_terminated_length": terminated.mean().item(),
                    "completions/max_terminated_length": terminated.max().item(),
                    "completions/min_terminated_length": terminated.min().item(),
                    "completions/reflection_ratio": float(np.mean([bool(r) for r in reflections]))})
    for key in rewards.REFLECTION_KEYS:  # which phrases make the curve (VisualThinker issue 12)
        metrics[f"completions/reflection/{key}"] = float(np.mean([key in r for r in reflections]))
    if scored.examples[0]["task_type"] != "choice":
        metrics["boxes/per_answer"] = float(np.mean([rewards.count_boxes(t)
                                                     for t in scored.texts]))
        metrics["boxes/gold"] = float(np.mean([len(ex["boxes"]) if "boxes" in ex else 1
                                               for ex in scored.examples]))  # rec: one box
    return metrics


# --- checkpoints --------------------------------------------------------------------------------

def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's GPU only
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(output_dir, step, model, optimizer, scheduler, sampler, counters, cfg,
                    rng_states=None):
    """checkpoint-<step>/: the LoRA adapter (loadable with peft), optimizer, scheduler, data
    state, the RNG states of every process (`rng_states`, default this one's), config. Written
    into a temporary folder and renamed when complete: a crash mid-write leaves no
    complete-looking checkpoint."""
    final = Path(output_dir) / f"checkpoint-{step}"
    tmp = Path(output_dir) / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng_states or [rng_state()], "sampler": sampler.state_dict(),
                "step": step, "counters": counters}, tmp / "trainer_state.pt")
    (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    if cfg.save_total_limit > 0:
        for old in list_checkpoints(output_dir)[:-cfg.save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir):
    """Complete checkpoints, oldest first (temporary folders of interrupted writes are not)."""
    found = [p for p in Path(output_dir).glob("checkpoint-*")
             if re.fullmatch(r"checkpoint-\d+", p.name) and (p / "trainer_state.pt").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def read_checkpoint(path):
    """(trainer state, saved config) of a checkpoint; ValueError naming the file if unreadable."""
    path = Path(path)
    for name in ("trainer_state.pt", "adapter_model.safetensors", "config.json"):
        if not (path / name).is_file():
            raise ValueError(f"{path / name} is missing")
    try:
        with safe_open(path / "adapter_model.safetensors", "pt") as f:
            f.keys()
    except Exception as e:
        raise ValueError(f"{path / 'adapter_model.safetensors'} cannot be read ({e})") from e
    try:
        state = torch.load(path / "trainer_state.pt", weights_only=False)
        saved = json.loads((path / "config.json").read_text())
    except Exception as e:
        raise ValueError(f"{path}: trainer_state.pt or config.json cannot be read ({e})") from e
    return state, saved


def find_checkpoint(out, resume):
    """The checkpoint to resume from: the newest readable one in `out` (unreadable ones are
    skipped with a warning), or the one `resume` names."""
    if resume != "latest":
        try:
            return Path(resume), *read_checkpoint(resume)
        except ValueError as e:
            raise UserError(f"--resume {resume}: {e}") from e
    for path in reversed(list_checkpoints(out)):
        try:
            return path, *read_checkpoint(path)
        except ValueError as e:
            tqdm.write(f"warning: skipping {path}: {e}")
    raise UserError(f"--resume: no complete checkpoint in {out} (start afresh with --overwrite)")


def restore(path, state, model, optimizer, scheduler, sampler, rank=0, world=1, seed=0):
    """Load a checkpoint's adapter and trainer state, and process `rank`'s RNG state: a resume
    with as many processes as the run had continues it exactly. Returns its step."""
    set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    sampler.load_state_dict(state["sampler"])
    rng = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # older: one
    if len(rng) == world:
        set_rng_state(rng[rank])
    else:  # the weights, optimizer, schedule and prompt order still continue exactly
        torch.manual_seed(seed + 1_000 * (rank + 1) + state["step"])  # new, per process
        if rank == 0:
            tqdm.write(f"note: {path} was written by {len(rng)} process(es), this run has "
                       f"{world}: the sampling continues with new random numbers; launch "
                       f"{len(rng)} process(es) to continue the run exactly")
    if rank == 0:
        tqdm.write(f"resumed from {path} at step {state['step']}")
    return state["step"]


def check_resumable(saved, cfg, path):
    """A resume must keep every setting the saved state depends on."""
    current = dataclasses.asdict(cfg)
    differ = [k for k in current if k not in RESUMABLE and saved.get(k, current[k]) != current[k]]
    if differ:
        changes = ", ".join(f"--{k} {saved.get(k)} -> {current[k]}" for k in differ)
        raise UserError(f"--resume {path}: settings differ from the checkpoint's ({changes}); "
                        "use the same ones, or a new --output_dir")
    changed = [k for k in RESUMABLE if k in saved and saved[k] != current[k]
               and k not in ("resume", "overwrite", "output_dir")]
    if changed:
        tqdm.write(f"note: changed since the checkpoint: {', '.join(changed)}")


def prepare_output_dir(out, cfg, clear=True):
    """Never reuse a run's folder silently: --resume continues it, --overwrite starts afresh
    (`clear`: here, the first process clears it; the others only check)."""
    held = [p.name for p in out.iterdir()
            if p.name == "metrics.jsonl" or p.name.startswith(("checkpoint-", ".tmp-checkpoint-"))]
    if not held or cfg.resume:
        return
    held += [p.name for p in out.iterdir() if p.name in RUN_FILES + ("demo-base",)
             and p.name not in held]
    if not cfg.overwrite:
        raise UserError(f"--output_dir {out} already holds a run ({', '.join(sorted(held))}); "
                        "add --resume to continue it, --overwrite to start afresh, or choose "
                        "another --output_dir")
    for name in held if clear else ():
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def truncate_jsonl(path, last_step):
    """Keep the lines of steps up to `last_step`, so a resumed run has no gap and no duplicate
    step (a line torn by a kill mid-write is dropped too)."""
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


@contextlib.contextmanager
def stop_on_sigint(main_process=True):
    """While inside, the first Ctrl-C only sets a flag: the loop finishes its step, saves and
    exits; a second one, a second or more later, stops at once. (Under a launcher each process
    gets Ctrl-C twice at once: from the terminal, and forwarded by the launcher.)"""
    stop = {"requested": False, "at": 0.0}

    def handle(*_):
        if stop["requested"]:
            if time.time() - stop["at"] >= 1.0:
                raise KeyboardInterrupt
            return
        stop.update(requested=True, at=time.time())
        if main_process:
            tqdm.write("Ctrl-C: stopping after this step and saving a checkpoint "
                       "(Ctrl-C again to stop at once, unsaved)")

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def report_once():
    """A printer that shows each kind of problem once: the first of its kind, in full."""
    seen = set()

    def report(kind, message):
        if kind not in seen:
            seen.add(kind)
            tqdm.write(f"warning: {message} (further ones are only counted)")
    return report


def write_logs(out, metrics, scored, cfg):
    """One line to metrics.jsonl and the terminal; every --log_samples_steps, samples."""
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\n")
    step = metrics["step"]
    if scored and cfg.log_samples_steps and (step % cfg.log_samples_steps == 0 or step == 1):
        with open(out / "samples.jsonl", "a") as f:
            for i in range(min(cfg.num_samples, len(scored.texts))):
                example = scored.examples[i]
                f.write(json.dumps({"step": step, "question": example["question"],
                                    "answer": data.gold_of(example),
                                    "completion": scored.texts[i],
                                    "rewards": {n: v[i] for n, v in scored.parts.items()}})
                        + "\n")
    tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in metrics.items()))


# --- the loop -----------------------------------------------------------------------------------

def train(cfg):
    accelerator = start_processes(cfg)  # one process, or one of several (detail 15)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    main_process = accelerator.is_main_process  # the one that writes files and prints
    if cfg.use_liger is None:  # on where its kernels run
        cfg = dataclasses.replace(cfg, use_liger=device.type == "cuda")
    # 0. Everything that can be checked before any model is loaded: flags (Config), the output
    #    folder, every dataset row and image, the rewards, the checkpoint to resume from, the
    #    tracker.
    given = cfg.reward_funcs and rewards.load_rewards(cfg.reward_funcs, cfg.reward_weights)
    out = data.writable_dir(cfg.output_dir, "--output_dir")
    prepare_output_dir(out, cfg, clear=main_process)
    accelerator.wait_for_everyone()
    pixels = data.View(cfg.min_pixels, cfg.max_pixels)  # the model's prompt and frame come later
    dataset = load_dataset(cfg, cfg.dataset, cfg.dataset_split, cfg.dataset_limit, cfg.seed,
                           "--dataset", pixels)
    prompt_rows = data.check_rows(dataset, progress=main_process)
    reward_funcs, weights = given or rewards.load_rewards(TASK_REWARDS[dataset.task_type],
                                                          cfg.reward_weights)
    held_out = held_out_examples(cfg, pixels, dataset.task_type) if cfg.eval_steps else None
    sampler = data.PromptSampler(len(dataset), cfg.prompts_per_step, cfg.seed)
    checkpoint = find_checkpoint(out, cfg.resume) if cfg.resume else None
    if checkpoint:
        check_resumable(checkpoint[2], cfg, checkpoint[0])
    start_tracker(accelerator, cfg, out, checkpoint[1]["step"] if checkpoint else 0)
    random.seed(cfg.seed)  # the same on every process: the same fresh adapter
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    # 1. The model: the base (the demo builds its own), how it sees rows (its prompt, the frame
    #    of its boxes), a fresh LoRA adapter.
    model_name = cfg.model
    if cfg.model == demo.MODEL:
        with accelerator.main_process_first():  # built once, then found by the others
            model_name = demo.build_demo_model(out / "demo-base", cfg.seed, cfg.synthetic_tasks,
                                               cfg.synthetic_image_size)
    view = policy.model_view(model_name, cfg.prompt_format, cfg.min_pixels, cfg.max_pixels)
    dataset.shown_as(view)
    held_out = held_out and evaluation.eval_items(held_out.shown_as(view), "held-out",
                                                  held_out.name)
    processor = policy.load_processor(model_name)
    check_prompt_lengths(processor, prompt_rows, dataset.name, view.template,
                         cfg.max_prompt_length)
    model, processor = load_model(cfg, device, model_name)
    params = [p for p in model.parameters() if p.requires_grad]
    start_equal(params)
    if main_process:
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    tokens = policy.special_tokens(processor)
    gen_config = policy.generation_config(
        processor, max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature,
        top_k=cfg.top_k, top_p=cfg.top_p, static_cache=cfg.static_cache)
    steps_per_epoch = len(dataset) // cfg.prompts_per_step
    max_steps = cfg.max_steps or max(1, int(cfg.num_train_epochs * steps_per_epoch))
    total_updates = max_steps * cfg.num_iterations
    warmup = int(cfg.warmup_ratio * total_updates)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda index: lr_factor(index, warmup, total_updates, cfg.lr_scheduler))

    start_step, saved = 0, None
    counters = {"nonfinite_steps": 0, "consecutive_nonfinite": 0, "skipped_rows": 0,
                "num_tokens": 0}  # num_tokens: prompt and completion tokens seen, as TRL
    if world > 1:  # each process samples its own completions
        torch.manual_seed(cfg.seed + 1_000 * rank)
    if checkpoint:
        saved, state, _ = checkpoint
        start_step = restore(saved, state, model, optimizer, scheduler, sampler, rank, world,
                             cfg.seed)
        counters.update(state["counters"])
    if main_process:
        for name in ("metrics.jsonl", "samples.jsonl"):
            truncate_jsonl(out / name, start_step)

    report = report_once()

    def on_reward_error(name, error):
        summary = "".join(traceback.format_exception(error, limit=-2)).rstrip()
        report(f"reward {name}", f"reward {name!r} raised; it scores 0.0 and is counted in "
                                 f"rewards/{name}/errors:\n{summary}\n")

    started, metrics, step, stopping = time.time(), {}, start_step, False
    with stop_on_sigint(main_process) as stop, contextlib.ExitStack() as cleanup:
        cleanup.callback(accelerator.end_training)  # flushes the tracker, on errors too; last
        bar = tqdm(range(start_step + 1, max_steps + 1), initial=start_step, total=max_steps,
                   desc=cfg.objective.upper(), dynamic_ncols=True, disable=not main_process)
        for step in bar:
            t0 = time.time()
            # 2. sample B prompts; this process takes its share (detail 15)
            examples, skipped = next_examples(dataset, share(sampler.next_batch(), rank, world),
                                              report)
            if cfg.objective == "sft":  # the paper's baseline: the gold answers, supervised
                rollout = policy.answer_rollout(
                    processor, examples, [data.answer_completion(ex) for ex in examples], device)
                scored = None
            else:
                # 3. generate G completions per prompt, one batched call
                rollout, texts = policy.generate(model, processor, examples, gen_config,
                                                 cfg.num_generations, cfg.max_prompt_length)
                # 4. score them; advantages within each group, from the whole batch's rewards
                lengths, terminated = completion_lengths(rollout, tokens.eos)
                group_examples = completion_examples(examples, lengths, terminated,
                                                     cfg.num_generations)
                total, parts, errors = rewards.score_completions(
                    texts, group_examples, reward_funcs, weights, on_error=on_reward_error)
                scored = Scored(texts, group_examples, total, parts, errors, lengths,
                                terminated).gathered()
                advantages = grpo.group_advantages(torch.tensor(scored.total, device=device),
                                                   cfg.num_generations, cfg.scale_rewards)
                rollout.advantages = share(advantages, rank, world)                    # (N,)
                add_old_and_ref_logps(model, rollout, cfg)
            # 5. update on micro-batches
            learning_rate = scheduler.get_last_lr()[0]
            stats = update(model, optimizer, scheduler, rollout, cfg)
            skipped_updates = stats.pop("nonfinite")
            seen = rollout.prompt_mask.sum() + rollout.completion_mask.sum()
            counts = sum_over_processes([torch.tensor(int(x), device=device) for x in (
                seen, skipped, stop["requested"])])  # the whole batch's; any process's Ctrl-C
            counters["num_tokens"] += int(counts[0])
            counters["skipped_rows"] += int(counts[1])
            stopping = bool(counts[2])
            counters["nonfinite_steps"] += skipped_updates
            counters["consecutive_nonfinite"] = (counters["consecutive_nonfinite"] + 1
                                                 if skipped_updates else 0)
            # 6. log, evaluate, checkpoint
            metrics = {"step": step, "epoch": round(step / max(1, steps_per_epoch), 4),
                       **(rollout_metrics(scored, cfg.num_generations) if scored else {}),
                       **stats, "num_tokens": counters["num_tokens"],
                       "nonfinite_steps": counters["nonfinite_steps"],
                       "skipped_rows": counters["skipped_rows"], "learning_rate": learning_rate,
                       "step_time": time.time() - t0}
            if cfg.eval_steps and (step % cfg.eval_steps == 0 or step == max_steps):
                name = "eval/mAP" if dataset.task_type == "ovd" else "eval/accuracy"
                mine = [held_out[i] for i in share(range(len(held_out)), rank, world)]
                metrics[name] = evaluation.score(gather_object(list(evaluation.predict(
                    model, processor, mine, cfg.micro_batch_size, cfg.max_completion_length))))
            if main_process:
                write_logs(out, metrics, scored, cfg)
                accelerator.log(metrics, step=step)
            shown = "reward" if "reward" in metrics else "loss"
            bar.set_postfix({shown: f"{metrics[shown]:.3f}",
                             "step_time": f"{metrics['step_time']:.2f}s"})
            if counters["consecutive_nonfinite"] >= cfg.max_nonfinite_steps:
                raise UserError(
                    f"step {step}: {counters['consecutive_nonfinite']} consecutive steps had a "
                    "non-finite loss or gradient; stopping. They never reached the weights: the "
                    f"last checkpoint in {out} is good. Try a lower --learning_rate.")
            if (cfg.save_steps and step % cfg.save_steps == 0) or step == max_steps or stopping:
                rng_states = gather_object([rng_state()])  # every process's, to resume exactly
                if main_process:
                    saved = save_checkpoint(out, step, model, optimizer, scheduler, sampler,
                                            counters, cfg, rng_states)
                if stopping:
                    break
        bar.close()
        accelerator.wait_for_everyone()  # the last checkpoint is complete when any process ends
    minutes = (time.time() - started) / 60
    reward = f", last reward {metrics['reward']:.3f}" if "reward" in metrics else ""
    if stopping:
        if main_process:
            print(f"interrupted at step {step} after {minutes:.1f} min{reward}: saved {saved}; "
                  "continue with the same command plus --resume")
        sys.exit(130)
    if main_process:
        print(f"done: {step} steps in {minutes:.1f} min{reward}; the adapter is in {saved}")
    return out


def main(argv=None):
    return train(parse_config(argv))


if __name__ == "__main__":
    cli.run(main)
