"""PASCAL VOC 2012 + SBD instance masks as COCO json (the BoxInst/BoxLevelSet VOC setting).

Splits, as in the papers: ``train`` = "train_aug" = VOC 2012 segmentation
train + SBD train + SBD val, minus VOC 2012 segmentation val (10,582 images
on the real data); ``val`` = VOC 2012 segmentation val (1,449 images).
Without SBD, ``train`` is VOC 2012 segmentation train alone (1,464).

Sources of the instance masks:
- VOC ``SegmentationObject/*.png`` (indexed PNG: 0 background, 1..N the
  instances, 255 the void band along boundaries and unlabelled regions) with
  the class of each instance read from ``SegmentationClass/*.png`` (the
  majority class under the instance, void ignored);
- SBD ``dataset/inst/*.mat`` (``GTinst.Segmentation``: 0 background, 1..N
  instances; ``GTinst.Categories``: class of each instance) for images VOC
  does not annotate; ``dataset/cls/*.mat`` (``GTcls.Segmentation``) is read
  to cross-check each instance's class, and disagreements are counted.
An image annotated by both uses VOC's own annotation: it is the finer one
(it marks the void band instead of forcing every pixel to a side).

Void pixels belong to no mask: COCO json has no "ignore" region, so the
evaluator treats them as background, like the cocostyle files of prior work.
Classes are VOC's 20 with ids 1..20. Images are linked from
``VOC2012/JPEGImages`` (SBD's ``img/`` holds the same files).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
from PIL import Image
from pycocotools import mask as mask_utils

from sim_core.data.coco import load_coco
from sim_core.data.images import image_size
from sim_core.data.prepare import check_out_is_separate, link_dir, prepare_linked
from sim_core.data.summary import build_summary
from sim_core.errors import InputError
from sim_core.io_utils import atomic_directory, atomic_write_json

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
VOID = 255


def voc_categories() -> list[dict]:
    return [{"id": i + 1, "name": name, "supercategory": "voc"} for i, name in enumerate(VOC_CLASSES)]


def resolve_voc_root(voc_root: Path) -> Path:
    """Accept ``VOCdevkit/VOC2012`` or ``VOCdevkit`` itself."""
    voc_root = Path(voc_root)
    for candidate in (voc_root, voc_root / "VOC2012"):
        if (candidate / "JPEGImages").is_dir() and (candidate / "ImageSets" / "Segmentation").is_dir():
            return candidate
    raise InputError(voc_root, "not a VOC 2012 folder: needs JPEGImages/, ImageSets/Segmentation/, "
                               "SegmentationObject/ and SegmentationClass/")


def resolve_sbd_root(sbd_root: Path) -> Path:
    """Accept ``benchmark_RELEASE``, ``benchmark_RELEASE/dataset`` or a folder with inst/ and cls/."""
    sbd_root = Path(sbd_root)
    for candidate in (sbd_root, sbd_root / "dataset", sbd_root / "benchmark_RELEASE" / "dataset"):
        if (candidate / "inst").is_dir() and (candidate / "cls").is_dir():
            return candidate
    raise InputError(sbd_root, "not an SBD folder: needs dataset/inst/, dataset/cls/, dataset/train.txt, dataset/val.txt")


def read_name_list(path: Path) -> list[str]:
    if not path.is_file():
        raise InputError(path, "image list does not exist")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def read_index_png(path: Path) -> np.ndarray:
    """The index values of a palette PNG (not its colours), as uint8 ``[H, W]``."""
    if not path.is_file():
        raise InputError(path, "annotation PNG does not exist")
    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L"):
                raise InputError(path, f"expected an indexed (palette) PNG, got mode {img.mode}")
            return np.array(img, dtype=np.uint8)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(path, f"cannot decode annotation PNG ({exc})") from None


def read_mat_struct(path: Path, name: str) -> Any:
    """Field access to the 1x1 MATLAB struct ``name`` (``GTinst`` / ``GTcls``) of an SBD .mat file."""
    if not path.is_file():
        raise InputError(path, "SBD annotation file does not exist")
    try:
        mat = scipy.io.loadmat(path)
    except Exception as exc:
        raise InputError(path, f"cannot read .mat file ({exc})") from None
    if name not in mat or mat[name].dtype.names is None or "Segmentation" not in mat[name].dtype.names:
        raise InputError(path, f"expected a struct '{name}' with a 'Segmentation' field")
    return mat[name][0, 0]


def _majority_class(values: np.ndarray) -> int:
    values = values[(values != 0) & (values != VOID)]
    return int(np.bincount(values).argmax()) if values.size else 0


def voc_png_instances(
    obj_path: Path, cls_path: Path, stats: Counter
) -> tuple[list[tuple[int, np.ndarray]], tuple[int, int]]:
    """(category id, mask) of each instance of a VOC SegmentationObject PNG, and the map's shape."""
    objects, classes = read_index_png(obj_path), read_index_png(cls_path)
    if objects.shape != classes.shape:
        raise InputError(cls_path, f"is {classes.shape[1]}x{classes.shape[0]} but {obj_path.name} is "
                                   f"{objects.shape[1]}x{objects.shape[0]}")
    found = []
    for index in np.unique(objects):
        if index in (0, VOID):
            continue
        mask = objects == index
        category = _majority_class(classes[mask])
        if category == 0:
            stats["instances_without_class"] += 1
            continue
        if category > len(VOC_CLASSES):
            raise InputError(cls_path, f"class index {category} is not a VOC class (1..20)",
                             record=f"instance {index}")
        found.append((category, mask))
    return found, objects.shape


