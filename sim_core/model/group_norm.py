"""GroupNorm that normalises in float32 under mixed precision, on every device.

CUDA autocast runs ``group_norm`` in float32 (it is on autocast's float32
list), so the papers' float16 training normalised in float32. CPU autocast
does not list it: a bfloat16 input stays bfloat16, and torch's CPU kernel for a
bfloat16 channels-last input (the detector's layout) is 5-13x slower than the
float32 one (forward + backward, demo shapes, measured on an AMX Xeon;
``docs/demo_scale.md``). Normalising ``x.float()`` gives the CPU what CUDA
does: float32 statistics and output, whatever the input's type; the next
convolution casts back to the autocast type.

In float32 (no autocast) this is ``nn.GroupNorm`` bit for bit, and in float64
(the cross-check's reference pass, ``baselines/crosscheck.py``) it stays
float64: only half-precision inputs are widened (:func:`at_least_float32`).
Parameters and state-dict keys are ``nn.GroupNorm``'s, so checkpoints load
either way.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from sim_core.model.precision import at_least_float32


class GroupNorm32(nn.GroupNorm):
    """``nn.GroupNorm`` computed on the input widened to at least float32 (see the module docstring)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(at_least_float32(x), self.num_groups, self.weight, self.bias, self.eps)
