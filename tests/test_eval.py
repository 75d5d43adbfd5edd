"""eval.py: CV-Bench scoring, the parsers, both hub layouts end to end, resuming."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import data
import eval as evaluation
from r1v import answers, hub, metrics

ROOT = Path(__file__).resolve().parents[1]


def test_score_cvbench_by_hand():
    rows = (
        [
            {"source": "ADE20K", "task": "Count", "correct": c} for c in (True, True, False, False)
        ]  # 50%
        + [{"source": "COCO", "task": "Relation", "correct": c} for c in (True, False)]
        + [
            {"source": "COCO", "task": "Count", "correct": True},
            {"source": "COCO", "task": "Count", "correct": True},
        ]
        + [
            {"source": "Omni3D", "task": "Depth", "correct": c} for c in (True, False, False, False)
        ]  # 25%
        + [{"source": "Omni3D", "task": "Distance", "correct": c} for c in (True, True)]
    )
    s = metrics.score_cvbench(rows)
    assert s["micro"] == pytest.approx(100 * 8 / 14)  # 14 items, 8 right
    # ADE20K 2/4 = 50, COCO 3/4 = 75 -> 2D 62.5; Omni3D 3/6 = 50 -> 3D 50; official (62.5 + 50) / 2
    assert s["2D"] == pytest.approx(62.5) and s["3D"] == pytest.approx(50.0)
    assert s["official"] == pytest.approx(56.25)
    assert s["Count"] == pytest.approx(100 * 4 / 6) and s["Relation"] == pytest.approx(50.0)
    assert s["Depth"] == pytest.approx(25.0) and s["Distance"] == pytest.approx(100.0)
    assert set(s) == {"micro", "official", "2D", "3D", "Count", "Relation", "Depth", "Distance"}


def test_a_category_without_items_scores_null_not_nan(tmp_path):
    """--limit 2 of CV-Bench holds no 3D item: 3D, official, Depth and Distance have no score,
    null in summary.json (NaN is no JSON: jq and JavaScript refuse the file) and "-" in the
    table; the 2D scores stay."""
    rows = [{"source": "ADE20K", "task": "Count", "task_type": "choice", "response": "r",
             "choice": 0, "correct": True, "choice_lenient": 1, "correct_lenient": False},
            {"source": "COCO", "task": "Relation", "task_type": "choice", "response": "r",
             "choice": None, "correct": False, "choice_lenient": 0, "correct_lenient": True}]
    summary = metrics.summarize(rows, "cvbench")
    strict = json.loads(json.dumps(summary), parse_constant=pytest.fail)["strict"]
    assert strict == {"micro": 50.0, "official": None, "2D": 50.0, "3D": None, "Count": 100.0,
                      "Relation": 0.0, "Depth": None, "Distance": None}
    assert summary["lenient"]["Relation"] == 100.0 and summary["lenient"]["2D"] == 50.0
    table = metrics.format_table(summary).splitlines()
    assert table[1].split() == ["strict", "50.00", "-", "50.00", "-", "100.00", "0.00", "-", "-"]


CHOICES = ["3", "2", "1", "0"]


@pytest.mark.parametrize(
    "response,strict,lenient",
    [
        ("</think><answer>(B)</answer>", 1, 1),
        ("reasoning</think>\n<answer> b </answer>", 1, 1),  # case and spaces
        ("</think><answer>B.</answer>", 1, 1),
        ("</think><answer>2</answer>", 1, 1),  # the option text
        ("</think><answer>(B) 2</answer>", 1, 1),  # both
        ("</think><answer>E</answer>", None, None),  # no such option
        ("The answer is (C).", None, 2),  # untagged: only the lenient parser reads it
        ("I count 3 things", None, 0),  # untagged option text
        ("</think><answer>(A) or (B)</answer>", None, 0),  # several answers: strict refuses
        ("</think><answer>A</answer><answer>B</answer>", 0, 0),  # the first tag counts
        ("", None, None),
    ],
)
def test_parsers(response, strict, lenient):
    assert answers.parse_choice(response, CHOICES) == strict
    assert answers.parse_choice(response, CHOICES, lenient=True) == lenient


def test_text_options_without_letters():
    assert answers.parse_choice("<answer>Left</answer>", ["left", "right"], lettered=False) == 0
    assert answers.parse_choice("<answer>A</answer>", ["left", "right"], lettered=False) is None


def test_options_that_differ_in_case_or_spacing_are_told_apart_as_written():
    """The training's accuracy reward compares the answer as written: so does eval, before it
    reads any case and spacing (it took `left` for the option `Left` when that came first)."""
    assert answers.parse_choice("<answer> left </answer>", ["Left", "left"], lettered=False) == 1
    assert answers.parse_choice("<answer>LEFT</answer>", ["Left", "left"], lettered=False) == 0
    assert answers.parse_choice("<answer>yes</answer>", ["yes.", "yes"], lettered=False) == 1
    assert answers.parse_choice("<answer>B</answer>", ["A", "B"]) == 1  # a letter still first


def cvbench_rows(n=6):
    tasks = [
        ("2D", "Count", "ADE20K"), ("2D", "Relation", "COCO"), ("3D", "Depth", "Omni3D"),
        ("3D", "Distance", "Omni3D"),
    ]
    rows = []
    for i in range(n):
        kind, task, source = tasks[i % 4]
        choices = ["3", "2", "1", "0"] if task == "Count" else ["left", "right"]
        prompt = (
            "How many organs are in the image? Select from the following choices.\n"
            + "\n".join(f"({l}) {c}" for l, c in zip("ABCD", choices))
        )
        rows.append(
            dict(
                idx=i, type=kind, task=task, image={"bytes": _png()}, question="q", choices=choices,
                answer="(A)", prompt=prompt, filename=f"img/{i}.png", source=source,
                source_dataset=source, source_filename=f"{i}.png", target_class=None,
                target_size=None, bbox=None,
            )
        )
    return rows


def _png():
    import io

    buf = io.BytesIO()
    Image.new("RGB", (60, 40), "gray").save(buf, format="PNG")
    return buf.getvalue()


def write_cvbench(root, layout):
    import datasets

    features = datasets.Features(
        {
            "idx": datasets.Value("int32"), "type": datasets.Value("string"),
            "task": datasets.Value("string"), "image": datasets.Image(),
            "question": datasets.Value("string"),
            "choices": datasets.List(datasets.Value("string")), "answer": datasets.Value("string"),
            "prompt": datasets.Value("string"), "filename": datasets.Value("string"),
            "source": datasets.Value("string"), "source_dataset": datasets.Value("string"),
            "source_filename": datasets.Value("string"), "target_class": datasets.Value("string"),
            "target_size": datasets.Value("int64"),
            "bbox": datasets.List(datasets.Value("float32")),
        }
    )
    rows = cvbench_rows()
    root.mkdir(parents=True)
    if layout == "single":  # before 2025-04-01
        parts = {"test.parquet": rows}
    else:
        parts = {
            "test_2d.parquet": [r for r in rows if r["type"] == "2D"],
            "test_3d.parquet": [r for r in rows if r["type"] == "3D"],
        }
    for name, part in parts.items():
        datasets.Dataset.from_dict(
            {k: [r[k] for r in part] for k in features}, features=features
        ).to_parquet(str(root / name))
    return str(root)


@pytest.mark.parametrize("layout", ["single", "split"])
def test_both_hub_layouts_load(tmp_path, layout):
    source = write_cvbench(tmp_path / layout, layout)
    items = hub.cvbench_items(hub.read_cvbench(source), source, data.View())
    assert len(items) == 6
    ex = items[0]
    assert ex["gold"] == 0 and ex["lettered"] and ex["prompt"].endswith("<think>")
    assert "Select from the following choices.\n(A) 3" in ex["prompt"]
    assert len({items[i]["id"] for i in range(6)}) == 6


def run_eval(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "eval.py"), *args], capture_output=True, text=True, cwd=ROOT,
        timeout=600,
    )


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["single", "split"])
def test_the_command_on_the_tiny_model_and_resume(tmp_path, tiny_model_dir, layout):
    source = write_cvbench(tmp_path / "cvbench", layout)
    out = tmp_path / "eval"
    args = [
        "--model", tiny_model_dir, "--dataset", source, "--output_dir", str(out),
        "--max_new_tokens", "5", "--batch_size", "4",
    ]
    result = run_eval(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {"id", "task", "source", "response", "choice", "correct"} <= set(
        rows[0]
    )
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["strict"]) == {
        "micro", "official", "2D", "3D", "Count", "Relation", "Depth", "Distance",
    }
    assert summary["n"] == 6 and "lenient" in summary and "official" in result.stdout

    # a killed evaluation: keep 3 finished items and a torn line, and resume
    lines = (out / "predictions.jsonl").read_text().splitlines()
    marked = [json.dumps({**json.loads(l), "response": "KEPT"}) for l in lines[:3]]
    (out / "predictions.jsonl").write_text("\n".join(marked) + "\n" + lines[3][:20])
    result = run_eval(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and sum(r["response"] == "KEPT" for r in rows) == 3
    assert len({r["id"] for r in rows}) == 6


def a_moved_adapter(model_dir, folder):
    """A LoRA adapter that changes the model's answers: peft starts lora_B at 0 (the base
    model exactly), so it is set to random values, as training would move it."""
    import torch

    import train

    cfg = train.parse_config(["--model", model_dir, "--output_dir", str(folder / "unused"),
                              "--lora_r", "2", "--lora_alpha", "4"])
    model = train.load_model(cfg, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    model.save_pretrained(folder)
    return str(folder)


def responses(folder):
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    return {r["id"]: r["response"] for r in rows}


@pytest.mark.slow
def test_sat_benchmark_and_an_adapter(tmp_path, tiny_model_dir):
    from test_data import make_sat_folder, sat_rows

    source = make_sat_folder(tmp_path / "sat", sat_rows())
    adapter = a_moved_adapter(tiny_model_dir, tmp_path / "adapter")
    args = ["--model", tiny_model_dir, "--benchmark", "sat", "--dataset", source, "--split",
            "train", "--max_new_tokens", "4"]
    result = run_eval(*args, "--adapter", adapter, "--output_dir", str(tmp_path / "e"))
    assert result.returncode == 0, result.stderr[-3000:]
    evaluation.main([*args, "--output_dir", str(tmp_path / "base")])  # the base alone
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["n"] == 2 and "micro" in summary["strict"]
    tuned, base = responses(tmp_path / "e"), responses(tmp_path / "base")
    assert tuned.keys() == base.keys() and tuned != base  # the adapter's answers, not the base's


def test_an_adapter_is_scored_as_trained_unless_merging_is_asked_for(tmp_path, tiny_model_dir):
    """Merged into bf16 weights (on a GPU) a small LoRA update rounds away: by default the
    adapter stays unmerged, exactly the model trained; --merge_adapter merges, for speed."""
    from peft import PeftModel

    import train
    from r1v import flags

    cfg = train.parse_config(["--model", tiny_model_dir, "--output_dir", str(tmp_path / "a"),
                              "--lora_r", "2", "--lora_alpha", "4"])
    train.load_model(cfg, train.torch.device("cpu")).save_pretrained(tmp_path / "adapter")
    cpu = train.torch.device("cpu")
    args = dict(model=tiny_model_dir, adapter=str(tmp_path / "adapter"))
    assert isinstance(evaluation.load_for_eval(flags.EvalConfig(**args), cpu), PeftModel)
    merged = evaluation.load_for_eval(flags.EvalConfig(**args, merge_adapter=True), cpu)
    assert not isinstance(merged, PeftModel)
    assert "merge_adapter" in evaluation.PROVENANCE  # predictions of one never resume the other


def test_merge_adapter_without_an_adapter_is_refused():
    """Nothing to merge: the flag was ignored, yet a base model's predictions made with it and
    without it refused each other's resume (merge_adapter differ)."""
    from r1v import flags
    from r1v.cli import UserError

    with pytest.raises(UserError, match="--merge_adapter merges an --adapter"):
        flags.EvalConfig(model="m", merge_adapter=True)
    assert flags.EvalConfig(model="m", adapter="a", merge_adapter=True).merge_adapter


