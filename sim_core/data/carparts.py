"""``simbench prepare carparts``: 500 real photographs of cars with instance masks of 18 parts.

The data (``../shared/datasets/carparts``, see its README.md) is the public
Car-Parts-Segmentation release: ``trainingset/`` (400 JPEGs of 512 x 512,
3,073 instances) and ``testset/`` (100 JPEGs of 61 sizes, 811 instances), each
with ``JPEGImages/`` and ``annotations.json`` (polygons). The published split is
kept: ``trainingset`` -> ``train.json``, ``testset`` -> ``val.json``; the two
image folders are linked as ``images/train`` and ``images/val``.

The annotation files are exports of an annotation tool (COCO Annotator) and
carry its quirks. Each is handled by name, before the records go through the
one validation gate (:func:`sim_core.data.validate.check_gt`), and counted per
split in ``summary.json`` (``source.quirks``), never silently:

* ``iscrowd_boolean``: ``iscrowd`` is a JSON boolean; ``false``/``true`` become
  ``0``/``1`` (the gate accepts only the integers);
* ``background_category``: a category named ``_background_`` that no
  annotation of either split uses is dropped (listed in
  ``source.dropped_categories``); one that is used is an error, since its
  annotations would be lost;
* ``tool_fields``: the tool's own fields (:data:`TOOL_FIELDS`, e.g. ``path``,
  ``metadata``, ``color``, ``isbbox``) are removed from the records, counted
  per record kind and field name. A field that is neither COCO's nor one of
  those is an error: it would be a different export than the one this
  function was written for.

Everything else is the gate's: polygons, boxes, ids, image sizes (checked
against the JPEG headers). ``preview.png`` shows the first validation images
with their boxes and mask outlines, like the synthetic dataset's.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from sim_core.data.coco import CocoData, _check_image_files, annotation_rle  # the loader's image-file check
from sim_core.data.images import read_image_rgb
from sim_core.data.prepare import _check_same_categories, _write_splits, check_out_is_separate, link_dir
from sim_core.data.summary import build_summary
from sim_core.data.synthetic_shapes import render_preview
from sim_core.data.validate import check_gt, read_json
from sim_core.errors import InputError
from sim_core.io_utils import atomic_directory, atomic_write_bytes, atomic_write_json

DEFAULT_CARPARTS = Path("..") / "shared" / "datasets" / "carparts"
CARPARTS_HINT = ("--root must name the carparts folder (trainingset/ and testset/, each with JPEGImages/ "
                 "and annotations.json; ../shared/datasets/carparts)")
# our split name -> the published folder
SPLIT_FOLDERS = {"train": "trainingset", "val": "testset"}
BACKGROUND_NAME = "_background_"
# COCO's own fields per record kind: kept as they are.
COCO_FIELDS = {
    "images": {"id", "file_name", "width", "height", "license", "flickr_url", "coco_url", "date_captured"},
    "annotations": {"id", "image_id", "category_id", "segmentation", "area", "bbox", "iscrowd"},
    "categories": {"id", "name", "supercategory"},
}
# The annotation tool's (COCO Annotator's export) fields per record kind: removed and counted.
TOOL_FIELDS = {
    "images": {"dataset_id", "category_ids", "path", "annotated", "annotating", "num_annotations", "metadata",
               "deleted", "milliseconds", "events", "regenerate_thumbnail"},
    "annotations": {"isbbox", "color", "metadata"},
    "categories": {"color", "metadata", "keypoint_colors"},
}
PREVIEW_IMAGES = 9
PREVIEW_TILE = 320


def prepare_carparts(out: Path, root: Path | None = None, preview_images: int = PREVIEW_IMAGES) -> dict:
    """Validate the carparts folder (default ``../shared/datasets/carparts``) and write the prepared layout."""
    root = _resolve_root(root)
    folders = {split: root / name for split, name in SPLIT_FOLDERS.items()}
    for folder in folders.values():
        if not (folder / "annotations.json").is_file() or not (folder / "JPEGImages").is_dir():
            raise InputError(root, f"{folder.name}/annotations.json or {folder.name}/JPEGImages/ is missing; "
                                   f"{CARPARTS_HINT}")
    check_out_is_separate(out, [root])
    raws = {split: read_json(folder / "annotations.json") for split, folder in folders.items()}
    quirks = {split: {"iscrowd_boolean": 0, "background_category": 0, "tool_fields": {}} for split in raws}
    for split, raw in raws.items():
        quirks[split]["iscrowd_boolean"] = _integer_iscrowd(raw)
        quirks[split]["tool_fields"] = _drop_tool_fields(raw, folders[split] / "annotations.json")
    dropped = _drop_background_category(raws, {s: f / "annotations.json" for s, f in folders.items()})
    for split in raws:
        quirks[split]["background_category"] = len(dropped)
    splits = {split: _load_checked(raws[split], folder / "annotations.json", folder / "JPEGImages")
              for split, folder in folders.items()}
    _check_same_categories(splits["train"], splits["val"])
    source = {"root": str(root.resolve()), "splits": dict(SPLIT_FOLDERS),
              "dropped_categories": dropped, "quirks": quirks}
    out = Path(out)
    with atomic_directory(out) as tmp:
        (tmp / "images").mkdir()
        for split, folder in folders.items():
            link_dir(folder / "JPEGImages", tmp / "images" / split)
        _write_splits(tmp, splits, {split: f"{split}/" for split in splits})
        summary = build_summary("carparts", splits, source)
        atomic_write_json(tmp / "summary.json", summary)
        if preview_images > 0:
            atomic_write_bytes(tmp / "preview.png", preview_png(splits["val"], preview_images))
    return summary


def _resolve_root(root: Path | None) -> Path:
    if root is None:
        candidate = Path.cwd() / DEFAULT_CARPARTS
        if not candidate.is_dir():
            raise InputError("carparts", f"no copy at the default {candidate.resolve()}; {CARPARTS_HINT}")
        return candidate
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, f"folder does not exist; {CARPARTS_HINT}")
    return root


def _records(raw: Any, kind: str) -> list[dict]:
    """The dict records of ``raw[kind]`` (anything malformed is left for the gate to name)."""
    if not isinstance(raw, dict) or not isinstance(raw.get(kind), list):
        return []
    return [rec for rec in raw[kind] if isinstance(rec, dict)]


def _integer_iscrowd(raw: Any) -> int:
    """Turn boolean ``iscrowd`` values into 0/1 in place; the number turned."""
    turned = 0
    for ann in _records(raw, "annotations"):
        if isinstance(ann.get("iscrowd"), bool):
            ann["iscrowd"] = int(ann["iscrowd"])
            turned += 1
    return turned


def _drop_tool_fields(raw: Any, where: Path) -> dict[str, dict[str, int]]:
    """Remove the tool's fields in place; counts per record kind and field. Unknown fields raise."""
    counts: dict[str, dict[str, int]] = {}
    for kind, coco_fields in COCO_FIELDS.items():
        seen: Counter[str] = Counter()
        for index, rec in enumerate(_records(raw, kind)):
            for key in list(rec):
                if key in coco_fields:
                    continue
                if key not in TOOL_FIELDS[kind]:
                    raise InputError(where, f"field {key!r} is neither COCO's nor one of the annotation tool's "
                                            f"known fields ({', '.join(sorted(TOOL_FIELDS[kind]))})",
                                     record=f"{kind}[{index}] (id {rec.get('id')!r})")
                del rec[key]
                seen[key] += 1
        counts[kind] = dict(sorted(seen.items()))
    return counts


