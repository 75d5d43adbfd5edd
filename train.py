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
from r1v import cli, metrics, policy, processes, rows, runs
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
    micro_batch_size: int = flag(8, "sequences per forward/backward (same math)", min=1)
    max_steps: int = flag(0, "steps to train; 0 = num_train_epochs over the dataset", min=0)
    num_train_epochs: float = flag(2.0, "epochs over the dataset when max_steps is 0", above=0)
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
    temperature: float = flag(1.0, "sampling temperature; log-probs use it too (detail 8)",
                              above=0)
    top_k: int = flag(50, "top-k sampling (0 = off)", min=0)
    top_p: float = flag(1.0, "nucleus sampling (1.0 = off)", above=0, max=1)
    # optimisation
    learning_rate: float = flag(1e-5, "AdamW peak learning rate (paper: 1e-6, full fine-tune)",
                                above=0)
    weight_decay: float = flag(0.0, "AdamW weight decay", min=0)
    lr_scheduler: str = flag("linear", "after warmup: linear decay to 0 (the paper) or constant",
                             choices=("linear", "constant"))
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


def parse_config(argv=None):
    """The command line is the Config; --demo applies demo.DEMO first, the flags given win."""
    return cli.parse(Config, argv, __doc__, presets={"demo": demo.DEMO})


# Settings that may change on --resume: they do not touch the saved state.
RESUMABLE = {"max_steps", "num_train_epochs", "output_dir", "overwrite", "resume", "eval_steps",
             "eval_limit", "eval_dataset", "log_samples_steps", "num_samples", "save_steps",
             "save_total_limit", "max_nonfinite_steps", "micro_batch_size", "logp_chunk_size",
             "gradient_checkpointing", "use_liger", "static_cache", "report_to"}


# --- the step -----------------------------------------------------------------------------------

