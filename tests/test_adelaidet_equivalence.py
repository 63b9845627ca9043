"""The four settings with which simbench's BoxInst computes what AdelaiDet's computes, and the cross-check.

``simbench upstream crosscheck`` (baselines/crosscheck.py) compares one
forward/backward of both codes on the same weights and batch; these tests
check its pieces without the original code: the renaming of weights, the
comparison, and each setting against a hand computation. The run against the
real checkout is opt-in (tests/test_upstream_integration.py).
"""
from __future__ import annotations

import pytest
import torch
from torchvision.ops import generalized_box_iou_loss

from baselines.crosscheck import adelaidet_name, compare, to_adelaidet_state
from baselines.lab import images_to_lab
from sim_core.errors import InputError
from sim_core.model.condinst import DEMO_MODEL_CFG, CondInst
from sim_core.model.fcos import (assign_targets, compute_locations, detection_losses, mask_mass_centres,
                                 raster_box_centres, smoothed_giou_loss)
from sim_core.model.mask_head import MaskBranch, aligned_bilinear

R18_C2 = {**DEMO_MODEL_CFG, "backbone": "resnet18", "pretrained": "none", "freeze_at": 0, "mask_feat_stride": 4,
          "mask_stride4_input": "c2", "mask_branch_convs": 1, "mask_branch_norm": "BN", "gn_groups": 32}


# ------------------------------------------------------------------ centre of mass (center_sampling_center: mass)
def test_raster_box_centres_by_hand():
    boxes = torch.tensor([[10.3, 20.0, 50.7, 30.9],  # columns 10..50, rows 20..30
                          [60.0, 0.0, 70.0, 5.0],  # clipped at the padded width 64: columns 60..63
                          [70.0, 0.0, 80.0, 5.0]])  # outside the image: AdelaiDet's 0 / 1e-6 -> (0, 0)
    centres = raster_box_centres(boxes, pad_h=64, pad_w=64)
    assert centres.tolist() == [[30.0, 25.0], [61.5, 2.5], [0.0, 0.0]]
    # half a pixel above and left of the box centre for a box on whole pixels (pixel indices, not coordinates)
    assert raster_box_centres(torch.tensor([[8.0, 8.0, 40.0, 40.0]]), 64, 64).tolist() == [[24.0, 24.0]]


def test_mask_mass_centres_by_hand():
    masks = torch.zeros(2, 6, 8)
    masks[0, 1, 2] = masks[0, 3, 4] = 1
    masks[1, 0:2, 0:4] = 1
    assert mask_mass_centres(masks).tolist() == [[3.0, 2.0], [1.5, 0.5]]


