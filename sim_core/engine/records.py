"""A run's record: the fingerprint of what determined its weights, and checks that records agree.

A number in a table must belong to the model and settings it is shown with.
Three files make that traceable: ``last.ckpt`` and ``model.pt`` (the weights),
``run.json`` (how they were trained) and ``metrics.json`` (how they scored).
Each carries the run's *fingerprint*: the sha256 of every setting that
determines the trained weights (:func:`weights_inputs`):

* the prepared training data (the sha256 of ``train.json``) and the data
  settings that shape a batch (sizes, flips);
* the whole ``model`` section;
* the ``train`` section except the keys in :data:`MACHINE_ONLY_TRAIN_KEYS`;
* the method's params sections (``sim_core.config.method_sections``).

Left out are settings that change only where files go, how often something is
logged or saved, or how the arithmetic is spread over a machine (device,
threads, data-loading workers). Those can change the last bits of a CPU run as
a new machine does; each training segment's ``run.json`` entry records them.

The trainer resumes only from a checkpoint with the same fingerprint (else it
trains from iteration 0 and names the first settings that differ);
``simbench evaluate`` refuses a ``model.pt`` whose fingerprint is not the
current params'; ``simbench report`` and ``simbench status`` check every run
with :func:`check_run`.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sim_core.config import get_dotted, method_sections

# train keys that cannot change what is computed, only where it runs or what is written when
MACHINE_ONLY_TRAIN_KEYS = ("runs_dir", "device", "threads", "num_workers", "log_every", "checkpoint_every",
                           "supervision_diagnostics")
# data keys that do not reach a training batch (the data itself is identified by train.json's sha256)
DATA_WEIGHT_KEYS = ("dataset", "train_sizes", "max_size", "flip_prob")
TRAIN_JSON = "train.json"
VAL_JSON = "val.json"
NOT_FOUND = "missing"

_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (``'missing'`` when it does not exist); cached per size and mtime."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return NOT_FOUND
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


def _flat(node: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(node, dict):
        for key in sorted(node, key=str):
            _flat(node[key], f"{prefix}{key}.", out)
    else:
        out[prefix[:-1]] = _canonical(node)


def _canonical(value: Any) -> Any:
    """Numbers as floats (``1`` and ``1.0`` train alike), lists element by element."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(float(value)) else str(float(value))
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return str(value)


def weights_inputs(resolved: dict, train_json_sha256: str | None = None) -> dict[str, Any]:
    """Every setting that determines a run's trained weights, as ``{dotted.key: value}``.

    ``resolved``: one run's settings (``sim_core.config.resolve_run``).
    ``train_json_sha256``: the training data's identity; read from
    ``<data.root>/train.json`` when not given.
    """
    data = resolved["data"]
    if train_json_sha256 is None:
        train_json_sha256 = file_sha256(Path(data["root"]) / TRAIN_JSON)
    out: dict[str, Any] = {"data.train_json_sha256": train_json_sha256}
    _flat({k: data[k] for k in DATA_WEIGHT_KEYS if k in data}, "data.", out)
    _flat(resolved["model"], "model.", out)
    _flat({k: v for k, v in resolved["train"].items() if k not in MACHINE_ONLY_TRAIN_KEYS}, "train.", out)
    for section in method_sections(resolved["train"]["method"]):
        _flat(get_dotted(resolved, section) or {}, f"{section}.", out)
    return out


def evaluation_inputs(resolved: dict, val_json_sha256: str | None = None) -> dict[str, Any]:
    """Every setting besides the model that determines a run's metrics: val data and evaluation settings."""
    if val_json_sha256 is None:
        val_json_sha256 = file_sha256(Path(resolved["data"]["root"]) / VAL_JSON)
    out: dict[str, Any] = {"data.val_json_sha256": val_json_sha256, "data.test_size": _canonical(
        resolved["data"].get("test_size"))}
    _flat(resolved.get("evaluate") or {}, "evaluate.", out)
    return out


