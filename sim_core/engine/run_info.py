"""How a number was made: git commit, package versions, device, seed, params, initial weights.

Every run directory gets a ``run.json`` with this stamp, and every metrics file
carries the commit and params, so a table cell can be traced back to the code
and settings that produced it. ``pretrained`` names the backbone's initial
weights (torchvision enum name such as ``ResNet50_Weights.IMAGENET1K_V1``, a file
path, or ``none``) with the file and its sha256.
"""
from __future__ import annotations

import json
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from sim_core.model.pretrained import weights_record

PACKAGES = ("torch", "torchvision", "numpy", "pycocotools", "faster-coco-eval", "kornia", "dvc", "dvclive", "simbench")


SOURCE_DIR = Path(__file__).resolve().parents[2]  # the checkout simbench runs from (editable install)


def code_version(cwd: str | Path | None = None) -> tuple[str, bool]:
    """``(commit, dirty)`` of the code that runs: the git commit of simbench's source tree and whether
    tracked files differ from it; ``('simbench <version>', False)`` for an install without git."""
    cwd = SOURCE_DIR if cwd is None else cwd
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit, bool(dirty)
    except (OSError, subprocess.SubprocessError):
        try:
            return f"simbench {metadata.version('simbench')}", False
        except metadata.PackageNotFoundError:
            return "unknown", False


def git_commit(cwd: str | Path | None = None) -> str:
    """The code's commit, with ``+dirty`` when tracked files are modified (:func:`code_version`)."""
    commit, dirty = code_version(cwd)
    return commit + ("+dirty" if dirty else "")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{cpu_model()} threads={torch.get_num_threads()}"


BFLOAT16_UNITS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of a CPU that computes bfloat16 natively


def cpu_model() -> str:
    """The CPU's model name and vector units (``/proc/cpuinfo`` on Linux, else ``platform``).

    The CPU changes a run's numbers (oneDNN picks other kernels with AVX-512 than
    with AVX2, and ``train.cpu_amp: auto`` trains in bfloat16 only with AMX or
    AVX512-BF16; ``docs/statistics.md``), so the stamp names it."""
    info = _cpuinfo()
    if info is None:
        return platform.processor() or platform.machine()
    names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
    flags = _flags(info)
    units = [unit for unit in ("avx2", "avx512f", *BFLOAT16_UNITS) if unit in flags]
    return " ".join([names[0] if names else platform.machine(), *units])


def cpu_flags() -> set[str]:
    """The first CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none)."""
    return _flags(_cpuinfo() or "")


def _flags(cpuinfo: str) -> set[str]:
    return set(next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), []))


def _cpuinfo() -> str | None:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return None


def run_stamp(params: dict, device: torch.device, world_size: int = 1,
              precision: str | None = None) -> dict[str, Any]:
    """``precision``: what the trainer computed in (``train.cpu_amp: auto`` depends on the CPU)."""
    return {
        "run": params.get("run"),
        "method": params["train"]["method"],
        "seed": params["train"]["seed"],
        "profile": params.get("profile"),
        "git_commit": git_commit(),
        "packages": package_versions(),
        "python": platform.python_version(),
        "device": describe_device(device),
        "world_size": world_size,
        "precision": precision,
        "pretrained": weights_record(params.get("model") or {}),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "params": params,
    }


def trained_on(run_dir: Path) -> dict[str, Any] | None:
    """The CPU/GPU and precision a run trained with, from its ``run.json`` (None if it has none).

    The evaluation copies it into ``metrics.json`` so that the report can say
    when the runs it compares come from different machines or precisions."""
    try:
        stamp = json.loads((Path(run_dir) / "run.json").read_text())
    except (OSError, ValueError):
        return None
    return {"device": stamp.get("device"), "precision": stamp.get("precision")}
