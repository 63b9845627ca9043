"""The EMA teacher of SIM: a momentum copy of the whole detector.

SIM (Li et al., CVPR 2023, Sec. 3.1) builds every pseudo label from a teacher
``F'_seg`` whose weights are an exponential moving average of the student's:
``theta' <- m * theta' + (1 - m) * theta`` with ``m = 0.9999``. A slowly moving
copy gives mask features Z' and instance masks that are steadier than the
student's own, which is what makes them usable as targets.

Design choices (why):
- The teacher is a deep copy of the student taken at construction, so the two
  start identical, as in mean-teacher training. ``start_from`` gives it other
  initial weights instead: ``sim.teacher_init: independent`` passes a second
  model from its own random draw (:func:`independent_draw`), which is what the
  released code's separately built ``*_ema`` modules amount to (docs/sim.md).
- Parameters are averaged; buffers (BatchNorm running statistics, counters)
  are copied from the student, because averaging integer counters is
  meaningless and running statistics are already averages.
- The teacher never receives gradients (``requires_grad=False``) and stays in
  ``eval`` mode: ``train()`` on it is a no-op, so a training loop that calls
  ``model.train()`` on everything cannot change it.
- During the teacher pass (:func:`sim_core.sim.teacher.run_teacher`) its
  trainable BatchNorm layers normalise with the statistics of the batch
  (:func:`batch_statistics`), not with the running statistics copied from the
  student. That is what the released code does (its teacher modules are
  submodules of the detector, which trains in ``train`` mode; its BatchNorm
  buffers are copied from the student after each step and refreshed by the
  teacher's own forward, so they never normalise anything). The paper does
  not say. It matters only where BatchNorm trains: the demo's backbone and
  ``upstream_demo``'s R-18 from scratch; paper-scale profiles freeze it.
  Running statistics were measured to fail there: they describe the student's
  activations, and the teacher's weights lag behind the student's by the EMA,
  so early in a from-scratch run the teacher's normalised activations are off
  (``docs/sim.md``, "The teacher's BatchNorm").
- A student wrapped in ``DistributedDataParallel`` is unwrapped (``.module``)
  before copying or updating, so parameter names line up.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable, Iterator

import torch
from torch import Tensor, nn


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DDP / DataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


@contextlib.contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """Inside the block, ``model``'s BatchNorm layers normalise with the batch's statistics.

    Their running statistics and counters are left exactly as they were
    (momentum 0 while the block runs, the counter restored), and their
    train/eval flags are restored on exit. Frozen BatchNorm (not a
    ``_BatchNorm``) is unaffected.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
             for m in layers]
    for m in layers:
        m.train()
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (training, momentum, count) in zip(layers, saved):
            m.train(training)
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


def independent_draw(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``build()`` under its own seed, leaving the global torch generator where it was.

    The student, the data order and everything else drawn after the teacher is
    built stay exactly as without it, so a run with an independent teacher
    differs from its mean-teacher twin in the teacher's start only.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


class EMATeacher(nn.Module):
    """A frozen momentum copy of ``student``; call :meth:`update` after each optimiser step.

    ``start_from`` (a model of the student's structure) replaces the student as
    the teacher's initial weights; the EMA then starts from those.
    """

    def __init__(self, student: nn.Module, momentum: float = 0.9999, start_from: nn.Module | None = None):
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"EMA momentum must lie in [0, 1], got {momentum}")
        self.momentum = float(momentum)
        if start_from is not None:
            student_names = {name for name, _ in unwrap(student).named_parameters()}
            start_names = {name for name, _ in unwrap(start_from).named_parameters()}
            if student_names != start_names:
                missing = sorted(student_names ^ start_names)[0]
                raise ValueError(f"start_from and student differ in structure (parameter '{missing}')")
        self.model = copy.deepcopy(unwrap(start_from if start_from is not None else student))
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True) -> "EMATeacher":  # noqa: ARG002 - the teacher stays in eval mode
        self.training = False
        self.model.eval()
        return self

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """``teacher = m * teacher + (1 - m) * student`` for parameters; buffers are copied."""
        student = unwrap(student)
        student_params = dict(student.named_parameters())
        teacher_params, sources = [], []
        for name, t_param in self.model.named_parameters():
            s_param = student_params.get(name)
            if s_param is None:
                raise KeyError(f"student has no parameter '{name}'; teacher and student differ in structure")
            teacher_params.append(t_param)
            sources.append(s_param.detach().to(t_param.dtype))
        # One multi-tensor kernel instead of two ops per parameter (~8 ms per step on CPU for the demo).
        torch._foreach_lerp_(teacher_params, sources, 1.0 - self.momentum)
        student_buffers = dict(student.named_buffers())
        pairs = [(t_buf, student_buffers[name]) for name, t_buf in self.model.named_buffers() if name in student_buffers]
        if pairs:
            torch._foreach_copy_([t for t, _ in pairs], [s_buf.detach() for _, s_buf in pairs])

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def parameter_distance(self, student: nn.Module) -> Tensor:
        """Largest absolute difference between teacher and student parameters (a diagnostic)."""
        student_params = dict(unwrap(student).named_parameters())
        worst = torch.zeros(())
        for name, t_param in self.model.named_parameters():
            diff = (t_param.detach() - student_params[name].detach()).abs().max()
            worst = torch.maximum(worst, diff.cpu())
        return worst
