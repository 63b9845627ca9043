"""Mask supervision with dense targets: the ``mask`` upper bound and the ``boxmask`` reference.

* ``mask`` (CondInst): Dice loss between the predicted mask probabilities and
  the ground-truth instance masks at stride 4. It bounds what box supervision
  can reach on the same detector and schedule.
* ``boxmask``: the same Dice loss against the GT *box* filled as a mask. It is
  the naive way to use box labels, and shows how much the box-supervised
  methods gain over simply treating the box as the mask.

Both average the per-instance Dice (``sim_core.model.mask_inputs.dice_loss``,
the squared-denominator form of CondInst/BoxInst) over the sampled instances
and multiply by ``loss_weight`` (params key of the method's section, default 1).
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from sim_core.errors import InputError
from sim_core.model.mask_inputs import MaskLossInputs, dice_loss, zero_loss


class _DiceToTargets(nn.Module):
    method = ""

    def __init__(self, cfg: dict[str, Any] | None = None):
        super().__init__()
        cfg = dict(cfg or {})
        self.loss_weight = float(cfg.pop("loss_weight", 1.0))
        if cfg:
            raise InputError(f"{self.method}", f"unknown params key '{self.method}.{sorted(cfg)[0]}'")

    def targets(self, inputs: MaskLossInputs) -> Tensor:
        raise NotImplementedError

    def forward(self, inputs: MaskLossInputs) -> dict[str, Tensor]:
        if inputs.num_instances == 0:
            return {"loss_mask": zero_loss(inputs.mask_logits)}
        probs = inputs.mask_logits.sigmoid()[:, 0]
        loss = dice_loss(probs, self.targets(inputs)).mean()
        return {"loss_mask": loss * self.loss_weight}


class MaskSupervisedLoss(_DiceToTargets):
    """CondInst's Dice loss against GT instance masks (needs ``masks`` in the targets)."""

    method = "mask"
    # CondInst's detector then centre-samples around the mask's centre of mass when
    # model.center_sampling_center is "mass" (sim_core/model/condinst.py CondInst.assign)
    supervises_with_masks = True

    def targets(self, inputs: MaskLossInputs) -> Tensor:
        has_mask = inputs.extras.get("gt_has_mask")
        if has_mask is not None and not bool(has_mask.all()):
            raise InputError("train.method", "method 'mask' needs instance masks in the training targets, "
                                             "but the dataset returned targets without 'masks'")
        return inputs.gt_bitmasks


class BoxMaskLoss(_DiceToTargets):
    """The same Dice loss against the filled GT box."""

    method = "boxmask"

    def targets(self, inputs: MaskLossInputs) -> Tensor:
        return inputs.gt_boxmasks
