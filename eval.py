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
from pathlib import Path

import torch
from tqdm import tqdm

import data
from r1v import (adapters, answers, cli, decode, flags, grounding, hub, images, metrics, model,
                 policy, rows, runs)
from r1v.cli import UserError

# What produced a predictions.jsonl: a resume must match all of them.
PROVENANCE = ("model", "adapter", "merge_adapter", "benchmark", "dataset", "split", "limit",
              "max_new_tokens", "min_pixels", "max_pixels", "load_in_4bit", "seed", "prompt_format",
              "synthetic_tasks", "synthetic_image_size")


def provenance(cfg, view, content):
    """What made a predictions.jsonl: the settings, the prompt and frame, the data's content
    and the adapter's weights (hashes)."""
    record = {k: getattr(cfg, k) for k in PROVENANCE}
    if cfg.adapter:
        record.update(adapter=str(Path(cfg.adapter).resolve()), adapter_weights=runs.file_hash(
            Path(cfg.adapter) / "adapter_model.safetensors"))
    return {**record, "dataset_content": content, "prompt": view.template, "frame": view.frame}


def eval_items(examples, task, source):
    """Training-style examples (SAT, RefCOCO, JSONL, synthetic) as eval items: prompted exactly
    as in training; options are not lettered."""
    def make(i):
        ex = {**examples[i], "id": str(i), "task": task, "source": source}
        if ex["task_type"] == "choice":
            ex.update(lettered=False, gold=ex["choices"].index(ex["answer"]))
        return ex
    return rows.Rows(examples.name, len(examples), make, examples.where)


def judge(example, response):
    """One predictions.jsonl row: the response, its parse(s) and whether it is right. Boxes are
    scored in original pixels, mapped back from the model's frame."""
    row = {"id": example["id"], "task": example["task"], "source": example["source"],
           "task_type": example["task_type"], "response": response}

    def original(box):
        return grounding.scale_box(box, example["frame_size"], example["original_size"])
    if example["task_type"] == "rec":
        box = answers.parse_box(response)
        box = box and original(box)
        iou = grounding.box_iou(box, example["gold_box"]) if box else 0.0
        return {**row, "box": box, "gold": example["gold_box"], "iou": iou, "correct": iou >= 0.5}
    if example["task_type"] == "ovd":
        found = answers.parse_detections(response)
        found = found and [{**d, "bbox_2d": original(d["bbox_2d"])} for d in found]
        return {**row, "detections": found, "gold": example["gold_boxes"]}
    strict = answers.parse_choice(response, example["choices"], example["lettered"])
    lenient = answers.parse_choice(response, example["choices"], example["lettered"], True)
    return {**row, "choice": strict, "correct": strict == example["gold"],
            "choice_lenient": lenient, "correct_lenient": lenient == example["gold"],
            "gold": example["gold"]}


def predict(model, processor, items, batch_size, max_new_tokens, eos_ids=None, decoder=None):
    """Judged rows for `items`, one greedy batched generate per `batch_size` items. With a
    `decoder` (its static cache and compiled decode step), a short last batch is filled up with
    its last item, whose copies are dropped: every call has the cache's shape."""
    gen = policy.generation_config(processor, eos_ids, max_new_tokens=max_new_tokens, greedy=True)
    for start in range(0, len(items), batch_size):
        batch = [items[i] for i in range(start, min(start + batch_size, len(items)))]
        filled = batch + batch[-1:] * (decoder.batch_size - len(batch)) if decoder else batch
        _, texts = policy.generate(model, processor, filled, gen, decoder=decoder)
        yield from (judge(example, text) for example, text in zip(batch, texts))


def score(rows):
    """Strict accuracy (choice), Acc@IoU>=0.5 (rec) or mAP (ovd), as a fraction, of judged rows
    (eval/accuracy or eval/mAP during training)."""
    if rows and rows[0]["task_type"] == "ovd":
        return metrics.detection_map(rows) / 100
    return sum(r["correct"] for r in rows) / max(1, len(rows))


