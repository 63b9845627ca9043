"""The shared detector: backbone, FPN, FCOS assignment and losses, dynamic mask head, inference."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet50

from baselines import build_mask_loss
from sim_core.errors import InputError
from sim_core.model.backbone import build_backbone
from sim_core.model.condinst import DEMO_MODEL_CFG, CondInst, DetectorOutputs, box_masks, gt_bitmasks
from sim_core.model.fcos import assign_targets, compute_locations, detection_losses
from sim_core.model.mask_head import MaskBranch, aligned_bilinear
from sim_core.model.neck import build_neck
from sim_core.model.postprocess import select_detections


def demo_model(num_classes: int = 3, seed: int = 0) -> CondInst:
    torch.manual_seed(seed)
    return CondInst(num_classes, DEMO_MODEL_CFG)


def two_box_batch(n: int = 2, size: int = 64) -> tuple[list[torch.Tensor], list[dict]]:
    g = torch.Generator().manual_seed(1)
    images, targets = [], []
    for _ in range(n):
        images.append(torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g))
        masks = torch.zeros(2, size, size, dtype=torch.uint8)
        masks[0, 8:30, 6:28] = 1
        masks[1, 30:60, 26:58] = 1
        targets.append({"boxes": torch.tensor([[6.0, 8.0, 28.0, 30.0], [26.0, 30.0, 58.0, 60.0]]),
                        "labels": torch.tensor([0, 2]), "masks": masks})
    return images, targets


# ------------------------------------------------------------------ upsampling
def test_aligned_bilinear_keeps_constants_and_cell_centres():
    x = torch.full((1, 2, 5, 7), 3.25)
    assert torch.allclose(aligned_bilinear(x, 4), torch.full((1, 2, 20, 28), 3.25))
    # Cell i of the input sits at output index factor*i + factor//2 (same pixel centre).
    y = torch.randn(1, 1, 6, 6)
    for factor in (2, 4):
        up = aligned_bilinear(y, factor)
        centres = up[:, :, factor // 2::factor, factor // 2::factor]
        assert torch.allclose(centres, y, atol=1e-6)


# ------------------------------------------------------------------ backbone / neck
def test_unknown_backbone_and_neck_are_input_errors():
    with pytest.raises(InputError, match="model.backbone"):
        build_backbone({"backbone": "vgg16"})
    with pytest.raises(InputError, match="model.neck"):
        build_neck({"neck": "pan"}, {"c3": 8, "c4": 8, "c5": 8})
    with pytest.raises(InputError, match="model.fpn_levels"):
        build_neck({"fpn_levels": [2, 3, 4]}, {"c3": 8, "c4": 8, "c5": 8})


def test_fpn_p3_to_p7_strides():
    neck = build_neck({"fpn_channels": 16, "fpn_levels": [3, 4, 5, 6, 7]}, {"c3": 8, "c4": 12, "c5": 20})
    feats = {"c3": torch.randn(1, 8, 16, 16), "c4": torch.randn(1, 12, 8, 8), "c5": torch.randn(1, 20, 4, 4)}
    outs = neck(feats)
    assert [tuple(o.shape[-2:]) for o in outs] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    assert all(o.shape[1] == 16 for o in outs)


def test_resnet50_strides_frozen_stages_and_weight_file_checks(tmp_path):
    torch.manual_seed(0)
    net = build_backbone({"backbone": "resnet50", "freeze_at": 2})
    out = net(torch.randn(1, 3, 64, 64))
    assert {k: tuple(v.shape[1:]) for k, v in out.items()} == {
        "c2": (256, 16, 16), "c3": (512, 8, 8), "c4": (1024, 4, 4), "c5": (2048, 2, 2)}
    assert net.out_channels == {"c2": 256, "c3": 512, "c4": 1024, "c5": 2048}
    assert not net.conv1.weight.requires_grad
    assert not any(p.requires_grad for p in net.layer1.parameters())
    assert all(p.requires_grad for p in net.layer2.parameters())

    # A torchvision-layout file (with BN buffers and fc) loads and is used.
    reference = resnet50(weights=None)
    with torch.no_grad():
        reference.layer3[0].conv1.weight.normal_()
    good = tmp_path / "r50.pth"
    torch.save(reference.state_dict(), good)
    loaded = build_backbone({"backbone": "resnet50", "pretrained": str(good)})
    assert torch.equal(loaded.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)

    bad = tmp_path / "wrong.pth"
    state = reference.state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(3, 3, 1, 1)
    del state["layer4.2.bn3.bias"]
    torch.save(state, bad)
    with pytest.raises(InputError, match="wrong.pth.*missing.*layer4.2.bn3.bias.*shape"):
        build_backbone({"backbone": "resnet50", "pretrained": str(bad)})
    with pytest.raises(InputError, match="does not exist"):
        build_backbone({"backbone": "resnet50", "pretrained": str(tmp_path / "nope.pth")})


# ------------------------------------------------------------------ FCOS assignment and losses
def _locations(size: int, strides: list[int]):
    locs, st, lv = [], [], []
    for i, s in enumerate(strides):
        loc = compute_locations(size // s, size // s, s)
        locs.append(loc)
        st.append(torch.full((len(loc),), s))
        lv.append(torch.full((len(loc),), i))
    return torch.cat(locs), torch.cat(st), torch.cat(lv)


def test_fcos_assignment_centre_sampling_level_and_smallest_box():
    locs, strides, levels = _locations(64, [8, 16, 32])
    box = torch.tensor([[8.0, 8.0, 40.0, 40.0]])  # 32 px, centre (24, 24)
    # Centre sampling (radius 1.5 -> 12 px at P3): only P3 cells at x, y in {20, 28} are strictly inside.
    a = assign_targets(locs, strides, levels, [box], [torch.tensor([1])], [32, 64], 1.5, num_classes=3)
    pos = {tuple(locs[i].tolist()) for i in a.pos_loc_inds.tolist()}
    assert pos == {(20.0, 20.0), (28.0, 20.0), (20.0, 28.0), (28.0, 28.0)}
    assert a.pos_levels.tolist() == [0] * 4 and a.pos_strides.tolist() == [8] * 4
    assert a.pos_labels.tolist() == [1] * 4 and a.pos_gt_inds.tolist() == [0] * 4
    k = [tuple(locs[i].tolist()) for i in a.pos_loc_inds.tolist()].index((20.0, 20.0))
    assert a.pos_reg_targets[k].tolist() == [12.0, 12.0, 20.0, 20.0]
    assert a.pos_ctr_targets[k].item() == pytest.approx(math.sqrt((12 / 20) ** 2))
    assert (a.labels[0] == 3).sum() == len(locs) - 4
    # Without centre sampling every P3 cell strictly inside the box is positive (4 x 4 of them);
    # P4 cells are inside too, but their largest distance (<= 32) is outside P4's range (32, 64].
    a = assign_targets(locs, strides, levels, [box], [torch.tensor([1])], [32, 64], 0.0, num_classes=3)
    assert a.num_pos == 16 and set(a.pos_levels.tolist()) == {0}
    # Two images; the second has a big box (P4) containing a small one: overlap goes to the smaller.
    big, small = [0.0, 0.0, 64.0, 64.0], [16.0, 16.0, 48.0, 48.0]
    a = assign_targets(locs, strides, levels, [box, torch.tensor([big, small])],
                       [torch.tensor([1]), torch.tensor([0, 2])], [32, 64], 1.5, num_classes=3)
    assert a.gt_im_inds.tolist() == [0, 1, 1]
    second = a.pos_im_inds == 1
    assert set(a.pos_gt_inds[second].tolist()) == {1, 2}  # batch-flat indices
    for i, g in zip(a.pos_loc_inds[second].tolist(), a.pos_gt_inds[second].tolist()):
        x, y = locs[i].tolist()
        inside_small = 16 < x < 48 and 16 < y < 48
        assert g == (2 if inside_small and levels[i] == 0 else 1)
    assert set(a.pos_levels[a.pos_gt_inds == 1].tolist()) == {1}  # the 64 px box: max distance 32-64 -> P4


def test_detection_losses_hand_computed():
    locs = torch.tensor([[4.0, 4.0], [12.0, 4.0]])
    strides, levels = torch.tensor([8, 8]), torch.tensor([0, 0])
    box = torch.tensor([[0.0, 0.0, 8.0, 8.0]])
    a = assign_targets(locs, strides, levels, [box], [torch.tensor([0])], [64], 0.0, num_classes=2)
    assert a.num_pos == 1 and a.pos_ctr_targets.item() == pytest.approx(1.0)
    logits = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]])
    reg = torch.tensor([[[4.0, 4.0, 4.0, 4.0], [1.0, 1.0, 1.0, 1.0]]])  # exact box at the positive
    ctr = torch.tensor([[0.0, 0.0]])
    losses = detection_losses(logits, reg, ctr, locs, a)
    # focal at p = 0.5: positive 0.25 * 0.25 * log 2, negative 0.75 * 0.25 * log 2 (three of them)
    expected_cls = (0.25 * 0.25 + 3 * 0.75 * 0.25) * math.log(2.0)
    assert losses["loss_cls"].item() == pytest.approx(expected_cls, rel=1e-5)
    assert losses["loss_box"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_ctr"].item() == pytest.approx(math.log(2.0), rel=1e-5)  # BCE(0.5, 1)


# ------------------------------------------------------------------ the detector
def test_preprocess_pads_after_normalising():
    model = demo_model()
    images = [torch.full((3, 40, 50), 200, dtype=torch.uint8), torch.zeros(3, 70, 20, dtype=torch.uint8)]
    pre = model.preprocess(images)
    assert pre.images_norm.shape == (2, 3, 96, 64) and pre.sizes == [(40, 50), (70, 20)]
    assert pre.image_valid[0].sum() == 40 * 50 and pre.image_valid[0, 39, 49] == 1 and pre.image_valid[0, 40, 0] == 0
    assert torch.all(pre.images_raw[0, :, :40, :50] == 200) and torch.all(pre.images_raw[0, :, 40:] == 0)
    expected = (200 - 0.485 * 255) / (0.229 * 255)
    assert pre.images_norm[0, 0, 0, 0].item() == pytest.approx(expected, rel=1e-5)
    assert torch.all(pre.images_norm[0, :, 40:] == 0) and torch.all(pre.images_norm[1, :, :, 20:] == 0)


def test_forward_shapes():
    model = demo_model(num_classes=4)
    out = model(model.preprocess([torch.zeros(3, 64, 96, dtype=torch.uint8)] * 2).images_norm)
    assert isinstance(out, DetectorOutputs)
    n = 8 * 12 + 4 * 6 + 2 * 3
    k = model.mask_head.num_params
    assert k == (8 + 2) * 8 + 8 + 8 * 8 + 8 + 8 + 1
    assert out.cls_logits.shape == (2, n, 4) and out.box_reg.shape == (2, n, 4)
    assert out.centerness.shape == (2, n) and out.controllers.shape == (2, n, k)
    assert out.locations.shape == (n, 2) and out.strides.tolist() == [8] * 96 + [16] * 24 + [32] * 6
    assert out.levels.tolist() == [0] * 96 + [1] * 24 + [2] * 6 and out.num_per_level == [96, 24, 6]
    assert out.mask_feats.shape == (2, 8, 8, 12)
    assert torch.all(out.box_reg >= 0)
    # Locations are cell centres, row-major per level.
    assert out.locations[:2].tolist() == [[4.0, 4.0], [12.0, 4.0]] and out.locations[12].tolist() == [4.0, 12.0]


def test_training_step_finite_losses_and_gradients_everywhere():
    model = demo_model()
    images, targets = two_box_batch()
    seen = {}

    def recording_mask_loss(inputs):
        seen["inputs"] = inputs
        return build_mask_loss("mask", {})(inputs)

    losses = model.training_losses(images, targets, recording_mask_loss, iteration=3, max_iter=10,
                                   extras={"note": 1})
    assert set(losses) == {"loss_cls", "loss_box", "loss_ctr", "loss_mask"}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    sum(losses.values()).backward()
    for name in ("backbone.stem.0.weight", "neck.fpn.inner_blocks.0.0.weight", "head.cls_logits.weight",
                 "head.box_pred.weight", "head.ctr_pred.weight", "head.controller.weight",
                 "mask_branch.tower.2.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    inp = seen["inputs"]
    p = inp.num_instances
    assert p > 0 and inp.mask_logits.shape == (p, 1, 16, 16) and inp.mask_stride == 4
    assert inp.gt_bitmasks.shape == inp.gt_boxmasks.shape == (p, 16, 16)
    assert inp.iteration == 3 and inp.max_iter == 10 and inp.gt_pasted is None
    assert inp.extras["note"] == 1 and bool(inp.extras["gt_has_mask"].all())
    a, sampled = inp.extras["assignment"], inp.extras["sampled"]
    assert torch.equal(inp.gt_inds, a.pos_gt_inds[sampled]) and torch.equal(inp.im_inds, a.pos_im_inds[sampled])
    assert torch.equal(inp.gt_boxes, torch.cat([t["boxes"] for t in targets])[inp.gt_inds])
    assert set(inp.gt_inds.tolist()) == {0, 1, 2, 3}
    # The teacher's call (same controllers/locations) reproduces the student's logits.
    out = inp.extras["outputs"]
    loc = a.pos_loc_inds[sampled]
    again = model.instance_mask_logits(out.mask_feats, out.controllers[inp.im_inds, loc], out.locations[loc],
                                       inp.im_inds, out.strides[loc])
    assert torch.allclose(again, inp.mask_logits)


def test_pasted_flags_follow_the_sampled_instances():
    model = demo_model()
    images, targets = two_box_batch()
    targets[1]["pasted"] = torch.tensor([False, True])
    seen = []

    def record(inputs):
        seen.append(inputs)
        return {}

    model.training_losses(images, targets, record)
    inp = seen[0]
    assert torch.equal(inp.gt_pasted, inp.gt_inds == 3)


def test_empty_targets_give_finite_connected_losses():
    model = demo_model()
    images, _ = two_box_batch()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
             "masks": torch.zeros(0, 64, 64, dtype=torch.uint8)}
    losses = model.training_losses(images, [empty, dict(empty)], build_mask_loss("boxmask", {}))
    assert set(losses) == {"loss_cls", "loss_box", "loss_ctr", "loss_mask"}
    assert all(torch.isfinite(v) for v in losses.values())
    total = sum(losses.values())
    assert total.requires_grad
    total.backward()
    assert model.head.cls_logits.weight.grad.abs().sum() > 0  # negatives still train the classifier
    assert model.head.controller.weight.grad is not None


def test_predict_is_well_formed_and_restores_mode():
    model = demo_model(num_classes=3)
    with torch.no_grad():  # confident, 1-stride-sized boxes everywhere: NMS and masks have work to do
        model.head.cls_logits.bias.fill_(2.0)
        model.head.box_pred.bias.fill_(1.0)
    images = [torch.randint(0, 256, (3, 64, 48), dtype=torch.uint8), torch.randint(0, 256, (3, 40, 72), dtype=torch.uint8)]
    model.train()
    results = model.predict(images, max_detections=20)
    assert model.training
    for res, im in zip(results, images):
        h, w = im.shape[1:]
        k = len(res["scores"])
        assert 0 < k <= 20
        assert res["boxes"].shape == (k, 4) and res["labels"].shape == (k,) and res["masks"].shape == (k, h, w)
        assert torch.all(res["boxes"][:, 0::2] <= w) and torch.all(res["boxes"][:, 1::2] <= h)
        assert torch.all(res["boxes"] >= 0) and torch.all(res["boxes"][:, 2:] > res["boxes"][:, :2])
        assert torch.all(res["scores"][:-1] >= res["scores"][1:]) and res["scores"].max() <= 1
        assert res["labels"].max() < 3 and res["masks"].min() >= 0 and res["masks"].max() <= 1


def test_select_detections_scores_nms_and_classes():
    locs = torch.tensor([[10.0, 10.0], [11.0, 10.0], [30.0, 30.0], [10.0, 10.0]])
    reg = torch.tensor([[5.0, 5.0, 5.0, 5.0], [5.0, 5.0, 5.0, 5.0], [2.0, 2.0, 2.0, 2.0], [5.0, 5.0, 5.0, 5.0]])
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    cls = torch.full((4, 2), -20.0)
    cls[0, 0], cls[1, 0], cls[2, 1], cls[3, 1] = logit(0.9), logit(0.8), logit(0.6), logit(0.04)
    ctr = torch.tensor([logit(0.4), logit(0.5), logit(0.6), 0.0])
    det = select_detections(cls, reg, ctr, locs, torch.zeros(4, dtype=torch.long), (40, 40), score_thresh=0.05)
    # location 1 (0.8*0.5 = 0.40) suppresses location 0 (0.9*0.4 = 0.36), same class, IoU ~0.8;
    # location 3 is below the score threshold; location 2 is another class and far away.
    assert det["loc_inds"].tolist() == [1, 2]
    assert det["labels"].tolist() == [0, 1]
    assert det["scores"].tolist() == pytest.approx([math.sqrt(0.4), math.sqrt(0.36)], rel=1e-5)
    assert det["boxes"][1].tolist() == [28.0, 28.0, 32.0, 32.0]


def test_instance_mask_logits_relative_coordinates_and_grouped_conv_equivalence():
    model = demo_model()
    head = model.mask_head
    torch.manual_seed(0)
    feats = torch.randn(2, 8, 6, 5)
    params = torch.randn(3, head.num_params) * 0.3
    locs = torch.tensor([[4.0, 4.0], [20.0, 12.0], [40.0, 24.0]])
    im_inds, strides = torch.tensor([0, 1, 1]), torch.tensor([8, 16, 32])
    out = model.instance_mask_logits(feats, params, locs, im_inds, strides)
    assert out.shape == (3, 1, 12, 10)
    # Reference: CondInst's grouped 1x1 convolution over all instances at once.
    pix = compute_locations(6, 5, 8)
    soi = torch.tensor([32.0, 64.0, 128.0])
    rel = ((locs[:, None] - pix[None]) / soi[:, None, None]).permute(0, 2, 1)
    x = torch.cat([rel, feats[im_inds].reshape(3, 8, 30)], 1).reshape(1, -1, 6, 5)
    weights, biases = head.parse_params(params)
    for i, (w, b) in enumerate(zip(weights, biases)):
        x = F.conv2d(x, w.reshape(-1, w.shape[2], 1, 1), b.reshape(-1), groups=3)
        x = F.relu(x) if i < 2 else x
    assert torch.allclose(out, aligned_bilinear(x.reshape(3, 1, 6, 5), 2), atol=1e-5)
    # Hand-set parameters that output the relative x coordinate: (loc_x - pixel_x) / soi.
    p = torch.zeros(1, head.num_params)
    w0, w1, w2, b0, b1, b2 = torch.split(p[0], head.weight_nums + head.bias_nums)
    w0.view(8, 10)[0, 0] = 1.0
    b0[0] = 10.0  # keep positive through the ReLUs
    w1.view(8, 8)[0, 0] = 1.0
    w2.view(1, 8)[0, 0] = 1.0
    b2[0] = -10.0
    logits = model.instance_mask_logits(feats[:1], p, torch.tensor([[20.0, 12.0]]), torch.tensor([0]),
                                        torch.tensor([16]))
    at_cells = logits[0, 0, 1::2, 1::2]  # stride-4 indices of the stride-8 cell centres
    expected = ((20.0 - pix[:, 0]) / 64.0).reshape(6, 5)
    assert torch.allclose(at_cells, expected, atol=1e-5)
    feats.requires_grad_()
    empty = model.instance_mask_logits(feats, params[:0], locs[:0], im_inds[:0], strides[:0])
    assert empty.shape == (0, 1, 12, 10) and empty.requires_grad  # still part of the graph


def test_top64_sampling_spreads_over_gts_and_keeps_the_best():
    model = demo_model(num_classes=2)
    locs, strides, levels = _locations(512, [8, 16, 32])
    boxes = torch.tensor([[0.0, 0.0, 500.0, 500.0], [100.0, 100.0, 140.0, 140.0]])
    a = assign_targets(locs, strides, levels, [boxes], [torch.tensor([0, 1])], [64, 128], 10.0, num_classes=2)
    n_big, n_small = int((a.pos_gt_inds == 0).sum()), int((a.pos_gt_inds == 1).sum())
    assert n_big == 256 and n_small == 16  # all P5 cells of the big box; 4 x 4 P3 cells of the small one
    g = torch.Generator().manual_seed(0)
    n = len(locs)
    out = DetectorOutputs(cls_logits=torch.randn(1, n, 2, generator=g), box_reg=torch.zeros(1, n, 4),
                          centerness=torch.randn(1, n, generator=g), controllers=torch.zeros(1, n, 1),
                          locations=locs, strides=strides, levels=levels, mask_feats=torch.zeros(1, 1, 1, 1))
    sampled = model.sample_mask_instances(out, a)
    gts = a.pos_gt_inds[sampled]
    assert int((gts == 0).sum()) == 32 and int((gts == 1).sum()) == n_small
    assert torch.all(sampled[1:] > sampled[:-1])
    rank = out.cls_logits[0].sigmoid().max(1).values * out.centerness[0].sigmoid()
    big = torch.nonzero(a.pos_gt_inds == 0).squeeze(1)
    best = big[rank[a.pos_loc_inds[big]].topk(32).indices]
    assert set(sampled[gts == 0].tolist()) == set(best.tolist())


def test_gt_masks_are_sampled_at_stride_centres():
    masks = torch.zeros(1, 10, 9, dtype=torch.uint8)
    masks[0, 2, 6] = 1  # full-res pixel (y=2, x=6) -> stride-4 cell (0, 1)
    masks[0, 3, 3] = 1  # not a sampled pixel
    bit, has = gt_bitmasks([{"boxes": torch.zeros(1, 4), "masks": masks}, {"boxes": torch.zeros(2, 4)}], 32, 32, 4,
                           torch.device("cpu"))
    assert bit.shape == (3, 8, 8) and has.tolist() == [True, False, False]
    assert torch.nonzero(bit[0]).tolist() == [[0, 1]] and bit[1:].sum() == 0
    box = box_masks(torch.tensor([[1.0, 1.5, 6.9, 2.0]]), 16, 16, 4)
    # rows int(1.5)..int(2.0) = 1..2 contain pixel 2 (cell 0); columns 1..6 contain pixels 2 and 6
    assert torch.nonzero(box[0]).tolist() == [[0, 0], [0, 1]]


def test_bad_model_settings_are_input_errors():
    with pytest.raises(InputError, match="model.sizes_of_interest"):
        CondInst(2, {**DEMO_MODEL_CFG, "sizes_of_interest": [64]})
    with pytest.raises(InputError, match="model.gn_groups"):
        CondInst(2, {**DEMO_MODEL_CFG, "fpn_channels": 40})


def _ddp_worker(rank: int, port: int, queue) -> None:
    import datetime

    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                           timeout=datetime.timedelta(seconds=300))
    try:
        locs = torch.tensor([[4.0, 4.0], [12.0, 4.0]])
        boxes = [torch.tensor([[0.0, 0.0, 8.0, 8.0]]) if rank == 0 else torch.zeros(0, 4)]
        labels = [torch.tensor([0]) if rank == 0 else torch.zeros(0, dtype=torch.long)]
        a = assign_targets(locs, torch.tensor([8, 8]), torch.tensor([0, 0]), boxes, labels, [64], 0.0, 1)
        losses = detection_losses(torch.zeros(1, 2, 1), torch.full((1, 2, 4), 4.0), torch.zeros(1, 2), locs, a)
        queue.put((rank, {k: v.item() for k, v in losses.items()}))
    finally:
        dist.destroy_process_group()


def test_loss_normalisers_are_averaged_over_processes_without_deadlock():
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # spawn, not fork: forking after torch has started its OpenMP threads can hang the child
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
    assert all(p.exitcode == 0 for p in procs)
    results = dict(queue.get(timeout=5) for _ in range(2))
    # one positive over two processes: the normaliser is max(0.5, 1) = 1 on both
    focal_pos, focal_neg = 0.25 * 0.25 * math.log(2.0), 0.75 * 0.25 * math.log(2.0)
    assert results[0]["loss_cls"] == pytest.approx(focal_pos + focal_neg, rel=1e-5)
    assert results[1]["loss_cls"] == pytest.approx(2 * focal_neg, rel=1e-5)
    assert results[1]["loss_box"] == 0.0


def test_stride4_mask_branch_reads_c2_and_skips_upsampling():
    torch.manual_seed(0)
    cfg = {**DEMO_MODEL_CFG, "mask_feat_stride": 4}
    model = CondInst(3, cfg)
    out = model(torch.randn(2, 3, 64, 64))
    assert out.mask_feats.shape == (2, cfg["mask_out_channels"], 16, 16)
    logits = model.instance_mask_logits(out.mask_feats, out.controllers[0, :5], out.locations[:5],
                                        torch.zeros(5, dtype=torch.long), out.strides[:5])
    assert logits.shape == (5, 1, 16, 16)
    # The C2 path is used: changing it changes the mask features.
    feats = model.backbone(torch.randn(1, 3, 64, 64))
    pyramid = model.neck(feats)
    a = model.mask_branch(pyramid, feats["c2"])
    b = model.mask_branch(pyramid, feats["c2"] + 1.0)
    assert not torch.allclose(a, b)
    with pytest.raises(InputError, match="mask_feat_stride"):
        CondInst(3, {**DEMO_MODEL_CFG, "mask_feat_stride": 2})
    with pytest.raises(InputError, match="stride-4 output"):
        MaskBranch(8, 8, 1, 4, "GN", out_stride=4, detail_channels=None)


def test_stride4_mask_branch_on_p2_is_adelaidets_branch():
    """mask_stride4_input p2: the FPN adds P2 for the mask branch only, and the branch is
    refine(P2) + sum of refine(P_l) upsampled to P2 (AdelaiDet's MASK_BRANCH.IN_FEATURES p2-p5)."""
    torch.manual_seed(0)
    cfg = {**DEMO_MODEL_CFG, "mask_feat_stride": 4, "mask_stride4_input": "p2"}
    model = CondInst(3, cfg).eval()
    images = torch.randn(2, 3, 64, 64)
    out = model(images)
    assert out.mask_feats.shape == (2, cfg["mask_out_channels"], 16, 16)
    assert out.num_per_level == [64, 16, 4]  # P3-P5 only: P2 never reaches the FCOS head
    feats, pyramid = model.pyramid(images)
    assert feats["p2"].shape[-2:] == (16, 16) and len(pyramid) == 3
    branch = model.mask_branch
    expected = branch.detail(feats["p2"])
    for level, factor in zip(range(3), (2, 4, 8)):
        expected = expected + aligned_bilinear(branch.refine[level](pyramid[level]), factor)
    torch.testing.assert_close(out.mask_feats, branch.tower(expected))
    # the head reads P3-P5 only: a change of C2 moves the mask features, not the class logits
    with torch.no_grad():
        grabbed = model.backbone(images)
        moved = model.neck({**grabbed, "c2": grabbed["c2"] + 1.0})
        still = model.neck(grabbed)
    assert not torch.allclose(moved[0], still[0])
    for a, b in zip(moved[1:], still[1:]):
        torch.testing.assert_close(a, b)
    with pytest.raises(InputError, match="mask_stride4_input"):
        CondInst(3, {**cfg, "mask_stride4_input": "p3"})
    with pytest.raises(InputError, match="neck: fpn"):
        build_neck({**cfg, "neck": "bifpn"}, {"c2": 32, "c3": 64, "c4": 128, "c5": 256})
    # at stride 8 the setting is inert: the same network as without it
    plain = CondInst(3, {**DEMO_MODEL_CFG, "mask_stride4_input": "p2"})
    assert not hasattr(plain.mask_branch, "detail") or plain.mask_branch.detail is None


def test_resnet18_channels_and_norm_follow_pretrained(tmp_path):
    """R-18 (the original-code comparison's backbone): BasicBlock widths; trainable BN from scratch,
    frozen BN (as detectron2) once weights are loaded."""
    from torchvision.models import resnet18
    from torchvision.ops import FrozenBatchNorm2d

    torch.manual_seed(0)
    net = build_backbone({"backbone": "resnet18", "freeze_at": 0, "pretrained": "none"})
    out = net(torch.randn(2, 3, 64, 64))
    assert {k: tuple(v.shape[1:]) for k, v in out.items()} == {
        "c2": (64, 16, 16), "c3": (128, 8, 8), "c4": (256, 4, 4), "c5": (512, 2, 2)}
    assert net.out_channels == {"c2": 64, "c3": 128, "c4": 256, "c5": 512}
    assert isinstance(net.bn1, nn.BatchNorm2d) and net.bn1.weight.requires_grad
    file = tmp_path / "r18.pth"
    torch.save(resnet18(weights=None).state_dict(), file)
    loaded = build_backbone({"backbone": "resnet18", "pretrained": str(file)})
    assert isinstance(loaded.bn1, FrozenBatchNorm2d)
