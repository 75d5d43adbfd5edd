"""Bad input, as users give it: one line `error: ...` naming the flag, file and line or row, a
non-zero exit, no traceback, nothing loaded (the --model path below is never reached) and the
user's files unchanged. Most cases run in-process through the same `cli.run` wrapper as the
command line; a few run the real command line to prove the whole path."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import eval as evaluation
import train
from r1v import cli, flags, model

ROOT = Path(__file__).resolve().parents[1]
NO_MODEL = "/does/not/exist/model"  # reaching the model would print this path


def write_task(folder, rows=6, changes=None):
    """A JSONL task of coloured squares; `changes` = {line (1-based): fields to set, None to
    drop a field, or None for a line that is not JSON}."""
    folder.mkdir(parents=True, exist_ok=True)
    changes, lines = changes or {}, []
    for i in range(1, rows + 1):
        Image.new("RGB", (56, 56), ["red", "blue"][i % 2]).save(folder / f"{i}.png")
        row = {
            "image": f"{i}.png", "question": "What color is it?", "choices": ["red", "blue"],
            "answer": ["red", "blue"][i % 2],
        }
        if i in changes and changes[i] is None:
            lines.append("{not json")
            continue
        row = {k: v for k, v in {**row, **changes.get(i, {})}.items() if v is not None}
        lines.append(json.dumps(row))
    (folder / "task.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder / "task.jsonl")


def run_train(capsys, monkeypatch, *argv):
    """`python train.py ARGV`, in-process: (exit status, stderr)."""

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(model, "load_base_model", never)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(train.main, list(argv))
    return exit_info.value.code, capsys.readouterr().err


def one_error_line(stderr):
    lines = [line for line in stderr.splitlines() if line.strip() and "checking rows" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr and NO_MODEL not in stderr
    return lines[0]


CASES = {
    "weights count": (["--reward_weights", "1"], "--reward_weights has 1 values for 2"),
    "one generation": (["--num_generations", "1"], "--num_generations"),
    "negative steps": (["--max_steps", "-5"], "--max_steps must be at least 0"),
    "zero temperature": (["--temperature", "0"], "--temperature must be above 0"),
    "unknown reward": (["--reward_funcs", "format", "acuracy"], "unknown reward 'acuracy'"),
    "reward file missing": (["--reward_funcs", "nope.py:f"], "file 'nope.py' does not exist"),
    "a local .json": (["--dataset", "my.json"], "--dataset my.json: does not exist"),
    "synthetic with 0 rows": (
        ["--dataset", "synthetic", "--dataset_limit", "0"],
        "--dataset_limit",
    ),
    "unknown synthetic task": (
        ["--dataset", "synthetic", "--synthetic_tasks", "sky"],
        "--synthetic_tasks",
    ),
    "eval dataset missing": (
        ["--dataset", "synthetic", "--eval_steps", "1", "--eval_dataset", "nothere.jsonl"],
        "--eval_dataset: file 'nothere.jsonl'",
    ),
    "negative learning rate": (["--learning_rate", "-1"], "--learning_rate must be above 0"),
    "infinite epochs": (["--num_train_epochs", "inf"], "--num_train_epochs must be a finite"),
    "not-a-number beta": (["--beta", "nan"], "--beta must be a finite number"),
    "not-a-number weight": (["--reward_weights", "nan", "1"], "--reward_weights must be a fin"),
    "clipping to 0": (["--max_grad_norm", "0"], "--max_grad_norm must be above 0"),
    "negative seed": (["--seed", "-1"], "--seed must be at least 0"),
    "top_p over 1": (["--top_p", "1.5"], "--top_p must be at most 1"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_flags_are_one_line_before_anything_loads(case, tmp_path, capsys, monkeypatch):
    argv, message = CASES[case]
    status, err = run_train(
        capsys, monkeypatch, "--model", NO_MODEL, "--output_dir", str(tmp_path / "out"), *argv
    )
    assert status == 2 and message in one_error_line(err)


ROWS = {
    "corrupt image": ({5: {"image": "broken.png"}}, "task.jsonl:5: the image cannot be read"),
    "choices a string": ({2: {"choices": "red, blue"}}, "task.jsonl:2: choices must be a list"),
    "one choice": ({3: {"choices": ["red"], "answer": "red"}}, "task.jsonl:3: choices must be"),
    "empty question": ({4: {"question": " "}}, "task.jsonl:4: the question is empty"),
    "answer not a choice": ({6: {"answer": "green"}}, "task.jsonl:6: the answer 'green'"),
    "image is a folder": ({2: {"image": "sub"}}, "task.jsonl:2: image"),
    "image missing": ({1: {"image": "gone.png"}}, "task.jsonl:1: image"),
    "not JSON": ({3: None}, "task.jsonl:3: not valid JSON"),
    "missing field": ({2: {"question": None}}, "task.jsonl:2: missing field(s) ['question']"),
    "a JPEG cut short": ({4: {"image": "cut.jpg"}},
                         "task.jsonl:4: the image cannot be read (image file is truncated"),
    "half a surrogate pair": ({3: {"question": "\ud83c?"}},
                              "task.jsonl:3: the field 'question' holds '\\ud83c', half of a"),
    "a 401-digit number": ({2: {"answer": 10**400}}, "task.jsonl:2: a number of 401 digits"),
    "an empty object": ({5: {"image": None, "question": None, "choices": None,
                             "answer": None}}, "task.jsonl:5: the row has none of the"),
}


@pytest.mark.parametrize("case", ROWS)
def test_every_row_is_checked_before_the_model_loads(case, tmp_path, capsys, monkeypatch):
    changes, message = ROWS[case]
    task = write_task(tmp_path / "task", changes=changes)
    (tmp_path / "task" / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "task" / "sub").mkdir()
    Image.effect_noise((64, 48), 60).convert("RGB").save(tmp_path / "task" / "cut.jpg")
    whole = (tmp_path / "task" / "cut.jpg").read_bytes()  # an interrupted copy:
    (tmp_path / "task" / "cut.jpg").write_bytes(whole[:len(whole) // 2])  # a header, half the data
    status, err = run_train(
        capsys, monkeypatch, "--model", NO_MODEL, "--dataset", task, "--prompts_per_step", "2",
        "--output_dir", str(tmp_path / "out"),
    )
    assert status == 2 and message in one_error_line(err)


def test_jsonl_text_that_is_not_utf8_is_named_and_unicode_line_separators_are_text(
        tmp_path, capsys, monkeypatch):
    task = write_task(tmp_path / "task")
    lines = (tmp_path / "task" / "task.jsonl").read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b"What", b"Wh\xffat")
    (tmp_path / "task" / "task.jsonl").write_bytes(b"\n".join(lines))
    status, err = run_train(capsys, monkeypatch, "--model", NO_MODEL, "--dataset", task,
                            "--output_dir", str(tmp_path / "o"))
    assert "task.jsonl:3: not UTF-8 text" in one_error_line(err)
    row = {"image": "1.png", "question": "What\u2028colour\u0085is it?", "choices": ["red", "b"],
           "answer": "red"}  # U+2028 and U+0085 inside a string: valid JSON, one line
    (tmp_path / "task" / "task.jsonl").write_text(json.dumps(row, ensure_ascii=False) + "\n")
    import data
    from r1v import rows

    ds = data.load_examples(task)
    assert len(rows.check_rows(ds)) == 1 and "\u2028colour\u0085" in ds[0]["question"]


def test_a_truncated_adapter_is_named_before_the_model_loads(tmp_path, capsys, monkeypatch,
                                                             tiny_model_dir):
    model.load_policy(tiny_model_dir, torch.device("cpu"), lora_r=2,
                      lora_alpha=4).save_pretrained(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a copy cut short
    capsys.readouterr()
    monkeypatch.setattr(model, "load_base_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(SystemExit):
        cli.run(evaluation.main, ["--model", NO_MODEL, "--adapter", str(tmp_path / "adapter"),
                                  "--output_dir", str(tmp_path / "e")])
    assert "adapter_model.safetensors is truncated" in one_error_line(capsys.readouterr().err)


def test_importing_the_trainer_prints_nothing():
    """bitsandbytes logs at import on CPUs with AVX512-BF16 (r1v/__init__.py): not our lines."""
    done = subprocess.run([sys.executable, "-c", "import train, eval, report"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stderr == "" and done.stdout == ""


def test_dataset_sizes_and_resume_are_checked_before_the_model(tmp_path, capsys, monkeypatch):
    (tmp_path / "empty.jsonl").write_text("\n")
    status, err = run_train(
        capsys, monkeypatch, "--model", NO_MODEL, "--dataset", str(tmp_path / "empty.jsonl"),
        "--output_dir", str(tmp_path / "o"),
    )
    assert status == 2 and "empty.jsonl: no rows" in one_error_line(err)
    task = write_task(tmp_path / "task", rows=3)
    status, err = run_train(
        capsys, monkeypatch, "--model", NO_MODEL, "--dataset", task,
        "--output_dir", str(tmp_path / "o"),
    )
    assert "3 rows, fewer than one batch of 8" in one_error_line(err)
    status, err = run_train(
        capsys, monkeypatch, "--model", NO_MODEL, "--dataset", task, "--prompts_per_step", "2",
        "--resume", "--output_dir", str(tmp_path / "o"),
    )
    assert "--resume: no complete checkpoint" in one_error_line(err)


def test_a_reward_file_that_does_not_compile_is_named(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "mine.py"
    bad.write_text("def f(completion, example):\n    return 1 +\n")
    status, err = run_train(
        capsys, monkeypatch, "--model", NO_MODEL, "--reward_funcs", f"{bad}:f",
        "--output_dir", str(tmp_path / "o"),
    )
    assert f"{bad}:2: SyntaxError" in one_error_line(err)
    good = tmp_path / "other.py"
    good.write_text("def format(completion, example):\n    return 1.0\n")
    status, err = run_train(
        capsys, monkeypatch, "--model", NO_MODEL, "--reward_funcs", "format", f"{good}:format",
        "--output_dir", str(tmp_path / "o"),
    )
    assert "two rewards are named 'format'" in one_error_line(err)


def test_an_output_dir_that_is_a_file_or_holds_a_run(tmp_path, capsys, monkeypatch):
    from test_safety import checksums  # every file's hash

    (tmp_path / "file").write_text("mine")
    before = checksums(tmp_path)
    status, err = run_train(
        capsys, monkeypatch, "--model", NO_MODEL, "--output_dir", str(tmp_path / "file")
    )
    assert "--output_dir" in one_error_line(err) and "is a file" in err
    assert checksums(tmp_path) == before  # the file byte for byte, nothing beside it
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n' * 40)
    (run / "checkpoint-40").mkdir()
    (run / "checkpoint-40" / "trainer_state.pt").write_bytes(b"the user's state")
    (run / "config.json").write_text('{"objective": "grpo", "seed": 7}')
    before = checksums(run)
    status, err = run_train(
        capsys, monkeypatch, "--model", NO_MODEL, "--dataset", "synthetic", "--output_dir", str(run)
    )
    assert "already holds a run" in one_error_line(err) and "--resume" in err
    assert checksums(run) == before  # untouched, byte for byte


def test_a_prompt_over_max_prompt_length_is_named_before_the_model(
    tmp_path, capsys, monkeypatch, tiny_model_dir
):
    task = write_task(tmp_path / "task")
    status, err = run_train(
        capsys, monkeypatch, "--model", tiny_model_dir, "--dataset", task,
        "--prompts_per_step", "2", "--max_prompt_length", "20", "--output_dir", str(tmp_path / "o"),
    )
    assert "row 1's prompt is" in one_error_line(err) and "--max_prompt_length 20" in err


def test_the_real_command_lines_print_one_line(tmp_path):
    """The whole path, as a user types it: flags, data, eval's adapter."""
    task = write_task(tmp_path / "task", changes={3: {"answer": "green"}})
    commands = [
        (["train.py", "--lr_scheduler", "cosine"], "--lr_scheduler"),
        (["train.py", "--model", NO_MODEL, "--dataset", task], "task.jsonl:3: the answer"),
        (["eval.py", "--model", NO_MODEL, "--adapter", str(tmp_path / "none")], "--adapter"),
        (["eval.py", "--model", NO_MODEL, "--dataset", str(tmp_path / "no.jsonl")], "no.jsonl"),
    ]
    procs = [
        subprocess.Popen(
            [
                sys.executable, str(ROOT / cmd[0]), *cmd[1:],
                "--output_dir", str(tmp_path / f"out{i}"),
            ],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        )
        for i, (cmd, _) in enumerate(commands)
    ]
    for proc, (cmd, message) in zip(procs, commands):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2 and message in one_error_line(err), (cmd, err)


