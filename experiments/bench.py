"""``simbench bench``: speed and memory, side by side, as numbers in a json file.

Everything is measured in one process on the same machine, so the figures
that matter are the *ratios* (a method's iteration against ``mask``'s, the
shared engine against torchvision's FCOS, kornia's batched LAB against
scikit-image per image, faster-coco-eval against pycocotools). Nothing here
asserts a speed; tests never time anything.

Sections (``--only`` picks some): ``methods``, ``engine_vs_torchvision``,
``lab``, ``coco_eval``, ``eval_masks`` (one image's mask post-processing at COCO size, on the host vs where
the model ran), ``data``, ``mask_grid``, ``memory``, ``ddp``, ``backbones``,
``diagnostics`` (a step with vs without the supervision-quality diagnostics), ``profile`` (where
the CPU time of a demo step of each method and of the evaluation stage goes; ``--iters`` profiled
steps, the first ``--batch`` training samples of the params' data, ``--val-images``),
``device_check`` (not in the default set: the GPU self-check with ``--device cuda``, run it first on a
GPU machine; its CPU twin with ``--device cpu``: ``experiments/device_selfcheck.py``).
"""
from __future__ import annotations

import argparse
import json
import platform
import time

SECTIONS = ("methods", "engine_vs_torchvision", "lab", "coco_eval", "eval_masks", "data", "mask_grid", "memory",
            "ddp", "backbones", "diagnostics", "profile")
EXTRA_SECTIONS = ("device_check",)  # only when asked for with --only


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="reports/bench.json",
                        help="json file to write (outside reports/out/, which the report stage replaces)")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS + EXTRA_SECTIONS)}")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="device_check section: cuda runs the GPU self-check, cpu its checked CPU twin")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations per measurement")
    parser.add_argument("--batch", type=int, default=8, help="demo batch size")
    parser.add_argument("--size", type=int, default=128, help="demo image size")
    parser.add_argument("--params", default="params.yaml", help="params file (its model section is the demo model)")
    parser.add_argument("--val-images", type=int, default=0,
                        help="profile section: evaluate the first N val images (0: all)")


def main(args: argparse.Namespace) -> int:
    import torch

    from experiments import bench_parts as parts
    from sim_core.engine.run_info import cpu_model
    from sim_core.engine.trainer import native_cpu_bfloat16
    from sim_core.errors import InputError
    from sim_core.io_utils import atomic_write_json

    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS) - set(EXTRA_SECTIONS))
    if unknown:
        raise InputError("--only", f"unknown section '{unknown[0]}'; choose from "
                                   f"{', '.join(SECTIONS + EXTRA_SECTIONS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device", "cuda requested but no CUDA device is available")
    settings = parts.BenchSettings.from_args(args)
    results: dict = {
        "machine": {"platform": platform.platform(), "processor": cpu_model(),
                    "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
                    "native_cpu_bfloat16": native_cpu_bfloat16()},
        "settings": settings.as_dict(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    for section in chosen:
        print(f"bench: {section} ...", flush=True)
        results[section] = getattr(parts, f"bench_{section}")(settings)
        print(json.dumps(results[section], indent=None)[:400], flush=True)
    atomic_write_json(args.out, results)
    print(f"bench -> {args.out}")
    return 0
