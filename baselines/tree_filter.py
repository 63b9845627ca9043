"""Learnable tree filter (Song et al., NeurIPS 2019) in pure PyTorch.

BoxLevelSet enhances the inputs of its feature level-set term with this
filter. The idea: connect the pixels of each image into a 4-connected grid,
keep the minimum spanning tree (MST) of the grid under a feature
dissimilarity, and let every node aggregate *all* nodes of its tree,

    out_i = sum_j S(i, j) x_j / sum_j S(i, j),
    S(i, j) = prod_{edges e on the tree path i..j} w_e,
    w_e = exp(-||g_u - g_v||^2 / sigma)          (e = (u, v)),

i.e. ``S = exp(-distance along the tree path)``. Because the path between two
pixels of the same region never crosses a strong edge, the filter smooths
within regions and stops at boundaries, over any range.

Why this file is written the way it is:

* The tree is not differentiated (an MST is piecewise constant in its
  weights), so it is built on the CPU with
  :func:`scipy.sparse.csgraph.minimum_spanning_tree` on the squared distance
  of a *guide* map plus 1 (the +1 keeps zero-distance edges as stored edges,
  as the original CUDA code does): one call for the block-diagonal graph of
  the whole batch, which gives each image the tree it gets alone, since
  scipy's per-call checks, not the graph, cost most at demo size.
* The edge weights ``w_e`` are a differentiable function of an *embedding*
  map (often the guide itself), and the filter is differentiable w.r.t. both
  the features and the weights.
* ``sum_j S(i, j) x_j`` for all ``i`` costs O(N) with two passes over the
  tree: leaf-to-root aggregation ``A_v = x_v + sum_{c child of v} w_c A_c``
  and root-to-leaf propagation ``F_root = A_root``,
  ``F_v = w_v F_parent + (1 - w_v^2) A_v``. The normaliser is the same
  computation on a map of ones, so a constant map is returned unchanged.
* The passes run by pointer jumping (doubling), not level by level: with
  ``anc_k(v)`` the ancestor ``2^k`` edges above ``v`` and ``p_k(v)`` the
  product of the ``2^k`` weights on that path (``0`` where the path would
  pass the root: the root's weight is taken as ``0``), ``K = ceil(log2
  depth)`` steps of ``A(anc_k(y)) += p_k(y) A(y)`` (one scatter-add over all
  nodes; afterwards ``A`` holds the sums over descendants less than
  ``2^(k+1)`` edges below) give the leaf-to-root pass, and ``K`` steps of
  ``F(v) += p_k(v) F(anc_k(v))`` (one gather) the root-to-leaf pass, for all
  nodes of all images at once. A filter call is a fixed number of tensor
  operations per step: at 800 x 1344 input (a 200 x 336 grid, depth
  ~1000-1200, ``K = 11``) 82 ATen operators forward and 75 backward,
  where one or a few per level made ~5,900 each way (GPU launch-bound).
  The price is ``O(N K)`` instead of ``O(N)`` arithmetic: on the CPU about
  1.2-2x the previous time at that size, the same or less at demo size
  (``experiments/tree_filter_bench.py``). The path products only multiply
  weights in ``[0, 1]``: a product that underflows drops a term smaller
  than ``1e-38`` times a partial sum, next to a normaliser ``>= 1``;
  nothing is divided by a product. The ancestor tables ``anc_k`` are
  integer bookkeeping of the tree, built with it. Rooting each tree at its
  centre (middle of a longest path) halves the depth.
  ``tree_filter_reference`` is the level-by-level form (one step per BFS
  level, autograd through each), kept as the reference the tests compare
  with.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse import coo_matrix, csr_matrix
from scipy.sparse.csgraph import breadth_first_order, minimum_spanning_tree, shortest_path
from torch import Tensor

__all__ = [
    "TreeSchedule",
    "build_tree_schedule",
    "tree_edge_weights",
    "tree_filter",
    "tree_filter_reference",
    "filter_along_mst",
    "time_tree_filter",
]


# entries of one multi-root shortest-path table in build_tree_schedule (float64 + int32: ~200 MB)
SEARCH_TABLE_ENTRIES = 1 << 24


@dataclass(frozen=True)
class TreeSchedule:
    """A spanning forest of ``B`` grids of ``H x W`` nodes, ordered by BFS depth.

    Node ids are global: ``b * H * W + y * W + x``. ``order`` lists the node
    ids level by level (roots first); ``level_sizes[d]`` nodes sit at depth
    ``d``. ``parent_pos[d]`` (for ``d >= 1``) holds, for every node of level
    ``d``, the position of its parent inside level ``d - 1``. ``parent`` is
    the parent id of every node (a root is its own parent) and ``inverse`` is
    the position of each node id inside ``order``. ``parent_index`` is, for
    every position of ``order``, the position of that node's parent in
    ``order`` (a root points at itself). ``roots`` lists the root ids and
    ``jumps[k]`` is, for every node id, the id of its ancestor ``2^k`` edges
    up (the root where the path is shorter), ``k = 0 .. ceil(log2 depth) - 1``
    (:func:`tree_filter`'s pointer jumping); both are derived from ``parent``
    when absent.
    """

    shape: tuple[int, int, int]
    order: Tensor
    inverse: Tensor
    parent: Tensor
    level_sizes: list[int]
    parent_pos: list[Tensor]
    parent_index: Tensor | None = None
    roots: Tensor | None = None
    jumps: tuple[Tensor, ...] | None = None

    @property
    def num_nodes(self) -> int:
        return int(self.order.numel())

    @property
    def depth(self) -> int:
        return len(self.level_sizes)


def grid_edge_distances(guide: Tensor) -> tuple[Tensor, Tensor]:
    """Squared L2 distances between 4-neighbours: ``([B,H-1,W], [B,H,W-1])``."""
    vertical = (guide[:, :, 1:, :] - guide[:, :, :-1, :]).pow(2).sum(dim=1)
    horizontal = (guide[:, :, :, 1:] - guide[:, :, :, :-1]).pow(2).sum(dim=1)
    return vertical, horizontal


def _grid_forest(vertical: np.ndarray, horizontal: np.ndarray) -> "csr_matrix":
    """Symmetric adjacency of the MST of each of ``B`` ``H x W`` grids (weights = distance + 1).

    ``vertical`` ``[B, H-1, W]``, ``horizontal`` ``[B, H, W-1]``. One
    :func:`minimum_spanning_tree` call on the block-diagonal graph of all
    images (the spanning forest of disjoint grids is the union of their
    MSTs): the per-call cost of scipy's sparse checks, not the graph size,
    dominated when it ran once per image.
    """
    batch, height, width = horizontal.shape[0], horizontal.shape[1], vertical.shape[2]
    ids = np.arange(batch * height * width).reshape(batch, height, width)
    rows = np.concatenate([ids[:, :-1, :].reshape(batch, -1), ids[:, :, :-1].reshape(batch, -1)], axis=1)
    cols = np.concatenate([ids[:, 1:, :].reshape(batch, -1), ids[:, :, 1:].reshape(batch, -1)], axis=1)
    weights = np.concatenate([vertical.reshape(batch, -1), horizontal.reshape(batch, -1)], axis=1) + 1.0
    graph = coo_matrix((weights.ravel(), (rows.ravel(), cols.ravel())), shape=(ids.size,) * 2).tocsr()
    tree = minimum_spanning_tree(graph)
    return (tree + tree.T).tocsr()


def _centre_root(forest, start: int) -> int:
    """The middle node of a longest path of ``start``'s tree: rooting there minimises its height.

    The last node of a breadth-first order is a farthest node; two searches
    give the two ends of a longest path (exact on trees). The forest is
    stored symmetric, so a directed search follows every edge both ways, in
    the order an undirected one does, without scipy transposing the graph
    for every call.
    """
    far = int(breadth_first_order(forest, start, directed=True, return_predecessors=False)[-1])
    order, pred = breadth_first_order(forest, far, directed=True, return_predecessors=True)
    path = [int(order[-1])]
    while path[-1] != far:
        path.append(int(pred[path[-1]]))
    return path[len(path) // 2]


@torch.no_grad()
def build_tree_schedule(guide: Tensor) -> TreeSchedule:
    """MST of every image's 4-connected grid under ``||guide_u - guide_v||^2``.

    ``guide`` is ``[B, C, H, W]``; the tree depends on its values only (no
    gradient). Returns the BFS level schedule used by :func:`tree_filter`.
    All images share one sparse graph (:func:`_grid_forest`) and its
    shortest-path searches run from many roots per call; only the root
    choice runs per image.
    """
    if guide.dim() != 4:
        raise ValueError(f"guide must be [B, C, H, W], got {tuple(guide.shape)}")
    batch, _, height, width = guide.shape
    per_image = height * width
    offsets = np.arange(batch, dtype=np.int64) * per_image
    if per_image == 1:
        depth_all = np.zeros(batch, dtype=np.int64)
        parent_all = offsets.copy()
    else:
        vertical, horizontal = grid_edge_distances(guide.detach().double().cpu())
        forest = _grid_forest(vertical.numpy(), horizontal.numpy())
        roots = np.array([_centre_root(forest, int(start)) for start in offsets])
        depth_all = np.empty(batch * per_image, dtype=np.int64)
        parent_all = np.empty(batch * per_image, dtype=np.int64)
        # one search from several roots returns a [roots, B*H*W] table: bound its size
        chunk = max(1, SEARCH_TABLE_ENTRIES // (batch * per_image))
        for first in range(0, batch, chunk):
            picked = roots[first:first + chunk]
            hops, pred = shortest_path(forest, directed=True, unweighted=True, indices=picked,
                                       return_predecessors=True)
            for row, b in enumerate(range(first, first + len(picked))):
                block = slice(b * per_image, (b + 1) * per_image)
                depth_all[block] = hops[row, block]
                parent_all[block] = pred[row, block]
        parent_all[roots] = roots
    # stable: within a level, nodes keep id order; the narrowest integer type sorts by radix
    order = np.argsort(depth_all.astype(np.min_scalar_type(int(depth_all.max()))), kind="stable")
    level_sizes = np.bincount(depth_all).tolist()
    starts = np.concatenate([[0], np.cumsum(level_sizes)[:-1]])
    position = np.empty_like(order)
    position[order] = np.arange(order.size)
    parent_index = position[parent_all[order]]  # level-order position of each node's parent
    # position of the parent inside its own level, for every node of levels 1.. (one split)
    parent_in_level = parent_index - np.repeat(np.concatenate([[0], starts[:-1]]), level_sizes)
    # ancestors 1, 2, 4, ... edges up: 2^K >= number of levels covers every path
    jumps = [parent_all]
    while len(jumps) < (len(level_sizes) - 1).bit_length():
        jumps.append(jumps[-1][jumps[-1]])
    device = guide.device
    parent_pos = [torch.empty(0, dtype=torch.long, device=device),
                  *torch.from_numpy(parent_in_level[level_sizes[0]:]).to(device).split(level_sizes[1:])]
    return TreeSchedule(
        shape=(batch, height, width),
        order=torch.from_numpy(order).to(device),
        inverse=torch.from_numpy(position).to(device),
        parent=torch.from_numpy(parent_all).to(device),
        level_sizes=level_sizes,
        parent_pos=parent_pos,
        parent_index=torch.from_numpy(parent_index).to(device),
        roots=torch.from_numpy(order[:level_sizes[0]]).to(device),
        jumps=tuple(torch.from_numpy(j).to(device) for j in jumps),
    )


def tree_edge_weights(embed: Tensor, schedule: TreeSchedule, sigma: float = 1.0) -> Tensor:
    """``w_v = exp(-||e_v - e_parent(v)||^2 / sigma)`` for every node ``v`` (roots get 1).

    Differentiable w.r.t. ``embed`` ``[B, C, H, W]``. Returns ``[B*H*W]``.
    The root weight never enters :func:`tree_filter`.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    nodes = embed.permute(0, 2, 3, 1).reshape(-1, embed.shape[1])
    dist = (nodes - nodes[schedule.parent]).pow(2).sum(dim=1)
    return torch.exp(-dist / sigma)


def _jump_tables(schedule: TreeSchedule) -> tuple[Tensor, tuple[Tensor, ...]]:
    """``(roots, jumps)`` of ``schedule``, derived from ``parent`` if it was built without them."""
    if schedule.roots is not None and schedule.jumps is not None:
        return schedule.roots, schedule.jumps
    roots = schedule.order[:schedule.level_sizes[0]]
    jumps = [schedule.parent]
    while len(jumps) < (schedule.depth - 1).bit_length():
        jumps.append(jumps[-1][jumps[-1]])
    return roots, tuple(jumps)


def _path_products(weights: Tensor, jumps: tuple[Tensor, ...]) -> list[Tensor]:
    """``p_k`` ``[N, 1]``: product of the ``2^k`` edge weights from each node to ``jumps[k]``.

    ``weights`` has ``0`` at the roots, so a path that would run past a
    root gets ``0`` (its ancestor entry, the root, is then never used).
    """
    products = [weights.unsqueeze(1)]
    for ancestor in jumps[:-1]:
        products.append(products[-1] * products[-1].index_select(0, ancestor))
    return products


def _two_passes(values: Tensor, jumps: tuple[Tensor, ...], products: list[Tensor]) -> tuple[Tensor, Tensor]:
    """``(A, F)`` of the two tree passes over ``values`` ``[N, C]`` (node-id order), by pointer jumping.

    Leaf-to-root ``A_v = x_v + sum_{c child of v} w_c A_c``: after step
    ``k`` of ``A[anc_k(y)] += p_k(y) A[y]`` every ``A_v`` sums ``P(u -> v) x_u``
    over the descendants ``u`` less than ``2^(k+1)`` edges below ``v``.
    Root-to-leaf ``F_root = A_root``, ``F_v = w_v F_parent + (1 - w_v^2) A_v``
    (``w = p_0`` is ``0`` at the roots): ``F = (1 - w^2) A``, then
    ``F[v] += p_k(v) F[anc_k(v)]``, the same doubling along the path to the
    root. Two operations per step and pass (no autograd:
    :class:`_TreePasses` supplies the gradient).
    """
    aggregated = values.clone()
    for ancestor, product in zip(jumps, products):
        aggregated.index_add_(0, ancestor, aggregated * product)
    full = (1.0 - products[0] * products[0]) * aggregated
    for ancestor, product in zip(jumps, products):
        full.addcmul_(product, full.index_select(0, ancestor))
    return aggregated, full


class _TreePasses(torch.autograd.Function):
    """``F = S x`` with ``S(i, j) = prod_{path} w`` (unnormalised filter), in node-id order.

    ``S`` is symmetric, so the gradient w.r.t. ``x`` is the same two passes
    run on the output gradient ``g``: ``(A_g, F_g) = passes(g)``, ``dx = F_g``.
    For the weight of node ``v`` (edge to its parent ``p``), from the two
    recurrences: ``dw_v = <A_g[v], F[p]> + <A[v], F_g[p]> - 2 w_v <A_g[v], A[v]>``
    (roots: 0).
    """

    @staticmethod
    def forward(ctx, values: Tensor, weights: Tensor, schedule: TreeSchedule) -> Tensor:
        roots, jumps = _jump_tables(schedule)
        weights = weights.index_fill(0, roots, 0.0)  # a root has no edge
        products = _path_products(weights, jumps)
        aggregated, full = _two_passes(values, jumps, products)
        ctx.schedule = schedule
        ctx.save_for_backward(aggregated, full, *products)
        return full

    @staticmethod
    def backward(ctx, grad_full: Tensor):
        aggregated, full, *products = ctx.saved_tensors
        schedule = ctx.schedule
        roots, jumps = _jump_tables(schedule)
        grad_agg, grad_values = _two_passes(grad_full.contiguous(), jumps, products)
        grad_weights = None
        if ctx.needs_input_grad[1]:
            parent = schedule.parent
            terms = grad_agg * full.index_select(0, parent)
            terms.addcmul_(aggregated, grad_values.index_select(0, parent))
            terms.addcmul_(grad_agg * aggregated, products[0], value=-2.0)
            grad_weights = terms.sum(dim=1).index_fill_(0, roots, 0.0)  # roots have no edge
        return grad_values if ctx.needs_input_grad[0] else None, grad_weights, None


def tree_filter(features: Tensor, schedule: TreeSchedule, edge_weights: Tensor) -> Tensor:
    """Normalised tree filtering of ``features`` ``[B, C, H, W]`` along ``schedule``.

    ``edge_weights`` ``[B*H*W]`` is the weight of the edge from each node to
    its parent, in ``(0, 1]``. Output has the shape of ``features``.
    The two passes run by pointer jumping as one autograd node
    (:class:`_TreePasses`, gradient written out): ``O(log depth)`` tensor
    operations. :func:`tree_filter_reference` is the same filter level by
    level with autograd through every level.
    """
    batch, channels, height, width = features.shape
    if (batch, height, width) != schedule.shape:
        raise ValueError(f"features {tuple(features.shape)} do not match the tree {schedule.shape}")
    # float16 would overflow: the normaliser sums up to one weight per node
    compute_dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    nodes = features.permute(0, 2, 3, 1).reshape(-1, channels).to(compute_dtype)
    values = torch.cat([nodes, torch.ones_like(nodes[:, :1])], dim=1)  # ones: the normaliser
    full = _TreePasses.apply(values, edge_weights.to(compute_dtype), schedule)
    out = full[:, :channels] / full[:, channels:]
    return out.reshape(batch, height, width, channels).permute(0, 3, 1, 2).to(features.dtype)


def _tree_order_inputs(features: Tensor, schedule: TreeSchedule, edge_weights: Tensor) -> tuple[Tensor, Tensor]:
    """Node values ``[N, C + 1]`` (features and a ones column, the normaliser) and edge weights in BFS order."""
    batch, channels, height, width = features.shape
    if (batch, height, width) != schedule.shape:
        raise ValueError(f"features {tuple(features.shape)} do not match the tree {schedule.shape}")
    # float16 would overflow: the normaliser sums up to one weight per node
    compute_dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    nodes = features.permute(0, 2, 3, 1).reshape(-1, channels).to(compute_dtype)
    ones = torch.ones_like(nodes[:, :1])
    values = torch.cat([nodes, ones], dim=1)[schedule.order]
    return values, edge_weights.to(values.dtype)[schedule.order]


def _filtered_features(full: Tensor, schedule: TreeSchedule, features: Tensor) -> Tensor:
    """Filtered node values in BFS order -> normalised features shaped like ``features``."""
    batch, channels, height, width = features.shape
    out = full[schedule.inverse]
    out = out[:, :channels] / out[:, channels:]
    return out.reshape(batch, height, width, channels).permute(0, 3, 1, 2).to(features.dtype)


def tree_filter_reference(features: Tensor, schedule: TreeSchedule, edge_weights: Tensor) -> Tensor:
    """:func:`tree_filter` with autograd through every level (the straightforward version, for tests)."""
    values, weights = _tree_order_inputs(features, schedule, edge_weights)
    x_levels = list(torch.split(values, schedule.level_sizes))
    w_levels = list(torch.split(weights, schedule.level_sizes))
    depth = schedule.depth
    # leaf-to-root: A_v = x_v + sum_children w_c A_c
    aggregated: list[Tensor] = [x_levels[-1]] * depth
    for d in range(depth - 1, 0, -1):
        message = w_levels[d].unsqueeze(1) * aggregated[d]
        aggregated[d - 1] = x_levels[d - 1].index_add(0, schedule.parent_pos[d], message)
    # root-to-leaf: F_v = w_v F_parent + (1 - w_v^2) A_v
    full: list[Tensor] = [aggregated[0]]
    for d in range(1, depth):
        w = w_levels[d].unsqueeze(1)
        full.append(w * full[d - 1][schedule.parent_pos[d]] + (1.0 - w * w) * aggregated[d])
    return _filtered_features(torch.cat(full, dim=0), schedule, features)


def filter_along_mst(features: Tensor, guide: Tensor, embed: Tensor | None = None,
                     sigma: float = 1.0) -> Tensor:
    """Build the MST on ``guide``, weight its edges from ``embed`` (default: ``guide``), filter.

    The convenience entry point: tree structure from ``guide`` (no gradient),
    edge weights ``exp(-||embed_u - embed_v||^2 / sigma)`` (differentiable),
    filtered ``features`` (differentiable).
    """
    schedule = build_tree_schedule(guide)
    weights = tree_edge_weights(guide if embed is None else embed, schedule, sigma)
    return tree_filter(features, schedule, weights)


def time_tree_filter(height: int, width: int, channels: int = 8, batch: int = 1,
                     seed: int = 0) -> dict[str, float]:
    """Seconds to build the tree, filter, and back-propagate on random ``[batch, ., H, W]`` maps.

    Used to report the filter's cost (e.g. 200 x 336 nodes: the stride-4 grid
    of an 800 x 1344 input); random guides give deep, irregular trees.
    """
    import time

    generator = torch.Generator().manual_seed(seed)
    guide = torch.randn(batch, 5, height, width, generator=generator, requires_grad=True)
    features = torch.randn(batch, channels, height, width, generator=generator, requires_grad=True)
    start = time.perf_counter()
    schedule = build_tree_schedule(guide)
    built = time.perf_counter()
    out = tree_filter(features, schedule, tree_edge_weights(guide, schedule))
    filtered = time.perf_counter()
    out.square().sum().backward()
    done = time.perf_counter()
    return {"nodes": float(batch * height * width), "depth": float(schedule.depth),
            "build_s": built - start, "forward_s": filtered - built, "backward_s": done - filtered}
