"""Device placement without a GPU: one training step of every method under CUDA's same-device rule.

``sim_core.engine.device_check`` tags what the trainer moves to the training
device and fails any operation that mixes it with host tensors, as CUDA does.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from experiments.device_selfcheck import SIM_PASTE, self_check, summary_lines
from sim_core.config import apply_overrides, resolve_run
from sim_core.engine.device_check import CHECKED_DEVICE, DevicePlacementError, checked_device
from sim_core.engine.trainer import Trainer


def test_the_checker_raises_where_cuda_would():
    with checked_device() as checker:
        on_device = torch.ones(3).to(CHECKED_DEVICE)
        host = torch.ones(3)
        assert checker.on_device(on_device) and not checker.on_device(host)
        assert on_device.device == CHECKED_DEVICE and host.device == torch.device("cpu")
        assert checker.on_device(on_device * 2 + torch.tensor(1.0))  # a 0-dim host scalar is fine
        assert checker.on_device(torch.zeros(2, device=on_device.device))
        assert checker.on_device(torch.zeros_like(on_device)) and not checker.on_device(on_device.cpu())
        assert checker.on_device(on_device[torch.tensor([0, 2])])  # host index tensors are fine
        with pytest.raises(DevicePlacementError, match="stack"):
            torch.stack([on_device, host])
        with pytest.raises(DevicePlacementError, match="stack"):  # torch.tensor of device scalars: a host tensor
            torch.stack([on_device, torch.tensor([on_device[0], on_device[1], on_device[2]])])
        with pytest.raises(DevicePlacementError, match="add"):
            on_device + host
        with pytest.raises(DevicePlacementError, match="numpy"):
            on_device.numpy()
        module = torch.nn.Linear(3, 2).to(CHECKED_DEVICE)
        assert all(checker.on_device(p) for p in module.parameters())
        module(on_device)
        with pytest.raises(DevicePlacementError):
            module(host)


def _train_checked(smoke_params: dict, run: str, **overrides) -> dict:
    params = apply_overrides(copy.deepcopy(smoke_params), {"train.max_iter": 3, "train.log_every": 1,
                                                           "train.checkpoint_every": 3, **overrides})
    resolved = resolve_run(params, run)
    run_dir = Path(params["train"]["runs_dir"]) / run
    with checked_device() as checker:
        result = Trainer(resolved, run_dir, progress=False, device=CHECKED_DEVICE).run()
    assert checker.moves > 0  # the images and targets really went to the device
    return result


@pytest.mark.parametrize("run, overrides", [
    ("boxlevelset_s0", {"boxlevelset.variant": "paper"}),
    ("sim_s0", {**SIM_PASTE, "sim.paste_supervision": "region"}),
], ids=["boxlevelset_paper", "sim_paste_region"])  # each method's default: the self-check below
def test_method_variants_keep_to_one_device(smoke_params, monkeypatch, run, overrides):
    import sim_core.data.copy_paste as copy_paste

    pastes = []
    paste = copy_paste.paste_instances

    def counted(*args, **kwargs):
        pastes.append(1)
        return paste(*args, **kwargs)

    monkeypatch.setattr(copy_paste, "paste_instances", counted)
    result = _train_checked(smoke_params, run, **overrides)
    assert result["iterations"] == 3
    assert bool(pastes) == run.startswith("sim")  # SIM's steps after the first really pasted


def test_prediction_on_the_device(smoke_params, smoke_dataset):
    """What ``simbench evaluate --run`` runs: predict on val, then the results conversion, device model."""
    from sim_core.evaluation.inference import predict_split
    from sim_core.model.condinst import CondInst

    params = resolve_run(smoke_params, "mask_s0")
    params["evaluate"]["score_thresh"] = 0.0  # an untrained model: keep its detections
    torch.manual_seed(0)
    with checked_device() as checker:
        model = CondInst(int(params["synthetic"]["num_classes"]), params["model"]).to(CHECKED_DEVICE).eval()
        segm, bbox = predict_split(model, smoke_dataset / "val.json", smoke_dataset / "images", params,
                                   CHECKED_DEVICE, progress=False)
    assert checker.moves > 0 and segm and len(segm) == len(bbox)


def test_the_cpu_twin_of_the_gpu_self_check(tmp_path):
    """``simbench bench --only device_check``: every method and the evaluation pass, waits counted by line."""
    result = self_check("cpu", iterations=2, workdir=tmp_path)
    assert result["ok"], summary_lines(result)
    sim = result["methods"]["sim"]
    assert sim["waits_per_step"] > 0 and all(":" in line for line in sim["waits_by_line"])
    assert any(line.startswith("sim_core/data/copy_paste.py:") for line in sim["waits_by_line"])  # it pasted
    assert result["evaluation"]["images"] > 0
    lines = summary_lines(result)
    assert len(lines) == 6 and all(" ok, " in line for line in lines)


def test_host_waits_are_counted_by_line():
    with checked_device() as checker:
        x = torch.ones(4).to(CHECKED_DEVICE)
        float(x.sum()), x[x > 0], x.tolist(), bool(x.any())
        torch.ones(4).tolist()  # a host tensor: no wait
    assert checker.waits == {"elsewhere": 4}  # attributed to the first frame in simbench's packages: none here
