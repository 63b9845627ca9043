"""COCO and VOC-style evaluation of results files: the evaluator of record.

Two backends give the same numbers: ``pycocotools`` (the reference, what the
papers used) and ``faster`` (faster-coco-eval's ``COCOeval_faster``, whose
per-image matching and accumulation run in C++). A test shows they agree to
1e-4 on real COCO images.

The metrics are read from COCOeval's accumulated precision array
``[T, R, K, A, M]`` rather than from ``stats``: ``stats`` averages over every
evaluated IoU threshold and looks thresholds up by exact float equality, so
it cannot give the VOC numbers of BoxLevelSet (AP25/AP50/AP70/AP75 next to the
COCO AP over 0.5:0.95) from one run. With the default thresholds the values
equal ``stats[:6]`` exactly (tested). Per-threshold matching in COCOeval is
independent across thresholds, so adding 0.25 does not change the others.

Conventions, all COCO's own:
- values are fractions in ``[0, 1]``; maxDets 100; area ranges small < 32^2 <=
  medium < 96^2 <= large, by the ground truth's ``area`` field;
- a metric with no ground truth to score (e.g. APs when no object is small) is
  undefined; pycocotools prints -1, here it is ``None`` (JSON ``null``) so a
  mean over runs cannot silently include a -1;
- for "segm" a result's ``bbox`` is dropped before ``loadRes``, otherwise the
  detection's area would be its box area (detectron2 and mmdetection do the
  same);
- values are rounded to 12 decimals: pycocotools computes precision as
  tp / (tp + fp + eps), so a perfect result would otherwise read
  0.9999999999999998; the rounding removes only that artefact;
- an empty results list is valid and scores 0 wherever ground truth exists
  (pycocotools' ``loadRes`` fails on an empty list, so it is built directly).
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from sim_core.errors import InputError
from sim_core.evaluation.results import (
    IOU_TYPES,
    check_gt_for_eval,
    check_results,
    fill_gt_defaults,
    load_json,
    normalise_results,
)
from sim_core.io_utils import atomic_write_json

BACKENDS = ("pycocotools", "faster")
COCO_THRESHOLDS = tuple(float(t) for t in np.linspace(0.5, 0.95, 10))
VOC_THRESHOLDS = (0.25, 0.5, 0.7, 0.75)
COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
VOC_KEYS = ("AP", "AP25", "AP50", "AP70", "AP75")
_AREAS = {"": "all", "s": "small", "m": "medium", "l": "large"}

GtLike = str | Path | dict
ResultsLike = str | Path | list | Mapping[str, Any]


@dataclass
class EvalResult:
    """Metrics per IoU type plus the text summaries the libraries printed."""

    metrics: dict[str, dict[str, float | None]]
    summaries: dict[str, str] = field(default_factory=dict)
    stats: dict[str, list[float]] = field(default_factory=dict)  # the library's own ``stats`` (with -1)

    @property
    def summary(self) -> str:
        return "\n".join(f"== {t} ==\n{text}" for t, text in self.summaries.items())


def evaluate_coco(
    gt: GtLike,
    results: ResultsLike,
    iou_types: Sequence[str] = ("segm", "bbox"),
    backend: str = "pycocotools",
    iou_thrs: Sequence[float] | None = None,
) -> dict[str, dict[str, float | None]]:
    """COCO metrics ``{iou_type: {"AP", "AP50", "AP75", "APs", "APm", "APl"}}``.

    ``results`` is a results file, a results list, or ``{iou_type: file|list}``
    (simbench writes segm.json and bbox.json separately). With custom
    ``iou_thrs`` the dict holds ``AP<100*t>`` for each threshold, plus the
    COCO keys when all ten thresholds 0.5:0.95 are among them.
    """
    return run_coco_eval(gt, results, iou_types, backend, iou_thrs).metrics


def evaluate_voc(gt: GtLike, results: ResultsLike, iou_type: str = "segm",
                 backend: str = "pycocotools") -> dict[str, float | None]:
    """BoxLevelSet's VOC report: ``{"AP" (0.5:0.95), "AP25", "AP50", "AP70", "AP75"}``."""
    thrs = sorted(set(COCO_THRESHOLDS) | set(VOC_THRESHOLDS))
    metrics = run_coco_eval(gt, results, (iou_type,), backend, thrs).metrics[iou_type]
    return {k: metrics[k] for k in VOC_KEYS}


