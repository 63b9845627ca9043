"""VOC 2012 + SBD conversion on a tiny VOC/SBD-shaped tree built here."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.sparse
from PIL import Image
from pycocotools import mask as mask_utils

from sim_core.data.voc import VOC_CLASSES, prepare_voc, prepare_voc_cocostyle
from sim_core.errors import InputError

W, H = 24, 16
PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [0, 0, 0] * 251 + [224, 224, 192]


def _png(path: Path, index_map: np.ndarray) -> None:
    img = Image.fromarray(index_map.astype(np.uint8), mode="P")
    img.putpalette(PALETTE)
    img.save(path)


def _rect(y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def _mat(path: Path, struct: str, segmentation: np.ndarray, categories: list[int] | None = None) -> None:
    fields = {"Segmentation": segmentation.astype(np.uint8)}
    n = len(categories) if categories is not None else 0
    boundaries = np.empty((n, 1), dtype=object)
    for i in range(n):
        boundaries[i, 0] = scipy.sparse.csc_matrix(np.zeros((H, W)))
    fields["Boundaries"] = boundaries
    if categories is not None:
        fields["Categories"] = np.array(categories, np.uint8).reshape(-1, 1)
    else:
        fields["CategoriesPresent"] = np.unique(segmentation[segmentation > 0]).astype(np.uint8).reshape(-1, 1)
    scipy.io.savemat(path, {struct: fields})


def _voc_annotation(voc: Path, name: str, instances: list[tuple[int, np.ndarray]], void_class: np.ndarray | None = None):
    objects = np.zeros((H, W), np.uint8)
    classes = np.zeros((H, W), np.uint8)
    for k, (cat, mask) in enumerate(instances, start=1):
        objects[mask] = k
        classes[mask] = cat
    # a void band around the first instance: neither object nor background
    band = np.zeros((H, W), bool)
    if instances:
        ys, xs = np.nonzero(instances[0][1])
        band[max(ys.min() - 1, 0):ys.max() + 2, max(xs.min() - 1, 0):xs.max() + 2] = True
        band &= objects == 0
    objects[band] = 255
    classes[band] = 255
    if void_class is not None:  # an instance whose class pixels are all void
        objects[void_class] = len(instances) + 1
        classes[void_class] = 255
    _png(voc / "SegmentationObject" / f"{name}.png", objects)
    _png(voc / "SegmentationClass" / f"{name}.png", classes)


def _sbd_annotation(sbd: Path, name: str, instances: list[tuple[int, np.ndarray]], cls_override=None,
                    extra_categories: list[int] = ()):
    objects = np.zeros((H, W), np.uint8)
    classes = np.zeros((H, W), np.uint8)
    for k, (cat, mask) in enumerate(instances, start=1):
        objects[mask] = k
        classes[mask] = cat if cls_override is None else cls_override
    _mat(sbd / "inst" / f"{name}.mat", "GTinst", objects, [c for c, _ in instances] + list(extra_categories))
    _mat(sbd / "cls" / f"{name}.mat", "GTcls", classes)


@pytest.fixture
def voc_tree(tmp_path: Path) -> dict:
    """VOCdevkit/VOC2012 + benchmark_RELEASE/dataset with six images.

    a: VOC train (also SBD train), b: VOC train, c: VOC val (also SBD val),
    d: VOC val, e: SBD train, f: SBD val (class disagreement + an empty instance).
    """
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    sbd = tmp_path / "benchmark_RELEASE" / "dataset"
    for sub in ("JPEGImages", "SegmentationObject", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    for sub in ("inst", "cls", "img"):
        (sbd / sub).mkdir(parents=True)
    names = {k: f"2008_00000{i}" for i, k in enumerate("abcdef", start=1)}
    for name in names.values():
        Image.new("RGB", (W, H), (120, 60, 30)).save(voc / "JPEGImages" / f"{name}.jpg")
    masks = {
        "a": [(15, _rect(2, 10, 2, 9)), (12, _rect(5, 14, 12, 22))],
        "b": [(7, _rect(1, 8, 1, 20))],
        "c": [(1, _rect(3, 12, 4, 18))],
        "d": [(20, _rect(0, 16, 0, 5)), (20, _rect(4, 9, 10, 14))],
        "e": [(15, _rect(2, 6, 2, 6)), (3, _rect(8, 15, 10, 23))],
        "f": [(12, _rect(6, 12, 6, 12))],
    }
    _voc_annotation(voc, names["a"], masks["a"])
    _voc_annotation(voc, names["b"], masks["b"], void_class=_rect(12, 15, 20, 23))
    _voc_annotation(voc, names["c"], masks["c"])
    _voc_annotation(voc, names["d"], masks["d"])
    _sbd_annotation(sbd, names["a"], [(5, _rect(0, 16, 0, 24))])  # ignored: VOC's own annotation wins
    _sbd_annotation(sbd, names["c"], masks["c"])
    _sbd_annotation(sbd, names["e"], masks["e"])
    _sbd_annotation(sbd, names["f"], masks["f"], cls_override=8, extra_categories=[9])
    lists = voc / "ImageSets" / "Segmentation"
    (lists / "train.txt").write_text(f"{names['a']}\n{names['b']}\n")
    (lists / "val.txt").write_text(f"{names['c']}\n{names['d']}\n")
    (sbd / "train.txt").write_text(f"{names['a']}\n{names['e']}\n")
    (sbd / "val.txt").write_text(f"{names['c']}\n{names['f']}\n")
    return {"voc": voc, "sbd": sbd, "names": names, "masks": masks, "root": tmp_path}


def _decoded(coco: dict) -> dict[str, list[tuple[int, np.ndarray]]]:
    by_image = {im["id"]: im["file_name"][:-4] for im in coco["images"]}
    out: dict[str, list] = {name: [] for name in by_image.values()}
    for ann in coco["annotations"]:
        out[by_image[ann["image_id"]]].append((ann["category_id"], mask_utils.decode(ann["segmentation"]).astype(bool)))
    return out


def _same(found, expected) -> bool:
    return len(found) == len(expected) and all(
        c1 == c2 and (m1 == m2).all() for (c1, m1), (c2, m2) in zip(found, expected))


def test_train_aug_and_val_from_voc_and_sbd(voc_tree, tmp_path):
    t = voc_tree
    out = tmp_path / "voc_out"
    summary = prepare_voc(out, t["voc"].parent, t["sbd"].parent)  # VOCdevkit and benchmark_RELEASE accepted
    names, masks = t["names"], t["masks"]
    train = json.loads((out / "train.json").read_text())
    val = json.loads((out / "val.json").read_text())
    assert [c["name"] for c in train["categories"]] == list(VOC_CLASSES)
    assert [c["id"] for c in train["categories"]] == list(range(1, 21))
    got_train, got_val = _decoded(train), _decoded(val)
    assert sorted(got_train) == sorted(names[k] for k in "abef")  # c is VOC val: not in train_aug
    assert sorted(got_val) == sorted(names[k] for k in "cd")
    for key in "abe":
        assert _same(got_train[names[key]], masks[key]), key  # void band and void-only instance excluded
    assert _same(got_train[names["f"]], masks["f"])  # the SBD class is kept, the cls disagreement counted
    for key in "cd":
        assert _same(got_val[names[key]], masks[key]), key
    conv = summary["source"]["conversion"]
    assert conv["train"] == {"empty_instances": 1, "images_from_sbd_mat": 2, "images_from_voc_png": 2,
                             "instances_without_class": 1, "sbd_class_disagreements": 1}
    assert conv["val"] == {"images_from_voc_png": 2}
    assert summary["splits"]["train"]["instances"] == 6 and summary["splits"]["val"]["instances"] == 3
    assert summary["splits"]["val"]["per_class"]["tvmonitor"] == 2
    assert (out / "images").resolve() == (t["voc"] / "JPEGImages").resolve()
    ann = train["annotations"][0]
    assert ann["bbox"] == [2.0, 2.0, 7.0, 8.0] and ann["area"] == 56.0 and ann["iscrowd"] == 0


def test_without_sbd_train_is_voc_train(voc_tree, tmp_path):
    summary = prepare_voc(tmp_path / "out", voc_tree["voc"])
    assert summary["splits"]["train"]["images"] == 2 and summary["source"]["train_split"] == "voc2012_seg_train"


def test_cocostyle_files_are_validated_and_linked(voc_tree, tmp_path):
    prepare_voc(tmp_path / "first", voc_tree["voc"], voc_tree["sbd"])
    ready = tmp_path / "ready"
    ready.mkdir()
    for split, name in (("train", "voc_2012_train_aug_cocostyle.json"), ("val", "voc_2012_val_cocostyle.json")):
        (ready / name).write_text((tmp_path / "first" / f"{split}.json").read_text())
    summary = prepare_voc_cocostyle(tmp_path / "second", voc_tree["voc"], ready / "voc_2012_train_aug_cocostyle.json",
                                    ready / "voc_2012_val_cocostyle.json")
    assert summary["dataset"] == "voc" and summary["splits"]["train"]["instances"] == 6
    assert (tmp_path / "second" / "images").resolve() == (voc_tree["voc"] / "JPEGImages").resolve()


def _expect_rejection(voc_tree, tmp_path, pattern: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(InputError, match=pattern):
        prepare_voc(out, voc_tree["voc"], voc_tree["sbd"])
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_missing_sbd_file_rejected(voc_tree, tmp_path):
    (voc_tree["sbd"] / "inst" / f"{voc_tree['names']['e']}.mat").unlink()
    _expect_rejection(voc_tree, tmp_path, r"inst/2008_000005.mat: SBD annotation file does not exist")


def test_wrong_category_rejected(voc_tree, tmp_path):
    _sbd_annotation(voc_tree["sbd"], voc_tree["names"]["e"], [(21, _rect(2, 6, 2, 6))])
    _expect_rejection(voc_tree, tmp_path, r"2008_000005.mat: instance 1: category 21 is not a VOC class")


def test_annotation_size_mismatch_rejected(voc_tree, tmp_path):
    Image.new("RGB", (W + 1, H), 0).save(voc_tree["voc"] / "JPEGImages" / "2008_000004.jpg")
    _expect_rejection(voc_tree, tmp_path, r"SegmentationObject/2008_000004.png: 2008_000004: annotation is 24x16 "
                                          r"but .*2008_000004.jpg is 25x16")


def test_rgb_annotation_png_rejected(voc_tree, tmp_path):
    Image.new("RGB", (W, H), 0).save(voc_tree["voc"] / "SegmentationObject" / "2008_000002.png")
    _expect_rejection(voc_tree, tmp_path, r"2008_000002.png: expected an indexed \(palette\) PNG, got mode RGB")


def test_not_a_voc_folder(tmp_path):
    with pytest.raises(InputError, match="not a VOC 2012 folder"):
        prepare_voc(tmp_path / "out", tmp_path)
