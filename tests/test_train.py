"""train.py: the command line, its presets and errors, end-to-end runs on the tiny model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import data
import demo
import train
from r1v import metrics

ROOT = Path(__file__).resolve().parents[1]


def test_help_explains_every_flag():
    out = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True,
        check=True,
    ).stdout
    for f in train.dataclasses.fields(train.Config):
        assert f"--{f.name}" in out
    preset = " ".join(out.split("preset, the flags you give win:")[1].split("--model MODEL")[0]
                      .split())
    assert "--train_vision --save_steps" in preset  # a flag as it is typed: no "True"
    assert "--no-gradient_checkpointing" in preset and "True" not in preset


def test_demo_defaults_yield_to_given_flags():
    cfg = train.parse_config(["--demo", "--max_steps", "3"])
    assert cfg.dataset == "synthetic" and cfg.max_steps == 3
    assert cfg.learning_rate == demo.DEMO["learning_rate"]
    assert train.parse_config([]).dataset == "array/SAT"
    # the preset is plain values: the Config they make is the command line's
    assert train.Config(**{**demo.DEMO, "max_steps": 3}) == cfg


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--reward_funcs", "format", "--reward_weights", "1", "2"], "--reward_weights"),
        (["--num_generations", "1"], "--num_generations"),
    ],
)
def test_bad_flags_are_named(argv, message):
    with pytest.raises(ValueError, match=message):
        train.parse_config(argv)
    with pytest.raises(ValueError, match="--loss_type"):
        train.Config(loss_type="ppo")


def test_bad_flags_on_the_command_line_are_one_line(tmp_path):
    result = run_cli("--loss_type", "ppo", "--output_dir", str(tmp_path / "o"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error:") and "--loss_type" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def run_cli(*args, timeout=600):
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
        timeout=timeout, cwd=ROOT,
    )


def test_bad_inputs_stop_before_training_with_a_clear_message(tmp_path, tiny_model_dir):
    bad = tmp_path / "task.jsonl"
    bad.write_text(
        json.dumps({"image": "missing.png", "question": "q", "choices": ["a", "b"], "answer": "a"})
        + "\n"
    )
    result = run_cli(
        "--model", tiny_model_dir, "--dataset", str(bad), "--output_dir", str(tmp_path / "o")
    )
    assert (
        result.returncode != 0
        and "task.jsonl:1: image" in result.stderr
        and "Traceback" not in result.stderr
    )
    result = run_cli(
        "--model", tiny_model_dir, "--reward_funcs", "nope.py:f",
        "--output_dir", str(tmp_path / "o"),
    )
    assert result.returncode != 0 and "--reward_funcs 'nope.py:f'" in result.stderr


@pytest.mark.slow
def test_end_to_end_command_line_on_the_tiny_model(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import Qwen2VLForConditionalGeneration

    out = tmp_path / "run"
    reward_file = (
        tmp_path / "my_rewards.py"
    )  # a random model never earns format or accuracy: give it a signal
    reward_file.write_text("def length(completion, example):\n    return len(completion) / 10\n")
    result = run_cli(
        "--model", tiny_model_dir, "--reward_funcs", "format", "accuracy", f"{reward_file}:length",
        "--dataset", "synthetic", "--dataset_limit", "64", "--synthetic_image_size", "56",
        "--output_dir", str(out), "--max_steps", "3", "--num_generations", "4",
        "--prompts_per_step", "2", "--micro_batch_size", "3", "--max_completion_length", "8",
        "--beta", "0.04", "--num_iterations", "2", "--log_samples_steps", "2",
        "--learning_rate", "1e-2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for key in [
        "reward", "reward_std", "rewards/format/mean", "rewards/accuracy/mean",
        "rewards/length/mean", "frac_reward_zero_std", "completions/mean_length",
        "completions/clipped_ratio", "completions/reflection_ratio", "kl", "clip_ratio/low_mean",
        "clip_ratio/high_mean", "grad_norm", "learning_rate", "step_time", "loss",
    ]:
        assert all(key in m for m in metrics), key
    assert metrics[-1]["kl"] > 0.0  # the adapter moved away from the reference
    assert (
        metrics[0]["learning_rate"] > metrics[-1]["learning_rate"] > 0
    )  # linear decay over 3 steps x 2 updates
    samples = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2} and "completion" in samples[0]
    assert json.loads((out / "config.json").read_text())["max_steps"] == 3
    model = PeftModel.from_pretrained(
        Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir), out / "checkpoint-3"
    )
    lora_B = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    untrained = [n for n, p in lora_B.items() if not p.any()]  # peft starts each at 0
    assert lora_B and not untrained, untrained[:3]


@pytest.mark.slow
def test_in_training_evaluation_logs_eval_accuracy(tmp_path, tiny_model_dir, monkeypatch):
    """A random model answers none right: the even held-out items answer with their gold option
    (the real parser scores it), so the logged accuracy is each evaluation's judged rows'."""
    import eval as evaluation

    real_judge, judged = evaluation.judge, []

    def judge(example, response):
        if int(example["id"]) % 2 == 0:
            response = f"</think> <answer> {example['choices'][example['gold']]} </answer>"
        judged.append(real_judge(example, response))
        return judged[-1]

    monkeypatch.setattr(evaluation, "judge", judge)
    out = tmp_path / "run"
    train.main([
        "--model", tiny_model_dir, "--dataset", "synthetic", "--dataset_limit", "32",
        "--synthetic_image_size", "56", "--output_dir", str(out), "--max_steps", "2",
        "--num_generations", "2", "--prompts_per_step", "2", "--max_completion_length", "4",
        "--eval_steps", "1", "--eval_limit", "5",
    ])
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and len(judged) == 10  # 5 held-out items at each step
    for row, step_judged in zip(rows, (judged[:5], judged[5:])):
        assert sorted(r["id"] for r in step_judged) == ["0", "1", "2", "3", "4"]
        accuracy = sum(r["correct"] for r in step_judged) / 5
        assert accuracy >= 0.6 and row["eval/accuracy"] == pytest.approx(accuracy)


def test_held_out_rows_differ_from_training_rows(tmp_path):
    cfg = train.parse_config(
        [
            "--dataset", "synthetic", "--eval_steps", "1", "--eval_limit", "8",
            "--synthetic_image_size", "56",
        ]
    )
    held_out, prompt_rows = train.held_out_examples(cfg, data.View(), "choice")
    training = demo.synthetic_dataset(8, cfg.seed, tuple(cfg.synthetic_tasks), 56)
    assert len(held_out) == 8 and len(prompt_rows) == 8  # each row's question and image tokens
    assert all(
        h["image"].tobytes() != training[i]["image"].tobytes() for i, h in enumerate(held_out)
    )
    with pytest.raises(ValueError, match="--eval_dataset"):
        cfg = train.parse_config(["--dataset", "x.jsonl", "--eval_steps", "1"])
        train.held_out_examples(cfg, data.View(), "choice")


def test_rollout_metrics_on_a_hand_computed_batch():
    import types

    import torch

    import rewards
    from r1v import processes

    eos = 9
    ids = torch.tensor([[1, 9, 0], [1, 2, 3], [9, 0, 0], [1, 2, 9]])            # (N, C)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]])            # (N, C)
    rollout = types.SimpleNamespace(completion_ids=ids, completion_mask=mask)
    texts = ["Wait, let me re-check.", "fine", "On second thought, wait", "no"]
    lengths, terminated = metrics.completion_lengths(rollout, [eos])
    assert (lengths, terminated) == ([2, 3, 1, 3], [True, False, True, True])
    funcs = {"accuracy": lambda completion, example: float(example["q"] != 1 or "fine" not in
                                                           completion)}
    scored = train.score(texts, [{"task_type": "choice", "q": 1}, {"task_type": "choice", "q": 2}],
                         rollout, [eos], funcs, {"accuracy": 1.0}, 2, None)
    examples = scored.examples
    assert [ex["completion_tokens"] for ex in examples] == [1, 3, 0, 2]  # EOS not counted
    assert [ex["q"] for ex in examples] == [1, 1, 2, 2]
    assert [rewards.length_reward(t, ex) for t, ex in zip(texts, examples)] == \
        [0.001, 0.003, 0.0, 0.002]
    assert scored.total == scored.parts["accuracy"] == [1.0, 0.0, 1.0, 1.0]
    m = metrics.rollout_metrics(scored, 2)
    assert (m["completions/mean_length"], m["completions/clipped_ratio"]) == (2.25, 0.25)
    assert (m["completions/mean_terminated_length"], m["completions/min_terminated_length"],
            m["completions/max_terminated_length"]) == (2.0, 1.0, 3.0)  # lengths 2, 1, 3
    assert m["completions/reflection_ratio"] == 0.5
    assert m["completions/reflection/wait"] == 0.5
    assert m["completions/reflection/recheck"] == m["completions/reflection/second_thought"] == 0.25
    assert m["completions/reflection/mistake"] == 0.0
    assert {f"completions/reflection/{k}" for k in metrics.REFLECTION_KEYS} <= set(m)
    # one process: the whole batch is its share
    assert scored.gathered(processes.Processes(None)) == scored
    none_ended = metrics.Scored(texts, examples, [0.0] * 4, {}, {}, lengths, [False] * 4)
    m = metrics.rollout_metrics(none_ended, 2)  # none ended: 0, as the reference library
    assert m["completions/mean_terminated_length"] == m["completions/max_terminated_length"] == 0


def test_objective_sft_trains_on_the_gold_answers_and_its_loss_falls(tiny_model_dir, tmp_path):
    out = tmp_path / "sft"
    train.main(["--model", tiny_model_dir, "--dataset", "synthetic", "--dataset_limit", "32",
                "--synthetic_image_size", "56", "--output_dir", str(out), "--objective", "sft",
                "--prompts_per_step", "8", "--micro_batch_size", "3", "--max_steps", "12",
                "--learning_rate", "2e-2", "--lora_r", "8", "--lora_alpha", "16",
                "--lr_scheduler", "constant", "--save_steps", "0"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert "reward" not in rows[0] and rows[0]["num_tokens"] > 0
    # The tiny model's logits are small (random lm_head, untouched by LoRA): near-uniform, so
    # the loss can only fall by so much (~4.7 -> ~4.0 here); its argmax learns the answers.
    first, last = rows[0], rows[-3:]
    assert sum(r["loss"] for r in last) / 3 < first["loss"] - 0.4
    assert sum(r["mean_token_accuracy"] for r in last) / 3 > 0.3 > first["mean_token_accuracy"]
    assert all(0 <= r["mean_token_accuracy"] <= 1 and r["grad_norm"] > 0 for r in rows)


def test_sft_completions_are_the_gold_answers_in_the_answer_format():
    choice = {"task_type": "choice", "answer": "left", "prompt": "... <think>"}
    assert data.answer_completion(choice) == "</think> <answer> left </answer>"
    rec = {"task_type": "rec", "box": [1.4, 2.6, 30.0, 40.2], "prompt": "chat"}
    assert data.answer_completion(rec) == "<think> </think> <answer> [1, 3, 30, 40] </answer>"
    ovd = {"task_type": "ovd", "prompt": "<think>",
           "boxes": [{"bbox_2d": [0.4, 1, 2, 3], "label": "cat"}]}
    assert data.answer_completion(ovd) == \
        '</think> <answer> [{"bbox_2d": [0, 1, 2, 3], "label": "cat"}] </answer>'
