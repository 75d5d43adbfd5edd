"""Evaluate a base model or a LoRA/QLoRA adapter on CV-Bench, SAT, RefCOCO/+/g or your own JSONL
task, with the training prompt.

    python eval.py --model Qwen/Qwen2-VL-2B --adapter runs/sat/checkpoint-500 --benchmark cvbench
    python eval.py --model Qwen/Qwen2-VL-2B --benchmark cvbench --limit 200   # a quick look
    python eval.py --model Qwen/Qwen2-VL-2B --adapter runs/mine/checkpoint-100 --dataset my.jsonl
    python eval.py --model Qwen/Qwen2.5-VL-3B-Instruct --benchmark refcoco --split val

Greedy decoding, up to 1024 new tokens, batched with left padding. Writes OUTPUT_DIR/
predictions.jsonl (one line per item, appended as it goes: a killed run resumes where it stopped,
if the model, adapter, data and decoding are the same) and OUTPUT_DIR/summary.json, and prints
the table. Multiple choice: two parsers, strict (default; the `<answer>` content must name the
letter or the option text) and lenient (the paper's: free text without a tag may match too), both
reported. Grounding (rec): Acc@IoU>=0.5 and the mean IoU, the answer's box mapped back to
original-image pixels. Detection (ovd): COCO mAP@[.5:.95] over the whole dataset (pycocotools).
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import cli
import data
import policy
import rewards
from cli import UserError, flag

LETTERS = "ABCDEFGH"
BENCHMARKS = ("cvbench", "sat", *data.REFCOCO)
CVBENCH_TASKS = ("Count", "Relation", "Depth", "Distance")


# --- parsing ------------------------------------------------------------------------------------

def _norm(text):
    return re.sub(r"\s+", " ", text).strip().strip(".").strip().lower()


def _match(text, choices, lettered):
    """Index of the option `text` names exactly: a letter `A`, `(A)`, `A.` (lettered options
    only) or the option text."""
    text = _norm(text)
    letter = re.fullmatch(r"\(?([a-h])\)?[.:]?", text)
    if lettered and letter and LETTERS.lower().index(letter.group(1)) < len(choices):
        return LETTERS.lower().index(letter.group(1))
    if lettered:  # "(A) 3" names both
        text = re.sub(r"^\(?[a-h]\)\s*", "", text)
    for i, choice in enumerate(choices):
        if text == _norm(choice):
            return i
    return None


def parse_choice(response, choices, lettered=True, lenient=False):
    """The index of the chosen option, or None if the response names none.

    strict: only the content of the FIRST <answer>...</answer> counts, and it must name exactly
    one option. lenient (the paper's looser behaviour): without a tag the whole response is read,
    and a letter in parentheses or an option text found anywhere in it counts (the first found).
    """
    tagged = re.search(r"<answer>(.*?)</answer>", response, re.DOTALL)
    if tagged:
        found = _match(tagged.group(1), choices, lettered)
        if found is not None or not lenient:
            return found
    elif not lenient:
        return None
    text = tagged.group(1) if tagged else response
    found = _match(text, choices, lettered)
    if found is not None:
        return found
    if lettered:
        letter = re.search(r"\(([A-H])\)", text)
        if letter and LETTERS.index(letter.group(1)) < len(choices):
            return LETTERS.index(letter.group(1))
    hits = [(m.start(), i) for i, c in enumerate(choices)
            for m in [re.search(r"\b" + re.escape(_norm(c)) + r"\b", _norm(text))] if m]
    return min(hits)[1] if hits else None


# --- scoring ------------------------------------------------------------------------------------

def percent_correct(rows):
    return 100.0 * sum(bool(r["correct"]) for r in rows) / len(rows) if rows else float("nan")


def score_cvbench(rows):
    """CV-Bench scores in percent from rows with `source`, `task`, `correct`.

    micro    accuracy over all items (the number the paper reports, 59.47)
    official ((acc_ADE20K + acc_COCO) / 2 + acc_Omni3D) / 2   (CV-Bench's own overall score)
    2D, 3D   (acc_ADE20K + acc_COCO) / 2 and acc_Omni3D
    Count, Relation, Depth, Distance: accuracy per task
    """
    by_source = {s: percent_correct([r for r in rows if r["source"] == s])
                 for s in ("ADE20K", "COCO", "Omni3D")}
    acc_2d = (by_source["ADE20K"] + by_source["COCO"]) / 2
    scores = {"micro": percent_correct(rows), "official": (acc_2d + by_source["Omni3D"]) / 2,
              "2D": acc_2d, "3D": by_source["Omni3D"]}
    scores.update({task: percent_correct([r for r in rows if r["task"] == task])
                   for task in CVBENCH_TASKS})
    return scores


# --- items --------------------------------------------------------------------------------------

def eval_items(examples, task, source):
    """Training-style examples (SAT, RefCOCO, JSONL, synthetic) as eval items: prompted exactly
    as in training; options are not lettered."""
    def make(i):
        ex = {**examples[i], "id": str(i), "task": task, "source": source}
        if ex["task_type"] == "choice":
            ex.update(lettered=False, gold=ex["choices"].index(ex["answer"]))
        return ex
    return data.Rows(examples.name, len(examples), make, examples.where)


def read_cvbench(source="nyu-visionx/CV-Bench", limit=0):
    """CV-Bench's table, its columns checked. Both hub layouts load: the single test.parquet
    (before 2025-04-01) and test_2d.parquet + test_3d.parquet (after); `source` is a hub id or a
    local folder."""
    ds = data.load_hub_dataset(source, "--dataset", data_files={"test": "test*.parquet"},
                               split="test")
    needed = ("idx", "task", "source", "image", "prompt", "choices", "answer")
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise UserError(f"--dataset {source}: not CV-Bench, it lacks the columns {missing}")
    return ds.select(range(min(limit, len(ds)))) if limit else ds


def cvbench_items(ds, source, view):
    """CV-Bench rows as eval items, prompted as `view` says (the row's `prompt` is the
    question); each row is checked when it is used."""
    def make(i):
        row = ds[i]
        letter = row["answer"].strip("() ")
        if letter not in LETTERS[:len(row["choices"])]:
            raise ValueError(f"the answer {row['answer']!r} names none of the "
                             f"{len(row['choices'])} choices")
        image = data.fit_image(data.decode_image(row["image"]), view.min_pixels, view.max_pixels)
        return {"id": f"{row.get('type', '')}-{row['idx']}", "task": row["task"],
                "source": row["source"], "image": image, "task_type": "choice",
                "prompt": view.template.replace("{question}", row["prompt"]),
                "choices": list(row["choices"]), "gold": LETTERS.index(letter), "lettered": True}

    return data.Rows(f"{source}[test]", len(ds), make, lambda i: f"{source}[test] row {i + 1}")


def load_cvbench(source="nyu-visionx/CV-Bench", limit=0, view=data.View()):
    return cvbench_items(read_cvbench(source, limit), source, view)


# --- running ------------------------------------------------------------------------------------

def judge(example, response):
    """One predictions.jsonl row: the response, its parse(s) and whether it is right."""
    row = {"id": example["id"], "task": example["task"], "source": example["source"],
           "task_type": example["task_type"], "response": response}
    if example["task_type"] == "rec":  # the box back in original pixels, scored there
        box = rewards.parse_box(response)
        box = box and data.scale_box(box, example["frame_size"], example["original_size"])
        iou = rewards.box_iou(box, example["gold_box"]) if box else 0.0
        return {**row, "box": box, "gold": example["gold_box"], "iou": iou, "correct": iou >= 0.5}
    if example["task_type"] == "ovd":
        found = rewards.parse_detections(response)
        found = found and [{**d, "bbox_2d": data.scale_box(d["bbox_2d"], example["frame_size"],
                                                          example["original_size"])}
                           for d in found]
        return {**row, "detections": found, "gold": example["gold_boxes"]}
    strict = parse_choice(response, example["choices"], example["lettered"])
    lenient = parse_choice(response, example["choices"], example["lettered"], lenient=True)
    return {**row, "choice": strict, "correct": strict == example["gold"],
            "choice_lenient": lenient, "correct_lenient": lenient == example["gold"],
            "gold": example["gold"]}


def predict(model, processor, items, batch_size, max_new_tokens):
    """Judged rows for `items`, one greedy batched generate per `batch_size` items."""
    gen = policy.generation_config(processor, max_new_tokens=max_new_tokens, greedy=True)
    for start in range(0, len(items), batch_size):
        batch = [items[i] for i in range(start, min(start + batch_size, len(items)))]
        _, texts = policy.generate(model, processor, batch, gen)
        yield from (judge(example, text) for example, text in zip(batch, texts))


def detection_map(rows):
    """COCO mAP@[.5:.95] in percent over every image of the rows (unparsed answers: no boxes)."""
    return 100.0 * rewards.coco_ap([r["detections"] or [] for r in rows],
                                   [r["gold"] for r in rows])


def score(rows):
    """Strict accuracy (choice), Acc@IoU>=0.5 (rec) or mAP (ovd), as a fraction, of judged rows
    (eval/accuracy or eval/mAP during training)."""
    if rows and rows[0]["task_type"] == "ovd":
        return detection_map(rows) / 100
    return sum(r["correct"] for r in rows) / max(1, len(rows))


def summarize(rows, benchmark):
    lengths = [len(r["response"]) for r in rows]
    summary = {"n": len(rows), "mean_response_chars": sum(lengths) / max(1, len(lengths))}
    task = rows[0]["task_type"] if rows else "choice"
    if task == "rec":
        summary["unparsed"] = sum(r["box"] is None for r in rows)
        summary["scores"] = {"Acc@0.5": percent_correct(rows),
                             "mean_IoU": 100 * sum(r["iou"] for r in rows) / max(1, len(rows))}
        return summary
    if task == "ovd":
        summary["unparsed"] = sum(r["detections"] is None for r in rows)
        summary["scores"] = {"mAP": detection_map(rows),
                             "boxes_per_image": sum(len(r["detections"] or []) for r in rows)
                             / max(1, len(rows)),
                             "gold_per_image": sum(len(r["gold"]) for r in rows)
                             / max(1, len(rows))}
        return summary
    summary["unparsed"] = sum(r["choice"] is None for r in rows)
    summary["unparsed_lenient"] = sum(r["choice_lenient"] is None for r in rows)
    lenient_rows = [{**r, "correct": r["correct_lenient"]} for r in rows]
    score = score_cvbench if benchmark == "cvbench" else (lambda x: {"micro": percent_correct(x)})
    summary["strict"], summary["lenient"] = score(rows), score(lenient_rows)
    return summary


def format_table(summary):
    if "scores" in summary:  # grounding, detection: one row
        scores = summary["scores"]
        return ("".join(f"{k:>16}" for k in scores) + "\n"
                + "".join(f"{v:>16.2f}" for v in scores.values())
                + f"\nitems {summary['n']}, no parsable answer: {summary['unparsed']}, mean "
                f"response length {summary['mean_response_chars']:.0f} chars")
    keys = list(summary["strict"])
    lines = [f"{'parser':<9}" + "".join(f"{k:>10}" for k in keys)]
    for parser in ("strict", "lenient"):
        lines.append(f"{parser:<9}" + "".join(f"{summary[parser][k]:>10.2f}" for k in keys))
    lines.append(f"items {summary['n']}, no parsable <answer>: {summary['unparsed']} (lenient: "
                 f"{summary['unparsed_lenient']}), mean response length "
                 f"{summary['mean_response_chars']:.0f} chars")
    return "\n".join(lines)


@dataclass
class EvalConfig:
    model: str = flag("Qwen/Qwen2-VL-2B", "hub id or local folder of the base model")
    adapter: str | None = flag(None, "a LoRA/QLoRA adapter folder (RUN_DIR/checkpoint-N)",
                               default_help="none, the base model")
    benchmark: str = flag("cvbench", "what to evaluate on", choices=BENCHMARKS)
    dataset: str | None = flag(None, "hub id or local folder of the benchmark, or a .jsonl "
                               "task of your own (same schema as training)",
                               default_help="the benchmark's hub id, e.g. lmms-lab/RefCOCO")
    split: str = flag("val", "split: SAT val | test; RefCOCO/+ val | testA | testB (| test); "
                      "RefCOCOg val | test")
    output_dir: str | None = flag(None, "where predictions.jsonl and summary.json go",
                                  default_help="runs/eval/<model>[-<adapter>]/<benchmark>")
    limit: int = flag(0, "evaluate only the first N items (0 = all)", min=0)
    batch_size: int = flag(16, "prompts per generate call", min=1)
    max_new_tokens: int = flag(1024, "most new tokens per response (paper: 1024)", min=1)
    min_pixels: int = flag(data.MIN_PIXELS, "image size floor, as in training", min=1)
    max_pixels: int = flag(data.MAX_PIXELS, "image size cap, as in training", min=1)
    load_in_4bit: bool = flag(False, "load the base model in 4-bit NF4 (for a QLoRA adapter)")
    prompt_format: str = flag("auto", "as in training: r1 (the paper's base-model prompt), chat "
                              "(the checkpoint's chat template); auto: chat for Qwen2.5-VL",
                              choices=policy.PROMPT_FORMATS)
    seed: int = flag(0, "seeds the option shuffling of SAT and JSONL rows")
    overwrite: bool = flag(False, "discard predictions of another model/data in --output_dir")

    def __post_init__(self):
        cli.check_values(self)
        if self.dataset and self.dataset.endswith(".jsonl"):
            self.benchmark = "jsonl"
        if self.output_dir is None:
            name = Path(self.model.rstrip("/")).name
            if self.adapter:
                name += "-" + "-".join(Path(self.adapter).resolve().parts[-2:])
            task = Path(self.dataset).stem if self.benchmark == "jsonl" else self.benchmark
            task += f"-{self.split}" if self.benchmark not in ("cvbench", "jsonl") else ""
            self.output_dir = str(Path("runs/eval") / re.sub(r"[^\w.-]+", "_", name) / task)


# What produced a predictions.jsonl: a resume must match all of them.
PROVENANCE = ("model", "adapter", "benchmark", "dataset", "split", "limit", "max_new_tokens",
              "min_pixels", "max_pixels", "load_in_4bit", "seed", "prompt_format")


def provenance(cfg, view):
    record = {k: getattr(cfg, k) for k in PROVENANCE}
    if cfg.adapter:
        record["adapter"] = str(Path(cfg.adapter).resolve())
    return {**record, "prompt": view.template, "frame": view.frame}


def load_rows(cfg):
    """The data, read before any model: CV-Bench's table (its rows are checked as they are
    used), or the examples of the other benchmarks with every row checked."""
    source = cfg.dataset or {"cvbench": "nyu-visionx/CV-Bench", "sat": "array/SAT",
                             **data.REFCOCO}[cfg.benchmark]
    if cfg.benchmark == "cvbench":
        return read_cvbench(source, cfg.limit)
    examples = data.load_examples(source, cfg.split, cfg.limit, cfg.seed,
                                  data.View(cfg.min_pixels, cfg.max_pixels))
    data.check_rows(examples)
    return examples


def load_items(cfg, rows, view):
    """The items to evaluate, prompted and framed as `view` (the model's) says."""
    if cfg.benchmark == "cvbench":
        return cvbench_items(rows, cfg.dataset or "nyu-visionx/CV-Bench", view)
    if cfg.benchmark == "jsonl":
        return eval_items(rows.shown_as(view), "task", Path(cfg.dataset).name)
    return eval_items(rows.shown_as(view), cfg.split, cfg.benchmark)


def load_done(out, cfg, view):
    """Finished predictions to resume from, if they were made by the same settings."""
    predictions, record = out / "predictions.jsonl", out / "eval_config.json"
    if not predictions.is_file() or cfg.overwrite:
        return {}
    before = json.loads(record.read_text()) if record.is_file() else {}
    differ = [k for k, v in provenance(cfg, view).items() if before.get(k) != v]
    if differ:
        raise UserError(f"{predictions} holds predictions of other settings ({', '.join(differ)} "
                        "differ); give another --output_dir, or --overwrite to discard them")
    done = {}
    for line in predictions.read_text().splitlines():  # a line torn by a kill is dropped
        try:
            row = json.loads(line)
            done[row["id"]] = row
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    return done


def load_for_eval(cfg, device):
    model, processor = policy.load_base_model(cfg.model, device, cfg.load_in_4bit)
    if cfg.adapter:
        from peft import PeftModel
        with policy.quiet_peft():
            model = PeftModel.from_pretrained(model, cfg.adapter)
        if not cfg.load_in_4bit:
            model = model.merge_and_unload()  # exact in fp32/bf16, and faster generation
    return model.eval(), processor


def evaluate(cfg):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.adapter and not (Path(cfg.adapter) / "adapter_config.json").is_file():
        raise UserError(f"--adapter {cfg.adapter}: no adapter_config.json there")
    out = data.writable_dir(cfg.output_dir, "--output_dir")
    rows = load_rows(cfg)
    view = policy.model_view(cfg.model, cfg.prompt_format, cfg.min_pixels, cfg.max_pixels)
    done = load_done(out, cfg, view)
    items = load_items(cfg, rows, view)
    predictions = out / "predictions.jsonl"
    predictions.write_text("".join(json.dumps(r) + "\n" for r in done.values()))
    (out / "eval_config.json").write_text(json.dumps(provenance(cfg, view), indent=2))
    todo = [i for i in range(len(items)) if not done or items[i]["id"] not in done]
    if todo:
        model, processor = load_for_eval(cfg, device)
        subset = data.Rows(items.name, len(todo), lambda j: items[todo[j]], items.where)
        with open(predictions, "a") as f, tqdm(total=len(items), initial=len(items) - len(todo),
                                               desc=cfg.benchmark, dynamic_ncols=True) as bar:
            for row in predict(model, processor, subset, cfg.batch_size, cfg.max_new_tokens):
                done[row["id"]] = row
                f.write(json.dumps(row) + "\n")
                f.flush()
                bar.update(1)
    summary = summarize(list(done.values()), cfg.benchmark)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(format_table(summary))
    print(f"predictions and summary in {out}")
    return summary


def main(argv=None):
    return evaluate(cli.parse(EvalConfig, argv, __doc__))


if __name__ == "__main__":
    cli.run(main)
