"""Full precision where it matters, without rounding a float64 pass down.

Losses and norms compute in float32 under mixed precision (sums over
thousands of pixels overflow float16; CPU bfloat16 GroupNorm is slow). The
cross-check against the original code (``baselines/crosscheck.py``) runs the
same modules in float64 to measure float32's own rounding; ``x.float()`` there
would quietly round that reference to float32 (or, next to float64 weights,
fail). :func:`at_least_float32` widens half types only.
"""
from __future__ import annotations

import torch
from torch import Tensor

HALF_TYPES = (torch.float16, torch.bfloat16)


def at_least_float32(x: Tensor) -> Tensor:
    """``x`` in float32 when it is float16/bfloat16, else unchanged (float32 and float64 stay as they are)."""
    return x.float() if x.dtype in HALF_TYPES else x
