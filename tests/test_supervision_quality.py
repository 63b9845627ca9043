"""Supervision-quality diagnostics: hand-computed metrics and each method's hook."""
from __future__ import annotations

import pytest
import torch

from sim_core.evaluation.supervision_quality import (
    diagnosable_rows,
    foreground_iou,
    gt_same_label_pairs,
    pair_label_quality,
    pseudo_label_quality,
)


def test_pair_label_quality_hand_computed():
    kept = torch.tensor([1, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    same = torch.tensor([1, 1, 0, 1, 0, 1, 1], dtype=torch.bool)
    valid = torch.tensor([1, 1, 1, 1, 1, 0, 0], dtype=torch.bool)
    # valid pairs 0..4: kept {0,1,2}, same {0,1,3}, kept & same {0,1}
    q = pair_label_quality(kept, same, valid)
    assert q == pytest.approx({"precision": 2 / 3, "recall": 2 / 3})


def test_pair_label_quality_weights_and_empty():
    weights = torch.tensor([0.5, 1.0, 0.0])
    same = torch.tensor([True, False, True])
    valid = torch.ones(3, dtype=torch.bool)
    q = pair_label_quality(weights, same, valid)
    assert q["precision"] == pytest.approx(0.5 / 1.5)
    assert q["recall"] == pytest.approx(0.5 / 2)
    none_kept = pair_label_quality(torch.zeros(3, dtype=torch.bool), same, valid)
    assert "precision" not in none_kept and none_kept["recall"] == 0.0
    assert pair_label_quality(torch.ones(3, dtype=torch.bool), same, torch.zeros(3)) == {}


def test_gt_same_label_pairs_geometry():
    gt = torch.zeros(1, 5, 5)
    gt[0, :, :2] = 1  # columns 0, 1 foreground
    same = gt_same_label_pairs(gt, kernel=3, dilation=2)
    assert same.shape == (1, 8, 5, 5)
    # neighbour 4 is (0, +2): pixel (2, 0) [fg] with (2, 2) [bg] -> differ
    assert not same[0, 4, 2, 0]
    # pixel (2, 2) [bg] with (2, 4) [bg] -> same
    assert same[0, 4, 2, 2]
    # neighbour 3 is (0, -2): pixel (2, 3) [bg] with (2, 1) [fg] -> differ
    assert not same[0, 3, 2, 3]


def test_pseudo_label_quality_hand_computed():
    box = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    gt = torch.tensor([[1, 1, 1, 0, 0, 0, 1, 0]], dtype=torch.bool)
    fg = torch.tensor([[1, 1, 0, 1, 0, 0, 1, 0]], dtype=torch.bool)
    bg = torch.tensor([[0, 0, 1, 0, 1, 0, 0, 1]], dtype=torch.bool)
    ignore = ~(fg | bg)
    q = pseudo_label_quality(fg, bg, ignore, gt, box)
    # in box: gt {0,1,2}, not-gt {3,4,5}; fg {0,1,3}; bg {2,4}; ignore {5}
    assert q == pytest.approx({"fg_precision": 2 / 3, "fg_recall": 2 / 3, "bg_precision": 1 / 2,
                               "bg_recall": 1 / 3, "ignored": 1 / 6})


def test_pseudo_label_quality_skips_empty_denominators():
    box = torch.ones(1, 4, dtype=torch.bool)
    gt = torch.ones(1, 4, dtype=torch.bool)  # no in-box background
    fg = torch.ones(1, 4, dtype=torch.bool)
    none = torch.zeros(1, 4, dtype=torch.bool)
    q = pseudo_label_quality(fg, none, none, gt, box)
    assert q == {"fg_precision": 1.0, "fg_recall": 1.0, "ignored": 0.0}
    assert pseudo_label_quality(fg, none, none, gt, none) == {}


def test_foreground_iou_pooled_and_empty():
    pred = torch.tensor([[[1.0, 1.0, 0.0, 0.0]], [[0.0, 0.0, 0.0, 1.0]]])
    gt = torch.tensor([[[1.0, 0.0, 0.0, 0.0]], [[0.0, 0.0, 1.0, 1.0]]])
    box = torch.ones_like(gt)
    # intersections 1 + 1, unions 2 + 2 (pooled: 2 / 4, not the mean of per-instance IoUs)
    assert foreground_iou(pred, gt, box) == pytest.approx(0.5)
    box[:, :, 3] = 0  # drop the last column: inter 1 + 0, union 2 + 1
    assert foreground_iou(pred, gt, box) == pytest.approx(1 / 3)
    assert foreground_iou(torch.zeros(1, 3), torch.zeros(1, 3)) is None


def test_diagnosable_rows():
    rows = diagnosable_rows(4, torch.tensor([False, True, False, False]),
                            torch.tensor([True, True, True, False]))
    assert rows.tolist() == [True, False, True, False]
    assert diagnosable_rows(2, None, None).tolist() == [True, True]


# --------------------------------------------------------------------------- hooks
def _inputs(logits, boxmasks, gt_masks, images_raw, gt_inds=None, gt_pasted=None, diagnose=True):
    from sim_core.model.mask_inputs import MaskLossInputs

    num = logits.shape[0]
    batch, _, height, width = images_raw.shape
    return MaskLossInputs(
        mask_logits=logits, mask_feats=torch.zeros(batch, 8, height // 8, width // 8),
        gt_boxes=torch.zeros(num, 4), gt_labels=torch.zeros(num, dtype=torch.long),
        gt_inds=torch.arange(num) if gt_inds is None else gt_inds, im_inds=torch.zeros(num, dtype=torch.long),
        gt_bitmasks=gt_masks, gt_boxmasks=boxmasks, images_raw=images_raw,
        images_norm=(images_raw - 120.0) / 60.0, image_valid=torch.ones(batch, height, width),
        iteration=100, max_iter=100, gt_pasted=gt_pasted, diagnose=diagnose)


def _two_tone_image() -> torch.Tensor:
    """16 x 16 grey image: input columns 0-7 (mask columns 0, 1) at 100, the rest at 130.

    Their LAB similarity exp(-dL / 2) is about 0.003: above 0 (a real
    neighbour, so a candidate pair) but below the 0.3 threshold (not kept).
    """
    image = torch.full((1, 3, 16, 16), 130.0)
    image[..., :8] = 100.0
    return image


def test_boxinst_hook_pair_precision_and_recall_by_hand():
    from baselines.boxinst import BoxInstLoss

    # 4 x 4 mask map, box = everything, GT = mask pixels (0, 0) and (1, 0).
    # Neighbours at (+-2, +-2): a horizontal or diagonal pair always crosses the
    # two tones, so only the 16 vertical ordered pairs (dx = 0) are kept; 4 of
    # them join (0,0)-(2,0) or (1,0)-(3,0), which differ in the GT: precision 12/16.
    # Candidates: 48 ordered pairs; 12 touch a GT and a non-GT pixel, so 36
    # share the GT label, 12 of them kept: recall 12/36.
    box = torch.ones(1, 4, 4)
    gt = torch.zeros(1, 4, 4)
    gt[0, 0:2, 0] = 1
    loss = BoxInstLoss({"ignore_bottom_px": 0})
    sim = loss.image_similarity(_inputs(torch.zeros(1, 1, 4, 4), box, gt, _two_tone_image()))
    assert 0 < float(sim[0, 4, 0, 1]) < 0.3 and float(sim[0, 1, 2, 0]) == pytest.approx(1.0)
    # a second sampled row of the same GT (counted once) and a pasted instance (excluded)
    logits = torch.zeros(3, 1, 4, 4, requires_grad=True)
    rows = _inputs(logits, box.repeat(3, 1, 1), torch.cat([gt, gt, 1 - gt]), _two_tone_image(),
                   gt_inds=torch.tensor([0, 0, 1]), gt_pasted=torch.tensor([False, False, True]))
    terms = loss(rows)
    assert loss.last_quality == pytest.approx({"pair_precision": 12 / 16, "pair_recall": 12 / 36})
    assert set(terms) == {"loss_proj", "loss_pairwise"}
    loss(_inputs(logits, box.repeat(3, 1, 1), torch.cat([gt, gt, 1 - gt]), _two_tone_image(), diagnose=False))
    assert loss.last_quality == {}
    only_pasted = _inputs(logits[:1], box, gt, _two_tone_image(), gt_pasted=torch.tensor([True]))
    loss(only_pasted)
    assert loss.last_quality == {}


def test_sim_hook_pseudo_label_quality_by_hand():
    from types import SimpleNamespace

    from sim_core.sim.sim_loss import SIMLoss

    loss = SIMLoss({"boxinst": {}, "mask_feat_channels": 8, "prototypes": False})  # M = M_I
    # one row of 6 mask pixels; GT 0 real, GT 1 pasted (its "GT" mask is a pseudo mask)
    M_I = torch.tensor([[[0.9, 0.8, 0.5, 0.3, 0.95, 0.1]], [[0.9] * 6]])
    boxes = torch.tensor([[[1.0, 1, 1, 1, 1, 0]], [[1.0] * 6]])
    gt = torch.tensor([[[1.0, 1, 1, 0, 0, 0]], [[0.0] * 6]])
    inputs = _inputs(torch.zeros(3, 1, 1, 6), boxes[[0, 0, 1]], gt[[0, 0, 1]], torch.zeros(1, 3, 4, 24),
                     gt_inds=torch.tensor([0, 0, 1]), gt_pasted=torch.tensor([False, False, True]))
    a = SimpleNamespace(gt_labels=torch.tensor([0, 0]), gt_im_inds=torch.tensor([0, 0]))
    q = loss.pseudo_quality(inputs, None, None, a, M_I, boxes)
    # in box (pixels 0-4): fg (> 0.7) {0, 1, 4}, bg (< 0.4) {3}, ignored {2}; GT {0, 1, 2}
    expected = {"fg_precision": 2 / 3, "fg_recall": 2 / 3, "bg_precision": 1.0, "bg_recall": 1 / 2,
                "ignored": 1 / 5}
    assert q == pytest.approx({**{f"MI_{k}": v for k, v in expected.items()},
                               **{f"M_{k}": v for k, v in expected.items()}})
    adaptive = SIMLoss({"boxinst": {}, "mask_feat_channels": 8, "prototypes": False,
                        "tau_high_mode": "adaptive", "tau_high_max": 0.92})
    # adaptive: 3 in-box pixels above confident_thresh 0.7 -> the 4th largest in-box value (0.5),
    # clamped to [0.7, 0.92] -> 0.7: same labels
    assert adaptive.pseudo_quality(inputs, None, None, a, M_I, boxes)["M_fg_precision"] == pytest.approx(2 / 3)


def test_sim_step_reports_every_family_without_changing_the_losses():
    from tests.test_sim_training import _batch, _bank_entry, _setup

    results = {}
    for diagnose in (False, True):
        model, loss, state = _setup({"pseudo_start_frac": 0.0, "paste_prob": 1.0, "confident_thresh": 0.0})
        state.copy_paste.bank.push(_bank_entry())
        images, targets = state.before_step(*_batch(0), 0)
        losses = model.training_losses(images, targets, loss, 0, 10, extras=state.extras(), diagnose=diagnose)
        results[diagnose] = ({k: float(v.detach()) for k, v in losses.items()}, dict(loss.last_quality))
        assert any(t["pasted"].any() for t in targets)
    assert results[False][0] == results[True][0]  # diagnostics never touch the loss
    assert results[False][1] == {}
    quality = results[True][1]
    for family in ("MS_", "MI_", "M_"):
        assert f"{family}ignored" in quality
    assert {"pair_precision", "pair_recall"} <= set(quality)
    assert all(0.0 <= v <= 1.0 for v in quality.values())


# --------------------------------------------------------------------------- trainer
def test_trainer_logs_sq_keys_at_log_every_and_not_in_the_loss(smoke_params):
    import json
    from pathlib import Path

    from sim_core.config import apply_overrides, resolve_run
    from sim_core.engine.trainer import train_run

    def run(name, **overrides):
        resolved = resolve_run(apply_overrides(smoke_params, {f"train.{k}": v for k, v in overrides.items()}),
                               name)
        run_dir = Path(smoke_params["train"]["runs_dir"]) / name
        train_run(resolved, run_dir, progress=False)
        return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()], run_dir

    log, run_dir = run("boxinst_s0", max_iter=4, log_every=2)
    assert [r["iteration"] for r in log] == [0, 2, 3]  # every log_every and the last iteration
    for record in log:
        assert {"sq/pair_precision", "sq/pair_recall"} <= set(record)
        terms = sum(v for k, v in record.items() if k.startswith("loss_"))
        assert record["loss"] == pytest.approx(terms, abs=1e-5)  # sq values are not part of the loss
    assert (run_dir / "dvclive" / "plots" / "metrics" / "train" / "sq" / "pair_precision.tsv").is_file()
    off, _ = run("boxlevelset_s0", max_iter=2, log_every=1, supervision_diagnostics=False)
    assert not any(k.startswith("sq/") for record in off for k in record)
    mask, _ = run("mask_s0", max_iter=1, log_every=1)
    assert not any(k.startswith("sq/") for k in mask[0])


# --------------------------------------------------------------------------- report
def test_quality_figure_and_table_with_and_without_keys(tmp_path):
    import pandas as pd

    from reports import plots, tables

    frame = pd.DataFrame({"loss": [1.0, 0.9, 0.8], "sq/pair_precision": [0.5, None, 0.75],
                          "sq/MS_fg_recall": [0.2, 0.3, None], "sq/levelset_feat_fg_iou": [0.1, 0.2, 0.3]},
                         index=[0, 5, 10])
    assert plots.quality_key("sq/MS_fg_recall") == ("MS", "fg_recall")
    assert plots.quality_key("levelset_feat_fg_iou") == ("levelset_feat", "fg_iou")
    assert plots.quality_key("sq/something_new") == ("something_new", "value")
    # the mean of the last logged values (default window 10: all of them here), NaN rows skipped
    assert plots.final_quality(frame) == (10, {"pair_precision": 0.625, "MS_fg_recall": 0.25,
                                               "levelset_feat_fg_iou": pytest.approx(0.2)})
    assert plots.final_quality(frame, window=1) == (10, {"pair_precision": 0.75, "MS_fg_recall": 0.3,
                                                         "levelset_feat_fg_iou": 0.3})
    paths = plots.plot_supervision_quality({"sim_s0": ("sim", frame)}, tmp_path / "sq")
    assert sorted(p.suffix for p in paths) == [".pdf", ".png"] and all(p.stat().st_size > 1000 for p in paths)
    no_keys = pd.DataFrame({"loss": [1.0]}, index=[0])
    assert plots.plot_supervision_quality({"mask_s0": ("mask", no_keys)}, tmp_path / "none") is None
    tex = tables.supervision_quality_table([("sim_s0", 10, plots.final_quality(frame, window=1)[1])])
    assert r"\toprule" in tex and r"\bottomrule" in tex
    assert "sim\\_s0 & 10 & BoxInst pairs & 75.0 & ---" in tex
    assert "SIM $M_S$" in tex and "level set, features" in tex


def test_bench_times_a_step_with_and_without_diagnostics(monkeypatch):
    from pathlib import Path

    from experiments import bench_parts
    from sim_core.config import read_yaml

    assert bench_parts.DIAGNOSTIC_METHODS == ("boxinst", "boxlevelset", "sim")
    monkeypatch.setattr(bench_parts, "DIAGNOSTIC_METHODS", ("boxinst",))  # one method keeps the test short
    params = read_yaml(Path(__file__).resolve().parents[1] / "experiments" / "profiles" / "smoke.yaml")
    out = bench_parts.bench_diagnostics(bench_parts.BenchSettings(iters=1, batch=1, size=64, params=params))
    assert out["log_every"] == params["train"]["log_every"]
    for method in ("boxinst",):
        row = out[method]
        assert isinstance(row, dict), row
        assert row["step"] > 0 and row["step_with_diagnostics"] > 0
        assert row["amortised_ratio"] == pytest.approx(row["diagnosed_step_ratio"] / out["log_every"], abs=1e-3)
