"""BoxLevelSet's mask supervision (Li et al., ECCV 2022) on the shared detector.

The predicted mask probability ``sigma`` of each instance is read as a
(smoothed Heaviside of a) level-set function, and the box-restricted
Chan-Vese energy of an input map ``I`` is minimised w.r.t. it:

    F(I) = [ sum_box |I - c1|^2 sigma + |I - c2|^2 (1 - sigma)
             + gamma * sum_box |grad sigma| ] / #box pixels,
    c1 = sum_box I sigma / sum_box sigma,  c2 = sum_box I (1-sigma) / sum_box (1-sigma),

on two inputs: ``I_u``, the normalised network input resized to mask
resolution (weight 0.05), and ``I_f``, deep features (a 3x3 conv from the
mask-branch features to 5 channels, upsampled to stride 4; weight 5.0).
BoxInst's projection term (weight 3.0) confines the mask to the box and
gives the level set its initial shape. Returned terms: ``loss_proj``,
``loss_levelset_img``, ``loss_levelset_feat``.

Choices where the paper is silent follow the authors' released code
(LiWentomng/boxlevelset, ``levelset_loss.py`` and ``box_solov2_head.py``):

* ``I_u`` is the *normalised* image (mean/std), bilinearly resized;
* ``|I - c|^2`` is averaged over the channels of ``I`` (the released loss
  divides the channel sum by the channel count), then divided by the number
  of box pixels and averaged over instances;
* ``c1``/``c2`` are not detached; their denominators are clamped at 1e-5;
* the image has no gradient; the deep features are not detached.
* the length term uses the absolute forward differences of ``sigma`` between
  4-neighbours that are *both* inside the box. The released code has the
  term commented out (coefficient 1e-5 there) and, had it been on, would
  also count the jump of ``sigma * box`` at the box border; the paper's
  ``gamma = 1e-4`` is the default here (``levelset_gamma``).

``I_f`` and the tree filter (``tree_filter: true``), two variants:

* ``variant: paper`` (default): ``I_f`` itself is the level-set input; with
  the tree filter it is first smoothed along the MST of ``I_f`` (edge
  weights ``exp(-||df||^2)``), the paper's "tree-filter-enhanced deep
  features". Note: a constant ``I_f`` has zero energy, so this term also
  pulls the 5-channel conv toward a constant output.
* ``variant: released_code``: what the released code computes instead. The
  feature term's input is the prediction filtered along two trees,
  ``T1 = TF(sigma; tree and weights from I_u, exp(-||dI_u||^2 / 0.02))`` and
  ``T2 = TF(T1; tree and weights from I_f, exp(-||dI_f||^2))``, concatenated
  (2 channels). ``I_f`` then receives gradient only through the edge weights
  of the second tree; no gradient flows through the first tree's weights
  (the image has none). This variant always uses the tree filter.

The detector is CondInst-style, not SOLOv2: masks come from the dynamic
head, per sampled positive location, instead of SOLO's grid cells; see
``docs/boxlevelset.md``.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from baselines.boxinst import projection_loss, resolve_config
from baselines.tree_filter import build_tree_schedule, tree_edge_weights, tree_filter
from sim_core.errors import InputError
from sim_core.model.mask_inputs import MaskLossInputs

__all__ = ["DEFAULTS", "BoxLevelSetLoss", "levelset_energy", "box_length"]

DEFAULTS: dict[str, Any] = {
    "projection_weight": 3.0,
    "levelset_img_weight": 0.05,
    "levelset_feat_weight": 5.0,
    "levelset_gamma": 1e-4,
    "feature_channels": 5,
    "tree_filter": True,
    "tree_filter_img_sigma": 0.02,
    "tree_filter_feat_sigma": 1.0,
    "variant": "paper",
    "mask_feat_channels": 0,
}
VARIANTS = ("paper", "released_code")


def box_length(probs: Tensor, box: Tensor) -> Tensor:
    """``sum |grad sigma|`` over 4-neighbour pairs inside the box: ``[P]``.

    ``probs`` ``[P, 1, h, w]``, ``box`` ``[P, 1, h, w]`` (0/1).
    """
    dy = (probs[..., 1:, :] - probs[..., :-1, :]).abs() * box[..., 1:, :] * box[..., :-1, :]
    dx = (probs[..., :, 1:] - probs[..., :, :-1]).abs() * box[..., :, 1:] * box[..., :, :-1]
    return dy.flatten(1).sum(dim=1) + dx.flatten(1).sum(dim=1)


def levelset_energy(probs: Tensor, image: Tensor, box: Tensor, gamma: float = 1e-4) -> Tensor:
    """Box-restricted Chan-Vese energy per instance, normalised by box size: ``[P]``.

    ``probs`` ``[P, 1, h, w]`` is ``sigma``; ``image`` ``[P, C, h, w]`` the
    input map (already gathered per instance); ``box`` ``[P, 1, h, w]``.
    """
    if probs.shape[0] != image.shape[0] or probs.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"probs {tuple(probs.shape)} and input {tuple(image.shape)} differ")
    box = box.to(probs.dtype)
    inside = probs * box
    outside = (1.0 - probs) * box
    masked = image * box
    c1 = (masked * inside).sum(dim=(2, 3), keepdim=True) / \
        inside.sum(dim=(2, 3), keepdim=True).clamp(min=1e-5)
    c2 = (masked * outside).sum(dim=(2, 3), keepdim=True) / \
        outside.sum(dim=(2, 3), keepdim=True).clamp(min=1e-5)
    region = (masked - c1).pow(2) * inside + (masked - c2).pow(2) * outside
    region = region.flatten(1).sum(dim=1) / image.shape[1]
    pixels = box.flatten(1).sum(dim=1).clamp(min=1.0)
    return (region + gamma * box_length(probs, box)) / pixels


class BoxLevelSetLoss(nn.Module):
    """``forward(MaskLossInputs) -> {"loss_proj", "loss_levelset_img", "loss_levelset_feat"}``.

    Has parameters: the 3x3 conv producing ``I_f`` from the mask features
    (``mask_feat_channels`` in, ``feature_channels`` out). Pass the channel
    count explicitly, or set ``cfg["mask_feat_channels"]``.
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
        if self.cfg["variant"] == "released_code" and not self.cfg["tree_filter"]:
            raise InputError("params: boxlevelset", "variant released_code always uses the "
                             "tree filter; set tree_filter: true or variant: paper")
        for key in ("levelset_gamma", "levelset_img_weight", "levelset_feat_weight"):
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

    def deep_features(self, mask_feats: Tensor, size: tuple[int, int]) -> Tensor:
        """``I_f``: 3x3 conv of the mask features, bilinearly upsampled to mask size."""
        features = self.feature_conv(mask_feats)
        return F.interpolate(features, size=size, mode="bilinear", align_corners=False)

    def _feature_input(self, inputs: MaskLossInputs, probs: Tensor, image: Tensor,
                       features: Tensor) -> Tensor:
        """The feature term's level-set input, per instance ``[P, C, h, w]``."""
        cfg = self.cfg
        im_inds = inputs.im_inds
        if cfg["variant"] == "paper":
            if cfg["tree_filter"]:
                schedule = build_tree_schedule(features)
                weights = tree_edge_weights(features, schedule, cfg["tree_filter_feat_sigma"])
                features = tree_filter(features, schedule, weights)
            return features[im_inds]
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

    def forward(self, inputs: MaskLossInputs) -> dict[str, Tensor]:
        cfg = self.cfg
        logits = inputs.mask_logits.float()  # float32 sums, also under mixed precision
        size = tuple(logits.shape[-2:])
        features = self.deep_features(inputs.mask_feats, size).float()
        if inputs.num_instances == 0:
            zero = logits.sum() * 0.0 + features.sum() * 0.0
            return {"loss_proj": zero, "loss_levelset_img": zero.clone(),
                    "loss_levelset_feat": zero.clone()}
        box = inputs.gt_boxmasks.unsqueeze(1).to(logits.dtype)
        if box.shape != logits.shape:
            raise ValueError(f"gt_boxmasks {tuple(inputs.gt_boxmasks.shape)} do not match "
                             f"mask_logits {tuple(logits.shape)}")
        probs = logits.sigmoid()
        loss_proj = projection_loss(probs, box).mean() * cfg["projection_weight"]
        image = F.interpolate(inputs.images_norm.float(), size=size, mode="bilinear",
                              align_corners=False)
        energy_img = levelset_energy(probs, image[inputs.im_inds], box, cfg["levelset_gamma"])
        feature_input = self._feature_input(inputs, probs, image, features)
        energy_feat = levelset_energy(probs, feature_input, box, cfg["levelset_gamma"])
        return {
            "loss_proj": loss_proj,
            "loss_levelset_img": energy_img.mean() * cfg["levelset_img_weight"],
            "loss_levelset_feat": energy_feat.mean() * cfg["levelset_feat_weight"],
        }


def _slot_in_image(im_inds: Tensor, batch: int) -> Tensor:
    """Rank of each instance among the instances of its image (0, 1, ... per image)."""
    order = torch.argsort(im_inds, stable=True)
    counts = torch.bincount(im_inds, minlength=batch)
    starts = torch.cumsum(counts, dim=0) - counts
    ranks = torch.empty_like(im_inds)
    ranks[order] = torch.arange(im_inds.numel(), device=im_inds.device) - starts[im_inds[order]]
    return ranks