def load_items(cfg):
    """The data, read and checked before any model (CV-Bench's rows as they are used): a
    function that prompts and frames its items as a model's view says, its content's
    fingerprint (a JSONL file's hash; a hub dataset's own) and a function of the view giving,
    per row, its question and visual tokens (CV-Bench's: at most --max_pixels')."""
    source = cfg.dataset or {"cvbench": hub.CVBENCH, "sat": "array/SAT",
                             **hub.REFCOCO}[cfg.benchmark]
    if cfg.benchmark == "cvbench":
        table = hub.read_cvbench(source, cfg.limit)
        return ((lambda view: hub.cvbench_items(table, source, view)), table._fingerprint,
                lambda view: [(question, cfg.max_pixels // view.patch_factor**2)
                              for question in table["prompt"]])
    synthetic = cfg.benchmark == "synthetic"  # the demo's rows: 200 unless --limit says
    examples = data.load_examples(source, cfg.split, cfg.limit or 200 * synthetic, cfg.seed,
                                  data.View(cfg.min_pixels, cfg.max_pixels), "--dataset",
                                  cfg.synthetic_tasks, cfg.synthetic_image_size)
    prompt_rows = rows.check_rows(examples)
    task, name = ((Path(source).stem, Path(source).name) if cfg.benchmark == "jsonl" else
                  (",".join(cfg.synthetic_tasks), examples.name) if synthetic else
                  (cfg.split, cfg.benchmark))
    return ((lambda view: eval_items(examples.shown_as(view), task, name)), examples.fingerprint,
            lambda view: prompt_rows if view.patch_factor == images.PATCH_FACTOR  # else Qwen3-VL's
            else rows.check_rows(examples.shown_as(view)))


def load_done(out, record, items):
    """Finished predictions to resume from, {id: row}, if they were made as `record`
    (provenance) says, and the indices of the `items` still to predict."""
    predictions, saved = out / "predictions.jsonl", out / "eval_config.json"
    if not predictions.is_file():
        return {}, range(len(items))
    hint = "; give another --output_dir, or --overwrite to discard them"
    with cli.user_error(f"{saved} cannot be read, so neither can what made {predictions}",
                        OSError, ValueError, hint=hint):
        before = json.loads(saved.read_text()) if saved.is_file() else {}
        if not isinstance(before, dict):
            raise ValueError("not a JSON object")
    differ = [k for k in record if before.get(k) != record[k]]
    if differ:
        raise UserError(f"{predictions} holds predictions of other settings ({', '.join(differ)} "
                        "differ)" + hint)
    with cli.user_error(f"{predictions} cannot be read", OSError, UnicodeDecodeError, hint=hint):
        lines = runs.read_log(predictions)[0]
    ids, judged = [], {}  # each item's id; the keys of its judged row, which summarize reads
    for i in range(len(items) if lines else 0):
        item = items[i]
        ids.append(item["id"])
        judged[item["id"]] = judge(item, "").keys()
    done = {}
    for number, row in lines:  # an edited line would be scored as it is, or break summarize
        key = row.get("id") if isinstance(row, dict) else None
        if not isinstance(key, str) or key not in judged or not judged[key] <= row.keys():
            raise UserError(f"{predictions}:{number}: not a prediction of an item of this data "
                            "(edited?)" + hint)
        done[key] = row
    return done, [i for i, key in enumerate(ids) if key not in done] if lines else range(len(items))


def load_for_eval(cfg, device):
    """The base model with the adapter (--adapter): unmerged, as trained, or merged into it
    (--merge_adapter, faster)."""
    base = model.load_base_model(cfg.model, device, cfg.load_in_4bit)
    if not cfg.adapter:
        return base.eval()
    from peft import PeftModel

    with model.quiet_peft():
        tuned = PeftModel.from_pretrained(base, cfg.adapter)
    return (tuned.merge_and_unload() if cfg.merge_adapter else tuned).eval()


def check_fit(cfg, config):
    """--max_new_tokens within the model's positions, and the --adapter fitting the model (its
    modules, sizes and rank, from the safetensors header): one line each, before it loads."""
    model.check_positions(config, cfg.max_new_tokens, "--max_new_tokens")
    try:
        cfg.adapter and adapters.check_adapter(cfg.adapter, model.parameter_shapes(config),
                                           f"--model {cfg.model}", model.model_class(config))
    except ValueError as e:
        raise UserError(f"--adapter {cfg.adapter}: {e}") from e


def prompt_as_trained(cfg):
    """--prompt_format auto with an adapter of a run that set it (r1 or chat): that format, as
    the adapter learned to answer it; another one given: said once."""
    trained = cfg.adapter and adapters.trained_with(cfg.adapter, "prompt_format")
    if trained not in ("r1", "chat") or trained == cfg.prompt_format:
        return
    if cfg.prompt_format == "auto":
        cfg.prompt_format = trained
        print(f"note: prompting as the adapter was trained: --prompt_format {trained} (its "
              "run's config.json)", flush=True)
    else:
        print(f"note: the adapter was trained with --prompt_format {trained}; evaluating with "
              f"--prompt_format {cfg.prompt_format}, as asked", flush=True)


def evaluate(cfg):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.compile_decode is None:  # on where it pays: CUDA graphs
        cfg.compile_decode = device.type == "cuda"
    decode.check_backend(cfg.compile_decode, cfg.compile_backend, device)
    try:
        cfg.adapter and adapters.check_adapter(cfg.adapter)
    except ValueError as e:  # before any model loads
        raise UserError(f"--adapter {cfg.adapter}: {e}") from e
    with runs.locked(cfg.output_dir, "--output_dir") as out:
        shown_as, content, prompt_rows = load_items(cfg)
        config = model.load_config(cfg.model)
        check_fit(cfg, config)
        processor = model.load_processor(cfg.model)
        prompt_as_trained(cfg)
        view = data.model_view(config, processor, cfg.prompt_format, cfg.min_pixels,
                               cfg.max_pixels)
        record = provenance(cfg, view, content)
        items = shown_as(view)
        done, todo = ({}, range(len(items))) if cfg.overwrite else load_done(out, record, items)
        predictions = out / "predictions.jsonl"
        runs.write_atomic(predictions, "".join(json.dumps(r) + "\n" for r in done.values()))
        runs.write_atomic(out / "eval_config.json", json.dumps(record, indent=2))
        if len(todo) < len(items):  # the same command again: say so, not just print the table
            print(f"reusing {len(items) - len(todo)} predictions from {predictions}", flush=True)
        if todo:
            tuned = load_for_eval(cfg, device)
            decoder = decode.for_eval(
                tuned, processor, view, prompt_rows, min(cfg.batch_size, len(todo)),
                cfg.max_new_tokens, cfg.compile_backend) if cfg.compile_decode else None
            subset = rows.Rows(items.name, len(todo), lambda j: items[todo[j]], items.where)
            with open(predictions, "a") as f, tqdm(total=len(items), desc=cfg.benchmark,
                                                   initial=len(items) - len(todo)) as bar:
                for row in predict(tuned, processor, subset, cfg.batch_size, cfg.max_new_tokens,
                                   model.eos_ids(cfg.model, processor), decoder):
                    done[row["id"]] = row
                    f.write(json.dumps(row) + "\n")
                    f.flush()
                    bar.update(1)
        summary = metrics.summarize(list(done.values()), cfg.benchmark)
        runs.write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    print(metrics.format_table(summary))
    print(f"predictions and summary in {out}")
    return summary


def main(argv=None):
    return evaluate(cli.parse(flags.EvalConfig, argv, __doc__))


if __name__ == "__main__":
    cli.run(main)