def test_the_demos_own_rows_evaluate_an_adapter(tmp_path, tiny_model_dir):
    """How the README evaluates the demo's adapter: its synthetic rows, another seed's."""
    import demo
    import train

    adapter = a_moved_adapter(tiny_model_dir, tmp_path / "adapter")
    args = ["--model", tiny_model_dir, "--dataset", "synthetic", "--synthetic_tasks",
            "background", "--synthetic_image_size", "56", "--limit", "4", "--max_new_tokens", "3"]
    evaluation.main([*args, "--output_dir", str(tmp_path / "base")])  # the base alone
    out = tmp_path / "e"
    summary = evaluation.main([*args, "--adapter", adapter, "--output_dir", str(out)])
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert summary["n"] == 4 and {r["task"] for r in rows} == {"background"}
    assert responses(out) != responses(tmp_path / "base")  # the adapter's answers

    def golds(seed):  # the gold option of each of the first 4 rows that seed draws
        ds = demo.synthetic_dataset(4, seed, ("background",), 56)
        return [ds[i]["choices"].index(ds[i]["answer"]) for i in range(4)]
    training = train.parse_config([]).seed
    assert golds(0) != golds(training)  # these rows tell the seeds apart
    assert [r["gold"] for r in sorted(rows, key=lambda r: int(r["id"]))] == golds(0)
    assert Path(json.loads((out / "eval_config.json").read_text())["adapter"]) == \
        Path(adapter).resolve()
    assert json.loads((out / "eval_config.json").read_text())["synthetic_tasks"] == ["background"]


