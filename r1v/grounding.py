"""Grounding and detection (VLM-R1): the questions, boxes in the model's frame and back, box
checks, IoU and COCO AP (pycocotools)."""

import contextlib
import io

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# VLM-R1's grounding questions (REFERENCE.md section 9). Detection asks in their evaluation's
# words, with the answer format of their odLength task spelled out.
REC_QUESTION = ("Please provide the bounding box coordinate of the region this sentence "
                "describes: {phrase}. First output the thinking process in <think> </think> tags "
                "and then output the final answer in <answer> </answer> tags. Output the final "
                "answer in JSON format.")
OVD_QUESTION = ("Please carefully check the image and detect the following objects: {labels}. "
                "First output the thinking process in <think> </think> tags and then output the "
                "final answer in <answer> </answer> tags: a JSON list of "
                '{{"bbox_2d": [x1, y1, x2, y2], "label": "name"}}, or [] if there are none.')


def frame_size(frame, image_size):
    """(width, height) of the frame boxes are written in, for an image of `image_size` as the
    model sees it: Qwen2.5-VL's "pixels" of that image, Qwen2-VL's "norm1000"."""
    return tuple(image_size) if frame == "pixels" else (1000, 1000)


def scale_box(box, from_size, to_size):
    """[x1, y1, x2, y2] from a frame of `from_size` (width, height) to one of `to_size`."""
    sx, sy = to_size[0] / from_size[0], to_size[1] / from_size[1]
    return [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]


class OutsideImage(ValueError):
    """A box that does not lie inside its image."""


def _coordinate(v):
    """An int or float (true is no coordinate: type(), not isinstance), finite and in a float's
    range (abs() compares a huge int exactly, where math.isfinite() overflows)."""
    return type(v) in (int, float) and abs(v) < 1e300


def check_box(box, size, what="box"):
    """4 finite numbers x1 < x2, y1 < y2, inside an image of `size` (1 pixel of slack)."""
    if (not isinstance(box, (list, tuple)) or len(box) != 4
            or not all(_coordinate(v) for v in box)):
        raise ValueError(f"{what} must be [x1, y1, x2, y2], 4 numbers, got {box!r}")
    x1, y1, x2, y2 = box
    if not (x1 < x2 and y1 < y2):
        raise ValueError(f"{what} {list(box)} needs x1 < x2 and y1 < y2 (corners, not [x, y, w, "
                         "h])")
    if size and (min(x1, y1) < -1 or x2 > size[0] + 1 or y2 > size[1] + 1):
        raise OutsideImage(f"{what} {list(box)} lies outside the {size[0]}x{size[1]} image")


def box_iou(a, b):
    """Intersection over union of two [x1, y1, x2, y2] boxes; an inverted box has area 0."""
    def area(x1, y1, x2, y2):
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)
    inter = area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    union = area(*a) + area(*b) - inter
    return inter / union if union > 0 else 0.0


def coco_ap(predictions, golds):
    """COCO AP@[.50:.95] (pycocotools) over images i = 1..n: `predictions[i]` and `golds[i]` are
    lists of {"bbox_2d": [x1, y1, x2, y2], "label": str}. Every prediction has score 1.0; one
    whose label is in no gold is not scored. 0.0 where AP is undefined (no gold box)."""
    labels = sorted({g["label"] for boxes in golds for g in boxes})
    category = {label: k for k, label in enumerate(labels, 1)}

    def annotations(images, **extra):
        anns = []
        for image_id, boxes in enumerate(images, 1):
            for d in boxes:
                if d["label"] in category:
                    x1, y1, x2, y2 = map(float, d["bbox_2d"])
                    # An inverted box gets area 0, a false positive: with its negative area
                    # COCOeval would ignore it, a free pass for writing x2 < x1.
                    w, h = max(0.0, x2 - x1), max(0.0, y2 - y1)
                    anns.append({"id": len(anns) + 1, "image_id": image_id, "bbox": [x1, y1, w, h],
                                 "category_id": category[d["label"]], "area": w * h,
                                 "iscrowd": 0, **extra})
        return anns

    gt_anns, dt_anns = annotations(golds), annotations(predictions, score=1.0)
    if not gt_anns or not dt_anns:  # AP undefined, or 0: no call into pycocotools
        return 0.0
    coco_gt, coco_dt = COCO(), COCO()
    coco_gt.dataset = {"images": [{"id": i} for i in range(1, len(golds) + 1)],
                       "categories": [{"id": k, "name": n} for n, k in category.items()],
                       "annotations": gt_anns}
    coco_dt.dataset = {**coco_gt.dataset, "annotations": dt_anns}
    # Equal scores keep the order written: cocoeval.py sorts with np.argsort(-scores,
    # kind="mergesort"), which is stable (per image, then across images: image 1 first).
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco_gt.createIndex()
        coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    ap = float(evaluator.stats[0])
    return ap if ap >= 0 else 0.0  # -1 is COCOeval's "undefined"
