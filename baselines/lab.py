"""Colour affinities between neighbouring pixels at mask resolution.

BoxInst's pairwise term (and SIM, which keeps it) only asks two neighbouring
pixels to share a label when their colours are close in CIE-LAB. This module
turns the batch of un-normalised input images into that similarity, for the
whole batch at once on the tensor's device (kornia's ``rgb_to_lab``), rather
than per image on the CPU as the reference code base does with scikit-image.

Conventions (those of the BoxInst reference implementation, AdelaiDet):

* the image is average-pooled by the mask stride (kernel = stride = s), so
  one LAB value summarises each ``s x s`` cell;
* a pixel is valid when the input pixel at the centre of its cell
  (offset ``s // 2``) is a real image pixel, not padding;
* for COCO-like data the bottom rows of each real image region are made
  invalid too (the reference removes them because COCO's boxes often stop
  short of the image border there);
* neighbours are the ``k x k - 1`` pixels of a dilated ``k x k`` window
  around the centre, in row-major order with the centre removed;
* only the *neighbour's* validity is applied (a pair whose neighbour falls
  in padding or outside the map gets similarity 0), exactly as the
  reference; the centre is covered by the GT-box condition of the loss.

Differences from the reference, both deliberate: LAB is computed in float
from the pooled RGB (the reference truncates the pooled values to uint8
before converting; ``boxinst.lab_from_uint8: true`` does the same, and with
it simbench's colour similarity equals AdelaiDet's: ``simbench upstream
crosscheck``, docs/upstream.md 0.10), and ``ignore_bottom_px`` counts input pixels after the
resize (the reference rescales 10 original-image pixels by the resize factor;
``MaskLossInputs`` does not carry the original image size).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from kornia.color import rgb_to_lab
from torch import Tensor

from sim_core.model.precision import at_least_float32

__all__ = [
    "neighbour_offsets",
    "unfold_neighbours",
    "channel_distance",
    "images_to_lab",
    "valid_at_mask_stride",
    "color_similarity",
    "batch_color_similarity",
]


def neighbour_offsets(kernel: int, dilation: int) -> list[tuple[int, int]]:
    """``(dy, dx)`` of the ``kernel**2 - 1`` neighbours, row-major, centre removed."""
    if kernel < 3 or kernel % 2 == 0:
        raise ValueError(f"kernel must be an odd number >= 3, got {kernel}")
    if dilation < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation}")
    half = kernel // 2
    return [(dy * dilation, dx * dilation)
            for dy in range(-half, half + 1) for dx in range(-half, half + 1)
            if (dy, dx) != (0, 0)]


def unfold_neighbours(x: Tensor, kernel: int = 3, dilation: int = 2) -> Tensor:
    """Neighbour values ``[N, C, K, h, w]`` of ``x`` ``[N, C, h, w]`` (zero outside the map).

    ``out[:, :, k, i, j] = x[:, :, i + dy_k, j + dx_k]``; slicing a zero-padded
    copy costs far less memory traffic than ``F.unfold``.
    """
    offsets = neighbour_offsets(kernel, dilation)
    pad = dilation * (kernel // 2)
    height, width = x.shape[-2:]
    padded = F.pad(x, (pad, pad, pad, pad))
    return torch.stack([padded[..., pad + dy:pad + dy + height, pad + dx:pad + dx + width]
                        for dy, dx in offsets], dim=2)


def images_to_lab(images_raw: Tensor, stride: int, truncate_to_uint8: bool = False) -> Tensor:
    """``[B, 3, H, W]`` RGB in ``[0, 255]`` -> ``[B, 3, H/s, W/s]`` CIE-LAB of the s x s means
    (truncated to whole values first with ``truncate_to_uint8``, as AdelaiDet's ``.byte()``)."""
    if images_raw.dim() != 4 or images_raw.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images_raw.shape)}")
    pooled = F.avg_pool2d(at_least_float32(images_raw), kernel_size=stride, stride=stride)
    if truncate_to_uint8:
        pooled = pooled.clamp(0.0, 255.0).floor()
    return rgb_to_lab((pooled / 255.0).clamp(0.0, 1.0))


def valid_at_mask_stride(image_valid: Tensor, stride: int, ignore_bottom_px: int = 0) -> Tensor:
    """``[B, H, W]`` validity -> ``[B, H/s, W/s]``, optionally dropping the bottom rows.

    The real image of each batch entry is the top-left region where
    ``image_valid`` is 1; its last ``ignore_bottom_px`` rows become invalid
    before sampling the centre pixel of every ``s x s`` cell.
    """
    valid = image_valid > 0.5
    if ignore_bottom_px > 0:
        real_height = valid.any(dim=2).sum(dim=1)  # [B]
        rows = torch.arange(valid.shape[1], device=valid.device)
        keep_rows = rows[None, :] < (real_height - ignore_bottom_px)[:, None]
        valid = valid & keep_rows[:, :, None]
    start = stride // 2
    return valid[:, start::stride, start::stride].to(torch.float32)


def channel_distance(a: Tensor, b: Tensor) -> Tensor:
    """Euclidean distance over dim 1 of ``a - b``.

    Written out because ``torch.linalg.vector_norm(..., dim=1)`` takes a slow
    path on CPU for these 5-d neighbour stacks (about 80x slower at demo size).
    """
    return (a - b).square().sum(dim=1).sqrt()


def color_similarity(images_lab: Tensor, image_valid: Tensor, kernel: int = 3,
                     dilation: int = 2) -> Tensor:
    """``exp(-||LAB_i - LAB_j|| / 2)`` for every pixel and neighbour: ``[B, K, h, w]``.

    ``image_valid`` ``[B, h, w]`` is at the same (mask) resolution; pairs whose
    neighbour is invalid or outside the map get 0.
    """
    neighbours = unfold_neighbours(images_lab, kernel, dilation)  # [B, 3, K, h, w]
    distance = channel_distance(images_lab.unsqueeze(2), neighbours)
    neighbour_valid = unfold_neighbours(image_valid.unsqueeze(1).to(images_lab.dtype),
                                        kernel, dilation)[:, 0]
    return torch.exp(-0.5 * distance) * neighbour_valid


def batch_color_similarity(images_raw: Tensor, image_valid: Tensor, stride: int,
                           kernel: int = 3, dilation: int = 2, ignore_bottom_px: int = 0,
                           truncate_to_uint8: bool = False) -> Tensor:
    """From the detector's raw images to ``[B, K, H/s, W/s]`` colour similarities.

    Always computed in (at least) float32, also inside a mixed-precision
    forward: under autocast kornia's conversion would run its matrix products
    in float16/bfloat16, and the rounding moves similarities across the
    ``pairwise_color_thresh`` (up to 0.2 off in bfloat16 on the CPU)."""
    with torch.autocast(device_type=images_raw.device.type, enabled=False):
        lab = images_to_lab(images_raw, stride, truncate_to_uint8)
        valid = valid_at_mask_stride(image_valid, stride, ignore_bottom_px).to(lab.dtype)
        return color_similarity(lab, valid, kernel, dilation)
