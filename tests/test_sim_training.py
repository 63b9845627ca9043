"""EMA teacher, SIM's training state (checkpoints, hooks) and one SIM step on the shared detector."""
from __future__ import annotations

import io
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from baselines import build_mask_loss
from sim_core.model.condinst import DEMO_MODEL_CFG, CondInst
from sim_core.sim.ema import EMATeacher, batch_statistics
from sim_core.sim.sim_loss import SIMLoss, SIMStepRecord
from sim_core.sim.trainer_hooks import SIMTrainingState


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.bn = nn.BatchNorm1d(2)


def test_ema_update_is_the_momentum_average_and_buffers_are_copied():
    torch.manual_seed(0)
    student = _Tiny()
    teacher = EMATeacher(student, momentum=0.9)
    assert not any(p.requires_grad for p in teacher.parameters())
    before = teacher.model.lin.weight.clone()
    with torch.no_grad():
        student.lin.weight.add_(1.0)
        student.bn.running_mean.fill_(3.0)
        student.bn.num_batches_tracked.fill_(5)
    teacher.update(student)
    assert torch.allclose(teacher.model.lin.weight, 0.9 * before + 0.1 * student.lin.weight)
    assert torch.equal(teacher.model.bn.running_mean, torch.full((2,), 3.0))
    assert int(teacher.model.bn.num_batches_tracked) == 5
    teacher.train()
    assert not teacher.model.training  # stays in eval mode
    restored = EMATeacher(_Tiny(), momentum=0.9)
    restored.load_state_dict(teacher.state_dict())
    assert torch.equal(restored.model.lin.weight, teacher.model.lin.weight)
    assert float(teacher.parameter_distance(student)) > 0
    with pytest.raises(ValueError):
        EMATeacher(student, momentum=1.5)


def _batch(seed: int, n_images: int = 2):
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n_images):
        masks = torch.zeros(2, 64, 96, dtype=torch.uint8)
        masks[0, 10:40, 8:30] = 1
        masks[1, 20:50, 40:80] = 1
        images.append(torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8, generator=g))
        targets.append({"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 10.0, 90.0, 60.0]]),
                        "labels": torch.tensor([0, 2]), "masks": masks})
    return images, targets


def _setup(extra: dict | None = None, model_cfg: dict | None = None):
    torch.manual_seed(0)
    model_cfg = {**DEMO_MODEL_CFG, **(model_cfg or {})}
    model = CondInst(3, model_cfg)
    cfg = {"boxinst": {}, "mask_feat_channels": DEMO_MODEL_CFG["mask_out_channels"], **(extra or {})}
    loss = build_mask_loss("sim", cfg)
    state = SIMTrainingState(model, loss, cfg, num_classes=3, seed=0, build_model=lambda: CondInst(3, model_cfg))
    return model, loss, state


def _bank_entry(label: int = 1) -> dict:
    mask = torch.zeros(20, 20, dtype=torch.bool)
    mask[2:18, 4:16] = True
    return {"crops": [torch.full((3, 20, 20), 90, dtype=torch.uint8)], "masks": [mask],
            "origins": torch.tensor([[50, 30]]), "boxes": torch.tensor([[50.0, 30.0, 70.0, 50.0]]),
            "labels": torch.tensor([label]), "scores": torch.tensor([0.9])}


def _step(model, loss, state, iteration: int, max_iter: int = 10, seed: int = 0):
    images, targets = _batch(seed)
    images, targets = state.before_step(images, targets, iteration)
    losses = model.training_losses(images, targets, loss, iteration, max_iter, extras=state.extras())
    return losses, targets


