"""The tree filter's pointer-jumping passes equal the level-by-level version.

``tree_filter`` runs the leaf-to-root and root-to-leaf passes by pointer
jumping (``ceil(log2 depth)`` doubling steps over all nodes) without
autograd and supplies the gradient itself (:class:`_TreePasses`);
``tree_filter_reference`` is the straightforward per-level version (one
step per BFS level, autograd through every level; kept in
``baselines/tree_filter.py``, restated here in :func:`per_level_filter`).
Outputs must match to rounding in float64 and float32, gradients w.r.t. the
features and the edge weights too, also on chain-like trees deeper than
500 levels whose path products underflow; and the number of tensor
operations of a filter call must grow with ``log2`` of the depth only.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


def test_jump_tables_are_the_power_of_two_ancestors():
    g = torch.Generator().manual_seed(8)
    schedule = build_tree_schedule(torch.randn(2, 3, 11, 13, generator=g))
    parent = schedule.parent.numpy()
    assert len(schedule.jumps) == (schedule.depth - 1).bit_length()  # 2^K >= number of levels
    ancestor = np.arange(parent.size)
    for k, jump in enumerate(schedule.jumps):
        for _ in range(2 ** k - (2 ** (k - 1) if k else 0)):
            ancestor = parent[ancestor]  # 2^k steps up in all (a root stays put)
        assert np.array_equal(jump.numpy(), ancestor)
    assert torch.equal(schedule.roots.sort().values, torch.nonzero(schedule.parent == torch.arange(parent.size)).flatten())


def test_schedule_without_jump_tables_derives_them():
    g = torch.Generator().manual_seed(9)
    guide = torch.randn(2, 3, 9, 10, generator=g, dtype=torch.float64)
    features = torch.randn(2, 2, 9, 10, generator=g, dtype=torch.float64)
    schedule = build_tree_schedule(guide)
    bare = dataclasses.replace(schedule, roots=None, jumps=None)
    weights = tree_edge_weights(guide, schedule, 2.0)
    assert torch.equal(tree_filter(features, bare, weights), tree_filter(features, schedule, weights))


def snake_guide(batch: int, height: int, width: int, noise: float = 0.0, seed: int = 0) -> torch.Tensor:
    """A guide rising by 1 along a serpentine path through the grid, so its MST is that path.

    Every other 4-neighbour differs by more than 1 (rows run in alternate
    directions), so the tree is a chain of ``height * width`` nodes, depth
    about half of that from its centre; ``noise`` (< 0.5) in ``[0, noise)``
    reorders near-equal edges and branches the chain here and there.
    """
    path = torch.arange(height * width).reshape(height, width)
    path[1::2] = path[1::2].flip(1)
    guide = path.double().expand(batch, 1, height, width).clone()
    g = torch.Generator().manual_seed(seed)
    return guide + noise * torch.rand(guide.shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("noise", [0.0, 0.45])
@pytest.mark.parametrize("regime", ["near_one", "long_products_underflow", "tiny"])
def test_deep_chain_like_trees_agree_in_float64_and_float32(regime, noise):
    """Depth > 500: weights near 1 (long-range sums), ~0.8 (a path product underflows float32
    after ~400 edges and float64 after ~3000) and ~1e-18 (every product of two underflows)."""
    height, width = 24, 48
    guide = snake_guide(2, height, width, noise)
    schedule = build_tree_schedule(guide)
    assert schedule.depth > 500
    scale = {"near_one": 0.02, "long_products_underflow": 0.2, "tiny": 1.0}[regime]
    g = torch.Generator().manual_seed(12)
    embed = torch.randn(2, 3, height, width, generator=g, dtype=torch.float64) * scale
    features = torch.randn(2, 4, height, width, generator=g, dtype=torch.float64)
    upstream = torch.randn(2, 4, height, width, generator=g, dtype=torch.float64)
    results = {}
    for name, fn, dtype in (("truth", per_level_filter, torch.float64), ("new64", tree_filter, torch.float64),
                            ("new32", tree_filter, torch.float32), ("old32", per_level_filter, torch.float32)):
        f = features.to(dtype, copy=True).requires_grad_()
        e = embed.to(dtype, copy=True).requires_grad_()
        out = fn(f, schedule, tree_edge_weights(e, schedule))
        (out * upstream.to(dtype)).sum().backward()
        results[name] = [t.double() for t in (out.detach(), f.grad, e.grad)]
    if regime == "long_products_underflow":
        weights = tree_edge_weights(embed, schedule).float()
        assert weights.median() ** 1000 == 0.0  # products along the chain do underflow in float32
    for name, rtol in (("new64", 1e-10), ("new32", 1e-5)):
        for got, truth in zip(results[name], results["truth"]):
            error = ((got - truth).abs().max() / truth.abs().max()).item()
            assert error < rtol, (name, error)
    # float32: no less accurate than the level-by-level form
    for got, old, truth in zip(results["new32"], results["old32"], results["truth"]):
        scale = truth.abs().max()
        assert (got - truth).abs().max() / scale <= 2 * (old - truth).abs().max() / scale + 1e-7


class CountAten(TorchDispatchMode):
    """ATen operators run (each one kernel launch or less): forward and autograd's backward alike."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def operations_per_call(fn, schedule, features, embed) -> int:
    """ATen operators of one filter call, forward and backward (features and edge weights)."""
    f = features.clone().requires_grad_()
    w = tree_edge_weights(embed, schedule).detach().requires_grad_()
    with CountAten() as counter:
        fn(f, schedule, w).sum().backward()
    return counter.count


def test_operation_count_grows_with_log_depth_only():
    """Chains of depth ~50 and ~1150 (K = 6 and 11 doubling steps; 11 is also the step count of
    a 200 x 336 COCO grid): the count grows by a few operations per step and stays under 200.
    The level-by-level reference's count, on chains of depth ~50 and ~200, grows with the depth
    (the counter does see loops)."""
    g = torch.Generator().manual_seed(13)

    def counts(fn, height, width):
        schedule = build_tree_schedule(snake_guide(2, height, width))
        features = torch.rand(2, 5, height, width, generator=g)
        embed = torch.randn(2, 3, height, width, generator=g) * 0.1
        return operations_per_call(fn, schedule, features, embed), len(schedule.jumps)

    (shallow, shallow_steps), (deep, deep_steps) = counts(tree_filter, 4, 25), counts(tree_filter, 48, 48)
    assert (shallow_steps, deep_steps) == (6, 11)
    assert deep <= 200
    assert deep - shallow <= 12 * (deep_steps - shallow_steps)  # ~10 per step: 4 passes + products
    (reference_shallow, _), (reference_deep, _) = counts(per_level_filter, 4, 25), counts(per_level_filter, 16, 25)
    assert reference_deep > 3 * reference_shallow > 3 * deep