def fingerprint(inputs: dict[str, Any]) -> str:
    """sha256 of the canonical json of ``inputs`` (the same for the same settings, on any machine)."""
    text = json.dumps(inputs, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _show(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12]  # a sha256
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def differences(old: dict[str, Any] | None, new: dict[str, Any], limit: int = 3) -> str:
    """The first differing keys as ``key old -> new`` (``'no settings fingerprint recorded'`` when ``old`` is
    None, as in a checkpoint written before fingerprints)."""
    if old is None:
        return "no settings fingerprint recorded"
    keys = sorted(set(old) | set(new))
    changed = [k for k in keys if old.get(k, NOT_FOUND) != new.get(k, NOT_FOUND)]
    if not changed:
        return "same settings"
    shown = [f"{k} {_show(old.get(k, '(absent)'))} -> {_show(new.get(k, '(absent)'))}" for k in changed[:limit]]
    more = f" (+{len(changed) - limit} more)" if len(changed) > limit else ""
    return ", ".join(shown) + more


@dataclass
class RunCheck:
    """What :func:`check_run` found for one run."""

    run: str
    iterations: int | None = None  # trained iterations (model.pt, else the latest checkpoint)
    max_iter: int | None = None
    evaluated: bool = False
    problems: list[str] = field(default_factory=list)
    commits: list[str] = field(default_factory=list)  # the code of each training segment

    @property
    def fresh(self) -> bool:
        return not self.problems


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _model_meta(path: Path) -> dict | None:
    import torch

    try:
        meta = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("meta")
    except Exception:  # unreadable, truncated, not a simbench model
        return None
    return meta if isinstance(meta, dict) else None


def _checkpoint_iteration(run_dir: Path) -> tuple[int | None, str | None]:
    from sim_core.engine.checkpoint import latest_checkpoint

    found = latest_checkpoint(run_dir, quiet=True)
    if found is None:
        return None, None
    state, _ = found
    return int(state["iteration"]), (state.get("fingerprint") or {}).get("sha256")


def segment_commits(stamp: dict | None) -> list[str]:
    """The commits (``<sha>`` or ``<sha>+dirty``) of a run's training segments, in order, from its run.json."""
    commits = []
    for segment in (stamp or {}).get("segments") or []:
        commit = str(segment.get("git_commit", "unknown")) + ("+dirty" if segment.get("dirty") else "")
        if commit not in commits:
            commits.append(commit)
    return commits


def check_run(resolved: dict, run_dir: str | Path) -> RunCheck:
    """Whether a run's ``model.pt``, ``run.json`` and ``metrics.json`` agree with each other and with
    ``resolved`` (the current params for this run); every disagreement is one problem line."""
    run_dir = Path(run_dir)
    result = RunCheck(str(resolved.get("run")), max_iter=int(resolved["train"]["max_iter"]))
    current_inputs = weights_inputs(resolved)
    current = fingerprint(current_inputs)
    stamp = _read_json(run_dir / "run.json")
    result.commits = segment_commits(stamp)
    model_path, metrics_path = run_dir / "model.pt", run_dir / "metrics.json"
    metrics = _read_json(metrics_path)
    result.evaluated = metrics is not None
    if not model_path.exists():
        result.iterations, ckpt_fingerprint = _checkpoint_iteration(run_dir)
        if result.iterations is None:
            result.problems.append("not trained")
        else:
            result.problems.append(f"training unfinished ({result.iterations} of {result.max_iter} iterations)")
            if ckpt_fingerprint != current:
                result.problems.append("its checkpoint has other settings than params (training will restart)")
        if metrics is not None:
            result.problems.append("metrics.json without the model.pt it scored")
        return result
    meta = _model_meta(model_path)
    if meta is None:
        result.problems.append("model.pt is unreadable")
        return result
    result.iterations = meta.get("iterations")
    model_fingerprint = meta.get("fingerprint")
    if model_fingerprint != current:
        old = (stamp or {}).get("fingerprint_inputs") if (stamp or {}).get("fingerprint") == model_fingerprint \
            else meta.get("fingerprint_inputs")
        result.problems.append(f"params changed since training: {differences(old, current_inputs)}")
    if stamp is None:
        result.problems.append("run.json is missing or unreadable")
    else:
        result.problems += _stamp_problems(stamp, model_fingerprint)
    if metrics is not None:
        result.problems += _metrics_problems(metrics, model_path, model_fingerprint, resolved)
    return result


def _stamp_problems(stamp: dict, model_fingerprint: str | None) -> list[str]:
    """run.json must describe the model: its fingerprint, and params that give that fingerprint."""
    inputs, recorded = stamp.get("fingerprint_inputs"), stamp.get("fingerprint")
    if not isinstance(inputs, dict) or recorded is None:
        return ["run.json records no settings fingerprint"]
    problems = []
    if recorded != model_fingerprint:
        problems.append("run.json and model.pt record different settings")
    params = stamp.get("params")
    try:
        rebuilt = weights_inputs(params, train_json_sha256=inputs.get("data.train_json_sha256"))
    except (KeyError, TypeError, AttributeError):
        rebuilt = None
    if fingerprint(inputs) != recorded or rebuilt != inputs:
        problems.append("run.json's params do not give its recorded fingerprint (edited by hand?): "
                        + differences(inputs, rebuilt or {}))
    return problems


def _metrics_problems(metrics: dict, model_path: Path, model_fingerprint: str | None, resolved: dict) -> list[str]:
    """metrics.json must score this very model.pt, with the current evaluation settings."""
    if "model_sha256" not in metrics or "fingerprint" not in metrics:
        return ["metrics.json does not name the model it scored (evaluate the run again)"]
    problems = []
    if metrics["model_sha256"] != file_sha256(model_path):
        problems.append("model.pt changed since it was evaluated")
    if metrics["fingerprint"] != model_fingerprint:
        problems.append("metrics.json and model.pt record different settings")
    recorded = metrics.get("evaluation_inputs")
    now = evaluation_inputs(resolved)
    if recorded != now:
        problems.append(f"evaluation settings or val data changed since evaluation: {differences(recorded, now)}")
    return problems


def check_matrix(params: dict, runs_dir: str | Path | None = None) -> list[RunCheck]:
    """:func:`check_run` for every run of the params' ``runs`` matrix, in its order.

    Results imported from another code base (``metrics.json`` with ``external:
    true``) have no model here: they are listed as evaluated and not checked."""
    from sim_core.config import resolve_run

    runs_dir = Path(runs_dir if runs_dir is not None else params["train"]["runs_dir"])
    checks = []
    for name in params.get("runs") or {}:
        run_dir = runs_dir / str(name)
        metrics = _read_json(run_dir / "metrics.json")
        if metrics is not None and metrics.get("external") is True:
            checks.append(RunCheck(str(name), evaluated=True))
            continue
        checks.append(check_run(resolve_run(params, str(name)), run_dir))
    return checks