def test_a_second_evaluation_says_how_many_predictions_it_reuses(tmp_path, tiny_model_dir,
                                                                  capsys):
    out = tmp_path / "e"
    argv = ["--model", tiny_model_dir, "--dataset", "synthetic", "--synthetic_tasks",
            "background", "--synthetic_image_size", "56", "--limit", "4", "--max_new_tokens", "2",
            "--output_dir", str(out)]
    first = evaluation.main(argv)
    assert "reusing" not in capsys.readouterr().out
    assert evaluation.main(argv) == first
    assert f"reusing 4 predictions from {out / 'predictions.jsonl'}" in capsys.readouterr().out
    lines = (out / "predictions.jsonl").read_text().splitlines(keepends=True)
    (out / "predictions.jsonl").write_text("".join(lines[:3]))  # killed after 3
    evaluation.main(argv)
    assert f"reusing 3 predictions from {out / 'predictions.jsonl'}" in capsys.readouterr().out


def test_edited_predictions_are_refused_not_scored_or_a_traceback(tmp_path, tiny_model_dir):
    """A line of predictions.jsonl that is no judged row of this data's items (not an object,
    no id, an id of no item, a key the summary reads removed, bytes not UTF-8), or an
    eval_config.json not an object: one line naming the file, nothing scored."""
    import shutil

    from r1v.cli import UserError

    out = tmp_path / "e"
    argv = ["--model", tiny_model_dir, "--dataset", "synthetic", "--synthetic_tasks",
            "background", "--synthetic_image_size", "56", "--limit", "2", "--max_new_tokens", "2"]
    evaluation.main([*argv, "--output_dir", str(out)])
    good = (out / "predictions.jsonl").read_text().splitlines(keepends=True)
    row = json.loads(good[1])
    edits = {"[1, 2]\n": ":2:", json.dumps({k: v for k, v in row.items() if k != "id"}): ":2:",
             json.dumps({**row, "id": "7"}): ":2:", json.dumps({**row, "id": ["1"]}): ":2:",
             json.dumps({k: v for k, v in row.items() if k != "correct"}): ":2:",
             b"\xff\xfe\n": " cannot be read"}
    for i, (line, message) in enumerate(edits.items()):
        edited = tmp_path / f"edited{i}"
        shutil.copytree(out, edited)
        text = good[0].encode() + (line if isinstance(line, bytes) else line.encode() + b"\n")
        (edited / "predictions.jsonl").write_bytes(text)
        with pytest.raises(UserError, match=f"predictions.jsonl{message}.*--overwrite"):
            evaluation.main([*argv, "--output_dir", str(edited)])
        assert (edited / "predictions.jsonl").read_bytes() == text  # kept as it was
    (out / "eval_config.json").write_text("[]")
    with pytest.raises(UserError, match="eval_config.json cannot be read.*not a JSON object"):
        evaluation.main([*argv, "--output_dir", str(out)])


