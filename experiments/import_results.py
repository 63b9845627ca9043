"""``simbench import --from adelaidet|mmdet|boxlevelset --file F --out R.json``.

Brings results produced by the original code bases (run in their own
environments, see ``docs/upstream.md``) into simbench's results format, so the
same evaluator scores them and the report lists them as "external" rows.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="fmt", required=True, choices=["adelaidet", "mmdet", "boxlevelset"])
    parser.add_argument("--file", dest="files", action="append", required=True,
                        help="upstream results file (repeat for *.segm.json and *.bbox.json)")
    parser.add_argument("--gt", required=True, help="the GT json the upstream run was tested on")
    parser.add_argument("--out", required=True, help="simbench segm results json to write (bbox.json beside it)")


def main(args: argparse.Namespace) -> int:
    from baselines.external import import_results

    summary = import_results(args.fmt, [Path(f) for f in args.files], Path(args.gt), Path(args.out))
    print(f"imported {args.fmt} results -> {args.out}: {summary}")
    return 0
