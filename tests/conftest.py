"""Shared fixtures: tiny COCO datasets written to ``tmp_path``.

Fixture names are stable; other test files may use them.

``tiny_coco`` -> :class:`TinyCoco`, one split (``instances.json`` + ``images/``)
with every valid oddity the loaders must accept:

| image id | file_name           | pixels                          | annotations (ann id: kind, category id) |
|----------|---------------------|---------------------------------|------------------------------------------|
| 1        | rgb.jpg (40x30)     | RGB JPEG                        | 101: polygon cat 3; 102: compressed RLE cat 7; 103: uncompressed RLE crowd cat 12 |
| 2        | gray.png (40x30)    | grayscale, value 100            | 104: uncompressed RLE cat 12 |
| 5        | rgba.png (40x30)    | RGBA (10, 200, 30, alpha 128)   | 105: two-part polygon cat 7 |
| 6        | sub/palette.png     | palette, colour (250, 20, 60)   | 106: polygon cat 3 |
| 8        | deep16.png (40x30)  | 16-bit gray, value 51400 (->200)| 107: polygon cat 3 |
| 9        | rotated.jpg         | stored 40x30, EXIF orientation 6, json 30x40; stored top half red, bottom blue | 108: polygon cat 12 |
| 11       | empty.png (40x30)   | RGB                             | none |

Category ids are non-contiguous (3 "ring", 7 "cross", 12 "star", listed out
of order). ``TinyCoco.masks[ann_id]`` holds each annotation's expected mask
(``[h, w]`` uint8 at the json size). ``TinyCoco.data()`` returns a fresh
deep copy of the json, to mutate for rejection tests, and ``write(obj, name)``
writes such a dict next to the original and returns its path.

``tiny_coco_splits`` -> :class:`TinyCoco` whose ``train_ann`` holds images
1, 2, 5, 6 and ``val_ann`` images 8, 9, 11, both over the same ``images/``.

Under ``SIMBENCH_STRICT_SKIPS=1`` (set by ``.ci/run``) a skip for a missing
TeX, ``pdfinfo`` or coco128 is a failure (``tests/strict_skips.py``).
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from strict_skips import pytest_runtest_makereport  # noqa: F401 (the hook, registered by its name here)

CATEGORIES = [
    {"id": 12, "name": "star", "supercategory": "shape"},
    {"id": 3, "name": "ring", "supercategory": "shape"},
    {"id": 7, "name": "cross", "supercategory": "shape"},
]
W, H = 40, 30


@dataclass
class TinyCoco:
    root: Path
    image_dir: Path
    ann_path: Path
    base: dict
    masks: dict[int, np.ndarray] = field(default_factory=dict)
    train_ann: Path | None = None
    val_ann: Path | None = None

    def data(self) -> dict:
        """A deep copy of the written json, safe to mutate."""
        return copy.deepcopy(self.base)

    def write(self, obj: dict, name: str = "modified.json") -> Path:
        path = self.root / name
        path.write_text(json.dumps(obj, indent=1))
        return path


def _rect_polygon(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _poly_mask(parts: list[list[float]], h: int, w: int) -> np.ndarray:
    return mask_utils.decode([mask_utils.merge(mask_utils.frPyObjects(parts, h, w))])[:, :, 0]


def _uncompressed_rle(mask: np.ndarray) -> dict:
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for value in flat:
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": [int(c) for c in counts]}


def _box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _write_images(image_dir: Path) -> None:
    (image_dir / "sub").mkdir(parents=True)
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[:, :20] = (200, 40, 40)
    rgb[:, 20:] = (40, 40, 200)
    Image.fromarray(rgb).save(image_dir / "rgb.jpg", quality=95)
    Image.new("L", (W, H), 100).save(image_dir / "gray.png")
    Image.new("RGBA", (W, H), (10, 200, 30, 128)).save(image_dir / "rgba.png")
    pal = Image.new("P", (W, H), 1)
    pal.putpalette([0, 0, 0, 250, 20, 60] + [0, 0, 0] * 254)
    pal.save(image_dir / "sub" / "palette.png")
    Image.fromarray(np.full((H, W), 51400, np.uint16)).save(image_dir / "deep16.png")
    stored = np.zeros((H, W, 3), np.uint8)
    stored[: H // 2] = (255, 0, 0)
    stored[H // 2:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(image_dir / "rotated.jpg", exif=exif, quality=95)
    Image.new("RGB", (W, H), (90, 90, 90)).save(image_dir / "empty.png")


def build_tiny_coco(root: Path) -> TinyCoco:
    image_dir = root / "images"
    _write_images(image_dir)
    images = [
        {"id": 1, "file_name": "rgb.jpg", "width": W, "height": H},
        {"id": 2, "file_name": "gray.png", "width": W, "height": H},
        {"id": 5, "file_name": "rgba.png", "width": W, "height": H},
        {"id": 6, "file_name": "sub/palette.png", "width": W, "height": H},
        {"id": 8, "file_name": "deep16.png", "width": W, "height": H},
        {"id": 9, "file_name": "rotated.jpg", "width": H, "height": W},
        {"id": 11, "file_name": "empty.png", "width": W, "height": H},
    ]
    masks: dict[int, np.ndarray] = {}
    anns = []

    def add(ann_id, image_id, cat, segm, mask, crowd=0, h=H):
        masks[ann_id] = mask
        anns.append({"id": ann_id, "image_id": image_id, "category_id": cat, "segmentation": segm,
                     "area": float(mask.sum()), "bbox": _box(mask), "iscrowd": crowd})

    poly = [_rect_polygon(4, 4, 14, 12)]
    add(101, 1, 3, poly, _poly_mask(poly, H, W))
    blob = np.zeros((H, W), np.uint8)
    blob[10:25, 20:36] = 1
    blob[15:20, 25:30] = 0  # a hole
    rle = mask_utils.encode(np.asfortranarray(blob))
    add(102, 1, 7, {"size": [H, W], "counts": rle["counts"].decode("ascii")}, blob)
    crowd = np.zeros((H, W), np.uint8)
    crowd[20:28, 2:12] = 1
    add(103, 1, 12, _uncompressed_rle(crowd), crowd, crowd=1)
    gray_mask = np.zeros((H, W), np.uint8)
    gray_mask[5:20, 5:30] = 1
    add(104, 2, 12, _uncompressed_rle(gray_mask), gray_mask)
    two = [_rect_polygon(2, 2, 10, 10), _rect_polygon(20, 15, 35, 27)]
    add(105, 5, 7, two, _poly_mask(two, H, W))
    poly6 = [[5.0, 5.0, 30.0, 5.0, 17.5, 25.0]]
    add(106, 6, 3, poly6, _poly_mask(poly6, H, W))
    poly8 = [_rect_polygon(10, 3, 38, 28)]
    add(107, 8, 3, poly8, _poly_mask(poly8, H, W))
    poly9 = [_rect_polygon(3, 20, 25, 36)]
    add(108, 9, 12, poly9, _poly_mask(poly9, W, H))
    base = {"info": {"description": "tiny test set"}, "licenses": [], "images": images,
            "annotations": anns, "categories": CATEGORIES}
    ann_path = root / "instances.json"
    ann_path.write_text(json.dumps(base, indent=1))
    return TinyCoco(root=root, image_dir=image_dir, ann_path=ann_path, base=base, masks=masks)


def split_json(base: dict, image_ids: set[int]) -> dict:
    out = copy.deepcopy(base)
    out["images"] = [im for im in out["images"] if im["id"] in image_ids]
    out["annotations"] = [a for a in out["annotations"] if a["image_id"] in image_ids]
    return out


@pytest.fixture
def tiny_coco(tmp_path: Path) -> TinyCoco:
    return build_tiny_coco(tmp_path / "tiny_coco")


@pytest.fixture
def tiny_coco_splits(tmp_path: Path) -> TinyCoco:
    tiny = build_tiny_coco(tmp_path / "tiny_coco")
    tiny.train_ann = tiny.write(split_json(tiny.base, {1, 2, 5, 6}), "train.json")
    tiny.val_ann = tiny.write(split_json(tiny.base, {8, 9, 11}), "val.json")
    return tiny


# ---------------------------------------------------------------------------
# Engine fixtures: a tiny prepared synthetic dataset and the smoke params.
REPO_ROOT = Path(__file__).resolve().parents[1]
COCO128_ROOT = REPO_ROOT / ".." / "shared" / "datasets" / "coco128"


@pytest.fixture(scope="session")
def smoke_dataset(tmp_path_factory) -> Path:
    """The smoke profile's synthetic dataset, prepared once per test session."""
    from sim_core.config import read_yaml
    from sim_core.data.prepare import prepare_synthetic

    cfg = read_yaml(REPO_ROOT / "experiments" / "profiles" / "smoke.yaml")["synthetic"]
    out = tmp_path_factory.mktemp("smoke") / "synthetic"
    prepare_synthetic(out, cfg)
    return out


@pytest.fixture
def smoke_params(smoke_dataset: Path, tmp_path: Path) -> dict:
    """Smoke params pointing at the prepared data, with runs written under tmp_path."""
    from sim_core.config import read_yaml

    params = read_yaml(REPO_ROOT / "experiments" / "profiles" / "smoke.yaml")
    params["data"]["root"] = str(smoke_dataset)
    params["train"]["runs_dir"] = str(tmp_path / "runs")
    params["train"]["threads"] = 1
    return params


def write_smoke_project(root: Path, data_root: Path, max_iter: int, runs: dict | None = None) -> dict:
    """``root/params.yaml``: the smoke profile on ``data_root``, runs under ``root/runs``, ``max_iter``
    iterations with one checkpoint at the end; ``runs`` replaces the profile's matrix. Returns the params."""
    import yaml

    from sim_core.config import read_yaml

    params = read_yaml(REPO_ROOT / "experiments" / "profiles" / "smoke.yaml")
    params["data"]["root"] = str(data_root)
    params["train"].update(runs_dir=str(root / "runs"), threads=1, max_iter=max_iter, checkpoint_every=max_iter)
    if runs is not None:
        params["runs"] = runs
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return params
