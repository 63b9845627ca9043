"""Class-wise prototype bank of SIM: L unit vectors per class in mask-feature space.

Why: BoxInst's pairwise loss only knows that neighbouring pixels of similar
colour belong together, so it fails where an object looks like its
background. SIM adds class-level knowledge: each class keeps L prototypes
(feature centroids of confidently segmented pixels of that class, several per
class because one class has several looks). A pixel whose teacher feature lies
close to a prototype of the box's class is likely foreground
(:mod:`sim_core.sim.semantic_map`).

Update, once per iteration (paper Sec. 3.2):
1. take the *student's* mask features at stride 4, L2-normalised, of the
   pixels inside a GT box of class ``c`` where the teacher is confident
   (instance probability > 0.7) - :func:`confident_pixel_features`;
2. assign those pixels to the class's L prototypes with Sinkhorn-Knopp
   (uniform marginals, eps 0.05, 3 iterations) and take, for each prototype,
   the mean of the pixels assigned to it (the largest entry of the plan's row:
   a cluster centroid);
3. ``p <- normalise(m * p + (1 - m) * normalise(centroid))``, ``m = 0.999``,
   for every prototype that received at least one pixel (the others keep
   their value).

``sim.prototype_updates: image`` follows the released code's schedule instead:
Sinkhorn per image and class, and one momentum step per image holding the class
(:func:`per_image_statistics`, applied in batch order by ``SIMTrainingState``).

Distributed training: the per-prototype feature sums and pixel counts are
all-reduced (summed) before the centroids are formed, so every process ends
with identical prototypes; averaging both sums and counts instead gives the
same centroid. The prototypes are buffers, so they are saved and restored with
``state_dict`` and never touched by the optimiser.

Deviation (documented in docs/sim.md): the released code (ProtoSeg's Sinkhorn)
turns the plan into a hard assignment by Gumbel-softmax sampling; we take the
row's largest entry, which is the same assignment without the sampling noise,
so the update is deterministic given the data.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from sim_core.model.precision import at_least_float32
from sim_core.sim.sinkhorn import hard_assignment, sinkhorn_knopp


class PrototypeBank(nn.Module):
    """``prototypes`` buffer ``[C, L, D]``, unit rows, updated by :meth:`update`."""

    def __init__(self, num_classes: int, num_prototypes: int, dim: int, momentum: float = 0.999,
                 sinkhorn_eps: float = 0.05, sinkhorn_iters: int = 3, seed: int = 0):
        super().__init__()
        if num_classes < 1 or num_prototypes < 1 or dim < 1:
            raise ValueError(f"need positive sizes, got C={num_classes}, L={num_prototypes}, D={dim}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"prototype momentum must lie in [0, 1], got {momentum}")
        self.momentum = float(momentum)
        self.sinkhorn_eps = float(sinkhorn_eps)
        self.sinkhorn_iters = int(sinkhorn_iters)
        generator = torch.Generator().manual_seed(int(seed))
        init = torch.randn(num_classes, num_prototypes, dim, generator=generator)
        self.register_buffer("prototypes", F.normalize(init, dim=-1))
        # momentum steps taken: one per iteration, or one per image with sim.prototype_updates: image
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @property
    def num_classes(self) -> int:
        return int(self.prototypes.shape[0])

    @property
    def num_prototypes(self) -> int:
        return int(self.prototypes.shape[1])

    @property
    def dim(self) -> int:
        return int(self.prototypes.shape[2])

    @torch.no_grad()
    def assignment_statistics(self, features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Per-prototype sums of assigned features ``[C, L, D]`` and pixel counts ``[C, L]``.

        ``features`` ``[N, D]`` must be L2-normalised; ``labels`` ``[N]`` are class indices.
        """
        C, L, D = self.prototypes.shape
        sums = self.prototypes.new_zeros((C, L, D))
        counts = self.prototypes.new_zeros((C, L))
        if features.numel() == 0:
            return sums, counts
        if features.dim() != 2 or features.shape[1] != D:
            raise ValueError(f"features must be [N, {D}], got {tuple(features.shape)}")
        features = features.to(self.prototypes.dtype)
        for cls in torch.unique(labels).tolist():
            if not 0 <= cls < C:
                raise ValueError(f"label {cls} outside 0..{C - 1}")
            feats = features[labels == cls]
            scores = feats @ self.prototypes[cls].t()
            plan = sinkhorn_knopp(scores, eps=self.sinkhorn_eps, iters=self.sinkhorn_iters)
            index = hard_assignment(plan)
            sums[cls].index_add_(0, index, feats)
            counts[cls] += torch.bincount(index, minlength=L).to(counts.dtype)
        return sums, counts

    @torch.no_grad()
    def apply_statistics(self, sums: Tensor, counts: Tensor) -> Tensor:
        """All-reduce (when distributed), then momentum-update the prototypes that got pixels.

        Returns the boolean ``[C, L]`` mask of updated prototypes.
        """
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            sums = sums.clone()
            counts = counts.clone()
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        updated = counts > 0
        if updated.any():
            centroids = F.normalize(sums / counts.clamp(min=1.0).unsqueeze(-1), dim=-1)
            mixed = self.momentum * self.prototypes + (1.0 - self.momentum) * centroids
            new = torch.where(updated.unsqueeze(-1), F.normalize(mixed, dim=-1), self.prototypes)
            self.prototypes.copy_(new)
        self.num_updates += 1
        return updated

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor) -> Tensor:
        """One iteration's update from confident pixel ``features`` ``[N, D]`` of class ``labels``."""
        sums, counts = self.assignment_statistics(features, labels)
        return self.apply_statistics(sums, counts)


