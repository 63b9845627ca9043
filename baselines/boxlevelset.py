"""BoxLevelSet's mask supervision (Li et al., ECCV 2022) on the shared detector.

The predicted mask probability ``sigma`` of each instance is read as a
(smoothed Heaviside of a) level-set function, and the box-restricted
Chan-Vese energy of an input map ``I`` is minimised w.r.t. it:

    F(I) = [ sum_box |I - c1|^2 sigma + |I - c2|^2 (1 - sigma)
             + gamma * length(sigma) ] / #box pixels,
    c1 = sum_box I sigma / sum_box sigma,  c2 = sum_box I (1-sigma) / sum_box (1-sigma),

on two inputs: ``I_u``, the normalised network input resized to mask
resolution (weight 0.05), and a deep-feature input (weight 5.0) built from
``I_f``, a 3x3 conv from the mask-branch features to 5 channels. BoxInst's
projection term (weight 3.0) confines the mask to the box and gives the level
set its initial shape. Returned terms: ``loss_proj``, ``loss_levelset_img``,
``loss_levelset_feat``.

Choices where the paper is silent follow the authors' released code
(LiWentomng/boxlevelset, ``levelset_loss.py`` and ``box_solov2_head.py``):
``I_u`` is the *normalised* image, bilinearly resized; ``|I - c|^2`` is summed
over the channels and divided by the channel count; c1/c2 are not detached
(denominators clamped at 1e-5); energies are divided by the box's pixel count
and averaged over instances.

Two variants (``boxlevelset.variant``), see ``docs/boxlevelset.md``:

* ``released_code`` (default): what the released code computes.
  - Feature term: the level-set *input* is the prediction itself filtered
    along two trees, ``T1 = TF(sigma; MST and weights of I_u,
    exp(-||dI_u||^2 / 0.02))`` and ``T2 = TF(T1; MST and weights of I_f,
    exp(-||dI_f||^2))``, ``I = cat(T1, T2)`` (2 channels); the level-set
    *function* is ``sigma`` as in the image term. Gradient reaches the logits
    through ``sigma`` and through ``T1``/``T2``; ``I_f`` is trained only
    through the second tree's edge weights.
  - Length term on both channels of the box-masked scores
    ``(sigma * B, (1 - sigma) * B)`` over all 4-neighbour pairs, coefficient
    ``released_gamma`` (1e-5), added inside each term before its 0.05 / 5.0
    weight. (At a box-border pair the two channels add up to exactly 1, so
    the border adds a constant; inside, the term is ``2 |d sigma|``.)
  - Per-level resolution: each instance is assigned to SOLOv2's FPN levels
    by ``sqrt(box area)`` (ranges (1,96), (48,192), (96,384), (192,768),
    (384,2048) input pixels; a box in two ranges is supervised on both) and
    all three terms are computed at that level's mask resolution, stride
    4, 4, 8, 16, 16: the stride-4 logits, the image, ``I_f`` and the box are
    bilinearly resized to it, as the released head does.
* ``paper``: the paper's reading. The feature term's input is ``I_f`` (5
  channels), with ``tree_filter: true`` first filtered along the MST of
  ``I_f`` itself. Length term ``levelset_gamma`` (1e-4) on 4-neighbour pairs
  with both pixels in the box; everything at stride 4. A (near-)constant
  ``I_f`` has (near-)zero energy, so this feature term hardly trains.

``tree_filter: false`` (either variant): the feature term runs on ``I_f``
unfiltered (the paper's ablation without the filter; the released code has
no such switch).

``I_f`` is upsampled from the mask-branch grid to the mask logits' grid with
the same aligned bilinear upsampling the dynamic head uses for the logits, so
the two maps sample the same points.

With ``inputs.diagnose`` the loss records ``last_quality``: the in-box IoU
with the GT mask of the foreground each energy currently prefers
(:func:`preferred_inside`), over the instances with real GT masks.

The detector is CondInst-style, not SOLOv2: masks come from the dynamic
head, per sampled positive location, instead of SOLO's grid cells; see
``docs/boxlevelset.md``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from baselines.boxinst import projection_loss, resolve_config
from baselines.tree_filter import build_tree_schedule, tree_edge_weights, tree_filter
from sim_core.errors import InputError
from sim_core.evaluation.supervision_quality import diagnosable_rows, foreground_iou
from sim_core.model.mask_head import aligned_bilinear
from sim_core.model.mask_inputs import MaskLossInputs
from sim_core.model.precision import at_least_float32

__all__ = ["DEFAULTS", "VARIANTS", "SOLO_SCALE_RANGES", "SOLO_LEVEL_FACTORS", "BoxLevelSetLoss",
           "levelset_energy", "region_energy", "curve_length", "box_length", "released_length",
           "border_pairs", "box_pixels", "preferred_inside", "solo_levels"]

DEFAULTS: dict[str, Any] = {
    "projection_weight": 3.0,
    "levelset_img_weight": 0.05,
    "levelset_feat_weight": 5.0,
    "levelset_gamma": 1e-4,
    "released_gamma": 1e-5,
    "feature_channels": 5,
    "tree_filter": True,
    "tree_filter_img_sigma": 0.02,
    "tree_filter_feat_sigma": 1.0,
    "variant": "released_code",
    "mask_feat_channels": 0,
}
VARIANTS = ("paper", "released_code")
# SOLOv2 (released BoxLevelSet configs, COCO and VOC): scale ranges of sqrt(box area) in
# input pixels per level, and each level's mask resolution relative to stride 4 (the
# released head's mask strides are 4, 4, 8, 16, 16).
SOLO_SCALE_RANGES = ((1.0, 96.0), (48.0, 192.0), (96.0, 384.0), (192.0, 768.0), (384.0, 2048.0))
SOLO_LEVEL_FACTORS = (1, 1, 2, 4, 4)


def box_length(probs: Tensor, box: Tensor) -> Tensor:
    """``sum |grad sigma|`` over 4-neighbour pairs inside the box: ``[P]`` (paper variant).

    ``probs`` ``[P, 1, h, w]``, ``box`` ``[P, 1, h, w]`` (0/1).
    """
    dy = (probs[..., 1:, :] - probs[..., :-1, :]).abs() * box[..., 1:, :] * box[..., :-1, :]
    dx = (probs[..., :, 1:] - probs[..., :, :-1]).abs() * box[..., :, 1:] * box[..., :, :-1]
    return dy.flatten(1).sum(dim=1) + dx.flatten(1).sum(dim=1)


def released_length(probs: Tensor, box: Tensor) -> Tensor:
    """The released code's length: ``sum |grad|`` of ``(sigma B, (1 - sigma) B)``: ``[P]``.

    Over all 4-neighbour pairs of the map and both channels. Inside the box
    it is ``2 |d sigma|`` per pair; a pair across the box border adds
    ``sigma + (1 - sigma) = 1`` (a constant: no gradient). So it equals
    ``2 box_length + border_pairs(box)``, which is how :func:`curve_length`
    computes it (one difference map instead of two); this literal form is
    the reference the tests compare with.
    """
    return _neighbour_abs_differences(torch.cat([probs * box, (1.0 - probs) * box], dim=1))


def border_pairs(box: Tensor) -> Tensor:
    """Number of 4-neighbour pairs with one pixel in the box and one outside: ``[P]``."""
    return _neighbour_abs_differences(box)


def _neighbour_abs_differences(maps: Tensor) -> Tensor:
    """``sum |x_u - x_v|`` over all 4-neighbour pairs and channels of ``maps`` ``[P, C, h, w]``: ``[P]``."""
    dy = (maps[..., 1:, :] - maps[..., :-1, :]).abs()
    dx = (maps[..., :, 1:] - maps[..., :, :-1]).abs()
    return dy.flatten(1).sum(dim=1) + dx.flatten(1).sum(dim=1)


def curve_length(probs: Tensor, box: Tensor, length: str = "box") -> Tensor:
    """The energy's length term ``[P]``: :func:`box_length` (``"box"``, paper variant) or
    the released code's (``"released"``, ``2 box_length + border_pairs``, equal to
    :func:`released_length`). Depends on ``sigma`` and the box only, so the image and the
    feature term of one instance share it."""
    if length not in ("box", "released"):
        raise ValueError(f"length must be 'box' or 'released', got {length!r}")
    inner = box_length(probs, box)
    return inner if length == "box" else 2.0 * inner + border_pairs(box)


def _region_means(probs: Tensor, image: Tensor, box: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Box-masked input and the sigma-weighted means ``c1`` (inside) and ``c2`` (outside)."""
    inside = probs * box
    outside = (1.0 - probs) * box
    masked = image * box
    c1 = (masked * inside).sum(dim=(2, 3), keepdim=True) / \
        inside.sum(dim=(2, 3), keepdim=True).clamp(min=1e-5)
    c2 = (masked * outside).sum(dim=(2, 3), keepdim=True) / \
        outside.sum(dim=(2, 3), keepdim=True).clamp(min=1e-5)
    return masked, c1, c2


