"""Load and validate a COCO instances json before anything trains on it.

Why so strict: a bad record found after hours of training (or a silently
shifted mask) costs far more than a check at load time. Every problem raises
:class:`InputError` naming the file, the record (image id / annotation id /
file name) and what is wrong, and nothing is written before the check passes.

Accepted, because they are valid COCO: polygons (several parts), compressed
and uncompressed RLE, ``iscrowd``, images without annotations, non-contiguous
category ids (mapped to contiguous labels ``0..C-1`` in ascending id order).

Repaired and counted rather than rejected, because real COCO contains them:
- boxes partly outside the image are clipped to it (``clipped_box``);
- boxes with zero width or height after clipping are skipped (``zero_area_box``);
- polygon parts with fewer than 3 points (a line or a point, zero area) are
  dropped (``degenerate_polygon_part``); an annotation left with no polygon
  is skipped (``no_valid_polygon``);
- a missing ``iscrowd`` means 0, a missing ``area`` is computed from the mask.
Everything else that is malformed is rejected.
"""
from __future__ import annotations

import copy
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

import numpy as np
from pycocotools import mask as mask_utils

from sim_core.data.images import image_size, read_image_rgb
from sim_core.errors import InputError

SKIP_KINDS = ("zero_area_box", "no_valid_polygon")
FIX_KINDS = ("clipped_box", "degenerate_polygon_part")


