"""Grounding (rec) and detection (ovd) rows: boxes in the model's frame and back, the JSONL and
RefCOCO schemas, their checks, and the command lines end to end on a tiny Qwen2.5-VL."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import data
import eval as evaluation
from r1v import grounding, metrics, model
from r1v import rows as stored

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("frame", sorted(model.BOX_FRAMES.values()))
def test_a_gold_box_goes_into_the_models_frame_and_back(frame):
    """640x480 is resized to fit 200,000 pixels: Qwen2.5-VL's frame is that resized image in
    pixels, Qwen2-VL's is 0-1000 of each side."""
    image, gold = Image.new("RGB", (640, 480)), [100.0, 50.0, 300.0, 250.0]
    view = data.View(3136, 200_000, frame=frame)
    ex = data.make_example(image, {"phrase": "the dog", "box": gold}, None, view)
    w, h = ex["image"].size
    assert (w, h) != (640, 480) and w % 28 == 0 and ex["original_size"] == (640, 480)
    expected = ([100 * w / 640, 50 * h / 480, 300 * w / 640, 250 * h / 480] if frame == "pixels"
                else [100 / 640 * 1000, 50 / 480 * 1000, 300 / 640 * 1000, 250 / 480 * 1000])
    assert ex["box"] == pytest.approx(expected) and ex["gold_box"] == gold
    back = grounding.scale_box(ex["box"], ex["frame_size"], ex["original_size"])
    assert back == pytest.approx(gold)
    boxes = [{"bbox_2d": gold, "label": "dog"}]
    ovd = data.make_example(image, {"labels": ["dog", "cat"], "boxes": boxes}, None, view)
    assert ovd["boxes"][0]["bbox_2d"] == pytest.approx(expected) and ovd["gold_boxes"] == boxes
    assert "dog, cat" in ovd["question"] and "the dog" in ex["question"]


def test_the_rec_prompt_is_vlm_r1s():
    ex = data.make_example(Image.new("RGB", (56, 56)), {"phrase": "the red circle", "box": [1, 2,
                           30, 40]}, None)
    assert ex["question"] == (
        "Please provide the bounding box coordinate of the region this sentence describes: the "
        "red circle. First output the thinking process in <think> </think> tags and then output "
        "the final answer in <answer> </answer> tags. Output the final answer in JSON format.")


def test_the_chat_template_wraps_the_question(tiny_qwen25_dir, tiny_model_dir):
    def view(folder, prompt_format):
        return data.model_view(model.load_config(folder), model.load_processor(folder),
                               prompt_format, 3136, 50176)
    chat = view(tiny_qwen25_dir, "auto")
    assert chat.frame == "pixels" and chat.template.startswith("<|im_start|>system")
    assert chat.template.endswith("{question}<|im_end|>\n<|im_start|>assistant\n")
    base = view(tiny_model_dir, "auto")
    assert base.frame == "norm1000" and base.template == data.PROMPT_TEMPLATE
    with pytest.raises(ValueError, match="no chat template"):
        view(tiny_model_dir, "chat")


