"""rewards.py, and the parsers (r1v/answers.py), boxes (r1v/grounding.py) and reflection
phrases (r1v/metrics.py) beside them, on tables of cases."""

import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import rewards
from r1v import answers, grounding, metrics

EX = {"answer": "left", "choices": ["left", "right"]}


@pytest.mark.parametrize(
    "completion,expected",
    [
        ("</think><answer>left</answer>", 1.0),
        (
            " first I look.\nThen I check.\n</think>\n<answer> left </answer>",
            1.0,
        ),  # multi-line think, spaces
        ("</think> <answer>left</answer>", 1.0),
        ("</think><answer>left</answer> and more", 0.0),  # trailing text
        ("</think><answer>left</answer>\n", 0.0),  # even a newline after </answer>
        ("</think> left", 0.0),  # no answer tags
        ("<answer>left</answer>", 0.0),  # think never closed
        ("</think><answer>left", 0.0),  # answer never closed
        ("", 0.0),
        ("</think><answer>a</answer><answer>b</answer>", 1.0),  # the paper's regex allows it
    ],
)
def test_format_reward(completion, expected):
    assert rewards.format_reward(completion, EX) == expected


@pytest.mark.parametrize(
    "completion,expected",
    [
        ("</think><answer>left</answer>", 1.0),
        ("a\nb</think>\n<answer>\n left \n</answer>", 1.0),  # multi-line, stripped
        ("</think><answer>Left</answer>", 0.0),  # exact match, case matters
        ("</think><answer>left</answer><answer>right</answer>", 1.0),  # the FIRST answer counts
        ("</think><answer>right</answer><answer>left</answer>", 0.0),
        ("left", 1.0),  # no tags: the whole completion
        ("  left \n", 1.0),
        ("I think left", 0.0),
        ("<answer>left", 0.0),  # unclosed: whole text compared
        ("</think><answer>the left one</answer>", 0.0),
    ],
)
def test_accuracy_reward(completion, expected):
    assert rewards.accuracy_reward(completion, EX) == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Wait, the red one is bigger.", True), ("Let me re-check the positions.", True),
        ("But I should reconsider this.", True), ("On second thought it is left.", True),
        ("The waiter is left of the table.", False),  # whole words only
        ("It is on the left.", False),
    ],
)
def test_reflection_phrases(text, expected):
    assert bool(metrics.reflection_keys(text)) is expected


@pytest.mark.parametrize(
    "text,keys",
    [
        ("Wait, let me re-check the positions.", {"wait", "recheck"}),
        ("Let me double check. On second thought, I made a mistake.",
         {"double_check", "second_thought", "mistake"}),
        ("I RECONSIDER, re-examine the image, and let me verify.",
         {"reconsider", "reevaluate", "verify"}),
        ("That's not right. Let me check again: recheck.", {"mistake", "verify", "recheck"}),
        ("Re-evaluate. Wait. Wait!", {"reevaluate", "wait"}),  # a key counts once
        ("It was double-checked and rechecked.", set()),  # whole words: no inflections
        ("The waiter is left of the table.", set()), ("", set()),
    ],
)
def test_reflection_keys(text, keys):
    assert metrics.reflection_keys(text) == keys
    assert bool(metrics.reflection_keys(text)) is bool(keys)


def test_every_reflection_phrase_has_one_key():
    assert metrics.REFLECTION_KEYS == ("wait", "recheck", "double_check", "reconsider",
                                       "reevaluate", "verify", "second_thought", "mistake")
    for key, phrases in metrics.REFLECTION_GROUPS.items():
        for phrase in phrases:
            assert metrics.reflection_keys(f"So, {phrase.upper()}.") == {key}
    # the phrases before the keys, all kept
    assert sum(len(phrases) for phrases in metrics.REFLECTION_GROUPS.values()) == 14


