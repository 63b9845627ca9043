"""``simbench status``: one line per run of the matrix: trained, evaluated, fresh or stale and why.

A run is *fresh* when its ``model.pt``, ``run.json`` and ``metrics.json``
agree with each other and with the current params for that run
(``sim_core.engine.records.check_run``); ``simbench report`` refuses stale
runs. Exit code 0 whatever the state (it is a query); ``--check`` makes it 1
when any run is not fresh.
"""
from __future__ import annotations

import argparse

from experiments.common import add_params_arguments, load_params_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_params_arguments(parser)
    parser.add_argument("--check", action="store_true", help="exit 1 when any run is not trained, evaluated "
                                                              "and fresh")


def describe(check) -> str:  # noqa: ANN001 (a records.RunCheck)
    """One line: ``name  trained 700/700  evaluated  fresh`` (or ``stale: why``)."""
    trained = "not trained" if check.iterations is None else f"trained {check.iterations}/{check.max_iter}"
    if check.max_iter is None:
        trained = "imported results"
    if check.problems == ["not trained"]:
        state = "to do"  # nothing recorded yet: nothing to be stale
    else:
        state = "fresh" if check.fresh else "stale: " + "; ".join(check.problems)
    if check.fresh and check.commits:
        state += f" (code {', '.join(c[:12] + ('+dirty' if c.endswith('+dirty') else '') for c in check.commits)})"
    return f"{check.run}  {trained}  {'evaluated' if check.evaluated else 'not evaluated'}  {state}"


def main(args: argparse.Namespace) -> int:
    from sim_core.engine.records import check_matrix

    params = load_params_from_args(args)
    checks = check_matrix(params)
    width = max((len(c.run) for c in checks), default=0)
    for check in checks:
        line = describe(check)
        print(check.run.ljust(width) + line[len(check.run):])
    if not checks:
        print("no runs declared in params 'runs'")
    return 1 if args.check and not all(c.fresh and c.evaluated for c in checks) else 0