def region_energy(probs: Tensor, image: Tensor, box: Tensor) -> Tensor:
    """The data term ``sum_box |I - c1|^2 sigma + |I - c2|^2 (1 - sigma)``, mean over channels: ``[P]``.

    ``probs`` ``[P, 1, h, w]``, ``image`` ``[P, C, h, w]``, ``box`` ``[P, 1, h, w]`` (0/1).
    Computed from box sums per instance and channel rather than pixel by pixel:
    with ``s1 = sum_box sigma``, ``a1 = sum_box I sigma`` (``s2``, ``a2`` the same
    with ``1 - sigma``) and ``q = sum_box I^2``, the term is
    ``q - 2 c1 a1 + c1^2 s1 - 2 c2 a2 + c2^2 s2`` for any ``c1``, ``c2``, so also
    for the clamped means ``c = a / max(s, 1e-5)``. The same value and gradient
    as the pixel-wise form up to float32 rounding (``tests/test_boxlevelset.py``),
    in about a third of the time: two products of ``[P, C, hw]`` with the two
    weight maps in one ``bmm`` instead of a dozen full-size elementwise maps and
    their gradients. ``s2`` and ``a2`` are summed from ``1 - sigma``, not taken
    as ``total - s1``: where ``sigma`` saturates at 1 over a box that difference
    is rounding noise, and divided by the clamp it would be a wrong ``c2``.
    Runs in float32 with autocast off (``bmm`` is on CPU autocast's bfloat16 list).
    """
    with torch.autocast(probs.device.type, enabled=False):
        box = box.to(probs.dtype).flatten(1)                                     # [P, hw]
        probs = probs.flatten(1)
        values = image.flatten(2).to(probs.dtype)                                # [P, C, hw]
        weights = torch.stack([probs * box, (1.0 - probs) * box], dim=2)         # [P, hw, 2]
        sums = torch.bmm(values, weights)                                        # [P, C, 2]: a1, a2
        mass = weights.sum(dim=1).unsqueeze(1)                                   # [P, 1, 2]: s1, s2
        means = sums / mass.clamp(min=1e-5)                                      # c1, c2
        squares = (values * values * box.unsqueeze(1)).sum(dim=2)                # [P, C]: q
        per_channel = squares + (means * (means * mass - 2.0 * sums)).sum(dim=2)
        return per_channel.sum(dim=1) / image.shape[1]


