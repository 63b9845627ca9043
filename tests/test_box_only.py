"""A researcher's own box-only data, end to end: prepare custom, train, evaluate, predict.

Box-only annotations (no ``segmentation``, or an empty one) are the normal
case for box supervision. coco128 with its masks stripped and each split in
its own image folder (as annotation tools export) goes through ``prepare
custom``; BoxInst and SIM train on it, evaluation scores it, ``predict``
renders it; ``mask`` (which needs masks) is refused before any work.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from sim_core.cli import main

REPO = Path(__file__).resolve().parents[1]
COCO128 = REPO / ".." / "shared" / "datasets" / "coco128"


def _strip_masks(data: dict, every: bool = True) -> dict:
    out = copy.deepcopy(data)
    for index, ann in enumerate(out["annotations"]):
        if every or index % 2:
            if index % 3:
                ann.pop("segmentation", None)  # no key at all
            else:
                ann["segmentation"] = []  # what some tools write for "no mask"
            ann.pop("area", None)
    return out


@pytest.fixture(scope="module")
def box_only_coco128(tmp_path_factory) -> Path:
    """coco128 without masks, train and val images in folders of their own, a project params.yaml."""
    if not (COCO128 / "annotations" / "instances_train2017.json").is_file():
        pytest.skip("coco128 not found at ../shared/datasets/coco128")
    root = tmp_path_factory.mktemp("box_only")
    raw = json.loads((COCO128 / "annotations" / "instances_train2017.json").read_text())
    ids = sorted(image["id"] for image in raw["images"])
    for split, chosen in (("train", set(ids[:100])), ("val", set(ids[100:]))):
        folder = root / "export" / split
        folder.mkdir(parents=True)
        part = {**raw, "images": [im for im in raw["images"] if im["id"] in chosen],
                "annotations": [a for a in raw["annotations"] if a["image_id"] in chosen]}
        part["categories"] = raw["categories"] + [{"id": 999, "name": "_background_", "supercategory": "none"}]
        for image in part["images"]:
            (folder / image["file_name"]).symlink_to((COCO128 / "images" / image["file_name"]).resolve())
        (root / "export" / f"{split}.json").write_text(json.dumps(_strip_masks(part)))
    params = yaml.safe_load((REPO / "experiments" / "profiles" / "smoke.yaml").read_text())
    params["data"].update(dataset="custom", root=str(root / "data"), train_sizes=[96], max_size=128, test_size=96)
    params["train"].update(runs_dir=str(root / "runs"), threads=1, max_iter=2, checkpoint_every=2)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["prepare", "custom", "--train-images", str(root / "export" / "train"),
                 "--val-images", str(root / "export" / "val"), "--train-ann", str(root / "export" / "train.json"),
                 "--val-ann", str(root / "export" / "val.json"), "--out", str(root / "data")]) == 0
    return root


def test_prepare_counts_masks_and_drops_unused_categories(box_only_coco128):
    summary = json.loads((box_only_coco128 / "data" / "summary.json").read_text())
    assert summary["splits"]["train"]["instances"] > 0
    assert summary["splits"]["train"]["instances_with_masks"] == 0
    assert summary["splits"]["val"]["instances_with_masks"] == 0
    dropped = {c["name"] for c in summary["source"]["dropped_unused_categories"]}
    assert "_background_" in dropped  # and every COCO class coco128 never shows
    assert summary["num_classes"] == 80 - len(dropped - {"_background_"})
    train = json.loads((box_only_coco128 / "data" / "train.json").read_text())
    assert all(im["file_name"].startswith("train/") for im in train["images"])
    assert all(a["area"] > 0 and "segmentation" not in a for a in train["annotations"])


@pytest.mark.parametrize("run", ["boxinst_s0", "sim_s0"])
def test_box_supervised_methods_train_evaluate_and_predict(box_only_coco128, run, capsys):
    params = str(box_only_coco128 / "params.yaml")
    assert main(["train", "--run", run, "--params", params, "--no-progress"]) == 0
    assert "supervision diagnostics off: " in capsys.readouterr().out
    assert main(["evaluate", "--run", run, "--params", params]) == 0
    captured = capsys.readouterr()
    assert "mask AP cannot be computed" in captured.err
    metrics = json.loads((box_only_coco128 / "runs" / run / "metrics.json").read_text())
    assert all(v is None for v in metrics["segm"].values()) and metrics["bbox"]["AP"] is not None
    assert "segm_unavailable" in metrics
    overlays = box_only_coco128 / f"overlays_{run}"
    assert main(["predict", "--run", run, "--params", params, "--split", "val", "--render", str(overlays)]) == 0
    assert len(list(overlays.glob("*.png"))) == 28


def test_mask_supervision_is_refused_on_box_only_data(box_only_coco128, capsys):
    code = main(["train", "--run", "mask_s0", "--params", str(box_only_coco128 / "params.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "run 'mask_s0'" in err and "method 'mask' trains on ground-truth masks" in err
    assert not (box_only_coco128 / "runs" / "mask_s0").exists()


def test_half_box_only_synthetic_trains_and_keeps_mask_ap(smoke_dataset, tmp_path, capsys):
    """Train annotations half without masks, val with masks: mask AP is computed as usual."""
    export = tmp_path / "export"
    export.mkdir()
    train = _strip_masks(json.loads((smoke_dataset / "train.json").read_text()), every=False)
    (export / "train.json").write_text(json.dumps(train))
    assert main(["prepare", "custom", "--images", str(smoke_dataset / "images"), "--train-ann",
                 str(export / "train.json"), "--val-ann", str(smoke_dataset / "val.json"),
                 "--out", str(tmp_path / "data")]) == 0
    summary = json.loads((tmp_path / "data" / "summary.json").read_text())
    split = summary["splits"]["train"]
    assert 0 < split["instances_with_masks"] < split["instances"]
    params = yaml.safe_load((REPO / "experiments" / "profiles" / "smoke.yaml").read_text())
    params["data"].update(dataset="custom", root=str(tmp_path / "data"))
    params["train"].update(runs_dir=str(tmp_path / "runs"), threads=1, max_iter=2, checkpoint_every=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["train", "--run", "boxinst_s0", "--params", str(tmp_path / "params.yaml"), "--no-progress"]) == 0
    assert main(["evaluate", "--run", "boxinst_s0", "--params", str(tmp_path / "params.yaml")]) == 0
    metrics = json.loads((tmp_path / "runs" / "boxinst_s0" / "metrics.json").read_text())
    assert metrics["segm"]["AP"] is not None and "segm_unavailable" not in metrics


def test_custom_image_folder_options(tmp_path, capsys):
    args = ["prepare", "custom", "--train-ann", "a.json", "--val-ann", "b.json", "--out", str(tmp_path / "o")]
    assert main([*args, "--train-images", "x"]) == 2
    assert "--train-images alone" in capsys.readouterr().err
    assert main([*args, "--images", "x", "--val-images", "y"]) == 2
    assert "not both" in capsys.readouterr().err


def test_report_on_box_only_runs(box_only_coco128, capsys):
    """After the two runs above: the report tabulates box AP and shows mask AP as missing, not 0."""
    params = str(box_only_coco128 / "params.yaml")
    for run in ("boxinst_s0", "sim_s0"):
        if not (box_only_coco128 / "runs" / run / "metrics.json").exists():
            pytest.skip("needs test_box_supervised_methods_train_evaluate_and_predict first")
    out = box_only_coco128 / "report"
    code = main(["report", "--params", params, "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    main_table = next((out / "tables").glob("main_*.tex")).read_text()
    assert "---" in main_table and "BoxInst" in main_table


def test_mask_grid_ceiling_switches_off_without_masks(box_only_coco128, capsys):
    from sim_core.evaluation.grid_ceiling import grid_ceiling

    assert grid_ceiling(box_only_coco128 / "data" / "val.json") == {}
    assert "mask-grid ceiling off: " in capsys.readouterr().out