def test_batch_statistics_normalises_with_the_batch_and_leaves_running_statistics_alone():
    """The teacher pass's BatchNorm: batch mean/var of the input, buffers and flags unchanged afterwards."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    bn = net[1]
    bn.running_mean.fill_(5.0)
    bn.running_var.fill_(9.0)
    bn.num_batches_tracked.fill_(7)
    net.eval()
    x = torch.randn(4, 3, 8, 8) * 3 + 2
    with torch.no_grad(), batch_statistics(net):
        assert bn.training and not net[0].training
        out = net(x)
    conv = net[0](x).detach()
    mean, var = conv.mean(dim=(0, 2, 3)), conv.var(dim=(0, 2, 3), unbiased=False)
    expected = torch.relu((conv - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + bn.eps)
                          * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1))
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.equal(bn.running_mean, torch.full((4,), 5.0)) and torch.equal(bn.running_var, torch.full((4,), 9.0))
    assert int(bn.num_batches_tracked) == 7 and bn.momentum == 0.1 and not bn.training
    with torch.no_grad():  # outside the block: the running statistics again
        again = net(x)
    assert not torch.allclose(again, out, atol=1e-3)


def test_teacher_pass_uses_batch_statistics_in_a_batchnorm_backbone():
    """run_teacher's masks are those of the teacher with batch-statistics BatchNorm, not its running statistics."""
    from sim_core.sim.teacher import run_teacher

    torch.manual_seed(0)
    student = CondInst(3, dict(DEMO_MODEL_CFG, tiny_norm="BN"))  # the demo's BatchNorm backbone
    teacher = EMATeacher(student, momentum=0.9)
    layers = [m for m in teacher.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert layers
    for m in layers:  # running statistics far from any batch's
        m.running_mean.fill_(3.0)
        m.running_var.fill_(0.01)
    images = torch.randn(2, 3, 64, 64)
    assignment = SimpleNamespace(pos_im_inds=torch.tensor([0, 1]), pos_loc_inds=torch.tensor([3, 5]),
                                 pos_gt_inds=torch.tensor([0, 1]), gt_boxes=torch.tensor([[0., 0, 9, 9], [1, 1, 20, 20]]))
    pred = run_teacher(teacher, images, assignment)
    net = teacher.model
    with torch.no_grad(), batch_statistics(net):
        feats = net(images).mask_feats
    with torch.no_grad():
        running = net(images).mask_feats
    assert torch.allclose(pred.mask_feats, feats.float(), atol=1e-5)
    assert not torch.allclose(pred.mask_feats, running.float(), atol=1e-2)


def test_one_sim_training_step_gives_finite_losses_and_updates_the_state():
    model, loss, state = _setup({"pseudo_start_frac": 0.0, "paste_prob": 1.0, "confident_thresh": 0.0})
    state.copy_paste.bank.push(_bank_entry())
    proto_before = state.prototypes.prototypes.clone()
    teacher_before = state.teacher.model.head.cls_logits.weight.clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    losses, targets = _step(model, loss, state, iteration=0)
    assert set(losses) >= {"loss_proj", "loss_pairwise", "loss_pseudo", "loss_paste", "loss_cls"}
    assert all(math.isfinite(float(v.detach())) for v in losses.values())
    assert all(t["pasted"].tolist() == [False, False, True] for t in targets)
    assert losses["loss_pseudo"].item() > 0 and losses["loss_paste"].item() > 0
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    opt.step()
    assert len(state.records) == 1
    state.after_step(model, 0)
    assert state.records == []
    assert not torch.equal(state.prototypes.prototypes, proto_before)  # confident pixels moved prototypes
    assert not torch.equal(state.teacher.model.head.cls_logits.weight, teacher_before)
    expected = 0.9999 * teacher_before + 0.0001 * model.head.cls_logits.weight
    assert torch.allclose(state.teacher.model.head.cls_logits.weight, expected, atol=1e-7)


def test_released_code_variant_step_is_finite():
    model, loss, state = _setup({"variant": "released_code", "paste_prob": 1.0})
    for _ in range(49):  # the released code pastes only from a full bank (50 entries)
        state.copy_paste.bank.push(_bank_entry())
    losses, _ = _step(model, loss, state, iteration=5)
    assert losses["loss_paste"].item() == 0.0  # 49 of 50: nothing pasted yet
    state.copy_paste.bank.push(_bank_entry())
    losses, _ = _step(model, loss, state, iteration=5)
    assert all(math.isfinite(float(v.detach())) for v in losses.values())
    # An untrained teacher is unsure everywhere (M ~ 0.5-0.6): with tau_high >= 0.7, tau_low = 0.4 and
    # nothing outside the box, every pixel is ignored, so the released code's L_pseudo is exactly 0.
    assert losses["loss_pseudo"].item() == 0.0 and losses["loss_paste"].item() > 0
    with torch.no_grad():  # a confident teacher: the last dynamic-head bias pushes its masks to ~1
        state.teacher.model.head.controller.bias[-1] = 10.0
    losses, _ = _step(model, loss, state, iteration=5)
    assert losses["loss_pseudo"].item() > 0  # gate 10 * 10000 / 90000 passed; weight 0.3 * 6 / 30 > 0
    assert losses["loss_pairwise"].item() > 0


def test_pseudo_loss_waits_for_the_warm_up_and_attach_works_without_extras():
    model, loss, state = _setup({"copy_paste": False})
    images, targets = _batch(1)
    early = model.training_losses(images, targets, loss, 0, 90)  # no extras: attached state is used
    late = model.training_losses(images, targets, loss, 10, 90)
    assert early["loss_pseudo"].item() == 0.0 and early["loss_paste"].item() == 0.0
    assert late["loss_pseudo"].item() > 0
    bare = SIMLoss({"boxinst": {}})
    with pytest.raises(ValueError, match="teacher"):
        model.training_losses(images, targets, bare, 0, 90)


def test_push_record_banks_teacher_segmented_instances():
    _, _, state = _setup({"pseudo_start_frac": 0.5})
    maps = torch.zeros(3, 8, 8)
    maps[0, 1:5, 1:5] = 0.9  # confident inside GT 0's box
    maps[1, :, :] = 0.9  # GT 1 was pasted: never banked
    maps[2, 0:2, 0:2] = 0.95  # image 1
    rec = SIMStepRecord(proto_sums=None, proto_counts=None,
                        images=[torch.zeros(3, 32, 32, dtype=torch.uint8), torch.ones(3, 32, 32, dtype=torch.uint8)],
                        gt_boxes=torch.tensor([[0.0, 0.0, 24.0, 24.0], [0.0, 0.0, 32.0, 32.0], [0.0, 0.0, 10.0, 10.0]]),
                        gt_labels=torch.tensor([0, 1, 2]), gt_im_inds=torch.tensor([0, 0, 1]), instance_maps=maps,
                        bankable=torch.tensor([True, False, True]), iteration=2, max_iter=10)
    assert not state.bank_open(rec)  # still in the warm-up
    rec.iteration = 5
    assert state.bank_open(rec)
    # the released code too fills its bank only once L_pseudo is on (iteration 10000 of 90000)
    _, _, released = _setup({"variant": "released_code"})
    assert not released.bank_open(SIMStepRecord(**{**rec.__dict__, "iteration": 1}))
    assert released.bank_open(SIMStepRecord(**{**rec.__dict__, "iteration": 2}))
    state.push_record(rec)
    bank = state.copy_paste.bank
    assert len(bank) == 2
    first = bank.entries[0]
    assert first["labels"].tolist() == [0]
    assert first["origins"].tolist() == [[0, 0]]
    assert bool(first["masks"][0][6:18, 6:18].all()) and not bool(first["masks"][0][20:, 20:].any())


def test_state_checkpoint_restores_teacher_prototypes_and_bank():
    model, loss, state = _setup()
    state.copy_paste.bank.push(_bank_entry(2))
    state.prototypes.prototypes.mul_(-1.0)
    with torch.no_grad():
        state.teacher.model.head.ctr_pred.bias.fill_(0.25)
    buffer = io.BytesIO()
    torch.save({"sim": state.state_dict()}, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    _, _, fresh = _setup()
    assert not torch.equal(fresh.prototypes.prototypes, state.prototypes.prototypes)
    fresh.load_state_dict(loaded["sim"])
    assert torch.equal(fresh.prototypes.prototypes, state.prototypes.prototypes)
    assert float(fresh.teacher.model.head.ctr_pred.bias[0]) == 0.25
    assert len(fresh.copy_paste.bank) == 1 and fresh.copy_paste.bank.entries[0]["labels"].tolist() == [2]
    images, targets = _batch(3)
    a = state.before_step(images, targets, 0)
    b = fresh.before_step(images, targets, 0)
    assert all(torch.equal(x["boxes"], y["boxes"]) for x, y in zip(a[1], b[1]))  # same random decisions


def test_ema_teacher_can_start_from_other_weights_of_the_same_structure():
    torch.manual_seed(0)
    student, start = _Tiny(), _Tiny()
    teacher = EMATeacher(student, momentum=0.9, start_from=start)
    assert torch.equal(teacher.model.lin.weight, start.lin.weight)
    assert teacher.model is not start  # a copy: training the start model later cannot move the teacher
    teacher.update(student)
    assert torch.allclose(teacher.model.lin.weight, 0.9 * start.lin.weight + 0.1 * student.lin.weight)
    with pytest.raises(ValueError, match="differ in structure"):
        EMATeacher(student, start_from=nn.Linear(2, 2))


def test_independent_teacher_is_its_own_deterministic_draw_and_leaves_the_run_alone():
    """``sim.teacher_init: independent`` (the release's separately built teacher): the teacher starts
    from weights of its own; the student and every later random draw are those of the mean-teacher run."""
    runs = {}
    for init in ("student", "independent", "independent"):
        model, _, state = _setup({"teacher_init": init})
        runs.setdefault(init, []).append((model, state, torch.rand(3)))
    (mean_student, mean_state, mean_next), = runs["student"]
    (student_a, state_a, next_a), (_, state_b, _) = runs["independent"]
    assert float(mean_state.teacher.parameter_distance(mean_student)) == 0.0
    assert float(state_a.teacher.parameter_distance(student_a)) > 0.1
    assert all(torch.equal(a, b) for a, b in zip(student_a.state_dict().values(), mean_student.state_dict().values()))
    assert torch.equal(next_a, mean_next)  # the global generator did not move
    assert all(torch.equal(a, b) for a, b in zip(state_a.teacher.state_dict().values(),
                                                 state_b.teacher.state_dict().values()))
    cfg = {"boxinst": {}, "mask_feat_channels": DEMO_MODEL_CFG["mask_out_channels"], "teacher_init": "independent"}
    with pytest.raises(ValueError, match="build_model"):
        SIMTrainingState(student_a, None, cfg, num_classes=3)


def test_teacher_head_input_reaches_the_teacher_pass(monkeypatch):
    """``sim.teacher_head_input: student`` hands the student's own FPN levels (this forward's) to the teacher
    pass; the default hands none."""
    import sim_core.sim.sim_loss as sim_loss_module

    seen = []
    real = sim_loss_module.run_teacher

    def spy(teacher, images_norm, assignment, head_levels=None):
        seen.append(head_levels)
        return real(teacher, images_norm, assignment, head_levels=head_levels)

    monkeypatch.setattr(sim_loss_module, "run_teacher", spy)
    levels = []
    for mode in ("teacher", "student"):
        model, loss, state = _setup({"teacher_head_input": mode})
        original_forward = model.forward

        def forward(images_norm, _f=original_forward):
            out = _f(images_norm)
            levels.append(out.pyramid)
            return out

        model.forward = forward
        losses, _ = _step(model, loss, state, iteration=5)
        assert all(math.isfinite(v.item()) for v in losses.values())
    assert seen[0] is None
    assert seen[1] is levels[-1] and len(seen[1]) == len(model.fpn_strides)


def test_batch_without_objects_keeps_every_term_finite_and_zero():
    model, loss, state = _setup({"pseudo_start_frac": 0.0, "paste_prob": 1.0})
    images = [torch.zeros(3, 64, 96, dtype=torch.uint8)] * 2
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
                "masks": torch.zeros(0, 64, 96, dtype=torch.uint8)}] * 2
    images, targets = state.before_step(images, targets, 0)
    losses = model.training_losses(images, targets, loss, 0, 10, extras=state.extras())
    assert {k: losses[k].item() for k in ("loss_proj", "loss_pairwise", "loss_pseudo", "loss_paste")} == {
        "loss_proj": 0.0, "loss_pairwise": 0.0, "loss_pseudo": 0.0, "loss_paste": 0.0}
    sum(losses.values()).backward()
    state.after_step(model, 0)
    assert len(state.copy_paste.bank) == 0


