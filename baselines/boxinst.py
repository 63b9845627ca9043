"""BoxInst's mask supervision (Tian et al., CVPR 2021) on the shared detector.

Two terms supervise the instance masks from boxes alone:

* **projection**: the mask's maximum along y must match the box's, and so
  must its maximum along x (Dice loss on each 1-D projection). This pins the
  mask to the box's extent without saying which pixels inside are object.
* **pairwise**: two neighbouring pixels (3x3 window, dilation 2) whose
  colours are similar (LAB similarity >= 0.3) should get the same label;
  the loss is ``-log P(same)`` with ``P(same) = p_i p_j + (1-p_i)(1-p_j)``,
  averaged over the pairs whose centre lies in the GT box. Its weight ramps
  up linearly over the first 10k of 90k iterations (same fraction of any
  schedule), because early masks are noise and the term would only teach
  "all pixels agree".

Pieces are public so SIM can reuse them: :func:`projection_loss`,
:func:`pairwise_log_same`, :func:`pairwise_loss` (which accepts an extra
per-pair weight, for the feature-similarity factor of SIM's released code),
:func:`color_similarity` and :func:`pairwise_warmup_weight`.

Choices where the paper is silent follow AdelaiDet (the authors' code): the
projection loss is averaged over instances, the pairwise loss is normalised
by the number (sum of weights) of selected pairs clamped at 1, and only the
neighbour's validity is applied to a pair (see ``baselines/lab.py``).
One deliberate addition: a pair is also dropped when its similarity is
exactly 0 (an invalid neighbour), so a colour threshold of 0 still ignores
padding; with the default threshold 0.3 this changes nothing.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from baselines.lab import batch_color_similarity, color_similarity, neighbour_offsets, unfold_neighbours
from sim_core.errors import InputError
from sim_core.evaluation.supervision_quality import diagnosable_rows, kept_pair_quality, one_row_per_gt
from sim_core.model.mask_inputs import MaskLossInputs, dice_loss, zero_loss
from sim_core.model.precision import at_least_float32

__all__ = [
    "DEFAULTS",
    "BoxInstLoss",
    "resolve_config",
    "projection_loss",
    "pairwise_log_same",
    "pairwise_log_same_at",
    "pairwise_loss",
    "pairwise_loss_dense",
    "pairwise_warmup_weight",
    "color_similarity",
]

DEFAULTS: dict[str, Any] = {
    "projection_weight": 1.0,
    "pairwise_weight": 1.0,
    "pairwise_color_thresh": 0.3,
    "pairwise_kernel": 3,
    "pairwise_dilation": 2,
    "pairwise_warmup_frac": 10000 / 90000,
    "ignore_bottom_px": 10,
    "pairwise_warmup_iters": None,  # a fixed ramp length in iterations; None: pairwise_warmup_frac * max_iter
    "lab_from_uint8": False,  # AdelaiDet truncates the pooled RGB to uint8 before LAB (baselines/lab.py)
}


# Keys the trainer adds to every method's section (context, not settings).
CONTEXT_KEYS = ("mask_feat_channels",)


def resolve_config(cfg: Mapping[str, Any] | None, defaults: Mapping[str, Any],
                   section: str) -> dict[str, Any]:
    """``defaults`` updated with ``cfg``; unknown keys and wrong types are an InputError.

    A typo in a params key would otherwise silently train with the default.
    :data:`CONTEXT_KEYS` are accepted and dropped when ``defaults`` lacks them.
    """
    resolved = dict(defaults)
    for key, value in (cfg or {}).items():
        if key in CONTEXT_KEYS and key not in defaults:
            continue
        if key not in defaults:
            raise InputError(f"params: {section}", f"unknown key {key!r}; known keys: "
                             + ", ".join(sorted(defaults)))
        default = defaults[key]
        if key == "pairwise_warmup_iters":  # None (use the fraction) or a count of iterations
            ok = value is None or (isinstance(value, int) and not isinstance(value, bool))
        elif isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        else:
            ok = isinstance(value, type(default))
        if not ok:
            kind = "null or an int" if default is None else type(default).__name__
            raise InputError(f"params: {section}", f"{key} must be a {kind}, got {value!r}")
        resolved[key] = value
    for key in ("projection_weight", "pairwise_weight", "pairwise_color_thresh",
                "pairwise_warmup_frac", "ignore_bottom_px", "pairwise_warmup_iters"):
        if key in resolved and resolved[key] is not None and resolved[key] < 0:
            raise InputError(f"params: {section}", f"{key} must be >= 0, got {resolved[key]!r}")
    if "pairwise_kernel" in resolved and (resolved["pairwise_kernel"] < 3
                                          or resolved["pairwise_kernel"] % 2 == 0):
        raise InputError(f"params: {section}", "pairwise_kernel must be an odd number >= 3, "
                         f"got {resolved['pairwise_kernel']!r}")
    if "pairwise_dilation" in resolved and resolved["pairwise_dilation"] < 1:
        raise InputError(f"params: {section}", "pairwise_dilation must be >= 1, "
                         f"got {resolved['pairwise_dilation']!r}")
    return resolved


def projection_loss(mask_probs: Tensor, box_masks: Tensor) -> Tensor:
    """Dice(max_y m, max_y b) + Dice(max_x m, max_x b) per instance: ``[P]``.

    ``mask_probs`` and ``box_masks`` are ``[P, 1, h, w]`` (or ``[P, h, w]``).
    """
    if mask_probs.shape != box_masks.shape:
        raise ValueError(f"shapes differ: {tuple(mask_probs.shape)} vs {tuple(box_masks.shape)}")
    boxes = box_masks.to(mask_probs.dtype)
    along_y = dice_loss(mask_probs.amax(dim=-2), boxes.amax(dim=-2))
    along_x = dice_loss(mask_probs.amax(dim=-1), boxes.amax(dim=-1))
    return along_y + along_x


def pairwise_log_same(mask_logits: Tensor, kernel: int = 3, dilation: int = 2) -> Tensor:
    """``log P(same label)`` of every pixel and each neighbour: ``[P, K, h, w]``.

    ``log(p_i p_j + (1-p_i)(1-p_j)) = logaddexp(log p_i + log p_j,
    log(1-p_i) + log(1-p_j))`` with ``log p = logsigmoid(logit)`` and
    ``log(1-p) = logsigmoid(-logit)``: finite and accurate for any logit.
    Neighbours outside the map get logit-space zeros (P(same) = 1); the loss
    gives them weight 0.
    """
    if mask_logits.dim() != 4 or mask_logits.shape[1] != 1:
        raise ValueError(f"mask_logits must be [P, 1, h, w], got {tuple(mask_logits.shape)}")
    log_fg = F.logsigmoid(mask_logits)
    log_bg = F.logsigmoid(-mask_logits)
    fg_neighbours = unfold_neighbours(log_fg, kernel, dilation)[:, 0]
    bg_neighbours = unfold_neighbours(log_bg, kernel, dilation)[:, 0]
    return torch.logaddexp(log_fg + fg_neighbours, log_bg + bg_neighbours)


def pairwise_loss(mask_logits: Tensor, similarity: Tensor, box_masks: Tensor,
                  color_thresh: float = 0.3, kernel: int = 3, dilation: int = 2,
                  pair_weights: Tensor | None = None, im_inds: Tensor | None = None) -> Tensor:
    """Mean ``-log P(same)`` over pairs with similarity >= thresh whose centre is in the box.

    ``similarity`` is ``[P, K, h, w]`` (the image's colour similarity gathered
    per instance), or ``[B, K, h, w]`` per image with ``im_inds`` ``[P]``
    giving each instance's image; ``box_masks`` ``[P, h, w]`` or ``[P, 1, h, w]``.
    ``pair_weights`` (optional, ``[P, K, h, w]``) multiplies each selected
    pair (e.g. a feature-similarity factor or a 0/1 mask). The normaliser is
    the sum of the final weights, clamped at 1. Returns a scalar (not ramped).

    The value is that of :func:`pairwise_loss_dense`: ``-(pairwise_log_same(...)
    * weights).sum() / weights.sum().clamp(min=1)``. Most of the ``[P, K, h, w]``
    pairs lie outside the box or below the colour threshold; their zero
    weights contribute nothing to the value or the gradient (for finite
    logits), so the selected pairs are found first (in-box pixels, then their
    neighbours' similarity) and ``log P(same)`` is evaluated for those only
    (:func:`pairwise_log_same_at`). Only the order of the two sums differs.
    """
    if mask_logits.dim() != 4 or mask_logits.shape[1] != 1:
        raise ValueError(f"mask_logits must be [P, 1, h, w], got {tuple(mask_logits.shape)}")
    num, _, height, width = mask_logits.shape
    num_pairs = len(neighbour_offsets(kernel, dilation))
    rows = num if im_inds is None else None
    if (similarity.dim() != 4 or similarity.shape[1:] != (num_pairs, height, width)
            or (rows is not None and similarity.shape[0] != rows)
            or (im_inds is not None and im_inds.shape != (num,))):
        expected = (num if im_inds is None else "B", num_pairs, height, width)
        raise ValueError(f"similarity {tuple(similarity.shape)} does not match pairs {expected}"
                         + ("" if im_inds is None else f" with im_inds {tuple(im_inds.shape)}"))
    dtype = mask_logits.dtype
    boxes = box_masks.reshape(num, height * width).to(dtype)
    with torch.no_grad():
        inst, pixel = torch.nonzero(boxes != 0, as_tuple=True)  # centres inside the box
        rows_of = inst if im_inds is None else im_inds[inst]
        candidate = similarity.reshape(similarity.shape[0], num_pairs, height * width).transpose(1, 2)[rows_of, pixel]
        chosen = candidate >= color_thresh
        if not color_thresh > 0:
            chosen &= candidate > 0
        centre, k = torch.nonzero(chosen, as_tuple=True)
        inst, pixel = inst[centre], pixel[centre]
    weights = boxes[inst, pixel]
    if pair_weights is not None:
        weights = weights * pair_weights.reshape(num, num_pairs, height * width)[inst, k, pixel].to(dtype)
    log_same = pairwise_log_same_at(mask_logits, inst, k, pixel, kernel, dilation)
    return -(log_same * weights).sum() / weights.sum().clamp(min=1.0)


def pairwise_loss_dense(mask_logits: Tensor, similarity: Tensor, box_masks: Tensor,
                        color_thresh: float = 0.3, kernel: int = 3, dilation: int = 2,
                        pair_weights: Tensor | None = None) -> Tensor:
    """:func:`pairwise_loss` written out over every pair ``[P, K, h, w]`` (the reference).

    ``log P(same)`` of all pairs times their weights (mostly 0); the tests
    compare :func:`pairwise_loss` with it.
    """
    log_same = pairwise_log_same(mask_logits, kernel, dilation)
    if similarity.shape != log_same.shape:
        raise ValueError(f"similarity {tuple(similarity.shape)} does not match pairs "
                         f"{tuple(log_same.shape)}")
    boxes = box_masks.reshape(box_masks.shape[0], 1, *box_masks.shape[-2:]).to(log_same.dtype)
    selected = (similarity >= color_thresh) & (similarity > 0)
    weights = selected.to(log_same.dtype) * boxes
    if pair_weights is not None:
        weights = weights * pair_weights.to(log_same.dtype)
    return -(log_same * weights).sum() / weights.sum().clamp(min=1.0)


def pairwise_log_same_at(mask_logits: Tensor, inst: Tensor, k: Tensor, pixel: Tensor,
                         kernel: int = 3, dilation: int = 2) -> Tensor:
    """``pairwise_log_same(mask_logits, kernel, dilation)[inst, k, y, x]`` for the given pairs only.

    ``inst``, ``k`` (neighbour index, :func:`baselines.lab.neighbour_offsets`
    order) and ``pixel`` (``y * w + x``) are equal-length index vectors.
    ``log p`` and ``log(1 - p)`` are taken once per pixel and zero-padded as
    :func:`pairwise_log_same` pads them (a neighbour outside the map reads 0);
    the two ends of every pair are gathered from the padded maps before the
    ``logaddexp``. Same values, same gradient.
    """
    offsets = neighbour_offsets(kernel, dilation)
    _, _, height, width = mask_logits.shape
    pad = dilation * (kernel // 2)
    padded_w = width + 2 * pad
    padded_hw = (height + 2 * pad) * padded_w
    log_fg = F.pad(F.logsigmoid(mask_logits), (pad, pad, pad, pad)).reshape(-1)
    log_bg = F.pad(F.logsigmoid(-mask_logits), (pad, pad, pad, pad)).reshape(-1)
    with torch.no_grad():  # flat index in the padded maps of each pair's centre and of its neighbour
        shift = torch.tensor([dy * padded_w + dx for dy, dx in offsets], dtype=torch.long,
                             device=mask_logits.device)
        centre = inst * padded_hw + (pixel // width + pad) * padded_w + pixel % width + pad
        neighbour = centre + shift[k]
    # index_select: its backward is an index_add, cheaper on CPU than advanced indexing's
    return torch.logaddexp(log_fg.index_select(0, centre) + log_fg.index_select(0, neighbour),
                           log_bg.index_select(0, centre) + log_bg.index_select(0, neighbour))


def pairwise_warmup_weight(iteration: int, max_iter: int, cfg: Mapping[str, Any]) -> float:
    """``w * min(iteration / ramp_iters, 1)``: the pairwise term's ramp.

    ``ramp_iters`` is ``pairwise_warmup_iters`` when set (AdelaiDet's
    ``MODEL.BOXINST.PAIRWISE.WARMUP_ITERS``, 10000 for every schedule: the
    paper profiles), else ``pairwise_warmup_frac * max_iter`` (the demo's
    schedule-scaled ramp).
    """
    weight = float(cfg.get("pairwise_weight", DEFAULTS["pairwise_weight"]))
    fixed = cfg.get("pairwise_warmup_iters")
    if fixed is not None:
        ramp_iters = float(fixed)
    else:
        ramp_iters = float(cfg.get("pairwise_warmup_frac", DEFAULTS["pairwise_warmup_frac"])) * max_iter
    if ramp_iters <= 0:
        return weight
    return weight * min(max(iteration, 0) / ramp_iters, 1.0)


class BoxInstLoss(nn.Module):
    """``forward(MaskLossInputs) -> {"loss_proj", "loss_pairwise"}`` (weighted scalars).

    The terms are computed in float32 whatever the logits' dtype (sums over
    thousands of pixels overflow float16 under mixed precision).
    ``projection_term`` / ``pairwise_term`` / ``image_similarity`` are the
    pieces SIM reuses on the same inputs. When ``inputs.diagnose`` is set,
    ``last_quality`` holds ``pair_precision`` / ``pair_recall``
    (:meth:`pair_quality`); otherwise it is ``{}``.
    """

    def __init__(self, cfg: Mapping[str, Any] | None = None):
        super().__init__()
        self.cfg = resolve_config(cfg, DEFAULTS, "boxinst")
        self.last_quality: dict[str, float] = {}

    def image_similarity(self, inputs: MaskLossInputs) -> Tensor:
        """Colour similarity of every image of the batch at mask stride: ``[B, K, h, w]``."""
        with torch.no_grad():
            return batch_color_similarity(
                inputs.images_raw, inputs.image_valid, inputs.mask_stride,
                self.cfg["pairwise_kernel"], self.cfg["pairwise_dilation"],
                self.cfg["ignore_bottom_px"], truncate_to_uint8=bool(self.cfg["lab_from_uint8"]))

    def projection_term(self, inputs: MaskLossInputs) -> Tensor:
        """Weighted mean projection loss over the instances (float32)."""
        logits = at_least_float32(inputs.mask_logits)
        boxes = self._box_masks(inputs, logits)
        return projection_loss(logits.sigmoid(), boxes).mean() * self.cfg["projection_weight"]

    def pairwise_term(self, inputs: MaskLossInputs, pair_weights: Tensor | None = None,
                      image_similarity: Tensor | None = None) -> Tensor:
        """Ramped, weighted pairwise loss.

        ``pair_weights`` ``[P, K, h, w]`` multiplies the selected pairs, as in
        :func:`pairwise_loss`; ``image_similarity`` ``[B, K, h, w]`` reuses an
        already computed :meth:`image_similarity`.
        """
        cfg = self.cfg
        logits = at_least_float32(inputs.mask_logits)
        boxes = self._box_masks(inputs, logits)
        if image_similarity is None:
            image_similarity = self.image_similarity(inputs)
        ramp = pairwise_warmup_weight(inputs.iteration, inputs.max_iter, cfg)
        loss = pairwise_loss(logits, at_least_float32(image_similarity), boxes, cfg["pairwise_color_thresh"],
                             cfg["pairwise_kernel"], cfg["pairwise_dilation"], pair_weights,
                             im_inds=inputs.im_inds)
        return loss * ramp

    def pair_quality(self, inputs: MaskLossInputs, image_similarity: Tensor) -> dict[str, float]:
        """``pair_precision`` / ``pair_recall`` of the pairs the pairwise term keeps (diagnostics).

        ``image_similarity`` ``[B, K, h, w]`` is what the term thresholds
        (colour; SIM's released code: colour x feature). Scored once per GT
        (the selection depends only on the image and the box) over the
        instances with real GT masks (pasted ones excluded).
        """
        with torch.no_grad():
            rows = diagnosable_rows(inputs.num_instances, inputs.gt_pasted,
                                    inputs.extras.get("gt_has_mask"), inputs.mask_logits.device)
            idx = one_row_per_gt(inputs.gt_inds, rows)
            if idx.numel() == 0:
                return {}
            cfg = self.cfg
            return kept_pair_quality(image_similarity[inputs.im_inds[idx]], inputs.gt_boxmasks[idx],
                                     inputs.gt_bitmasks[idx], cfg["pairwise_color_thresh"],
                                     cfg["pairwise_kernel"], cfg["pairwise_dilation"])

    def forward(self, inputs: MaskLossInputs) -> dict[str, Tensor]:
        self.last_quality = {}
        if inputs.num_instances == 0:
            zero = zero_loss(inputs.mask_logits)
            return {"loss_proj": zero, "loss_pairwise": zero.clone()}
        similarity = self.image_similarity(inputs)
        if inputs.diagnose:
            self.last_quality = self.pair_quality(inputs, similarity)
        return {"loss_proj": self.projection_term(inputs),
                "loss_pairwise": self.pairwise_term(inputs, image_similarity=similarity)}

    @staticmethod
    def _box_masks(inputs: MaskLossInputs, logits: Tensor) -> Tensor:
        boxes = inputs.gt_boxmasks.unsqueeze(1).to(logits.dtype)
        if boxes.shape != logits.shape:
            raise ValueError(f"gt_boxmasks {tuple(inputs.gt_boxmasks.shape)} do not match "
                             f"mask_logits {tuple(logits.shape)}")
        return boxes