def box_pixels(box: Tensor) -> Tensor:
    """Pixels per box ``[P]`` (at least 1): the energies' normaliser."""
    return box.flatten(1).sum(dim=1).clamp(min=1.0)


def levelset_energy(probs: Tensor, image: Tensor, box: Tensor, gamma: float = 1e-4,
                    length: str = "box") -> Tensor:
    """Box-restricted Chan-Vese energy per instance, normalised by box size: ``[P]``.

    ``probs`` ``[P, 1, h, w]`` is ``sigma``; ``image`` ``[P, C, h, w]`` the
    input map (already gathered per instance); ``box`` ``[P, 1, h, w]``.
    ``length``: ``"box"`` (:func:`box_length`, paper variant) or
    ``"released"`` (:func:`released_length`). :class:`BoxLevelSetLoss` adds the
    same three parts itself, sharing the length term between its two inputs.
    """
    if probs.shape[0] != image.shape[0] or probs.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"probs {tuple(probs.shape)} and input {tuple(image.shape)} differ")
    box = box.to(probs.dtype)
    curve = curve_length(probs, box, length)
    return (region_energy(probs, image, box) + gamma * curve) / box_pixels(box)


@torch.no_grad()
def preferred_inside(probs: Tensor, image: Tensor, box: Tensor) -> Tensor:
    """``[P, h, w]`` bool: box pixels where the data term prefers "inside".

    ``|I - c1|^2 < |I - c2|^2`` (summed over channels) with the current
    ``c1``/``c2`` of :func:`levelset_energy`: the foreground the energy pulls
    ``sigma`` toward.
    """
    box = box.to(probs.dtype)
    masked, c1, c2 = _region_means(probs, image, box)
    closer = (masked - c1).pow(2).sum(dim=1) < (masked - c2).pow(2).sum(dim=1)
    return closer & (box[:, 0] > 0.5)


