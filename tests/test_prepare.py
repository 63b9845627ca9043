"""``prepare`` for every dataset kind: layout, links, summary, atomicity."""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import types
from pathlib import Path

import pytest
from strict_skips import COCO128_MISSING

import sim_core.data.synthetic  # noqa: F401 (the real generator: a broken import fails here, never skips)
from sim_core.data.coco import load_coco
from sim_core.data.prepare import COCO128_HINT, prepare_coco, prepare_coco128, prepare_custom, prepare_synthetic
from sim_core.data.summary import size_bin
from sim_core.errors import InputError

REPO = Path(__file__).resolve().parents[1]
COCO128 = REPO / ".." / "shared" / "datasets" / "coco128"


def _leftovers(out: Path) -> list[str]:
    if not out.parent.exists():
        return []
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def _instances(data) -> list[dict]:
    return sorted((a for lst in data.annotations.values() for a in lst), key=lambda a: a["id"])


def test_custom_round_trip(tiny_coco_splits, tmp_path):
    tiny = tiny_coco_splits
    out = tmp_path / "prepared"
    summary = prepare_custom(out, tiny.image_dir, tiny.train_ann, tiny.val_ann)
    assert sorted(p.name for p in out.iterdir()) == ["images", "summary.json", "train.json", "val.json"]
    assert (out / "images").is_symlink() and (out / "images").resolve() == tiny.image_dir.resolve()
    assert json.loads((out / "summary.json").read_text()) == summary
    for split, source in (("train", tiny.train_ann), ("val", tiny.val_ann)):
        again = load_coco(out / f"{split}.json", out / "images", decode_images=True)
        original = load_coco(source, tiny.image_dir)
        assert _instances(again) == _instances(original)
        assert again.images == original.images and again.cat_id_to_label == original.cat_id_to_label
    train, val = summary["splits"]["train"], summary["splits"]["val"]
    assert summary["dataset"] == "custom" and summary["num_classes"] == 3
    assert [c["id"] for c in summary["categories"]] == [3, 7, 12]
    assert train["images"] == 4 and train["instances"] == 5 and train["crowd"] == 1
    assert train["per_class"] == {"ring": 2, "cross": 2, "star": 1}
    assert train["sizes"] == {"small": 5, "medium": 0, "large": 0}
    assert val["images"] == 3 and val["images_without_annotations"] == 1 and val["images_without_instances"] == 1
    assert val["per_class"] == {"ring": 1, "cross": 0, "star": 1}


def test_size_bins_follow_coco_thresholds():
    assert [size_bin(a) for a in (0, 1023.9, 1024, 9215.5, 9216, 1e6)] == [
        "small", "small", "medium", "medium", "large", "large"]


def test_summary_counts_repairs(tiny_coco_splits, tmp_path):
    tiny = tiny_coco_splits
    train = json.loads(tiny.train_ann.read_text())
    first = train["annotations"][0]
    train["annotations"] += [dict(first, id=301, bbox=[30.0, 25.0, 20.0, 20.0]),
                             dict(first, id=302, bbox=[45.0, 5.0, 3.0, 3.0])]
    summary = prepare_custom(tmp_path / "out", tiny.image_dir, tiny.write(train, "t2.json"), tiny.val_ann)
    split = summary["splits"]["train"]
    assert split["skipped"]["zero_area_box"] == 1 and split["fixed"]["clipped_box"] == 1
    assert split["instances"] == 6
    stored = json.loads((tmp_path / "out" / "train.json").read_text())
    assert {a["id"]: a["bbox"] for a in stored["annotations"]}[301] == [30.0, 25.0, 10.0, 5.0]
    assert 302 not in {a["id"] for a in stored["annotations"]}


def test_custom_categories_must_agree(tiny_coco_splits, tmp_path):
    tiny = tiny_coco_splits
    val = json.loads(tiny.val_ann.read_text())
    val["categories"][0]["name"] = "asterisk"
    bad = tiny.write(val, "val_renamed.json")
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"val_renamed.json: categories differ from train.json"):
        prepare_custom(out, tiny.image_dir, tiny.train_ann, bad)
    assert not out.exists() and _leftovers(out) == []


def test_output_may_not_replace_an_input(tiny_coco_splits):
    tiny = tiny_coco_splits
    with pytest.raises(InputError, match="--out: .* is or contains the input"):
        prepare_custom(tiny.root, tiny.image_dir, tiny.train_ann, tiny.val_ann)
    assert (tiny.image_dir / "rgb.jpg").is_file() and tiny.train_ann.is_file()


def test_prepare_replaces_previous_output(tiny_coco_splits, tmp_path):
    tiny = tiny_coco_splits
    out = tmp_path / "out"
    prepare_custom(out, tiny.image_dir, tiny.train_ann, tiny.val_ann)
    (out / "stale.txt").write_text("from an older run")
    summary = prepare_custom(out, tiny.image_dir, tiny.val_ann, tiny.val_ann)
    assert not (out / "stale.txt").exists() and summary["splits"]["train"]["images"] == 3
    assert _leftovers(out) == []


def _coco_layout(tiny, root: Path) -> Path:
    shutil.copytree(tiny.image_dir, root / "train2017")
    shutil.copytree(tiny.image_dir, root / "val2017")
    (root / "annotations").mkdir()
    shutil.copy(tiny.train_ann, root / "annotations" / "instances_train2017.json")
    shutil.copy(tiny.val_ann, root / "annotations" / "instances_val2017.json")
    return root


