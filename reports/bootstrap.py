"""Paired bootstrap over validation images for differences in COCO mask AP.

Question answered: is method A's AP above method B's by more than the choice
of validation images explains? Resample the validation images with
replacement (the same resamples for every method: a *paired* bootstrap),
recompute AP for each method on each resample, and take the percentile
interval of AP(A) - AP(B).

How, without re-matching: ``COCOeval.evaluate()`` runs once per method and
its per-image records (``evalImgs``: detection scores, which detections match
a GT at each IoU threshold, which GTs/detections are ignored) are kept. AP on a
resample only needs those records again, with each image counted as many times
as it was drawn. :func:`ap_for_counts` re-implements ``COCOeval.accumulate``
for the "all" area range and 100 detections, vectorised over resamples:
detections keep COCOeval's global order (score descending, stable over the
image order); an image drawn c times contributes its true and false positives
with weight c; non-ignored GT counts are weighted the same way. This equals
concatenating c copies of the image, except for the order of detections with
exactly equal scores, which COCOeval leaves to the order of the image list
anyway. Recall thresholds are located with integer arithmetic that reproduces
COCOeval's floating-point comparisons, so the full (unresampled) set gives
COCOeval's AP exactly (tested to 1e-6).

Two intervals per pair, from the same image resamples (docs/statistics.md):

- ``image``: with several seeds per method, a resample's AP of the method is
  the mean over all its seeds' runs on that resample. The interval covers
  image sampling only: the trained models are held fixed.
- ``two_level``: each resample also draws the method's seeds with replacement
  (as many as it has), and its AP is the mean over the drawn seeds of each
  drawn seed's AP on the drawn images. Seeds are drawn independently per
  method: seed k of two methods shares the data order and initial weights but
  not the training, and pairing them would assume a correlation that two
  seeds cannot show; independent draws do not rely on it (they are
  conservative when it is positive). The interval covers image sampling and
  seed-to-seed variation. With one seed per method it equals ``image``
  exactly. The seed draw reuses the per-seed AP of each image resample, so it
  costs nothing beyond the image bootstrap.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from sim_core.errors import InputError

_WORK_BUDGET = 4_000_000  # elements of the [chunk, T, D] arrays handled at once


@dataclass
class CategoryRecords:
    """One category's detections over all images, in COCOeval's accumulate order."""
    det_image: np.ndarray  # [D] index of the image of each detection
    tps: np.ndarray        # [T, D] bool: matched and not ignored
    fps: np.ndarray        # [T, D] bool: unmatched and not ignored
    npig: np.ndarray       # [I] non-ignored GT instances per image


@dataclass
class PerImageEval:
    image_ids: list[int]
    categories: list[CategoryRecords]
    rec_thrs: np.ndarray
    iou_thrs: np.ndarray
    # AP per resample, keyed by (resamples, seed): a run shared by several tables is resampled once.
    resampled: dict = field(default_factory=dict, repr=False, compare=False)


def load_gt(path: str | Path) -> COCO:
    """The ground-truth COCO object of a prepared split, with pycocotools' chatter silenced."""
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            return COCO(str(path))
        except (OSError, ValueError, KeyError, AssertionError, TypeError) as exc:
            raise InputError(path, f"not a readable COCO instances file ({exc})") from exc


def load_results(gt: COCO, results: list[dict], where: str = "results") -> COCO:
    """``gt.loadRes`` on copies, with the checks turned into InputError and empty lists allowed.

    ``bbox`` is dropped from the copies (as detectron2 does for segm) so that
    loadRes takes each detection's area from its mask, not from its box.
    """
    known = set(gt.getImgIds())
    for index, item in enumerate(results):
        if not isinstance(item, dict) or "segmentation" not in item or "score" not in item:
            raise InputError(where, "needs image_id, category_id, segmentation and score", record=index)
        if item.get("image_id") not in known:
            raise InputError(where, f"image_id {item.get('image_id')} is not in the ground truth", record=index)
    copies = [{key: value for key, value in item.items() if key != "bbox"} for item in results]
    with contextlib.redirect_stdout(io.StringIO()):
        if copies:
            return gt.loadRes(copies)
        empty = COCO()
        empty.dataset = {"images": list(gt.dataset["images"]), "categories": list(gt.dataset["categories"]),
                         "annotations": []}
        empty.createIndex()
        return empty


