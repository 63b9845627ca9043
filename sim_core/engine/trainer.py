"""The training loop shared by every method.

One loop for all methods and scales: the method only changes the mask loss
and what it keeps between iterations (SIM: a teacher, a prototype bank and
copy-paste), both named by its entry in the method table (``sim_core.methods``),
which the loop reads without importing any method's code itself.

What the loop guarantees:
- resume: the latest readable checkpoint is loaded and training continues at
  the saved iteration with the same data order (``engine.batches``), so a
  killed and resumed run ends with the weights of an uninterrupted one (CPU);
  only a checkpoint with the run's settings fingerprint is resumed
  (``engine.records``): after any change of data, model, schedule, method or
  seed settings the run trains from iteration 0 and says which settings changed;
  the fingerprint covers settings, not code: a finished run stays finished
  after a code edit (``run.json`` keeps the commit each segment trained
  with) unless it is trained with ``restart=True`` (``simbench train --restart``);
- atomic checkpoints every ``train.checkpoint_every`` iterations (rank 0);
- a non-finite loss stops the run at once, naming the iteration and every
  loss term, and leaves the last good checkpoint in place;
- the same effective batch and learning rate for any number of processes
  (gradient accumulation), AMP on CUDA, gradient clipping;
- ``train_log.jsonl`` + dvclive logs, a tqdm bar with the loss terms, and a
  ``run.json`` stamp (versions, seed, resolved params, the fingerprint, and
  per training segment the commit, device and precision it ran with);
- supervision-quality diagnostics (``train.supervision_diagnostics``): on
  every logged iteration the mask loss scores its own targets against the GT
  masks (``mask_loss.last_quality``), logged as ``sq/<name>`` next to the
  losses but never part of them.
"""
from __future__ import annotations

import math
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from sim_core.methods import build_loss, build_training_state, method_config
from sim_core.data.coco import load_coco
from sim_core.data.dataset import CocoDetectionDataset, collate
from sim_core.config import is_cpu_amp_value
from sim_core.engine import checkpoint as ckpt
from sim_core.engine.batches import IterationBatchSampler, SeededSamples
from sim_core.engine.distributed import DistInfo, accumulation_steps, average_gradients, init_distributed
from sim_core.engine.logger import TrainLogger
from sim_core.engine.records import differences, fingerprint, weights_inputs
from sim_core.engine.run_info import BFLOAT16_UNITS, code_version, cpu_flags, describe_device, run_stamp
from sim_core.engine.schedule import build_optimizer, lr_at, set_lr
from sim_core.engine.seeding import seed_everything, set_cpu_threads
from sim_core.errors import InputError, NonFiniteLossError
from sim_core.io_utils import atomic_write_json
from sim_core.model.condinst import CondInst


