"""Dice supervision (``mask``, ``boxmask``) and the ``build_mask_loss`` switch."""
from __future__ import annotations

import math

import pytest
import torch

from baselines import build_mask_loss
from baselines.mask_supervised import BoxMaskLoss, MaskSupervisedLoss
from sim_core.errors import InputError
from sim_core.model.mask_inputs import MaskLossInputs


def make_inputs(logits: torch.Tensor, bitmasks: torch.Tensor, boxmasks: torch.Tensor, **extras) -> MaskLossInputs:
    p, _, h, w = logits.shape
    return MaskLossInputs(
        mask_logits=logits, mask_feats=torch.zeros(1, 8, h // 2, w // 2), gt_boxes=torch.zeros(p, 4),
        gt_labels=torch.zeros(p, dtype=torch.long), gt_inds=torch.arange(p), im_inds=torch.zeros(p, dtype=torch.long),
        gt_bitmasks=bitmasks, gt_boxmasks=boxmasks, images_raw=torch.zeros(1, 3, 4 * h, 4 * w),
        images_norm=torch.zeros(1, 3, 4 * h, 4 * w), image_valid=torch.ones(1, 4 * h, 4 * w), extras=dict(extras))


def test_mask_dice_hand_computed():
    big = 30.0  # sigmoid(30) == 1 and sigmoid(-30) == 0 in float32 up to 1e-13
    logits = torch.tensor([[[[0.0, 0.0], [0.0, 0.0]]], [[[big, -big], [big, -big]]]], requires_grad=True)
    bitmasks = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[1.0, 0.0], [1.0, 0.0]]])
    boxmasks = torch.ones(2, 2, 2)
    inputs = make_inputs(logits, bitmasks, boxmasks)
    # instance 0: p = 0.5 everywhere, target two pixels: 1 - 2*1 / (4*0.25 + 2) = 1/3; instance 1: perfect -> 0
    loss = MaskSupervisedLoss({})(inputs)["loss_mask"]
    assert loss.item() == pytest.approx((1 / 3 + 0.0) / 2, abs=1e-5)
    loss.backward()
    assert logits.grad[0].abs().sum() > 0
    # against the filled boxes: instance 0: 1 - 2*2/(1+4) = 0.2; instance 1: 1 - 2*2/(2+4) = 1/3
    box_loss = BoxMaskLoss({"loss_weight": 2.0})(inputs)["loss_mask"]
    assert box_loss.item() == pytest.approx(2.0 * (0.2 + 1 / 3) / 2, abs=1e-5)


def test_mask_method_refuses_targets_without_masks():
    logits = torch.zeros(2, 1, 2, 2)
    inputs = make_inputs(logits, torch.zeros(2, 2, 2), torch.ones(2, 2, 2), gt_has_mask=torch.tensor([True, False]))
    with pytest.raises(InputError, match="needs instance masks"):
        MaskSupervisedLoss({})(inputs)
    assert math.isfinite(BoxMaskLoss({})(inputs)["loss_mask"].item())  # boxmask needs only boxes


def test_no_instances_gives_a_connected_zero():
    source = torch.randn(1, 3, requires_grad=True)
    logits = source.sum() * torch.zeros(0, 1, 4, 4)
    inputs = make_inputs(logits, torch.zeros(0, 4, 4), torch.zeros(0, 4, 4))
    for loss_fn in (MaskSupervisedLoss({}), BoxMaskLoss({})):
        loss = loss_fn(inputs)["loss_mask"]
        assert loss.item() == 0.0 and loss.requires_grad


def test_build_mask_loss_switch():
    assert isinstance(build_mask_loss("mask", {}), MaskSupervisedLoss)
    assert isinstance(build_mask_loss("boxmask", None), BoxMaskLoss)
    with pytest.raises(InputError, match="unknown method 'boxfit'.*choose one of mask, boxmask, boxinst"):
        build_mask_loss("boxfit", {})
    with pytest.raises(InputError, match="mask.weight"):
        build_mask_loss("mask", {"weight": 1.0})
