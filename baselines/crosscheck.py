"""Same weights, same batch: simbench's BoxInst against AdelaiDet's, loss by loss and gradient by gradient.

Why: two codes that reach the same mask AP on a seed or two may still
compute different things (and a run of one may fail where the other's does
not). With identical weights and an identical batch, two correct
implementations of the same network and losses give the same loss values
and the same gradient for every parameter, up to float rounding. A term or
a module that differs shows up by name, at no training cost.

``simbench upstream crosscheck --run NAME`` (an ``upstream_runs`` entry of
code ``adelaidet``):

1. prepares the checkout as a training run does (``prepare_checkout``:
   environment, translated settings, patched private copy);
2. builds simbench's CondInst with the run's seed, renames its weights to
   AdelaiDet's (:func:`adelaidet_name`; the stem's first convolution has its
   input channels reversed, since detectron2 reads BGR), takes the first
   ``num_images`` training images without augmentation and writes both to
   ``runs/<NAME>/crosscheck/input.pt``;
3. runs ``crosscheck_driver.py`` under the upstream interpreter, with
   ``MODEL.PIXEL_MEAN``/``PIXEL_STD`` set to simbench's ImageNet
   normalisation (in BGR order): one training forward and backward;
4. runs the same forward and backward in simbench (the BoxInst loss at
   training step ``iteration``) and compares: each loss term, and for each
   parameter the relative gradient difference ``|g_simbench - g_orig| /
   |g_orig|``. Result: ``runs/<NAME>/crosscheck/crosscheck.json``.

How close is close enough: the gradients of a network trained from scratch
with BatchNorm are sums with much cancellation, so float32 rounding alone
moves some of them by up to about 1 % (measured: simbench's own float32
gradients against its float64 ones, R-18, 8 images). simbench's side is
therefore also run in float64, and a parameter agrees when the two codes
differ by at most ``NOISE_FACTOR`` times simbench's own float32 error on it
(or ``GRAD_RTOL``, whichever is larger). A ReLU whose input lies within
rounding of 0 in one code and not in the other passes or blocks one
position's gradient, which moves the few parameters before it by up to
about 1 % (measured: 8 training images, one of 4,112 P5 positions of the
classification tower, nine parameters between 1e-3 and 8e-3); a difference
up to ``ROUNDING_RTOL`` is therefore reported as ``rounding`` and does not
fail the check, a larger one does. Losses must agree to ``LOSS_RTOL``
(float32 sums in another order: at most 2e-7 measured); the smallest real
difference found, the colour similarity from float instead of uint8 means,
moves the pairwise loss by 4e-6 to 7e-5.

Weights only AdelaiDet has (the bias of each FCOS tower convolution, which
simbench's head leaves out unless ``model.head_conv_bias``) stay at their
initial zero, so the forward pass is the same; their gradients are listed
and fail the check, since AdelaiDet trains them.
"""
from __future__ import annotations

import io
import re
import time
from pathlib import Path
from typing import Any, Callable, TextIO

import torch

from sim_core.errors import InputError

DRIVER = Path(__file__).resolve().parent / "crosscheck_driver.py"
# AdelaiDet's loss names -> simbench's
LOSS_NAMES = {"loss_fcos_cls": "loss_cls", "loss_fcos_loc": "loss_box", "loss_fcos_ctr": "loss_ctr",
              "loss_prj": "loss_proj", "loss_pairwise": "loss_pairwise"}
# float32 sums in a different order: agreement beyond these is a difference in what is computed
LOSS_RTOL = 1e-6
GRAD_RTOL = 1e-3
ROUNDING_RTOL = 1e-2
# simbench's stem convolution, whose input channels are reversed on AdelaiDet's side (detectron2 reads BGR)
STEM_WEIGHT = "backbone.conv1.weight"
# two float32 computations each off the exact value by e: their difference is up to 2e, typically 1.4e
NOISE_FACTOR = 3.0


def _resnet_name(layer: str, block: str, rest: str) -> str:
    stage = f"backbone.bottom_up.res{int(layer) + 1}.{block}."
    conv = re.fullmatch(r"conv(\d)\.(.+)", rest)
    if conv:
        return stage + f"conv{conv[1]}.{conv[2]}"
    bn = re.fullmatch(r"bn(\d)\.(.+)", rest)
    if bn:
        return stage + f"conv{bn[1]}.norm.{bn[2]}"
    down = re.fullmatch(r"downsample\.([01])\.(.+)", rest)
    if down:
        return stage + ("shortcut." if down[1] == "0" else "shortcut.norm.") + down[2]
    raise KeyError(rest)


_HEAD = {"cls_tower": "cls_tower", "box_tower": "bbox_tower", "cls_logits": "cls_logits", "box_pred": "bbox_pred",
         "ctr_pred": "ctrness", "scales": "scales"}


