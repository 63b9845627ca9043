"""Arguments shared by the stage entry points."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_params_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one params key, e.g. --set train.max_iter=100 (repeatable)")


def load_params_from_args(args: argparse.Namespace) -> dict:
    from sim_core.config import load_params

    # With the run the command works on, an override that run would ignore (train.seed, ...) is refused.
    return load_params(args.params, args.overrides, run=getattr(args, "run", None))


def run_dir_for(params: dict, run_name: str, explicit: str | None = None) -> Path:
    return Path(explicit) if explicit else Path(params["train"]["runs_dir"]) / run_name


def split_mask_counts(path: Path) -> tuple[int, int]:
    """``(with a mask, all)`` non-crowd annotations of a prepared split json (box-only data has none)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    solid = [a for a in data.get("annotations", []) if not a.get("iscrowd")]
    return sum(bool(a.get("segmentation")) for a in solid), len(solid)


def require_prepared(resolved: dict, split: str) -> Path:
    """``<data.root>/<split>.json``, or exit 2 naming the command that prepares it."""
    from sim_core.errors import InputError

    data = resolved["data"]
    path = Path(data["root"]) / f"{split}.json"
    if not path.is_file():
        args = f" {data['prepare_args']}" if str(data.get("prepare_args") or "").strip() else ""
        raise InputError(path, f"prepared data not found; make it with: simbench prepare {data['dataset']}{args} "
                               f"--out {data['root']} (or: dvc repro prepare)")
    return path