def _drop_background_category(raws: dict[str, Any], paths: dict[str, Path]) -> list[dict]:
    """Remove ``_background_`` categories no annotation uses, from every split; the ones removed."""
    background = {c.get("id") for raw in raws.values() for c in _records(raw, "categories")
                  if c.get("name") == BACKGROUND_NAME}
    for split, raw in raws.items():
        used = Counter(a.get("category_id") for a in _records(raw, "annotations")
                       if a.get("category_id") in background)
        if used:
            cid, n = used.most_common(1)[0]
            raise InputError(paths[split], f"category {BACKGROUND_NAME} (id {cid!r}) has {n} annotations; it is "
                                           "dropped only when empty (its annotations would be lost)")
    dropped: dict[Any, dict] = {}
    for raw in raws.values():
        if isinstance(raw, dict) and isinstance(raw.get("categories"), list):
            for c in raw["categories"]:
                if isinstance(c, dict) and c.get("id") in background:
                    dropped[c["id"]] = {"id": c["id"], "name": c["name"]}
            raw["categories"] = [c for c in raw["categories"]
                                 if not (isinstance(c, dict) and c.get("id") in background)]
    return [dropped[k] for k in sorted(dropped, key=str)]


def _load_checked(raw: Any, ann_path: Path, image_dir: Path) -> CocoData:
    """:func:`sim_core.data.coco.load_coco` for an already-read (cleaned) dict: the gate, then the image files."""
    checked = check_gt(raw, ann_path, purpose="train", require_segmentation=True)
    annotations: dict[int, list[dict]] = {i: [] for i in checked.images}
    for ann in checked.annotations:
        annotations[ann["image_id"]].append(ann)
    _check_image_files(ann_path, image_dir, checked.images, decode=False)
    cat_id_to_label = {c["id"]: label for label, c in enumerate(checked.categories)}
    return CocoData(ann_path=ann_path, image_dir=image_dir, images=checked.images, annotations=annotations,
                    categories=checked.categories, cat_id_to_label=cat_id_to_label,
                    label_to_cat_id={label: cid for cid, label in cat_id_to_label.items()},
                    events=checked.events, extra=checked.extra)


def preview_png(data: CocoData, count: int = PREVIEW_IMAGES, tile: int = PREVIEW_TILE) -> bytes:
    """A grid of the first ``count`` images, each letterboxed into a ``tile`` square, with boxes and outlines."""
    samples = []
    for image_id in data.image_ids[:count]:
        img = data.images[image_id]
        h, w = img["height"], img["width"]
        scale = tile / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        canvas = np.zeros((tile, tile, 3), dtype=np.uint8)
        photo = Image.fromarray(read_image_rgb(data.image_path(image_id), expected_size=(h, w)))
        canvas[:nh, :nw] = np.asarray(photo.resize((nw, nh), Image.BILINEAR))
        objects = []
        for ann in data.annotations[image_id]:
            if "segmentation" not in ann:
                continue
            mask = mask_utils.decode(annotation_rle(ann["segmentation"], h, w))
            small = np.asarray(Image.fromarray(mask * 255).resize((nw, nh), Image.NEAREST)) > 127
            if small.any():
                full = np.zeros((tile, tile), dtype=bool)
                full[:nh, :nw] = small
                objects.append((ann["category_id"], full))
        samples.append((canvas, objects))
    return render_preview(samples, data.categories, scale=1)
