"""Qwen3-VL beside Qwen2-VL and Qwen2.5-VL, on a tiny random Qwen3-VL: the family from its
config, its 0-1000 box frame and 32-pixel visual tokens, its chat prompt and EOS ids, LoRA on the
language model; the features computed once per image carry DeepStack's layers, so the log-probs
and greedy generation equal the plain model's on pixels; training, eval and the demo's model."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

import data
import eval as evaluation
import grpo
import train
from r1v import model as models
from r1v import images, policy, tiny
from tests.conftest import ROOT
from tests.vlm import (chat_examples, count_vision_calls, fixed_rollout, plain_completions,
                       randomise_lora)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def qwen3_dir(tiny_qwen3_dir):
    return tiny_qwen3_dir


@pytest.fixture(scope="module")
def lora_model(qwen3_dir):
    lora = randomise_lora(models.add_lora(models.load_base_model(qwen3_dir, CPU), r=4, alpha=8))
    return lora.eval(), models.load_processor(qwen3_dir)


def test_the_family_its_frame_prompt_tokens_and_eos_come_from_the_checkpoint(qwen3_dir):
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    config = models.load_config(qwen3_dir)
    processor = models.load_processor(qwen3_dir)
    assert config.model_type == "qwen3_vl" and isinstance(processor, Qwen3VLProcessor)
    assert type(models.load_base_model(qwen3_dir, CPU)) is Qwen3VLForConditionalGeneration
    view = data.model_view(config, processor, "auto", 0, 64 * 64)
    assert view.frame == "norm1000" and view.patch_factor == 32  # 16-pixel patches, 2x2
    assert view.prompt("hello") == ("<|im_start|>user\n<|vision_start|><|image_pad|>"
                                    "<|vision_end|>hello<|im_end|>\n<|im_start|>assistant\n")
    assert data.model_view(config, processor, "r1", 0, 1).template == data.PROMPT_TEMPLATE
    tok = processor.tokenizer
    # Instruct's generation config lists <|im_end|> (its tokenizer's EOS) and <|endoftext|>.
    assert models.eos_ids(qwen3_dir, processor) == sorted(
        tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))


def test_visual_tokens_are_counted_with_the_familys_patch(qwen3_dir):
    processor = models.load_processor(qwen3_dir)
    for width, height in [(64, 96), (100, 50), (200, 130)]:
        enc = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"],
                        images=[Image.new("RGB", (width, height))], return_tensors="pt")
        seen = int((enc["input_ids"] == processor.image_token_id).sum())
        assert images.image_tokens(width, height, 32 * 32, 32 * 32 * 64, 32) == seen
    assert images.image_tokens(64, 96, 0, 10**6) == 6
    assert images.image_tokens(64, 96, 0, 10**6, 32) == 6
    assert images.image_tokens(112, 112, 0, 10**6) == 16
    assert images.image_tokens(112, 112, 0, 10**6, 32) == 16  # 128 x 128 pixels


def test_lora_is_on_the_language_model_only(qwen3_dir):
    model = models.add_lora(models.load_base_model(qwen3_dir, CPU), r=4, alpha=8,
                            train_vision=True)
    lora = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert lora and all(".language_model.layers." in n for n in lora)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("deepstack_merger_list" in n for n in trained)  # the tower's copy, DeepStack's too
    assert all("lora_" in n or ".visual." in n for n in trained)


def plain_logps(model, batch):
    """Log-probs of the completions from the model's own forward on pixels (N, C)."""
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits                         # (N, P+C, V)
    P, C = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
    return logits[:, P - 1:P + C - 1].log_softmax(-1).gather(
        2, batch.completion_ids.unsqueeze(-1)).squeeze(-1)                     # (N, C)


def test_features_carry_deepstack_and_give_the_pixel_forwards_logps(lora_model, qwen3_dir):
    from transformers import Qwen3VLForConditionalGeneration

    model, processor = lora_model
    batch = fixed_rollout(processor, chat_examples(processor, [(64, 64), (128, 96)]))
    features = policy.image_features(model, batch.images, batch.image_grid_thw)
    assert [tuple(f.shape) for f in features] == [(3, 4, 64), (3, 12, 64)]  # merged + 2 layers
    batch.image_features = features
    base = Qwen3VLForConditionalGeneration.from_pretrained(qwen3_dir).eval()
    with torch.no_grad():
        with model.disable_adapter():
            ref = policy.token_logps(model, batch)                              # (N, C)
        ours = policy.token_logps(model, batch)
    torch.testing.assert_close(ref, plain_logps(base, batch), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, plain_logps(model, batch), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, ref, atol=1e-3)
    # With DeepStack's layers zeroed the log-probs differ: the test can fail.
    batch.image_features = [torch.cat([f[:1], torch.zeros_like(f[1:])]) for f in features]
    with torch.no_grad(), model.disable_adapter():
        assert not torch.allclose(policy.token_logps(model, batch), ref, atol=1e-3)


