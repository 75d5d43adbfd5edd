"""README's "Will it fit?" rows: the memory plan (train.py --plan_memory) of released
architectures at the paper's settings, per tuning, decode step and generation batch, offline.

    python benchmarks/plan_table.py                                 # Qwen3-VL 2B, 4B, 8B
    python benchmarks/plan_table.py --models qwen2-vl-2b --generation_batch_sizes 0 16

Each architecture's config.json is written by `python -m r1v.tiny NAME` (no weights, no hub);
each row is one plan (a minute or a few on a CPU), planned for an 80 GiB card so that no
alternatives are planned beside it. Prints the Markdown table, and writes it (.md) and every
plan's phases and settings (.json) to --out.
"""

import argparse
import itertools
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from r1v import memory, tiny  # noqa: E402

CARDS = (12, 16, 24)  # GiB: a row fits a card when its peak + what is not modelled does


def plan(config_dir, tuning, decode, generation_batch_size, out):
    flags = ["--model", str(config_dir), "--plan_memory", "--output_dir", str(out),
             "--gpu_memory_gib", "80", "--generation_batch_size", str(generation_batch_size),
             "--compile_decode" if decode == "compiled" else "--no-compile_decode"]
    return train.train(train.parse_config(flags + (["--load_in_4bit"] if tuning == "QLoRA"
                                                   else [])))


def row(name, tuning, decode, batch, result):
    phases = result["phases"]
    fits = ["✓" if result["peak_gib"] + memory.NOT_MODELLED_GIB <= card else "✗"
            for card in CARDS]
    return (f"| {name} | {tuning} | {decode} | {batch or 'all'} | "
            + " | ".join(f"{phases[p]:.2f}" for p in ("generation", "decode", "log-probs"))
            + f" | {phases['update']:.2f} | **{result['peak_gib']:.2f}** | "
            + " | ".join(fits) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["qwen3-vl-2b", "qwen3-vl-4b",
                                                       "qwen3-vl-8b"],
                        choices=[*tiny.ARCHITECTURES, *tiny.ARCHITECTURES_3])
    parser.add_argument("--tunings", nargs="+", default=["LoRA", "QLoRA"],
                        choices=["LoRA", "QLoRA"])
    parser.add_argument("--decodes", nargs="+", default=["compiled", "eager"],
                        choices=["compiled", "eager"])
    parser.add_argument("--generation_batch_sizes", nargs="+", type=int, default=[0, 16],
                        help="sequences per generate call (0: all 64 in one)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "plans"))
    parser.add_argument("--name", default="qwen3-vl", help="the files' name in --out")
    args = parser.parse_args()
    header = ["| model | tuning | decode step | sequences a generate call | generation | decode "
              "| log-probs | update | peak | " + " | ".join(f"{c} GB" for c in CARDS) + " |",
              "|---" * 9 + "|---" * len(CARDS) + "|"]
    lines, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            config_dir = Path(tmp) / name
            tiny.architecture(name).save_pretrained(config_dir)
            for tuning, decode, batch in itertools.product(args.tunings, args.decodes,
                                                           args.generation_batch_sizes):
                result = plan(config_dir, tuning, decode, batch, Path(tmp) / "plan")
                lines.append(row(name, tuning, decode, batch, result))
                results.append({"model": name, "tuning": tuning, "decode": decode,
                                "generation_batch_size": batch, "peak_gib": result["peak_gib"],
                                "phases": result["phases"], "fixed_gib": result["fixed_gib"]})
                print("\n".join(header + lines), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.md").write_text("\n".join(header + lines) + "\n")
    (out / f"{args.name}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"written: {out / args.name}.md and .json")


if __name__ == "__main__":
    main()
