"""Swin-B, R-DCN-101, BiFPN and the pretrained-weights loader.

Swin-B and ResNet-101 are large, so each is built once per module and fed tiny
images; the torchvision reference models are built on the ``meta`` device
(shapes only, no memory, no init).
"""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from sim_core.errors import InputError
from sim_core.model.bifpn import BiFPN, FusionNode, build_bifpn
from sim_core.model.pretrained import load_pretrained
from sim_core.model.resnet_dcn import OffsetDeformConv3x3, build_resnet_dcn, dcn_block_indices
from sim_core.model.swin import build_swin_b, no_weight_decay_names

STRIDES = {"c3": 8, "c4": 16, "c5": 32}


@pytest.fixture(scope="module")
def swin():
    torch.manual_seed(0)
    return build_swin_b({"swin_drop_path": 0.3, "freeze_at": 0})


@pytest.fixture(scope="module")
def dcn():
    torch.manual_seed(0)
    return build_resnet_dcn({"dcn_interval": 3, "dcn_modulated": True, "freeze_at": 2})


def _meta(builder, **kwargs):
    with torch.device("meta"):
        return builder(weights=None, **kwargs)


def _numel(state: dict, skip=()) -> int:
    return sum(v.numel() for k, v in state.items()
               if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
               and not any(s in k for s in skip))


def _check_train_step(model: nn.Module, outputs, may_skip=None) -> None:
    """Backward gives finite gradients that reach the parameters; an SGD step moves them.

    ``may_skip(name)``: parameters allowed to get no gradient (branches dropped by
    stochastic depth in this step). The parameters are restored afterwards, so the
    module-scoped model stays at its initialisation for the other tests.
    """
    loss = sum(o.float().pow(2).mean() for o in outputs)
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for name, p in trainable:
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    without = [n for n, p in trainable if p.grad is None or p.grad.abs().sum() == 0]
    assert all(may_skip is not None and may_skip(n) for n in without), without[:5]
    assert len(without) < 0.5 * len(trainable)
    snapshot = {n: p.detach().clone() for n, p in trainable}
    torch.optim.SGD([p for _, p in trainable], lr=0.01).step()
    assert any(not torch.equal(snapshot[n], p) for n, p in trainable)
    with torch.no_grad():
        for n, p in trainable:
            p.copy_(snapshot[n])
    model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------- Swin-B

def test_swin_outputs_have_strides_and_channels(swin):
    assert swin.out_channels == {"c3": 256, "c4": 512, "c5": 1024}
    swin.eval()
    with torch.no_grad():
        out = swin(torch.randn(1, 3, 72, 40))  # not a multiple of 32: torchvision pads
    for k, stride in STRIDES.items():
        assert out[k].shape == (1, swin.out_channels[k], math.ceil(72 / stride), math.ceil(40 / stride))
        # A LayerNorm over channels with its initial affine (1, 0): zero mean, unit variance per pixel.
        assert torch.allclose(out[k].mean(1), torch.zeros(()), atol=1e-4)
        assert torch.allclose(out[k].var(1, unbiased=False), torch.ones(()), atol=1e-2)


def test_swin_matches_torchvision_swin_b(swin):
    ref_model = _meta(torchvision.models.swin_b)
    ref = {k: v for k, v in ref_model.state_dict().items() if not k.startswith("head.")}
    own = swin.state_dict()
    extra = {k for k in own if k.startswith(("norm_c3.", "norm_c4."))}
    assert set(own) - extra == set(ref)  # torchvision names: ImageNet files load
    assert all(own[k].shape == ref[k].shape for k in ref)
    n_ref = sum(p.numel() for n, p in ref_model.named_parameters() if not n.startswith("head."))
    n_own = sum(p.numel() for p in swin.parameters())
    assert n_own == n_ref + 2 * (256 + 512)  # + the two new LayerNorms
    assert abs(n_own - n_ref) / n_ref < 0.05
    blocks = [m for m in swin.modules() if isinstance(m, torchvision.ops.StochasticDepth)]
    assert len(blocks) == 24 and blocks[0].p == 0.0 and blocks[-1].p == pytest.approx(0.3)


