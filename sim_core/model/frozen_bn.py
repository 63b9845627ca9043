"""Frozen batch norm that keeps the activation's precision under mixed precision.

torchvision's ``FrozenBatchNorm2d`` computes ``x * scale + bias`` with float32
buffers, so a float16/bfloat16 activation comes out float32: under autocast
every frozen-BN layer of a ResNet trunk doubles the activation memory and turns
the next convolution's input back into float32 for autocast to cast again.
detectron2's ``FrozenBatchNorm2d`` casts scale and bias to the input's type;
this does the same. In float32 it is torchvision's layer bit for bit, with the
same buffers and state-dict keys.
"""
from __future__ import annotations

from torch import Tensor
from torchvision.ops import FrozenBatchNorm2d


class FrozenBatchNorm2dTyped(FrozenBatchNorm2d):
    """``torchvision.ops.FrozenBatchNorm2d`` whose output has the input's dtype."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale.to(x.dtype) + bias.to(x.dtype)
