"""FCOS head, FCOS target assignment and the detection losses (as in AdelaiDet).

Head: two towers of ``head_convs`` 3x3 conv + GroupNorm + ReLU shared over the
FPN levels; classification logits on the class tower (bias initialised to the
prior probability 0.01 so that focal loss starts stable); box regression,
centerness and the CondInst *controller* on the box tower (AdelaiDet puts
centerness and the controller on the regression tower). Box regression predicts
``(l, t, r, b)`` distances normalised by the level's stride,
``relu(scale_l * x)`` (AdelaiDet's ``NORM_REG_TARGETS``) or ``exp(scale_l * x)``
(the original FCOS), with a learnable scalar ``scale_l`` per level; the head
returns them multiplied by the stride, i.e. in pixels. GIoU is scale-invariant,
so training on pixel distances gives the same loss as on normalised ones.

Assignment (``assign_targets``): a location is a candidate for a GT box when it
lies inside the box's *centre region* (a square of half-side
``center_sampling_radius * stride`` around the box centre, clipped to the box)
and the largest of its four regression distances falls in the level's size
range (``sizes_of_interest`` ``[64, 128, 256, 512]`` gives P3 ``<= 64``, P4
``64..128`` ... P7 ``> 512``). Among candidates the GT of smallest area wins.
The centre is set by ``model.center_sampling_center``: ``box`` (simbench's
default) takes the box centre for every method; ``mass`` takes AdelaiDet's
centre, the centre of mass of the GT's full-resolution bitmask in pixel-index
coordinates (``get_sample_region`` with ``gt_bitmasks_full``): the instance
mask when the method trains on masks (CondInst), else the box filled at whole
pixels as AdelaiDet rasterises it (BoxInst, and SIM's fork of it), which sits
about half a pixel above and left of the box centre (:func:`raster_box_centres`,
:func:`mask_mass_centres`). ``simbench upstream crosscheck`` found the
difference (docs/upstream.md 0.10).

Losses: sigmoid focal loss (alpha 0.25, gamma 2) summed and divided by the
number of positives; GIoU loss of the positives weighted by their centerness
targets and divided by the sum of those targets (``model.iou_smoothing`` ``a``
> 0 takes the IoU inside the GIoU as ``(I + a s^2) / (U + a s^2)`` with the
level stride ``s``: AdelaiDet's and FCOS's reference ``compute_ious`` adds 1.0
to intersection and union in stride units; 0, the default, is torchvision's
plain GIoU); BCE on centerness divided by
the number of positives. Under ``torch.distributed`` both normalisers are
averaged over processes, as AdelaiDet does, so every process divides by the
same number.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from sim_core.errors import InputError
from sim_core.model.group_norm import GroupNorm32
from sim_core.model.mask_inputs import zero_loss

INF = 1e8


class Scale(nn.Module):
    """A learnable scalar multiplier (one per FPN level for box regression)."""

    def __init__(self, init: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def _tower(channels: int, num_convs: int, norm: str, gn_groups: int, conv_bias: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers.append(nn.Conv2d(channels, channels, 3, 1, 1, bias=norm != "GN" or conv_bias))
        if norm == "GN":
            if channels % gn_groups:
                raise InputError("model.gn_groups", f"{gn_groups} groups do not divide {channels} head channels")
            layers.append(GroupNorm32(gn_groups, channels))
        elif norm != "none":
            raise InputError("model.head_norm", f"must be 'GN' or 'none', got {norm!r}")
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class FCOSHead(nn.Module):
    """Shared FCOS head with a CondInst controller; see the module docstring."""

    def __init__(self, channels: int, num_classes: int, num_convs: int, strides: list[int],
                 num_controller_params: int, norm: str = "GN", gn_groups: int = 32,
                 prior_prob: float = 0.01, box_activation: str = "relu", conv_bias: bool = False):
        """``conv_bias``: the tower convolutions keep a bias before their GroupNorm (AdelaiDet's head does;
        with two channels per group it is not absorbed by the normalisation)."""
        super().__init__()
        if box_activation not in ("relu", "exp"):
            raise InputError("model.box_activation", f"must be 'relu' or 'exp', got {box_activation!r}")
        self.strides = list(strides)
        self.box_activation = box_activation
        self.cls_tower = _tower(channels, num_convs, norm, gn_groups, conv_bias)
        self.box_tower = _tower(channels, num_convs, norm, gn_groups, conv_bias)
        self.cls_logits = nn.Conv2d(channels, num_classes, 3, 1, 1)
        self.box_pred = nn.Conv2d(channels, 4, 3, 1, 1)
        self.ctr_pred = nn.Conv2d(channels, 1, 3, 1, 1)
        self.controller = nn.Conv2d(channels, num_controller_params, 3, 1, 1)
        self.scales = nn.ModuleList(Scale(1.0) for _ in strides)
        for m in [*self.cls_tower, *self.box_tower, self.cls_logits, self.box_pred, self.ctr_pred, self.controller]:
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0.0)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """Per level: cls logits [B,C,h,w], ltrb pixels [B,4,h,w], centerness [B,1,h,w], controllers [B,K,h,w]."""
        cls, box, ctr, ctl = [], [], [], []
        for feat, scale, stride in zip(feats, self.scales, self.strides):
            c = self.cls_tower(feat)
            b = self.box_tower(feat)
            cls.append(self.cls_logits(c))
            box.append(self._box_regression(b, scale, stride))
            ctr.append(self.ctr_pred(b))
            ctl.append(self.controller(b))
        return cls, box, ctr, ctl

    def box_outputs(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per level: ltrb pixels and controllers only, as :meth:`forward` computes them.

        The classification tower, the class logits and the centerness are
        skipped (SIM's teacher reads boxes and controllers only).
        """
        box, ctl = [], []
        for feat, scale, stride in zip(feats, self.scales, self.strides):
            b = self.box_tower(feat)
            box.append(self._box_regression(b, scale, stride))
            ctl.append(self.controller(b))
        return box, ctl

    def _box_regression(self, b: Tensor, scale: "Scale", stride: int) -> Tensor:
        reg = scale(self.box_pred(b))
        reg = F.relu(reg) if self.box_activation == "relu" else torch.exp(reg.clamp(max=math.log(INF)))
        return reg * stride


