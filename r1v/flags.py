"""The flags that are not the algorithm's: which model and how it sees images (train.py and
eval.py); for training the data, the run folder, speed and memory, evaluation, logging and
checkpoints (train.py's Config adds the GRPO recipe's flags); eval.py's."""

import re
from dataclasses import dataclass
from pathlib import Path

from r1v import cli, hub, synthetic
from r1v.cli import UserError, flag
from r1v.model import PROMPT_FORMATS
from r1v.images import MAX_PIXELS, MIN_PIXELS


@dataclass
class ModelFlags:
    """The flags train.py's and eval.py's configs share: the model, and how it sees images."""
    model: str = flag("Qwen/Qwen2-VL-2B", "hub id or local folder of a Qwen2-VL, Qwen2.5-VL or "
                      "Qwen3-VL model (train.py: 'demo' builds the tiny offline one; "
                      "'demo-qwen3-vl', 'demo-qwen2.5-vl' one of that family)")
    min_pixels: int = flag(MIN_PIXELS, "smaller images are upscaled", min=1)
    max_pixels: int = flag(MAX_PIXELS, "larger images are downscaled (512 tokens of 28 pixels; "
                           "Qwen3-VL's 32-pixel tokens: 392)", min=1)
    prompt_format: str = flag("auto", "r1: the paper's base-model prompt; chat: the checkpoint's "
                              "chat template; auto: chat for Qwen2.5-VL and Qwen3-VL (Instruct "
                              "and Thinking checkpoints), r1 for Qwen2-VL (eval.py with a run's "
                              "--adapter: the format it was trained with)",
                              choices=PROMPT_FORMATS)
    load_in_4bit: bool = flag(False, "QLoRA: the language model in 4-bit NF4")

    def __post_init__(self):
        cli.check_values(self)
        if self.min_pixels > self.max_pixels:
            raise UserError(f"--min_pixels {self.min_pixels} is above --max_pixels "
                            f"{self.max_pixels}")


@dataclass
class DecodeFlags:
    """How generation decodes (r1v/decode.py), in train.py and eval.py."""
    compile_decode: bool | None = flag(
        None, "compile the decode step once per run on a static KV cache of the run's shape "
        "(N sequences x the longest prompt + the completion, kept through the step; on CUDA one "
        "CUDA graph: the first step compiles, a minute or more); a compiler that fails leaves "
        "it eager, with a warning", default_help="on with CUDA, off on CPU")
    compile_backend: str = flag("inductor", "torch.compile backend of the decode step (eager, "
                                "aot_eager: checks on CPU in seconds, no speed-up)",
                                choices=("inductor", "cudagraphs", "aot_eager", "eager"))


@dataclass
class SyntheticFlags:
    """The offline demo's rows (--dataset synthetic), in train.py and eval.py."""
    synthetic_tasks: list[str] = flag(list(synthetic.CHOICE_TASKS), "synthetic question types: "
                                      f"{', '.join(synthetic.CHOICE_TASKS)} (multiple choice), "
                                      "locate (rec) or detect (ovd)")
    synthetic_image_size: int = flag(112, "side of synthetic images (28 pixels = 1 token)", min=1)


