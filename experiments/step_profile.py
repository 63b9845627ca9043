"""``simbench bench --only profile``: where the CPU time of a demo training step and of the
evaluation stage goes, per part of the network and per loss term (``torch.profiler``).

Scopes (``torch.profiler.record_function``) are opened here only, from module
forward pre/post hooks (backbone, FPN, FCOS head, mask branch, dynamic mask
head, the mask loss) and by wrapping the non-module functions for the time of
the measurement (``unittest.mock.patch``), so production code carries no
profiling code. Each part's time is its scope's *exclusive* time (nested
scopes are taken out), so the parts and ``other`` (the step's time outside
every scope: Python of the loop, autocast, target copies) add up to the step.

The backward pass is attributed to the forward scopes through the autograd
sequence numbers: every ``autograd::engine::evaluate_function: XBackward``
event carries the sequence number of the forward op that created its node,
and that op lies inside one forward scope; its time goes to
``backward:<scope>``. Gradient accumulation into the leaves and the engine's
own time between nodes are ``backward:accumulate_grad`` and
``backward:engine``.

Times are the profiler's (wall clock on the profiled thread, one thread, so
close to CPU time) means over the profiled steps; ``step_ms_unprofiled`` is
the median ``time.process_time`` of the same step without the profiler (the
profiler adds its own cost per op, the shares are what to read).
"""
from __future__ import annotations

import contextlib
import copy
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from sim_core.methods import builtin_names

PREFIX = "sb::"
STEP = "step"
PROFILE_METHODS = builtin_names()
TOP_OPS = 15
MODULE_SCOPES = (("backbone", "backbone"), ("neck", "fpn"), ("head", "fcos_head"), ("mask_branch", "mask_branch"),
                 ("mask_head", "dynamic_mask_head"))


def scope(name: str):
    return record_function(PREFIX + name)


def _wrap(fn: Callable, name: str | Callable[[], str]) -> Callable:
    def wrapped(*args, **kwargs):
        with scope(name() if callable(name) else name):
            return fn(*args, **kwargs)
    wrapped.__wrapped__ = fn
    return wrapped


def _hook_module(module: torch.nn.Module, name: str, handles: list) -> None:
    """A scope from the module's forward pre-hook to its forward hook."""
    stack: list = []

    def pre(_module, _args):
        rf = scope(name)
        rf.__enter__()
        stack.append(rf)

    def post(_module, _args, _output):
        stack.pop().__exit__(None, None, None)

    handles.append(module.register_forward_pre_hook(pre))
    handles.append(module.register_forward_hook(post))


def _model_scopes(model, stack: contextlib.ExitStack, handles: list) -> None:
    """Scopes of the shared detector (training and inference)."""
    import sim_core.model.condinst as condinst

    for attr, name in MODULE_SCOPES:
        _hook_module(getattr(model, attr), name, handles)
    _hook_module(model, "detector_glue", handles)  # CondInst.forward outside its submodules: locations, flatten
    for attr, name in (("preprocess", "preprocess"), ("assign", "fcos_assignment"),
                       ("sample_mask_instances", "mask_instance_sampling"),
                       ("training_losses", "training_losses_glue")):
        stack.enter_context(mock.patch.object(model, attr, _wrap(getattr(model, attr), name)))
    for fn, name in (("detection_losses", "fcos_losses"), ("gt_bitmasks", "mask_targets"),
                     ("box_masks", "mask_targets"), ("select_detections", "detection_selection_nms"),
                     ("paste_masks", "mask_pasting")):
        stack.enter_context(mock.patch.object(condinst, fn, _wrap(getattr(condinst, fn), name)))


def _boxinst_scopes(loss, stack: contextlib.ExitStack) -> None:
    for attr, name in (("image_similarity", "loss_pairwise_colour_similarity"),
                       ("projection_term", "loss_projection"), ("pairwise_term", "loss_pairwise")):
        stack.enter_context(mock.patch.object(loss, attr, _wrap(getattr(loss, attr), name)))


