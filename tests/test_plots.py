"""Report figures: loss histories are read correctly, every figure is written and non-empty."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from reports import plots, qualitative
from sim_core.errors import InputError

PDF, PNG = b"%PDF", b"\x89PNG"


def _written(paths: list[Path]) -> None:
    assert sorted(p.suffix for p in paths) == [".pdf", ".png"]
    for path in paths:
        data = path.read_bytes()
        assert len(data) > 1000 and data[:4] in (PDF, PNG)


def test_train_log_resume_duplicates_and_truncated_tail(tmp_path) -> None:
    log = tmp_path / "train_log.jsonl"
    records = [{"iteration": i, "loss_cls": 1.0, "loss_proj": 0.5 - 0.1 * i} for i in range(4)]
    records.append({"iteration": 2, "loss_cls": 1.0, "loss_proj": 9.0})  # resumed: iteration 2 again
    log.write_text("\n".join(json.dumps(r) for r in records) + '\n{"iteration": 5, "loss')
    frame = plots.read_train_log(log)
    assert list(frame.index) == [0, 1, 2, 3]
    assert frame.loc[2, "loss_proj"] == 9.0  # the last record of an iteration wins
    assert plots.total_loss(frame).tolist() == pytest.approx([1.5, 1.4, 10.0, 1.2])
    log.write_text('{"iteration": 0}\nnot json\n{"iteration": 1}\n')
    with pytest.raises(InputError, match="line 2"):
        plots.read_train_log(log)


def test_dvclive_histories_and_term_selection(tmp_path) -> None:
    metrics = tmp_path / "run" / "dvclive" / "plots" / "metrics" / "train"
    metrics.mkdir(parents=True)
    (metrics / "loss.tsv").write_text("timestamp\tstep\tloss\n1\t0\t2.0\n2\t10\t1.5\n")
    (metrics / "loss_pairwise.tsv").write_text("step\tloss_pairwise\n0\t0.3\n10\t0.2\n")
    (metrics / "loss_cls.tsv").write_text("step\tloss_cls\n0\t0.9\n10\t0.5\n")
    frame = plots.load_curves(tmp_path / "run")
    assert list(frame.index) == [0, 10] and plots.total_loss(frame).tolist() == [2.0, 1.5]
    assert plots.mask_terms(frame) == ["loss_pairwise"]  # detection terms are the same for every method
    assert plots.load_curves(tmp_path / "empty") is None
    (metrics / "bad.tsv").write_text("step\tother\n0\t1\n")
    with pytest.raises(InputError, match="bad"):
        plots.read_dvclive(tmp_path / "run" / "dvclive")


def test_training_curves_ap_by_size_and_ablation_figures(tmp_path) -> None:
    steps = np.arange(0, 50, 5)
    frame = pd.DataFrame({"loss_cls": np.exp(-steps / 20), "loss_proj": 0.5 * np.exp(-steps / 30),
                          "loss_pseudo": 0.2 * np.exp(-steps / 10)}, index=steps)
    curves = {"sim_s0": ("sim", frame), "sim_s1": ("sim", frame * 1.1), "boxinst_s0": ("boxinst", frame[["loss_cls",
                                                                                                     "loss_proj"]])}
    _written(plots.plot_training_curves(curves, tmp_path / "curves", smooth=3))
    bars = [("BoxInst", "boxinst", {"APs": (10.0, 1.0), "APm": (30.0, 0.5), "APl": None}),
            ("SIM", "sim", {"APs": (12.0, 0.0), "APm": (33.0, 0.0), "APl": (45.0, 0.0)})]
    _written(plots.plot_ap_by_size(bars, tmp_path / "sizes", "demo"))
    panel = plots.AblationPanel("alpha", ["0", "0.5", "1"], [0.0, 2.0, None], [0.0, 1.7, 0.9])
    _written(plots.plot_ablation_deltas([panel, panel], tmp_path / "ablation"))
    assert plots.method_color("sim") != plots.method_color("boxinst")
    assert plots.method_color("other") == plots.method_color("other")


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def test_image_choice_overlay_and_grid(tmp_path) -> None:
    h, w = 30, 40
    gt = {"images": [{"id": i, "file_name": f"{i}.png", "height": h, "width": w} for i in (1, 2, 3)],
          "annotations": [{"id": 1, "image_id": 2, "bbox": [2, 2, 10, 10], "iscrowd": 0},
                          {"id": 2, "image_id": 2, "bbox": [12, 5, 10, 10], "iscrowd": 0},
                          {"id": 3, "image_id": 3, "bbox": [0, 0, 5, 5], "iscrowd": 0},
                          {"id": 4, "image_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 1}],
          "categories": [{"id": 1, "name": "a"}]}
    assert qualitative.choose_images(gt, [], 2) == [2, 3]  # most instances first, crowd not counted
    assert qualitative.choose_images(gt, [3, 1], 2) == [3, 1]
    with pytest.raises(InputError, match="99"):
        qualitative.choose_images(gt, [99], 2)

    image = np.full((h, w, 3), 100, np.uint8)
    a, b = np.zeros((h, w), bool), np.zeros((h, w), bool)
    a[2:12, 2:12], b[5:15, 20:30] = True, True
    out = qualitative.overlay_masks(image, [a, b])
    assert not np.array_equal(out[7, 7], out[10, 25])               # distinct colours per instance
    assert np.array_equal(out[25, 35], image[25, 35])               # background untouched
    assert not np.array_equal(out[2, 2], out[7, 7])                 # outline darker than the fill
    with pytest.raises(InputError, match="size"):
        qualitative.overlay_masks(image, [np.zeros((5, 5), bool)])

    Image.fromarray(image).save(tmp_path / "1.png")
    Image.fromarray((np.arange(h * w).reshape(h, w) * 50).astype(np.uint16)).save(tmp_path / "2.png")
    Image.fromarray(image).save(tmp_path / "3.png")
    sixteen = qualitative.read_rgb(tmp_path / "2.png")
    assert sixteen.shape == (h, w, 3) and sixteen.dtype == np.uint8 and sixteen.max() == 255
    results = [{"image_id": 2, "category_id": 1, "segmentation": _rle(a), "score": 0.9},
               {"image_id": 2, "category_id": 1, "segmentation": _rle(b), "score": 0.1}]
    assert len(qualitative.top_detections(results, 0.3, 10)) == 1
    gt_boxes = [[20, 5, 10, 10], [2, 2, 10, 10]]
    assert qualitative.match_colors(gt_boxes, results) == [1, 0]  # colour of the overlapped GT box
    assert qualitative.match_colors([[0, 25, 3, 3]], results) == [1, 2]  # no overlap: spare colours
    assert qualitative.match_colors([], results) == [0, 1]
    paths = qualitative.qualitative_grid(gt, tmp_path, [("SIM", results), ("BoxInst", None)], [2, 3],
                                         tmp_path / "grid", score_thresh=0.3)
    _written(paths)
    with pytest.raises(InputError, match="not found"):
        qualitative.read_rgb(tmp_path / "absent.png")