@dataclass
class RunFlags(ModelFlags, DecodeFlags, SyntheticFlags):
    # the data, and where the run goes
    dataset: str = flag("array/SAT", "hub id or folder in SAT's or RefCOCO's schema, a .jsonl "
                        "(choice, rec or ovd rows: README), or 'synthetic'")
    dataset_split: str = flag("train", "split of a hub or folder dataset")
    dataset_limit: int = flag(15000, "first N rows (0 = all); synthetic: rows to make", min=0)
    output_dir: str = flag("runs/r1zero", "metrics, samples, config and checkpoints go here")
    overwrite: bool = flag(False, "start afresh in an --output_dir that holds a run")
    seed: int = flag(42, "seeds data order, option shuffling, sampling and LoRA init", min=0)
    # speed and memory (README "Memory and speed on one GPU")
    use_liger: bool | None = flag(None, "Liger: its fused linear GRPO loss, and on CUDA its "
                                  "Triton kernels (norms, RoPE, SwiGLU)",
                                  default_help="on with CUDA, off on CPU")
    gradient_checkpointing: bool = flag(True, "recompute activations: less memory, more time")
    cpu_threads: int = flag(0, "torch's threads on CPU (0: its default, one a core); the demo "
                            "runs 1: a tiny model's threads mostly wait on each other", min=0)
    prefill_chunk_size: int = flag(256, "prompt tokens a prefill pass in generation (0: all at "
                                   "once); its activations scale with it", min=0)
    logp_chunk_size: int = flag(512, "completion tokens per vocabulary-projection chunk", min=1)
    static_cache: bool = flag(False, "a static KV cache of one shape for the run in generation, "
                              "without compiling (--compile_decode implies it)")
    # evaluation during training
    eval_steps: int = flag(0, "every N steps log eval/accuracy (0 = never)", min=0)
    eval_limit: int = flag(64, "held-out prompts per evaluation", min=1)
    eval_dataset: str | None = flag(None, "held-out prompts: a .jsonl, hub id or folder",
                                    default_help="SAT's val split, or other synthetic rows")
    # logging and checkpoints
    log_samples_steps: int = flag(10, "every N steps write samples.jsonl (0 = never)", min=0)
    num_samples: int = flag(4, "prompts whose G completions samples.jsonl gets each time",
                            min=1)
    save_steps: int = flag(100, "checkpoint every N steps (0 = only at the end)", min=0)
    save_total_limit: int = flag(3, "keep the newest K checkpoints (0 = all)", min=0)
    resume: str | None = flag(None, "continue from the newest checkpoint in output_dir, or PATH",
                              nargs="?", const="latest", default_help="no")
    allow_changed_inputs: bool = flag(False, "--resume although the --dataset or --eval_dataset "
                                      "file or a reward's file was edited since the checkpoint")
    max_nonfinite_steps: int = flag(5, "stop after N consecutive non-finite steps", min=1)
    report_to: str = flag("none", "also log the metrics to tensorboard (in OUTPUT_DIR/r1v) or "
                          "wandb, through accelerate", choices=("none", "tensorboard", "wandb"))
    # will it fit? (README)
    plan_memory: bool = flag(False, "estimate this run's CUDA memory a step, phase by phase, "
                             "from --model's config alone (no weights, no data), write "
                             "OUTPUT_DIR/memory_plan.json and stop")
    gpu_memory_gib: float | None = flag(None, "the card --plan_memory plans for", above=0,
                                        default_help="the visible GPU's, else 16")
    # will the reward teach? (README "Prototyping a reward")
    preview_rewards: int = flag(0, "N > 0: sample G completions for the run's first N prompts "
                                "as its first steps would, score them with its rewards, write "
                                "OUTPUT_DIR/reward_preview.json and stop (nothing trained)",
                                min=0)
    rescore: str | None = flag(None, "score the completions a run logged (RUN/samples.jsonl) "
                               "with --reward_funcs, no model loaded; the same report",
                               default_help="no")


BENCHMARKS = ("cvbench", "sat", *hub.REFCOCO)


@dataclass
class EvalConfig(ModelFlags, DecodeFlags, SyntheticFlags):
    """eval.py's flags."""
    adapter: str | None = flag(None, "a LoRA/QLoRA adapter folder (RUN_DIR/checkpoint-N)",
                               default_help="none, the base model")
    benchmark: str = flag("cvbench", "what to evaluate on", choices=BENCHMARKS)
    dataset: str | None = flag(None, "hub id or local folder of the benchmark, a .jsonl task "
                               "of your own (same schema as training), or 'synthetic' (the "
                               "demo's: --synthetic_tasks, --synthetic_image_size, --seed)",
                               default_help="the benchmark's hub id, e.g. lmms-lab/RefCOCO")
    split: str = flag("val", "split: SAT val | test; RefCOCO/+ val | testA | testB (| test); "
                      "RefCOCOg val | test")
    output_dir: str | None = flag(None, "where predictions.jsonl and summary.json go",
                                  default_help="runs/eval/<model>[-<adapter>]/<benchmark>")
    limit: int = flag(0, "evaluate only the first N items (0 = all)", min=0)
    batch_size: int = flag(16, "prompts per generate call", min=1)
    max_new_tokens: int = flag(1024, "most new tokens per response (paper: 1024)", min=1)
    seed: int = flag(0, "seeds the option shuffling of SAT and JSONL rows; draws the synthetic "
                     "rows (training's --seed 42 gives the rows a demo trained on)", min=0)
    merge_adapter: bool = flag(False, "merge the adapter into the base weights: faster "
                               "generation, but in bf16 (GPU) small updates round away, so the "
                               "model scored is not exactly the one trained (not with 4-bit)")
    overwrite: bool = flag(False, "discard predictions of another model/data in --output_dir")

    def __post_init__(self):
        super().__post_init__()
        if self.merge_adapter and self.load_in_4bit:
            raise UserError("--merge_adapter cannot merge into 4-bit weights (--load_in_4bit)")
        if self.merge_adapter and not self.adapter:  # else ignored, yet a setting resume compares
            raise UserError("--merge_adapter merges an --adapter: give one, or leave it out")
        if self.dataset and (self.dataset.endswith(".jsonl") or self.dataset == "synthetic"):
            self.benchmark = "jsonl" if self.dataset.endswith(".jsonl") else "synthetic"
        if self.output_dir is None:
            name = Path(self.model.rstrip("/")).name
            if self.adapter:
                name += "-" + "-".join(Path(self.adapter).resolve().parts[-2:])
            task = Path(self.dataset).stem if self.benchmark == "jsonl" else self.benchmark
            task += f"-{self.split}" if self.benchmark in ("sat", *hub.REFCOCO) else ""
            self.output_dir = str(Path("runs/eval") / re.sub(r"[^\w.-]+", "_", name) / task)
