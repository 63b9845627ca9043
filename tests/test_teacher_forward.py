"""SIM's teacher pass without the classification tower reads exactly what the full forward gave it."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sim_core.model.condinst import DEMO_MODEL_CFG, CondInst, flatten_levels
from sim_core.sim.ema import EMATeacher, batch_statistics
from sim_core.sim.teacher import TeacherPredictions, run_teacher, teacher_forward, teacher_network


def reference_run_teacher(teacher, images_norm, assignment, chunk=256):
    """``run_teacher`` as it was: the full ``net(images_norm)`` forward (BatchNorm on batch statistics)."""
    net = teacher_network(teacher)
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad(), batch_statistics(net):
            out = net(images_norm)
            im, loc = assignment.pos_im_inds, assignment.pos_loc_inds
            probs = []
            for start in range(0, int(loc.numel()), chunk):
                i, l_ = im[start:start + chunk], loc[start:start + chunk]
                logits = net.instance_mask_logits(out.mask_feats, out.controllers[i, l_], out.locations[l_], i,
                                                  out.strides[l_])
                probs.append(logits.sigmoid()[:, 0].float())
            factor = net.mask_head.feat_stride // net.mask_head.out_stride
            h, w = out.mask_feats.shape[-2] * factor, out.mask_feats.shape[-1] * factor
            pos_probs = torch.cat(probs) if probs else out.mask_feats.new_zeros((0, h, w))
            pos_boxes = net.decode_boxes(out.locations[loc], out.box_reg[im, loc]).float()
    finally:
        net.train(was_training)
    return TeacherPredictions(mask_feats=out.mask_feats.detach().float(), pos_probs=pos_probs,
                              pos_boxes=pos_boxes, pos_gt_inds=assignment.pos_gt_inds,
                              num_gts=int(assignment.gt_boxes.shape[0]))


def setup(seed=0, size=64, n=2, cfg=DEMO_MODEL_CFG):
    torch.manual_seed(seed)
    model = CondInst(3, cfg)
    g = torch.Generator().manual_seed(seed + 1)
    images = [torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g) for _ in range(n)]
    targets = [{"boxes": torch.tensor([[6.0, 8.0, 28.0, 30.0], [26.0, 30.0, 58.0, 60.0]]),
                "labels": torch.tensor([0, 2])} for _ in range(n)]
    pre = model.preprocess(images)
    with torch.no_grad():
        assignment = model.assign(model(pre.images_norm), targets)
    # a trained-looking teacher: perturb the EMA copy so it differs from a fresh init
    teacher = EMATeacher(model, 0.99)
    with torch.no_grad():
        for p in teacher.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    return model, teacher, pre.images_norm, assignment


@pytest.mark.parametrize("feat_stride, stride4_input", [(8, "c2"), (4, "c2"), (4, "p2")])
def test_teacher_forward_fields_equal_the_full_forward(feat_stride, stride4_input):
    # p2 with a C2 as wide as the FPN (16 channels): a teacher that fed the branch C2 instead of P2 would
    # run without an error and give other mask features (a defect once hidden in upstream_converge's P2 runs)
    cfg = {**DEMO_MODEL_CFG, "mask_feat_stride": feat_stride, "mask_stride4_input": stride4_input,
           "fpn_channels": 16, "gn_groups": 8}
    _, teacher, images_norm, _ = setup(cfg=cfg)
    net = teacher.model
    assert net.mask_branch.out_stride == feat_stride and net.mask_branch.fuse_at_stride4 == (stride4_input == "p2")
    with torch.no_grad():
        full = net(images_norm)
        part = teacher_forward(net, images_norm)
    for name in ("box_reg", "controllers", "locations", "strides", "mask_feats"):
        assert torch.equal(getattr(part, name), getattr(full, name)), name


def assert_same_predictions(a: TeacherPredictions, b: TeacherPredictions):
    assert torch.equal(a.mask_feats, b.mask_feats)
    assert torch.equal(a.pos_probs, b.pos_probs)
    assert torch.equal(a.pos_boxes, b.pos_boxes)
    assert torch.equal(a.pos_gt_inds, b.pos_gt_inds) and a.num_gts == b.num_gts


def test_run_teacher_equals_the_full_forward_version():
    _, teacher, images_norm, assignment = setup()
    assert assignment.pos_loc_inds.numel() > 0
    assert_same_predictions(run_teacher(teacher, images_norm, assignment),
                            reference_run_teacher(teacher, images_norm, assignment))
    # small chunks, and a bare network instead of the EMA wrapper
    assert_same_predictions(run_teacher(teacher.model, images_norm, assignment, chunk=3),
                            reference_run_teacher(teacher.model, images_norm, assignment, chunk=3))


def test_run_teacher_with_no_positives_and_one_image():
    _, teacher, images_norm, assignment = setup(seed=3, n=1)
    empty = SimpleNamespace(pos_im_inds=assignment.pos_im_inds[:0], pos_loc_inds=assignment.pos_loc_inds[:0],
                            pos_gt_inds=assignment.pos_gt_inds[:0], gt_boxes=assignment.gt_boxes[:0])
    new = run_teacher(teacher, images_norm, empty)
    assert new.pos_probs.shape[0] == 0
    assert_same_predictions(new, reference_run_teacher(teacher, images_norm, empty))
    assert_same_predictions(run_teacher(teacher, images_norm, assignment),
                            reference_run_teacher(teacher, images_norm, assignment))


def test_student_training_mode_is_restored():
    model, _, images_norm, assignment = setup()
    model.train()
    run_teacher(model, images_norm, assignment)
    assert model.training


def test_teacher_head_on_the_students_levels():
    """``sim.teacher_head_input: student`` (the release): the teacher's FCOS head and controllers read the
    student's FPN levels; its mask branch keeps reading the teacher's own features."""
    model, teacher, images_norm, assignment = setup()
    net = teacher.model
    with torch.no_grad():
        student_levels = model(images_norm).pyramid
        own = teacher_forward(net, images_norm)
        mixed = teacher_forward(net, images_norm, head_levels=student_levels)
        box, ctl = net.head.box_outputs(student_levels)
    assert torch.equal(mixed.box_reg, flatten_levels(box)) and torch.equal(mixed.controllers, flatten_levels(ctl))
    assert not torch.equal(mixed.controllers, own.controllers)
    assert torch.equal(mixed.mask_feats, own.mask_feats)
    assert torch.equal(mixed.locations, own.locations)
    pred = run_teacher(teacher, images_norm, assignment, head_levels=student_levels)
    assert not torch.equal(pred.pos_probs, run_teacher(teacher, images_norm, assignment).pos_probs)
    with pytest.raises(ValueError, match="shapes"):
        teacher_forward(net, images_norm, head_levels=student_levels[:-1])