def pick_device(name: str) -> torch.device:
    """``train.device`` as a device. Under torchrun each process takes the GPU of its ``LOCAL_RANK``
    (``init_distributed``), so ``cuda:N`` there would put every process on GPU N: refused."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and re.fullmatch(r"cuda:\d+", name):
        raise InputError("train.device", f"'{name}' under torchrun would put all {os.environ['WORLD_SIZE']} "
                                         "processes on one GPU; use 'cuda' or 'auto' (each process takes the GPU "
                                         "of its LOCAL_RANK)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("train.device", f"'{name}' requested but no CUDA device is available")
    return torch.device(name)


def build_train_data(params: dict) -> tuple[Any, CocoDetectionDataset]:
    data_cfg = params["data"]
    root = Path(data_cfg["root"])
    coco = load_coco(root / "train.json", root / "images", check_images=False)
    dataset = CocoDetectionDataset(coco, train=True, sizes=list(data_cfg["train_sizes"]),
                                   max_size=int(data_cfg["max_size"]), flip_prob=float(data_cfg["flip_prob"]),
                                   cache_images=bool(data_cfg.get("cache_images", False)))
    return coco, dataset


def autocast_dtype(device: torch.device, cfg: dict) -> torch.dtype | None:
    """The mixed-precision type of the forward pass, or None for full fp32.

    CUDA: float16 with a gradient scaler (``train.amp``), as the papers train.
    CPU (``train.cpu_amp``): ``true`` is bfloat16 autocast, ``false`` fp32,
    ``auto`` bfloat16 where the CPU runs it natively (AMX/AVX512-BF16) and fp32
    elsewhere. Convolutions and matrix products then run in bfloat16 (1.4-1.7x
    faster per demo step with AMX, ``docs/demo_scale.md``; measured 8x *slower*
    on an AVX2-only CPU, where bfloat16 is emulated), while weights, optimiser
    state, GroupNorm (``GroupNorm32``) and the loss reductions stay fp32.
    bfloat16 has fp32's range, so no gradient scaler is needed. Asking for
    ``true`` on a CPU without native bfloat16 warns.
    """
    if device.type == "cuda":
        return torch.float16 if bool(cfg.get("amp", True)) else None
    cpu_amp = cpu_amp_setting(cfg.get("cpu_amp", False))
    if device.type != "cpu" or cpu_amp is False:
        return None
    if cpu_amp == "auto":
        return torch.bfloat16 if native_cpu_bfloat16() else None
    if not native_cpu_bfloat16():
        warnings.warn("train.cpu_amp: this CPU has no native bfloat16 (AVX512-BF16/AMX); bfloat16 autocast "
                      "will run several times slower than fp32 (set train.cpu_amp: false or auto)", stacklevel=2)
    return torch.bfloat16


def cpu_amp_setting(value: Any) -> bool | str:
    """``train.cpu_amp`` checked (``sim_core.config.is_cpu_amp_value``): ``True``, ``False`` or ``"auto"``."""
    if is_cpu_amp_value(value):
        return value
    raise InputError("train.cpu_amp", f"must be true, false or auto, got {value!r}")


def precision_name(dtype: torch.dtype | None) -> str:
    """How a run computes its forward pass, for ``run.json``: ``float32`` or ``<type> autocast``."""
    return "float32" if dtype is None else f"{str(dtype).removeprefix('torch.')} autocast"


def native_cpu_bfloat16() -> bool:
    """Whether this CPU has bfloat16 arithmetic units (AVX512-BF16 or AMX).

    Not oneDNN's ``_is_mkldnn_bf16_supported()``: that is true on every AVX-512
    CPU, where oneDNN runs bfloat16 by converting to fp32: a demo ``mask`` step
    took 0.44 s there against 0.16 s in fp32 (``docs/demo_scale.md``, "AVX-512
    without bfloat16 units")."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(callable(probe) for probe in probes):
        return any(bool(probe()) for probe in probes)
    return bool(cpu_flags() & set(BFLOAT16_UNITS))  # torch without the probes: ask the OS


NORM_LAYERS = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm, torch.nn.LayerNorm)


def norm_parameter_ids(*modules: torch.nn.Module) -> set[int]:
    """``id()`` of every parameter of a BatchNorm/GroupNorm/LayerNorm module inside ``modules``."""
    return {id(p) for module in modules for m in module.modules() if isinstance(m, NORM_LAYERS)
            for p in m.parameters(recurse=False)}


