"""The DVC pipeline end to end: clone, smoke profile, `dvc repro`, then a no-op repro.

These are the slowest tests (about a minute and a half each on 2 cores): they
run every stage of the real pipeline on the smoke profile's tiny synthetic
data, once with ``dvc repro`` and once with ``simbench repro --jobs 2``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)


def _smoke_clone(tmp_path_factory, name: str) -> tuple[Path, dict]:
    """A fresh clone of the repository with the smoke profile active."""
    if shutil.which("git") is None or not (BIN / "dvc").exists():
        pytest.skip("git and dvc are needed for the pipeline test")
    if not (REPO / ".git").exists():
        pytest.skip("the pipeline test clones the repository; no .git found")
    clone = tmp_path_factory.mktemp(name) / "simbench"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": "1", "DVC_NO_ANALYTICS": "1"}
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
    # The clone gets the working tree's current code and params layout (so uncommitted edits are tested too).
    for part in ("dvc.yaml", "experiments/profiles"):
        src, dst = REPO / part, clone / part
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dst)
    assert _run([str(BIN / "simbench"), "profile", "smoke"], clone, env).returncode == 0
    return clone, env


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    clone, env = _smoke_clone(tmp_path_factory, "pipeline")
    first = _run([str(BIN / "dvc"), "repro"], clone, env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = _run([str(BIN / "dvc"), "repro"], clone, env)
    return clone, env, first, second


@pytest.fixture(scope="module")
def reproduced_side_by_side(tmp_path_factory):
    """The same pipeline through ``simbench repro --jobs 2`` (two runs at a time)."""
    clone, env = _smoke_clone(tmp_path_factory, "pipeline_jobs")
    first = _run([str(BIN / "simbench"), "repro", "--jobs", "2"], clone, env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = _run([str(BIN / "simbench"), "repro", "--jobs", "2"], clone, env)
    return clone, env, first, second


def test_every_declared_output_exists(reproduced):
    clone, _, _, _ = reproduced
    params = yaml.safe_load((clone / "params.yaml").read_text())
    data = clone / params["data"]["root"]
    for name in ("train.json", "val.json", "summary.json", "preview.png"):
        assert (data / name).is_file(), name
    for run in params["runs"]:
        run_dir = clone / "runs" / run
        for name in ("model.pt", "last.ckpt", "train_log.jsonl", "run.json", "segm.json", "bbox.json",
                     "metrics.json"):
            assert (run_dir / name).is_file(), f"{run}/{name}"
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["run"] == run and set(metrics["segm"]) >= {"AP", "AP50", "AP75"}
        # the smoke profile trains in fp32 on every CPU; the machine travels into the metrics and the report
        assert metrics["trained_on"]["precision"] == "float32" and metrics["trained_on"]["device"].startswith("cpu:")
    out = clone / "reports" / "out"
    assert list((out / "tables").glob("*.tex")) and list((out / "figures").glob("*.png"))
    assert (out / "report.tex").is_file()
    assert "Trained on cpu:" in (out / "report.tex").read_text()


def test_second_repro_does_nothing(reproduced):
    _, _, _, second = reproduced
    assert second.returncode == 0
    assert "Running stage" not in second.stdout, second.stdout


def test_dvc_metrics_show_lists_runs(reproduced):
    clone, env, _, _ = reproduced
    shown = _run([str(BIN / "dvc"), "metrics", "show", "--json"], clone, env)
    assert shown.returncode == 0, shown.stderr
    assert "mask_s0" in shown.stdout and "segm" in shown.stdout


def _copy_of(clone: Path, tmp_path: Path) -> Path:
    """A copy of a reproduced clone (git, dvc and runs) for a test that changes it."""
    copy = tmp_path / "simbench"
    shutil.copytree(clone, copy, symlinks=True)
    return copy


def test_dvc_exp_run_varies_one_setting(reproduced, tmp_path):
    """`dvc exp run -S sim.alpha=0.3` makes an experiment that `dvc exp show` lists with that value."""
    sequential, env, _, _ = reproduced
    clone = _copy_of(sequential, tmp_path)
    env = {**env, "GIT_AUTHOR_NAME": "simbench", "GIT_AUTHOR_EMAIL": "simbench@localhost",
           "GIT_COMMITTER_NAME": "simbench", "GIT_COMMITTER_EMAIL": "simbench@localhost"}
    ran = _run([str(BIN / "dvc"), "exp", "run", "-S", "sim.alpha=0.3", "-n", "alpha03"], clone, env)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    assert "Running stage 'train@sim_s0'" in ran.stdout  # the runs that read sim.alpha retrain ...
    assert "Running stage 'train@mask_s0'" not in ran.stdout  # ... and the others do not
    # ... from iteration 0: the alpha-0.5 checkpoint is not "resumed" as the alpha-0.3 run
    assert "sim.alpha 0.5 -> 0.3: settings changed since runs/sim_s0/last.ckpt; training from iteration 0" \
        in ran.stdout, ran.stdout[-3000:]
    assert json.loads((clone / "runs" / "sim_s0" / "metrics.json").read_text())["params"]["sim"]["alpha"] == 0.3
    shown = _run([str(BIN / "dvc"), "exp", "show", "--json"], clone, env)
    assert shown.returncode == 0, shown.stderr
    assert "alpha03" in shown.stdout
    assert 0.3 in list(_values_of(json.loads(shown.stdout), "alpha"))


def test_changed_setting_retrains_and_reevaluates(reproduced, tmp_path):
    """A setting changed in params.yaml, then `dvc repro`: the run trains from iteration 0, says which setting
    changed, and its model and metrics are new; `simbench status` calls it fresh again."""
    sequential, env, _, _ = reproduced
    clone = _copy_of(sequential, tmp_path)
    run_dir = clone / "runs" / "boxinst_s0"
    model_before = hashlib.md5((run_dir / "model.pt").read_bytes()).hexdigest()
    metrics_before = json.loads((run_dir / "metrics.json").read_text())
    params = yaml.safe_load((clone / "params.yaml").read_text())
    old_lr = params["train"]["lr"]
    params["train"]["lr"] = old_lr * 2
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = _run([str(BIN / "simbench"), "status"], clone, env)
    assert "stale: params changed since training: train.lr" in status.stdout, status.stdout
    ran = _run([str(BIN / "dvc"), "repro", "evaluate@boxinst_s0"], clone, env)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    assert (f"train.lr {old_lr:g} -> {2 * old_lr:g}: settings changed since runs/boxinst_s0/last.ckpt; "
            "training from iteration 0") in ran.stdout, ran.stdout[-3000:]
    assert hashlib.md5((run_dir / "model.pt").read_bytes()).hexdigest() != model_before
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["fingerprint"] != metrics_before["fingerprint"] and metrics["params"]["train"]["lr"] == 2 * old_lr
    assert metrics["fingerprint"] == json.loads((run_dir / "run.json").read_text())["fingerprint"]
    status = _run([str(BIN / "simbench"), "status"], clone, env)
    line = next(x for x in status.stdout.splitlines() if x.startswith("boxinst_s0"))
    assert line.endswith("fresh") or "fresh (code" in line, status.stdout


def _values_of(node, key):
    """Every value stored under ``key`` anywhere in a json tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _values_of(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from _values_of(item, key)


def test_side_by_side_repro_matches_the_sequential_one(reproduced, reproduced_side_by_side):
    """Two runs at a time: every run's predictions and metrics equal the sequential pipeline's; DVC sees nothing left to do."""
    sequential, _, _, _ = reproduced
    clone, env, first, second = reproduced_side_by_side
    assert "2 at a time" in first.stdout
    for run in yaml.safe_load((clone / "params.yaml").read_text())["runs"]:  # progress while each run trains
        assert f"[{run}] {run}: iter 1/" in first.stdout, run
    params = yaml.safe_load((clone / "params.yaml").read_text())
    for run in params["runs"]:
        for name in ("segm.json", "bbox.json"):  # every prediction and score, not only the (tiny) smoke AP
            got = json.loads((clone / "runs" / run / name).read_text())
            assert got and got == json.loads((sequential / "runs" / run / name).read_text()), f"{run}/{name}"
        got = json.loads((clone / "runs" / run / "metrics.json").read_text())
        want = json.loads((sequential / "runs" / run / "metrics.json").read_text())
        assert (got["segm"], got["bbox"]) == (want["segm"], want["bbox"]), run
    status = _run([str(BIN / "dvc"), "status", "--json"], clone, env)
    assert status.returncode == 0 and json.loads(status.stdout) == {}, status.stdout
    assert second.returncode == 0 and "Running stage" not in second.stdout, second.stdout
    assert (clone / "reports" / "out" / "report.tex").is_file()