def evaluate_files(
    gt_path: str | Path,
    results_path: str | Path | Mapping[str, str | Path],
    iou_types: Sequence[str] = ("segm", "bbox"),
    backend: str = "pycocotools",
    out_path: str | Path | None = None,
    voc: bool = False,
) -> dict[str, Any]:
    """Evaluate files and (if ``out_path``) write the metrics JSON atomically.

    The written object is ``{iou_type: metrics, ..., "voc": {...} (if voc),
    "backend", "gt", "results"}``; the caller may add run information.
    """
    gt = load_json(gt_path, "ground truth")
    outcome = run_coco_eval(gt, results_path, iou_types, backend, None, gt_where=str(gt_path))
    out: dict[str, Any] = dict(outcome.metrics)
    if voc:
        voc_type = "segm" if "segm" in iou_types else iou_types[0]
        out["voc"] = evaluate_voc(gt, _pick(results_path, voc_type), voc_type, backend)
    out["backend"] = backend
    out["gt"] = str(gt_path)
    out["results"] = ({k: str(v) for k, v in results_path.items()} if isinstance(results_path, Mapping)
                      else str(results_path))
    if out_path is not None:
        atomic_write_json(out_path, out)
    return out


def run_coco_eval(
    gt: GtLike,
    results: ResultsLike,
    iou_types: Sequence[str] = ("segm", "bbox"),
    backend: str = "pycocotools",
    iou_thrs: Sequence[float] | None = None,
    gt_where: str = "ground truth",
) -> EvalResult:
    """Run the evaluation and keep the printed summaries (see module docstring)."""
    iou_types = tuple(iou_types)
    bad = [t for t in iou_types if t not in IOU_TYPES]
    if bad or not iou_types:
        raise InputError("iou_types", f"expected a non-empty subset of {IOU_TYPES}, got {list(iou_types)}")
    if backend not in BACKENDS:
        raise InputError("backend", f"expected one of {BACKENDS}, got {backend!r}")
    if isinstance(gt, (str, Path)):
        gt_where, gt = str(gt), load_json(gt, "ground truth")
    gt = check_gt_for_eval(gt, gt_where, iou_types)  # the gate: nothing unchecked reaches the libraries
    thresholds, requested = _thresholds(iou_thrs)

    gt_api = make_gt_api(gt, backend)  # one copy per call: COCOeval writes into the annotations
    loaded: dict[str, tuple[str, list]] = {}
    metrics: dict[str, dict[str, float | None]] = {}
    summaries: dict[str, str] = {}
    stats: dict[str, list[float]] = {}
    for iou_type in iou_types:
        source = _pick(results, iou_type)
        key = str(source) if isinstance(source, (str, Path)) else f"<list {id(source)}>"
        if key not in loaded:
            where = str(source) if isinstance(source, (str, Path)) else "results"
            records = load_json(source, "results") if isinstance(source, (str, Path)) else source
            loaded[key] = (where, records)
        where, records = loaded[key]
        check_results(records, gt, where, iou_type)
        dt_api = _make_results(gt_api, normalise_results(records, iou_type), backend)
        precision, params, text, stats[iou_type] = _evaluate(gt_api, dt_api, iou_type, backend, thresholds)
        metrics[iou_type] = _metrics(precision, params, requested)
        summaries[iou_type] = text + "\n" + _format(metrics[iou_type])
    return EvalResult(metrics, summaries, stats)


def _pick(results: ResultsLike, iou_type: str) -> Any:
    if isinstance(results, Mapping):
        if iou_type not in results:
            raise InputError("results", f"no results given for IoU type {iou_type!r} "
                                        f"(have {sorted(results)})")
        return results[iou_type]
    return results


