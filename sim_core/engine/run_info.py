"""How a number was made: git commit, package versions, device, seed, params, initial weights.

Every run directory gets a ``run.json`` with this stamp, and every metrics file
carries the commit and params, so a table cell can be traced back to the code
and settings that produced it. ``pretrained`` names the backbone's initial
weights (torchvision enum name such as ``ResNet50_Weights.IMAGENET1K_V1``, a file
path, or ``none``) with the file and its sha256.
"""
from __future__ import annotations

import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from sim_core.model.pretrained import weights_record

PACKAGES = ("torch", "torchvision", "numpy", "pycocotools", "faster-coco-eval", "kornia", "dvc", "dvclive", "simbench")


def git_commit(cwd: str | Path | None = None) -> str:
    """The checked-out commit, with ``+dirty`` when tracked files are modified."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


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
    return f"cpu:{platform.processor() or platform.machine()} threads={torch.get_num_threads()}"


def run_stamp(params: dict, device: torch.device, world_size: int = 1) -> dict[str, Any]:
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
        "pretrained": weights_record(params.get("model") or {}),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "params": params,
    }
