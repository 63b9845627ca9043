"""Paired bootstrap of mask AP: the re-accumulation equals COCOeval, both intervals behave."""
from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy import ndimage

from reports.bootstrap import (CategoryRecords, PerImageEval, ap_for_counts, evaluate_per_image, full_ap,
                               load_results, paired_bootstrap, resample_counts, seed_draws)
from sim_core.errors import InputError

H, W = 36, 44
CATEGORIES = [{"id": 3, "name": "ring"}, {"id": 7, "name": "star"}]


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _random_mask(rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    y0, x0 = rng.integers(0, H - 12), rng.integers(0, W - 12)
    h, w = rng.integers(6, 12), rng.integers(6, 12)
    if rng.random() < 0.5:
        mask[y0:y0 + h, x0:x0 + w] = True
    else:
        yy, xx = np.mgrid[:H, :W]
        mask = ((yy - y0 - h / 2) / (h / 2)) ** 2 + ((xx - x0 - w / 2) / (w / 2)) ** 2 <= 1
    return mask


def build_dataset(seed: int = 0, n_images: int = 24) -> tuple[dict, list[np.ndarray]]:
    """GT with RLE masks, one crowd region and one image without objects; returns masks per annotation."""
    rng = np.random.default_rng(seed)
    images, annotations, masks = [], [], []
    for image_id in range(1, n_images + 1):
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": H, "width": W})
        n_obj = 0 if image_id == 5 else int(rng.integers(1, 4))
        for _ in range(n_obj):
            mask = _random_mask(rng)
            crowd = image_id == 7 and not any(a["iscrowd"] for a in annotations)
            rle = _rle(mask)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": int(rng.choice([3, 7])), "segmentation": rle,
                                "area": float(mask_utils.area(rle)), "bbox": list(mask_utils.toBbox(rle)),
                                "iscrowd": int(crowd)})
            masks.append(mask)
    return {"images": images, "annotations": annotations, "categories": CATEGORIES}, masks


def make_coco(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = copy.deepcopy(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def perfect_results(dataset: dict, masks: list[np.ndarray], seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": _rle(m),
             "score": float(rng.uniform(0.5, 1.0))}
            for a, m in zip(dataset["annotations"], masks) if not a["iscrowd"]]


def noisy_results(dataset: dict, masks: list[np.ndarray], seed: int, tie_scores: bool) -> list[dict]:
    rng = np.random.default_rng(seed)
    results = []
    for ann, mask in zip(dataset["annotations"], masks):
        if rng.random() < 0.15:
            continue  # missed object
        shifted = np.roll(mask, tuple(rng.integers(-1, 2, size=2)), axis=(0, 1))
        if rng.random() < 0.3:
            shifted = ndimage.binary_dilation(shifted)
        category = ann["category_id"] if rng.random() > 0.1 else 10 - ann["category_id"]
        results.append({"image_id": ann["image_id"], "category_id": category,
                        "segmentation": _rle(shifted), "score": float(rng.random())})
    for image in dataset["images"]:
        for _ in range(int(rng.integers(0, 3))):  # false positives
            results.append({"image_id": image["id"], "category_id": int(rng.choice([3, 7])),
                            "segmentation": _rle(_random_mask(rng)), "score": float(rng.random() * 0.8)})
    if tie_scores:
        for item in results:
            item["score"] = round(item["score"], 1)
    return results


def cocoeval_ap(gt: COCO, results: list[dict]) -> float:
    dt = load_results(gt, results)
    evaluator = COCOeval(gt, dt, iouType="segm")
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[0])


@pytest.mark.parametrize("seed,tie_scores", [(0, False), (1, True), (2, False)])
def test_full_set_ap_equals_cocoeval(seed: int, tie_scores: bool) -> None:
    dataset, masks = build_dataset(seed)
    gt = make_coco(dataset)
    results = noisy_results(dataset, masks, seed + 10, tie_scores)
    expected = cocoeval_ap(gt, results)
    assert 0.05 < expected < 0.95  # a non-trivial AP, so equality means something
    assert full_ap(evaluate_per_image(gt, results)) == pytest.approx(expected, abs=1e-6)


