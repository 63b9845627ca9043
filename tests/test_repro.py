"""``simbench repro``: how many runs go at once, in which order, on which GPUs, what a failure does,
and what a second ``simbench repro`` in the same checkout does (stops naming the first, or waits).

The end-to-end check (same dvc.lock state and the same metrics as a
sequential ``dvc repro``) is in test_pipeline.py.
"""
from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml

from experiments import repro
from sim_core.cli import main
from sim_core.engine.seeding import set_cpu_threads

REPO = Path(__file__).resolve().parents[1]


def _demo_params() -> dict:
    return yaml.safe_load((REPO / "experiments" / "profiles" / "demo.yaml").read_text())


@pytest.mark.parametrize("train_cfg, cpus, gpus, expected", [
    ({"threads": 1}, 2, 0, 2),           # one single-thread run per core
    ({"threads": 2}, 8, 0, 4),
    ({"threads": 3}, 2, 0, 1),           # never zero workers
    ({"threads": 0}, 8, 0, 1),           # torch's default already uses every core
    ({"threads": 1, "processes": 1}, 2, 4, 4),  # one run per GPU
    ({"threads": 1, "processes": 2}, 2, 4, 2),  # two GPUs per run (torchrun inside the stage)
])
def test_default_jobs(train_cfg, cpus, gpus, expected):
    assert repro.default_jobs(train_cfg, cpus, gpus) == expected


def test_gpu_slices_are_disjoint_and_whole():
    gpus = ["0", "1", "2", "3"]
    assert repro.gpu_slices(gpus, 1, 4) == ["0", "1", "2", "3"]
    assert repro.gpu_slices(gpus, 2, 2) == ["0,1", "2,3"]
    assert repro.gpu_slices(gpus[:3], 2, 2) == ["0,1"]  # a run never gets fewer GPUs than train.processes
    assert repro.gpu_slices(["4", "6"], 1, 2) == ["4", "6"]  # the caller's own CUDA_VISIBLE_DEVICES


