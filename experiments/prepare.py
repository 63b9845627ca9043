"""``simbench prepare KIND --out DIR``: any dataset to simbench's COCO layout.

Everything is validated before anything is written; the output directory is
built under a temporary name and renamed at the end, so a failed prepare
leaves nothing behind. See ``docs/architecture.md`` for the layout.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    kinds = parser.add_subparsers(dest="kind", required=True, parser_class=type(parser))
    syn = kinds.add_parser("synthetic", help="procedurally generated dataset (deterministic from a seed)")
    syn.add_argument("--params", default="params.yaml",
                     help="read the 'synthetic' section from this file when it exists")
    syn.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a key of the synthetic section, e.g. --set num_train=200")
    c128 = kinds.add_parser("coco128", help="128 real COCO images (smoke tests)")
    c128.add_argument("--root", default=None, help="COCO-layout folder (default: ../shared/datasets/coco128)")
    coco = kinds.add_parser("coco", help="a COCO 2017 folder: validated and linked, never copied")
    coco.add_argument("--root", required=True, help="folder with train2017/, val2017/, annotations/")
    coco.add_argument("--download", action="store_true", help="download COCO 2017 into --root first (resumable)")
    voc = kinds.add_parser("voc", help="PASCAL VOC 2012 + SBD train_aug / val")
    voc.add_argument("--voc", required=True, help="VOC2012 folder (JPEGImages/, SegmentationObject/, ...)")
    voc.add_argument("--sbd", default=None, help="SBD folder (dataset/inst, dataset/cls, ...)")
    voc.add_argument("--train-json", default=None, help="ready-made voc_2012_train_aug_cocostyle.json instead of SBD")
    voc.add_argument("--val-json", default=None, help="ready-made voc_2012_val_cocostyle.json")
    carparts = kinds.add_parser("carparts", help="500 real photographs of cars, 18 part classes (the published "
                                                 "train/test split)")
    carparts.add_argument("--root", default=None,
                          help="the carparts folder (default: ../shared/datasets/carparts)")
    custom = kinds.add_parser("custom", help="any COCO-format images + jsons (masks optional: box-only data works)")
    custom.add_argument("--images", default=None, help="folder the jsons' file_name entries are relative to "
                                                      "(both splits)")
    custom.add_argument("--train-images", default=None, help="the training split's own image folder "
                                                            "(with --val-images, instead of --images)")
    custom.add_argument("--val-images", default=None, help="the validation split's own image folder")
    custom.add_argument("--train-ann", required=True, help="COCO-format json of the training split")
    custom.add_argument("--val-ann", required=True, help="COCO-format json of the validation split")
    for sub in (syn, c128, coco, voc, carparts, custom):
        sub.add_argument("--out", required=True, help="output directory")


def custom_image_folders(args: argparse.Namespace) -> tuple[Path, Path]:
    """``(train images, val images)`` from ``--images`` or the pair ``--train-images``/``--val-images``."""
    from sim_core.errors import InputError

    pair = (args.train_images, args.val_images)
    if args.images and any(pair):
        raise InputError("prepare custom", "give --images (one folder for both splits) or --train-images with "
                                           "--val-images, not both")
    if args.images:
        return Path(args.images), Path(args.images)
    if not all(pair):
        given = "--train-images" if args.train_images else "--val-images" if args.val_images else "no image folder"
        raise InputError("prepare custom", f"{given} alone: give --images DIR, or both --train-images and "
                                           "--val-images")
    return Path(args.train_images), Path(args.val_images)


def synthetic_config(args: argparse.Namespace) -> dict:
    from sim_core.config import apply_overrides, read_yaml
    from sim_core.data.synthetic import DEFAULT_SYNTHETIC_CFG

    cfg = dict(DEFAULT_SYNTHETIC_CFG)
    if Path(args.params).is_file():
        section = read_yaml(args.params).get("synthetic") or {}
        cfg.update(apply_overrides(cfg, section, source=f"{args.params}: synthetic"))
    overrides = [o.removeprefix("synthetic.") for o in args.overrides]
    return apply_overrides(cfg, overrides, source="--set")


def main(args: argparse.Namespace) -> int:
    from sim_core.data import prepare as prep
    from sim_core.errors import InputError

    out = Path(args.out)
    if args.kind == "synthetic":
        summary = prep.prepare_synthetic(out, synthetic_config(args))
    elif args.kind == "coco128":
        summary = prep.prepare_coco128(out, root=args.root)
    elif args.kind == "coco":
        if args.download:
            from sim_core.data.coco_download import download_coco

            download_coco(Path(args.root))
        summary = prep.prepare_coco(out, Path(args.root))
    elif args.kind == "carparts":
        from sim_core.data.carparts import prepare_carparts

        summary = prepare_carparts(out, root=Path(args.root) if args.root else None)
    elif args.kind == "voc":
        from sim_core.data import voc

        if bool(args.train_json) != bool(args.val_json):
            raise InputError("prepare voc", "--train-json and --val-json go together (the ready-made COCO-style "
                                            f"jsons of both splits); got only {'--train-json' if args.train_json else '--val-json'}")
        if args.train_json and args.sbd:
            raise InputError("prepare voc", "give either --sbd (convert SBD) or --train-json/--val-json "
                                            "(ready-made jsons), not both")
        if args.train_json:
            summary = voc.prepare_voc_cocostyle(out, Path(args.voc), Path(args.train_json), Path(args.val_json))
        else:
            summary = voc.prepare_voc(out, Path(args.voc), Path(args.sbd) if args.sbd else None)
    else:
        train_images, val_images = custom_image_folders(args)
        summary = prep.prepare_custom(out, train_images, Path(args.train_ann), Path(args.val_ann),
                                      val_images=val_images)
    print(f"prepared {args.kind} -> {out}")
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, (dict, list))}, indent=None))
    if args.kind == "carparts":  # the annotation tool's quirks, handled by name (summary.json: source.quirks)
        for split, q in summary["source"]["quirks"].items():
            fields = sum(n for per_kind in q["tool_fields"].values() for n in per_kind.values())
            print(f"{split}: {q['iscrowd_boolean']} boolean iscrowd -> 0/1, {q['background_category']} empty "
                  f"_background_ category dropped, {fields} annotation-tool field values removed "
                  "(summary.json: source.quirks)")
    return 0
