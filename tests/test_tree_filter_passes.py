"""The tree filter's two passes as one autograd node equal the per-level autograd version.

``tree_filter`` runs the leaf-to-root and root-to-leaf passes without
autograd and supplies the gradient itself (:class:`_TreePasses`);
``tree_filter_reference`` is the straightforward per-level version it
replaced (kept in ``baselines/tree_filter.py``, restated here in
:func:`per_level_filter`). Outputs must match exactly in float64 and to
rounding in float32, gradients w.r.t. the features and the edge weights too.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from baselines.tree_filter import (build_tree_schedule, tree_edge_weights, tree_filter,
                                   tree_filter_reference)


def per_level_filter(features, schedule, edge_weights):
    """The filter as written before the change (autograd through every level)."""
    batch, channels, height, width = features.shape
    nodes = features.permute(0, 2, 3, 1).reshape(-1, channels)
    values = torch.cat([nodes, torch.ones_like(nodes[:, :1])], dim=1)[schedule.order]
    weights = edge_weights.to(values.dtype)[schedule.order]
    x_levels = list(torch.split(values, schedule.level_sizes))
    w_levels = list(torch.split(weights, schedule.level_sizes))
    depth = schedule.depth
    aggregated = [x_levels[-1]] * depth
    for d in range(depth - 1, 0, -1):
        aggregated[d - 1] = x_levels[d - 1].index_add(0, schedule.parent_pos[d], w_levels[d].unsqueeze(1) * aggregated[d])
    full = [aggregated[0]]
    for d in range(1, depth):
        w = w_levels[d].unsqueeze(1)
        full.append(w * full[d - 1][schedule.parent_pos[d]] + (1.0 - w * w) * aggregated[d])
    out = torch.cat(full, dim=0)[schedule.inverse]
    out = out[:, :channels] / out[:, channels:]
    return out.reshape(batch, height, width, channels).permute(0, 3, 1, 2)


def compare(features, guide, sigma=1.0, dtype=torch.float64, rtol=1e-10, grad_rtol=None, embed_grad=True):
    grad_rtol = rtol if grad_rtol is None else grad_rtol
    schedule = build_tree_schedule(guide)
    g = torch.Generator().manual_seed(7)
    upstream = torch.randn(features.shape, generator=g, dtype=dtype)
    results = []
    for fn in (tree_filter, per_level_filter, tree_filter_reference):
        f = features.to(dtype).clone().requires_grad_()
        e = guide.to(dtype).clone().requires_grad_(embed_grad)
        out = fn(f, schedule, tree_edge_weights(e, schedule, sigma))
        (out * upstream).sum().backward()
        results.append((out.detach(), f.grad, e.grad))
    (out, gf, ge), others = results[0], results[1:]
    for ref_out, ref_gf, ref_ge in others:
        assert torch.allclose(out, ref_out, rtol=rtol, atol=rtol * ref_out.abs().max().item())
        assert torch.allclose(gf, ref_gf, rtol=grad_rtol, atol=grad_rtol * ref_gf.abs().max().item())
        if embed_grad:
            # a one-node tree never reads its weight: no gradient (None) or a zero one
            ge = torch.zeros_like(guide, dtype=dtype) if ge is None else ge
            ref_ge = torch.zeros_like(guide, dtype=dtype) if ref_ge is None else ref_ge
            assert torch.allclose(ge, ref_ge, rtol=grad_rtol, atol=grad_rtol * ref_ge.abs().max().item())
        else:
            assert ge is None and ref_ge is None
    return schedule, out


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("shape", [(1, 4, 5, 7), (3, 2, 9, 6), (2, 6, 16, 16)])
def test_random_maps_float64(seed, shape):
    g = torch.Generator().manual_seed(seed)
    batch, channels, height, width = shape
    features = torch.randn(batch, channels, height, width, generator=g, dtype=torch.float64)
    guide = torch.randn(batch, 3, height, width, generator=g, dtype=torch.float64)
    compare(features, guide, sigma=2.0)


def test_tie_heavy_guide_and_separate_embedding():
    g = torch.Generator().manual_seed(3)
    guide = torch.randint(0, 3, (2, 1, 12, 10), generator=g).double()  # many equal edge weights
    features = torch.rand(2, 3, 12, 10, generator=g, dtype=torch.float64)
    compare(features, guide, sigma=0.5)


def test_float32_demo_sized_maps_agree_to_rounding():
    # the BoxLevelSet demo size: 8 images of 32 x 32, 32 channels
    g = torch.Generator().manual_seed(5)
    guide = torch.randn(8, 5, 32, 32, generator=g)
    features = torch.rand(8, 32, 32, 32, generator=g)
    schedule, out = compare(features, guide, dtype=torch.float32, rtol=1e-6, grad_rtol=1e-6, embed_grad=False)
    assert schedule.depth > 20
    # the forward is the same arithmetic in the same order: bitwise equal
    weights = tree_edge_weights(guide, schedule)
    assert torch.equal(tree_filter(features, schedule, weights), tree_filter_reference(features, schedule, weights))


def test_float32_weight_gradient_is_as_accurate_as_before():
    """Through the edge weights, float32 gradients of a deep tree differ from float64 by ~1e-5
    in either version (sums of cancelling terms); the new one must not be less accurate."""
    g = torch.Generator().manual_seed(6)
    guide = torch.randn(4, 5, 32, 32, generator=g, dtype=torch.float64)
    features = torch.rand(4, 8, 32, 32, generator=g, dtype=torch.float64)
    schedule = build_tree_schedule(guide)
    upstream = torch.randn(features.shape, generator=g, dtype=torch.float64)
    grads = {}
    for name, fn, dtype in (("truth", per_level_filter, torch.float64), ("new", tree_filter, torch.float32),
                            ("old", per_level_filter, torch.float32)):
        e = guide.to(dtype).clone().requires_grad_()
        (fn(features.to(dtype), schedule, tree_edge_weights(e, schedule)) * upstream.to(dtype)).sum().backward()
        grads[name] = e.grad.double()
    scale = grads["truth"].abs().max()
    err_new = ((grads["new"] - grads["truth"]).abs().max() / scale).item()
    err_old = ((grads["old"] - grads["truth"]).abs().max() / scale).item()
    assert err_new < 1e-4 and err_new <= 2 * err_old + 1e-7, (err_new, err_old)


@pytest.mark.parametrize("case", ["one_pixel", "one_row", "one_image_one_channel", "constant_guide",
                                  "zero_features", "tiny_weights"])
def test_edge_cases(case):
    g = torch.Generator().manual_seed(11)
    shape = {"one_pixel": (2, 3, 1, 1), "one_row": (1, 2, 1, 9), "one_image_one_channel": (1, 1, 7, 7)}.get(case, (2, 2, 6, 5))
    features = torch.randn(*shape, generator=g, dtype=torch.float64)
    guide = torch.randn(shape[0], 2, *shape[2:], generator=g, dtype=torch.float64)
    sigma = 1.0
    if case == "constant_guide":
        guide = torch.zeros_like(guide)  # every weight 1: every output is the image mean
    elif case == "zero_features":
        features = torch.zeros_like(features)
    elif case == "tiny_weights":
        sigma = 1e-3  # weights ~0: the filter is nearly the identity
    schedule, out = compare(features, guide, sigma=sigma)
    if case == "constant_guide":
        assert torch.allclose(out, features.mean(dim=(2, 3), keepdim=True).expand_as(out))
    if case == "one_pixel":
        assert torch.allclose(out, features)


def test_gradcheck_of_the_written_out_backward():
    g = torch.Generator().manual_seed(2)
    guide = torch.randn(2, 2, 5, 4, generator=g, dtype=torch.float64)
    schedule = build_tree_schedule(guide)
    features = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weights = (torch.rand(40, generator=g, dtype=torch.float64) * 0.9 + 0.05).requires_grad_()
    assert torch.autograd.gradcheck(lambda f, w: tree_filter(f, schedule, w), (features, weights))


def test_schedule_parent_index_matches_parents():
    g = torch.Generator().manual_seed(4)
    schedule = build_tree_schedule(torch.randn(3, 2, 8, 9, generator=g))
    order = schedule.order
    assert torch.equal(order[schedule.parent_index], schedule.parent[order])
    starts = np.concatenate([[0], np.cumsum(schedule.level_sizes)])
    for d in range(1, schedule.depth):
        level = order[starts[d]:starts[d + 1]]
        parents_level = order[starts[d - 1]:starts[d]]
        assert torch.equal(parents_level[schedule.parent_pos[d]], schedule.parent[level])