def test_sim_step_with_stride4_mask_features_keeps_teacher_maps_on_the_mask_grid():
    """With ``mask_feat_stride: 4`` the teacher's positive masks and M_I stay at H/4 (no x2 upsampling)."""
    from sim_core.sim.teacher import run_teacher

    model, loss, state = _setup({"pseudo_start_frac": 0.0, "confident_thresh": 0.0}, {"mask_feat_stride": 4})
    images, targets = _batch(0)
    losses = model.training_losses(images, targets, loss, 0, 10, extras=state.extras())
    assert all(math.isfinite(float(v.detach())) for v in losses.values()) and losses["loss_pseudo"].item() > 0
    pre = model.preprocess(images)
    assignment = model.assign(model(pre.images_norm), targets)
    pred = run_teacher(state.teacher, pre.images_norm, assignment)
    assert pred.mask_feats.shape[-2:] == (16, 24)  # 64 x 96 input at stride 4
    assert pred.pos_probs.shape[1:] == (16, 24)


def test_paste_dice_mean_reaches_the_paste_loss():
    """``sim.paste_dice_mean: sampled`` (the release): the Dice of L_paste is averaged over every sampled
    instance, the ones not pasted counting 1, so with unpasted rows in the batch the loss is higher."""
    values = {}
    for mode in ("pasted", "sampled"):
        model, loss, state = _setup({"pseudo_start_frac": 0.0, "paste_prob": 1.0, "paste_dice_mean": mode})
        state.copy_paste.bank.push(_bank_entry())
        losses, targets = _step(model, loss, state, iteration=0)
        assert all(t["pasted"].tolist() == [False, False, True] for t in targets)
        values[mode] = losses["loss_paste"].item()
    assert 0 < values["pasted"] < values["sampled"] <= values["pasted"] + 1


