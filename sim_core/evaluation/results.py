"""COCO results files: loading, checking, normalising, and mask -> RLE.

Why check before evaluating: pycocotools fails on bad results with bare
``KeyError``/``AssertionError`` (or, for a malformed RLE string, reads out of
bounds) and says nothing about which record is wrong. Results come from our
own detector and from upstream code bases (AdelaiDet, mmdetection,
BoxLevelSet), so every record is checked against the ground truth first and
each problem raises :class:`InputError` naming the file, the record index
with its image id, and the problem.

Accepted segmentation encodings (all are what the upstream tools write):
compressed RLE with ``counts`` as ``str``, as ``bytes`` (in-memory results),
as the text ``"b'...'"`` that ``json.dump(..., default=str)`` leaves for a
bytes object, and uncompressed RLE (``counts`` a list of run lengths).
:func:`normalise_results` turns all of them into compressed ``str`` counts.
Polygons are rejected: no detector writes them and pycocotools cannot score
them as results.
"""
from __future__ import annotations

import ast
import json
import math
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from pycocotools import mask as mask_utils

from sim_core.errors import InputError

IOU_TYPES = ("segm", "bbox")
REQUIRED_KEYS = {
    "segm": ("image_id", "category_id", "score", "segmentation"),
    "bbox": ("image_id", "category_id", "score", "bbox"),
}
# Compressed COCO RLE uses the characters chr(48) .. chr(111) only.
_RLE_TEXT = re.compile(r"[0-o]*")
_BYTES_REPR = re.compile(r"^b(['\"]).*\1$", re.DOTALL)


