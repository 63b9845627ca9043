"""BiFPN neck: repeated weighted bidirectional feature pyramid (EfficientDet), as AdelaiDet builds it.

SIM's "R-DCN-101-BiFPN" row (and BoxInst's/BoxLevelSet's) comes from AdelaiDet's
``MS_R_101_BiFPN_dcni3_3x`` config: ``BiFPN.IN_FEATURES [res3, res4, res5]``,
``OUT_CHANNELS 160``, ``NORM SyncBN``, and ``NUM_REPEATS`` left at AdelaiDet's
default of **6**; ``FCOS.TOP_LEVELS 2`` adds P6, P7. This module follows
AdelaiDet's ``bifpn.py``:

* **extra levels**: P6 = max-pool(3x3, stride 2, pad 1) of a 1x1 conv + norm of C5
  (the conv only when C5's width differs from the BiFPN width), P7 = max-pool of P6;
* **one BiFPN layer** over levels 0..n-1 (P3..P7):
  top-down ``td_i = node(x_i, up(td_{i+1}))`` for i = n-2 .. 0 (``td_{n-1} = x_{n-1}``),
  then bottom-up ``out_i = node(x_i, td_i, down(out_{i-1}))`` for i = 1 .. n-2 and
  ``out_{n-1} = node(x_{n-1}, down(out_{n-2}))``; ``out_0 = td_0``;
* **a node**: every input whose width differs from the BiFPN width gets its own
  1x1 conv + norm (so in the first layer C3..C5 are projected per edge); inputs
  are resized to the node's level (nearest up-sampling; max-pool 3x3/2 down),
  fused with *fast normalised fusion* ``w = relu(w_raw) / (sum relu(w_raw) + 1e-4)``
  (``w_raw`` initialised to 1), passed through swish and a 3x3 conv + norm;
* the layer is repeated ``bifpn_repeats`` times; the outputs of the last are the
  pyramid.

Deviation by choice of default: AdelaiDet's node conv is a plain 3x3 conv;
EfficientDet uses a depthwise-separable one. ``bifpn_separable: false`` (default)
follows AdelaiDet, whose numbers the paper reports; ``true`` gives EfficientDet's
depthwise 3x3 + pointwise 1x1. ``BN`` is ``nn.BatchNorm2d``; AdelaiDet's SyncBN
is what ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` makes of it under DDP.
Batch norm in training needs more than one value per channel, so with batch 1
the 1x1 maps of P6/P7 on a small image fail; use ``GN`` or larger batches there.

Params (``model`` section):
    neck: bifpn             selects this module (``sim_core.model.neck.build_neck``)
    fpn_levels: [3,4,5,6,7] output levels (stride 2**l), as for the FPN neck
    bifpn_channels: 160     width of every BiFPN map (AdelaiDet's OUT_CHANNELS)
    bifpn_repeats: 6        BiFPN layers (AdelaiDet's default NUM_REPEATS)
    bifpn_norm: BN          BN | GN (32 groups) | none
    bifpn_separable: false  depthwise-separable node convs (EfficientDet) or plain (AdelaiDet)
    fpn_channels            read by the heads; must equal bifpn_channels when present
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sim_core.errors import InputError
from sim_core.model.group_norm import GroupNorm32
from sim_core.model.neck import check_fpn_levels

FUSION_EPS = 1e-4
BACKBONE_LEVELS = {3: "c3", 4: "c4", 5: "c5"}


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "BN":
        return nn.BatchNorm2d(channels)
    if kind == "GN":
        if channels % 32:
            raise InputError("model.bifpn_norm", f"GN uses 32 groups; bifpn_channels={channels} is not a multiple of 32")
        return GroupNorm32(32, channels)
    if kind == "none":
        return nn.Identity()
    raise InputError("model.bifpn_norm", f"must be BN, GN or none, got {kind!r}")


def conv_norm(cin: int, cout: int, kernel: int, norm: str, separable: bool = False) -> nn.Sequential:
    """Conv (+ norm); bias only without a norm, which would cancel it."""
    bias = norm == "none"
    if separable and kernel > 1:
        conv = nn.Sequential(nn.Conv2d(cin, cin, kernel, padding=kernel // 2, groups=cin, bias=False),
                             nn.Conv2d(cin, cout, 1, bias=bias))
    else:
        conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=bias)
    return nn.Sequential(conv, make_norm(norm, cout))


def resize_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bring a neighbouring level to ``size``: max-pool 3x3/2 down, nearest up."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    if h >= size[0] and w >= size[1]:
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        if tuple(x.shape[-2:]) != tuple(size):
            raise ValueError(f"BiFPN levels are not a factor 2 apart: {(h, w)} -> {tuple(size)}")
        return x
    return F.interpolate(x, size=size, mode="nearest")


class FusionNode(nn.Module):
    """Fast normalised fusion of 2 or 3 maps, then swish and conv + norm."""

    def __init__(self, in_channels: list[int], channels: int, norm: str, separable: bool):
        super().__init__()
        self.laterals = nn.ModuleList(
            [conv_norm(c, channels, 1, norm) if c != channels else nn.Identity() for c in in_channels])
        self.weight = nn.Parameter(torch.ones(len(in_channels)))
        self.conv = conv_norm(channels, channels, 3, norm, separable)

    def fusion_weights(self) -> Tensor:
        w = F.relu(self.weight)
        return w / (w.sum() + FUSION_EPS)

    def forward(self, inputs: list[Tensor], size: tuple[int, int]) -> Tensor:
        w = self.fusion_weights()
        fused = sum(w[i] * resize_to(lat(x), size) for i, (lat, x) in enumerate(zip(self.laterals, inputs)))
        return self.conv(F.silu(fused))


class BiFPNLayer(nn.Module):
    """One top-down + bottom-up pass over ``len(in_channels)`` levels (finest first)."""

    def __init__(self, in_channels: list[int], channels: int, norm: str, separable: bool):
        super().__init__()
        n = len(in_channels)
        if n < 2:
            raise InputError("model.fpn_levels", "BiFPN needs at least two levels")
        self.num_levels = n
        c = channels
        # top_down[i] fuses level i (i = 0 .. n-2); its second input is td_{i+1} (x_{n-1} at the top).
        self.top_down = nn.ModuleList(
            [FusionNode([in_channels[i], in_channels[i + 1] if i == n - 2 else c], c, norm, separable)
             for i in range(n - 1)])
        # bottom_up[i - 1] fuses level i (i = 1 .. n-1).
        self.bottom_up = nn.ModuleList(
            [FusionNode([in_channels[i], c, c] if i < n - 1 else [in_channels[i], c], c, norm, separable)
             for i in range(1, n)])

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        n = self.num_levels
        sizes = [tuple(f.shape[-2:]) for f in feats]
        td: list[Tensor | None] = [None] * n
        above = feats[n - 1]
        for i in range(n - 2, -1, -1):
            above = td[i] = self.top_down[i]([feats[i], above], sizes[i])
        out = [td[0]]
        for i in range(1, n):
            inputs = [feats[i], td[i], out[-1]] if i < n - 1 else [feats[i], out[-1]]
            out.append(self.bottom_up[i - 1](inputs, sizes[i]))
        return out  # type: ignore[return-value]

    def nodes(self) -> list[FusionNode]:
        return list(self.top_down) + list(self.bottom_up)


class BiFPN(nn.Module):
    """Backbone dict ``{"c3", "c4", "c5"}`` -> list of maps for ``levels``, all ``channels`` wide."""

    def __init__(self, in_channels: dict[str, int], levels: list[int], channels: int,
                 repeats: int, norm: str = "BN", separable: bool = False):
        super().__init__()
        self.levels = check_fpn_levels(levels)
        self.inputs = [BACKBONE_LEVELS[l] for l in self.levels if l in BACKBONE_LEVELS]
        widths = [in_channels[k] for k in self.inputs]
        self.extra = nn.ModuleList()
        for l in self.levels:
            if l in BACKBONE_LEVELS:
                continue
            cin = widths[-1]
            self.extra.append(conv_norm(cin, channels, 1, norm) if cin != channels else nn.Identity())
            widths.append(channels)
        self.layers = nn.ModuleList(
            [BiFPNLayer(widths if r == 0 else [channels] * len(widths), channels, norm, separable)
             for r in range(repeats)])
        self.out_channels = channels

    def forward(self, feats: dict[str, Tensor]) -> list[Tensor]:
        xs = [feats[k] for k in self.inputs]
        for project in self.extra:
            xs.append(F.max_pool2d(project(xs[-1]), kernel_size=3, stride=2, padding=1))
        for layer in self.layers:
            xs = layer(xs)
        return xs

    def fusion_nodes(self) -> list[FusionNode]:
        return [node for layer in self.layers for node in layer.nodes()]


def build_bifpn(cfg: dict[str, Any], in_channels: dict[str, int]) -> BiFPN:
    """BiFPN from the params ``model`` section (keys in the module docstring)."""
    channels = cfg.get("bifpn_channels", 160)
    repeats = cfg.get("bifpn_repeats", 6)
    for key, value in (("bifpn_channels", channels), ("bifpn_repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"model.{key}", f"must be an integer >= 1, got {value!r}")
    fpn_channels = cfg.get("fpn_channels")
    if fpn_channels is not None and fpn_channels != channels:
        raise InputError("model.bifpn_channels", f"is {channels} but model.fpn_channels is {fpn_channels}; the heads "
                         "read fpn_channels, so set both to the same value (AdelaiDet's BiFPN uses 160)")
    return BiFPN(in_channels, cfg.get("fpn_levels", [3, 4, 5, 6, 7]), channels, repeats,
                 str(cfg.get("bifpn_norm", "BN")), bool(cfg.get("bifpn_separable", False)))
