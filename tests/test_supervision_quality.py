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
