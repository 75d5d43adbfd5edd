"""The decode step's overhead on the CPU, eager against compiled (r1v/decode.py), on the real
Qwen2-VL-2B's layer structure made narrow so that it runs in seconds: 28 layers, 12 heads, 2 KV
heads, the M-RoPE, the 2B's vocabulary shape cut down, hidden 96, with a LoRA adapter (r 8 on
every projection, non-zero) active, a static KV cache, 8 sequences, one CPU thread.

    python benchmarks/decode_overhead.py            # 3 interleaved rounds, 32 new tokens
    python benchmarks/decode_overhead.py --rounds 5 --new_tokens 64
    python benchmarks/decode_overhead.py --attention eager   # the overhead alone (see --help)

Per decode step: CPU seconds (time.process_time, this process: a shared machine's wall time
measures its scheduler) and the operator calls torch's profiler sees (aten::*, nested ones
included), each = (generate of K tokens - generate of 1 token, the prefill) / (K - 1), greedy,
every completion K tokens long. The compiled step is torch.compile with inductor; its first call
(the compile) is timed apart. Eager on the same static cache, eager on a growing (dynamic) cache
(--no-compile_decode) and compiled run in turn, round after round. On a GPU the same
single graph is what one CUDA graph replays (benchmarks/gpu_run.sh measures that). Writes
decode_overhead_cpu.json and .md into --out (default benchmarks/results).
"""

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import demo  # noqa: E402
from r1v import decode, policy, tiny  # noqa: E402
from r1v import model as models  # noqa: E402

SEQUENCES, PROMPTS = 8, 2


def build(folder, hidden=96):
    """The 2B's language-model structure (REFERENCE 4) at hidden 96, the tiny vision tower."""
    from transformers import Qwen2VLForConditionalGeneration

    tok = tiny.build_tokenizer(demo.synthetic_vocabulary())
    config = tiny.qwen2vl_config(tok, hidden, 4 * hidden, 28, 12, 2, [1, 1, 2],
                                 dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=2,
                                      mlp_ratio=2), rope_theta=1e6)
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).save_pretrained(folder)
    tiny.save_processor(folder, tok, max_pixels=56 * 56)
    return folder


def policy_model(folder, attention):
    torch.manual_seed(0)
    base = models.load_base_model(folder, torch.device("cpu"))
    base.set_attn_implementation(attention)
    model = models.add_lora(base, 8, 16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)  # an adapter that changes the output, as a trained one
    return model


def per_step(run, new_tokens):
    """CPU seconds and aten calls of one decode step, from a K-token and a 1-token generate."""
    def measured(tokens):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            start = time.process_time()
            run(tokens)
            seconds = time.process_time() - start
        calls = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
        return seconds, calls
    (long_s, long_calls), (short_s, short_calls) = measured(new_tokens), measured(1)
    return ((long_s - short_s) / (new_tokens - 1), (long_calls - short_calls) / (new_tokens - 1))


