"""summary.json of a prepared dataset: what is in it, and what loading changed.

The summary lets a reader check a dataset at a glance (class balance, object
sizes, empty images) and makes every repair visible: clipped boxes and
skipped records are counted per split, never dropped silently.

Sizes use COCO's area thresholds (small < 32^2 <= medium < 96^2 <= large) on
the annotation ``area`` field, the value COCO evaluation bins by.
"""
from __future__ import annotations

from typing import Any

from sim_core.data.coco import CocoData

SMALL_AREA = 32**2
LARGE_AREA = 96**2


def size_bin(area: float) -> str:
    if area < SMALL_AREA:
        return "small"
    if area < LARGE_AREA:
        return "medium"
    return "large"


def split_summary(data: CocoData) -> dict[str, Any]:
    """Counts of one split; instances are non-crowd annotations, crowd is counted apart."""
    keys = _class_keys(data)
    per_class = {name: 0 for name in keys}
    sizes = {"small": 0, "medium": 0, "large": 0}
    instances = crowd = no_annotations = no_instances = 0
    for anns in data.annotations.values():
        if not anns:
            no_annotations += 1
        solid = [a for a in anns if not a["iscrowd"]]
        if not solid:
            no_instances += 1
        crowd += len(anns) - len(solid)
        instances += len(solid)
        for ann in solid:
            per_class[keys[data.cat_id_to_label[ann["category_id"]]]] += 1
            sizes[size_bin(float(ann["area"]))] += 1
    return {
        "images": len(data.images),
        "images_without_annotations": no_annotations,
        "images_without_instances": no_instances,
        "instances": instances,
        "instances_with_masks": data.instances_with_masks[0],  # box-only annotations have none
        "crowd": crowd,
        "per_class": per_class,
        "sizes": sizes,
        "skipped": data.skipped,
        "fixed": data.fixed,
    }


def _class_keys(data: CocoData) -> list[str]:
    """Class names by label; a name used by two category ids gets its id appended."""
    names = data.class_names
    return [
        name if names.count(name) == 1 else f"{name} (id {data.label_to_cat_id[label]})"
        for label, name in enumerate(names)
    ]


def build_summary(kind: str, splits: dict[str, CocoData], source: dict[str, Any]) -> dict[str, Any]:
    """The whole summary.json: dataset kind, categories, per-split counts, inputs."""
    first = next(iter(splits.values()))
    return {
        "dataset": kind,
        "num_classes": first.num_classes,
        "categories": [{"id": c["id"], "name": c["name"]} for c in first.categories],
        "splits": {name: split_summary(data) for name, data in splits.items()},
        "source": source,
    }
