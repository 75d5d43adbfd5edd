"""Peak memory and step time of GRPO training at the paper's settings, per variant, on one GPU.

    python benchmarks/grpo_step.py                  # Qwen2-VL-2B architecture, random weights
    python benchmarks/grpo_step.py --model PATH     # real weights from a local folder
    python benchmarks/grpo_step.py --tiny --steps 1 # smoke test of the script itself, tiny model

8 prompts x G 8, SAT-sized images (448 x 896: 512 visual tokens), exactly 700 new tokens per
completion (min_new_tokens holds EOS back: the worst case), beta 0.04, mu 1, LoRA r 64 / alpha
128, the r1 prompt, random rewards; each variant in its own process (its peak is its own), a
warm-up step not counted (its generation, the compile included, is reported apart). `lora`,
`lora+liger`, `lora+liger-eager`, `lora+liger-calls`, `qlora+liger` run the trainer's own step
functions (train.load_model, make_decoder, generate, add_old_and_ref_logps, update), the decode
step compiled where the trainer compiles it by default (CUDA; `-eager`: not; `-calls`: a quarter
of the groups a generate call, --generation_batch_size 16 at the paper's settings);
`trl-lora` runs the reference library's GRPOTrainer (TRL 1.16) on the same model folder, images,
prompts and settings, with plain transformers generation (no vLLM), as a single-GPU user runs it.
What each row reports, and how (the phase split, decode_ms_per_step against the bandwidth floor
measured in the same process, vision calls, the memory plan's estimate): README "Memory and
speed on one GPU". Writes <gpu>.json and .md into --out (default benchmarks/results).
"""

import argparse
import copy
import dataclasses
import itertools
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
import train  # noqa: E402
from r1v import model as models  # noqa: E402
from r1v import decode, images, policy, processes, synthetic, tiny  # noqa: E402

# Config overrides per variant; trl-lora uses the plain LoRA settings for what it shares with
# ours (LoRA shape, learning rate) and is driven by run_trl.
# The decode step is compiled where the trainer compiles it by default (CUDA); "-eager" not;
# "-calls": a quarter of the groups a generate call (run_ours).
VARIANTS = {"lora": dict(use_liger=False), "lora+liger": dict(use_liger=True),
            "lora+liger-eager": dict(use_liger=True, compile_decode=False),
            "lora+liger-calls": dict(use_liger=True),
            "qlora+liger": dict(use_liger=True, load_in_4bit=True), "trl-lora": dict()}
PHASES = ("generation", "logp", "update")
# The r1 prompt through TRL: it takes multimodal prompts only as chat messages, so this template
# renders the user's content as is (the image's tokens, then the text): data.PROMPT_TEMPLATE.
R1_CHAT_TEMPLATE = ("{% for message in messages %}{% for item in message['content'] %}"
                    "{% if item['type'] == 'image' %}" + data.VISION_TOKENS +
                    "{% else %}{{ item['text'] }}{% endif %}{% endfor %}{% endfor %}")


def build_random_qwen2vl_2b(folder):
    """The Qwen2-VL-2B architecture (REFERENCE section 4), random weights, offline processor."""
    from transformers import Qwen2VLForConditionalGeneration

    tok = tiny.build_tokenizer(demo.synthetic_vocabulary())
    config = tiny.architecture("qwen2-vl-2b", {t: tok.convert_tokens_to_ids(t)
                                               for t in tiny.SPECIAL_TOKENS})
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2VLForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tiny.save_processor(folder, tok, max_pixels=images.MAX_PIXELS)
    return folder


def bench_examples(args):
    """B SAT-sized rows (synthetic counting images), the r1 prompt, as every variant sees them."""
    images = [synthetic.synthetic_row(random.Random(i), "count", args.image_side)[0]
              for i in range(args.prompts)]
    fields = dict(question="How many shapes are there?", choices=["1", "2", "3"], answer="2")
    return [data.make_example(image.resize((args.image_side * 2, args.image_side)), fields,
                              random.Random(i)) for i, image in enumerate(images)]


# --- measuring ----------------------------------------------------------------------------------

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class VisionCounter:
    """Calls of the base model's vision tower and the images they encoded (rows of grid_thw)."""

    def __init__(self, model):
        self.calls = self.images = 0
        visual = models.base_of(model).model.visual
        visual.register_forward_pre_hook(self.count, with_kwargs=True)

    def count(self, module, args, kwargs):
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        self.calls += 1
        self.images += 0 if grid is None else len(grid)


