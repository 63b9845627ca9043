"""Detector predictions -> COCO results records, in original image pixels.

The bridge between ``CondInst.predict()`` and the evaluator. ``predict``
answers in the coordinates of the images it was given (resized for
inference, not padded); COCO scores in the coordinates of the image files.
So boxes are scaled by ``orig / input`` per axis and the mask probabilities
are resized bilinearly to the original size *before* thresholding, as
detectron2 and AdelaiDet do: thresholding first and resizing a binary mask
would give blocky, shifted outlines and lower mask AP at high IoU.

Masks may be given at the padded batch size; the part beyond the image's
input size is padding and is cut off before resizing.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sim_core.errors import InputError
from sim_core.evaluation.results import encode_masks

# Masks are resized a few at a time: K=100 masks at 800x1333 in float32 would be 430 MB.
_MASK_CHUNK = 16


def predictions_to_coco(
    preds: Sequence[dict[str, Any]],
    image_ids: Sequence[int],
    orig_sizes: Sequence[tuple[int, int]],
    input_sizes: Sequence[tuple[int, int]],
    label_to_cat_id: dict[int, int],
    mask_thresh: float = 0.5,
) -> tuple[list[dict], list[dict]]:
    """Convert per-image predictions to ``(segm_results, bbox_results)``.

    Each prediction dict holds ``boxes [K, 4]`` xyxy in input-image pixels,
    ``scores [K]``, ``labels [K]`` contiguous ``0..C-1`` and ``masks
    [K, h, w]`` foreground probabilities with ``h >= h_in, w >= w_in``
    (optional: without ``masks`` only bbox results are produced). Segm records
    carry the detector's box too, as detectron2 writes them; the evaluator
    ignores it for mask AP.
    """
    n = len(preds)
    if not (len(image_ids) == len(orig_sizes) == len(input_sizes) == n):
        raise ValueError(f"got {n} predictions but {len(image_ids)} image ids, {len(orig_sizes)} original "
                         f"sizes and {len(input_sizes)} input sizes")
    segm: list[dict] = []
    bbox: list[dict] = []
    for pred, image_id, orig, inp in zip(preds, image_ids, orig_sizes, input_sizes):
        image_id = int(image_id)
        h0, w0 = int(orig[0]), int(orig[1])
        h_in, w_in = int(inp[0]), int(inp[1])
        boxes = _as_tensor(pred["boxes"], torch.float32).reshape(-1, 4)
        scores = _as_tensor(pred["scores"], torch.float32).reshape(-1)
        labels = _as_tensor(pred["labels"], torch.int64).reshape(-1)
        if not (len(boxes) == len(scores) == len(labels)):
            raise ValueError(f"image {image_id}: boxes, scores and labels differ in length")
        cat_ids = []
        for label in labels.tolist():
            if label not in label_to_cat_id:
                raise InputError("predictions", f"label {label} has no category in the ground truth "
                                                f"({len(label_to_cat_id)} categories); was the model trained "
                                                "on another dataset?", record=f"image_id {image_id}")
            cat_ids.append(int(label_to_cat_id[label]))

        xywh = rescale_boxes(boxes, (h_in, w_in), (h0, w0))
        for k in range(len(boxes)):
            bbox.append({"image_id": image_id, "category_id": cat_ids[k],
                         "bbox": [float(v) for v in xywh[k].tolist()], "score": float(scores[k])})

        if pred.get("masks") is None:
            continue
        if isinstance(pred["masks"], torch.Tensor) and pred["masks"].dtype == torch.uint8:
            binary = pred["masks"].cpu()  # already at the original size (binarize_masks)
            if binary.shape != (len(boxes), h0, w0):
                raise ValueError(f"image {image_id}: binary masks must be [K, h0, w0] = {(len(boxes), h0, w0)}, "
                                 f"got {tuple(binary.shape)}")
            chunks = (binary[start:start + _MASK_CHUNK] for start in range(0, len(binary), _MASK_CHUNK))
        else:
            masks = _as_tensor(pred["masks"], torch.float32)
            if masks.dim() == 4 and masks.shape[1] == 1:
                masks = masks[:, 0]
            if masks.dim() != 3 or masks.shape[0] != len(boxes):
                raise ValueError(f"image {image_id}: masks must be [K, h, w] with K={len(boxes)}, "
                                 f"got {tuple(masks.shape)}")
            if masks.shape[1] < h_in or masks.shape[2] < w_in:
                raise ValueError(f"image {image_id}: masks {tuple(masks.shape[1:])} are smaller than the "
                                 f"input size {(h_in, w_in)}")
            chunks = (rescale_masks(masks[start:start + _MASK_CHUNK], (h_in, w_in), (h0, w0), mask_thresh)
                      for start in range(0, len(masks), _MASK_CHUNK))
        rles = [rle for chunk in chunks for rle in encode_masks(chunk.numpy())]
        for k, rle in enumerate(rles):
            segm.append({"image_id": image_id, "category_id": cat_ids[k], "segmentation": rle,
                         "bbox": [float(v) for v in xywh[k].tolist()], "score": float(scores[k])})
    return segm, bbox


def rescale_boxes(boxes: torch.Tensor, input_size: tuple[int, int], orig_size: tuple[int, int]) -> torch.Tensor:
    """xyxy boxes in input pixels -> xywh boxes in original pixels, clipped to the image."""
    (h_in, w_in), (h0, w0) = input_size, orig_size
    scale = boxes.new_tensor([w0 / w_in, h0 / h_in, w0 / w_in, h0 / h_in])
    out = boxes * scale
    out[:, 0::2] = out[:, 0::2].clamp(0, w0)
    out[:, 1::2] = out[:, 1::2].clamp(0, h0)
    return torch.stack([out[:, 0], out[:, 1], out[:, 2] - out[:, 0], out[:, 3] - out[:, 1]], dim=1)


def binarize_masks(masks: torch.Tensor, input_size: tuple[int, int], orig_size: tuple[int, int],
                   thresh: float) -> torch.Tensor:
    """:func:`rescale_masks` in chunks on the masks' own device, as ``uint8``: what inference copies to the
    host (a GPU thresholds; 1 byte per pixel at the original size crosses instead of 4 at the input's)."""
    (h0, w0) = orig_size
    out = torch.empty((len(masks), h0, w0), dtype=torch.uint8, device=masks.device)
    for start in range(0, len(masks), _MASK_CHUNK):
        out[start:start + _MASK_CHUNK] = rescale_masks(masks[start:start + _MASK_CHUNK], input_size, orig_size, thresh)
    return out


def rescale_masks(masks: torch.Tensor, input_size: tuple[int, int], orig_size: tuple[int, int],
                  thresh: float) -> torch.Tensor:
    """Crop padding, resize probabilities bilinearly to the original size, then threshold."""
    (h_in, w_in), (h0, w0) = input_size, orig_size
    if len(masks) == 0:
        return torch.zeros((0, h0, w0), dtype=torch.bool)
    probs = masks[:, :h_in, :w_in].unsqueeze(1)
    if (h_in, w_in) != (h0, w0):
        probs = F.interpolate(probs, size=(h0, w0), mode="bilinear", align_corners=False)
    return probs[:, 0] > thresh


def _as_tensor(value: Any, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to(device="cpu", dtype=dtype)
    return torch.as_tensor(np.asarray(value), dtype=dtype)