@pytest.mark.parametrize(
    "completion,example,expected",
    [
        ("</think><answer>left</answer>", EX, 0.001),  # one word without the trainer's count
        ("The cup is left.\n</think> <answer>left</answer>", EX, 0.006),
        ("", EX, 0.0),
        ("two words", {**EX, "completion_tokens": 250}, 0.25),  # the trainer's count wins
        ("two words", {**EX, "completion_tokens": 0}, 0.0),
        ("word " * 700, EX, 0.7),  # uncapped: 700 words, the paper's 700-token budget
    ],
)
def test_length_reward(completion, example, expected):
    assert rewards.length_reward(completion, example) == pytest.approx(expected, abs=1e-12)


def test_length_reward_is_registered():
    funcs, weights = rewards.load_rewards(["format", "length"])
    assert funcs["length"] is rewards.length_reward
    total, parts, _ = rewards.score_completions(
        ["</think><answer>left</answer>", "no format here"], [EX] * 2, funcs, weights)
    assert parts["length"] == pytest.approx([0.001, 0.003])
    assert total == pytest.approx([1.001, 0.003])


def test_score_completions_weights_parts_and_counts_errors():
    def broken(completion, example):
        raise RuntimeError("boom")

    def nan_reward(completion, example):
        return float("nan")

    funcs = {
        "format": rewards.format_reward, "accuracy": rewards.accuracy_reward, "broken": broken,
        "nan": nan_reward,
    }
    weights = {"format": 0.5, "accuracy": 2.0, "broken": 1.0, "nan": 1.0}
    total, parts, errors = rewards.score_completions(
        ["</think><answer>left</answer>", "</think><answer>right</answer>", "left"], [EX] * 3,
        funcs, weights,
    )
    assert total == [2.5, 0.5, 2.0]
    assert parts["format"] == [1.0, 1.0, 0.0] and parts["accuracy"] == [1.0, 0.0, 1.0]
    assert parts["broken"] == [0.0, 0.0, 0.0] and errors == {
        "format": 0, "accuracy": 0, "broken": 3, "nan": 3,
    }


def test_load_reward_by_name_and_from_a_file(tmp_path):
    assert rewards.load_reward("accuracy") == ("accuracy", rewards.accuracy_reward)
    path = tmp_path / "my_rewards.py"
    path.write_text(
        "def short(completion, example):\n    return 1.0 if len(completion) < 5 else 0.0\n"
    )
    name, func = rewards.load_reward(f"{path}:short")
    assert name == "short" and func("abc", EX) == 1.0 and func("abcdef", EX) == 0.0


@pytest.mark.parametrize(
    "spec,message",
    [("acuracy", "unknown reward 'acuracy'"), ("missing_file.py:f", "does not exist")],
)
def test_load_reward_errors_name_the_flag(spec, message):
    with pytest.raises(ValueError, match="--reward_funcs") as info:
        rewards.load_reward(spec)
    assert message in str(info.value)


def test_load_reward_missing_function(tmp_path):
    path = tmp_path / "r.py"
    path.write_text("x = 1\n")
    with pytest.raises(ValueError, match="has no function 'nope'"):
        rewards.load_reward(f"{path}:nope")


# --- grounding: boxes, IoU, COCO AP -----------------------------------------------------------

def answer(text):
    return f"look.</think><answer>{text}</answer>"


@pytest.mark.parametrize(
    "text,expected",
    [
        (answer("[10, 20, 30, 40]"), [10.0, 20.0, 30.0, 40.0]),
        (answer("[10, 20.5, 30.25, 40]"), [10.0, 20.5, 30.25, 40.0]),
        (answer("[-3, -4.5, 30, 40]"), [-3.0, -4.5, 30.0, 40.0]),
        (answer('{"bbox_2d": [1,2,3,4]}'), [1.0, 2.0, 3.0, 4.0]),
        (answer('[{"bbox_2d": [1, 2, 3, 4], "label": "dog"}]'), [1.0, 2.0, 3.0, 4.0]),
        (answer("[1, 2, 3, 4]") + "<answer>[5, 6, 7, 8]</answer>", [1.0, 2.0, 3.0, 4.0]),
        ("[1, 2, 3, 4]", None),  # no answer tag
        ("[1, 2, 3, 4] " + answer("[5, 6, 7, 8]"), [5.0, 6.0, 7.0, 8.0]),  # before the answer
        (answer("no box") + " [1, 2, 3, 4]", None),  # after the answer
        (answer("[1, 2, 3]"), None), (answer("[a, b, c, d]"), None),
    ],
)
def test_parse_box(text, expected):
    assert answers.parse_box(text) == expected