def adelaidet_name(name: str, first_level: int = 3) -> str:
    """AdelaiDet's state-dict key of simbench's CondInst key ``name`` (R-18/50 backbone, FPN neck, C2 input).

    Raises ``KeyError`` for a key with no counterpart (another backbone or neck).
    """
    if name == STEM_WEIGHT:
        return "backbone.bottom_up.stem.conv1.weight"
    m = re.fullmatch(r"backbone\.bn1\.(.+)", name)
    if m:
        return f"backbone.bottom_up.stem.conv1.norm.{m[1]}"
    m = re.fullmatch(r"backbone\.layer(\d)\.(\d+)\.(.+)", name)
    if m:
        return _resnet_name(m[1], m[2], m[3])
    m = re.fullmatch(r"neck\.fpn\.(inner|layer)_blocks\.(\d+)\.0\.(.+)", name)
    if m:
        kind = "lateral" if m[1] == "inner" else "output"
        return f"backbone.fpn_{kind}{int(m[2]) + first_level}.{m[3]}"
    m = re.fullmatch(r"head\.(\w+)\.(.+)", name)
    if m and m[1] in _HEAD:
        return f"proposal_generator.fcos_head.{_HEAD[m[1]]}.{m[2]}"
    if m and m[1] == "controller":
        return f"controller.{m[2]}"
    m = re.fullmatch(r"mask_branch\.refine\.(\d)\.(.+)", name)
    if m:  # AdelaiDet's refine[0] is the stride-4 input's block, then P3-P5
        return f"mask_branch.refine.{int(m[1]) + 1}.{m[2]}"
    m = re.fullmatch(r"mask_branch\.(detail|tower)\.(.+)", name)
    if m:
        return f"mask_branch.{'refine.0' if m[1] == 'detail' else 'tower'}.{m[2]}"
    raise KeyError(name)


def first_fpn_level(model_cfg: dict[str, Any]) -> int:
    """The FPN level of simbench's first neck output: 2 when the stride-4 mask branch reads P2, else 3."""
    from sim_core.model.neck import stride4_input

    return 2 if stride4_input(model_cfg) == "p2" else 3


def to_adelaidet_state(state: dict[str, torch.Tensor], first_level: int = 3) -> dict[str, torch.Tensor]:
    """simbench's state dict under AdelaiDet's names; the stem convolution reads BGR."""
    out = {}
    for name, value in state.items():
        key = adelaidet_name(name, first_level)
        value = value.reshape(1) if value.dim() == 0 else value  # AdelaiDet's Scale holds a [1] tensor
        out[key] = value.flip(1).clone() if name == STEM_WEIGHT else value.clone()
    if len(out) != len(state):
        raise ValueError("two simbench weights map to one AdelaiDet name")
    return out


def crosscheck_batch(params: dict, num_images: int) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """The first ``num_images`` training images and targets, resized as for training, not flipped."""
    from sim_core.data.coco import load_coco
    from sim_core.data.dataset import CocoDetectionDataset

    data_cfg = params["data"]
    root = Path(data_cfg["root"])
    coco = load_coco(root / "train.json", root / "images", check_images=False)
    dataset = CocoDetectionDataset(coco, train=False, sizes=[int(data_cfg["train_sizes"][0])],
                                   max_size=int(data_cfg["max_size"]), flip_prob=0.0)
    if not 1 <= num_images <= len(dataset):
        raise InputError("--images", f"must be between 1 and {len(dataset)} (training images), got {num_images}")
    samples = [dataset[i] for i in range(num_images)]
    return [s[0] for s in samples], [s[1] for s in samples]


def simbench_side(params: dict, num_classes: int, state: dict[str, torch.Tensor], images: list[torch.Tensor],
                  targets: list[dict[str, Any]], iteration: int,
                  dtype: torch.dtype = torch.float32) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """One training forward and backward of simbench's model with ``state``: loss values, gradients by name.

    ``dtype`` float64 gives the reference that measures float32's own rounding error.
    """
    from baselines import build_mask_loss
    from sim_core.methods import method_config
    from sim_core.model.condinst import CondInst

    method = params["train"]["method"]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = CondInst(num_classes, params["model"])
        model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()})
        model.train()
        mask_loss = build_mask_loss(method, method_config(params, method))
        losses = model.training_losses(images, targets, mask_loss, iteration, int(params["train"]["max_iter"]))
        sum(losses.values()).backward()
    finally:
        torch.set_default_dtype(previous)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: float(v.detach()) for k, v in losses.items()}, grads


