"""Mask supervision of every method, behind one visible switch.

``build_mask_loss(method, cfg)`` returns the ``nn.Module`` that turns
``sim_core.model.mask_inputs.MaskLossInputs`` into named, already weighted loss
terms. ``cfg`` is what ``sim_core.methods.method_config`` gives (the method's
params section, the other sections it reads, the detector settings it needs).
Which class a method uses is declared once, in ``sim_core.methods``; modules
are imported only when their method is asked for.

A mask loss must also work when a batch has no sampled instances
(``inputs.num_instances == 0``): it then returns its usual terms as
``zero_loss(inputs.mask_logits)`` so the graph stays connected and the logged
keys stay the same.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from sim_core.methods import build_loss


def build_mask_loss(method: str, cfg: dict[str, Any] | None = None) -> nn.Module:
    """The mask-supervision loss of ``method`` configured by ``cfg``."""
    return build_loss(method, cfg)