def test_counts_equal_explicit_duplication() -> None:
    """Drawing an image twice gives the AP of a dataset holding two copies of it."""
    dataset, masks = build_dataset(3, n_images=12)
    results = noisy_results(dataset, masks, 13, tie_scores=False)
    gt = make_coco(dataset)
    counts = np.ones((1, 12), dtype=np.int64)
    counts[0, 3], counts[0, 8] = 2, 0  # image 4 twice, image 9 dropped
    ours = ap_for_counts(evaluate_per_image(gt, results), counts)[0]

    dup = copy.deepcopy(dataset)
    dup["images"] = [im for im in dup["images"] if im["id"] != 9] + [{**dataset["images"][3], "id": 100}]
    copies = [{**a, "id": 1000 + a["id"], "image_id": 100} for a in dataset["annotations"] if a["image_id"] == 4]
    dup["annotations"] = [a for a in dup["annotations"] if a["image_id"] != 9] + copies
    dup_results = [r for r in results if r["image_id"] != 9] + [{**r, "image_id": 100}
                                                                 for r in results if r["image_id"] == 4]
    assert ours == pytest.approx(cocoeval_ap(make_coco(dup), dup_results), abs=1e-6)


def test_trailing_false_positives_are_dropped_without_changing_any_resample() -> None:
    """Detections after the last TP are trimmed; a resample without the last TP's image still matches COCOeval."""
    dataset, masks = build_dataset(5, n_images=10)
    gt = make_coco(dataset)
    results = perfect_results(dataset, masks)
    last = min(results, key=lambda r: r["score"])
    for image in dataset["images"]:  # low-score false positives trailing every TP
        for k in range(4):
            results.append({"image_id": image["id"], "category_id": 3, "score": 0.01 + 0.001 * k,
                            "segmentation": _rle(np.roll(masks[0], 20, axis=1) & ~masks[0])})
    ev = evaluate_per_image(gt, results)
    total = sum(1 for r in results if r["category_id"] == 3)
    assert sum(c.tps.shape[1] for c in ev.categories if c.npig.sum()) < len(results)
    assert ev.categories[0].tps.shape[1] < total
    counts = np.ones((1, 10), dtype=np.int64)
    counts[0, last["image_id"] - 1] = 0
    kept_ids = {im["id"] for im in dataset["images"]} - {last["image_id"]}
    sub = copy.deepcopy(dataset)
    sub["images"] = [im for im in sub["images"] if im["id"] in kept_ids]
    sub["annotations"] = [a for a in sub["annotations"] if a["image_id"] in kept_ids]
    expected = cocoeval_ap(make_coco(sub), [r for r in results if r["image_id"] in kept_ids])
    assert ap_for_counts(ev, counts)[0] == pytest.approx(expected, abs=1e-6)
    assert full_ap(ev) == pytest.approx(cocoeval_ap(gt, results), abs=1e-6)


def test_doubling_every_image_keeps_ap() -> None:
    dataset, masks = build_dataset(4)
    ev = evaluate_per_image(make_coco(dataset), noisy_results(dataset, masks, 14, False))
    twice = ap_for_counts(ev, np.full((1, len(ev.image_ids)), 2))[0]
    assert twice == pytest.approx(full_ap(ev), abs=1e-12)


def test_method_against_itself_gives_zero_interval() -> None:
    dataset, masks = build_dataset(5)
    gt = make_coco(dataset)
    ev = evaluate_per_image(gt, noisy_results(dataset, masks, 15, False))
    out = paired_bootstrap({"a": [ev], "b": [ev]}, resamples=200, seed=0)
    (item,) = out["intervals"]
    assert item["diff"] == 0.0
    for kind in ("image", "two_level"):
        assert item[kind] == {"low": 0.0, "high": 0.0, "excludes_zero": False}