def _loss_scopes(method: str, loss_fn, state, stack: contextlib.ExitStack, handles: list) -> None:
    """Scopes of the mask loss terms and of SIM's hooks around the step."""
    _hook_module(loss_fn, "mask_loss_other" if method not in ("mask", "boxmask") else "loss_dice", handles)
    if method == "boxinst":
        _boxinst_scopes(loss_fn, stack)
    elif method == "boxlevelset":
        import baselines.boxlevelset as bls

        calls = [0]
        handles.append(loss_fn.register_forward_pre_hook(lambda *_: calls.__setitem__(0, 0)))

        def energy_name() -> str:  # forward calls the data term for the image, then the features, per group
            calls[0] += 1
            return "levelset_image_term" if calls[0] % 2 else "levelset_feature_term"

        for fn, name in (("projection_loss", "loss_projection"), ("region_energy", energy_name),
                         ("curve_length", "levelset_length"),
                         ("build_tree_schedule", "levelset_tree_filter"), ("tree_edge_weights", "levelset_tree_filter"),
                         ("tree_filter", "levelset_tree_filter")):
            stack.enter_context(mock.patch.object(bls, fn, _wrap(getattr(bls, fn), name)))
        stack.enter_context(mock.patch.object(loss_fn, "deep_features",
                                              _wrap(loss_fn.deep_features, "levelset_feature_conv")))
    elif method == "sim":
        import sim_core.sim.sim_loss as sl

        _boxinst_scopes(loss_fn.boxinst, stack)
        for fn, name in (("run_teacher", "sim_teacher_pass"), ("instance_maps", "sim_self_correction"),
                         ("combine_maps", "sim_self_correction"), ("adaptive_tau_high", "sim_self_correction"),
                         ("pseudo_labels", "sim_self_correction"), ("semantic_probability_map", "sim_semantic_map"),
                         ("pseudo_mask_loss", "sim_pseudo_loss"), ("paste_mask_loss", "sim_paste_loss"),
                         ("confident_pixel_features", "sim_prototype_statistics"),
                         ("projection_loss", "loss_projection"), ("pairwise_loss", "loss_pairwise"),
                         ("feature_similarity", "loss_pairwise_colour_similarity")):
            stack.enter_context(mock.patch.object(sl, fn, _wrap(getattr(sl, fn), name)))
        stack.enter_context(mock.patch.object(loss_fn, "make_record", _wrap(loss_fn.make_record, "sim_bank_record")))
        protos = state.prototypes
        for obj, attr, name in ((protos, "assignment_statistics", "sim_prototype_statistics"),
                                (protos, "apply_statistics", "sim_prototype_update"),
                                (state.teacher, "update", "ema_teacher_update"),
                                (state, "push_record", "copy_paste_bank_push"),
                                (state, "before_step", "copy_paste"),
                                (state, "after_step", "after_step_other")):
            stack.enter_context(mock.patch.object(obj, attr, _wrap(getattr(obj, attr), name)))


# --------------------------------------------------------------------------- event analysis
def _scope_of(event) -> Any:
    parent = event.cpu_parent
    while parent is not None and not parent.name.startswith(PREFIX):
        parent = parent.cpu_parent
    return parent


