"""``simbench prepare carparts``: the published split, the annotation tool's quirks by name, the counts."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from strict_skips import strict

from sim_core.cli import main
from sim_core.data.carparts import PREVIEW_TILE, prepare_carparts
from sim_core.data.coco import load_coco
from sim_core.errors import InputError

REPO = Path(__file__).resolve().parents[1]
CARPARTS = REPO / ".." / "shared" / "datasets" / "carparts"
PARTS = ["back_bumper", "back_glass", "back_left_door", "back_left_light", "back_right_door", "back_right_light",
         "front_bumper", "front_glass", "front_left_door", "front_left_light", "front_right_door",
         "front_right_light", "hood", "left_mirror", "right_mirror", "tailgate", "trunk", "wheel"]
IMAGE_TOOL_FIELDS = ["annotated", "annotating", "category_ids", "dataset_id", "deleted", "events", "metadata",
                     "milliseconds", "num_annotations", "path", "regenerate_thumbnail"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, dict]:
    if not CARPARTS.is_dir():
        reason = f"carparts not found at {CARPARTS.resolve()} (../shared/datasets/carparts)"
        if strict():  # CI: this data set is part of the environment, like coco128
            pytest.fail(reason)
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("carparts") / "data"
    return out, prepare_carparts(out, CARPARTS)


def test_published_split_and_counts(prepared):
    out, summary = prepared
    assert sorted(p.name for p in out.iterdir()) == ["images", "preview.png", "summary.json", "train.json", "val.json"]
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["dataset"] == "carparts" and summary["num_classes"] == 18
    assert summary["categories"] == [{"id": i + 2, "name": name} for i, name in enumerate(PARTS)]
    train, val = summary["splits"]["train"], summary["splits"]["val"]
    assert (train["images"], val["images"]) == (400, 100)
    assert (train["instances"], val["instances"]) == (3073, 811)
    assert (train["instances_with_masks"], val["instances_with_masks"]) == (3073, 811)
    assert train["crowd"] == val["crowd"] == 0
    assert train["per_class"]["wheel"] == 393 and val["per_class"]["wheel"] == 108
    assert sum(train["per_class"].values()) == 3073 and sum(val["per_class"].values()) == 811
    assert train["skipped"] == val["skipped"] == {"zero_area_box": 0, "no_valid_polygon": 0}
    assert summary["source"]["splits"] == {"train": "trainingset", "val": "testset"}
    for split, folder in (("train", "trainingset"), ("val", "testset")):
        link = out / "images" / split
        assert link.is_symlink() and link.resolve() == (CARPARTS / folder / "JPEGImages").resolve()
    # The prepared files pass the loader's gate again, with every image file where the json says.
    val_data = load_coco(out / "val.json", out / "images")
    assert len({(img["width"], img["height"]) for img in val_data.images.values()}) == 61
    assert all(img["file_name"].startswith("val/") for img in val_data.images.values())
    train_data = load_coco(out / "train.json", out / "images")
    assert {(img["width"], img["height"]) for img in train_data.images.values()} == {(512, 512)}
    assert not set(train_data.images) & set(val_data.images)


def test_quirks_are_handled_by_name_and_counted(prepared):
    out, summary = prepared
    assert summary["source"]["dropped_categories"] == [{"id": 1, "name": "_background_"}]
    quirks = summary["source"]["quirks"]
    for split, n_images, n_anns in (("train", 400, 3073), ("val", 100, 811)):
        q = quirks[split]
        assert q["iscrowd_boolean"] == n_anns and q["background_category"] == 1
        assert q["tool_fields"] == {
            "images": {name: n_images for name in IMAGE_TOOL_FIELDS},
            "annotations": {"color": n_anns, "isbbox": n_anns, "metadata": n_anns},
            "categories": {"color": 19, "keypoint_colors": 19, "metadata": 19},
        }
        stored = json.loads((out / f"{split}.json").read_text())
        assert {type(a["iscrowd"]) for a in stored["annotations"]} == {int}
        assert {k for a in stored["annotations"] for k in a} == {
            "id", "image_id", "category_id", "segmentation", "area", "bbox", "iscrowd"}
        assert {k for img in stored["images"] for k in img} == {"id", "file_name", "width", "height"}
        assert {k for c in stored["categories"] for k in c} == {"id", "name", "supercategory"}
        assert "_background_" not in {c["name"] for c in stored["categories"]}


def test_preview_is_a_grid_of_validation_photographs(prepared):
    out, _ = prepared
    with Image.open(out / "preview.png") as preview:
        preview.load()
        gap = 4
        assert preview.size == (3 * (PREVIEW_TILE + gap) + gap,) * 2
        assert np.asarray(preview).std() > 20


# ------------------------------------------------------------------ the quirks on a tiny copy
def _tiny_export(root: Path) -> dict[str, dict]:
    """A two-split folder laid out like carparts, annotations with the tool's quirks."""
    exports = {}
    for folder, image_id in (("trainingset", 1), ("testset", 2)):
        (root / folder / "JPEGImages").mkdir(parents=True)
        Image.new("RGB", (48, 32), (90, 120, 150)).save(root / folder / "JPEGImages" / f"car{image_id}.jpg")
        exports[folder] = {
            "images": [{"id": image_id, "file_name": f"car{image_id}.jpg", "width": 48, "height": 32,
                        "path": f"JPEGImages/car{image_id}.jpg", "metadata": {}, "deleted": False}],
            "categories": [{"id": 1, "name": "_background_", "supercategory": "", "color": "#93a51d"},
                           {"id": 2, "name": "wheel", "supercategory": "", "color": "#dd8271",
                            "keypoint_colors": []}],
            "annotations": [{"id": 10 + image_id, "image_id": image_id, "category_id": 2,
                             "segmentation": [[4.0, 4.0, 20.0, 4.0, 20.0, 20.0, 4.0, 20.0]], "area": 256,
                             "bbox": [4.0, 4.0, 16.0, 16.0], "iscrowd": False, "isbbox": False,
                             "color": "#e45", "metadata": {}}],
        }
    return exports


