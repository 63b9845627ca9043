"""``simbench upstream``: train and test the authors' own code on simbench's data, score it with simbench.

    simbench upstream --run NAME [--params params.yaml] [--set key=value ...]
        run ``upstream_runs.NAME`` (code adelaidet or sim) from the checkout named by
        ``upstream.<code>.root``; writes runs/NAME/{segm.json, bbox.json, metrics.json, run.json}
    simbench upstream check --code adelaidet|sim [--root BUILT] [--python PY] [--params ...]
        only check the environment (checkout, detectron2, compiled ops)
    simbench upstream setup --code adelaidet|sim --root CLONE [--out DIR] [--python PY] [--no-build]
        copy a fresh clone to DIR, apply the current-torch C++ fixes and build its ops in place
    simbench upstream crosscheck --run NAME [--images N] [--iteration I] [--params ...]
        same weights, same batch: simbench's BoxInst against the original's loss by loss and gradient by
        gradient (baselines/crosscheck.py); writes runs/NAME/crosscheck/crosscheck.json

The logic is in ``baselines/upstream.py``; the steps by hand are in docs/upstream.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from experiments.common import add_params_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", default="run", choices=["run", "check", "setup", "crosscheck"],
                        help="run (default): an upstream_runs entry; check: the environment; setup: build a clone; "
                             "crosscheck: compare one forward/backward with simbench's on the same weights")
    parser.add_argument("--run", default=None, help="name of an upstream_runs entry in params")
    parser.add_argument("--runs-dir", default=None, help="runs directory (default: train.runs_dir)")
    parser.add_argument("--code", default=None, choices=["adelaidet", "sim"], help="check/setup: which code base")
    parser.add_argument("--root", default=None, help="setup: the clone to build (left untouched with --out); "
                                                     "check: the built checkout (default: upstream.<code>.root)")
    parser.add_argument("--out", default=None, help="setup: where the fixed copy goes (default: edit --root)")
    parser.add_argument("--python", default=None, help="setup: interpreter to build with; check: the interpreter "
                                                       "to check (default: upstream.python)")
    parser.add_argument("--no-build", action="store_true", help="setup: apply the fixes only")
    parser.add_argument("--images", type=int, default=4, help="crosscheck: training images in the batch")
    parser.add_argument("--iteration", type=int, default=None,
                        help="crosscheck: the training step the losses are taken at (default: half the schedule)")
    parser.add_argument("--quiet", action="store_true", help="do not echo the upstream log (it is still written)")
    add_params_arguments(parser)


def main(args: argparse.Namespace) -> int:
    from baselines import upstream
    from sim_core.errors import InputError

    if args.action == "setup":
        if not (args.code and args.root):
            raise InputError("upstream setup", "give --code adelaidet|sim and --root CLONE (a git clone of "
                                               f"{upstream.CODES.get(args.code or 'adelaidet')['repo']})")
        python = args.python or _section(args).get("python") or sys.executable
        summary = upstream.setup_checkout(args.code, Path(args.root), Path(args.out) if args.out else None,
                                          python, build=not args.no_build,
                                          echo=None if args.quiet else sys.stderr)
        print(json.dumps(summary, indent=1))
        print(f"set upstream.{args.code}.root: {summary['checkout']}")
        return 0
    if args.action == "check":
        if not args.code:
            raise InputError("upstream check", "give --code adelaidet|sim")
        section = dict(_section(args))
        # --python / --root name the interpreter and the built checkout as setup's flags do (else params')
        if args.python:
            section["python"] = args.python
        if args.root:
            section[args.code] = {**(section.get(args.code) or {}), "root": args.root}
        info = upstream.check_environment(args.code, section)
        print(json.dumps(info, indent=1))
        return 0

    from sim_core.config import load_params

    # --run names an upstream_runs entry, not a `runs` one: load without it (train.seed / train.method are
    # refused as for any verb; the entry's own seed and code set them)
    params = load_params(args.params, args.overrides)
    declared = params.get("upstream_runs") or {}
    if not args.run:
        if not declared:
            raise InputError("upstream", "no upstream run declared: clone and build the original code "
                                         "(simbench upstream setup --code adelaidet --root CLONE --out DIR), set "
                                         "upstream.adelaidet.root: DIR and add upstream_runs: {NAME: {code: "
                                         "adelaidet}} to params, then simbench upstream --run NAME (docs/upstream.md)")
        raise InputError("upstream", f"give --run NAME; upstream_runs declared: {', '.join(map(str, declared))}")
    if args.action == "crosscheck":
        from baselines import crosscheck

        report = crosscheck.run_crosscheck(params, args.run, Path(args.runs_dir) if args.runs_dir else None,
                                           num_images=args.images, iteration=args.iteration,
                                           echo=None if args.quiet else sys.stderr)
        print(crosscheck.format_report(report))
        return 0 if report["losses_agree"] and report["gradients_agree"] else 1
    record = upstream.run_upstream(params, args.run, Path(args.runs_dir) if args.runs_dir else None,
                                   echo=None if args.quiet else sys.stderr)
    for iou_type in ("segm", "bbox"):
        values = record.get(iou_type) or {}
        print(f"{iou_type:5s} " + "  ".join(f"{k}={'n/a' if v is None else f'{100 * v:.1f}'}"
                                            for k, v in values.items()))
    return 0


def _section(args: argparse.Namespace) -> dict:
    """The ``upstream`` params section (empty when the params file has none or does not exist)."""
    if not Path(args.params).is_file():
        return {}
    from experiments.common import load_params_from_args

    return load_params_from_args(args).get("upstream") or {}