@pytest.mark.parametrize(
    "a,b,expected",
    [
        ([0, 0, 10, 10], [0, 0, 10, 10], 1.0),
        ([0, 0, 10, 10], [20, 20, 30, 30], 0.0),
        ([0, 0, 10, 10], [10, 0, 20, 10], 0.0),  # touching edges
        ([0, 0, 10, 10], [5, 0, 15, 10], 50 / 150),  # half overlap: 50 / (100 + 100 - 50)
        ([0, 0, 10, 10], [2, 2, 7, 7], 25 / 100),  # containment: small area / big area
        ([0, 0, 10, 10], [5, 5, 5, 8], 0.0),  # zero width
        ([10, 10, 0, 0], [0, 0, 10, 10], 0.0),  # inverted: area 0, no intersection
        ([3, 3, 3, 3], [3, 3, 3, 3], 0.0),  # union 0
    ],
)
def test_box_iou(a, b, expected):
    assert grounding.box_iou(a, b) == pytest.approx(expected)


@pytest.mark.parametrize(
    "completion,expected",
    [
        (answer("[0, 0, 10, 10]"), 1.0),
        (answer("[0.0, 0.0, 5.0, 10.0]"), 0.5),  # floats score (VLM-R1's integer regex: 0)
        (answer("the dog on the left"), 0.0),
        ("[0, 0, 10, 10]", 0.0),  # no answer tag
    ],
)
def test_iou_reward(completion, expected):
    assert rewards.iou_reward(completion, {"box": [0, 0, 10, 10]}) == pytest.approx(expected)


DOG = {"bbox_2d": [1.0, 2.0, 3.0, 4.0], "label": "dog"}


@pytest.mark.parametrize(
    "text,expected",
    [
        (answer('```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "dog"}]\n```'), [DOG]),
        (answer('```\n[{"bbox_2d": [1, 2, 3, 4], "label": "dog"}]```'), [DOG]),
        (answer(' [{"bbox_2d": [1, 2, 3, 4], "label": "dog", "score": 0.9}] '), [DOG]),
        (answer("[]"), []), (answer(" None "), []), (answer("none"), []),
        (answer('[{"bbox_2d": [1, 2, 3, 4], "label": "dog"},]'), None),  # not JSON
        (answer('[{"bbox_2d": [1, 2, 3, 4]}]'), None),  # no label
        (answer('[{"label": "dog"}]'), None),  # no box
        (answer('[{"bbox_2d": [1, 2, 3], "label": "dog"}]'), None),
        (answer('[{"bbox_2d": [1, 2, 3, "4"], "label": "dog"}]'), None),
        (answer('[{"bbox_2d": [1, 2, 3, true], "label": "dog"}]'), None),
        (answer('[{"bbox_2d": [1, 2, 3, NaN], "label": "dog"}]'), None),
        (answer('[{"bbox_2d": [1, 2, 3, 4], "label": 7}]'), None),
        (answer('{"bbox_2d": [1, 2, 3, 4], "label": "dog"}'), None),  # not a list
        (answer("[[1, 2, 3, 4]]"), None),
        ('[{"bbox_2d": [1, 2, 3, 4], "label": "dog"}]', None),  # no answer tag
        (answer("[]") + answer('[{"bbox_2d": [1, 2, 3, 4], "label": "dog"}]'), []),  # FIRST
    ],
)
def test_parse_detections(text, expected):
    assert answers.parse_detections(text) == expected


