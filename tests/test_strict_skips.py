"""The CI hook: under SIMBENCH_STRICT_SKIPS=1 a skip for a missing TeX, pdfinfo or coco128 fails.

Runs a small test file in a pytest subprocess with the hook of
``tests/strict_skips.py``, once as a user (skips stay skips) and once as CI.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from strict_skips import COCO128_MISSING, PDFINFO_MISSING, PDFLATEX_MISSING, STRICT_SKIPS_ENV

TESTS = Path(__file__).resolve().parent

PROBE = f'''
import pytest

def test_tex():
    pytest.skip({PDFLATEX_MISSING!r})

@pytest.mark.skipif(True, reason={PDFINFO_MISSING!r})
def test_pdfinfo():
    pass

def test_coco128():
    pytest.skip({COCO128_MISSING!r} + " ../shared/datasets/coco128")

def test_other_reason():
    pytest.skip("torch.distributed is not available in this build")

def test_passes():
    pass
'''


def _run_probe(tmp_path: Path, strict: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "conftest.py").write_text(
        f"import sys\nsys.path.insert(0, {str(TESTS)!r})\nfrom strict_skips import pytest_runtest_makereport\n")
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != STRICT_SKIPS_ENV}
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # only the hook under test (and seconds faster)
    if strict is not None:
        env[STRICT_SKIPS_ENV] = strict
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "test_probe.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("strict", [None, "0"])
def test_users_may_skip(tmp_path, strict):
    done = _run_probe(tmp_path, strict)
    assert done.returncode == 0, done.stdout
    assert "1 passed, 4 skipped" in done.stdout


def test_ci_fails_on_environment_skips(tmp_path):
    done = _run_probe(tmp_path, "1")
    assert done.returncode == 1, done.stdout
    summary = done.stdout.strip().splitlines()[-1]
    # only the unrelated skip stays a skip; a skip at setup (a skipif mark) shows as an error
    assert summary.startswith("2 failed, 1 passed, 1 skipped, 1 error"), summary
    for name in ("test_tex", "test_pdfinfo", "test_coco128"):
        assert any(name in line and ("FAILED" in line or "ERROR" in line) for line in done.stdout.splitlines()), name
    assert f"{STRICT_SKIPS_ENV} is set (CI)" in done.stdout
