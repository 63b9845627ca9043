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

Params files are plain YAML without anchors and aliases (``&a``/``*a``): the
loader refuses the first anchor or alias it meets, before anything is
expanded, so a few lines cannot grow into gigabytes (the "billion laughs"
file). Run names are file names (``runs/<name>/``, ``train@<name>``): letters,
digits, ``_``, ``-`` and ``.`` only. A key that a run entry sets (``train.seed``
and ``train.method`` come from ``runs.<name>.seed`` and ``.method``), or that
another key governs for the run, cannot be overridden with ``--set`` or a
run's ``set:``: the override would be silently ignored, so it is refused,
naming the place to set it.
"""
from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any

import yaml

from sim_core.errors import InputError, quote, shorten
from sim_core.methods import builtin_names, get_method, is_plugin

PROFILES_DIR = Path(__file__).resolve().parents[1] / "experiments" / "profiles"
METHODS = builtin_names()  # the built-in methods, from the one table (sim_core.methods)
# The kind of value a key takes whose demo value is ``null`` (``null`` itself is always allowed there).
NULLABLE_KINDS = {"train.norm_weight_decay": "number", "boxinst.pairwise_warmup_iters": "number",
                  "sim.pairwise_color_thresh": "number", "report.main": "list", "report.components": "list",
                  "report.alpha": "list", "report.prototypes": "list"}
# Mappings whose keys are free-form (their entries are named by the user).
FREE_MAPPINGS = ("runs", "report.paper_settings", "report.data_dirs", "upstream_runs")
# train.cpu_amp is a bool or this word (bfloat16 where the CPU runs it natively); ``_check_train`` checks it
# in place of the type check, the trainer through ``is_cpu_amp_value`` as well.
CPU_AMP_WORDS = ("auto",)
# A run name becomes a directory (runs/<name>) and a dvc stage name (train@<name>).
RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}")
# Keys ``resolve_run`` fills from the run entry: an override of them would be ignored.
RUN_ENTRY_KEYS = {"train.seed": "seed", "train.method": "method"}


class AliasRefused(Exception):
    """A YAML anchor or alias in a params file (see :class:`NoAliasLoader`)."""

    def __init__(self, kind: str, name: str, line: int):
        self.kind, self.name, self.line = kind, name, line
        super().__init__(f"YAML {kind} '{'&' if kind == 'anchor' else '*'}{shorten(name, 40)}' at line {line}: "
                         "anchors and aliases are not allowed in params files; write the value out")


class NoAliasLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses the first anchor or alias while composing, before any expansion."""

    def compose_node(self, parent, index):  # noqa: ANN001 (PyYAML's signature)
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise AliasRefused("alias", event.anchor or "", event.start_mark.line + 1)
        if getattr(event, "anchor", None) is not None:
            raise AliasRefused("anchor", event.anchor, event.start_mark.line + 1)
        return super().compose_node(parent, index)


def load_yaml_text(text: str):
    """``yaml.safe_load`` without anchors and aliases (raises :class:`AliasRefused`)."""
    return yaml.load(text, Loader=NoAliasLoader)  # noqa: S506 (a SafeLoader subclass)


def read_yaml(path: str | Path) -> dict:
    """Safely load a YAML mapping without anchors or aliases, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file does not exist")
    try:
        data = load_yaml_text(path.read_text(encoding="utf-8"))
    except AliasRefused as exc:
        raise InputError(path, str(exc)) from None
    except UnicodeDecodeError:
        raise InputError(path, "not a UTF-8 text file") from None
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
        raise InputError("profile", f"unknown profile {quote(name)}{did_you_mean(name, available_profiles())}; "
                                    f"choose one of {', '.join(available_profiles())}")
    return path


def did_you_mean(word: str, choices: list[str] | set[str], shown: str | None = None) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``choices`` (``""`` when none is close).

    ``shown``: a template with ``{}`` for the match (a whole dotted key around a corrected part)."""
    close = difflib.get_close_matches(str(word), sorted(map(str, choices)), n=1, cutoff=0.6)
    return f" (did you mean {quote((shown or '{}').format(close[0]))}?)" if close else ""


