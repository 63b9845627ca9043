"""The two mask losses SIM adds to BoxInst: L_pseudo and L_paste, and their schedules.

- ``L_pseudo`` (paper Eq. 6): the predicted masks against the pseudo labels of
  :mod:`sim_core.sim.self_correction`, with the ignore band weighted 0:
  weighted binary cross-entropy plus weighted Dice, times ``lambda1 = 0.5``,
  switched on once the warm-up (10k of 90k iterations at paper scale) is over,
  because early teacher masks and prototypes are noise.
  The released code uses a focal loss alone, weight 0.3, switched on after
  iteration 10000 and ramped as ``0.3 * min(iter / 270000, 1)`` (literals in
  its mask head; ``variant: released_code`` states them as fractions of a 1x
  schedule, see :mod:`sim_core.sim.variants`).
- ``L_paste`` (paper Sec. 3.4): instances pasted by the tailored copy-paste
  come with the teacher's pseudo mask as a full mask target; they are
  supervised with focal + Dice, ``lambda2 = 1``.

Normalisation: pixel losses are summed with their weights and divided by the
sum of the weights (+1 for the focal terms, as the released code does, so an
instance with no labelled pixel contributes zero instead of 0/0); Dice is
per instance, averaged over instances.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import sigmoid_focal_loss

from sim_core.model.mask_inputs import dice_loss


def _flat(logits: Tensor) -> Tensor:
    """``[P, 1, H, W]`` or ``[P, H, W]`` -> ``[P, H, W]``."""
    return logits.squeeze(1) if logits.dim() == 4 else logits


def weighted_bce(logits: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
    """``sum(w * BCE) / max(sum(w), 1)`` over all pixels of all instances."""
    logits = _flat(logits)
    loss = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none")
    return (loss * weights).sum() / weights.sum().clamp(min=1.0)


def weighted_focal(logits: Tensor, targets: Tensor, weights: Tensor, alpha: float = 0.25, gamma: float = 2.0,
                   on_probabilities: bool = False) -> Tensor:
    """Sigmoid focal loss ``sum(w * FL) / (sum(w) + 1)``.

    ``on_probabilities`` reproduces the released code's ``mask_focal_loss``,
    which is called with the mask *probabilities* ``p`` and applies
    ``binary_cross_entropy_with_logits`` to them: its cross-entropy is
    ``BCE(sigmoid(p), t)`` (a second sigmoid), while its focal factor uses ``p``.
    The loss never reaches 0 (``sigmoid(p)`` lies in [0.5, 0.73]) and its
    gradient w.r.t. the logits carries an extra ``p (1 - p)``, which vanishes
    where a mask has saturated (docs/sim.md, "The released focal loss").
    """
    logits = _flat(logits)
    targets = targets.to(logits.dtype)
    if not on_probabilities:
        loss = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="none")
        return (loss * weights).sum() / (weights.sum() + 1.0)
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(p, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    loss = alpha_t * ce * (1 - p_t) ** gamma
    return (loss * weights).sum() / (weights.sum() + 1.0)


def weighted_dice(logits: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
    """Mean over instances of the weighted squared-denominator Dice (CondInst's)."""
    logits = _flat(logits)
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return dice_loss(logits.sigmoid(), targets, weights).mean()


def pseudo_mask_loss(logits: Tensor, targets: Tensor, weights: Tensor, kind: str = "bce_dice",
                     focal_on_probabilities: bool = False) -> Tensor:
    """Unweighted ``L_pseudo``: ``bce_dice`` (paper) or ``focal`` (released code)."""
    if kind == "bce_dice":
        return weighted_bce(logits, targets, weights) + weighted_dice(logits, targets, weights)
    if kind == "focal":
        return weighted_focal(logits, targets, weights, on_probabilities=focal_on_probabilities)
    raise ValueError(f"unknown pseudo loss kind '{kind}' (choose bce_dice or focal)")


def paste_mask_loss(logits: Tensor, targets: Tensor, valid: Tensor, focal_on_probabilities: bool = False,
                    dice_over: int | None = None) -> Tensor:
    """Unweighted ``L_paste`` = focal + Dice against the pasted pseudo masks (padding ignored).

    The Dice term is the mean over the pasted instances (the rows given). ``dice_over`` = N (at least
    the number of rows) reproduces the release (``sim.paste_dice_mean: sampled``): its Dice is the
    mean over all N sampled instances, where each instance that was not pasted has weight 0 and so
    Dice loss exactly 1 (``1 - 0 / (0 + 0 + eps)``), a constant without gradient. That mean is
    ``(sum of the pasted rows' Dice + N - P) / N``: the pasted rows' gradient scaled by P / N.
    """
    dice = weighted_dice(logits, targets, valid)
    if dice_over is not None:
        rows = int(_flat(logits).shape[0])
        if dice_over < rows:
            raise ValueError(f"dice_over ({dice_over}) must be at least the number of pasted rows ({rows})")
        dice = (dice * rows + (dice_over - rows)) / max(dice_over, 1)
    return weighted_focal(logits, targets, valid, on_probabilities=focal_on_probabilities) + dice


def pseudo_loss_weight(iteration: int, max_iter: int, lam: float, ramp: str = "step",
                       start_frac: float = 10000 / 90000, span: float = 1.0) -> float:
    """Weight of ``L_pseudo`` at the 0-based ``iteration``.

    Both ramps are 0 before ``start_frac * max_iter``.
    ``step`` (paper): ``lam`` from then on.
    ``linear`` (released code): ``lam * min((iteration + 1) / (span * max_iter), 1)``
    from then on; ``iteration + 1`` because the released code counts
    iterations from 1 (its counter is incremented before it is read), so at
    1x its gate ``_iter > 10000`` opens at 0-based iteration 10000 with
    weight ``0.3 * 10001 / 270000``.
    """
    if ramp not in ("step", "linear"):
        raise ValueError(f"unknown pseudo loss ramp '{ramp}' (choose step or linear)")
    if iteration < start_frac * max_iter:
        return 0.0
    if ramp == "step":
        return float(lam)
    return float(lam) * min(float(iteration + 1) / (float(span) * float(max(max_iter, 1))), 1.0)