def boxes(*pairs):
    return [{"bbox_2d": list(box), "label": label} for box, label in pairs]


def detection_answer(detections):
    return answer(json.dumps(detections))


A, B = (0, 0, 100, 100), (200, 200, 300, 300)


@pytest.mark.parametrize(
    "predictions,gold,expected",
    [
        (boxes((A, "dog")), boxes((A, "dog")), 1.0),
        # Two dogs, one found exactly: at every IoU threshold precision 1 up to recall 0.5, then
        # nothing. COCO samples precision at the 101 recalls 0, .01, ..., 1: the 51 up to 0.5
        # read 1, the other 50 read 0 (no detection reaches them), so AP = 51 / 101.
        (boxes((A, "dog")), boxes((A, "dog"), (B, "dog")), 51 / 101),
        # Exact, plus a box of a label not in the gold: AP 1, times min(1, 1 / 2).
        (boxes((A, "dog"), (B, "cat")), boxes((A, "dog")), 0.5),
        # IoU 6200 / 10000 = 0.62 passes the thresholds .50, .55, .60 of the ten .50:.05:.95,
        # each with AP 1; the other seven score 0.
        (boxes(((0, 0, 100, 62), "dog")), boxes((A, "dog")), 0.3),
        # An inverted box written first is a false positive (COCOeval alone would ignore its
        # negative area): precision 1/2 at recall 1, AP 0.5, times min(1, 1 / 2).
        (boxes(((100, 100, 0, 0), "dog"), (A, "dog")), boxes((A, "dog")), 0.25),
        # A wrong label on the right box is no match at all.
        (boxes((A, "cat")), boxes((A, "dog")), 0.0),
        # One of two dogs found, written after a miss: precision 1/2 at recall 0.5, so the 51
        # recall points up to 0.5 read 1/2 and the rest 0. AP = 0.5 * 51 / 101, times 2 / 2.
        (boxes((B, "dog"), (A, "dog")), boxes((A, "dog"), ((400, 400, 500, 500), "dog")),
         0.5 * 51 / 101),
        ([], [], 1.0),
        (boxes((A, "dog")), [], 0.0),
        ([], boxes((A, "dog")), 0.0),
    ],
)
def test_detection_reward_by_hand(predictions, gold, expected):
    reward = rewards.detection_reward(detection_answer(predictions), {"boxes": gold})
    assert reward == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "completion,gold,expected",
    [
        (answer("None"), [], 1.0), (answer("None"), boxes((A, "dog")), 0.0),
        (answer("[{bbox_2d: [0, 0, 100, 100]}]"), boxes((A, "dog")), 0.0),  # unparsable
        (answer("[{bbox_2d: [0, 0, 100, 100]}]"), [], 0.0),  # unparsable, even with no gold
        ("no answer at all", [], 0.0),
    ],
)
def test_detection_reward_text_answers(completion, gold, expected):
    assert rewards.detection_reward(completion, {"boxes": gold}) == expected


@pytest.mark.parametrize(
    "completion,expected",
    [
        (detection_answer(boxes((A, "dog"), (B, "cat"))), 2), (answer("None"), 0),
        (answer("[]"), 0), (answer("[1, 2, 3, 4]"), 1), (answer('{"bbox_2d": [1, 2, 3, 4]}'), 1),
        (answer("nothing here"), 0), ("no tags", 0),
    ],
)
def test_count_boxes(completion, expected):
    assert answers.count_boxes(completion) == expected