def _thresholds(iou_thrs: Sequence[float] | None) -> tuple[np.ndarray, list[float] | None]:
    """Evaluated thresholds (sorted, de-duplicated) and the explicitly requested ones."""
    if iou_thrs is None:
        return np.array(COCO_THRESHOLDS), None
    requested = [float(t) for t in iou_thrs]
    if not requested or not all(0.0 < t < 1.0 for t in requested):
        raise InputError("iou_thrs", f"IoU thresholds must lie in (0, 1), got {list(iou_thrs)}")
    merged: list[float] = []
    for t in sorted(requested):
        if not any(np.isclose(t, m, atol=1e-9) for m in merged):
            merged.append(t)
    return np.array(merged), requested


def make_gt_api(gt: dict, backend: str):
    """A COCO API object (pycocotools or faster-coco-eval) over a copy of ``gt``."""
    try:  # a JSON round trip copies a large COCO dict several times faster than deepcopy
        data = json.loads(json.dumps(gt))
    except (TypeError, ValueError):
        data = copy.deepcopy(gt)
    fill_gt_defaults(data)
    with _quiet():
        if backend == "pycocotools":
            from pycocotools.coco import COCO
            api = COCO()
            api.dataset = data
            api.createIndex()
            return api
        from faster_coco_eval import COCO as FasterCOCO
        return FasterCOCO(data, print_function=_discard)


def _make_results(gt_api, records: list[dict], backend: str):
    with _quiet():
        if records:
            return gt_api.loadRes(records)
        if backend == "pycocotools":
            from pycocotools.coco import COCO
            api = COCO()
        else:
            from faster_coco_eval import COCO as FasterCOCO
            api = FasterCOCO(print_function=_discard)
        api.dataset = {"images": list(gt_api.dataset["images"]), "annotations": [],
                       "categories": copy.deepcopy(gt_api.dataset["categories"])}
        api.createIndex()
        return api


def _evaluate(gt_api, dt_api, iou_type: str, backend: str, thresholds: np.ndarray):
    lines: list[str] = []
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        if backend == "pycocotools":
            from pycocotools.cocoeval import COCOeval
            evaluator = COCOeval(gt_api, dt_api, iou_type)
        else:
            from faster_coco_eval import COCOeval_faster
            evaluator = COCOeval_faster(gt_api, dt_api, iou_type,
                                        print_function=lambda *a, **k: lines.append(" ".join(map(str, a))))
        evaluator.params.iouThrs = thresholds
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    text = buffer.getvalue() + "\n".join(lines)
    summary = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("Average"))
    stats = [float(v) for v in np.asarray(evaluator.stats).ravel()]
    return np.asarray(evaluator.eval["precision"]), evaluator.params, summary, stats


def _metrics(precision: np.ndarray, params, requested: list[float] | None) -> dict[str, float | None]:
    thrs = np.asarray(params.iouThrs, dtype=float)
    area_labels = list(params.areaRngLbl)
    m = list(params.maxDets).index(100) if 100 in params.maxDets else len(params.maxDets) - 1

    def ap(thr_values: Iterable[float], area: str) -> float | None:
        t_idx = [int(np.flatnonzero(np.isclose(thrs, t, atol=1e-9))[0]) for t in thr_values]
        s = precision[t_idx][:, :, :, area_labels.index(area), m]
        valid = s[s > -1]
        return round(float(valid.mean()), 12) if valid.size else None

    out: dict[str, float | None] = {}
    has_coco = all(np.isclose(thrs, t, atol=1e-9).any() for t in COCO_THRESHOLDS)
    if has_coco:
        out["AP"] = ap(COCO_THRESHOLDS, "all")
        out["AP50"] = ap([0.5], "all")
        out["AP75"] = ap([0.75], "all")
        for suffix in ("s", "m", "l"):
            out["AP" + suffix] = ap(COCO_THRESHOLDS, _AREAS[suffix])
    for t in requested or []:
        out[f"AP{round(t * 100, 1):g}"] = ap([t], "all")
    return out


def _format(metrics: dict[str, float | None]) -> str:
    return "simbench: " + "  ".join(f"{k}={'n/a' if v is None else f'{v:.4f}'}" for k, v in metrics.items())


def _discard(*args, **kwargs) -> None:
    return None


@contextlib.contextmanager
def _quiet():
    with contextlib.redirect_stdout(io.StringIO()):
        yield
