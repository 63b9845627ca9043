"""Semantic probability map M_S of SIM: how much each pixel looks like the box's class.

For a GT box of class ``c`` (paper Eq. 3)

    M_S(i) = sigmoid( max_l cos(z'_i, p^c_l) / tau ),   tau = 0.1,

with ``z'`` the *teacher's* mask features (the mask-branch output, stride 8)
brought to the mask stride 4 of the instance masks (aligned bilinear x2), and ``p^c_l`` the class's
prototypes. The max over the L prototypes lets any of the class's looks
claim the pixel. The temperature sharpens cosine similarities (which live in
[-1, 1]) into probabilities that can cross the pseudo-label thresholds; the
released code uses no temperature (``tau = 1``, ``variant: released_code``).

The map is class-level: it lights up every object of the class, including
other instances inside the box. :mod:`sim_core.sim.self_correction` fixes that
with the teacher's instance masks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sim_core.model.mask_head import aligned_bilinear
from sim_core.model.precision import at_least_float32


def upsample_features(feats: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize ``[B, D, h, w]`` features to the mask resolution ``size``.

    An integer factor uses the detector's aligned bilinear upsampling, the
    same one that brings the instance mask logits from stride 8 to 4, so
    ``M_S`` and the predicted masks share one pixel grid.
    """
    h, w = feats.shape[-2:]
    if (h, w) == tuple(size):
        return feats
    factor = size[0] // h
    if factor * h == size[0] and factor * w == size[1]:
        return aligned_bilinear(feats, factor)
    return F.interpolate(feats, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def semantic_probability_map(teacher_feats: Tensor, prototypes: Tensor, gt_labels: Tensor,
                             gt_im_inds: Tensor, tau: float = 0.1,
                             size: tuple[int, int] | None = None) -> Tensor:
    """``M_S`` ``[G, H, W]`` for G boxes.

    ``teacher_feats`` ``[B, D, h, w]`` (upsampled to ``size`` when given);
    ``prototypes`` ``[C, L, D]`` unit vectors; ``gt_labels``/``gt_im_inds`` ``[G]``.
    """
    if tau <= 0:
        raise ValueError(f"temperature tau must be positive, got {tau}")
    if teacher_feats.shape[1] != prototypes.shape[-1]:
        raise ValueError(f"feature dim {teacher_feats.shape[1]} != prototype dim {prototypes.shape[-1]}")
    feats = at_least_float32(teacher_feats.detach())
    if size is not None:
        feats = upsample_features(feats, size)
    feats = F.normalize(feats, dim=1)
    protos = F.normalize(at_least_float32(prototypes), dim=-1)
    G = int(gt_labels.numel())
    H, W = feats.shape[-2:]
    if G == 0:
        return feats.new_zeros((0, H, W))
    # [G, L, D] x [G, D, H*W] -> [G, L, H*W]
    cos = torch.bmm(protos[gt_labels.long()], feats[gt_im_inds.long()].flatten(2))
    best = cos.max(dim=1).values.view(G, H, W)
    return torch.sigmoid(best / tau)