def evaluate_per_image(gt: COCO, results: list[dict], where: str = "results") -> PerImageEval:
    """Run ``COCOeval.evaluate`` (segm) once and keep what AP needs per image and category."""
    dt = load_results(gt, results, where)
    evaluator = COCOeval(gt, dt, iouType="segm")
    evaluator.params.imgIds = sorted(gt.getImgIds())
    # AP needs only the "all" area range: matching the other three ranges too would
    # quadruple COCOeval's per-image work without changing these records.
    everything = evaluator.params.areaRngLbl.index("all")
    evaluator.params.areaRng = [evaluator.params.areaRng[everything]]
    evaluator.params.areaRngLbl = ["all"]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
    p = evaluator.params
    n_img, n_area = len(p.imgIds), len(p.areaRng)
    area, max_det = p.areaRngLbl.index("all"), p.maxDets[-1]
    n_thr = len(p.iouThrs)
    categories = []
    for k in range(len(p.catIds)):
        records = evaluator.evalImgs[k * n_area * n_img + area * n_img:k * n_area * n_img + (area + 1) * n_img]
        scores, images, matches, ignores = [], [], [], []
        npig = np.zeros(n_img, dtype=np.int64)
        for i, record in enumerate(records):
            if record is None:
                continue
            det_scores = np.asarray(record["dtScores"][:max_det], dtype=np.float64)
            scores.append(det_scores)
            images.append(np.full(len(det_scores), i, dtype=np.int64))
            matches.append(np.asarray(record["dtMatches"])[:, :max_det].reshape(n_thr, -1))
            ignores.append(np.asarray(record["dtIgnore"])[:, :max_det].reshape(n_thr, -1))
            npig[i] = int(np.count_nonzero(np.asarray(record["gtIgnore"]) == 0))
        if scores:
            order = np.argsort(-np.concatenate(scores), kind="mergesort")
            det_image = np.concatenate(images)[order]
            dtm = np.concatenate(matches, axis=1)[:, order] != 0
            dtig = np.concatenate(ignores, axis=1)[:, order].astype(bool)
        else:
            det_image, dtm, dtig = np.zeros(0, np.int64), np.zeros((n_thr, 0), bool), np.zeros((n_thr, 0), bool)
        tps, fps = dtm & ~dtig, ~dtm & ~dtig
        # Detections after the last true positive (at every IoU threshold) change no
        # AP: recall stops growing there and their precision is below the precision at
        # that TP, so the envelope ignores them. Dropping them saves most of the work.
        keep = int(np.flatnonzero(tps.any(axis=0))[-1]) + 1 if tps.any() else 0
        categories.append(CategoryRecords(det_image[:keep], tps[:, :keep], fps[:, :keep], npig))
    return PerImageEval(list(p.imgIds), categories, np.asarray(p.recThrs, np.float64),
                        np.asarray(p.iouThrs, np.float64))


def _first_reaching(cum: np.ndarray, target: np.ndarray) -> np.ndarray:
    """For rows of non-decreasing integers cum [N, D], the first index with cum >= target [N, R] (D if none)."""
    n_rows, d = cum.shape
    stride = int(max(cum.max(initial=0), target.max(initial=0))) + 2
    offsets = np.arange(n_rows, dtype=np.int64)[:, None] * stride
    flat = (cum + offsets).ravel()
    found = np.searchsorted(flat, (target + offsets).ravel(), side="left").reshape(target.shape)
    return found - np.arange(n_rows, dtype=np.int64)[:, None] * d


def _recall_targets(npig: np.ndarray, rec_thrs: np.ndarray) -> np.ndarray:
    """[B, R] smallest integer m with m / npig >= thr, using COCOeval's float division rc = tp / npig."""
    den = np.maximum(npig, 1).astype(np.float64)[:, None]
    m = np.ceil(rec_thrs[None, :] * den).astype(np.int64)
    m -= ((m - 1) / den >= rec_thrs[None, :]) & (m > 0)
    m += m / den < rec_thrs[None, :]
    return m


def _category_ap(cat: CategoryRecords, counts: np.ndarray, rec_thrs: np.ndarray) -> np.ndarray:
    """AP of one category for each row of ``counts`` [B, I]; NaN where it has no GT (COCOeval's -1).

    Precision is only evaluated at the true-positive columns of each IoU
    threshold: the interpolated precision at a recall level is the largest
    precision at or after the first detection reaching it, and that maximum
    always falls on a true positive (false positives and ignored detections only
    lower or keep precision). The number of detections before each true
    positive comes from one running sum of non-ignored weights, so the work is
    O(B * D) per distinct ignore pattern plus O(B * TPs), not O(B * T * D).
    """
    n_b = counts.shape[0]
    n_t, n_d = cat.tps.shape
    npig = counts @ cat.npig
    valid = npig > 0
    out = np.full(n_b, np.nan)
    if not valid.any():
        return out
    if n_d == 0:
        out[valid] = 0.0
        return out
    weights = counts[:, cat.det_image]                                            # [B, D]
    targets = _recall_targets(npig, rec_thrs)                                     # [B, R]
    counted = cat.tps | cat.fps                                                   # [T, D] not ignored
    shared = bool((counted == counted[:1]).all())
    running: dict[int, np.ndarray] = {}
    q = np.zeros((n_b, n_t, len(rec_thrs)))
    for t in range(n_t):
        cols = np.flatnonzero(cat.tps[t])
        if cols.size == 0:
            continue
        row = 0 if shared else t
        if row not in running:
            running[row] = np.cumsum(weights * counted[row], axis=1)             # tp + fp up to each column
        tp = np.cumsum(weights[:, cols], axis=1)                                  # [B, K]
        pr = tp / (running[row][:, cols] + np.spacing(1))
        pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]                  # precision envelope
        idx = _first_reaching(tp, targets)
        inside = idx < cols.size
        q[:, t] = np.where(inside, np.take_along_axis(pr, np.minimum(idx, cols.size - 1), axis=1), 0.0)
    ap = q.reshape(n_b, -1).mean(axis=1)
    out[valid] = ap[valid]
    return out