def _p3_grid(size: int = 64):
    loc = compute_locations(size // 8, size // 8, 8)
    return loc, torch.full((len(loc),), 8), torch.zeros(len(loc), dtype=torch.long)


def test_given_centres_move_the_centre_region():
    locs, strides, levels = _p3_grid()
    box = torch.tensor([[8.0, 8.0, 40.0, 40.0]])
    a = assign_targets(locs, strides, levels, [box], [torch.tensor([0])], [64], 1.5, num_classes=2)
    assert {tuple(locs[i].tolist()) for i in a.pos_loc_inds.tolist()} == {(20.0, 20.0), (28.0, 20.0),
                                                                         (20.0, 28.0), (28.0, 28.0)}
    # centre (19, 19): region [7, 31] clipped to the box, [8, 31]: cells 12, 20, 28 in each direction
    a = assign_targets(locs, strides, levels, [box], [torch.tensor([0])], [64], 1.5, num_classes=2,
                       gt_centres=[torch.tensor([[19.0, 19.0]])])
    assert {tuple(locs[i].tolist()) for i in a.pos_loc_inds.tolist()} == {
        (float(x), float(y)) for x in (12, 20, 28) for y in (12, 20, 28)}


def test_condinst_mass_centres_come_from_masks_only_for_mask_supervision():
    box = torch.tensor([[8.0, 8.0, 40.0, 40.0]])
    mask = torch.zeros(1, 64, 64, dtype=torch.uint8)
    mask[0, 8:12, 8:12] = 1  # a corner of the box: centre of mass (9.5, 9.5)
    target = {"boxes": box, "masks": mask}
    assert CondInst._mass_centres(target, box, 64, 64, use_masks=True).tolist() == [[9.5, 9.5]]
    assert CondInst._mass_centres(target, box, 64, 64, use_masks=False).tolist() == [[24.0, 24.0]]
    empty = {"boxes": box, "masks": torch.zeros(1, 64, 64, dtype=torch.uint8)}  # no mask: the box's
    assert CondInst._mass_centres(empty, box, 64, 64, use_masks=True).tolist() == [[24.0, 24.0]]


def test_mass_centres_change_the_positives_of_a_training_step():
    # box centre 16.45, raster mass centre (0 + 33 - 1) / 2 = 16: at P3 (radius 12) the region's far edge is
    # 28.45 against 28, so the cells at x or y = 28 are positive for "box" only (regions are open intervals)
    images = [torch.zeros(3, 64, 64, dtype=torch.uint8)]
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 32.9, 32.9]]), "labels": torch.tensor([1]),
                "masks": torch.zeros(1, 64, 64, dtype=torch.uint8)}]
    positives = {}
    for kind in ("box", "mass"):
        torch.manual_seed(0)
        model = CondInst(3, {**DEMO_MODEL_CFG, "center_sampling_center": kind})
        out = model(model.preprocess(images).images_norm)
        positives[kind] = {tuple(out.locations[i].tolist()) for i in model.assign(out, targets).pos_loc_inds}
    assert positives["box"] == {(float(x), float(y)) for x in (12, 20, 28) for y in (12, 20, 28)}
    assert positives["mass"] == {(float(x), float(y)) for x in (12, 20) for y in (12, 20)}


# ------------------------------------------------------------------ smoothed GIoU (iou_smoothing)
def test_smoothed_giou_by_hand_and_plain_giou_at_zero():
    pred, target = torch.tensor([[0.0, 0.0, 8.0, 8.0]]), torch.tensor([[0.0, 0.0, 8.0, 16.0]])
    # I = 64, U = 128, enclosing 128; AdelaiDet's 1.0 at stride 8 is 64 px^2: IoU (64 + 64) / (128 + 64)
    assert smoothed_giou_loss(pred, target, torch.tensor([64.0])).item() == pytest.approx(1 / 3)
    assert smoothed_giou_loss(pred, target, torch.tensor([0.0])).item() == pytest.approx(0.5)
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=g) * 50
    a = torch.cat([xy, xy + 1 + torch.rand(50, 2, generator=g) * 30], 1)
    b = torch.cat([xy - torch.rand(50, 2, generator=g) * 5, xy + 2 + torch.rand(50, 2, generator=g) * 30], 1)
    assert torch.allclose(smoothed_giou_loss(a, b, torch.zeros(50)),
                          generalized_box_iou_loss(a, b, reduction="none"), atol=1e-5)


def test_detection_losses_use_the_smoothing_per_stride():
    locs = torch.tensor([[4.0, 4.0], [12.0, 4.0]])
    strides, levels = torch.tensor([8, 8]), torch.tensor([0, 0])
    box = torch.tensor([[0.0, 0.0, 8.0, 16.0]])
    a = assign_targets(locs, strides, levels, [box], [torch.tensor([0])], [64], 0.0, num_classes=2)
    reg = torch.tensor([[[4.0, 4.0, 4.0, 4.0], [1.0, 1.0, 1.0, 1.0]]])  # predicts [0, 0, 8, 8]
    args = (torch.zeros(1, 2, 2), reg, torch.zeros(1, 2), locs, a)
    assert detection_losses(*args)["loss_box"].item() == pytest.approx(0.5, rel=1e-5)
    assert detection_losses(*args, iou_smoothing=1.0)["loss_box"].item() == pytest.approx(1 / 3, rel=1e-5)


