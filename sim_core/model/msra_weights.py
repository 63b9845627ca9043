"""detectron2's MSRA ImageNet ResNets (``R-50.pkl``, ``R-101.pkl``) for a torchvision ResNet.

AdelaiDet's and SIM's configs start from ``detectron2://ImageNetPretrained/MSRA/R-50.pkl``
(``R-101.pkl`` for R-101). Those files are Python pickles, so they are read here
through :class:`RestrictedUnpickler`, whose ``find_class`` admits only what a
dictionary of numpy arrays needs (numpy's array reconstructor, ``ndarray``,
``dtype`` and ``_codecs.encode`` for Latin-1 byte strings of protocol-2 pickles).
Anything else (``os.system``, ``builtins.eval``, any class) is refused with an
:class:`~sim_core.errors.InputError` before it is looked up, so a malicious
pickle cannot run code.

Two layouts are accepted, as detectron2's ``DetectionCheckpointer._load_file``
accepts them: Caffe2 / Detectron names (``conv1_w``, ``res_conv1_bn_s``,
``res2_0_branch2a_w``, ... optionally under ``"blobs"``; this is what the MSRA
files hold) and detectron2 names (``{"model": {"stem.conv1.weight": ...},
"__author__": ..., "matching_heuristics": ...}``). Caffe2 names are converted
as ``detectron2.checkpoint.c2_model_loading.convert_basic_c2_names`` does, then
detectron2 names to torchvision's ResNet layout:

    stem.conv1            -> conv1          stem.conv1.norm       -> bn1
    resN.i.convK          -> layer(N-1).i.convK
    resN.i.convK.norm     -> layer(N-1).i.bnK
    resN.i.shortcut       -> layer(N-1).i.downsample.0
    resN.i.shortcut.norm  -> layer(N-1).i.downsample.1

``*_momentum`` blobs and the ImageNet classifier (``fc1000_*``) are dropped.
The MSRA files store each batch norm folded into an affine (``_bn_s``,
``_bn_b``) without running statistics; the statistics then become mean 0 and
variance ``1 - eps``, as detectron2's ``FrozenBatchNorm2d`` initialises them, so
torchvision's ``FrozenBatchNorm2d`` (same eps, 1e-5) applies exactly the
stored scale.

**Fidelity.** The MSRA weights are caffe-style ResNets, different from
torchvision's in two ways, and simbench reproduces both when a ``.pkl`` is
loaded (:func:`apply_msra_conventions`):

* the stride of each stage's first block sits in the 1x1 conv (``conv1``), not
  in the 3x3 (detectron2's ``RESNETS.STRIDE_IN_1X1: True``, its default and
  AdelaiDet's): the strides are moved;
* the input is BGR in 0-255 minus the mean ``[103.53, 116.28, 123.675]`` with
  pixel std 1 (detectron2's ``PIXEL_MEAN`` / ``PIXEL_STD`` for these files).
  simbench feeds the backbone RGB normalised with the ImageNet mean/std
  (``CondInst.preprocess``), and the ImageNet mean is the MSRA mean reversed,
  so MSRA's input is exactly ``flip_channels(x_norm * std)``: a channel
  permutation and scaling without offset, also of the zero padding. That is
  folded into the first conv's weights (``W'[:, c] = W[:, 2 - c] * std[c]``),
  so the network computes what detectron2 computes on the same image (float
  rounding aside). If the stem is trained (``freeze_at: 0``), the folded
  weight's gradient is scaled differently from detectron2's; with the papers'
  ``freeze_at: 2`` the stem is frozen and nothing differs.
"""
from __future__ import annotations

import _codecs
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from sim_core.errors import InputError

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]

BN_EPS = 1e-5  # FrozenBatchNorm2d's eps in torchvision and detectron2
# BGR std of the ImageNet normalisation, in the order of simbench's RGB input channels
RGB_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def _latin1_encode(text: str, encoding: str = "latin1", *args: Any) -> bytes:
    if encoding.lower().replace("-", "") != "latin1" or args:
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return _codecs.encode(text, "latin1")


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Builds dicts, lists, strings, numbers and numpy arrays; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global '{module}.{name}'") from None