def compute_locations(h: int, w: int, stride: int, device: torch.device | str = "cpu") -> Tensor:
    """Image coordinates ``(x, y)`` of the centres of an ``h x w`` map's cells, row-major: ``[h*w, 2]``."""
    xs = torch.arange(w, device=device, dtype=torch.float32) * stride + stride // 2
    ys = torch.arange(h, device=device, dtype=torch.float32) * stride + stride // 2
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)


def decode_boxes(locations: Tensor, box_reg: Tensor) -> Tensor:
    """``(l, t, r, b)`` pixel distances at ``(x, y)`` locations -> xyxy boxes (any leading shape)."""
    x, y = locations[..., 0], locations[..., 1]
    return torch.stack([x - box_reg[..., 0], y - box_reg[..., 1], x + box_reg[..., 2], y + box_reg[..., 3]], dim=-1)


def centerness_targets(reg: Tensor) -> Tensor:
    """``sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b))`` for ``[P, 4]`` ltrb targets."""
    if reg.numel() == 0:
        return reg.new_zeros(reg.shape[0])
    lr, tb = reg[:, [0, 2]], reg[:, [1, 3]]
    ratio = (lr.min(dim=1).values / lr.max(dim=1).values) * (tb.min(dim=1).values / tb.max(dim=1).values)
    return ratio.clamp(min=0).sqrt()


@dataclass
class FCOSAssignment:
    """Which GT each location of each image must predict.

    ``N`` locations per image (all levels, in the order of ``DetectorOutputs``),
    ``G`` GT boxes in the batch (image 0's first). Positive rows are listed in
    image-major, location order; row ``k`` of every ``pos_*`` tensor is one
    positive location.
    """

    labels: Tensor  # [B, N] int64 class per location, num_classes = background
    gt_inds: Tensor  # [B, N] int64 batch-flat GT index, -1 = background
    pos_im_inds: Tensor  # [P] image of the positive
    pos_loc_inds: Tensor  # [P] flat location index (over levels, per image)
    pos_gt_inds: Tensor  # [P] batch-flat GT index
    pos_levels: Tensor  # [P] level index (0 = first FPN level)
    pos_strides: Tensor  # [P] stride of that level
    pos_labels: Tensor  # [P] class label
    pos_reg_targets: Tensor  # [P, 4] ltrb distances in pixels
    pos_ctr_targets: Tensor  # [P] centerness targets
    gt_boxes: Tensor  # [G, 4] xyxy
    gt_labels: Tensor  # [G]
    gt_im_inds: Tensor  # [G]
    num_classes: int

    @property
    def num_pos(self) -> int:
        return int(self.pos_loc_inds.numel())


def level_size_ranges(sizes_of_interest: list[float], levels: Tensor) -> tuple[Tensor, Tensor]:
    """Lower/upper bound of the largest regression distance for each location's level."""
    bounds = torch.tensor([-1.0, *[float(s) for s in sizes_of_interest], INF], device=levels.device)
    return bounds[levels], bounds[levels + 1]


