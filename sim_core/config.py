"""Params: load, override, validate, resolve one run.

``params.yaml`` is one complete, flat set of settings (a *profile*): one
section per stage (``data``, ``synthetic``, ``model``, ``train``, ``evaluate``,
``report``), one per method (``mask``, ``boxmask``, ``boxinst``,
``boxlevelset``, ``sim``) and the ``runs`` matrix. Profiles live in
``experiments/profiles/<name>.yaml``; each is complete on its own (no
inheritance), and ``simbench profile NAME`` makes one the active params.yaml.

Validation compares a params set against the packaged ``demo`` profile: every
key must exist there and carry a value of the same kind (numbers are
interchangeable between int and float; ``null`` in the reference admits
anything). So a typo in a key, a string where a number belongs, or a negative
learning rate stops the command before any work starts.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from sim_core.errors import InputError

PROFILES_DIR = Path(__file__).resolve().parents[1] / "experiments" / "profiles"
METHODS = ("mask", "boxmask", "boxinst", "boxlevelset", "sim")
# Mappings whose keys are free-form (their entries are named by the user).
FREE_MAPPINGS = ("runs", "report.paper_settings", "report.data_dirs")


def read_yaml(path: str | Path) -> dict:
    """``yaml.safe_load`` a mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise InputError(path, f"invalid YAML{where}") from None
    if not isinstance(data, dict):
        raise InputError(path, "expected a mapping of sections at the top level")
    return data


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def profile_path(name: str) -> Path:
    path = PROFILES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise InputError("profile", f"unknown profile '{name}'; choose one of {', '.join(available_profiles())}")
    return path


def reference_params() -> dict:
    """The packaged demo profile: the schema every params set is checked against."""
    return read_yaml(profile_path("demo"))


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> dict:
    """Load, apply ``--set key=value`` overrides, and validate a params file."""
    params = read_yaml(path)
    params = apply_overrides(params, overrides or [], source=str(path))
    validate_params(params, source=str(path))
    return params


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise InputError("--set", f"expected key=value, got '{text}'")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise InputError("--set", f"empty key in '{text}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(params: dict, key: str, value: Any, source: str = "--set", create: bool = False) -> None:
    """Set ``a.b.c`` in a nested dict; unknown keys are errors unless ``create``."""
    node = params
    parts = key.split(".")
    for part in parts[:-1]:
        if part not in node or not isinstance(node[part], dict):
            if not create:
                raise InputError(source, f"unknown params key '{key}'")
            node[part] = {}
        node = node[part]
    if parts[-1] not in node and not create:
        raise InputError(source, f"unknown params key '{key}'")
    node[parts[-1]] = value


def get_dotted(params: dict, key: str, default: Any = None) -> Any:
    node: Any = params
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def apply_overrides(params: dict, overrides: list[str] | dict, source: str = "--set") -> dict:
    params = copy.deepcopy(params)
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides)
    for key, value in items:
        set_dotted(params, key, value, source=source)
    return params


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "mapping"
    if value is None:
        return "null"
    return type(value).__name__


def _check_against(node: dict, ref: dict, prefix: str, source: str) -> None:
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if key not in ref:
            raise InputError(source, f"unknown params key '{dotted}'")
        expected = ref[key]
        if expected is None or value is None:
            continue
        if _kind(value) != _kind(expected):
            raise InputError(source, f"params key '{dotted}' must be a {_kind(expected)}, got {_kind(value)} {value!r}")
        if isinstance(expected, dict) and dotted not in FREE_MAPPINGS:
            _check_against(value, expected, dotted + ".", source)


def validate_params(params: dict, source: str = "params.yaml") -> None:
    """Fail early, naming the key, on anything the engine would trip over later."""
    ref = reference_params()
    _check_against(params, ref, "", source)
    for section in ref:
        if section not in params:
            raise InputError(source, f"missing params section '{section}'")
    train = params["train"]
    if not train["lr"] > 0:
        raise InputError(source, f"params key 'train.lr' must be positive, got {train['lr']!r}")
    for key in ("max_iter", "batch_size", "checkpoint_every"):
        if not (isinstance(train[key], int) and train[key] > 0):
            raise InputError(source, f"params key 'train.{key}' must be a positive integer, got {train[key]!r}")
    if params.get("profile") not in available_profiles():
        raise InputError(source, f"params key 'profile': unknown profile '{params.get('profile')}'; "
                                 f"choose one of {', '.join(available_profiles())}")
    runs = params.get("runs") or {}
    if not isinstance(runs, dict):
        raise InputError(source, "params key 'runs' must map run names to {method, seed, set}")
    for name, run in runs.items():
        _validate_run(name, run, params, source)


def _validate_run(name: str, run: Any, params: dict, source: str) -> None:
    if not isinstance(run, dict):
        raise InputError(source, f"params key 'runs.{name}' must be a mapping")
    unknown = set(run) - {"method", "seed", "set"}
    if unknown:
        raise InputError(source, f"unknown params key 'runs.{name}.{sorted(unknown)[0]}'")
    if run.get("method") not in METHODS:
        raise InputError(source, f"params key 'runs.{name}.method': unknown method '{run.get('method')}'; "
                                 f"choose one of {', '.join(METHODS)}")
    if not isinstance(run.get("seed", 0), int):
        raise InputError(source, f"params key 'runs.{name}.seed' must be an integer")
    overrides = run.get("set") or {}
    if not isinstance(overrides, dict):
        raise InputError(source, f"params key 'runs.{name}.set' must map dotted keys to values")
    resolved = apply_overrides(_without_runs(params), overrides, source=f"{source}: runs.{name}.set")
    _check_against(resolved, reference_params(), "", f"{source}: runs.{name}.set")


def _without_runs(params: dict) -> dict:
    return {k: v for k, v in params.items() if k != "runs"}


def resolve_run(params: dict, run_name: str) -> dict:
    """The complete settings of one run: params with the run's overrides applied.

    The result has ``train.method`` and ``train.seed`` filled from the run entry
    and no ``runs`` section, so it is exactly what ``run.json`` records.
    """
    runs = params.get("runs") or {}
    if run_name not in runs:
        choices = ", ".join(runs) or "(none declared)"
        raise InputError("--run", f"unknown run '{run_name}'; runs declared in params: {choices}")
    run = runs[run_name]
    resolved = apply_overrides(_without_runs(params), run.get("set") or {}, source=f"runs.{run_name}.set")
    resolved["train"]["method"] = run["method"]
    resolved["train"]["seed"] = int(run.get("seed", 0))
    resolved["run"] = run_name
    return resolved
