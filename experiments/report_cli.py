"""``simbench report [--out reports/out]``: tables, figures and report.pdf.

Reads only metrics, logs, results files and ``reports/paper_numbers.yaml``;
never trains. Runs that have no metrics yet are shown as missing.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from experiments.common import add_params_arguments, load_params_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="reports/out", help="output directory (default: reports/out)")
    add_params_arguments(parser)


def main(args: argparse.Namespace) -> int:
    from experiments.report import run_report

    params = load_params_from_args(args)
    run_report(params, Path(params["train"]["runs_dir"]), Path(args.out))
    print(f"report -> {args.out}")
    return 0
