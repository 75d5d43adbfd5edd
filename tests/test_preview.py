"""r1v/preview.py, --preview_rewards and --rescore: a reward's figures before a run, the run's
own path (its step 1 scored alike), a logged run rescored exactly, bad input refused at once."""

import json

import pytest

import rewards
import train
from r1v import cli, preview

MINE = """
import rewards

def one(completion, example):
    return 1.0

def same(completion, example):
    return rewards.accuracy_reward(completion, example)

def chars(completion, example):
    return float(len(completion))

def chars_again(completion, example):
    return float(len(completion))

def boom(completion, example):
    if len(completion) % 2:
        raise KeyError("solution")
    return 0.5
"""
TINY = ["--dataset", "synthetic", "--dataset_limit", "16", "--synthetic_image_size", "56",
        "--prompts_per_step", "2", "--num_generations", "4", "--max_completion_length", "6",
        "--lora_r", "4", "--lora_alpha", "8", "--seed", "3"]


@pytest.fixture
def mine(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text(MINE)
    return [f"{path}:{name}" for name in ("one", "same", "chars", "chars_again", "boom")]


def test_figures_on_hand_made_scores():
    """Two groups of 3: an always-1 reward, an accuracy-like one, its copy."""
    texts = ["a", "bb", "c", "dd", "e", "ff"]
    parts = {"one": [1.0] * 6, "acc": [1.0, 0.0, 0.0, 1.0, 1.0, 1.0],
             "copy": [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]}
    total = [a + b for a, b in zip(parts["one"], parts["acc"])]
    groups = [[0, 1, 2], [3, 4, 5]]
    shown = [{"question": "q0", "answer": "a"}, {"question": "q1", "answer": "b"}]
    report = preview.summarize(texts, total, parts, {"one": 0, "acc": 0, "copy": 2}, groups,
                               shown, {})
    one, acc = report["rewards"]["one"], report["rewards"]["acc"]
    assert one == {"mean": 1.0, "std": 0.0, "min": 1.0, "max": 1.0, "errors": 0,
                   "zero_variance_groups": 1.0}
    assert acc["mean"] == pytest.approx(4 / 6) and acc["zero_variance_groups"] == 0.5
    assert acc["std"] == pytest.approx(0.5164, abs=1e-4)  # sample std, as rewards/<name>/std
    assert report["total"]["errors"] == 2 and report["total"]["zero_variance_groups"] == 0.5
    assert report["correlation"] == {"one|acc": None, "one|copy": None, "acc|copy": 1.0}
    assert report["examples"][0]["highest"]["completion"] == "a"
    assert report["examples"][0]["lowest"]["rewards"] == {"one": 1.0, "acc": 0.0, "copy": 0.0}
    assert [report[k] for k in ("prompts", "num_generations")] == [2, 3]
    assert "2 prompts" not in preview.describe(report)  # the table, not the header
    assert "50% of the groups scored the same" in preview.describe(report)


def test_a_preview_scores_the_runs_first_step_as_the_run_does(tmp_path, tiny_model_dir, mine,
                                                               capsys):
    """The tiny model's preview of the run's first 2 prompts (one step) has its step 1's
    figures; a preview touches no file of the run in its folder; the same seed, the same
    preview; a raising reward is counted."""
    run = tmp_path / "run"
    flags = ["--model", tiny_model_dir, *TINY, "--reward_funcs", "format", "accuracy",
             *mine, "--output_dir", str(run)]
    train.main([*flags, "--max_steps", "1", "--log_samples_steps", "1", "--num_samples", "2"])
    step1 = json.loads((run / "metrics.jsonl").read_text())
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    report = train.main([*flags, "--preview_rewards", "2"])
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == {
        **before, "reward_preview.json": (run / "reward_preview.json").read_bytes()}
    assert sorted(report) == ["correlation", "examples", "num_generations", "prompts",
                              "rewards", "settings", "total"]
    assert report["prompts"] == 2 and report["num_generations"] == 4
    for name, figures in report["rewards"].items():
        # metrics.jsonl's are float32's
        assert figures["mean"] == pytest.approx(step1[f"rewards/{name}/mean"], rel=1e-5)
        assert figures["std"] == pytest.approx(step1[f"rewards/{name}/std"], rel=1e-5)
        assert figures["errors"] == step1[f"rewards/{name}/errors"]
    assert report["total"]["mean"] == pytest.approx(step1["reward"], rel=1e-5)
    assert report["total"]["zero_variance_groups"] == step1["frac_reward_zero_std"]
    one, same, acc = (report["rewards"][k] for k in ("one", "same", "accuracy"))
    assert one["std"] == 0.0 and one["zero_variance_groups"] == 1.0
    assert same == acc
    assert report["correlation"]["chars|chars_again"] == pytest.approx(1.0)
    assert 0 < report["rewards"]["boom"]["errors"] < 8 and acc["errors"] == 0
    assert report["rewards"]["boom"]["errors"] == sum(
        len(s["completion"]) % 2 for s in read(run / "samples.jsonl"))
    assert "zero-variance groups" in capsys.readouterr().out
    # another folder, 3 prompts (a batch of 2, then 1): the same seed gives the same preview
    again = [train.main([*flags[:-1], str(tmp_path / f"p{k}"), "--preview_rewards", "3"])
             for k in range(2)]
    assert again[0]["prompts"] == 3
    assert {k: v for k, v in again[0].items() if k != "settings"} == \
        {k: v for k, v in again[1].items() if k != "settings"}
    assert sorted(p.name for p in (tmp_path / "p0").iterdir()) == ["reward_preview.json"]


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rescoring_a_runs_samples_gives_back_its_logged_rewards(tmp_path, tiny_model_dir, mine):
    """samples.jsonl keeps whole groups with what their rewards saw: its own rewards score
    every logged completion exactly as the run did; the report groups by step and prompt."""
    run = tmp_path / "run"
    specs = ["format", "accuracy", "length", *mine[2:]]
    train.main(["--model", tiny_model_dir, *TINY, "--reward_funcs", *specs, "--output_dir",
                str(run), "--max_steps", "3", "--log_samples_steps", "2", "--num_samples", "1"])
    samples = read(run / "samples.jsonl")
    assert [(s["step"], s["group"]) for s in samples] == [(1, 0)] * 4 + [(2, 0)] * 4
    assert "image" not in samples[0]["example"] and "completion_tokens" in samples[0]["example"]
    groups = preview.read_samples(run / "samples.jsonl")
    funcs, weights = rewards.load_rewards(specs)
    texts, total, parts, errors, indices, shown = preview.rescore(
        groups, funcs, weights, rewards.score_completions)
    assert parts == {name: [s["rewards"][name] for s in samples] for name in funcs}
    assert total == [s["reward"] for s in samples] and indices == [[0, 1, 2, 3], [4, 5, 6, 7]]
    report = train.main(["--rescore", str(run / "samples.jsonl"), "--reward_funcs", *specs,
                         "--output_dir", str(tmp_path / "r")])
    assert report["prompts"] == 2 and report["examples"][1]["step"] == 2
    assert report["rewards"]["boom"]["errors"] == errors["boom"]
    default = train.main(["--rescore", str(run / "samples.jsonl"), "--output_dir",
                          str(tmp_path / "r")])  # the task's rewards
    assert list(default["rewards"]) == ["format", "accuracy"]


def error_of(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.run(train.main, argv)
    lines = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


def test_bad_input_is_one_line_before_any_model_loads(tmp_path, tiny_model_dir, capsys,
                                                      monkeypatch):
    monkeypatch.setattr(train, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    out = ["--output_dir", str(tmp_path / "o")]
    base = ["--model", tiny_model_dir, *TINY, *out]
    assert "first epoch has 16 prompts" in error_of([*base, "--preview_rewards", "17"], capsys)
    assert "--reward_funcs 'nope.py:f'" in error_of(
        [*base, "--preview_rewards", "2", "--reward_funcs", "nope.py:f"], capsys)
    assert "not with --resume" in error_of([*base, "--preview_rewards", "2", "--resume"], capsys)
    assert "give one" in error_of([*base, "--preview_rewards", "2", "--rescore", "x"], capsys)
    assert "no such file" in error_of(["--rescore", str(tmp_path / "none.jsonl"), *out], capsys)
    assert "--reward_funcs 'nope.py:f'" in error_of(
        ["--rescore", str(tmp_path / "none.jsonl"), "--reward_funcs", "nope.py:f", *out], capsys)
    old = tmp_path / "samples.jsonl"  # a line as samples.jsonl was before it kept examples
    old.write_text(json.dumps({"step": 1, "group": 0, "question": "q", "answer": "a",
                               "completion": "c", "rewards": {"format": 0.0}}) + "\n")
    assert "samples.jsonl:1: the sample has no 'example'" in error_of(
        ["--rescore", str(old), *out], capsys)
    old.write_text(json.dumps({"step": 1, "question": "q", "completion": "c", "example": {}})
                   + "\n")  # no group: no run wrote it
    assert "not a line of a run's samples.jsonl" in error_of(["--rescore", str(old), *out],
                                                             capsys)


def sample(step=1, group=0, completion="</think><answer>a</answer>", **example):
    return {"step": step, "group": group, "question": "q", "answer": "a", "completion": completion,
            "example": {"task_type": "choice", "answer": "a", "question": "q", "prompt": "<think>",
                        **example}}


def test_rescoring_one_completion_reports_its_std_as_undefined(tmp_path, capsys):
    """Found probing the rewards: a samples.jsonl of one line (`head -1`, to try a reward on one
    completion) ended in a traceback: its sample std was NaN, which JSON cannot hold."""
    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps(sample()) + "\n")
    report = train.main(["--rescore", str(path), "--output_dir", str(tmp_path / "o")])
    assert report["rewards"]["accuracy"]["std"] is None and report["total"]["mean"] == 2.0
    assert json.loads((tmp_path / "o" / "reward_preview.json").read_text()) == report
    assert "accuracy       1.000       -   1.000" in capsys.readouterr().out


def test_rescoring_a_file_that_is_not_a_runs_samples_is_one_line(tmp_path, capsys):
    """Found probing the rewards: an older run's lines (no `group`, no `example`) were called
    "not a line of a run's samples.jsonl", not what they are; a group or step that is a list
    and a task with no default rewards ended in tracebacks."""
    path, out = tmp_path / "samples.jsonl", ["--output_dir", str(tmp_path / "o")]
    older = {k: v for k, v in sample().items() if k not in ("group", "example")}
    for line, message in [(older, "samples.jsonl:1: the sample has no 'example'"),
                          (sample(group=[0]), "samples.jsonl:1: not a line of a run's samples"),
                          (sample(completion=None), "samples.jsonl:1: not a line of a run's"),
                          (sample(task_type="vqa"), "its task_type 'vqa' has no default rewards")]:
        path.write_text(json.dumps(line) + "\n")
        assert message in error_of(["--rescore", str(path), *out], capsys)


def test_rescoring_two_runs_samples_joined_is_refused_not_merged(tmp_path, capsys):
    """Found probing the rewards: `cat a/samples.jsonl b/samples.jsonl` rescored as one file
    merged each step's group 0 of both runs (two prompts) into one group of 2G completions."""
    path = tmp_path / "samples.jsonl"
    run = [sample(group=g, completion=c) for g in (0, 1) for c in ("x", "y")]
    path.write_text("".join(json.dumps(line) + "\n" for line in run + run))
    assert "samples.jsonl:5: step 1's group 0 comes twice" in error_of(
        ["--rescore", str(path), "--output_dir", str(tmp_path / "o")], capsys)


def test_the_table_shows_rewards_whose_names_start_alike_apart():
    """Found probing the rewards: the table cut names at 12 characters, so length_penalty_soft
    and length_penalty_hard had two rows both named length_penal."""
    parts = {"length_penalty_soft": [1.0, 0.0], "length_penalty_hard": [0.0, 0.0]}
    report = preview.summarize(["a", "b"], [1.0, 0.0], parts, dict.fromkeys(parts, 0), [[0, 1]],
                               [{"question": "q", "answer": "a"}], {})
    rows = preview.describe(report).splitlines()
    assert rows[1].startswith("length_penalty_soft ") and rows[2].startswith("length_penalty_hard")
