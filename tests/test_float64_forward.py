"""simbench's detector and BoxInst loss run wholly in float64 when the model is float64.

The same-weights cross-check against AdelaiDet (``baselines/crosscheck.py``)
measures simbench's own float32 rounding with a float64 forward and backward
(``simbench_side(..., dtype=torch.float64)``). A module that casts to float32
inside (a norm, a loss) either breaks that pass or silently rounds it to
float32; both cost the cross-check its meaning. This runs the very function
the cross-check runs, for every norm choice and both stride-4 mask inputs.
"""
from __future__ import annotations

import copy

import pytest
import torch

from baselines.crosscheck import crosscheck_batch, simbench_side
from sim_core.config import resolve_run
from sim_core.model.condinst import CondInst

NORMS = [  # (tiny_norm, head_norm, mask_branch_norm)
    ("GN", "GN", "GN"),
    ("BN", "GN", "BN"),
    ("GN", "none", "none"),
]


@pytest.mark.parametrize("stride4_input", ["c2", "p2"])
@pytest.mark.parametrize("norms", NORMS, ids=["-".join(n) for n in NORMS])
def test_float64_forward_and_backward_stays_float64(smoke_params, norms, stride4_input, monkeypatch):
    loss_types: dict[str, torch.dtype] = {}
    forward = CondInst.training_losses

    def recording(self, *args, **kwargs):  # every loss term's dtype, before simbench_side reads it out
        losses = forward(self, *args, **kwargs)
        loss_types.update({name: value.dtype for name, value in losses.items()})
        return losses

    monkeypatch.setattr(CondInst, "training_losses", recording)
    params = copy.deepcopy(smoke_params)
    tiny, head, branch = norms
    params["model"].update(tiny_norm=tiny, head_norm=head, mask_branch_norm=branch,
                           mask_stride4_input=stride4_input, mask_feat_stride=4)
    resolved = resolve_run(params, "boxinst_s0")
    images, targets = crosscheck_batch(resolved, 2)
    torch.manual_seed(0)
    classes = int(resolved["synthetic"]["num_classes"])
    state = CondInst(classes, resolved["model"]).state_dict()
    iteration = int(resolved["train"]["max_iter"]) - 1  # pairwise term ramped in
    losses, grads = simbench_side(resolved, classes, state, images, targets, iteration, dtype=torch.float64)
    assert {"loss_proj", "loss_pairwise", "loss_cls"} <= set(losses)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses
    assert all(t == torch.float64 for t in loss_types.values()), loss_types  # no term rounded to float32
    assert grads and all(g.dtype == torch.float64 for g in grads.values()), \
        sorted(n for n, g in grads.items() if g.dtype != torch.float64)
    # and float64 really is more than float32 rounded: the float32 pass differs in the last bits
    single, _ = simbench_side(resolved, classes, state, images, targets, iteration, dtype=torch.float32)
    assert any(abs(single[k] - losses[k]) > 0 for k in losses)
    assert all(abs(single[k] - losses[k]) <= 1e-4 * max(1.0, abs(losses[k])) for k in losses)