def attribute(events, top: str = STEP) -> list[dict[str, float]]:
    """Per ``top`` scope event (one per step): exclusive microseconds per part (``_total``: the
    scope's own time), the backward pass split by forward scope."""
    scopes = [e for e in events if e.name.startswith(PREFIX)]
    forward_scope: dict[int, str] = {}
    for e in events:
        if e.name.startswith(PREFIX) or e.name.startswith("autograd::engine") or e.sequence_nr < 0:
            continue
        owner = _scope_of(e)
        if owner is not None and e.sequence_nr not in forward_scope and owner.name != PREFIX + "backward":
            forward_scope[e.sequence_nr] = owner.name[len(PREFIX):]
    children: dict[int, list] = defaultdict(list)
    roots = []
    for e in scopes:
        parent = _scope_of(e)
        if parent is None:
            roots.append(e)
        else:
            children[id(parent)].append(e)
    backward_nodes: dict[int, list] = defaultdict(list)
    for e in events:
        if e.name.startswith("autograd::engine::evaluate_function"):
            parent = e.cpu_parent
            while parent is not None and not parent.name.startswith(PREFIX):
                if parent.name.startswith("autograd::engine::evaluate_function"):
                    break
                parent = parent.cpu_parent
            if parent is not None and parent.name == PREFIX + "backward":
                backward_nodes[id(parent)].append(e)

    def walk(e, parts: dict[str, float]) -> None:
        name = e.name[len(PREFIX):]
        inner = children.get(id(e), [])
        exclusive = e.cpu_time_total - sum(c.cpu_time_total for c in inner)
        if name == top:
            name = "other"
        if name == "backward":
            for node in backward_nodes.get(id(e), []):
                if node.sequence_nr >= 0:
                    key = "backward:" + forward_scope.get(node.sequence_nr, "unattributed")
                    key = "backward:other" if key == "backward:" + top else key
                else:
                    key = "backward:accumulate_grad"
                parts[key] = parts.get(key, 0.0) + node.cpu_time_total
                exclusive -= node.cpu_time_total
            name = "backward:engine"
        parts[name] = parts.get(name, 0.0) + exclusive
        for c in inner:
            walk(c, parts)

    per_step = []
    for root in roots:
        if root.name == PREFIX + top:
            parts: dict[str, float] = {}
            walk(root, parts)
            parts["_total"] = root.cpu_time_total
            per_step.append(parts)
    return per_step


def _summarise(per_step: list[dict[str, float]], prof, steps: int) -> dict:
    names = sorted({k for p in per_step for k in p if k != "_total"})
    n = max(1, len(per_step))
    total_ms = sum(p["_total"] for p in per_step) / n / 1000
    parts = {k: sum(p.get(k, 0.0) for p in per_step) / n / 1000 for k in names}
    ordered = dict(sorted(parts.items(), key=lambda kv: -kv[1]))
    ops = []
    for avg in sorted(prof.key_averages(), key=lambda a: -a.self_cpu_time_total):
        if avg.key.startswith(PREFIX):
            continue
        ops.append({"op": avg.key, "self_ms_per_step": round(avg.self_cpu_time_total / steps / 1000, 3),
                    "calls_per_step": round(avg.count / steps, 1),
                    "share": round(avg.self_cpu_time_total / steps / 1000 / total_ms, 4) if total_ms else 0.0})
        if len(ops) == TOP_OPS:
            break
    return {"step_ms": round(total_ms, 3),
            "step_ms_per_profiled_step": [round(p["_total"] / 1000, 2) for p in per_step],
            "parts_ms": {k: round(v, 3) for k, v in ordered.items()},
            "parts_share": {k: round(v / total_ms, 4) if total_ms else 0.0 for k, v in ordered.items()},
            "top_ops_self_cpu": ops}


def _profiler():
    return profile(activities=[ProfilerActivity.CPU], record_shapes=False, with_stack=False)


# --------------------------------------------------------------------------- the training step
def _train_dataset(params: dict, data_root: Path, coco=None):
    """The training dataset as the trainer builds it (per-sample seeds; images cached after a first read)."""
    from sim_core.data.coco import load_coco
    from sim_core.data.dataset import CocoDetectionDataset
    from sim_core.engine.batches import SeededSamples

    data_cfg = params["data"]
    if coco is None:
        coco = load_coco(data_root / "train.json", data_root / "images", check_images=False)
    return SeededSamples(CocoDetectionDataset(coco, train=True, sizes=list(data_cfg["train_sizes"]),
                                              max_size=int(data_cfg["max_size"]),
                                              flip_prob=float(data_cfg["flip_prob"]), cache_images=True))


