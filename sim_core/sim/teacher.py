"""Run the EMA teacher on the student's batch and gather what SIM's pseudo labels need.

For every positive FCOS location of the batch (the student's assignment, so
teacher and student talk about the same objects) the teacher predicts an
instance mask with its own controller at that location, and a box with its
own regression there. Grouped by GT, these are the inputs of the
self-correction (:mod:`sim_core.sim.self_correction`): *all* positives of a
GT, not only the ones sampled to train the student's mask head, because the
paper combines every positive mask of the object. The teacher's mask
features ``Z'`` feed the semantic map.

The teacher sees the exact input the student sees (after copy-paste), so its
pseudo labels are aligned with the student's predictions pixel for pixel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sim_core.model.condinst import flatten_levels
from sim_core.model.precision import at_least_float32
from sim_core.sim.ema import EMATeacher, batch_statistics
from sim_core.sim.self_correction import instance_probability_map, iou_weights


@dataclass
class TeacherPredictions:
    """Teacher outputs at the positives of one batch (row ``k`` = positive ``k`` of the assignment)."""

    mask_feats: Tensor  # [B, D, H/s, W/s] teacher mask features Z' (s = model.mask_feat_stride)
    pos_probs: Tensor  # [K, H/4, W/4] teacher mask probabilities
    pos_boxes: Tensor  # [K, 4] teacher predicted boxes (xyxy)
    pos_gt_inds: Tensor  # [K] batch-flat GT index of each positive
    num_gts: int

    def at_rows(self, rows: Tensor) -> "TeacherPredictions":
        """The same predictions at the positives ``rows`` only (e.g. the student's sampled ones)."""
        return TeacherPredictions(mask_feats=self.mask_feats, pos_probs=self.pos_probs[rows],
                                  pos_boxes=self.pos_boxes[rows], pos_gt_inds=self.pos_gt_inds[rows],
                                  num_gts=self.num_gts)


def teacher_network(teacher: nn.Module) -> nn.Module:
    """The CondInst inside an :class:`EMATeacher` (or the network itself)."""
    return teacher.model if isinstance(teacher, EMATeacher) else teacher


@dataclass
class TeacherOutputs:
    """The part of ``DetectorOutputs`` the teacher pass reads (same fields, same values)."""

    box_reg: Tensor  # [B, N, 4]
    controllers: Tensor  # [B, N, K]
    locations: Tensor  # [N, 2]
    strides: Tensor  # [N]
    mask_feats: Tensor  # [B, Cm, H/s, W/s]


def teacher_forward(net: nn.Module, images_norm: Tensor, head_levels: list[Tensor] | None = None) -> TeacherOutputs:
    """``net(images_norm)`` without the outputs :func:`run_teacher` never reads.

    Backbone, neck, mask branch and the FCOS head's box tower with its box
    regression and controller run exactly as in ``CondInst.forward``; the
    classification tower, class logits and centerness (used by the student's
    detection loss, its instance sampling and inference, never by the
    teacher's pseudo labels) are skipped. ``head_levels`` (the student's FPN
    levels, ``sim.teacher_head_input: student``) replace the teacher's own
    levels as the input of its FCOS head, as in the released code; its mask
    branch still reads the teacher's own features.
    """
    feats, pyramid = net.pyramid(images_norm)
    head_input = pyramid
    if head_levels is not None:
        if [tuple(x.shape) for x in head_levels] != [tuple(x.shape) for x in pyramid]:
            raise ValueError("head_levels must have the shapes of the teacher's own FPN levels")
        head_input = [x.detach() for x in head_levels]
    box, ctl = net.head.box_outputs(head_input)
    mask_feats = net.mask_features(feats, pyramid)
    locations, strides, _, _ = net.level_locations(pyramid)
    return TeacherOutputs(box_reg=flatten_levels(box), controllers=flatten_levels(ctl), locations=locations,
                          strides=strides, mask_feats=mask_feats)


@torch.no_grad()
def run_teacher(teacher: nn.Module, images_norm: Tensor, assignment, chunk: int = 256,
                head_levels: list[Tensor] | None = None) -> TeacherPredictions:
    """Teacher forward on ``images_norm`` and its masks/boxes at every positive of ``assignment``.

    ``assignment`` is the student's ``FCOSAssignment`` (``pos_im_inds``,
    ``pos_loc_inds``, ``pos_gt_inds``, ``gt_boxes``). Masks are computed in
    chunks of ``chunk`` positives to bound memory. The network runs through
    :func:`teacher_forward` (no classification tower: nothing here reads it);
    ``head_levels``: see there.
    """
    net = teacher_network(teacher)
    was_training = net.training
    net.eval()
    try:
        with batch_statistics(net):  # as the released code's teacher (sim_core.sim.ema)
            out = teacher_forward(net, images_norm, head_levels)
        im, loc = assignment.pos_im_inds, assignment.pos_loc_inds
        probs = []
        for start in range(0, int(loc.numel()), chunk):
            i, l_ = im[start:start + chunk], loc[start:start + chunk]
            logits = net.instance_mask_logits(out.mask_feats, out.controllers[i, l_], out.locations[l_], i,
                                              out.strides[l_])
            probs.append(at_least_float32(logits.sigmoid()[:, 0]))
        factor = net.mask_head.feat_stride // net.mask_head.out_stride
        h, w = out.mask_feats.shape[-2] * factor, out.mask_feats.shape[-1] * factor
        pos_probs = torch.cat(probs) if probs else out.mask_feats.new_zeros((0, h, w))
        pos_boxes = at_least_float32(net.decode_boxes(out.locations[loc], out.box_reg[im, loc]))
    finally:
        net.train(was_training)
    return TeacherPredictions(mask_feats=at_least_float32(out.mask_feats.detach()), pos_probs=pos_probs,
                              pos_boxes=pos_boxes, pos_gt_inds=assignment.pos_gt_inds,
                              num_gts=int(assignment.gt_boxes.shape[0]))


def instance_maps(pred: TeacherPredictions, gt_boxes: Tensor, mu: float) -> tuple[Tensor, Tensor]:
    """``M_I`` ``[G, H/4, W/4]`` for every GT and ``[G]`` bool "the GT has positives".

    GTs without a positive location get an all-zero map (they have no mask
    prediction to learn from and no sampled instance to supervise).
    """
    groups = pred.pos_gt_inds
    G = pred.num_gts
    weights = iou_weights(pred.pos_boxes, gt_boxes[groups].float(), groups, G, mu)
    maps = instance_probability_map(pred.pos_probs, weights, groups, G)
    has_pos = torch.zeros(G, dtype=torch.bool, device=groups.device)
    has_pos[groups] = True
    return maps, has_pos
