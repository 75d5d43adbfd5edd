"""train.py on the tiny model: log-probs, the reference under disable_adapter, micro-batches, the command line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import grpo
import train

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(model_dir, tmp_path, **overrides):
    args = ["--model", model_dir, "--dataset", "synthetic", "--dataset_limit", "64", "--synthetic_image_size", "56",
            "--output_dir", str(tmp_path / "run"), "--num_generations", "2", "--prompts_per_step", "3",
            "--micro_batch_size", "6", "--max_completion_length", "6", "--lora_r", "4", "--lora_alpha", "8"]
    for key, value in overrides.items():
        args += [f"--{key}"] + ([str(value)] if value is not True else [])
    return train.parse_config(args)


@pytest.fixture
def rollout(tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config(tiny_model_dir, tmp_path)
    model, processor = train.load_model(cfg, torch.device("cpu"))
    with torch.no_grad():  # a non-zero adapter, so that disabling it matters
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ds = data.synthetic_dataset(8, seed=1, tasks=("count", "leftright", "bigger"), image_size=56)
    examples = [ds[0], ds[1], data.synthetic_dataset(1, seed=2, image_size=84)[0]]  # images of two sizes
    batch, texts = train.generate_rollouts(model, processor, examples, cfg, torch.device("cpu"))
    return cfg, model, processor, batch, texts, examples


def test_generate_returns_prompt_major_groups_and_position_masks(rollout):
    cfg, model, processor, batch, texts, examples = rollout
    N = len(examples) * cfg.num_generations
    assert batch["completion_ids"].shape[0] == N and len(texts) == N
    assert torch.equal(batch["completion_mask"], grpo.completion_mask(batch["completion_ids"], processor.tokenizer.eos_token_id))
    vision = train.special_ids(processor)[2]
    assert not torch.isin(batch["completion_ids"], torch.tensor(vision)).any()  # vision tokens suppressed
    assert batch["images_per_seq"].tolist() == [1] * N


def test_micro_batches_of_several_prompts_give_the_full_batch_logps(rollout):
    cfg, model, processor, batch, texts, examples = rollout
    full = train.batch_logps(model, batch, cfg)
    for size in (1, 2, 4):
        small = train.batch_logps(model, batch, train.dataclasses.replace(cfg, micro_batch_size=size))
        mask = batch["completion_mask"].bool()
        torch.testing.assert_close(small[mask], full[mask], atol=1e-5, rtol=1e-5)


def test_logps_equal_the_models_own_logits(rollout):
    cfg, model, processor, batch, texts, examples = rollout
    with torch.no_grad():
        logits = model(**data.model_inputs(batch)).logits                            # (N, P+C, V)
    P, C = batch["prompt_ids"].shape[1], batch["completion_ids"].shape[1]
    expected = torch.gather(logits[:, P - 1:P + C - 1].log_softmax(-1), 2, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
    mask = batch["completion_mask"].bool()
    torch.testing.assert_close(train.batch_logps(model, batch, cfg)[mask], expected[mask], atol=1e-5, rtol=1e-5)


def test_disable_adapter_gives_the_base_models_logps(rollout, tiny_model_dir):
    from transformers import Qwen2VLForConditionalGeneration
    cfg, model, processor, batch, texts, examples = rollout
    with model.disable_adapter():
        ref = train.batch_logps(model, batch, cfg)
    adapted = train.batch_logps(model, batch, cfg)
    base = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        logits = base(**data.model_inputs(batch)).logits
    P, C = batch["prompt_ids"].shape[1], batch["completion_ids"].shape[1]
    expected = torch.gather(logits[:, P - 1:P + C - 1].log_softmax(-1), 2, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
    mask = batch["completion_mask"].bool()
    torch.testing.assert_close(ref[mask], expected[mask], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(adapted[mask], ref[mask], atol=1e-3)


@pytest.mark.parametrize("use_liger", [False, True])
def test_update_changes_every_lora_weight_and_only_those(rollout, use_liger):
    cfg, model, processor, batch, texts, examples = rollout
    cfg = train.dataclasses.replace(cfg, use_liger=use_liger)
    [ex for ex in examples for _ in range(cfg.num_generations)]
    batch["advantages"] = torch.tensor([1.0, -1.0] * len(examples))
    with model.disable_adapter():
        batch["ref_logp"] = train.batch_logps(model, batch, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: 1.0)
    stats = train.update(model, optimizer, scheduler, batch, train.dataclasses.replace(cfg, micro_batch_size=2))
    assert stats["nonfinite"] == 0 and stats["grad_norm"] > 0
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        assert changed == p.requires_grad, name
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert not any("visual" in n for n, p in model.named_parameters() if p.requires_grad)


def test_help_explains_every_flag():
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True, check=True).stdout
    for f in train.dataclasses.fields(train.Config):
        assert f"--{f.name}" in out


def test_demo_defaults_yield_to_given_flags():
    cfg = train.parse_config(["--demo", "--max_steps", "3"])
    assert cfg.dataset == "synthetic" and cfg.max_steps == 3 and cfg.learning_rate == train.DEMO["learning_rate"]
    assert train.parse_config([]).dataset == "array/SAT"


@pytest.mark.parametrize("argv,message", [
    (["--loss_type", "ppo"], "--loss_type"),
    (["--reward_funcs", "format", "--reward_weights", "1", "2"], "--reward_weights"),
    (["--num_generations", "1"], "--num_generations"),
])
def test_bad_flags_are_named(argv, message):
    with pytest.raises(ValueError, match=message):
        train.parse_config(argv)


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_bad_inputs_stop_before_training_with_a_clear_message(tmp_path, tiny_model_dir):
    bad = tmp_path / "task.jsonl"
    bad.write_text(json.dumps({"image": "missing.png", "question": "q", "choices": ["a", "b"], "answer": "a"}) + "\n")
    result = run_cli("--model", tiny_model_dir, "--dataset", str(bad), "--output_dir", str(tmp_path / "o"))
    assert result.returncode != 0 and "task.jsonl:1: image" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("--model", tiny_model_dir, "--reward_funcs", "nope.py:f", "--output_dir", str(tmp_path / "o"))
    assert result.returncode != 0 and "--reward_funcs 'nope.py:f'" in result.stderr


@pytest.mark.slow
def test_end_to_end_command_line_on_the_tiny_model(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import Qwen2VLForConditionalGeneration
    out = tmp_path / "run"
    reward_file = tmp_path / "my_rewards.py"  # a random model never earns format or accuracy: give it a signal
    reward_file.write_text("def length(completion, example):\n    return len(completion) / 10\n")
    result = run_cli("--model", tiny_model_dir, "--reward_funcs", "format", "accuracy", f"{reward_file}:length", "--dataset", "synthetic", "--dataset_limit", "64",
                     "--synthetic_image_size", "56", "--output_dir", str(out), "--max_steps", "3",
                     "--num_generations", "4", "--prompts_per_step", "2", "--micro_batch_size", "3",
                     "--max_completion_length", "8", "--beta", "0.04", "--num_iterations", "2", "--log_samples_steps", "2",
                     "--learning_rate", "1e-2")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for key in ["reward", "reward_std", "rewards/format/mean", "rewards/accuracy/mean", "rewards/length/mean", "frac_reward_zero_std",
                "completions/mean_length", "completions/clipped_ratio", "completions/reflection_ratio", "kl",
                "clip_ratio/low_mean", "clip_ratio/high_mean", "grad_norm", "learning_rate", "step_time", "loss"]:
        assert all(key in m for m in metrics), key
    assert metrics[-1]["kl"] > 0.0  # the adapter moved away from the reference
    assert metrics[0]["learning_rate"] > metrics[-1]["learning_rate"] > 0  # linear decay over 3 steps x 2 updates
    samples = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2} and "completion" in samples[0]
    assert json.loads((out / "config.json").read_text())["max_steps"] == 3
    model = PeftModel.from_pretrained(Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir), out / "checkpoint-3")
    assert any("lora_A" in n for n, _ in model.named_parameters())


@pytest.mark.slow
def test_in_training_evaluation_logs_eval_accuracy(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    result = run_cli("--model", tiny_model_dir, "--dataset", "synthetic", "--dataset_limit", "32",
                     "--synthetic_image_size", "56", "--output_dir", str(out), "--max_steps", "2",
                     "--num_generations", "2", "--prompts_per_step", "2", "--max_completion_length", "4",
                     "--eval_steps", "1", "--eval_limit", "5")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["eval/accuracy"] <= 1.0 for r in rows) and len(rows) == 2


def test_held_out_rows_differ_from_training_rows(tmp_path):
    cfg = train.parse_config(["--dataset", "synthetic", "--eval_steps", "1", "--eval_limit", "8",
                              "--synthetic_image_size", "56"])
    held_out = train.held_out_examples(cfg)
    training = data.synthetic_dataset(8, cfg.seed, tuple(cfg.synthetic_tasks), 56)
    assert len(held_out) == 8
    assert all(h["image"].tobytes() != training[i]["image"].tobytes() for i, h in enumerate(held_out))
    with pytest.raises(ValueError, match="--eval_dataset"):
        train.held_out_examples(train.parse_config(["--dataset", "x.jsonl", "--eval_steps", "1"]))


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_liger_fused_loss_matches_the_plain_path_in_loss_and_lora_gradients(rollout, loss_type):
    cfg, model, processor, batch, texts, examples = rollout
    cfg = train.dataclasses.replace(cfg, loss_type=loss_type, beta=0.04, max_completion_length=6)
    batch["advantages"] = torch.tensor([1.5, -0.5, 0.3, -1.0, 0.7, -0.2])
    with model.disable_adapter():
        batch["ref_logp"] = train.batch_logps(model, batch, cfg)
    batch["old_logp"] = train.batch_logps(model, batch, cfg) + 0.3 * torch.randn(batch["completion_ids"].shape)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    num_tokens = batch["completion_mask"].sum()
    results = []
    for use_liger in (False, True):
        c = train.dataclasses.replace(cfg, use_liger=use_liger)
        if use_liger:
            loss, stats = train.liger_loss(model, batch, c, num_tokens)
        else:
            logp = train.sequence_logps(model, batch, c)
            loss, stats = grpo.policy_loss(logp, batch["old_logp"], batch["ref_logp"], batch["advantages"],
                                           batch["completion_mask"], beta=c.beta, loss_type=loss_type,
                                           max_completion_length=6, num_tokens=num_tokens)
        results.append((loss.detach(), torch.autograd.grad(loss, params), stats))
    (plain_loss, plain_grads, plain_stats), (liger, liger_grads, liger_stats) = results
    torch.testing.assert_close(liger, plain_loss, atol=1e-5, rtol=1e-4)
    for a, b in zip(liger_grads, plain_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3)
    assert liger_stats["kl"] == pytest.approx(plain_stats["kl"], rel=1e-4, abs=1e-7)
    assert liger_stats["clip_ratio/region_mean"] == pytest.approx(plain_stats["clip_ratio/region_mean"], abs=1e-6)