def _two_image_record(bankable: list[bool]) -> SIMStepRecord:
    maps = torch.zeros(3, 8, 8)
    maps[0, 1:5, 1:5] = 0.9
    maps[1, 2:6, 2:6] = 0.9
    maps[2, 0:2, 0:2] = 0.95
    return SIMStepRecord(proto_sums=None, proto_counts=None,
                         images=[torch.zeros(3, 32, 32, dtype=torch.uint8), torch.ones(3, 32, 32, dtype=torch.uint8)],
                         gt_boxes=torch.tensor([[0.0, 0.0, 24.0, 24.0], [4.0, 4.0, 28.0, 28.0], [0.0, 0.0, 10.0, 10.0]]),
                         gt_labels=torch.tensor([0, 1, 2]), gt_im_inds=torch.tensor([0, 0, 1]), instance_maps=maps,
                         bankable=torch.tensor(bankable), iteration=5, max_iter=10)


def test_bank_entries_last_image_pushes_the_batch_last_image_once_per_image():
    """``sim.bank_entries: last_image`` (the release appends one shared dict per image): a batch of two
    images leaves two entries, both the second image's; without a bankable instance in the last image the
    batch leaves none. ``per_image`` keeps one entry per image."""
    _, _, per_image = _setup({"pseudo_start_frac": 0.5})
    per_image.push_record(_two_image_record([True, True, True]))
    assert [e["labels"].tolist() for e in per_image.copy_paste.bank.entries] == [[0, 1], [2]]

    _, _, last = _setup({"pseudo_start_frac": 0.5, "bank_entries": "last_image"})
    last.push_record(_two_image_record([True, True, True]))
    entries = list(last.copy_paste.bank.entries)
    assert [e["labels"].tolist() for e in entries] == [[2], [2]]
    assert entries[0] is entries[1]
    assert bool(entries[0]["crops"][0].eq(1).all())  # the second image's pixels

    _, _, none_left = _setup({"pseudo_start_frac": 0.5, "bank_entries": "last_image"})
    none_left.push_record(_two_image_record([True, True, False]))
    assert len(none_left.copy_paste.bank) == 0


