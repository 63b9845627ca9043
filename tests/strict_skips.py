"""CI mode: a test that skips because the machine lacks TeX, ``pdfinfo`` or coco128 fails instead.

On a user's machine these tests skip (the README says so). ``.ci/run`` sets
``SIMBENCH_STRICT_SKIPS=1``; then a skip whose reason names one of the
:data:`ENVIRONMENT_SKIPS` is reported as a failure, so CI cannot pass with
them silently skipped. Skips for other reasons (no ``torch.distributed``, no
git) are left alone.

Loaded by ``tests/conftest.py`` (which imports the hook); a plain module so
the hook can be tested in a subprocess of its own.
"""
from __future__ import annotations

import os
import re

import pytest

STRICT_SKIPS_ENV = "SIMBENCH_STRICT_SKIPS"

# Skip reasons these tests use (keep them recognisable: each names the missing tool or data set).
PDFLATEX_MISSING = "pdflatex not installed (TeX: texlive-latex-recommended)"
PDFINFO_MISSING = "pdfinfo not installed (poppler-utils)"
COCO128_MISSING = "coco128 not found at"  # + the path (../shared/datasets/coco128)
ENVIRONMENT_SKIPS = re.compile(r"pdflatex|pdfinfo|\bTeX\b|texlive|coco128\b.*not found|shared/datasets/coco128",
                               re.IGNORECASE)


def strict() -> bool:
    return os.environ.get(STRICT_SKIPS_ENV, "") not in ("", "0")


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not (report.skipped and strict()) or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    if ENVIRONMENT_SKIPS.search(reason):
        report.outcome = "failed"
        report.longrepr = (f"{STRICT_SKIPS_ENV} is set (CI): this test may not skip, but it did: {reason}. "
                           "Install what it names (see .ci/run) or put coco128 at ../shared/datasets/coco128.")
