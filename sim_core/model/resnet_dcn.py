"""ResNet-101 with deformable convolutions (R-DCN-101) for SIM's "R-DCN-101-BiFPN" row.

What the paper's row runs is AdelaiDet's ``MS_R_101_BiFPN_dcni3_3x`` config
(identical in BoxInst and in SIM's released configs)::

    RESNETS: DEPTH 101, DEFORM_ON_PER_STAGE [False, True, True, True],
             DEFORM_MODULATED True, DEFORM_INTERVAL 3

i.e. DCN in the 3x3 conv of res3, res4 and res5 (torchvision's ``layer2``,
``layer3``, ``layer4``), modulated (DCN v2: a sigmoid mask per sampling point),
and with an interval: AdelaiDet's ``make_stage_intervals`` puts a deformable
block at block index ``i`` of a stage when ``i % interval == 0``. With interval 3
that is blocks 0, 3 of res3 (4 blocks), 0, 3, ..., 21 of res4 (23 blocks, 8 of
them) and 0 of res5 (3 blocks): 11 deformable convs.

Caveat found in AdelaiDet's code: ``build_fcos_resnet_bifpn_backbone`` builds its
ResNet with detectron2's ``build_resnet_backbone``, which ignores
``DEFORM_INTERVAL`` (only ``build_fcos_resnet_fpn_backbone`` switches to the
interval builder). The BiFPN ``dcni3`` runs therefore most likely had DCN in
*every* block of res3-res5. simbench follows the config's stated intent
(``dcn_interval: 3``); ``dcn_interval: 1`` reproduces what the code builds.

Each deformable conv is ``torchvision.ops.deform_conv2d`` fed by an offset conv
(3x3, same stride/padding as the conv it replaces, with bias) whose weights and
bias start at zero, as detectron2's ``DeformBottleneckBlock`` does. Zero offsets
make DCN v1 exactly the plain convolution. For DCN v2 the mask is
``sigmoid(0) = 0.5`` at the start, so the conv starts at half the plain output;
that is the DCN v2 paper's and detectron2's initialisation, kept on purpose.
The offset conv emits the 18 offsets (2 per kernel tap, torchvision's (dy, dx)
order) followed by the 9 mask logits; the order is a naming choice for learned,
zero-initialised outputs.

Structure and names are torchvision's ``resnet101`` (``conv1``, ``bn1``,
``layer1`` ... ``layer4``; stride in the 3x3 conv, "ResNet v1.5"), so
torchvision's ImageNet files (``resnet101-63fe2227.pth`` = IMAGENET1K_V1 or
``resnet101-cd907fc2.pth`` = IMAGENET1K_V2) load; the offset convs are the only
keys the file lacks. AdelaiDet starts from MSRA's caffe R-101 (stride in the
1x1 conv, BGR input); that detectron2 pickle loads too, with its conventions
reproduced (``sim_core.model.msra_weights``).
Batch norm is ``FrozenBatchNorm2d`` (detectron2's default ``FrozenBN``).

Params (``model`` section):
    backbone: resnet101_dcn   selects this module
    dcn_interval: 3           DCN in block i of res3-res5 when i % dcn_interval == 0
    dcn_modulated: true       DCN v2 (true, AdelaiDet's config) or v1 (false)
    freeze_at: 2              detectron2's FREEZE_AT: 0 trains all, 1 freezes the
                              stem, 2 the stem and res2 (default), ... 5 everything
    pretrained: imagenet      torchvision's ResNet-101 IMAGENET1K_V1 (offset convs keep their init),
                              'none', or a local file (torchvision state dict or MSRA R-101.pkl)
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchvision.ops import DeformConv2d, deform_conv2d

from sim_core.errors import InputError
from sim_core.model.backbone import TorchvisionResNet, is_from_scratch
from sim_core.model.pretrained import load_backbone_weights

DCN_LAYERS = ("layer2", "layer3", "layer4")  # res3, res4, res5
KERNEL_TAPS = 9  # 3 x 3


class OffsetDeformConv3x3(DeformConv2d):
    """A 3x3 deformable conv that predicts its own offsets (and mask) from its input.

    Replaces ``conv``; its weight is copied so the parameter keeps the name and
    value of the plain conv (``...conv2.weight``).
    """

    def __init__(self, conv: nn.Conv2d, modulated: bool):
        if conv.kernel_size != (3, 3) or conv.groups != 1 or conv.bias is not None:
            raise ValueError(f"expected a bias-free, ungrouped 3x3 conv, got {conv}")
        super().__init__(conv.in_channels, conv.out_channels, 3, stride=conv.stride[0],
                         padding=conv.padding[0], dilation=conv.dilation[0], bias=False)
        with torch.no_grad():
            self.weight.copy_(conv.weight)
        self.modulated = modulated
        n_out = KERNEL_TAPS * (3 if modulated else 2)
        self.conv_offset = nn.Conv2d(conv.in_channels, n_out, 3, stride=conv.stride,
                                     padding=conv.padding, dilation=conv.dilation, bias=True)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        raw = self.conv_offset(x)
        offset, mask = raw[:, : 2 * KERNEL_TAPS], None
        if self.modulated:
            mask = raw[:, 2 * KERNEL_TAPS:].sigmoid()
        return deform_conv2d(x, offset, self.weight, None, stride=self.stride,
                             padding=self.padding, dilation=self.dilation, mask=mask)


def dcn_block_indices(num_blocks: int, interval: int) -> list[int]:
    """Blocks of a stage that get DCN (AdelaiDet's ``i % interval == 0``)."""
    return [i for i in range(num_blocks) if i % interval == 0]


class ResNetDCN(TorchvisionResNet):
    """torchvision ResNet-101 with DCN in res3-res5, returning C3, C4, C5."""

    pretrained_allowed_missing = ("*.conv_offset.*",)

    def __init__(self, interval: int = 3, modulated: bool = True, freeze_at: int = 2, frozen_bn: bool = True):
        if not isinstance(interval, int) or interval < 1:
            raise InputError("model.dcn_interval", f"must be an integer >= 1, got {interval!r}")
        if not 0 <= freeze_at <= 5:
            raise InputError("model.freeze_at", f"must be an integer in 0..5, got {freeze_at!r}")
        # frozen below, once the offset convs exist; weights are loaded by build_resnet_dcn
        super().__init__(101, freeze_at=0, frozen_bn=frozen_bn)
        for name in DCN_LAYERS:
            layer = getattr(self, name)
            for i in dcn_block_indices(len(layer), interval):
                layer[i].conv2 = OffsetDeformConv3x3(layer[i].conv2, modulated)
        self.freeze(freeze_at)


def build_resnet_dcn(cfg: dict[str, Any]) -> ResNetDCN:
    """R-DCN-101 from the params ``model`` section (keys in the module docstring)."""
    interval = cfg.get("dcn_interval", 3)
    if isinstance(interval, bool) or not isinstance(interval, int):
        raise InputError("model.dcn_interval", f"must be an integer >= 1, got {interval!r}")
    model = ResNetDCN(interval, bool(cfg.get("dcn_modulated", True)), int(cfg.get("freeze_at", 2)),
                      frozen_bn=not is_from_scratch(cfg.get("pretrained", "none")))
    load_backbone_weights(model, {"pretrained": "none", **cfg, "backbone": "resnet101_dcn"}, "resnet101_dcn")
    return model
