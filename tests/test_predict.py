"""``simbench predict``: a trained run on a folder of images or a split; COCO results and overlays."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_smoke_project
from sim_core.cli import main


@pytest.fixture(scope="module")
def trained(smoke_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    write_smoke_project(root, smoke_dataset, max_iter=2)
    assert main(["train", "--run", "mask_s0", "--params", str(root / "params.yaml"), "--no-progress"]) == 0
    return root


def _folder(path: Path) -> Path:
    path.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((90, 130, 3)) * 255).astype(np.uint8)).save(path / "wide.jpg")
    (path / "sub").mkdir()
    Image.fromarray((rng.random((70, 50, 3)) * 255).astype(np.uint8)).save(path / "sub" / "tall.png")
    return path


def test_predict_a_folder_writes_results_and_overlays(trained, tmp_path, capsys):
    images = _folder(tmp_path / "images")
    out = tmp_path / "out" / "pred.json"
    assert main(["predict", "--run", "mask_s0", "--params", str(trained / "params.yaml"), "--images", str(images),
                 "--out", str(out), "--render", str(tmp_path / "overlays"), "--score-thresh", "0.0"]) == 0
    listed = json.loads(out.with_name("pred.images.json").read_text())
    assert [(i["id"], i["file_name"], i["height"], i["width"]) for i in listed["images"]] == \
        [(1, "sub/tall.png", 70, 50), (2, "wide.jpg", 90, 130)]
    segm, bbox = json.loads(out.read_text()), json.loads(out.with_name("pred.bbox.json").read_text())
    assert segm and len(segm) == len(bbox) and {r["image_id"] for r in segm} <= {1, 2}
    assert all(r["segmentation"]["size"] in ([70, 50], [90, 130]) for r in segm)
    overlays = sorted(p.name for p in (tmp_path / "overlays").iterdir())
    assert overlays == ["sub__tall.png", "wide.png"]
    assert Image.open(tmp_path / "overlays" / "wide.png").size == (130, 90)


@pytest.mark.parametrize("bad, content", [("notes.txt", b"hello"), ("broken.png", b"not a png at all")])
def test_a_bad_file_in_the_folder_stops_before_anything_is_written(trained, tmp_path, capsys, bad, content):
    images = _folder(tmp_path / "images")
    (images / bad).write_bytes(content)
    out = tmp_path / "out" / "pred.json"
    code = main(["predict", "--run", "mask_s0", "--params", str(trained / "params.yaml"), "--images", str(images),
                 "--out", str(out), "--render", str(tmp_path / "overlays")])
    err = capsys.readouterr().err
    assert code == 2 and bad in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not (tmp_path / "overlays").exists() and not (tmp_path / "out").exists()


def test_predict_the_val_split_scores_as_evaluate_does(trained, tmp_path, smoke_dataset, capsys):
    out = tmp_path / "val.json"
    assert main(["predict", "--run", "mask_s0", "--params", str(trained / "params.yaml"), "--split", "val",
                 "--out", str(out)]) == 0
    assert main(["evaluate", "--gt", str(smoke_dataset / "val.json"), "--results", str(out),
                 "--out", str(tmp_path / "m.json")]) == 0
    assert "AP" in json.loads((tmp_path / "m.json").read_text())["segm"]
