"""Everything SIM keeps between iterations, behind four calls of the training loop.

SIM is not only a loss: it owns an EMA teacher, a class-wise prototype bank and
a copy-paste memory, all updated as training goes. ``SIMTrainingState``
bundles them so the loop needs exactly this (``sim_core/engine/trainer.py``)::

    state = SIMTrainingState(model, mask_loss, cfg, num_classes, seed,   # once, after model.to(device)
                             build_model=...)  # a fresh model: only for sim.teacher_init: independent
    for iteration ...:
        for each micro-batch:
            images, targets = state.before_step(images, targets, iteration)  # copy-paste
            losses = model.training_losses(images, targets, mask_loss, iteration, max_iter,
                                           extras=state.extras())
            backward
        optimizer.step()
        state.after_step(model, iteration)   # teacher EMA, prototype update, bank push
    checkpoint: state.state_dict() / state.load_state_dict(...)

Order and why:
- ``before_step`` pastes from the bank *before* the forward, so student and
  teacher both see the pasted image and the pasted instances are ordinary
  GTs with ``pasted=True``.
- ``after_step`` runs *after* the optimiser step (mean-teacher convention:
  the teacher follows the updated student), once per iteration. It applies
  the prototype statistics the loss collected during the forward(s) of this
  iteration in one update (one all-reduce per iteration, identical on all
  processes) and pushes the teacher-segmented instances of the batch into the
  bank.
- The bank is fed (and so copy-paste starts) once the pseudo-label warm-up is
  over (``pseudo_start_frac``), in both variants: before that the teacher's
  masks are the ones SIM does not trust for ``L_pseudo`` either (the released
  code fills its bank only inside the branch that computes ``L_pseudo``, and
  pastes only once the bank is full: ``paste_when_full``). The prototypes are updated from
  the first iteration so they are meaningful when ``L_pseudo`` starts.

All state (teacher weights, prototypes, bank, the copy-paste generator) is in
``state_dict()`` as tensors/lists/dicts, so checkpoints load with
``torch.load(weights_only=True)`` and a resumed run continues identically.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from sim_core.data.copy_paste import CopyPaste, make_bank_entry
from sim_core.model.mask_head import aligned_bilinear
from sim_core.sim.ema import EMATeacher, independent_draw
from sim_core.sim.prototypes import PrototypeBank
from sim_core.sim.sim_loss import SIMLoss, SIMStepRecord
from sim_core.sim.variants import resolve_sim_settings


class SIMTrainingState:
    """Teacher, prototypes and copy-paste bank of one SIM run (see the module docstring)."""

    # Offset of the independent teacher's seed from the run seed (any fixed value: a draw of its own).
    TEACHER_SEED_OFFSET = 7919

    def __init__(self, student: nn.Module, mask_loss: nn.Module | None, cfg: dict[str, Any], num_classes: int,
                 seed: int = 0, build_model: Callable[[], nn.Module] | None = None):
        self.settings = resolve_sim_settings(cfg)
        s = self.settings
        device = next(student.parameters()).device
        start_from = None
        if s.teacher_init == "independent":
            if build_model is None:
                raise ValueError("sim.teacher_init 'independent' needs build_model (a constructor of the student)")
            start_from = independent_draw(build_model, seed + self.TEACHER_SEED_OFFSET).to(device)
        self.teacher = EMATeacher(student, s.ema_momentum, start_from=start_from)
        dim = cfg.get("mask_feat_channels") or getattr(getattr(student, "mask_head", None), "in_channels", None)
        if not dim:
            raise ValueError("cannot tell the mask-feature width: give cfg['mask_feat_channels']")
        self.prototypes = PrototypeBank(num_classes, s.num_prototypes, int(dim), s.proto_momentum,
                                        s.sinkhorn_eps, s.sinkhorn_iters, seed=seed).to(device)
        self.copy_paste = CopyPaste(s.bank_size, s.paste_prob, s.paste_fraction, s.max_paste,
                                    s.paste_score_power, seed=seed, paste_when_full=s.paste_when_full,
                                    supervision=s.paste_supervision, draws=s.paste_draws)
        self.records: list[SIMStepRecord] = []
        if isinstance(mask_loss, SIMLoss):
            mask_loss.attach(self.teacher, self.prototypes, self.records)

    # ------------------------------------------------------------ per iteration
    def before_step(self, images: list[Tensor], targets: list[dict[str, Any]],
                    iteration: int) -> tuple[list[Tensor], list[dict[str, Any]]]:
        """Copy-paste (when switched on and the bank has entries); every target gets a ``pasted`` key."""
        if not self.settings.copy_paste:
            return images, targets
        return self.copy_paste(images, targets)

    def extras(self) -> dict[str, Any]:
        """What ``CondInst.training_losses(extras=...)`` must hand to the SIM loss."""
        return {"teacher": self.teacher, "prototypes": self.prototypes, "sim_records": self.records}

    def bank_open(self, rec: SIMStepRecord) -> bool:
        """Feed the bank only once ``L_pseudo`` is on (after ``pseudo_start_frac`` of the schedule)."""
        s = self.settings
        return s.copy_paste and rec.iteration >= s.pseudo_start_frac * rec.max_iter

    @torch.no_grad()
    def after_step(self, student: nn.Module, iteration: int) -> None:
        """Teacher EMA update, prototype update, bank push; then forget this iteration's records."""
        self.teacher.update(student)
        if self.settings.prototypes and self.settings.prototype_updates == "image":
            self.apply_per_image_statistics()
        elif self.settings.prototypes:
            sums = torch.zeros_like(self.prototypes.prototypes)
            counts = sums.new_zeros(sums.shape[:2])
            for rec in self.records:
                if rec.proto_sums is not None:
                    sums += rec.proto_sums.to(sums.device)
                    counts += rec.proto_counts.to(counts.device)
            self.prototypes.apply_statistics(sums, counts)  # every process calls it: all-reduce inside
        for rec in self.records:
            if self.bank_open(rec):
                self.push_record(rec)
        self.records.clear()

    def apply_per_image_statistics(self) -> None:
        """``sim.prototype_updates: image``: one momentum step per image of each recorded batch.

        The released code (``prototype_learning``) updates the prototypes of every class an
        image holds once per image, so a class seen in k images of a batch moves k momentum
        steps per iteration. Records then hold ``[B, C, L, D]`` / ``[B, C, L]`` statistics; the
        images are applied in order (an image without confident pixels of a class leaves that
        class's prototypes as they are). Distributed: the b-th images of all processes are
        reduced together, so every process keeps identical prototypes.
        """
        for rec in self.records:
            if rec.proto_sums is None:
                continue
            for sums, counts in zip(rec.proto_sums, rec.proto_counts):
                self.prototypes.apply_statistics(sums.to(self.prototypes.prototypes.device),
                                                 counts.to(self.prototypes.prototypes.device))

    def push_record(self, rec: SIMStepRecord) -> None:
        """One bank entry per image of the recorded batch (teacher pseudo masks at full resolution).

        ``sim.bank_entries: last_image`` reproduces the released code instead: its
        ``condinst.py`` fills one ``paste_data`` dict per batch and appends that same
        object once per image, so every entry a batch leaves holds the batch's last
        image. Here the last image's entry (none when it has no bankable instance) is
        pushed once per image of the batch.
        """
        if not rec.images or rec.instance_maps.numel() == 0:
            return
        if not bool(rec.bankable.any()):
            return
        upsampled = aligned_bilinear(rec.instance_maps.unsqueeze(1).float(), 4)[:, 0]  # one call, cut per image
        batch = len(rec.images)
        last_only = self.settings.bank_entries == "last_image"
        for b in [batch - 1] if last_only else range(batch):
            rows = torch.nonzero((rec.gt_im_inds == b) & rec.bankable).flatten()
            if rows.numel() == 0:
                continue
            h, w = rec.images[b].shape[-2:]
            full = upsampled[rows, :h, :w]
            regions = None
            if rec.regions is not None and rec.regions[b] is not None:  # rows of image b, in its own order
                first = int(torch.count_nonzero(rec.gt_im_inds < b))
                regions = rec.regions[b][(rows - first).cpu()].cpu()[:, :h, :w]
            entry = make_bank_entry(rec.images[b].cpu(), rec.gt_boxes[rows].cpu(), rec.gt_labels[rows].cpu(),
                                    full.cpu(), self.settings.confident_thresh, regions=regions)
            for _ in range(batch if last_only else 1):
                self.copy_paste.bank.push(entry)

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher.state_dict(), "prototypes": self.prototypes.state_dict(),
                "copy_paste": self.copy_paste.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.prototypes.load_state_dict(state["prototypes"])
        self.copy_paste.load_state_dict(state["copy_paste"])
