"""The synthetic dataset: determinism, COCO validity, and the phenomena it must contain."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from scipy import ndimage

from sim_core.data.synthetic import (
    DEFAULT_SYNTHETIC_CFG,
    box_fill_iou,
    generate_image,
    image_rng,
    resolve_synthetic_cfg,
    write_synthetic,
)
from sim_core.errors import InputError

SMALL = {"num_train": 6, "num_val": 9, "seed": 0}
RING = 1  # category id of the ring class


def _write(root: Path, name: str, cfg: dict) -> Path:
    out = root / name
    out.mkdir()
    write_synthetic(out, cfg)
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("syn"), "a", SMALL)


@pytest.fixture(scope="module")
def samples() -> list[tuple[np.ndarray, list[tuple[int, np.ndarray]]]]:
    """Default-config images, enough for the dataset-level phenomena to show up."""
    cfg = resolve_synthetic_cfg({})
    return [generate_image(image_rng(7, 1, i), cfg) for i in range(60)]


def _pixels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted((folder / "images").glob("*.png"))}


def _tight_box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def test_same_seed_gives_identical_bytes_and_pixels(dataset, tmp_path):
    again = _write(tmp_path, "b", SMALL)
    for name in ("train.json", "val.json"):
        assert (dataset / name).read_bytes() == (again / name).read_bytes()
    first, second = _pixels(dataset), _pixels(again)
    assert len(first) == SMALL["num_train"] + SMALL["num_val"]
    assert first.keys() == second.keys()
    assert all(np.array_equal(first[k], second[k]) for k in first)


def test_different_seed_differs(dataset, tmp_path):
    other = _write(tmp_path, "c", {**SMALL, "seed": 1})
    a = json.loads((dataset / "val.json").read_text())["annotations"]
    b = json.loads((other / "val.json").read_text())["annotations"]
    assert [x["segmentation"] for x in a] != [x["segmentation"] for x in b]
    first, second = _pixels(dataset), _pixels(other)
    assert not np.array_equal(first["val_000000.png"], second["val_000000.png"])


def test_val_split_does_not_depend_on_train_size(dataset, tmp_path):
    other = _write(tmp_path, "d", {**SMALL, "num_train": 2})
    a = json.loads((dataset / "val.json").read_text())
    b = json.loads((other / "val.json").read_text())
    assert a["annotations"] == b["annotations"] and a["images"] == b["images"]
    pa, pb = _pixels(dataset), _pixels(other)
    assert all(np.array_equal(pa[k], pb[k]) for k in pb if k.startswith("val_"))


def test_json_is_valid_coco_with_consistent_masks_boxes_areas(dataset):
    for split in ("train", "val"):
        coco = COCO(str(dataset / f"{split}.json"))
        cats = coco.loadCats(coco.getCatIds())
        assert [c["id"] for c in cats] == list(range(1, DEFAULT_SYNTHETIC_CFG["num_classes"] + 1))
        assert cats[0]["name"] == "ring" and all(c["name"] for c in cats)
        assert len(coco.getImgIds()) == SMALL[f"num_{split}"]
        for image_id in coco.getImgIds():
            info = coco.loadImgs(image_id)[0]
            assert (dataset / "images" / info["file_name"]).is_file()
            union = np.zeros((info["height"], info["width"]), dtype=np.int64)
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
                assert isinstance(ann["segmentation"]["counts"], str) and ann["iscrowd"] == 0
                mask = coco.annToMask(ann).astype(bool)
                assert mask.any()
                assert ann["area"] == int(mask.sum())
                assert ann["bbox"] == _tight_box(mask)
                rle = dict(ann["segmentation"], counts=ann["segmentation"]["counts"].encode())
                assert list(mask_utils.toBbox(rle)) == ann["bbox"]
                union += mask
            assert union.max() <= 1, "visible masks of one image overlap"


def test_generate_image_contract(samples):
    cfg = resolve_synthetic_cfg({})
    for image, objects in samples[:10]:
        assert image.dtype == np.uint8 and image.shape == (128, 128, 3)
        for category_id, mask in objects:
            assert 1 <= category_id <= cfg["num_classes"]
            assert mask.dtype == bool and mask.shape == (128, 128)
            assert mask.sum() >= cfg["min_visible_area"]


def test_ring_holes_show_background_inside_the_box(samples):
    holes = 0
    for _, objects in samples:
        union = np.zeros((128, 128), dtype=bool)
        for _, mask in objects:
            union |= mask
        for category_id, mask in objects:
            if category_id == RING:
                hole = ndimage.binary_fill_holes(mask) & ~mask
                holes += int((hole & ~union).sum() > 0)
    assert holes >= 3


def test_same_class_instances_overlap_and_occlude(samples):
    images_with_group = 0
    for _, objects in samples:
        found = False
        for i, (ci, mi) in enumerate(objects):
            for cj, mj in objects[i + 1:]:
                bi, bj = _tight_box(mi), _tight_box(mj)
                overlap_x = min(bi[0] + bi[2], bj[0] + bj[2]) - max(bi[0], bj[0])
                overlap_y = min(bi[1] + bi[3], bj[1] + bj[3]) - max(bi[1], bj[1])
                touching = (ndimage.binary_dilation(mi) & mj).any()  # one occludes the other
                found |= ci == cj and overlap_x > 0 and overlap_y > 0 and touching
        images_with_group += found
    # Chance alone gives about 20% of images (6 classes); the groups lift it to about 60%.
    assert images_with_group >= 0.4 * len(samples)


def test_small_and_medium_objects_present(samples):
    areas = np.array([m.sum() for _, objects in samples for _, m in objects])
    assert 0.1 < (areas < 32 ** 2).mean() < 0.6
    assert (areas >= 32 ** 2).sum() > 0


def test_box_filled_mask_is_a_poor_mask(samples):
    anns = [{"area": int(m.sum()), "bbox": _tight_box(m)} for _, objects in samples for _, m in objects]
    iou = box_fill_iou(anns)
    assert 0.45 < iou.mean() < 0.7
    assert (iou < 0.5).mean() > 0.2


def _close_boundary_fraction(cfg: dict, count: int = 25) -> float:
    """Share of (object pixel, background pixel 2 px away) pairs with nearly equal colour."""
    close = []
    for i in range(count):
        image, objects = generate_image(image_rng(3, 0, i), cfg)
        image = image.astype(np.float64)
        owner = np.zeros(image.shape[:2], dtype=np.int64)
        for k, (_, mask) in enumerate(objects, 1):
            owner[mask] = k
        for dy, dx in ((2, 0), (-2, 0), (0, 2), (0, -2)):
            ys, xs = np.nonzero(owner[2:-2, 2:-2] > 0)
            ys, xs = ys + 2, xs + 2
            outside = owner[ys + dy, xs + dx] == 0
            diff = image[ys, xs] - image[ys + dy, xs + dx]
            close.append(np.linalg.norm(diff, axis=1)[outside] < 12.0)
    return float(np.concatenate(close).mean())


def test_low_contrast_objects_blend_into_background_in_places():
    none = _close_boundary_fraction({"p_low_contrast": 0.0, "noise_std": 0.0})
    every = _close_boundary_fraction({"p_low_contrast": 1.0, "noise_std": 0.0})
    assert none < 0.005 < 0.015 < every


def test_preview_is_a_grid_png(dataset):
    preview = Image.open(dataset / "preview.png")
    preview.load()
    # 9 val images -> 3 x 3 tiles of 256 px with 4 px gaps.
    assert preview.size == (3 * 260 + 4, 3 * 260 + 4)
    assert np.asarray(preview).std() > 10


def test_num_classes_limits_categories(tmp_path):
    out = _write(tmp_path, "e", {"num_train": 3, "num_val": 3, "num_classes": 2, "preview_images": 0})
    data = json.loads((out / "train.json").read_text())
    assert [c["id"] for c in data["categories"]] == [1, 2]
    assert {a["category_id"] for a in data["annotations"]} <= {1, 2}
    assert not (out / "preview.png").exists()


def test_defaults_are_complete_and_valid():
    assert resolve_synthetic_cfg({}) == DEFAULT_SYNTHETIC_CFG
    assert resolve_synthetic_cfg(None)["image_size"] == 128


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"colour": 1}, "unknown key"),
        ({"num_classes": 7}, "num_classes"),
        ({"min_objects": 4, "max_objects": 2}, "min_objects"),
        ({"p_small": 1.5}, "p_small"),
        ({"small_size": [30, 12]}, "small_size"),
        ({"large_size": "big"}, "large_size"),
        ({"num_train": 2.5}, "num_train"),
        ({"seed": True}, "seed"),
        ({"p_camouflage": 0.7, "p_background_patch": 0.7}, "p_background_patch"),
    ],
)
def test_bad_config_raises_input_error(override, key):
    with pytest.raises(InputError, match=key) as info:
        resolve_synthetic_cfg(override)
    assert "synthetic" in str(info.value)
