"""Property-based fuzzing of the real CLI verbs with corrupted dataset and results jsons.

Strategies start from valid files (the tiny COCO set of conftest.py and a
results file that scores on it) and corrupt them: drop, duplicate and retype
keys; NaN, infinities, huge and negative numbers; unicode and path tricks in
names; truncated text. Each example runs ``simbench evaluate``, ``import`` or
``prepare custom`` in-process (``sim_core.cli.main``) with captured output;
the packaged demo params, corrupted the same way and written as YAML, go
through ``simbench repro --dry`` and ``simbench train``.

Property: exit 0 with valid outputs, or exit 2 with exactly one stderr line;
never a traceback or another exit code, never longer than the per-example
timeout (SIGALRM), never a file outside ``--out``.

Profiles (``SIMBENCH_FUZZ_PROFILE``): ``ci`` (the default: derandomized,
fixed examples, about a minute for the file) and ``nightly`` (random, many
more examples per verb; run ``SIMBENCH_FUZZ_PROFILE=nightly pytest
tests/test_fuzz_cli.py``).
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import build_tiny_coco  # noqa: E402

from sim_core.cli import main  # noqa: E402
from sim_core.evaluation.results import encode_mask  # noqa: E402

settings.register_profile("ci", max_examples=30, derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("nightly", max_examples=1500, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = os.environ.get("SIMBENCH_FUZZ_PROFILE", "ci")
EXAMPLE_TIMEOUT = 20  # seconds; the tiny set evaluates in well under one


class Hang(Exception):
    pass


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    # Import everything the verbs import lazily now: the per-example alarm must never fire inside
    # an import (torch cannot be imported again after an interrupted import).
    import importlib

    from sim_core.cli import build_parser

    build_parser()
    for name in ("baselines.external", "sim_core.data.prepare", "sim_core.evaluation.coco_eval",
                 "pycocotools.cocoeval", "faster_coco_eval", "torch"):
        importlib.import_module(name)
    tiny = build_tiny_coco(tmp_path_factory.mktemp("fuzz") / "tiny")
    results = []
    for ann in tiny.base["annotations"]:
        image = next(im for im in tiny.base["images"] if im["id"] == ann["image_id"])
        mask = tiny.masks[ann["id"]]
        assert mask.shape == (image["height"], image["width"])
        results.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "score": 0.8,
                        "bbox": ann["bbox"], "segmentation": encode_mask(mask)})
    return tiny, results


# ---------------------------------------------------------------------------- strategies
WEIRD = st.sampled_from([
    None, True, False, 0, -1, 1, 2**31, 2**63, 10**30, -10**30, 1e308, -1e308, 1e-308, 0.5, -0.0,
    float("nan"), float("inf"), float("-inf"), "", "0", "1.5", "nan", "ü\u2028x", "../../escaped", "/etc/passwd",
    "a\nb", "\x00", "C:\\x", "~", "𝔘𝔫𝔦", [], [1], [[]], [1, 2, 3], {}, {"a": 1}, {"size": [30, 40], "counts": "0"},
    {"size": [30, 40], "counts": [1200]}, {"size": [30, 40], "counts": "o" * 40}, [[1, 2, 3, 4, 5, 6, 7]],
    [["x", 1, 2, 3, 4, 5]], [[1e12, 1e12, -1e12, 0, 5, 5]],
])
FRESH_WEIRD = WEIRD.map(copy.deepcopy)  # the pool's lists and dicts must not be edited in place


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(obj, list):
        for index, value in enumerate(obj[:12]):
            yield from _paths(value, prefix + (index,))


def _get(obj, path):
    for key in path:
        obj = obj[key]
    return obj


@st.composite
def corrupted(draw, original):
    """``original`` (a JSON value) after 1-3 random edits, as text (possibly truncated)."""
    obj = json.loads(json.dumps(original))
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(obj))
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(["drop", "duplicate", "retype", "scale", "rename"]))
        if not path:
            if op == "retype":
                obj = draw(FRESH_WEIRD)
            continue
        parent, key = _get(obj, path[:-1]), path[-1]
        if op == "drop":
            del parent[key]
        elif op == "duplicate":
            if isinstance(parent, list):
                parent.insert(key, json.loads(json.dumps(parent[key])))
            else:
                parent[f"{key}_copy"] = parent[key]
        elif op == "retype":
            parent[key] = draw(FRESH_WEIRD)
        elif op == "scale":
            value = parent[key]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                factor = draw(st.sampled_from([-1, 0, 1e9, 1e300, -7, 2**40]))
                parent[key] = value * factor
            elif isinstance(value, str):
                parent[key] = value + draw(st.sampled_from(["\x00", "/..", "é", "\u2029", "o" * 30, "'"]))
            else:
                parent[key] = draw(FRESH_WEIRD)
        elif op == "rename" and isinstance(parent, dict):
            parent[draw(st.sampled_from(["ID", "id ", "file_name", "segmentation", "é"]))] = parent.pop(key)
    text = json.dumps(obj, allow_nan=True)
    if draw(st.integers(0, 9)) == 0:
        text = text[: draw(st.integers(0, max(0, len(text) - 1)))]
    return text


# ---------------------------------------------------------------------------- the property
def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def run_cli(argv: list[str], work: Path, out: Path) -> tuple[int, str]:
    """Run the CLI in ``work`` (as cwd); check the property except the verb's own output checks."""
    before = _tree(work)
    stdout, stderr = io.StringIO(), io.StringIO()
    old = signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(Hang(f"no answer in {EXAMPLE_TIMEOUT}s")))
    cwd = os.getcwd()
    os.chdir(work)
    signal.alarm(EXAMPLE_TIMEOUT)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = main(argv)
            except SystemExit as exc:
                code = exc.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        os.chdir(cwd)
    err = stderr.getvalue()
    assert "Traceback" not in err, err
    if code == 2:
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("simbench: error: "), err
    else:
        assert code == 0, (code, err)
    outside = {p for p in _tree(work) - before
               if not (work / p).resolve().is_relative_to(out.resolve()) and not p.startswith(out.name)}
    assert not outside, f"written outside --out: {sorted(outside)}"
    return code, err