def random_scene(rng):
    """Gold boxes, and predictions: jittered golds (some relabelled), misses and extras."""
    def random_box():
        x, y = rng.uniform(0, 400, size=2)
        w, h = rng.uniform(5, 200, size=2)
        return [round(float(v), 1) for v in (x, y, x + w, y + h)]

    gold = boxes(*((random_box(), str(rng.choice(["dog", "cat", "car"])))
                   for _ in range(rng.integers(1, 6))))
    predictions = []
    for g in gold:
        if rng.random() < 0.8:
            jitter = rng.normal(0, 8, size=4)
            x1, y1, x2, y2 = (round(float(v + j), 1) for v, j in zip(g["bbox_2d"], jitter))
            box = [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]  # inverted: by-hand case
            label = g["label"] if rng.random() < 0.85 else str(rng.choice(["dog", "bird"]))
            predictions.append({"bbox_2d": box, "label": label})
    predictions += boxes(*((random_box(), str(rng.choice(["dog", "cat", "car", "bird"])))
                           for _ in range(rng.integers(0, 3))))
    order = rng.permutation(len(predictions))
    return [predictions[i] for i in order], gold


def reference_ap(predictions, golds, tmp_path):
    """COCO AP the other way round: the gold as a json file, the predictions through loadRes."""
    labels = sorted({g["label"] for gold in golds for g in gold})
    category = {label: k for k, label in enumerate(labels, 1)}

    def xywh(box):
        return [box[0], box[1], box[2] - box[0], box[3] - box[1]]

    annotations = []
    for i, gold in enumerate(golds, 1):
        for g in gold:
            x, y, w, h = xywh(g["bbox_2d"])
            annotations.append({"id": len(annotations) + 1, "image_id": i, "bbox": [x, y, w, h],
                                "category_id": category[g["label"]], "area": w * h, "iscrowd": 0})
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": [{"id": i} for i in range(1, len(golds) + 1)],
                                "annotations": annotations,
                                "categories": [{"id": k, "name": n} for n, k in category.items()]}))
    results = [{"image_id": i, "category_id": category[p["label"]], "bbox": xywh(p["bbox_2d"]),
                "score": 1.0}
               for i, prediction in enumerate(predictions, 1) for p in prediction
               if p["label"] in category]
    if not results:
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(path))
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return max(0.0, float(evaluator.stats[0]))


def test_detection_reward_matches_pycocotools_used_another_way(tmp_path):
    rng = np.random.default_rng(0)
    scenes = [random_scene(rng) for _ in range(20)]
    for predictions, gold in scenes:
        expected = (reference_ap([predictions], [gold], tmp_path)
                    * min(1.0, len(gold) / len(predictions)) if predictions else 0.0)
        reward = rewards.detection_reward(detection_answer(predictions), {"boxes": gold})
        assert reward == pytest.approx(expected, abs=1e-9)
    assert len({round(rewards.detection_reward(detection_answer(p), {"boxes": g}), 6)
                for p, g in scenes}) > 5  # the scenes are not all alike
    # The dataset-level mAP that evaluation reports: every scene an image of one evaluation.
    predictions, golds = zip(*scenes)
    assert grounding.coco_ap(predictions, golds) == pytest.approx(
        reference_ap(predictions, golds, tmp_path), abs=1e-9)


def test_coco_ap_undefined_or_empty_is_zero():
    assert grounding.coco_ap([boxes((A, "dog"))], [[]]) == 0.0  # no gold box: AP undefined
    assert grounding.coco_ap([boxes((A, "cat"))], [boxes((A, "dog"))]) == 0.0  # nothing scored
    assert grounding.coco_ap([[], boxes((A, "dog"))], [boxes((A, "dog")), []]) == 0.0


def test_grounding_rewards_are_registered_and_scored():
    funcs, weights = rewards.load_rewards(["iou", "detection"])
    examples = [{"box": list(A), "boxes": boxes((A, "dog"))}] * 3
    completions = [answer("[0, 0, 100, 100]"), detection_answer(boxes((A, "dog"))), "no answer"]
    total, parts, errors = rewards.score_completions(completions, examples, funcs, weights)
    # A bare box is no detection list; a one-box list also carries the box parse_box reads.
    assert parts["iou"] == [1.0, 1.0, 0.0] and errors == {"iou": 0, "detection": 0}
    # pycocotools divides by tp + fp + eps, so a perfect AP is 1 - 2e-16.
    assert parts["detection"] == pytest.approx([0.0, 1.0, 0.0])
    assert total == pytest.approx([1.0, 2.0, 0.0])