def test_swin_train_step_gives_finite_gradients(swin):
    swin.train()
    torch.manual_seed(1)
    out = swin(torch.randn(1, 3, 64, 64))
    # With batch 1, a residual branch that stochastic depth drops gets no gradient.
    in_block = re.compile(r"features\.[1357]\.\d+\.(norm1|attn|norm2|mlp)\.")
    _check_train_step(swin, out.values(), may_skip=lambda n: bool(in_block.match(n)))


def test_swin_no_weight_decay_names(swin):
    names = no_weight_decay_names(swin)
    assert "features.0.2.weight" in names  # patch-embedding LayerNorm (no "norm" in its name)
    assert "norm_c3.bias" in names and "norm.weight" in names
    assert "features.5.3.attn.relative_position_bias_table" in names
    assert "features.5.3.attn.qkv.weight" not in names


def test_swin_freeze_at_follows_stage_grouping():
    with torch.device("meta"):
        model = build_swin_b({"freeze_at": 2})
    frozen = {n.split(".")[1] for n, p in model.named_parameters() if n.startswith("features.") and not p.requires_grad}
    assert frozen == {"0", "1", "2"}  # patch embedding, stage 1 and its merging layer
    with pytest.raises(InputError, match="swin_drop_path"):
        build_swin_b({"swin_drop_path": 1.5})


# ---------------------------------------------------------------- ResNet-DCN-101

def test_dcn_v1_with_zero_offsets_is_the_plain_conv():
    torch.manual_seed(0)
    for stride in (1, 2):
        conv = nn.Conv2d(8, 6, 3, stride=stride, padding=1, bias=False)
        dcn = OffsetDeformConv3x3(conv, modulated=False)
        x = torch.randn(2, 8, 11, 9)
        assert torch.allclose(dcn(x), conv(x), atol=1e-5)
        assert torch.equal(dcn.weight, conv.weight)


def test_dcn_v2_starts_at_half_the_conv_and_learns_offsets():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 5, 3, padding=1, bias=False)
    dcn = OffsetDeformConv3x3(conv, modulated=True)
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    y = dcn(x)
    assert torch.allclose(y, 0.5 * conv(x), atol=1e-5)  # mask = sigmoid(0), DCN v2's init
    y.pow(2).sum().backward()
    assert dcn.conv_offset.weight.grad.abs().sum() > 0  # zero-initialised, yet trainable


def test_dcn_offsets_move_the_sampling_points():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    dcn = OffsetDeformConv3x3(conv, modulated=False)
    with torch.no_grad():
        dcn.conv_offset.bias[1::2] = 1.0  # dx = +1 at every tap, dy = 0
    x = torch.randn(1, 3, 7, 9)
    shifted = dcn(x)
    plain = conv(x)
    # Sampling one pixel to the right = the plain conv one column further (away from the border).
    assert torch.allclose(shifted[..., :-2], plain[..., 1:-1], atol=1e-5)
    assert not torch.allclose(shifted, plain, atol=1e-3)


def test_dcn_blocks_follow_adelaidet_interval(dcn):
    assert dcn_block_indices(23, 3) == [0, 3, 6, 9, 12, 15, 18, 21]
    expected = {"layer1": [], "layer2": [0, 3], "layer3": list(range(0, 23, 3)), "layer4": [0]}
    for name, idx in expected.items():
        layer = getattr(dcn, name)
        got = [i for i, block in enumerate(layer) if isinstance(block.conv2, OffsetDeformConv3x3)]
        assert got == idx, name
    assert all(m.modulated for m in dcn.modules() if isinstance(m, OffsetDeformConv3x3))