def test_eval_names_its_default_folder_by_model_adapter_and_benchmark():
    cfg = flags.EvalConfig(model="Qwen/Qwen2-VL-2B", adapter="runs/sat/checkpoint-30")
    assert cfg.output_dir == str(Path("runs/eval/Qwen2-VL-2B-sat-checkpoint-30/cvbench"))
    assert flags.EvalConfig(dataset="my_task.jsonl").output_dir.endswith("my_task")
    assert flags.EvalConfig(benchmark="sat", split="test").output_dir.endswith("sat-test")


@pytest.mark.parametrize("entry", ["train", "eval", "report"])
def test_a_flag_is_never_taken_for_a_longer_one(entry, capsys):
    """`--max_step 5` is not `--max_steps 5` (argparse's abbreviations are off)."""
    import report

    main = {"train": train.main, "eval": evaluation.main, "report": report.main}[entry]
    short = {"train": "--max_step", "eval": "--max_new_token", "report": "--smoot"}[entry]
    with pytest.raises(SystemExit) as exit_info:
        cli.run(main, ["runs/none", short, "5"] if entry == "report" else [short, "5"])
    assert exit_info.value.code == 2
    assert f"unrecognized arguments: {short} 5" in one_error_line(capsys.readouterr().err)


def test_an_offline_error_does_not_ask_for_what_is_set(monkeypatch):
    from huggingface_hub import constants

    from r1v import hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(cli.UserError) as error:
        model.load_config("nobody-here/no-such-model")
    assert "HF_HUB_OFFLINE=1" not in str(error.value) and "HF_HUB_OFFLINE is set" in str(
        error.value)
    with pytest.raises(cli.UserError) as error:
        hub.load_hub_dataset("nobody-here/no-such-data", "--dataset", split="train")
    assert "HF_HUB_OFFLINE=1" not in str(error.value) and "HF_HUB_OFFLINE is set" in str(
        error.value)


