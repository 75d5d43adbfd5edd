"""R1-Zero GRPO for Qwen2-VL on one GPU, with LoRA or QLoRA.

    python train.py --demo --output_dir runs/demo   # tiny model, synthetic data, CPU, minutes
    python train.py --output_dir runs/sat           # the paper's recipe: Qwen2-VL-2B base on SAT
    torchrun --nproc_per_node 4 train.py ...        # 4 GPUs, the same run (README "More GPUs")

Each step: sample B prompts -> generate G completions per prompt in ONE batched call -> score
them with the rule-based rewards -> group advantages -> the reference's log-probs (the model
with its adapter disabled) -> update the LoRA weights on micro-batches (num_iterations passes)
-> log, evaluate, checkpoint. `train(cfg)` reads in that order. The numbers (detail N) point to
the README's implementation details; r1v/ holds what makes a run safe, fast or multi-process.
"""

import contextlib
import dataclasses
import json
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from accelerate.utils import set_seed
from tqdm import tqdm

import data
import demo
import eval as evaluation
import grpo
import rewards
from r1v import (checkpoints, cli, decode, images, memory, metrics, policy, preview, processes,
                 rows, runs, schedule)
from r1v import model as models
from r1v.cli import UserError, flag
from r1v.flags import RunFlags

# The rewards of a run that names none: the format and the task's own (rewards.py).
TASK_REWARDS = {"choice": ["format", "accuracy"], "rec": ["format", "iou"],
                "ovd": ["format", "detection"]}


@dataclass
class Config(RunFlags):
    """The GRPO recipe's flags; the model's, the data's and the run's are r1v/flags.py's."""
    # GRPO
    objective: str = flag("grpo", "grpo: RL on the rewards (the paper); sft: supervised "
                          "fine-tuning on the gold answers in the answer format (its baseline)",
                          choices=("grpo", "sft"))
    num_generations: int = flag(8, "G, completions per prompt (2+ to compare)", min=2)
    prompts_per_step: int = flag(8, "B, prompts per step (N = B*G completions)", min=1)
    micro_batch_size: int = flag(8, "sequences per forward/backward; the loss and gradient do not "
                                 "depend on it, but bnpo's (per micro-batch, as TRL's)", min=1)
    max_steps: int = flag(0, "steps to train; 0 = num_train_epochs over the dataset", min=0)
    num_train_epochs: float = flag(2.0, "epochs over the dataset when max_steps is 0", above=0)
    num_iterations: int = flag(1, "mu, optimizer updates per generation batch", min=1)
    beta: float = flag(0.04, "KL coefficient (k3, to the adapter-disabled model); 0 = no KL", min=0)
    epsilon_low: float = flag(0.2, "lower clip range of the ratio", min=0, below=1)
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
    temperature: float = flag(1.0, "sampling temperature; log-probs use it too (detail 8)",
                              above=0)
    top_k: int = flag(50, "top-k sampling (0 = off)", min=0)
    top_p: float = flag(1.0, "nucleus sampling (1.0 = off)", above=0, max=1)
    generation_batch_size: int = flag(0, "sequences per generate call, a multiple of G (each "
                                      "group in one call): the KV cache holds this many, not "
                                      "N; 0 = all N in one call", min=0)
    # optimisation
    learning_rate: float = flag(1e-5, "AdamW peak learning rate (paper: 1e-6, full fine-tune)",
                                above=0)
    weight_decay: float = flag(0.0, "AdamW weight decay", min=0)
    lr_scheduler: str = flag("linear", "after warmup: linear decay to 0 (the paper) or constant; "
                             "a finished run extended (--resume, a higher --max_steps) decays "
                             "again from the peak", choices=("linear", "constant"))
    warmup_ratio: float = flag(0.0, "fraction of updates with linear warmup", min=0, below=1)
    max_grad_norm: float = flag(1.0, "clip the gradient to this norm", above=0)
    lora_r: int = flag(64, "LoRA rank", min=1)
    lora_alpha: int = flag(128, "LoRA alpha (its scale is alpha / r)", above=0)
    lora_dropout: float = flag(0.0, "LoRA dropout (0 keeps the ratio exact across passes)",
                               min=0, below=1)
    train_vision: bool = flag(False, "also train the vision tower (frozen otherwise)")

    def __post_init__(self):
        super().__post_init__()
        funcs = self.reward_funcs or TASK_REWARDS["choice"]  # every task has two by default
        if self.reward_weights is not None and len(self.reward_weights) != len(funcs):
            raise UserError(f"--reward_weights has {len(self.reward_weights)} values for "
                            f"{len(funcs)} --reward_funcs")
        if self.reward_weights is not None and not any(self.reward_weights):
            raise UserError("--reward_weights are all 0: every advantage would be 0")
        if self.eval_dataset and not self.eval_steps:  # else it would be silently unused
            raise UserError("--eval_dataset is used every --eval_steps N steps: give N")
        if (self.preview_rewards or self.rescore) and (self.resume or self.objective == "sft"):
            raise UserError("--preview_rewards and --rescore score a fresh GRPO run's "
                            "completions: not with --resume or --objective sft")
        if self.generation_batch_size % self.num_generations:
            raise UserError(f"--generation_batch_size {self.generation_batch_size}: each group's "
                            f"completions come from one call, so a multiple of --num_generations "
                            f"{self.num_generations}")
        if self.preview_rewards and self.rescore:
            raise UserError("--preview_rewards samples new completions, --rescore scores "
                            "logged ones: give one")


