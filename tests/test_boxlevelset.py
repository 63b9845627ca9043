"""BoxLevelSet losses: the Chan-Vese energy by hand, its minimum, gradients, both variants."""
from __future__ import annotations

import pytest
import torch

from baselines.boxinst import projection_loss
from baselines.boxlevelset import BoxLevelSetLoss, box_length, levelset_energy
from baselines.tree_filter import build_tree_schedule, tree_edge_weights, tree_filter
from sim_core.errors import InputError
from sim_core.model.mask_inputs import MaskLossInputs

MASK_FEAT_CHANNELS = 8


def make_inputs(logits: torch.Tensor, boxmasks: torch.Tensor, images_raw: torch.Tensor,
                im_inds: torch.Tensor | None = None, seed: int = 0) -> MaskLossInputs:
    num = logits.shape[0]
    batch, _, height, width = images_raw.shape
    generator = torch.Generator().manual_seed(seed)
    return MaskLossInputs(
        mask_logits=logits,
        mask_feats=torch.randn(batch, MASK_FEAT_CHANNELS, height // 8, width // 8,
                               generator=generator),
        gt_boxes=torch.zeros(num, 4),
        gt_labels=torch.zeros(num, dtype=torch.long),
        gt_inds=torch.arange(num),
        im_inds=torch.zeros(num, dtype=torch.long) if im_inds is None else im_inds,
        gt_bitmasks=boxmasks.clone(),
        gt_boxmasks=boxmasks,
        images_raw=images_raw,
        images_norm=(images_raw - 120.0) / 60.0,
        image_valid=torch.ones(batch, height, width),
        iteration=10,
        max_iter=100,
    )


