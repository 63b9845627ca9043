"""Training logs: ``train_log.jsonl``, dvclive metrics and a tqdm bar.

``train_log.jsonl`` is the plain record the report stage reads (one json object
per logged iteration). dvclive writes the same numbers as
``dvclive/plots/metrics/*.tsv`` so ``dvc plots show`` draws the curves.
Supervision-quality diagnostics (``quality``) are written as ``sq/<name>``
keys of the same record (dvclive: ``train/sq/<name>``); they are not losses.
On resume, log lines past the resumed iteration are dropped so the log reads
as one uninterrupted run.

Progress: a tqdm bar when a person runs one command in a terminal; otherwise
(``--no-progress``, as under ``dvc repro`` and ``simbench repro``) one plain
line on stdout every logged iteration and at least once a minute: run name,
iteration / total, the losses, iterations per second and the time left.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm

from sim_core.io_utils import atomic_write_text


class TrainLogger:
    def __init__(self, run_dir: Path, start_iter: int, max_iter: int, enabled: bool = True,
                 progress: bool = True, log_every: int = 20):
        self.enabled = enabled
        self.log_every = max(1, log_every)
        self.max_iter = max_iter
        self.path = Path(run_dir) / "train_log.jsonl"
        self.name = Path(run_dir).name
        self.progress = progress
        self.live = None
        self.bar = None
        self.started, self.start_iter = time.monotonic(), start_iter
        self.last_line = self.started
        if not enabled:
            return
        self._truncate(start_iter)
        self.handle = self.path.open("a", encoding="utf-8")
        from dvclive import Live

        self.live = Live(dir=str(Path(run_dir) / "dvclive"), resume=start_iter > 0, save_dvc_exp=False,
                         dvcyaml=None, report=None)
        self.bar = tqdm(total=max_iter, initial=start_iter, desc=Path(run_dir).name, disable=not progress,
                        dynamic_ncols=True, mininterval=1.0)

    def _truncate(self, start_iter: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["iteration"] < start_iter:
                    kept.append(line)
            except (ValueError, KeyError):
                break
        atomic_write_text(self.path, "".join(k + "\n" for k in kept))

    def log(self, iteration: int, lr: float, losses: dict[str, float], seconds: float,
            quality: dict[str, float] | None = None) -> None:
        if not self.enabled:
            return
        self.bar.update(1)
        logged = not (iteration % self.log_every and iteration != self.max_iter - 1)
        if not self.progress and (logged or time.monotonic() - self.last_line >= 60.0):
            print(self.progress_line(iteration, losses), flush=True)
            self.last_line = time.monotonic()
        if not logged:
            return
        sq = {f"sq/{k}": v for k, v in (quality or {}).items()}
        record = {"iteration": iteration, "lr": lr, "time": round(seconds, 4),
                  **{k: round(v, 6) for k, v in losses.items()}, **{k: round(v, 6) for k, v in sq.items()}}
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        self.bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items() if k.startswith("loss")}, refresh=False)
        self.live.step = iteration
        for key, value in losses.items():
            self.live.log_metric(f"train/{key}", value)
        for key, value in sq.items():
            self.live.log_metric(f"train/{key}", value)
        self.live.log_metric("train/lr", lr)
        self.live.next_step()

    def progress_line(self, iteration: int, losses: dict[str, float]) -> str:
        """``sim_s0: iter 120/700  loss 1.234 (loss_cls 0.512, ...)  2.31 it/s  ETA 4m12s``."""
        done = iteration + 1 - self.start_iter
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = done / elapsed
        left = (self.max_iter - iteration - 1) / rate if rate > 0 else float("inf")
        terms = ", ".join(f"{k} {v:.3f}" for k, v in losses.items() if k.startswith("loss_"))
        total = f"loss {losses['loss']:.3f}" if "loss" in losses else ""
        return (f"{self.name}: iter {iteration + 1}/{self.max_iter}  {total}" + (f" ({terms})" if terms else "")
                + f"  {rate:.2f} it/s  ETA {_duration(left)}")

    def close(self) -> None:
        if not self.enabled:
            return
        self.handle.close()
        self.bar.close()
        self.live.end()


def _duration(seconds: float) -> str:
    """``4m12s``, ``2h05m``, ``12s`` (``?`` when unknown)."""
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"
