"""Deterministic seeding.

On the CPU the same seed and params give the same data order, augmentation,
initial weights and therefore the same metrics. The data order and each
sample's augmentation are functions of ``(seed, iteration)`` only, so a run
resumed from a checkpoint sees exactly the batches an uninterrupted run sees.
"""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and platforms)."""
    seq = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts])
    return int(seq.generate_state(2, dtype=np.uint32).astype(np.uint64).dot([1, 2**32]) % (2**63 - 1))


def use_deterministic_cpu_kernels() -> None:
    """Ask torch for deterministic kernels where it has them (warn otherwise)."""
    torch.use_deterministic_algorithms(True, warn_only=True)


def set_cpu_threads(train_cfg: dict) -> int:
    """Use ``train.threads`` CPU threads (0: torch's default) and return the count.

    A param, not a machine detail: the thread count changes how floating-point
    sums are split, so runs with different counts differ in the last digits
    and, after a few hundred steps, in their metrics.
    """
    threads = int(train_cfg.get("threads", 0)) or torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    return torch.get_num_threads()
