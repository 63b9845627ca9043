"""The neck: an FPN over C3-C5, optionally extended to P6/P7.

``build_neck(cfg, in_channels)`` returns a module mapping the backbone's
``{"c3", "c4", "c5"}`` dict to a list of feature maps, one per entry of
``cfg["fpn_levels"]`` (FPN level ``l`` has stride ``2**l``), all with
``cfg["fpn_channels"]`` channels.

* ``neck: fpn`` (default): ``torchvision.ops.FeaturePyramidNetwork``; P6 and P7
  come from P5 through stride-2 3x3 convs (torchvision's ``LastLevelP6P7``
  with ``in_channels == out_channels`` uses P5), as FCOS/CondInst do.
  Levels ``[3, 4, 5]`` (the small demo: 128-pixel images have nothing for
  P6/P7 to detect), ``[3, 4, 5, 6]`` or ``[3, 4, 5, 6, 7]`` (the papers).
* ``neck: bifpn``: ``sim_core/model/bifpn.py``'s ``build_bifpn(cfg, in_channels)``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from sim_core.errors import InputError

NECKS = ("fpn", "bifpn")
SUPPORTED_LEVELS = ([3, 4, 5], [3, 4, 5, 6], [3, 4, 5, 6, 7])


def check_fpn_levels(levels: Any) -> list[int]:
    """The detector needs P3 (mask branch, stride 8) and consecutive levels."""
    levels = list(levels) if isinstance(levels, (list, tuple)) else levels
    if levels not in SUPPORTED_LEVELS:
        raise InputError("model.fpn_levels", f"must be one of {list(SUPPORTED_LEVELS)}, got {levels!r}")
    return levels


class FPNNeck(nn.Module):
    def __init__(self, in_channels: dict[str, int], out_channels: int, levels: list[int]):
        super().__init__()
        self.levels = check_fpn_levels(levels)
        extra = LastLevelP6P7(out_channels, out_channels) if max(self.levels) > 5 else None
        self.fpn = FeaturePyramidNetwork([in_channels[k] for k in ("c3", "c4", "c5")], out_channels,
                                         extra_blocks=extra)
        self.out_channels = out_channels

    def forward(self, feats: dict[str, Tensor]) -> list[Tensor]:
        out = self.fpn(OrderedDict((k, feats[k]) for k in ("c3", "c4", "c5")))
        # torchvision returns P3, P4, P5 and (with LastLevelP6P7) P6, P7.
        return list(out.values())[: len(self.levels)]


def build_neck(cfg: dict[str, Any], in_channels: dict[str, int]) -> nn.Module:
    """Build the neck named by ``cfg["neck"]`` (see the module docstring)."""
    name = cfg.get("neck", "fpn")
    if name == "fpn":
        return FPNNeck(in_channels, int(cfg.get("fpn_channels", 256)), cfg.get("fpn_levels", [3, 4, 5, 6, 7]))
    elif name == "bifpn":
        from sim_core.model.bifpn import build_bifpn
        return build_bifpn(cfg, in_channels)
    raise InputError("model.neck", f"unknown neck '{name}'; choose one of {', '.join(NECKS)}")