@pytest.mark.parametrize("given,message", [
    ("run", "a run's folder: give one of its checkpoints, as .*checkpoint-10$"),
    ("run/checkpoint-10/adapter_config.json", "a file, not an adapter's folder"),
    ("nowhere", "no such folder")])
def test_an_adapter_that_is_no_adapter_folder_says_what_it_is(tmp_path, given, message):
    """--adapter a run's folder (as train.py's --output_dir is named), a file of a checkpoint,
    a typo: said as such, not as a missing adapter_config.json, before any model is read."""
    from r1v.cli import UserError

    for step in (2, 10):  # the latest by number, not by name (checkpoint-2 sorts after -10)
        (tmp_path / "run" / f"checkpoint-{step}").mkdir(parents=True)
        (tmp_path / "run" / f"checkpoint-{step}" / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match=f"^--adapter {tmp_path / given}: {message}"):
        evaluation.main(["--model", str(tmp_path / "no-model"), "--adapter",
                         str(tmp_path / given), "--output_dir", str(tmp_path / "e")])
    assert not (tmp_path / "e").exists()


def test_another_familys_adapter_of_the_same_shapes_is_refused(tmp_path, tiny_model_dir,
                                                                tiny_qwen3_dir):
    """A Qwen2-VL adapter on a Qwen3-VL base whose language model has the same names and sizes
    (as Qwen2-VL-7B's and Qwen2.5-VL-7B's have): one line naming both classes, before any model
    loads; not answers of the wrong model scored as the adapter's."""
    from r1v.cli import UserError

    adapter = a_moved_adapter(tiny_model_dir, tmp_path / "adapter")
    with pytest.raises(UserError, match=r"--adapter .*: it was trained on a "
                                        r"Qwen2VLForConditionalGeneration, but --model .* is a "
                                        r"Qwen3VLForConditionalGeneration"):
        evaluation.main(["--model", tiny_qwen3_dir, "--adapter", adapter, "--dataset",
                         "synthetic", "--limit", "2", "--max_new_tokens", "2", "--output_dir",
                         str(tmp_path / "e")])
    assert not (tmp_path / "e" / "predictions.jsonl").exists()


