"""Swin-B as a detection backbone: C3/C4/C5 at strides 8/16/32 for SIM's Swin-B-FPN row.

torchvision's Swin-B (``torchvision.models.swin_b``'s architecture: patch 4,
embedding 128, depths 2-2-18-2, heads 4-8-16-32, window 7) is used as a feature
extractor. Its ``features`` is a ``Sequential`` of alternating stages and
patch-merging layers::

    0 patch embedding (stride 4)   1 stage 1 (128 ch, stride 4)
    2 merge                        3 stage 2 (256 ch, stride 8)   -> c3
    4 merge                        5 stage 3 (512 ch, stride 16)  -> c4
    6 merge                        7 stage 4 (1024 ch, stride 32) -> c5

Stage outputs are channels-last ``[B, H, W, C]``. As the Swin detection
backbones do (Swin-Transformer-Object-Detection, Mask2Former's detectron2 Swin),
each output gets a LayerNorm over channels before it is permuted to
``[B, C, H, W]``: the stages end in a residual sum whose scale grows with depth,
and the classification network normalises only its last stage. C3 and C4 get new
LayerNorms (``norm_c3``, ``norm_c4``); C5 reuses the classification network's
final ``norm``, which sits exactly there, so its ImageNet weights are used
(the detection code bases create a fresh ``norm3`` instead; the difference is
the initial value of 2 x 1024 affine parameters).

The module keeps torchvision's parameter names (``features.*``, ``norm.*``), so
torchvision's ImageNet file ``swin_b-68c6b09e.pth`` (``Swin_B_Weights.IMAGENET1K_V1``)
loads with :func:`sim_core.model.pretrained.load_pretrained`; ``head.*`` is
ignored and ``norm_c3``/``norm_c4`` keep their initialisation. Input: RGB in
[0, 1] normalised with the ImageNet mean/std (what those weights expect). Any
input size works: torchvision pads to the window size and to even sizes, so the
outputs are ``ceil(H / stride)`` by ``ceil(W / stride)``.

Params (``model`` section):
    backbone: swin_b      selects this module (``sim_core.model.backbone.build_backbone``)
    swin_drop_path: 0.3   stochastic-depth rate of the last block (linear from 0 over
                          the 24 blocks), the Swin-B value of the Swin detection configs
                          (torchvision's ImageNet recipe uses 0.5)
    freeze_at: 0          0 trains everything (the Swin detection default); k >= 1
                          freezes the patch embedding and the first k-1 stages,
                          each with the merging layer after it (the official Swin's
                          frozen_stages = k-1), like detectron2's freeze_at
    pretrained: imagenet  torchvision's Swin_B_Weights.IMAGENET1K_V1, 'none', or a local state dict

Optimiser (set in the profile, applied by the engine): AdamW, lr 1e-4,
betas (0.9, 0.999), weight decay 0.05, no weight decay on LayerNorm parameters
and relative-position bias tables (:func:`no_weight_decay_names` lists them).
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torchvision.models.swin_transformer import SwinTransformer

from sim_core.errors import InputError
from sim_core.model.pretrained import load_backbone_weights

# torchvision.models.swin_b's architecture; built through the class so that the
# stochastic-depth rate (hard-coded to 0.5 in swin_b) can follow the detection recipe.
SWIN_B_ARCH = dict(patch_size=[4, 4], embed_dim=128, depths=[2, 2, 18, 2],
                   num_heads=[4, 8, 16, 32], window_size=[7, 7])
# features index of each output, and its channels
OUTPUT_STAGES = {"c3": 3, "c4": 5, "c5": 7}
OUT_CHANNELS = {"c3": 256, "c4": 512, "c5": 1024}


class SwinBackbone(nn.Module):
    """Swin-B returning ``{"c3", "c4", "c5"}`` (channels-first, LayerNorm-ed)."""

    # Present in the module, absent from ImageNet classification files.
    pretrained_allowed_missing = ("norm_c3.*", "norm_c4.*", "*.relative_position_index")

    def __init__(self, drop_path: float = 0.3, freeze_at: int = 0):
        super().__init__()
        if not 0.0 <= drop_path < 1.0:
            raise InputError("model.swin_drop_path", f"must be in [0, 1), got {drop_path!r}")
        if not 0 <= freeze_at <= 5:
            raise InputError("model.freeze_at", f"must be an integer in 0..5, got {freeze_at!r}")
        net = SwinTransformer(**SWIN_B_ARCH, stochastic_depth_prob=drop_path)
        self.features = net.features
        self.norm = net.norm  # final LayerNorm of the classifier = the C5 norm
        self.norm_c3 = nn.LayerNorm(OUT_CHANNELS["c3"])
        self.norm_c4 = nn.LayerNorm(OUT_CHANNELS["c4"])
        self.out_channels = dict(OUT_CHANNELS)
        self._freeze(freeze_at)

    def _freeze(self, freeze_at: int) -> None:
        # freeze_at k >= 1: patch embedding (features[0]) and features[1 .. 2k-2].
        n_modules = 0 if freeze_at == 0 else 2 * freeze_at - 1
        for module in list(self.features)[:n_modules]:
            for p in module.parameters():
                p.requires_grad_(False)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        norms = {"c3": self.norm_c3, "c4": self.norm_c4, "c5": self.norm}
        out: dict[str, Tensor] = {}
        names = {idx: name for name, idx in OUTPUT_STAGES.items()}
        for idx, layer in enumerate(self.features):
            x = layer(x)
            if idx in names:
                name = names[idx]
                out[name] = norms[name](x).permute(0, 3, 1, 2).contiguous()
        return out


def no_weight_decay_names(module: nn.Module) -> set[str]:
    """Parameter names the Swin recipes exclude from weight decay.

    LayerNorm weights/biases and relative-position bias tables (as
    ``paramwise_cfg`` in the Swin detection configs). Names are relative to
    ``module``; torchvision's patch-embedding norm is ``features.0.2``, which a
    match on the substring ``"norm"`` would miss, hence the type test.
    """
    names: set[str] = set()
    for mod_name, mod in module.named_modules():
        for p_name, _ in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(mod, nn.LayerNorm) or p_name == "relative_position_bias_table":
                names.add(full)
    return names


def build_swin_b(cfg: dict[str, Any]) -> SwinBackbone:
    """Swin-B backbone from the params ``model`` section (keys in the module docstring)."""
    model = SwinBackbone(float(cfg.get("swin_drop_path", 0.3)), int(cfg.get("freeze_at", 0)))
    load_backbone_weights(model, {"pretrained": "none", **cfg, "backbone": "swin_b"}, "swin_b")
    return model
