"""The batch stream: which images, with which augmentation seed, at each iteration.

The order is a pure function of ``(seed, iteration)``: position ``p`` of an
infinite stream of per-epoch permutations holds image ``perm_{p // N}[p % N]``
and its augmentation seed is derived from ``(seed, p)``. Iteration ``i`` takes
positions ``[i*B, (i+1)*B)``; process ``r`` of ``W`` takes every W-th of them,
split into equal interleaved micro-batches. So a resumed run, a 2-process run and a
1-process run with gradient accumulation all see the same images.
"""
from __future__ import annotations

import random
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from sim_core.engine.seeding import derive_seed


class IterationBatchSampler(Sampler):
    """Yields micro-batches of ``(index, aug_seed)`` from ``start_iter`` to ``max_iter``."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, start_iter: int, max_iter: int,
                 rank: int = 0, world_size: int = 1, micro_batches: int = 1):
        if num_samples <= 0:
            raise ValueError("the training set is empty")
        self.n, self.batch_size, self.seed = num_samples, batch_size, seed
        self.start_iter, self.max_iter = start_iter, max_iter
        self.rank, self.world, self.micro = rank, world_size, micro_batches
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng(derive_seed(self.seed, epoch)).permutation(self.n)}
        return self._perms[epoch]

    def positions(self, iteration: int) -> list[int]:
        first = iteration * self.batch_size
        return list(range(first, first + self.batch_size))[self.rank::self.world]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for it in range(self.start_iter, self.max_iter):
            mine = [(int(self._perm(p // self.n)[p % self.n]), derive_seed(self.seed, 1, p)) for p in self.positions(it)]
            # Interleaved, so micro-batch k of one process holds exactly what
            # process k of ``micro`` processes would hold.
            for k in range(self.micro):
                yield mine[k::self.micro]

    def __len__(self) -> int:
        return (self.max_iter - self.start_iter) * self.micro


class SeededSamples(Dataset):
    """Runs the wrapped dataset's random augmentation under a per-sample seed.

    The global RNG states are restored afterwards, so loading data in the main
    process does not disturb the model's own randomness.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                # The CPU generator only: torch.manual_seed would also queue a lazy seed for every
                # accelerator backend, recording a Python stack trace each time (~1.5 ms per sample).
                torch.default_generator.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % (2**32))
                return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
