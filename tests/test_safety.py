"""Nothing a user has is lost or mixed up: run folders are not reused silently, a resume keeps
the settings its state depends on and steps past a corrupt checkpoint, a row that breaks
mid-run is skipped and counted, and eval.py never reports one model's results as another's."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

import eval as evaluation
import train
from r1v import images
from r1v import rows as stored
from r1v import runs
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
    before = checksums(out)
    with pytest.raises(UserError, match="already holds a run"):
        train.train(train.parse_config(args(tiny_model_dir, out)))
    assert checksums(out) == before  # every file byte for byte
    # a resume may change what does not touch the state, and says so
    train.train(train.parse_config(args(tiny_model_dir, out, "--resume", "--max_steps", "3")))
    assert (
        steps(out) == [1, 2, 3]
        and "changed since the checkpoint: max_steps" in capsys.readouterr().out
    )
    before = checksums(out)
    with pytest.raises(UserError, match="--seed 42 -> 1, --lora_r 4 -> 8"):
        train.train(
            train.parse_config(
                args(tiny_model_dir, out, "--resume", "--lora_r", "8", "--seed", "1")
            )
        )
    assert checksums(out) == before  # refused: the run and its checkpoints as they were
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
    real = images.verified_size
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
    """Its first call scores, its second calls sys.exit() (which ended the run at step 1 with
    status 0), the rest divide by zero: all of it is the reward's error; the run goes on."""
    reward = tmp_path / "mine.py"
    reward.write_text("import sys\ncalls = []\n\n\ndef broken(completion, example):\n"
                      "    calls.append(1)\n    if len(calls) == 2:\n        sys.exit(0)\n"
                      "    return 1.0 if len(calls) == 1 else 1 / 0\n")
    out = tmp_path / "run"
    train.train(
        train.parse_config(
            args(tiny_model_dir, out, "--reward_funcs", "format", f"{reward}:broken")
        )
    )
    printed = capsys.readouterr().out
    assert printed.count("reward 'broken' raised") == 1 and "SystemExit" in printed
    assert "done: 2 steps" in printed and (out / "checkpoint-2").is_dir()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["rewards/broken/errors"] for r in rows] == [3, 4]


def test_a_reward_that_raises_on_every_completion_of_the_first_step_stops_it(tmp_path,
                                                                            tiny_model_dir):
    reward = tmp_path / "mine.py"
    reward.write_text("def needs_solution(completion, example):\n"
                      "    return float(example['solution'] in completion)\n")
    out = tmp_path / "run"
    with pytest.raises(UserError) as info:
        train.train(train.parse_config(
            args(tiny_model_dir, out, "--reward_funcs", "format", f"{reward}:needs_solution")))
    assert str(info.value) == ("reward 'needs_solution' raised on all 4 completions of the first "
                               "step, so it would only ever score 0; its first error: "
                               "KeyError: 'solution'")
    assert not (out / "metrics.jsonl").exists()  # the same command runs again once it is fixed


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


