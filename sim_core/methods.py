"""The one table of methods: what the engine, the config, the report and the benchmark know of a method.

Each method is a mask-supervision loss on the shared detector, declared once
as a :class:`MethodSpec`. Everything that differs between methods is read from
here: its params section (and the other sections its loss reads), the detector
settings it needs, per-run training state (SIM's teacher, prototypes and copy
bank), whether it needs ground-truth masks, its name, colour and place in the
report, and its relative cost for scheduling runs. Nothing here imports a
method's code: a spec names its classes as ``"module:Class"``, loaded when a
run uses the method, so the table sits above every method module without an
import cycle.

A method of one's own needs no edit to simbench: a module that defines
``METHOD = MethodSpec(...)`` (and its loss class) is used with
``runs: {mine_s0: {method: mypkg.mymethod, seed: 0}}``, its dotted module path
being the method's name and its params section (``mypkg: {mymethod: {...}}``;
the spec's ``defaults`` fill what params.yaml does not set). An installed
package may instead register a short name under the entry-point group
``simbench.methods``. ``docs/adding_a_method.md`` walks through one.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from sim_core.errors import InputError, quote

ENTRY_POINT_GROUP = "simbench.methods"
# detector settings a loss may ask for (``MethodSpec.context``), from the model section
CONTEXT = {"mask_feat_channels": "mask_out_channels"}


@dataclass(frozen=True)
class MethodSpec:
    """One method: its loss, its settings and how the harness shows it."""

    name: str  # the runs' `method:` value and its params section
    display_name: str  # a report row's label
    loss: str  # "module:Class", built as Class(config)
    color: str = "#7f7f7f"  # plots
    order: int = 100  # place in tables and plots (built-ins 0-40)
    defaults: dict[str, Any] = field(default_factory=dict)  # its section's defaults (built-ins: the profiles)
    reads: tuple[str, ...] = ()  # other params sections the loss reads
    context: tuple[str, ...] = ()  # detector settings the loss needs (keys of CONTEXT)
    training_state: str | None = None  # "module:Class" of per-run state kept between iterations
    needs_masks: bool = False  # trains on ground-truth masks (refused on box-only data)
    competes: bool = True  # can be the bold "best" of a table (an upper bound cannot)
    step_cost: float = 1.0  # time per step relative to `mask` (demo, one thread): the longest runs start first
    diagnostics: bool = False  # its loss scores its own targets against GT masks (``last_quality``)

    @property
    def sections(self) -> tuple[str, ...]:
        """Every params section the method's loss reads, its own first."""
        return (self.name, *self.reads)


BUILTIN: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("mask", "Mask (upper bound)", "baselines.mask_supervised:MaskSupervisedLoss", color="#4d4d4d",
               order=0, needs_masks=True, competes=False),
    MethodSpec("boxmask", "Box as mask", "baselines.mask_supervised:BoxMaskLoss", color="#a6761d", order=10),
    MethodSpec("boxinst", "BoxInst", "baselines.boxinst:BoxInstLoss", color="#1f77b4", order=20, step_cost=1.26,
               diagnostics=True),
    MethodSpec("boxlevelset", "BoxLevelSet", "baselines.boxlevelset:BoxLevelSetLoss", color="#2ca02c", order=30,
               context=("mask_feat_channels",), step_cost=1.32, diagnostics=True),
    MethodSpec("sim", "SIM", "sim_core.sim.sim_loss:SIMLoss", color="#d62728", order=40, reads=("boxinst",),
               context=("mask_feat_channels",), training_state="sim_core.sim.trainer_hooks:SIMTrainingState",
               step_cost=1.67, diagnostics=True),
)}
_LOADED: dict[str, MethodSpec] = {}


def builtin_names() -> tuple[str, ...]:
    """The built-in methods in table order."""
    return tuple(sorted(BUILTIN, key=lambda name: BUILTIN[name].order))


def is_plugin(name: str) -> bool:
    return name not in BUILTIN


def get_method(name: Any) -> MethodSpec:
    """The spec of a built-in method, an entry point of ``simbench.methods``, or a module's ``METHOD``."""
    if not isinstance(name, str) or not name:
        raise InputError("method", f"a method is a name, got {quote(name)}")
    if name in BUILTIN:
        return BUILTIN[name]
    if name not in _LOADED:
        _LOADED[name] = _load_plugin(name)
    return _LOADED[name]


def _load_plugin(name: str) -> MethodSpec:
    registered = {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    if name in registered:
        spec = registered[name].load()
    elif "." in name:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise InputError("method", f"method {quote(name)}: module cannot be imported ({exc})") from None
        spec = getattr(module, "METHOD", None)
    else:
        from sim_core.config import did_you_mean

        raise InputError("method", f"unknown method {quote(name)}{did_you_mean(name, list(BUILTIN))}; choose one "
                                   f"of {', '.join(builtin_names())}, a module path defining METHOD, or an entry "
                                   f"point of '{ENTRY_POINT_GROUP}'")
    if not isinstance(spec, MethodSpec):
        raise InputError("method", f"method {quote(name)}: expected a sim_core.methods.MethodSpec (METHOD), "
                                   f"got {type(spec).__name__}")
    return dataclasses.replace(spec, name=name)  # its name and params section: what the runs call it


def _load(path: str) -> Any:
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


def method_config(params: dict, name: str) -> dict[str, Any]:
    """What a method's loss is built with: its section (defaults filled), the other sections it reads (each
    under its own name) and the detector settings it asks for."""
    from sim_core.config import get_dotted

    spec = get_method(name)
    cfg = {**spec.defaults, **(get_dotted(params, spec.name) or {})}
    for section in spec.reads:
        cfg[section] = dict(get_dotted(params, section) or {})
    for key in spec.context:
        cfg[key] = params["model"][CONTEXT[key]]
    return cfg


def build_loss(name: str, cfg: dict[str, Any] | None = None) -> Any:
    """The method's loss module, built with ``cfg`` (:func:`method_config`)."""
    return _load(get_method(name).loss)(dict(cfg or {}))


def build_training_state(name: str, **kwargs: Any) -> Any | None:
    """The method's per-run training state (``before_step``/``after_step``/``extras``/``state_dict``), or None."""
    spec = get_method(name)
    return None if spec.training_state is None else _load(spec.training_state)(**kwargs)
