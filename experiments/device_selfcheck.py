"""The GPU self-check and its CPU twin: one short training run of every method, then one evaluation.

``simbench bench --only device_check --device cuda`` is what a user runs first
on a GPU machine: each method trains ``iterations`` steps of the smoke profile
(SIM with copy-paste forced from the second step) and the mask model predicts
the smoke val split, with ``torch.cuda.set_sync_debug_mode("warn")``; it
prints seconds per step, peak device memory and every host-sync warning by
file and line. ``--device cpu`` (the default, and what CI runs) is the twin:
the same runs under ``sim_core.engine.device_check``, which enforces CUDA's
same-device rule on the CPU and counts host waits by file and line.
"""
from __future__ import annotations

import contextlib
import json
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from sim_core.config import METHODS, apply_overrides, profile_path, read_yaml, resolve_run

# SIM pastes from its second step: the bank opens at once and takes an untrained teacher's masks
SIM_PASTE = {"sim.pseudo_start_frac": 0.0, "sim.paste_prob": 1.0, "sim.paste_when_full": False,
             "sim.confident_thresh": 0.01}


def smoke_setup(workdir: Path) -> dict:
    """The smoke profile with its synthetic data prepared under ``workdir``."""
    from sim_core.data.prepare import prepare_synthetic

    params = read_yaml(profile_path("smoke"))
    data = workdir / "data"
    if not (data / "train.json").exists():
        prepare_synthetic(data, params["synthetic"])
    params["data"]["root"] = str(data)
    params["train"]["runs_dir"] = str(workdir / "runs")
    return params


@contextlib.contextmanager
def _watch(device_name: str) -> Iterator[Any]:
    """CUDA: sync-debug warnings collected; CPU: the device-placement checker (waits counted)."""
    if device_name.startswith("cuda"):
        import torch

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            torch.cuda.reset_peak_memory_stats()
            try:
                yield caught
            finally:
                torch.cuda.set_sync_debug_mode("default")
    else:
        from sim_core.engine.device_check import checked_device

        with checked_device() as checker:
            yield checker


def _waits(watch: Any) -> Counter:
    if isinstance(watch, list):  # CUDA warnings
        return Counter(f"{Path(w.filename).name}:{w.lineno}" for w in watch if "synchroniz" in str(w.message))
    return Counter(watch.waits)


def _device(device_name: str):

    from sim_core.engine.device_check import CHECKED_DEVICE
    from sim_core.engine.trainer import pick_device

    return pick_device(device_name) if device_name.startswith("cuda") else CHECKED_DEVICE


def check_method(params: dict, method: str, device_name: str, iterations: int) -> dict:
    """One method's short run on the device: seconds per step, host waits per step by line, peak memory."""
    import torch

    from sim_core.engine.trainer import Trainer

    # every step logged (its time), without the supervision diagnostics that logged steps add in training
    overrides = {"train.max_iter": iterations, "train.log_every": 1, "train.checkpoint_every": iterations,
                 "train.supervision_diagnostics": False, **(SIM_PASTE if method == "sim" else {})}
    resolved = resolve_run(apply_overrides(params, overrides), f"{method}_s0")
    run_dir = Path(params["train"]["runs_dir"]) / f"{method}_s0"
    out: dict[str, Any] = {"method": method, "iterations": iterations}
    try:
        with _watch(device_name) as watch:
            Trainer(resolved, run_dir, progress=False, device=_device(device_name)).run()
    except RuntimeError as exc:  # a device mix (DevicePlacementError) or CUDA's own error
        out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        return out
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    steady = [r["time"] for r in log[1:]] or [r["time"] for r in log]
    waits = _waits(watch)
    out.update(seconds_per_step=round(sum(steady) / len(steady), 4),
               waits_per_step=round(sum(waits.values()) / iterations, 1),
               waits_by_line={k: v for k, v in waits.most_common()})
    if device_name.startswith("cuda"):
        out["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def check_evaluation(params: dict, device_name: str) -> dict:
    """The mask run's model predicts the smoke val split on the device: seconds per image, host waits."""
    from sim_core.evaluation.inference import load_trained_model, predict_split

    run_dir = Path(params["train"]["runs_dir"]) / "mask_s0"
    resolved = resolve_run(params, "mask_s0")
    root = Path(resolved["data"]["root"])
    device = _device(device_name)
    try:
        with _watch(device_name) as watch:
            model, _ = load_trained_model(run_dir / "model.pt", device)
            started = time.perf_counter()
            segm, _ = predict_split(model, root / "val.json", root / "images", resolved, device, progress=False)
            seconds = time.perf_counter() - started
    except RuntimeError as exc:
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
    images = len(json.loads((root / "val.json").read_text())["images"])
    waits = _waits(watch)
    return {"images": images, "seconds_per_image": round(seconds / images, 4), "detections": len(segm),
            "waits_per_image": round(sum(waits.values()) / images, 1), "waits_by_line": dict(waits.most_common())}


def self_check(device_name: str = "cpu", iterations: int = 2, workdir: str | Path | None = None) -> dict:
    """Every method's short run and one evaluation on ``device_name`` (``cpu``: the checked twin)."""
    with tempfile.TemporaryDirectory(prefix="simbench-selfcheck-") as tmp:
        params = smoke_setup(Path(workdir or tmp))
        methods = {m: check_method(params, m, device_name, iterations) for m in METHODS}
        evaluation = (check_evaluation(params, device_name) if "error" not in methods["mask"]
                      else {"error": "the mask run failed"})
    return {"device": device_name, "methods": methods, "evaluation": evaluation,
            "ok": not any("error" in r for r in [*methods.values(), evaluation])}


def summary_lines(result: dict) -> list[str]:
    """What a person reads: one line per method and for the evaluation, the top wait lines."""
    lines = []
    for name, r in [*result["methods"].items(), ("evaluation", result["evaluation"])]:
        if "error" in r:
            lines.append(f"{name}: FAILED {r['error']}")
            continue
        timing = (f"{r['seconds_per_step']:.3f} s/step, {r['waits_per_step']:g} host waits/step" if "seconds_per_step"
                  in r else f"{r['seconds_per_image']:.3f} s/image, {r['waits_per_image']:g} host waits/image")
        memory = f", peak {r['peak_memory_mb']:g} MB" if "peak_memory_mb" in r else ""
        top = ", ".join(f"{k} x{v}" for k, v in list(r["waits_by_line"].items())[:4])
        lines.append(f"{name}: ok, {timing}{memory}" + (f" (most: {top})" if top else ""))
    return lines