def raster_box_centres(boxes: Tensor, pad_h: int, pad_w: int) -> Tensor:
    """``[G, 2]`` centre of mass (x, y), in pixel indices, of each ``[G, 4]`` xyxy box filled at whole pixels
    as AdelaiDet rasterises a box (rows ``int(y1) .. int(y2 + 1) - 1``, clipped to the padded image).

    A box that covers no pixel gets AdelaiDet's ``0 / clamp(0, 1e-6)`` = (0, 0).
    """
    b = boxes.to(torch.float32)
    lo = torch.stack([b[:, 0].floor().clamp(0, pad_w), b[:, 1].floor().clamp(0, pad_h)], 1)
    hi = torch.stack([(b[:, 2] + 1).floor().clamp(0, pad_w), (b[:, 3] + 1).floor().clamp(0, pad_h)], 1)
    filled = (hi > lo).all(dim=1, keepdim=True)
    return torch.where(filled, (lo + hi - 1) / 2, torch.zeros_like(lo))


def mask_mass_centres(masks: Tensor) -> Tensor:
    """``[G, 2]`` centre of mass (x, y), in pixel indices, of ``[G, h, w]`` masks (AdelaiDet's formula)."""
    m = masks.to(torch.float32)
    ys = torch.arange(m.shape[1], dtype=torch.float32, device=m.device)
    xs = torch.arange(m.shape[2], dtype=torch.float32, device=m.device)
    mass = m.sum(dim=(1, 2)).clamp(min=1e-6)
    return torch.stack([(m.sum(dim=1) * xs).sum(dim=1) / mass, (m.sum(dim=2) * ys).sum(dim=1) / mass], 1)


