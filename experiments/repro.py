"""``simbench repro``: ``dvc repro`` with the runs of the matrix side by side.

DVC reproduces a pipeline's stages one after the other. The runs of the
matrix are independent branches (``prepare -> train@<run> -> evaluate@<run>``),
and small models use a CPU badly: on 2 cores, two one-thread trainings side
by side finish in about two thirds of the time the same two take one after
the other with two threads each (README, *Results*). This verb

1. reproduces ``prepare`` (everything the runs share) and asks ``dvc status``
   which runs have work left,
2. reproduces ``train@<run>`` and ``evaluate@<run>`` of every run, and
   ``upstream@<run>`` of every ``upstream_runs`` entry (the authors' code,
   ``simbench upstream``) (``dvc repro --single-item``), ``--jobs`` runs at a
   time, longest runs first,
3. reproduces the rest (the report) with a final plain ``dvc repro``.

Every step is an ordinary ``dvc repro`` call, so dvc.lock, the cache, the
outputs and the numbers are those of a sequential ``dvc repro``: each
training and evaluation uses ``train.threads`` threads whatever ``--jobs`` is
(thread count changes floating-point sums, so it is a param). The workers
take DVC's repo lock only for their bookkeeping (DVC releases it while a
stage's command runs) and wait for it (``--wait-for-lock``) instead of
failing; ``--single-item`` keeps a worker from re-checking ``prepare``, whose
output the other workers' trainings hold a read lock on. On a GPU machine
each worker gets its own ``train.processes`` GPUs through
``CUDA_VISIBLE_DEVICES``: one run per GPU by default.

The params are validated exactly as ``simbench train`` validates them
(every run's name, entry and settings) before anything runs. Two ``simbench
repro`` in one checkout would race each other's workers, so one holds
``.dvc/tmp/simbench-repro.lock`` (``flock``: the kernel drops it when the
holder dies, so a killed run leaves no stale lock) while it works; a second
one stops at once naming the holder's pid, or waits for it with ``--wait``.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sim_core.methods import get_method

# Relative time of a run per iteration: a method's ``step_cost`` (sim_core.methods). Only orders the queue
# (longest first, so no long run starts last); a wrong guess costs time, never correctness.
# The same for the authors' code bases (upstream_demo of 2026-12-01: AdelaiDet BoxInst 1.72 s, released SIM
# 1.86 s per iteration against 1.16 s for simbench's BoxInst in the same setting).
UPSTREAM_STEP_COST = {"adelaidet": 1.85, "sim": 1.85}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", "-j", type=int, default=None,
                        help="runs reproduced at once (default: CPU cores // train.threads on a CPU, "
                             "GPUs // train.processes on a GPU machine)")
    parser.add_argument("--params", default="params.yaml", help="params file of the pipeline (default: params.yaml)")
    parser.add_argument("--dry", action="store_true", help="print the dvc commands instead of running them")
    parser.add_argument("--wait", action="store_true",
                        help="when another simbench repro runs in this checkout, wait for it instead of stopping")


@dataclass
class Job:
    """One run, in a worker: its training and evaluation stages, or an upstream run's one stage."""

    run: str
    cost: float
    stages: tuple[str, ...] = ()
    seconds: float = 0.0
    returncode: int | None = None

    def __post_init__(self) -> None:
        if not self.stages:
            self.stages = (f"train@{self.run}", f"evaluate@{self.run}")


