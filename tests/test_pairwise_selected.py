"""BoxInst's pairwise term evaluated on the selected pairs only equals the dense formula.

``pairwise_loss`` gathers the pairs of non-zero weight before the
``logaddexp``; the reference below is the formula it replaced (every pixel
and neighbour ``[P, K, h, w]``, times mostly-zero weights). Values and
gradients must agree to float rounding (the two sums run in another order).
"""
from __future__ import annotations

import pytest
import torch

from baselines.boxinst import (BoxInstLoss, pairwise_log_same, pairwise_log_same_at, pairwise_loss,
                               pairwise_loss_dense, pairwise_warmup_weight)
from baselines.lab import neighbour_offsets, unfold_neighbours
from sim_core.model.mask_inputs import MaskLossInputs


def reference_loss(logits, similarity, boxes, thresh=0.3, kernel=3, dilation=2, pair_weights=None):
    """The formula before the change, written out."""
    log_fg = torch.nn.functional.logsigmoid(logits)
    log_bg = torch.nn.functional.logsigmoid(-logits)
    log_same = torch.logaddexp(log_fg + unfold_neighbours(log_fg, kernel, dilation)[:, 0],
                               log_bg + unfold_neighbours(log_bg, kernel, dilation)[:, 0])
    boxes = boxes.reshape(boxes.shape[0], 1, *boxes.shape[-2:]).to(log_same.dtype)
    weights = ((similarity >= thresh) & (similarity > 0)).to(log_same.dtype) * boxes
    if pair_weights is not None:
        weights = weights * pair_weights
    return -(log_same * weights).sum() / weights.sum().clamp(min=1.0)