def ap_for_counts(ev: PerImageEval, counts: np.ndarray) -> np.ndarray:
    """Mask AP (fraction) for each image-multiplicity vector in ``counts`` [B, I]."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 2 or counts.shape[1] != len(ev.image_ids):
        raise ValueError(f"counts must be [B, {len(ev.image_ids)}], got {counts.shape}")
    result = np.empty(counts.shape[0])
    largest = max((c.tps.size for c in ev.categories), default=1)
    size = max(1, _WORK_BUDGET // max(largest, 1))
    for start in range(0, counts.shape[0], size):
        block = counts[start:start + size]
        if not ev.categories:
            result[start:start + size] = np.nan
            continue
        per_cat = np.stack([_category_ap(c, block, ev.rec_thrs) for c in ev.categories])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a resample without any GT: AP is NaN
            result[start:start + size] = np.nanmean(per_cat, axis=0)
    return result


def full_ap(ev: PerImageEval) -> float:
    return float(ap_for_counts(ev, np.ones((1, len(ev.image_ids)), dtype=np.int64))[0])


def resample_counts(n_images: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, n_images] multiplicities of images drawn with replacement (seeded)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_images, size=(resamples, n_images))
    flat = draws + np.arange(resamples)[:, None] * n_images
    return np.bincount(flat.ravel(), minlength=resamples * n_images).reshape(resamples, n_images)


def seed_draws(n_seeds: int, resamples: int, seed: int, name: str) -> np.ndarray:
    """[resamples, n_seeds] seed indices drawn with replacement for one method (seeded).

    The stream depends on the bootstrap seed and the method's name only, so a
    method's draws do not change when rows are added to or removed from a table.
    """
    rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
    return rng.integers(0, n_seeds, size=(resamples, n_seeds))


def _interval(diffs: np.ndarray, confidence: float) -> dict:
    low, high = (float(v) for v in np.nanpercentile(diffs, [50 * (1 - confidence), 50 * (1 + confidence)]))
    return {"low": low, "high": high, "excludes_zero": bool(low > 0 or high < 0)}


def paired_bootstrap(groups: Mapping[str, Sequence[PerImageEval]], resamples: int = 1000, seed: int = 0,
                     confidence: float = 0.95, pairs: Sequence[tuple[str, str]] | None = None) -> dict:
    """AP of every group and two percentile intervals of AP(A) - AP(B) for every pair (A before B).

    ``groups`` maps a row name to the per-image evaluations of its runs
    (seeds), all on the same ground truth. Returned APs are fractions. Each
    interval item holds ``diff`` (the full-set difference of the seed means),
    ``image`` (val images resampled, seeds averaged) and ``two_level`` (seeds
    and val images resampled), each ``{low, high, excludes_zero}``.
    """
    if not 0 < confidence < 1:
        raise InputError("params.yaml", f"report.bootstrap_confidence must be in (0, 1), got {confidence}")
    evals = [ev for group in groups.values() for ev in group]
    if not evals:
        return {"resamples": resamples, "seed": seed, "confidence": confidence, "n_images": 0, "ap": {},
                "n_seeds": {}, "intervals": []}
    image_ids = evals[0].image_ids
    if any(ev.image_ids != image_ids for ev in evals):
        raise ValueError("all evaluations of a bootstrap must share the same ground-truth images")
    counts = resample_counts(len(image_ids), resamples, seed)
    for ev in evals:
        if (resamples, seed) not in ev.resampled:
            ev.resampled[(resamples, seed)] = ap_for_counts(ev, counts)
    per_seed = {name: np.stack([ev.resampled[(resamples, seed)] for ev in group])  # [seeds, resamples]
                for name, group in groups.items()}
    boot = {name: aps.mean(axis=0) for name, aps in per_seed.items()}
    two_level = {name: np.take_along_axis(aps, seed_draws(len(aps), resamples, seed, name).T, axis=0).mean(axis=0)
                 for name, aps in per_seed.items()}
    full = {name: float(np.mean([full_ap(ev) for ev in group])) for name, group in groups.items()}
    intervals = []
    for a, b in pairs if pairs is not None else itertools.combinations(groups, 2):
        intervals.append({"a": a, "b": b, "diff": full[a] - full[b],
                          "image": _interval(boot[a] - boot[b], confidence),
                          "two_level": _interval(two_level[a] - two_level[b], confidence)})
    return {"resamples": resamples, "seed": seed, "confidence": confidence, "n_images": len(image_ids),
            "ap": full, "n_seeds": {name: len(group) for name, group in groups.items()}, "intervals": intervals}
