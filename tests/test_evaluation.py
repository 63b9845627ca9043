"""Evaluation: perfect results score 1, backends agree, VOC thresholds, results checks, rescaling."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from scipy import ndimage

from sim_core.errors import InputError
from sim_core.evaluation.coco_eval import (
    COCO_KEYS,
    evaluate_coco,
    evaluate_files,
    evaluate_voc,
    run_coco_eval,
)
from sim_core.evaluation.predictions import predictions_to_coco
from sim_core.evaluation.results import check_results, encode_mask

COCO128 = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "coco128"
COCO128_GT = COCO128 / "annotations" / "instances_train2017.json"
BACKENDS = ("pycocotools", "faster")
# pycocotools' mask.decode trips a numpy 2 DeprecationWarning; it is not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


# ---------------------------------------------------------------- fixtures
def _rect(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _ring(h, w, cy, cx, r_out, r_in):
    yy, xx = np.mgrid[:h, :w]
    d2 = (yy - cy) ** 2 + (xx - cx) ** 2
    return (d2 <= r_out ** 2) & (d2 > r_in ** 2)


def small_gt() -> tuple[dict, dict[int, np.ndarray]]:
    """Two images, non-contiguous category ids 3 and 7, small/medium/large objects, a polygon and a crowd."""
    masks = {
        1: (1, 3, _rect(160, 200, 5, 15, 5, 20)),            # small (150 px)
        2: (1, 3, _rect(160, 200, 30, 70, 10, 50)),          # medium (1600 px)
        3: (1, 7, _ring(160, 200, 85, 120, 70, 25)),         # large ring with a hole (~13400 px)
        4: (2, 7, _rect(60, 80, 10, 20, 10, 30)),            # small, same class twice
        5: (2, 7, _rect(60, 80, 15, 30, 25, 60)),            # overlaps 4
        6: (2, 3, _rect(60, 80, 40, 58, 0, 30)),             # crowd region
    }
    images = [{"id": 1, "height": 160, "width": 200, "file_name": "a.png"},
              {"id": 2, "height": 60, "width": 80, "file_name": "b.png"}]
    anns = []
    for ann_id, (img, cat, m) in masks.items():
        rle = encode_mask(m)
        anns.append({"id": ann_id, "image_id": img, "category_id": cat, "segmentation": rle,
                     "area": float(m.sum()), "bbox": [float(v) for v in mask_utils.toBbox(
                         {"size": rle["size"], "counts": rle["counts"].encode()})],
                     "iscrowd": int(ann_id == 6)})
    # one polygon annotation (a triangle), as COCO ground truth often has
    poly = [[100.0, 5.0, 140.0, 5.0, 120.0, 25.0]]
    prle = mask_utils.merge(mask_utils.frPyObjects(poly, 160, 200))
    anns.append({"id": 7, "image_id": 1, "category_id": 7, "segmentation": poly,
                 "area": float(mask_utils.area(prle)), "bbox": [100.0, 5.0, 40.0, 20.0], "iscrowd": 0})
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": 3, "name": "square"}, {"id": 7, "name": "round"}]}
    return gt, {k: v[2] for k, v in masks.items()}


def perfect_results(gt: dict) -> list[dict]:
    """Every non-crowd ground-truth object as a detection with score 1, its own mask and box."""
    sizes = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    out = []
    for ann in gt["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        h, w = sizes[ann["image_id"]]
        seg = ann["segmentation"]
        if isinstance(seg, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
        elif isinstance(seg["counts"], list):
            rle = mask_utils.frPyObjects(seg, h, w)
        else:
            rle = {"size": seg["size"], "counts": seg["counts"]}
        counts = rle["counts"].decode() if isinstance(rle["counts"], bytes) else rle["counts"]
        out.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "score": 1.0,
                    "bbox": list(ann["bbox"]), "segmentation": {"size": [h, w], "counts": counts}})
    return out


def perturbed_results(gt: dict, seed: int = 0) -> list[dict]:
    """Jittered boxes, eroded/dilated masks, dropped objects, duplicates and false positives, random scores."""
    rng = np.random.default_rng(seed)
    sizes = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    cat_ids = sorted(c["id"] for c in gt["categories"])
    out = []
    for rec in perfect_results(gt):
        if rng.random() < 0.15:
            continue
        h, w = sizes[rec["image_id"]]
        mask = mask_utils.decode({"size": [h, w], "counts": rec["segmentation"]["counts"].encode()}).astype(bool)
        x, y, bw, bh = rec["bbox"]
        y0, y1 = max(int(y) - 4, 0), min(int(y + bh) + 5, h)
        x0, x1 = max(int(x) - 4, 0), min(int(x + bw) + 5, w)
        crop = mask[y0:y1, x0:x1]
        steps = int(rng.integers(1, 4))
        crop = (ndimage.binary_erosion(crop, iterations=steps) if rng.random() < 0.5
                else ndimage.binary_dilation(crop, iterations=steps))
        mask[y0:y1, x0:x1] = crop
        jitter = rng.normal(0.0, 0.08, size=4) * np.array([bw, bh, bw, bh])
        box = [x + jitter[0], y + jitter[1], max(bw + jitter[2], 0.0), max(bh + jitter[3], 0.0)]
        score = float(rng.uniform(0.05, 1.0))
        out.append({"image_id": rec["image_id"], "category_id": rec["category_id"], "score": score,
                    "bbox": [float(v) for v in box], "segmentation": encode_mask(mask)})
        if rng.random() < 0.1:  # a lower-scored duplicate: a false positive at every threshold
            out.append(dict(out[-1], score=score * 0.5))
    for image_id, (h, w) in sizes.items():
        for _ in range(int(rng.integers(0, 3))):
            bw, bh = int(rng.integers(4, max(w // 3, 5))), int(rng.integers(4, max(h // 3, 5)))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            out.append({"image_id": image_id, "category_id": int(rng.choice(cat_ids)),
                        "score": float(rng.uniform(0.05, 1.0)), "bbox": [x, y, bw, bh],
                        "segmentation": encode_mask(_rect(h, w, y, y + bh, x, x + bw))})
    return out


@pytest.fixture(scope="module")
def coco128_gt() -> dict:
    if not COCO128_GT.is_file():
        pytest.skip(f"coco128 ground truth not found at {COCO128_GT}")
    return json.loads(COCO128_GT.read_text())


@pytest.fixture(scope="module")
def coco128_perturbed(coco128_gt) -> list[dict]:
    return perturbed_results(coco128_gt, seed=0)


@pytest.fixture(scope="module")
def coco128_perturbed_metrics(coco128_gt, coco128_perturbed) -> dict:
    return {b: run_coco_eval(coco128_gt, coco128_perturbed, backend=b) for b in BACKENDS}


# ---------------------------------------------------------------- COCO metrics
@pytest.mark.parametrize("backend", BACKENDS)
def test_perfect_results_score_one_on_small_gt(backend):
    gt, _ = small_gt()
    metrics = evaluate_coco(gt, perfect_results(gt), backend=backend)
    for iou_type in ("segm", "bbox"):
        assert metrics[iou_type] == {k: 1.0 for k in COCO_KEYS}


@pytest.mark.parametrize("backend", BACKENDS)
def test_perfect_results_score_one_on_coco128(coco128_gt, backend):
    metrics = evaluate_coco(coco128_gt, perfect_results(coco128_gt), backend=backend)
    for iou_type in ("segm", "bbox"):
        assert metrics[iou_type] == {k: 1.0 for k in COCO_KEYS}


def test_backends_agree_on_perturbed_coco128(coco128_perturbed_metrics):
    ref = coco128_perturbed_metrics["pycocotools"].metrics
    fast = coco128_perturbed_metrics["faster"].metrics
    for iou_type in ("segm", "bbox"):
        assert set(ref[iou_type]) == set(COCO_KEYS)
        for key in COCO_KEYS:
            assert fast[iou_type][key] == pytest.approx(ref[iou_type][key], abs=1e-4), (iou_type, key)
        assert 0.05 < ref[iou_type]["AP"] < 0.95  # the perturbation really costs AP, but not all of it


def test_metrics_equal_pycocotools_stats(coco128_perturbed_metrics):
    """Reading the precision array gives exactly what COCOeval.summarize() computes."""
    outcome = coco128_perturbed_metrics["pycocotools"]
    for iou_type in ("segm", "bbox"):
        ours = outcome.metrics[iou_type]
        assert [ours[k] for k in COCO_KEYS] == pytest.approx(outcome.stats[iou_type][:6], abs=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_segm_area_comes_from_the_mask_not_the_bbox(backend):
    """A false positive with a small mask but an image-sized bbox is a *small* detection for mask AP.

    pycocotools' loadRes takes the area from the bbox when one is present; kept,
    it would put this false positive into the 'large' bin and lower APl.
    """
    gt, _ = small_gt()
    results = [dict(r, score=0.9) for r in perfect_results(gt)]
    fp = _rect(160, 200, 140, 150, 5, 15)  # 100 px, where no object of category 3 is
    results.append({"image_id": 1, "category_id": 3, "score": 0.95, "bbox": [0.0, 0.0, 200.0, 160.0],
                    "segmentation": encode_mask(fp)})
    metrics = evaluate_coco(gt, results, iou_types=("segm",), backend=backend)["segm"]
    assert metrics["APl"] == 1.0 and metrics["APm"] == 1.0
    assert metrics["APs"] < 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_results_give_zero(backend, tmp_path):
    gt, _ = small_gt()
    metrics = evaluate_coco(gt, [], backend=backend)
    for iou_type in ("segm", "bbox"):
        assert metrics[iou_type] == {k: 0.0 for k in COCO_KEYS}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text("[]")
    out = evaluate_files(tmp_path / "gt.json", tmp_path / "res.json", backend=backend,
                         out_path=tmp_path / "m" / "metrics.json")
    written = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert written["segm"]["AP"] == 0.0 and written == json.loads(json.dumps(out))
    assert written["backend"] == backend


def test_undefined_size_bin_is_none():
    gt, _ = small_gt()
    gt["annotations"] = [a for a in gt["annotations"] if a["area"] < 32 ** 2]  # only small objects left
    metrics = evaluate_coco(gt, perfect_results(gt), iou_types=("bbox",))["bbox"]
    assert metrics["APs"] == 1.0 and metrics["APm"] is None and metrics["APl"] is None


def test_evaluate_files_with_separate_segm_and_bbox_files(tmp_path):
    gt, _ = small_gt()
    perfect = perfect_results(gt)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "segm.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "bbox"} for r in perfect]))
    (tmp_path / "bbox.json").write_text(json.dumps([]))  # no boxes at all
    out = evaluate_files(tmp_path / "gt.json", {"segm": tmp_path / "segm.json", "bbox": tmp_path / "bbox.json"},
                         out_path=tmp_path / "metrics.json", voc=True)
    assert out["segm"]["AP"] == 1.0 and out["bbox"]["AP"] == 0.0
    assert out["voc"] == {"AP": 1.0, "AP25": 1.0, "AP50": 1.0, "AP70": 1.0, "AP75": 1.0}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_summary_keeps_library_text_and_silences_stdout(capsys):
    gt, _ = small_gt()
    outcome = run_coco_eval(gt, perfect_results(gt), iou_types=("segm",), backend="faster")
    assert capsys.readouterr().out == ""
    assert "Average Precision" in outcome.summary and "AP=1.0000" in outcome.summary


def test_missing_iscrowd_and_area_are_filled_like_the_loader():
    gt, _ = small_gt()
    expected = evaluate_coco(gt, perturbed_results(gt, seed=1), iou_types=("segm",))
    trimmed = json.loads(json.dumps(gt))
    for ann in trimmed["annotations"]:
        ann.pop("area")
        if not ann["iscrowd"]:
            ann.pop("iscrowd")
    assert evaluate_coco(trimmed, perturbed_results(gt, seed=1), iou_types=("segm",)) == expected


# ---------------------------------------------------------------- VOC thresholds
def test_voc_thresholds_are_ordered_and_consistent(coco128_gt, coco128_perturbed, coco128_perturbed_metrics):
    voc = evaluate_voc(coco128_gt, coco128_perturbed, backend="faster")
    assert set(voc) == {"AP", "AP25", "AP50", "AP70", "AP75"}
    assert voc["AP25"] >= voc["AP50"] >= voc["AP70"] >= voc["AP75"]
    assert voc["AP25"] > voc["AP75"]
    coco = coco128_perturbed_metrics["faster"].metrics["segm"]
    # adding 0.25 to the thresholds changes nothing at the others
    assert voc["AP"] == pytest.approx(coco["AP"], abs=1e-12)
    assert voc["AP50"] == pytest.approx(coco["AP50"], abs=1e-12)
    assert voc["AP75"] == pytest.approx(coco["AP75"], abs=1e-12)


def test_custom_thresholds_without_the_coco_range():
    gt, _ = small_gt()
    metrics = evaluate_coco(gt, perfect_results(gt), iou_types=("bbox",), iou_thrs=[0.25, 0.5, 0.7, 0.75])
    assert metrics["bbox"] == {"AP25": 1.0, "AP50": 1.0, "AP70": 1.0, "AP75": 1.0}


def test_voc_backends_agree():
    gt, _ = small_gt()
    results = perturbed_results(gt, seed=3)
    a = evaluate_voc(gt, results, backend="pycocotools")
    b = evaluate_voc(gt, results, backend="faster")
    assert a == pytest.approx(b, abs=1e-4)


# ---------------------------------------------------------------- results checks
def _good_record() -> dict:
    return {"image_id": 2, "category_id": 7, "score": 0.9, "bbox": [1.0, 2.0, 3.0, 4.0],
            "segmentation": encode_mask(_rect(60, 80, 1, 5, 1, 5))}


BAD_RECORDS = [
    ("missing score", lambda r: r.pop("score"), "missing key(s) score"),
    ("unknown image", lambda r: r.update(image_id=99), "image_id 99"),
    ("unknown category", lambda r: r.update(category_id=1), "category_id 1"),
    ("bbox length", lambda r: r.update(bbox=[1, 2, 3]), "4 numbers"),
    ("bbox nan", lambda r: r.update(bbox=[1, 2, float("nan"), 4]), "non-finite"),
    ("bbox negative", lambda r: r.update(bbox=[1, 2, -3, 4]), "negative width"),
    ("score nan", lambda r: r.update(score=float("inf")), "not a finite number"),
    ("score text", lambda r: r.update(score="0.5"), "not a finite number"),
    ("rle size", lambda r: r["segmentation"].update(size=[80, 60]), "differs from the image"),
    ("rle counts type", lambda r: r["segmentation"].update(counts=12), "string or a list"),
    ("rle counts text", lambda r: r["segmentation"].update(counts="not rle!"), "compressed RLE counts string is corrupt"),
    ("rle counts sum", lambda r: r["segmentation"].update(counts=[10, 5]), "cover 15 pixels"),
    ("polygon", lambda r: r.update(segmentation=[[1, 1, 5, 1, 5, 5]]), "polygon"),
]


@pytest.mark.parametrize("name,mutate,expected", BAD_RECORDS, ids=[b[0] for b in BAD_RECORDS])
def test_check_results_rejects_bad_records(name, mutate, expected):
    gt, _ = small_gt()
    good, bad = _good_record(), _good_record()
    mutate(bad)
    check_results([good], gt, "runs/x/segm.json")
    with pytest.raises(InputError) as info:
        check_results([good, bad], gt, "runs/x/segm.json")
    text = str(info.value)
    assert text.startswith("runs/x/segm.json: record 1 (image_id ")
    assert expected in text


def test_check_results_rejects_non_lists_and_non_objects():
    gt, _ = small_gt()
    with pytest.raises(InputError, match="ground-truth file"):
        check_results(gt, gt, "res.json")
    with pytest.raises(InputError, match="res.json: record 0: record is a list"):
        check_results([[1, 2]], gt, "res.json")
    with pytest.raises(InputError, match="missing key"):
        check_results([{k: v for k, v in _good_record().items() if k != "segmentation"}], gt, "r.json", "segm")


def test_all_counts_encodings_score_the_same():
    gt, _ = small_gt()
    base = perfect_results(gt)
    variants = []
    for kind in ("bytes", "repr", "list"):
        recs = json.loads(json.dumps(base))
        for r in recs:
            counts = r["segmentation"]["counts"]
            if kind == "bytes":
                r["segmentation"]["counts"] = counts.encode()
            elif kind == "repr":
                r["segmentation"]["counts"] = str(counts.encode())  # what json.dump(default=str) leaves
            else:
                h, w = r["segmentation"]["size"]
                flat = mask_utils.decode({"size": [h, w], "counts": counts.encode()}).flatten(order="F")
                bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
                runs = np.diff(bounds).tolist()  # uncompressed RLE starts with a run of zeros
                r["segmentation"]["counts"] = ([0] + runs) if flat[0] == 1 else runs
        variants.append(recs)
    for recs in variants:
        assert evaluate_coco(gt, recs, iou_types=("segm",))["segm"]["AP"] == 1.0


def test_bad_files_raise_input_error(tmp_path):
    gt, _ = small_gt()
    with pytest.raises(InputError, match="not found"):
        evaluate_coco(tmp_path / "nope.json", [])
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(InputError, match="not valid JSON"):
        evaluate_coco(gt, tmp_path / "broken.json")
    bad_gt = json.loads(json.dumps(gt))
    del bad_gt["annotations"][0]["bbox"]
    with pytest.raises(InputError, match=r"annotations\[0\] \(id 1\): annotation lacks bbox"):
        evaluate_coco(bad_gt, [])
    with pytest.raises(InputError, match="backend"):
        evaluate_coco(gt, [], backend="magic")


# ---------------------------------------------------------------- predictions -> results
def test_half_resolution_mask_maps_back_to_the_original_box():
    prob = torch.zeros(1, 30, 40)
    prob[0, 5:15, 10:20] = 0.9  # box x [10, 20), y [5, 15) at half resolution
    pred = {"boxes": torch.tensor([[10.0, 5.0, 20.0, 15.0]]), "scores": torch.tensor([0.8]),
            "labels": torch.tensor([1]), "masks": prob}
    segm, bbox = predictions_to_coco([pred], [42], [(60, 80)], [(30, 40)], {0: 3, 1: 7})
    assert bbox == [{"image_id": 42, "category_id": 7, "bbox": [20.0, 10.0, 20.0, 20.0],
                     "score": pytest.approx(0.8)}]
    rle = segm[0]["segmentation"]
    assert rle["size"] == [60, 80] and isinstance(rle["counts"], str)
    assert mask_utils.toBbox({"size": rle["size"], "counts": rle["counts"].encode()}).tolist() == [20, 10, 20, 20]
    assert mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode()}) == 400


def test_padding_is_cropped_and_boxes_are_clipped():
    prob = torch.zeros(1, 32, 48)  # padded batch size; the image itself is 30 x 40
    prob[0, :, 38:] = 1.0  # foreground partly in the padding
    pred = {"boxes": torch.tensor([[38.0, 0.0, 47.0, 31.0]]), "scores": torch.tensor([0.5]),
            "labels": torch.tensor([0]), "masks": prob}
    segm, bbox = predictions_to_coco([pred], [1], [(60, 80)], [(30, 40)], {0: 3})
    assert bbox[0]["bbox"] == [76.0, 0.0, 4.0, 60.0]
    rle = segm[0]["segmentation"]
    assert mask_utils.toBbox({"size": rle["size"], "counts": rle["counts"].encode()}).tolist() == [76, 0, 4, 60]


def test_predictions_of_ground_truth_score_one():
    gt, masks = small_gt()
    label_of = {3: 0, 7: 1}
    preds, ids, sizes = [], [], []
    for img in gt["images"]:
        anns = [a for a in gt["annotations"] if a["image_id"] == img["id"] and not a["iscrowd"]]
        h, w = img["height"], img["width"]
        m = []
        for a in anns:
            seg = a["segmentation"]
            rle = (mask_utils.merge(mask_utils.frPyObjects(seg, h, w)) if isinstance(seg, list)
                   else {"size": seg["size"], "counts": seg["counts"].encode()})
            m.append(mask_utils.decode(rle).astype(np.float32))
        boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns]
        preds.append({"boxes": torch.tensor(boxes), "scores": torch.linspace(1.0, 0.5, len(anns)),
                      "labels": torch.tensor([label_of[a["category_id"]] for a in anns]),
                      "masks": torch.from_numpy(np.stack(m))})
        ids.append(img["id"])
        sizes.append((h, w))
    segm, bbox = predictions_to_coco(preds, ids, sizes, sizes, {0: 3, 1: 7})
    metrics = evaluate_coco(gt, {"segm": segm, "bbox": bbox})
    assert metrics["segm"]["AP"] == 1.0 and metrics["bbox"]["AP"] == 1.0


def test_unknown_label_is_an_input_error():
    pred = {"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.tensor([5]),
            "masks": torch.zeros(1, 10, 10)}
    with pytest.raises(InputError, match="label 5"):
        predictions_to_coco([pred], [1], [(10, 10)], [(10, 10)], {0: 3})
