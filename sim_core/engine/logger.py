"""Training logs: ``train_log.jsonl``, dvclive metrics and a tqdm bar.

``train_log.jsonl`` is the plain record the report stage reads (one json object
per logged iteration). dvclive writes the same numbers as
``dvclive/plots/metrics/*.tsv`` so ``dvc plots show`` draws the curves.
Supervision-quality diagnostics (``quality``) are written as ``sq/<name>``
keys of the same record (dvclive: ``train/sq/<name>``); they are not losses.
On resume, log lines past the resumed iteration are dropped so the log reads
as one uninterrupted run.
"""
from __future__ import annotations

import json
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
        self.live = None
        self.bar = None
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
        if iteration % self.log_every and iteration != self.max_iter - 1:
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

    def close(self) -> None:
        if not self.enabled:
            return
        self.handle.close()
        self.bar.close()
        self.live.end()