def read_pickle(path: str | Path) -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler` (Latin-1 strings, as detectron2 reads them)."""
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, encoding="latin1").load()
    except Exception as exc:  # refusals, truncated files, non-pickles
        raise InputError("model.pretrained", f"cannot read {path} as a detectron2 weights pickle of numpy "
                         f"arrays ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); "
                         "only dicts and numpy arrays are unpickled") from None


def convert_c2_names(keys: list[str]) -> list[str]:
    """Caffe2 / Detectron names -> detectron2 names (the backbone part of ``convert_basic_c2_names``)."""
    out = []
    for k in keys:
        k = k.replace("_", ".")
        k = re.sub(r"\.b$", ".bias", k)
        k = re.sub(r"\.w$", ".weight", k)
        k = re.sub(r"bn\.s$", "norm.weight", k)
        k = re.sub(r"bn\.bias$", "norm.bias", k)
        k = re.sub(r"bn\.rm$", "norm.running_mean", k)
        k = re.sub(r"bn\.riv$", "norm.running_var", k)
        k = re.sub(r"^res\.conv1\.norm\.", "conv1.norm.", k)
        k = re.sub(r"^conv1\.", "stem.conv1.", k)
        k = k.replace(".branch1.", ".shortcut.").replace(".branch2a.", ".conv1.")
        k = k.replace(".branch2b.", ".conv2.").replace(".branch2c.", ".conv3.")
        out.append(k)
    return out


_D2_TO_TV = (
    (re.compile(r"(^|\.)stem\.conv1\.norm\."), r"\1bn1."),
    (re.compile(r"(^|\.)stem\.conv1\."), r"\1conv1."),
    (re.compile(r"(^|\.)res(\d)\.(\d+)\.shortcut\.norm\."),
     lambda m: f"{m[1]}layer{int(m[2]) - 1}.{m[3]}.downsample.1."),
    (re.compile(r"(^|\.)res(\d)\.(\d+)\.shortcut\."), lambda m: f"{m[1]}layer{int(m[2]) - 1}.{m[3]}.downsample.0."),
    (re.compile(r"(^|\.)res(\d)\.(\d+)\.conv(\d)\.norm\."), lambda m: f"{m[1]}layer{int(m[2]) - 1}.{m[3]}.bn{m[4]}."),
    (re.compile(r"(^|\.)res(\d)\.(\d+)\.conv(\d)\."), lambda m: f"{m[1]}layer{int(m[2]) - 1}.{m[3]}.conv{m[4]}."),
)


def d2_to_torchvision(key: str) -> str:
    """One detectron2 ResNet key in torchvision's layout (other keys unchanged)."""
    for pattern, repl in _D2_TO_TV:
        new = pattern.sub(repl, key, count=1)
        if new != key:
            return new
    return key


def _as_tensor(path: Path, key: str, value: Any) -> Tensor:
    if isinstance(value, np.ndarray) and value.dtype.kind in "fiu":
        return torch.from_numpy(np.ascontiguousarray(value)).float()
    if isinstance(value, Tensor):
        return value.float()
    raise InputError("model.pretrained", f"{path}: entry '{key}' is a {type(value).__name__}, not a numeric array")


def read_msra_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The torchvision-layout state dict of a detectron2 / MSRA ResNet pickle (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise InputError("model.pretrained", f"weights file does not exist: {path}")
    data = read_pickle(path)
    if not isinstance(data, Mapping):
        raise InputError("model.pretrained", f"{path} holds a {type(data).__name__}, not a dict of arrays")
    caffe2 = not ("model" in data and "__author__" in data)
    blobs = data.get("blobs", data) if caffe2 else data["model"]
    if not isinstance(blobs, Mapping) or not blobs:
        raise InputError("model.pretrained", f"{path} holds no dict of weights")
    names = [k for k in blobs if isinstance(k, str) and not k.endswith("_momentum")]
    converted = convert_c2_names(names) if caffe2 else names
    state: dict[str, Tensor] = {}
    for original, d2_name in zip(names, converted):
        if d2_name.startswith(("fc1000.", "linear.", "pred.")):
            continue  # the ImageNet classifier
        state[d2_to_torchvision(d2_name)] = _as_tensor(path, original, blobs[original])
    # Folded batch norms: statistics as detectron2's FrozenBatchNorm2d starts them.
    for key in [k for k in state if k.endswith(".weight") and re.search(r"(^|\.)(bn\d|downsample\.1)\.weight$", k)]:
        base = key[: -len("weight")]
        if base + "running_mean" not in state:
            state[base + "running_mean"] = torch.zeros_like(state[key])
            state[base + "running_var"] = torch.full_like(state[key], 1.0 - BN_EPS)
    return state


def apply_msra_conventions(resnet: nn.Module) -> None:
    """Make a torchvision ResNet holding MSRA weights compute what detectron2 computes.

    Moves the stride of each stage's first Bottleneck into its 1x1 conv and
    folds MSRA's BGR, std-1 input into ``conv1`` (see the module docstring).
    """
    for name in ("layer2", "layer3", "layer4"):
        block = getattr(resnet, name)[0]
        stride = block.conv2.stride
        if not hasattr(block, "conv3") or stride == (1, 1):
            continue  # BasicBlocks have no 1x1 conv to move the stride to
        block.conv1.stride = stride
        block.conv2.stride = (1, 1)
        offset = getattr(block.conv2, "conv_offset", None)  # a deformable 3x3 predicts offsets at its own stride
        if offset is not None:
            offset.stride = (1, 1)
    with torch.no_grad():
        w = resnet.conv1.weight
        std = torch.tensor(RGB_STD, dtype=w.dtype, device=w.device).view(1, 3, 1, 1)
        w.copy_(w.flip(1) * std)