def _train_batch(s, data_root: Path, params: dict, coco=None) -> tuple[list, list]:
    from sim_core.data.dataset import collate

    dataset = _train_dataset(params, data_root, coco)
    return collate([dataset[(i, i)] for i in range(min(s.batch, len(dataset)))])


def profile_method(params: dict, method: str, images, targets, num_classes: int, steps: int) -> dict:
    from experiments.bench_parts import _make_method_step, time_it
    from torch.utils.flop_counter import FlopCounterMode

    step = _make_method_step(params, method, images, targets, num_classes, scope=scope)
    parts = step.parts
    warmup = (3 if method == "sim" else 2) if steps >= 3 else 1  # a smoke-sized run warms up once
    step_cpu_s = time_it(step, max(1, steps), warmup=warmup, clock=time.process_time)
    handles: list = []
    with contextlib.ExitStack() as stack:
        _model_scopes(parts["model"], stack, handles)
        _loss_scopes(method, parts["loss_fn"], parts["state"], stack, handles)
        try:
            with _profiler() as prof:
                for _ in range(max(1, steps)):
                    with scope(STEP):
                        step()
        finally:
            for h in handles:
                h.remove()
    per_step = attribute(prof.events())
    out = _summarise(per_step, prof, max(1, steps))
    out["step_ms_unprofiled"] = round(step_cpu_s * 1000, 3)
    # the profiler's intervals are thread wall time (inflated when other jobs share the core):
    # the shares applied to the unprofiled CPU time are the estimate to read
    out["parts_ms_at_unprofiled_step"] = {k: round(v * out["step_ms_unprofiled"], 2)
                                          for k, v in out["parts_share"].items()}
    with FlopCounterMode(display=False) as counter:  # one more step, counted: convolutions and matmuls
        step()
    flops = counter.get_total_flops()
    out["gflop_per_step"] = round(flops / 1e9, 3)
    out["gflop_per_s_unprofiled"] = round(flops / 1e9 / step_cpu_s, 1)
    return out


def _forward_flops(params: dict, images, targets, num_classes: int) -> dict:
    """Forward GFLOP of the ``mask`` step per module (FlopCounterMode; the backward is about twice)."""
    from torch.utils.flop_counter import FlopCounterMode

    from experiments.bench_parts import _make_method_step

    step = _make_method_step(params, "mask", images, targets, num_classes)
    model, loss_fn = step.parts["model"], step.parts["loss_fn"]
    with FlopCounterMode(display=False) as counter:
        model.training_losses(images, copy.deepcopy(targets), loss_fn, 600, 1000)
    counts = counter.get_flop_counts()
    out = {"total": round(counter.get_total_flops() / 1e9, 3)}
    for attr, name in MODULE_SCOPES:
        key = next((k for k in counts if k.endswith("." + attr) and k.count(".") == 1), None)
        if key is not None:
            out[name] = round(sum(counts[key].values()) / 1e9, 3)
    ctl = next((k for k in counts if k.endswith("head.controller")), None)
    if ctl is not None:
        out["fcos_head_controller_conv"] = round(sum(counts[ctl].values()) / 1e9, 3)
    return out


# --------------------------------------------------------------------------- data and evaluation
def _data_root(s, params: dict, tmp: Path) -> tuple[Path, str]:
    root = Path(params["data"]["root"])
    if (root / "train.json").is_file() and (root / "val.json").is_file():
        return root, str(root)
    from sim_core.data.prepare import prepare_synthetic

    cfg = dict(params.get("synthetic") or {})
    cfg.update({"num_train": max(16, 2 * s.batch), "num_val": 8, "preview_images": 1})
    prepare_synthetic(tmp / "syn", cfg)
    return tmp / "syn", f"prepared here ({params['data']['root']} is missing): {cfg['num_train']} train images"