def solo_levels(boxes: Tensor) -> list[Tensor]:
    """Indices of the instances SOLOv2 assigns to each level, from ``sqrt(box area)``.

    ``boxes`` ``[P, 4]`` xyxy in input pixels. A box in two overlapping
    ranges is in both lists; a box outside every range (below 1 or above
    2048 pixels) goes to the nearest end level, so no instance is dropped.
    """
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0)
    scale = (wh[:, 0] * wh[:, 1]).sqrt()
    hits = [(scale >= lo) & (scale <= hi) for lo, hi in SOLO_SCALE_RANGES]
    hits[0] = hits[0] | (scale < SOLO_SCALE_RANGES[0][0])
    hits[-1] = hits[-1] | (scale > SOLO_SCALE_RANGES[-1][1])
    return [h.nonzero().flatten() for h in hits]


@dataclass
class _Group:
    """Instances (with repeats) supervised at one mask resolution."""

    rows: Tensor      # [Q] rows of the batch's instances
    logits: Tensor    # [Q, 1, h, w]
    box: Tensor       # [Q, 1, h, w]
    gt: Tensor        # [Q, 1, h, w] GT masks at this resolution (diagnostics only)
    image: Tensor     # [B, 3, h, w]
    features: Tensor  # [B, C, h, w]