def test_gpu_ids_stay_inside_the_callers_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3")
    assert repro._gpu_ids(2) == ["2", "3"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert repro._gpu_ids(3) == ["0", "1", "2"]


def test_queue_puts_the_longest_runs_first():
    params = _demo_params()
    params["runs"]["short_sim"] = {"method": "sim", "seed": 0, "set": {"train.max_iter": 10}}
    order = [job.run for job in repro.queue_longest_first(params)]
    assert set(order) == set(params["runs"])
    assert order.index("sim_s0") < order.index("boxinst_s0") < order.index("mask_s0")
    assert order[-1] == "short_sim"  # its own max_iter counts, not the profile's


def test_upstream_runs_are_queued_beside_the_runs():
    """upstream_runs entries are jobs of their own (stage upstream@<name>), not left to the final dvc repro."""
    params = _demo_params()
    params["upstream_runs"] = {"sim_orig_s0": {"code": "sim", "seed": 0},
                               "short_orig": {"code": "adelaidet", "set": {"train.max_iter": 10}}}
    queue = repro.queue_longest_first(params)
    jobs = {job.run: job for job in queue}
    assert jobs["sim_orig_s0"].stages == ("upstream@sim_orig_s0",)
    assert jobs["sim_s0"].stages == ("train@sim_s0", "evaluate@sim_s0")
    assert queue[0].run == "sim_orig_s0" and queue[-1].run == "short_orig"
    assert [job.run for job in repro.runs_with_work(queue, {"upstream@short_orig", "report"})] == ["short_orig"]
    assert repro._run_stages(jobs["sim_orig_s0"])[-2:] == ["--single-item", "upstream@sim_orig_s0"]


def test_only_runs_with_changed_stages_are_queued():
    queue = [repro.Job("sim_s0", 3.0), repro.Job("mask_s0", 2.0), repro.Job("boxinst_s0", 1.0)]
    changed = {"evaluate@mask_s0", "train@boxinst_s0", "report"}
    assert [job.run for job in repro.runs_with_work(queue, changed)] == ["mask_s0", "boxinst_s0"]
    assert repro.runs_with_work(queue, {"report"}) == []


def test_dry_run_lists_one_command_per_run(tmp_path, capsys):
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(_demo_params()))
    assert main(["repro", "--dry", "--jobs", "2", "--params", str(params_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    runs = _demo_params()["runs"]
    assert lines[0].endswith("repro prepare")
    assert sum(f"--single-item train@{run} evaluate@{run}" in line for line in lines for run in runs) == len(runs)
    assert lines[-2].endswith("--wait-for-lock repro")  # the report and anything else last
    assert lines[-1] == f"# {len(runs)} runs, 2 at a time"


@pytest.mark.parametrize("argv, needle", [
    (["--jobs", "0"], "--jobs"),
    (["--params", "no/such/params.yaml"], "no/such/params.yaml"),
])
def test_bad_input_exits_2(tmp_path, capsys, argv, needle):
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(_demo_params()))
    code = main(["repro", "--params", str(params_path), *argv])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err


def test_a_failed_run_stops_the_queue(monkeypatch, capsys, tmp_path):
    """After a failure no new run starts; the runs already finished are reported."""
    monkeypatch.chdir(tmp_path)  # where "never" would leave its marker file
    commands = {"good": [sys.executable, "-c", "print('trained good')"],
                "bad": [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"],
                "never": [sys.executable, "-c", "open('never-started', 'w')"]}
    monkeypatch.setattr(repro, "_run_stages", lambda job: commands[job.run])
    queue = [repro.Job("good", 3.0), repro.Job("bad", 2.0), repro.Job("never", 1.0)]
    finished: list[repro.Job] = []
    failed = threading.Event()
    repro._run_worker(queue, threading.Lock(), threading.Lock(), failed, {}, 3, finished)
    out = capsys.readouterr().out
    assert [(job.run, job.returncode) for job in finished] == [("good", 0), ("bad", 3)]
    assert failed.is_set() and [job.run for job in queue] == ["never"]
    assert "[good] trained good" in out and "[bad] boom" in out
    assert "bad FAILED (exit code 3)" in out
    assert not Path("never-started").exists()


def test_set_cpu_threads_follows_the_param():
    before = torch.get_num_threads()
    try:
        assert set_cpu_threads({"threads": 1}) == 1 == torch.get_num_threads()
        assert set_cpu_threads({"threads": 0}) == 1  # 0 keeps the current (default) count
    finally:
        torch.set_num_threads(before)


# --- two `simbench repro` in one checkout ---------------------------------------------------------

HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.pwrite(fd, f"{os.getpid()}\\n".encode(), 0)
print("locked", flush=True)
sys.stdin.readline() if sys.argv[2] == "until-told" else time.sleep(float(sys.argv[2]))
"""


def _checkout(tmp_path, monkeypatch) -> Path:
    """A dvc-like checkout in tmp_path with demo params; no dvc command may run."""
    (tmp_path / ".dvc" / "tmp").mkdir(parents=True)
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(_demo_params()))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(repro, "check_weights", lambda params: None, raising=False)
    return params_path


def _hold_lock(seconds: float | str):
    import subprocess

    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(repro.lock_path()), str(seconds)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_second_repro_stops_at_once_naming_the_holder(tmp_path, monkeypatch, capsys):
    params_path = _checkout(tmp_path, monkeypatch)
    monkeypatch.setattr(repro, "_reproduce", lambda queue, envs: pytest.fail("ran while another repro held the lock"))
    holder = _hold_lock(60)
    try:
        code = main(["repro", "--params", str(params_path)])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert f"another simbench repro (pid {holder.pid}) is running" in err and "--wait" in err
        assert repro.lock_path().read_text().strip() == str(holder.pid)  # the holder's record untouched
    finally:
        holder.kill()
        holder.wait()
    assert yaml.safe_load(params_path.read_text()) == _demo_params()


def test_second_repro_waits_with_wait(tmp_path, monkeypatch, capsys):
    params_path = _checkout(tmp_path, monkeypatch)
    ran = []
    monkeypatch.setattr(repro, "_reproduce", lambda queue, envs: ran.append(repro.lock_path().read_text()) or 0)
    holder = _hold_lock("until-told")
    real_flock = repro.fcntl.flock

    def flock(fd, operation):  # the blocking wait begins: now let the holder finish
        if operation == repro.fcntl.LOCK_EX:
            holder.stdin.write("done\n")
            holder.stdin.flush()
        return real_flock(fd, operation)

    monkeypatch.setattr(repro.fcntl, "flock", flock)
    try:
        assert main(["repro", "--wait", "--params", str(params_path)]) == 0
    finally:
        holder.kill()
        holder.wait()
    assert f"waiting for the simbench repro with pid {holder.pid}" in capsys.readouterr().out
    assert ran == [f"{os.getpid()}\n"]  # it worked holding the lock itself
    assert repro.lock_path().read_text() == ""  # released: no pid left behind


def test_a_killed_holder_leaves_no_stale_lock(tmp_path, monkeypatch):
    _checkout(tmp_path, monkeypatch)
    holder = _hold_lock(60)
    holder.kill()
    holder.wait()
    with repro.repro_lock():  # taken at once: the kernel dropped the dead holder's lock
        assert repro.lock_path().read_text().strip() == str(os.getpid())


def test_lock_outside_a_dvc_checkout_creates_no_dvc_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with repro.repro_lock():
        pass
    assert not (tmp_path / ".dvc").exists()