def test_prototype_updates_image_takes_one_momentum_step_per_image_in_order():
    """``sim.prototype_updates: image`` (the release's ``prototype_learning``): the statistics of each image
    move the prototypes in turn, p <- normalise(m p + (1 - m) c_b) for b = 0, 1, by hand; ``iteration``
    takes one step towards the centroid of both images' pixels, which differs."""
    m = 0.5
    _, _, state = _setup({"prototype_updates": "image", "proto_momentum": m, "num_prototypes": 1})
    bank = state.prototypes
    start = torch.nn.functional.normalize(torch.tensor([1.0, 0.0] + [0.0] * (bank.dim - 2)), dim=0)
    bank.prototypes.zero_()
    bank.prototypes[:, 0] = start
    c0 = torch.zeros(bank.dim)
    c0[1] = 1.0
    c1 = torch.zeros(bank.dim)
    c1[2] = 3.0  # a sum of 3 pixels along axis 2
    sums = torch.zeros(2, 3, 1, bank.dim)
    counts = torch.zeros(2, 3, 1)
    sums[0, 1, 0], counts[0, 1, 0] = c0, 1.0  # image 0: class 1
    sums[1, 1, 0], counts[1, 1, 0] = c1, 3.0  # image 1: class 1 as well
    rec = _two_image_record([False, False, False])
    state.records.append(SIMStepRecord(**{**rec.__dict__, "proto_sums": sums, "proto_counts": counts}))
    state.after_step(state.teacher.model, 5)

    unit = torch.nn.functional.normalize
    p1 = unit(m * start + (1 - m) * unit(c0, dim=0), dim=0)
    p2 = unit(m * p1 + (1 - m) * unit(c1, dim=0), dim=0)
    assert torch.allclose(bank.prototypes[1, 0], p2, atol=1e-6)
    assert torch.equal(bank.prototypes[0, 0], start) and torch.equal(bank.prototypes[2, 0], start)
    one_step = unit(m * start + (1 - m) * unit(c0 + c1, dim=0), dim=0)
    assert not torch.allclose(one_step, p2, atol=1e-3)


