"""Self-correction of SIM: instance-aware pseudo labels from M_S and the teacher's masks.

The semantic map M_S (:mod:`sim_core.sim.semantic_map`) cannot tell two
objects of one class apart. The teacher's instance masks can: each FCOS
positive location assigned to a GT predicts one mask of *that* object. SIM
(paper Sec. 3.3) combines the masks of all positives of a GT, trusting the
better-localised ones more:

    M_I = sum_k w_k m'_k,   w_k = exp(mu * IoU(b_k, B)) / sum_j exp(mu * IoU(b_j, B)),  mu = 5,

with ``b_k`` the teacher's predicted box at positive ``k`` and ``B`` the GT box.
The pseudo probability is ``M = (1 - alpha) M_S + alpha M_I`` (alpha = 0.5).
Pseudo labels: inside the box, ``M > tau_high`` is foreground, ``M < tau_low``
background and the band between is ignored (weight 0); outside the box every
pixel is background (the box is a hard constraint).

The paper gives no numbers for ``tau_high``/``tau_low``; simbench's defaults
(0.7 / 0.4) and the reasoning are in docs/sim.md. The released code instead
picks ``tau_high`` per GT so that the foreground keeps as many pixels as the
teacher is confident about, clamped to [0.7, 0.8] (:func:`adaptive_tau_high`),
and ignores every pixel outside the box (``outside_weight = 0``).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou


def paired_iou(boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
    """IoU of row ``k`` of ``boxes_a`` with row ``k`` of ``boxes_b`` (xyxy), ``[K]``."""
    if boxes_a.shape != boxes_b.shape:
        raise ValueError(f"box sets differ in shape: {tuple(boxes_a.shape)} vs {tuple(boxes_b.shape)}")
    if boxes_a.numel() == 0:
        return boxes_a.new_zeros((0,))
    return torch.diagonal(box_iou(boxes_a.float(), boxes_b.float()))


def iou_weights(pred_boxes: Tensor, gt_boxes: Tensor, groups: Tensor, num_groups: int, mu: float = 5.0) -> Tensor:
    """Weights ``[K]`` of the K positives, normalised to sum to one within each GT group.

    ``pred_boxes``/``gt_boxes`` ``[K, 4]`` (the GT box of each positive's GT),
    ``groups`` ``[K]`` the GT index of each positive. ``mu = 0`` gives the plain
    mean (the released code).
    """
    iou = paired_iou(pred_boxes, gt_boxes)
    logits = mu * iou
    # softmax within each group, stabilised by the group's maximum
    group_max = torch.full((num_groups,), -float("inf"), dtype=logits.dtype, device=logits.device)
    group_max = group_max.scatter_reduce(0, groups, logits, reduce="amax", include_self=True)
    expo = torch.exp(logits - group_max[groups])
    denom = torch.zeros(num_groups, dtype=expo.dtype, device=expo.device).index_add_(0, groups, expo)
    return expo / denom[groups]


def instance_probability_map(teacher_probs: Tensor, weights: Tensor, groups: Tensor, num_groups: int) -> Tensor:
    """``M_I`` ``[G, H, W]``: weighted sum of the positives' teacher masks ``[K, H, W]`` per GT."""
    G = num_groups
    out = teacher_probs.new_zeros((G,) + tuple(teacher_probs.shape[1:]))
    if teacher_probs.shape[0] == 0:
        return out
    return out.index_add_(0, groups, teacher_probs * weights.view(-1, *([1] * (teacher_probs.dim() - 1))))


def combine_maps(semantic: Tensor | None, instance: Tensor, alpha: float) -> Tensor:
    """``M = (1 - alpha) M_S + alpha M_I``; without a semantic map (ablation) ``M = M_I``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if semantic is None:
        return instance
    return (1.0 - alpha) * semantic + alpha * instance


def adaptive_tau_high(probs: Tensor, instance: Tensor, box_masks: Tensor, confident_thresh: float = 0.7,
                      low: float = 0.7, high: float = 0.8) -> Tensor:
    """The released code's per-GT foreground threshold ``[G]``.

    ``n`` = number of in-box pixels where the teacher's instance map exceeds
    ``confident_thresh``; the threshold is the ``(n+1)``-th largest in-box value
    of ``probs`` (so about ``n`` pixels end up foreground), clamped to
    ``[low, high]``.
    """
    G = probs.shape[0]
    if G == 0:
        return probs.new_zeros((0,))
    inside = box_masks > 0.5
    n_conf = ((instance > confident_thresh) & inside).flatten(1).sum(dim=1)
    ranked = torch.where(inside, probs, torch.zeros_like(probs)).flatten(1).sort(dim=1, descending=True).values
    index = n_conf.clamp(max=ranked.shape[1] - 1).long()
    thresh = ranked.gather(1, index.unsqueeze(1)).squeeze(1)
    return thresh.clamp(min=low, max=high)


def pseudo_labels(probs: Tensor, box_masks: Tensor, tau_high: float | Tensor = 0.7, tau_low: float = 0.4,
                  outside_weight: float = 1.0, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Binary targets and per-pixel weights ``[G, H, W]`` from the pseudo probability ``probs``.

    Inside the box: target 1 where ``probs > tau_high`` and 0 where
    ``probs < tau_low`` (weight 1), weight 0 in between. Outside the box:
    target 0 with weight ``outside_weight``. ``valid`` (``[G, H, W]``, optional)
    zeroes the weight of padding pixels. ``tau_high`` may be a per-GT tensor ``[G]``.
    """
    if probs.shape != box_masks.shape:
        raise ValueError(f"probs {tuple(probs.shape)} and box masks {tuple(box_masks.shape)} differ")
    if isinstance(tau_high, Tensor):
        tau_high = tau_high.view(-1, *([1] * (probs.dim() - 1)))
    inside = box_masks > 0.5
    fg = (probs > tau_high) & inside
    bg_inside = (probs < tau_low) & inside
    target = fg.to(probs.dtype)
    weight = (fg | bg_inside).to(probs.dtype) + (~inside).to(probs.dtype) * float(outside_weight)
    if valid is not None:
        weight = weight * valid.to(probs.dtype)
    return target, weight
