"""Training engine: every method trains, resume, kill-and-resume, non-finite guard."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from sim_core.config import apply_overrides, resolve_run
from sim_core.engine.checkpoint import load_latest_checkpoint
from sim_core.engine.trainer import train_run
from sim_core.errors import NonFiniteLossError

REPO = Path(__file__).resolve().parents[1]
COCO128 = REPO / ".." / "shared" / "datasets" / "coco128"


def _run(params: dict, name: str, **overrides) -> tuple[dict, Path]:
    resolved = resolve_run(apply_overrides(params, {f"train.{k}": v for k, v in overrides.items()}), name)
    run_dir = Path(params["train"]["runs_dir"]) / name
    return train_run(resolved, run_dir, progress=False), run_dir


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("run", ["mask_s0", "boxmask_s0", "boxinst_s0", "boxlevelset_s0", "sim_s0"])
def test_every_method_trains_two_iterations(smoke_params, run):
    result, run_dir = _run(smoke_params, run, max_iter=2, log_every=1)
    assert result["iterations"] == 2
    log = _log(run_dir)
    assert [r["iteration"] for r in log] == [0, 1]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    expected = {"mask_s0": "loss_mask", "boxmask_s0": "loss_mask", "boxinst_s0": "loss_pairwise",
                "boxlevelset_s0": "loss_levelset_feat", "sim_s0": "loss_pseudo"}[run]
    assert expected in log[0]
    stamp = json.loads((run_dir / "run.json").read_text())
    assert stamp["seed"] == 0 and stamp["params"]["train"]["method"] == run.rsplit("_", 1)[0]
    assert "torch" in stamp["packages"] and stamp["git_commit"]
    assert (run_dir / "model.pt").exists() and (run_dir / "dvclive").is_dir()


def test_training_on_real_coco128_images(tmp_path):
    if not COCO128.is_dir():
        pytest.skip(f"coco128 not found at {COCO128}")
    from sim_core.config import read_yaml
    from sim_core.data.prepare import prepare_coco128

    data = tmp_path / "coco128"
    prepare_coco128(data, root=COCO128)
    params = read_yaml(REPO / "experiments" / "profiles" / "coco128.yaml")
    params["data"]["root"] = str(data)
    params["train"]["runs_dir"] = str(tmp_path / "runs")
    params["data"]["train_sizes"] = [160]
    params["data"]["max_size"] = 256
    result, run_dir = _run(params, "boxinst_s0", max_iter=2, batch_size=2, batch_per_process=2)
    assert result["iterations"] == 2 and (run_dir / "model.pt").exists()


def test_same_seed_same_weights(smoke_params, tmp_path):
    _, a = _run(smoke_params, "boxinst_s0", max_iter=3)
    smoke_params["train"]["runs_dir"] = str(tmp_path / "again")
    _, b = _run(smoke_params, "boxinst_s0", max_iter=3)
    wa = torch.load(a / "model.pt", weights_only=True)["model"]
    wb = torch.load(b / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_autocast_type_per_device():
    from sim_core.engine.trainer import autocast_dtype, native_cpu_bfloat16

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype(cpu, {"amp": True, "cpu_amp": False}) is None
    if native_cpu_bfloat16():
        assert autocast_dtype(cpu, {"amp": True, "cpu_amp": True}) is torch.bfloat16
    else:  # emulated bfloat16 is several times slower than fp32: say so
        with pytest.warns(UserWarning, match="no native bfloat16"):
            assert autocast_dtype(cpu, {"amp": True, "cpu_amp": True}) is torch.bfloat16
    assert autocast_dtype(cuda, {"amp": True, "cpu_amp": False}) is torch.float16
    assert autocast_dtype(cuda, {"amp": False, "cpu_amp": True}) is None
    assert autocast_dtype(cuda, {"amp": False, "cpu_amp": "auto"}) is None


@pytest.mark.parametrize("native", [True, False])
def test_cpu_amp_auto_follows_native_bfloat16(monkeypatch, native):
    import warnings

    from sim_core.engine import trainer

    monkeypatch.setattr(trainer, "native_cpu_bfloat16", lambda: native)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto never warns: it picks fp32 where bfloat16 would be emulated
        dtype = trainer.autocast_dtype(torch.device("cpu"), {"cpu_amp": "auto"})
    assert dtype is (torch.bfloat16 if native else None)
    assert trainer.precision_name(dtype) == ("bfloat16 autocast" if native else "float32")


@pytest.mark.parametrize("avx512_bf16, amx, native", [(False, False, False), (True, False, True),
                                                      (False, True, True), (True, True, True)])
def test_native_bfloat16_needs_bf16_units_not_avx512(monkeypatch, avx512_bf16, amx, native):
    """oneDNN says bfloat16 is "supported" on every AVX-512 CPU, where it is emulated: not native."""
    from sim_core.engine import trainer

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert trainer.native_cpu_bfloat16() is native


@pytest.mark.parametrize("flags, native", [({"avx2", "avx512f", "avx512bw"}, False),
                                           ({"avx512f", "avx512_bf16"}, True), ({"amx_bf16", "amx_tile"}, True),
                                           (set(), False)])
def test_native_bfloat16_from_cpu_flags_without_torch_probes(monkeypatch, flags, native):
    from sim_core.engine import trainer

    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.setattr(trainer, "cpu_flags", lambda: flags)
    assert trainer.native_cpu_bfloat16() is native


def test_cpu_flags_read_from_cpuinfo(monkeypatch):
    from sim_core.engine import run_info

    text = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512f\n\nprocessor\t: 1\nflags\t\t: fpu\n"
    monkeypatch.setattr(run_info, "_cpuinfo", lambda: text)
    assert run_info.cpu_flags() == {"fpu", "avx2", "avx512f"}
    assert run_info.cpu_model() == "Some CPU avx2 avx512f"
    monkeypatch.setattr(run_info, "_cpuinfo", lambda: None)
    assert run_info.cpu_flags() == set()


@pytest.mark.parametrize("bad", ["yes", 1, None, "bf16"])
def test_cpu_amp_rejects_other_values(bad):
    from sim_core.engine.trainer import autocast_dtype
    from sim_core.errors import InputError

    with pytest.raises(InputError, match="train.cpu_amp: must be true, false or auto"):
        autocast_dtype(torch.device("cpu"), {"cpu_amp": bad})


def test_cpu_bfloat16_training_is_deterministic_and_really_mixed(smoke_params, tmp_path):
    weights = {}
    for name, cpu_amp in (("bf16_a", True), ("bf16_b", True), ("fp32", False)):
        smoke_params["train"]["runs_dir"] = str(tmp_path / name)
        _, run_dir = _run(smoke_params, "sim_s0", max_iter=3, cpu_amp=cpu_amp)
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in _log(run_dir))
        weights[name] = torch.load(run_dir / "model.pt", weights_only=True)["model"]
        stamp = json.loads((run_dir / "run.json").read_text())
        assert stamp["precision"] == ("bfloat16 autocast" if cpu_amp else "float32")
    assert all(v.dtype != torch.bfloat16 for v in weights["bf16_a"].values())  # master weights stay fp32
    assert all(torch.equal(weights["bf16_a"][k], weights["bf16_b"][k]) for k in weights["fp32"])
    assert not all(torch.equal(weights["bf16_a"][k], weights["fp32"][k]) for k in weights["fp32"])


def test_resume_continues_from_the_saved_iteration(smoke_params):
    _, run_dir = _run(smoke_params, "mask_s0", max_iter=6, checkpoint_every=2, log_every=1)
    uninterrupted = torch.load(run_dir / "model.pt", weights_only=True)["model"]
    (run_dir / "prev.ckpt").replace(run_dir / "last.ckpt")  # as if killed after the checkpoint at 4
    (run_dir / "model.pt").unlink()
    result, run_dir = _run(smoke_params, "mask_s0", max_iter=6, checkpoint_every=2, log_every=1)
    assert result["resumed_from"] == 4 and result["restarted"] is None
    assert [r["iteration"] for r in _log(run_dir)] == list(range(6))
    assert load_latest_checkpoint(run_dir)["iteration"] == 6
    resumed = torch.load(run_dir / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    segments = json.loads((run_dir / "run.json").read_text())["segments"]
    assert [s["start_iteration"] for s in segments] == [0, 4]  # each segment's code and machine recorded
    assert all(s["git_commit"] and isinstance(s["dirty"], bool) for s in segments)


@pytest.mark.parametrize("key, value", [("lr", 0.02), ("max_iter", 6), ("seed", 1)])
def test_changed_settings_train_from_iteration_zero(smoke_params, capsys, key, value):
    """A checkpoint of other settings is never resumed: the run starts again and says what changed."""
    _, run_dir = _run(smoke_params, "mask_s0", max_iter=4, checkpoint_every=2)
    before = torch.load(run_dir / "model.pt", weights_only=True)
    capsys.readouterr()
    if key == "seed":
        params = apply_overrides(smoke_params, {"runs.mask_s0.seed": value, "train.max_iter": 4,
                                                "train.checkpoint_every": 2})
        result, run_dir = _run(params, "mask_s0")
    else:
        result, run_dir = _run(smoke_params, "mask_s0", **{"max_iter": 4, "checkpoint_every": 2, key: value})
    line = capsys.readouterr().out.strip().splitlines()[0]
    old = {"lr": smoke_params["train"]["lr"], "max_iter": 4, "seed": 0}[key]
    assert line.startswith(f"train.{key} {old:g} -> {value:g}") and "training from iteration 0" in line, line
    assert "settings changed since" in line and "last.ckpt" in line
    assert result["resumed_from"] == 0 and result["restarted"] == line
    after = torch.load(run_dir / "model.pt", weights_only=True)
    assert after["meta"]["fingerprint"] != before["meta"]["fingerprint"]
    assert not all(torch.equal(after["model"][k], before["model"][k]) for k in before["model"])
    assert [r["iteration"] for r in _log(run_dir)][0] == 0
    assert json.loads((run_dir / "run.json").read_text())["fingerprint"] == after["meta"]["fingerprint"]


def test_machine_only_settings_still_resume(smoke_params, capsys):
    """Logging cadence, checkpoint cadence and threads do not change the weights: a finished run stays."""
    _, run_dir = _run(smoke_params, "mask_s0", max_iter=4, checkpoint_every=2)
    before = (run_dir / "model.pt").read_bytes()
    result, _ = _run(smoke_params, "mask_s0", max_iter=4, checkpoint_every=1, log_every=3, threads=2)
    assert result["resumed_from"] == 4 and result["restarted"] is None
    assert torch.load(run_dir / "model.pt", weights_only=True)["meta"]["fingerprint"] == \
        torch.load(io.BytesIO(before), weights_only=True)["meta"]["fingerprint"]


def test_train_cli_set_on_a_finished_run_retrains(smoke_params, tmp_path, capsys):
    from sim_core.cli import main

    smoke_params["train"].update(max_iter=3, checkpoint_every=3)
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(smoke_params))
    assert main(["train", "--run", "sim_s0", "--params", str(params_path), "--no-progress"]) == 0
    run_dir = Path(smoke_params["train"]["runs_dir"]) / "sim_s0"
    first = torch.load(run_dir / "model.pt", weights_only=True)["model"]
    capsys.readouterr()
    assert main(["train", "--run", "sim_s0", "--params", str(params_path), "--no-progress",
                 "--set", "train.lr=0.05"]) == 0
    out = capsys.readouterr().out
    assert "train.lr 0.01 -> 0.05: settings changed since" in out and "resumed at" not in out, out
    second = torch.load(run_dir / "model.pt", weights_only=True)["model"]
    assert not all(torch.equal(first[k], second[k]) for k in first)
    assert json.loads((run_dir / "run.json").read_text())["params"]["train"]["lr"] == 0.05


def test_non_finite_loss_stops_naming_iteration_and_terms(smoke_params, monkeypatch):
    import sim_core.engine.trainer as trainer_module
    from baselines import build_mask_loss

    class NanAfterFirst(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = build_mask_loss("mask", {})
            self.calls = 0

        def forward(self, inputs):
            self.calls += 1
            losses = self.inner(inputs)
            if self.calls > 2:
                losses["loss_mask"] = losses["loss_mask"] * float("nan")
            return losses

    monkeypatch.setattr(trainer_module, "build_loss", lambda method, cfg: NanAfterFirst())
    with pytest.raises(NonFiniteLossError) as info:
        _run(smoke_params, "mask_s0", max_iter=5, checkpoint_every=1)
    message = str(info.value)
    assert "iteration 2" in message and "loss_mask=nan" in message and "loss_cls=" in message
    run_dir = Path(smoke_params["train"]["runs_dir"]) / "mask_s0"
    assert load_latest_checkpoint(run_dir)["iteration"] == 2  # the last good one is kept
    assert not (run_dir / "model.pt").exists()


def _cli(params_path: Path, run_dir: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "sim_core", "train", "--run", "boxinst_s0", "--params", str(params_path),
            "--run-dir", str(run_dir), "--no-progress", *extra]


def test_kill_and_resume_equals_uninterrupted(smoke_params, tmp_path):
    """SIGKILL after a checkpoint, resume, and end with the weights of an uninterrupted run."""
    smoke_params["train"].update(max_iter=14, checkpoint_every=2, log_every=1)
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(smoke_params))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    killed_dir, full_dir = tmp_path / "killed", tmp_path / "full"
    proc = subprocess.Popen(_cli(params_path, killed_dir, []), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (killed_dir / "last.ckpt").exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = load_latest_checkpoint(killed_dir)
    assert state is not None and 0 < state["iteration"] < 14, "the kill should land mid-run"
    assert not (killed_dir / "model.pt").exists()
    resumed = subprocess.run(_cli(params_path, killed_dir, []), cwd=REPO, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at" in resumed.stdout
    full = subprocess.run(_cli(params_path, full_dir, []), cwd=REPO, env=env, capture_output=True, text=True)
    assert full.returncode == 0, full.stderr
    a = torch.load(killed_dir / "model.pt", weights_only=True)["model"]
    b = torch.load(full_dir / "model.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    log = [json.loads(line)["iteration"] for line in (killed_dir / "train_log.jsonl").read_text().splitlines()]
    assert log == list(range(14))


def test_plain_progress_lines_without_a_bar(smoke_params, capsys):
    """Under dvc/simbench repro (no terminal): one line per logged iteration with rate and time left."""
    _run(smoke_params, "boxinst_s0", max_iter=4, log_every=2)
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("boxinst_s0: iter")]
    assert [x.split()[2] for x in lines] == ["1/4", "3/4", "4/4"], lines
    assert all(" it/s  ETA " in x and "loss " in x and "loss_pairwise " in x for x in lines), lines


def test_duration_text():
    from sim_core.engine.logger import _duration

    assert [_duration(s) for s in (5, 252, 7500, float("inf"))] == ["5s", "4m12s", "2h05m", "?"]


def test_a_finished_run_records_no_empty_segment_and_restart_retrains(smoke_params, capsys):
    """Re-running a finished run (as dvc does after a code edit) trains nothing and records no new segment;
    ``--restart`` trains again from iteration 0."""
    _, run_dir = _run(smoke_params, "mask_s0", max_iter=2, checkpoint_every=2)
    first = json.loads((run_dir / "run.json").read_text())["segments"]
    result, _ = _run(smoke_params, "mask_s0", max_iter=2, checkpoint_every=2)
    assert result["resumed_from"] == 2
    assert json.loads((run_dir / "run.json").read_text())["segments"] == first
    resolved = resolve_run(apply_overrides(smoke_params, {"train.max_iter": 2, "train.checkpoint_every": 2}),
                           "mask_s0")
    capsys.readouterr()
    result = train_run(resolved, run_dir, progress=False, restart=True)
    assert result["resumed_from"] == 0 and "--restart: " in capsys.readouterr().out
    segments = json.loads((run_dir / "run.json").read_text())["segments"]
    assert len(segments) == 1 and segments[0]["created"] >= first[0]["created"]
