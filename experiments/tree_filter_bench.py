"""BoxLevelSet's tree filter: the previous level-by-level form vs pointer jumping, side by side.

For one tree per run (built once, shared by both forms) it measures, per
filter call:

* tensor operations, forward and backward: every torch function or method
  call seen by a :class:`~torch.overrides.TorchFunctionMode` (metadata reads
  such as ``.shape`` not counted), and every ATen operator seen by a
  :class:`~torch.utils._python_dispatch.TorchDispatchMode` (this one also sees
  autograd's own backward formulas), with and without view operators
  (a view launches no kernel);
* wall time of forward + backward and the process CPU time of both
  (medians over ``--repeats``, the two forms alternating);
* agreement: output, feature gradient and edge-weight gradient of either
  form in float32 against the previous form in float64 on the same tree
  (``max |a - b| / max |b|``), and the two forms against each other in float64.

Sizes: the BoxLevelSet filter runs at the mask logits' stride 4, so an
800 x 1344 COCO input gives a 200 x 336 grid (``--height``/``--width``), two
images per batch (``--batch``). Guides: COCO images (``--images``, bilinearly
resized and normalised as the loss does; the released variant's image tree,
sigma 0.02) or random 5-channel maps (the feature tree, sigma 1); the
filtered values are random maps of ``--channels`` channels.

    .venv/bin/python -m experiments.tree_filter_bench --repeats 5
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from baselines.tree_filter import (TreeSchedule, _filtered_features, _tree_order_inputs, _TreePasses,
                                   build_tree_schedule, tree_edge_weights, tree_filter)

REPO = Path(__file__).resolve().parents[1]
COCO_IMAGES = REPO / ".." / "shared" / "datasets" / "coco128" / "images"
PIXEL_MEAN, PIXEL_STD = 120.0, 60.0


# ---------------------------------------------------------------------------------------------
# The previous implementation (baselines/tree_filter.py at 73dd1f4), verbatim but for names:
# one index_add per level up, one gather + mul + add per level down, one autograd node.

def _levelwise_two_passes(values: torch.Tensor, weights: torch.Tensor,
                          schedule: TreeSchedule) -> tuple[torch.Tensor, torch.Tensor]:
    sizes = schedule.level_sizes
    depth = len(sizes)
    w_col = weights.unsqueeze(1)
    aggregated = values.clone()
    a_levels = aggregated.split(sizes)
    w_levels = w_col.split(sizes)
    for d in range(depth - 1, 0, -1):
        a_levels[d - 1].index_add_(0, schedule.parent_pos[d], w_levels[d] * a_levels[d])
    keep = (1.0 - w_col * w_col) * aggregated
    full = torch.empty_like(aggregated)
    f_levels = full.split(sizes)
    k_levels = keep.split(sizes)
    f_levels[0].copy_(a_levels[0])
    for d in range(1, depth):
        torch.mul(w_levels[d], f_levels[d - 1].index_select(0, schedule.parent_pos[d]), out=f_levels[d])
        f_levels[d].add_(k_levels[d])
    return aggregated, full


class _LevelwisePasses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, weights, schedule):
        aggregated, full = _levelwise_two_passes(values, weights, schedule)
        ctx.schedule = schedule
        ctx.save_for_backward(weights, aggregated, full)
        return full

    @staticmethod
    def backward(ctx, grad_full):
        weights, aggregated, full = ctx.saved_tensors
        schedule = ctx.schedule
        grad_agg, grad_values = _levelwise_two_passes(grad_full.contiguous(), weights, schedule)
        grad_weights = None
        if ctx.needs_input_grad[1]:
            parent = schedule.parent_index
            grad_weights = ((grad_agg * full[parent]).sum(dim=1) + (aggregated * grad_values[parent]).sum(dim=1)
                            - 2.0 * weights * (grad_agg * aggregated).sum(dim=1))
            grad_weights[:schedule.level_sizes[0]] = 0.0
        return grad_values if ctx.needs_input_grad[0] else None, grad_weights, None


def levelwise_tree_filter(features: torch.Tensor, schedule: TreeSchedule, edge_weights: torch.Tensor) -> torch.Tensor:
    """The tree filter as it was before pointer jumping: O(depth) tensor operations."""
    values, weights = _tree_order_inputs(features, schedule, edge_weights)
    return _filtered_features(_LevelwisePasses.apply(values, weights, schedule), schedule, features)


FORMS = {"levelwise": levelwise_tree_filter, "jumping": tree_filter}
PASSES = {levelwise_tree_filter: _LevelwisePasses, tree_filter: _TreePasses}  # their autograd nodes


# ---------------------------------------------------------------------------------------------
# Counting

class CountCalls(TorchFunctionMode):
    """Torch function / method calls, without reads of tensor metadata (``.shape``, ``.dtype``, ...)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") != "__get__":
            self.count += 1
        return func(*args, **(kwargs or {}))


