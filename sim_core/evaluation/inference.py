"""Predict on the val split with a trained run and write COCO results files.

The evaluator of record is the same for every row of a table: simbench's own
runs write ``segm.json``/``bbox.json`` here; external runs arrive through
``simbench import``; both are scored by ``evaluation.coco_eval``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from sim_core.data.coco import load_coco
from sim_core.data.dataset import CocoDetectionDataset
from sim_core.engine.checkpoint import load_weights
from sim_core.evaluation.predictions import predictions_to_coco
from sim_core.model.condinst import CondInst


def load_trained_model(weights_path: str | Path, device: torch.device) -> tuple[CondInst, dict]:
    blob = load_weights(weights_path)
    meta = blob["meta"]
    model = CondInst(int(meta["num_classes"]), meta["model_cfg"])
    model.load_state_dict(blob["model"])
    return model.to(device).eval(), meta


@torch.no_grad()
def predict_split(model: CondInst, ann_path: Path, image_dir: Path, params: dict, device: torch.device,
                  progress: bool = True) -> tuple[list, list]:
    """Run the detector over every image of a split; returns (segm, bbox) results."""
    coco = load_coco(ann_path, image_dir, check_images=False)
    data_cfg, eval_cfg = params["data"], params["evaluate"]
    dataset = CocoDetectionDataset(coco, train=False, sizes=[int(data_cfg["test_size"])],
                                   max_size=int(data_cfg["max_size"]), flip_prob=0.0)
    batch = int(eval_cfg.get("batch_size", 8))
    segm, bbox = [], []
    label_to_cat = {int(k): int(v) for k, v in coco.label_to_cat_id.items()}
    for start in tqdm(range(0, len(dataset), batch), desc="predict", disable=not progress, mininterval=1.0):
        samples = [dataset[i] for i in range(start, min(start + batch, len(dataset)))]
        images = [s[0].to(device) for s in samples]
        preds = model.predict(images, score_thresh=float(eval_cfg["score_thresh"]),
                              nms_thresh=float(params["model"].get("nms_thresh", 0.6)),
                              max_detections=int(eval_cfg["max_detections"]))
        preds = [{k: v.cpu() for k, v in p.items()} for p in preds]
        s, b = predictions_to_coco(preds, [int(t["image_id"]) for _, t in samples],
                                   [tuple(t["orig_size"]) for _, t in samples],
                                   [tuple(im.shape[-2:]) for im in images], label_to_cat,
                                   mask_thresh=float(eval_cfg.get("mask_thresh", 0.5)))
        segm.extend(s)
        bbox.extend(b)
    return segm, bbox