@torch.no_grad()
def confident_pixel_features(student_feats: Tensor, confident: Tensor, gt_labels: Tensor,
                             gt_im_inds: Tensor) -> tuple[Tensor, Tensor]:
    """L2-normalised student features of confident foreground pixels, with their class.

    ``student_feats`` ``[B, D, H, W]`` at mask resolution; ``confident`` ``[G, H, W]``
    bool, one row per GT (teacher probability above the threshold *and* inside
    the GT box); ``gt_labels``/``gt_im_inds`` ``[G]``. Pixels covered by several
    GTs of the same class in one image are taken once (the union), so crowded
    scenes do not weigh a pixel twice. Returns ``features [N, D]``, ``labels [N]``.
    """
    B, D, H, W = student_feats.shape
    if confident.shape[-2:] != (H, W):
        raise ValueError(f"confident masks {tuple(confident.shape)} do not match features {H}x{W}")
    feats = F.normalize(at_least_float32(student_feats.detach()), dim=1)
    if gt_labels.numel() == 0:
        return feats.new_zeros((0, D)), torch.zeros((0,), dtype=torch.long, device=feats.device)
    # Union per (image, class) in one scatter; nonzero then lists the pixels ordered by
    # image, class, row, column, the order a loop over sorted (image, class) pairs gives.
    C = int(gt_labels.max()) + 1
    union = confident.new_zeros((B * C, H * W), dtype=torch.float32)
    union.index_add_(0, gt_im_inds.long() * C + gt_labels.long(), confident.reshape(-1, H * W).float())
    b, c, y, x = torch.nonzero(union.view(B, C, H, W) > 0, as_tuple=True)
    return feats[b, :, y, x], c


@torch.no_grad()
def per_image_statistics(bank: PrototypeBank, student_feats: Tensor, confident: Tensor, gt_labels: Tensor,
                         gt_im_inds: Tensor) -> tuple[Tensor, Tensor]:
    """``[B, C, L, D]`` sums and ``[B, C, L]`` counts: :meth:`PrototypeBank.assignment_statistics` of each
    image's confident pixels on their own (``sim.prototype_updates: image``; arguments as
    :func:`confident_pixel_features`)."""
    sums, counts = [], []
    for b in range(student_feats.shape[0]):
        rows = gt_im_inds == b
        feats, labels = confident_pixel_features(student_feats[b:b + 1], confident[rows], gt_labels[rows],
                                                 torch.zeros_like(gt_im_inds[rows]))
        image_sums, image_counts = bank.assignment_statistics(feats, labels)
        sums.append(image_sums)
        counts.append(image_counts)
    return torch.stack(sums), torch.stack(counts)
