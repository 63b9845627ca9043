"""Import results written by the upstream code bases into simbench results files.

The rivals' numbers are most convincing when their own code produced them.
This module reads the JSON that each upstream test script writes, checks it
against simbench's ground truth, and writes simbench's ``segm.json`` and
``bbox.json``, so ``simbench evaluate`` scores every method with one
evaluator. What each upstream writes (read from their sources):

- ``adelaidet`` (BoxInst, and the SIM release, an AdelaiDet fork):
  detectron2's ``COCOEvaluator`` writes ``OUTPUT_DIR/inference/
  coco_instances_results.json``, one list whose records carry both
  ``bbox`` and ``segmentation`` (counts as str). Category ids are mapped back
  to the dataset's ids when the dataset was registered with
  ``register_coco_instances``.
- ``mmdet`` (2.x ``--format-only --eval-options jsonfile_prefix=P``; 3.x
  ``test_evaluator.format_only=True test_evaluator.outfile_prefix=P``):
  ``P.bbox.json`` and ``P.segm.json``; segm records also carry a bbox; ids
  come from the dataset's ``cat_ids`` and are therefore the json's own ids.
- ``boxlevelset`` (an mmdet 2.x code base with a SOLOv2 head): the same two
  files as mmdet 2.x; its boxes are the tight boxes of the predicted masks
  and the segm scores are the mask scores.

Category ids, rule ``category_ids="auto"`` (the default): let G be the
ground truth's category ids sorted ascending and C = len(G).
- every id found is in G -> ids are the original ids;
- otherwise, if every id is in 0..C-1 -> contiguous from 0: id i means G[i];
- otherwise, if every id is in 1..C -> contiguous from 1: id i means G[i-1];
- otherwise -> error listing the ids that fit no rule.
When the ids fit the original ids *and* a contiguous rule that would map
them differently (e.g. a VOC file containing only ids 1..19), the file is
ambiguous and the import stops; pass ``category_ids`` = "original",
"contiguous0" or "contiguous1" explicitly (``simbench import
--category-ids``). (With G = 1..C, "contiguous1" and "original" are the same
mapping, so that case is not ambiguous.) When the upstream run used its own
label order (a dataset registered with different ids, a class list in another
order), ``category_ids`` can also be an explicit mapping from the ids in the
file to the ground truth's ids: a dict, or on the command line
``--category-ids 0:1,1:5,2:9`` or the path of a JSON object
``{"0": 1, "1": 5, "2": 9}`` (:func:`parse_category_ids`). Every id in the
file must be mapped and every target must be a ground-truth id.

Pickled outputs (``.pkl``) are refused, never loaded: unpickling runs
arbitrary code. The error says how to get JSON from the upstream test.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

from sim_core.errors import InputError
from sim_core.data.validate import load_gt
from sim_core.evaluation.results import check_results, compress_rle, load_json, mask_box
from sim_core.io_utils import atomic_write_json

FORMATS = ("adelaidet", "mmdet", "boxlevelset")
CATEGORY_RULES = ("auto", "original", "contiguous0", "contiguous1")
_PICKLE_SUFFIXES = (".pkl", ".pickle", ".pth", ".pt")
_RERUN_HINT = {
    "adelaidet": "run tools/train_net.py --eval-only; it writes OUTPUT_DIR/inference/coco_instances_results.json",
    "mmdet": ("rerun tools/test.py with --format-only --eval-options jsonfile_prefix=PREFIX (mmdet 2.x) or "
              "--cfg-options test_evaluator.format_only=True test_evaluator.outfile_prefix=PREFIX (mmdet 3.x) "
              "and import PREFIX.segm.json / PREFIX.bbox.json"),
    "boxlevelset": ("rerun tools/test.py (or tools/dist_test.sh) with --format-only "
                    "--eval-options jsonfile_prefix=PREFIX and import PREFIX.segm.json / PREFIX.bbox.json"),
}


def import_results(
    fmt: str,
    files: Sequence[str | Path],
    gt: str | Path,
    out: str | Path,
    category_ids: Union[str, Mapping[int, int]] = "auto",
    bbox_out: str | Path | None = None,
) -> dict[str, Any]:
    """Convert upstream result files to simbench's segm/bbox results files.

    ``out`` is the segm results path (e.g. ``runs/boxinst_upstream/segm.json``);
    the bbox results go to ``bbox_out`` or, by default, next to it with
    "segm" in the name replaced by "bbox" (``<stem>.bbox.json`` when the name
    has no "segm"). When only segm results exist, each bbox is the tight box
    of the mask. Returns a summary of what was written.
    """
    if fmt not in FORMATS:
        raise InputError("--from", f"unknown upstream format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if isinstance(category_ids, str) and category_ids not in CATEGORY_RULES:
        raise InputError("category_ids", f"expected one of {', '.join(CATEGORY_RULES)} or a mapping, "
                                         f"got {category_ids!r}")
    paths = [Path(f) for f in files]
    if not paths:
        raise InputError("--file", "no result file given")
    for path in paths:
        if path.suffix.lower() in _PICKLE_SUFFIXES:
            raise InputError(path, f"pickled results are not loaded (unpickling can run arbitrary code); "
                                   f"{_RERUN_HINT[fmt]}")
    gt_data = load_gt(gt, require_segmentation=False)  # the one gate (sim_core.data.validate)
    gt_cats = gt_data.category_ids

    segm_src, bbox_src = _read_sources(fmt, paths)
    found = {int(r["category_id"]) for _, recs in (segm_src, bbox_src) if recs for r in recs
             if isinstance(r, dict) and _is_int(r.get("category_id"))}
    rule, mapping = resolve_category_ids(found, sorted(gt_cats), category_ids,
                                         where=", ".join(str(p) for p in paths))

    segm_path, segm_raw = segm_src
    segm = [_remap(r, mapping) for r in segm_raw]
    check_results(segm, gt_data, segm_path, "segm")
    segm = [_clean_segm(r) for r in segm]

    if bbox_src[1] is not None:
        bbox_path, bbox_raw = bbox_src
        bbox = [_remap(r, mapping) for r in bbox_raw]
        check_results(bbox, gt_data, bbox_path, "bbox")
        bbox = [{"image_id": int(r["image_id"]), "category_id": int(r["category_id"]),
                 "bbox": [float(v) for v in r["bbox"]], "score": float(r["score"])} for r in bbox]
        bbox_source = "file"
    else:
        bbox = [{"image_id": r["image_id"], "category_id": r["category_id"],
                 "bbox": mask_box(r["segmentation"]), "score": r["score"]} for r in segm]
        bbox_source = "mask"

    out = Path(out)
    bbox_out = Path(bbox_out) if bbox_out is not None else default_bbox_path(out)
    atomic_write_json(out, segm, indent=None)
    atomic_write_json(bbox_out, bbox, indent=None)
    return {"format": fmt, "files": [str(p) for p in paths], "gt": str(gt), "segm": str(out),
            "bbox": str(bbox_out), "num_segm": len(segm), "num_bbox": len(bbox),
            "category_ids": rule, "bbox_source": bbox_source}


def default_bbox_path(segm_path: Path) -> Path:
    name = segm_path.name
    if "segm" in name:
        i = name.rfind("segm")
        return segm_path.with_name(name[:i] + "bbox" + name[i + 4:])
    return segm_path.with_name(f"{segm_path.stem}.bbox.json")


def parse_category_ids(text: str) -> Union[str, dict[int, int]]:
    """``--category-ids``: a rule name, ``FROM:TO,FROM:TO,...`` or the path of a JSON object ``{FROM: TO}``."""
    text = text.strip()
    if text in CATEGORY_RULES:
        return text
    if re.fullmatch(r"-?\d+\s*:\s*-?\d+(\s*,\s*-?\d+\s*:\s*-?\d+)*", text):
        pairs = [item.split(":") for item in text.split(",")]
        mapping = {int(a): int(b) for a, b in pairs}
        if len(mapping) != len(pairs):
            raise InputError("--category-ids", f"an id is mapped twice in {text!r}")
        return mapping
    path = Path(text)
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise InputError(path, "--category-ids: not a JSON file") from None
        if not isinstance(data, dict) or not all(_is_int(v) and re.fullmatch(r"-?\d+", str(k))
                                                 for k, v in data.items()):
            raise InputError(path, '--category-ids: expected a JSON object of integer ids, e.g. {"0": 1, "1": 5}')
        return {int(k): int(v) for k, v in data.items()}
    raise InputError("--category-ids", f"expected one of {', '.join(CATEGORY_RULES)}, a mapping such as "
                                       f"0:1,1:5,2:9, or a JSON file of one; got {text!r}")


def resolve_category_ids(found: set[int], gt_ids: Sequence[int], rule: Union[str, Mapping[int, int]] = "auto",
                         where: str = "results") -> tuple[str, dict[int, int]]:
    """Decide how result category ids map to ground-truth ids (see the module docstring)."""
    gt_ids = sorted(int(c) for c in gt_ids)
    n = len(gt_ids)
    if not isinstance(rule, str):
        mapping = {int(k): int(v) for k, v in rule.items()}
        bad_targets = sorted(set(mapping.values()) - set(gt_ids))
        if bad_targets:
            raise InputError(where, f"--category-ids maps to {bad_targets[:10]}, which are not ground-truth "
                                    f"category ids ({gt_ids[:10]}...)")
        unmapped = sorted(found - set(mapping))
        if unmapped:
            raise InputError(where, f"category ids {unmapped[:10]} in the results are not in --category-ids")
        return "mapping", mapping
    candidates = {
        "original": {c: c for c in gt_ids},
        "contiguous0": {i: gt_ids[i] for i in range(n)},
        "contiguous1": {i + 1: gt_ids[i] for i in range(n)},
    }
    if rule != "auto":
        mapping = candidates[rule]
        unknown = sorted(found - set(mapping))
        if unknown:
            raise InputError(where, f"category ids {unknown[:10]} do not fit category_ids={rule!r} "
                                    f"(ground truth has {n} categories, ids {gt_ids[:5]}...)")
        return rule, mapping
    fits = {name: m for name, m in candidates.items() if found <= set(m)}
    if not fits:
        unknown = sorted(found - set(gt_ids))
        raise InputError(where, f"category ids {unknown[:10]} are neither ground-truth ids {gt_ids[:5]}... "
                                f"nor contiguous indices 0..{n - 1} or 1..{n}")
    distinct: dict[str, dict[int, int]] = {}
    for name, m in fits.items():
        restricted = {c: m[c] for c in found}
        if not any(restricted == {c: d[c] for c in found} for d in distinct.values()):
            distinct[name] = m
    if len(distinct) > 1:
        raise InputError(where, f"category ids {sorted(found)[:10]} fit several rules ({', '.join(distinct)}) "
                                "that map them differently; pass --category-ids original, contiguous0 or "
                                "contiguous1 (or an explicit FROM:TO,... mapping)")
    name = next(iter(distinct))
    return name, distinct[name]


def _read_sources(fmt: str, paths: list[Path]) -> tuple[tuple[Path, list], tuple[Path | None, list | None]]:
    """Return ``((segm_path, segm_records), (bbox_path, bbox_records or None))``."""
    loaded = []
    for path in paths:
        records = load_json(path, f"{fmt} results")
        if not isinstance(records, list):
            raise InputError(path, "expected a JSON list of COCO result records "
                                   f"(got {type(records).__name__}); {_RERUN_HINT[fmt]}")
        loaded.append((path, records))
    if fmt == "adelaidet":
        if len(loaded) != 1:
            raise InputError("--file", f"adelaidet writes one coco_instances_results.json; got {len(loaded)} files")
        path, records = loaded[0]
        if records and not any(isinstance(r, dict) and "segmentation" in r for r in records):
            raise InputError(path, "no record has a 'segmentation': was the model run with MODEL.MASK_ON False?")
        bbox = records if all(isinstance(r, dict) and "bbox" in r for r in records) else None
        return (path, records), (path if bbox is not None else None, bbox)

    segm: tuple[Path, list] | None = None
    bbox: tuple[Path, list] | None = None
    for path, records in loaded:
        kind = _kind(path, records)
        if kind == "segm":
            if segm is not None:
                raise InputError(path, f"a second segm results file (first: {segm[0]}); give one per kind")
            segm = (path, records)
        else:
            if bbox is not None:
                raise InputError(path, f"a second bbox results file (first: {bbox[0]}); give one per kind")
            bbox = (path, records)
    if segm is None:
        raise InputError("--file", f"no segm results among {[str(p) for p in paths]}; {_RERUN_HINT[fmt]}")
    return segm, (bbox if bbox is not None else (None, None))


def _kind(path: Path, records: list) -> str:
    name = path.name.lower()
    if name.endswith(".segm.json"):
        return "segm"
    if name.endswith(".bbox.json"):
        return "bbox"
    if any(isinstance(r, dict) and "segmentation" in r for r in records):
        return "segm"
    if records:
        return "bbox"
    raise InputError(path, "empty file whose name ends in neither .segm.json nor .bbox.json; cannot tell its kind")


def _remap(record: Any, mapping: dict[int, int]) -> Any:
    if not isinstance(record, dict) or not _is_int(record.get("category_id")):
        return record  # check_results names the problem
    new = dict(record)
    new["category_id"] = mapping.get(int(record["category_id"]), record["category_id"])
    return new


def _clean_segm(record: dict) -> dict:
    out = {"image_id": int(record["image_id"]), "category_id": int(record["category_id"]),
           "segmentation": compress_rle(record["segmentation"]),
           "score": float(record["score"])}
    if "bbox" in record:
        out["bbox"] = [float(v) for v in record["bbox"]]
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
