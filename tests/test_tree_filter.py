"""Tests of the MST tree filter: exactness against an O(N^2) reference, invariants, gradients."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import shortest_path

from baselines.tree_filter import (
    build_tree_schedule,
    filter_along_mst,
    time_tree_filter,
    tree_edge_weights,
    tree_filter,
)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-6,
                 rtol: float = 1e-5) -> None:
    """Element-wise ``|a - e| <= atol + rtol |e|`` (torch.testing's import costs ~2 s)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    excess = (actual - expected).abs() - (atol + rtol * expected.abs())
    assert excess.max().item() <= 0, f"max abs diff {(actual - expected).abs().max().item():.3g}"


def brute_force_filter(features: torch.Tensor, parent: np.ndarray,
                       weights: np.ndarray) -> torch.Tensor:
    """out_i = sum_j S_ij x_j / sum_j S_ij with S_ij the product of edge weights on the path."""
    batch, channels, height, width = features.shape
    n = height * width
    out = torch.empty_like(features)
    for b in range(batch):
        rows, cols, vals = [], [], []
        for v in range(b * n, (b + 1) * n):
            if parent[v] != v:
                rows.append(v - b * n)
                cols.append(parent[v] - b * n)
                vals.append(-np.log(weights[v]) + 1e-300)  # path length in -log w
        tree = coo_matrix((vals, (rows, cols)), shape=(n, n))
        similarity = np.exp(-shortest_path(tree, directed=False))
        x = features[b].reshape(channels, n).numpy()
        filtered = (similarity @ x.T) / similarity.sum(axis=1, keepdims=True)
        out[b] = torch.from_numpy(filtered.T.reshape(channels, height, width))
    return out


def test_schedule_is_a_spanning_tree_of_4_neighbours_per_image():
    torch.manual_seed(0)
    guide = torch.randn(3, 2, 5, 7)
    schedule = build_tree_schedule(guide)
    parent = schedule.parent.numpy()
    n = 5 * 7
    nodes = np.arange(3 * n)
    roots = nodes[parent == nodes]
    assert sorted(roots // n) == [0, 1, 2]  # one root per image
    child = nodes[parent != nodes]
    assert child.size == 3 * (n - 1)  # N - 1 edges per image
    assert np.all(child // n == parent[child] // n)  # never crosses images
    dy = np.abs((child % n) // 7 - (parent[child] % n) // 7)
    dx = np.abs((child % n) % 7 - (parent[child] % n) % 7)
    assert np.all(dy + dx == 1)  # 4-neighbours only
    # levels: parents sit exactly one level above their children
    depth = np.repeat(np.arange(schedule.depth), schedule.level_sizes)
    node_depth = np.empty(3 * n, dtype=int)
    node_depth[schedule.order.numpy()] = depth
    assert np.all(node_depth[child] == node_depth[parent[child]] + 1)


def test_mst_follows_the_guide_and_crosses_a_strong_edge_once():
    guide = torch.zeros(1, 1, 6, 6)
    guide[..., 3:] = 10.0  # two flat halves, a strong vertical edge between columns 2 and 3
    schedule = build_tree_schedule(guide)
    parent = schedule.parent.numpy()
    nodes = np.arange(36)
    child = nodes[parent != nodes]
    crossing = ((child % 6) < 3) != ((parent[child] % 6) < 3)
    assert crossing.sum() == 1


def test_filter_equals_brute_force_reference():
    torch.manual_seed(1)
    guide = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    features = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    schedule = build_tree_schedule(guide)
    weights = tree_edge_weights(guide, schedule, sigma=0.7)
    out = tree_filter(features, schedule, weights)
    reference = brute_force_filter(features, schedule.parent.numpy(), weights.numpy())
    assert_close(out, reference, atol=1e-12, rtol=1e-10)


def test_filter_preserves_constants():
    torch.manual_seed(2)
    guide = torch.randn(2, 5, 9, 11)
    constant = torch.full((2, 4, 9, 11), 3.25)
    out = filter_along_mst(constant, guide)
    assert_close(out, constant)


def test_filter_averages_each_flat_region_and_stops_at_the_edge():
    guide = torch.zeros(1, 1, 6, 6, dtype=torch.float64)
    guide[..., 3:] = 10.0  # exp(-100) across the edge: no leakage worth measuring
    torch.manual_seed(3)
    features = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    out = filter_along_mst(features, guide)
    left_mean = features[..., :3].mean(dim=(2, 3), keepdim=True)
    right_mean = features[..., 3:].mean(dim=(2, 3), keepdim=True)
    assert_close(out[..., :3], left_mean.expand(-1, -1, 6, 3), atol=1e-12, rtol=0)
    assert_close(out[..., 3:], right_mean.expand(-1, -1, 6, 3), atol=1e-12, rtol=0)


def test_gradcheck_features_and_edge_weights():
    torch.manual_seed(4)
    guide = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    schedule = build_tree_schedule(guide)
    features = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(9, dtype=torch.float64).mul(0.8).add(0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda f, w: tree_filter(f, schedule, w), (features, weights))
    embed = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda f, e: tree_filter(f, schedule, tree_edge_weights(e, schedule, sigma=2.0)),
        (features, embed))


def _stitched_single_image_schedules(guide: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Depth and global parent of every node, each image's tree built on its own (batch of 1)."""
    depth, parent = [], []
    n = guide.shape[-2] * guide.shape[-1]
    for b in range(guide.shape[0]):
        single = build_tree_schedule(guide[b:b + 1])
        levels = np.repeat(np.arange(single.depth), single.level_sizes)
        node_depth = np.empty(n, dtype=np.int64)
        node_depth[single.order.numpy()] = levels
        depth.append(node_depth)
        parent.append(single.parent.numpy() + b * n)
    return np.concatenate(depth), np.concatenate(parent)


@pytest.mark.parametrize("values", ["ties", "normal"])
def test_batched_build_gives_each_image_the_tree_it_gets_alone(values):
    """All images share one MST call; with many equal edge weights (flat colours) the forest
    must still hold exactly the tree, root and BFS levels each image gets on its own."""
    rng = np.random.default_rng(3)
    shape = (6, 3, 13, 17)
    raw = rng.integers(0, 3, size=shape) if values == "ties" else rng.standard_normal(shape)
    guide = torch.from_numpy(raw.astype(np.float32))
    batched = build_tree_schedule(guide)
    depth, parent = _stitched_single_image_schedules(guide)
    assert np.array_equal(batched.parent.numpy(), parent)
    levels = np.repeat(np.arange(batched.depth), batched.level_sizes)
    batched_depth = np.empty_like(depth)
    batched_depth[batched.order.numpy()] = levels
    assert np.array_equal(batched_depth, depth)
    # level order: by depth, then node id (the filter's summation order depends on it)
    order = batched.order.numpy()
    assert np.array_equal(order, np.lexsort((np.arange(depth.size), depth)))


def test_build_searches_roots_in_chunks_when_the_table_would_be_large(monkeypatch):
    """A batch too large for one multi-root search table is searched a few roots at a time."""
    import baselines.tree_filter as tf

    guide = torch.from_numpy(np.random.default_rng(4).integers(0, 3, size=(5, 2, 9, 11)).astype(np.float32))
    whole = build_tree_schedule(guide)
    monkeypatch.setattr(tf, "SEARCH_TABLE_ENTRIES", 2 * 5 * 9 * 11)  # two roots per search
    chunked = build_tree_schedule(guide)
    for field in ("order", "inverse", "parent", "parent_index"):
        assert torch.equal(getattr(whole, field), getattr(chunked, field))
    assert whole.level_sizes == chunked.level_sizes


def test_single_row_and_single_pixel_grids():
    row = torch.arange(5, dtype=torch.float64).reshape(1, 1, 1, 5)
    assert build_tree_schedule(row).depth == 3  # rooted at the middle pixel, not an end
    out = filter_along_mst(row, row)
    weights = np.exp(-1.0)  # neighbours differ by 1 -> w = e^-1 on every edge
    expected = []
    for i in range(5):
        s = np.array([weights ** abs(i - j) for j in range(5)])
        expected.append((s * np.arange(5)).sum() / s.sum())
    assert_close(out.flatten(), torch.tensor(expected, dtype=torch.float64))
    pixel = torch.tensor([[[[7.0]]]])
    assert_close(filter_along_mst(pixel, pixel), pixel)


def test_rejects_mismatched_shapes():
    schedule = build_tree_schedule(torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError):
        tree_filter(torch.zeros(1, 1, 4, 5), schedule, torch.ones(16))


def test_cost_report_of_a_stride4_grid_of_a_128px_batch():
    """time_tree_filter (the bench's row) reports every phase of a demo-sized batch; speed lives in the bench."""
    cost = time_tree_filter(32, 32, channels=8, batch=4)
    assert cost["nodes"] == 4 * 32 * 32
    assert 1 <= cost["depth"] <= 32 * 32
    assert all(cost[k] >= 0.0 for k in ("build_s", "forward_s", "backward_s"))
