"""CUDA's same-device rule, enforced on the CPU: find device-placement bugs without a GPU.

On a GPU, an operation that mixes a tensor on the device with a tensor in
host memory (other than a 0-dim scalar or an index) raises "Expected all
tensors to be on the same device". On the CPU every tensor is in one place,
so such a bug passes every CPU test and surfaces hours into a GPU run.

:class:`DevicePlacementChecker` is a ``TorchFunctionMode`` that keeps the
distinction on the CPU. The *training device* is :data:`CHECKED_DEVICE`
(``cpu:0``: the CPU, named with an index so that moves to it can be told from
moves to the host, ``cpu``). Inside the mode:

* a tensor is *on the device* when it came from ``.to(CHECKED_DEVICE)``, from
  a factory call with ``device=CHECKED_DEVICE`` (or ``*_like`` / ``new_*`` of a
  device tensor without another device), is a parameter or buffer of a module
  moved with ``Module.to(CHECKED_DEVICE)``, or is the result of an operation on
  a device tensor; ``.device`` of such a tensor reads ``cpu:0``, so code that
  builds tensors with ``device=x.device`` does the right thing;
* ``.cpu()``, ``.to('cpu')``, ``pin_memory()`` give host tensors, and
  ``.numpy()`` of a device tensor raises, as on CUDA;
* an operation whose tensor arguments mix device tensors with host tensors of
  one or more dimensions raises ``DevicePlacementError``, naming the
  operation; 0-dim host tensors (CUDA accepts CPU scalars), index arguments of
  ``__getitem__``/``__setitem__`` and ``copy_`` (CUDA copies across devices)
  are allowed.

The checker also counts *host waits*: the calls that make the host wait for
the device on CUDA (``.item()``, ``float()``/``int()``/``bool()`` of a tensor,
``.tolist()``, a copy to the host, ``nonzero`` and boolean-mask indexing, which
must learn an output size, and the like) on device tensors, by the file and
line of simbench's code that made them (:attr:`DevicePlacementChecker.waits`).

Used by ``tests/test_device_placement.py`` on one training step of every
method, ``predict`` and evaluation, and by ``simbench bench --only
device_check`` (the CPU twin of the GPU self-check). What it cannot see:
kernels' own device support, streams and memory, and tensors that never meet a
device tensor.
"""
from __future__ import annotations

import contextlib
import sys
import weakref
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

CHECKED_DEVICE = torch.device("cpu", 0)
HOST_MOVES = {"cpu", "pin_memory"}
# copies, indexing, and Module.to's and deepcopy's own bookkeeping: CUDA allows host tensors there
CROSS_DEVICE_OK = {"copy_", "__getitem__", "__setitem__", "set_", "__get__", "__set__",
                   "_has_compatible_shallow_copy_type", "__deepcopy__"}
_DEVICE_GETTER = torch.Tensor.device
# calls that wait for the device on CUDA: a value read on the host, or an output size only the data knows
WAITING_CALLS = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "cpu", "nonzero",
                 "argwhere", "unique", "unique_consecutive", "masked_select", "bincount", "equal", "allclose",
                 "repeat_interleave", "pin_memory"}
PROJECT_DIRS = ("sim_core", "baselines", "experiments")  # where a wait is attributed (first such frame)