def load_json(path: str | Path, what: str) -> Any:
    """Read a JSON file; a missing or unparsable file is an :class:`InputError`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, f"{what} file not found")
    try:
        with path.open("r", encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(path, f"{what} is not valid JSON ({exc})") from None


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


def counts_text(counts: Any) -> Any:
    """Return compressed counts as ``str`` (bytes and ``"b'...'"`` text decoded); lists pass through."""
    if isinstance(counts, (bytes, bytearray)):
        return bytes(counts).decode("ascii")
    if isinstance(counts, str) and _BYTES_REPR.match(counts):
        value = ast.literal_eval(counts)
        if isinstance(value, bytes):
            return value.decode("ascii")
    return counts


def gt_index(gt: dict, where: str | Path = "ground truth") -> tuple[dict[int, tuple[int, int]], set[int]]:
    """Image sizes ``{image_id: (h, w)}`` and the category id set of a COCO ground truth."""
    if not isinstance(gt, dict) or not isinstance(gt.get("images"), list) or not isinstance(gt.get("categories"), list):
        raise InputError(where, "ground truth must be a COCO dict with 'images' and 'categories' lists")
    sizes: dict[int, tuple[int, int]] = {}
    for i, img in enumerate(gt["images"]):
        try:
            sizes[int(img["id"])] = (int(img["height"]), int(img["width"]))
        except (KeyError, TypeError, ValueError):
            raise InputError(where, "image needs integer 'id', 'height' and 'width'", record=f"images[{i}]") from None
    cats = set()
    for i, cat in enumerate(gt["categories"]):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")):
            raise InputError(where, "category needs an integer 'id'", record=f"categories[{i}]")
        cats.add(int(cat["id"]))
    return sizes, cats


def check_gt_for_eval(gt: dict, where: str | Path, iou_types: Iterable[str]) -> None:
    """Check the annotation fields COCOeval reads, so it cannot fail half-way with a KeyError.

    ``iscrowd`` and ``area`` may be missing: :func:`fill_gt_defaults` supplies
    them as the dataset loader does (0, and the mask's pixel area).
    """
    sizes, cats = gt_index(gt, where)
    anns = gt.get("annotations")
    if not isinstance(anns, list):
        raise InputError(where, "ground truth has no 'annotations' list")
    keys = ["id", "image_id", "category_id", "bbox"]
    if "segm" in iou_types or any(isinstance(a, dict) and "area" not in a for a in anns):
        keys.append("segmentation")
    for i, ann in enumerate(anns):
        if not isinstance(ann, dict):
            raise InputError(where, "annotation is not an object", record=f"annotations[{i}]")
        record = f"annotations[{i}] (id {ann.get('id')})"
        missing = [k for k in keys if k not in ann]
        if missing:
            raise InputError(where, f"annotation lacks {', '.join(missing)} (needed by COCO evaluation)", record=record)
        if ann["image_id"] not in sizes:
            raise InputError(where, f"image_id {ann['image_id']} is not in 'images'", record=record)
        if ann["category_id"] not in cats:
            raise InputError(where, f"category_id {ann['category_id']} is not in 'categories'", record=record)
        _check_bbox(where, record, ann["bbox"])


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


def check_results(results: Any, gt: dict, path: str | Path, iou_type: str | None = None) -> None:
    """Validate a COCO results list against the ground truth ``gt``.

    ``iou_type`` "segm" or "bbox" requires that type's keys in every record;
    ``None`` requires the common keys plus at least one of ``segmentation`` /
    ``bbox``. A ``bbox`` or ``segmentation`` that is present is always checked.
    Compressed RLE strings are checked for their alphabet, not decoded: decoding
    every mask of a COCO-size file would cost more than the evaluation itself.
    Raises :class:`InputError`.
    """
    if iou_type is not None and iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES} or None, got {iou_type!r}")
    if not isinstance(results, list):
        kind = "an object (is this a ground-truth file?)" if isinstance(results, dict) else type(results).__name__
        raise InputError(path, f"results must be a JSON list of detection records, got {kind}")
    sizes, cats = gt_index(gt)
    required = REQUIRED_KEYS[iou_type] if iou_type else ("image_id", "category_id", "score")
    for i, rec in enumerate(results):
        if not isinstance(rec, dict):
            raise InputError(path, f"record is a {type(rec).__name__}, not an object", record=f"record {i}")
        record = f"record {i} (image_id {rec.get('image_id')})"
        missing = [k for k in required if k not in rec]
        if missing:
            needed = f" (needed for {iou_type} evaluation)" if iou_type else ""
            raise InputError(path, f"missing key(s) {', '.join(missing)}{needed}", record=record)
        if iou_type is None and "segmentation" not in rec and "bbox" not in rec:
            raise InputError(path, "record has neither 'segmentation' nor 'bbox'", record=record)
        image_id = rec["image_id"]
        if not _is_int(image_id) or int(image_id) not in sizes:
            raise InputError(path, f"image_id {image_id!r} is not an image of the ground truth", record=record)
        if not _is_int(rec["category_id"]) or int(rec["category_id"]) not in cats:
            raise InputError(path, f"category_id {rec['category_id']!r} is not a category of the ground truth",
                             record=record)
        if not _is_finite_number(rec["score"]):
            raise InputError(path, f"score {rec['score']!r} is not a finite number", record=record)
        if "bbox" in rec:
            _check_bbox(path, record, rec["bbox"])
        if "segmentation" in rec:
            _check_rle(path, record, rec["segmentation"], sizes[int(image_id)])


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


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    return (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
            and math.isfinite(float(value)))


def _check_bbox(path: str | Path, record: str, bbox: Any) -> None:
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise InputError(path, f"bbox must be a list of 4 numbers [x, y, w, h], got {bbox!r}", record=record)
    if not all(_is_finite_number(v) for v in bbox):
        raise InputError(path, f"bbox {bbox!r} has a non-finite or non-numeric value", record=record)
    if bbox[2] < 0 or bbox[3] < 0:
        raise InputError(path, f"bbox {bbox!r} has negative width or height (expected [x, y, w, h])",
                         record=record)


def _check_rle(path: str | Path, record: str, segm: Any, image_hw: tuple[int, int]) -> None:
    if isinstance(segm, list):
        raise InputError(path, "segmentation is a polygon list; results must be RLE {'size', 'counts'}",
                         record=record)
    if not isinstance(segm, dict) or "size" not in segm or "counts" not in segm:
        raise InputError(path, "segmentation must be an RLE object with 'size' and 'counts'", record=record)
    size = segm["size"]
    if (not isinstance(size, (list, tuple)) or len(size) != 2 or not all(_is_int(v) for v in size)
            or (int(size[0]), int(size[1])) != tuple(image_hw)):
        raise InputError(path, f"segmentation size {size!r} differs from the image's [height, width] "
                               f"{list(image_hw)}", record=record)
    counts = segm["counts"]
    try:
        counts = counts_text(counts)
    except (ValueError, SyntaxError, UnicodeDecodeError):
        raise InputError(path, "segmentation counts look like bytes text but cannot be decoded", record=record) from None
    if isinstance(counts, str):
        if not counts or not _RLE_TEXT.fullmatch(counts):
            raise InputError(path, "segmentation counts is not a compressed COCO RLE string", record=record)
    elif isinstance(counts, list):
        if not all(_is_int(c) and c >= 0 for c in counts):
            raise InputError(path, "uncompressed RLE counts must be non-negative integers", record=record)
        if sum(int(c) for c in counts) != image_hw[0] * image_hw[1]:
            raise InputError(path, f"uncompressed RLE counts sum to {sum(int(c) for c in counts)}, "
                                   f"expected height*width = {image_hw[0] * image_hw[1]}", record=record)
    else:
        raise InputError(path, f"segmentation counts must be a string or a list, got {type(counts).__name__}",
                         record=record)