def test_dcn_outputs_and_freezing(dcn):
    assert dcn.out_channels == {"c2": 256, "c3": 512, "c4": 1024, "c5": 2048}
    dcn.eval()
    with torch.no_grad():
        out = dcn(torch.randn(1, 3, 64, 96))
    for k, stride in STRIDES.items():
        assert out[k].shape == (1, dcn.out_channels[k], 64 // stride, 96 // stride)
    assert not dcn.conv1.weight.requires_grad and not dcn.layer1[0].conv1.weight.requires_grad
    assert dcn.layer2[0].conv2.weight.requires_grad and dcn.layer2[0].conv2.conv_offset.weight.requires_grad
    # from scratch (the fixture): trainable BN, as every torchvision ResNet without weights
    norms = [m for m in dcn.modules() if "BatchNorm" in type(m).__name__]
    assert norms and all(type(m) is nn.BatchNorm2d for m in norms)
    with pytest.raises(InputError, match="dcn_interval"):
        build_resnet_dcn({"dcn_interval": 0})


def test_dcn_with_weights_freezes_batchnorm_before_loading(tmp_path, monkeypatch):
    """A weights file makes the BN layers frozen ones (detectron2's FrozenBN) before the file is read."""
    import sim_core.model.resnet_dcn as resnet_dcn

    seen = {}
    monkeypatch.setattr(resnet_dcn, "load_backbone_weights",
                        lambda model, cfg, name: seen.update(norms={type(m) for m in model.modules()
                                                                    if "BatchNorm" in type(m).__name__}))
    with torch.device("meta"):
        build_resnet_dcn({"dcn_interval": 3, "pretrained": str(tmp_path / "r101.pth")})
    from sim_core.model.frozen_bn import FrozenBatchNorm2dTyped

    assert seen["norms"] == {FrozenBatchNorm2dTyped}  # torchvision's FrozenBatchNorm2d, keeping the input dtype


def test_dcn_parameter_count_is_resnet101_plus_offsets(dcn):
    ref = _meta(torchvision.models.resnet101).state_dict()
    n_ref = _numel(ref, skip=("fc.",))
    # detectron2-style offset convs: 3x3 from the bottleneck width to 27 channels (+ bias).
    widths = {"layer2": (128, 2), "layer3": (256, 8), "layer4": (512, 1)}
    n_offsets = sum(n * (w * 27 * 9 + 27) for w, n in widths.values())
    n_own = _numel(dcn.state_dict())  # FrozenBN affine terms are buffers; count them like BN params
    assert n_own == n_ref + n_offsets
    assert abs(n_own - n_ref) / n_ref < 0.05


def test_zero_init_dcn_backbone_equals_torchvision_resnet101(dcn):
    """With zero offsets the R-DCN-101 is torchvision's ResNet-101 with DCN v2's 0.5 mask."""
    ref = _meta(torchvision.models.resnet101, norm_layer=torchvision.ops.FrozenBatchNorm2d)
    state = {k: v.clone() for k, v in dcn.state_dict().items() if "conv_offset" not in k}
    for name in ("layer2", "layer3", "layer4"):
        for i, block in enumerate(getattr(dcn, name)):
            if isinstance(block.conv2, OffsetDeformConv3x3):
                state[f"{name}.{i}.conv2.weight"] *= 0.5
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    ref.load_state_dict(state, strict=True, assign=True)  # every torchvision name has a tensor
    dcn.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        c5 = dcn(x)["c5"]
        r = ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))
        r = ref.layer4(ref.layer3(ref.layer2(ref.layer1(r))))
    assert torch.allclose(c5, r, rtol=1e-4, atol=1e-4 * r.abs().max().item())


def test_dcn_bifpn_train_step_gives_finite_gradients(dcn):
    neck = build_bifpn({"fpn_levels": [3, 4, 5, 6, 7], "fpn_channels": 32, "bifpn_channels": 32,
                        "bifpn_repeats": 2}, dcn.out_channels)
    dcn.train()
    neck.train()
    torch.manual_seed(2)
    levels = neck(dcn(torch.randn(2, 3, 64, 64)))
    model = nn.ModuleDict({"backbone": dcn, "neck": neck})
    offsets = [m.conv_offset.weight for m in dcn.modules() if isinstance(m, OffsetDeformConv3x3)]
    loss = sum(o.pow(2).mean() for o in levels)
    grads = torch.autograd.grad(loss, offsets[-1:], retain_graph=True)
    assert grads[0].abs().sum() > 0  # offsets of res5 receive gradient at step 0
    _check_train_step(model, levels)


# ---------------------------------------------------------------- BiFPN