def write_rows(folder, rows, size=(112, 84)):
    """A JSONL file of `rows`, each given an image (a white picture of `size`)."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, "white").save(folder / "a.png")
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps({"image": "a.png", **r}) + "\n" for r in rows))
    return str(path)


REC = {"phrase": "the red circle", "box": [10, 20, 50, 60]}
OVD = {"labels": ["circle", "square"], "boxes": [{"bbox_2d": [10, 20, 50, 60], "label": "circle"}]}


@pytest.mark.parametrize("row,task", [(REC, "rec"), (OVD, "ovd"),
                                      ({**OVD, "boxes": []}, "ovd")])
def test_jsonl_rows_of_each_task(tmp_path, row, task):
    ds = data.load_examples(write_rows(tmp_path, [row, row]))
    assert ds.task_type == task and len(stored.check_rows(ds)) == 2
    assert ds[1]["task_type"] == task


@pytest.mark.parametrize("row,message", [
    ({**REC, "box": [10, 20, 5, 6]}, "x1 < x2"),                       # [x, y, w, h] by mistake
    ({**REC, "box": [10, 20, 500, 60]}, "outside the 112x84 image"),
    ({**REC, "box": [1, 2, 3]}, "4 numbers"),
    ({**REC, "box": [True, 20, 50, 60]}, "4 numbers"),                # true is no coordinate
    ({**REC, "box": [10, 20, float("inf"), 60]}, "4 numbers"),       # JSON's Infinity
    ({"phrase": "the dog"}, "missing field(s) ['box']"),
    ({**OVD, "boxes": [{"bbox_2d": [1, 2, 3, 4], "label": "dog"}]}, "a label from"),
    ({**OVD, "labels": []}, "non-empty list"),
    ({"image_only": 1}, "none of the fields"),
])
def test_bad_grounding_rows_are_named_by_line(tmp_path, row, message):
    path = write_rows(tmp_path, [REC if "phrase" in row else OVD, row])
    with pytest.raises(ValueError, match=r"rows.jsonl:2: .*" + __import__("re").escape(message)):
        stored.check_rows(data.load_examples(path))


def test_a_coordinate_past_a_floats_range_is_no_number():
    """math.isfinite() raised OverflowError on it: a traceback, not the row's error."""
    with pytest.raises(ValueError, match="4 numbers"):
        grounding.check_box([1, 2, 10**400, 4], (100, 100))


def test_a_file_mixing_tasks_is_refused(tmp_path):
    with pytest.raises(ValueError, match="rows.jsonl:2: a ovd row in a file of rec rows"):
        stored.check_rows(data.load_examples(write_rows(tmp_path, [REC, OVD])))


