"""r1v/memory.py, --plan_memory: the fixed part counted exactly, the estimate growing as the
tensors do, QLoRA's saving, the real size at the paper's settings; and what lowered the peak
(the adapter in bf16 and the prefill in chunks during generation) changing no numerics."""

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import demo
import train
from r1v import memory, policy, tiny
from r1v import model as models

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30


def blocks(tensors):
    """Bytes of distinct tensors in CUDA's 512-byte blocks."""
    unique = {id(t): t for t in tensors}.values()
    return sum(math.ceil(t.numel() * t.element_size() / 512) * 512 for t in unique)


def plan_of(model_dir, out, **flags):
    args = [f"--{k}" if v is True else f"--{k} {v}" for k, v in flags.items()]
    cfg = train.parse_config(["--model", model_dir, "--output_dir", str(out), "--lora_r", "4",
                              "--lora_alpha", "8", *" ".join(args).split()])
    return memory.plan_run(cfg, train.micro_batch_loss)


@pytest.fixture(scope="module")
def tiny_plan(tiny_model_dir, tmp_path_factory):
    return plan_of(tiny_model_dir, tmp_path_factory.mktemp("plan"), prompts_per_step=2,
                   num_generations=2, max_completion_length=8, micro_batch_size=2,
                   max_pixels=3136 * 4)


