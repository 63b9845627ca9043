"""How much mask AP a prediction grid of a given stride can reach at best.

A mask predicted on a stride-``s`` grid and bilinearly upsampled cannot draw
details finer than a cell. The *grid ceiling* at stride ``s`` is the mask AP of
an oracle that knows every ground-truth mask exactly but must pass it through
that grid: average-pool the mask over ``s x s`` cells, upsample bilinearly to
full size, threshold at 0.5, and score it as a detection with confidence 1.

It answers a design question with a number: on the 128-pixel demo images a
stride-8 mask grid (CondInst's mask-branch stride) caps mask AP far below 100,
which would make the demo measure the grid rather than the supervision
methods; see ``sim_core/model/mask_head.py`` (``mask_feat_stride``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from sim_core.evaluation.coco_eval import make_gt_api, evaluate_coco
from sim_core.evaluation.results import load_json

__all__ = ["grid_limited_mask", "grid_ceiling"]


def grid_limited_mask(mask: np.ndarray, stride: int) -> np.ndarray:
    """``mask`` [h, w] seen through a stride-``stride`` grid: cell means, bilinear upsampling, >= 0.5."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if stride == 1:
        return mask.astype(bool)
    h, w = mask.shape
    x = torch.from_numpy(mask.astype(np.float32))[None, None]
    pad_h, pad_w = (-h) % stride, (-w) % stride  # pad like the detector does (bottom/right)
    cells = F.avg_pool2d(F.pad(x, (0, pad_w, 0, pad_h)), stride)
    up = F.interpolate(cells, scale_factor=stride, mode="bilinear", align_corners=False)
    return (up[0, 0, :h, :w] >= 0.5).numpy()


def grid_ceiling(gt_json: str | Path, strides: Iterable[int] = (8, 4)) -> dict[int, float]:
    """Mask AP (fraction) of the grid-limited oracle for each stride, on the non-crowd GT of ``gt_json``
    (``{}``, with one printed line, when instances have no mask: box-only data)."""
    gt = load_json(gt_json, "ground truth")
    missing = sum(1 for ann in gt["annotations"] if not ann.get("iscrowd", 0) and not ann.get("segmentation"))
    if missing:  # box-only data: no mask to limit to a grid
        print(f"mask-grid ceiling off: {missing} instances in {gt_json} have no mask", flush=True)
        return {}
    coco = make_gt_api(gt, "pycocotools")
    objects = [(ann, coco.annToMask(ann)) for ann in gt["annotations"] if not ann.get("iscrowd", 0)]
    out = {}
    for stride in strides:
        results = []
        for ann, full_mask in objects:
            mask = grid_limited_mask(full_mask, stride)
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            results.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                            "segmentation": rle, "score": 1.0})
        out[int(stride)] = float(evaluate_coco(gt, {"segm": results}, iou_types=("segm",))["segm"]["AP"])
    return out