class Trainer:
    """Holds everything one run needs; ``run()`` trains to ``train.max_iter``."""

    def __init__(self, params: dict, run_dir: str | Path, progress: bool = True, device: torch.device | None = None):
        """``device``: train there instead of ``train.device`` (the device-placement check's stand-in)."""
        self.params = params
        self.cfg = params["train"]
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.device = device if device is not None else pick_device(self.cfg.get("device", "auto"))
        self.dist: DistInfo = init_distributed(self.device)
        seed_everything(int(self.cfg["seed"]) + self.dist.rank)
        self.coco, self.dataset = build_train_data(params)
        self.diagnostics = bool(self.cfg.get("supervision_diagnostics", True))
        with_masks, instances = self.coco.instances_with_masks
        if self.diagnostics and with_masks < instances:  # they score targets against GT masks: none to score
            self.diagnostics = False
            if self.dist.is_main:
                print(f"supervision diagnostics off: {instances - with_masks} of {instances} training instances "
                      "have no mask (box-only data)", flush=True)
        num_classes = len(self.coco.label_to_cat_id)
        # The model is built from the run seed alone so every process starts identical.
        seed_everything(int(self.cfg["seed"]))
        self.model = CondInst(num_classes, params["model"]).to(self.device)
        loss_cfg = method_config(params, self.cfg["method"])
        self.mask_loss = build_loss(self.cfg["method"], loss_cfg).to(self.device)
        # what the method keeps between iterations (SIM: teacher, prototypes, copy-paste bank), or None
        self.method_state = build_training_state(
            self.cfg["method"], student=self.model, mask_loss=self.mask_loss, cfg=loss_cfg,
            num_classes=num_classes, seed=int(self.cfg["seed"]),
            build_model=lambda: CondInst(num_classes, params["model"]))
        if bool(self.cfg.get("sync_bn", False)):
            if self.dist.enabled and self.device.type == "cuda":
                self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            else:  # the recipe asks for statistics over the whole batch; say that it does not get them
                warnings.warn(f"train.sync_bn: true acts only with several processes on GPUs; here "
                              f"({self.dist.world_size} process(es), {self.device.type}) each BatchNorm "
                              f"normalises over the {self.cfg['batch_per_process']} images of one micro-batch",
                              stacklevel=2)
        self.trainable = [p for m in (self.model, self.mask_loss) for p in m.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self._param_groups(), self.cfg)
        self.autocast_dtype = autocast_dtype(self.device, self.cfg)
        self.use_amp = self.autocast_dtype is torch.float16  # only float16 needs a gradient scaler
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        if self.dist.rank:  # the model was built from the run seed; from here each process draws its own numbers
            seed_everything(int(self.cfg["seed"]) + self.dist.rank)  # (rank 0 goes on as a one-process run)
        self.start_iter = 0
        self.fingerprint_inputs = weights_inputs(params)
        self.fingerprint = fingerprint(self.fingerprint_inputs)
        self.segments: list[dict] = []  # one entry per training segment (a start or a resume)
        self.restart_reason: str | None = None  # why a checkpoint was not resumed

    def _param_groups(self) -> list[dict]:
        """Weight decay everywhere except where the recipe excludes it.

        Swin's norms/tables get none (its recipe); with ``train.norm_weight_decay``
        set (``null``: same as ``weight_decay``), the parameters of every
        BatchNorm/GroupNorm/LayerNorm module get that decay instead (mmdet's
        ``norm_decay_mult``; BoxLevelSet's configs: 0).
        """
        no_decay: set[str] = set()
        if self.params["model"]["backbone"] == "swin_b":
            from sim_core.model.swin import no_weight_decay_names

            no_decay = {f"backbone.{name}" for name in no_weight_decay_names(self.model.backbone)}
        norm_decay = self.cfg.get("norm_weight_decay")
        norms = norm_parameter_ids(self.model, self.mask_loss) if norm_decay is not None else set()
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        named += [(f"mask_loss.{n}", p) for n, p in self.mask_loss.named_parameters() if p.requires_grad]
        decay = [p for n, p in named if n not in no_decay and id(p) not in norms]
        groups = [{"params": decay}]
        exempt = [p for n, p in named if n in no_decay]
        if exempt:
            groups.append({"params": exempt, "weight_decay": 0.0})
        normed = [p for n, p in named if n not in no_decay and id(p) in norms]
        if normed:
            groups.append({"params": normed, "weight_decay": float(norm_decay)})
        return groups

    # -- checkpoints -------------------------------------------------------
    def state_dict(self, iteration: int) -> dict:
        state = {
            "iteration": iteration,
            "model": self.model.state_dict(),
            "mask_loss": self.mask_loss.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "run": self.params.get("run"),
            "fingerprint": {"sha256": self.fingerprint, "inputs": self.fingerprint_inputs},
            "segments": self.segments,
        }
        if self.method_state is not None:
            state["method_state"] = self.method_state.state_dict()
        return state

    def try_resume(self) -> int:
        """Load the latest checkpoint if it has this run's settings fingerprint; the iteration to start at.

        A checkpoint of other settings is left in place (it is replaced at the
        first checkpoint of the new training) and the reason is kept in
        ``restart_reason`` and printed as one line."""
        found = ckpt.latest_checkpoint(self.run_dir)
        if found is None:
            return 0
        state, path = found
        recorded = state.get("fingerprint") or {}
        if recorded.get("sha256") != self.fingerprint:
            self.restart_reason = (f"{differences(recorded.get('inputs'), self.fingerprint_inputs)}: settings "
                                   f"changed since {path}; training from iteration 0")
            if self.dist.is_main:
                print(self.restart_reason, flush=True)
                (self.run_dir / "model.pt").unlink(missing_ok=True)  # the old settings' model: no longer this run
            return 0
        self.segments = list(state.get("segments") or [])
        self.model.load_state_dict(state["model"])
        self.mask_loss.load_state_dict(state["mask_loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if self.method_state is not None and "method_state" in state:
            self.method_state.load_state_dict(state["method_state"])
        self.start_iter = int(state["iteration"])
        return self.start_iter

    # -- the loop ----------------------------------------------------------
    def _loader(self, micro: int) -> DataLoader:
        sampler = IterationBatchSampler(len(self.dataset), int(self.cfg["batch_size"]), int(self.cfg["seed"]),
                                        self.start_iter, int(self.cfg["max_iter"]), rank=self.dist.rank,
                                        world_size=self.dist.world_size, micro_batches=micro)
        workers = int(self.cfg.get("num_workers", 0))
        return DataLoader(SeededSamples(self.dataset), batch_sampler=sampler, collate_fn=collate,
                          num_workers=workers, persistent_workers=False,
                          prefetch_factor=2 if workers > 0 else None)

    def diagnose_at(self, iteration: int, max_iter: int) -> bool:
        """Whether this iteration computes the supervision-quality diagnostics (a logged one)."""
        if not self.diagnostics:
            return False
        log_every = max(1, int(self.cfg.get("log_every", 20)))
        return iteration % log_every == 0 or iteration == max_iter - 1

    def _forward(self, images, targets, iteration: int, max_iter: int,
                 diagnose: bool = False) -> dict[str, torch.Tensor]:
        images = [im.to(self.device, non_blocking=True) for im in images]
        targets = [{k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        extras = None
        if self.method_state is not None:
            images, targets = self.method_state.before_step(images, targets, iteration)
            extras = self.method_state.extras()
        with torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            return self.model.training_losses(images, targets, self.mask_loss, iteration, max_iter, extras=extras,
                                              diagnose=diagnose)

    def _segment(self) -> dict:
        """This training segment's code and machine, for ``run.json`` and the checkpoints."""
        commit, dirty = code_version()
        return {"start_iteration": self.start_iter, "git_commit": commit, "dirty": dirty,
                "device": describe_device(self.device), "world_size": self.dist.world_size,
                "precision": precision_name(self.autocast_dtype), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def _write_stamp(self) -> None:
        stamp = run_stamp(self.params, self.device, self.dist.world_size, precision_name(self.autocast_dtype))
        stamp.update(fingerprint=self.fingerprint, fingerprint_inputs=self.fingerprint_inputs,
                     segments=self.segments)
        atomic_write_json(self.run_dir / "run.json", stamp)

    def layout_note(self, micro: int) -> str | None:
        """One line when this run's processes differ from the recipe's ``train.processes`` (else None)."""
        wanted = int(self.cfg.get("processes", 1))
        if self.dist.world_size == wanted:
            return None
        per_step = int(self.cfg["batch_size"]) // self.dist.world_size // micro
        return (f"train.processes {wanted} (the recipe's layout) but {self.dist.world_size} process(es) here: "
                f"the batch of {self.cfg['batch_size']} is kept with {micro} accumulation step(s) of {per_step} "
                f"image(s) per process; what differs from the recipe: BatchNorm statistics over {per_step} "
                f"image(s) (sync_bn spans processes only), detection losses normalised per micro-batch rather than "
                f"over the whole batch, and SIM's bank takes {int(self.cfg['batch_size']) // self.dist.world_size} "
                f"entries per process and iteration, not {int(self.cfg['batch_size']) // wanted}")

    @staticmethod
    def _loss_totals(iteration: int, names: list[str], readouts: list[torch.Tensor], micro: int) -> dict[str, float]:
        """The iteration's loss terms (mean over micro-batches) from one host read of every micro-batch's
        terms (one wait for the device per iteration); a non-finite term stops the run before the optimiser
        step, naming the first micro-batch's terms that hold it (the last good checkpoint is kept)."""
        rows = torch.stack(readouts).tolist()
        totals: dict[str, float] = {}
        for row in rows:
            values = dict(zip(names, row))
            if not all(math.isfinite(v) for v in row):
                raise NonFiniteLossError(iteration, values)
            for k, v in values.items():
                totals[k] = totals.get(k, 0.0) + v / micro
        return totals

    def run(self, restart: bool = False) -> dict:
        """Train to ``train.max_iter``; ``restart``: from iteration 0, the run's checkpoints deleted first
        (the way to retrain a finished run under changed code, which the settings fingerprint does not cover)."""
        max_iter = int(self.cfg["max_iter"])
        if restart:
            if self.dist.is_main:
                for name in (ckpt.LAST, ckpt.PREVIOUS, "model.pt"):
                    (self.run_dir / name).unlink(missing_ok=True)
                print(f"--restart: {self.run_dir} trains from iteration 0", flush=True)
        else:  # (with --restart no process reads a checkpoint, so none waits for the deletion)
            self.try_resume()
        if self.start_iter < max_iter:  # a segment is recorded only where iterations are trained
            self.segments.append(self._segment())
        micro = accumulation_steps(int(self.cfg["batch_size"]), int(self.cfg["batch_per_process"]),
                                   self.dist.world_size)
        note = self.layout_note(micro)
        if note and self.dist.is_main:
            warnings.warn(note, stacklevel=2)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._write_stamp()
        logger = TrainLogger(self.run_dir, self.start_iter, max_iter, enabled=self.dist.is_main,
                             progress=self.progress, log_every=int(self.cfg.get("log_every", 20)))
        loader = iter(self._loader(micro))
        self.model.train()
        clip = float(self.cfg.get("grad_clip", 0.0))
        try:
            for iteration in range(self.start_iter, max_iter):
                tic = time.perf_counter()
                lr = lr_at(iteration, self.cfg)
                set_lr(self.optimizer, lr)
                self.optimizer.zero_grad(set_to_none=True)
                diagnose = self.diagnose_at(iteration, max_iter)
                quality: dict[str, list[float]] = {}
                readouts: list[torch.Tensor] = []  # each micro-batch's loss terms, read on the host once
                for _ in range(micro):
                    images, targets = next(loader)
                    if diagnose and hasattr(self.mask_loss, "last_quality"):
                        self.mask_loss.last_quality = {}
                    losses = self._forward(images, targets, iteration, max_iter, diagnose)
                    if diagnose:
                        for k, v in (getattr(self.mask_loss, "last_quality", None) or {}).items():
                            if v is not None and math.isfinite(float(v)):
                                quality.setdefault(k, []).append(float(v))
                    readouts.append(torch.stack([v.detach().to(torch.float64) for v in losses.values()]))
                    self.scaler.scale(sum(losses.values()) / micro).backward()
                totals = self._loss_totals(iteration, list(losses), readouts, micro)  # before the step
                average_gradients(self.model)
                average_gradients(self.mask_loss)
                self.scaler.unscale_(self.optimizer)
                if clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.trainable, clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                if self.method_state is not None:
                    self.method_state.after_step(self.model, iteration)
                totals["loss"] = sum(v for k, v in totals.items())
                logger.log(iteration, lr, totals, time.perf_counter() - tic,
                           quality={k: sum(v) / len(v) for k, v in quality.items()})
                done = iteration + 1
                if self.dist.is_main and (done % int(self.cfg["checkpoint_every"]) == 0 or done == max_iter):
                    ckpt.save_checkpoint(self.run_dir, self.state_dict(done))
        finally:
            logger.close()
        if self.dist.is_main:
            ckpt.save_weights(self.run_dir / "model.pt", self.model.state_dict(),
                              {"num_classes": len(self.coco.label_to_cat_id),
                               "label_to_cat_id": {int(k): int(v) for k, v in self.coco.label_to_cat_id.items()},
                               "model_cfg": self.params["model"], "run": self.params.get("run"),
                               "iterations": max_iter, "fingerprint": self.fingerprint,
                               "fingerprint_inputs": self.fingerprint_inputs})
        return {"iterations": max_iter, "resumed_from": self.start_iter, "restarted": self.restart_reason}


def train_run(params: dict, run_dir: str | Path, progress: bool = True, restart: bool = False) -> dict:
    """Train one resolved run (see ``sim_core.config.resolve_run``) into ``run_dir``."""
    set_cpu_threads(params["train"])
    return Trainer(params, run_dir, progress=progress).run(restart=restart)
