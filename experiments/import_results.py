"""``simbench import --from adelaidet|mmdet|boxlevelset --file F --gt GT.json --out R.json [--category-ids RULE|MAP]``.

Brings results produced by the original code bases (run in their own
environments, see ``docs/upstream.md``) into simbench's results format, so the
same evaluator scores them and the report lists them as "external" rows.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="fmt", required=True, choices=["adelaidet", "mmdet", "boxlevelset"],
                        help="the code base that wrote the results: adelaidet (BoxInst, SIM), mmdet, boxlevelset")
    parser.add_argument("--file", dest="files", action="append", required=True,
                        help="upstream results file (repeat for *.segm.json and *.bbox.json)")
    parser.add_argument("--gt", required=True, help="the GT json the upstream run was tested on")
    parser.add_argument("--out", required=True, help="simbench segm results json to write (bbox.json beside it)")
    parser.add_argument("--category-ids", default="auto", metavar="RULE|MAP",
                        help="how the file's category ids map to the GT json's: auto (default; stops when "
                             "ambiguous), original, contiguous0 (0-based labels: i -> i-th GT id in ascending "
                             "order), contiguous1 (1-based), or an explicit mapping FROM:TO,... (e.g. 0:1,1:5) "
                             "or the path of a JSON object {\"FROM\": TO}")


def main(args: argparse.Namespace) -> int:
    from baselines.external import import_results, parse_category_ids

    summary = import_results(args.fmt, [Path(f) for f in args.files], Path(args.gt), Path(args.out),
                             category_ids=parse_category_ids(args.category_ids))
    print(f"imported {args.fmt} results -> {args.out}: {summary}")
    return 0