def test_a_reward_that_edits_its_example_changes_no_other_rewards_gold(tmp_path):
    """The G completions of a prompt share its example: a reward that edits it (its nested
    lists too) would change what the rewards after it, and the next completions, score
    against, and the gold logged in samples.jsonl."""
    path = tmp_path / "vandal.py"
    path.write_text("def vandal(completion, example):\n"
                    "    example['answer'] = 'right'\n"
                    "    example['choices'].append('up')\n"
                    "    example['box'][0] = 99.0\n"
                    "    example['boxes'][0]['label'] = 'dog'\n"
                    "    return 0.0\n")
    funcs, weights = rewards.load_rewards([f"{path}:vandal", "accuracy", "iou", "detection"])
    example = {**EX, "box": [0.0, 0.0, 10.0, 10.0],
               "boxes": [{"bbox_2d": [0.0, 0.0, 10.0, 10.0], "label": "cat"}]}
    before = json.dumps(example)
    texts = ["<answer>left</answer>", "<answer>[0, 0, 10, 10]</answer>",
             '<answer>[{"bbox_2d": [0, 0, 10, 10], "label": "cat"}]</answer>']
    _, parts, errors = rewards.score_completions(texts, [example] * 3, funcs, weights)
    assert json.dumps(example) == before and sum(errors.values()) == 0
    assert parts["accuracy"] == [1.0, 0.0, 0.0]
    assert parts["iou"] == [0.0, 1.0, 1.0]
    assert parts["detection"] == pytest.approx([0.0, 0.0, 1.0])


class Escape(BaseException):
    pass


@pytest.mark.parametrize("error", [SystemExit(0), SystemExit(3), Escape("out"), GeneratorExit()])
def test_any_exception_a_reward_raises_is_its_error(error):
    """sys.exit() in a reward ended the run at step 1 with status 0: whatever a reward raises
    scores 0 and is counted; only Ctrl-C stops the run."""
    def leaving(completion, example):
        raise error

    seen = []
    total, parts, errors = rewards.score_completions(
        ["<answer>left</answer>"] * 2, [EX] * 2, {"leaving": leaving, "accuracy":
                                                  rewards.accuracy_reward},
        {"leaving": 1.0, "accuracy": 1.0}, lambda name, e: seen.append((name, e)))
    assert total == [1.0, 1.0] and errors == {"leaving": 2, "accuracy": 0}
    assert seen == [("leaving", error)] * 2


def test_ctrl_c_in_a_reward_stops_the_run():
    def interrupted(completion, example):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rewards.score_completions(["x"], [EX], {"i": interrupted}, {"i": 1.0})


@pytest.mark.parametrize(
    "source",
    [
        "def wrong(completion):\n    return 1.0\n",
        "def wrong(completion, example, prompt):\n    return 1.0\n",
        "def wrong(*, completion, example):\n    return 1.0\n",
        "def wrong():\n    return 1.0\n",
        "class Wrong:\n    def __call__(self, completions):\n        return 1.0\nwrong = Wrong()\n",
    ],
)
def test_a_reward_of_the_wrong_signature_is_refused_when_loaded(tmp_path, source):
    path = tmp_path / "mine.py"
    path.write_text(source)
    with pytest.raises(ValueError) as info:
        rewards.load_rewards(["format", f"{path}:wrong"])
    assert str(info.value).startswith(f"--reward_funcs '{path}:wrong': ")
    assert "(completion, example) -> float" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "source",
    [
        "def right(completion, example):\n    return 1.0\n",
        "def right(c, e, scale=1.0):\n    return scale\n",
        "def right(*args, **kwargs):\n    return 1.0\n",
        "right = lambda completion, example: 1.0\n",
        "import functools\ndef f(completion, example, k):\n    return k\n"
        "right = functools.partial(f, k=1.0)\n",
        "class Right:\n    def __call__(self, completion, example):\n        return 1.0\n"
        "right = Right()\n",
    ],
)
def test_a_reward_of_a_fitting_signature_is_loaded(tmp_path, source):
    path = tmp_path / "mine.py"
    path.write_text(source)
    funcs, _ = rewards.load_rewards([f"{path}:right"])
    assert funcs["right"]("x", EX) == 1.0