def generate(model, processor, examples, gen_config, cfg, eos_ids):
    """G completions per prompt in one batched call, masked up to and including the first EOS,
    from positions (detail 7)."""
    rollout, texts = policy.generate(model, processor, examples, gen_config,
                                     cfg.num_generations, cfg.max_prompt_length)
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
    Returns this rollout's share of the batch's loss and of its stats (token means), and the
    lowest and highest micro-batch clip ratios."""
    model.train()
    loss_sum, stats_sum, low, high = 0.0, {}, [], []
    for _, mb in rollout.micro_batches(cfg.micro_batch_size):
        loss, stats = micro_batch_loss(model, mb, cfg, num_sequences, num_tokens)
        loss.backward()
        loss_sum += loss.item()
        share = float(mb.completion_mask.sum() / num_tokens)
        for key, value in stats.items():
            stats_sum[key] = stats_sum.get(key, 0.0) + value * share
        if "clip_ratio/low_mean" in stats:
            low.append(stats["clip_ratio/low_mean"])
            high.append(stats["clip_ratio/high_mean"])
    if low:  # TRL takes these across processes; one process here: across micro-batches
        stats_sum.update({"clip_ratio/low_min": min(low), "clip_ratio/high_max": max(high)})
    return loss_sum, stats_sum


def update(model, optimizer, scheduler, rollout, cfg, procs):
    """--num_iterations optimizer updates on one generation batch (this process's share). A
    non-finite loss or gradient never reaches the weights: that update is skipped. Returns the
    means over the updates of the whole batch's loss, stats and gradient norm (before
    clipping), and how many updates were skipped."""
    params = [p for p in model.parameters() if p.requires_grad]
    num_sequences, num_tokens = procs.sum([len(rollout), rollout.completion_mask.sum()])
    losses, grad_norms, stats = [], [], {}
    for _ in range(cfg.num_iterations):
        loss, iteration = processes.gather_stats(procs, *accumulate_gradients(
            model, rollout, cfg, num_sequences, num_tokens))
        procs.sum_gradients(params)  # the one-process gradient (detail 15)
        for key, value in iteration.items():
            stats[key] = stats.get(key, 0.0) + value / cfg.num_iterations
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        if np.isfinite(loss) and torch.isfinite(grad_norm):
            optimizer.step()
            scheduler.step()
            grad_norms.append(grad_norm.item())
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss)
    return {**stats, "loss": float(np.mean(losses)),
            "grad_norm": float(np.mean(grad_norms)) if grad_norms else float("nan"),
            "nonfinite": cfg.num_iterations - len(grad_norms)}


def lr_factor(index, warmup, total, kind):
    """The peak learning rate's multiplier at optimizer update `index` (0-based): linear warmup
    from 1/warmup, then constant or a linear decay to 0 at update `total`."""
    if index < warmup:
        return (index + 1) / warmup
    return 1.0 if kind == "constant" else max(0.0, (total - index) / (total - warmup))


# --- setup --------------------------------------------------------------------------------------

@dataclass
class Run:
    """What the loop works with, made ready by `setup`."""
    out: object                      # the run folder
    dataset: data.Examples           # the training rows...
    sampler: data.PromptSampler      # ...and the order their prompts come in
    held_out: object                 # eval items for eval/accuracy, or None
    reward_funcs: dict
    weights: dict
    model: object = None             # the peft model: base weights frozen, LoRA trained
    processor: object = None
    optimizer: object = None
    scheduler: object = None
    max_steps: int = 0
    steps_per_epoch: int = 0
    start_step: int = 0
    counters: dict = dataclasses.field(default_factory=lambda: {
        "num_tokens": 0, "nonfinite_steps": 0, "skipped_rows": 0, "consecutive_nonfinite": 0})


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
    rows.check_rows(examples, "checking held-out rows")
    if examples.task_type != task_type:
        raise UserError(f"--eval_dataset {source}: {examples.task_type} rows, but the training "
                        f"rows are {task_type}")
    return examples


def check_inputs(cfg, procs):
    """Everything that can be checked before any model loads, in the README's order ("When
    things go wrong"). Returns the Run so far, the rows' prompt texts and the checkpoint."""
    given = cfg.reward_funcs and rewards.load_rewards(cfg.reward_funcs, cfg.reward_weights)
    out = runs.writable_dir(cfg.output_dir, "--output_dir")
    runs.prepare_output_dir(out, cfg.resume, cfg.overwrite, clear=procs.main)
    procs.accelerator.wait_for_everyone()
    pixels = data.View(cfg.min_pixels, cfg.max_pixels)  # the model's prompt and frame come later
    dataset = data.load_examples(cfg.dataset, cfg.dataset_split, cfg.dataset_limit, cfg.seed,
                                 pixels, "--dataset", cfg.synthetic_tasks, cfg.synthetic_image_size)
    prompt_rows = rows.check_rows(dataset, progress=procs.main)
    scoring = given or rewards.load_rewards(TASK_REWARDS[dataset.task_type], cfg.reward_weights)
    held_out = held_out_examples(cfg, pixels, dataset.task_type) if cfg.eval_steps else None
    run = Run(out, dataset, data.PromptSampler(len(dataset), cfg.prompts_per_step, cfg.seed),
              held_out, *scoring)
    checkpoint = runs.find_checkpoint(out, cfg.resume) if cfg.resume else None
    if checkpoint:
        runs.check_resumable(checkpoint[0], checkpoint[2], dataclasses.asdict(cfg), RESUMABLE)
    procs.start_tracker(cfg.report_to, dataclasses.asdict(cfg), out,
                        checkpoint[1]["step"] if checkpoint else 0)
    return run, prompt_rows, checkpoint


def load_model(cfg, device, name=None):
    """The policy: the base model (--model, or `name`) with a fresh LoRA adapter."""
    return models.load_policy(
        name or cfg.model, device, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout, load_in_4bit=cfg.load_in_4bit, use_liger=cfg.use_liger,
        train_vision=cfg.train_vision, gradient_checkpointing=cfg.gradient_checkpointing)