def smoothed_giou_loss(pred: Tensor, target: Tensor, smoothing_area: Tensor) -> Tensor:
    """``1 - GIoU`` of ``[P, 4]`` xyxy boxes with the IoU ``(I + a) / (U + a)`` (``a``: ``[P]`` areas).

    AdelaiDet's ``compute_ious`` in pixels: its 1.0 in stride units is ``a = stride ** 2``. The enclosing
    term has no smoothing, as there.
    """
    iw = (torch.minimum(pred[:, 2], target[:, 2]) - torch.maximum(pred[:, 0], target[:, 0])).clamp(min=0)
    ih = (torch.minimum(pred[:, 3], target[:, 3]) - torch.maximum(pred[:, 1], target[:, 1])).clamp(min=0)
    inter = iw * ih
    union = ((pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
             + (target[:, 2] - target[:, 0]) * (target[:, 3] - target[:, 1]) - inter)
    enclosing = ((torch.maximum(pred[:, 2], target[:, 2]) - torch.minimum(pred[:, 0], target[:, 0]))
                 * (torch.maximum(pred[:, 3], target[:, 3]) - torch.minimum(pred[:, 1], target[:, 1])))
    iou = (inter + smoothing_area) / (union + smoothing_area)
    return 1 - (iou - (enclosing - union) / enclosing)


def assign_targets(locations: Tensor, strides: Tensor, levels: Tensor, gt_boxes: list[Tensor],
                   gt_labels: list[Tensor], sizes_of_interest: list[float], center_radius: float,
                   num_classes: int, gt_centres: list[Tensor] | None = None) -> FCOSAssignment:
    """FCOS/AdelaiDet assignment with centre sampling; see the module docstring.

    ``gt_centres`` (per image ``[G, 2]`` x, y) replaces the box centres of the centre regions.
    """
    device = locations.device
    n = locations.shape[0]
    lo, hi = level_size_ranges(sizes_of_interest, levels)
    xs, ys = locations[:, 0:1], locations[:, 1:2]
    labels_all, inds_all = [], []
    offset = 0
    for b, (boxes, labels) in enumerate(zip(gt_boxes, gt_labels)):
        boxes = boxes.to(device=device, dtype=torch.float32)
        g = boxes.shape[0]
        if g == 0:
            labels_all.append(torch.full((n,), num_classes, dtype=torch.long, device=device))
            inds_all.append(torch.full((n,), -1, dtype=torch.long, device=device))
            continue
        reg = torch.stack([xs - boxes[:, 0], ys - boxes[:, 1], boxes[:, 2] - xs, boxes[:, 3] - ys], dim=2)  # [N,G,4]
        if center_radius > 0:
            if gt_centres is None:
                cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
            else:
                cx, cy = gt_centres[b].to(device=device, dtype=torch.float32).unbind(1)
            r = strides.to(torch.float32)[:, None] * center_radius  # [N,1]
            cx0 = torch.maximum(cx - r, boxes[:, 0])
            cy0 = torch.maximum(cy - r, boxes[:, 1])
            cx1 = torch.minimum(cx + r, boxes[:, 2])
            cy1 = torch.minimum(cy + r, boxes[:, 3])
            inside = torch.stack([xs - cx0, ys - cy0, cx1 - xs, cy1 - ys], dim=2).min(dim=2).values > 0
        else:
            inside = reg.min(dim=2).values > 0
        max_reg = reg.max(dim=2).values
        cared = (max_reg >= lo[:, None]) & (max_reg <= hi[:, None])
        area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[None].expand(n, g)
        area = torch.where(inside & cared, area, torch.full_like(area, INF))
        min_area, gt_idx = area.min(dim=1)
        lab = labels.to(device=device, dtype=torch.long)[gt_idx]
        positive = min_area < INF
        labels_all.append(torch.where(positive, lab, torch.full_like(lab, num_classes)))
        inds_all.append(torch.where(positive, gt_idx + offset, torch.full_like(gt_idx, -1)))
        offset += g

    labels_b = torch.stack(labels_all)
    inds_b = torch.stack(inds_all)
    pos_im, pos_loc = torch.nonzero(inds_b >= 0, as_tuple=True)
    pos_gt = inds_b[pos_im, pos_loc]
    flat_boxes = torch.cat([b.to(device=device, dtype=torch.float32).reshape(-1, 4) for b in gt_boxes])
    flat_labels = torch.cat([lab.to(device=device, dtype=torch.long).reshape(-1) for lab in gt_labels])
    gt_im = torch.cat([torch.full((len(b),), i, dtype=torch.long, device=device) for i, b in enumerate(gt_boxes)])
    loc = locations[pos_loc]
    box = flat_boxes[pos_gt]
    reg_t = torch.stack([loc[:, 0] - box[:, 0], loc[:, 1] - box[:, 1], box[:, 2] - loc[:, 0], box[:, 3] - loc[:, 1]], 1)
    return FCOSAssignment(
        labels=labels_b, gt_inds=inds_b, pos_im_inds=pos_im, pos_loc_inds=pos_loc, pos_gt_inds=pos_gt,
        pos_levels=levels[pos_loc], pos_strides=strides[pos_loc], pos_labels=labels_b[pos_im, pos_loc],
        pos_reg_targets=reg_t, pos_ctr_targets=centerness_targets(reg_t),
        gt_boxes=flat_boxes, gt_labels=flat_labels, gt_im_inds=gt_im, num_classes=num_classes,
    )


def mean_over_processes(value: float, device: torch.device | str = "cpu") -> float:
    """Average a Python number over ``torch.distributed`` processes (identity otherwise).

    ``device`` must suit the backend (a CUDA device for nccl, CPU for gloo).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def detection_losses(cls_logits: Tensor, box_reg: Tensor, centerness: Tensor, locations: Tensor,
                     assignment: FCOSAssignment, focal_alpha: float = 0.25,
                     focal_gamma: float = 2.0, iou_smoothing: float = 0.0) -> dict[str, Tensor]:
    """``loss_cls`` (focal), ``loss_box`` (GIoU), ``loss_ctr`` (BCE); shapes [B,N,C], [B,N,4], [B,N].

    ``iou_smoothing`` > 0: AdelaiDet's smoothed IoU inside the GIoU (module docstring).
    """
    a = assignment
    ctr_t = a.pos_ctr_targets
    # Both all-reduces run on every process, also one without positives (collectives must match).
    num_pos = max(mean_over_processes(a.num_pos, cls_logits.device), 1.0)
    ctr_norm = max(mean_over_processes(float(ctr_t.sum()), cls_logits.device), 1e-6)
    target = torch.zeros_like(cls_logits)
    target[a.pos_im_inds, a.pos_loc_inds, a.pos_labels] = 1.0
    loss_cls = sigmoid_focal_loss(cls_logits, target, alpha=focal_alpha, gamma=focal_gamma, reduction="sum") / num_pos

    if a.num_pos == 0:
        return {"loss_cls": loss_cls, "loss_box": zero_loss(box_reg), "loss_ctr": zero_loss(centerness)}
    reg = box_reg[a.pos_im_inds, a.pos_loc_inds]
    pred_boxes = decode_boxes(locations[a.pos_loc_inds], reg)
    gt_boxes = a.gt_boxes[a.pos_gt_inds]
    if iou_smoothing > 0:
        area = iou_smoothing * a.pos_strides.to(pred_boxes.dtype) ** 2
        box_losses = smoothed_giou_loss(pred_boxes, gt_boxes, area)
    else:
        box_losses = generalized_box_iou_loss(pred_boxes, gt_boxes, reduction="none")
    loss_box = (box_losses * ctr_t).sum() / ctr_norm
    ctr_pred = centerness[a.pos_im_inds, a.pos_loc_inds]
    # targets are float32 (as AdelaiDet's); a float64 pass (the cross-check's reference) must not drop to them,
    # and half-precision predictions must not round them
    ctr_targets = ctr_t.to(torch.promote_types(ctr_t.dtype, ctr_pred.dtype))
    loss_ctr = F.binary_cross_entropy_with_logits(ctr_pred, ctr_targets, reduction="sum") / num_pos
    return {"loss_cls": loss_cls, "loss_box": loss_box, "loss_ctr": loss_ctr}
