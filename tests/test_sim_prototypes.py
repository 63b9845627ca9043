"""Sinkhorn-Knopp assignment and the prototype bank of SIM."""
from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.nn.functional as F

from sim_core.sim.prototypes import PrototypeBank, confident_pixel_features
from sim_core.sim.sinkhorn import hard_assignment, sinkhorn_knopp


def test_sinkhorn_rows_sum_to_one_and_columns_become_uniform():
    g = torch.Generator().manual_seed(0)
    scores = F.normalize(torch.randn(40, 4, generator=g), dim=1)
    plan3 = sinkhorn_knopp(scores, eps=0.05, iters=3)
    assert plan3.shape == (40, 4)
    assert torch.allclose(plan3.sum(dim=1), torch.ones(40), atol=1e-5)  # each pixel fully assigned
    plan = sinkhorn_knopp(scores, eps=0.05, iters=500)
    assert torch.allclose(plan.sum(dim=1), torch.ones(40), atol=1e-5)
    assert torch.allclose(plan.sum(dim=0), torch.full((4,), 10.0), atol=1e-3)  # N / L per prototype
    # three iterations already balance far better than a plain softmax would
    softmax_cols = torch.softmax(scores / 0.05, dim=1).sum(dim=0)
    assert (plan3.sum(dim=0) - 10).abs().max() < (softmax_cols - 10).abs().max()


def test_sinkhorn_matches_the_closed_form_two_by_two_plan():
    # For a 2x2 kernel K scaled to row and column sums 1 the plan is [[x, 1-x], [1-x, x]]
    # with x / (1 - x) = sqrt(K11 K22 / (K12 K21)).
    eps = 0.5
    scores = torch.tensor([[0.9, 0.1], [0.3, 0.4]])
    k = torch.exp(scores / eps)
    r = math.sqrt(float(k[0, 0] * k[1, 1] / (k[0, 1] * k[1, 0])))
    x = r / (1 + r)
    plan = sinkhorn_knopp(scores, eps=eps, iters=200)
    assert torch.allclose(plan, torch.tensor([[x, 1 - x], [1 - x, x]]), atol=1e-5)


def test_sinkhorn_rejects_bad_input_and_handles_no_pixels():
    assert sinkhorn_knopp(torch.zeros(0, 3)).shape == (0, 3)
    with pytest.raises(ValueError):
        sinkhorn_knopp(torch.zeros(3))
    with pytest.raises(ValueError):
        sinkhorn_knopp(torch.zeros(2, 2), eps=0.0)


def _bank(momentum: float = 0.9) -> PrototypeBank:
    bank = PrototypeBank(num_classes=2, num_prototypes=2, dim=2, momentum=momentum, sinkhorn_eps=0.05, sinkhorn_iters=3)
    bank.prototypes.copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [0.8, -0.6]]]))
    return bank


def test_prototype_update_equals_hand_computed_momentum_mean():
    bank = _bank(momentum=0.9)
    class1_before = bank.prototypes[1].clone()
    f = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.2], [0.0, 1.0], [0.1, 1.0]]), dim=1)
    updated = bank.update(f, torch.zeros(4, dtype=torch.long))
    c0 = F.normalize(f[0] + f[1], dim=0)  # pixels 0, 1 -> prototype 0
    c1 = F.normalize(f[2] + f[3], dim=0)  # pixels 2, 3 -> prototype 1
    p0 = F.normalize(0.9 * torch.tensor([1.0, 0.0]) + 0.1 * c0, dim=0)
    p1 = F.normalize(0.9 * torch.tensor([0.0, 1.0]) + 0.1 * c1, dim=0)
    assert torch.allclose(bank.prototypes[0, 0], p0, atol=1e-6)
    assert torch.allclose(bank.prototypes[0, 1], p1, atol=1e-6)
    assert torch.equal(bank.prototypes[1], class1_before)  # no pixel of class 1: untouched
    assert updated.tolist() == [[True, True], [False, False]]
    assert torch.allclose(bank.prototypes.norm(dim=-1), torch.ones(2, 2))


