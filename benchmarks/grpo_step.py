"""Peak memory and step time of GRPO training at the paper's settings, per variant, on one GPU.

    python benchmarks/grpo_step.py                        # Qwen2-VL-2B architecture, random weights (no hub)
    python benchmarks/grpo_step.py --model PATH           # real weights from a local folder
    python benchmarks/grpo_step.py --tiny --steps 1       # smoke test of the script itself, CPU, tiny model

Settings (REFERENCE: the paper's recipe): 8 prompts x G = 8 completions, SAT-sized images (448 x 896 pixels =
512 visual tokens), 700 new tokens forced (random weights never stop early: the worst case), beta 0.04, mu 1.
Each variant runs in its own process so that its peak memory is its own. Reports peak allocated/reserved memory,
the step time split into generation / log-prob passes (reference) / update (forward, backward, optimizer), and
generated tokens per second; writes benchmarks/results/<gpu>.json and a markdown table.
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
import grpo  # noqa: E402
import tiny  # noqa: E402
import train  # noqa: E402

VARIANTS = {"lora": dict(use_liger=False), "lora+liger": dict(use_liger=True),
            "qlora+liger": dict(use_liger=True, load_in_4bit=True)}


def build_random_qwen2vl_2b(folder):
    """The Qwen2-VL-2B architecture (REFERENCE section 4) with random weights, and an offline processor."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tok = tiny.build_tokenizer(data.synthetic_vocabulary())
    ids = {t: tok.convert_tokens_to_ids(t) for t in tiny.SPECIAL_TOKENS}
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[16, 24, 24]),
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|endoftext|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2VLForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tiny.save_processor(folder, tok, max_pixels=401408)
    return folder


def run_variant(args):
    """One variant in this process: a few full GRPO steps; prints one JSON line."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    settings = dict(prompts=args.prompts, G=args.G, completion_tokens=args.completion_tokens, beta=0.04, mu=1,
                    image_pixels=args.image_side * args.image_side * 2)
    cfg = train.Config(model=args.model, output_dir="/tmp/bench", num_generations=args.G, prompts_per_step=args.prompts,
                       micro_batch_size=args.micro_batch_size, max_completion_length=args.completion_tokens,
                       beta=0.04, learning_rate=1e-5, **VARIANTS[args.variant])
    model, processor = train.load_model(cfg, device)
    images = [data.synthetic_row(random.Random(i), "count", args.image_side)[0] for i in range(args.prompts)]
    examples = [data.make_example(image.resize((args.image_side * 2, args.image_side)), "How many shapes are there?",
                                  ["1", "2", "3"], "2", random.Random(i), 3136, 401408) for i, image in enumerate(images)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: 1.0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for step in range(args.steps + 1):  # step 0 warms up (kernels, allocator) and is not counted
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync(); t0 = time.perf_counter()
        batch, texts = train.generate_rollouts(model, processor, examples, cfg, device)
        sync(); t1 = time.perf_counter()
        batch["advantages"] = grpo.group_advantages(torch.randn(len(texts), device=device), args.G)
        with model.disable_adapter():
            batch["ref_logp"] = train.batch_logps(model, batch, cfg)
        sync(); t2 = time.perf_counter()
        train.update(model, optimizer, scheduler, batch, cfg)
        sync(); t3 = time.perf_counter()
        if step:
            times.append((t1 - t0, t2 - t1, t3 - t2, int(batch["completion_mask"].sum())))
    gen, logp, upd, tokens = (sum(x) / len(times) for x in zip(*times))
    gib = 2 ** 30
    print(json.dumps({"variant": args.variant, "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                      "peak_allocated_gib": torch.cuda.max_memory_allocated() / gib if device.type == "cuda" else None,
                      "peak_reserved_gib": torch.cuda.max_memory_reserved() / gib if device.type == "cuda" else None,
                      "step_time_s": gen + logp + upd, "generation_s": gen, "logp_s": logp, "update_s": upd,
                      "tokens_per_s": tokens / gen, "settings": settings}))


def table(results):
    lines = ["| variant | peak allocated GiB | peak reserved GiB | step s | generation s | ref log-probs s | update s | tokens/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        mem = [f"{r[k]:.1f}" if r[k] is not None else "-" for k in ("peak_allocated_gib", "peak_reserved_gib")]
        lines.append(f"| {r['variant']} | {mem[0]} | {mem[1]} | {r['step_time_s']:.1f} | {r['generation_s']:.1f} | "
                     f"{r['logp_s']:.1f} | {r['update_s']:.1f} | {r['tokens_per_s']:.0f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a local model folder; default: build the 2B architecture with random weights")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"from {list(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant, after one warm-up step")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step (B)")
    parser.add_argument("--G", type=int, default=8, help="completions per prompt")
    parser.add_argument("--completion_tokens", type=int, default=700, help="new tokens per completion (forced)")
    parser.add_argument("--micro_batch_size", type=int, default=8, help="sequences per forward/backward")
    parser.add_argument("--image_side", type=int, default=448, help="images are side x 2*side pixels (448: 512 tokens)")
    parser.add_argument("--tiny", action="store_true", help="smoke-test the script on CPU with the tiny model")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = parser.parse_args()
    if args.variant:
        return run_variant(args)
    if args.model is None:
        folder = Path(tempfile.gettempdir()) / ("r1v-bench-tiny" if args.tiny else "r1v-bench-qwen2vl-2b")
        if args.tiny:
            args.model = str(tiny.build_tiny_model(folder, data.synthetic_vocabulary()))
        else:
            args.model = str(folder if (folder / "config.json").is_file() else build_random_qwen2vl_2b(folder))
    results = []
    for variant in args.variants:
        cmd = [sys.executable, __file__, "--variant", variant, "--model", args.model, "--steps", str(args.steps),
               "--prompts", str(args.prompts), "--G", str(args.G), "--completion_tokens", str(args.completion_tokens),
               "--micro_batch_size", str(args.micro_batch_size), "--image_side", str(args.image_side)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{variant}: failed\n{done.stderr[-3000:]}", file=sys.stderr)
            continue
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    print(table(results))
    if args.tiny:  # a smoke test measures nothing worth keeping
        return results
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    name = (results[0]["gpu"] if results else "none").replace(" ", "-")
    (out / f"{name}.json").write_text(json.dumps(results, indent=2))
    (out / f"{name}.md").write_text(table(results) + "\n")
    return results


if __name__ == "__main__":
    main()