def test_the_fixed_part_of_a_tiny_model_is_its_analytic_count(tiny_model_dir, tiny_plan):
    """Weights (bf16, as on CUDA), the fp32 adapter, its gradients and AdamW's two moments and
    step counters, counted from the model itself."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    torch.set_default_dtype(torch.bfloat16)
    try:
        base = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(tiny_model_dir),
                                                       dtype=torch.bfloat16)
    finally:
        torch.set_default_dtype(torch.float32)
    lora = models.add_lora(base, 4, 8)
    trainable = [p for p in lora.parameters() if p.requires_grad]
    frozen = [p for p in lora.parameters() if not p.requires_grad] + list(lora.buffers())
    adapter = blocks(trainable)
    assert all(p.dtype == torch.float32 for p in trainable) and adapter > 0
    fixed = tiny_plan["fixed_gib"]
    assert fixed["weights"] * GiB == blocks(frozen)
    # the compiled decode (the plan's default, as on CUDA) keeps the adapter's bf16 copy too
    copies = sum(-(-p.numel() * 2 // 512) * 512 for p in trainable)
    assert fixed["adapter"] * GiB == adapter + copies and fixed["gradients"] * GiB == adapter
    assert fixed["optimizer"] * GiB == 2 * adapter + 512 * len(trainable)
    assert set(tiny_plan["phases"]) == {"generation", "decode", "log-probs", "update"}
    assert tiny_plan["peak_gib"] == max(tiny_plan["phases"].values())


def test_the_estimate_grows_as_the_tensors_do(tiny_model_dir, tiny_plan, tmp_path):
    base = dict(prompts_per_step=2, num_generations=2, max_completion_length=8,
                micro_batch_size=2, max_pixels=3136 * 4)
    phases = tiny_plan["phases"]
    for change, grown in ((dict(micro_batch_size=4), ("update",)),
                          (dict(max_completion_length=64), ("decode", "log-probs", "update")),
                          (dict(max_pixels=3136 * 16), ("generation", "decode", "update"))):
        bigger = plan_of(tiny_model_dir, tmp_path, **{**base, **change})["phases"]
        assert all(bigger[phase] > phases[phase] for phase in grown), (change, bigger, phases)


def test_a_plan_that_does_not_fit_names_what_would(tiny_model_dir, tmp_path, capsys):
    result = plan_of(tiny_model_dir, tmp_path, prompts_per_step=2, num_generations=2,
                     max_completion_length=8, micro_batch_size=2, max_pixels=3136 * 4,
                     gpu_memory_gib=0.5)  # below what a real run adds on top of the estimate
    assert not result["fits"] and result["gpu_memory_gib"] == 0.5
    changes = {a["change"]: a["peak_gib"] for a in result["alternatives"]}
    assert "--load_in_4bit" in changes and "--micro_batch_size 1" in changes
    assert "--micro_batch_size 2" not in changes  # the run's own, planned above
    assert changes["--micro_batch_size 1"] <= result["peak_gib"]
    saving = changes["--micro_batch_size 1"] - result["peak_gib"]
    assert f"with --micro_batch_size 1: {changes['--micro_batch_size 1']:.2f} GiB " \
        f"({saving:+.2f})" in capsys.readouterr().out


def test_the_demo_is_planned_on_the_model_its_run_would_build(tmp_path):
    """--demo --plan_memory: the demo's model is built into its run folder only when it runs;
    the plan builds its config and processor (no weights) and plans them, the run folder left
    without a model."""
    flags = ["--prompts_per_step", "2", "--num_generations", "2", "--micro_batch_size", "2",
             "--max_pixels", "12544"]
    for tasks in ("background", "locate"):  # a Qwen2-VL; a Qwen2.5-VL for grounding
        out = tmp_path / tasks
        demo_plan = train.train(train.parse_config(["--demo", "--plan_memory", "--output_dir",
                                                    str(out), "--synthetic_tasks", tasks, *flags]))
        assert sorted(p.name for p in out.iterdir()) == ["memory_plan.json"]
        assert json.loads((out / "memory_plan.json").read_text())["settings"]["model"] == "demo"
        built = demo.build_untrained(tmp_path / f"{tasks}-model", 0, [tasks], weights=False)
        cfg = train.parse_config(["--demo", "--model", built, "--plan_memory", "--output_dir",
                                  str(tmp_path / f"{tasks}-plan"), "--synthetic_tasks", tasks,
                                  *flags])
        assert demo_plan == memory.plan_run(cfg, train.micro_batch_loss)


@pytest.mark.slow
def test_the_paper_run_on_the_2b_architecture_plans_within_its_targets(tmp_path):
    """Qwen2-VL-2B's config alone (no weights, no processor), the paper's settings: the command
    as a user types it, the plan file, LoRA and QLoRA under their targets (11 and 9 GiB, 2.2
    of them the compiled decode's KV cache, kept through the step)."""
    folder = tmp_path / "qwen2-vl-2b"
    tiny.architecture("qwen2-vl-2b").save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "--model", str(folder),
                           "--plan_memory", "--output_dir", str(tmp_path / "plan")],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "plan" / "memory_plan.json").read_text())
    assert result["peak_gib"] <= 11 and result["fits"] and result["gpu_memory_gib"] == 16
    assert 4.0 < result["fixed_gib"]["weights"] < 4.2  # 2.2 B parameters in bf16
    assert "verdict:" in done.stdout and result["settings"]["num_generations"] == 8
    qlora = plan_of(str(folder), tmp_path / "q", load_in_4bit=True, lora_r=64, lora_alpha=128)
    assert qlora["peak_gib"] <= 9
    # QLoRA saves the language model's Linear weights: bf16 (2 bytes) to NF4 (~0.53 bytes)
    saved = result["fixed_gib"]["weights"] - qlora["fixed_gib"]["weights"]
    text = tiny.architecture("qwen2-vl-2b").text_config
    H, heads = text.hidden_size, text.num_attention_heads
    kv = text.num_key_value_heads * H // heads
    per_layer = H * (2 * H + 2 * kv) + 3 * H * text.intermediate_size  # q, o, k, v; the MLP's
    linear = per_layer * text.num_hidden_layers
    assert saved == pytest.approx(linear * (2 - 0.5 - 1 / 64 - 4 / 16384) / GiB, rel=0.01)