def test_uniform_marginals_spread_pixels_over_all_prototypes():
    # Every pixel is closer to prototype 0, yet the equal-share constraint gives
    # prototype 1 the half of them that lean most towards it.
    bank = _bank()
    f = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.05], [1.0, 0.5], [1.0, 0.6]]), dim=1)
    assert (f @ bank.prototypes[0].t()).argmax(dim=1).tolist() == [0, 0, 0, 0]
    sums, counts = bank.assignment_statistics(f, torch.zeros(4, dtype=torch.long))
    assert counts[0].tolist() == [2.0, 2.0]
    assert torch.allclose(sums[0, 1], f[2] + f[3], atol=1e-6)
    assert hard_assignment(sinkhorn_knopp(f @ bank.prototypes[0].t())).tolist() == [0, 0, 1, 1]


def test_prototypes_are_seeded_unit_vectors_and_checkpointed():
    a = PrototypeBank(3, 4, 8, seed=7)
    b = PrototypeBank(3, 4, 8, seed=7)
    c = PrototypeBank(3, 4, 8, seed=8)
    assert torch.equal(a.prototypes, b.prototypes) and not torch.equal(a.prototypes, c.prototypes)
    assert torch.allclose(a.prototypes.norm(dim=-1), torch.ones(3, 4))
    assert "prototypes" in a.state_dict()
    c.load_state_dict(a.state_dict())
    assert torch.equal(c.prototypes, a.prototypes)
    with pytest.raises(ValueError):
        a.update(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long))


def test_confident_pixel_features_take_the_union_per_image_and_class():
    feats = torch.zeros(2, 2, 3, 3)
    feats[:, 0] = 2.0  # every pixel's feature is (2, 0) -> normalised (1, 0)
    confident = torch.zeros(3, 3, 3, dtype=torch.bool)
    confident[0, 0, :2] = True  # image 0, class 1: pixels (0,0), (0,1)
    confident[1, 0, 1:] = True  # image 0, class 1 again: (0,1), (0,2) -> union of 3 pixels
    confident[2, 2, 2] = True  # image 1, class 0: one pixel
    out, labels = confident_pixel_features(feats, confident, torch.tensor([1, 1, 0]), torch.tensor([0, 0, 1]))
    assert sorted(labels.tolist()) == [0, 1, 1, 1]
    assert torch.allclose(out, torch.tensor([[1.0, 0.0]]).expand(4, 2))


def test_confident_pixel_features_match_a_loop_over_image_class_pairs():
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(3, 4, 5, 6, generator=g)
    confident = torch.rand(7, 5, 6, generator=g) > 0.6
    labels = torch.tensor([2, 0, 2, 1, 0, 2, 2])
    images = torch.tensor([0, 0, 0, 1, 2, 2, 1])
    out, out_labels = confident_pixel_features(feats, confident, labels, images)
    normed = F.normalize(feats, dim=1)
    expected, expected_labels = [], []
    for b, c in sorted({(int(b), int(c)) for b, c in zip(images, labels)}):
        union = confident[(images == b) & (labels == c)].any(dim=0)
        expected.append(normed[b][:, union].t())
        expected_labels += [c] * int(union.sum())
    assert torch.equal(out_labels, torch.tensor(expected_labels))
    assert torch.allclose(out, torch.cat(expected))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        bank = _bank(momentum=0.5)
        sums = torch.zeros(2, 2, 2)
        counts = torch.zeros(2, 2)
        sums[0, 0] = torch.tensor([1.0, 1.0]) if rank == 0 else torch.tensor([3.0, 1.0])
        counts[0, 0] = 1.0 if rank == 0 else 3.0
        bank.apply_statistics(sums, counts)
        queue.put((rank, bank.prototypes.tolist()))
    finally:
        dist.destroy_process_group()


def test_distributed_update_all_reduces_sums_and_counts():
    """Two gloo processes with different statistics end with identical, jointly updated prototypes."""
    import multiprocessing as mp

    # spawn, not fork: forking after torch has started its OpenMP threads can hang the child
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, port, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    centroid = F.normalize(torch.tensor([4.0, 2.0]) / 4.0, dim=0)
    expected = F.normalize(0.5 * torch.tensor([1.0, 0.0]) + 0.5 * centroid, dim=0)
    assert results[0] == results[1]
    assert torch.allclose(torch.tensor(results[0])[0, 0], expected, atol=1e-6)