def parse_config(argv=None):
    """The command line is the Config; --demo applies demo.DEMO first, the flags given win."""
    return cli.parse(Config, argv, __doc__, presets={"demo": demo.DEMO})


# Settings that may change on --resume: they do not touch the saved state.
RESUMABLE = {"max_steps", "num_train_epochs", "output_dir", "overwrite", "resume", "eval_steps",
             "eval_limit", "eval_dataset", "log_samples_steps", "num_samples", "save_steps",
             "save_total_limit", "max_nonfinite_steps", "micro_batch_size", "logp_chunk_size",
             "gradient_checkpointing", "use_liger", "static_cache", "report_to", "cpu_threads",
             "prefill_chunk_size", "compile_decode", "compile_backend", "allow_changed_inputs",
             "generation_batch_size"}


# --- the step -----------------------------------------------------------------------------------

def generate(model, processor, examples, gen_config, cfg, eos_ids, decoder=None):
    """G completions per prompt in one batched call (or calls of --generation_batch_size
    sequences), masked up to and including the first EOS, from positions (detail 7)."""
    rollout, texts = policy.generate_in_calls(
        model, processor, examples, gen_config, cfg.num_generations, cfg.generation_batch_size,
        cfg.max_prompt_length, decoder)
    rollout.completion_mask = grpo.completion_mask(rollout.completion_ids, eos_ids)  # (N, C)
    return rollout, texts