def default_jobs(train_cfg: dict, cpu_count: int, gpu_count: int) -> int:
    """Workers that keep the machine busy without sharing a core or a GPU (``gpu_count``: GPUs the runs use)."""
    if gpu_count > 0:
        return max(1, gpu_count // max(1, int(train_cfg.get("processes", 1))))
    threads = int(train_cfg.get("threads", 0))
    return max(1, cpu_count // threads) if threads > 0 else 1


def queue_longest_first(params: dict) -> list[Job]:
    """The runs of ``params['runs']`` and ``params['upstream_runs']`` by expected training time, longest first."""
    default_iters = params["train"]["max_iter"]

    def max_iter(entry: dict) -> float:
        return float(((entry.get("set") if isinstance(entry, dict) else None) or {}).get("train.max_iter",
                                                                                       default_iters))

    jobs = [Job(name, get_method(run["method"]).step_cost * max_iter(run))
            for name, run in (params.get("runs") or {}).items()]
    for name, entry in (params.get("upstream_runs") or {}).items():
        code = entry.get("code", "") if isinstance(entry, dict) else ""
        jobs.append(Job(name, UPSTREAM_STEP_COST.get(code, 2.0) * max_iter(entry), (f"upstream@{name}",)))
    return sorted(jobs, key=lambda job: -job.cost)


def gpu_slices(devices: list[str], per_job: int, jobs: int) -> list[str]:
    """``CUDA_VISIBLE_DEVICES`` for each worker: disjoint groups of ``per_job`` of ``devices``.

    ``devices`` are the GPU ids this command may use (the caller's own
    ``CUDA_VISIBLE_DEVICES`` when set, so a worker never escapes it).
    """
    return [",".join(devices[i * per_job:(i + 1) * per_job]) for i in range(jobs)
            if (i + 1) * per_job <= len(devices)]


def _dvc(*args: str, command: str = "repro") -> list[str]:
    dvc = Path(sys.executable).with_name("dvc")
    return [str(dvc) if dvc.exists() else "dvc", "--wait-for-lock", command, *args]


def runs_with_work(queue: list[Job], changed_stages: set[str]) -> list[Job]:
    """The jobs with a stage DVC reports as changed (order kept)."""
    return [job for job in queue if set(job.stages) & changed_stages]


def _changed_stages() -> set[str] | None:
    """Stage names ``dvc status`` reports as changed; None when it cannot tell."""
    status = subprocess.run(_dvc("--json", command="status"), capture_output=True, text=True)
    try:
        return set(json.loads(status.stdout)) if status.returncode == 0 else None
    except ValueError:
        return None


def _run_stages(job: Job) -> list[str]:
    return _dvc("--single-item", *job.stages)


def _stream(prefix: str, process: subprocess.Popen, lock: threading.Lock) -> None:
    for line in process.stdout:  # type: ignore[union-attr]
        with lock:
            sys.stdout.write(f"{prefix}{line}")
            sys.stdout.flush()


def _run_worker(queue: list[Job], queue_lock: threading.Lock, print_lock: threading.Lock,
                failed: threading.Event, env: dict, total: int, finished: list[Job]) -> None:
    while not failed.is_set():
        with queue_lock:
            if not queue:
                return
            job = queue.pop(0)
        start = time.monotonic()
        process = subprocess.Popen(_run_stages(job), env={**os.environ, **env}, text=True,
                                   encoding="utf-8", errors="replace",
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1)
        _stream(f"[{job.run}] ", process, print_lock)
        job.returncode = process.wait()
        job.seconds = time.monotonic() - start
        with queue_lock:
            finished.append(job)
            done = len(finished)
        with print_lock:
            state = "done" if job.returncode == 0 else f"FAILED (exit code {job.returncode})"
            print(f"simbench repro: {job.run} {state} in {job.seconds:.0f} s ({done}/{total} runs)", flush=True)
        if job.returncode != 0:
            failed.set()


LOCK_NAME = "simbench-repro.lock"


def lock_path() -> Path:
    """``.dvc/tmp/simbench-repro.lock``; beside the params when this is no dvc checkout (no ``.dvc`` made)."""
    return Path(".dvc") / "tmp" / LOCK_NAME if Path(".dvc").is_dir() else Path(f".{LOCK_NAME}")


@contextlib.contextmanager
def repro_lock(path: Path | None = None, wait: bool = False):
    """Hold ``path`` (``flock``, exclusive) while a ``simbench repro`` works; it records the holder's pid.

    Taken by another process: InputError naming its pid, or with ``wait``
    block until it is released. The kernel releases the lock when the holder
    exits, however it exits, so no stale lock survives a killed run.
    """
    from sim_core.errors import InputError

    path = path or lock_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # never truncate: the holder's pid stays readable
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            if not wait:
                raise InputError(path, f"another simbench repro (pid {holder}) is running in this checkout; "
                                       "wait for it to finish, or pass --wait to queue behind it") from None
            print(f"simbench repro: waiting for the simbench repro with pid {holder} to finish", flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _lock_holder(fd: int) -> str:
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return text if text.isdigit() else "unknown"


def check_weights(params: dict) -> None:
    """Every run's backbone weights on this machine (``imagenet``: downloaded once) before any stage runs."""
    from sim_core.config import resolve_run
    from sim_core.model.pretrained import prepare_weights

    seen = set()
    for name in params.get("runs") or {}:
        model = resolve_run(params, name)["model"]
        key = (str(model.get("backbone")), repr(model.get("pretrained")))
        if key not in seen:
            seen.add(key)
            prepare_weights(model)


def main(args: argparse.Namespace) -> int:
    from sim_core.config import load_params
    from sim_core.errors import InputError

    params = load_params(args.params)  # the checks of `simbench train`, for every run, before any work
    gpu_count = _visible_gpus() if str(params["train"].get("device", "auto")) in ("auto", "cuda") else 0
    jobs = args.jobs if args.jobs is not None else default_jobs(params["train"], os.cpu_count() or 1, gpu_count)
    if jobs < 1:
        raise InputError("--jobs", f"must be at least 1, got {jobs}")
    queue = queue_longest_first(params)
    per_job = max(1, int(params["train"].get("processes", 1)))
    slices = gpu_slices(_gpu_ids(gpu_count), per_job, jobs) if gpu_count else []
    envs = [{"CUDA_VISIBLE_DEVICES": s} for s in slices] or [{} for _ in range(jobs)]  # one per worker
    if args.dry:
        print(" ".join(_dvc("prepare")))
        for job in queue:
            print(" ".join(_run_stages(job)))
        print(" ".join(_dvc()))
        print(f"# {len(queue)} runs, {min(len(envs), len(queue))} at a time")
        return 0
    check_weights(params)  # before `dvc repro prepare`: offline without cached weights stops here (exit 2)
    with repro_lock(wait=args.wait):
        return _reproduce(queue, envs)


def _reproduce(queue: list[Job], envs: list[dict]) -> int:
    start = time.monotonic()
    if subprocess.call(_dvc("prepare")) != 0:
        return 1
    total = len(queue)
    changed = _changed_stages()  # after prepare: a new dataset shows in the runs' status only now
    queue = runs_with_work(queue, changed) if changed is not None else queue
    envs = envs[:len(queue)]
    print(f"simbench repro: {len(queue)} of {total} runs to reproduce, {len(envs)} at a time", flush=True)
    finished: list[Job] = []
    failed = threading.Event()
    queue_lock, print_lock = threading.Lock(), threading.Lock()
    threads = [threading.Thread(target=_run_worker, args=(queue, queue_lock, print_lock, failed, env,
                                                          len(queue), finished)) for env in envs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    bad = [job.run for job in finished if job.returncode != 0]
    if bad:
        sys.stderr.write(f"simbench repro: stopped: {', '.join(bad)} failed (its output above, "
                         f"prefixed [{bad[0]}]); finished runs are kept, run it again to go on\n")
        return 1
    code = subprocess.call(_dvc())
    print(f"simbench repro: {'finished' if code == 0 else 'failed'} in {time.monotonic() - start:.0f} s", flush=True)
    return 0 if code == 0 else 1


def _gpu_ids(gpu_count: int) -> list[str]:
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return visible[:gpu_count] if visible else [str(i) for i in range(gpu_count)]


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