def test_coco_links_and_prefixes(tiny_coco_splits, tmp_path):
    root = _coco_layout(tiny_coco_splits, tmp_path / "coco")
    out = tmp_path / "out"
    summary = prepare_coco(out, root)
    for split in ("train2017", "val2017"):
        link = out / "images" / split
        assert link.is_symlink() and link.resolve() == (root / split).resolve()
    assert [p.name for p in (out / "images").iterdir() if not p.is_symlink()] == []
    train = json.loads((out / "train.json").read_text())
    assert {im["file_name"] for im in train["images"]} == {
        "train2017/rgb.jpg", "train2017/gray.png", "train2017/rgba.png", "train2017/sub/palette.png"}
    reloaded = load_coco(out / "val.json", out / "images")
    assert [im["file_name"] for im in reloaded.images.values()] == [
        "val2017/deep16.png", "val2017/rotated.jpg", "val2017/empty.png"]
    assert summary["dataset"] == "coco" and summary["splits"]["val"]["instances"] == 2


def test_coco_names_missing_parts(tmp_path):
    (tmp_path / "coco" / "train2017").mkdir(parents=True)
    with pytest.raises(InputError) as info:
        prepare_coco(tmp_path / "out", tmp_path / "coco")
    message = str(info.value)
    assert message.startswith(str(tmp_path / "coco")) and "missing val2017/, annotations/instances_train2017.json" in message
    assert not (tmp_path / "out").exists()


def test_coco_rejects_bad_val_before_writing(tiny_coco_splits, tmp_path):
    root = _coco_layout(tiny_coco_splits, tmp_path / "coco")
    (root / "val2017" / "rotated.jpg").unlink()
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"instances_val2017.json: image id 9 \(rotated.jpg\): .*does not exist"):
        prepare_coco(out, root)
    assert not out.exists() and _leftovers(out) == []


def test_coco128_split_by_id_with_explicit_root(tiny_coco, tmp_path):
    root = tmp_path / "small"
    shutil.copytree(tiny_coco.image_dir, root / "images")
    (root / "annotations").mkdir()
    shutil.copy(tiny_coco.ann_path, root / "annotations" / "instances_train2017.json")
    summary = prepare_coco128(tmp_path / "out", root=root)
    train = load_coco(tmp_path / "out" / "train.json", tmp_path / "out" / "images")
    val = load_coco(tmp_path / "out" / "val.json", tmp_path / "out" / "images")
    assert train.image_ids == [1, 2, 5, 6, 8] and val.image_ids == [9, 11]  # round(7 * 100 / 128) = 5
    assert summary["splits"]["val"]["images"] == 2


def test_coco128_without_default_says_what_root_needs(tmp_path, monkeypatch):
    (tmp_path / "somewhere").mkdir()
    monkeypatch.chdir(tmp_path / "somewhere")
    with pytest.raises(InputError, match="coco128: no copy at the default .*" + re.escape(COCO128_HINT)):
        prepare_coco128(tmp_path / "out")
    with pytest.raises(InputError, match="somewhere: --root must name a COCO-layout folder"):
        prepare_coco128(tmp_path / "out", root=tmp_path / "somewhere")
    assert not (tmp_path / "out").exists()


def test_coco128_real_default_root(tmp_path, monkeypatch):
    if not (COCO128 / "annotations" / "instances_train2017.json").is_file():
        pytest.skip(f"{COCO128_MISSING} {COCO128.resolve()}")
    monkeypatch.chdir(REPO)
    summary = prepare_coco128(tmp_path / "out")
    train, val = summary["splits"]["train"], summary["splits"]["val"]
    assert (train["images"], val["images"]) == (100, 28)
    assert train["instances"] + train["crowd"] + val["instances"] + val["crowd"] == 939
    assert train["crowd"] + val["crowd"] == 10
    assert os.path.realpath(tmp_path / "out" / "images") == str((COCO128 / "images").resolve())


def _generator_module(tiny, fail: bool = False) -> types.ModuleType:
    """Stands in for the synthetic generator: writes the tiny splits, or dies half-way."""
    module = types.ModuleType("sim_core.data.synthetic")

    def write_synthetic(out_dir: Path, cfg: dict) -> None:
        shutil.copytree(tiny.image_dir, out_dir / "images")
        shutil.copy(tiny.train_ann, out_dir / "train.json")
        if fail:
            raise RuntimeError("generator died")
        shutil.copy(tiny.val_ann, out_dir / "val.json")

    module.write_synthetic = write_synthetic
    return module


def test_synthetic_wrapper_adds_summary(tiny_coco_splits, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sim_core.data.synthetic", _generator_module(tiny_coco_splits))
    summary = prepare_synthetic(tmp_path / "out", {"seed": 3})
    assert summary["dataset"] == "synthetic" and summary["source"]["config"] == {"seed": 3}
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary


def test_synthetic_failure_leaves_nothing(tiny_coco_splits, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sim_core.data.synthetic", _generator_module(tiny_coco_splits, fail=True))
    with pytest.raises(RuntimeError, match="generator died"):
        prepare_synthetic(tmp_path / "out", {})
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path / "out") == []


def test_synthetic_with_the_real_generator(tmp_path):
    cfg = {"num_train": 3, "num_val": 2, "image_size": 64, "preview_images": 2, "seed": 1}
    summary = prepare_synthetic(tmp_path / "out", cfg)
    assert (tmp_path / "out" / "preview.png").is_file()
    assert summary["splits"]["train"]["images"] == 3 and summary["splits"]["val"]["images"] == 2