def checksums(folder):
    """Every file under `folder` (the lock's aside) and the hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_overwrite_clears_nothing_before_every_check_has_passed(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    train.train(train.parse_config(args(tiny_model_dir, out)))
    before = checksums(out)
    bad = write_task(tmp_path / "task", changes={3: {"answer": "green"}})
    with pytest.raises(UserError, match="task.jsonl:3: the answer 'green'"):
        train.train(train.parse_config(args(tiny_model_dir, out, "--overwrite", "--dataset", bad,
                                            "--prompts_per_step", "2")))
    assert checksums(out) == before  # the finished run is all there


def test_the_demos_prompt_lengths_are_checked_before_overwrite_clears(tmp_path):
    """The demo's model is built into the run folder after the checks; its prompts are measured
    with its tokenizer before anything is cleared."""
    out = tmp_path / "demo"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')  # an earlier demo's
    (out / "checkpoint-1").mkdir()
    (out / "checkpoint-1" / "adapter_model.safetensors").write_bytes(b"weights")
    before = checksums(out)
    with pytest.raises(UserError, match="--max_prompt_length 5"):
        train.train(train.parse_config(["--demo", "--output_dir", str(out), "--overwrite",
                                        "--max_prompt_length", "5"]))
    assert checksums(out) == before and not (out / "demo-base").exists()


def test_a_folder_in_use_is_refused_and_a_dead_holder_is_noted(tmp_path, tiny_model_dir,
                                                                capsys):
    out = tmp_path / "run"
    out.mkdir()  # a folder that was there: the lock's file stays (one it made goes with it)
    with runs.locked(out, "--output_dir"):  # as another run or evaluation writing there
        with pytest.raises(UserError, match=f"{out} is in use by process {os.getpid()}"):
            train.train(train.parse_config(args(tiny_model_dir, out)))
        with pytest.raises(UserError, match=f"{out} is in use by process {os.getpid()}"):
            evaluation.main(["--model", tiny_model_dir, "--output_dir", str(out), "--dataset",
                             write_task(tmp_path / "task")])
    assert not (out / "metrics.jsonl").exists()
    (out / ".lock").write_text("999999")  # killed: its pid stays, the kernel freed its lock
    train.train(train.parse_config(args(tiny_model_dir, out)))
    assert "locked by process 999999, which has ended" in capsys.readouterr().out
    assert steps(out) == [1, 2]


def test_a_run_that_fails_its_checks_leaves_no_folder_it_made(tmp_path, tiny_model_dir):
    out = tmp_path / "new" / "run"
    with pytest.raises(UserError, match="--resume: no complete checkpoint"):
        train.train(train.parse_config(args(tiny_model_dir, out, "--resume")))
    with pytest.raises(UserError, match="nonsense"):
        train.train(train.parse_config(args(tiny_model_dir, out, "--reward_funcs", "nonsense")))
    assert not out.exists()
    (tmp_path / "kept").mkdir()  # a folder that was there stays, with the lock's file
    with pytest.raises(UserError, match="nonsense"):
        train.train(train.parse_config(args(tiny_model_dir, tmp_path / "kept",
                                            "--reward_funcs", "nonsense")))
    assert [p.name for p in (tmp_path / "kept").iterdir()] == [".lock"]


def test_config_json_records_the_rewards_the_run_used(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    train.train(train.parse_config(args(tiny_model_dir, out)))
    saved = json.loads((out / "config.json").read_text())
    assert saved["reward_funcs"] == ["format", "accuracy"] and saved["reward_weights"] == [1, 1]
    # a resume compares the same resolved settings: the defaults resume, weights given too
    train.train(train.parse_config(args(tiny_model_dir, out, "--resume", "--max_steps", "3",
                                        "--reward_weights", "1", "1")))
    assert steps(out) == [1, 2, 3]


def test_a_bug_while_reading_a_row_is_not_taken_for_a_bad_row(tmp_path, tiny_model_dir,
                                                               monkeypatch):
    task = write_task(tmp_path / "task", rows=4)
    real = images.decode_image

    def buggy(value):
        if str(value).endswith("3.png"):
            raise TypeError("a bug in the reading code")
        return real(value)

    monkeypatch.setattr(stored, "decode_image", buggy)
    with pytest.raises(TypeError, match="a bug in the reading code"):  # not skipped as data
        train.train(train.parse_config(args(tiny_model_dir, tmp_path / "run", "--dataset", task,
                                            "--prompts_per_step", "4")))


def test_eval_refuses_to_resume_predictions_of_edited_data_or_an_unreadable_record(
        tmp_path, tiny_model_dir):
    task = write_task(tmp_path / "task")
    named = tmp_path / "task" / "colours.jsonl"
    named.write_text(Path(task).read_text())
    out = tmp_path / "eval"
    argv = ["--model", tiny_model_dir, "--dataset", str(named), "--output_dir", str(out),
            "--max_new_tokens", "3"]
    evaluation.main(argv)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert {r["task"] for r in rows} == {"colours"}  # the task's name, not a placeholder
    kept = checksums(out)
    lines = named.read_text().splitlines()
    lines[1] = lines[1].replace('"answer": "red"', '"answer": "blue"')  # a gold answer edited
    named.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match="dataset_content differ"):
        evaluation.main(argv)
    (out / "eval_config.json").write_text('{"model": "x"')  # torn by a kill mid-write
    with pytest.raises(UserError, match="eval_config.json cannot be read"):
        evaluation.main(argv)
    assert checksums(out)["predictions.jsonl"] == kept["predictions.jsonl"]
    assert evaluation.main(argv + ["--overwrite"])["n"] == 6


def test_a_folder_with_a_config_json_not_a_runs_is_not_written_over(tmp_path, tiny_model_dir):
    """--output_dir a model's folder (or any whose config.json is not a run's): refused, even
    with --overwrite, which clears runs only; an empty --output_dir is not the working folder."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_bytes((Path(tiny_model_dir) / "config.json").read_bytes())
    before = checksums(model)
    for extra in ((), ("--overwrite",)):
        with pytest.raises(UserError, match=r"--output_dir .*model: its config.json is not a "
                           r"run's \(a model's\?\); choose another --output_dir"):
            train.train(train.parse_config(args(tiny_model_dir, model, *extra)))
    assert checksums(model) == before
    with pytest.raises(UserError, match="--output_dir is empty: name a folder"):
        train.train(train.parse_config(args(tiny_model_dir, "")))
    out = tmp_path / "run"  # a run's own config.json (one that failed before step 1) is reused
    train.train(train.parse_config(args(tiny_model_dir, out, "--max_steps", "1")))
    (out / "metrics.jsonl").unlink()
    runs.clear(out, [p.name for p in out.glob("checkpoint-*")])
    train.train(train.parse_config(args(tiny_model_dir, out, "--max_steps", "1")))
    assert steps(out) == [1]


