"""Nothing a user has is lost or mixed up: run folders are not reused silently, a resume keeps
the settings its state depends on and steps past a corrupt checkpoint, a row that breaks
mid-run is skipped and counted, and eval.py never reports one model's results as another's."""

import json

import pytest

import eval as evaluation
import train
from r1v import rows as stored
from r1v.cli import UserError
from test_errors import write_task


def args(model_dir, out, *extra):
    return [
        "--model", model_dir, "--dataset", "synthetic", "--dataset_limit", "32",
        "--synthetic_image_size", "56", "--output_dir", str(out), "--num_generations", "2",
        "--prompts_per_step", "2", "--max_completion_length", "4", "--lora_r", "4",
        "--lora_alpha", "8", "--save_steps", "1", "--max_steps", "2", *extra,
    ]


def steps(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_run_folder_is_reused_only_on_request(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "run"
    train.train(train.parse_config(args(tiny_model_dir, out)))
    assert steps(out) == [1, 2] and "done: 2 steps" in capsys.readouterr().out
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(UserError, match="already holds a run"):
        train.train(train.parse_config(args(tiny_model_dir, out)))
    assert (out / "metrics.jsonl").read_text() == before
    # a resume may change what does not touch the state, and says so
    train.train(train.parse_config(args(tiny_model_dir, out, "--resume", "--max_steps", "3")))
    assert (
        steps(out) == [1, 2, 3]
        and "changed since the checkpoint: max_steps" in capsys.readouterr().out
    )
    with pytest.raises(UserError, match="--seed 42 -> 1, --lora_r 4 -> 8"):
        train.train(
            train.parse_config(
                args(tiny_model_dir, out, "--resume", "--lora_r", "8", "--seed", "1")
            )
        )
    train.train(train.parse_config(args(tiny_model_dir, out, "--overwrite")))
    assert steps(out) == [1, 2] and not (out / "checkpoint-3").exists()


def test_resume_steps_past_a_corrupt_checkpoint(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "run"
    train.train(train.parse_config(args(tiny_model_dir, out)))
    (out / "checkpoint-2" / "trainer_state.pt").write_bytes(b"torn")
    with pytest.raises(UserError, match="checkpoint-2: trainer_state.pt"):
        train.train(
            train.parse_config(args(tiny_model_dir, out, "--resume", str(out / "checkpoint-2")))
        )
    train.train(train.parse_config(args(tiny_model_dir, out, "--resume", "--max_steps", "3")))
    printed = capsys.readouterr().out
    assert (
        "skipping" in printed and "resumed from" in printed and "checkpoint-1 at step 1" in printed
    )
    assert steps(out) == [1, 2, 3]


def test_a_row_that_breaks_mid_run_is_skipped_and_counted(
    tmp_path, tiny_model_dir, capsys, monkeypatch
):
    task = write_task(tmp_path / "task", rows=4)
    real = stored.verified_size
    # the check passed; the file went bad afterwards (as if deleted or rewritten mid-run)
    monkeypatch.setattr(
        stored, "verified_size",
        lambda value: (56, 56) if str(value).endswith("3.png") else real(value),
    )
    (tmp_path / "task" / "3.png").write_bytes(b"gone bad")
    out = tmp_path / "run"
    train.train(
        train.parse_config(
            args(
                tiny_model_dir, out, "--dataset", task, "--prompts_per_step", "4",
                "--max_steps", "2",
            )
        )
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_rows"] for r in rows] == [1, 2]
    printed = capsys.readouterr().out
    assert printed.count("skipped a row") == 1 and "task.jsonl:3" in printed


def test_a_raising_reward_is_shown_once_and_counted(tmp_path, tiny_model_dir, capsys):
    reward = tmp_path / "mine.py"
    reward.write_text("def broken(completion, example):\n    return 1 / 0\n")
    out = tmp_path / "run"
    train.train(
        train.parse_config(
            args(tiny_model_dir, out, "--reward_funcs", "format", f"{reward}:broken")
        )
    )
    printed = capsys.readouterr().out
    assert printed.count("reward 'broken' raised") == 1 and "ZeroDivisionError" in printed
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["rewards/broken/errors"] for r in rows] == [4, 4]


def test_eval_scores_a_jsonl_task_and_refuses_other_settings_predictions(tmp_path, tiny_model_dir):
    task = write_task(tmp_path / "task")
    out = tmp_path / "eval"

    def run(*extra):
        return evaluation.main(
            [
                "--model", tiny_model_dir, "--dataset", task, "--output_dir", str(out),
                "--max_new_tokens", "3", *extra,
            ]
        )

    summary = run()
    assert summary["n"] == 6 and set(summary["strict"]) == {"micro"}
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(r["source"] == "task.jsonl" for r in rows)
    assert run()["n"] == 6  # the same settings resume
    with pytest.raises(UserError, match="max_new_tokens differ"):
        run("--max_new_tokens", "4")
    with pytest.raises(UserError, match="model, limit differ"):
        evaluation.main(
            [
                "--model", tiny_model_dir + "/", "--dataset", task, "--output_dir", str(out),
                "--max_new_tokens", "3", "--limit", "2",
            ]
        )
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 6  # kept
    assert run("--max_new_tokens", "4", "--overwrite")["n"] == 6