class StepMeter:
    """Wall time, peak CUDA memory and vision-tower work of one step, split into PHASES. The time
    from one `switch` to the next goes to the phase switched to; switch(None) pauses (what runs
    then is not part of the step)."""

    def __init__(self, device, vision):
        self.device, self.vision, self.phase = device, vision, None

    def begin(self, phase):
        self.totals = {p: dict(s=0.0, peak=0, reserved=0, calls=0, images=0) for p in PHASES}
        self.switch(phase)

    def switch(self, phase):
        synchronize(self.device)
        now, cuda = time.perf_counter(), self.device.type == "cuda"
        if self.phase is not None:
            t = self.totals[self.phase]
            t["s"] += now - self.since
            t["calls"] += self.vision.calls - self.calls
            t["images"] += self.vision.images - self.images
            if cuda:
                t["peak"] = max(t["peak"], torch.cuda.max_memory_allocated())
                t["reserved"] = max(t["reserved"], torch.cuda.max_memory_reserved())
        if cuda:  # a phase's peak is its own: counted from the allocation at its start
            torch.cuda.reset_peak_memory_stats()
        self.phase, self.calls, self.images = phase, self.vision.calls, self.vision.images
        self.since = time.perf_counter()

    def end(self):
        self.switch(None)
        return self.totals