def setup(cfg, procs):
    """0. The checks, then the model (its prompt, the rows' prompt lengths, a fresh LoRA adapter,
    the same on every process), the optimizer and its schedule; on --resume, a checkpoint's."""
    run, prompt_rows, checkpoint = check_inputs(cfg, procs)
    set_seed(cfg.seed)  # the same on every process: the same fresh adapter
    name = cfg.model
    if cfg.model == demo.MODEL:
        with procs.accelerator.main_process_first():  # built once, then found by the others
            name = demo.build_demo_model(run.out / "demo-base", cfg.seed, cfg.synthetic_tasks,
                                         cfg.synthetic_image_size)
    config, run.processor = models.load_config(name), models.load_processor(name)
    view = data.model_view(config, run.processor, cfg.prompt_format, cfg.min_pixels,
                           cfg.max_pixels)
    run.dataset.shown_as(view)
    run.held_out = run.held_out and evaluation.eval_items(run.held_out.shown_as(view),
                                                          "held-out", run.held_out.name)
    rows.check_prompt_lengths(run.processor.tokenizer, prompt_rows, run.dataset.name, view,
                              cfg.max_prompt_length)
    run.model = load_model(cfg, procs.device, name)
    params = [p for p in run.model.parameters() if p.requires_grad]
    procs.start_equal(params)
    if procs.main:
        (run.out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    run.steps_per_epoch = len(run.dataset) // cfg.prompts_per_step
    run.max_steps = cfg.max_steps or max(1, int(cfg.num_train_epochs * run.steps_per_epoch))
    total = run.max_steps * cfg.num_iterations
    warmup = int(cfg.warmup_ratio * total)
    run.optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(
        run.optimizer, lambda index: lr_factor(index, warmup, total, cfg.lr_scheduler))
    if procs.world > 1:  # each process samples its own completions
        torch.manual_seed(cfg.seed + 1_000 * procs.rank)
    if checkpoint:
        run.start_step = runs.restore(*checkpoint[:2], run.model, run.optimizer, run.scheduler,
                                      run.sampler, procs.rank, procs.world, cfg.seed)
        run.counters.update(checkpoint[1]["counters"])
    for log in ("metrics.jsonl", "samples.jsonl") if procs.main else ():
        runs.truncate_log(run.out / log, run.start_step)
    return run


# --- the loop -----------------------------------------------------------------------------------

def count_step(counters, procs, rollout, skipped, nonfinite, stop_requested):
    """The whole batch's counts after a step (tokens seen, rows skipped); True if any process
    was asked to stop (Ctrl-C)."""
    seen = rollout.prompt_mask.sum() + rollout.completion_mask.sum()
    tokens, skipped, stop = (int(x) for x in procs.sum([seen, skipped, int(stop_requested)]))
    counters["num_tokens"] += tokens
    counters["skipped_rows"] += skipped
    counters["nonfinite_steps"] += nonfinite
    counters["consecutive_nonfinite"] = counters["consecutive_nonfinite"] + 1 if nonfinite else 0
    return bool(stop)


def evaluate_and_save(run, cfg, procs, row, scored, stopping):
    """After a step: eval/accuracy (eval/mAP for detection) when due, greedy on the held-out
    items split over the processes; the logs; a checkpoint when due, written by the first
    process with every process's RNG state. Returns the checkpoint's path, or None."""
    step = row["step"]
    if cfg.eval_steps and (step % cfg.eval_steps == 0 or step == run.max_steps):
        mine = [run.held_out[i] for i in procs.share(range(len(run.held_out)))]
        judged = procs.gather(list(evaluation.predict(run.model, run.processor, mine,
                                                      cfg.micro_batch_size,
                                                      cfg.max_completion_length)))
        row["eval/mAP" if run.dataset.task_type == "ovd" else "eval/accuracy"] = \
            evaluation.score(sum(judged, []))
    if procs.main:
        metrics.write_logs(run.out, row, scored, cfg.log_samples_steps, cfg.num_samples,
                           data.gold_of)
        procs.accelerator.log(row, step=step)
    if run.counters["consecutive_nonfinite"] >= cfg.max_nonfinite_steps:
        raise UserError(f"step {step}: {run.counters['consecutive_nonfinite']} consecutive "
                        "steps had a non-finite loss or gradient; stopping. They never reached "
                        f"the weights: the last checkpoint in {run.out} is good. Try a lower "
                        "--learning_rate.")
    if not ((cfg.save_steps and step % cfg.save_steps == 0) or step == run.max_steps or stopping):
        return None
    rng = procs.gather(runs.rng_state())  # every process's, to resume exactly
    state = {"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
             "rng": rng, "sampler": run.sampler.state_dict(), "counters": run.counters}
    return procs.main and runs.save_checkpoint(run.out, step, run.model, state,
                                               dataclasses.asdict(cfg), cfg.save_total_limit)


def train(cfg):
    procs = processes.Processes(cfg.output_dir, cfg.report_to, cfg.prompts_per_step)
    if cfg.use_liger is None:  # on where its kernels run
        cfg = dataclasses.replace(cfg, use_liger=procs.device.type == "cuda")
    run = setup(cfg, procs)
    eos_ids = [models.special_tokens(run.processor).eos]
    gen_config = policy.generation_config(
        run.processor, max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature,
        top_k=cfg.top_k, top_p=cfg.top_p, static_cache=cfg.static_cache)
    report, row, saved, stopping, started = metrics.report_once(), {}, None, False, time.time()
    with processes.stop_on_sigint(procs.main) as stop, contextlib.ExitStack() as cleanup:
        cleanup.callback(procs.accelerator.end_training)  # flushes the tracker, on errors too
        bar = tqdm(range(run.start_step + 1, run.max_steps + 1), initial=run.start_step,
                   total=run.max_steps, desc=cfg.objective.upper(), dynamic_ncols=True,
                   disable=not procs.main)
        for step in bar:
            t0 = time.time()
            # 1. sample B prompts; this process takes its share (detail 15)
            examples, skipped = rows.take(run.dataset, procs.share(run.sampler.next_batch()),
                                          report)
            if cfg.objective == "sft":  # the paper's baseline: the gold answers, supervised
                rollout, scored = policy.answer_rollout(run.processor, examples, [
                    data.answer_completion(ex) for ex in examples], procs.device), None
            else:
                # 2. generate G completions per prompt, in one batched call
                rollout, texts = generate(run.model, run.processor, examples, gen_config, cfg,
                                          eos_ids)
                # 3. score them with the rewards; the metrics see every process's
                scored = score(texts, examples, rollout, eos_ids, run.reward_funcs, run.weights,
                               cfg.num_generations, metrics.on_reward_error(report))
                scored = scored.gathered(procs)
                # 4. advantages within each group (detail 1), this process's share of them
                advantages = grpo.group_advantages(torch.tensor(scored.total, device=procs.device),
                                                   cfg.num_generations, cfg.scale_rewards)
                rollout.advantages = procs.share(advantages)                   # (N,)
                # 5. the sampling policy's and the reference's log-probs
                add_old_and_ref_logps(run.model, rollout, cfg)
            # 6. update the LoRA weights on micro-batches
            learning_rate = run.scheduler.get_last_lr()[0]
            stats = update(run.model, run.optimizer, run.scheduler, rollout, cfg, procs)
            stopping = count_step(run.counters, procs, rollout, skipped, stats.pop("nonfinite"),
                                  stop["requested"])
            # 7. log, evaluate, checkpoint
            counted = {k: v for k, v in run.counters.items() if k != "consecutive_nonfinite"}
            row = {"step": step, "epoch": round(step / max(1, run.steps_per_epoch), 4),
                   **(metrics.rollout_metrics(scored, cfg.num_generations) if scored else {}),
                   **stats, **counted, "learning_rate": learning_rate,
                   "step_time": time.time() - t0}
            saved = evaluate_and_save(run, cfg, procs, row, scored, stopping) or saved
            shown = "reward" if "reward" in row else "loss"
            bar.set_postfix({shown: f"{row[shown]:.3f}", "step_time": f"{row['step_time']:.2f}s"})
            if stopping:
                break
        bar.close()
        procs.accelerator.wait_for_everyone()  # the last checkpoint is complete when any ends
    return finish(run, row, saved, stopping, started, procs.main)


def finish(run, row, saved, stopping, started, main_process):
    """The run's last line: steps, time, last reward, where the adapter is; Ctrl-C exits 130."""
    minutes, step = (time.time() - started) / 60, row.get("step", run.start_step)
    reward = f", last reward {row['reward']:.3f}" if "reward" in row else ""
    if stopping:
        if main_process:
            print(f"interrupted at step {step} after {minutes:.1f} min{reward}: saved {saved}; "
                  "continue with the same command plus --resume")
        sys.exit(130)
    if main_process:
        print(f"done: {step} steps in {minutes:.1f} min{reward}; the adapter is in {saved}")
    return run.out


def main(argv=None):
    return train(parse_config(argv))


if __name__ == "__main__":
    cli.run(main)