class CountAten(TorchDispatchMode):
    """ATen operators, in total and without view operators (which launch no kernel)."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        if func.is_view:
            self.views += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def calls_inside_backward(function: type[torch.autograd.Function], calls: CountCalls):
    """Count ``function.backward``'s torch calls into ``calls`` too.

    The autograd engine runs backward functions without the caller's torch
    function modes, so the mode is entered again inside the custom
    ``backward`` (autograd's built-in formulas are seen by ``CountAten`` only).
    """
    original = function.backward

    def backward(ctx, *grads):
        with CountCalls() as inner:
            result = original(ctx, *grads)
        calls.count += inner.count
        return result

    function.backward = staticmethod(backward)
    try:
        yield
    finally:
        function.backward = staticmethod(original)


def count_operations(form, features, schedule, weights) -> dict[str, int]:
    """Operations of one filter call: forward (``form(...)``) and backward (``out.backward``)."""
    counts = {}
    for phase in ("forward", "backward"):
        f = features.detach().clone().requires_grad_()
        w = weights.detach().clone().requires_grad_()
        if phase == "forward":
            with CountCalls() as calls, CountAten() as aten:
                out = form(f, schedule, w)
        else:
            out = form(f, schedule, w)
            grad = torch.ones_like(out)
            with CountCalls() as calls, CountAten() as aten, calls_inside_backward(PASSES[form], calls):
                out.backward(grad)
        counts[f"{phase}_calls"] = calls.count
        counts[f"{phase}_aten"] = aten.count
        counts[f"{phase}_aten_kernels"] = aten.count - aten.views
    return counts


def time_forward_backward(form, features, schedule, weights, upstream) -> tuple[float, float, float]:
    """Wall seconds of the forward and of the backward, and process CPU seconds of both."""
    f = features.detach().clone().requires_grad_()
    w = weights.detach().clone().requires_grad_()
    cpu = time.process_time()
    start = time.perf_counter()
    out = form(f, schedule, w)
    middle = time.perf_counter()
    out.backward(upstream)
    end = time.perf_counter()
    return middle - start, end - middle, time.process_time() - cpu


def agreement(features, schedule, weights, upstream) -> dict[str, float]:
    """Max relative deviation from the previous form in float64: output, d/dfeatures, d/dweights."""
    results = {}
    for name, form in FORMS.items():
        for dtype in (torch.float32, torch.float64):
            f = features.detach().to(dtype, copy=True).requires_grad_()
            w = weights.detach().to(dtype, copy=True).requires_grad_()
            out = form(f, schedule, w)
            out.backward(upstream.to(dtype))
            results[name, dtype] = (out.detach().double(), f.grad.double(), w.grad.double())
    truth = results["levelwise", torch.float64]
    report = {}
    for (name, dtype), got in results.items():
        if (name, dtype) == ("levelwise", torch.float64):
            continue
        label = f"{name}_{str(dtype).replace('torch.', '')}"
        for part, a, b in zip(("out", "grad_features", "grad_weights"), got, truth):
            report[f"{label}_{part}"] = ((a - b).abs().max() / b.abs().max()).item()
    return report


# ---------------------------------------------------------------------------------------------
# Inputs

def coco_guides(count: int, height: int, width: int, stride: int = 4) -> torch.Tensor:
    """``count`` COCO images at ``(height * stride) x (width * stride)``, normalised, resized to the grid."""
    from PIL import Image

    paths = sorted(COCO_IMAGES.glob("*.jpg"))[:count]
    if len(paths) < count:
        raise SystemExit(f"need {count} images in {COCO_IMAGES}")
    images = []
    for path in paths:
        image = Image.open(path).convert("RGB").resize((width * stride, height * stride), Image.BILINEAR)
        images.append(torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1))
    normalised = (torch.stack(images) - PIXEL_MEAN) / PIXEL_STD
    return torch.nn.functional.interpolate(normalised, size=(height, width), mode="bilinear", align_corners=False)


def run(batch: int, height: int, width: int, channels: int, guide: str, repeats: int,
        seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    if guide == "coco":
        embed, sigma = coco_guides(batch, height, width), 0.02
    else:
        embed, sigma = torch.randn(batch, 5, height, width, generator=generator), 1.0
    start = time.perf_counter()
    schedule = build_tree_schedule(embed)
    build_s = time.perf_counter() - start
    weights = tree_edge_weights(embed, schedule, sigma).detach()
    features = torch.rand(batch, channels, height, width, generator=generator)
    upstream = torch.randn(batch, channels, height, width, generator=generator)
    row = {"batch": batch, "height": height, "width": width, "channels": channels, "guide": guide,
           "sigma": sigma, "depth": schedule.depth, "jump_steps": len(schedule.jumps or ()),
           "build_s": round(build_s, 4), "threads": torch.get_num_threads()}
    for name, form in FORMS.items():
        for key, value in count_operations(form, features, schedule, weights).items():
            row[f"{name}_{key}"] = value
    times = {name: [] for name in FORMS}
    for _ in range(repeats + 1):  # the first round warms up
        for name, form in FORMS.items():
            times[name].append(time_forward_backward(form, features, schedule, weights, upstream))
    for name, rounds in times.items():
        fwd, bwd, cpu = zip(*rounds[1:])
        row[f"{name}_forward_s"] = round(statistics.median(fwd), 5)
        row[f"{name}_backward_s"] = round(statistics.median(bwd), 5)
        row[f"{name}_total_s"] = round(statistics.median(f + b for f, b in zip(fwd, bwd)), 5)
        row[f"{name}_total_cpu_s"] = round(statistics.median(cpu), 5)
    row.update({k: float(f"{v:.3g}") for k, v in agreement(features, schedule, weights, upstream).items()})
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--height", type=int, default=200)
    parser.add_argument("--width", type=int, default=336)
    parser.add_argument("--channels", type=int, nargs="+", default=[5, 16])
    parser.add_argument("--guides", nargs="+", default=["coco", "random"], choices=["coco", "random"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for guide in args.guides:
        for channels in args.channels:
            row = run(args.batch, args.height, args.width, channels, guide, args.repeats)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