def _feats(batch=2, size=128, channels=(8, 16, 32)):
    return {k: torch.randn(batch, c, size // s, size // s) for (k, s), c in zip(STRIDES.items(), channels)}


def test_bifpn_levels_channels_and_graph():
    cfg = {"fpn_levels": [3, 4, 5, 6, 7], "fpn_channels": 16, "bifpn_channels": 16, "bifpn_repeats": 3}
    neck = build_bifpn(cfg, {"c3": 8, "c4": 16, "c5": 32})
    assert neck.out_channels == 16 and len(neck.layers) == 3
    out = neck(_feats())
    assert [tuple(o.shape) for o in out] == [(2, 16, 128 // 2 ** l, 128 // 2 ** l) for l in range(3, 8)]
    layer = neck.layers[0]
    # AdelaiDet's 5-level graph: 4 top-down nodes of 2 inputs, 3 bottom-up of 3, the top one of 2.
    assert [len(n.laterals) for n in layer.top_down] == [2, 2, 2, 2]
    assert [len(n.laterals) for n in layer.bottom_up] == [3, 3, 3, 2]
    # Only inputs of another width get a projection: c3 (8) and c5 (32) in the first layer, not c4 (16).
    # Node order: top-down P3, P4, P5, P6, then bottom-up P4, P5, P6, P7.
    projected = [sum(not isinstance(m, nn.Identity) for m in n.laterals) for n in layer.nodes()]
    assert projected == [1, 0, 1, 0, 0, 1, 0, 0]
    assert all(isinstance(m, nn.Identity) for l in neck.layers[1:] for n in l.nodes() for m in n.laterals)


def test_bifpn_three_levels_and_paper_defaults():
    neck = build_bifpn({"fpn_levels": [3, 4, 5]}, {"c3": 512, "c4": 1024, "c5": 2048})
    assert neck.out_channels == 160 and len(neck.layers) == 6  # AdelaiDet: OUT_CHANNELS 160, NUM_REPEATS 6
    assert len(neck.extra) == 0 and len(neck.layers[0].nodes()) == 4


def test_bifpn_fusion_weights_are_nonnegative_and_normalised():
    node = FusionNode([4, 4], 4, norm="none", separable=False)
    with torch.no_grad():
        node.weight.copy_(torch.tensor([-1.0, 3.0]))
    w = node.fusion_weights()
    assert torch.allclose(w, torch.tensor([0.0, 3.0 / (3.0 + 1e-4)]))
    a, b = torch.randn(1, 4, 6, 6), torch.randn(1, 4, 3, 3)
    expected = node.conv(F.silu(w[0] * a + w[1] * F.interpolate(b, size=(6, 6), mode="nearest")))
    assert torch.allclose(node([a, b], (6, 6)), expected, atol=1e-6)
    # After optimisation steps that push raw weights negative, the fused weights stay valid.
    neck = build_bifpn({"fpn_levels": [3, 4, 5, 6], "fpn_channels": 8, "bifpn_channels": 8, "bifpn_repeats": 1},
                       {"c3": 8, "c4": 8, "c5": 8})
    opt = torch.optim.SGD(neck.parameters(), lr=5.0)
    for _ in range(3):
        opt.zero_grad()
        sum(o.mean() for o in neck(_feats(channels=(8, 8, 8)))).backward()
        opt.step()
    for node in neck.fusion_nodes():
        w = node.fusion_weights().detach()
        assert (w >= 0).all() and w.sum() <= 1.0
        if F.relu(node.weight.detach()).sum() > 1e-2:
            assert float(w.sum()) == pytest.approx(1.0, abs=1e-2)


def test_bifpn_bad_settings_raise():
    with pytest.raises(InputError, match="fpn_channels"):
        build_bifpn({"fpn_channels": 256, "bifpn_channels": 160}, {"c3": 8, "c4": 8, "c5": 8})
    with pytest.raises(InputError, match="bifpn_repeats"):
        build_bifpn({"bifpn_repeats": 0}, {"c3": 8, "c4": 8, "c5": 8})
    with pytest.raises(InputError, match="bifpn_norm"):
        build_bifpn({"bifpn_norm": "LN"}, {"c3": 8, "c4": 8, "c5": 8})
    with pytest.raises(InputError, match="fpn_levels"):
        build_bifpn({"fpn_levels": [4, 5, 6]}, {"c3": 8, "c4": 8, "c5": 8})


def test_bifpn_separable_and_group_norm():
    plain = BiFPN({"c3": 32, "c4": 32, "c5": 32}, [3, 4, 5], 32, 1, norm="GN", separable=False)
    sep = BiFPN({"c3": 32, "c4": 32, "c5": 32}, [3, 4, 5], 32, 1, norm="GN", separable=True)
    n_plain, n_sep = (sum(p.numel() for p in m.parameters()) for m in (plain, sep))
    assert n_sep < n_plain / 4  # depthwise 3x3 + pointwise 1x1 instead of a full 3x3
    out = sep(_feats(batch=1, size=64, channels=(32, 32, 32)))
    assert [o.shape[1] for o in out] == [32, 32, 32]


# ---------------------------------------------------------------- load_pretrained

class Small(nn.Module):
    pretrained_allowed_missing = ("extra.*",)

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.extra = nn.Linear(2, 2)
        nn.init.zeros_(self.extra.weight)


def test_load_pretrained_round_trip_with_prefix_and_container(tmp_path):
    torch.manual_seed(0)
    src = Small()
    state = {f"module.{k}": v for k, v in src.state_dict().items() if not k.startswith("extra.")}
    state["module.fc.weight"] = torch.randn(10, 4)  # classifier head: ignored
    path = tmp_path / "imagenet.pth"
    torch.save({"model": state, "epoch": 3}, path)
    dst = Small()
    report = load_pretrained(dst, path, "small")
    assert report.prefix == "module." and report.ignored == ("fc.weight",)
    assert report.kept_initial == ("extra.weight", "extra.bias")
    for k, v in src.state_dict().items():
        if not k.startswith("extra."):
            assert torch.equal(dst.state_dict()[k], v), k
    assert torch.count_nonzero(dst.extra.weight) == 0


def test_load_pretrained_detector_checkpoint_keeps_only_the_backbone(tmp_path):
    src = Small()
    state = {f"backbone.body.{k}": v for k, v in src.state_dict().items()}
    state["head.cls.weight"] = torch.randn(3, 3)
    state["backbone.fpn.inner.weight"] = torch.randn(3, 3)  # outside the chosen prefix: left out
    path = tmp_path / "det.pth"
    torch.save(state, path)
    assert load_pretrained(Small(), path, "small").prefix == "backbone.body."


def test_load_pretrained_mismatch_names_file_and_keys(tmp_path):
    state = Small().state_dict()
    state["conv.weight"] = torch.randn(4, 3, 5, 5)
    del state["bn.running_var"]
    path = tmp_path / "wrong_arch.pth"
    torch.save(state, path)
    with pytest.raises(InputError) as err:
        load_pretrained(Small(), path, "small")
    msg = str(err.value)
    assert "wrong_arch.pth" in msg and "small" in msg
    assert "bn.running_var" in msg and "conv.weight: file (4, 3, 5, 5) vs model (4, 3, 3, 3)" in msg


def test_load_pretrained_unreadable_or_foreign_files(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="garbage.pth"):
        load_pretrained(Small(), garbage, "small")
    with pytest.raises(InputError, match="does not exist"):
        load_pretrained(Small(), tmp_path / "absent.pth", "small")
    other = tmp_path / "other.pth"
    torch.save({"layer9.weight": torch.zeros(2)}, other)
    with pytest.raises(InputError, match="none of its 1 keys"):
        load_pretrained(Small(), other, "small")


def test_load_pretrained_torchvision_resnet101_file_into_dcn(dcn, tmp_path):
    """A torchvision-format ResNet-101 file (fc, BN counters, DDP prefix) loads; offsets stay zero."""
    own = dcn.state_dict()
    state = {f"module.{k}": v for k, v in own.items() if "conv_offset" not in k}
    for k in own:
        if k.endswith("running_var"):
            state[f"module.{k[:-len('running_var')]}num_batches_tracked"] = torch.tensor(0)
    state["module.fc.weight"], state["module.fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    new = torch.randn_like(own["layer3.5.conv2.weight"])
    original = own["layer3.5.conv2.weight"].clone()
    state["module.layer3.5.conv2.weight"] = new
    path = tmp_path / "resnet101.pth"
    torch.save(state, path)
    try:
        report = load_pretrained(dcn, path, "resnet101_dcn")
        assert torch.equal(dcn.layer3[5].conv2.weight, new)
        assert len(report.kept_initial) == 2 * 11  # weight and bias of the 11 offset convs
        assert all(torch.count_nonzero(m.conv_offset.weight) == 0
                   for m in dcn.modules() if isinstance(m, OffsetDeformConv3x3))
    finally:
        with torch.no_grad():
            dcn.layer3[5].conv2.weight.copy_(original)
    # A ResNet-50 file is refused, naming what is missing.
    del state["module.layer3.22.conv3.weight"]
    torch.save(state, path)
    with pytest.raises(InputError, match="layer3.22.conv3.weight"):
        load_pretrained(dcn, path, "resnet101_dcn")