def timed_without_profiler(run, new_tokens):
    """The same CPU seconds without the profiler's own cost (the calls need it)."""
    start = time.process_time()
    run(new_tokens)
    long_s = time.process_time() - start
    start = time.process_time()
    run(1)
    return (long_s - (time.process_time() - start)) / (new_tokens - 1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--new_tokens", type=int, default=32, help="K, tokens a completion")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--attention", default="sdpa", choices=("sdpa", "eager"),
                        help="the attention: sdpa (the trainer's), or eager (plain operators, "
                        "which inductor fuses; on a CPU the flash kernel costs about 0.4 ms a "
                        "call at these shapes whatever the dispatch)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    folder = build(Path(tempfile.mkdtemp()) / "narrow-2b")
    processor = models.load_processor(folder)
    examples = [demo.synthetic_dataset(PROMPTS, seed=1, image_size=56)[i] for i in range(PROMPTS)]
    gen = policy.generation_config(processor, max_new_tokens=args.new_tokens, greedy=True)
    gen.min_new_tokens = args.new_tokens  # every completion runs every decode step

    def runner(model, decoder):
        def run(tokens):
            config = copy.deepcopy(gen)
            config.max_new_tokens = config.min_new_tokens = tokens
            return policy.generate(model, processor, examples, config, SEQUENCES // PROMPTS,
                                   decoder=decoder)[0]
        return run
    # the cache as a run sizes it: the longest prompt + the completion
    length = policy.encode_prompts(processor, examples, 1)["input_ids"].shape[1] + args.new_tokens
    eager_model, compiled_model = (policy_model(folder, args.attention),
                                   policy_model(folder, args.attention))
    eager_decoder = decode.Decoder(eager_model, SEQUENCES, length)  # the same static cache
    compiled = decode.Decoder(compiled_model, SEQUENCES, length, compile=True,
                              backend=args.backend)
    runs = {"eager": runner(eager_model, eager_decoder),  # the same cache, not compiled
            "eager, dynamic cache": runner(eager_model, None),  # --no-compile_decode
            "compiled": runner(compiled_model, compiled)}
    start = time.process_time()
    first = runs["compiled"](2)  # the compile
    compile_s = time.process_time() - start
    same = torch.equal(first.completion_ids, runs["eager"](2).completion_ids)
    results = {name: {"cpu_ms": [], "aten_calls": []} for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            seconds = timed_without_profiler(run, args.new_tokens)
            _, calls = per_step(run, args.new_tokens)
            results[name]["cpu_ms"].append(seconds * 1000)
            results[name]["aten_calls"].append(calls)
    summary = {name: {"cpu_ms_per_step": min(r["cpu_ms"]), "cpu_ms_runs": r["cpu_ms"],
                      "aten_calls_per_step": min(r["aten_calls"])}
               for name, r in results.items()}
    ratio = {k: summary["compiled"][k] / summary["eager"][k]
             for k in ("cpu_ms_per_step", "aten_calls_per_step")}
    report = {"summary": summary, "compiled_over_eager": ratio, "compile_cpu_s": compile_s,
              "decode_compiles": compiled.stats()["decode_compiles"],
              "decode_graph_breaks": compiled.stats()["decode_graph_breaks"],
              "greedy_tokens_equal": same, "backend": args.backend, "attention": args.attention,
              "torch": torch.__version__,
              "settings": {"layers": 28, "heads": 12, "kv_heads": 2, "hidden": 96,
                           "sequences": SEQUENCES, "new_tokens": args.new_tokens,
                           "cache_tokens": length,
                           "rounds": args.rounds, "lora_r": 8, "threads": 1},
              "command": "python benchmarks/decode_overhead.py " + " ".join(argv or sys.argv[1:])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "decode_overhead_cpu" + ("" if args.attention == "sdpa" else "-eager-attention")
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"| decode step (CPU, 1 thread, {args.attention} attention) | CPU ms / step (best "
             "of rounds) | aten calls / step |",
             "|---|---|---|"]
    for name in runs:
        lines.append(f"| {name} | {summary[name]['cpu_ms_per_step']:.2f} | "
                     f"{summary[name]['aten_calls_per_step']:.0f} |")
    lines.append(f"| compiled / eager (same cache) | {ratio['cpu_ms_per_step']:.2f}x | "
                 f"{ratio['aten_calls_per_step']:.2f}x |")
    text = "\n".join(lines) + (
        f"\n\ncompile: {compile_s:.1f} CPU s (first call); decode_compiles "
        f"{report['decode_compiles']}, graph breaks {report['decode_graph_breaks']}; greedy "
        f"tokens equal to eager: {same}. Command: `{report['command'].strip()}`; torch "
        f"{torch.__version__}.\n")
    (out / f"{stem}.md").write_text(text)
    print(text)
    return report


if __name__ == "__main__":
    main()
