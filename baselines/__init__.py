"""Mask supervision of every method, behind one visible switch.

``build_mask_loss(method, cfg)`` returns the ``nn.Module`` that turns
``sim_core.model.mask_inputs.MaskLossInputs`` into named, already weighted loss
terms. ``cfg`` is the method's own params section (``params["sim"]`` for
``sim``, ...). Modules are imported only when their method is asked for.

A mask loss must also work when a batch has no sampled instances
(``inputs.num_instances == 0``): it then returns its usual terms as
``zero_loss(inputs.mask_logits)`` so the graph stays connected and the logged
keys stay the same.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from sim_core.errors import InputError

METHODS = ("mask", "boxmask", "boxinst", "boxlevelset", "sim")


def build_mask_loss(method: str, cfg: dict[str, Any] | None = None) -> nn.Module:
    """The mask-supervision loss of ``method`` configured by its params section ``cfg``."""
    cfg = dict(cfg or {})
    if method == "mask":
        from baselines.mask_supervised import MaskSupervisedLoss
        return MaskSupervisedLoss(cfg)
    elif method == "boxmask":
        from baselines.mask_supervised import BoxMaskLoss
        return BoxMaskLoss(cfg)
    elif method == "boxinst":
        from baselines.boxinst import BoxInstLoss
        return BoxInstLoss(cfg)
    elif method == "boxlevelset":
        from baselines.boxlevelset import BoxLevelSetLoss
        return BoxLevelSetLoss(cfg)
    elif method == "sim":
        from sim_core.sim.sim_loss import SIMLoss
        return SIMLoss(cfg)
    raise InputError("train.method", f"unknown method '{method}'; choose one of {', '.join(METHODS)}")
