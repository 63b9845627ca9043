"""Training and test transforms: multi-scale resize of the short side, flip.

These are the augmentations BoxInst, BoxLevelSet and SIM train with (short
side drawn from a list, long side capped, horizontal flip), applied the same
way for every method so that only the mask supervision differs.

Random choices are drawn first (:func:`sample_params`) from an explicit
``torch.Generator`` and then applied (:func:`apply_transform`), so a sample is
reproducible from its generator state alone and other code (copy-paste,
tests) can apply exactly the same geometry.

Resizing: the image with ``torchvision``'s antialiased bilinear resize on
uint8, masks with ``nearest-exact`` interpolation (pixel-centre aligned, as
PIL's nearest; plain ``nearest`` shifts masks by up to half a source pixel),
boxes scaled per axis by the ratio of the integer output size to the input.
Test time uses the largest short side and no flip.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF


@dataclass(frozen=True)
class TransformParams:
    """Output size ``(height, width)`` and whether to flip horizontally."""

    height: int
    width: int
    flip: bool


def resized_shape(height: int, width: int, short_side: int, max_size: int) -> tuple[int, int]:
    """Scale so the short side is ``short_side`` unless the long side would exceed ``max_size``."""
    scale = short_side / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def check_transform_settings(sizes: list[int], max_size: int, flip_prob: float) -> None:
    if not sizes or any(int(s) != s or s <= 0 for s in sizes):
        raise ValueError(f"sizes must be a non-empty list of positive integers, got {sizes!r}")
    if max_size <= 0:
        raise ValueError(f"max_size must be positive, got {max_size!r}")
    if not 0.0 <= flip_prob <= 1.0:
        raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob!r}")


def sample_params(
    height: int,
    width: int,
    train: bool,
    sizes: list[int],
    max_size: int,
    flip_prob: float,
    generator: torch.Generator | None = None,
) -> TransformParams:
    """Draw the short side (uniform over ``sizes``) and the flip, or the test setting."""
    if not train:
        out_h, out_w = resized_shape(height, width, max(sizes), max_size)
        return TransformParams(out_h, out_w, False)
    short = sizes[int(torch.randint(len(sizes), (1,), generator=generator))]
    flip = bool(torch.rand((), generator=generator) < flip_prob)
    out_h, out_w = resized_shape(height, width, short, max_size)
    return TransformParams(out_h, out_w, flip)


def apply_transform(
    image: torch.Tensor,
    boxes: torch.Tensor,
    masks: torch.Tensor,
    params: TransformParams,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Resize (and flip) a uint8 ``[3, h, w]`` image, xyxy ``[N, 4]`` boxes and ``[N, h, w]`` masks."""
    height, width = image.shape[-2:]
    size = [params.height, params.width]
    if (params.height, params.width) != (height, width):
        image = TF.resize(image, size, antialias=True)
        if masks.shape[0]:
            masks = F.interpolate(masks[None], size=size, mode="nearest-exact")[0]
        else:
            masks = masks.new_zeros((0, params.height, params.width))
        scale = torch.tensor(
            [params.width / width, params.height / height] * 2, dtype=boxes.dtype, device=boxes.device
        )
        boxes = boxes * scale
    if params.flip:
        image = image.flip(-1)
        masks = masks.flip(-1)
        boxes = torch.stack(
            [params.width - boxes[:, 2], boxes[:, 1], params.width - boxes[:, 0], boxes[:, 3]], dim=1
        )
    return image, boxes, masks