def test_prototype_updates_image_records_per_image_statistics_in_a_sim_step():
    """A full SIM step with ``prototype_updates: image``: the record holds one statistic per image (Sinkhorn
    run per image and class, so the prototypes' shares differ from one run over the batch, but each class
    gathers the same pixels and feature total), and the state applies them."""
    records = {}
    for mode in ("iteration", "image"):
        model, loss, state = _setup({"pseudo_start_frac": 0.0, "confident_thresh": 0.0, "copy_paste": False,
                                     "prototype_updates": mode})
        _step(model, loss, state, iteration=0)
        records[mode] = state.records[0]
        before = state.prototypes.prototypes.clone()
        state.after_step(model, 0)
        assert not torch.equal(state.prototypes.prototypes, before)
    per_image, whole = records["image"], records["iteration"]
    assert per_image.proto_sums.shape == (2,) + tuple(whole.proto_sums.shape)
    assert torch.allclose(per_image.proto_sums.sum((0, 2)), whole.proto_sums.sum(1), atol=1e-4)
    assert torch.equal(per_image.proto_counts.sum((0, 2)), whole.proto_counts.sum(1))
    assert per_image.proto_counts.sum() > 0


def test_paste_supervision_region_supervises_pasted_batches_by_regions(monkeypatch):
    """``sim.paste_supervision: region`` (the release): in a pasted batch the box terms read each
    instance's region (a pasted one's is its pseudo mask), ``L_pseudo`` covers the pasted instances too,
    and the bank takes them, their pseudo masks cut to the regions. ``box`` keeps pasted rows out of both."""
    import sim_core.sim.sim_loss as sim_loss_module

    seen = {}
    real_pseudo = sim_loss_module.pseudo_mask_loss

    def counting_pseudo(logits, *args, **kwargs):
        seen["rows"] = int(logits.shape[0])
        return real_pseudo(logits, *args, **kwargs)

    monkeypatch.setattr(sim_loss_module, "pseudo_mask_loss", counting_pseudo)
    for mode in ("box", "region"):
        model, loss, state = _setup({"pseudo_start_frac": 0.0, "paste_prob": 1.0, "confident_thresh": 0.0,
                                     "paste_supervision": mode})
        state.copy_paste.bank.push(_bank_entry())
        real_forward = loss.forward
        captured = {}

        def capture(inputs, real_forward=real_forward, captured=captured):
            captured["inputs"] = inputs
            return real_forward(inputs)

        monkeypatch.setattr(loss, "forward", capture)
        losses, targets = _step(model, loss, state, iteration=0)
        inputs = captured["inputs"]
        pasted = inputs.gt_pasted
        assert int(pasted.sum()) > 0 and ("regions" in targets[0]) == (mode == "region")
        if mode == "box":
            assert seen["rows"] == int((~pasted).sum())
            assert "gt_regions_full" not in inputs.extras
        else:
            assert seen["rows"] == int(pasted.numel())
            # a pasted row's box supervision is its pseudo mask, sampled as the GT masks are
            assert torch.equal(inputs.gt_boxmasks[pasted], inputs.gt_bitmasks[pasted])
            assert not torch.equal(inputs.gt_boxmasks[pasted].bool().any(dim=(1, 2)),
                                   torch.zeros(int(pasted.sum()), dtype=torch.bool))
        state.after_step(model, 0)
        banked = [label for e in state.copy_paste.bank.entries for label in e["labels"].tolist()]
        # label 1 is the pasted instance of _bank_entry(); the batch's own GTs have labels 0 and 2
        assert (1 in banked[1:]) == (mode == "region")
        if mode == "region":
            for e in list(state.copy_paste.bank.entries)[1:]:
                k = e["labels"].tolist().index(1)
                ox, oy = e["origins"][k].tolist()
                mask = e["masks"][k]
                pseudo = _bank_entry()["masks"][0]  # pasted at (50, 30): the region is that pseudo mask
                assert torch.equal(mask, pseudo[oy - 30:oy - 30 + mask.shape[0], ox - 50:ox - 50 + mask.shape[1]])