def generate(model, processor, examples, gen, group_size):
    """policy.generate, and the completion mask the trainer makes (detail 7)."""
    batch, texts = policy.generate(model, processor, examples, gen, group_size)
    batch.completion_mask = grpo.completion_mask(batch.completion_ids,
                                                 models.special_tokens(processor).eos)
    return batch, texts


@pytest.mark.parametrize("prefill_chunk_size", [0, 8])  # 8: the image's tokens in two chunks
def test_greedy_generation_equals_the_plain_generate(lora_model, prefill_chunk_size):
    model, processor = lora_model
    examples = chat_examples(processor, [(64, 64), (128, 96)])
    greedy = policy.generation_config(processor, max_new_tokens=6, greedy=True,
                                      prefill_chunk_size=prefill_chunk_size)
    calls, hook = count_vision_calls(model)
    ours, _ = policy.generate(model, processor, examples, greedy, group_size=2)
    hook.remove()
    assert len(calls) == 1  # every image of the batch in one call, each once
    plain_config = policy.generation_config(processor, max_new_tokens=6, greedy=True,
                                            prefill_chunk_size=0)
    assert torch.equal(ours.completion_ids,
                       plain_completions(model, processor, examples, 2, plain_config))


def test_micro_batches_give_the_full_batch_logps(lora_model):
    model, processor = lora_model
    examples = chat_examples(processor, [(64, 64), (128, 96)])
    torch.manual_seed(0)
    batch, _ = generate(model, processor, examples,
                        policy.generation_config(processor, max_new_tokens=5), group_size=2)
    assert batch.image_features is not None  # a frozen tower: the generation's features reused
    mask = batch.completion_mask.bool()
    full = policy.rollout_logps(model, batch, micro_batch_size=4)              # (N, C)
    torch.testing.assert_close(full[mask], plain_logps(model, batch)[mask], atol=1e-5, rtol=1e-5)
    for size in (1, 3):  # 3: a micro-batch that cuts a group in two
        torch.testing.assert_close(policy.rollout_logps(model, batch, size)[mask], full[mask],
                                   atol=1e-5, rtol=1e-5)


def test_a_trained_vision_tower_gets_gradients_through_deepstack(qwen3_dir):
    model = randomise_lora(models.add_lora(models.load_base_model(qwen3_dir, CPU), r=4, alpha=8,
                                           train_vision=True))
    processor = models.load_processor(qwen3_dir)
    batch = fixed_rollout(processor, chat_examples(processor, [(64, 64)]))
    (policy.token_logps(model, batch) * batch.completion_mask).sum().backward()
    deepstack = [p.grad for n, p in model.named_parameters()
                 if p.requires_grad and "deepstack_merger_list" in n]
    assert len(deepstack) == 12 and all(g is not None and g.abs().sum() > 0 for g in deepstack)


def test_liger_kernels_patch_the_qwen3_vl_modules(qwen3_dir, rope_families):
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

    model = models.load_base_model(qwen3_dir, CPU)
    layers = model.config.text_config.num_hidden_layers
    norms = sum(type(m).__name__.endswith("RMSNorm") for m in model.modules())
    assert norms == 4 * layers + 1  # input, post-attention, q and k norms; the final norm
    patched = models.apply_liger_kernels(model)
    forwards = [getattr(m.forward, "__func__", None) for m in model.modules()]
    assert forwards.count(LigerRMSNorm.forward) == norms
    assert forwards.count(LigerSwiGLUMLP.forward) == layers  # the vision MLP is GELU: untouched
    assert patched > norms + layers  # and the vision tower's LayerNorms
    assert all(m.apply_rotary_pos_emb is liger_rotary_pos_emb for m in rope_families)