def _write(root: Path, exports: dict[str, dict]) -> Path:
    for folder, data in exports.items():
        (root / folder / "annotations.json").write_text(json.dumps(data))
    return root


def test_tiny_export_prepares_through_the_cli(tmp_path, capsys):
    root = _write(tmp_path / "src", _tiny_export(tmp_path / "src"))
    assert main(["prepare", "carparts", "--root", str(root), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "train: 1 boolean iscrowd -> 0/1, 1 empty _background_ category dropped, 9 annotation-tool field " \
           "values removed" in printed
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["num_classes"] == 1 and summary["splits"]["val"]["instances"] == 1
    assert summary["source"]["quirks"]["val"]["tool_fields"] == {
        "images": {"deleted": 1, "metadata": 1, "path": 1}, "annotations": {"color": 1, "isbbox": 1, "metadata": 1},
        "categories": {"color": 2, "keypoint_colors": 1}}


def test_iscrowd_true_becomes_a_counted_crowd(tmp_path):
    exports = _tiny_export(tmp_path / "src")
    exports["testset"]["annotations"][0]["iscrowd"] = True
    summary = prepare_carparts(tmp_path / "out", _write(tmp_path / "src", exports), preview_images=0)
    assert summary["splits"]["val"]["crowd"] == 1 and summary["splits"]["val"]["instances"] == 0
    assert summary["source"]["quirks"]["val"]["iscrowd_boolean"] == 1
    assert not (tmp_path / "out" / "preview.png").exists()


@pytest.mark.parametrize("edit, message", [
    (lambda e: e["testset"]["annotations"][0].update(category_id=1),
     r"category _background_ \(id 1\) has 1 annotations"),
    (lambda e: e["trainingset"]["annotations"][0].update(confidence=0.9),
     r"field 'confidence' is neither COCO's nor one of the annotation tool's known fields"),
    (lambda e: e["trainingset"]["annotations"][0].update(iscrowd="false"),  # text is not a quirk: the gate says no
     r"iscrowd must be 0 or 1, got 'false'"),
    (lambda e: e["testset"]["categories"][1].update(name="tyre"), r"categories differ"),
    (lambda e: e["testset"]["images"][0].update(width=50), r"json says 50x32"),
], ids=["background used", "unknown field", "iscrowd text", "categories differ", "image size"])
def test_bad_exports_are_refused_and_nothing_is_written(tmp_path, edit, message):
    exports = _tiny_export(tmp_path / "src")
    edit(exports)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=message):
        prepare_carparts(out, _write(tmp_path / "src", copy.deepcopy(exports)))
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_missing_folders_and_an_output_inside_the_input_are_refused(tmp_path):
    with pytest.raises(InputError, match="trainingset/annotations.json or trainingset/JPEGImages/ is missing"):
        prepare_carparts(tmp_path / "out", tmp_path)
    root = _write(tmp_path / "src", _tiny_export(tmp_path / "src"))
    with pytest.raises(InputError, match="is or contains the input"):
        prepare_carparts(root, root)
