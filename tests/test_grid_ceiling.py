"""The grid-limited oracle: exact at stride 1, monotone in the stride, a known cell mean."""
from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from sim_core.errors import InputError
from sim_core.evaluation.grid_ceiling import grid_ceiling, grid_limited_mask


def _ring(size: int, outer: float, inner: float, cy: float, cx: float) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - cy, xx - cx)
    return (r <= outer) & (r >= inner)


def _gt_file(tmp_path, masks: list[np.ndarray]):
    size = masks[0].shape[0]
    anns = []
    for i, m in enumerate(masks):
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        anns.append({"id": i + 1, "image_id": 1, "category_id": 1, "segmentation": rle, "iscrowd": 0,
                     "area": float(m.sum()), "bbox": [float(v) for v in mask_utils.toBbox(rle)]})
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": [{"id": 1, "width": size, "height": size, "file_name": "a.png"}],
                                "annotations": anns, "categories": [{"id": 1, "name": "ring"}]}))
    return path


def test_grid_limited_mask_by_hand():
    mask = np.zeros((8, 8), bool)
    mask[:, :4] = True  # a straight edge on a cell border survives a stride-4 grid exactly
    assert np.array_equal(grid_limited_mask(mask, 4), mask)
    corner = np.zeros((8, 8), bool)
    corner[:4, :4] = True  # a cell-aligned corner is rounded: (3, 3) reads 0.625**2 < 0.5
    limited = grid_limited_mask(corner, 4)
    assert limited[2, 3] and limited[3, 2] and not limited[3, 3]
    assert np.array_equal(grid_limited_mask(mask, 1), mask)
    speck = np.zeros((8, 8), bool)
    speck[1, 1] = True  # 1/16 of a cell: vanishes
    assert not grid_limited_mask(speck, 4).any()
    with pytest.raises(ValueError):
        grid_limited_mask(mask, 0)


def test_ceiling_is_one_at_stride_one_and_falls_with_coarser_grids(tmp_path):
    masks = [_ring(64, 12, 6, 20, 20), _ring(64, 9, 5, 45, 44)]
    ceiling = grid_ceiling(_gt_file(tmp_path, masks), strides=(1, 4, 8))
    assert ceiling[1] == pytest.approx(1.0)
    assert ceiling[8] < ceiling[4] <= 1.0
    assert ceiling[8] < 0.9  # thin rings do not survive an 8-pixel grid


def test_missing_file_is_input_error(tmp_path):
    with pytest.raises(InputError, match="ground truth"):
        grid_ceiling(tmp_path / "none.json")