def _strict_json(path: Path):
    def refuse(name):
        raise ValueError(f"{name} in {path}")
    return json.loads(path.read_text(), parse_constant=refuse)


@contextlib.contextmanager
def workdir():
    path = Path(tempfile.mkdtemp(prefix="fuzz-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _check_metrics(path: Path) -> None:
    metrics = _strict_json(path)
    for iou_type in ("segm", "bbox"):
        for value in (metrics.get(iou_type) or {}).values():
            assert value is None or 0.0 <= value <= 1.0, metrics


def _given(strategy):
    return lambda fn: settings.get_profile(PROFILE)(given(strategy)(fn))


@pytest.mark.parametrize("which", ["gt", "results"])
def test_fuzz_evaluate(base, which):
    tiny, results = base

    @_given(st.data())
    def check(data):
        text = data.draw(corrupted(tiny.base if which == "gt" else results))
        with workdir() as work:
            gt, res = work / "gt.json", work / "results.json"
            gt.write_text(text if which == "gt" else json.dumps(tiny.base))
            res.write_text(text if which == "results" else json.dumps(results))
            out = work / "out"
            iou = data.draw(st.sampled_from(["segm,bbox", "bbox", "segm"]))
            code, _ = run_cli(["evaluate", "--gt", str(gt), "--results", str(res), "--iou", iou,
                               "--out", str(out / "metrics.json")], work, out)
            if code == 0:
                _check_metrics(out / "metrics.json")
            else:
                assert not out.exists()

    check()


def test_fuzz_import(base):
    tiny, results = base

    @_given(st.data())
    def check(data):
        with workdir() as work:
            upstream = work / "run.segm.json"
            upstream.write_text(data.draw(corrupted(results)))
            out = work / "out"
            code, _ = run_cli(["import", "--from", "mmdet", "--file", str(upstream), "--gt", str(tiny.ann_path),
                               "--out", str(out / "segm.json")], work, out)
            if code == 0:
                from sim_core.data.validate import check_results, load_gt

                gt = load_gt(tiny.ann_path)
                check_results(_strict_json(out / "segm.json"), gt, "segm", "segm")
                boxes = _strict_json(out / "bbox.json")
                check_results(boxes, gt, "bbox", "bbox")
                assert all(b["bbox"][2] <= 40 and b["bbox"][3] <= 40 for b in boxes)
            else:
                assert not out.exists()

    check()


def test_fuzz_prepare_custom(base):
    tiny, _ = base

    @_given(st.data())
    def check(data):
        with workdir() as work:
            train = work / "train.json"
            train.write_text(data.draw(corrupted(tiny.base)))
            out = work / "out"
            code, _ = run_cli(["prepare", "custom", "--images", str(tiny.image_dir), "--train-ann", str(train),
                               "--val-ann", str(tiny.ann_path), "--out", str(out)], work, out)
            if code == 0:
                from sim_core.data.coco import load_coco

                for split in ("train", "val"):
                    load_coco(out / f"{split}.json", out / "images")
            else:
                assert not out.exists()

    check()


def test_weird_values_cover_the_issue():
    """The value pool holds every kind of bad value the fuzzing promises (a guard against it shrinking)."""
    pool = WEIRD.wrapped_strategy.elements if hasattr(WEIRD, "wrapped_strategy") else WEIRD.elements
    floats = [v for v in pool if isinstance(v, float)]
    assert any(math.isnan(v) for v in floats) and any(math.isinf(v) for v in floats)
    assert any(isinstance(v, str) and ".." in v for v in pool) and 10**30 in pool and -1 in pool


@pytest.fixture(scope="module")
def demo_params():
    """The packaged demo profile as plain data (the schema every params file is checked against)."""
    import yaml

    from sim_core.config import profile_path

    return yaml.safe_load(profile_path("demo").read_text(encoding="utf-8"))


def _as_yaml(text: str) -> str:
    """The corrupted JSON text as YAML a user would write (PyYAML reads JSON's ``1e-05`` as a string);
    truncated text stays as it is. Values shared by a "duplicate" edit become YAML aliases."""
    import yaml

    try:
        return yaml.safe_dump(json.loads(text), allow_unicode=True)
    except ValueError:
        return text


@pytest.mark.parametrize("verb", ["repro", "train"])
def test_fuzz_params(base, demo_params, verb):
    """Corrupted params files through ``repro --dry`` and ``train``.

    ``train`` points ``data.root`` at a folder that does not exist, so a params
    file that passes every check still stops (exit 2, naming the missing
    annotation file) before any work: either way nothing may be written.
    """

    @_given(st.data())
    def check(data):
        with workdir() as work:
            params = work / "params.yaml"
            params.write_text(_as_yaml(data.draw(corrupted(demo_params))))
            nothing = work / "nothing-may-be-written"
            if verb == "repro":
                argv = ["repro", "--dry", "--params", str(params)]
            else:
                run = data.draw(st.sampled_from(["mask_s0", "sim_s0", "../escaped", "é", ""]))
                argv = ["train", "--run", run, "--params", str(params), "--no-progress",
                        "--set", f"data.root={work / 'no-data'}"]
            code, _ = run_cli(argv, work, nothing)
            assert verb == "repro" or code == 2  # train never gets past the missing data
            assert not nothing.exists() and not (work / "runs").exists()

    if verb == "repro":  # the uncorrupted file passes, so exit 0 is reachable for the property
        with workdir() as work:
            (work / "params.yaml").write_text(_as_yaml(json.dumps(demo_params)))
            assert run_cli(["repro", "--dry", "--params", str(work / "params.yaml")], work, work / "x")[0] == 0
    check()