def sbd_mat_instances(
    inst_path: Path, cls_path: Path, stats: Counter
) -> tuple[list[tuple[int, np.ndarray]], tuple[int, int]]:
    """(category id, mask) of each instance of an SBD inst/*.mat file, and the map's shape."""
    inst = read_mat_struct(inst_path, "GTinst")
    if "Categories" not in inst.dtype.names:
        raise InputError(inst_path, "GTinst has no 'Categories' field")
    objects = np.asarray(inst["Segmentation"])
    categories = np.asarray(inst["Categories"]).astype(np.int64).ravel()
    if objects.ndim != 2:
        raise InputError(inst_path, f"GTinst.Segmentation must be a 2-d map, got shape {objects.shape}")
    semantic = np.asarray(read_mat_struct(cls_path, "GTcls")["Segmentation"])
    if semantic.shape != objects.shape:
        raise InputError(cls_path, f"GTcls.Segmentation is {semantic.shape} but {inst_path.name} is {objects.shape}")
    found = []
    for index in range(1, len(categories) + 1):
        category = int(categories[index - 1])
        if not 1 <= category <= len(VOC_CLASSES):
            raise InputError(inst_path, f"category {category} is not a VOC class (1..20)", record=f"instance {index}")
        mask = objects == index
        if not mask.any():
            stats["empty_instances"] += 1
            continue
        if _majority_class(semantic[mask]) != category:
            stats["sbd_class_disagreements"] += 1
        found.append((category, mask))
    extra = int(objects.max(initial=0))
    if extra > len(categories):
        raise InputError(inst_path, f"instance map uses id {extra} but GTinst.Categories lists {len(categories)}")
    return found, objects.shape


def build_split(names: list[str], voc: Path, voc_annotated: set[str], sbd: Path | None) -> tuple[dict, dict]:
    """COCO json of one split and its conversion counts; reads every file, writes nothing."""
    images, annotations = [], []
    stats: Counter = Counter()
    for image_id, name in enumerate(sorted(names), start=1):
        jpg = voc / "JPEGImages" / f"{name}.jpg"
        if not jpg.is_file():
            raise InputError(jpg, "image listed in the split files does not exist", record=name)
        height, width = image_size(jpg)
        if name in voc_annotated:
            source = voc / "SegmentationObject" / f"{name}.png"
            instances, shape = voc_png_instances(source, voc / "SegmentationClass" / f"{name}.png", stats)
            stats["images_from_voc_png"] += 1
        elif sbd is not None:
            source = sbd / "inst" / f"{name}.mat"
            instances, shape = sbd_mat_instances(source, sbd / "cls" / f"{name}.mat", stats)
            stats["images_from_sbd_mat"] += 1
        else:
            raise InputError(voc / "SegmentationObject", "no instance annotation for this image", record=name)
        if tuple(shape) != (height, width):
            raise InputError(source, f"annotation is {shape[1]}x{shape[0]} but {jpg} is {width}x{height}",
                             record=name)
        images.append({"id": image_id, "file_name": f"{name}.jpg", "width": width, "height": height})
        for category, mask in instances:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")},
                "area": float(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": 0,
            })
    coco = {"info": {"description": "PASCAL VOC 2012 (+ SBD) instances"}, "licenses": [],
            "images": images, "annotations": annotations, "categories": voc_categories()}
    return coco, dict(sorted(stats.items()))


def prepare_voc(out: Path, voc_root: Path, sbd_root: Path | None = None) -> dict:
    """Build train_aug / val COCO jsons from VOC 2012 (+ SBD) and link the JPEGs."""
    voc = resolve_voc_root(voc_root)
    sbd = resolve_sbd_root(sbd_root) if sbd_root is not None else None
    check_out_is_separate(out, [voc] + ([sbd] if sbd else []))
    seg_lists = voc / "ImageSets" / "Segmentation"
    voc_train, voc_val = read_name_list(seg_lists / "train.txt"), read_name_list(seg_lists / "val.txt")
    train_names = set(voc_train)
    if sbd is not None:
        train_names |= set(read_name_list(sbd / "train.txt")) | set(read_name_list(sbd / "val.txt"))
    train_names -= set(voc_val)
    voc_annotated = set(voc_train) | set(voc_val)
    train_json, train_stats = build_split(sorted(train_names), voc, voc_annotated, sbd)
    val_json, val_stats = build_split(voc_val, voc, voc_annotated, None)
    out = Path(out)
    with atomic_directory(out) as tmp:
        link_dir(voc / "JPEGImages", tmp / "images")
        atomic_write_json(tmp / "train.json", train_json, indent=None)
        atomic_write_json(tmp / "val.json", val_json, indent=None)
        splits = {name: load_coco(tmp / f"{name}.json", tmp / "images") for name in ("train", "val")}
        source = {"voc": str(voc.resolve()), "sbd": str(sbd.resolve()) if sbd else None,
                  "train_split": "train_aug" if sbd else "voc2012_seg_train",
                  "conversion": {"train": train_stats, "val": val_stats}}
        summary = build_summary("voc", splits, source)
        atomic_write_json(tmp / "summary.json", summary)
    return summary


def prepare_voc_cocostyle(out: Path, images_dir: Path, train_json: Path, val_json: Path) -> dict:
    """Use ready-made ``voc_2012_{train_aug,val}_cocostyle.json`` files over VOC's JPEGs.

    ``images_dir`` is the JPEG folder or the VOC 2012 folder holding ``JPEGImages/``.
    """
    images_dir = Path(images_dir)
    if (images_dir / "JPEGImages").is_dir():
        images_dir = images_dir / "JPEGImages"
    return prepare_linked(out, "voc", images_dir, train_json, val_json, source={"format": "cocostyle"})
