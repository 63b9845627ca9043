"""``simbench predict --run NAME (--images DIR | --split val|train) [--out FILE] [--render DIR] [--score-thresh X]``.

Runs a trained model on a folder of images (any size, any of the formats
PIL reads) or on a prepared split, and writes COCO results: ``--out`` holds
the mask results (the format ``simbench evaluate --results`` reads and COCO's
test server takes), ``<out stem>.bbox.json`` the boxes beside it. For a folder,
image ids are 1..N in sorted file order and ``<out stem>.images.json`` is a
COCO json of those images and the model's categories (no annotations), so the
results can be matched to files and scored once annotations exist.
``--render DIR`` writes one overlay per image (masks, boxes, class names,
scores). Every image is opened before the model runs: a file that is not a
readable image stops the command with exit 2 naming it, and nothing is
written (outputs appear only complete).

A folder is predicted exactly as a split: it becomes a COCO json without
annotations and goes through the evaluation's own loader and predictor
(``sim_core.evaluation.inference.predict_split``), at ``data.test_size``.
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

from experiments.common import add_params_arguments, load_params_from_args, require_prepared, run_dir_for

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run name whose runs/<run>/model.pt predicts")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", default=None, help="folder of images (searched recursively)")
    source.add_argument("--split", default=None, choices=["val", "train"], help="a split of the prepared data")
    parser.add_argument("--out", default=None,
                        help="mask results json (default: runs/<run>/predictions/segm.json); boxes beside it")
    parser.add_argument("--render", default=None, metavar="DIR", help="write one overlay image per input here")
    parser.add_argument("--score-thresh", type=float, default=None,
                        help="keep detections scoring at least this (default: evaluate.score_thresh for the "
                             "json, report.qualitative_score_thresh for the overlays)")
    parser.add_argument("--run-dir", default=None, help="run directory (default: <train.runs_dir>/<run>)")
    add_params_arguments(parser)


def folder_images(folder: Path) -> list[dict]:
    """COCO image records of every image file under ``folder`` (sorted), each checked readable first."""
    from sim_core.data.images import image_size
    from sim_core.errors import InputError

    if not folder.is_dir():
        raise InputError(folder, "not a folder of images")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise InputError(folder, "holds no files")
    records = []
    for index, path in enumerate(files, start=1):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise InputError(path, f"not an image file (expected one of {', '.join(IMAGE_SUFFIXES)}); "
                                   "move it out of the folder")
        height, width = image_size(path)  # exit 2 naming the file when it cannot be read
        records.append({"id": index, "file_name": path.relative_to(folder).as_posix(), "height": height,
                        "width": width})
    return records


def model_categories(meta: dict, prepared_root: Path) -> list[dict]:
    """The model's categories (names from the prepared data when it is there, else ``class_<id>``)."""
    names = {}
    for split in ("val", "train"):
        path = prepared_root / f"{split}.json"
        if path.is_file():
            names = {int(c["id"]): str(c["name"]) for c in json.loads(path.read_text())["categories"]}
            break
    ids = sorted(int(v) for v in meta["label_to_cat_id"].values())
    return [{"id": i, "name": names.get(i, f"class_{i}")} for i in ids]


def render(images: list[dict], image_dir: Path, segm: list[dict], categories: list[dict], out_dir: Path,
           score_thresh: float, max_dets: int = 50) -> None:
    """One overlay per image: masks filled, boxes, "class score" labels (atomic: all files or none)."""
    from PIL import Image, ImageDraw
    from pycocotools import mask as mask_utils

    from reports.qualitative import PALETTE, index_results, overlay_masks, read_rgb, top_detections
    from sim_core.io_utils import atomic_directory

    names = {c["id"]: c["name"] for c in categories}
    by_image = index_results(segm)
    with atomic_directory(out_dir) as tmp:
        for record in images:
            image = read_rgb(image_dir / record["file_name"])
            dets = top_detections(by_image.get(record["id"], []), score_thresh, max_dets)
            masks = [mask_utils.decode(d["segmentation"]).astype(bool) for d in dets]
            canvas = Image.fromarray(overlay_masks(image, masks))
            draw = ImageDraw.Draw(canvas)
            for index, det in enumerate(dets):  # the detector's box (a mask may be empty)
                color = tuple(int(255 * c) for c in PALETTE[(2 * index) % len(PALETTE)])
                x, y, w, h = det["bbox"]
                box = (int(x), int(y), int(x + w), int(y + h))
                draw.rectangle(box, outline=color, width=2)
                draw.text((box[0] + 2, box[1] + 1), f"{names.get(det['category_id'], det['category_id'])} "
                                                    f"{det['score']:.2f}", fill=(255, 255, 255))
            name = record["file_name"].replace("/", "__").rsplit(".", 1)[0] + ".png"
            canvas.save(tmp / name)


def main(args: argparse.Namespace) -> int:
    import torch

    from sim_core.config import resolve_run
    from sim_core.engine.seeding import set_cpu_threads
    from sim_core.evaluation.inference import load_trained_model, predict_split
    from sim_core.io_utils import atomic_write_json

    params = load_params_from_args(args)
    resolved = resolve_run(params, args.run)
    run_dir = run_dir_for(params, args.run, args.run_dir)
    root = Path(resolved["data"]["root"])
    if args.images:
        image_dir = Path(args.images)
        images = folder_images(image_dir)  # all checked before the model loads
    else:
        image_dir, images = root / "images", None
        split_json = require_prepared(resolved, args.split)
    set_cpu_threads(resolved["train"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, meta = load_trained_model(run_dir / "model.pt", device)
    categories = model_categories(meta, root)
    settings = copy.deepcopy(resolved)
    if args.score_thresh is not None:
        settings["evaluate"]["score_thresh"] = float(args.score_thresh)
    out = Path(args.out) if args.out else run_dir / "predictions" / "segm.json"
    with tempfile.TemporaryDirectory() as tmp:
        if images is not None:
            split_json = Path(tmp) / "images.json"
            split_json.write_text(json.dumps({"images": images, "annotations": [], "categories": categories}))
        segm, bbox = predict_split(model, split_json, image_dir, settings, device, progress=False)
        listed = json.loads(split_json.read_text())
    if args.render:
        thresh = args.score_thresh if args.score_thresh is not None else \
            float(resolved["report"].get("qualitative_score_thresh", 0.3))
        render(listed["images"], image_dir, segm, categories, Path(args.render), thresh)
    atomic_write_json(out.with_name(f"{out.stem}.bbox.json"), bbox, indent=None)
    if images is not None:
        atomic_write_json(out.with_name(f"{out.stem}.images.json"),
                          {"images": images, "annotations": [], "categories": categories})
    atomic_write_json(out, segm, indent=None)
    print(f"predicted {len(listed['images'])} images with {args.run}: {len(segm)} detections -> {out}"
          + (f"; overlays -> {args.render}" if args.render else ""))
    return 0
