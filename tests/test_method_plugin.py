"""A method of one's own in one file outside simbench: trains, is evaluated and reported, with no simbench edit.

The method is ``tests/fixtures/plugin/boxproj_plugin/boxproj.py`` (a loss class and its ``METHOD`` spec),
named in the runs by its module path.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sim_core.cli import main

REPO = Path(__file__).resolve().parents[1]
PLUGIN = "boxproj_plugin.boxproj"


@pytest.fixture
def project(smoke_dataset, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "tests" / "fixtures" / "plugin"))
    params = yaml.safe_load((REPO / "experiments" / "profiles" / "smoke.yaml").read_text())
    params["data"]["root"] = str(smoke_dataset)
    params["train"].update(runs_dir=str(tmp_path / "runs"), threads=1, max_iter=2, checkpoint_every=2)
    params["runs"] = {"boxinst_s0": {"method": "boxinst", "seed": 0}, "boxproj_s0": {"method": PLUGIN, "seed": 0}}
    params["report"].update(bootstrap_resamples=20, data_dirs={"synthetic": str(smoke_dataset)})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))  # no section for the plugin: its defaults
    return tmp_path


def test_a_method_of_ones_own_trains_evaluates_and_is_reported(project, capsys):
    params = str(project / "params.yaml")
    for run in ("boxinst_s0", "boxproj_s0"):
        assert main(["train", "--run", run, "--params", params, "--no-progress"]) == 0
        assert main(["evaluate", "--run", run, "--params", params]) == 0
    stamp = json.loads((project / "runs" / "boxproj_s0" / "run.json").read_text())
    assert stamp["method"] == PLUGIN and stamp["params"]["boxproj_plugin"]["boxproj"]["projection_weight"] == 1.0
    assert stamp["fingerprint_inputs"]["boxproj_plugin.boxproj.projection_weight"] == 1.0
    log = (project / "runs" / "boxproj_s0" / "train_log.jsonl").read_text()
    assert "loss_proj" in log and "loss_pairwise" not in log
    assert main(["report", "--params", params, "--out", str(project / "out")]) == 0, capsys.readouterr().err
    table = next((project / "out" / "tables").glob("main_*.tex")).read_text()
    assert "BoxProj (projections only)" in table and table.index("BoxInst") < table.index("BoxProj")
    boot = json.loads((project / "out" / "bootstrap.json").read_text())
    assert any("BoxProj (projections only)" in json.dumps(t["intervals"]) for t in boot["tables"])
    capsys.readouterr()
    assert main(["status", "--params", params]) == 0
    assert "boxproj_s0  trained 2/2  evaluated  fresh" in capsys.readouterr().out


def test_its_settings_are_params_like_any_other(project, capsys):
    params = str(project / "params.yaml")
    args = ["train", "--run", "boxproj_s0", "--params", params, "--no-progress"]
    assert main([*args, "--set", "boxproj_plugin.boxproj.projection_weight=2"]) == 0
    stamp = json.loads((project / "runs" / "boxproj_s0" / "run.json").read_text())
    assert stamp["params"]["boxproj_plugin"]["boxproj"]["projection_weight"] == 2
    assert main([*args, "--set", "boxproj_plugin.boxproj.projection_wieght=2"]) == 2
    assert "did you mean 'boxproj_plugin.boxproj.projection_weight'" in capsys.readouterr().err
    assert main([*args, "--set", "boxproj_plugin.boxproj.projection_weight=[1]"]) == 2
    assert "must be a number" in capsys.readouterr().err


def test_an_unknown_method_is_refused_naming_the_run(project, capsys):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["runs"]["x_s0"] = {"method": "nosuchpkg.method", "seed": 0}
    params["runs"]["y_s0"] = {"method": "boxinstt", "seed": 0}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["train", "--run", "boxinst_s0", "--params", str(project / "params.yaml")]) == 2
    err = capsys.readouterr().err
    assert "runs.x_s0.method" in err and "cannot be imported" in err
    del params["runs"]["x_s0"]
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["train", "--run", "boxinst_s0", "--params", str(project / "params.yaml")]) == 2
    assert "runs.y_s0.method" in (err := capsys.readouterr().err) and "did you mean 'boxinst'" in err
