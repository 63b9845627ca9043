"""SIM's tailored copy-paste: paste teacher-segmented instances, fix the occluded boxes.

Why (paper Sec. 3.4): box supervision gives no signal about *where one object
hides another*, so occlusion is where box-supervised masks fail most. SIM
creates occlusions with known answers: instances the teacher has segmented
well are pasted onto other training images. The pasted instance brings its
pseudo mask as a full mask target (``L_paste``), and the objects it covers get
boxes that describe what is still visible.

Pieces (all on the training sample format of docs/architecture.md: images
uint8 ``[3, h, w]``, targets with ``boxes``/``labels``/``masks``):

- :func:`make_bank_entry` - one image's instances as the teacher sees them:
  the pseudo mask is ``teacher probability > 0.7`` inside the (pixel cover of
  the) GT box, the quality score is the mean teacher probability over that
  mask; the image crop under the box and the mask crop are kept, with their
  position.
- :class:`InstanceBank` - a FIFO memory of the last ``bank_size`` (100) entries.
- :func:`select_instances` - ``paste_fraction`` (a quarter) of one entry's
  instances, at least 1 and at most 3, drawn without replacement with
  probability proportional to ``score ** power`` (power 1; the released code
  uses 3).
- :func:`paste_instances` - pastes them at their original location (clipped to
  the target image) and updates the target: an original object's visible
  region is its box region minus the pasted masks; its box becomes the tight
  box of that region (intersected with the old box, so untouched sides keep
  their sub-pixel values) and it is dropped when nothing stays visible. Its
  ``masks`` row loses the pasted pixels. Pasted instances are appended with
  ``masks`` = their pseudo mask, box = the tight box of that mask (the pixels
  actually pasted), and ``pasted = True``; a new bool key ``pasted`` ``[N]``
  marks them (the detector passes it on as ``MaskLossInputs.gt_pasted``).
  With ``regions=True`` (``sim.paste_supervision: region``, the released
  code's ``copypaste.py``) every kept instance also gets a *supervision
  region*, a bool ``regions`` row ``[N, h, w]``: an original object's box
  fill (AdelaiDet's ``int(y1)..int(y2)`` rows and columns, inclusive) minus
  the pasted pixels, a pasted instance's pseudo mask; every box becomes the
  tight box of its region (so a box with integer corners the paste does not
  touch grows by one pixel right and down, as the release's
  ``extract_bboxes`` makes it), and an object whose region is empty is
  dropped. The detector then supervises those instances by their region
  instead of their filled box (``sim_core.model.condinst.supervision_regions``).
- :class:`CopyPaste` - the per-batch decision (probability 0.5), the seeded
  generator, the bank, and their state for checkpoints.

Deviations from the released code (docs/sim.md): sampling is without
replacement (the released ``random.choices`` may paste one instance twice,
creating duplicate GTs; ``CopyPaste(draws="release")`` does that, and keeps
every pasted pseudo mask whole as the release does), and the bank is a
plain FIFO of the images just trained on.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch
from torch import Tensor

from sim_core.model.condinst import box_masks


def box_pixel_region(box: Tensor | list[float], height: int, width: int) -> tuple[int, int, int, int]:
    """Integer pixel cover ``(x0, y0, x1, y1)`` (end-exclusive) of an xyxy box, clipped to the image."""
    x1, y1, x2, y2 = (float(v) for v in box)
    x0 = min(max(int(math.floor(x1)), 0), width)
    y0 = min(max(int(math.floor(y1)), 0), height)
    xe = min(max(int(math.ceil(x2)), 0), width)
    ye = min(max(int(math.ceil(y2)), 0), height)
    return x0, y0, max(xe, x0), max(ye, y0)


def tight_box(mask: Tensor, offset_x: int = 0, offset_y: int = 0) -> Tensor | None:
    """xyxy box ``[x0, y0, x1 + 1, y1 + 1]`` of the True pixels of ``mask`` ``[h, w]`` (None if empty)."""
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    if rows.numel() == 0:
        return None
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    # stacked, not torch.tensor([...]): the box stays on the mask's device (a GPU in training), without a copy
    return torch.stack([cols[0] + offset_x, rows[0] + offset_y, cols[-1] + 1 + offset_x,
                        rows[-1] + 1 + offset_y]).to(torch.float32)


def make_bank_entry(image: Tensor, boxes: Tensor, labels: Tensor, instance_probs: Tensor,
                    thresh: float = 0.7, regions: Tensor | None = None) -> dict[str, Any] | None:
    """One memory-bank entry from an image, its GT boxes/labels and the teacher's ``[n, h, w]`` probabilities.

    ``regions`` (bool ``[n, h, w]``, optional): each instance's supervision
    region in a batch pasted with ``paste_supervision: region``; the pseudo
    mask is then also cut to it, as the release multiplies its bank masks by
    ``gt_bitmasks_full``.
    Instances whose pseudo mask is empty are skipped; None when none is left.
    All values are tensors, lists and ints, so entries survive
    ``torch.load(weights_only=True)``.
    """
    _, h, w = image.shape
    if instance_probs.shape[-2:] != (h, w):
        raise ValueError(f"teacher probabilities {tuple(instance_probs.shape)} do not match image {h}x{w}")
    crops, masks, origins, keep_boxes, keep_labels, scores = [], [], [], [], [], []
    box_list = boxes.tolist()  # one read of every coordinate (on a GPU: one wait, not four per instance)
    for k in range(boxes.shape[0]):
        x0, y0, x1, y1 = box_pixel_region(box_list[k], h, w)
        if x1 <= x0 or y1 <= y0:
            continue
        probs = instance_probs[k, y0:y1, x0:x1].float()
        mask = probs > thresh
        if regions is not None:
            mask &= regions[k, y0:y1, x0:x1].bool()
        if not bool(mask.any()):
            continue
        crops.append(image[:, y0:y1, x0:x1].clone())
        masks.append(mask.clone())
        origins.append([x0, y0])
        keep_boxes.append(boxes[k].float().cpu())
        keep_labels.append(int(labels[k]))
        scores.append(float(probs[mask].mean()))
    if not crops:
        return None
    return {
        "crops": [c.cpu() for c in crops],
        "masks": [m.cpu() for m in masks],
        "origins": torch.tensor(origins, dtype=torch.long),
        "boxes": torch.stack(keep_boxes),
        "labels": torch.tensor(keep_labels, dtype=torch.long),
        "scores": torch.tensor(scores, dtype=torch.float32),
    }


class InstanceBank:
    """FIFO memory of bank entries (the oldest entry leaves when full)."""

    def __init__(self, capacity: int = 100):
        if capacity < 1:
            raise ValueError(f"bank capacity must be positive, got {capacity}")
        self.capacity = int(capacity)
        self.entries: deque[dict[str, Any]] = deque(maxlen=self.capacity)

    def __len__(self) -> int:
        return len(self.entries)

    def push(self, entry: dict[str, Any] | None) -> None:
        if entry is not None:
            self.entries.append(entry)

    def sample(self, generator: torch.Generator) -> dict[str, Any]:
        if not self.entries:
            raise IndexError("the instance bank is empty")
        index = int(torch.randint(len(self.entries), (1,), generator=generator))
        return self.entries[index]

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "entries": list(self.entries)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.entries = deque(state["entries"], maxlen=self.capacity)


def select_instances(scores: Tensor, fraction: float, generator: torch.Generator, max_count: int = 3,
                     power: float = 1.0, replacement: bool = False) -> Tensor:
    """Indices of ``clamp(int(n * fraction), 1, max_count)`` instances, score-weighted, no repeats.

    ``replacement``: the released code's ``random.choices`` (one instance may be drawn twice).
    """
    n = int(scores.numel())
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    count = min(n, max_count, max(1, int(n * fraction)))
    weights = scores.float().clamp(min=0.0) ** power + 1e-6
    return torch.multinomial(weights, count, replacement=replacement, generator=generator)


def paste_instances(image: Tensor, target: dict[str, Any], entry: dict[str, Any],
                    indices: Tensor | list[int], regions: bool = False,
                    keep_whole: bool = False) -> tuple[Tensor, dict[str, Any]]:
    """Paste ``entry``'s instances ``indices`` (in that order, later on top) onto ``image``.

    Returns the new image and target; see the module docstring for the rules
    (``regions``: add the supervision regions and box every instance by its region;
    ``keep_whole``: every pasted instance keeps its whole pseudo mask, a later one
    does not cut an earlier one, so an index given twice gives two identical GTs,
    as the released ``masks_copy_paste`` does).
    The inputs are not modified.
    """
    _, h, w = image.shape
    if target.get("masks") is not None and tuple(target["masks"].shape[-2:]) != (h, w):
        raise ValueError(f"target masks {tuple(target['masks'].shape)} do not match the image {h}x{w}")
    image = image.clone()
    pasted_masks: list[Tensor] = []
    pasted_labels: list[int] = []
    alpha = torch.zeros((h, w), dtype=torch.bool, device=image.device)
    for k in [int(i) for i in indices]:
        ox, oy = (int(v) for v in entry["origins"][k])
        crop, mask = entry["crops"][k].to(image.device), entry["masks"][k].to(image.device)
        ch, cw = mask.shape
        x0, y0, x1, y1 = max(ox, 0), max(oy, 0), min(ox + cw, w), min(oy + ch, h)
        if x1 <= x0 or y1 <= y0:
            continue
        sub_mask = mask[y0 - oy:y1 - oy, x0 - ox:x1 - ox]
        if not bool(sub_mask.any()):
            continue
        sub_crop = crop[:, y0 - oy:y1 - oy, x0 - ox:x1 - ox]
        region = image[:, y0:y1, x0:x1]
        image[:, y0:y1, x0:x1] = torch.where(sub_mask.unsqueeze(0), sub_crop.to(image.dtype), region)
        full = torch.zeros((h, w), dtype=torch.bool, device=image.device)
        full[y0:y1, x0:x1] = sub_mask
        for earlier in ([] if keep_whole else pasted_masks):  # the new instance lies on top of earlier ones
            earlier &= ~full
        alpha |= full
        pasted_masks.append(full)
        pasted_labels.append(int(entry["labels"][k]))

    boxes = target["boxes"].float()
    n = boxes.shape[0]
    masks = target.get("masks")
    masks = masks.clone() if masks is not None else torch.zeros((n, h, w), dtype=torch.uint8, device=image.device)
    was_pasted = target.get("pasted")
    was_pasted = was_pasted.clone() if was_pasted is not None else torch.zeros(n, dtype=torch.bool)

    keep, new_boxes, kept_regions = [], [], []
    box_list, pasted_list = boxes.tolist(), was_pasted.tolist()  # read once, not per instance
    # AdelaiDet's box fill at full resolution (stride 1): rows and columns int(y1)..int(y2) inclusive
    fills = box_masks(boxes, h, w, 1).bool() if regions else None
    for i in range(n):
        if pasted_list[i] or regions:
            # an earlier pasted instance's region is its pseudo mask; with regions, an original's is its box fill
            region = (masks[i].bool() if pasted_list[i] else fills[i]) & ~alpha
            if not bool(region.any()):
                continue
            new_boxes.append(tight_box(region))
            kept_regions.append(region)
            keep.append(i)
            continue
        x0, y0, x1, y1 = box_pixel_region(box_list[i], h, w)
        covered = alpha[y0:y1, x0:x1]
        if x1 > x0 and y1 > y0 and bool(covered.all()):
            continue  # fully covered: dropped
        if x1 <= x0 or y1 <= y0 or not bool(covered.any()):
            new_boxes.append(boxes[i].clone())  # untouched
        else:
            tb = tight_box(~covered, x0, y0)
            old = boxes[i]
            new_boxes.append(torch.stack([torch.maximum(old[0], tb[0]), torch.maximum(old[1], tb[1]),
                                          torch.minimum(old[2], tb[2]), torch.minimum(old[3], tb[3])]))
        keep.append(i)
    keep_t = torch.tensor(keep, dtype=torch.long)
    out_masks = [masks[keep_t] * (~alpha).to(masks.dtype)]
    out_boxes = new_boxes
    out_labels = [target["labels"][keep_t]]
    out_pasted = [was_pasted[keep_t]]
    for full, label in zip(pasted_masks, pasted_labels):
        box = tight_box(full)
        if box is None:  # covered entirely by a later pasted instance
            continue
        out_boxes.append(box)
        kept_regions.append(full)
        out_masks.append(full.to(masks.dtype).unsqueeze(0))
        out_labels.append(torch.tensor([label], dtype=target["labels"].dtype))
        out_pasted.append(torch.ones(1, dtype=torch.bool))
    result = dict(target)
    result["boxes"] = torch.stack(out_boxes).to(torch.float32) if out_boxes else boxes.new_zeros((0, 4))
    result["labels"] = torch.cat([t.to(target["labels"].device) for t in out_labels])
    result["masks"] = torch.cat(out_masks)
    result["pasted"] = torch.cat([t.cpu() for t in out_pasted]).to(result["labels"].device)
    if regions:
        result["regions"] = (torch.stack(kept_regions) if kept_regions
                             else torch.zeros((0, h, w), dtype=torch.bool, device=image.device))
    return image, result


class CopyPaste:
    """The bank plus the random decisions of tailored copy-paste, with checkpointable state."""

    def __init__(self, bank_size: int = 100, paste_prob: float = 0.5, paste_fraction: float = 0.25,
                 max_paste: int = 3, score_power: float = 1.0, seed: int = 0, paste_when_full: bool = False,
                 supervision: str = "box", draws: str = "distinct"):
        if supervision not in ("box", "region"):
            raise ValueError(f"paste supervision must be 'box' or 'region', got {supervision!r}")
        if draws not in ("distinct", "release"):
            raise ValueError(f"paste draws must be 'distinct' or 'release', got {draws!r}")
        if not 0.0 <= paste_prob <= 1.0:
            raise ValueError(f"paste probability must lie in [0, 1], got {paste_prob}")
        if not 0.0 < paste_fraction <= 1.0:
            raise ValueError(f"paste fraction must lie in (0, 1], got {paste_fraction}")
        self.bank = InstanceBank(bank_size)
        self.paste_prob = float(paste_prob)
        self.paste_fraction = float(paste_fraction)
        self.max_paste = int(max_paste)
        self.score_power = float(score_power)
        self.paste_when_full = bool(paste_when_full)
        self.supervision = supervision
        self.draws = draws
        self.generator = torch.Generator().manual_seed(int(seed))

    def __call__(self, images: list[Tensor], targets: list[dict[str, Any]]) -> tuple[list[Tensor], list[dict]]:
        """With probability ``paste_prob`` per batch, paste onto every image from its own random bank entry.

        Every returned target has a ``pasted`` key (all False when nothing was pasted);
        with ``supervision="region"`` a pasted batch's targets also get ``regions``.
        With ``paste_when_full`` (the released code) nothing is pasted until the
        bank holds ``bank_size`` entries.
        """
        needed = self.bank.capacity if self.paste_when_full else 1
        do_paste = len(self.bank) >= needed and float(torch.rand((), generator=self.generator)) < self.paste_prob
        out_images, out_targets = [], []
        for image, target in zip(images, targets):
            if do_paste:
                entry = self.bank.sample(self.generator)
                release_draws = self.draws == "release"
                chosen = select_instances(entry["scores"], self.paste_fraction, self.generator,
                                          self.max_paste, self.score_power, replacement=release_draws)
                image, target = paste_instances(image, target, entry, chosen,
                                                regions=self.supervision == "region", keep_whole=release_draws)
            elif "pasted" not in target:
                target = dict(target)
                target["pasted"] = torch.zeros(target["boxes"].shape[0], dtype=torch.bool,
                                               device=target["boxes"].device)
            out_images.append(image)
            out_targets.append(target)
        return out_images, out_targets

    def state_dict(self) -> dict[str, Any]:
        return {"bank": self.bank.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bank.load_state_dict(state["bank"])
        self.generator.set_state(state["generator"])
