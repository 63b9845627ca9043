"""The one input gate (sim_core.data.validate), entry by entry, and every kind of bad input it refuses.

Every row that concerns a dataset or results json exits 2 with one line on
stderr naming the file, the record and the problem, and writes nothing. The
RLE whose runs overflow the image hangs pycocotools forever, so that row runs
the real command in a subprocess with a timeout. Also here: the gate's
vectorised RLE decoder against the reference decoder and pycocotools, and the
missing-companion-option combinations of every verb.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycocotools import mask as mask_utils

from sim_core.cli import main
from sim_core.data.validate import check_gt, rle_counts, rle_string_problems
from sim_core.errors import InputError
from sim_core.evaluation.results import encode_mask

REPO = Path(__file__).resolve().parents[1]


def encode_counts(counts: list[int]) -> str:
    """COCO's compressed RLE string for any run lengths (pycocotools' ``rleToString``), valid or not."""
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if c & 0x10 else (x != 0)
            out.append(chr((c | 0x20 if more else c) + 48))
    return "".join(out)


def one_error_line(capsys, argv: list[str], *needles: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _result(tiny, **changes) -> dict:
    rec = {"image_id": 1, "category_id": 7, "score": 0.9, "bbox": [20.0, 10.0, 16.0, 15.0],
           "segmentation": encode_mask(tiny.masks[102])}
    rec.update(changes)
    return rec


OVERFLOW = {"size": [30, 40], "counts": encode_counts([5, 2**31 - 10, 7])}  # runs far past 30 x 40
ZERO_PIXELS = {"size": [30, 40], "counts": encode_counts([0])}


def test_overflowing_rle_is_a_valid_pycocotools_string():
    """The crafted string decodes (in the reference decoder too) to runs covering 2^31 pixels."""
    assert rle_counts(OVERFLOW["counts"]) == [5, 2**31 - 10, 7]
    assert sum(rle_counts(OVERFLOW["counts"])) > 30 * 40


def test_evaluate_overflowing_rle_exits_2_without_hanging(tiny_coco, tmp_path):
    """Table row 1: pycocotools never returns on this record; the gate stops it first."""
    results = tmp_path / "results.json"
    results.write_text(json.dumps([_result(tiny_coco, segmentation=OVERFLOW)]))
    out = tmp_path / "metrics.json"
    proc = subprocess.run([sys.executable, "-m", "sim_core", "evaluate", "--gt", str(tiny_coco.ann_path),
                           "--results", str(results), "--out", str(out)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "results.json: record 0 (image_id 1): RLE counts cover 2147483650 pixels, the image has 1200" in lines[0]
    assert not out.exists()


# Table rows on data and results jsons, all through the real CLI (in-process).
def _gt_odd_polygon(gt):
    gt["annotations"][0]["segmentation"] = [[4, 4, 14, 4, 14, 12, 4]]


def _gt_text_coordinate(gt):
    gt["annotations"][0]["segmentation"] = [[4, 4, "14", 4, 14, 12, 4, 12]]


def _gt_zero_height(gt):
    gt["images"][1]["height"] = 0


TABLE = [
    # (row, gt edit, results records, iou, needles)
    ("rle runs add up to 0 pixels", None, lambda t: [_result(t, segmentation=ZERO_PIXELS)], "segm,bbox",
     ["results.json", "record 0 (image_id 1)", "cover 0 pixels, the image has 1200"]),
    ("odd-length gt polygon", _gt_odd_polygon, None, "segm,bbox",
     ["gt.json", "annotations[0] (id 101)", "polygon 0 needs an even number"]),
    ("text coordinate in gt polygon", _gt_text_coordinate, None, "segm,bbox",
     ["gt.json", "annotations[0] (id 101)", "polygon 0 must be a flat list of finite numbers"]),
    ("gt image height 0", _gt_zero_height, None, "bbox",
     ["gt.json", "images[1] (id 2", "'height' must be a positive integer, got 0"]),
]


@pytest.mark.parametrize("row,edit,records,iou,needles", TABLE, ids=[t[0] for t in TABLE])
def test_table_rows_exit_2_with_one_line(capsys, tiny_coco, tmp_path, row, edit, records, iou, needles):
    gt = tiny_coco.data()
    if edit:
        edit(gt)
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    results = tmp_path / "results.json"
    results.write_text(json.dumps(records(tiny_coco) if records else [_result(tiny_coco)]))
    out = tmp_path / "metrics.json"
    one_error_line(capsys, ["evaluate", "--gt", str(gt_path), "--results", str(results), "--iou", iou,
                            "--out", str(out)], *needles)
    assert not out.exists()


@pytest.mark.parametrize("segmentation", [OVERFLOW, ZERO_PIXELS], ids=["overflow", "zero pixels"])
def test_mmdet_import_of_bad_rle_exits_2_and_writes_nothing(capsys, tiny_coco, tmp_path, segmentation):
    """Table row 2: the import used to write a box 143,165,577 px wide for a 40 x 30 image."""
    upstream = tmp_path / "upstream.segm.json"
    upstream.write_text(json.dumps([_result(tiny_coco, segmentation=segmentation)]))
    out = tmp_path / "imported" / "segm.json"
    one_error_line(capsys, ["import", "--from", "mmdet", "--file", str(upstream), "--gt", str(tiny_coco.ann_path),
                            "--out", str(out)], "upstream.segm.json", "record 0 (image_id 1)", "RLE counts cover")
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_prepare_rejects_overflowing_gt_rle(capsys, tiny_coco, tmp_path):
    gt = tiny_coco.data()
    gt["annotations"][1]["segmentation"] = OVERFLOW  # annotation 102 on image 1 (40 x 30)
    bad = tiny_coco.write(gt, "bad_train.json")
    out = tmp_path / "prepared"
    one_error_line(capsys, ["prepare", "custom", "--images", str(tiny_coco.image_dir), "--train-ann", str(bad),
                            "--val-ann", str(tiny_coco.ann_path), "--out", str(out)],
                   "bad_train.json", "annotations[1] (id 102)", "RLE counts cover 2147483650 pixels")
    assert not out.exists()


def test_gate_repairs_the_same_way_for_evaluation(tiny_coco):
    """A degenerate polygon part is dropped; for evaluation the object stays (with an empty mask)."""
    gt = tiny_coco.data()
    gt["annotations"][0]["segmentation"] = [[1, 1, 2, 2]]
    checked = check_gt(gt, "gt.json", purpose="evaluate")
    assert len(checked.annotations) == len(gt["annotations"])
    assert checked.annotations[0]["segmentation"] == {"size": [30, 40], "counts": [1200]}
    assert ("degenerate_polygon_part", 1, 101) in checked.events
    assert len(check_gt(gt, "gt.json", purpose="train").annotations) == len(gt["annotations"]) - 1


def test_report_reads_gt_through_the_gate(tmp_path):
    from experiments.report import _checked_segm
    from sim_core.data.validate import load_gt

    gt = {"images": [{"id": 1, "file_name": "a.png", "height": 0, "width": 4}], "annotations": [],
          "categories": [{"id": 1, "name": "a"}]}
    path = tmp_path / "val.json"
    path.write_text(json.dumps(gt))
    with pytest.raises(InputError, match=r"val.json: images\[0\] \(id 1, 'a.png'\): 'height' must be a positive"):
        load_gt(path)
    assert callable(_checked_segm)


# ------------------------------------------------------------------ the vectorised RLE decoder
@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.integers(0, 60), min_size=1, max_size=30))
def test_batch_decoder_agrees_with_reference_and_pycocotools(runs):
    text = encode_counts(runs)
    assert rle_counts(text) == runs
    total = sum(runs)
    assert rle_string_problems([text, text], [total, total]) is None
    wrong = rle_string_problems(["0", text], [1, total + 1])
    assert wrong == (0, "RLE counts cover 0 pixels, the image has 1")


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.lists(st.text(alphabet=st.characters(min_codepoint=40, max_codepoint=115), max_size=12), min_size=1,
                max_size=4))
def test_batch_decoder_agrees_on_arbitrary_strings(texts):
    """Corrupt or not, the batch verdict on each string is the reference decoder's."""
    for i, text in enumerate(texts):
        ref = rle_counts(text)
        total = sum(ref) if ref else 1
        verdict = rle_string_problems([text], [total])
        assert (verdict is None) == (ref is not None and sum(ref) == total), (text, ref, verdict)
    refs = [rle_counts(t) for t in texts]
    totals = [sum(r) if r else 1 for r in refs]
    batch = rle_string_problems(texts, totals)
    first_bad = next((i for i, r in enumerate(refs) if r is None or sum(r) != totals[i]), None)
    assert (batch[0] if batch else None) == first_bad


