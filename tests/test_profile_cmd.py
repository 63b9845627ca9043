"""``simbench profile NAME`` never discards a user's work.

It replaces params.yaml only when the file is a packaged profile or its
committed version; any other file needs ``--force``, and is then kept as a
named backup first.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from sim_core.cli import main

PROFILES = Path(__file__).resolve().parents[1] / "experiments" / "profiles"


def _profile(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(["profile", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _backups(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.bak-*"))


def test_no_params_file_yet(tmp_path, capsys):
    target = tmp_path / "params.yaml"
    assert _profile(["smoke", "--params", str(target)], capsys)[0] == 0
    assert target.read_bytes() == (PROFILES / "smoke.yaml").read_bytes() and not _backups(target)


def test_a_packaged_profile_is_replaced_without_backup(tmp_path, capsys):
    target = tmp_path / "params.yaml"
    shutil.copy(PROFILES / "demo.yaml", target)
    code, out, _ = _profile(["smoke", "--params", str(target)], capsys)
    assert code == 0 and "kept as" not in out
    assert target.read_bytes() == (PROFILES / "smoke.yaml").read_bytes() and not _backups(target)


def test_changed_params_are_refused_and_kept(tmp_path, capsys):
    target = tmp_path / "params.yaml"
    mine = (PROFILES / "demo.yaml").read_text().replace("max_iter: ", "max_iter: 1", 1)
    target.write_text(mine)
    code, _, err = _profile(["smoke", "--params", str(target)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert str(target) in err and "--force" in err and "changes of your own" in err
    assert target.read_text() == mine and not _backups(target)


def test_force_keeps_a_named_backup(tmp_path, capsys):
    target = tmp_path / "params.yaml"
    mine = "# my experiment\n" + (PROFILES / "demo.yaml").read_text()
    target.write_text(mine)
    code, out, _ = _profile(["smoke", "--force", "--params", str(target)], capsys)
    (backup,) = _backups(target)
    assert code == 0 and str(backup) in out
    assert backup.read_text() == mine and target.read_bytes() == (PROFILES / "smoke.yaml").read_bytes()
    target.write_text(mine + "# again\n")  # a second forced switch in the same second: a new backup name
    assert _profile(["demo", "--force", "--params", str(target)], capsys)[0] == 0
    assert len(_backups(target)) == 2


@pytest.mark.skipif(shutil.which("git") is None, reason="git is needed to commit a params file")
def test_the_committed_version_is_replaced_without_force(tmp_path, capsys):
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    target = tmp_path / "params.yaml"
    committed = "# the team's settings\n" + (PROFILES / "demo.yaml").read_text()
    target.write_text(committed)
    for cmd in (["init", "-q"], ["add", "params.yaml"], ["commit", "-q", "-m", "params"]):
        subprocess.run(["git", *cmd], cwd=tmp_path, env=env, check=True)
    assert _profile(["smoke", "--params", str(target)], capsys)[0] == 0  # recoverable with git
    target.write_text(committed + "# uncommitted\n")
    assert _profile(["demo", "--params", str(target)], capsys)[0] == 2  # back to smoke? no: changed since
    target.write_text(committed)
    assert _profile(["demo", "--params", str(target)], capsys)[0] == 0
