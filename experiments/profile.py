"""``simbench profile NAME``: make a packaged profile the active params file.

Profiles are complete, flat params sets in ``experiments/profiles/`` (no
inheritance). Switching scale is this one command; a single setting can then
be varied with ``dvc exp run -S key=value``.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="profile name (omit with --list)")
    parser.add_argument("--list", action="store_true", help="list the profiles")
    parser.add_argument("--params", default="params.yaml", help="file to write (default: params.yaml)")


def main(args: argparse.Namespace) -> int:
    from sim_core.config import available_profiles, profile_path, read_yaml, validate_params
    from sim_core.errors import InputError
    from sim_core.io_utils import atomic_write_text

    if args.list or not args.name:
        print("\n".join(available_profiles()))
        return 0
    path = profile_path(args.name)
    params = read_yaml(path)
    validate_params(params, source=str(path))
    if params.get("profile") != args.name:
        raise InputError(path, f"its 'profile' key says '{params.get('profile')}', expected '{args.name}'")
    atomic_write_text(args.params, path.read_text(encoding="utf-8"))
    print(f"{args.params} <- profile {args.name} ({len(params.get('runs') or {})} runs)")
    return 0
