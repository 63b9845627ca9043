"""The whole bad-input matrix through the CLI: exit 2, one line naming the problem, nothing written.

Bad params (unknown method/key/run/profile, wrong type, negative learning
rate, a dataset path that does not exist, invalid YAML) and bad data
(broken json, unknown image, duplicate ids, missing file) all stop before
any work starts. Valid oddities are accepted.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from sim_core.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def params_file(tmp_path, smoke_dataset) -> Path:
    params = yaml.safe_load((REPO / "experiments" / "profiles" / "smoke.yaml").read_text())
    params["data"]["root"] = str(smoke_dataset)
    params["train"]["runs_dir"] = str(tmp_path / "runs")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _edit(path: Path, fn) -> Path:
    params = yaml.safe_load(path.read_text())
    fn(params)
    path.write_text(yaml.safe_dump(params))
    return path


def _expect_exit_2(capsys, argv: list[str], *needles: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


BAD_PARAMS = [
    ("unknown key", ["--set", "train.lrr=0.1"], ["train.lrr", "unknown params key"]),
    ("wrong type", ["--set", "train.lr=fast"], ["train.lr", "must be a number"]),
    ("negative lr", ["--set", "train.lr=-0.01"], ["train.lr", "positive"]),
    ("zero iterations", ["--set", "train.max_iter=0"], ["train.max_iter"]),
    ("missing dataset", ["--set", "data.root=/no/such/dataset"], ["/no/such/dataset"]),
    ("unknown nested key", ["--set", "sim.alpah=0.3"], ["sim.alpah"]),
]


@pytest.mark.parametrize("case,extra,needles", BAD_PARAMS, ids=[c[0] for c in BAD_PARAMS])
def test_bad_params_fail_before_work(capsys, params_file, tmp_path, case, extra, needles):
    _expect_exit_2(capsys, ["train", "--run", "mask_s0", "--params", str(params_file), *extra], *needles)
    assert not (tmp_path / "runs").exists(), "nothing may be written"


def test_unknown_method_in_runs(capsys, params_file, tmp_path):
    _edit(params_file, lambda p: p["runs"].update({"x_s0": {"method": "boxfoo", "seed": 0}}))
    _expect_exit_2(capsys, ["train", "--run", "x_s0", "--params", str(params_file)], "runs.x_s0.method", "boxfoo")
    assert not (tmp_path / "runs").exists()


def test_unknown_run(capsys, params_file):
    _expect_exit_2(capsys, ["train", "--run", "nope", "--params", str(params_file)], "unknown run 'nope'")


def test_unknown_profile(capsys, tmp_path):
    target = tmp_path / "p.yaml"
    _expect_exit_2(capsys, ["profile", "no_such_profile", "--params", str(target)], "unknown profile")
    assert not target.exists()


def test_profile_key_must_name_a_profile(capsys, params_file):
    _edit(params_file, lambda p: p.update({"profile": "mine"}))
    _expect_exit_2(capsys, ["train", "--run", "mask_s0", "--params", str(params_file)], "profile", "mine")


def test_invalid_yaml(capsys, tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [1, 2\n")
    _expect_exit_2(capsys, ["train", "--run", "mask_s0", "--params", str(bad)], str(bad), "invalid YAML")


def test_params_file_missing(capsys, tmp_path):
    _expect_exit_2(capsys, ["train", "--run", "mask_s0", "--params", str(tmp_path / "none.yaml")], "does not exist")


def test_usage_error_is_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train"])
    assert info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_evaluate_without_inputs(capsys):
    _expect_exit_2(capsys, ["evaluate"], "--gt")


# --- bad data through `simbench prepare custom` --------------------------------------------------

def _custom(tiny, tmp_path, train: dict | str) -> list[str]:
    train_path = tmp_path / "bad_train.json"
    train_path.write_text(train if isinstance(train, str) else json.dumps(train))
    val_path = tmp_path / "val.json"
    val_path.write_text(json.dumps(tiny.base))
    return ["prepare", "custom", "--images", str(tiny.image_dir), "--train-ann", str(train_path),
            "--val-ann", str(val_path), "--out", str(tmp_path / "prepared")]


def _dup_image(base):
    base["images"].append(dict(base["images"][0]))


def _unknown_image(base):
    base["annotations"][0]["image_id"] = 999


def _unknown_category(base):
    base["annotations"][0]["category_id"] = 555


def _negative_box(base):
    base["annotations"][0]["bbox"][2] = -3


def _missing_file(base):
    base["images"][0]["file_name"] = "gone.jpg"


def _wrong_size(base):
    image = next(im for im in base["images"] if im["file_name"] == "sub/palette.png")  # polygon-only image
    image["width"] += 7


def _no_annotations_key(base):
    del base["annotations"]


BAD_DATA = [
    ("duplicate image id", _dup_image, ["duplicate"]),
    ("unknown image", _unknown_image, ["999"]),
    ("unknown category", _unknown_category, ["555"]),
    ("negative box", _negative_box, ["101"]),
    ("missing image file", _missing_file, ["gone.jpg"]),
    ("size mismatch", _wrong_size, ["palette.png"]),
    ("missing top-level key", _no_annotations_key, ["annotations"]),
]


@pytest.mark.parametrize("case,corrupt,needles", BAD_DATA, ids=[c[0] for c in BAD_DATA])
def test_bad_data_fails_naming_file_and_record(capsys, tiny_coco, tmp_path, case, corrupt, needles):
    base = json.loads(json.dumps(tiny_coco.base))
    corrupt(base)
    line = _expect_exit_2(capsys, _custom(tiny_coco, tmp_path, base), *needles)
    assert "bad_train.json" in line
    assert not (tmp_path / "prepared").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".prepared")], "temp dir left behind"


def test_truncated_json(capsys, tiny_coco, tmp_path):
    text = json.dumps(tiny_coco.base)[:200]
    _expect_exit_2(capsys, _custom(tiny_coco, tmp_path, text), "bad_train.json", "json")
    assert not (tmp_path / "prepared").exists()


def test_valid_oddities_are_accepted(capsys, tiny_coco, tmp_path):
    """Grayscale, RGBA, palette, 16-bit, EXIF-rotated, crowd RLE, empty image, non-contiguous ids."""
    assert main(_custom(tiny_coco, tmp_path, tiny_coco.base)) == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "prepared" / "summary.json").read_text())
    assert summary["splits"]["train"]["crowd"] == 1
    assert summary["num_classes"] == 3
