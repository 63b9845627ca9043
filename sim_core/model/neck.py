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

With ``with_p2`` (``model.mask_stride4_input: p2``) the FPN also takes C2 and
returns P2 first: P2 feeds only the stride-4 mask branch, as in AdelaiDet with
``MODEL.FPN.IN_FEATURES`` res2-res5 and ``MASK_BRANCH.IN_FEATURES`` p2-p5
(P3 and above are unchanged: FPN's top-down path never reads the level below).
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


STRIDE4_INPUTS = ("c2", "p2")


def stride4_input(cfg: dict[str, Any]) -> str | None:
    """What a stride-4 mask branch adds at stride 4 (``c2`` or ``p2``); None at stride 8."""
    value = cfg.get("mask_stride4_input", "c2")
    if value not in STRIDE4_INPUTS:
        raise InputError("model.mask_stride4_input", f"must be one of {', '.join(STRIDE4_INPUTS)}, got {value!r}")
    return value if int(cfg.get("mask_feat_stride", 8)) == 4 else None


def check_fpn_levels(levels: Any) -> list[int]:
    """The detector needs P3 (mask branch, stride 8) and consecutive levels."""
    levels = list(levels) if isinstance(levels, (list, tuple)) else levels
    if levels not in SUPPORTED_LEVELS:
        raise InputError("model.fpn_levels", f"must be one of {list(SUPPORTED_LEVELS)}, got {levels!r}")
    return levels


class FPNNeck(nn.Module):
    def __init__(self, in_channels: dict[str, int], out_channels: int, levels: list[int], with_p2: bool = False):
        super().__init__()
        self.levels = check_fpn_levels(levels)
        self.with_p2 = bool(with_p2)
        self.inputs = ("c2", "c3", "c4", "c5") if self.with_p2 else ("c3", "c4", "c5")
        if self.with_p2 and "c2" not in in_channels:
            raise InputError("model.mask_stride4_input", "p2 needs a backbone with a stride-4 output (C2)")
        extra = LastLevelP6P7(out_channels, out_channels) if max(self.levels) > 5 else None
        self.fpn = FeaturePyramidNetwork([in_channels[k] for k in self.inputs], out_channels, extra_blocks=extra)
        self.out_channels = out_channels

    def forward(self, feats: dict[str, Tensor]) -> list[Tensor]:
        """P3 ... (one map per level), preceded by P2 when ``with_p2``."""
        out = self.fpn(OrderedDict((k, feats[k]) for k in self.inputs))
        # torchvision returns [P2,] P3, P4, P5 and (with LastLevelP6P7) P6, P7.
        return list(out.values())[: len(self.levels) + int(self.with_p2)]


def build_neck(cfg: dict[str, Any], in_channels: dict[str, int]) -> nn.Module:
    """Build the neck named by ``cfg["neck"]`` (see the module docstring)."""
    name = cfg.get("neck", "fpn")
    with_p2 = stride4_input(cfg) == "p2"
    if name == "fpn":
        return FPNNeck(in_channels, int(cfg.get("fpn_channels", 256)), cfg.get("fpn_levels", [3, 4, 5, 6, 7]),
                       with_p2=with_p2)
    if name == "bifpn":
        if with_p2:
            raise InputError("model.mask_stride4_input", f"p2 needs neck: fpn, got {name!r}")
        from sim_core.model.bifpn import build_bifpn
        return build_bifpn(cfg, in_channels)
    raise InputError("model.neck", f"unknown neck '{name}'; choose one of {', '.join(NECKS)}")
