"""``simbench train --run NAME``: train one run of the params' ``runs`` matrix.

Works unchanged under ``torchrun`` (one or many GPUs, one or many nodes) and
resumes from ``runs/<run>/last.ckpt`` when one exists. When ``train.processes``
is above 1 and the command is not already under torchrun, it launches that many
local processes itself (torch's elastic launcher), so the dvc stage command
stays the same for any process count.

The backbone's initial weights (``model.pretrained``) are checked first: an
``imagenet`` file missing from torch hub's cache is downloaded once here, and
when that is impossible the command stops with exit code 2 before it reads any
data, naming the file, its URL and where to put it.

Under ``torchrun`` spell the run option ``--name``: torchrun's own parser
claims every option that abbreviates one of its own (``--run`` abbreviates
``--run-path``) even after the script name.
"""
from __future__ import annotations

import argparse
import os
import sys

from experiments.common import (add_params_arguments, load_params_from_args, require_prepared, run_dir_for,
                                split_mask_counts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", "--name", dest="run", required=True,
                        help="run name declared in params 'runs' (--name under torchrun)")
    add_params_arguments(parser)
    parser.add_argument("--run-dir", default=None, help="output directory (default: <train.runs_dir>/<run>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--restart", action="store_true",
                        help="train from iteration 0, deleting the run's checkpoints (a finished run is otherwise "
                             "kept when only the code changed: the settings fingerprint does not cover code)")


def main(args: argparse.Namespace) -> int:
    from sim_core.config import resolve_run
    from sim_core.methods import get_method
    from sim_core.errors import InputError

    from sim_core.model.pretrained import prepare_weights

    params = load_params_from_args(args)  # validated (names, overrides the run would ignore) before torch loads
    resolved = resolve_run(params, args.run)
    from sim_core.engine.trainer import train_run

    prepare_weights(resolved["model"])  # weights cached (or downloaded) before any data or run dir is touched
    train_json = require_prepared(resolved, "train")
    method = resolved["train"]["method"]
    if get_method(method).needs_masks:
        with_masks, total = split_mask_counts(train_json)
        if with_masks < total:
            raise InputError(f"run '{args.run}'", f"method '{method}' trains on ground-truth masks, but "
                                                 f"{total - with_masks} of {total} instances in {train_json} "
                                                 "have only a box; use a box-supervised method")
    run_dir = run_dir_for(params, args.run, args.run_dir)
    processes = local_processes(resolved["train"])
    if processes > 1 and "LOCAL_RANK" not in os.environ:
        return launch_local_processes(processes, args)
    result = train_run(resolved, run_dir, progress=not args.no_progress and sys.stderr.isatty(),
                       restart=args.restart)
    print(f"trained {args.run}: {result['iterations']} iterations"
          + (f" (resumed at {result['resumed_from']})" if result["resumed_from"] else "") + f" -> {run_dir}")
    return 0


def local_processes(train_cfg: dict) -> int:
    """Processes to start on this machine: ``train.processes`` (the recipe's layout), but on a GPU machine at
    most one per visible GPU; the trainer then keeps the batch by accumulation and says what differs."""
    import torch

    wanted = int(train_cfg.get("processes", 1))
    device = str(train_cfg.get("device", "auto"))
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return max(1, min(wanted, torch.cuda.device_count()))
    return wanted


def launch_local_processes(processes: int, args: argparse.Namespace) -> int:
    """Start ``processes`` copies of this command on this machine (as torchrun would)."""
    import uuid

    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    argv = ["-m", "sim_core", "train", "--name", args.run, "--params", args.params]
    for override in args.overrides:
        argv += ["--set", override]
    if args.run_dir:
        argv += ["--run-dir", args.run_dir]
    if args.no_progress:
        argv.append("--no-progress")
    if args.restart:
        argv.append("--restart")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
    elastic_launch(config, entrypoint=sys.executable)(*argv)
    print(f"trained {args.run} with {processes} processes")
    return 0
