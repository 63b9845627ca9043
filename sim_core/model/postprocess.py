"""Inference post-processing of the detector (as CondInst/FCOS in AdelaiDet).

Per image and per FPN level, every (location, class) pair whose class
probability passes ``score_thresh`` is a candidate; with ``thresh_with_ctr``
(AdelaiDet's ``MODEL.FCOS.THRESH_WITH_CTR``, true in every BoxInst config) the
threshold applies to ``cls * centerness`` instead. At most ``pre_nms_topk``
candidates per level are kept, ranked by ``cls * centerness``. Their score is
``sqrt(cls * centerness)``. This is the order of AdelaiDet's
``FCOSOutputs.forward_for_single_feature_map``: threshold, top-k, square root
(``boxlist.scores = torch.sqrt(per_box_cls)``). Boxes are
decoded, clipped to the image and empty ones dropped, class-aware NMS
(``torchvision.ops.batched_nms``) runs at ``nms_thresh`` and the
``max_detections`` best survive. Instance masks are then computed only for
the survivors and pasted to the input image size: sigmoid at stride 4, aligned
bilinear upsampling x4 to the padded input, crop of the padding.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms, clip_boxes_to_image, remove_small_boxes

from sim_core.model.fcos import decode_boxes
from sim_core.model.mask_head import aligned_bilinear


def select_detections(cls_logits: Tensor, box_reg: Tensor, centerness: Tensor, locations: Tensor,
                      levels: Tensor, image_size: tuple[int, int], score_thresh: float = 0.05,
                      nms_thresh: float = 0.6, max_detections: int = 100,
                      pre_nms_topk: int = 1000, thresh_with_ctr: bool = False) -> dict[str, Tensor]:
    """Detections of one image from its flattened outputs ``[N, C]``, ``[N, 4]``, ``[N]``.

    Returns ``loc_inds`` (the location each detection came from, needed to run
    its dynamic mask head), ``boxes`` xyxy, ``scores`` and ``labels``, sorted by
    decreasing score.
    """
    probs = cls_logits.sigmoid()
    ctr = centerness.sigmoid()
    loc_list, cls_list, score_list = [], [], []
    for level in torch.unique(levels).tolist():
        in_level = torch.nonzero(levels == level).squeeze(1)
        p = probs[in_level]
        scored = p * ctr[in_level, None]  # cls * centerness, what candidates are ranked (and scored) by
        cand = torch.nonzero((scored if thresh_with_ctr else p) > score_thresh)  # [K, 2] (row in level, class)
        if cand.numel() == 0:
            continue
        loc = in_level[cand[:, 0]]
        ranked = scored[cand[:, 0], cand[:, 1]]
        if ranked.numel() > pre_nms_topk:
            ranked, top = ranked.topk(pre_nms_topk)
            loc, cand = loc[top], cand[top]
        loc_list.append(loc)
        cls_list.append(cand[:, 1])
        score_list.append(ranked.sqrt())
    if not loc_list:
        empty = torch.zeros(0, dtype=torch.long, device=cls_logits.device)
        return {"loc_inds": empty, "boxes": box_reg.new_zeros(0, 4), "scores": box_reg.new_zeros(0), "labels": empty}
    loc = torch.cat(loc_list)
    labels = torch.cat(cls_list)
    scores = torch.cat(score_list)
    boxes = clip_boxes_to_image(decode_boxes(locations[loc], box_reg[loc]), image_size)
    keep = remove_small_boxes(boxes, 1e-3)
    loc, labels, scores, boxes = loc[keep], labels[keep], scores[keep], boxes[keep]
    keep = batched_nms(boxes, scores, labels, nms_thresh)[:max_detections]  # sorted by score
    return {"loc_inds": loc[keep], "boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


def paste_masks(mask_logits: Tensor, image_size: tuple[int, int], mask_stride: int = 4) -> Tensor:
    """``[K, 1, H/s, W/s]`` logits -> ``[K, h, w]`` probabilities at the (unpadded) image size."""
    h, w = image_size
    probs = aligned_bilinear(mask_logits.sigmoid(), mask_stride)
    return probs[:, 0, :h, :w]
