"""Opt-in: `simbench upstream` against real checkouts of AdelaiDet and the released SIM.

Skipped unless the environment names them (see docs/upstream.md, "Testing
against the real code"):

    SIMBENCH_UPSTREAM_PYTHON=/path/to/venv/bin/python     # imports detectron2 (default: this interpreter)
    SIMBENCH_UPSTREAM_ADELAIDET=/path/to/AdelaiDet        # built: adet/_C*.so present
    SIMBENCH_UPSTREAM_SIM=/path/to/SIM                    # built likewise
    python -m pytest tests/test_upstream_integration.py

Each runs 20 iterations of an R-18 from scratch on the smoke data (CPU, one
thread: a few minutes) and checks that the results were imported and scored.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ENV = {"adelaidet": "SIMBENCH_UPSTREAM_ADELAIDET", "sim": "SIMBENCH_UPSTREAM_SIM"}


@pytest.mark.parametrize("code", sorted(ENV))
def test_real_checkout_end_to_end(code, smoke_params):
    root = os.environ.get(ENV[code])
    if not root:
        pytest.skip(f"opt-in: set {ENV[code]} to a built checkout (and SIMBENCH_UPSTREAM_PYTHON to an "
                    "interpreter with detectron2) to run against the real code; docs/upstream.md")
    from baselines import upstream

    params = json.loads(json.dumps(smoke_params))
    params["upstream"]["python"] = os.environ.get("SIMBENCH_UPSTREAM_PYTHON", sys.executable)
    params["upstream"][code]["root"] = root
    params["upstream_runs"] = {f"{code}_real": {"code": code, "set": {
        "model.backbone": "resnet18", "train.max_iter": 20, "train.steps": [15], "train.warmup_iters": 5,
        "train.optimizer": "sgd", "train.lr": 0.01, "train.device": "cpu", "train.checkpoint_every": 20}}}
    record = upstream.run_upstream(params, f"{code}_real")
    run_dir = Path(params["train"]["runs_dir"]) / f"{code}_real"
    assert 0.0 <= record["segm"]["AP"] <= 1.0
    run = json.loads((run_dir / "run.json").read_text())
    assert run["upstream"]["code"] == code and run["upstream"]["versions"]["detectron2"]
    # the smoke profile's stride-4 mask branch reads C2: both codes run a private copy with the backbone patch
    assert params["model"]["mask_feat_stride"] == 4 and params["model"]["mask_stride4_input"] == "c2"
    assert "FPNWithRes2" in run["patch_diff"]
    assert "['res2', 'p3', 'p4', 'p5']" in run["upstream"]["opts"]
    assert ("self._iter >" in run["patch_diff"]) == (code == "sim")  # SIM's schedule constants only in SIM


EXACT = {"model.mask_fusion_stride": 4, "model.center_sampling_center": "mass", "model.iou_smoothing": 1.0,
         "model.head_conv_bias": True, "boxinst.lab_from_uint8": True}


@pytest.mark.parametrize("exact", [True, False])
def test_real_crosscheck_same_weights_same_batch(exact, smoke_params):
    """With the five settings simbench's BoxInst computes AdelaiDet's losses and gradients; without, not."""
    root = os.environ.get(ENV["adelaidet"])
    if not root:
        pytest.skip(f"opt-in: set {ENV['adelaidet']} to a built AdelaiDet (and SIMBENCH_UPSTREAM_PYTHON); "
                    "docs/upstream.md")
    from baselines.crosscheck import run_crosscheck

    params = json.loads(json.dumps(smoke_params))
    params["upstream"]["python"] = os.environ.get("SIMBENCH_UPSTREAM_PYTHON", sys.executable)
    params["upstream"]["adelaidet"]["root"] = root
    # an R-18 with AdelaiDet's group counts, so that the networks can be the same
    setting = {"model.backbone": "resnet18", "model.gn_groups": 32, "model.mask_branch_norm": "BN",
               "model.mask_stride4_input": "c2", **(EXACT if exact else {})}
    params["upstream_runs"] = {"crosscheck_real": {"code": "adelaidet", "set": setting}}
    report = run_crosscheck(params, "crosscheck_real", num_images=4)
    if exact:
        assert report["losses_agree"] and report["gradients_agree"], report["worst_gradients"]
    else:
        assert not report["losses_agree"]  # the box loss (centre sampling, IoU smoothing) and the pairwise
        assert report["gradients"]["mask_branch.tower.0.0.weight"]["status"] == "differs"  # the fusion
        assert report["gradients_only_in_original"]  # the towers' conv biases