def _caller() -> str:
    """``package/file.py:line`` of the innermost frame in simbench's own code (outside this module)."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename.replace("\\", "/")
        for package in PROJECT_DIRS:
            at = path.rfind(f"/{package}/")
            if at >= 0 and not path.endswith("/device_check.py"):
                return f"{path[at + 1:]}:{frame.f_lineno}"
        frame = frame.f_back
    return "elsewhere"


class DevicePlacementError(RuntimeError):
    """A device tensor and a host tensor met in one operation (CUDA would raise here)."""


def _name(func: Any) -> str:
    return getattr(func, "__name__", None) or str(func)


def _as_device(value: Any) -> torch.device | None:
    if isinstance(value, torch.device):
        return value
    if isinstance(value, str):
        try:
            return torch.device(value)
        except RuntimeError:
            return None
    if isinstance(value, int) and not isinstance(value, bool):
        return torch.device("cuda", value)
    return None


class DevicePlacementChecker(TorchFunctionMode):
    """``with DevicePlacementChecker():`` run code whose training device is :data:`CHECKED_DEVICE`."""

    def __init__(self) -> None:
        super().__init__()
        # id -> weak reference: a tensor is tagged while the reference still points at that very object
        # (a WeakSet would compare tensors with ==, which is elementwise)
        self._on_device: dict[int, weakref.ref] = {}
        self.moves = 0  # tensors moved to the device (a count for the tests)
        self.waits: Counter[str] = Counter()  # host waits by "file:line"

    # ------------------------------------------------------------------ tags
    def on_device(self, tensor: torch.Tensor) -> bool:
        ref = self._on_device.get(id(tensor))
        return ref is not None and ref() is tensor

    def put_on_device(self, tensor: torch.Tensor) -> None:
        if len(self._on_device) > 200_000:  # forget the dead
            self._on_device = {k: r for k, r in self._on_device.items() if r() is not None}
        self._on_device[id(tensor)] = weakref.ref(tensor)

    def put_module_on_device(self, module: nn.Module) -> None:
        for tensor in [*module.parameters(), *module.buffers()]:
            self.put_on_device(tensor)

    # ------------------------------------------------------------------ rules
    def _waits(self, name: str, args: tuple, kwargs: dict) -> bool:
        """Whether this call on device tensors makes the host wait on CUDA."""
        if name in WAITING_CALLS:
            return not (name == "repeat_interleave" and kwargs.get("output_size") is not None)
        if name in ("__getitem__", "__setitem__", "index_put_", "index", "where"):
            if name == "where":
                return len(args) + len(kwargs) == 1  # torch.where(condition): nonzero
            index = args[1] if len(args) > 1 else None
            parts = index if isinstance(index, tuple) else (index,)
            return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)
        if name == "to":
            named, device = self._target_device(name, args, kwargs)
            return named and device is not None and device != CHECKED_DEVICE
        return False

    def _target_device(self, name: str, args: tuple, kwargs: dict) -> tuple[bool, torch.device | None]:
        """For a move or a factory call: (whether it names a device, that device)."""
        if "device" in kwargs:
            return True, _as_device(kwargs["device"])
        if name == "to":
            for value in args[1:]:
                if isinstance(value, torch.Tensor):
                    return True, CHECKED_DEVICE if self.on_device(value) else torch.device("cpu")
                device = _as_device(value) if not isinstance(value, torch.dtype) else None
                if device is not None:
                    return True, device
        return False, None

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch's signature)
        kwargs = kwargs or {}
        name = _name(func)
        if name == "__get__" and getattr(func, "__self__", None) is _DEVICE_GETTER:
            return CHECKED_DEVICE if self.on_device(args[0]) else func(*args, **kwargs)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        device_in = [t for t in tensors if self.on_device(t)]
        if name == "numpy" and device_in:
            raise DevicePlacementError("can't convert a device tensor to numpy (CUDA: use .cpu() first)")
        if device_in and self._waits(name, args, kwargs):
            self.waits[_caller()] += 1
        if name not in CROSS_DEVICE_OK and device_in:
            host = [t for t in tensors if not self.on_device(t) and t.dim() > 0]
            if host:
                raise DevicePlacementError(
                    f"{name}: expected all tensors to be on the same device, found {len(device_in)} on the device "
                    f"and {len(host)} in host memory (shapes {[tuple(t.shape) for t in host[:3]]})")
        result = func(*args, **kwargs)
        named, device = self._target_device(name, args, kwargs)
        to_host = name in HOST_MOVES or (named and device is not None and device != CHECKED_DEVICE)
        if to_host:  # a copy in host memory, as on CUDA (on the CPU, .cpu() may return the tensor itself)
            return result.clone() if isinstance(result, torch.Tensor) and self.on_device(result) else result
        if named:
            to_device = device is not None and device == CHECKED_DEVICE
        else:  # torch.tensor([...]) of device scalars is a host tensor on CUDA too
            to_device = bool(device_in) and func is not torch.tensor
        if to_device:
            if name == "to" and not device_in:
                self.moves += 1
            for out in tree_flatten(result)[0]:
                if isinstance(out, torch.Tensor):
                    self.put_on_device(out)
        return result


@contextlib.contextmanager
def checked_device() -> Iterator[DevicePlacementChecker]:
    """Enter the checker; ``Module.to(CHECKED_DEVICE)`` puts every parameter and buffer on the device, and a
    deep copy of a device parameter (an EMA teacher) is on the device too."""
    checker = DevicePlacementChecker()
    original_to = nn.Module.to

    def module_to(module: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        out = original_to(module, *args, **kwargs)
        target = kwargs.get("device", args[0] if args else None)
        if _as_device(target) == CHECKED_DEVICE:
            checker.put_module_on_device(module)
        return out

    original_deepcopy = nn.Parameter.__deepcopy__

    def parameter_deepcopy(param: nn.Parameter, memo: dict) -> nn.Parameter:
        out = original_deepcopy(param, memo)  # wraps a clone in a new Parameter, out of the mode's sight
        if checker.on_device(param):
            checker.put_on_device(out)
        return out

    nn.Module.to = module_to  # type: ignore[method-assign]
    nn.Parameter.__deepcopy__ = parameter_deepcopy  # type: ignore[method-assign]
    try:
        with checker:
            yield checker
    finally:
        nn.Module.to = original_to  # type: ignore[method-assign]
        nn.Parameter.__deepcopy__ = original_deepcopy  # type: ignore[method-assign]
