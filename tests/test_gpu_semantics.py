"""What a GPU run depends on that a CPU run does not show, checked on the CPU.

Mixed-precision dtypes (frozen batch norm, the LAB colour similarity), the CUDA
random state in checkpoints, per-process random streams, and ``cuda:N`` under
torchrun.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torchvision.ops import FrozenBatchNorm2d

import sim_core.engine.trainer as trainer_module
from baselines.lab import batch_color_similarity
from sim_core.config import resolve_run
from sim_core.engine.distributed import DistInfo
from sim_core.errors import InputError
from sim_core.model.frozen_bn import FrozenBatchNorm2dTyped


def test_frozen_bn_keeps_the_activation_dtype_and_is_torchvisions_in_float32():
    torch.manual_seed(0)
    ours, theirs = FrozenBatchNorm2dTyped(8), FrozenBatchNorm2d(8)
    for name in ("weight", "bias", "running_mean"):
        getattr(ours, name).normal_()
    ours.running_var.uniform_(0.5, 2.0)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 8, 5, 5)
    assert torch.equal(ours(x), theirs(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ours(x.bfloat16()).dtype == torch.bfloat16
        assert theirs(x.bfloat16()).dtype == torch.float32  # what torchvision's layer does
    from sim_core.model.backbone import TorchvisionResNet

    frozen = TorchvisionResNet(18, freeze_at=2, pretrained="none", frozen_bn=True)
    assert any(isinstance(m, FrozenBatchNorm2dTyped) for m in frozen.modules())


def test_colour_similarity_is_float32_under_autocast():
    torch.manual_seed(0)
    images, valid = torch.rand(2, 3, 64, 64) * 255, torch.ones(2, 64, 64)
    full = batch_color_similarity(images, valid, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = batch_color_similarity(images, valid, 4)
    assert mixed.dtype == torch.float32 and torch.equal(mixed, full)


def test_cuda_n_is_refused_under_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match="would put all 2 processes on one GPU"):
        trainer_module.pick_device("cuda:1")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(InputError, match="no CUDA device"):  # one process: cuda:N is a choice (none here)
        trainer_module.pick_device("cuda:1")


def test_checkpoints_carry_and_restore_the_cuda_random_state(smoke_params, monkeypatch):
    saved_state = [torch.arange(16, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: saved_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    params = copy.deepcopy(smoke_params)
    params["train"].update(device="cpu", max_iter=1, checkpoint_every=1)
    resolved = resolve_run(params, "mask_s0")
    run_dir = Path(params["train"]["runs_dir"]) / "mask_s0"
    trainer_module.Trainer(resolved, run_dir, progress=False).run()
    again = trainer_module.Trainer(resolved, run_dir, progress=False)
    assert again.try_resume() == 1
    assert len(restored) == 1 and torch.equal(restored[0][0], saved_state[0])


def test_each_process_draws_its_own_random_numbers(smoke_params, monkeypatch):
    """Same initial weights on every process; different random streams after that (and rank 0's is a
    one-process run's)."""
    resolved = resolve_run(smoke_params, "boxinst_s0")
    states, weights = [], []
    for rank in (0, 1):
        monkeypatch.setattr(trainer_module, "init_distributed", lambda device, r=rank: DistInfo(r, 2, r))
        trainer = trainer_module.Trainer(resolved, Path(smoke_params["train"]["runs_dir"]) / f"r{rank}",
                                         progress=False)
        states.append(torch.get_rng_state())
        weights.append(trainer.model.state_dict())
    monkeypatch.setattr(trainer_module, "init_distributed", lambda device: DistInfo())
    trainer_module.Trainer(resolved, Path(smoke_params["train"]["runs_dir"]) / "single", progress=False)
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not torch.equal(states[0], states[1])
    assert torch.equal(states[0], torch.get_rng_state())


def test_sync_bn_without_distribution_warns_naming_the_key(smoke_params):
    params = copy.deepcopy(smoke_params)
    params["train"]["sync_bn"] = True
    with pytest.warns(UserWarning, match=r"train.sync_bn: true acts only with several processes on GPUs"):
        trainer_module.Trainer(resolve_run(params, "mask_s0"), Path(params["train"]["runs_dir"]) / "m",
                               progress=False)


def test_fewer_processes_than_the_recipe_keep_the_batch_and_warn_once(smoke_params, monkeypatch):
    """The paper profiles' layout is 8 processes x 2 images; one process keeps the batch of 16 by 8 accumulation
    steps and says what that changes."""
    params = copy.deepcopy(smoke_params)
    params["train"].update(processes=8, batch_size=16, batch_per_process=2, max_iter=1, checkpoint_every=1)
    trainer = trainer_module.Trainer(resolve_run(params, "mask_s0"), Path(params["train"]["runs_dir"]) / "m",
                                     progress=False)
    with pytest.warns(UserWarning) as caught:
        trainer.run()
    notes = [str(w.message) for w in caught if "recipe's layout" in str(w.message)]
    assert len(notes) == 1
    assert "train.processes 8 (the recipe's layout) but 1 process(es) here: the batch of 16 is kept with 8 " \
           "accumulation step(s) of 2 image(s)" in notes[0]
    assert "BatchNorm statistics over 2 image(s)" in notes[0] and "16 entries per process" in notes[0]


def test_local_launch_takes_at_most_one_process_per_gpu(monkeypatch):
    from experiments.train import local_processes

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert local_processes({"processes": 8, "device": "auto"}) == 2
    assert local_processes({"processes": 1, "device": "cuda"}) == 1
    assert local_processes({"processes": 2, "device": "cpu"}) == 2  # CPU processes as asked (gloo)


def test_paper_profiles_state_the_papers_layout():
    from sim_core.config import profile_path, read_yaml

    for name in ("coco_r50_1x", "coco_r101_1x", "coco_r101_3x", "coco_r101dcn_bifpn_3x", "coco_swinb_3x",
                 "voc_r50", "voc_r101", "coco_r50_boxlevelset_own"):
        train = read_yaml(profile_path(name))["train"]
        assert (train["processes"], train["batch_per_process"], train["batch_size"]) == (8, 2, 16), name
