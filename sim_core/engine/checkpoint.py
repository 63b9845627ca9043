"""Checkpoints: atomic writes, safe loads, fallback to the previous one.

``last.ckpt`` is always a complete file: it is written to a temp file and
renamed into place, and the checkpoint it replaces is kept as ``prev.ckpt``.
Loading uses ``torch.load(weights_only=True)`` (no pickle code execution); a
corrupt or truncated ``last.ckpt`` is reported and ``prev.ckpt`` used instead.
"""
from __future__ import annotations

import io
import os
import sys
from pathlib import Path
from typing import Any

import torch

from sim_core.io_utils import atomic_write_bytes

LAST = "last.ckpt"
PREVIOUS = "prev.ckpt"


def save_checkpoint(run_dir: str | Path, state: dict[str, Any]) -> Path:
    run_dir = Path(run_dir)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    last = run_dir / LAST
    if last.exists():
        os.replace(last, run_dir / PREVIOUS)
    atomic_write_bytes(last, buffer.getvalue())
    return last


def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def latest_checkpoint(run_dir: str | Path, quiet: bool = False) -> tuple[dict[str, Any], Path] | None:
    """The newest readable checkpoint of a run and its path, or None when there is none.

    ``quiet``: no warnings for unreadable files (a status query, not a resume)."""
    run_dir = Path(run_dir)
    for name in (LAST, PREVIOUS):
        path = run_dir / name
        if not path.exists():
            continue
        try:
            state = _load(path)
        except Exception as exc:  # corrupt, truncated, or not a checkpoint
            if not quiet:
                print(f"simbench: warning: {path}: unreadable checkpoint ({type(exc).__name__}); "
                      "trying the previous one", file=sys.stderr)
            continue
        if not isinstance(state, dict) or "iteration" not in state or "model" not in state:
            if not quiet:
                print(f"simbench: warning: {path}: not a simbench checkpoint; ignored", file=sys.stderr)
            continue
        return state, path
    return None


def load_latest_checkpoint(run_dir: str | Path) -> dict[str, Any] | None:
    """The newest readable checkpoint of a run, or None when there is none."""
    found = latest_checkpoint(run_dir)
    return None if found is None else found[0]


def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save({"model": state_dict, "meta": meta}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_weights(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    from sim_core.errors import InputError

    if not path.is_file():
        raise InputError(path, "model weights not found (train the run first)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(path, f"unreadable model file ({type(exc).__name__})") from None