def test_a_reward_that_raises_on_every_completion_of_the_first_step_stops_the_run():
    """A reward that always raises (a field the rows lack) would train on zeros for hours."""
    def needs_solution(completion, example):
        return float(example["solution"] == completion)

    def sometimes(completion, example):
        if completion == "a":
            raise ValueError("not a")
        return 1.0

    reported = []
    on_error = metrics.FirstErrors(lambda name, e: reported.append(name))
    funcs = {"needs_solution": needs_solution, "sometimes": sometimes}
    _, _, errors = rewards.score_completions(["a", "b", "a"], [EX] * 3, funcs,
                                             dict.fromkeys(funcs, 1.0), on_error)
    assert reported == ["needs_solution", "sometimes", "needs_solution", "needs_solution",
                        "sometimes"]
    with pytest.raises(ValueError) as info:
        on_error.check_first_step(errors, 3)
    assert str(info.value) == ("reward 'needs_solution' raised on all 3 completions of the first "
                               "step, so it would only ever score 0; its first error: "
                               "KeyError: 'solution'")
    on_error.check_first_step({"needs_solution": 2, "sometimes": 2}, 3)  # some scored: go on


@pytest.mark.parametrize(
    "response,choices,expected",
    [
        ("I would say a+b* here", ["a+b*", "a-b"], 0),
        ("it is (x), clearly", ["(y)", "(x)"], 1),
        ("written in C++ mostly", ["C", "C++"], 1),
        ("written in C mostly", ["C++", "C"], 1),
        ("the answer is C#.", ["C", "C#"], 1),
        ("3.5 apples", ["3", "3.5"], 1),  # both start there: the longer is what it says
        ("-2 degrees", ["2", "-2"], 1),
        ("it is left.", ["left", "right"], 0),  # the plain cases as before
        ("leftover food", ["left", "right"], None),  # an option inside a word is not named
        ("the rightmost one is left", ["right", "left"], 1),
        ("blue and red", ["red", "blue"], 1),  # the first found
        ("a+b*c", ["a+b*", "q"], None),  # a+b* followed by a letter: not that option
        ("xa+b*", ["a+b*", "q"], None),
        ("it is, q", ["...", "q"], 1),  # an option with no text is found nowhere
    ],
)
def test_lenient_parser_finds_options_that_start_or_end_with_punctuation(response, choices,
                                                                        expected):
    assert answers.parse_choice(response, choices, lettered=False, lenient=True) == expected


@pytest.mark.parametrize("statement", ["import sys\nsys.exit(0)", "raise SystemExit(3)",
                                       "raise BaseException('odd')"])
def test_a_reward_file_that_exits_when_imported_is_one_line(tmp_path, statement):
    """Found probing item 2 once more: sys.exit() at a reward file's top level ended the
    command with status 0 and no word, before any check."""
    path = tmp_path / "mine.py"
    path.write_text(f"{statement}\n\n\ndef mine(completion, example):\n    return 1.0\n")
    with pytest.raises(ValueError, match=rf"--reward_funcs '{path}:mine': {path}:\d+: \w+"):
        rewards.load_rewards([f"{path}:mine"])


@pytest.mark.parametrize("gold", [" left", "left ", "\tleft\n"])
def test_a_gold_answer_with_spaces_around_it_can_score(gold):
    """Found probing item 5 once more: the answer read is stripped, so a gold with a space
    around it never scored; R1-V strips the gold too."""
    assert rewards.accuracy_reward("</think><answer> left </answer>", {**EX, "answer": gold}) == 1


