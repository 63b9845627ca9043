"""``simbench prepare <kind>``: turn a dataset into the prepared layout.

Every kind produces the same thing (docs/architecture.md, "Prepared dataset
layout"): ``OUT/train.json``, ``OUT/val.json`` (cleaned COCO instances json,
original category ids, ``file_name`` relative to ``OUT/images/``),
``OUT/images/`` and ``OUT/summary.json``. Each function validates all of its
input first, then builds the output inside ``atomic_directory(out)``, so a
failure or a kill leaves no partial dataset behind, and returns the summary.

Real image folders are linked, never copied (COCO is 20 GB): links are
absolute, so the prepared folder keeps working wherever it is read from.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sim_core.data.coco import CocoData, load_coco
from sim_core.data.summary import build_summary
from sim_core.errors import InputError
from sim_core.io_utils import atomic_directory, atomic_write_json

COCO128_HINT = "--root must name a COCO-layout folder (images/ + annotations/instances_train2017.json)"
DEFAULT_COCO128 = Path("..") / "shared" / "datasets" / "coco128"
# coco128's split: the first 100 of 128 images (by id) train, the rest validate.
COCO128_TRAIN_FRACTION = 100 / 128


def prepare_synthetic(out: Path, cfg: dict) -> dict:
    """Generate the synthetic dataset into ``out`` and add its summary."""
    from sim_core.data.synthetic import write_synthetic  # the generator is its own module

    out = Path(out)
    with atomic_directory(out) as tmp:
        write_synthetic(tmp, cfg)
        splits = {
            name: load_coco(tmp / f"{name}.json", tmp / "images", decode_images=True)
            for name in ("train", "val")
        }
        _check_same_categories(splits["train"], splits["val"])
        summary = build_summary("synthetic", splits, {"generator": "sim_core.data.synthetic", "config": cfg})
        atomic_write_json(tmp / "summary.json", summary)
    return summary


def prepare_coco128(out: Path, root: Path | None = None) -> dict:
    """Split a small COCO-layout folder (default: ../shared/datasets/coco128) into train/val."""
    if root is None:
        candidate = Path.cwd() / DEFAULT_COCO128
        if not candidate.is_dir():
            raise InputError("coco128", f"no copy at the default {candidate.resolve()}; {COCO128_HINT}")
        root = candidate
    root = Path(root)
    ann_path, image_dir = root / "annotations" / "instances_train2017.json", root / "images"
    if not ann_path.is_file() or not image_dir.is_dir():
        raise InputError(root, COCO128_HINT)
    check_out_is_separate(out, [root])
    data = load_coco(ann_path, image_dir, decode_images=True)
    ids = data.image_ids
    if len(ids) < 2:
        raise InputError(ann_path, f"needs at least 2 images to split into train and val, has {len(ids)}")
    n_train = min(len(ids) - 1, max(1, round(len(ids) * COCO128_TRAIN_FRACTION)))
    splits = {"train": data.subset(ids[:n_train]), "val": data.subset(ids[n_train:])}
    out = Path(out)
    with atomic_directory(out) as tmp:
        link_dir(image_dir, tmp / "images")
        _write_splits(tmp, splits)
        summary = build_summary("coco128", splits, {"root": str(root.resolve())})
        atomic_write_json(tmp / "summary.json", summary)
    return summary


def prepare_coco(out: Path, root: Path) -> dict:
    """Validate a COCO 2017 folder and link it (``images/train2017``, ``images/val2017``)."""
    root = Path(root)
    needed = {
        "train2017/": root / "train2017",
        "val2017/": root / "val2017",
        "annotations/instances_train2017.json": root / "annotations" / "instances_train2017.json",
        "annotations/instances_val2017.json": root / "annotations" / "instances_val2017.json",
    }
    missing = [name for name, path in needed.items() if not path.exists()]
    if missing:
        raise InputError(
            root,
            f"not a COCO 2017 folder, missing {', '.join(missing)} (--root needs train2017/, val2017/ "
            "and annotations/instances_{train,val}2017.json)",
        )
    check_out_is_separate(out, [root])
    splits = {
        "train": load_coco(needed["annotations/instances_train2017.json"], root / "train2017"),
        "val": load_coco(needed["annotations/instances_val2017.json"], root / "val2017"),
    }
    _check_same_categories(splits["train"], splits["val"])
    out = Path(out)
    with atomic_directory(out) as tmp:
        (tmp / "images").mkdir()
        link_dir(root / "train2017", tmp / "images" / "train2017")
        link_dir(root / "val2017", tmp / "images" / "val2017")
        _write_splits(tmp, splits, prefixes={"train": "train2017/", "val": "val2017/"})
        summary = build_summary("coco", splits, {"root": str(root.resolve())})
        atomic_write_json(tmp / "summary.json", summary)
    return summary


def prepare_custom(
    out: Path, images: Path, train_ann: Path, val_ann: Path, decode_images: bool = False,
    val_images: Path | None = None,
) -> dict:
    """Validate a user's train/val COCO jsons against their image folder(s) and link them.

    Annotations may lack masks (box-only data: no ``segmentation``, or an
    empty one); the summary counts the instances that have one. Categories
    that no annotation of either split uses (annotation tools export group
    and background categories) are dropped and listed in the summary, so
    they are not trained as classes. With one folder for both splits it is
    linked as ``images/``; with a folder per split they are linked as
    ``images/train`` and ``images/val``. Image headers are always checked;
    ``decode_images`` also decodes every image (slower; catches files
    corrupted after the header). ``images``: both splits' folder, or the
    training split's when ``val_images`` names the validation split's.
    """
    train_images, val_images = Path(images), Path(val_images if val_images is not None else images)
    if train_images.resolve() == val_images.resolve():
        return prepare_linked(out, "custom", train_images, train_ann, val_ann, decode_images=decode_images,
                              drop_unused_categories=True)
    check_out_is_separate(out, [train_images, val_images, Path(train_ann).parent, Path(val_ann).parent])
    splits = {"train": load_coco(train_ann, train_images, decode_images=decode_images),
              "val": load_coco(val_ann, val_images, decode_images=decode_images)}
    splits, dropped = without_unused_categories(splits)
    _check_same_categories(splits["train"], splits["val"])
    inputs = {"train_images": str(train_images.resolve()), "val_images": str(val_images.resolve()),
              "train_ann": str(Path(train_ann).resolve()), "val_ann": str(Path(val_ann).resolve()),
              "dropped_unused_categories": dropped}
    out = Path(out)
    with atomic_directory(out) as tmp:
        (tmp / "images").mkdir()
        link_dir(train_images, tmp / "images" / "train")
        link_dir(val_images, tmp / "images" / "val")
        _write_splits(tmp, splits, {"train": "train/", "val": "val/"})
        summary = build_summary("custom", splits, inputs)
        atomic_write_json(tmp / "summary.json", summary)
    return summary


def without_unused_categories(splits: dict[str, CocoData]) -> tuple[dict[str, CocoData], list[dict]]:
    """The splits without the categories no annotation of any split uses, and those categories."""
    used = {a["category_id"] for data in splits.values() for anns in data.annotations.values() for a in anns}
    first = next(iter(splits.values()))
    dropped = [{"id": c["id"], "name": c["name"]} for c in first.categories if c["id"] not in used]
    if not dropped:
        return splits, []
    return {name: data.with_categories(used) for name, data in splits.items()}, dropped


def prepare_linked(
    out: Path,
    kind: str,
    images: Path,
    train_ann: Path,
    val_ann: Path,
    source: dict[str, Any] | None = None,
    decode_images: bool = False,
    drop_unused_categories: bool = False,
) -> dict:
    """Shared by ``custom`` and ready-made jsons (VOC cocostyle): validate both splits, link the images."""
    images = Path(images)
    check_out_is_separate(out, [images, Path(train_ann).parent, Path(val_ann).parent])
    splits = {
        "train": load_coco(train_ann, images, decode_images=decode_images),
        "val": load_coco(val_ann, images, decode_images=decode_images),
    }
    dropped: list[dict] = []
    if drop_unused_categories:
        splits, dropped = without_unused_categories(splits)
        source = {**(source or {}), "dropped_unused_categories": dropped}
    _check_same_categories(splits["train"], splits["val"])
    inputs = {"images": str(images.resolve()), "train_ann": str(Path(train_ann).resolve()),
              "val_ann": str(Path(val_ann).resolve())}
    out = Path(out)
    with atomic_directory(out) as tmp:
        link_dir(images, tmp / "images")
        _write_splits(tmp, splits)
        summary = build_summary(kind, splits, {**inputs, **(source or {})})
        atomic_write_json(tmp / "summary.json", summary)
    return summary


def _write_splits(tmp: Path, splits: dict[str, CocoData], prefixes: dict[str, str] | None = None) -> None:
    for name, data in splits.items():
        prefix = (prefixes or {}).get(name, "")
        atomic_write_json(tmp / f"{name}.json", data.to_json(file_name_prefix=prefix), indent=None)


def link_dir(target: Path, link: Path) -> None:
    os.symlink(Path(target).resolve(), link, target_is_directory=True)


def _check_same_categories(train: CocoData, val: CocoData) -> None:
    """A model trained on train's labels is evaluated on val: the category lists must agree."""
    ours: list[Any] = [(c["id"], c["name"]) for c in train.categories]
    theirs: list[Any] = [(c["id"], c["name"]) for c in val.categories]
    if ours != theirs:
        diff = sorted(set(ours) ^ set(theirs))[:5]
        raise InputError(
            val.ann_path,
            f"categories differ from {train.ann_path.name} (id, name) e.g. {diff}; train and val need the same list",
        )


def check_out_is_separate(out: Path, sources: list[Path]) -> None:
    """Refuse an output folder that is, or contains, an input: replacing it would delete the input."""
    target = Path(out).resolve()
    for source in sources:
        src = Path(source).resolve()
        if src == target or target in src.parents:
            raise InputError("--out", f"{out} is or contains the input {source}; choose a separate folder")