def test_resuming_another_folders_checkpoint_into_a_run_is_refused(tmp_path, tiny_model_dir):
    """Into a folder holding a run of its own, the other run's steps would follow this one's in
    metrics.jsonl (steps 1, 2, 3, 7, 8), beside its checkpoints; with --overwrite, they go."""
    out, other = tmp_path / "run", tmp_path / "other" / "checkpoint-6"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    other.mkdir(parents=True)
    (other / "trainer_state.pt").write_bytes(b"state")
    before = checksums(out)
    with pytest.raises(UserError, match=r"already holds a run \(checkpoint-2, metrics.jsonl\); "
                       r"--resume .*checkpoint-6 is another run's checkpoint"):
        train.train(train.parse_config(args(tiny_model_dir, out, "--resume", str(other))))
    assert checksums(out) == before
    assert runs.held_run(out, str(other), overwrite=True) == ["checkpoint-2", "metrics.jsonl"]
    assert runs.held_run(out, str(out / "checkpoint-2"), overwrite=False) == []  # its own
    with pytest.raises(UserError, match="trainer_state.pt is missing"):  # not a checkpoint
        train.train(train.parse_config(args(tiny_model_dir, out, "--resume", str(out))))


def test_overwrite_never_deletes_the_model_the_run_loads(tmp_path, tiny_model_dir):
    """--model RUN/demo-base --output_dir RUN --overwrite: the old run's demo-base was cleared,
    then the new run could not load it; the old run and the warmed-up model were both lost."""
    out = tmp_path / "run"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    shutil.copytree(tiny_model_dir, out / "demo-base")
    before = checksums(out)
    with pytest.raises(UserError, match=r"--overwrite would delete --model .*demo-base"):
        train.train(train.parse_config(args(str(out / "demo-base"), out, "--overwrite")))
    assert checksums(out) == before


def test_a_checkpoint_or_a_folder_inside_one_is_no_output_dir(tmp_path, tiny_model_dir):
    """A run in a checkpoint would write its config.json over the checkpoint's, and go when
    the checkpoint's run rotates it out (--save_total_limit)."""
    checkpoint = tmp_path / "run" / "checkpoint-6"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.pt").write_bytes(b"state")
    (checkpoint / "config.json").write_text('{"objective": "grpo"}')
    before = checksums(checkpoint)
    for out, where in ((checkpoint, "is the"), (checkpoint / "eval", "is inside the")):
        with pytest.raises(UserError, match=f"--output_dir .*{where} checkpoint .*checkpoint-6"):
            train.train(train.parse_config(args(tiny_model_dir, out, "--overwrite")))
    assert checksums(checkpoint) == before and not (checkpoint / "eval").exists()


@pytest.mark.parametrize("extra,message", [
    (("--epsilon_low", "1.5"), "--epsilon_low must be below 1"),
    (("--reward_weights", "0", "0"), "--reward_weights are all 0: every advantage would be 0"),
    (("--eval_dataset", "held.jsonl"), "--eval_dataset is used every --eval_steps N steps"),
])
def test_values_that_would_make_a_wrong_run_are_refused(tmp_path, tiny_model_dir, extra,
                                                        message):
    with pytest.raises(UserError, match=message):
        train.parse_config(args(tiny_model_dir, tmp_path / "run", *extra))


def test_a_model_folder_that_is_empty_or_missing_is_one_line(tmp_path, tiny_model_dir):
    (tmp_path / "empty").mkdir()
    for model, message in ((tmp_path / "empty", "cannot load its config"),
                           (tmp_path / "none", "does not exist")):
        with pytest.raises(UserError, match=message):
            train.train(train.parse_config([*args(tiny_model_dir, tmp_path / "run"),
                                            "--model", str(model)]))
