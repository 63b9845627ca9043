"""Sinkhorn-Knopp assignment of pixel features to the prototypes of one class.

SIM updates its L prototypes per class by clustering the confident foreground
features of that class. Plain nearest-prototype assignment collapses: one
prototype wins everything and the others never move. SIM therefore assigns
with an optimal-transport plan under *uniform marginals* (as SwAV and
ProtoSeg do): every pixel distributes a total mass of one, and every prototype
receives the same share ``N / L`` of the ``N`` pixels.

The plan maximises ``Tr(Q^T S) + eps * H(Q)`` over that transport polytope,
where ``S = cos(z, p)`` is ``[N, L]``. Its solution is
``Q = diag(u) exp(S / eps) diag(v)``; Sinkhorn-Knopp finds ``u, v`` by
alternately rescaling the prototype marginals and the pixel marginals.
With a fixed, small number of iterations (3 in the paper) the *last* rescaling
holds exactly and the other one approximately. We end with the pixel
rescaling, so every row of the returned plan sums to exactly one (each pixel is
fully assigned) and the column sums approach ``N / L``.

The iterations run in log space, so ``eps = 0.05`` (logits up to 20) cannot
overflow whatever ``N`` is.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from sim_core.model.precision import at_least_float32


@torch.no_grad()
def sinkhorn_knopp(scores: Tensor, eps: float = 0.05, iters: int = 3) -> Tensor:
    """Transport plan ``[N, L]`` for similarity ``scores`` ``[N, L]``.

    Rows sum to one (exactly); columns sum to ``N / L`` (exactly in the limit
    of many iterations, approximately after ``iters``).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [N, L], got shape {tuple(scores.shape)}")
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if iters < 1:
        raise ValueError(f"iters must be at least 1, got {iters}")
    n, num_protos = scores.shape
    if n == 0:
        return scores.new_zeros((0, num_protos))
    log_q = at_least_float32(scores) / eps
    log_q = log_q - torch.logsumexp(log_q.flatten(), dim=0)  # total mass 1
    log_col_target = -math.log(num_protos)  # each prototype gets 1/L of the mass
    log_row_target = -math.log(n)  # each pixel carries 1/N of the mass
    for _ in range(iters):
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) + log_col_target
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) + log_row_target
    return (log_q + math.log(n)).exp().to(scores.dtype)


def hard_assignment(plan: Tensor) -> Tensor:
    """Index of the prototype each pixel is assigned to (the largest entry of its row)."""
    return plan.argmax(dim=1)
