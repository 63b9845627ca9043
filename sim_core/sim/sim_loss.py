"""SIM's mask supervision: BoxInst's two terms plus L_pseudo and L_paste.

``SIMLoss(cfg)`` is the module ``baselines.build_mask_loss("sim", cfg)``
returns; ``cfg`` is the ``sim`` params section plus ``cfg["boxinst"]`` (BoxInst's
section, for the projection and pairwise terms SIM keeps) and
``cfg["mask_feat_channels"]`` (the prototype dimension).
``forward(MaskLossInputs)`` returns, always with the same keys:
``loss_proj``, ``loss_pairwise`` (BoxInst), ``loss_pseudo`` (lambda1-weighted,
0 during the warm-up or when switched off) and ``loss_paste``
(lambda2-weighted, 0 when nothing was pasted).

Per batch (paper Fig. 2):
1. the EMA teacher runs on the same input and predicts masks and boxes at
   every positive location (:mod:`sim_core.sim.teacher`);
2. ``M_I`` per GT: the positives' masks weighted by ``exp(mu * IoU)``;
3. ``M_S`` per GT from the teacher's features and the class prototypes;
4. ``M = (1 - alpha) M_S + alpha M_I`` -> targets and weights (ignore band);
5. ``L_pseudo`` on the sampled instances that were not pasted (pasted ones
   have a real mask target and get ``L_paste`` instead; with
   ``sim.paste_supervision: region`` on them too, as the release does, and
   every box term of a pasted batch reads the supervision regions the
   detector passes as ``gt_boxmasks`` / ``extras["gt_regions"]``);
6. bookkeeping for after the optimiser step: the Sinkhorn statistics of the
   student's confident pixel features (for the prototype update) and the
   teacher's ``M_I`` with the image (for the copy-paste bank).

Where the teacher and prototypes come from (one choice, both paths): the
training loop passes ``SIMTrainingState.extras()`` to
``CondInst.training_losses(..., extras=...)``, which puts ``teacher``,
``prototypes`` and ``sim_records`` (a list the loss appends its bookkeeping
to) into ``inputs.extras``. Without them, the loss uses what
:meth:`SIMLoss.attach` stored (``SIMTrainingState`` attaches itself at
construction), so a loop that does not forward ``extras`` still works. The
teacher and prototype bank are deliberately *not* submodules of the loss:
they would otherwise land in ``mask_loss.state_dict()`` and in the optimiser's
parameter list; ``SIMTrainingState.state_dict()`` checkpoints them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from baselines.boxinst import BoxInstLoss, pairwise_loss, pairwise_warmup_weight, projection_loss
from baselines.lab import channel_distance, unfold_neighbours
from sim_core.evaluation.supervision_quality import (diagnosable_rows, one_row_per_gt, prefixed,
                                                     pseudo_label_quality)
from sim_core.model.condinst import MASK_STRIDE, box_masks
from sim_core.model.mask_inputs import MaskLossInputs, zero_loss
from sim_core.model.precision import at_least_float32
from sim_core.sim.prototypes import PrototypeBank, confident_pixel_features, per_image_statistics
from sim_core.sim.pseudo_loss import paste_mask_loss, pseudo_loss_weight, pseudo_mask_loss
from sim_core.sim.self_correction import adaptive_tau_high, combine_maps, pseudo_labels
from sim_core.sim.semantic_map import semantic_probability_map, upsample_features
from sim_core.sim.teacher import instance_maps, run_teacher
from sim_core.sim.variants import SIMSettings, boxinst_config, resolve_sim_settings


@dataclass
class SIMStepRecord:
    """What one forward leaves for ``SIMTrainingState.after_step``."""

    proto_sums: Tensor | None  # [C, L, D] Sinkhorn-assigned feature sums (None: prototypes off); [B, C, L, D]
    proto_counts: Tensor | None  # [C, L]; [B, C, L]      with sim.prototype_updates: image
    images: list[Tensor]  # uint8 [3, h, w] images as the network saw them
    gt_boxes: Tensor  # [G, 4]
    gt_labels: Tensor  # [G]
    gt_im_inds: Tensor  # [G]
    instance_maps: Tensor  # [G, H/4, W/4] teacher M_I
    bankable: Tensor  # [G] bool: has positives and was not pasted (paste_supervision region: pasted too)
    iteration: int = 0
    max_iter: int = 1
    regions: list[Tensor | None] | None = None  # per image: full-resolution supervision regions of its GTs


def valid_at_mask_stride(image_valid: Tensor, stride: int = MASK_STRIDE) -> Tensor:
    """``[B, H, W]`` validity sampled at the mask pixels ``s//2 + s*i`` -> ``[B, H/s, W/s]``."""
    start = stride // 2
    return image_valid[:, start::stride, start::stride]


