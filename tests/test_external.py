"""Importing upstream results (AdelaiDet, mmdetection 2.x/3.x, BoxLevelSet) into simbench results files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from baselines.external import default_bbox_path, import_results, resolve_category_ids
from sim_core.errors import InputError
from sim_core.evaluation.coco_eval import evaluate_coco
from sim_core.evaluation.results import encode_mask

CATS = [1, 5, 9]  # non-contiguous, as in COCO
SIZES = {1: (50, 60), 2: (40, 40)}
OBJECTS = [  # (image, category, y0, y1, x0, x1)
    (1, 1, 2, 12, 3, 20), (1, 5, 20, 45, 10, 50), (1, 9, 5, 30, 30, 58),
    (2, 5, 0, 10, 0, 10), (2, 9, 15, 38, 12, 39),
]


def _mask(image_id, y0, y1, x0, x1):
    h, w = SIZES[image_id]
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


@pytest.fixture
def gt_path(tmp_path) -> Path:
    anns = []
    for i, (img, cat, y0, y1, x0, x1) in enumerate(OBJECTS, start=1):
        anns.append({"id": i, "image_id": img, "category_id": cat, "iscrowd": 0,
                     "segmentation": encode_mask(_mask(img, y0, y1, x0, x1)),
                     "area": float((y1 - y0) * (x1 - x0)), "bbox": [x0, y0, x1 - x0, y1 - y0]})
    gt = {"images": [{"id": k, "height": h, "width": w, "file_name": f"{k}.png"} for k, (h, w) in SIZES.items()],
          "categories": [{"id": c, "name": f"c{c}"} for c in CATS], "annotations": anns}
    path = tmp_path / "val.json"
    path.write_text(json.dumps(gt))
    return path


def upstream_records(id_of=lambda c: c, with_bbox=True, counts="str"):
    """Perfect detections in the shape upstream tools write them."""
    out = []
    for img, cat, y0, y1, x0, x1 in OBJECTS:
        rle = encode_mask(_mask(img, y0, y1, x0, x1))
        if counts == "bytes-text":  # json.dump(..., default=str) of a bytes object
            rle["counts"] = str(rle["counts"].encode())
        elif counts == "list":
            flat = _mask(img, y0, y1, x0, x1).flatten(order="F").astype(np.uint8)
            bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
            runs = np.diff(bounds).tolist()
            rle["counts"] = [0] + runs if flat[0] else runs
        rec = {"image_id": img, "category_id": id_of(cat), "segmentation": rle, "score": 0.9}
        if with_bbox:
            rec["bbox"] = [x0, y0, x1 - x0, y1 - y0]
        out.append(rec)
    return out


def _write(path: Path, records) -> Path:
    path.write_text(json.dumps(records))
    return path


def _scores(gt_path, segm, bbox):
    gt = json.loads(Path(gt_path).read_text())
    return evaluate_coco(gt, {"segm": segm, "bbox": bbox}, backend="faster")


def test_adelaidet_original_ids(tmp_path, gt_path):
    (tmp_path / "inference").mkdir()
    src = _write(tmp_path / "inference" / "coco_instances_results.json", upstream_records())
    out = tmp_path / "runs" / "boxinst_upstream" / "segm.json"
    summary = import_results("adelaidet", [src], gt_path, out)
    assert summary["category_ids"] == "original" and summary["bbox_source"] == "file"
    assert summary["bbox"] == str(out.with_name("bbox.json")) and summary["num_segm"] == len(OBJECTS)
    segm = json.loads(out.read_text())
    bbox = json.loads(out.with_name("bbox.json").read_text())
    assert all(isinstance(r["segmentation"]["counts"], str) for r in segm)
    metrics = _scores(gt_path, segm, bbox)
    assert metrics["segm"]["AP"] == 1.0 and metrics["bbox"]["AP"] == 1.0
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("scheme,offset", [("contiguous0", 0), ("contiguous1", 1)])
def test_contiguous_ids_are_mapped_to_gt_ids(tmp_path, gt_path, scheme, offset):
    src = _write(tmp_path / "coco_instances_results.json",
                 upstream_records(id_of=lambda c: CATS.index(c) + offset))
    out = tmp_path / "segm.json"
    summary = import_results("adelaidet", [src], gt_path, out)
    assert summary["category_ids"] == scheme
    segm = json.loads(out.read_text())
    assert [r["category_id"] for r in segm] == [o[1] for o in OBJECTS]
    assert _scores(gt_path, segm, json.loads((tmp_path / "bbox.json").read_text()))["segm"]["AP"] == 1.0


@pytest.mark.parametrize("counts", ["str", "bytes-text", "list"])
def test_mmdet_segm_and_bbox_files(tmp_path, gt_path, counts):
    segm_src = _write(tmp_path / "results.segm.json", upstream_records(counts=counts))
    bbox_src = _write(tmp_path / "results.bbox.json",
                      [{k: v for k, v in r.items() if k != "segmentation"} for r in upstream_records()])
    out = tmp_path / "imported" / "results.segm.json"
    summary = import_results("mmdet", [bbox_src, segm_src], gt_path, out)
    assert summary["bbox"] == str(tmp_path / "imported" / "results.bbox.json")
    assert summary["bbox_source"] == "file"
    segm = json.loads(out.read_text())
    reference = upstream_records()
    assert [r["segmentation"] for r in segm] == [r["segmentation"] for r in reference]
    metrics = _scores(gt_path, segm, json.loads(Path(summary["bbox"]).read_text()))
    assert metrics["segm"]["AP"] == 1.0 and metrics["bbox"]["AP"] == 1.0


def test_boxlevelset_segm_only_derives_tight_boxes(tmp_path, gt_path):
    src = _write(tmp_path / "voc_r50.segm.json", upstream_records(with_bbox=False))
    out = tmp_path / "segm.json"
    summary = import_results("boxlevelset", [src], gt_path, out)
    assert summary["bbox_source"] == "mask"
    bbox = json.loads((tmp_path / "bbox.json").read_text())
    assert [r["bbox"] for r in bbox] == [[x0, y0, x1 - x0, y1 - y0] for _, _, y0, y1, x0, x1 in OBJECTS]
    assert [r["score"] for r in bbox] == [0.9] * len(OBJECTS)
    assert _scores(gt_path, json.loads(out.read_text()), bbox)["bbox"]["AP"] == 1.0


def test_files_are_classified_by_content_when_names_do_not_say(tmp_path, gt_path):
    a = _write(tmp_path / "a.json", upstream_records())
    b = _write(tmp_path / "b.json", [{k: v for k, v in r.items() if k != "segmentation"} for r in upstream_records()])
    summary = import_results("mmdet", [b, a], gt_path, tmp_path / "out.json")
    assert summary["bbox"] == str(tmp_path / "out.bbox.json") and summary["num_bbox"] == len(OBJECTS)


def test_pickle_is_refused_without_reading(tmp_path, gt_path):
    evil = tmp_path / "results.pkl"
    evil.write_bytes(b"not even read")
    with pytest.raises(InputError, match="--format-only"):
        import_results("mmdet", [evil], gt_path, tmp_path / "segm.json")
    with pytest.raises(InputError, match="pickled results are not loaded"):
        import_results("boxlevelset", [evil], gt_path, tmp_path / "segm.json")
    assert not (tmp_path / "segm.json").exists()


def test_ambiguous_ids_stop_the_import_unless_told(tmp_path, gt_path):
    gt = json.loads(gt_path.read_text())
    for c in gt["categories"]:
        c["id"] = {1: 1, 5: 2, 9: 3}[c["id"]]
    for a in gt["annotations"]:
        a["category_id"] = {1: 1, 5: 2, 9: 3}[a["category_id"]]
    gt_path.write_text(json.dumps(gt))
    records = [r for r in upstream_records() if r["category_id"] in (1, 5)]
    for r in records:
        r["category_id"] = {1: 1, 5: 2}[r["category_id"]]  # ids {1, 2}: original ids or 0-based indices?
    src = _write(tmp_path / "coco_instances_results.json", records)
    with pytest.raises(InputError, match="fit several rules"):
        import_results("adelaidet", [src], gt_path, tmp_path / "segm.json")
    summary = import_results("adelaidet", [src], gt_path, tmp_path / "segm.json", category_ids="contiguous0")
    assert summary["category_ids"] == "contiguous0"
    assert {r["category_id"] for r in json.loads((tmp_path / "segm.json").read_text())} == {2, 3}


def test_resolve_rules():
    assert resolve_category_ids({1, 2, 3}, [1, 2, 3])[0] == "original"  # contiguous1 is the same mapping
    assert resolve_category_ids({0, 2}, [1, 2, 3]) == ("contiguous0", {0: 1, 1: 2, 2: 3})
    assert resolve_category_ids(set(), [4, 8])[0] == "original"
    with pytest.raises(InputError, match=r"category ids \[0, 90\] are neither"):
        resolve_category_ids({0, 90}, [1, 5, 9])
    with pytest.raises(InputError, match="do not fit category_ids='original'"):
        resolve_category_ids({0}, [1, 5, 9], "original")


def test_bad_records_name_file_and_record(tmp_path, gt_path):
    records = upstream_records()
    records[3]["image_id"] = 77
    src = _write(tmp_path / "coco_instances_results.json", records)
    with pytest.raises(InputError) as info:
        import_results("adelaidet", [src], gt_path, tmp_path / "segm.json")
    assert str(info.value).startswith(f"{src}: record 3 (image_id 77): image_id 77")
    with pytest.raises(InputError, match="expected a JSON list"):
        import_results("mmdet", [_write(tmp_path / "x.segm.json", {"annotations": []})], gt_path, tmp_path / "o.json")
    with pytest.raises(InputError, match="MASK_ON"):
        import_results("adelaidet", [_write(tmp_path / "boxes.json", [{k: v for k, v in r.items() if k != "segmentation"}
                                                                     for r in upstream_records()])],
                       gt_path, tmp_path / "o.json")
    with pytest.raises(InputError, match="unknown upstream format"):
        import_results("yolo", [src], gt_path, tmp_path / "o.json")


def test_empty_upstream_file_gives_empty_results(tmp_path, gt_path):
    src = _write(tmp_path / "coco_instances_results.json", [])
    summary = import_results("adelaidet", [src], gt_path, tmp_path / "segm.json")
    assert summary["num_segm"] == 0 and json.loads((tmp_path / "bbox.json").read_text()) == []


def test_default_bbox_path():
    assert default_bbox_path(Path("runs/a/segm.json")) == Path("runs/a/bbox.json")
    assert default_bbox_path(Path("x/results.segm.json")) == Path("x/results.bbox.json")
    assert default_bbox_path(Path("x/boxinst.json")) == Path("x/boxinst.bbox.json")


def test_mask_box_matches_pycocotools(tmp_path, gt_path):
    """The derived box is pycocotools' toBbox of the mask (pixel-edge coordinates)."""
    src = _write(tmp_path / "r.segm.json", upstream_records(with_bbox=False, counts="list"))
    import_results("boxlevelset", [src], gt_path, tmp_path / "segm.json")
    segm = json.loads((tmp_path / "segm.json").read_text())
    bbox = json.loads((tmp_path / "bbox.json").read_text())
    for s, b in zip(segm, bbox):
        rle = {"size": s["segmentation"]["size"], "counts": s["segmentation"]["counts"].encode()}
        assert b["bbox"] == mask_utils.toBbox(rle).tolist()
