"""Engine pieces that need no model: schedule, batch stream, checkpoints, atomic writes."""
from __future__ import annotations

import os

import pytest
import torch

from sim_core.engine import checkpoint as ckpt
from sim_core.engine.batches import IterationBatchSampler, SeededSamples
from sim_core.engine.distributed import accumulation_steps
from sim_core.engine.schedule import lr_at
from sim_core.errors import InputError
from sim_core.io_utils import atomic_directory, atomic_write_json


def test_lr_warmup_and_steps():
    cfg = {"lr": 0.01, "warmup_iters": 100, "warmup_factor": 0.001, "steps": [600, 800], "gamma": 0.1}
    assert lr_at(0, cfg) == pytest.approx(0.01 * 0.001)
    assert lr_at(50, cfg) == pytest.approx(0.01 * (0.001 * 0.5 + 0.5))
    assert lr_at(100, cfg) == pytest.approx(0.01)
    assert lr_at(599, cfg) == pytest.approx(0.01)
    assert lr_at(600, cfg) == pytest.approx(0.001)
    assert lr_at(800, cfg) == pytest.approx(0.0001)


def _items(sampler):
    return [item for batch in sampler for item in batch]


def test_batch_stream_resume_equals_uninterrupted():
    full = _items(IterationBatchSampler(10, 4, seed=3, start_iter=0, max_iter=6))
    tail = _items(IterationBatchSampler(10, 4, seed=3, start_iter=2, max_iter=6))
    assert full[8:] == tail
    # Every epoch is a permutation: the first 10 positions cover every image once.
    assert sorted(i for i, _ in full[:10]) == list(range(10))


def test_batch_stream_two_processes_partition_one_process():
    one = IterationBatchSampler(12, 4, seed=0, start_iter=0, max_iter=3, micro_batches=2)
    r0 = IterationBatchSampler(12, 4, seed=0, start_iter=0, max_iter=3, rank=0, world_size=2)
    r1 = IterationBatchSampler(12, 4, seed=0, start_iter=0, max_iter=3, rank=1, world_size=2)
    single = list(one)
    assert len(single) == 6 and all(len(b) == 2 for b in single)
    for it, (b0, b1) in enumerate(zip(r0, r1)):
        assert sorted(b0 + b1) == sorted(single[2 * it] + single[2 * it + 1])


def test_seeded_samples_are_reproducible_and_restore_rng():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.rand(2)

    ds = SeededSamples(Noisy())
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a, b = ds[(1, 42)], ds[(1, 42)]
    assert torch.equal(a, b)
    assert not torch.equal(ds[(1, 43)], a)
    assert torch.equal(torch.get_rng_state(), before)


def test_accumulation_steps():
    assert accumulation_steps(16, 16, 1) == 1
    assert accumulation_steps(16, 4, 2) == 2
    assert accumulation_steps(8, 8, 2) == 1
    with pytest.raises(InputError):
        accumulation_steps(6, 2, 4)


def test_checkpoint_roundtrip_and_fallback_on_corruption(tmp_path, capsys):
    ckpt.save_checkpoint(tmp_path, {"iteration": 5, "model": {"w": torch.ones(2)}})
    ckpt.save_checkpoint(tmp_path, {"iteration": 10, "model": {"w": torch.zeros(2)}})
    assert ckpt.load_latest_checkpoint(tmp_path)["iteration"] == 10
    data = (tmp_path / "last.ckpt").read_bytes()
    (tmp_path / "last.ckpt").write_bytes(data[: len(data) // 2])  # a truncated file
    state = ckpt.load_latest_checkpoint(tmp_path)
    assert state["iteration"] == 5
    assert "unreadable checkpoint" in capsys.readouterr().err


def test_no_checkpoint_means_fresh_start(tmp_path):
    assert ckpt.load_latest_checkpoint(tmp_path) is None


def test_atomic_directory_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "a.json").write_text("{}")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    with atomic_directory(target) as tmp:
        atomic_write_json(tmp / "a.json", {"x": 1})
    assert (target / "a.json").exists() and os.listdir(tmp_path) == ["out"]