@dataclass
class CocoData:
    """A validated COCO instances file.

    ``images`` and ``annotations`` are keyed by image id (ascending); every
    image has a (possibly empty) annotation list holding cleaned copies of
    the records (clipped ``bbox``, ``iscrowd`` and ``area`` filled in).
    ``events`` records each repair or skip as ``(kind, image_id, ann_id)``.
    """

    ann_path: Path
    image_dir: Path
    images: dict[int, dict]
    annotations: dict[int, list[dict]]
    categories: list[dict]
    cat_id_to_label: dict[int, int]
    label_to_cat_id: dict[int, int]
    events: list[tuple[str, int, int]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def image_ids(self) -> list[int]:
        return list(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def class_names(self) -> list[str]:
        """Category names indexed by contiguous label."""
        return [c["name"] for c in self.categories]

    @property
    def skipped(self) -> dict[str, int]:
        counts = Counter(kind for kind, _, _ in self.events)
        return {kind: counts.get(kind, 0) for kind in SKIP_KINDS}

    @property
    def fixed(self) -> dict[str, int]:
        counts = Counter(kind for kind, _, _ in self.events)
        return {kind: counts.get(kind, 0) for kind in FIX_KINDS}

    def image_path(self, image_id: int) -> Path:
        return self.image_dir / self.images[image_id]["file_name"]

    def subset(self, image_ids: Iterable[int]) -> "CocoData":
        """The same data restricted to ``image_ids`` (same categories and labels)."""
        keep = [i for i in image_ids]
        wanted = set(keep)
        return CocoData(
            ann_path=self.ann_path,
            image_dir=self.image_dir,
            images={i: self.images[i] for i in sorted(wanted)},
            annotations={i: self.annotations[i] for i in sorted(wanted)},
            categories=self.categories,
            cat_id_to_label=self.cat_id_to_label,
            label_to_cat_id=self.label_to_cat_id,
            events=[e for e in self.events if e[1] in wanted],
            extra=self.extra,
        )

    def to_json(self, file_name_prefix: str = "") -> dict:
        """The cleaned COCO dict (skipped records removed, boxes clipped).

        ``file_name_prefix`` is prepended to every ``file_name`` (used when
        the prepared ``images/`` folder holds the original folders as links).
        """
        images = []
        for img in self.images.values():
            rec = dict(img)
            rec["file_name"] = file_name_prefix + img["file_name"]
            images.append(rec)
        anns = sorted((a for lst in self.annotations.values() for a in lst), key=lambda a: a["id"])
        out = copy.deepcopy(self.extra)
        out.update({"images": images, "annotations": anns, "categories": self.categories})
        return out


def load_coco(
    ann_path: str | Path,
    image_dir: str | Path,
    check_images: bool = True,
    decode_images: bool = False,
) -> CocoData:
    """Read, validate and clean a COCO instances json.

    ``check_images`` checks that every image file exists and that its size
    (after EXIF orientation, read from the header only) matches the json.
    ``decode_images`` additionally decodes every image fully, which also
    catches files corrupted after the header (slow at COCO scale; a corrupt
    file is otherwise reported, with its name, when the dataset reads it).
    """
    ann_path, image_dir = Path(ann_path), Path(image_dir)
    raw = _read_json(ann_path)
    categories, cat_id_to_label = _check_categories(ann_path, raw["categories"])
    images = _check_images(ann_path, raw["images"])
    events: list[tuple[str, int, int]] = []
    annotations: dict[int, list[dict]] = {i: [] for i in images}
    seen_ann_ids: set[int] = set()
    for index, ann in enumerate(raw["annotations"]):
        cleaned = _clean_annotation(ann_path, index, ann, images, cat_id_to_label, seen_ann_ids, events)
        if cleaned is not None:
            annotations[cleaned["image_id"]].append(cleaned)
    if check_images or decode_images:
        _check_image_files(ann_path, image_dir, images, decode_images)
    extra = {k: v for k, v in raw.items() if k not in ("images", "annotations", "categories")}
    return CocoData(
        ann_path=ann_path,
        image_dir=image_dir,
        images=images,
        annotations=annotations,
        categories=categories,
        cat_id_to_label=cat_id_to_label,
        label_to_cat_id={label: cid for cid, label in cat_id_to_label.items()},
        events=events,
        extra=extra,
    )


def annotation_rle(segmentation: Any, height: int, width: int) -> dict:
    """One (compressed) RLE for a validated polygon list or RLE segmentation."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


def _read_json(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(path, "annotation file does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read annotation file ({exc})") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(path, f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if not isinstance(raw, dict):
        raise InputError(path, "top level must be a JSON object with images, annotations, categories")
    missing = [k for k in ("images", "annotations", "categories") if k not in raw]
    if missing:
        raise InputError(path, f"missing top-level key(s): {', '.join(missing)}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(raw[key], list):
            raise InputError(path, f"top-level '{key}' must be a list, got {type(raw[key]).__name__}")
    return raw


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_categories(path: Path, records: list) -> tuple[list[dict], dict[int, int]]:
    if not records:
        raise InputError(path, "'categories' is empty; at least one category is needed")
    by_id: dict[int, dict] = {}
    for index, cat in enumerate(records):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")):
            raise InputError(path, "category needs an integer 'id'", record=f"categories[{index}]")
        if not isinstance(cat.get("name"), str) or not cat["name"]:
            raise InputError(path, "category needs a non-empty 'name'", record=f"category id {cat['id']}")
        if cat["id"] in by_id:
            raise InputError(path, "duplicate category id", record=f"category id {cat['id']}")
        by_id[cat["id"]] = cat
    ordered = [by_id[i] for i in sorted(by_id)]
    return ordered, {c["id"]: label for label, c in enumerate(ordered)}


def _check_images(path: Path, records: list) -> dict[int, dict]:
    if not records:
        raise InputError(path, "'images' is empty")
    images: dict[int, dict] = {}
    for index, img in enumerate(records):
        if not isinstance(img, dict) or not _is_int(img.get("id")):
            raise InputError(path, "image record needs an integer 'id'", record=f"images[{index}]")
        record = f"image id {img['id']}"
        if img["id"] in images:
            raise InputError(path, "duplicate image id", record=record)
        name = img.get("file_name")
        if not isinstance(name, str) or not name:
            raise InputError(path, "image record needs a non-empty 'file_name'", record=record)
        record = f"image id {img['id']} ({name})"
        pure = PurePosixPath(name)
        if pure.is_absolute() or ".." in pure.parts or "\\" in name:
            raise InputError(path, "file_name must be a relative path inside the image folder", record=record)
        for key in ("width", "height"):
            if not _is_int(img.get(key)) or img[key] <= 0:
                raise InputError(path, f"'{key}' must be a positive integer, got {img.get(key)!r}", record=record)
        images[img["id"]] = img
    return {i: images[i] for i in sorted(images)}


def _clean_annotation(
    path: Path,
    index: int,
    ann: Any,
    images: dict[int, dict],
    cat_id_to_label: dict[int, int],
    seen_ids: set[int],
    events: list[tuple[str, int, int]],
) -> dict | None:
    if not isinstance(ann, dict) or not _is_int(ann.get("id")):
        raise InputError(path, "annotation needs an integer 'id'", record=f"annotations[{index}]")
    ann_id = ann["id"]
    record = f"annotation id {ann_id}"
    if ann_id in seen_ids:
        raise InputError(path, "duplicate annotation id", record=record)
    seen_ids.add(ann_id)
    image_id = ann.get("image_id")
    if not _is_int(image_id) or image_id not in images:
        raise InputError(path, f"image_id {image_id!r} is not in 'images'", record=record)
    if not _is_int(ann.get("category_id")) or ann["category_id"] not in cat_id_to_label:
        raise InputError(path, f"category_id {ann.get('category_id')!r} is not in 'categories'", record=record)
    crowd = ann.get("iscrowd", 0)
    if crowd not in (0, 1) or isinstance(crowd, float):
        raise InputError(path, f"iscrowd must be 0 or 1, got {crowd!r}", record=record)
    height, width = images[image_id]["height"], images[image_id]["width"]
    box = _check_box(path, record, ann.get("bbox"))
    x0, y0 = max(box[0], 0.0), max(box[1], 0.0)
    x1, y1 = min(box[0] + box[2], float(width)), min(box[1] + box[3], float(height))
    if x1 <= x0 or y1 <= y0:
        events.append(("zero_area_box", image_id, ann_id))
        return None
    segm, dropped = _check_segmentation(path, record, ann.get("segmentation"), height, width)
    for _ in range(dropped):
        events.append(("degenerate_polygon_part", image_id, ann_id))
    if segm is None:
        events.append(("no_valid_polygon", image_id, ann_id))
        return None
    cleaned = dict(ann)
    cleaned["iscrowd"] = int(crowd)
    cleaned["segmentation"] = segm
    if box[0] < 0 or box[1] < 0 or box[0] + box[2] > width or box[1] + box[3] > height:
        events.append(("clipped_box", image_id, ann_id))
        cleaned["bbox"] = [x0, y0, x1 - x0, y1 - y0]
    area = ann.get("area")
    if area is None:
        cleaned["area"] = float(mask_utils.area(annotation_rle(segm, height, width)))
    elif isinstance(area, bool) or not isinstance(area, (int, float)) or not np.isfinite(area) or area < 0:
        raise InputError(path, f"area must be a non-negative number, got {area!r}", record=record)
    return cleaned


def _check_box(path: Path, record: str, bbox: Any) -> list[float]:
    if not isinstance(bbox, list) or len(bbox) != 4 or any(
        isinstance(v, bool) or not isinstance(v, (int, float)) for v in bbox
    ):
        raise InputError(path, f"bbox must be [x, y, width, height] numbers, got {bbox!r}", record=record)
    if not all(np.isfinite(bbox)):
        raise InputError(path, f"bbox has a non-finite value: {bbox!r}", record=record)
    if bbox[2] < 0 or bbox[3] < 0:
        raise InputError(path, f"bbox has negative width or height: {bbox!r}", record=record)
    return [float(v) for v in bbox]


def _check_segmentation(path: Path, record: str, segm: Any, height: int, width: int) -> tuple[Any, int]:
    """Validated segmentation (or None if no usable polygon) and the number of dropped parts."""
    if isinstance(segm, list):
        if not segm:
            raise InputError(path, "segmentation is an empty polygon list", record=record)
        kept = []
        for part_index, part in enumerate(segm):
            try:
                coords = np.asarray(part, dtype=np.float64)
            except (TypeError, ValueError):
                coords = None
            if coords is None or not isinstance(part, list) or coords.ndim != 1:
                raise InputError(path, f"polygon {part_index} must be a flat list of numbers", record=record)
            if coords.size % 2 or not np.isfinite(coords).all():
                raise InputError(
                    path, f"polygon {part_index} needs an even number of finite coordinates", record=record
                )
            if coords.size >= 6:
                kept.append(part)
        return (kept or None), len(segm) - len(kept)
    if isinstance(segm, dict):
        size, counts = segm.get("size"), segm.get("counts")
        if not isinstance(size, list) or len(size) != 2 or not all(_is_int(v) for v in size):
            raise InputError(path, f"RLE needs 'size' [height, width], got {size!r}", record=record)
        if size != [height, width]:
            raise InputError(
                path, f"RLE size {size} differs from the image size [{height}, {width}]", record=record
            )
        if isinstance(counts, list):
            if not all(_is_int(v) and v >= 0 for v in counts):
                raise InputError(path, "uncompressed RLE counts must be non-negative integers", record=record)
        elif isinstance(counts, str):
            counts = _compressed_counts(counts)
            if counts is None:
                raise InputError(path, "compressed RLE counts string is corrupt", record=record)
        else:
            raise InputError(path, "RLE 'counts' must be a list or a string", record=record)
        if sum(counts) != height * width:
            raise InputError(
                path, f"RLE counts cover {sum(counts)} pixels, the image has {height * width}", record=record
            )
        return segm, 0
    raise InputError(path, f"segmentation must be a polygon list or an RLE dict, got {type(segm).__name__}",
                     record=record)


def _compressed_counts(text: str) -> list[int] | None:
    """Run lengths of a COCO compressed RLE string, or None if it is corrupt.

    pycocotools decodes these strings without bounds checks, so a corrupt one
    could write past its buffer; the counts are checked here first. Format:
    each count is a little-endian sequence of 6-bit characters (offset 48),
    5 data bits plus a continuation bit, sign-extended; from the third count
    on, it is stored as the difference to the count two places before.
    """
    counts: list[int] = []
    pos, n = 0, len(text)
    while pos < n:
        value, shift, more = 0, 0, True
        while more:
            if pos >= n:
                return None
            char = ord(text[pos]) - 48
            if not 0 <= char < 64:
                return None
            value |= (char & 0x1F) << (5 * shift)
            more = bool(char & 0x20)
            pos += 1
            shift += 1
            if not more and (char & 0x10):
                value |= -1 << (5 * shift)
        if len(counts) > 2:
            value += counts[-2]
        if value < 0:
            return None
        counts.append(value)
    return counts


def _check_image_files(ann_path: Path, image_dir: Path, images: dict[int, dict], decode: bool) -> None:
    if not image_dir.is_dir():
        raise InputError(image_dir, "image folder does not exist")
    for image_id, img in images.items():
        record = f"image id {image_id} ({img['file_name']})"
        file = image_dir / img["file_name"]
        if not file.is_file():
            raise InputError(ann_path, f"image file {file} does not exist", record=record)
        try:
            if decode:
                height, width = read_image_rgb(file).shape[:2]
            else:
                height, width = image_size(file)
        except InputError as exc:
            raise InputError(ann_path, f"{file}: {exc.problem}", record=record) from None
        if (height, width) != (img["height"], img["width"]):
            raise InputError(
                ann_path,
                f"json says {img['width']}x{img['height']} (width x height) but {file} is "
                f"{width}x{height} after EXIF orientation",
                record=record,
            )
