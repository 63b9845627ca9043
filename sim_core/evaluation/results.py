"""COCO results files: normalising, mask -> RLE, and the gate's checks re-exported.

Every results and ground-truth file is checked by the project's one gate,
:mod:`sim_core.data.validate`, before pycocotools sees it (pycocotools fails
on bad results with bare ``KeyError``/``AssertionError``, hangs or reads out
of bounds on a malformed RLE string, and never says which record is wrong).
``load_json``, ``check_results``, ``counts_text`` and ``gt_index`` are the
gate's functions under the names the evaluation code has always used.

Accepted segmentation encodings (all are what the upstream tools write):
compressed RLE with ``counts`` as ``str``, as ``bytes`` (in-memory results),
as the text ``"b'...'"`` that ``json.dump(..., default=str)`` leaves for a
bytes object, and uncompressed RLE (``counts`` a list of run lengths).
:func:`normalise_results` turns all of them into compressed ``str`` counts.
Polygons are rejected: no detector writes them and pycocotools cannot score
them as results.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np
from pycocotools import mask as mask_utils

from sim_core.data.validate import IOU_TYPES, REQUIRED_KEYS, check_gt, check_results, counts_text
from sim_core.data.validate import read_json as load_json
from sim_core.errors import InputError

__all__ = ["IOU_TYPES", "REQUIRED_KEYS", "check_gt_for_eval", "check_results", "compress_rle", "counts_text",
           "encode_mask", "encode_masks", "fill_gt_defaults", "gt_index", "load_json", "mask_box",
           "normalise_results"]


def encode_mask(mask: np.ndarray) -> dict:
    """Encode a binary ``[H, W]`` mask as COCO compressed RLE with ``str`` counts."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"encode_mask expects a 2-D mask, got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def encode_masks(masks: np.ndarray) -> list[dict]:
    """Encode ``[K, H, W]`` binary masks in one pycocotools call (faster than K calls)."""
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"encode_masks expects [K, H, W], got shape {masks.shape}")
    if masks.shape[0] == 0:
        return []
    fortran = np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8))
    return [{"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode("ascii")}
            for r in mask_utils.encode(fortran)]


def gt_index(gt: dict, where: str | Path = "ground truth") -> tuple[dict[int, tuple[int, int]], set[int]]:
    """Image sizes ``{image_id: (h, w)}`` and the category ids of a COCO ground truth (checked by the gate)."""
    if not isinstance(gt, dict):
        raise InputError(where, "ground truth must be a COCO dict with 'images' and 'categories' lists")
    checked = check_gt({**gt, "annotations": []}, where)
    return checked.sizes, checked.category_ids


def check_gt_for_eval(gt: Any, where: str | Path, iou_types: Iterable[str]) -> dict:
    """The gate's evaluation view of ``gt``: checked, degenerate polygon parts dropped (a new dict).

    A segmentation is required when "segm" is evaluated or ``area`` is missing
    (:func:`fill_gt_defaults` computes it from the mask, as the loader does).
    """
    return check_gt(gt, where, purpose="evaluate", require_segmentation="segm" in tuple(iou_types)).to_dict()


def fill_gt_defaults(gt: dict) -> dict:
    """Fill a missing ``iscrowd`` (0) and ``area`` (mask pixels) in place; returns ``gt``."""
    sizes = {int(img["id"]): (int(img["height"]), int(img["width"])) for img in gt["images"]}
    for ann in gt["annotations"]:
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            h, w = sizes[int(ann["image_id"])]
            seg = ann["segmentation"]
            if isinstance(seg, list):
                rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
            else:
                rle = compress_rle(seg)
                rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
            ann["area"] = float(mask_utils.area(rle))
    return gt


def normalise_results(results: list[dict], iou_type: str) -> list[dict]:
    """Fresh records for pycocotools ``loadRes`` for one IoU type (input is not modified).

    For "segm" the ``bbox`` key is dropped: ``loadRes`` takes a result's area
    from its bbox when one is present, which would put masks into the wrong
    small/medium/large bin (detectron2 and mmdetection drop it for the same
    reason). Counts become compressed ``str``. Call :func:`check_results` first.
    """
    out = []
    for rec in results:
        new = {"image_id": int(rec["image_id"]), "category_id": int(rec["category_id"]),
               "score": float(rec["score"])}
        if iou_type == "segm":
            new["segmentation"] = compress_rle(rec["segmentation"])
        elif iou_type == "bbox":
            new["bbox"] = [float(v) for v in rec["bbox"]]
        else:
            raise ValueError(f"unknown iou_type {iou_type!r}")
        out.append(new)
    return out


def compress_rle(segm: dict) -> dict:
    """A checked RLE dict as compressed RLE with ``str`` counts."""
    h, w = int(segm["size"][0]), int(segm["size"][1])
    counts = counts_text(segm["counts"])
    if isinstance(counts, list):
        rle = mask_utils.frPyObjects({"size": [h, w], "counts": [int(c) for c in counts]}, h, w)
        counts = rle["counts"].decode("ascii")
    return {"size": [h, w], "counts": counts}


def mask_box(segm: dict) -> list[float]:
    """Tight ``[x, y, w, h]`` box of an RLE mask (zeros for an empty mask)."""
    rle = compress_rle(segm)
    box = mask_utils.toBbox({"size": rle["size"], "counts": rle["counts"].encode("ascii")})
    return [float(v) for v in box]
