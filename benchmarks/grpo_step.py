"""Peak memory and step time of GRPO training at the paper's settings, per variant, on one GPU.

    python benchmarks/grpo_step.py                  # Qwen2-VL-2B architecture, random weights
    python benchmarks/grpo_step.py --model PATH     # real weights from a local folder
    python benchmarks/grpo_step.py --tiny --steps 1 # smoke test of the script itself, tiny model

Settings (REFERENCE: the paper's recipe): 8 prompts x G = 8 completions, SAT-sized images
(448 x 896 pixels = 512 visual tokens), exactly 700 new tokens per completion (generation's
min_new_tokens = max_new_tokens keeps EOS from being sampled earlier: the worst case), beta 0.04,
mu 1. Each variant runs in its own process, so that its peak memory is its own, and calls the
trainer's own step functions (policy.generate, train.add_old_and_ref_logps, train.update).
Reports peak allocated/reserved memory, the step time split into generation / log-prob passes
(reference) / update (forward, backward, optimizer), and generated tokens per second; writes
benchmarks/results/<gpu>.json and a markdown table.
"""

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import demo  # noqa: E402
import grpo  # noqa: E402
import policy  # noqa: E402
import train  # noqa: E402

VARIANTS = {"lora": dict(use_liger=False), "lora+liger": dict(use_liger=True),
            "qlora+liger": dict(use_liger=True, load_in_4bit=True)}


def build_random_qwen2vl_2b(folder):
    """The Qwen2-VL-2B architecture (REFERENCE section 4), random weights, offline processor."""
    from transformers import Qwen2VLForConditionalGeneration

    tok = demo.build_tokenizer(demo.synthetic_vocabulary())
    config = demo.qwen2vl_config(tok, 1536, 8960, 28, 12, 2, [16, 24, 24],
                                 dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16,
                                      mlp_ratio=4), rope_theta=1e6, vocab_size=151936)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2VLForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    demo.save_processor(folder, tok, max_pixels=data.MAX_PIXELS)
    return folder


def run_variant(args):
    """One variant in this process: a few full GRPO steps; prints one JSON line."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    settings = dict(prompts=args.prompts, G=args.G, completion_tokens=args.completion_tokens,
                    beta=0.04, mu=1, image_pixels=args.image_side * args.image_side * 2)
    cfg = train.Config(model=args.model, num_generations=args.G, prompts_per_step=args.prompts,
                       micro_batch_size=args.micro_batch_size,
                       max_completion_length=args.completion_tokens, beta=0.04,
                       learning_rate=1e-5, **VARIANTS[args.variant])
    model, processor = policy.load_base_model(cfg.model, device, cfg.load_in_4bit)
    model = policy.add_lora(model, cfg.lora_r, cfg.lora_alpha)
    gen_config = policy.generation_config(processor, max_new_tokens=cfg.max_completion_length,
                                          temperature=cfg.temperature, top_k=cfg.top_k)
    gen_config.min_new_tokens = cfg.max_completion_length  # every completion has them all
    images = [demo.synthetic_row(random.Random(i), "count", args.image_side)[0]
              for i in range(args.prompts)]
    fields = dict(question="How many shapes are there?", choices=["1", "2", "3"], answer="2")
    examples = [data.make_example(image.resize((args.image_side * 2, args.image_side)), fields,
                                  random.Random(i)) for i, image in enumerate(images)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=cfg.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda index: 1.0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for step in range(args.steps + 1):  # step 0 warms up (kernels, allocator), not counted
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        rollout, texts = policy.generate(model, processor, examples, gen_config, args.G)
        sync()
        t1 = time.perf_counter()
        rollout.advantages = grpo.group_advantages(torch.randn(len(texts), device=device), args.G)
        train.add_old_and_ref_logps(model, rollout, cfg)
        sync()
        t2 = time.perf_counter()
        train.update(model, optimizer, scheduler, rollout, cfg)
        sync()
        t3 = time.perf_counter()
        if step:
            times.append((t1 - t0, t2 - t1, t3 - t2, int(rollout.completion_mask.sum())))
    gen, logp, upd, tokens = (sum(x) / len(times) for x in zip(*times))
    cuda = device.type == "cuda"
    print(json.dumps({
        "variant": args.variant, "gpu": torch.cuda.get_device_name() if cuda else "cpu",
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        "step_time_s": gen + logp + upd, "generation_s": gen, "logp_s": logp, "update_s": upd,
        "tokens_per_s": tokens / gen, "completion_tokens": tokens / len(texts),
        "settings": settings}))


def table(results):
    lines = ["| variant | peak allocated GiB | peak reserved GiB | step s | generation s "
             "| ref log-probs s | update s | tokens/s |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        mem = [f"{r[k]:.1f}" if r[k] is not None else "-"
               for k in ("peak_allocated_gib", "peak_reserved_gib")]
        lines.append(f"| {r['variant']} | {mem[0]} | {mem[1]} | {r['step_time_s']:.1f} "
                     f"| {r['generation_s']:.1f} | {r['logp_s']:.1f} | {r['update_s']:.1f} "
                     f"| {r['tokens_per_s']:.0f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="a local model folder (default: the 2B architecture, random weights)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="which variants to run (default: all)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps, after a warm-up step")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step (B)")
    parser.add_argument("--G", type=int, default=8, help="completions per prompt")
    parser.add_argument("--completion_tokens", type=int, default=700,
                        help="new tokens per completion (all of them: EOS is held back)")
    parser.add_argument("--micro_batch_size", type=int, default=8,
                        help="sequences per forward/backward")
    parser.add_argument("--image_side", type=int, default=448,
                        help="images are side x 2*side pixels (448: 512 visual tokens)")
    parser.add_argument("--tiny", action="store_true",
                        help="smoke-test the script with the tiny model (CPU)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: one variant, here
    args = parser.parse_args()
    if args.variant:
        return run_variant(args)
    if args.model is None:
        name = "r1v-bench-tiny" if args.tiny else "r1v-bench-qwen2vl-2b"
        folder = Path(tempfile.gettempdir()) / name
        if args.tiny:
            args.model = str(demo.build_tiny_model(folder, demo.synthetic_vocabulary()))
        elif not (folder / "config.json").is_file():
            args.model = str(build_random_qwen2vl_2b(folder))
        else:
            args.model = str(folder)
    results, failed = [], []
    for variant in args.variants:
        cmd = [sys.executable, __file__, "--variant", variant, "--model", args.model,
               "--steps", str(args.steps), "--prompts", str(args.prompts), "--G", str(args.G),
               "--completion_tokens", str(args.completion_tokens),
               "--micro_batch_size", str(args.micro_batch_size),
               "--image_side", str(args.image_side)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{variant}: failed\n{done.stderr[-3000:]}", file=sys.stderr)
            failed.append(variant)
            continue
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    print(table(results))
    if not args.tiny and results:  # a smoke test measures nothing worth keeping
        out = ROOT / "benchmarks" / "results"
        out.mkdir(parents=True, exist_ok=True)
        name = results[0]["gpu"].replace(" ", "-")
        (out / f"{name}.json").write_text(json.dumps(results, indent=2))
        (out / f"{name}.md").write_text(table(results) + "\n")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")
    return results


if __name__ == "__main__":
    main()
