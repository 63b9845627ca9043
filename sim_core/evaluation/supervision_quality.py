"""How good is a box-supervised method's own mask supervision? (pure metrics)

Box-supervised methods never see ground-truth masks, but they build targets of
their own every step: BoxInst keeps neighbour pairs it believes share a label,
SIM thresholds pseudo probability maps into foreground / background / ignored,
BoxLevelSet's energy prefers some foreground. When the data has GT masks these
functions score those targets against them. They are computed without
gradients and only for diagnostics (``train.supervision_diagnostics``); each
loss calls them from its ``forward`` when ``MaskLossInputs.diagnose`` is set
and stores the result in ``self.last_quality`` (logged as ``sq/<name>``).

Conventions:

* every count is pooled over all pixels / pairs of the batch (instances with
  more pixels weigh more), not averaged per instance;
* a metric whose denominator is empty is left out of the returned dict (never
  reported as 0 or NaN); :func:`foreground_iou` returns ``None`` then;
* inputs are boolean tensors or float maps read as ``> 0.5``; they must have
  the same shape (any shape: ``[P, h, w]`` for pixels, ``[P, K, h, w]`` for
  pairs). A float ``kept_pairs`` is a per-pair weight (e.g. SIM's feature
  factor), counted with that weight.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "as_bool",
    "safe_ratio",
    "pair_label_quality",
    "gt_same_label_pairs",
    "pseudo_label_quality",
    "foreground_iou",
    "diagnosable_rows",
    "one_row_per_gt",
    "kept_pair_quality",
    "prefixed",
]


def as_bool(x: Tensor) -> Tensor:
    """Boolean view of a mask: bool stays, anything else is ``> 0.5``."""
    return x if x.dtype == torch.bool else x > 0.5


def safe_ratio(num: Tensor | float, den: Tensor | float) -> float | None:
    """``num / den`` as a float, or ``None`` when ``den`` is 0 (empty denominator)."""
    den = float(den)
    if den <= 0.0:
        return None
    return float(num) / den


def _put(out: dict[str, float], name: str, value: float | None) -> None:
    if value is not None:
        out[name] = value


def _check_shapes(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError("shapes differ: " + ", ".join(f"{k} {v}" for k, v in shapes.items()))


@torch.no_grad()
def pair_label_quality(kept_pairs: Tensor, gt_same: Tensor, valid: Tensor) -> dict[str, float]:
    """Precision / recall of the pairs a pairwise term keeps as "same label".

    ``kept_pairs``: pairs the term supervises (bool, or a float weight per
    pair); ``gt_same``: pairs whose two pixels share the GT label (both in the
    mask or both outside); ``valid``: the candidate pairs (centre in the box,
    neighbour a real pixel). Only valid pairs count:

    * ``precision = sum(kept * gt_same) / sum(kept)``
    * ``recall = sum(kept * gt_same) / sum(gt_same)``

    Returns ``{"precision", "recall"}``, each omitted when its denominator is 0.
    """
    _check_shapes(kept_pairs=kept_pairs, gt_same=gt_same, valid=valid)
    valid_b = as_bool(valid)
    if kept_pairs.dtype == torch.bool:
        kept = (kept_pairs & valid_b).double()
    else:
        kept = kept_pairs.double() * valid_b
    same = (as_bool(gt_same) & valid_b).double()
    out: dict[str, float] = {}
    hit = (kept * same).sum()
    _put(out, "precision", safe_ratio(hit, kept.sum()))
    _put(out, "recall", safe_ratio(hit, same.sum()))
    return out


@torch.no_grad()
def gt_same_label_pairs(gt_masks: Tensor, kernel: int = 3, dilation: int = 2) -> Tensor:
    """``[P, K, h, w]`` bool: pixel and neighbour ``k`` share the GT label.

    Same neighbour order and geometry as BoxInst's pairwise term
    (``baselines.lab.unfold_neighbours``); neighbours outside the map read as
    background (such pairs are never valid candidates anyway).
    """
    from baselines.lab import unfold_neighbours

    if gt_masks.dim() == 4:
        gt_masks = gt_masks[:, 0]
    fg = as_bool(gt_masks).float().unsqueeze(1)  # [P, 1, h, w]
    neighbours = unfold_neighbours(fg, kernel, dilation)[:, 0] > 0.5  # [P, K, h, w]
    return neighbours == (fg > 0.5)


@torch.no_grad()
def pseudo_label_quality(fg: Tensor, bg: Tensor, ignore: Tensor, gt_mask: Tensor,
                         box_mask: Tensor) -> dict[str, float]:
    """In-box quality of a foreground / background / ignored labelling.

    All five are ``[P, h, w]`` (bool or float read as ``> 0.5``); only pixels
    inside ``box_mask`` count. With ``G`` the GT mask:

    * ``fg_precision = |fg & G| / |fg|``, ``fg_recall = |fg & G| / |G|``
    * ``bg_precision = |bg & ~G| / |bg|``, ``bg_recall = |bg & ~G| / |~G|``
    * ``ignored = |ignore| / |box|``

    Keys with an empty denominator are omitted.
    """
    _check_shapes(fg=fg, bg=bg, ignore=ignore, gt_mask=gt_mask, box_mask=box_mask)
    box = as_bool(box_mask)
    gt = as_bool(gt_mask) & box
    not_gt = ~as_bool(gt_mask) & box
    f = as_bool(fg) & box
    b = as_bool(bg) & box
    i = as_bool(ignore) & box
    out: dict[str, float] = {}
    _put(out, "fg_precision", safe_ratio((f & gt).sum(), f.sum()))
    _put(out, "fg_recall", safe_ratio((f & gt).sum(), gt.sum()))
    _put(out, "bg_precision", safe_ratio((b & not_gt).sum(), b.sum()))
    _put(out, "bg_recall", safe_ratio((b & not_gt).sum(), not_gt.sum()))
    _put(out, "ignored", safe_ratio(i.sum(), box.sum()))
    return out


@torch.no_grad()
def foreground_iou(pred_fg: Tensor, gt_mask: Tensor, box_mask: Tensor | None = None) -> float | None:
    """Pooled IoU ``sum|pred & G| / sum|pred | G|`` of a foreground with the GT mask.

    Inputs are ``[P, h, w]`` (or any common shape; bool or float read as
    ``> 0.5``); with ``box_mask`` only pixels inside the box count. Returns
    ``None`` when the union is empty (leave the key out then).
    """
    if box_mask is None:
        box_mask = torch.ones_like(as_bool(gt_mask))
    _check_shapes(pred_fg=pred_fg, gt_mask=gt_mask, box_mask=box_mask)
    box = as_bool(box_mask)
    pred = as_bool(pred_fg) & box
    gt = as_bool(gt_mask) & box
    return safe_ratio((pred & gt).sum(), (pred | gt).sum())


def diagnosable_rows(num_instances: int, gt_pasted: Tensor | None, gt_has_mask: Tensor | None,
                     device: torch.device | None = None) -> Tensor:
    """``[P]`` bool: instances whose ``gt_bitmasks`` are real GT masks.

    Drops SIM's pasted instances (their masks are pseudo masks) and targets
    without masks (``extras["gt_has_mask"]`` from the detector).
    """
    rows = torch.ones(num_instances, dtype=torch.bool, device=device)
    if gt_pasted is not None:
        rows = rows & ~gt_pasted.to(device=rows.device, dtype=torch.bool).reshape(-1)
    if gt_has_mask is not None:
        rows = rows & gt_has_mask.to(device=rows.device, dtype=torch.bool).reshape(-1)
    return rows


def one_row_per_gt(gt_inds: Tensor, rows: Tensor) -> Tensor:
    """Indices of the first selected row of each distinct GT (``rows`` ``[P]`` bool).

    The detector samples several positives per GT; a target that depends only
    on the GT (its box, its image, the teacher's map of it) is then scored once
    per GT rather than once per sampled row.
    """
    idx = torch.nonzero(rows.reshape(-1), as_tuple=False).squeeze(1)
    if idx.numel() == 0:
        return idx
    g = gt_inds.reshape(-1)[idx]
    order = torch.argsort(g, stable=True)
    g_sorted = g[order]
    first = torch.ones_like(g_sorted, dtype=torch.bool)
    first[1:] = g_sorted[1:] != g_sorted[:-1]
    return idx[order[first]]


@torch.no_grad()
def kept_pair_quality(similarity: Tensor, box_masks: Tensor, gt_masks: Tensor, color_thresh: float,
                      kernel: int = 3, dilation: int = 2) -> dict[str, float]:
    """``pair_precision`` / ``pair_recall`` of BoxInst's pairwise selection.

    ``similarity`` ``[N, K, h, w]`` is the per-instance pair similarity the
    pairwise term thresholds (colour, or colour x feature in SIM's released
    code), ``box_masks`` / ``gt_masks`` ``[N, h, w]``. As the loss: candidate
    pairs have their centre in the box and a real neighbour (similarity > 0);
    kept pairs are the candidates with similarity >= ``color_thresh``.
    """
    boxes = as_bool(box_masks.reshape(box_masks.shape[0], 1, *box_masks.shape[-2:]))
    candidate = (similarity > 0) & boxes
    kept = candidate & (similarity >= color_thresh)
    same = gt_same_label_pairs(gt_masks, kernel, dilation)
    return prefixed("pair_", pair_label_quality(kept, same, candidate))


def prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    """``{prefix + name: value}``."""
    return {prefix + name: value for name, value in metrics.items()}