# ------------------------------------------------------------------ mask branch fusion (mask_fusion_stride)
def test_two_x2_upsamplings_shift_a_cell_against_one_x4():
    x = torch.zeros(1, 1, 1, 8)
    x[..., 3] = 1.0
    once = aligned_bilinear(x, 4)[0, 0, 0]
    twice = aligned_bilinear(aligned_bilinear(x, 2), 2)[0, 0, 0]
    assert int(once.argmax()) == 4 * 3 + 2 and int(twice.argmax()) == 4 * 3 + 3


def test_fusion_at_stride4_sums_each_level_upsampled_straight():
    torch.manual_seed(0)
    branch = MaskBranch(16, 16, 1, 8, "GN", out_stride=4, detail_channels=8, fuse_at_stride4=True).eval()
    feats = [torch.randn(1, 16, 8 // 2 ** i, 8 // 2 ** i) for i in range(3)]
    c2 = torch.randn(1, 8, 16, 16)
    by_hand = branch.detail(c2)
    for level, f in enumerate(feats):
        by_hand = by_hand + aligned_bilinear(branch.refine[level](f), 2 ** (level + 1))
    assert torch.allclose(branch(feats, c2), branch.tower(by_hand), atol=1e-6)
    branch.fuse_at_stride4 = False  # simbench's default: P3-P5 summed at stride 8, the sum upsampled x2
    assert not torch.allclose(branch(feats, c2), branch.tower(by_hand), atol=1e-3)


def test_model_reads_the_fusion_setting_and_rejects_bad_values():
    assert CondInst(3, {**R18_C2, "mask_fusion_stride": 4}).mask_branch.fuse_at_stride4
    assert not CondInst(3, R18_C2).mask_branch.fuse_at_stride4
    assert CondInst(3, {**R18_C2, "mask_stride4_input": "p2"}).mask_branch.fuse_at_stride4
    for key, value in (("mask_fusion_stride", 6), ("center_sampling_center", "middle"), ("iou_smoothing", -1)):
        with pytest.raises(InputError, match=key):
            CondInst(3, {**DEMO_MODEL_CFG, key: value})


# ------------------------------------------------------------------ LAB from uint8 (boxinst.lab_from_uint8)
def test_lab_from_truncated_means():
    image = torch.full((1, 3, 8, 8), 100.0)
    image[..., ::2, :] = 101.5  # every 4 x 4 cell averages 100.75
    truncated = images_to_lab(image, 4, truncate_to_uint8=True)
    assert torch.allclose(truncated, images_to_lab(torch.full((1, 3, 8, 8), 100.0), 4))
    assert not torch.allclose(images_to_lab(image, 4), truncated)


# ------------------------------------------------------------------ the cross-check's renaming and comparison
def test_every_weight_of_the_r18_c2_model_gets_a_distinct_adelaidet_name():
    state = CondInst(6, R18_C2).state_dict()
    names = [adelaidet_name(k) for k in state]
    assert len(set(names)) == len(names)
    assert adelaidet_name("backbone.layer2.0.downsample.1.running_var") == \
        "backbone.bottom_up.res3.0.shortcut.norm.running_var"
    assert adelaidet_name("neck.fpn.inner_blocks.0.0.weight") == "backbone.fpn_lateral3.weight"
    assert adelaidet_name("head.box_tower.3.weight") == "proposal_generator.fcos_head.bbox_tower.3.weight"
    assert adelaidet_name("mask_branch.detail.1.bias") == "mask_branch.refine.0.1.bias"
    assert adelaidet_name("mask_branch.refine.2.0.weight") == "mask_branch.refine.3.0.weight"
    with pytest.raises(KeyError):
        adelaidet_name("neck.bifpn.0.weight")
    mapped = to_adelaidet_state(state)
    assert torch.equal(mapped["backbone.bottom_up.stem.conv1.weight"], state["backbone.conv1.weight"].flip(1))


def _fake_original(losses: dict, grads: dict) -> dict:
    renamed = {"loss_cls": "loss_fcos_cls", "loss_box": "loss_fcos_loc", "loss_ctr": "loss_fcos_ctr",
               "loss_proj": "loss_prj", "loss_pairwise": "loss_pairwise"}
    their_grads = {adelaidet_name(n): (g.flip(1) if n == "backbone.conv1.weight" else g).clone()
                   for n, g in grads.items()}
    return {"losses": {renamed[k]: v for k, v in losses.items()}, "grads": their_grads}


def test_compare_agrees_with_itself_and_names_what_differs():
    g = torch.Generator().manual_seed(0)
    grads = {"backbone.conv1.weight": torch.randn(4, 3, 7, 7, generator=g),
             "mask_branch.tower.1.bias": torch.randn(8, generator=g)}
    losses = {"loss_cls": 1.0, "loss_box": 0.5, "loss_ctr": 0.7, "loss_proj": 0.6, "loss_pairwise": 0.2}
    theirs = _fake_original(losses, grads)
    report = compare((losses, grads), theirs)
    assert report["losses_agree"] and report["gradients_agree"] and not report["gradients_at_rounding"]
    # a weight only the original has (AdelaiDet's tower biases without model.head_conv_bias) fails the check
    theirs["grads"]["proposal_generator.fcos_head.cls_tower.0.bias"] = torch.ones(4)
    report = compare((losses, grads), theirs)
    assert report["gradients_only_in_original"] == {"proposal_generator.fcos_head.cls_tower.0.bias": 2.0}
    assert not report["gradients_agree"]
    del theirs["grads"]["proposal_generator.fcos_head.cls_tower.0.bias"]
    theirs["losses"]["loss_pairwise"] = 0.2 * (100 / 101)  # AdelaiDet's warm-up counter one step ahead
    theirs["grads"]["mask_branch.tower.1.bias"] = theirs["grads"]["mask_branch.tower.1.bias"] * 1.05
    report = compare((losses, grads), theirs)
    assert not report["losses"]["loss_pairwise"]["agrees"] and report["losses"]["loss_cls"]["agrees"]
    assert report["losses"]["loss_pairwise"]["relative_difference"] == pytest.approx(0.01, rel=1e-6)
    assert report["worst_gradients"][0] == "mask_branch.tower.1.bias"
    assert report["gradients"]["mask_branch.tower.1.bias"]["status"] == "differs"
    assert report["gradients"]["backbone.conv1.weight"]["agrees"] and not report["gradients_agree"]
    # 0.5 %: as far as a ReLU input within rounding of 0 can move a gradient; reported, not failed
    theirs["grads"]["mask_branch.tower.1.bias"] = grads["mask_branch.tower.1.bias"] * 1.005
    report = compare((losses, grads), theirs)
    assert report["gradients_at_rounding"] == ["mask_branch.tower.1.bias"] and report["gradients_agree"]
    # simbench's own float32 error widens the tolerance of a parameter to NOISE_FACTOR times it
    report = compare((losses, grads), theirs, rounding={"mask_branch.tower.1.bias": 0.002})
    assert report["gradients"]["mask_branch.tower.1.bias"]["status"] == "agrees"


def test_run_json_lists_the_settings_on_which_the_functions_differ():
    from baselines.upstream import adelaidet_function_differences

    listed = adelaidet_function_differences(dict(R18_C2), {"lab_from_uint8": False})
    assert len(listed) == 4 and any("model.center_sampling_center: mass" in d for d in listed)
    exact = {**R18_C2, "center_sampling_center": "mass", "iou_smoothing": 1.0, "head_conv_bias": True}
    assert adelaidet_function_differences(exact, {"lab_from_uint8": True}) == []


def test_p2_models_are_renamed_from_level_2():
    from baselines.crosscheck import first_fpn_level

    cfg = {**R18_C2, "mask_stride4_input": "p2", "fpn_levels": [3, 4, 5]}
    assert first_fpn_level(cfg) == 2 and first_fpn_level(R18_C2) == 3
    state = CondInst(6, cfg).state_dict()
    names = [adelaidet_name(k, 2) for k in state]
    assert len(set(names)) == len(names)
    assert "backbone.fpn_lateral2.weight" in names and "backbone.fpn_output5.bias" in names
    assert "backbone.fpn_lateral6.weight" not in names