def box_mask(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    m = torch.zeros(h, w)
    m[y0:y1, x0:x1] = 1.0
    return m


def test_energy_matches_hand_calculation():
    image = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(1, 1, 2, 2)
    probs = torch.tensor([[1.0, 0.5], [0.0, 0.0]]).view(1, 1, 2, 2)
    box = torch.ones(1, 1, 2, 2)
    # c1 = (1*1 + 0*0.5) / 1.5 = 2/3 ; c2 = (1*0 + 0*0.5 + 0 + 0) / 2.5 = 0
    # region = (1-2/3)^2 * 1 + (0-2/3)^2 * 0.5 + 0 = 1/9 + 2/9 = 1/3
    # length = |0.5-1| + |0-0| (rows) + |0-1| + |0-0.5| (columns) = 2
    gamma = 0.1
    expected = (1 / 3 + gamma * 2.0) / 4
    assert levelset_energy(probs, image, box, gamma).item() == pytest.approx(expected, rel=1e-5)


def test_energy_is_channel_averaged_and_box_restricted():
    torch.manual_seed(0)
    probs = torch.rand(1, 1, 6, 6)
    image = torch.randn(1, 1, 6, 6)
    box = box_mask(6, 6, 1, 4, 2, 6)[None, None]
    one = levelset_energy(probs, image, box, 0.0)
    # two identical channels: same energy (mean over channels, not sum)
    assert levelset_energy(probs, image.repeat(1, 2, 1, 1), box, 0.0).item() == \
        pytest.approx(one.item(), rel=1e-6)
    # changing the image or the probabilities outside the box changes nothing
    outside = box == 0
    image2 = image.clone()
    image2[outside] = 100.0
    probs2 = probs.clone()
    probs2[outside] = 0.123
    assert levelset_energy(probs2, image2, box, 1.0).item() == \
        pytest.approx(levelset_energy(probs, image, box, 1.0).item(), rel=1e-6)


def test_length_counts_only_pairs_inside_the_box():
    probs = torch.zeros(1, 1, 4, 4)
    probs[..., 1:3, 1:3] = 1.0
    full = torch.ones(1, 1, 4, 4)
    assert box_length(probs, full).item() == 8.0  # perimeter of the 2x2 square
    assert box_length(probs, box_mask(4, 4, 1, 3, 1, 3)[None, None]).item() == 0.0


def test_true_two_tone_segmentation_has_lower_energy_than_box_or_shifted_mask():
    image = torch.zeros(1, 3, 12, 12)
    image[..., 4:9, 3:8] = torch.tensor([1.0, -0.5, 0.3]).view(1, 3, 1, 1)  # the object
    box = box_mask(12, 12, 3, 10, 2, 9)[None, None]
    truth = torch.zeros(1, 1, 12, 12)
    truth[..., 4:9, 3:8] = 1.0
    soft = lambda m: m * 0.98 + 0.01  # noqa: E731 - sigmoid outputs are never exactly 0/1
    shifted = torch.roll(truth, shifts=(1, 1), dims=(2, 3))
    e_true = levelset_energy(soft(truth), image, box, 1e-4).item()
    e_box = levelset_energy(soft(box.clone()), image, box, 1e-4).item()
    e_shift = levelset_energy(soft(shifted), image, box, 1e-4).item()
    assert e_true < e_shift and e_true < e_box
    assert e_true < 0.1 * min(e_shift, e_box)


def test_gradient_descent_on_the_energy_recovers_the_object():
    image = torch.zeros(1, 1, 16, 16)
    image[..., 5:11, 4:9] = 1.0
    box = box_mask(16, 16, 3, 13, 2, 12)[None, None]
    truth = image > 0.5
    # the initial contour: a disc at the box centre (a uniform start is a stationary point)
    ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    disc = ((ys - 7.5) ** 2 + (xs - 6.5) ** 2 < 3).float()
    logits = (disc - 0.5).view(1, 1, 16, 16).requires_grad_()
    iou_of = lambda m: ((m & truth).sum() / (m | truth).sum()).item()  # noqa: E731
    start_iou = iou_of((logits > 0) & (box > 0))
    for _ in range(60):
        probs = logits.sigmoid()
        loss = levelset_energy(probs, image, box, 1e-4).sum() + \
            0.05 * projection_loss(probs, box).sum()
        (grad,) = torch.autograd.grad(loss, logits)
        with torch.no_grad():
            logits -= 20.0 * grad
    final_iou = iou_of((logits > 0) & (box > 0))
    assert start_iou < 0.7 and final_iou > 0.95


@pytest.mark.parametrize("cfg", [
    {"tree_filter": False},
    {"tree_filter": True},
    {"tree_filter": True, "variant": "released_code"},
])
def test_module_terms_weights_and_finite_gradients_on_edge_boxes(cfg):
    torch.manual_seed(1)
    logits = (torch.randn(4, 1, 8, 8) * 4).requires_grad_()
    boxes = torch.stack([torch.zeros(8, 8),                 # empty box
                         box_mask(8, 8, 3, 4, 5, 6),         # one pixel
                         box_mask(8, 8, 0, 8, 4, 8),         # touches three borders
                         box_mask(8, 8, 1, 6, 1, 5)])
    images = torch.rand(2, 3, 32, 32) * 255
    loss_fn = BoxLevelSetLoss(cfg, mask_feat_channels=MASK_FEAT_CHANNELS)
    inputs = make_inputs(logits, boxes, images, im_inds=torch.tensor([0, 1, 1, 0]))
    losses = loss_fn(inputs)
    assert set(losses) == {"loss_proj", "loss_levelset_img", "loss_levelset_feat"}
    expected_proj = 3.0 * projection_loss(logits.sigmoid(), boxes[:, None]).mean()
    assert losses["loss_proj"].item() == pytest.approx(expected_proj.item(), rel=1e-6)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert torch.isfinite(logits.grad).all()
    conv_grad = loss_fn.feature_conv.weight.grad
    assert conv_grad is not None and torch.isfinite(conv_grad).all() and conv_grad.abs().sum() > 0


def test_image_term_uses_the_normalised_image_with_weight_005():
    torch.manual_seed(2)
    logits = torch.randn(1, 1, 8, 8)
    box = box_mask(8, 8, 1, 7, 2, 6)[None]
    images = torch.rand(1, 3, 32, 32) * 255
    inputs = make_inputs(logits, box, images)
    loss = BoxLevelSetLoss({"tree_filter": False}, MASK_FEAT_CHANNELS)(inputs)
    resized = torch.nn.functional.interpolate(inputs.images_norm, size=(8, 8), mode="bilinear",
                                              align_corners=False)
    expected = 0.05 * levelset_energy(logits.sigmoid(), resized, box[:, None], 1e-4)
    assert loss["loss_levelset_img"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_released_code_feature_input_filters_the_prediction_along_two_trees():
    torch.manual_seed(3)
    logits = torch.randn(3, 1, 8, 8)
    boxes = torch.ones(3, 8, 8)
    images = torch.rand(2, 3, 32, 32) * 255
    im_inds = torch.tensor([1, 0, 1])
    inputs = make_inputs(logits, boxes, images, im_inds=im_inds)
    loss_fn = BoxLevelSetLoss({"variant": "released_code"}, MASK_FEAT_CHANNELS)
    probs = logits.sigmoid()
    image = torch.nn.functional.interpolate(inputs.images_norm, size=(8, 8), mode="bilinear",
                                            align_corners=False)
    features = loss_fn.deep_features(inputs.mask_feats, (8, 8))
    got = loss_fn._feature_input(inputs, probs, image, features)
    for k in range(3):
        b = int(im_inds[k])
        low_tree = build_tree_schedule(image[b:b + 1])
        low_weights = tree_edge_weights(image[b:b + 1], low_tree, 0.02)
        low = tree_filter(probs[k:k + 1], low_tree, low_weights)
        high_tree = build_tree_schedule(features[b:b + 1])
        high = tree_filter(low, high_tree, tree_edge_weights(features[b:b + 1], high_tree, 1.0))
        assert (got[k:k + 1] - torch.cat([low, high], dim=1)).abs().max().item() < 1e-5


def test_no_instances_returns_connected_zeros():
    logits = torch.zeros(0, 1, 8, 8, requires_grad=True)
    loss_fn = BoxLevelSetLoss({}, MASK_FEAT_CHANNELS)
    losses = loss_fn(make_inputs(logits, torch.zeros(0, 8, 8), torch.rand(1, 3, 32, 32) * 255))
    assert all(v.item() == 0.0 for v in losses.values())
    sum(losses.values()).backward()
    assert loss_fn.feature_conv.weight.grad is not None


def test_channels_from_cfg_and_bad_config():
    assert BoxLevelSetLoss({"mask_feat_channels": 16}).feature_conv.in_channels == 16
    with pytest.raises(InputError, match="mask_feat_channels"):
        BoxLevelSetLoss({})
    with pytest.raises(InputError, match="released_code"):
        BoxLevelSetLoss({"variant": "released_code", "tree_filter": False}, 8)
    with pytest.raises(InputError, match="variant"):
        BoxLevelSetLoss({"variant": "solo"}, 8)
    with pytest.raises(InputError, match="levelset_gama"):
        BoxLevelSetLoss({"levelset_gama": 1e-5}, 8)