def test_clearly_worse_copy_is_significant() -> None:
    dataset, masks = build_dataset(6, n_images=30)
    gt = make_coco(dataset)
    good = perfect_results(dataset, masks)
    eroded = [{**r, "segmentation": _rle(ndimage.binary_erosion(mask_utils.decode(r["segmentation"]),
                                                                iterations=2))} for r in good]
    shuffled = copy.deepcopy(good)
    rng = np.random.default_rng(0)
    for item in shuffled:
        item["score"] = float(rng.random())
    groups = {"good": [evaluate_per_image(gt, good)], "eroded": [evaluate_per_image(gt, eroded)],
              "noisy": [evaluate_per_image(gt, noisy_results(dataset, masks, 16, False))]}
    out = paired_bootstrap(groups, resamples=300, seed=1, confidence=0.95)
    assert out["ap"]["good"] == pytest.approx(1.0)
    by_pair = {(i["a"], i["b"]): i for i in out["intervals"]}
    assert by_pair[("good", "eroded")]["image"]["low"] > 0 and by_pair[("good", "eroded")]["image"]["excludes_zero"]
    assert by_pair[("good", "noisy")]["image"]["low"] > 0
    assert by_pair[("eroded", "noisy")]["diff"] == pytest.approx(out["ap"]["eroded"] - out["ap"]["noisy"])
    # Seeds of a row are averaged inside each resample: a row of (good, eroded) sits between them.
    mixed = paired_bootstrap({"mix": groups["good"] + groups["eroded"], "eroded": groups["eroded"]},
                             resamples=100, seed=1)
    assert mixed["ap"]["mix"] == pytest.approx((out["ap"]["good"] + out["ap"]["eroded"]) / 2)


def test_resample_counts_are_seeded_multiplicities() -> None:
    counts = resample_counts(17, 50, seed=3)
    assert counts.shape == (50, 17) and (counts.sum(axis=1) == 17).all()
    assert np.array_equal(counts, resample_counts(17, 50, seed=3))
    assert not np.array_equal(counts, resample_counts(17, 50, seed=4))


def test_empty_results_and_bad_image_ids() -> None:
    dataset, _ = build_dataset(7, n_images=6)
    gt = make_coco(dataset)
    assert full_ap(evaluate_per_image(gt, [])) == 0.0
    bad = [{"image_id": 999, "category_id": 3, "segmentation": _rle(np.ones((H, W))), "score": 0.5}]
    with pytest.raises(InputError, match="999"):
        evaluate_per_image(gt, bad, where="runs/x/segm.json")


# ------------------------------------------------------------------ two-level bootstrap
def _found_eval(found: list[bool]) -> PerImageEval:
    """One GT per image, found exactly (a true positive at every IoU) or missed: AP = 1 if all found, 0 if none."""
    iou_thrs = np.linspace(0.5, 0.95, 10)
    hits = np.flatnonzero(found)
    record = CategoryRecords(det_image=hits, tps=np.ones((10, hits.size), bool), fps=np.zeros((10, hits.size), bool),
                             npig=np.ones(len(found), np.int64))
    return PerImageEval(list(range(1, len(found) + 1)), [record], np.linspace(0, 1, 101), iou_thrs)


def test_seed_noise_makes_the_two_level_interval_include_zero() -> None:
    """A: two perfect seeds; B: a perfect seed and a blind one. Hand-checked values.

    On every image resample AP(A) = 1 and B's seeds have AP 1 and 0. Images
    only: AP(B) = 0.5, so A - B = 0.5 on every resample, interval [0.5, 0.5].
    Two-level: B draws (perfect, perfect) w.p. 1/4 (A - B = 0), one of each
    w.p. 1/2 (0.5), (blind, blind) w.p. 1/4 (1), so the 95 % interval is [0, 1].
    """
    perfect, blind = _found_eval([True] * 8), _found_eval([False] * 8)
    assert (full_ap(perfect), full_ap(blind)) == (1.0, 0.0)
    out = paired_bootstrap({"A": [perfect, _found_eval([True] * 8)], "B": [perfect, blind]}, resamples=400, seed=0)
    (item,) = out["intervals"]
    assert item["diff"] == 0.5 and out["n_seeds"] == {"A": 2, "B": 2}
    assert item["image"] == {"low": 0.5, "high": 0.5, "excludes_zero": True}
    assert item["two_level"] == {"low": 0.0, "high": 1.0, "excludes_zero": False}
    draws = seed_draws(2, 400, 0, "B")  # the draws behind it: both seeds equal half of the time
    assert abs(np.mean((draws == 0).all(axis=1)) - 0.25) < 0.06 and abs(np.mean((draws == 1).all(axis=1)) - 0.25) < 0.06


def _morphed(results: list[dict], op, iterations: int) -> list[dict]:
    return [{**r, "segmentation": _rle(op(mask_utils.decode(r["segmentation"]), iterations=iterations))}
            for r in results]