def test_the_command_writes_a_released_architectures_config(tmp_path):
    result = subprocess.run([sys.executable, "-m", "r1v.tiny", "qwen3-vl-2b", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "qwen3_vl" and written["text_config"]["hidden_size"] == 2048


@pytest.mark.parametrize("name, layers, kv_per_token", [("qwen3-vl-2b", 28, 112),
                                                        ("qwen3-vl-4b", 36, 144),
                                                        ("qwen3-vl-8b", 36, 144)])
def test_the_released_architectures_configs(tmp_path, name, layers, kv_per_token):
    tiny.architecture(name).save_pretrained(tmp_path)
    config = models.load_config(str(tmp_path))  # every key a run reads is in the file
    text = config.text_config
    assert config.model_type == "qwen3_vl" and text.num_hidden_layers == layers
    assert models.patch_factor(config) == 32 and len(config.vision_config
                                                     .deepstack_visual_indexes) == 3
    assert config.vision_config.out_hidden_size == text.hidden_size
    # KV cache per token in bf16: layers x KV heads x head_dim x (K, V) x 2 bytes (REFERENCE 11)
    kv = text.num_hidden_layers * text.num_key_value_heads * text.head_dim * 2 * 2
    assert kv == kv_per_token * 1024


def test_training_and_evaluation_on_grounding_rows(tmp_path, qwen3_dir):
    """REC rows: boxes in the 0-1000 frame, 2 GRPO steps, then eval.py on the same rows; the
    static KV cache of the compiled decode sized from the prompts' 32-pixel visual tokens."""
    path = tmp_path / "rows.jsonl"
    Image.new("RGB", (200, 100), "white").save(tmp_path / "img.png")
    path.write_text("".join(json.dumps({"image": "img.png", "phrase": f"the {c} circle",
                                        "box": [40 * i, 10, 40 + 40 * i, 60]}) + "\n"
                            for i, c in enumerate(["red", "blue", "green", "yellow"])))
    config, processor = models.load_config(qwen3_dir), models.load_processor(qwen3_dir)
    view = data.model_view(config, processor, "auto", 32 * 32, 32 * 32 * 16)
    examples = data.load_examples(str(path), view=view)
    row = next(examples[i] for i in range(4) if examples[i]["phrase"] == "the blue circle")
    assert row["frame_size"] == (1000, 1000) and row["box"] == [200, 100, 400, 600]
    assert row["image"].size == (160, 64)  # multiples of 32, at most 16 tokens: 5 x 2
    out = tmp_path / "run"
    train.main(["--model", qwen3_dir, "--dataset", str(path), "--output_dir", str(out),
                "--max_steps", "2", "--prompts_per_step", "2", "--num_generations", "2",
                "--max_completion_length", "12", "--max_pixels", str(32 * 32 * 16),
                "--lora_r", "4", "--lora_alpha", "8", "--cpu_threads", "1",
                "--compile_decode", "--compile_backend", "eager"])  # a cache of the rows' length
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and "rewards/iou/mean" in metrics[0]
    args = ["--model", qwen3_dir, "--adapter", str(out / "checkpoint-2"), "--dataset",
            str(path), "--max_new_tokens", "12", "--max_pixels", str(32 * 32 * 16)]
    summary = evaluation.main([*args, "--output_dir", str(tmp_path / "e")])
    assert summary["n"] == 4 and "Acc@0.5" in summary["scores"]
    # The static cache sized from the rows' visual tokens in 32-pixel units: the same answers.
    compiled = evaluation.main([*args, "--output_dir", str(tmp_path / "c"), "--compile_decode",
                                "--compile_backend", "eager"])
    assert compiled["scores"] == summary["scores"]
    answers = [[json.loads(l)["response"] for l in (tmp_path / d / "predictions.jsonl")
                .read_text().splitlines()] for d in ("e", "c")]
    assert answers[0] == answers[1]


@pytest.mark.slow
@pytest.mark.parametrize("name, family", [("demo-qwen3-vl", "qwen3_vl"),
                                          ("demo-qwen2.5-vl", "qwen2_5_vl")])
def test_the_demo_command_on_a_tiny_model_of_the_family(tmp_path, name, family):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--demo", "--model", name,
         "--output_dir", str(out), "--max_steps", "2", "--save_steps", "2"],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((out / "demo-base" / "config.json").read_text())
    assert config["model_type"] == family
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert metrics[0]["rewards/format/mean"] > 0.5  # the warm-up taught it the answer format


def test_a_qwen3_vl_model_plans_with_its_patches_and_deepstack(qwen3_dir, tmp_path):
    """The worst case's image is of 16-pixel patches; DeepStack's addition and the tower's
    position interpolation run under fake tensors."""
    from r1v import memory

    config = models.load_config(qwen3_dir)
    fake = memory.worst_case_rollout(config, 1, 2, 4, 0, 32 * 32 * 16)
    assert fake.image_grid_thw.tolist() == [[1, 8, 8]] * 2  # 128 x 128 pixels: 16 tokens
    assert fake.images[0].shape == (64, 3 * 2 * 16 * 16)
    cfg = train.parse_config(["--model", qwen3_dir, "--output_dir", str(tmp_path), "--lora_r",
                              "4", "--lora_alpha", "8", "--prompts_per_step", "2",
                              "--num_generations", "2", "--max_completion_length", "8",
                              "--micro_batch_size", "2", "--max_pixels", str(32 * 32 * 16)])
    result = memory.plan_run(cfg, train.micro_batch_loss)
    assert result["fits"] and result["phases"]["generation"] > result["fixed_gib"]["weights"]


def test_a_thinking_models_prompt_opens_the_thought(qwen3_dir):
    """A Qwen3-VL Thinking checkpoint's template ends its generation prompt with "<think>\\n":
    the completion continues the thought, as after the paper's r1 prompt."""
    import rewards

    prompt = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>q<|im_end|>\n" \
             "<|im_start|>assistant\n<think>\n"
    example = {"prompt": prompt, "task_type": "choice", "answer": "red"}
    completion = data.answer_completion(example)
    assert completion == "</think> <answer> red </answer>"
    assert rewards.format_reward(completion, example) == 1.0
    instruct = {**example, "prompt": prompt[:-len("<think>\n")]}
    assert rewards.format_reward(completion, instruct) == 0.0  # its thought was never opened
    assert data.answer_completion(instruct) == "<think> " + completion


def test_qlora_keeps_the_vision_tower_unquantised_and_trains(qwen3_dir):
    import bitsandbytes as bnb

    model = models.load_base_model(qwen3_dir, CPU, load_in_4bit=True)
    four_bit = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit and all(".language_model." in n for n in four_bit)
    model = randomise_lora(models.add_lora(model, r=4, alpha=8))
    processor = models.load_processor(qwen3_dir)
    batch = fixed_rollout(processor, chat_examples(processor, [(64, 64), (96, 64)]))
    model.train()
    (policy.token_logps(model, batch) * batch.completion_mask).sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("train_vision", [False, True])
def test_loss_and_gradients_do_not_depend_on_the_micro_batch_size(qwen3_dir, tmp_path,
                                                                   train_vision):
    """With the tower trained, each micro-batch runs it again on its own images (DeepStack's
    layers included); frozen, the generation's features serve every pass."""
    cfg = train.parse_config(["--model", qwen3_dir, "--output_dir", str(tmp_path), "--lora_r",
                              "4", "--lora_alpha", "8", "--beta", "0.04",
                              "--no-gradient_checkpointing", "--cpu_threads", "1"]
                             + ["--train_vision"] * train_vision)
    model = randomise_lora(train.load_model(cfg, CPU))
    processor = models.load_processor(qwen3_dir)
    examples = chat_examples(processor, [(64, 64), (128, 96), (96, 64)])
    torch.manual_seed(0)
    batch, _ = generate(model, processor, examples,
                        policy.generation_config(processor, max_new_tokens=4), group_size=2)
    assert (batch.image_features is None) == train_vision
    batch.advantages = torch.tensor([1.5, -0.5, 0.3, -1.0, 0.7, -0.2])
    train.add_old_and_ref_logps(model, batch, cfg)

    def gradients(size):
        model.zero_grad(set_to_none=True)
        loss, _ = train.accumulate_gradients(
            model, batch, train.dataclasses.replace(cfg, micro_batch_size=size), len(batch),
            batch.completion_mask.sum())
        return loss, [p.grad.clone() for p in model.parameters() if p.requires_grad]
    whole_loss, whole = gradients(6)
    assert any(g.abs().sum() > 0 for g in whole)
    for size in (2, 4):  # 4: a micro-batch that cuts a group in two
        loss, grads = gradients(size)
        assert loss == pytest.approx(whole_loss, rel=1e-5, abs=1e-7), size
        for a, b in zip(grads, whole):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_a_resumed_run_gives_the_metrics_of_a_straight_one(qwen3_dir, tmp_path):
    """4 steps straight, and the same run resumed from its step-2 checkpoint (the later steps'
    checkpoint gone, as after a kill): the same metrics, step by step."""
    import shutil

    reward_file = tmp_path / "length.py"  # a random model never earns accuracy: a signal
    reward_file.write_text("def length(completion, example):\n    return len(completion) / 10\n")
    straight = tmp_path / "straight"
    args = ["--model", qwen3_dir, "--dataset", "synthetic", "--dataset_limit", "32",
            "--synthetic_image_size", "64", "--num_generations", "2", "--prompts_per_step", "2",
            "--micro_batch_size", "2", "--max_completion_length", "5", "--lora_r", "4",
            "--lora_alpha", "8", "--learning_rate", "1e-2", "--beta", "0.04",
            "--reward_funcs", "format", f"{reward_file}:length", "--max_steps", "4",
            "--save_steps", "2", "--cpu_threads", "1"]
    train.main([*args, "--output_dir", str(straight)])
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoint-4")
    train.main([*args, "--output_dir", str(resumed), "--resume"])

    def metrics(out):
        return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    a, b = metrics(straight), metrics(resumed)
    assert (resumed / "checkpoint-4").is_dir()  # trained again from step 2
    assert [m["step"] for m in b] == [1, 2, 3, 4] and a[-1]["kl"] > 0
    for x, y in zip(a, b):
        for key in ("reward", "loss", "kl", "grad_norm", "learning_rate"):
            assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-9), (x["step"], key)