def test_generation_in_the_compute_dtype_leaves_the_trained_adapter_as_it_was(tiny_model_dir):
    """On a GPU the base is bf16: generation runs the fp32 adapter in bf16; after, the very fp32
    tensors AdamW updates are back, bit for bit (a bf16 model on CPU stands in here)."""
    model = models.add_lora(models.load_base_model(tiny_model_dir, torch.device("cpu")), 4, 8)
    model = model.to(torch.bfloat16)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in lora:
        p.data = p.data.float().normal_()  # fp32 master weights, as peft keeps them
    before = [(p.data.data_ptr(), p.data.clone()) for p in lora]
    with policy.adapter_dtype(model, torch.bfloat16):
        assert all(p.dtype == torch.bfloat16 for p in lora)
    assert all(p.data.data_ptr() == ptr and torch.equal(p.data, kept)
               for p, (ptr, kept) in zip(lora, before))
    processor = models.load_processor(tiny_model_dir)
    examples = [demo.synthetic_dataset(2, seed=3, image_size=56)[i] for i in range(2)]
    policy.generate(model, processor, examples,
                    policy.generation_config(processor, max_new_tokens=3, greedy=True))
    assert all(p.dtype == torch.float32 for p in lora)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_a_prefill_in_chunks_generates_what_one_pass_does(tmp_path, family):
    folder = str(tiny.build_tiny_model(tmp_path / family, demo.synthetic_vocabulary(True),
                                       family=family))
    model = models.add_lora(models.load_base_model(folder, torch.device("cpu")), 4, 8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    processor = models.load_processor(folder)
    examples = [demo.synthetic_dataset(3, seed=1, image_size=s)[0] for s in (56, 112)]
    whole = policy.generation_config(processor, max_new_tokens=6, greedy=True,
                                     prefill_chunk_size=0)
    ours, _ = policy.generate(model, processor, examples, whole, group_size=2)
    for chunk in (7, 16):
        chunked = copy.deepcopy(whole)
        chunked.prefill_chunk_size = chunk
        again, _ = policy.generate(model, processor, examples, chunked, group_size=2)
        assert torch.equal(again.completion_ids, ours.completion_ids), chunk
    assert ours.prompt_ids.shape[1] > 16  # several chunks, left padding in the first


def test_a_qwen25_model_plans_too(tiny_qwen25_dir, tmp_path):
    """Qwen2.5-VL's vision tower attends in windows, its helpers read the image grid's values."""
    result = plan_of(tiny_qwen25_dir, tmp_path, prompts_per_step=2, num_generations=2,
                     max_completion_length=8, micro_batch_size=2, max_pixels=3136 * 16)
    assert result["fits"] and result["phases"]["generation"] > result["fixed_gib"]["weights"]
    assert json.loads((tmp_path / "memory_plan.json").read_text())["peak_gib"] == \
        result["peak_gib"]


def test_the_static_cache_of_the_compiled_decode_is_planned_whole_and_kept(tiny_model_dir,
                                                                           tmp_path):
    """--compile_decode (a CUDA run's default) holds the run's KV cache from the first prefill
    token to the end of the step, and the adapter's bf16 copy with it; without it the cache
    grows and goes after generation."""
    from r1v import decode

    flags = dict(prompts_per_step=2, num_generations=4, max_completion_length=64,
                 micro_batch_size=2, max_pixels=3136 * 4)
    static = plan_of(tiny_model_dir, tmp_path / "static", **flags)
    growing = plan_of(tiny_model_dir, tmp_path / "growing", **flags, **{"no-compile_decode": True})
    saved = json.loads((tmp_path / "static" / "memory_plan.json").read_text())
    assert saved["settings"]["compile_decode"] is True
    config = models.load_config(tiny_model_dir)
    prompt = 1 + 16 + 1 + memory.PROMPT_TEXT_TOKENS  # the worst case's prompt: 16 image tokens
    cache = decode.cache_bytes(config, 8, prompt + 64, torch.bfloat16) / memory.GiB
    copies = static["fixed_gib"]["adapter"] / 3  # its part of the adapter: fp32 + bf16 copy
    for phase in ("log-probs", "update"):
        kept = static["phases"][phase] - growing["phases"][phase]
        assert kept == pytest.approx(cache + copies, rel=0.03), phase
    assert static["phases"]["generation"] > growing["phases"]["generation"]


def test_a_plan_checks_its_inputs_before_it_plans(tiny_model_dir, tmp_path, capsys,
                                                  monkeypatch):
    """A config missing a key, an --output_dir that cannot be written, lengths past the
    model's positions: one line at once, before the minute-long plan or its announcement."""
    from r1v import cli

    monkeypatch.setattr(memory, "plan", lambda *a, **k: pytest.fail("planned"))

    def error_of(model, *flags):
        with pytest.raises(SystemExit) as exit_info:
            cli.run(train.main, ["--model", model, "--plan_memory", "--output_dir",
                                 str(tmp_path / "plan"), *flags])
        captured = capsys.readouterr()
        assert exit_info.value.code == 2 and "about a minute" not in captured.out
        lines = captured.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
        return lines[0]

    for broken, key in (("vision_config", "vision_config"), ("text_config.hidden_size",
                                                              "hidden_size")):
        folder = tmp_path / key
        folder.mkdir()
        config = json.loads((Path(tiny_model_dir) / "config.json").read_text())
        if "." in broken:
            del config["text_config"][key]
        else:
            del config[key]
        (folder / "config.json").write_text(json.dumps(config))
        error = error_of(str(folder))
        assert str(folder) in error and f"lacks {key}" in error, error
    (tmp_path / "file").write_text("mine")
    error = error_of(tiny_model_dir, "--output_dir", str(tmp_path / "file"))
    assert "--output_dir" in error and "is a file" in error
    assert (tmp_path / "file").read_text() == "mine"
    error = error_of(tiny_model_dir, "--max_completion_length", "1000000")
    assert "1001024 tokens" in error and "32768 positions" in error, error
    assert not (tmp_path / "plan").exists()


def test_a_plan_without_liger_runs_the_plain_loss(tiny_model_dir, tmp_path):
    """--no-use_liger plans grpo.policy_loss on fake tensors: nothing in it may take a shape
    from the data (a boolean mask's indexing did, and the plan stopped with a traceback)."""
    result = plan_of(tiny_model_dir, tmp_path, prompts_per_step=2, num_generations=2,
                     max_completion_length=8, micro_batch_size=2, max_pixels=3136 * 4,
                     **{"no-use_liger": True})
    saved = json.loads((tmp_path / "memory_plan.json").read_text())
    assert saved["settings"]["use_liger"] is False and result["peak_gib"] > 0


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_a_generation_batch_plans_a_call_of_its_sequences(tiny_model_dir, tiny_qwen3_dir,
                                                          tmp_path, family):
    """--generation_batch_size 4 of N = 8: generation and decode peak lower; with the growing
    cache the update is the same; the static cache kept through the step holds 4 sequences,
    not 8 (half the cache's bytes less in every later phase); the earlier calls' images and
    token ids stay alive."""
    from r1v import decode

    model_dir = tiny_model_dir if family == "qwen2_vl" else tiny_qwen3_dir
    flags = dict(prompts_per_step=2, num_generations=4, max_completion_length=64,
                 micro_batch_size=2, max_pixels=3136 * 4)
    plans = {(eager, half): plan_of(model_dir, tmp_path / f"{eager}{half}", **flags,
                                    **({"no-compile_decode": True} if eager else {}),
                                    **({"generation_batch_size": 4} if half else {}))["phases"]
             for eager in (False, True) for half in (False, True)}
    for eager in (False, True):
        for phase in ("generation", "decode"):
            assert plans[eager, True][phase] < plans[eager, False][phase], (eager, phase)
    # the same tensors alive in the update (small ones counted in two parts: 512-byte blocks)
    assert plans[True, True]["update"] == pytest.approx(plans[True, False]["update"], rel=2e-3)
    config = models.load_config(model_dir)
    prompt = memory.worst_case_rollout(config, 1, 1, 64, 3136, 3136 * 4).prompt_ids.shape[1]
    half = decode.cache_bytes(config, 4, prompt + 64, torch.bfloat16) / memory.GiB
    for phase in ("log-probs", "update"):
        saved = plans[False, False][phase] - plans[False, True][phase]
        assert saved == pytest.approx(half, rel=0.03), phase
