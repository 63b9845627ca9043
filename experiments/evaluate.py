"""``simbench evaluate``: score a run on val, or any results file against a GT.

``--run NAME`` loads ``runs/<run>/model.pt``, predicts on the prepared val
split and writes ``segm.json``, ``bbox.json`` and ``metrics.json``. A model
trained with other settings than the params give for the run is refused
(exit 2, naming the settings that differ); ``metrics.json`` records the sha256
of the ``model.pt`` it scored, the run's settings fingerprint and the
evaluation's own inputs (``sim_core.engine.records``).
``--gt GT.json --results R.json --out metrics.json`` scores any COCO results
file (external runs included) with the same code.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments.common import (add_params_arguments, load_params_from_args, require_prepared, run_dir_for,
                                split_mask_counts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", "--name", dest="run", default=None,
                        help="run name: predict on val, then evaluate (--name under torchrun: each process "
                             "predicts a share of the images, the first scores them)")
    parser.add_argument("--gt", default=None, help="ground-truth COCO json")
    parser.add_argument("--results", default=None, help="COCO results json (segm or bbox)")
    parser.add_argument("--iou", default=None, help="with --gt: iou types, comma separated (default segm,bbox)")
    parser.add_argument("--voc", action="store_true", help="also report AP25/AP50/AP70/AP75 (PASCAL VOC style)")
    parser.add_argument("--backend", default=None, choices=["pycocotools", "faster"],
                        help="COCO evaluation backend (default: params evaluate.backend, else pycocotools)")
    parser.add_argument("--out", default=None, help="metrics json to write")
    parser.add_argument("--run-dir", default=None, help="run directory (default: <train.runs_dir>/<run>)")
    add_params_arguments(parser)


def _print_table(metrics: dict) -> None:
    for iou_type, values in metrics.items():
        if isinstance(values, dict):
            print(f"{iou_type:5s} " + "  ".join(f"{k}={'n/a' if v is None else f'{100 * v:.1f}'}"
                                                for k, v in values.items()))


def evaluate_run(args: argparse.Namespace) -> dict:
    import torch

    from sim_core.config import resolve_run
    from sim_core.engine.records import differences, evaluation_inputs, file_sha256, fingerprint, weights_inputs
    from sim_core.engine.run_info import git_commit, trained_on
    from sim_core.errors import InputError
    from sim_core.engine.seeding import set_cpu_threads
    from sim_core.evaluation.coco_eval import evaluate_coco
    from sim_core.engine.distributed import init_distributed
    from sim_core.evaluation.inference import gather_shards, load_trained_model, predict_split
    from sim_core.io_utils import atomic_write_json

    params = load_params_from_args(args)
    resolved = resolve_run(params, args.run)
    require_prepared(resolved, "val")
    run_dir = run_dir_for(params, args.run, args.run_dir)
    set_cpu_threads(resolved["train"])  # the training's thread count: same numbers whatever runs beside it
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dist_info = init_distributed(device)  # under torchrun: each process predicts a shard, rank 0 scores
    model_path = run_dir / "model.pt"
    model, meta = load_trained_model(model_path, device)
    inputs = weights_inputs(resolved)
    if meta.get("fingerprint") != fingerprint(inputs):
        raise InputError(model_path, f"trained with other settings than the params give for run '{args.run}' "
                                     f"({differences(meta.get('fingerprint_inputs'), inputs)}); "
                                     f"train it again: simbench train --run {args.run}")
    root = Path(resolved["data"]["root"])
    gt_path = root / "val.json"
    segm, bbox = predict_split(model, gt_path, root / "images", resolved, device,
                               progress=sys.stderr.isatty() and dist_info.is_main,
                               shard=(dist_info.rank, dist_info.world_size))
    gathered = gather_shards(segm, bbox)
    if gathered is None:
        return {}  # not rank 0: its shard is written by rank 0
    segm, bbox = gathered
    atomic_write_json(run_dir / "segm.json", segm, indent=None)
    atomic_write_json(run_dir / "bbox.json", bbox, indent=None)
    backend = args.backend or resolved["evaluate"]["backend"]
    with_masks, instances = split_mask_counts(gt_path)
    if with_masks < instances:  # box-only val: box AP only; mask AP shown as missing, never as 0
        print(f"mask AP cannot be computed: {instances - with_masks} of {instances} instances in {gt_path} have "
              "no mask; reporting box AP only", file=sys.stderr)
        metrics = evaluate_coco(gt_path, {"bbox": bbox}, iou_types=("bbox",), backend=backend)
        metrics = {"segm": {key: None for key in metrics["bbox"]}, **metrics,
                   "segm_unavailable": f"{instances - with_masks} of {instances} val instances have no mask"}
    else:
        metrics = evaluate_coco(gt_path, {"segm": segm, "bbox": bbox}, iou_types=("segm", "bbox"), backend=backend)
    if (args.voc or resolved["evaluate"].get("voc_metrics")) and "segm_unavailable" not in metrics:
        from sim_core.evaluation.coco_eval import evaluate_voc

        metrics["voc"] = evaluate_voc(gt_path, segm, iou_type="segm", backend=backend)
    record = {"run": args.run, "method": resolved["train"]["method"], "seed": resolved["train"]["seed"],
              "profile": resolved.get("profile"), "dataset": resolved["data"]["dataset"], "split": "val",
              "external": False, **metrics, "num_detections": len(segm),
              "git_commit": git_commit(), "trained_on": trained_on(run_dir),
              "model_sha256": file_sha256(model_path), "fingerprint": meta["fingerprint"],
              "evaluation_inputs": evaluation_inputs(resolved), "params": resolved}
    atomic_write_json(Path(args.out) if args.out else run_dir / "metrics.json", record)
    return metrics


def check_options(args: argparse.Namespace) -> None:
    """The two modes take different options; a mix, or half of a pair, is refused before any work."""
    from sim_core.errors import InputError

    if args.run:
        extra = [name for name, value in (("--gt", args.gt), ("--results", args.results), ("--iou", args.iou))
                 if value is not None]
        if extra:
            raise InputError("evaluate", f"{extra[0]} belongs to --gt/--results mode; --run NAME predicts on the "
                                         "prepared val split and scores segm and bbox (give one mode)")
        return
    if not (args.gt and args.results):
        given = "--gt without --results" if args.gt else "--results without --gt" if args.results else "no inputs"
        raise InputError("evaluate", f"{given}: give --run NAME, or both --gt GT.json and --results RESULTS.json")
    for name, value in (("--run-dir", args.run_dir), ("--set", args.overrides or None)):
        if value is not None:
            raise InputError("evaluate", f"{name} applies to --run NAME only; --gt/--results reads no params")


def main(args: argparse.Namespace) -> int:

    check_options(args)
    if args.run:
        metrics = evaluate_run(args)
    else:
        from sim_core.evaluation.coco_eval import evaluate_files

        iou_types = tuple(t.strip() for t in (args.iou or "segm,bbox").split(",") if t.strip())
        metrics = evaluate_files(Path(args.gt), Path(args.results), iou_types, args.backend or "pycocotools",
                                 Path(args.out) if args.out else None, voc=args.voc)
    _print_table(metrics)
    return 0
