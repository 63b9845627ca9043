"""Load and validate a COCO instances json before anything trains on it.

Why so strict: a bad record found after hours of training (or a silently
shifted mask) costs far more than a check at load time. Every problem raises
:class:`InputError` naming the file, the record (``annotations[3] (id 104)``)
and what is wrong, and nothing is written before the check passes. The record
checks are the project's one gate, :mod:`sim_core.data.validate`, shared with
evaluation, import and the report; this module adds the image-file checks.

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
import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from pycocotools import mask as mask_utils

from sim_core.data.images import image_size, read_image_rgb
from sim_core.data.validate import check_gt, read_json
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

    @property
    def instances_with_masks(self) -> tuple[int, int]:
        """``(with a mask, all)`` non-crowd annotations: box-only data has no masks."""
        solid = [a for anns in self.annotations.values() for a in anns if not a["iscrowd"]]
        return sum("segmentation" in a for a in solid), len(solid)

    @property
    def masks_complete(self) -> bool:
        with_masks, total = self.instances_with_masks
        return with_masks == total

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

    def with_categories(self, keep: set[int]) -> "CocoData":
        """The same data with only the categories ``keep`` (labels renumbered; every annotation must use one)."""
        categories = [c for c in self.categories if c["id"] in keep]
        cat_id_to_label = {c["id"]: label for label, c in enumerate(categories)}
        return dataclasses.replace(self, categories=categories, cat_id_to_label=cat_id_to_label,
                                   label_to_cat_id={label: cid for cid, label in cat_id_to_label.items()})

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
    """Read, validate and clean a COCO instances json (the checks: :mod:`sim_core.data.validate`).

    ``check_images`` checks that every image file exists and that its size
    (after EXIF orientation, read from the header only) matches the json.
    ``decode_images`` additionally decodes every image fully, which also
    catches files corrupted after the header (slow at COCO scale; a corrupt
    file is otherwise reported, with its name, when the dataset reads it).
    """
    ann_path, image_dir = Path(ann_path), Path(image_dir)
    checked = check_gt(read_json(ann_path, "annotation"), ann_path, purpose="train", require_segmentation=False)
    images = checked.images
    annotations: dict[int, list[dict]] = {i: [] for i in images}
    for ann in checked.annotations:
        annotations[ann["image_id"]].append(ann)
    if check_images or decode_images:
        _check_image_files(ann_path, image_dir, images, decode_images)
    cat_id_to_label = {c["id"]: label for label, c in enumerate(checked.categories)}
    return CocoData(
        ann_path=ann_path,
        image_dir=image_dir,
        images=images,
        annotations=annotations,
        categories=checked.categories,
        cat_id_to_label=cat_id_to_label,
        label_to_cat_id={label: cid for cid, label in cat_id_to_label.items()},
        events=checked.events,
        extra=checked.extra,
    )


def annotation_rle(segmentation: Any, height: int, width: int) -> dict:
    """One (compressed) RLE for a validated polygon list or RLE segmentation."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


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