class BoxLevelSetLoss(nn.Module):
    """``forward(MaskLossInputs) -> {"loss_proj", "loss_levelset_img", "loss_levelset_feat"}``.

    Has parameters: the 3x3 conv producing ``I_f`` from the mask features
    (``mask_feat_channels`` in, ``feature_channels`` out). Pass the channel
    count explicitly, or set ``cfg["mask_feat_channels"]``. After a forward
    with ``inputs.diagnose``, ``last_quality`` holds
    ``levelset_img_fg_iou`` / ``levelset_feat_fg_iou``; otherwise ``{}``.
    """

    def __init__(self, cfg: Mapping[str, Any] | None = None, mask_feat_channels: int | None = None):
        super().__init__()
        self.cfg = resolve_config(cfg, DEFAULTS, "boxlevelset")
        channels = mask_feat_channels if mask_feat_channels is not None \
            else self.cfg["mask_feat_channels"]
        if not isinstance(channels, int) or channels <= 0:
            raise InputError("params: boxlevelset", "mask_feat_channels must be a positive "
                             f"int (the mask branch's output channels), got {channels!r}")
        if self.cfg["variant"] not in VARIANTS:
            raise InputError("params: boxlevelset", f"variant must be one of {VARIANTS}, "
                             f"got {self.cfg['variant']!r}")
        for key in ("levelset_gamma", "released_gamma", "levelset_img_weight",
                    "levelset_feat_weight"):
            if self.cfg[key] < 0:
                raise InputError("params: boxlevelset", f"{key} must be >= 0")
        for key in ("tree_filter_img_sigma", "tree_filter_feat_sigma"):
            if self.cfg[key] <= 0:
                raise InputError("params: boxlevelset", f"{key} must be > 0")
        if self.cfg["feature_channels"] <= 0:
            raise InputError("params: boxlevelset", "feature_channels must be > 0")
        self.feature_conv = nn.Conv2d(channels, self.cfg["feature_channels"], 3, padding=1)
        nn.init.normal_(self.feature_conv.weight, std=0.01)
        nn.init.zeros_(self.feature_conv.bias)
        self.last_quality: dict[str, float] = {}

    @property
    def released(self) -> bool:
        return self.cfg["variant"] == "released_code"

    def deep_features(self, mask_feats: Tensor, size: tuple[int, int]) -> Tensor:
        """``I_f``: 3x3 conv of the mask features, upsampled onto the mask logits' grid.

        An integer upsampling factor uses :func:`aligned_bilinear` (as the
        dynamic head does for the logits); any other size plain bilinear.
        """
        features = self.feature_conv(mask_feats)
        fh, fw = features.shape[-2:]
        if size[0] % fh == 0 and size[1] % fw == 0 and size[0] // fh == size[1] // fw:
            return aligned_bilinear(features, size[0] // fh)
        return F.interpolate(features, size=size, mode="bilinear", align_corners=False)

    def _feature_input(self, im_inds: Tensor, probs: Tensor, image: Tensor,
                       features: Tensor) -> Tensor:
        """The feature term's level-set input, per instance ``[Q, C, h, w]``.

        ``image`` ``[B, 3, h, w]`` and ``features`` ``[B, C, h, w]`` per image,
        ``probs`` ``[Q, 1, h, w]`` per instance of image ``im_inds``.
        """
        cfg = self.cfg
        if not cfg["tree_filter"]:
            return features[im_inds]
        if not self.released:
            schedule = build_tree_schedule(features)
            weights = tree_edge_weights(features, schedule, cfg["tree_filter_feat_sigma"])
            return tree_filter(features, schedule, weights)[im_inds]
        # released_code: filter the prediction itself, one image's instances as channels
        batch = image.shape[0]
        num = probs.shape[0]
        slot = _slot_in_image(im_inds, batch)
        width = int(slot.max().item()) + 1
        stacked = probs.new_zeros(batch, width, *probs.shape[-2:])
        stacked = stacked.index_put((im_inds, slot), probs[:, 0])
        img_tree = build_tree_schedule(image)
        img_weights = tree_edge_weights(image, img_tree, cfg["tree_filter_img_sigma"]).detach()
        low = tree_filter(stacked, img_tree, img_weights)
        feat_tree = build_tree_schedule(features)
        feat_weights = tree_edge_weights(features, feat_tree, cfg["tree_filter_feat_sigma"])
        high = tree_filter(low, feat_tree, feat_weights)
        picked_low = low[im_inds, slot].reshape(num, 1, *probs.shape[-2:])
        picked_high = high[im_inds, slot].reshape(num, 1, *probs.shape[-2:])
        return torch.cat([picked_low, picked_high], dim=1)

    def _groups(self, inputs: MaskLossInputs, logits: Tensor, box: Tensor, image: Tensor,
                features: Tensor) -> list[_Group]:
        """The (instance, resolution) groups the terms are computed on.

        ``paper``: every instance once, at the logits' stride. ``released_code``:
        per SOLOv2 level (:func:`solo_levels`), levels of equal resolution merged.
        """
        gt = inputs.gt_bitmasks.unsqueeze(1).to(logits.dtype)
        if not self.released:
            rows = torch.arange(logits.shape[0], device=logits.device)
            return [_Group(rows, logits, box, gt, image, features)]
        levels = solo_levels(inputs.gt_boxes)
        height, width = logits.shape[-2:]
        groups = []
        for factor in sorted(set(SOLO_LEVEL_FACTORS)):
            rows = torch.cat([idx for idx, f in zip(levels, SOLO_LEVEL_FACTORS) if f == factor])
            if rows.numel() == 0:
                continue
            if factor == 1:
                groups.append(_Group(rows, logits[rows], box[rows], gt[rows], image, features))
                continue
            size = (math.ceil(height / factor), math.ceil(width / factor))

            def resize(x: Tensor, size: tuple[int, int] = size) -> Tensor:
                return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

            groups.append(_Group(
                rows, resize(logits[rows]), (resize(box[rows]) >= 0.5).to(logits.dtype),
                (resize(gt[rows]) >= 0.5).to(logits.dtype),
                F.interpolate(at_least_float32(inputs.images_norm), size=size, mode="bilinear",
                              align_corners=False),
                resize(features)))
        return groups

    def forward(self, inputs: MaskLossInputs) -> dict[str, Tensor]:
        cfg = self.cfg
        self.last_quality = {}
        logits = at_least_float32(inputs.mask_logits)  # float32 sums, also under mixed precision
        size = tuple(logits.shape[-2:])
        features = at_least_float32(self.deep_features(inputs.mask_feats, size))
        if inputs.num_instances == 0:
            zero = logits.sum() * 0.0 + features.sum() * 0.0
            return {"loss_proj": zero, "loss_levelset_img": zero.clone(),
                    "loss_levelset_feat": zero.clone()}
        box = inputs.gt_boxmasks.unsqueeze(1).to(logits.dtype)
        if box.shape != logits.shape:
            raise ValueError(f"gt_boxmasks {tuple(inputs.gt_boxmasks.shape)} do not match "
                             f"mask_logits {tuple(logits.shape)}")
        image = F.interpolate(at_least_float32(inputs.images_norm), size=size, mode="bilinear",
                              align_corners=False)
        gamma = cfg["released_gamma"] if self.released else cfg["levelset_gamma"]
        length = "released" if self.released else "box"
        diagnose = bool(getattr(inputs, "diagnose", False))
        proj, e_img, e_feat = [], [], []
        preferred: dict[str, list[Tensor]] = {"img": [], "feat": [], "gt": [], "box": []}
        for group in self._groups(inputs, logits, box, image, features):
            im_inds = inputs.im_inds[group.rows]
            probs = group.logits.sigmoid()
            img_input = group.image[im_inds]
            feat_input = self._feature_input(im_inds, probs, group.image, group.features)
            proj.append(projection_loss(probs, group.box))
            curve = gamma * curve_length(probs, group.box, length)  # the same in both terms
            pixels = box_pixels(group.box)
            e_img.append((region_energy(probs, img_input, group.box) + curve) / pixels)
            e_feat.append((region_energy(probs, feat_input, group.box) + curve) / pixels)
            if diagnose:
                keep = diagnosable_rows(inputs.num_instances, inputs.gt_pasted,
                                        inputs.extras.get("gt_has_mask"),
                                        logits.device)[group.rows]
                with torch.no_grad():
                    preferred["img"].append(preferred_inside(
                        probs[keep], img_input[keep], group.box[keep]).flatten())
                    preferred["feat"].append(preferred_inside(
                        probs[keep], feat_input[keep], group.box[keep]).flatten())
                    preferred["gt"].append(group.gt[keep].flatten() > 0.5)
                    preferred["box"].append(group.box[keep].flatten() > 0.5)
        if diagnose:
            self.last_quality = _preferred_quality(preferred)
        return {
            "loss_proj": torch.cat(proj).mean() * cfg["projection_weight"],
            "loss_levelset_img": torch.cat(e_img).mean() * cfg["levelset_img_weight"],
            "loss_levelset_feat": torch.cat(e_feat).mean() * cfg["levelset_feat_weight"],
        }


def _preferred_quality(preferred: dict[str, list[Tensor]]) -> dict[str, float]:
    """Pooled in-box IoU of each term's preferred foreground with the GT mask."""
    if not preferred["gt"]:
        return {}
    gt = torch.cat(preferred["gt"])
    box = torch.cat(preferred["box"])
    out: dict[str, float] = {}
    for term in ("img", "feat"):
        iou = foreground_iou(torch.cat(preferred[term]), gt, box)
        if iou is not None:
            out[f"levelset_{term}_fg_iou"] = iou
    return out


def _slot_in_image(im_inds: Tensor, batch: int) -> Tensor:
    """Rank of each instance among the instances of its image (0, 1, ... per image)."""
    order = torch.argsort(im_inds, stable=True)
    counts = torch.bincount(im_inds, minlength=batch)
    starts = torch.cumsum(counts, dim=0) - counts
    ranks = torch.empty_like(im_inds)
    ranks[order] = torch.arange(im_inds.numel(), device=im_inds.device) - starts[im_inds[order]]
    return ranks
