"""Semantic map, self-correction, pseudo labels and SIM's extra losses."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from sim_core.model.mask_inputs import dice_loss
from sim_core.sim.pseudo_loss import (paste_mask_loss, pseudo_loss_weight, pseudo_mask_loss, weighted_bce,
                                      weighted_focal)
from sim_core.sim.self_correction import (adaptive_tau_high, combine_maps, instance_probability_map, iou_weights,
                                          pseudo_labels)
from sim_core.sim.semantic_map import semantic_probability_map


def test_semantic_map_is_high_where_features_match_the_class_prototype():
    protos = torch.tensor([[[1.0, 0.0], [0.0, 1.0]],  # class 0: two looks
                           [[-1.0, 0.0], [0.0, -1.0]]])  # class 1
    feats = torch.zeros(1, 2, 2, 2)
    feats[0, :, 0, 0] = torch.tensor([3.0, 0.0])  # matches class 0 look 0
    feats[0, :, 0, 1] = torch.tensor([0.0, 2.0])  # matches class 0 look 1
    feats[0, :, 1, 0] = torch.tensor([-1.0, 0.0])  # opposite of class 0, matches class 1
    feats[0, :, 1, 1] = torch.tensor([1.0, -1.0])  # 45 degrees from look 0
    m = semantic_probability_map(feats, protos, torch.tensor([0, 1]), torch.tensor([0, 0]), tau=0.1)
    s = torch.sigmoid
    expected0 = torch.tensor([[s(torch.tensor(10.0)), s(torch.tensor(10.0))],
                              [s(torch.tensor(0.0)), s(torch.tensor(10 * math.sqrt(0.5)))]])
    assert torch.allclose(m[0], expected0, atol=1e-6)
    assert m[1, 1, 0] > 0.99 and m[1, 0, 0] == pytest.approx(0.5)  # class 1's box prefers the other pixel
    flat = semantic_probability_map(feats, protos, torch.tensor([0]), torch.tensor([0]), tau=1.0)
    assert torch.allclose(flat[0, 0, 0], torch.sigmoid(torch.tensor(1.0)))  # released code: no temperature


def test_semantic_map_upsamples_to_the_mask_grid():
    protos = torch.tensor([[[1.0, 0.0]]])
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).t().reshape(1, 2, 1, 2).contiguous()  # left (1,0), right (0,1)
    m = semantic_probability_map(feats, protos, torch.tensor([0]), torch.tensor([0]), tau=0.1, size=(2, 4))
    assert m.shape == (1, 2, 4)
    assert m[0, 0, 0] > m[0, 0, 3]
    with pytest.raises(ValueError):
        semantic_probability_map(feats, protos, torch.tensor([0]), torch.tensor([0]), tau=0.0)


def test_iou_weighting_favours_the_better_localised_positive():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    pred = torch.tensor([[0.0, 0.0, 10.0, 10.0],  # IoU 1
                         [0.0, 0.0, 10.0, 2.0],  # IoU 0.2
                         [5.0, 5.0, 9.0, 9.0]])  # other GT, alone in its group
    groups = torch.tensor([0, 0, 1])
    w = iou_weights(pred, gt[[0, 0, 0]], groups, 2, mu=5.0)
    e1, e2 = math.exp(5.0), math.exp(1.0)
    assert w.tolist() == pytest.approx([e1 / (e1 + e2), e2 / (e1 + e2), 1.0], abs=1e-6)
    masks = torch.stack([torch.ones(2, 2), torch.zeros(2, 2), torch.full((2, 2), 0.3)])
    maps = instance_probability_map(masks, w, groups, 2)
    assert torch.allclose(maps[0], torch.full((2, 2), e1 / (e1 + e2)))
    assert torch.allclose(maps[1], torch.full((2, 2), 0.3))
    plain = iou_weights(pred, gt[[0, 0, 0]], groups, 2, mu=0.0)  # released code: plain mean
    assert plain.tolist() == pytest.approx([0.5, 0.5, 1.0])


def test_pseudo_labels_ignore_band_and_background_outside_the_box():
    probs = torch.tensor([[[0.9, 0.5, 0.1, 0.9],
                           [0.8, 0.65, 0.3, 0.2]]])
    box = torch.tensor([[[1.0, 1.0, 1.0, 0.0],
                         [1.0, 1.0, 1.0, 0.0]]])
    target, weight = pseudo_labels(probs, box, tau_high=0.7, tau_low=0.4)
    assert target.tolist() == [[[1, 0, 0, 0], [1, 0, 0, 0]]]  # outside the box is background even at 0.9
    assert weight.tolist() == [[[1, 0, 1, 1], [1, 0, 1, 1]]]  # 0.5 and 0.65 lie in the ignore band
    _, released = pseudo_labels(probs, box, 0.7, 0.4, outside_weight=0.0)
    assert released[..., 3].tolist() == [[0, 0]]
    valid = torch.ones_like(box)
    valid[..., 0] = 0  # padding
    _, padded = pseudo_labels(probs, box, 0.7, 0.4, valid=valid)
    assert padded[..., 0].tolist() == [[0, 0]]
    per_gt, _ = pseudo_labels(probs.expand(2, -1, -1), box.expand(2, -1, -1), torch.tensor([0.7, 0.85]), 0.4)
    assert per_gt[1].sum() == 1  # only the 0.9 inside the box passes 0.85


def test_adaptive_tau_high_keeps_as_many_pixels_as_the_teacher_is_sure_of():
    probs = torch.tensor([[[0.95, 0.9, 0.75, 0.72, 0.1, 0.99]]])
    inst = torch.tensor([[[0.9, 0.9, 0.1, 0.1, 0.1, 0.99]]])
    box = torch.tensor([[[1.0, 1.0, 1.0, 1.0, 1.0, 0.0]]])
    # two confident in-box pixels -> third largest in-box value 0.75, within [0.7, 0.8]
    assert adaptive_tau_high(probs, inst, box, 0.7, 0.7, 0.8).tolist() == pytest.approx([0.75])
    assert adaptive_tau_high(probs, inst, box, 0.7, 0.7, 0.74).tolist() == pytest.approx([0.74])  # clamped
    none = torch.zeros_like(inst)
    assert adaptive_tau_high(probs, none, box, 0.7, 0.7, 0.8).tolist() == pytest.approx([0.8])  # top value 0.95


def test_combine_maps():
    s, i = torch.full((1, 2, 2), 0.2), torch.full((1, 2, 2), 1.0)
    assert torch.allclose(combine_maps(s, i, 0.5), torch.full((1, 2, 2), 0.6))
    assert torch.equal(combine_maps(None, i, 0.5), i)
    with pytest.raises(ValueError):
        combine_maps(s, i, 1.5)


def test_pseudo_losses_match_hand_computation_and_ignore_weight_zero_pixels():
    logits = torch.tensor([[[[2.0, -1.0], [0.5, 3.0]]]])
    target = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    weight = torch.tensor([[[1.0, 1.0], [0.0, 1.0]]])
    bce = F.binary_cross_entropy_with_logits(logits[0, 0], target[0], reduction="none")
    assert weighted_bce(logits, target, weight) == pytest.approx(float((bce * weight[0]).sum() / 3))
    focal = sigmoid_focal_loss(logits[0, 0], target[0], reduction="none")
    assert weighted_focal(logits, target, weight) == pytest.approx(float((focal * weight[0]).sum() / 4))
    dice = dice_loss(logits[:, 0].sigmoid(), target, weight)
    total = pseudo_mask_loss(logits, target, weight, "bce_dice")
    assert total == pytest.approx(float((bce * weight[0]).sum() / 3 + dice.mean()), abs=1e-6)
    changed = logits.clone()
    changed[0, 0, 1, 0] = -7.0  # an ignored pixel
    for kind in ("bce_dice", "focal"):
        assert pseudo_mask_loss(changed, target, weight, kind) == pytest.approx(
            float(pseudo_mask_loss(logits, target, weight, kind)), abs=1e-6)
    paste = paste_mask_loss(logits, target, torch.ones_like(target))
    assert paste == pytest.approx(float(focal.sum() / 5 + dice_loss(logits[:, 0].sigmoid(), target).mean()), abs=1e-6)
    with pytest.raises(ValueError):
        pseudo_mask_loss(logits, target, weight, "l2")


def test_released_focal_takes_probabilities_as_logits():
    """The released ``mask_focal_loss`` is called with probabilities: BCE(sigmoid(p), t), focal factor on p."""
    logits = torch.zeros(1, 1, 1, 1)  # p = 0.5
    target = torch.ones(1, 1, 1)
    weight = torch.ones(1, 1, 1)
    # alpha_t 0.25 * (1 - p_t)^2 0.25 * BCE-with-logits(0.5, 1) = log(1 + e^-0.5); / (sum w + 1)
    hand = 0.25 * 0.25 * math.log(1 + math.exp(-0.5)) / 2
    assert weighted_focal(logits, target, weight, on_probabilities=True) == pytest.approx(hand, rel=1e-6)
    assert weighted_focal(logits, target, weight) == pytest.approx(0.25 * 0.25 * math.log(2) / 2, rel=1e-6)
    # a saturated foreground logit labelled background: the proper focal loss still pulls it down
    # (d/dx ~ (1 - alpha) / 2), the released one does not (an extra p (1 - p) ~ e^-20)
    for on_probabilities, bound in ((False, (0.3, 0.4)), (True, (0.0, 1e-7))):
        x = torch.full((1, 1, 1, 1), 20.0, requires_grad=True)
        weighted_focal(x, torch.zeros(1, 1, 1), weight, on_probabilities=on_probabilities).backward()
        assert bound[0] <= float(x.grad) <= bound[1]
    # the switch reaches both SIM losses
    logits = torch.tensor([[[[2.0, -1.0], [0.5, 3.0]]]])
    target = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    ones = torch.ones_like(target)
    released = weighted_focal(logits, target, ones, on_probabilities=True)
    assert pseudo_mask_loss(logits, target, ones, "focal", focal_on_probabilities=True) == pytest.approx(float(released))
    dice = dice_loss(logits[:, 0].sigmoid(), target).mean()
    assert paste_mask_loss(logits, target, ones, focal_on_probabilities=True) == pytest.approx(
        float(released + dice), abs=1e-6)


def test_pseudo_loss_schedules():
    assert pseudo_loss_weight(9_999, 90_000, 0.5, "step", 10_000 / 90_000) == 0.0
    assert pseudo_loss_weight(10_000, 90_000, 0.5, "step", 10_000 / 90_000) == 0.5
    # linear, as released: 0 up to iteration 10000 (its 1-based counter must exceed 10000), then
    # 0.3 * min(iter / 270000, 1) with iter counted from 1: at most 0.3 * 90000 / 270000 = 0.1 in a 1x run
    released = dict(ramp="linear", start_frac=10_000 / 90_000, span=270_000 / 90_000)
    assert pseudo_loss_weight(9_999, 90_000, 0.3, **released) == 0.0
    assert pseudo_loss_weight(10_000, 90_000, 0.3, **released) == pytest.approx(0.3 * 10_001 / 270_000)
    assert pseudo_loss_weight(89_999, 90_000, 0.3, **released) == pytest.approx(0.1)
    # scaled to a 700-iteration demo: gate at 77.8 -> iteration 78, full span 2100
    assert pseudo_loss_weight(77, 700, 0.3, **released) == 0.0
    assert pseudo_loss_weight(699, 700, 0.3, **released) == pytest.approx(0.3 * 700 / 2100)
    assert pseudo_loss_weight(44_999, 90_000, 0.3, "linear", 0.0, 1.0) == pytest.approx(0.15)
    assert pseudo_loss_weight(95_000, 90_000, 0.3, "linear", 0.0, 1.0) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        pseudo_loss_weight(0, 10, 1.0, "cosine")


def test_paste_dice_over_every_sampled_instance_as_the_release():
    """``dice_over`` = N: the release's Dice mean over all N sampled rows, where a row that was not pasted has
    weight 0 and so Dice loss 1 (no gradient): (Dice of the pasted rows + N - P) / N."""
    logits = torch.zeros(1, 1, 1, 1, requires_grad=True)  # one pasted row, p = 0.5 on a 1-pixel target 1
    target = torch.ones(1, 1, 1)
    valid = torch.ones(1, 1, 1)
    focal = 0.25 * 0.25 * math.log(2) / 2
    dice = 1 - 2 * 0.5 / (0.25 + 1)  # squared-denominator Dice: 0.2
    own = paste_mask_loss(logits, target, valid)
    assert own.item() == pytest.approx(focal + dice, rel=1e-4)
    (grad_own,) = torch.autograd.grad(own - focal, logits)
    released = paste_mask_loss(logits, target, valid, dice_over=4)
    assert released.item() == pytest.approx(focal + (dice + 3) / 4, rel=1e-4)
    (grad_released,) = torch.autograd.grad(released, logits)
    (grad_focal,) = torch.autograd.grad(weighted_focal(logits, target, valid), logits)
    # the pasted row's Dice gradient is scaled by P / N = 1 / 4
    assert float(grad_released - grad_focal) == pytest.approx(float(grad_own - grad_focal) / 4, rel=1e-4)
    # the release's own arithmetic: Dice with weights on all four rows, three of them weight 0
    rows = torch.cat([logits.detach().sigmoid().reshape(1, 1), torch.full((3, 1), 0.9)])
    weights = torch.tensor([[1.0], [0.0], [0.0], [0.0]])
    x, t = rows * weights, torch.ones(4, 1) * weights
    release = (1 - 2 * (x * t).sum(1) / ((x ** 2).sum(1) + (t ** 2).sum(1) + 1e-5)).mean()
    assert released.item() - focal == pytest.approx(float(release), rel=1e-4)
    assert paste_mask_loss(logits, target, valid, dice_over=1).item() == pytest.approx(own.item(), rel=1e-6)
    with pytest.raises(ValueError, match="at least the number of pasted rows"):
        paste_mask_loss(logits, target, valid, dice_over=0)
