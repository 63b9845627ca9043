"""BoxInst losses on hand-built MaskLossInputs, checked against hand-computed values."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from baselines.boxinst import (
    BoxInstLoss,
    pairwise_log_same,
    pairwise_loss,
    pairwise_warmup_weight,
    projection_loss,
)
from baselines.lab import (
    batch_color_similarity,
    color_similarity,
    images_to_lab,
    unfold_neighbours,
    valid_at_mask_stride,
)
from sim_core.errors import InputError
from sim_core.model.mask_inputs import MaskLossInputs

COCO128 = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "coco128"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-6,
                 rtol: float = 1e-5) -> None:
    """Element-wise ``|a - e| <= atol + rtol |e|`` (torch.testing's import costs ~2 s)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    excess = (actual - expected).abs() - (atol + rtol * expected.abs())
    assert excess.max().item() <= 0, f"max abs diff {(actual - expected).abs().max().item():.3g}"


def make_inputs(logits: torch.Tensor, boxmasks: torch.Tensor, images_raw: torch.Tensor,
                im_inds: torch.Tensor | None = None, image_valid: torch.Tensor | None = None,
                iteration: int = 100, max_iter: int = 100) -> MaskLossInputs:
    """MaskLossInputs for ``P`` instances with logits ``[P, 1, h, w]`` at stride 4."""
    num = logits.shape[0]
    batch, _, height, width = images_raw.shape
    if im_inds is None:
        im_inds = torch.zeros(num, dtype=torch.long)
    if image_valid is None:
        image_valid = torch.ones(batch, height, width)
    return MaskLossInputs(
        mask_logits=logits,
        mask_feats=torch.zeros(batch, 8, height // 8, width // 8),
        gt_boxes=torch.zeros(num, 4),
        gt_labels=torch.zeros(num, dtype=torch.long),
        gt_inds=torch.arange(num),
        im_inds=im_inds,
        gt_bitmasks=boxmasks.clone(),
        gt_boxmasks=boxmasks,
        images_raw=images_raw,
        images_norm=(images_raw - 120.0) / 60.0,
        image_valid=image_valid,
        iteration=iteration,
        max_iter=max_iter,
    )


def uniform_image(height: int, width: int, rgb=(120.0, 80.0, 40.0)) -> torch.Tensor:
    return torch.tensor(rgb).view(1, 3, 1, 1).expand(1, 3, height, width).clone()


def box_mask(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    m = torch.zeros(h, w)
    m[y0:y1, x0:x1] = 1.0
    return m


# ---------------------------------------------------------------- projection
def test_projection_is_zero_when_mask_equals_box():
    box = box_mask(8, 8, 2, 6, 1, 5)[None, None]
    assert projection_loss(box.clone(), box).item() < 1e-5


def test_projection_matches_hand_calculation_4x4():
    probs = torch.tensor([[0.0, 0.2, 0.0, 0.0],
                          [0.0, 0.6, 0.1, 0.0],
                          [0.0, 0.3, 0.9, 0.0],
                          [0.5, 0.0, 0.0, 0.0]])[None, None]
    box = box_mask(4, 4, 1, 3, 1, 3)[None, None]
    # max over y per column: [0.5, 0.6, 0.9, 0]; box: [0, 1, 1, 0]
    dice_y = 1 - 2 * (0.6 + 0.9) / ((0.25 + 0.36 + 0.81) + 2 + 1e-5)
    # max over x per row: [0.2, 0.6, 0.9, 0.5]; box: [0, 1, 1, 0]
    dice_x = 1 - 2 * (0.6 + 0.9) / ((0.04 + 0.36 + 0.81 + 0.25) + 2 + 1e-5)
    assert projection_loss(probs, box).item() == pytest.approx(dice_y + dice_x, abs=1e-6)


# ---------------------------------------------------------------- pairwise maths
def test_log_space_pairwise_matches_naive_formula():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 6, 7, dtype=torch.float64) * 3
    log_same = pairwise_log_same(logits, kernel=3, dilation=2)
    p = logits.sigmoid()
    neighbours = unfold_neighbours(p, 3, 2)[:, 0]
    naive = torch.log(p * neighbours + (1 - p) * (1 - neighbours))
    inside = unfold_neighbours(torch.ones_like(p), 3, 2)[:, 0] > 0
    assert_close(log_same[inside], naive[inside], atol=1e-12, rtol=1e-10)


def test_log_space_pairwise_is_finite_at_extreme_logits():
    logits = torch.tensor([[50.0, 0.0, -50.0, 0.0, 50.0]]).view(1, 1, 1, 5).requires_grad_()
    log_same = pairwise_log_same(logits, kernel=3, dilation=2)
    # centre 0 (logit 50) and its neighbour at dx=+2 (logit -50): P = 2 e^-50 (naive: log 0)
    right = [k for k, off in enumerate([(-2, -2), (-2, 0), (-2, 2), (0, -2), (0, 2),
                                         (2, -2), (2, 0), (2, 2)]) if off == (0, 2)][0]
    assert log_same[0, right, 0, 0].item() == pytest.approx(-50 + math.log(2), abs=1e-4)
    log_same.sum().backward()
    assert torch.isfinite(log_same).all() and torch.isfinite(logits.grad).all()


def test_pairwise_is_the_mean_over_the_eight_neighbours_of_a_one_pixel_box():
    logits = torch.tensor([[0.3, -1.0, 2.0, 0.5, 1.5],
                           [0.0, 0.7, -0.4, 1.1, 0.2],
                           [-2.0, 0.9, 0.8, -0.3, 0.6],
                           [1.2, -0.8, 0.4, 0.1, -1.5],
                           [0.5, 0.3, -0.7, 2.2, 0.0]]).view(1, 1, 5, 5)
    box = box_mask(5, 5, 2, 3, 2, 3)[None]  # the centre pixel only
    similarity = torch.ones(1, 8, 5, 5)
    loss = pairwise_loss(logits, similarity, box, color_thresh=0.3, kernel=3, dilation=1)
    p = torch.sigmoid(logits[0, 0])
    centre = p[2, 2]
    terms = [-torch.log(centre * p[2 + dy, 2 + dx] + (1 - centre) * (1 - p[2 + dy, 2 + dx]))
             for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-6)


def test_extra_pair_weights_scale_and_normalise():
    torch.manual_seed(1)
    logits = torch.randn(1, 1, 6, 6)
    box = box_mask(6, 6, 1, 5, 1, 5)[None]
    similarity = torch.ones(1, 8, 6, 6)
    plain = pairwise_loss(logits, similarity, box)
    halves = pairwise_loss(logits, similarity, box, pair_weights=torch.full((1, 8, 6, 6), 0.5))
    assert halves.item() == pytest.approx(plain.item(), rel=1e-6)  # uniform factor cancels
    none = pairwise_loss(logits, similarity, box, pair_weights=torch.zeros(1, 8, 6, 6))
    assert none.item() == 0.0


# ---------------------------------------------------------------- colour similarity
def test_color_similarity_hand_values_and_invalid_neighbours():
    lab = torch.zeros(1, 3, 1, 3)
    lab[0, :, 0, 0] = torch.tensor([50.0, 0.0, 0.0])
    lab[0, :, 0, 1] = torch.tensor([53.0, 4.0, 0.0])  # distance 5 from pixel 0
    lab[0, :, 0, 2] = torch.tensor([50.0, 0.0, 0.0])
    valid = torch.tensor([[[1.0, 1.0, 0.0]]])
    sim = color_similarity(lab, valid, kernel=3, dilation=1)
    right = 4  # offsets row-major without centre: index 4 is (0, +1)
    left = 3
    assert sim[0, right, 0, 0].item() == pytest.approx(math.exp(-2.5), rel=1e-5)
    assert sim[0, left, 0, 1].item() == pytest.approx(math.exp(-2.5), rel=1e-5)
    assert sim[0, right, 0, 1].item() == 0.0  # neighbour is padding
    assert sim[0, left, 0, 0].item() == 0.0  # neighbour outside the map
    assert sim[0, 0].abs().sum().item() == 0.0  # row above does not exist


def test_lab_of_white_and_black():
    images = torch.stack([torch.full((3, 4, 4), 255.0), torch.zeros(3, 4, 4)])
    lab = images_to_lab(images, stride=4)
    assert lab.shape == (2, 3, 1, 1)
    assert lab[0, 0].item() == pytest.approx(100.0, abs=1e-3)
    assert lab[1].abs().max().item() < 1e-4


def test_valid_at_stride_drops_padding_and_bottom_rows():
    valid = torch.zeros(2, 32, 32)
    valid[0, :24, :20] = 1.0  # real image 24 x 20, rest padding
    valid[1] = 1.0
    out = valid_at_mask_stride(valid, stride=4, ignore_bottom_px=10)
    # cell rows sample pixel rows 2, 6, 10, ...: image 0 keeps rows < 14 -> cells 0..2
    assert out[0].sum(dim=1).tolist() == [5, 5, 5, 0, 0, 0, 0, 0]
    assert out[1].sum(dim=1).tolist() == [8, 8, 8, 8, 8, 0, 0, 0]  # rows < 22: 2, 6, .., 18
    assert valid_at_mask_stride(valid, 4, 0)[0].sum().item() == 6 * 5


# ---------------------------------------------------------------- the module
def test_module_pairwise_on_uniform_colour_box_is_minus_log_same():
    logit = 0.8
    logits = torch.full((1, 1, 8, 8), logit)
    box = box_mask(8, 8, 2, 6, 2, 6)[None]
    loss = BoxInstLoss({"ignore_bottom_px": 0})(make_inputs(logits, box, uniform_image(32, 32)))
    p = 1 / (1 + math.exp(-logit))
    assert loss["loss_pairwise"].item() == pytest.approx(-math.log(p * p + (1 - p) ** 2), rel=1e-5)


def test_pairs_outside_the_box_contribute_nothing():
    torch.manual_seed(2)
    logits = torch.randn(1, 1, 12, 12) * 30  # wild values far from the box
    logits[..., 1:9, 1:9] = -0.4  # the box (3..6) plus its dilation-2 ring
    logits.requires_grad_()
    box = box_mask(12, 12, 3, 7, 3, 7)[None]
    loss = BoxInstLoss({"ignore_bottom_px": 0})(make_inputs(logits, box, uniform_image(48, 48)))
    p = 1 / (1 + math.exp(0.4))
    assert loss["loss_pairwise"].item() == pytest.approx(-math.log(p * p + (1 - p) ** 2), rel=1e-5)
    loss["loss_pairwise"].backward()
    far = torch.ones(12, 12, dtype=torch.bool)
    far[1:9, 1:9] = False
    assert logits.grad[0, 0][far].abs().max().item() == 0.0


def test_pairs_under_the_colour_threshold_contribute_nothing():
    image = uniform_image(32, 32, (230.0, 20.0, 20.0))
    image[..., 16:] = torch.tensor([20.0, 20.0, 230.0]).view(1, 3, 1, 1)  # red | blue at cell 4
    logits = torch.full((1, 1, 8, 8), 20.0)
    logits[..., 4:] = -20.0  # the mask follows the colour edge
    box = torch.ones(1, 8, 8)
    inputs = make_inputs(logits, box, image)
    with_thresh = BoxInstLoss({"ignore_bottom_px": 0})(inputs)["loss_pairwise"]
    assert with_thresh.item() < 1e-6  # only same-colour pairs: P(same) ~ 1
    no_thresh = BoxInstLoss({"ignore_bottom_px": 0, "pairwise_color_thresh": 0.0})(inputs)
    assert no_thresh["loss_pairwise"].item() > 1.0  # cross-edge pairs now cost ~20 each


def test_warmup_weight_at_start_half_and_end():
    cfg = {"pairwise_weight": 2.0, "pairwise_warmup_frac": 0.5}
    assert pairwise_warmup_weight(0, 100, cfg) == 0.0
    assert pairwise_warmup_weight(25, 100, cfg) == pytest.approx(1.0)
    assert pairwise_warmup_weight(50, 100, cfg) == pytest.approx(2.0)
    assert pairwise_warmup_weight(90, 100, cfg) == pytest.approx(2.0)
    assert pairwise_warmup_weight(0, 100, {"pairwise_warmup_frac": 0.0}) == 1.0
    logits = torch.randn(1, 1, 8, 8)
    box = box_mask(8, 8, 2, 6, 2, 6)[None]
    inputs = make_inputs(logits, box, uniform_image(32, 32), iteration=0, max_iter=90)
    assert BoxInstLoss()(inputs)["loss_pairwise"].item() == 0.0


def test_gradients_are_finite_for_empty_one_pixel_and_border_boxes():
    torch.manual_seed(3)
    logits = (torch.randn(3, 1, 8, 8) * 5).requires_grad_()
    boxes = torch.stack([torch.zeros(8, 8), box_mask(8, 8, 3, 4, 5, 6), box_mask(8, 8, 0, 8, 5, 8)])
    images = torch.rand(2, 3, 32, 32) * 255
    inputs = make_inputs(logits, boxes, images, im_inds=torch.tensor([0, 1, 1]))
    losses = BoxInstLoss({"ignore_bottom_px": 0})(inputs)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert torch.isfinite(logits.grad).all()


def test_no_instances_returns_connected_zeros():
    logits = torch.zeros(0, 1, 8, 8, requires_grad=True)
    losses = BoxInstLoss()(make_inputs(logits, torch.zeros(0, 8, 8), uniform_image(32, 32)))
    assert set(losses) == {"loss_proj", "loss_pairwise"}
    assert all(v.item() == 0.0 and v.requires_grad for v in losses.values())


def test_bad_config_is_an_input_error():
    # the trainer adds the mask-branch width to every section: accepted, not a setting
    assert "mask_feat_channels" not in BoxInstLoss({"mask_feat_channels": 16}).cfg
    with pytest.raises(InputError, match="pairwise_colour_thresh"):
        BoxInstLoss({"pairwise_colour_thresh": 0.3})
    with pytest.raises(InputError, match="pairwise_weight"):
        BoxInstLoss({"pairwise_weight": -1.0})
    with pytest.raises(InputError, match="pairwise_kernel"):
        BoxInstLoss({"pairwise_kernel": 4})


def test_colour_similarity_on_a_real_coco_image():
    if not COCO128.exists():
        pytest.skip(f"coco128 not found at {COCO128}")
    from PIL import Image
    import numpy as np

    path = sorted((COCO128 / "images").glob("*.jpg"))[0]
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    h, w = rgb.shape[:2]
    height, width = (h + 31) // 32 * 32, (w + 31) // 32 * 32
    images = torch.zeros(1, 3, height, width)
    images[0, :, :h, :w] = torch.from_numpy(rgb).permute(2, 0, 1)
    valid = torch.zeros(1, height, width)
    valid[0, :h, :w] = 1.0
    sim = batch_color_similarity(images, valid, stride=4, ignore_bottom_px=10)
    assert sim.shape == (1, 8, height // 4, width // 4)
    assert torch.isfinite(sim).all() and sim.min() >= 0 and sim.max() <= 1
    # no pair points into the padding or the removed bottom rows
    cells_valid = valid_at_mask_stride(valid, 4, 10)[0]
    down = 6  # offset (+2, 0)
    last_valid_row = int(cells_valid.sum(dim=1).nonzero().max())
    assert sim[0, down, last_valid_row - 1:].abs().sum().item() == 0.0
    # a real photo has both similar (>= 0.3) and dissimilar neighbours
    inner = sim[0][:, : last_valid_row - 2, 1: w // 4 - 2]
    assert (inner >= 0.3).float().mean() > 0.05 and (inner < 0.3).float().mean() > 0.05


def test_channel_distance_equals_vector_norm():
    from baselines.lab import channel_distance

    a, b = torch.randn(2, 3, 1, 5, 6), torch.randn(2, 3, 8, 5, 6)
    expected = torch.linalg.vector_norm(a - b, dim=1)
    assert torch.allclose(channel_distance(a, b), expected, atol=1e-6)
    assert channel_distance(a, a.clone()).abs().max() == 0
