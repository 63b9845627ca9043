"""``simbench profile NAME``: make a packaged profile the active params file.

Profiles are complete, flat params sets in ``experiments/profiles/`` (no
inheritance). Switching scale is this one command; a single setting can then
be varied with ``dvc exp run -S key=value``.

The command never discards a user's work: it replaces ``params.yaml`` only
when the file is byte-for-byte a packaged profile or the committed version
(``git show HEAD:params.yaml``). Any other params.yaml holds changes of the
user's; then it stops (exit 2) unless ``--force`` is given, and with
``--force`` it first copies the file to ``params.yaml.bak-<timestamp>``, which
the message names.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="profile name (omit with --list)")
    parser.add_argument("--list", action="store_true", help="list the profiles")
    parser.add_argument("--params", default="params.yaml", help="file to write (default: params.yaml)")
    parser.add_argument("--force", action="store_true",
                        help="replace a params file with changes of your own (it is kept as <file>.bak-<time>)")


def committed_version(path: Path) -> bytes | None:
    """``path`` as committed at git's HEAD; None outside a git work tree or when it is not committed."""
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=path.parent, capture_output=True,
                             text=True, timeout=30)
        if top.returncode != 0:
            return None
        relative = path.resolve().relative_to(Path(top.stdout.strip()).resolve())
        shown = subprocess.run(["git", "show", f"HEAD:{relative.as_posix()}"], cwd=top.stdout.strip(),
                               capture_output=True, timeout=30)
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    return shown.stdout if shown.returncode == 0 else None


def is_pristine(path: Path, packaged: list[Path]) -> bool:
    """True when replacing ``path`` loses nothing: it equals a packaged profile or its committed version."""
    current = path.read_bytes()
    return any(current == p.read_bytes() for p in packaged) or current == committed_version(path)


def backup(path: Path) -> Path:
    """Copy ``path`` to ``<path>.bak-<YYYYmmdd-HHMMSS>`` (a new name, never overwriting a backup)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.bak-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.bak-{stamp}-{n}")
    shutil.copy2(path, target)
    return target


def profile_description(path: Path, limit: int = 110) -> str:
    """The profile file's opening comment, without its ``<name>:`` lead, cut to its first sentence."""
    lines: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.lstrip("#").strip()
        if not line.startswith("#") or (lines and not text[:1].islower()):  # a new sentence: the lead is over
            break
        lines.append(text)
    text = " ".join(lines)
    for lead in (f"{path.stem}:", f"{path.stem} profile:"):
        if text.startswith(lead):
            text = text[len(lead):].strip()
    first = re.split(r"(?<=\.)\s", text, maxsplit=1)[0]
    return first if len(first) <= limit else first[:limit - 3].rstrip() + "..."


def main(args: argparse.Namespace) -> int:
    from sim_core.config import PROFILES_DIR, available_profiles, profile_path, read_yaml, validate_params
    from sim_core.errors import InputError
    from sim_core.io_utils import atomic_write_text

    if args.list or not args.name:
        names = available_profiles()
        width = max(map(len, names))
        print("\n".join(f"{name.ljust(width)}  {profile_description(PROFILES_DIR / f'{name}.yaml')}" for name in names))
        return 0
    path = profile_path(args.name)
    params = read_yaml(path)
    validate_params(params, source=str(path))
    if params.get("profile") != args.name:
        raise InputError(path, f"its 'profile' key says '{params.get('profile')}', expected '{args.name}'")
    target = Path(args.params)
    kept = None
    if target.exists():
        if not target.is_file():
            raise InputError(target, "exists and is not a file")
        if args.force or not is_pristine(target, sorted(PROFILES_DIR.glob("*.yaml"))):
            if not args.force:
                raise InputError(target, "has changes of your own (it matches no packaged profile and not the "
                                         "committed version); commit or copy it first, or pass --force to "
                                         f"replace it (it is then kept as {target.name}.bak-<time>)")
            kept = backup(target)
    atomic_write_text(target, path.read_text(encoding="utf-8"))
    print(f"{target} <- profile {args.name} ({len(params.get('runs') or {})} runs)"
          + (f"; the replaced file is kept as {kept}" if kept else ""))
    return 0
