"""Load ImageNet weights from a local file into a backbone, or say exactly why not.

simbench never downloads weights: the user names a file (``model.pretrained:
PATH``) and :func:`load_pretrained` loads it with
``torch.load(weights_only=True)``, so a checkpoint cannot run code.

Why a loader of its own instead of ``load_state_dict(strict=False)``: a
non-strict load silently accepts a ResNet-50 file for a ResNet-101 (the missing
blocks keep their random init) and a Swin-T file for a Swin-B fails with a
shape error deep in PyTorch. Here every key is accounted for before anything is
copied:

* the state dict is found inside the usual containers (a bare state dict, or
  under ``"state_dict"``, ``"model"``, ``"module"``, ``"model_state"``,
  ``"net"``);
* a common key prefix is stripped (``module.`` from DDP, ``model.``,
  ``backbone.``, ``backbone.body.`` from torchvision detectors, ...): the prefix
  (up to three dotted components, or none) under which the most keys match the
  module is chosen, and keys outside it are left out, so a whole detector
  checkpoint yields its backbone;
* keys of classification heads and BN counters (``DEFAULT_IGNORED``) may be in
  the file without a place in the module;
* keys the module adds on top of the ImageNet architecture (DCN offset convs,
  Swin's per-output norms) may be absent from the file: a module lists their
  patterns in its ``pretrained_allowed_missing`` attribute;
* anything else missing, unexpected or of the wrong shape raises
  :class:`~sim_core.errors.InputError` naming the file, the architecture and the
  first offending keys and shapes.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from sim_core.errors import InputError

# Keys a classification checkpoint carries that a detection backbone has no use for.
DEFAULT_IGNORED = ("fc.*", "head.*", "heads.*", "classifier.*", "*num_batches_tracked")
CONTAINER_KEYS = ("state_dict", "model", "module", "model_state", "net")
MAX_PREFIX_DEPTH = 3
SHOWN = 3  # offending keys quoted in an error message


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_pretrained` did, for the run log."""

    path: str
    prefix: str                   # stripped from the file's keys ("" if none)
    loaded: int                   # tensors copied into the module
    kept_initial: tuple[str, ...]  # allowed-missing keys that keep their initialisation
    ignored: tuple[str, ...]      # file keys without a place in the module


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatchcase(key, p) for p in patterns)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensor dictionary stored in ``path`` (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise InputError("model.pretrained", f"weights file does not exist: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refusals, truncated or non-torch files
        raise InputError("model.pretrained", f"cannot read {path} as a PyTorch checkpoint with "
                         f"weights_only=True ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if _is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in CONTAINER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                # Containers may also hold non-tensor metadata next to the weights.
                tensors = {k: v for k, v in inner.items() if isinstance(k, str) and isinstance(v, Tensor)}
                if tensors:
                    return tensors
        shown = sorted(str(k) for k in obj)[:8]
        raise InputError("model.pretrained", f"{path} holds no state dict of tensors "
                         f"(top-level keys: {shown}; looked under {list(CONTAINER_KEYS)})")
    raise InputError("model.pretrained", f"{path} holds a {type(obj).__name__}, not a state dict")


def best_prefix(file_keys: Iterable[str], module_keys: set[str]) -> tuple[str, int]:
    """The dotted prefix whose removal makes the most file keys match the module.

    Ties go to the shorter prefix, so a file that already matches is left alone.
    """
    votes: Counter[str] = Counter()
    for key in file_keys:
        parts = key.split(".")
        for depth in range(0, min(MAX_PREFIX_DEPTH, len(parts) - 1) + 1):
            prefix = ".".join(parts[:depth]) + ("." if depth else "")
            if key[len(prefix):] in module_keys:
                votes[prefix] += 1
    if not votes:
        return "", 0
    prefix, count = min(votes.items(), key=lambda kv: (-kv[1], len(kv[0])))
    return prefix, count


def _describe(items: Sequence[str], what: str) -> str:
    return f"{len(items)} {what} (first: {', '.join(items[:SHOWN])})"


def load_pretrained(module: nn.Module, path: str | Path, arch_name: str, *,
                    allowed_missing: Sequence[str] | None = None,
                    ignored: Sequence[str] = DEFAULT_IGNORED) -> LoadReport:
    """Copy the weights in ``path`` into ``module`` after checking every key and shape.

    ``allowed_missing`` defaults to ``module.pretrained_allowed_missing`` (glob
    patterns over the module's state-dict keys). Raises ``InputError`` naming
    ``path``, ``arch_name`` and the first mismatching keys/shapes.
    """
    if allowed_missing is None:
        allowed_missing = tuple(getattr(module, "pretrained_allowed_missing", ()))
    state = read_state_dict(path)
    own = module.state_dict()
    prefix, n_match = best_prefix(state.keys(), set(own))
    if n_match == 0:
        raise InputError("model.pretrained", f"{path} does not match the {arch_name} architecture: none of its "
                         f"{len(state)} keys (first: {', '.join(sorted(state)[:SHOWN])}) names a {arch_name} "
                         f"tensor (first expected: {', '.join(list(own)[:SHOWN])})")
    stripped = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    missing = [k for k in own if k not in stripped and not _matches(k, allowed_missing)]
    unexpected = sorted(k for k in stripped if k not in own and not _matches(k, ignored))
    wrong = [f"{k}: file {tuple(stripped[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in stripped and stripped[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(_describe(missing, "missing keys"))
        if unexpected:
            parts.append(_describe(unexpected, "unexpected keys"))
        if wrong:
            parts.append(_describe(wrong, "shape mismatches"))
        shown_prefix = f" after removing the prefix '{prefix}'" if prefix else ""
        raise InputError("model.pretrained", f"{path} does not match the {arch_name} architecture"
                         f"{shown_prefix}: " + "; ".join(parts))

    selected = {k: v for k, v in stripped.items() if k in own}
    result = module.load_state_dict(selected, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # guaranteed by the checks above
    return LoadReport(
        path=str(path), prefix=prefix, loaded=len(selected),
        kept_initial=tuple(k for k in own if k not in stripped),
        ignored=tuple(sorted(k for k in stripped if k not in own)),
    )