def test_batch_decoder_matches_pycocotools_on_masks():
    rng = np.random.default_rng(0)
    texts, totals = [], []
    for trial in range(40):
        h, w = (int(v) for v in rng.integers(1, 50, 2))
        mask = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        text = mask_utils.encode(np.asfortranarray(mask))["counts"].decode()
        assert sum(rle_counts(text)) == h * w
        texts.append(text)
        totals.append(h * w)
    assert rle_string_problems(texts, totals) is None
    totals[17] += 1
    assert rle_string_problems(texts, totals)[0] == 17


def test_decoder_is_linear_on_a_long_string():
    """Two million characters of one continuation-heavy string: well under a second, no big integers."""
    import time

    text = "o" * 2_000_000 + "0"
    start = time.perf_counter()
    assert rle_string_problems([text], [1200]) == (0, "compressed RLE counts string is corrupt")
    assert rle_counts(text) is None
    assert time.perf_counter() - start < 5


# ------------------------------------------------------------------ companion options of every verb
def _combos(tiny, tmp_path) -> list[tuple[list[str], str]]:
    gt, res = str(tiny.ann_path), str(tmp_path / "r.json")
    return [
        (["prepare", "voc", "--voc", str(tmp_path), "--train-json", gt, "--out", str(tmp_path / "o")],
         "--train-json and --val-json go together"),
        (["prepare", "voc", "--voc", str(tmp_path), "--val-json", gt, "--out", str(tmp_path / "o")],
         "--train-json and --val-json go together"),
        (["prepare", "voc", "--voc", str(tmp_path), "--sbd", str(tmp_path), "--train-json", gt, "--val-json", gt,
          "--out", str(tmp_path / "o")], "not both"),
        (["prepare", "custom", "--images", str(tiny.image_dir), "--train-ann", gt, "--out", str(tmp_path / "o")],
         "--val-ann"),
        (["evaluate", "--gt", gt], "--gt without --results"),
        (["evaluate", "--results", res], "--results without --gt"),
        (["evaluate", "--run", "x", "--gt", gt, "--results", res], "--gt belongs to --gt/--results mode"),
        (["evaluate", "--run", "x", "--iou", "bbox"], "--iou belongs to --gt/--results mode"),
        (["evaluate", "--gt", gt, "--results", res, "--run-dir", str(tmp_path)], "--run-dir applies to --run"),
        (["evaluate", "--gt", gt, "--results", res, "--set", "train.lr=1"], "--set applies to --run"),
        (["import", "--from", "mmdet", "--file", res, "--out", str(tmp_path / "o.json")], "--gt"),
        (["import", "--from", "mmdet", "--gt", gt, "--out", str(tmp_path / "o.json")], "--file"),
        (["train"], "--run"),
    ]


def test_missing_companion_options_are_one_line(capsys, tiny_coco, tmp_path):
    (tmp_path / "r.json").write_text("[]")
    for argv, needle in _combos(tiny_coco, tmp_path):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own usage errors
            code = exc.code
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, (argv, err)
        assert needle in lines[0], (argv, lines[0])
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.json").exists()
