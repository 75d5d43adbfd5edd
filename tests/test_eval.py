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
