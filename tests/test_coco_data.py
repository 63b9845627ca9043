"""COCO loading, validation, image reading and the training dataset."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from sim_core.data.coco import load_coco
from sim_core.data.validate import rle_counts as _compressed_counts
from sim_core.data.dataset import CocoDetectionDataset, collate
from sim_core.data.images import image_size, read_image_rgb
from sim_core.data.prepare import prepare_custom
from sim_core.data.transforms import resized_shape
from sim_core.errors import InputError

COCO128 = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "coco128"


# ---------------------------------------------------------------- images
def test_image_modes_become_rgb_uint8(tiny_coco):
    d = tiny_coco.image_dir
    gray = read_image_rgb(d / "gray.png")
    assert gray.shape == (30, 40, 3) and gray.dtype == np.uint8 and (gray == 100).all()
    assert (read_image_rgb(d / "rgba.png") == np.array([10, 200, 30], np.uint8)).all()
    assert (read_image_rgb(d / "sub" / "palette.png") == np.array([250, 20, 60], np.uint8)).all()
    assert (read_image_rgb(d / "deep16.png") == 200).all()  # 51400 / 257, not clipped to 255


def test_exif_orientation_applied_to_pixels_and_size(tiny_coco):
    path = tiny_coco.image_dir / "rotated.jpg"
    assert image_size(path) == (40, 30)
    img = read_image_rgb(path).astype(int)
    assert img.shape == (40, 30, 3)
    # orientation 6: the stored top (red) is shown on the right, the bottom (blue) on the left
    assert img[:, 20:, 0].mean() > 200 and img[:, 20:, 2].mean() < 50
    assert img[:, :10, 2].mean() > 200 and img[:, :10, 0].mean() < 50


def test_undecodable_image_names_file(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(InputError, match="bad.jpg.*cannot decode"):
        read_image_rgb(bad)
    with pytest.raises(InputError, match="bad.jpg.*cannot decode"):
        image_size(bad)


def test_read_checks_expected_size(tiny_coco):
    with pytest.raises(InputError, match="gray.png.*40x30.*annotations say 41x30"):
        read_image_rgb(tiny_coco.image_dir / "gray.png", expected_size=(30, 41))


# ---------------------------------------------------------------- loading
def test_accepts_every_valid_oddity(tiny_coco):
    data = load_coco(tiny_coco.ann_path, tiny_coco.image_dir, decode_images=True)
    assert data.image_ids == [1, 2, 5, 6, 8, 9, 11]
    assert data.annotations[11] == []
    assert sum(len(v) for v in data.annotations.values()) == 8
    assert [a["iscrowd"] for a in data.annotations[1]] == [0, 0, 1]
    # non-contiguous ids -> labels in ascending id order, and back
    assert data.cat_id_to_label == {3: 0, 7: 1, 12: 2}
    assert data.label_to_cat_id == {0: 3, 1: 7, 2: 12}
    assert data.class_names == ["ring", "cross", "star"]
    assert data.skipped == {"zero_area_box": 0, "no_valid_polygon": 0}
    assert data.fixed == {"clipped_box": 0, "degenerate_polygon_part": 0}
    out = data.to_json()
    assert [c["id"] for c in out["categories"]] == [3, 7, 12]
    assert out["info"] == {"description": "tiny test set"}


def test_clipping_and_zero_area_skips_are_counted(tiny_coco, tmp_path):
    d = tiny_coco.data()
    base = dict(d["annotations"][0])
    d["annotations"] += [
        dict(base, id=201, bbox=[-5.0, 20.0, 15.0, 20.0]),  # clipped to [0, 20, 10, 10]
        dict(base, id=202, bbox=[10.0, 10.0, 0.0, 5.0]),    # zero width
        dict(base, id=203, bbox=[50.0, 10.0, 5.0, 5.0]),    # entirely right of the image
        dict(base, id=204, segmentation=[[1, 1, 2, 2], [4, 4, 14, 4, 14, 12]]),  # one degenerate part
        dict(base, id=205, segmentation=[[1, 1, 2, 2]]),    # nothing valid left
    ]
    del d["annotations"][1]["area"]
    data = load_coco(tiny_coco.write(d), tiny_coco.image_dir)
    anns = {a["id"]: a for a in data.annotations[1]}
    assert anns[201]["bbox"] == [0.0, 20.0, 10.0, 10.0]
    assert 202 not in anns and 203 not in anns and 205 not in anns
    assert anns[204]["segmentation"] == [[4, 4, 14, 4, 14, 12]]
    assert anns[102]["area"] == float(tiny_coco.masks[102].sum())  # computed when missing
    assert data.skipped == {"zero_area_box": 2, "no_valid_polygon": 1}
    assert data.fixed == {"clipped_box": 1, "degenerate_polygon_part": 2}
    assert anns[101]["bbox"] == tiny_coco.base["annotations"][0]["bbox"]  # inside boxes untouched


def test_compressed_counts_match_pycocotools():
    rng = np.random.default_rng(0)
    for trial in range(50):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        mask = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        if trial % 5 == 0:
            mask[:] = trial % 2
        rle = mask_utils.encode(np.asfortranarray(mask))
        counts = _compressed_counts(rle["counts"].decode())
        assert sum(counts) == h * w
        flat = mask.flatten(order="F")
        assert counts[0] == (len(flat) if not flat.any() else int(np.argmax(flat)))
        rebuilt = np.concatenate([np.full(c, i % 2, np.uint8) for i, c in enumerate(counts)])
        assert (rebuilt == flat).all()
    assert _compressed_counts("0") == [0]
    assert _compressed_counts("\x01") is None  # below the character range
    assert _compressed_counts("o") is None  # continuation bit set, then the string ends


def _set(path, value):
    def edit(d):
        obj = d
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value
    return edit


def _ann(index, **changes):
    def edit(d):
        d["annotations"][index].update(changes)
    return edit


def _image(index, **changes):
    def edit(d):
        d["images"][index].update(changes)
    return edit


def _delete(key):
    def edit(d):
        del d[key]
    return edit


REJECTIONS = {
    "missing_key": (_delete("annotations"), None, "missing top-level key(s): annotations"),
    "duplicate_image_id": (_image(1, id=1), "images[1] (id 1)", "duplicate image id"),
    "duplicate_ann_id": (_ann(1, id=101), "annotations[1] (id 101)", "duplicate annotation id"),
    "unknown_image": (_ann(0, image_id=999), "annotations[0] (id 101)", "image_id 999 is not in 'images'"),
    "unknown_category": (_ann(0, category_id=4), "annotations[0] (id 101)", "category_id 4 is not in 'categories'"),
    "negative_box": (_ann(0, bbox=[4, 4, -3, 8]), "annotations[0] (id 101)", "negative width or height"),
    "short_box": (_ann(0, bbox=[4, 4, 3]), "annotations[0] (id 101)", "bbox must be [x, y, width, height]"),
    "missing_image": (_image(1, file_name="nope.png"), "image id 2 (nope.png)", "nope.png does not exist"),
    "size_mismatch": (_image(2, width=41), "image id 5 (rgba.png)", "json says 41x30"),
    "exif_size": (_image(5, width=40, height=30), "image id 9 (rotated.jpg)", "is 30x40 after EXIF orientation"),
    "odd_polygon": (_ann(0, segmentation=[[1, 2, 3, 4, 5, 6, 7]]), "annotations[0] (id 101)", "even number"),
    "text_polygon": (_ann(0, segmentation=[["a", 1, 2, 3, 4, 5]]), "annotations[0] (id 101)", "flat list of finite numbers"),
    "segm_string": (_ann(0, segmentation="abc"), "annotations[0] (id 101)", "polygon list or an RLE dict"),
    "rle_sum": (_set(["annotations", 3, "segmentation", "counts"], [5, 10]), "annotations[3] (id 104)",
                "RLE counts cover 15 pixels, the image has 1200"),
    "rle_corrupt": (_set(["annotations", 1, "segmentation", "counts"], "\x01\x02"), "annotations[1] (id 102)",
                    "compressed RLE counts string is corrupt"),
    "rle_size": (_set(["annotations", 3, "segmentation", "size"], [10, 10]), "annotations[3] (id 104)",
                 "RLE size [10, 10] differs"),
    "bad_crowd": (_ann(0, iscrowd=2), "annotations[0] (id 101)", "iscrowd must be 0 or 1"),
    "no_file_name": (_image(0, file_name=""), "images[0] (id 1)", "non-empty 'file_name'"),
    "escaping_name": (_image(0, file_name="../x.jpg"), "images[0] (id 1, '../x.jpg')", "relative path inside"),
}


def _assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    if out.parent.exists():
        assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []


@pytest.mark.parametrize("case", sorted(REJECTIONS))
def test_rejections_name_file_record_problem(tiny_coco, tmp_path, case):
    edit, record, problem = REJECTIONS[case]
    d = tiny_coco.data()
    edit(d)
    bad = tiny_coco.write(d, "broken_train.json")
    out = tmp_path / "prepared" / "out"
    with pytest.raises(InputError) as info:
        prepare_custom(out, tiny_coco.image_dir, bad, tiny_coco.ann_path)
    message = str(info.value)
    assert message.startswith(str(bad)), message
    if record is not None:
        assert f": {record}: " in message, message
    assert problem in message, message
    _assert_nothing_left(out)


def test_undecodable_image_is_rejected(tiny_coco, tmp_path):
    (tiny_coco.image_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    d = tiny_coco.data()
    d["images"][1]["file_name"] = "broken.png"
    bad = tiny_coco.write(d, "broken_train.json")
    out = tmp_path / "prepared" / "out"
    with pytest.raises(InputError, match=r"broken_train.json: image id 2 \(broken.png\): .*broken.png: cannot decode"):
        prepare_custom(out, tiny_coco.image_dir, bad, tiny_coco.ann_path)
    _assert_nothing_left(out)


@pytest.mark.parametrize("text, where", [
    ("truncated", "line 4"),
    ('{"images": [], "annotations": [], }', "line 1 column 35"),
    ("[1, 2]", "top level must be a JSON object"),
])
def test_bad_json_text(tiny_coco, tmp_path, text, where):
    if text == "truncated":
        text = "\n".join(json.dumps(tiny_coco.base, indent=1).splitlines()[:4])
    bad = tiny_coco.root / "bad.json"
    bad.write_text(text)
    out = tmp_path / "prepared" / "out"
    with pytest.raises(InputError) as info:
        prepare_custom(out, tiny_coco.image_dir, tiny_coco.ann_path, bad)
    assert str(info.value).startswith(f"{bad}: ") and where in str(info.value)
    _assert_nothing_left(out)


# ---------------------------------------------------------------- dataset
def _dataset(tiny, **kw):
    data = load_coco(tiny.ann_path, tiny.image_dir)
    args = dict(train=False, sizes=[60], max_size=1000, flip_prob=0.0)
    args.update(kw)
    return CocoDetectionDataset(data, **args)


def test_sample_format_and_masks(tiny_coco):
    ds = _dataset(tiny_coco)
    assert len(ds) == 7  # evaluation keeps the empty image
    image, target = ds[0]  # image 1, 40x30 -> short side 60: scale 2
    assert image.dtype == torch.uint8 and image.shape == (3, 60, 80)
    assert set(target) == {"boxes", "labels", "masks", "image_id", "orig_size"}
    assert target["image_id"] == 1 and target["orig_size"] == (30, 40)
    assert target["labels"].tolist() == [0, 1]  # crowd 103 left out; cat 3 -> 0, cat 7 -> 1
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    expected_boxes = [[2 * x, 2 * y, 2 * (x + w), 2 * (y + h)]
                      for x, y, w, h in (a["bbox"] for a in tiny_coco.base["annotations"][:2])]
    assert torch.allclose(target["boxes"], torch.tensor(expected_boxes))
    masks = target["masks"]
    assert masks.dtype == torch.uint8 and masks.shape == (2, 60, 80)
    for k, ann_id in enumerate((101, 102)):  # polygon and compressed RLE, upscaled by exactly 2
        up = np.kron(tiny_coco.masks[ann_id], np.ones((2, 2), np.uint8))
        assert (masks[k].numpy() == up).all()


def test_image_cache_gives_the_same_samples_and_survives_writes(tiny_coco, monkeypatch):
    plain = _dataset(tiny_coco, sizes=[30])
    cached = _dataset(tiny_coco, sizes=[30], cache_images=True)
    first = [cached[i][0].clone() for i in range(len(cached))]
    assert all(torch.equal(first[i], plain[i][0]) for i in range(len(plain)))
    image, _ = cached[0]  # at its original size: no resize, so a cache hit must hand out a copy
    image.zero_()
    import sim_core.data.dataset as dataset_module

    def no_more_reads(*args, **kwargs):
        raise AssertionError("a cached image was decoded again")

    monkeypatch.setattr(dataset_module, "read_image_rgb", no_more_reads)
    assert all(torch.equal(cached[i][0], first[i]) for i in range(len(cached)))


def test_uncompressed_rle_and_rotated_image(tiny_coco):
    ds = _dataset(tiny_coco, sizes=[30])
    ids = ds.image_ids
    _, gray = ds[ids.index(2)]
    assert (gray["masks"][0].numpy() == tiny_coco.masks[104]).all()
    image, rotated = ds[ids.index(9)]
    assert image.shape == (3, 40, 30) and rotated["orig_size"] == (40, 30)
    assert (rotated["masks"][0].numpy() == tiny_coco.masks[108]).all()
    _, empty = ds[ids.index(11)]
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 30, 40)


def test_flip_mirrors_image_boxes_masks(tiny_coco):
    plain = _dataset(tiny_coco, sizes=[30])
    flipped = _dataset(tiny_coco, train=True, sizes=[30], flip_prob=1.0, drop_empty=False)
    (im0, t0), (im1, t1) = plain[0], flipped[0]
    assert torch.equal(im1, im0.flip(-1)) and torch.equal(t1["masks"], t0["masks"].flip(-1))
    b = t0["boxes"]
    assert torch.allclose(t1["boxes"], torch.stack([40 - b[:, 2], b[:, 1], 40 - b[:, 0], b[:, 3]], 1))


def test_training_drops_images_without_instances(tiny_coco):
    ds = _dataset(tiny_coco, train=True)
    assert ds.image_ids == [1, 2, 5, 6, 8, 9]


def test_augmentation_is_deterministic_per_seed_epoch_index(tiny_coco):
    def shapes(ds):
        return [tuple(ds[i][0].shape) + (bool(ds[i][1]["boxes"][0, 0] > 40),) for i in range(len(ds))]

    make = lambda seed: _dataset(tiny_coco, train=True, sizes=[20, 30, 45, 60], flip_prob=0.5, seed=seed)
    a, b = make(7), make(7)
    assert shapes(a) == shapes(b)
    draws = {tuple(shapes(make(s))) for s in range(6)}
    assert len(draws) > 1
    a.set_epoch(1)
    b.set_epoch(1)
    assert shapes(a) == shapes(b)
    torch.manual_seed(0)
    unseeded = _dataset(tiny_coco, train=True, sizes=[20, 30, 45, 60], flip_prob=0.5)
    first = shapes(unseeded)
    torch.manual_seed(0)
    assert shapes(unseeded) == first  # the global generator drives it when no seed is set


def test_resize_caps_long_side_and_collate(tiny_coco):
    assert resized_shape(30, 40, 60, 1000) == (60, 80)
    assert resized_shape(30, 40, 60, 50) == (38, 50)
    images, targets = collate([(torch.zeros(3, 2, 2), {"image_id": 1}), (torch.zeros(3, 4, 5), {"image_id": 2})])
    assert [im.shape[-1] for im in images] == [2, 5] and [t["image_id"] for t in targets] == [1, 2]


# ---------------------------------------------------------------- real data
def test_coco128_loads_everything():
    if not (COCO128 / "annotations" / "instances_train2017.json").is_file():
        pytest.skip(f"coco128 not found at {COCO128.resolve()}")
    data = load_coco(COCO128 / "annotations" / "instances_train2017.json", COCO128 / "images")
    anns = [a for lst in data.annotations.values() for a in lst]
    assert len(data.images) == 128 and len(anns) == 939
    assert sum(a["iscrowd"] for a in anns) == 10 and data.num_classes == 80
    ds = CocoDetectionDataset(data, train=False, sizes=[128], max_size=200, flip_prob=0.0)
    crowd_image = next(a["image_id"] for a in anns if a["iscrowd"])
    image, target = ds[ds.image_ids.index(crowd_image)]
    assert tuple(image.shape) == (3, *resized_shape(*target["orig_size"], 128, 200))
    n = sum(1 for a in data.annotations[crowd_image] if not a["iscrowd"])
    assert target["masks"].shape[0] == n and (target["masks"].flatten(1).sum(1) > 0).all()