def profile_data(s, params: dict, data_root: Path, coco=None) -> dict:
    """One training batch: the dataset's ``__getitem__`` (decode, augment, targets) + collate."""
    from sim_core.data.dataset import collate

    dataset = _train_dataset(params, data_root, coco)
    batches = max(1, min(s.iters, len(dataset) // max(1, s.batch)))
    out: dict = {"batch": s.batch, "batches": batches}
    for label in ("first_read", "cached"):  # first epoch decodes the PNGs; data.cache_images keeps them
        get, col = [], []
        for b in range(batches):
            tic = time.process_time()
            samples = [dataset[(i, i)] for i in range(b * s.batch, (b + 1) * s.batch)]
            mid = time.process_time()
            collate(samples)
            get.append(mid - tic)
            col.append(time.process_time() - mid)
        out[label] = {"getitem_ms_per_batch": round(statistics.median(get) * 1000, 3),
                      "collate_ms_per_batch": round(statistics.median(col) * 1000, 3)}
    return out


def _trained_model(params: dict) -> Path | None:
    """A trained ``mask`` run (else any run) whose model is the params' model."""
    from sim_core.engine.checkpoint import load_weights

    dirs = [Path(params["train"].get("runs_dir", "runs")), Path("/tmp/cold/runs")]
    candidates = [d / run / "model.pt" for d in dirs for run in ("mask_s0", "mask", "boxinst_s0", "sim_s0")]
    candidates += sorted(p for d in dirs if d.is_dir() for p in d.glob("*/model.pt"))
    for path in candidates:
        if path.is_file():
            try:
                meta = load_weights(path)["meta"]
            except Exception:  # unreadable: try the next one
                continue
            if meta.get("model_cfg") == params["model"]:
                return path
    return None


def profile_evaluation(s, params: dict, data_root: Path, tmp: Path) -> dict:
    """``simbench evaluate --run``'s work on the val split: load, predict, paste, encode, COCO eval."""
    import sim_core.evaluation.inference as inference
    import sim_core.evaluation.predictions as predictions
    from sim_core.data.dataset import CocoDetectionDataset
    from sim_core.evaluation.coco_eval import evaluate_coco
    from sim_core.model.condinst import CondInst

    gt = json.loads((data_root / "val.json").read_text())
    if s.val_images:
        keep = {im["id"] for im in gt["images"][:s.val_images]}
        gt = {**gt, "images": [im for im in gt["images"] if im["id"] in keep],
              "annotations": [a for a in gt["annotations"] if a["image_id"] in keep]}
    gt_path = tmp / "val.json"
    gt_path.write_text(json.dumps(gt))
    weights = _trained_model(params)
    out: dict = {"val_images": len(gt["images"]),
                 "model": str(weights) if weights else "untrained (no trained run with the params' model found)"}
    handles: list = []
    with contextlib.ExitStack() as stack:
        cpu = time.process_time()
        with _profiler() as prof:
            with scope("evaluation"):
                with scope("model_load"):
                    if weights is not None:
                        model, _ = inference.load_trained_model(weights, torch.device("cpu"))
                    else:
                        torch.manual_seed(0)
                        model = CondInst(len(gt["categories"]), params["model"]).eval()
                _model_scopes(model, stack, handles)
                for obj, attr, name in ((CocoDetectionDataset, "__getitem__", "val_data_loading"),
                                        (predictions, "rescale_masks", "mask_resize_threshold"),
                                        (predictions, "encode_masks", "rle_encoding"),
                                        (inference, "predictions_to_coco", "results_records")):
                    stack.enter_context(mock.patch.object(obj, attr, _wrap(getattr(obj, attr), name)))
                segm, bbox = inference.predict_split(model, gt_path, data_root / "images", params,
                                                     torch.device("cpu"), progress=False)
                with scope("coco_evaluation"):
                    metrics = evaluate_coco(gt_path, {"segm": segm, "bbox": bbox}, iou_types=("segm", "bbox"),
                                            backend=params["evaluate"].get("backend", "faster"))
        cpu = time.process_time() - cpu
        for h in handles:
            h.remove()
    per_step = attribute(prof.events(), top="evaluation")
    summary = _summarise(per_step, prof, 1)
    out.update({"total_ms": summary["step_ms"], "process_cpu_ms": round(cpu * 1000, 1), "parts_ms": summary["parts_ms"],
                "parts_share": summary["parts_share"], "top_ops_self_cpu": summary["top_ops_self_cpu"],
                "detections": len(segm), "mask_ap": metrics["segm"].get("AP")})
    return out


def bench_profile(s) -> dict:
    from sim_core.data.coco import load_coco

    params = s.params
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out: dict = {"unit": "ms (profiler CPU time on one thread; means over the profiled steps)", "threads": 1,
                 "profiled_steps": max(1, s.iters), "iteration": 600, "max_iter": 1000}
    try:
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            data_root, source = _data_root(s, params, tmp)
            coco = load_coco(data_root / "train.json", data_root / "images", check_images=False)
            images, targets = _train_batch(s, data_root, params, coco)
            num_classes = len(coco.label_to_cat_id)
            out.update({"data": source, "batch": len(images),
                        "image_sizes": sorted({tuple(im.shape[-2:]) for im in images})})
            out["methods"] = {}
            for method in PROFILE_METHODS:
                print(f"bench: profile {method} ...", flush=True)
                try:
                    out["methods"][method] = profile_method(params, method, images, targets, num_classes, s.iters)
                except Exception as exc:  # reported, not hidden
                    out["methods"][method] = f"failed: {type(exc).__name__}: {exc}"
            out["mask_forward_gflop"] = _forward_flops(params, images, targets, num_classes)
            out["data_loading"] = profile_data(s, params, data_root, coco)
            print("bench: profile evaluation ...", flush=True)
            out["evaluation"] = profile_evaluation(s, params, data_root, tmp)
    finally:
        torch.set_num_threads(before)
    return out


def compile_check(params_path: str = "params.yaml", steps: int = 5, layout_optimization: bool | None = None,
                  channels_last: bool = True) -> dict:
    """Eager vs ``torch.compile`` (inductor, ``nn.Module.compile`` of the detector) on the demo ``mask``
    step, one thread: compile seconds (first step) and median step CPU seconds. Minutes of compiling,
    so not a bench section; run ``python -c "from experiments.step_profile import compile_check as c;
    print(c())"``. ``layout_optimization``: inductor's switch (None: its default); ``channels_last=False``
    converts both models' weights to the contiguous layout (the detector keeps channels-last weights)."""
    from types import SimpleNamespace

    import torch._dynamo
    import torch._inductor.config as inductor_config

    from experiments.bench_parts import BenchSettings, _make_method_step, time_it

    torch.set_num_threads(1)
    s = BenchSettings.from_args(SimpleNamespace(params=params_path, iters=steps, batch=8, size=128))
    images, targets = _train_batch(s, Path(s.params["data"]["root"]), s.params)
    out: dict = {"threads": 1, "batch": len(images), "layout_optimization": layout_optimization,
                 "channels_last": channels_last}

    def timed(step, n: int, warmup: int = 2) -> float:  # median CPU time
        return time_it(step, n, warmup=warmup, clock=time.process_time)

    eager = _make_method_step(s.params, "mask", images, targets, 6)
    if not channels_last:
        eager.parts["model"].to(memory_format=torch.contiguous_format)
    out["eager_step_s"] = round(timed(eager, steps), 4)
    if layout_optimization is not None:
        inductor_config.layout_optimization = layout_optimization
    torch._dynamo.reset()
    step = _make_method_step(s.params, "mask", images, targets, 6)
    if not channels_last:
        step.parts["model"].to(memory_format=torch.contiguous_format)
    step.parts["model"].compile()
    try:
        tic, cpu = time.perf_counter(), time.process_time()
        step()
        out["first_step_wall_s"] = round(time.perf_counter() - tic, 1)
        out["first_step_cpu_s"] = round(time.process_time() - cpu, 1)
        out["compiled_step_s"] = round(timed(step, steps), 4)
        out["eager_step_s_after"] = round(timed(eager, steps, warmup=0), 4)
    except Exception as exc:  # what fails is the finding
        out["failed"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    return out