def write_refcoco(root, split="val"):
    """A local folder in lmms-lab/RefCOCO's schema: one row per object, `answer` its referring
    expressions, `bbox` COCO [x, y, w, h] in original pixels."""
    import datasets

    images = [Image.new("RGB", (140, 112), c) for c in ("red", "blue", "green")]
    rows = {"question_id": ["1", "2", "3"], "image": images,
            "question": ["Please carefully observe the area circled in the image."] * 3,
            "answer": [["the red circle", "a red shape"], ["the blue square"],
                       ["the green one", "it", "that"]],
            "segmentation": [[0.0]] * 3, "bbox": [[10, 20, 30, 40], [0, 0, 56, 56],
                                                  [70, 28, 70, 84]],
            "iscrowd": [0, 0, 0], "file_name": ["a.jpg", "b.jpg", "c.jpg"]}
    features = datasets.Features({
        "question_id": datasets.Value("string"), "image": datasets.Image(),
        "question": datasets.Value("string"), "answer": datasets.List(datasets.Value("string")),
        "segmentation": datasets.List(datasets.Value("float32")),
        "bbox": datasets.List(datasets.Value("float32")), "iscrowd": datasets.Value("int8"),
        "file_name": datasets.Value("string")})
    (root / "data").mkdir(parents=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(
        str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return str(root)


def test_refcoco_rows_are_one_per_expression(tmp_path):
    ds = data.load_examples(write_refcoco(tmp_path / "refcoco"), "val", limit=0)
    assert ds.task_type == "rec" and len(ds) == 6 and len(stored.check_rows(ds)) == 6
    assert [ds[i]["phrase"] for i in (0, 1, 2)] == ["the red circle", "a red shape",
                                                  "the blue square"]
    assert ds[5]["gold_box"] == [70, 28, 140, 112]            # [x, y, w, h] -> corners
    assert len(data.load_examples(write_refcoco(tmp_path / "r2"), "val", limit=4)) == 4


def run(script, *args):
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=600,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.slow
def test_refcoco_evaluation_and_its_resume(tmp_path, tiny_qwen25_dir):
    out = tmp_path / "eval"
    args = ["--model", tiny_qwen25_dir, "--benchmark", "refcoco", "--split", "val",
            "--dataset", write_refcoco(tmp_path / "refcoco"), "--output_dir", str(out),
            "--max_new_tokens", "24", "--batch_size", "4"]
    result = run("eval.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {"box", "gold", "iou", "correct"} <= set(rows[0])
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["scores"]) == {"Acc@0.5", "mean_IoU"} and "Acc@0.5" in result.stdout
    assert summary["units"]["mean_IoU"].startswith("%")
    assert 0 <= summary["scores"]["mean_IoU"] <= 100
    # a killed evaluation: 2 finished items and a torn line; the rest is predicted again
    lines = (out / "predictions.jsonl").read_text().splitlines()
    kept = [json.dumps({**json.loads(l), "response": "KEPT"}) for l in lines[:2]]
    (out / "predictions.jsonl").write_text("\n".join(kept) + "\n" + lines[2][:15])
    result = run("eval.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and sum(r["response"] == "KEPT" for r in rows) == 2
    assert len({r["id"] for r in rows}) == 6


@pytest.mark.slow
@pytest.mark.parametrize("task", ["rec", "ovd"])
def test_the_training_command_on_the_tiny_qwen25(tmp_path, tiny_qwen25_dir, task):
    """REC and OVD JSONL rows, trained 2 steps (evaluated on held-out rows) and evaluated."""
    rows = ([{"phrase": f"the {c} circle", "box": [4 * i, 8, 40 + 4 * i, 60]}
             for i, c in enumerate(["red", "blue", "green", "yellow"])] if task == "rec" else
            [{"labels": ["circle", "square"],
              "boxes": [{"bbox_2d": [4 * i, 8, 40, 60], "label": "circle"}] * (i % 3)}
             for i in range(4)])
    path = write_rows(tmp_path / "rows", rows)
    out = tmp_path / "run"
    result = run("train.py", "--model", tiny_qwen25_dir, "--dataset", path, "--output_dir",
                 str(out), "--max_steps", "2", "--prompts_per_step", "2", "--num_generations",
                 "2", "--max_completion_length", "40", "--eval_steps", "2", "--eval_dataset",
                 path, "--eval_limit", "2", "--lora_r", "4", "--lora_alpha", "8")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    reward = "iou" if task == "rec" else "detection"
    assert len(metrics) == 2 and f"rewards/{reward}/mean" in metrics[0]
    assert "boxes/per_answer" in metrics[0]
    assert ("eval/accuracy" if task == "rec" else "eval/mAP") in metrics[1]
    # step 1's gold boxes a row: rec one; ovd those of the 2 rows drawn, which its 4 samples
    # (2 prompts x 2 completions) record
    samples = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    drawn = [s["answer"] for s in samples if s["step"] == 1]
    assert len(drawn) == 4
    gold = 1.0 if task == "rec" else sum(len(boxes) for boxes in drawn) / 4
    assert metrics[0]["boxes/gold"] == gold
    result = run("eval.py", "--model", tiny_qwen25_dir, "--adapter", str(out / "checkpoint-2"),
                 "--dataset", path, "--output_dir", str(tmp_path / "e"), "--max_new_tokens", "40")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert set(summary["scores"]) >= ({"Acc@0.5"} if task == "rec" else {"mAP"})


def test_ovd_evaluation_scores_the_dataset_with_pycocotools():
    gold = [{"bbox_2d": [0, 0, 10, 10], "label": "circle"}]
    rows = [evaluation.judge({"id": str(i), "task": "t", "source": "s", "task_type": "ovd",
                              "frame_size": (100, 100), "original_size": (100, 100),
                              "gold_boxes": gold}, text)
            for i, text in enumerate(['<answer>[{"bbox_2d": [0, 0, 10, 10], "label": "circle"}]'
                                      '</answer>', "<answer>nothing</answer>"])]
    assert rows[0]["detections"] == gold and rows[1]["detections"] is None
    summary = metrics.summarize(rows, "jsonl")
    # one image found exactly, one missed: recall 0.5 at precision 1 -> AP 51/101 (COCO's
    # 101 recall points, 0..0.5 inclusive read precision 1)
    assert summary["scores"]["mAP"] == pytest.approx(100 * 51 / 101, abs=1e-6)
    assert summary["unparsed"] == 1