def feature_similarity(teacher_feats: Tensor, size: tuple[int, int], kernel: int, dilation: int) -> Tensor:
    """Released code's extra pairwise factor ``exp(-||z'_i - z'_j||)`` ``[B, K, H, W]`` (teacher features)."""
    feats = upsample_features(at_least_float32(teacher_feats), size)
    neighbours = unfold_neighbours(feats, kernel, dilation)  # [B, D, K, H, W]
    return torch.exp(-channel_distance(feats.unsqueeze(2), neighbours))


class SIMLoss(nn.Module):
    """``forward(MaskLossInputs) -> {loss_proj, loss_pairwise, loss_pseudo, loss_paste}``."""

    def __init__(self, cfg: dict[str, Any] | None = None):
        super().__init__()
        cfg = dict(cfg or {})
        self.settings: SIMSettings = resolve_sim_settings(cfg)
        self.boxinst = BoxInstLoss(boxinst_config(self.settings, cfg.get("boxinst")))
        self._attached: dict[str, Any] = {}
        self.last_record: SIMStepRecord | None = None
        self.last_quality: dict[str, float] = {}

    def attach(self, teacher: nn.Module | None = None, prototypes: PrototypeBank | None = None,
               records: list | None = None) -> None:
        """Give the loss its teacher/prototypes/record list without making them submodules."""
        self._attached = {"teacher": teacher, "prototypes": prototypes, "sim_records": records}

    def _get(self, inputs: MaskLossInputs, key: str) -> Any:
        value = inputs.extras.get(key)
        return value if value is not None else self._attached.get(key)

    # ----------------------------------------------------------------- BoxInst
    def boxinst_terms(self, inputs: MaskLossInputs, teacher_feats: Tensor | None) -> dict[str, Tensor]:
        if not self.settings.pairwise_feature_similarity:
            losses = self.boxinst(inputs)
            self.last_quality.update(self.boxinst.last_quality)
            return losses
        cfg = self.boxinst.cfg
        logits = inputs.mask_logits
        boxes = inputs.gt_boxmasks.unsqueeze(1).to(logits.dtype)
        loss_proj = projection_loss(logits.sigmoid(), boxes).mean() * cfg["projection_weight"]
        with torch.no_grad():
            colour = self.boxinst.image_similarity(inputs)
            feat = feature_similarity(teacher_feats, tuple(colour.shape[-2:]), cfg["pairwise_kernel"],
                                      cfg["pairwise_dilation"])
            similarity = colour * feat
            if inputs.diagnose:
                self.last_quality.update(self.boxinst.pair_quality(inputs, similarity))
            similarity = similarity.to(logits.dtype)
        ramp = pairwise_warmup_weight(inputs.iteration, inputs.max_iter, cfg)
        loss_pairwise = pairwise_loss(logits, similarity, boxes, cfg["pairwise_color_thresh"],
                                      cfg["pairwise_kernel"], cfg["pairwise_dilation"],
                                      im_inds=inputs.im_inds) * ramp
        return {"loss_proj": loss_proj, "loss_pairwise": loss_pairwise}

    # ----------------------------------------------------------------- SIM
    def pseudo_probability(self, pred, prototypes: PrototypeBank | None, a, M_I: Tensor) -> Tensor:
        """``M`` per GT ``[G, H/4, W/4]`` as the switches say."""
        s = self.settings
        semantic = None
        if s.prototypes:
            semantic = semantic_probability_map(pred.mask_feats, prototypes.prototypes, a.gt_labels, a.gt_im_inds,
                                                tau=s.tau, size=tuple(M_I.shape[-2:]))
        if not s.self_correction:
            return semantic
        return combine_maps(semantic, M_I, s.alpha)

    def needs_teacher(self) -> bool:
        s = self.settings
        return s.pseudo_loss or s.prototypes or s.copy_paste or s.pairwise_feature_similarity

    def forward(self, inputs: MaskLossInputs) -> dict[str, Tensor]:
        s = self.settings
        logits = inputs.mask_logits
        zero = zero_loss(logits)
        self.last_quality = {}
        if not self.needs_teacher():  # every SIM component off: plain BoxInst
            losses = self.boxinst(inputs)
            self.last_quality.update(self.boxinst.last_quality)
            return {**losses, "loss_pseudo": zero.clone(), "loss_paste": zero.clone()}
        teacher = self._get(inputs, "teacher")
        prototypes = self._get(inputs, "prototypes")
        records = self._get(inputs, "sim_records")
        if teacher is None:
            raise ValueError("SIMLoss needs the EMA teacher: pass SIMTrainingState.extras() to "
                             "training_losses(extras=...) or call SIMLoss.attach(teacher=...)")
        if s.prototypes and prototypes is None:
            raise ValueError("SIMLoss needs the prototype bank (extras['prototypes'] or attach(prototypes=...))")
        if prototypes is not None and prototypes.dim != inputs.mask_feats.shape[1]:
            raise ValueError(f"prototypes have {prototypes.dim} dims but the mask features "
                             f"{inputs.mask_feats.shape[1]} channels (model.mask_out_channels)")
        a = inputs.extras["assignment"]
        head_levels = inputs.extras["outputs"].pyramid if s.teacher_head_input == "student" else None
        pred = run_teacher(teacher, inputs.images_norm, a, head_levels=head_levels)
        if inputs.num_instances:
            losses = self.boxinst_terms(inputs, pred.mask_feats)
        else:
            losses = {"loss_proj": zero, "loss_pairwise": zero.clone()}

        # the release averages the teacher's masks at the student's sampled (top-k) positives only
        at = pred.at_rows(inputs.extras["sampled"]) if s.instance_map_positives == "sampled" else pred
        M_I, has_pos = instance_maps(at, a.gt_boxes, s.mu)
        if M_I.shape[-2:] != logits.shape[-2:]:
            raise ValueError(f"teacher masks {tuple(M_I.shape[-2:])} differ from student masks "
                             f"{tuple(logits.shape[-2:])}")
        pad_h, pad_w = inputs.images_norm.shape[-2:]
        gt_box_masks = inputs.extras.get("gt_regions")  # the filled boxes, or regions in a pasted batch
        if gt_box_masks is None:
            gt_box_masks = box_masks(a.gt_boxes, pad_h, pad_w, MASK_STRIDE)
        valid = valid_at_mask_stride(inputs.image_valid)[a.gt_im_inds]
        if inputs.diagnose:
            self.last_quality.update(self.pseudo_quality(inputs, pred, prototypes, a, M_I, gt_box_masks))

        weight = pseudo_loss_weight(inputs.iteration, inputs.max_iter, s.lambda_pseudo, s.pseudo_ramp,
                                    s.pseudo_start_frac, s.pseudo_ramp_span) if s.pseudo_loss else 0.0
        loss_pseudo = zero.clone()
        if weight > 0 and inputs.num_instances:
            M = self.pseudo_probability(pred, prototypes, a, M_I)
            if s.tau_high_mode == "adaptive":
                tau_high = adaptive_tau_high(M, M_I, gt_box_masks, s.confident_thresh, s.tau_high, s.tau_high_max)
            else:
                tau_high = s.tau_high
            target, pix_w = pseudo_labels(M, gt_box_masks, tau_high, s.tau_low, s.outside_box_weight, valid)
            gt = inputs.gt_inds
            rows_w = pix_w[gt]
            if inputs.gt_pasted is not None and s.paste_supervision == "box":  # region: pasted ones too (release)
                rows_w = rows_w * (~inputs.gt_pasted).to(rows_w.dtype).view(-1, 1, 1)
            keep = rows_w.flatten(1).sum(dim=1) > 0
            if keep.any():
                loss_pseudo = weight * pseudo_mask_loss(logits[keep], target[gt][keep], rows_w[keep],
                                                        s.pseudo_loss_kind, s.focal_on_probabilities)
        losses["loss_pseudo"] = loss_pseudo

        loss_paste = zero.clone()
        if s.copy_paste and inputs.gt_pasted is not None and bool(inputs.gt_pasted.any()):
            rows = inputs.gt_pasted
            paste_valid = valid_at_mask_stride(inputs.image_valid)[inputs.im_inds[rows]]
            dice_over = int(rows.numel()) if s.paste_dice_mean == "sampled" else None  # every sampled instance
            loss_paste = s.lambda_paste * paste_mask_loss(logits[rows], inputs.gt_bitmasks[rows], paste_valid,
                                                          s.focal_on_probabilities, dice_over)
        losses["loss_paste"] = loss_paste

        record = self.make_record(inputs, a, prototypes, M_I, has_pos, gt_box_masks, valid)
        self.last_record = record
        if records is not None:
            records.append(record)
        return losses

    @torch.no_grad()
    def pseudo_quality(self, inputs: MaskLossInputs, pred, prototypes: PrototypeBank | None, a, M_I: Tensor,
                       gt_box_masks: Tensor) -> dict[str, float]:
        """In-box quality of the pseudo labels from ``M_S``, ``M_I`` and ``M`` (diagnostics).

        Each map is thresholded as the loss thresholds ``M`` (foreground
        ``> tau_high``, the per-GT adaptive one when the variant uses it;
        background ``< tau_low``; the rest ignored) and scored against the GT
        masks of the non-pasted GTs (once per GT), with the prefixes ``MS_``,
        ``MI_`` and ``M_`` (:func:`pseudo_label_quality`). Reported also
        before ``L_pseudo`` is switched on: the labels it would use.
        """
        s = self.settings
        rows = diagnosable_rows(inputs.num_instances, inputs.gt_pasted, inputs.extras.get("gt_has_mask"),
                                inputs.mask_logits.device)
        idx = one_row_per_gt(inputs.gt_inds, rows)
        if idx.numel() == 0:
            return {}
        gts = inputs.gt_inds[idx]
        instance = M_I[gts].float()
        boxes = gt_box_masks[gts]
        semantic = None
        if s.prototypes and prototypes is not None:
            semantic = semantic_probability_map(pred.mask_feats, prototypes.prototypes, a.gt_labels[gts],
                                                a.gt_im_inds[gts], tau=s.tau,
                                                size=tuple(M_I.shape[-2:])).float()
        combined = combine_maps(semantic, instance, s.alpha) if s.self_correction else semantic
        tau_high: float | Tensor = s.tau_high
        if s.tau_high_mode == "adaptive" and combined is not None:
            tau_high = adaptive_tau_high(combined, instance, boxes, s.confident_thresh, s.tau_high,
                                         s.tau_high_max).view(-1, 1, 1)
        out: dict[str, float] = {}
        for prefix, probs in (("MS_", semantic), ("MI_", instance), ("M_", combined)):
            if probs is None:
                continue
            fg = probs > tau_high
            bg = probs < s.tau_low
            out.update(prefixed(prefix, pseudo_label_quality(fg, bg, ~(fg | bg), inputs.gt_bitmasks[idx], boxes)))
        return out

    @torch.no_grad()
    def make_record(self, inputs: MaskLossInputs, a, prototypes: PrototypeBank | None, M_I: Tensor,
                    has_pos: Tensor, gt_box_masks: Tensor, valid: Tensor) -> SIMStepRecord:
        """Prototype statistics and (with copy-paste) the bank material of this forward."""
        s = self.settings
        sums = counts = None
        if s.prototypes and prototypes is not None:
            confident = (M_I > s.confident_thresh) & (gt_box_masks > 0.5) & (valid > 0.5) & has_pos.view(-1, 1, 1)
            student = upsample_features(at_least_float32(inputs.mask_feats.detach()), tuple(M_I.shape[-2:]))
            if s.prototype_updates == "image":  # one statistic per image, applied in turn (after_step)
                sums, counts = per_image_statistics(prototypes, student, confident, a.gt_labels, a.gt_im_inds)
            else:
                feats, labels = confident_pixel_features(student, confident, a.gt_labels, a.gt_im_inds)
                sums, counts = prototypes.assignment_statistics(feats, labels)
        images: list[Tensor] = []
        bankable = torch.zeros_like(has_pos)
        if s.copy_paste:
            bankable = has_pos
            if s.paste_supervision == "box" and inputs.gt_pasted is not None:
                # every GT with positives has at least one sampled row, so gt_pasted covers all of them
                pasted = torch.zeros_like(has_pos)
                pasted[inputs.gt_inds[inputs.gt_pasted]] = True
                bankable = has_pos & ~pasted
            pre = inputs.extras.get("preprocessed")
            sizes = pre.sizes if pre is not None else [tuple(inputs.images_raw.shape[-2:])] * inputs.images_raw.shape[0]
            images = [inputs.images_raw[b, :, :h, :w].round().clamp(0, 255).to(torch.uint8)
                      for b, (h, w) in enumerate(sizes)]
        return SIMStepRecord(proto_sums=sums, proto_counts=counts, images=images, gt_boxes=a.gt_boxes.detach(),
                             gt_labels=a.gt_labels, gt_im_inds=a.gt_im_inds,
                             instance_maps=M_I if s.copy_paste else M_I.new_zeros((0,) + tuple(M_I.shape[1:])),
                             bankable=bankable, iteration=inputs.iteration, max_iter=inputs.max_iter,
                             regions=inputs.extras.get("gt_regions_full") if s.copy_paste else None)