def unknown_key(dotted: str, index: int, known: list[str]) -> str:
    """The message for an unknown params key whose part ``index`` is unknown; ``known``: that level's keys."""
    parts = dotted.split(".")
    template = ".".join([*parts[:index], "{}", *parts[index + 1:]])
    return f"unknown params key {quote(dotted)}{did_you_mean(parts[index], known, template)}"


def reference_params() -> dict:
    """The packaged demo profile: the schema every params set is checked against."""
    return read_yaml(profile_path("demo"))


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None,
                run: str | None = None) -> dict:
    """Load, apply ``--set key=value`` overrides, and validate a params file.

    ``run``: the run the command works on (``train``/``evaluate --run``); the
    overrides are then also checked against what that run's entry and settings
    overwrite (see :func:`check_overrides`).
    """
    params = with_method_defaults(read_yaml(path))
    parsed = [(key, integral_as_int(key, value)) for key, value in (parse_override(o) for o in overrides or [])]
    for key, _ in parsed:
        if key in RUN_ENTRY_KEYS and run is None:
            raise InputError("--set", f"'{key}' is set by each run entry (runs.<name>.{RUN_ENTRY_KEYS[key]} "
                                      f"in {path}), not with --set")
    params = apply_overrides(params, dict(parsed), source="--set")
    validate_params(params, source=str(path))
    if run is not None and parsed:
        resolved = resolve_run(params, run)
        check_overrides(resolved, run, [key for key, _ in parsed], "--set", str(path))
    return params


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise InputError("--set", f"expected key=value, got {quote(text)}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise InputError("--set", f"empty key in {quote(text)}")
    try:
        value = load_yaml_text(raw) if raw.strip() else ""
    except AliasRefused as exc:
        raise InputError("--set", f"{key}: {exc}") from None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and YAML12_NUMBER.fullmatch(value.strip()):  # 1e3: a number in YAML 1.2
        value = float(value.strip().replace("_", ""))
    return key, value


# YAML 1.2 numbers that PyYAML (YAML 1.1) reads as text: exponents without a dot, such as 1e3 or 2E-4
YAML12_NUMBER = re.compile(r"[-+]?(\d[\d_]*)?(\.\d*)?[eE][-+]?\d+")


def integral_as_int(key: str, value: Any) -> Any:
    """An integral float for a key whose default is an integer (``train.max_iter=1e3``) as that integer."""
    default = get_dotted(reference_params(), key)
    if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def set_dotted(params: dict, key: str, value: Any, source: str = "--set", create: bool = False) -> None:
    """Set ``a.b.c`` in a nested dict; unknown keys are errors unless ``create``."""
    node = params
    parts = key.split(".")
    for index, part in enumerate(parts[:-1]):
        if part not in node or not isinstance(node[part], dict):
            if not create:
                raise InputError(source, unknown_key(key, index, [str(k) for k, v in node.items()
                                                                  if isinstance(v, dict) and k != part]))
            node[part] = {}
        node = node[part]
    if parts[-1] not in node and not create:
        raise InputError(source, unknown_key(key, len(parts) - 1, [str(k) for k in node]))
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


def method_sections(method: str) -> tuple[str, ...]:
    """The params sections a method's loss reads, its own first (``sim_core.methods.MethodSpec.sections``)."""
    return get_method(method).sections


def plugin_methods(params: dict) -> list[Any]:
    """The specs of the methods of one's own that the runs use (built-ins excluded)."""
    runs = params.get("runs")
    names = [run.get("method") for run in runs.values() if isinstance(run, dict)] if isinstance(runs, dict) else []
    specs = []
    for name in dict.fromkeys(names):
        if isinstance(name, str) and is_plugin(name):
            try:
                specs.append(get_method(name))
            except InputError:
                continue  # validate_params names the run whose method this is
    return specs


def with_method_defaults(params: dict) -> dict:
    """``params`` with the params section of every method of one's own the runs use, its spec's defaults
    filling what the file does not set (a new dict; built-in sections come from the file alone)."""
    plugins = plugin_methods(params)
    if not plugins:
        return params
    params = copy.deepcopy(params)
    for spec in plugins:
        set_dotted(params, spec.name, {**copy.deepcopy(spec.defaults), **(get_dotted(params, spec.name) or {})},
                   create=True)
    return params


def schema_for(params: dict) -> dict:
    """The reference the params are checked against: the demo profile plus the sections of the methods of
    one's own that the runs use (their spec's defaults give keys and kinds)."""
    ref = reference_params()
    for spec in plugin_methods(params):
        set_dotted(ref, spec.name, copy.deepcopy(spec.defaults), create=True)
    return ref


def _check_against(node: dict, ref: dict, prefix: str, source: str) -> None:
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if key not in ref:
            raise InputError(source, unknown_key(dotted, dotted.count("."), [str(k) for k in ref]))
        expected = ref[key]
        if value is None or dotted == "train.cpu_amp":
            continue
        kind = NULLABLE_KINDS.get(dotted, "any") if expected is None else _kind(expected)
        if kind != "any" and _kind(value) != kind:
            raise InputError(source, f"params key '{dotted}' must be a {kind}{' or null' * (expected is None)}, "
                                     f"got {_kind(value)} {quote(value)}")
        if isinstance(value, list) and isinstance(expected, list) and expected and dotted not in FREE_MAPPINGS:
            item_kind = _kind(expected[0])
            wrong = next((item for item in value if _kind(item) != item_kind), None)
            if wrong is not None:
                raise InputError(source, f"params key '{dotted}' must be a list of {item_kind}s, "
                                         f"got {quote(value)}")
        if isinstance(expected, dict) and dotted not in FREE_MAPPINGS:
            _check_against(value, expected, dotted + ".", source)


def validate_params(params: dict, source: str = "params.yaml") -> None:
    """Fail early, naming the key, on anything the engine would trip over later."""
    for name, run in (params.get("runs") or {}).items() if isinstance(params.get("runs"), dict) else []:
        if isinstance(run, dict) and isinstance(run.get("method"), str):
            _check_method(name, run["method"], source)
    params = with_method_defaults(params)
    ref = schema_for(params)
    _check_against(params, ref, "", source)
    for section in ref:  # the demo profile's sections (the plugins' are filled in above)
        if section not in params:
            raise InputError(source, f"missing params section '{section}'")
    _check_train(params["train"], source)
    if params.get("profile") not in available_profiles():
        raise InputError(source, f"params key 'profile': unknown profile {quote(params.get('profile'))}; "
                                 f"choose one of {', '.join(available_profiles())}")
    runs = params.get("runs") or {}
    if not isinstance(runs, dict):
        raise InputError(source, "params key 'runs' must map run names to {method, seed, set}, "
                                 f"got a {_kind(runs)}")
    for name, run in runs.items():
        _validate_run(name, run, params, source, ref)


def is_cpu_amp_value(value: Any) -> bool:
    """Whether ``value`` is a valid ``train.cpu_amp``: ``true``, ``false`` or ``auto``."""
    return isinstance(value, bool) or value in CPU_AMP_WORDS


DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")  # what sim_core.engine.trainer.pick_device accepts


def _check_train(train: dict, source: str) -> None:
    """Numbers the engine divides by or counts with (``train`` after any overrides)."""
    if not train["lr"] > 0:
        raise InputError(source, f"params key 'train.lr' must be positive, got {quote(train['lr'])}")
    for key in ("max_iter", "batch_size", "checkpoint_every", "batch_per_process", "processes"):
        if not (isinstance(train.get(key), int) and not isinstance(train.get(key), bool) and train[key] > 0):
            raise InputError(source, f"params key 'train.{key}' must be a positive integer, "
                                     f"got {quote(train.get(key))}")
    threads = train.get("threads", 0)
    if not (isinstance(threads, int) and not isinstance(threads, bool) and threads >= 0):
        raise InputError(source, f"params key 'train.threads' must be an integer >= 0, got {quote(threads)}")
    runs_dir = train.get("runs_dir")
    if not (isinstance(runs_dir, str) and runs_dir.strip()):
        raise InputError(source, "params key 'train.runs_dir' must name the directory runs are written to "
                                 f"(e.g. 'runs'), got {quote(runs_dir)}")
    if not is_cpu_amp_value(train.get("cpu_amp", False)):
        raise InputError(source, f"params key 'train.cpu_amp' must be true, false or auto, "
                                 f"got {quote(train.get('cpu_amp'))}")
    device = train.get("device", "auto")
    if not (isinstance(device, str) and DEVICE_PATTERN.fullmatch(device)):
        raise InputError(source, "params key 'train.device' must be 'auto', 'cpu', 'cuda' or 'cuda:N', "
                                 f"got {quote(device)}")
    check_batch_split(train["batch_size"], train["batch_per_process"], train["processes"], source)


def check_batch_split(batch_size: int, batch_per_process: int, processes: int, source: str) -> None:
    """The rule of ``sim_core.engine.distributed.accumulation_steps``, checked before any work.

    Each iteration takes ``batch_size`` images in total: ``batch_size /
    processes`` per process (must be whole), fed in ``ceil(per_process /
    batch_per_process)`` micro-batches of equal size (``per_process`` must be
    a multiple of that count). E.g. 16 images on 1 process with at most 6 at
    once: 3 micro-batches of 16/3 -> refused; at most 4 or 8 at once: fine.
    """
    if batch_size % processes:
        raise InputError(source, f"params key 'train.batch_size' ({batch_size}) must be a multiple of "
                                 f"'train.processes' ({processes}): each process takes an equal share")
    per_process = batch_size // processes
    steps = -(-per_process // batch_per_process)
    if per_process % steps:
        raise InputError(source, f"params key 'train.batch_per_process' ({batch_per_process}): the {per_process} "
                                 f"images per process cannot be split into {steps} equal micro-batches of at "
                                 f"most {batch_per_process}; use a divisor of {per_process}")


def check_run_name(name: Any, source: str) -> None:
    """A run name is a directory and a dvc stage name: no path separators, no '..', no leading dot."""
    if not isinstance(name, str):
        raise InputError(source, f"params key 'runs': run name {quote(name)} must be text (quote it in YAML)")
    if not RUN_NAME.fullmatch(name) or ".." in name:
        raise InputError(source, f"params key 'runs': run name {quote(name)} may use only letters, digits, "
                                 "'_', '-' and '.' (at most 100, not starting with '.', no '..')")


def _validate_run(name: Any, run: Any, params: dict, source: str, schema: dict) -> None:
    check_run_name(name, source)
    if not isinstance(run, dict):
        raise InputError(source, f"params key 'runs.{name}' must be a mapping, got {_kind(run)} {quote(run)}")
    unknown = set(map(str, run)) - {"method", "seed", "set"}
    if unknown:
        raise InputError(source, f"unknown params key {quote(f'runs.{name}.{sorted(unknown)[0]}')}")
    _check_method(name, run.get("method"), source)
    seed = run.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise InputError(source, f"params key 'runs.{name}.seed' must be an integer, got {quote(seed)}")
    overrides = run.get("set") or {}
    if not isinstance(overrides, dict):
        raise InputError(source, f"params key 'runs.{name}.set' must map dotted keys to values")
    where = f"{source}: runs.{name}.set"
    for key in overrides:
        if not isinstance(key, str):
            raise InputError(where, f"key {quote(key)} must be a dotted params key")
    resolved = apply_overrides(_without_runs(params), overrides, source=where)
    _check_against(resolved, schema, "", where)
    _check_train(resolved["train"], where)
    check_overrides(_fill_run(resolved, name, run), name, list(overrides), where, source)


def _check_method(run_name: Any, method: Any, source: str) -> None:
    try:
        get_method(method)
    except InputError as exc:
        raise InputError(source, f"params key 'runs.{run_name}.method': {exc.problem}") from None


def _without_runs(params: dict) -> dict:
    return {k: v for k, v in params.items() if k != "runs"}


def _fill_run(resolved: dict, run_name: str, run: dict) -> dict:
    resolved["train"]["method"] = run["method"]
    resolved["train"]["seed"] = int(run.get("seed", 0))
    resolved["run"] = run_name
    return resolved


def resolve_run(params: dict, run_name: str) -> dict:
    """The complete settings of one run: params with the run's overrides applied.

    The result has ``train.method`` and ``train.seed`` filled from the run entry
    and no ``runs`` section, so it is exactly what ``run.json`` records.
    """
    runs = params.get("runs") or {}
    if not isinstance(runs, dict) or run_name not in runs:
        choices = shorten(", ".join(map(str, runs)) if isinstance(runs, dict) and runs else "(none declared)", 300)
        raise InputError("--run", f"unknown run {quote(run_name)}; runs declared in params: {choices}")
    run = runs[run_name]
    params = with_method_defaults(params)
    resolved = apply_overrides(_without_runs(params), run.get("set") or {}, source=f"runs.{run_name}.set")
    return _fill_run(resolved, run_name, run)


def overwritten_by(resolved: dict, run_name: str, key: str) -> str | None:
    """Where the value of ``key`` really comes from for this run, when it is not ``key`` itself.

    ``resolved``: the run's settings (:func:`resolve_run`). None: an override
    of ``key`` takes effect. These are every place the code replaces a params
    value after the overrides are applied:

    * ``train.seed``/``train.method``: the run entry (``runs.<name>.seed``/``.method``);
    * ``boxinst.pairwise_color_thresh`` in a SIM run whose ``sim.pairwise_color_thresh``
      (explicit, or the ``released_code`` variant's) is not null;
    * a ``sim.*`` key that ``sim.variant: released_code`` governs, in a SIM run of that variant.
    """
    if key in RUN_ENTRY_KEYS:
        return f"runs.{run_name}.{RUN_ENTRY_KEYS[key]}"
    if resolved["train"]["method"] != "sim" or not isinstance(resolved.get("sim"), dict):
        return None
    from sim_core.sim.variants import RELEASED_CODE, resolve_sim_settings

    sim = resolved["sim"]
    if key == "boxinst.pairwise_color_thresh":
        if resolve_sim_settings(sim, where=f"runs.{run_name}: sim").pairwise_color_thresh is not None:
            return "sim.pairwise_color_thresh (a SIM run uses it instead; null keeps BoxInst's)"
    elif key.startswith("sim.") and sim.get("variant") == "released_code":
        sub = key[len("sim."):]
        if sub in RELEASED_CODE and not _same_value(sim.get(sub), RELEASED_CODE[sub]):
            return (f"sim.variant (variant 'released_code' uses {sub} = {quote(RELEASED_CODE[sub])}; "
                    "use variant 'paper' to choose it)")
    return None


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(float(a) - float(b)) <= 1e-6
    return a == b


def check_overrides(resolved: dict, run_name: str, keys: list[str], where: str, params_source: str) -> None:
    """Refuse an override (``--set`` or a run's ``set:``) that the run would silently ignore."""
    for key in keys:
        owner = overwritten_by(resolved, run_name, key)
        if owner is not None:
            raise InputError(where, f"{quote(key)} would be ignored by run '{run_name}': "
                                    f"it is set by {owner} in {params_source}")
