"""A run is what its record says: fingerprints, the report's and status's checks, the code of each segment."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import write_smoke_project
from sim_core.cli import main
from sim_core.config import resolve_run
from sim_core.engine.records import (MACHINE_ONLY_TRAIN_KEYS, check_run, differences, fingerprint,
                                     weights_inputs)


def _resolved(smoke_params: dict, run: str = "sim_s0", **train) -> dict:
    params = copy.deepcopy(smoke_params)
    params["train"].update(train)
    return resolve_run(params, run)


def test_fingerprint_covers_what_trains_and_nothing_else(smoke_params):
    base = weights_inputs(_resolved(smoke_params))
    assert base["data.train_json_sha256"] != "missing" and base["sim.alpha"] == 0.5
    assert "boxinst.pairwise_weight" in base  # SIM's pairwise term reads BoxInst's section
    assert not any(k.startswith(("boxlevelset.", "mask.", "evaluate.", "report.", "synthetic.")) for k in base)
    assert not any(f"train.{k}" in base for k in MACHINE_ONLY_TRAIN_KEYS)
    for key in MACHINE_ONLY_TRAIN_KEYS:  # where, how often, on how many threads: same weights
        value = {"runs_dir": "elsewhere", "device": "cpu", "threads": 2, "num_workers": 2, "log_every": 1,
                 "checkpoint_every": 1, "supervision_diagnostics": False}[key]
        assert fingerprint(weights_inputs(_resolved(smoke_params, **{key: value}))) == fingerprint(base), key
    for key, value in (("lr", 0.02), ("max_iter", 7), ("batch_per_process", 2), ("cpu_amp", True)):
        assert fingerprint(weights_inputs(_resolved(smoke_params, **{key: value}))) != fingerprint(base), key
    assert weights_inputs(_resolved(smoke_params, lr=1)) == weights_inputs(_resolved(smoke_params, lr=1.0))
    other_data = weights_inputs(_resolved(smoke_params), train_json_sha256="0" * 64)
    assert fingerprint(other_data) != fingerprint(base)


def test_differences_name_the_first_changed_keys():
    old = {"a.x": 0.5, "b.y": 1.0, "c.z": "p", "d.w": 2.0, "e.v": [1.0, 2.0]}
    new = {"a.x": 0.3, "b.y": 1.0, "c.z": "q", "d.w": 3.0, "e.v": [1.0, 3.0]}
    assert differences(old, new) == "a.x 0.5 -> 0.3, c.z p -> q, d.w 2 -> 3 (+1 more)"
    assert differences(old, old) == "same settings"
    assert differences(None, new) == "no settings fingerprint recorded"
    assert differences({"k": "a" * 64}, {"k": "b" * 64}) == f"k {'a' * 12} -> {'b' * 12}"


# ------------------------------------------------------------------ a small finished project
@pytest.fixture(scope="module")
def project(smoke_dataset, tmp_path_factory):
    """Two runs of the smoke profile trained (3 iterations), evaluated; params.yaml in ``root``."""
    root = tmp_path_factory.mktemp("records")
    params = write_smoke_project(root, smoke_dataset, max_iter=3, runs={
        "mask_s0": {"method": "mask", "seed": 0}, "boxinst_s0": {"method": "boxinst", "seed": 0}})
    for run in params["runs"]:
        assert main(["train", "--run", run, "--params", str(root / "params.yaml"), "--no-progress"]) == 0
        assert main(["evaluate", "--run", run, "--params", str(root / "params.yaml")]) == 0
    return root, params


@pytest.fixture
def copy_of(project, tmp_path):
    """A private copy of the finished project (tests that damage it)."""
    root, params = project
    shutil.copytree(root / "runs", tmp_path / "runs")
    params = copy.deepcopy(params)
    params["train"]["runs_dir"] = str(tmp_path / "runs")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path, params


def _cli(args: list[str], params_path: Path, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([*args, "--params", str(params_path)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_fresh_project_status_and_report(copy_of, capsys):
    root, _ = copy_of
    code, out, _ = _cli(["status"], root / "params.yaml", capsys)
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 2 and all("trained 3/3  evaluated  fresh" in line for line in lines), out
    metrics = json.loads((root / "runs" / "mask_s0" / "metrics.json").read_text())
    assert len(metrics["model_sha256"]) == 64 and metrics["fingerprint"] == \
        json.loads((root / "runs" / "mask_s0" / "run.json").read_text())["fingerprint"]
    code, out, err = _cli(["report", "--out", str(root / "out")], root / "params.yaml", capsys)
    assert code == 0, err
    stamp = (root / "out" / "report.tex").read_text()
    assert "Trained at commit" in stamp
    assert json.loads((root / "out" / "bootstrap.json").read_text())["stale"] == {}


def test_hand_edited_run_json_is_refused(copy_of, capsys):
    root, _ = copy_of
    path = root / "runs" / "boxinst_s0" / "run.json"
    stamp = json.loads(path.read_text())
    stamp["params"]["boxinst"]["pairwise_weight"] = 2.0
    path.write_text(json.dumps(stamp))
    code, _, err = _cli(["report", "--out", str(root / "out")], root / "params.yaml", capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "run 'boxinst_s0'" in err and "boxinst.pairwise_weight 1 -> 2" in err and "mask_s0" not in err
    assert not (root / "out").exists()  # nothing half-written


def test_swapped_model_is_refused_and_allow_stale_lists_it_apart(copy_of, capsys):
    root, _ = copy_of
    runs = root / "runs"
    shutil.copy2(runs / "mask_s0" / "model.pt", runs / "boxinst_s0" / "model.pt")
    code, _, err = _cli(["report", "--out", str(root / "out")], root / "params.yaml", capsys)
    assert code == 2 and "run 'boxinst_s0'" in err and "model.pt changed since it was evaluated" in err
    code, out, _ = _cli(["status"], root / "params.yaml", capsys)
    assert "boxinst_s0" in out and "stale:" in out.split("boxinst_s0")[1].splitlines()[0]
    code, out, err = _cli(["report", "--allow-stale", "--out", str(root / "out")], root / "params.yaml", capsys)
    assert code == 0 and "1 stale run(s) listed apart" in out, err
    assert "boxinst\\_s0" in (root / "out" / "tables" / "stale.tex").read_text()
    assert "boxinst_s0" in json.loads((root / "out" / "bootstrap.json").read_text())["stale"]


def test_changed_params_make_runs_stale_and_evaluate_refuses(copy_of, capsys):
    root, params = copy_of
    params["boxinst"]["pairwise_weight"] = 0.5
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    code, out, _ = _cli(["status"], root / "params.yaml", capsys)
    line = next(x for x in out.splitlines() if x.startswith("boxinst_s0"))
    assert "stale: params changed since training: boxinst.pairwise_weight 1 -> 0.5" in line
    assert "fresh" in next(x for x in out.splitlines() if x.startswith("mask_s0"))  # mask reads no boxinst key
    code, _, err = _cli(["report", "--out", str(root / "out")], root / "params.yaml", capsys)
    assert code == 2 and "boxinst.pairwise_weight 1 -> 0.5" in err
    code, _, err = _cli(["evaluate", "--run", "boxinst_s0"], root / "params.yaml", capsys)
    assert code == 2 and "trained with other settings" in err and "simbench train --run boxinst_s0" in err


def test_changed_evaluation_settings_make_metrics_stale(copy_of, capsys):
    root, params = copy_of
    params["evaluate"]["mask_thresh"] = 0.6
    resolved = resolve_run(params, "mask_s0")
    check = check_run(resolved, root / "runs" / "mask_s0")
    assert check.problems == ["evaluation settings or val data changed since evaluation: "
                              "evaluate.mask_thresh 0.5 -> 0.6"]


def test_report_without_evaluated_runs_exits_2(copy_of, capsys):
    root, _ = copy_of
    for run in ("mask_s0", "boxinst_s0"):
        (root / "runs" / run / "metrics.json").unlink()
    code, _, err = _cli(["report", "--out", str(root / "out")], root / "params.yaml", capsys)
    assert code == 2 and "no run of params 'runs' has been evaluated" in err
    code, out, _ = _cli(["status", "--check"], root / "params.yaml", capsys)
    assert code == 1 and out.count("not evaluated") == 2
