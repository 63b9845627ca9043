"""Predict on the val split with a trained run and write COCO results files.

The evaluator of record is the same for every row of a table: simbench's own
runs write ``segm.json``/``bbox.json`` here; external runs arrive through
``simbench import``; both are scored by ``evaluation.coco_eval``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from sim_core.data.coco import load_coco
from sim_core.data.dataset import CocoDetectionDataset, collate
from sim_core.engine.checkpoint import load_weights
from sim_core.evaluation.predictions import binarize_masks, predictions_to_coco
from sim_core.model.condinst import CondInst


def gather_shards(segm: list, bbox: list) -> tuple[list, list] | None:
    """Under ``torch.distributed``: every process's shard of results on rank 0, in the split's image order
    (ascending image id, as ``CocoData`` keys them and one process lists them; the sort is stable, so each
    image keeps its own order); None on the other ranks. Without distribution: the results as they are."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return segm, bbox
    shards: list = [None] * dist.get_world_size()
    dist.all_gather_object(shards, (segm, bbox))
    if dist.get_rank() != 0:
        return None
    merged_segm = sorted((r for s, _ in shards for r in s), key=lambda r: r["image_id"])
    merged_bbox = sorted((r for _, b in shards for r in b), key=lambda r: r["image_id"])
    return merged_segm, merged_bbox


def load_trained_model(weights_path: str | Path, device: torch.device) -> tuple[CondInst, dict]:
    blob = load_weights(weights_path)
    meta = blob["meta"]
    model = CondInst(int(meta["num_classes"]), meta["model_cfg"])
    model.load_state_dict(blob["model"])
    return model.to(device).eval(), meta


@torch.no_grad()
def predict_split(model: CondInst, ann_path: Path, image_dir: Path, params: dict, device: torch.device,
                  progress: bool = True, shard: tuple[int, int] = (0, 1)) -> tuple[list, list]:
    """Run the detector over every image of a split; returns (segm, bbox) results.

    Images are read by a DataLoader (``train.num_workers`` workers, no GT masks
    decoded); each image's masks are resized to its original size and
    thresholded on ``device``, so only ``uint8`` masks cross to the host, where
    they are RLE-encoded (``evaluation.predictions.binarize_masks``).
    ``shard=(rank, processes)``: only the images ``rank, rank + processes, ...``
    of the split (:func:`gather_shards` puts the processes' results together).
    """
    coco = load_coco(ann_path, image_dir, check_images=False)
    data_cfg, eval_cfg = params["data"], params["evaluate"]
    dataset = CocoDetectionDataset(coco, train=False, sizes=[int(data_cfg["test_size"])],
                                   max_size=int(data_cfg["max_size"]), flip_prob=0.0, load_masks=False)
    rank, processes = shard
    if processes > 1:
        dataset = Subset(dataset, list(range(rank, len(dataset), processes)))
    workers = int(params["train"].get("num_workers", 0))
    loader = DataLoader(dataset, batch_size=int(eval_cfg.get("batch_size", 8)), shuffle=False, collate_fn=collate,
                        num_workers=workers, pin_memory=device.type == "cuda")
    thresh = float(eval_cfg.get("mask_thresh", 0.5))
    segm, bbox = [], []
    label_to_cat = {int(k): int(v) for k, v in coco.label_to_cat_id.items()}
    for batch_images, targets in tqdm(loader, desc="predict", disable=not progress, mininterval=1.0):
        images = [im.to(device, non_blocking=True) for im in batch_images]
        preds = model.predict(images, score_thresh=float(eval_cfg["score_thresh"]),
                              nms_thresh=float(params["model"].get("nms_thresh", 0.6)),
                              max_detections=int(eval_cfg["max_detections"]))
        input_sizes = [tuple(im.shape[-2:]) for im in images]
        orig_sizes = [tuple(t["orig_size"]) for t in targets]
        preds = [{**{k: v.cpu() for k, v in p.items() if k != "masks"},
                  "masks": binarize_masks(p["masks"], size, orig, thresh).cpu()}
                 for p, size, orig in zip(preds, input_sizes, orig_sizes)]
        s, b = predictions_to_coco(preds, [int(t["image_id"]) for t in targets], orig_sizes, input_sizes,
                                   label_to_cat, mask_thresh=thresh)
        segm.extend(s)
        bbox.extend(b)
    return segm, bbox
