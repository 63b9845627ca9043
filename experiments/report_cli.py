"""``simbench report [--out reports/out] [--allow-stale]``: tables, figures and report.pdf.

Reads only metrics, logs, results files and ``reports/paper_numbers.yaml``;
never trains. Runs that have no metrics yet are shown as missing. Before
anything is written, every run with metrics is checked
(``sim_core.engine.records.check_matrix``): its ``model.pt``, ``run.json`` and
``metrics.json`` must agree with each other and with the current params. A
stale run stops the report with exit code 2, naming it and the mismatch;
``--allow-stale`` instead moves stale runs out of the comparison tables into a
table of their own, marked as stale. With no evaluated run at all the report
stops with exit code 2.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from experiments.common import add_params_arguments, load_params_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="reports/out", help="output directory (default: reports/out)")
    parser.add_argument("--allow-stale", action="store_true",
                        help="list runs whose records disagree with the params in a marked table of their own "
                             "instead of stopping")
    add_params_arguments(parser)


def stale_runs(params: dict, allow_stale: bool) -> dict[str, str]:
    """Evaluated runs whose records are stale, as ``{run: why}``; raises unless ``allow_stale``."""
    from sim_core.engine.records import check_matrix
    from sim_core.errors import InputError

    checks = [c for c in check_matrix(params) if c.evaluated]
    if not checks:
        raise InputError("report", "no run of params 'runs' has been evaluated (no metrics.json): "
                                   "run simbench evaluate --run NAME, or simbench repro")
    stale = {c.run: "; ".join(c.problems) for c in checks if not c.fresh}
    if stale and not allow_stale:
        listed = "; ".join(f"run '{name}': {why}" for name, why in stale.items())
        raise InputError("report", f"{len(stale)} stale run(s): {listed} (simbench status shows every run; "
                                   "retrain or re-evaluate them, or pass --allow-stale to list them apart)")
    return stale


def main(args: argparse.Namespace) -> int:
    from experiments.report import run_report

    params = load_params_from_args(args)
    stale = stale_runs(params, args.allow_stale)
    run_report(params, Path(params["train"]["runs_dir"]), Path(args.out), stale=stale)
    print(f"report -> {args.out}" + (f" ({len(stale)} stale run(s) listed apart)" if stale else ""))
    return 0
