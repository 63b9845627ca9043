"""What the detector hands to a mask-supervision loss.

Every method in simbench (``mask``, ``boxmask``, ``boxinst``, ``boxlevelset``,
``sim``) differs only in how it supervises the instance masks of the shared
CondInst-style detector. The detector computes the instance mask logits of the
sampled positive locations (top-64 per image, spread over the GT boxes) and
packs everything a loss may need into :class:`MaskLossInputs`. A mask loss is
an ``nn.Module`` (some have parameters, e.g. BoxLevelSet's feature conv) with

    forward(inputs: MaskLossInputs) -> dict[str, Tensor]

returning named scalar loss terms (already weighted; the engine sums them).
A loss that supports supervision diagnostics also sets ``self.last_quality``
when ``inputs.diagnose`` is true (see :attr:`MaskLossInputs.diagnose`).

Shapes: ``P`` sampled instances in the batch, ``B`` images, padded input size
``H x W`` (a multiple of 32), mask stride ``s = 4`` so masks are ``H/4 x W/4``.
All per-instance tensors are aligned: row ``k`` of ``mask_logits``,
``gt_boxes``, ``gt_bitmasks``, ``im_inds`` ... describe the same instance.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor


@dataclass
class MaskLossInputs:
    # --- predictions of the student (the network being trained) -------------
    mask_logits: Tensor
    """[P, 1, H/4, W/4] instance mask logits at mask stride 4."""
    mask_feats: Tensor
    """[B, Cm, H/8, W/8] output of the mask branch (input of the dynamic head)."""
    # --- ground truth of each sampled instance ------------------------------
    gt_boxes: Tensor
    """[P, 4] GT box of the instance, xyxy in padded-input pixels."""
    gt_labels: Tensor
    """[P] contiguous class label (0..C-1) of the GT box."""
    gt_inds: Tensor
    """[P] index of the GT in the batch-flat GT list (image 0's GTs first)."""
    im_inds: Tensor
    """[P] index of the image in the batch."""
    gt_bitmasks: Tensor
    """[P, H/4, W/4] float GT instance mask at stride 4 (only ``mask`` may use it)."""
    gt_boxmasks: Tensor
    """[P, H/4, W/4] float filled GT box at stride 4; in a batch pasted with
    ``sim.paste_supervision: region``, the instance's supervision region
    (``sim_core.model.condinst.supervision_regions``)."""
    # --- images -------------------------------------------------------------
    images_raw: Tensor
    """[B, 3, H, W] un-normalised RGB in [0, 255], zero in the padding."""
    images_norm: Tensor
    """[B, 3, H, W] normalised network input."""
    image_valid: Tensor
    """[B, H, W] 1.0 on real image pixels, 0.0 on padding."""
    # --- schedule -----------------------------------------------------------
    iteration: int = 0
    max_iter: int = 1
    gt_pasted: Tensor | None = None
    """[P] bool, True for instances pasted by SIM's copy-paste (their
    ``gt_bitmasks`` are teacher pseudo masks); None when nothing was pasted."""
    diagnose: bool = False
    """The loss should fill ``last_quality`` this step: a ``dict[str, float]``
    of supervision-quality metrics of its own targets against the GT masks
    (``sim_core.evaluation.supervision_quality``), computed under
    ``torch.no_grad()`` over the non-pasted instances that have GT masks.
    Set by the trainer every ``train.log_every`` iterations when
    ``train.supervision_diagnostics`` is true; the metrics are logged as
    ``sq/<name>``, never added to the loss."""
    # --- anything method-specific (e.g. SIM's teacher outputs) ---------------
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def num_instances(self) -> int:
        return int(self.mask_logits.shape[0])

    @property
    def mask_stride(self) -> int:
        return int(round(self.images_raw.shape[-1] / self.mask_logits.shape[-1]))


def dice_loss(probs: Tensor, targets: Tensor, weights: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Per-instance Dice loss ``1 - 2 sum(xy) / (sum x^2 + sum y^2 + eps)``.

    ``probs`` and ``targets`` are ``[P, ...]``; ``weights`` (same shape, optional)
    multiplies every pixel's contribution (0 = ignored). Returns ``[P]``.
    This is the squared-denominator Dice of CondInst / BoxInst.
    """
    p = probs.flatten(1)
    t = targets.flatten(1).to(p.dtype)
    if weights is not None:
        w = weights.flatten(1).to(p.dtype)
        p = p * w
        t = t * w
    inter = (p * t).sum(dim=1)
    union = (p * p).sum(dim=1) + (t * t).sum(dim=1) + eps
    return 1.0 - 2.0 * inter / union


def zero_loss(reference: Tensor) -> Tensor:
    """A zero that keeps the graph connected when a batch has no instances."""
    return reference.sum() * 0.0


MaskLossFn = Callable[[MaskLossInputs], "dict[str, Tensor]"]
__all__ = ["MaskLossInputs", "dice_loss", "zero_loss", "MaskLossFn", "torch"]