def test_supervision_regions_replace_the_box_fill_and_centre_the_sampling():
    """The detector's per-GT supervision: the filled box (``box_masks``) unless the target carries
    ``regions``, then those rows sampled at the mask stride; ``center_sampling_center: mass`` then
    centres on the regions' centres of mass (AdelaiDet's ``gt_bitmasks_full``). Bad shapes are named."""
    from sim_core.model.condinst import box_masks, supervision_regions

    boxes = torch.tensor([[4.0, 4.0, 20.0, 20.0], [8.0, 0.0, 30.0, 12.0]])
    plain = [{"boxes": boxes[:1]}, {"boxes": boxes[1:]}]
    assert torch.equal(supervision_regions(plain, boxes, 32, 32, 4), box_masks(boxes, 32, 32, 4))
    region = torch.zeros(1, 30, 31, dtype=torch.bool)
    region[0, 0:4, 8:16] = True  # samples at rows 2 and columns 10, 14
    out = supervision_regions([plain[0], {"boxes": boxes[1:], "regions": region}], boxes, 32, 32, 4)
    assert torch.equal(out[0], box_masks(boxes[:1], 32, 32, 4)[0])
    assert torch.nonzero(out[1]).tolist() == [[0, 2], [0, 3]]
    with pytest.raises(ValueError, match="regions"):
        supervision_regions([plain[0], {"boxes": boxes[1:], "regions": region[0]}], boxes, 32, 32, 4)
    centres = CondInst._mass_centres({"boxes": boxes[1:], "regions": region}, boxes[1:], 32, 32, False)
    assert centres.tolist() == [[11.5, 1.5]]


def test_instance_map_from_the_sampled_positives_only():
    """``sim.instance_map_positives: sampled`` (the release's ``scatter_mean`` over the sampled rows):
    ``M_I`` averages the teacher's masks at the given positives only; a SIM step runs with it."""
    from sim_core.sim.teacher import TeacherPredictions, instance_maps

    probs = torch.stack([torch.full((4, 4), v) for v in (0.2, 0.4, 0.9, 0.6)])
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0], [4.0, 4.0, 16.0, 16.0]])
    pred = TeacherPredictions(mask_feats=torch.zeros(1, 2, 2, 2), pos_probs=probs, pos_boxes=boxes[[0, 0, 0, 1]],
                              pos_gt_inds=torch.tensor([0, 0, 0, 1]), num_gts=2)
    every, _ = instance_maps(pred, boxes, mu=0.0)
    sampled, has_pos = instance_maps(pred.at_rows(torch.tensor([1, 2, 3])), boxes, mu=0.0)
    assert every[0, 0, 0].item() == pytest.approx(0.5) and sampled[0, 0, 0].item() == pytest.approx(0.65)
    assert sampled[1, 0, 0].item() == pytest.approx(0.6) and has_pos.tolist() == [True, True]
    model, loss, state = _setup({"pseudo_start_frac": 0.0, "instance_map_positives": "sampled",
                                 "paste_draws": "release", "paste_prob": 1.0})
    state.copy_paste.bank.push(_bank_entry())
    losses, _ = _step(model, loss, state, iteration=0)
    assert all(math.isfinite(float(v.detach())) for v in losses.values()) and losses["loss_pseudo"].item() > 0
