"""The shared detector: backbone + FPN + FCOS head + CondInst dynamic mask head.

Every method in simbench trains this same network; they differ only in the
mask loss passed to :meth:`CondInst.training_losses` (``baselines.build_mask_loss``).

Settings (the ``model`` params section; missing keys take ``DEFAULT_MODEL_CFG``,
the paper-scale values; the demo column is the `demo` profile; ``DEMO_MODEL_CFG`` is a
smaller CPU model the unit tests use):

========================  ==================  ==============  ==================================================
key                       paper default       demo            meaning
========================  ==================  ==============  ==================================================
backbone                  resnet50            resnet_tiny     resnet18 | resnet50 | resnet101 | resnet_tiny | swin_b | resnet101_dcn | efficientnet_lite0
pretrained                none (profiles:     none            imagenet | none | weights file (state dict or
                          imagenet)                           detectron2 .pkl); null is an error (sim_core/model/pretrained.py)
freeze_at                 2                   0               ResNet stages frozen (detectron2: 2 = stem + res2)
tiny_widths               [16, 32, 64, 128]   [32,64,128,256] resnet_tiny stage widths (strides 4/8/16/32)
tiny_blocks               [1, 1, 1, 1]        [1, 1, 1, 1]    resnet_tiny BasicBlocks per stage
tiny_norm                 GN                  BN              resnet_tiny normalisation (GN | BN)
neck                      fpn                 fpn             fpn | bifpn
fpn_channels              256                 64              channels of every FPN level and of the head
fpn_levels                [3, 4, 5, 6, 7]     [3, 4, 5]       FPN levels (stride 2**l)
head_convs                4                   2               convs per FCOS tower
head_norm                 GN                  GN              GN | none in the FCOS towers
head_conv_bias            false               false           tower convs keep a bias before GN (AdelaiDet: true)
gn_groups                 32                  16              GroupNorm groups of the FCOS towers
prior_prob                0.01                0.01            initial foreground probability of the classifier
box_activation            relu                relu            relu (normalised targets) | exp (original FCOS)
sizes_of_interest         [64, 128, 256, 512] [32, 64]        FCOS level size ranges (len = levels - 1)
center_sampling_radius    1.5                 1.5             FCOS centre sampling radius in strides (0 = off)
center_sampling_center    box                 box             box (box centre) | mass (AdelaiDet: centre of mass of
                                                              the GT mask, or of the box filled at whole pixels
                                                              for box-supervised methods; sim_core/model/fcos.py)
iou_smoothing             0.0                 0.0             GIoU's IoU as (I + a s^2)/(U + a s^2); AdelaiDet 1.0
mask_branch_channels      128                 64              width of the mask branch
mask_branch_convs         4                   1               3x3 convs after the P3-P5 fusion
mask_branch_norm          BN                  GN              BN | GN | none in the mask branch
mask_feat_stride          8                   4               stride of the mask features (4 adds C2; docs/demo_scale.md)
mask_stride4_input        c2                  c2              at stride 4: c2 (C2 through a conv, simbench) | p2 (FPN P2,
                                                              AdelaiDet's MASK_BRANCH.IN_FEATURES p2-p5)
mask_fusion_stride        8                   8               with c2 at stride 4, where refined P3-P5 are summed:
                                                              8 (then x2, simbench) | 4 (each level straight to
                                                              stride 4, AdelaiDet's; p2 always does this)
mask_out_channels         16                  8               mask feature channels (CondInst 8; BoxInst/SIM 16)
dyn_channels              8                   8               width of the dynamic mask head
dyn_layers                3                   3               layers of the dynamic mask head
topk_masks_per_image      64                  16              mask-trained positives per image (<= 0: all)
focal_alpha               0.25                0.25            focal loss alpha
focal_gamma               2.0                 2.0             focal loss gamma
score_thresh              0.05                0.05            inference: minimum class probability
nms_thresh                0.6                 0.6             inference: class-aware NMS IoU
max_detections            100                 100             inference: detections kept per image
pre_nms_topk              1000                1000            inference: candidates per level before NMS
thresh_with_ctr           false (BoxInst      true            inference: threshold cls * centerness, not cls
                          profiles: true)                     (AdelaiDet's MODEL.FCOS.THRESH_WITH_CTR)
========================  ==================  ==============  ==================================================

Mask stride is 4 and the mask branch stride 8, as CondInst; the demo runs the
mask branch at stride 4 (reason in ``sim_core/model/mask_head.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from sim_core.errors import InputError
from sim_core.model.backbone import build_backbone
from sim_core.model.fcos import (FCOSAssignment, FCOSHead, assign_targets, compute_locations, decode_boxes,
                                 detection_losses, mask_mass_centres, raster_box_centres)
from sim_core.model.mask_head import DynamicMaskHead, MaskBranch
from sim_core.model.mask_inputs import MaskLossInputs
from sim_core.model.neck import build_neck, check_fpn_levels, stride4_input
from sim_core.model.postprocess import paste_masks, select_detections

DEFAULT_MODEL_CFG: dict[str, Any] = {
    "backbone": "resnet50", "pretrained": "none", "freeze_at": 2,
    "tiny_widths": [16, 32, 64, 128], "tiny_blocks": [1, 1, 1, 1], "tiny_norm": "GN",
    "neck": "fpn", "fpn_channels": 256, "fpn_levels": [3, 4, 5, 6, 7],
    "head_convs": 4, "head_norm": "GN", "head_conv_bias": False, "gn_groups": 32, "prior_prob": 0.01,
    "box_activation": "relu",
    "sizes_of_interest": [64, 128, 256, 512], "center_sampling_radius": 1.5, "center_sampling_center": "box",
    "iou_smoothing": 0.0, "mask_fusion_stride": 8,
    "mask_branch_channels": 128, "mask_branch_convs": 4, "mask_branch_norm": "BN", "mask_feat_stride": 8,
    "mask_stride4_input": "c2", "mask_out_channels": 16,
    "dyn_channels": 8, "dyn_layers": 3, "topk_masks_per_image": 64,
    "focal_alpha": 0.25, "focal_gamma": 2.0,
    "score_thresh": 0.05, "nms_thresh": 0.6, "max_detections": 100, "pre_nms_topk": 1000,
    "thresh_with_ctr": False,
}
DEMO_MODEL_CFG: dict[str, Any] = {
    **DEFAULT_MODEL_CFG,
    "backbone": "resnet_tiny", "freeze_at": 0, "fpn_channels": 64, "fpn_levels": [3, 4, 5],
    "head_convs": 2, "gn_groups": 16, "sizes_of_interest": [32, 64],
    "mask_branch_channels": 64, "mask_branch_convs": 2, "mask_branch_norm": "GN", "mask_feat_stride": 8,
    "mask_out_channels": 8,
}
PIXEL_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
PIXEL_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
SIZE_DIVISIBILITY = 32
MASK_STRIDE = 4
CENTRE_KINDS = ("box", "mass")


@dataclass
class Preprocessed:
    """A padded batch. Padding (bottom/right, to a multiple of 32) is zero in every tensor."""

    images_norm: Tensor  # [B, 3, H, W] ImageNet-normalised
    images_raw: Tensor  # [B, 3, H, W] float RGB in [0, 255]
    image_valid: Tensor  # [B, H, W] 1.0 on image pixels
    sizes: list[tuple[int, int]]  # (h, w) of each image before padding


@dataclass
class DetectorOutputs:
    """Raw head outputs, flattened over FPN levels (level-major, then row-major cells)."""

    cls_logits: Tensor  # [B, N, C]
    box_reg: Tensor  # [B, N, 4] ltrb distances in pixels
    centerness: Tensor  # [B, N] logits
    controllers: Tensor  # [B, N, K] dynamic mask head parameters
    locations: Tensor  # [N, 2] (x, y) pixel centre of each location
    strides: Tensor  # [N]
    levels: Tensor  # [N] level index, 0 = first FPN level
    mask_feats: Tensor  # [B, Cm, H/s, W/s], s = model.mask_feat_stride
    num_per_level: list[int] = field(default_factory=list)
    pyramid: list[Tensor] = field(default_factory=list)  # the FCOS head's input levels [B, C, h, w]


def flatten_levels(maps: list[Tensor]) -> Tensor:
    """Per-level ``[B, C, h, w]`` -> ``[B, sum(h*w), C]``."""
    return torch.cat([m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, m.shape[1]) for m in maps], dim=1)


class CondInst(nn.Module):
    """CondInst-style detector shared by all methods (see the module docstring)."""

    def __init__(self, num_classes: int, cfg: dict[str, Any] | None = None):
        super().__init__()
        if num_classes < 1:
            raise InputError("model", f"need at least one class, got {num_classes}")
        cfg = {**DEFAULT_MODEL_CFG, **(cfg or {})}
        self.cfg = cfg
        self.num_classes = num_classes
        levels = check_fpn_levels(cfg["fpn_levels"])
        self.fpn_strides = [2 ** level for level in levels]
        soi = list(cfg["sizes_of_interest"])
        if len(soi) != len(levels) - 1 or any(b <= a for a, b in zip(soi, soi[1:])) or min(soi) <= 0:
            raise InputError("model.sizes_of_interest",
                             f"need {len(levels) - 1} increasing positive bounds for fpn_levels {levels}, got {soi}")
        self.sizes_of_interest = soi
        self.backbone = build_backbone(cfg)
        self.neck = build_neck(cfg, self.backbone.out_channels)
        channels = int(cfg["fpn_channels"])
        mask_feat_stride = int(cfg["mask_feat_stride"])
        self.mask_head = DynamicMaskHead(int(cfg["mask_out_channels"]), int(cfg["dyn_channels"]),
                                         int(cfg["dyn_layers"]), soi, self.fpn_strides, MASK_STRIDE,
                                         feat_stride=mask_feat_stride)
        self.head = FCOSHead(channels, num_classes, int(cfg["head_convs"]), self.fpn_strides,
                             self.mask_head.num_params, cfg["head_norm"], int(cfg["gn_groups"]),
                             float(cfg["prior_prob"]), cfg["box_activation"], bool(cfg["head_conv_bias"]))
        self.stride4_input = stride4_input(cfg)
        if cfg["center_sampling_center"] not in CENTRE_KINDS:
            raise InputError("model.center_sampling_center",
                             f"must be one of {', '.join(CENTRE_KINDS)}, got {cfg['center_sampling_center']!r}")
        if not isinstance(cfg["iou_smoothing"], (int, float)) or float(cfg["iou_smoothing"]) < 0:
            raise InputError("model.iou_smoothing", f"must be a number >= 0, got {cfg['iou_smoothing']!r}")
        if cfg["mask_fusion_stride"] not in (4, 8):
            raise InputError("model.mask_fusion_stride", f"must be 8 or 4, got {cfg['mask_fusion_stride']!r}")
        detail_channels = channels if self.stride4_input == "p2" else self.backbone.out_channels.get("c2")
        self.mask_branch = MaskBranch(channels, int(cfg["mask_branch_channels"]), int(cfg["mask_branch_convs"]),
                                      int(cfg["mask_out_channels"]), cfg["mask_branch_norm"],
                                      out_stride=mask_feat_stride, detail_channels=detail_channels,
                                      fuse_at_stride4=self.stride4_input == "p2" or int(cfg["mask_fusion_stride"]) == 4)
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(3, 1, 1), persistent=False)
        # Channels-last conv weights make oneDNN (CPU) and cuDNN pick their faster NHWC
        # kernels: a demo training step is about 13% faster on CPU; the maths is unchanged.
        self.to(memory_format=torch.channels_last)

    # ------------------------------------------------------------------ inputs
    def preprocess(self, images: list[Tensor]) -> Preprocessed:
        """Normalise the valid region of each ``[3, h, w]`` image (uint8 or 0-255 float) and pad."""
        if not images:
            raise ValueError("preprocess needs at least one image")
        for im in images:
            if im.dim() != 3 or im.shape[0] != 3:
                raise ValueError(f"images must be [3, h, w] tensors, got shape {tuple(im.shape)}")
        device = self.pixel_mean.device
        sizes = [(int(im.shape[1]), int(im.shape[2])) for im in images]
        pad_h = int(math.ceil(max(h for h, _ in sizes) / SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY)
        pad_w = int(math.ceil(max(w for _, w in sizes) / SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY)
        n = len(images)
        raw = torch.zeros(n, 3, pad_h, pad_w, device=device)
        norm = torch.zeros(n, 3, pad_h, pad_w, device=device)
        valid = torch.zeros(n, pad_h, pad_w, device=device)
        for i, (im, (h, w)) in enumerate(zip(images, sizes)):
            x = im.to(device=device, dtype=torch.float32)
            raw[i, :, :h, :w] = x
            norm[i, :, :h, :w] = (x - self.pixel_mean) / self.pixel_std
            valid[i, :h, :w] = 1.0
        return Preprocessed(norm, raw, valid, sizes)

    # ------------------------------------------------------------------ network
    def forward(self, images_norm: Tensor) -> DetectorOutputs:
        feats, pyramid = self.pyramid(images_norm)
        cls, box, ctr, ctl = self.head(pyramid)
        mask_feats = self.mask_features(feats, pyramid)
        locations, strides, levels, counts = self.level_locations(pyramid)
        return DetectorOutputs(
            cls_logits=flatten_levels(cls), box_reg=flatten_levels(box), centerness=flatten_levels(ctr)[..., 0],
            controllers=flatten_levels(ctl), locations=locations, strides=strides,
            levels=levels, mask_feats=mask_feats, num_per_level=counts, pyramid=pyramid)

    def pyramid(self, images_norm: Tensor) -> tuple[dict[str, Tensor], list[Tensor]]:
        """Backbone features and the neck's levels (checked against ``fpn_strides``)."""
        feats = self.backbone(images_norm)
        pyramid = self.neck(feats)
        if self.stride4_input == "p2":  # P2 feeds only the mask branch, never the FCOS head
            feats = {**feats, "p2": pyramid[0]}
            pyramid = pyramid[1:]
        if len(pyramid) != len(self.fpn_strides):
            raise ValueError(f"neck returned {len(pyramid)} levels, expected {len(self.fpn_strides)}")
        return feats, pyramid

    def mask_features(self, feats: dict[str, Tensor], pyramid: list[Tensor]) -> Tensor:
        """The mask branch's output from :meth:`pyramid`'s two results.

        The one place that picks the branch's stride-4 input (C2 or P2, read at
        stride 4 only), so every pass through the network (the student's
        forward, SIM's teacher) feeds the branch the same map.
        """
        return self.mask_branch(pyramid, feats.get(self.stride4_input or "c2"))

    def level_locations(self, pyramid: list[Tensor]) -> tuple[Tensor, Tensor, Tensor, list[int]]:
        """Flattened location grid of ``pyramid``: ``(x, y)`` ``[N, 2]``, stride ``[N]``, level ``[N]``, counts."""
        device = pyramid[0].device
        locs, strides, levels, counts = [], [], [], []
        for level, (feat, stride) in enumerate(zip(pyramid, self.fpn_strides)):
            loc = compute_locations(feat.shape[-2], feat.shape[-1], stride, device)
            locs.append(loc)
            strides.append(torch.full((len(loc),), stride, dtype=torch.long, device=device))
            levels.append(torch.full((len(loc),), level, dtype=torch.long, device=device))
            counts.append(len(loc))
        return torch.cat(locs), torch.cat(strides), torch.cat(levels), counts

    def instance_mask_logits(self, mask_feats: Tensor, controllers: Tensor, locations: Tensor, im_inds: Tensor,
                             strides: Tensor) -> Tensor:
        """Mask logits ``[P, 1, H/4, W/4]`` of ``P`` instances given by their controller ``[P, K]``,
        FCOS location ``[P, 2]`` (pixels), image index ``[P]`` into ``mask_feats`` and level stride ``[P]``."""
        return self.mask_head(mask_feats, controllers, locations, im_inds, strides)

    @staticmethod
    def decode_boxes(locations: Tensor, box_reg: Tensor) -> Tensor:
        """``(x, y)`` locations and ltrb pixel distances (``DetectorOutputs.box_reg``) -> xyxy boxes."""
        return decode_boxes(locations, box_reg)

    # ------------------------------------------------------------------ training
    def assign(self, outputs: DetectorOutputs, targets: list[dict[str, Tensor]],
               mask_centres: bool = False) -> FCOSAssignment:
        """FCOS targets for a batch (``targets`` as the dataset returns them).

        ``mask_centres``: the method trains on masks, so ``center_sampling_center: mass`` takes the centre of
        mass of each target's mask (of its box, filled at whole pixels, when the mask is empty). A target
        with supervision ``regions`` (SIM's pasted batches, ``sim.paste_supervision: region``) takes their
        centres of mass instead: AdelaiDet centres on ``gt_bitmasks_full``, which the release's copy-paste
        sets to those regions.
        """
        boxes = [t["boxes"].reshape(-1, 4) for t in targets]
        labels = [t["labels"].reshape(-1) for t in targets]
        for lab in labels:
            if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= self.num_classes):
                raise ValueError(f"target labels must lie in 0..{self.num_classes - 1}, got {lab.tolist()}")
        centres = None
        if self.cfg["center_sampling_center"] == "mass":
            stride = self.mask_branch.out_stride
            pad_h, pad_w = (int(v) * stride for v in outputs.mask_feats.shape[-2:])
            centres = [self._mass_centres(t, b, pad_h, pad_w, mask_centres) for t, b in zip(targets, boxes)]
        return assign_targets(outputs.locations, outputs.strides, outputs.levels, boxes, labels,
                              self.sizes_of_interest, float(self.cfg["center_sampling_radius"]), self.num_classes,
                              gt_centres=centres)

    @staticmethod
    def _mass_centres(target: dict[str, Tensor], boxes: Tensor, pad_h: int, pad_w: int, use_masks: bool) -> Tensor:
        centres = raster_box_centres(boxes, pad_h, pad_w)
        masks = target.get("masks")
        if target.get("regions") is not None:
            masks, use_masks = target["regions"], True
        if use_masks and masks is not None and len(masks) == len(boxes) and len(boxes):
            filled = (masks.reshape(len(boxes), -1) > 0).any(dim=1).to(centres.device)
            centres = torch.where(filled[:, None], mask_mass_centres(masks).to(centres.device), centres)
        return centres

    def sample_mask_instances(self, outputs: DetectorOutputs, assignment: FCOSAssignment) -> Tensor:
        """Indices into the assignment's positives that train the mask head (BoxInst/CondInst).

        Per image at most ``topk_masks_per_image`` positives, spread evenly over
        the image's GTs that have positives (``max(topk // #GTs, 1)`` each), the
        best ranked by ``max_c sigmoid(cls) * sigmoid(centerness)``.
        """
        a = assignment
        topk = int(self.cfg["topk_masks_per_image"])
        n = a.num_pos
        device = a.pos_loc_inds.device
        if topk <= 0 or n == 0:
            return torch.arange(n, device=device)
        with torch.no_grad():
            cls = outputs.cls_logits[a.pos_im_inds, a.pos_loc_inds].sigmoid().max(dim=1).values
            scores = cls * outputs.centerness[a.pos_im_inds, a.pos_loc_inds].sigmoid()
        order = torch.argsort(scores, descending=True, stable=True)
        order = order[torch.argsort(a.pos_gt_inds[order], stable=True)]  # grouped by GT, best first
        gts = a.pos_gt_inds[order]
        first = torch.ones(n, dtype=torch.bool, device=device)
        first[1:] = gts[1:] != gts[:-1]
        group = torch.cumsum(first.long(), 0) - 1
        rank = torch.arange(n, device=device) - torch.nonzero(first).squeeze(1)[group]
        group_im = a.gt_im_inds[gts[first]]
        gts_per_im = torch.bincount(group_im, minlength=int(a.labels.shape[0]))
        quota = (topk // gts_per_im[group_im]).clamp(min=1)
        return torch.sort(order[rank < quota[group]]).values

    def training_losses(self, images: list[Tensor], targets: list[dict[str, Any]],
                        mask_loss: Callable[[MaskLossInputs], dict[str, Tensor]] | None,
                        iteration: int = 0, max_iter: int = 1, teacher: nn.Module | None = None,
                        extras: dict[str, Any] | None = None, diagnose: bool = False) -> dict[str, Tensor]:
        """Detection losses plus the terms of ``mask_loss`` (None: detection only).

        ``diagnose`` is passed to the mask loss as ``MaskLossInputs.diagnose``
        (fill ``mask_loss.last_quality`` this step; see
        ``sim_core.evaluation.supervision_quality``).

        ``inputs.extras`` carries ``outputs`` (DetectorOutputs), ``assignment``
        (FCOSAssignment), ``sampled`` (indices into its positives, aligned with
        the mask rows), ``preprocessed``, ``gt_has_mask`` ([P] bool: the target
        had instance masks), ``gt_regions`` (``[G, H/4, W/4]``, every GT's
        supervision region, see :func:`supervision_regions`; ``gt_boxmasks`` is
        its sampled rows), ``gt_regions_full`` (only when a target carries
        ``regions``: those full-resolution rows per image, None for the
        others), ``teacher`` when given, and every entry of ``extras``.
        """
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        pre = self.preprocess(images)
        out = self(pre.images_norm)
        a = self.assign(out, targets, mask_centres=bool(getattr(mask_loss, "supervises_with_masks", False)))
        losses = detection_losses(out.cls_logits, out.box_reg, out.centerness, out.locations, a,
                                  float(self.cfg["focal_alpha"]), float(self.cfg["focal_gamma"]),
                                  float(self.cfg["iou_smoothing"]))
        if mask_loss is None:
            return losses
        sampled = self.sample_mask_instances(out, a)
        im = a.pos_im_inds[sampled]
        loc = a.pos_loc_inds[sampled]
        gt = a.pos_gt_inds[sampled]
        logits = self.instance_mask_logits(out.mask_feats, out.controllers[im, loc], out.locations[loc], im,
                                           out.strides[loc])
        pad_h, pad_w = pre.images_norm.shape[-2:]
        bitmasks, has_mask = gt_bitmasks(targets, pad_h, pad_w, MASK_STRIDE, a.gt_boxes.device)
        pasted = None
        if any("pasted" in t for t in targets):
            pasted = torch.cat([t["pasted"].to(a.gt_boxes.device).bool().reshape(-1) if "pasted" in t
                                else torch.zeros(len(t["boxes"]), dtype=torch.bool, device=a.gt_boxes.device)
                                for t in targets])[gt]
        regions = supervision_regions(targets, a.gt_boxes, pad_h, pad_w, MASK_STRIDE)
        inputs = MaskLossInputs(
            mask_logits=logits, mask_feats=out.mask_feats, gt_boxes=a.gt_boxes[gt], gt_labels=a.gt_labels[gt],
            gt_inds=gt, im_inds=im, gt_bitmasks=bitmasks[gt], gt_boxmasks=regions[gt],
            images_raw=pre.images_raw, images_norm=pre.images_norm, image_valid=pre.image_valid,
            iteration=int(iteration), max_iter=int(max_iter), gt_pasted=pasted, diagnose=bool(diagnose))
        inputs.extras.update({"outputs": out, "assignment": a, "sampled": sampled, "preprocessed": pre,
                              "gt_has_mask": has_mask[gt], "gt_regions": regions})
        if any("regions" in t for t in targets):
            inputs.extras["gt_regions_full"] = [t.get("regions") for t in targets]
        if teacher is not None:
            inputs.extras["teacher"] = teacher
        inputs.extras.update(extras or {})
        for name, value in mask_loss(inputs).items():
            if name in losses:
                raise ValueError(f"mask loss term '{name}' collides with a detection loss")
            losses[name] = value
        return losses

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(self, images: list[Tensor], score_thresh: float | None = None, nms_thresh: float | None = None,
                max_detections: int | None = None, pre_nms_topk: int | None = None) -> list[dict[str, Tensor]]:
        """Detections per image: ``boxes`` [K,4] xyxy and ``masks`` [K,h,w] probabilities in the given
        image's pixels, ``scores`` [K], ``labels`` [K] (contiguous). ``None`` arguments take the cfg values.
        Runs in eval mode and restores the previous mode afterwards."""
        cfg = self.cfg
        params = {
            "score_thresh": cfg["score_thresh"] if score_thresh is None else score_thresh,
            "nms_thresh": cfg["nms_thresh"] if nms_thresh is None else nms_thresh,
            "max_detections": cfg["max_detections"] if max_detections is None else max_detections,
            "pre_nms_topk": cfg["pre_nms_topk"] if pre_nms_topk is None else pre_nms_topk,
            "thresh_with_ctr": bool(cfg["thresh_with_ctr"]),
        }
        was_training = self.training
        self.eval()
        try:
            pre = self.preprocess(images)
            out = self(pre.images_norm)
            results = []
            for b, size in enumerate(pre.sizes):
                det = select_detections(out.cls_logits[b], out.box_reg[b], out.centerness[b], out.locations,
                                        out.levels, size, **params)
                loc = det.pop("loc_inds")
                im = torch.zeros_like(loc)
                logits = self.instance_mask_logits(out.mask_feats[b:b + 1], out.controllers[b, loc],
                                                   out.locations[loc], im, out.strides[loc])
                det["masks"] = paste_masks(logits, size, MASK_STRIDE)
                results.append(det)
            return results
        finally:
            self.train(was_training)


def supervision_regions(targets: list[dict[str, Any]], gt_boxes: Tensor, pad_h: int, pad_w: int,
                        stride: int) -> Tensor:
    """Where each GT's box supervision applies, at ``stride`` ``[G, H/s, W/s]`` (batch-flat GT order).

    The filled box (:func:`box_masks`) unless the GT's target carries a
    ``regions`` row (SIM's copy-paste with ``sim.paste_supervision: region``,
    as the released code supervises a pasted batch: an occluded box minus
    the pasted pixels, a pasted instance's pseudo mask), sampled at
    ``s//2 + s*i`` as the box fill is.
    """
    out = box_masks(gt_boxes, pad_h, pad_w, stride)
    if not any("regions" in t for t in targets):
        return out
    start = stride // 2
    offset = 0
    for t in targets:
        g = len(t["boxes"])
        r = t.get("regions")
        if r is not None:
            if r.dim() != 3 or r.shape[0] != g or r.shape[1] > pad_h or r.shape[2] > pad_w:
                raise ValueError(f"target regions must be [{g}, h, w] within the padded batch "
                                 f"{pad_h}x{pad_w}, got shape {tuple(r.shape)}")
            small = r[:, start::stride, start::stride].to(device=out.device, dtype=out.dtype)
            out[offset:offset + g] = 0.0
            out[offset:offset + g, :small.shape[1], :small.shape[2]] = small
        offset += g
    return out


def gt_bitmasks(targets: list[dict[str, Any]], pad_h: int, pad_w: int, stride: int,
                device: torch.device) -> tuple[Tensor, Tensor]:
    """Batch-flat GT masks at ``stride`` ``[G, H/s, W/s]`` and ``[G]`` bool "the target had masks".

    Sampled at pixels ``s//2 + s*i`` of the zero-padded full-resolution mask, as
    AdelaiDet's ``add_bitmasks``. Images without a ``masks`` entry get zeros.
    """
    hs, ws = pad_h // stride, pad_w // stride
    start = stride // 2
    out, has = [], []
    for t in targets:
        g = len(t["boxes"])
        m = t.get("masks")
        if m is None:
            out.append(torch.zeros(g, hs, ws, device=device))
            has.append(torch.zeros(g, dtype=torch.bool, device=device))
            continue
        if m.dim() != 3 or m.shape[0] != g:
            raise ValueError(f"target masks must be [{g}, h, w], got shape {tuple(m.shape)}")
        small = m[:, start::stride, start::stride].to(device=device, dtype=torch.float32)
        if small.shape[1] > hs or small.shape[2] > ws:
            raise ValueError(f"target masks of shape {tuple(m.shape)} are larger than the padded batch")
        out.append(torch.nn.functional.pad(small, (0, ws - small.shape[2], 0, hs - small.shape[1])))
        has.append(torch.ones(g, dtype=torch.bool, device=device))
    return torch.cat(out), torch.cat(has)


def box_masks(boxes: Tensor, pad_h: int, pad_w: int, stride: int) -> Tensor:
    """Filled boxes at ``stride`` ``[G, H/s, W/s]``: full-resolution rows/columns ``int(y1)..int(y2)``
    (inclusive, as AdelaiDet's BoxInst) sampled at ``s//2 + s*i``."""
    start = stride // 2
    ys = torch.arange(pad_h // stride, device=boxes.device, dtype=torch.float32) * stride + start
    xs = torch.arange(pad_w // stride, device=boxes.device, dtype=torch.float32) * stride + start
    b = boxes.floor()
    in_y = (ys[None] >= b[:, 1:2]) & (ys[None] <= b[:, 3:4])
    in_x = (xs[None] >= b[:, 0:1]) & (xs[None] <= b[:, 2:3])
    return (in_y[:, :, None] & in_x[:, None, :]).float()