def test_an_adapter_is_prompted_as_its_run_was_trained(tmp_path, tiny_qwen3_dir, capsys):
    """A Qwen3-VL run trained with --prompt_format r1 (not its family's chat default): eval.py's
    auto prompts its adapter with r1, as it learned to answer, and says so; a format given
    explicitly is used as asked, with a note."""
    import data
    from r1v import model as models

    adapter = a_moved_adapter(tiny_qwen3_dir, tmp_path / "checkpoint-2")
    (tmp_path / "checkpoint-2" / "config.json").write_text(json.dumps(
        {"objective": "grpo", "prompt_format": "r1"}))
    argv = ["--model", tiny_qwen3_dir, "--adapter", adapter, "--dataset", "synthetic",
            "--limit", "2", "--max_new_tokens", "2"]
    views = {f: data.model_view(models.load_config(tiny_qwen3_dir),
                                models.load_processor(tiny_qwen3_dir), f, 3136, 401408).template
             for f in ("r1", "chat")}
    assert views["r1"] != views["chat"]
    for given, used, said in (([], "r1", "note: prompting as the adapter was trained: "
                                         "--prompt_format r1"),
                              (["--prompt_format", "chat"], "chat",
                               "note: the adapter was trained with --prompt_format r1; "
                               "evaluating with --prompt_format chat, as asked")):
        out = tmp_path / f"e-{used}"
        evaluation.main([*argv, *given, "--output_dir", str(out)])
        assert said in capsys.readouterr().out
        assert json.loads((out / "eval_config.json").read_text())["prompt"] == views[used]