def copy_bandwidth(device):
    """GB/s read + written by a device-to-device copy of a tensor far larger than any cache."""
    size, reps = (2**30, 20) if device.type == "cuda" else (2**26, 5)
    src = torch.ones(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: page faults and lazy allocation are not bandwidth
    synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    synchronize(device)
    return 2 * size * reps / (time.perf_counter() - start) / 1e9


def decode_read_bytes(model, sequences, context):
    """Bytes one decode step of `sequences` reads at `context` tokens of KV cache: the weights as
    stored (the adapter's too: peft runs it unmerged), except the vision tower's."""
    base = models.base_of(model)
    tower = {id(t) for t in itertools.chain(base.model.visual.parameters(),
                                            base.model.visual.buffers())}
    tensors = {id(t): t for t in itertools.chain(base.parameters(), base.buffers())}  # tied once
    weights = sum(t.numel() * t.element_size() for i, t in tensors.items() if i not in tower)
    text = base.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    cache_bytes = base.get_input_embeddings().weight.element_size()  # the compute dtype
    kv = (2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * cache_bytes
          * sequences * context)
    return weights + kv


def mean(values):
    return sum(values) / len(values)


def summarize(variant, device, model, records, settings, memory=None):
    """The JSON line of a variant from its timed steps' records."""
    cuda = device.type == "cuda"
    phase_s = {p: mean([r["phases"][p]["s"] for r in records]) for p in PHASES}
    gen_s, tokens = phase_s["generation"], mean([r["tokens"] for r in records])
    last = records[-1]
    decode_ms = None
    if last["new_tokens"] > 1:
        decode_ms = mean([(r["phases"]["generation"]["s"] - r["prefill_s"])
                          / (r["new_tokens"] - 1) for r in records]) * 1000
    bandwidth = copy_bandwidth(device)
    read = decode_read_bytes(model, last["sequences"],
                             last["prompt_length"] + last["new_tokens"] / 2)
    vision = {p: {k: mean([r["phases"][p][k] for r in records]) for k in ("calls", "images")}
              for p in PHASES}
    peak = reserved = None
    if cuda:
        phase_peaks = {p: max(r["phases"][p]["peak"] for r in records) / 2**30 for p in PHASES}
        memory = {**(memory or dict(weights=None, lora_and_optimizer=None)),
                  **{f"{p}_peak": phase_peaks[p] for p in PHASES}}
        peak = max(phase_peaks.values())
        reserved = max(r["phases"][p]["reserved"] for r in records for p in PHASES) / 2**30
    return {
        "variant": variant, "gpu": torch.cuda.get_device_name() if cuda else "cpu",
        "peak_allocated_gib": peak, "peak_reserved_gib": reserved,
        "step_time_s": sum(phase_s.values()), "generation_s": gen_s,
        "logp_s": phase_s["logp"], "update_s": phase_s["update"],
        "tokens_per_s": tokens / gen_s, "completion_tokens": tokens / last["sequences"],
        "decode_ms_per_step": decode_ms,
        "floor_ms_per_step": read / (bandwidth * 1e9) * 1000, "bandwidth_gb_s": bandwidth,
        "decode_read_gb": read / 1e9,
        "vision_calls_per_step": sum(v["calls"] for v in vision.values()),
        "images_encoded_per_step": sum(v["images"] for v in vision.values()),
        "vision_by_phase": vision, "memory_gib": memory if cuda else None,
        "settings": settings}


# --- the variants -------------------------------------------------------------------------------

def run_ours(args, device, examples, settings):
    """A few full GRPO steps through the trainer's own step functions."""
    cfg = train.Config(model=args.model, num_generations=args.G, prompts_per_step=args.prompts,
                       micro_batch_size=args.micro_batch_size,
                       max_completion_length=args.completion_tokens, beta=0.04,
                       learning_rate=1e-5, compile_backend=args.compile_backend,
                       **VARIANTS[args.variant])
    if args.variant.endswith("-calls"):  # 16 of 64 sequences at the paper's settings
        cfg = dataclasses.replace(cfg, generation_batch_size=args.G * max(1, args.prompts // 4))
    cuda = device.type == "cuda"
    if cfg.compile_decode is None:  # as train.train: on with CUDA (--cpu_compile: on the CPU)
        cfg = dataclasses.replace(cfg, compile_decode=cuda or args.cpu_compile)
    model, processor = train.load_model(cfg, device), models.load_processor(cfg.model)
    params = [p for p in model.parameters() if p.requires_grad]
    weights = (torch.cuda.memory_allocated() - sum(p.numel() * p.element_size() for p in params)
               if cuda else 0)  # what is allocated but the adapter
    procs, eos_ids = processes.Processes(None), models.eos_ids(cfg.model, processor)
    gen_config = policy.generation_config(  # the trainer's, as train.train makes it
        processor, eos_ids, max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature,
        top_k=cfg.top_k, top_p=cfg.top_p, prefill_chunk_size=cfg.prefill_chunk_size)
    gen_config.min_new_tokens = cfg.max_completion_length  # every completion has them all
    prefill_config = copy.deepcopy(gen_config)
    prefill_config.max_new_tokens, prefill_config.min_new_tokens = 1, 0
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=cfg.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda index: 1.0)
    meter = StepMeter(device, VisionCounter(model))
    prompt = policy.encode_prompts(processor, examples, 1)["input_ids"].shape[1]
    decoder = train.make_decoder(train.Run(*[None] * 6, model=model, longest_prompt=prompt), cfg,
                                 procs)
    records, memory = [], None
    for step in range(args.steps + 1):  # step 0 warms up (kernels, allocator), not counted
        meter.begin("generation")
        rollout, texts = train.generate(model, processor, examples, gen_config, cfg, eos_ids,
                                        decoder)
        meter.switch("logp")
        rollout.advantages = grpo.group_advantages(torch.randn(len(texts), device=device), args.G)
        train.add_old_and_ref_logps(model, rollout, cfg)
        meter.switch("update")
        train.update(model, optimizer, scheduler, rollout, cfg, procs)
        record = dict(phases=meter.end(), tokens=int(rollout.completion_mask.sum()),
                      sequences=len(rollout), prompt_length=rollout.prompt_ids.shape[1],
                      new_tokens=rollout.completion_ids.shape[1])
        del rollout, texts  # so that what is left allocated is what every step keeps
        if step == 0 and cuda:
            memory = dict(weights=weights / 2**30,
                          lora_and_optimizer=(torch.cuda.memory_allocated() - weights) / 2**30)
        synchronize(device)
        start = time.perf_counter()
        policy.generate_in_calls(model, processor, examples, prefill_config, args.G,
                                 cfg.generation_batch_size, decoder=decoder)
        synchronize(device)
        record["prefill_s"] = time.perf_counter() - start
        if step:
            records.append(record)
        else:
            first_generation = record["phases"]["generation"]["s"]
    return {**summarize(args.variant, device, model, records, settings, memory),
            **(decoder.stats() if decoder else decode.NOT_COMPILED),
            "compile_decode": bool(cfg.compile_decode), "first_generation_s": first_generation}


def random_reward(completions, **kwargs):
    """TRL's reward contract: one float per completion. Random, as the advantages of ours."""
    return [random.random() for _ in completions]


def run_trl(args, device, examples, settings):
    """A few steps of TRL's GRPOTrainer, timed from the outside: a callback marks each optimizer
    step, and the model's `generate` and the trainer's log-prob passes are wrapped with timers."""
    import datasets
    import trl
    from peft import LoraConfig
    from transformers import PrinterCallback, TrainerCallback

    cfg = train.Config(model=args.model, **VARIANTS[args.variant])
    cuda = device.type == "cuda"
    processor = models.load_processor(args.model)
    processor.chat_template = R1_CHAT_TEMPLATE
    processor.tokenizer.padding_side = "left"  # TRL needs it; its own loading sets it too
    tokens = models.special_tokens(processor)
    rows = [{"prompt": [{"role": "user", "content": ex["prompt"][len(data.VISION_TOKENS):]}],
             "image": ex["image"]} for ex in examples]
    N = args.prompts * args.G
    # One optimizer step per generation batch of B x G completions, cut into forward/backward
    # passes of --micro_batch_size sequences as ours (or the largest divisor of N below it):
    # TRL splits a generation batch into gradient_accumulation_steps passes.
    micro = max(d for d in range(1, min(args.micro_batch_size, N) + 1) if N % d == 0)
    settings = {**settings, "trl": trl.__version__, "per_device_train_batch_size": micro,
                "gradient_accumulation_steps": N // micro}
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                      target_modules=models.LM_LORA_TARGETS)
    workdir = tempfile.TemporaryDirectory()  # TRL wants an output_dir; nothing is saved there
    config = trl.GRPOConfig(
        output_dir=workdir.name, report_to="none", save_strategy="no", logging_strategy="no",
        disable_tqdm=True, max_steps=args.steps + 1, per_device_train_batch_size=micro,
        gradient_accumulation_steps=N // micro, num_generations=args.G,
        max_completion_length=args.completion_tokens,
        # as ours: every completion is max_completion_length long, no vision token is sampled
        generation_kwargs=dict(min_new_tokens=args.completion_tokens,
                               suppress_tokens=list(tokens.vision)),
        temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, beta=0.04,
        num_iterations=1, loss_type="grpo", scale_rewards=cfg.scale_rewards,
        use_bias_correction_kl=False,  # ours' KL gradient (REFERENCE 7); the cost is the same
        learning_rate=1e-5, lr_scheduler_type="constant", max_grad_norm=cfg.max_grad_norm,
        bf16=cuda, gradient_checkpointing=True, use_vllm=False, seed=cfg.seed,
        model_init_kwargs=dict(dtype=torch.bfloat16 if cuda else torch.float32))
    # Left at TRL's defaults, as its users run it: AdamW fused, bf16 autocast around the
    # forward passes (ours: bf16 weights, no autocast), log-probs through its fused LM head.
    with models.quiet_peft():
        trainer = trl.GRPOTrainer(model=args.model, reward_funcs=random_reward, args=config,
                                  train_dataset=datasets.Dataset.from_list(rows),
                                  processing_class=processor, peft_config=lora)
    trainer.remove_callback(PrinterCallback)  # its summary would mix with our JSON on stdout
    model = trainer.model
    meter = StepMeter(device, VisionCounter(model))
    records, current = [], {}
    generate = model.generate

    def timed_generate(*a, **kwargs):
        meter.switch("generation")
        out = generate(*a, **kwargs)
        meter.switch(None)
        prompt_ids = kwargs["input_ids"]
        completion_ids = out[:, prompt_ids.shape[1]:]                              # (N, C)
        current.update(tokens=int(grpo.completion_mask(completion_ids, tokens.eos).sum()),
                       sequences=len(out), prompt_length=prompt_ids.shape[1],
                       new_tokens=completion_ids.shape[1])
        # The prefill-only repeat runs here, inside TRL's generation context (gradient
        # checkpointing off, no grad), while the meter is paused: it is not part of the step.
        prefill = copy.deepcopy(kwargs["generation_config"])
        prefill.max_new_tokens, prefill.min_new_tokens = 1, 0
        start = time.perf_counter()
        generate(*a, **{**kwargs, "generation_config": prefill})
        synchronize(device)
        current["prefill_s"] = time.perf_counter() - start
        meter.switch("update")
        return out

    logps = trainer._get_per_token_logps_and_entropies

    def timed_logps(*a, **kwargs):
        # Without gradients: the reference's pass (the sampling policy's too, which TRL runs
        # only when generation and optimizer steps are out of step: not here). With them: the
        # policy's own pass, part of the update.
        if torch.is_grad_enabled():
            return logps(*a, **kwargs)
        meter.switch("logp")
        out = logps(*a, **kwargs)
        meter.switch("update")
        return out

    class Steps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            meter.begin("update")  # until generation: TRL's prompt processing

        def on_step_end(self, args, state, control, **kwargs):
            phases = meter.end()
            if state.global_step > 1:  # step 1 warms up, not counted
                records.append(dict(current, phases=phases))

    model.generate = timed_generate
    trainer._get_per_token_logps_and_entropies = timed_logps
    trainer.add_callback(Steps())
    trainer.train()
    workdir.cleanup()
    return summarize(args.variant, device, model, records, settings)


def run_variant(args):
    """One variant in this process; prints one JSON line."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    settings = dict(prompts=args.prompts, G=args.G, completion_tokens=args.completion_tokens,
                    beta=0.04, mu=1, image_pixels=args.image_side * args.image_side * 2,
                    micro_batch_size=args.micro_batch_size)
    run = run_trl if args.variant == "trl-lora" else run_ours
    print(json.dumps(run(args, device, bench_examples(args), settings)), flush=True)


def table(results):
    def num(value, digits):
        return "-" if value is None else f"{value:.{digits}f}"
    lines = ["| variant | peak allocated GiB | plan's estimate GiB | peak reserved GiB | step s "
             "| generation s "
             "| ref log-probs s | update s | tokens/s | decode ms/step | floor ms/step "
             "| vision calls/step | decode compiles | graph breaks | first generation s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['variant']} | {num(r['peak_allocated_gib'], 1)} "
                     f"| {num(r.get('plan_peak_gib'), 1)} "
                     f"| {num(r['peak_reserved_gib'], 1)} | {r['step_time_s']:.1f} "
                     f"| {r['generation_s']:.1f} | {r['logp_s']:.1f} | {r['update_s']:.1f} "
                     f"| {r['tokens_per_s']:.0f} | {num(r['decode_ms_per_step'], 1)} "
                     f"| {num(r['floor_ms_per_step'], 2)} | {r['vision_calls_per_step']:.0f} "
                     f"| {r.get('decode_compiles', '-')} | {r.get('decode_graph_breaks', '-')} "
                     f"| {num(r.get('first_generation_s'), 1)} |")
    return "\n".join(lines)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="a local model folder (default: the 2B architecture, random weights, "
                        "built once into the temp folder; with --tiny, the tiny model)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="which variants to run, each in its own process (default: all)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps, after a warm-up step")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step (B)")
    parser.add_argument("--G", type=int, default=8, help="completions per prompt")
    parser.add_argument("--completion_tokens", type=int, default=700,
                        help="new tokens per completion (all of them: EOS is held back)")
    parser.add_argument("--micro_batch_size", type=int, default=8,
                        help="sequences per forward/backward (trl-lora: its "
                        "per_device_train_batch_size, the largest divisor of B x G up to it)")
    parser.add_argument("--image_side", type=int, default=448,
                        help="images are side x 2*side pixels (448: 512 visual tokens)")
    parser.add_argument("--tiny", action="store_true",
                        help="smoke-test the script with the tiny model (runs on CPU); writes "
                        "results only with --out")
    parser.add_argument("--out", default=None,
                        help="where <gpu>.json and .md go (default: benchmarks/results)")
    parser.add_argument("--plan_dir", default=None,
                        help="memory plans (train.py --plan_memory) of the same settings, "
                        "<variant>.json each: their estimate goes beside the measured peak")
    parser.add_argument("--compile_backend", default="inductor",
                        help="torch.compile backend of the compiled decode step (the rehearsal on "
                        "a CPU: eager)")
    parser.add_argument("--cpu_compile", action="store_true",
                        help="compile the decode step on a CPU too, where the trainer does not by "
                        "default (the rehearsal of the compiled path)")
    parser.add_argument("--variant", choices=list(VARIANTS),
                        help="internal: run this one variant in this process and print its JSON "
                        "line (the script starts one such process per variant)")
    return parser


def main():
    parser = build_parser()
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1 (the warm-up step is not counted)")
    if args.variant:
        return run_variant(args)
    if args.model is None:
        name = "r1v-bench-tiny" if args.tiny else "r1v-bench-qwen2vl-2b"
        folder = Path(tempfile.gettempdir()) / name
        if args.tiny:
            args.model = str(tiny.build_tiny_model(folder, demo.synthetic_vocabulary()))
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
               "--image_side", str(args.image_side), "--compile_backend", args.compile_backend,
               *(["--cpu_compile"] if args.cpu_compile else [])]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{variant}: failed\n{done.stderr[-3000:]}", file=sys.stderr)
            failed.append(variant)
            continue
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        plan = Path(args.plan_dir or "") / f"{variant}.json"
        results[-1]["plan_peak_gib"] = (json.loads(plan.read_text())["peak_gib"]
                                        if args.plan_dir and plan.is_file() else None)
        print(json.dumps(results[-1]), flush=True)
    print(table(results))
    if results and (args.out or not args.tiny):  # a smoke test's figures are worth nothing
        out = Path(args.out or ROOT / "benchmarks" / "results")
        out.mkdir(parents=True, exist_ok=True)
        name = results[0]["gpu"].replace(" ", "-")
        (out / f"{name}.json").write_text(json.dumps(results, indent=2))
        (out / f"{name}.md").write_text(table(results) + "\n")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")
    return results


if __name__ == "__main__":
    main()