def test_a_reward_file_imports_a_helper_beside_it(tmp_path):
    """Found probing the rewards: `from my_utils import tagged` in a reward file failed with
    ModuleNotFoundError though my_utils.py sat beside it (and so did an import in the body)."""
    (tmp_path / "my_utils_probe.py").write_text("def tagged(text):\n    return 0.5\n")
    (tmp_path / "mine.py").write_text(
        "from my_utils_probe import tagged\n\n\ndef mine(completion, example):\n"
        "    import my_utils_probe\n    return tagged(completion) + my_utils_probe.tagged('')\n")
    funcs, _ = rewards.load_rewards([f"{tmp_path / 'mine.py'}:mine"])
    assert funcs["mine"]("x", EX) == 1.0


def test_a_reward_file_may_define_a_dataclass_and_be_named_like_a_module(tmp_path):
    """Found probing the rewards: a reward file with a dataclass (postponed annotations) failed
    to import ("NoneType has no attribute __dict__", at a line of dataclasses.py given as the
    file's); one named random.py must not replace the module random for the rest of the run,
    nor a.py in one folder the a.py of another."""
    source = ("from __future__ import annotations\nimport dataclasses\nimport pickle\n\n\n"
              "@dataclasses.dataclass\nclass Bonus:\n    value: float = {}\n\n\n"
              "def mine(completion, example):\n"
              "    return len(pickle.dumps(mine)) and Bonus().value\n")
    for folder, value in (("a", 1.0), ("b", 2.0)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "random.py").write_text(source.format(value))
    one = rewards.load_reward(f"{tmp_path / 'a' / 'random.py'}:mine")
    two = rewards.load_reward(f"{tmp_path / 'b' / 'random.py'}:mine")
    assert one[1]("x", EX) == 1.0 and two[1]("x", EX) == 2.0
    import random
    assert callable(random.random)


@pytest.mark.parametrize("source,line", [("import json\n\njson.loads('{')\n", 3),
                                         ("x = 1\ndef f(:\n", 2),
                                         ("import ast\n\nast.parse('(')\n", 3)])
def test_a_reward_file_that_breaks_on_import_names_its_own_line(tmp_path, source, line):
    path = tmp_path / "mine.py"
    path.write_text(source)
    with pytest.raises(ValueError, match=rf"'{path}:mine': {path}:{line}: "):
        rewards.load_rewards([f"{path}:mine"])


def test_a_reward_that_returns_text_is_an_error_not_a_score():
    """Found probing the rewards: a reward returning the answer's text ("3", "1.0") scored
    float() of it, silently: a text is counted as the error it is."""
    funcs = {"text": lambda completion, example: "3", "number": lambda c, e: np.float32(0.5)}
    total, parts, errors = rewards.score_completions(["a"], [EX], funcs,
                                                     {"text": 1.0, "number": 1.0})
    assert parts == {"text": [0.0], "number": [0.5]} and errors == {"text": 1, "number": 0}


@pytest.mark.parametrize("name", ["mine.txt", "mine", "mine.ipynb"])
def test_a_reward_file_that_is_not_python_is_one_line(tmp_path, name):
    """Found probing the rewards: a reward in mine.ipynb (or .txt, or no suffix) ended in
    "'NoneType' object has no attribute 'loader'", a traceback."""
    path = tmp_path / name
    path.write_text("def mine(completion, example):\n    return 1.0\n")
    with pytest.raises(ValueError, match=rf"'{path}:mine': '{path}' is not a Python file"):
        rewards.load_rewards([f"{path}:mine"])


def test_the_step_line_tells_the_length_reward_from_the_length():
    """Found probing the rewards: with the registry's `length` reward the terminal read
    `length=0.005 ... length=5`, its mean and the completions' length under one name."""
    line = metrics.short_line({"step": 1, "reward": 1.0, "rewards/format/mean": 1.0,
                               "rewards/length/mean": 0.005, "rewards/reward/mean": 0.5,
                               "completions/mean_length": 5.0})
    assert line == "step 1: reward=1 format=1 rewards/length=0.005 rewards/reward=0.5 length=5"
