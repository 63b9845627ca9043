"""CondInst's mask branch, dynamic mask head and aligned upsampling.

Mask branch: each of P3, P4, P5 goes through a 3x3 conv (+norm, ReLU) to
``mask_branch_channels``; P4 and P5 are upsampled to P3's size with aligned
bilinear upsampling and summed; ``mask_branch_convs`` more 3x3 convs and a 1x1
conv give ``mask_out_channels`` channels at stride 8 (8 in CondInst, 16 in
BoxInst's and SIM's configs, where SIM's prototypes live in this space).

``mask_feat_stride: 4`` (the CPU demo's setting; CondInst and the papers use 8)
adds the backbone's stride-4 map C2 through a 3x3 conv and sums it with the
x2-upsampled P3-P5 fusion, so the tower, the mask features and the dynamic
head run at stride 4 and no logit upsampling is needed. With
``mask_stride4_input: p2`` the stride-4 input is the FPN's P2 instead, and every
refined level is upsampled straight to P2's size and summed (AdelaiDet's mask
branch with ``MASK_BRANCH.IN_FEATURES`` p2-p5), so that runs against the
original code use the same network; ``mask_fusion_stride: 4`` does the same with C2
(AdelaiDet's branch with ``IN_FEATURES`` res2, p3-p5). The default (8) sums at
stride 8 and upsamples the sum: two aligned x2 upsamplings place an input cell
one stride-4 cell further right and down than one x4 upsampling (``4i + 3``
against ``4i + 2``), so P4 and P5 land shifted against AdelaiDet's branch (at
initialisation the two mask feature maps differ by 20 % relative,
``simbench upstream crosscheck``). Why the demo needs stride 4:
a 128-pixel demo image is about six times smaller than a COCO image at test
size 800, so a stride-8 grid gives a 40-88 pixel demo object 5-11 cells where
a typical COCO object gets several times more. Even a perfect stride-8 mask,
bilinearly upsampled, scores only 77 mask AP on the demo validation set
against 95 at stride 4 (``docs/demo_scale.md``): at stride 8 the demo would
measure the grid, not the methods.

Dynamic mask head: for each instance, the controller predicted at its FCOS
location is split into the weights and biases of ``dyn_layers`` 1x1 convs
(``dyn_channels`` wide, ReLU between, one output channel). The input of the
first layer is the image's mask features plus two relative-coordinate channels,
``(instance location - pixel location) / size_of_interest(level)``. All
instances run at once. CondInst writes this as one grouped 1x1 convolution
(``groups = P``); simbench computes the identical product as a batched matrix
multiply (``baddbmm``), which is about 3x faster forward+backward on CPU (the
tests check equality with the grouped convolution). Logits at the mask
feature stride (8) are upsampled x2 to the mask stride 4.

Aligned bilinear upsampling (CondInst): plain ``interpolate(align_corners=False)``
shifts content by half an input pixel relative to the convention that cell
``i`` of a stride-``s`` map sits at pixel ``s*i + s//2``. Padding one
replicated row/column, interpolating with ``align_corners=True`` to
``factor*n + 1`` samples, then shifting by ``factor//2`` keeps input cell ``i``
at output index ``factor*i + factor//2``, the same convention at both strides.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sim_core.errors import InputError
from sim_core.model.fcos import compute_locations
from sim_core.model.group_norm import GroupNorm32


def aligned_bilinear(x: Tensor, factor: int) -> Tensor:
    """Upsample ``[N, C, h, w]`` by an integer ``factor`` keeping cell centres aligned (see docstring)."""
    if x.dim() != 4:
        raise ValueError(f"aligned_bilinear expects a 4-d tensor, got shape {tuple(x.shape)}")
    if factor < 1 or int(factor) != factor:
        raise ValueError(f"aligned_bilinear needs a positive integer factor, got {factor}")
    factor = int(factor)
    if factor == 1:
        return x
    h, w = x.shape[-2:]
    x = F.pad(x, (0, 1, 0, 1), mode="replicate")
    x = F.interpolate(x, size=(factor * h + 1, factor * w + 1), mode="bilinear", align_corners=True)
    x = F.pad(x, (factor // 2, 0, factor // 2, 0), mode="replicate")
    return x[:, :, : factor * h, : factor * w]


def mask_branch_gn_groups(channels: int) -> int:
    """GroupNorm groups of a mask-branch layer of ``channels`` (AdelaiDet uses 32 at any width)."""
    return min(32, channels // 4) or 1


def _conv_block(cin: int, cout: int, norm: str) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, 1, 1, bias=norm == "none")]
    if norm == "BN":
        layers.append(nn.BatchNorm2d(cout))
    elif norm == "GN":
        layers.append(GroupNorm32(mask_branch_gn_groups(cout), cout))
    elif norm != "none":
        raise InputError("model.mask_branch_norm", f"must be 'BN', 'GN' or 'none', got {norm!r}")
    layers.append(nn.ReLU(inplace=True))
    for m in layers:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_uniform_(m.weight, a=1)
    return nn.Sequential(*layers)


class MaskBranch(nn.Module):
    """P3 + up(P4) + up(P5) [+ C2] -> convs -> ``out_channels`` mask features at ``out_stride``.

    ``detail_channels`` (the backbone's C2 width) is needed when ``out_stride`` is 4.
    """

    def __init__(self, in_channels: int, channels: int, num_convs: int, out_channels: int, norm: str = "BN",
                 out_stride: int = 8, detail_channels: int | None = None, fuse_at_stride4: bool = False):
        super().__init__()
        if out_stride not in (4, 8):
            raise InputError("model.mask_feat_stride", f"must be 8 (CondInst) or 4, got {out_stride!r}")
        self.refine = nn.ModuleList(_conv_block(in_channels, channels, norm) for _ in range(3))
        self.detail: nn.Module | None = None
        if out_stride == 4:
            if not detail_channels:
                raise InputError("model.mask_feat_stride",
                                 "4 needs a backbone with a stride-4 output (C2): resnet*, resnet_tiny")
            self.detail = _conv_block(detail_channels, channels, norm)
        self.tower = nn.Sequential(*[_conv_block(channels, channels, norm) for _ in range(num_convs)],
                                   nn.Conv2d(channels, out_channels, 1))
        self.out_channels = out_channels
        self.out_stride = out_stride
        self.fuse_at_stride4 = bool(fuse_at_stride4) and self.detail is not None

    def forward(self, feats: list[Tensor], detail: Tensor | None = None) -> Tensor:
        """``feats`` are the FPN maps starting at P3 (only P3-P5 are used); ``detail`` is C2 (or P2)."""
        if self.detail is not None and detail is None:
            raise ValueError("a stride-4 mask branch needs its stride-4 map (C2 or P2)")
        if self.fuse_at_stride4:
            return self.tower(self._fuse_pyramid(feats, self.detail(detail)))
        x = self._fuse_pyramid(feats)
        if self.detail is not None:
            x = self.detail(detail) + aligned_bilinear(x, 2)
        return self.tower(x)

    def _fuse_pyramid(self, feats: list[Tensor], base: Tensor | None = None) -> Tensor:
        """``base`` (or refined P3) plus each refined level upsampled to its size."""
        x = self.refine[0](feats[0]) if base is None else base
        for level in (0, 1, 2) if base is not None else (1, 2):
            y = self.refine[level](feats[level])
            factor = x.shape[-2] // y.shape[-2]
            if factor * y.shape[-2] != x.shape[-2] or factor * y.shape[-1] != x.shape[-1]:
                raise ValueError(f"FPN level sizes {tuple(x.shape[-2:])} and {tuple(y.shape[-2:])} "
                                 "are not an integer factor apart; pad inputs to a multiple of 32")
            x = x + aligned_bilinear(y, factor)
        return x


class DynamicMaskHead(nn.Module):
    """Runs per-instance 1x1 conv stacks whose parameters come from the controller.

    Holds no learnable parameters itself; ``num_params`` tells the FCOS head how
    many channels its controller must emit.
    """

    def __init__(self, in_channels: int, channels: int = 8, num_layers: int = 3,
                 sizes_of_interest: list[float] | None = None, strides: list[int] | None = None,
                 out_stride: int = 4, feat_stride: int = 8):
        super().__init__()
        if num_layers < 2:
            raise InputError("model.dyn_layers", f"must be >= 2, got {num_layers}")
        self.in_channels = in_channels
        self.channels = channels
        self.num_layers = num_layers
        self.out_stride = out_stride
        self.feat_stride = feat_stride
        dims = [in_channels + 2] + [channels] * (num_layers - 1) + [1]
        self.weight_nums = [dims[i] * dims[i + 1] for i in range(num_layers)]
        self.bias_nums = [dims[i + 1] for i in range(num_layers)]
        self.dims = dims
        self.num_params = sum(self.weight_nums) + sum(self.bias_nums)
        soi = list(sizes_of_interest or [64, 128, 256, 512])
        strides = list(strides or [8, 16, 32, 64, 128])
        if len(soi) + 1 != len(strides):
            raise InputError("model.sizes_of_interest",
                             f"needs one entry fewer than fpn_levels ({len(strides)} levels), got {soi}")
        # CondInst normalises relative coordinates by the level's size of interest;
        # the last level (open-ended range) uses twice the last bound.
        self.register_buffer("level_soi", torch.tensor([float(s) for s in soi] + [2.0 * soi[-1]]), persistent=False)
        self.register_buffer("level_strides", torch.tensor(strides, dtype=torch.float32), persistent=False)

    def soi_of_strides(self, strides: Tensor) -> Tensor:
        """Size of interest of the level each stride belongs to."""
        match = strides.to(self.level_strides.dtype)[:, None] == self.level_strides[None]
        if not bool(match.any(dim=1).all()):
            raise ValueError(f"strides {strides.unique().tolist()} are not FPN strides {self.level_strides.tolist()}")
        return self.level_soi[match.float().argmax(dim=1)]

    def forward(self, mask_feats: Tensor, controllers: Tensor, locations: Tensor, im_inds: Tensor,
                strides: Tensor) -> Tensor:
        """Instance mask logits ``[P, 1, H/4, W/4]`` (see the module docstring)."""
        n_img, cin, h, w = mask_feats.shape
        p = controllers.shape[0]
        factor = self.feat_stride // self.out_stride
        if p == 0:  # an empty result that still belongs to the graph
            anchor = (mask_feats.sum() + controllers.sum()) * 0.0
            return mask_feats.new_zeros(0, 1, h * factor, w * factor) + anchor
        if controllers.shape[1] != self.num_params or cin != self.in_channels:
            raise ValueError(f"controllers have {controllers.shape[1]} params and mask feats {cin} channels; "
                             f"expected {self.num_params} and {self.in_channels}")
        pix = compute_locations(h, w, self.feat_stride, mask_feats.device)  # [HW, 2]
        rel = (locations.to(pix.dtype)[:, None, :] - pix[None]) / self.soi_of_strides(strides)[:, None, None]
        rel = rel.permute(0, 2, 1).to(mask_feats.dtype)  # [P, 2, HW]
        x = torch.cat([rel, mask_feats[im_inds].reshape(p, cin, h * w)], dim=1)  # [P, Cin+2, HW]
        weights, biases = self.parse_params(controllers)
        for i, (w_i, b_i) in enumerate(zip(weights, biases)):
            x = torch.baddbmm(b_i[:, :, None], w_i, x)  # per instance: [Cout, Cin] @ [Cin, HW] + b
            if i < self.num_layers - 1:
                x = F.relu(x)
        return aligned_bilinear(x.reshape(p, 1, h, w), factor)

    def parse_params(self, controllers: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Split ``[P, num_params]`` into per-layer weights ``[P, Cout, Cin]`` and biases ``[P, Cout]``.

        Layout per instance: all layers' weights (row-major ``Cout x Cin``), then all biases.
        """
        p = controllers.shape[0]
        splits = torch.split(controllers, self.weight_nums + self.bias_nums, dim=1)
        weights = [splits[i].reshape(p, self.dims[i + 1], self.dims[i]) for i in range(self.num_layers)]
        return weights, list(splits[self.num_layers:])
