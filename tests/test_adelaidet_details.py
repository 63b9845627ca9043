"""AdelaiDet details: THRESH_WITH_CTR, the fixed pairwise warm-up, norm weight decay, import --category-ids."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from baselines.boxinst import BoxInstLoss, pairwise_warmup_weight
from baselines.external import import_results, parse_category_ids
from sim_core.engine.trainer import Trainer, norm_parameter_ids
from sim_core.errors import InputError
from sim_core.model.postprocess import select_detections
from test_external import _write, gt_path, upstream_records  # noqa: F401  (gt_path is a fixture)


# ------------------------------------------------------------------ THRESH_WITH_CTR
def _logit(p: float) -> float:
    return float(torch.logit(torch.tensor(p)))


def test_thresh_with_ctr_selects_on_cls_times_centerness():
    """A: cls 0.5, ctr 0.05 (product 0.025); B: cls 0.06, ctr 0.9 (0.054); C: cls 0.04, ctr 1.0.

    ``cls > 0.05`` keeps A and B; ``cls * ctr > 0.05`` (AdelaiDet's BoxInst configs) keeps only B.
    Either way the score is sqrt(cls * ctr).
    """
    cls = torch.tensor([[_logit(0.5)], [_logit(0.06)], [_logit(0.04)]])
    ctr = torch.tensor([_logit(0.05), _logit(0.9), _logit(0.999999)])
    locations = torch.tensor([[20.0, 20.0], [100.0, 100.0], [180.0, 180.0]])
    box_reg = torch.full((3, 4), 10.0)  # 20x20 boxes, far apart (no NMS suppression)
    levels = torch.zeros(3, dtype=torch.long)
    plain = select_detections(cls, box_reg, ctr, locations, levels, (256, 256), score_thresh=0.05)
    with_ctr = select_detections(cls, box_reg, ctr, locations, levels, (256, 256), score_thresh=0.05,
                                 thresh_with_ctr=True)
    assert sorted(plain["loc_inds"].tolist()) == [0, 1]
    assert with_ctr["loc_inds"].tolist() == [1]
    assert with_ctr["scores"][0] == pytest.approx((0.06 * 0.9) ** 0.5, rel=1e-4)
    by_loc = dict(zip(plain["loc_inds"].tolist(), plain["scores"].tolist()))
    assert by_loc[0] == pytest.approx((0.5 * 0.05) ** 0.5, rel=1e-4)


def test_condinst_predict_reads_thresh_with_ctr():
    from sim_core.model.condinst import DEMO_MODEL_CFG, CondInst

    torch.manual_seed(0)
    images = [torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)]
    counts = {}
    for flag in (False, True):
        torch.manual_seed(0)
        model = CondInst(3, {**DEMO_MODEL_CFG, "thresh_with_ctr": flag})
        counts[flag] = len(model.predict(images, score_thresh=0.005)[0]["scores"])
    assert counts[True] <= counts[False]


# ------------------------------------------------------------------ pairwise warm-up
def test_pairwise_warmup_iters_is_a_fixed_count():
    cfg = {"pairwise_weight": 1.0, "pairwise_warmup_frac": 0.5, "pairwise_warmup_iters": 10000}
    for max_iter in (90000, 270000):  # AdelaiDet: 10k for every schedule
        assert pairwise_warmup_weight(5000, max_iter, cfg) == pytest.approx(0.5)
        assert pairwise_warmup_weight(10000, max_iter, cfg) == pytest.approx(1.0)
    cfg["pairwise_warmup_iters"] = None  # the fraction
    assert pairwise_warmup_weight(25, 100, cfg) == pytest.approx(0.5)
    assert BoxInstLoss({"pairwise_warmup_iters": None}).cfg["pairwise_warmup_iters"] is None
    assert BoxInstLoss({"pairwise_warmup_iters": 10000}).cfg["pairwise_warmup_iters"] == 10000
    with pytest.raises(InputError, match="pairwise_warmup_iters must be a null or an int"):
        BoxInstLoss({"pairwise_warmup_iters": 0.5})
    with pytest.raises(InputError, match="pairwise_warmup_iters must be >= 0"):
        BoxInstLoss({"pairwise_warmup_iters": -1})


# ------------------------------------------------------------------ norm weight decay
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.ln = nn.LayerNorm(4)


def _groups(norm_weight_decay):
    model, loss = _Net(), nn.Sequential(nn.Linear(2, 2), nn.GroupNorm(1, 2))
    fake = SimpleNamespace(params={"model": {"backbone": "resnet_tiny"}}, model=model, mask_loss=loss,
                           cfg={"weight_decay": 0.1, "norm_weight_decay": norm_weight_decay})
    return Trainer._param_groups(fake), model, loss


def test_norm_weight_decay_groups():
    groups, model, loss = _groups(None)
    assert len(groups) == 1 and len(groups[0]["params"]) == 12  # everything decays with weight_decay
    groups, model, loss = _groups(0.0)
    norms = norm_parameter_ids(model, loss)
    assert len(norms) == 8  # weight + bias of bn, gn, ln and the loss's GroupNorm
    decay, normed = groups
    assert {id(p) for p in decay["params"]} == {id(model.conv.weight), id(model.conv.bias),
                                                id(loss[0].weight), id(loss[0].bias)}
    assert normed["weight_decay"] == 0.0 and {id(p) for p in normed["params"]} == norms


# ------------------------------------------------------------------ import --category-ids
def test_parse_category_ids():
    assert parse_category_ids("contiguous0") == "contiguous0"
    assert parse_category_ids("0:9, 1:1,2:5") == {0: 9, 1: 1, 2: 5}
    with pytest.raises(InputError, match="mapped twice"):
        parse_category_ids("0:1,0:5")
    with pytest.raises(InputError, match="expected one of auto"):
        parse_category_ids("zero-based")


def test_import_with_an_explicit_mapping(tmp_path, gt_path, capsys):  # noqa: F811
    from sim_core.cli import main

    own_order = {9: 0, 1: 1, 5: 2}  # the upstream's own label order
    src = _write(tmp_path / "coco_instances_results.json", upstream_records(id_of=lambda c: own_order[c]))
    mapping = tmp_path / "ids.json"
    mapping.write_text(json.dumps({"0": 9, "1": 1, "2": 5}))
    out = tmp_path / "segm.json"
    for spec in ("0:9,1:1,2:5", str(mapping)):
        assert main(["import", "--from", "adelaidet", "--file", str(src), "--gt", str(gt_path),
                     "--out", str(out), "--category-ids", spec]) == 0
        got = sorted(r["category_id"] for r in json.loads(out.read_text()))
        assert got == sorted(r["category_id"] for r in upstream_records())
    assert main(["import", "--from", "adelaidet", "--file", str(src), "--gt", str(gt_path),
                 "--out", str(out), "--category-ids", "0:9,1:1"]) == 2
    assert "[2] in the results are not in --category-ids" in capsys.readouterr().err
    with pytest.raises(InputError, match="not ground-truth category ids"):
        import_results("adelaidet", [src], gt_path, out, category_ids={0: 9, 1: 1, 2: 77})