def test_demo_py_says_how_to_run_the_demo():
    done = subprocess.run([sys.executable, "demo.py"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert "python train.py --demo --output_dir runs/demo" in done.stdout + done.stderr
    assert done.returncode == 2 and "Traceback" not in done.stderr


def test_lengths_past_the_models_positions_are_refused_before_it_loads(
    tmp_path, capsys, monkeypatch, tiny_model_dir
):
    """The tiny model has 32768 positions, as Qwen2-VL-2B: a run or an evaluation that would
    go past them is one line, not hours of steps."""
    task = write_task(tmp_path / "task")
    status, err = run_train(
        capsys, monkeypatch, "--model", tiny_model_dir, "--dataset", task,
        "--prompts_per_step", "2", "--max_completion_length", "40000",
        "--output_dir", str(tmp_path / "o"),
    )
    assert status == 2 and "= 41024 tokens, past the model's 32768 positions" in one_error_line(
        err)
    monkeypatch.setattr(model, "load_base_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(SystemExit):
        cli.run(evaluation.main, ["--model", tiny_model_dir, "--dataset", task,
                                  "--max_new_tokens", "40000", "--output_dir", str(tmp_path / "e")])
    error = one_error_line(capsys.readouterr().err)
    assert "--max_new_tokens = 40000 tokens, past the model's 32768 positions" in error
    assert not (tmp_path / "o").exists() and not (tmp_path / "e").exists()


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter")
    model.load_policy(tiny_model_dir, torch.device("cpu"), lora_r=2,
                      lora_alpha=4).save_pretrained(folder)
    return folder


def foreign_adapter(tiny_adapter, folder, config_changes=None, tensor_changes=None):
    """A copy of the tiny model's adapter with its config's keys changed, and its tensors (by
    the end of their names) replaced by {name end: shape}."""
    from safetensors.torch import load_file, save_file

    folder.mkdir()
    config = json.loads((tiny_adapter / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **(config_changes or {})}))
    tensors = load_file(tiny_adapter / "adapter_model.safetensors")
    for end, shape in (tensor_changes or {}).items():
        for name in [n for n in tensors if n.endswith(end)]:
            tensors[name] = torch.zeros(shape)
    save_file(tensors, folder / "adapter_model.safetensors")
    return folder


@pytest.mark.parametrize("case", ["other base", "other layers", "target list", "target regex",
                                  "rank"])
def test_an_adapter_that_does_not_fit_the_model_is_named_before_it_loads(
    case, tmp_path, capsys, monkeypatch, tiny_model_dir, tiny_adapter
):
    """Another base's adapter (other sizes, more layers), a target module the model lacks, an
    r its weights do not have: one line from the safetensors header, no model loaded."""
    lm = "language_model.layers"
    config_changes, tensor_changes, expected = {
        "other base": ({}, {"layers.0.self_attn.q_proj.lora_A.weight": (2, 96)},
                       f"model.{lm}.0.self_attn.q_proj takes 96 inputs here, 64 in --model"),
        "other layers": ({}, {}, None),
        "target list": ({"target_modules": ["q_proj", "qkv_proj"]}, {},
                        "target module 'qkv_proj' is no module of --model"),
        "target regex": ({"target_modules": r".*\.self_attn\.qkv_proj"}, {},
                         "target modules '.*\\\\.self_attn\\\\.qkv_proj' match no linear layer"),
        "rank": ({"r": 4}, {}, "r 4, but its weights have rank 2"),
    }[case]
    adapter = foreign_adapter(tiny_adapter, tmp_path / "adapter", config_changes, tensor_changes)
    if case == "other layers":  # an adapter of a deeper model: a layer this one lacks
        from safetensors.torch import load_file, save_file

        tensors = load_file(adapter / "adapter_model.safetensors")
        tensors.update({k.replace("layers.1.", "layers.7."): v.clone()
                        for k, v in tensors.items() if "layers.1." in k})
        save_file(tensors, adapter / "adapter_model.safetensors")
        expected = f"model.{lm}.7.mlp.down_proj, which --model {tiny_model_dir} does not have"
    before = {p: p.read_bytes() for p in adapter.iterdir()}
    task = write_task(tmp_path / "task")
    monkeypatch.setattr(model, "load_base_model", lambda *a, **k: pytest.fail("model loaded"))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.run(evaluation.main, ["--model", tiny_model_dir, "--adapter", str(adapter),
                                  "--dataset", task, "--output_dir", str(tmp_path / "e")])
    error = one_error_line(capsys.readouterr().err)
    assert error.startswith(f"error: --adapter {adapter}: ") and expected in error, error
    assert {p: p.read_bytes() for p in adapter.iterdir()} == before
    assert not (tmp_path / "e").exists()
