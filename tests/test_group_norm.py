"""GroupNorm32: nn.GroupNorm bit for bit in fp32, float32 statistics and output under CPU bfloat16 autocast."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sim_core.model.condinst import CondInst
from sim_core.model.group_norm import GroupNorm32


def _pair(channels: int = 16, groups: int = 4) -> tuple[GroupNorm32, nn.GroupNorm]:
    torch.manual_seed(0)
    ours, plain = GroupNorm32(groups, channels), nn.GroupNorm(groups, channels)
    with torch.no_grad():
        ours.weight.normal_()
        ours.bias.normal_()
    plain.load_state_dict(ours.state_dict())  # same keys: checkpoints load either way
    return ours, plain


@pytest.mark.parametrize("channels_last", [False, True])
def test_float32_is_nn_groupnorm_bit_for_bit(channels_last):
    ours, plain = _pair()
    x = torch.randn(3, 16, 7, 5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = ours(xa), plain(xb)
    assert torch.equal(ya, yb)
    grad = torch.randn_like(ya)
    ya.backward(grad)
    yb.backward(grad)
    assert torch.equal(xa.grad, xb.grad)
    assert torch.equal(ours.weight.grad, plain.weight.grad) and torch.equal(ours.bias.grad, plain.bias.grad)


def test_bfloat16_autocast_normalises_in_float32():
    ours, plain = _pair()
    x = torch.randn(2, 16, 6, 6).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_plain = ours(x), plain(x)
    assert y_plain.dtype == torch.bfloat16  # what CPU autocast does with a plain GroupNorm
    assert y.dtype == torch.float32  # as CUDA autocast does (group_norm on its float32 list)
    assert torch.equal(y, F.group_norm(x.float(), 4, ours.weight, ours.bias, ours.eps))
    # the float32 statistics are closer to the float32 reference than the bfloat16 output
    reference = plain(x.float())
    assert (y - reference).abs().max() < (y_plain.float() - reference).abs().max()


def test_every_groupnorm_of_the_detector_is_groupnorm32():
    cfg = {"backbone": "resnet_tiny", "tiny_norm": "GN", "mask_branch_norm": "GN", "head_norm": "GN"}
    model = CondInst(3, cfg)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert all(type(m) is GroupNorm32 for m in norms)
    for part in (model.backbone, model.head, model.mask_branch):  # each builder makes them
        assert any(isinstance(m, GroupNorm32) for m in part.modules()), type(part).__name__