def score(texts, examples, rollout, eos_ids, reward_funcs, weights, group_size, on_error):
    """Every completion's rewards, each unweighted and their weighted total. A completion's
    example is its prompt's, with its token count (EOS not counted) for `length`."""
    lengths, terminated = metrics.completion_lengths(rollout, eos_ids)
    answered = [{**examples[i // group_size], "completion_tokens": n - ended}
                for i, (n, ended) in enumerate(zip(lengths, terminated))]
    total, parts, errors = rewards.score_completions(texts, answered, reward_funcs, weights,
                                                     on_error)
    return metrics.Scored(texts, answered, total, parts, errors, lengths, terminated)


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


def micro_batch_loss(model, mb, cfg, num_sequences, num_tokens):
    """One micro-batch's share of the batch's loss (detail 6) and its stats: the clipped
    surrogate with the k3 KL (grpo.policy_loss; fused by Liger), or SFT's NLL."""
    if cfg.objective == "sft":
        return policy.sft_loss(model, mb, num_tokens, cfg.logp_chunk_size)
    loss_args = dict(beta=cfg.beta, eps_low=cfg.epsilon_low, eps_high=cfg.epsilon_high,
                     loss_type=cfg.loss_type, max_completion_length=cfg.max_completion_length)
    if cfg.use_liger:
        return models.liger_grpo_loss(*policy.completion_hidden(model, mb), mb,
                                      cfg.temperature, num_sequences, num_tokens, **loss_args)
    logp, entropy, _ = policy.token_logps(model, mb, cfg.temperature, cfg.logp_chunk_size,
                                          with_stats=True)                     # (n, C)
    loss, stats = grpo.policy_loss(logp, mb.old_logp, mb.ref_logp, mb.advantages,
                                   mb.completion_mask, num_sequences=num_sequences,
                                   num_tokens=num_tokens, **loss_args)
    mask = mb.completion_mask
    return loss, {**stats, "entropy": float((entropy * mask).sum() / mask.sum())}


def accumulate_gradients(model, rollout, cfg, num_sequences, num_tokens):
    """Forward and backward over the micro-batches, normalised by the whole batch's sequences
    and completion tokens: the gradients add up to the batch's however it is cut (detail 6).
    Returns this rollout's share of the batch's loss and of its stats (token means; the clip
    ratios' extremes over its sequences, whatever the micro-batch size)."""
    model.train()
    loss_sum, stats_sum = 0.0, {}
    for _, mb in rollout.micro_batches(cfg.micro_batch_size):
        loss, stats = micro_batch_loss(model, mb, cfg, num_sequences, num_tokens)
        loss.backward()
        loss_sum += loss.item()
        share = float(mb.completion_mask.sum() / num_tokens)
        for key, value in stats.items():
            if key in processes.EXTREMES:
                stats_sum[key] = processes.EXTREMES[key](stats_sum.get(key, value), value)
            else:
                stats_sum[key] = stats_sum.get(key, 0.0) + value * share
    return loss_sum, stats_sum


def update(model, optimizer, scheduler, rollout, cfg, procs):
    """--num_iterations optimizer updates on one generation batch (this process's share). A
    non-finite loss or gradient never reaches the weights: that update is skipped. Returns the
    means over the updates made of the whole batch's loss, stats and gradient norm (before
    clipping; None if every update was skipped), and how many were skipped."""
    params = [p for p in model.parameters() if p.requires_grad]
    num_sequences, num_tokens = procs.sum([len(rollout), rollout.completion_mask.sum()])
    made = []  # (loss, stats, grad_norm) of each update that reached the weights
    for _ in range(cfg.num_iterations):
        loss, stats = processes.gather_stats(procs, *accumulate_gradients(
            model, rollout, cfg, num_sequences, num_tokens))
        procs.sum_gradients(params)  # the one-process gradient (detail 15)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        if np.isfinite(loss) and torch.isfinite(grad_norm):
            optimizer.step()
            scheduler.step()
            made.append((loss, stats, grad_norm.item()))
        optimizer.zero_grad(set_to_none=True)

    def mean(values):
        return float(np.mean(values)) if made else None
    return {**{k: mean([s[k] for _, s, _ in made]) for k in stats},
            "loss": mean([m[0] for m in made]), "grad_norm": mean([m[2] for m in made]),
            "nonfinite": cfg.num_iterations - len(made)}


# --- setup --------------------------------------------------------------------------------------

@dataclass
class Run:
    """What the loop works with, made ready by `setup`."""
    out: object                      # the run folder
    dataset: rows.Examples           # the training rows...
    sampler: data.PromptSampler      # ...and the order their prompts come in
    held_out: object                 # eval items for eval/accuracy, or None
    reward_funcs: dict
    weights: dict
    model: object = None             # the peft model: base weights frozen, LoRA trained
    processor: object = None
    view: data.View = None           # how the model sees a row: its prompt and box frame
    eos_ids: list = None             # every token that ends a completion
    longest_prompt: int = 0          # tokens, of the training and held-out rows
    decoder: decode.Decoder = None   # the static KV cache and compiled decode step, if any
    optimizer: object = None
    scheduler: object = None
    schedule: dict = None            # what a checkpoint keeps of the schedule
    inputs: dict = None              # the hashes of the files rows and rewards come from
    max_steps: int = 0
    steps_per_epoch: int = 0
    start_step: int = 0
    counters: dict = dataclasses.field(default_factory=lambda: {
        "num_tokens": 0, "nonfinite_steps": 0, "skipped_rows": 0, "reward_errors": 0,
        "consecutive_nonfinite": 0})

    def record(self, cfg):
        """What config.json keeps, the run's and each checkpoint's: the settings, and the
        hashes of the files the rows and rewards come from (a resume checks them)."""
        return {**dataclasses.asdict(cfg), "inputs": self.inputs}


def held_out_examples(cfg, view, task_type):
    """The checked rows of eval/accuracy: --eval_dataset, else the training source's held-out
    ones (SAT's val split; synthetic rows of another seed)."""
    if cfg.eval_dataset:
        source, split, seed = cfg.eval_dataset, "val", cfg.seed
    elif cfg.dataset == "synthetic":
        source, split, seed = "synthetic", None, cfg.seed + 1_000  # other rows: other seed
    elif not cfg.dataset.endswith(".jsonl"):
        source, split, seed = cfg.dataset, "val", cfg.seed
    else:
        raise UserError("--eval_steps with a .jsonl --dataset needs --eval_dataset "
                        "(a held-out .jsonl)")
    examples = data.load_examples(source, split, cfg.eval_limit, seed, view,
                                  "--eval_dataset" if cfg.eval_dataset else "--dataset",
                                  cfg.synthetic_tasks, cfg.synthetic_image_size)
    prompt_rows = rows.check_rows(examples, "checking held-out rows")
    if examples.task_type != task_type:
        raise UserError(f"--eval_dataset {source}: {examples.task_type} rows, but the training "
                        f"rows are {task_type}")
    return examples, prompt_rows


def check_inputs(cfg, procs):
    """Everything that can be checked before the run folder is touched or a model loads, in the
    README's order ("When things go wrong"). Returns the config with its rewards resolved, the
    Run so far, the rows' prompt texts, the checkpoint to resume and what --overwrite clears;
    None if the checkpoint to resume is the run's last step."""
    given = cfg.reward_funcs and rewards.load_rewards(cfg.reward_funcs, cfg.reward_weights)
    out = runs.writable_dir(cfg.output_dir, "--output_dir")
    held = [] if cfg.preview_rewards else runs.held_run(out, cfg.resume, cfg.overwrite)  # kept
    runs.check_kept(out, held, {"--model": cfg.model, "--dataset": cfg.dataset,
                                "--eval_dataset": cfg.eval_dataset})
    pixels = data.View(cfg.min_pixels, cfg.max_pixels)  # the model's prompt and frame come later
    dataset = data.load_examples(cfg.dataset, cfg.dataset_split, cfg.dataset_limit, cfg.seed,
                                 pixels, "--dataset", cfg.synthetic_tasks, cfg.synthetic_image_size)
    prompt_rows = rows.check_rows(dataset, progress=procs.main)
    specs = cfg.reward_funcs or TASK_REWARDS[dataset.task_type]
    scoring = given or rewards.load_rewards(specs, cfg.reward_weights)
    cfg = dataclasses.replace(cfg, reward_funcs=list(specs),  # as config.json records them
                              reward_weights=list(scoring[1].values()))
    held_out, held_rows = (held_out_examples(cfg, pixels, dataset.task_type) if cfg.eval_steps
                           else (None, []))
    run = Run(out, dataset, data.PromptSampler(len(dataset), cfg.prompts_per_step, cfg.seed),
              held_out, *scoring)
    run.steps_per_epoch = len(run.dataset) // cfg.prompts_per_step
    run.max_steps = cfg.max_steps or max(1, int(cfg.num_train_epochs * run.steps_per_epoch))
    run.inputs = runs.input_hashes(cfg.dataset, cfg.eval_dataset, specs)
    checkpoint = cfg.resume and checkpoints.to_resume(out, cfg.resume, dataclasses.asdict(cfg),
                                               RESUMABLE, run.max_steps, run.inputs)
    if cfg.resume and not checkpoint:  # the run's last step: nothing left to train
        return None
    with demo.model_files(cfg.model, cfg.seed, cfg.synthetic_tasks) as name:
        see_as(name, run, cfg, prompt_rows, held_rows)  # the demo's model is built later
    if not cfg.preview_rewards:  # a preview logs no run
        procs.start_tracker(cfg.report_to, dataclasses.asdict(cfg), out,
                            checkpoint[1]["step"] if checkpoint else 0)
    return cfg, run, (prompt_rows, held_rows), checkpoint, held


def see_as(name, run, cfg, prompt_rows, held_rows):
    """Model `name`'s processor and how it sees a row; every row's prompt length checked, the
    training's and the held-out's (the longest sizes the decode step's cache)."""
    config = models.load_config(name)  # first: its errors say more (no such folder, no config)
    models.check_positions(config, cfg.max_prompt_length + cfg.max_completion_length,
                           "--max_prompt_length + --max_completion_length")
    run.processor = models.load_processor(name)
    run.view = data.model_view(config, run.processor, cfg.prompt_format, cfg.min_pixels,
                               cfg.max_pixels)
    if run.view.patch_factor != images.PATCH_FACTOR:  # Qwen3-VL: its images' tokens counted again
        prompt_rows = rows.check_rows(run.dataset.shown_as(run.view))
        held_rows = held_rows and rows.check_rows(run.held_out.shown_as(run.view),
                                                  "checking held-out rows")
    lengths = [rows.check_prompt_lengths(run.processor.tokenizer, prompt_rows, run.dataset.name,
                                         run.view, cfg.max_prompt_length)]
    if held_rows:
        lengths.append(rows.check_prompt_lengths(run.processor.tokenizer, held_rows,
                                                 run.held_out.name, run.view,
                                                 cfg.max_prompt_length))
    run.longest_prompt = max(lengths)


def load_model(cfg, device, name=None):
    """The policy: the base model (--model, or `name`) with a fresh LoRA adapter."""
    return models.load_policy(
        name or cfg.model, device, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout, load_in_4bit=cfg.load_in_4bit, use_liger=cfg.use_liger,
        train_vision=cfg.train_vision, gradient_checkpointing=cfg.gradient_checkpointing)


def make_decoder(run, cfg, procs):
    """The run's static KV cache (a generate call's sequences: this process's N, or at most
    --generation_batch_size, x the longest prompt + the completion) and, with --compile_decode,
    its compiled decode step; None: a dynamic cache."""
    if not (cfg.compile_decode or cfg.static_cache):
        return None
    sequences = len(procs.share(range(cfg.prompts_per_step))) * cfg.num_generations
    sequences = min(sequences, cfg.generation_batch_size or sequences)
    decoder = decode.Decoder(run.model, sequences, run.longest_prompt + cfg.max_completion_length,
                             cfg.compile_decode, cfg.compile_backend)
    if procs.main:
        tqdm.write(decoder.describe())
    return decoder


def load_policy(run, cfg, procs, prompt_rows):
    """The seed set, the model (the demo's built here, into the run folder, or reused), the rows
    shown as it sees them, a fresh LoRA adapter (the same on every process), the decoder."""
    set_seed(cfg.seed)  # the same on every process: the same fresh adapter
    name = cfg.model
    if cfg.model in demo.MODELS:
        with procs.accelerator.main_process_first():  # built once, then found by the others
            name = demo.build_demo_model(run.out / "demo-base", cfg.seed, cfg.synthetic_tasks,
                                         cfg.synthetic_image_size, demo.MODELS[cfg.model])
        see_as(name, run, cfg, *prompt_rows)
    run.dataset.shown_as(run.view)
    run.model, run.eos_ids = load_model(cfg, procs.device, name), models.eos_ids(name,
                                                                                run.processor)
    run.decoder = make_decoder(run, cfg, procs)


def generation_config(run, cfg):
    return policy.generation_config(
        run.processor, run.eos_ids, max_new_tokens=cfg.max_completion_length,
        temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
        prefill_chunk_size=cfg.prefill_chunk_size)


def setup(cfg, procs):
    """0. The checks; then --overwrite clears the old run; the model (the demo's built here),
    its prompt, a fresh LoRA adapter (the same on every process), the optimizer and its
    schedule; on --resume, the checkpoint's state. Returns the Run (None: nothing left to
    train) and the config it uses."""
    checked = check_inputs(cfg, procs)
    if checked is None:  # a finished run
        return None, cfg
    cfg, run, prompt_rows, checkpoint, held = checked
    if procs.main:
        runs.clear(run.out, held)
    procs.accelerator.wait_for_everyone()
    load_policy(run, cfg, procs, prompt_rows)
    run.held_out = run.held_out and evaluation.eval_items(run.held_out.shown_as(run.view),
                                                          "held-out", run.held_out.name)
    params = [p for p in run.model.parameters() if p.requires_grad]
    procs.start_equal(params)
    if procs.main:
        runs.write_atomic(run.out / "config.json", json.dumps(run.record(cfg), indent=2))
    run.optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    run.scheduler, run.schedule = schedule.lr_schedule(
        run.optimizer, cfg.lr_scheduler, cfg.warmup_ratio, run.max_steps * cfg.num_iterations,
        checkpoint and checkpoint[1])
    if procs.world > 1:  # each process samples its own completions
        torch.manual_seed(cfg.seed + 1_000 * procs.rank)
    if checkpoint:
        run.start_step = checkpoints.restore(*checkpoint[:2], run.model, run.optimizer,
                                             run.scheduler, run.sampler, procs.rank, procs.world,
                                             cfg.seed)
        run.counters.update(checkpoint[1]["counters"])
    for log in ("metrics.jsonl", "samples.jsonl") if procs.main else ():
        runs.truncate_log(run.out / log, run.start_step)
    return run, cfg


# --- the loop -----------------------------------------------------------------------------------

def evaluate_and_save(run, cfg, procs, row, scored, stopping):
    """After a step: eval/accuracy (eval/mAP for detection) when due, greedy on the held-out
    items split over the processes; the logs; a checkpoint when due, written by the first
    process with every process's RNG state. Returns the checkpoint's path, or None."""
    step = row["step"]
    if cfg.eval_steps and (step % cfg.eval_steps == 0 or step == run.max_steps):
        mine = [run.held_out[i] for i in procs.share(range(len(run.held_out)))]
        batch = run.decoder.batch_size if run.decoder else cfg.micro_batch_size  # one cache
        judged = procs.gather(list(evaluation.predict(
            run.model, run.processor, mine, batch, cfg.max_completion_length, run.eos_ids,
            run.decoder)))
        row["eval/mAP" if run.dataset.task_type == "ovd" else "eval/accuracy"] = \
            evaluation.score(sum(judged, []))
    if procs.main:
        metrics.write_logs(run.out, row, scored, cfg.log_samples_steps, cfg.num_samples,
                           data.gold_of, cfg.num_generations)
        procs.accelerator.log({k: v for k, v in row.items() if v is not None}, step=step)
    if run.counters["consecutive_nonfinite"] >= cfg.max_nonfinite_steps:
        raise UserError(f"step {step}: {run.counters['consecutive_nonfinite']} consecutive "
                        "steps had a non-finite loss or gradient; stopping. They never reached "
                        f"the weights: the last checkpoint in {run.out} is good. Try a lower "
                        "--learning_rate.")
    if not ((cfg.save_steps and step % cfg.save_steps == 0) or step == run.max_steps or stopping):
        return None
    rng = procs.gather(checkpoints.rng_state())  # every process's, to resume exactly
    state = {"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
             "schedule": run.schedule, "rng": rng, "sampler": run.sampler.state_dict(),
             "counters": run.counters}
    return procs.main and checkpoints.save_checkpoint(run.out, step, run.model, state,
                                                      run.record(cfg), cfg.save_total_limit)


def train(cfg):
    if cfg.plan_memory:  # the run planned, not run: no data is read, no weights
        with demo.model_files(cfg.model, cfg.seed, cfg.synthetic_tasks) as name:
            return memory.plan_run(cfg, micro_batch_loss, model=name)
    if cfg.rescore:  # a run's logged completions scored again: no model, no rows
        return rescore(cfg)
    started, procs = time.time(), processes.Processes(cfg.output_dir, cfg.report_to,
                                                      cfg.prompts_per_step)
    if cfg.use_liger is None:  # on where its kernels run
        cfg = dataclasses.replace(cfg, use_liger=procs.device.type == "cuda")
    if cfg.compile_decode is None:  # on where it pays: CUDA graphs
        cfg = dataclasses.replace(cfg, compile_decode=procs.device.type == "cuda")
    decode.check_backend(cfg.compile_decode, cfg.compile_backend, procs.device)
    if cfg.cpu_threads and procs.device.type == "cpu":
        torch.set_num_threads(cfg.cpu_threads)
    if cfg.preview_rewards:  # the run's first completions scored, nothing trained
        return preview_rewards(cfg, procs)
    with contextlib.ExitStack() as cleanup:
        if procs.main:  # one run a folder, for the run's life
            cleanup.enter_context(runs.locked(cfg.output_dir, "--output_dir"))
        run, cfg = setup(cfg, procs)
        if run is None:  # nothing was left to train
            return None
        cleanup.callback(procs.accelerator.end_training)  # flushes the tracker, on errors too
        stop = cleanup.enter_context(processes.stop_on_signals(procs.main))
        gen_config = generation_config(run, cfg)
        report, row, saved, stopping = metrics.report_once(), {}, None, False
        on_reward_error = metrics.FirstErrors(metrics.on_reward_error(report))
        for step in tqdm(range(run.start_step + 1, run.max_steps + 1), initial=run.start_step,
                         total=run.max_steps, desc=cfg.objective.upper(), dynamic_ncols=True,
                         disable=not procs.main):
            t0, timer = time.time(), metrics.PhaseTimer(procs.device)
            # 1. sample B prompts; this process takes its share (detail 15)
            examples, skipped = rows.take(run.dataset, procs.share(run.sampler.next_batch()),
                                          report)
            if cfg.objective == "sft":  # the paper's baseline: the gold answers, supervised
                rollout, scored = policy.answer_rollout(run.processor, examples, [
                    data.answer_completion(ex) for ex in examples], procs.device), None
            else:
                # 2. generate G completions per prompt, in one batched call (or a few)
                with timer("generation"):
                    rollout, texts = generate(run.model, run.processor, examples, gen_config,
                                              cfg, run.eos_ids, run.decoder)
                # 3. score them with the rewards; the metrics see every process's
                scored = score(texts, examples, rollout, run.eos_ids, run.reward_funcs,
                               run.weights, cfg.num_generations, on_reward_error)
                scored = scored.gathered(procs)
                run.counters["reward_errors"] += sum(scored.errors.values())
                if step == run.start_step + 1:  # a reward that always raises trains on zeros
                    on_reward_error.check_first_step(scored.errors, len(scored.texts))
                # 4. advantages within each group (detail 1), this process's share of them
                advantages = grpo.group_advantages(torch.tensor(scored.total, device=procs.device),
                                                   cfg.num_generations, cfg.scale_rewards)
                rollout.advantages = procs.share(advantages)                   # (N,)
                # 5. the sampling policy's and the reference's log-probs
                with timer("logp"):
                    add_old_and_ref_logps(run.model, rollout, cfg)
            # 6. update the LoRA weights on micro-batches
            learning_rate = run.scheduler.get_last_lr()[0]
            with timer("update"):
                stats = update(run.model, run.optimizer, run.scheduler, rollout, cfg, procs)
            stopping = metrics.count_step(run.counters, procs, rollout, skipped,
                                          stats.pop("nonfinite"), stop["requested"])
            # 7. log, evaluate, checkpoint
            counted = {k: v for k, v in run.counters.items() if k != "consecutive_nonfinite"}
            row = {"step": step, "epoch": round(step / max(1, run.steps_per_epoch), 4),
                   **(metrics.rollout_metrics(scored, cfg.num_generations) if scored else {}),
                   **stats, **counted, "learning_rate": learning_rate,
                   **timer.metrics(sum(scored.lengths) if scored else 0),
                   **(run.decoder.stats() if run.decoder else decode.NOT_COMPILED),
                   "step_time": time.time() - t0}
            saved = evaluate_and_save(run, cfg, procs, row, scored, stopping) or saved
            if stopping:
                break
        procs.accelerator.wait_for_everyone()  # the last checkpoint is complete when any ends
    return finish(run, row, saved, stopping and stop["status"], started, procs.main)


# --- before a run: the rewards' signal (README "Prototyping a reward") ---------------------------

def preview_rewards(cfg, procs):
    """--preview_rewards N: the run's checks, model and first N prompts, G completions each
    sampled as its first steps would (the first batch's are its step 1's), scored by its
    rewards; reward_preview.json, and nothing of a run written (r1v/preview.py)."""
    if procs.world > 1:
        raise UserError("--preview_rewards runs in one process: start it without a launcher")
    cfg, run, prompt_rows = check_inputs(cfg, procs)[:3]
    batches = preview.first_prompts(run.sampler, cfg.preview_rewards)
    load_policy(run, dataclasses.replace(cfg, prompts_per_step=len(batches[0])), procs,
                prompt_rows)  # a decode cache the size of the preview's batches
    on_error, scored = metrics.on_reward_error(metrics.report_once()), []
    for batch in tqdm(batches, desc="preview", dynamic_ncols=True):
        prompts, _ = rows.take(run.dataset, batch, metrics.report_once())
        rollout, texts = generate(run.model, run.processor, prompts, generation_config(run, cfg),
                                  cfg, run.eos_ids, run.decoder)
        scored.append(score(texts, prompts, rollout, run.eos_ids, run.reward_funcs, run.weights,
                            cfg.num_generations, on_error))
    return preview.write(preview.of_batches(scored, cfg.num_generations, data.gold_of,
                                            dataclasses.asdict(cfg)), run.out)


def rescore(cfg):
    """--rescore RUN/samples.jsonl: the completions a run logged, scored by --reward_funcs
    (by default its task's) with the examples they answered; the preview's report."""
    given = cfg.reward_funcs and rewards.load_rewards(cfg.reward_funcs, cfg.reward_weights)
    out = runs.writable_dir(cfg.output_dir, "--output_dir")
    groups = preview.read_samples(cfg.rescore)
    task = groups[0][0]["example"].get("task_type", "choice")
    if not cfg.reward_funcs and task not in list(TASK_REWARDS):  # a list: [0] is no dict key
        raise UserError(f"--rescore {cfg.rescore}: its task_type {task!r} has no default rewards "
                        f"(those of {', '.join(TASK_REWARDS)} have): name them, --reward_funcs")
    specs = cfg.reward_funcs or TASK_REWARDS[task]
    funcs, weights = given or rewards.load_rewards(specs, cfg.reward_weights)
    cfg = dataclasses.replace(cfg, reward_funcs=list(specs), reward_weights=list(weights.values()))
    on_error = metrics.on_reward_error(metrics.report_once())
    scored = preview.rescore(groups, funcs, weights, rewards.score_completions, on_error)
    return preview.write(preview.summarize(*scored, dataclasses.asdict(cfg)), out)


def finish(run, row, saved, stopping, started, main_process):
    """The run's last line: steps, time, last reward, reward errors, where the adapter is; a run
    stopped by a signal exits with `stopping`, its status (Ctrl-C 130, SIGTERM 143)."""
    minutes, step = (time.time() - started) / 60, row.get("step", run.start_step)
    reward = f", last reward {row['reward']:.3f}" if "reward" in row else ""
    if run.counters["reward_errors"]:
        reward += (f", {run.counters['reward_errors']} reward calls raised (each scored 0: "
                   "rewards/<name>/errors in metrics.jsonl)")
    if stopping:
        if main_process:
            print(f"interrupted at step {step} after {minutes:.1f} min{reward}: saved {saved}; "
                  "continue with the same command plus --resume")
        sys.exit(stopping)
    if main_process:
        print(f"done: {step} steps in {minutes:.1f} min{reward}; the adapter is in {saved}")
    return run.out


def main(argv=None):
    return train(parse_config(argv))


if __name__ == "__main__":
    cli.run(main)
