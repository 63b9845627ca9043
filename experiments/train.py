"""``simbench train --run NAME``: train one run of the params' ``runs`` matrix.

Works unchanged under ``torchrun`` (one or many GPUs, one or many nodes) and
resumes from ``runs/<run>/last.ckpt`` when one exists.
"""
from __future__ import annotations

import argparse
import sys

from experiments.common import add_params_arguments, load_params_from_args, run_dir_for


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run name declared in params 'runs'")
    add_params_arguments(parser)
    parser.add_argument("--run-dir", default=None, help="output directory (default: <train.runs_dir>/<run>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    from sim_core.config import resolve_run
    from sim_core.engine.trainer import train_run

    params = load_params_from_args(args)
    resolved = resolve_run(params, args.run)
    run_dir = run_dir_for(params, args.run, args.run_dir)
    result = train_run(resolved, run_dir, progress=not args.no_progress and sys.stderr.isatty())
    print(f"trained {args.run}: {result['iterations']} iterations"
          + (f" (resumed at {result['resumed_from']})" if result["resumed_from"] else "") + f" -> {run_dir}")
    return 0