def random_case(num, height, width, kernel=3, seed=0, zero_frac=0.2, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    k = kernel * kernel - 1
    logits = (torch.randn(num, 1, height, width, generator=g, dtype=dtype) * 4)
    similarity = torch.rand(num, k, height, width, generator=g, dtype=dtype)
    similarity[torch.rand(similarity.shape, generator=g) < zero_frac] = 0.0
    boxes = torch.zeros(num, height, width, dtype=dtype)
    for p in range(num):
        y0 = torch.randint(0, height, (1,), generator=g).item()
        x0 = torch.randint(0, width, (1,), generator=g).item()
        y1 = torch.randint(y0 + 1, height + 1, (1,), generator=g).item()
        x1 = torch.randint(x0 + 1, width + 1, (1,), generator=g).item()
        boxes[p, y0:y1, x0:x1] = 1.0
    return logits, similarity, boxes


def assert_same(new_fn, ref_fn, logits, rtol=1e-6, atol=1e-7):
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    new = new_fn(a)
    ref = ref_fn(b)
    new.backward()
    ref.backward()
    assert torch.allclose(new, ref, rtol=rtol, atol=atol), (new.item(), ref.item())
    # gradient entries that nearly cancel: absolute slack relative to the largest entry
    scale = b.grad.abs().max().item() if b.grad.numel() else 0.0
    assert torch.allclose(a.grad, b.grad, rtol=rtol, atol=rtol * scale + 1e-30), (a.grad - b.grad).abs().max()
    return new


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("thresh", [0.0, 0.3, 0.7])
@pytest.mark.parametrize("kernel,dilation", [(3, 2), (3, 1), (5, 1)])
def test_selected_pairs_match_dense_formula(seed, thresh, kernel, dilation):
    logits, similarity, boxes = random_case(5, 9, 11, kernel, seed)
    # random similarities select neighbours outside the map too: the padded logits must match
    assert_same(lambda x: pairwise_loss(x, similarity, boxes, thresh, kernel, dilation),
                lambda x: reference_loss(x, similarity, boxes, thresh, kernel, dilation), logits)
    assert_same(lambda x: pairwise_loss(x, similarity, boxes, thresh, kernel, dilation),
                lambda x: pairwise_loss_dense(x, similarity, boxes, thresh, kernel, dilation), logits)


def test_float64_agrees_to_rounding():
    logits, similarity, boxes = random_case(7, 16, 16, seed=3, dtype=torch.float64)
    assert_same(lambda x: pairwise_loss(x, similarity, boxes),
                lambda x: reference_loss(x, similarity, boxes), logits, rtol=1e-12, atol=1e-14)


def test_demo_sized_batch():
    logits, similarity, boxes = random_case(128, 32, 32, seed=5, zero_frac=0.6)
    assert_same(lambda x: pairwise_loss(x, similarity, boxes),
                lambda x: reference_loss(x, similarity, boxes), logits)


def test_pair_weights_value_and_their_gradient():
    logits, similarity, boxes = random_case(4, 8, 10, seed=1)
    g = torch.Generator().manual_seed(9)
    factor = torch.rand(similarity.shape, generator=g)
    fa, fb = factor.clone().requires_grad_(), factor.clone().requires_grad_()
    assert_same(lambda x: pairwise_loss(x, similarity, boxes, pair_weights=fa),
                lambda x: reference_loss(x, similarity, boxes, pair_weights=fb), logits)
    assert torch.allclose(fa.grad, fb.grad, rtol=1e-6, atol=1e-6 * fb.grad.abs().max().item())


def test_per_image_similarity_with_im_inds_equals_per_instance():
    logits, _, boxes = random_case(6, 8, 8, seed=2)
    g = torch.Generator().manual_seed(4)
    per_image = torch.rand(3, 8, 8, 8, generator=g)
    im_inds = torch.tensor([2, 0, 0, 1, 2, 2])
    assert_same(lambda x: pairwise_loss(x, per_image, boxes, im_inds=im_inds),
                lambda x: reference_loss(x, per_image[im_inds], boxes), logits)


def test_non_binary_box_weights():
    logits, similarity, boxes = random_case(3, 7, 9, seed=6)
    boxes = boxes * torch.linspace(0.1, 2.0, 9)
    assert_same(lambda x: pairwise_loss(x, similarity, boxes),
                lambda x: reference_loss(x, similarity, boxes), logits)


@pytest.mark.parametrize("case", ["no_pairs_above_threshold", "empty_boxes", "zero_similarity",
                                  "one_instance", "one_pixel_box", "no_instances"])
def test_edge_cases(case):
    logits, similarity, boxes = random_case(3, 6, 7, seed=8)
    thresh = 0.3
    if case == "no_pairs_above_threshold":
        thresh = 1.5
    elif case == "empty_boxes":
        boxes = torch.zeros_like(boxes)
    elif case == "zero_similarity":
        similarity = torch.zeros_like(similarity)
        thresh = 0.0  # a threshold of 0 still drops similarity-0 pairs
    elif case == "one_instance":
        logits, similarity, boxes = logits[:1], similarity[:1], boxes[:1]
    elif case == "one_pixel_box":
        boxes = torch.zeros_like(boxes)
        boxes[1, 0, 6] = 1.0  # a corner: most of its neighbours are outside the map
        similarity = torch.ones_like(similarity)
    elif case == "no_instances":
        logits, similarity, boxes = logits[:0], similarity[:0], boxes[:0]
    loss = assert_same(lambda x: pairwise_loss(x, similarity, boxes, thresh),
                       lambda x: reference_loss(x, similarity, boxes, thresh), logits)
    if case in ("no_pairs_above_threshold", "empty_boxes", "zero_similarity", "no_instances"):
        assert loss.item() == 0.0


def test_log_same_at_reads_the_dense_map():
    logits, _, _ = random_case(3, 5, 6, kernel=5, seed=11)
    dense = pairwise_log_same(logits, 5, 1)
    inst, k, y, x = torch.meshgrid(*(torch.arange(n) for n in dense.shape), indexing="ij")
    picked = pairwise_log_same_at(logits, inst.reshape(-1), k.reshape(-1), (y * 6 + x).reshape(-1), 5, 1)
    assert torch.equal(picked, dense.reshape(-1))
    assert len(neighbour_offsets(5, 1)) == dense.shape[1]


def test_shape_mismatch_is_an_error():
    logits, similarity, boxes = random_case(2, 6, 6)
    with pytest.raises(ValueError):
        pairwise_loss(logits, similarity[:, :4], boxes)
    with pytest.raises(ValueError):
        pairwise_loss(logits, similarity[:1], boxes)
    with pytest.raises(ValueError):
        pairwise_loss(logits, similarity, boxes, im_inds=torch.zeros(3, dtype=torch.long))


def _inputs(logits, boxes, images_raw, im_inds, image_valid):
    num = logits.shape[0]
    batch, _, height, width = images_raw.shape
    return MaskLossInputs(
        mask_logits=logits, mask_feats=torch.zeros(batch, 8, height // 8, width // 8),
        gt_boxes=torch.zeros(num, 4), gt_labels=torch.zeros(num, dtype=torch.long),
        gt_inds=torch.arange(num), im_inds=im_inds, gt_bitmasks=boxes.clone(), gt_boxmasks=boxes,
        images_raw=images_raw, images_norm=(images_raw - 120.0) / 60.0, image_valid=image_valid,
        iteration=50, max_iter=100)


def test_boxinst_pairwise_term_matches_dense_formula_on_images():
    g = torch.Generator().manual_seed(12)
    images = (torch.rand(3, 3, 64, 64, generator=g) * 40 + torch.rand(3, 3, 1, 1, generator=g) * 200)
    images[:, :, 20:40, 10:50] = 30.0  # a flat region: many similar pairs
    valid = torch.ones(3, 64, 64)
    valid[1, 48:] = 0.0  # padding in one image
    im_inds = torch.tensor([0, 1, 1, 2, 2])
    _, _, boxes = random_case(5, 16, 16, seed=13)
    logits = torch.randn(5, 1, 16, 16, generator=g) * 3
    loss_fn = BoxInstLoss()
    inputs = _inputs(logits, boxes, images, im_inds, valid)
    similarity = loss_fn.image_similarity(inputs)
    cfg = loss_fn.cfg
    ramp = pairwise_warmup_weight(50, 100, cfg)

    def new(x):
        return loss_fn.pairwise_term(_inputs(x, boxes, images, im_inds, valid), image_similarity=similarity)

    def ref(x):
        return reference_loss(x, similarity[im_inds], boxes, cfg["pairwise_color_thresh"],
                              cfg["pairwise_kernel"], cfg["pairwise_dilation"]) * ramp

    loss = assert_same(new, ref, logits)
    assert loss.item() > 0