def float32_error(single: dict[str, torch.Tensor], double: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per parameter ``|g_float32 - g_float64| / |g_float64|``: the rounding error of simbench's own gradients."""
    return {n: float((g.double() - double[n]).norm()) / max(float(double[n].norm()), 1e-30)
            for n, g in single.items() if n in double}


def compare(ours: tuple[dict[str, float], dict[str, torch.Tensor]], theirs: dict[str, Any],
            rounding: dict[str, float] | None = None, first_level: int = 3) -> dict[str, Any]:
    """Loss-by-loss and gradient-by-gradient comparison; ``theirs`` is the driver's output, ``rounding``
    simbench's float32 error per parameter (:func:`float32_error`; None: ``GRAD_RTOL`` alone)."""
    our_losses, our_grads = ours
    losses = {}
    for their_name, value in theirs["losses"].items():
        name = LOSS_NAMES.get(their_name, their_name)
        mine = our_losses.get(name)
        rel = None if mine is None else abs(mine - value) / max(abs(value), 1e-12)
        losses[name] = {"simbench": mine, "original": value, "original_name": their_name,
                        "relative_difference": rel, "agrees": rel is not None and rel <= LOSS_RTOL}
    for name in sorted(set(our_losses) - set(losses)):
        losses[name] = {"simbench": our_losses[name], "original": None, "agrees": False}
    grads, unmatched = {}, []
    their_grads = theirs["grads"]
    their_names = {name: adelaidet_name(name, first_level) for name in our_grads}
    for name, g in our_grads.items():
        key = their_names[name]
        if key not in their_grads:
            unmatched.append(name)
            continue
        other = their_grads[key].reshape(g.shape).to(g.dtype)
        if name == STEM_WEIGHT:
            other = other.flip(1)
        denom = float(other.norm())
        rel = float((g - other).norm()) / max(denom, 1e-20)
        noise = (rounding or {}).get(name)
        allowed = max(GRAD_RTOL, NOISE_FACTOR * noise) if noise is not None else GRAD_RTOL
        status = "agrees" if rel <= allowed else ("rounding" if rel <= ROUNDING_RTOL else "differs")
        grads[name] = {"relative_difference": rel, "float32_error": noise, "allowed": allowed,
                       "norm_simbench": float(g.norm()), "norm_original": denom, "status": status,
                       "agrees": status != "differs"}
    ours_keys = set(their_names.values())
    only_original = {k: float(v.norm()) for k, v in their_grads.items() if k not in ours_keys}
    worst = sorted(grads, key=lambda n: -grads[n]["relative_difference"] / grads[n]["allowed"])
    return {"losses": losses, "gradients": grads, "worst_gradients": worst[:10],
            "gradients_only_in_original": only_original, "simbench_gradients_without_counterpart": unmatched,
            "losses_agree": all(v["agrees"] for v in losses.values()),
            "gradients_agree": all(v["agrees"] for v in grads.values()) and not unmatched and not only_original,
            "gradients_at_rounding": sorted(n for n, v in grads.items() if v["status"] == "rounding"),
            "tolerances": {"loss": LOSS_RTOL, "gradient": GRAD_RTOL, "noise_factor": NOISE_FACTOR,
                           "rounding": ROUNDING_RTOL}}


def simbench_initial_weights(resolved: dict, num_classes: int) -> dict[str, torch.Tensor]:
    """The weights simbench's trainer starts a run of ``resolved`` from (the run seed, then the model)."""
    from sim_core.engine.seeding import seed_everything
    from sim_core.model.condinst import CondInst

    seed_everything(int(resolved["train"]["seed"]))
    return CondInst(num_classes, resolved["model"]).state_dict()


def simbench_normalisation_opts() -> list[str]:
    """detectron2 overrides that normalise its BGR input as simbench normalises RGB (ImageNet mean and std)."""
    from sim_core.model.condinst import PIXEL_MEAN, PIXEL_STD

    bgr_mean = [f"{v:.6f}" for v in reversed(PIXEL_MEAN)]
    bgr_std = [f"{v:.6f}" for v in reversed(PIXEL_STD)]
    return ["MODEL.PIXEL_MEAN", "[" + ", ".join(bgr_mean) + "]", "MODEL.PIXEL_STD", "[" + ", ".join(bgr_std) + "]"]


def write_simbench_init(resolved: dict, num_classes: int, path: Path) -> list[str]:
    """Save simbench's initial weights of ``resolved`` under AdelaiDet's names as a detectron2 checkpoint;
    returns the overrides that start an AdelaiDet run from it (``upstream_runs.<name>.init: simbench``)."""
    from sim_core.io_utils import atomic_write_bytes

    state = to_adelaidet_state(simbench_initial_weights(resolved, num_classes), first_fpn_level(resolved["model"]))
    buffer = io.BytesIO()
    torch.save({"model": state}, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return ["MODEL.WEIGHTS", str(Path(path).resolve())] + simbench_normalisation_opts()


def run_crosscheck(params: dict, name: str, runs_dir: Path | None = None, num_images: int = 4,
                   iteration: int | None = None, echo: TextIO | None = None,
                   check: Callable[..., dict] | None = None) -> dict[str, Any]:
    """Steps 1-4 of the module docstring; writes and returns the comparison."""
    from baselines import upstream
    from sim_core.io_utils import atomic_write_json

    entry, _ = upstream.resolve_upstream_run(params, name)
    if entry["code"] != "adelaidet":
        raise InputError("--run", f"the cross-check compares BoxInst: {name!r} runs code {entry['code']!r}; "
                                  "give an upstream_runs entry with code: adelaidet")
    if num_images < 1:
        raise InputError("--images", f"must be at least 1, got {num_images}")
    prepared = upstream.prepare_checkout(params, name, runs_dir, check or upstream.check_environment)
    resolved = prepared.resolved
    step = int(iteration if iteration is not None else int(resolved["train"]["max_iter"]) // 2)
    work = prepared.work.parent / "crosscheck"
    work.mkdir(parents=True, exist_ok=True)
    state = simbench_initial_weights(resolved, prepared.num_classes)
    images, targets = crosscheck_batch(resolved, num_images)
    first_level = first_fpn_level(resolved["model"])
    torch.save({"state_dict": to_adelaidet_state(state, first_level), "iteration": step,
                "images_bgr": [im.flip(0).contiguous() for im in images],
                "boxes": [t["boxes"] for t in targets], "classes": [t["labels"] for t in targets]},
               work / "input.pt")
    settings = {"root": str(prepared.code_root.resolve()), "config": str(prepared.config_path.resolve()),
                "opts": prepared.opts + simbench_normalisation_opts(),
                "input": str((work / "input.pt").resolve()), "output": str((work / "original.pt").resolve()),
                "threads": int(resolved["train"].get("threads") or 1)}
    atomic_write_json(work / "settings.json", settings)
    output = work / "original.pt"
    for stale in (output, work / "crosscheck.json"):  # a failed check must not leave an earlier result
        if stale.exists():
            stale.unlink()
    env = upstream.child_env(prepared.code_root.resolve(), settings["threads"])
    started = time.time()
    rc = upstream.stream([prepared.python, str(DRIVER), str((work / "settings.json").resolve())], work, env,
                         work / "log.txt", echo)
    if rc != 0 or not output.is_file():
        raise InputError(work / "log.txt", f"the original code's forward/backward failed (exit {rc}): "
                                           f"{upstream.log_tail(work / 'log.txt')}")
    theirs = torch.load(output, map_location="cpu")
    ours = simbench_side(resolved, prepared.num_classes, state, images, targets, step)
    exact = simbench_side(resolved, prepared.num_classes, state, images, targets, step, dtype=torch.float64)
    rounding = float32_error(ours[1], exact[1])
    report = {"run": name, "code": prepared.code, "iteration": step, "num_images": num_images,
              "image_ids": [int(t["image_id"]) for t in targets], "seconds": round(time.time() - started, 1),
              "original_missing_keys": theirs["missing"], "original_unexpected_keys": theirs["unexpected"],
              "original_torch": theirs.get("torch"), "differences": prepared.differences,
              **compare(ours, theirs, rounding, first_level)}
    atomic_write_json(work / "crosscheck.json", report)
    return report


def format_report(report: dict[str, Any]) -> str:
    """A few lines for the terminal: each loss, then the gradients that differ most."""
    lines = [f"cross-check of {report['run']} at step {report['iteration']} on {report['num_images']} images"]
    for name, v in report["losses"].items():
        rel = v.get("relative_difference")
        lines.append(f"  {name:14s} simbench {v['simbench']!s:>12.12} original {v['original']!s:>12.12} "
                     f"rel.diff {'n/a' if rel is None else f'{rel:.2e}'} {'ok' if v['agrees'] else 'DIFFERS'}")
    for name in report["worst_gradients"][:6]:
        g = report["gradients"][name]
        noise = g.get("float32_error")
        lines.append(f"  grad {name:40s} rel.diff {g['relative_difference']:.2e} (float32 alone "
                     f"{'n/a' if noise is None else f'{noise:.2e}'}) {g['status'].upper()}")
    if report["gradients_only_in_original"]:
        lines.append("  only the original has: " + ", ".join(report["gradients_only_in_original"]))
    lines.append(f"  losses agree: {report['losses_agree']}; gradients agree: {report['gradients_agree']} "
                 f"({len(report['gradients_at_rounding'])} at rounding level)")
    return "\n".join(lines)