@pytest.mark.parametrize("benchmark", ["cvbench", "sat", "refcoco"])
def test_the_benchmarks_evaluate_a_qwen3_vl_model(tmp_path, qwen3_dir, benchmark):
    """eval.py's hub benchmarks, from local folders in their schemas, on Qwen3-VL: its chat
    prompt, its 32-pixel visual tokens (the compiled decode's cache sized in them) and, for
    RefCOCO, the gold boxes in its 0-1000 frame; eager and compiled decode answer alike."""
    from tests.test_data import make_sat_folder, sat_rows
    from tests.test_eval import write_cvbench
    from tests.test_grounding import write_refcoco

    source = {"cvbench": lambda: write_cvbench(tmp_path / "cvbench", "single"),
              "sat": lambda: make_sat_folder(tmp_path / "sat", sat_rows()),
              "refcoco": lambda: write_refcoco(tmp_path / "refcoco")}[benchmark]()
    args = ["--model", qwen3_dir, "--benchmark", benchmark, "--dataset", source,
            "--split", "train" if benchmark == "sat" else "val", "--max_new_tokens", "6",
            "--batch_size", "4", "--max_pixels", str(32 * 32 * 16)]
    eager = evaluation.main([*args, "--output_dir", str(tmp_path / "e")])
    compiled = evaluation.main([*args, "--output_dir", str(tmp_path / "c"), "--compile_decode",
                                "--compile_backend", "eager"])
    rows = {d: [json.loads(line) for line in (tmp_path / d / "predictions.jsonl")
                .read_text().splitlines()] for d in ("e", "c")}
    assert eager["n"] == compiled["n"] == {"cvbench": 6, "sat": 2, "refcoco": 6}[benchmark]
    assert [r["response"] for r in rows["e"]] == [r["response"] for r in rows["c"]]
    if benchmark == "refcoco":  # boxes answered in 0-1000, scored in the image's pixels
        from r1v import cli, flags

        cfg = cli.parse(flags.EvalConfig, [*args, "--output_dir", str(tmp_path / "x")], "")
        view = data.model_view(models.load_config(qwen3_dir), models.load_processor(qwen3_dir),
                               "auto", cfg.min_pixels, cfg.max_pixels)
        item = evaluation.load_items(cfg)[0](view)[0]
        assert item["frame_size"] == (1000, 1000) and item["original_size"] == (140, 112)
        judged = evaluation.judge(item, "<answer>[100, 200, 300, 400]</answer>")
        assert judged["box"] == pytest.approx([14, 22.4, 42, 44.8])
        assert rows["e"][0]["gold"] == [10, 20, 40, 60]  # COCO's [x, y, w, h] as corners
