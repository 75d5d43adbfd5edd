"""r1v/synthetic.py and demo.py: the synthetic set, and the offline demo run exactly as a new user
runs it: `python train.py --demo --output_dir DIR`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import data
import demo
from r1v import grounding, model, synthetic

ROOT = Path(__file__).resolve().parents[1]


def test_synthetic_is_deterministic_and_valid_for_every_task():
    a = demo.synthetic_dataset(40, seed=3)
    b = demo.synthetic_dataset(40, seed=3)
    c = demo.synthetic_dataset(40, seed=4)
    for i in range(40):
        x, y = a[i], b[i]
        assert (x["question"], x["answer"], x["choices"]) == (
            y["question"], y["answer"], y["choices"],
        )
        assert x["image"].tobytes() == y["image"].tobytes()
        assert x["answer"] in x["choices"] and 2 <= len(x["choices"]) <= 4
        assert x["prompt"].startswith(data.VISION_TOKENS) and x["prompt"].endswith("<think>")
    assert any(a[i]["image"].tobytes() != c[i]["image"].tobytes() for i in range(40))
    tasks = [synthetic.SYNTHETIC_QUESTIONS[t].split()[0] for t in synthetic.CHOICE_TASKS]
    assert {a[i]["question"].split(". ")[1].split()[0] for i in range(40)} == set(tasks)


@pytest.mark.parametrize("task", synthetic.CHOICE_TASKS)
def test_synthetic_answers_depend_on_the_image(task):
    """The same question text must have different answers on different images."""
    ds = demo.synthetic_dataset(400, seed=0, tasks=(task,), image_size=112)
    answers_by_question = {}
    for i in range(len(ds)):
        ex = ds[i]
        answers_by_question.setdefault((ex["question"], tuple(sorted(ex["choices"]))), set()).add(
            ex["answer"]
        )
    assert any(len(answers) > 1 for answers in answers_by_question.values())


@pytest.mark.parametrize("frame", sorted(model.BOX_FRAMES.values()))
def test_synthetic_boxes_are_where_the_shapes_are(frame):
    """locate: the named shape's colour at its box centre; detect: every drawn shape of an asked
    kind has its box, in the model's frame, and maps back to the pixels it was drawn at."""
    view = data.View(frame=frame)
    rec = demo.synthetic_dataset(40, seed=0, tasks=("locate",), image_size=112, view=view)
    ovd = demo.synthetic_dataset(40, seed=0, tasks=("detect",), image_size=112, view=view)
    assert rec.task_type == "rec" and ovd.task_type == "ovd"
    for i in range(40):
        ex = rec[i]
        color = synthetic.COLORS[ex["phrase"].split()[1]]
        assert ex["prompt"].endswith("<think>") and ex["phrase"] in ex["question"]
        back = grounding.scale_box(ex["box"], ex["frame_size"], ex["original_size"])
        assert back == pytest.approx(ex["gold_box"])
        x1, y1, x2, y2 = ex["gold_box"]
        assert ex["image"].getpixel(((x1 + x2) // 2, (y1 + y2) // 2)) == color
        ex = ovd[i]
        assert all(b["label"] in ex["labels"] for b in ex["boxes"])
        for box, gold in zip(ex["boxes"], ex["gold_boxes"]):
            back = grounding.scale_box(box["bbox_2d"], ex["frame_size"], ex["original_size"])
            assert back == pytest.approx(gold["bbox_2d"])
            x1, y1, x2, y2 = gold["bbox_2d"]
            assert ex["image"].getpixel(((x1 + x2) // 2, (y1 + y2) // 2)) != (255, 255, 255)
    assert any(not ovd[i]["boxes"] for i in range(40)) and any(ovd[i]["boxes"] for i in range(40))


def test_synthetic_tasks_of_two_types_do_not_mix():
    with pytest.raises(ValueError, match="mixes task types"):
        demo.synthetic_dataset(4, tasks=("color", "locate"))


def test_synthetic_rejects_unknown_tasks():
    with pytest.raises(ValueError, match="--synthetic_tasks"):
        demo.synthetic_dataset(4, tasks=("colour_of_sky",))


def test_the_warm_up_answers_any_option_as_the_text_says():
    """Never the gold, the warm-up taught the model to avoid the right colour: its greedy
    accuracy started at 0.02, not chance (0.25). The gold is drawn as often as any option."""
    import random

    rng, example = random.Random(0), {"task_type": "choice", "choices": list("abcd"),
                                      "answer": "c"}
    drawn = [demo.random_answer(rng, example, []) for _ in range(4000)]
    assert all(900 < drawn.count(c) < 1100 for c in "abcd")
    said = " ".join(((ROOT / "README.md").read_text() + demo.__doc__).split())
    assert "never the gold" not in said and "drawn without looking at the gold" in said


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--demo", "--output_dir", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=3600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, result, out


def accuracy(rows):
    return sum(r["rewards/accuracy/mean"] for r in rows) / len(rows)


@pytest.mark.slow
def test_demo_starts_at_chance_and_says_what_it_does(demo_run):
    """How long it takes is the machine's (README "The demo"); what it prints is the demo's."""
    rows, result, _ = demo_run
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    assert "demo: format warm-up" in result.stderr  # the warm-up's own bar, then GRPO's
    steps = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == 200 and max(map(len, steps)) < 160  # a short line a step
    assert "done: 200 steps in" in result.stdout
    # the warm-up answers with a uniformly random colour: chance is 0.25
    assert 0.15 <= accuracy(rows[:10]) <= 0.40
    assert sum(r["rewards/format/mean"] for r in rows[:10]) / 10 > 0.9


@pytest.mark.slow
def test_demo_accuracy_rises_from_chance_to_085(demo_run):
    rows, _, _ = demo_run
    assert accuracy(rows[-10:]) >= 0.85, f"last 10 steps: {accuracy(rows[-10:]):.3f}"


@pytest.mark.slow
def test_the_demos_adapter_evaluates_the_same_with_the_compiled_decode(demo_run, tmp_path):
    """eval.py on the trained adapter, its decode step compiled (torch's eager backend on CPU)
    or not: the same greedy predictions, a last batch filled up included."""
    import eval as evaluation

    _, _, out = demo_run
    common = ["--model", str(out / "demo-base"), "--adapter", str(out / "checkpoint-200"),
              "--dataset", "synthetic", "--synthetic_tasks", "background",
              "--synthetic_image_size", "56", "--limit", "21", "--batch_size", "8",
              "--max_new_tokens", "8"]
    summaries = [evaluation.main(common + ["--output_dir", str(tmp_path / name), *flags])
                 for name, flags in (("eager", []), ("compiled", ["--compile_decode",
                                                                   "--compile_backend", "eager"]))]
    assert summaries[0] == summaries[1] and summaries[0]["strict"]["micro"] > 50  # chance: 25

    def responses(name):
        return [json.loads(line)["response"]
                for line in (tmp_path / name / "predictions.jsonl").open()]
    assert responses("eager") == responses("compiled")
