"""Qualitative grid: the same validation images for every method, side by side.

Rows are images, columns are the GT boxes (the only supervision the box
methods see) followed by each method's masks. A method's panel shows its
detections with score >= ``score_thresh`` (at most ``max_dets``, highest
scores first), decoded from the run's ``segm.json`` RLEs, each mask filled
with a darker outline, in the colour of the GT box it overlaps most (so an
object has one colour across the row). Images are chosen by id
(``report.qualitative_image_ids``) or, when none are given, as the
``qualitative_count`` images with the most GT instances (ties: smaller id),
which shows overlaps and occlusions, where the methods differ most.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402
from pycocotools import mask as mask_utils  # noqa: E402
from scipy import ndimage  # noqa: E402

from reports.plots import save_figure  # noqa: E402
from sim_core.errors import InputError  # noqa: E402

PALETTE = plt.get_cmap("tab20").colors


def choose_images(gt: dict, requested: Sequence[int], count: int) -> list[int]:
    """The requested ids (checked), else the ``count`` images with the most non-crowd GT instances."""
    known = {im["id"] for im in gt["images"]}
    if requested:
        unknown = [i for i in requested if i not in known]
        if unknown:
            raise InputError("params.yaml", f"report.qualitative_image_ids not in the GT: {unknown}")
        return list(requested)
    per_image: dict[int, int] = defaultdict(int)
    for ann in gt["annotations"]:
        if not ann.get("iscrowd", 0):
            per_image[ann["image_id"]] += 1
    ranked = sorted(known, key=lambda i: (-per_image[i], i))
    return ranked[:count]


def read_rgb(path: Path) -> np.ndarray:
    """uint8 RGB after EXIF orientation; 16-bit and float images are scaled to 8 bits."""
    if not path.exists():
        raise InputError(path, "image file not found")
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            array = np.asarray(image, dtype=np.float64)
            array = 255.0 * (array - array.min()) / max(array.max() - array.min(), 1e-9)
            return np.repeat(array.astype(np.uint8)[..., None], 3, axis=2)
        return np.asarray(image.convert("RGB"))


def index_results(results: list[dict]) -> dict[int, list[dict]]:
    by_image: dict[int, list[dict]] = defaultdict(list)
    for item in results:
        by_image[item["image_id"]].append(item)
    return by_image


def top_detections(items: list[dict], score_thresh: float, max_dets: int) -> list[dict]:
    kept = [d for d in items if d["score"] >= score_thresh]
    return sorted(kept, key=lambda d: -d["score"])[:max_dets]


def match_colors(gt_boxes: Sequence[Sequence[float]], dets: Sequence[dict]) -> list[int]:
    """Colour index per detection: that of the GT box it overlaps most (IoU >= 0.3), else a spare one.

    So one object has the same colour in every column, and in the GT-box column.
    """
    if not dets:
        return []
    det_boxes = [list(mask_utils.toBbox(d["segmentation"])) for d in dets]
    spare = iter(range(len(gt_boxes), len(gt_boxes) + len(dets)))
    if not gt_boxes:
        return [next(spare) for _ in dets]
    ious = np.asarray(mask_utils.iou(det_boxes, [list(b) for b in gt_boxes], [0] * len(gt_boxes)))
    return [int(row.argmax()) if row.max() >= 0.3 else next(spare) for row in ious]


def overlay_masks(image: np.ndarray, masks: Sequence[np.ndarray], colors: Sequence[int] | None = None,
                  alpha: float = 0.5) -> np.ndarray:
    """Each mask filled in its palette colour (``colors`` indices, default its position), outlined darker."""
    out = image.astype(np.float64) / 255.0
    colors = list(range(len(masks))) if colors is None else colors
    for index, mask in zip(colors, masks):
        if mask.shape != image.shape[:2]:
            raise InputError("segm.json", f"mask size {mask.shape} differs from image size {image.shape[:2]}")
        color = np.array(PALETTE[(2 * index) % len(PALETTE)])
        region = mask.astype(bool)
        out[region] = (1 - alpha) * out[region] + alpha * color
        edge = region & ~ndimage.binary_erosion(region)
        out[edge] = 0.6 * color
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)


def qualitative_grid(gt: dict, images_dir: Path, columns: Sequence[tuple[str, list[dict] | None]],
                     image_ids: Sequence[int], stem: Path, score_thresh: float = 0.3,
                     max_dets: int = 20) -> list[Path]:
    """Write the grid figure; ``columns`` = (title, results list or None when the run is missing)."""
    images = {im["id"]: im for im in gt["images"]}
    gt_by_image = index_results([a for a in gt["annotations"] if not a.get("iscrowd", 0)])
    indexed = [(title, index_results(res) if res is not None else None) for title, res in columns]
    ncols, nrows = 1 + len(indexed), len(image_ids)
    first = images[image_ids[0]] if image_ids else {"height": 1, "width": 1}
    aspect = first["height"] / max(first["width"], 1)
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.5 * ncols, 1.5 * aspect * nrows + 0.3), squeeze=False)
    for r, image_id in enumerate(image_ids):
        record = images[image_id]
        rgb = read_rgb(Path(images_dir) / record["file_name"])
        ax = axes[r, 0]
        ax.imshow(rgb)
        for index, ann in enumerate(gt_by_image.get(image_id, [])):
            x, y, w, h = ann["bbox"]
            ax.add_patch(Rectangle((x, y), w, h, fill=False, lw=1.2,
                                   edgecolor=PALETTE[(2 * index) % len(PALETTE)]))
        for c, (title, by_image) in enumerate(indexed, start=1):
            ax = axes[r, c]
            if by_image is None:
                ax.imshow(np.full_like(rgb, 235))
                ax.text(0.5, 0.5, "not available", ha="center", va="center", transform=ax.transAxes, fontsize=7)
                continue
            dets = top_detections(by_image.get(image_id, []), score_thresh, max_dets)
            colors = match_colors([a["bbox"] for a in gt_by_image.get(image_id, [])], dets)
            ax.imshow(overlay_masks(rgb, [mask_utils.decode(d["segmentation"]) for d in dets], colors))
        for c, title in enumerate(["GT boxes"] + [t for t, _ in indexed]):
            if r == 0:
                axes[r, c].set_title(title, fontsize=8)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(f"image {image_id}", fontsize=7)
    fig.subplots_adjust(left=0.03, right=0.99, bottom=0.01, top=1 - 0.3 / fig.get_figheight(),
                        wspace=0.04, hspace=0.04)
    return save_figure(fig, stem)