@pytest.fixture(scope="module")
def seed_noise_groups() -> dict:
    """A's seeds: perfect (AP 1) and over-eroded (AP 0); B's: dilated and eroded once (AP 0.36, 0.15)."""
    dataset, masks = build_dataset(6, n_images=30)
    gt = make_coco(dataset)
    good = perfect_results(dataset, masks)
    return {"A": [evaluate_per_image(gt, good), evaluate_per_image(gt, _morphed(good, ndimage.binary_erosion, 2))],
            "B": [evaluate_per_image(gt, _morphed(good, ndimage.binary_dilation, 1)),
                  evaluate_per_image(gt, _morphed(good, ndimage.binary_erosion, 1))]}


def test_two_level_interval_spans_the_seed_combinations(seed_noise_groups) -> None:
    """Real COCO evaluations where seed noise dominates image noise.

    The seed means differ by 0.25 and the images-only interval is narrow and
    excludes 0. With two seeds each, A drawing its worse seed twice and B its
    better one (probability 1/16, above 2.5 %) gives about 0 - 0.36, the other
    extreme 1 - 0.15: the two-level interval reaches them (up to image noise)
    and includes 0.
    """
    seeds = {name: [full_ap(ev) for ev in group] for name, group in seed_noise_groups.items()}
    assert seeds["A"] == [pytest.approx(1.0), pytest.approx(0.0)]
    assert 0.3 < seeds["B"][0] < 0.4 and 0.1 < seeds["B"][1] < 0.2
    out = paired_bootstrap(seed_noise_groups, resamples=300, seed=0)
    (item,) = out["intervals"]
    image, two = item["image"], item["two_level"]
    assert item["diff"] == pytest.approx(np.mean(seeds["A"]) - np.mean(seeds["B"]))
    assert image["excludes_zero"] and 0 < image["low"] < item["diff"] < image["high"] < 0.3
    assert not two["excludes_zero"] and two["low"] < 0 < two["high"]
    assert two["high"] - two["low"] > 10 * (image["high"] - image["low"])
    assert two["low"] == pytest.approx(seeds["A"][1] - seeds["B"][0], abs=0.05)
    assert two["high"] == pytest.approx(seeds["A"][0] - seeds["B"][1], abs=0.05)


def test_two_level_is_deterministic_and_independent_of_row_order(seed_noise_groups) -> None:
    first = paired_bootstrap(seed_noise_groups, resamples=300, seed=0)
    for group in seed_noise_groups.values():
        for ev in group:
            ev.resampled.clear()  # recomputed from scratch, not read from the cache
    again = paired_bootstrap(dict(reversed(list(seed_noise_groups.items()))), resamples=300, seed=0,
                             pairs=[("A", "B")])
    assert again["intervals"] == first["intervals"]
    other = paired_bootstrap(seed_noise_groups, resamples=300, seed=1)["intervals"][0]
    assert other["two_level"] != first["intervals"][0]["two_level"]


def test_one_seed_per_row_reduces_to_the_image_bootstrap() -> None:
    """With one seed each, both intervals equal the plain image bootstrap, computed here by hand."""
    dataset, masks = build_dataset(8, n_images=20)
    gt = make_coco(dataset)
    evs = [evaluate_per_image(gt, noisy_results(dataset, masks, seed, False)) for seed in (20, 21, 22)]
    out = paired_bootstrap({"x": [evs[0]], "y": [evs[1]], "z": [evs[2]]}, resamples=150, seed=5, confidence=0.9)
    counts = resample_counts(20, 150, 5)
    boot = [ap_for_counts(ev, counts) for ev in evs]
    expected = {("x", "y"): boot[0] - boot[1], ("x", "z"): boot[0] - boot[2], ("y", "z"): boot[1] - boot[2]}
    for item in out["intervals"]:
        low, high = np.nanpercentile(expected[(item["a"], item["b"])], [5, 95])
        assert item["image"]["low"] == low and item["image"]["high"] == high
        assert item["two_level"] == item["image"]
    assert out["n_seeds"] == {"x": 1, "y": 1, "z": 1}


def test_seed_draws() -> None:
    draws = seed_draws(3, 1000, seed=2, name="SIM")
    assert draws.shape == (1000, 3) and set(np.unique(draws)) == {0, 1, 2}
    assert np.array_equal(draws, seed_draws(3, 1000, seed=2, name="SIM"))
    assert not np.array_equal(draws, seed_draws(3, 1000, seed=2, name="BoxInst"))  # independent per row
    assert not seed_draws(1, 50, seed=2, name="SIM").any()  # one seed: always that seed
