"""The torch Dataset over a validated :class:`~sim_core.data.coco.CocoData`.

A sample is ``(image, target)`` exactly as docs/architecture.md ("Training
sample") fixes it: ``image`` uint8 ``[3, h, w]`` RGB after resize/flip,
``target`` with ``boxes`` (float32 xyxy), ``labels`` (int64, contiguous),
``masks`` (uint8 ``[N, h, w]``), ``image_id`` and ``orig_size`` ``(h0, w0)``.
Crowd annotations never become targets (they stay in the json for the
evaluator). Boxes come from the json ``bbox`` (clipped at load time), as in
COCO training code, not from the masks.

Cost: the image is decoded once, all masks of a sample are decoded in one
``pycocotools.mask.decode`` call at the original size, then resized together.

Determinism: with ``seed`` set, the random transform of sample ``index`` in
epoch ``e`` comes from its own generator seeded by ``(seed, e, index)``, so it
does not depend on the number of workers or the order samples are drawn in
(a resumed run sees the same augmentation). Without ``seed`` the torch global
generator is used, which the DataLoader seeds per worker.

Training drops images without any non-crowd annotation by default, as the
Detectron2-based code of BoxInst and SIM does; evaluation keeps every image.
"""
from __future__ import annotations

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from sim_core.data.coco import CocoData, annotation_rle
from sim_core.data.images import read_image_rgb
from sim_core.data.transforms import apply_transform, check_transform_settings, sample_params


class CocoDetectionDataset(Dataset):
    def __init__(
        self,
        data: CocoData,
        train: bool,
        sizes: list[int],
        max_size: int,
        flip_prob: float,
        seed: int | None = None,
        drop_empty: bool | None = None,
        cache_images: bool = False,
        load_masks: bool = True,
    ) -> None:
        """``load_masks=False``: targets without GT masks (inference needs the image and its size only;
        decoding every val mask at COCO size costs as much as reading the image)."""
        check_transform_settings(sizes, max_size, flip_prob)
        self.data = data
        self.train = train
        self.sizes = [int(s) for s in sizes]
        self.max_size = int(max_size)
        self.flip_prob = float(flip_prob)
        self.seed = seed
        self.epoch = 0
        # Decoded images kept in memory (``data.cache_images``): decoding a PNG is ~70 % of a
        # demo sample's loading time. Each DataLoader worker fills its own copy, so this is
        # meant for small datasets (the synthetic demo: 2,000 x 128 x 128 x 3 bytes = 98 MB).
        self.cache_images = bool(cache_images)
        self.load_masks = bool(load_masks)
        self._images: dict[int, torch.Tensor] = {}
        drop_empty = train if drop_empty is None else drop_empty
        self.image_ids = [
            i for i in data.image_ids
            if not drop_empty or any(not a["iscrowd"] for a in data.annotations[i])
        ]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation draws are used (only matters with ``seed``)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.image_ids)

    def _generator(self, index: int) -> torch.Generator | None:
        if self.seed is None:
            return None
        state = np.random.SeedSequence([int(self.seed), self.epoch, int(index)]).generate_state(1)[0]
        return torch.Generator().manual_seed(int(state))

    @staticmethod
    def _instance_mask(ann: dict, height: int, width: int) -> torch.Tensor:
        """``[h, w]`` uint8: the annotation's mask, or for a box-only annotation its filled box (the pixels
        it overlaps), so that a batch keeps one layout; only the ``mask`` method reads masks as targets and
        it refuses box-only data (``sim_core.config.METHODS_NEEDING_MASKS``)."""
        if "segmentation" in ann:
            decoded = mask_utils.decode(annotation_rle(ann["segmentation"], height, width))
            return torch.from_numpy(np.ascontiguousarray(decoded))
        x, y, w, h = (float(v) for v in ann["bbox"])
        mask = torch.zeros((height, width), dtype=torch.uint8)
        mask[int(y):max(int(np.ceil(y + h)), int(y) + 1), int(x):max(int(np.ceil(x + w)), int(x) + 1)] = 1
        return mask

    def load_instances(self, image_id: int) -> tuple[torch.Tensor, dict]:
        """The untransformed image and non-crowd targets of one image."""
        record = self.data.images[image_id]
        height, width = record["height"], record["width"]
        cached = self._images.get(image_id)
        if cached is not None:
            image = cached.clone()  # callers may write into a sample (copy-paste); the cache stays intact
        else:
            array = read_image_rgb(self.data.image_path(image_id), expected_size=(height, width))
            image = torch.from_numpy(array).permute(2, 0, 1).contiguous()
            if self.cache_images:
                self._images[image_id] = image.clone()
        anns = [a for a in self.data.annotations[image_id] if not a["iscrowd"]]
        if anns and not self.load_masks:
            masks = torch.zeros((len(anns), 0, 0), dtype=torch.uint8)  # not loaded (inference)
            xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64)
            boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1).float()
        elif anns:
            masks = torch.stack([self._instance_mask(a, height, width) for a in anns])
            xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64)
            boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1).float()
        else:
            masks = torch.zeros((0, height, width), dtype=torch.uint8)
            boxes = torch.zeros((0, 4), dtype=torch.float32)
        labels = torch.tensor([self.data.cat_id_to_label[a["category_id"]] for a in anns], dtype=torch.int64)
        target = {
            "boxes": boxes,
            "labels": labels,
            "masks": masks,
            "image_id": int(image_id),
            "orig_size": (int(height), int(width)),
        }
        return image, target

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        image_id = self.image_ids[index]
        image, target = self.load_instances(image_id)
        height, width = target["orig_size"]
        params = sample_params(
            height, width, self.train, self.sizes, self.max_size, self.flip_prob, self._generator(index)
        )
        if self.load_masks:
            image, boxes, masks = apply_transform(image, target["boxes"], target["masks"], params)
        else:
            image, boxes, _ = apply_transform(image, target["boxes"], target["masks"][:0], params)
            masks = None
        target.update(boxes=boxes, masks=masks)
        return image, target


def collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Keep images of different sizes as a list; the detector pads them."""
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    return images, targets
