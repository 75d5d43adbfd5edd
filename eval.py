"""Evaluate a base model or a LoRA/QLoRA adapter on CV-Bench (or SAT) with the training prompt.

    python eval.py --model Qwen/Qwen2-VL-2B --adapter runs/sat/checkpoint-500 --benchmark cvbench
    python eval.py --model Qwen/Qwen2-VL-2B --benchmark cvbench --limit 200        # a quick look

Greedy decoding, up to 1024 new tokens, batched with left padding. Writes OUTPUT_DIR/predictions.jsonl (one line
per item, appended as it goes, so a killed run resumes where it stopped) and OUTPUT_DIR/summary.json, and prints
the table. Two parsers: strict (default; the `<answer>` content must name the letter or the option text) and
lenient (the paper's: free text without a tag may match too). Both are reported.
"""

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import data

LETTERS = "ABCDEFGH"
CVBENCH_TASKS = ("Count", "Relation", "Depth", "Distance")


# --- parsing ---------------------------------------------------------------------------------------------------

def _norm(text):
    return re.sub(r"\s+", " ", text).strip().strip(".").strip().lower()


def _match(text, choices, lettered):
    """Index of the option `text` names exactly: a letter `A`, `(A)`, `A.` (lettered options only) or the text."""
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

    strict: only the content of the FIRST <answer>...</answer> counts, and it must name exactly one option.
    lenient (the paper's looser behaviour): without a tag the whole response is read, and a letter in
    parentheses or an option text found anywhere in it counts (the first one found).
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


# --- scoring ---------------------------------------------------------------------------------------------------

def _accuracy(rows):
    return 100.0 * sum(bool(r["correct"]) for r in rows) / len(rows) if rows else float("nan")


def score_cvbench(rows):
    """CV-Bench scores in percent from rows with `source`, `task`, `correct`.

    micro    accuracy over all items (the number the paper reports, 59.47)
    official ((acc_ADE20K + acc_COCO) / 2 + acc_Omni3D) / 2   (CV-Bench's own overall score)
    2D, 3D   (acc_ADE20K + acc_COCO) / 2 and acc_Omni3D
    Count, Relation, Depth, Distance: accuracy per task
    """
    by_source = {s: _accuracy([r for r in rows if r["source"] == s]) for s in ("ADE20K", "COCO", "Omni3D")}
    acc_2d = (by_source["ADE20K"] + by_source["COCO"]) / 2
    scores = {"micro": _accuracy(rows), "official": (acc_2d + by_source["Omni3D"]) / 2, "2D": acc_2d,
              "3D": by_source["Omni3D"]}
    scores.update({task: _accuracy([r for r in rows if r["task"] == task]) for task in CVBENCH_TASKS})
    return scores


# --- benchmarks --------------------------------------------------------------------------------------------------

def load_cvbench(source="nyu-visionx/CV-Bench", limit=0, min_pixels=3136, max_pixels=401408):
    """CV-Bench items as eval examples. Both hub layouts load: the single test.parquet (before 2025-04-01) and
    test_2d.parquet + test_3d.parquet (after); `source` is the hub id or a local folder of either layout."""
    import datasets

    ds = datasets.load_dataset(source, data_files={"test": "test*.parquet"}, split="test")
    missing = [c for c in ("idx", "task", "source", "image", "prompt", "choices", "answer") if c not in ds.column_names]
    if missing:
        raise ValueError(f"{source}: not CV-Bench, it lacks the columns {missing}")
    if limit:
        ds = ds.select(range(min(limit, len(ds))))

    def make(i):
        row = ds[i]
        letter = row["answer"].strip("() ")
        if letter not in LETTERS[:len(row["choices"])]:
            raise ValueError(f"the answer {row['answer']!r} names none of the {len(row['choices'])} choices")
        return {"id": f"{row['type'] if 'type' in row else ''}-{row['idx']}", "task": row["task"],
                "source": row["source"], "image": data.fit_image(data.decode_image(row["image"]), min_pixels, max_pixels),
                "prompt": data.PROMPT_TEMPLATE.format(question=row["prompt"]), "choices": list(row["choices"]),
                "gold": LETTERS.index(letter), "lettered": True}

    return data.Examples(f"{source}[test]", len(ds), make)


def load_sat_eval(source="array/SAT", split="val", limit=0, seed=0, min_pixels=3136, max_pixels=401408):
    """SAT's val or test split, prompted exactly as in training; options are not lettered."""
    sat = data.load_sat(source, split, limit, seed, min_pixels, max_pixels)

    def make(i):
        ex = sat[i]
        return {**ex, "id": str(i), "task": split, "source": "SAT", "gold": ex["choices"].index(ex["answer"]),
                "lettered": False}

    return data.Examples(sat.name, len(sat), make)


# --- running -------------------------------------------------------------------------------------------------------

@torch.no_grad()
def respond(model, processor, examples, max_new_tokens):
    """Greedy responses to a batch of eval examples (one batched, left-padded generate)."""
    from train import generation_config
    enc = data.encode_prompts(processor, examples, 1).to(model.device)
    out = model.generate(**enc, generation_config=generation_config(processor, max_new_tokens, greedy=True))
    return processor.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def judge(example, response):
    """One predictions.jsonl row: the response, both parses and whether each is right."""
    strict = parse_choice(response, example["choices"], example["lettered"])
    lenient = parse_choice(response, example["choices"], example["lettered"], lenient=True)
    return {"id": example["id"], "task": example["task"], "source": example["source"], "response": response,
            "choice": strict, "correct": strict == example["gold"], "choice_lenient": lenient,
            "correct_lenient": lenient == example["gold"], "gold": example["gold"]}


def accuracy_on(model, processor, examples, batch_size, max_new_tokens):
    """Strict accuracy on a list of eval examples (used for eval/accuracy during training)."""
    was_training = model.training
    model.eval()
    rows = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        rows += [judge(ex, r) for ex, r in zip(batch, respond(model, processor, batch, max_new_tokens))]
    model.train(was_training)
    return sum(r["correct"] for r in rows) / max(1, len(rows))


def summarize(rows, benchmark):
    lengths = [len(r["response"]) for r in rows]
    summary = {"n": len(rows), "unparsed": sum(r["choice"] is None for r in rows),
               "unparsed_lenient": sum(r["choice_lenient"] is None for r in rows),
               "mean_response_chars": sum(lengths) / max(1, len(lengths))}
    lenient_rows = [{**r, "correct": r["correct_lenient"]} for r in rows]
    if benchmark == "cvbench":
        summary["strict"], summary["lenient"] = score_cvbench(rows), score_cvbench(lenient_rows)
    else:
        summary["strict"], summary["lenient"] = {"micro": _accuracy(rows)}, {"micro": _accuracy(lenient_rows)}
    return summary


def format_table(summary):
    keys = list(summary["strict"])
    lines = [f"{'parser':<9}" + "".join(f"{k:>10}" for k in keys)]
    for parser in ("strict", "lenient"):
        lines.append(f"{parser:<9}" + "".join(f"{summary[parser][k]:>10.2f}" for k in keys))
    lines.append(f"items {summary['n']}, no parsable <answer>: {summary['unparsed']} (lenient parser: "
                 f"{summary['unparsed_lenient']} unparsed), mean response length {summary['mean_response_chars']:.0f} chars")
    return "\n".join(lines)


@dataclass
class EvalConfig:
    model: str = field(default="Qwen/Qwen2-VL-2B", metadata={"help": "hub id or local folder of the base model"})
    adapter: str = field(default=None, metadata={"help": "a LoRA/QLoRA adapter folder (e.g. RUN_DIR/checkpoint-N); none = the base model"})
    benchmark: str = field(default="cvbench", metadata={"help": "cvbench | sat"})
    dataset: str = field(default=None, metadata={"help": "hub id or local folder (default nyu-visionx/CV-Bench or array/SAT)"})
    split: str = field(default="val", metadata={"help": "SAT split to evaluate: val | test"})
    output_dir: str = field(default="runs/eval", metadata={"help": "where predictions.jsonl and summary.json go (an existing predictions.jsonl is resumed)"})
    limit: int = field(default=0, metadata={"help": "evaluate only the first N items (0 = all)"})
    batch_size: int = field(default=16, metadata={"help": "prompts per generate call"})
    max_new_tokens: int = field(default=1024, metadata={"help": "most new tokens per response (the paper: 1024)"})
    min_pixels: int = field(default=3136, metadata={"help": "image size floor, as in training"})
    max_pixels: int = field(default=401408, metadata={"help": "image size cap, as in training (the paper had none at evaluation)"})
    load_in_4bit: bool = field(default=False, metadata={"help": "load the base model in 4-bit NF4 (for a QLoRA adapter)"})
    seed: int = field(default=0, metadata={"help": "seeds SAT's option shuffling"})


def load_for_eval(cfg, device):
    from train import Config, load_base_model
    model, processor = load_base_model(Config(model=cfg.model, load_in_4bit=cfg.load_in_4bit), device)
    if cfg.adapter:
        from peft import PeftModel
        if not (Path(cfg.adapter) / "adapter_config.json").is_file():
            raise SystemExit(f"--adapter {cfg.adapter}: no adapter_config.json there")
        model = PeftModel.from_pretrained(model, cfg.adapter)
        if not cfg.load_in_4bit:
            model = model.merge_and_unload()  # exact, and faster generation
    return model.eval(), processor


def evaluate(cfg):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.benchmark == "cvbench":
        items = load_cvbench(cfg.dataset or "nyu-visionx/CV-Bench", cfg.limit, cfg.min_pixels, cfg.max_pixels)
    elif cfg.benchmark == "sat":
        items = load_sat_eval(cfg.dataset or "array/SAT", cfg.split, cfg.limit, cfg.seed, cfg.min_pixels, cfg.max_pixels)
    else:
        raise SystemExit(f"--benchmark must be cvbench or sat, got {cfg.benchmark!r}")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    predictions = out / "predictions.jsonl"
    done = {}
    if predictions.is_file():  # resume: keep finished items (a torn last line from a kill is dropped)
        for line in predictions.read_text().splitlines():
            try:
                row = json.loads(line)
                done[row["id"]] = row
            except json.JSONDecodeError:
                pass
        predictions.write_text("".join(json.dumps(r) + "\n" for r in done.values()))
    (out / "eval_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    model, processor = load_for_eval(cfg, device)
    todo = [i for i in range(len(items)) if items[i]["id"] not in done] if done else list(range(len(items)))
    with open(predictions, "a") as f, tqdm(total=len(items), initial=len(items) - len(todo), desc=cfg.benchmark) as bar:
        for start in range(0, len(todo), cfg.batch_size):
            batch = [items[i] for i in todo[start:start + cfg.batch_size]]
            for example, response in zip(batch, respond(model, processor, batch, cfg.max_new_tokens)):
                row = judge(example, response)
                done[row["id"]] = row
                f.write(json.dumps(row) + "\n")
            f.flush()
            bar.update(len(batch))
    summary = summarize(list(done.values()), cfg.benchmark)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(format_table(summary))
    return summary


def main(argv=None):
    from train import config_parser
    try:
        evaluate(EvalConfig(**vars(config_parser(EvalConfig, __doc__).parse_args(argv))))
    except ValueError as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
