"""SIM's tailored copy-paste on hand-built images, masks and boxes."""
from __future__ import annotations

import io

import pytest
import torch

from sim_core.data.copy_paste import (CopyPaste, InstanceBank, box_pixel_region, make_bank_entry, paste_instances,
                                      select_instances, tight_box)


def _entry() -> dict:
    """A bank image (10x10) with two teacher-segmented instances."""
    image = torch.full((3, 10, 10), 200, dtype=torch.uint8)
    probs = torch.zeros(2, 10, 10)
    probs[0, 0:6, 3:6] = 0.9  # instance 0: a 6x3 band, box [3, 0, 6, 6]
    probs[0, 0:6, 0:3] = 0.6  # below the 0.7 threshold: not part of the pseudo mask
    probs[0, 8, 8] = 0.95  # outside its box: ignored
    probs[1, 6:10, 6:10] = 0.8  # instance 1: box [6, 6, 10, 10]
    boxes = torch.tensor([[3.0, 0.0, 6.0, 6.0], [6.0, 6.0, 10.0, 10.0]])
    entry = make_bank_entry(image, boxes, torch.tensor([4, 5]), probs, thresh=0.7)
    assert entry is not None
    return entry


def test_bank_entry_keeps_pseudo_mask_inside_the_box_with_its_score():
    entry = _entry()
    assert entry["origins"].tolist() == [[3, 0], [6, 6]]
    assert entry["masks"][0].shape == (6, 3) and bool(entry["masks"][0].all())
    assert entry["scores"].tolist() == pytest.approx([0.9, 0.8])
    assert entry["labels"].tolist() == [4, 5]
    empty = make_bank_entry(torch.zeros(3, 4, 4, dtype=torch.uint8), torch.tensor([[0.0, 0.0, 2.0, 2.0]]),
                            torch.tensor([0]), torch.full((1, 4, 4), 0.5))
    assert empty is None


def test_paste_shrinks_partly_occluded_boxes_and_drops_covered_ones():
    entry = _entry()
    image = torch.zeros(3, 10, 10, dtype=torch.uint8)
    masks = torch.zeros(3, 10, 10, dtype=torch.uint8)
    masks[0, 1:5, 1:5] = 1
    masks[1, 7:9, 7:9] = 1
    masks[2, 0:2, 7:9] = 1
    target = {"boxes": torch.tensor([[0.5, 0.0, 5.5, 6.0],  # A: right part covered by instance 0
                                     [6.0, 6.0, 9.0, 9.0],  # B: inside instance 1's mask -> dropped
                                     [7.0, 0.0, 10.0, 3.0]]),  # C: untouched
              "labels": torch.tensor([0, 1, 2]), "masks": masks, "image_id": 7}
    out_image, out = paste_instances(image, target, entry, [0, 1])
    assert out["labels"].tolist() == [0, 2, 4, 5]
    assert out["pasted"].tolist() == [False, False, True, True]
    # A's box region columns 0..5, columns 3..5 pasted over on rows 0..5 -> visible columns 0..2
    assert out["boxes"][0].tolist() == pytest.approx([0.5, 0.0, 3.0, 6.0])
    assert out["boxes"][1].tolist() == [7.0, 0.0, 10.0, 3.0]
    assert out["boxes"][2].tolist() == [3.0, 0.0, 6.0, 6.0]  # tight box of the pasted pseudo mask
    assert out["boxes"][3].tolist() == [6.0, 6.0, 10.0, 10.0]
    assert out["masks"][0].sum() == 8 and out["masks"][0][1:5, 3:5].sum() == 0  # A's mask lost the pasted pixels
    for k in (2, 3):  # pasted pseudo masks stay within their boxes
        x0, y0, x1, y1 = box_pixel_region(out["boxes"][k], 10, 10)
        inside = torch.zeros(10, 10, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        assert not bool((out["masks"][k].bool() & ~inside).any())
    assert bool((out_image[:, 0:6, 3:6] == 200).all()) and bool((out_image[:, 6:, 6:] == 200).all())
    assert int(out_image.sum()) == 200 * 3 * (18 + 16)  # nothing else changed
    assert out["image_id"] == 7 and target["boxes"].shape == (3, 4)  # input untouched


def test_paste_clips_to_a_smaller_image_and_later_instances_cover_earlier():
    entry = _entry()
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
              "masks": torch.zeros(0, 8, 8, dtype=torch.uint8)}
    _, out = paste_instances(image, target, entry, [1])
    assert out["boxes"].tolist() == [[6.0, 6.0, 8.0, 8.0]]  # clipped to the 8x8 image
    assert out["masks"].shape == (1, 8, 8)
    # two overlapping pasted instances: the later one hides part of the earlier one
    entry["masks"][1] = torch.ones(4, 4, dtype=torch.bool)
    entry["origins"][1] = torch.tensor([3, 3])
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}  # no "masks": created
    _, out = paste_instances(torch.zeros(3, 10, 10, dtype=torch.uint8), empty, entry, [0, 1])
    assert out["boxes"].tolist() == [[3.0, 0.0, 6.0, 3.0], [3.0, 3.0, 7.0, 7.0]]
    assert out["masks"].shape == (2, 10, 10) and out["masks"][0].sum() == 9
    with pytest.raises(ValueError):
        paste_instances(torch.zeros(3, 10, 10, dtype=torch.uint8), target, entry, [0])  # 8x8 masks


def test_selection_counts_and_score_weighting():
    g = torch.Generator().manual_seed(0)
    assert len(select_instances(torch.ones(8), 0.25, g)) == 2
    assert len(select_instances(torch.ones(2), 0.25, g)) == 1  # at least one
    assert len(select_instances(torch.ones(20), 0.25, g)) == 3  # at most three
    assert len(select_instances(torch.ones(20), 0.5, g, max_count=3)) == 3
    assert len(set(select_instances(torch.ones(12), 0.25, g).tolist())) == 3  # no repeats
    assert select_instances(torch.tensor([0.0, 0.0, 1.0, 0.0]), 0.25, g).tolist() == [2]
    picks = torch.stack([select_instances(torch.tensor([0.9, 0.1]), 0.25, g) for _ in range(400)])
    assert (picks == 0).float().mean() > 0.8


def test_tight_box_and_pixel_region():
    mask = torch.zeros(5, 6, dtype=torch.bool)
    mask[1:3, 2:5] = True
    assert tight_box(mask).tolist() == [2.0, 1.0, 5.0, 3.0]
    assert tight_box(torch.zeros(3, 3, dtype=torch.bool)) is None
    assert box_pixel_region([0.5, 1.2, 3.1, 9.0], 5, 6) == (0, 1, 4, 5)


def test_copy_paste_decision_bank_fifo_and_state_round_trip():
    cp = CopyPaste(bank_size=2, paste_prob=1.0, paste_fraction=0.25, seed=3)
    image = torch.zeros(3, 10, 10, dtype=torch.uint8)
    target = {"boxes": torch.tensor([[0.0, 0.0, 2.0, 2.0]]), "labels": torch.tensor([0]),
              "masks": torch.zeros(1, 10, 10, dtype=torch.uint8)}
    _, targets = cp([image], [target])  # empty bank: nothing pasted, but the key is there
    assert targets[0]["pasted"].tolist() == [False]
    for _ in range(3):
        cp.bank.push(_entry())
    assert len(cp.bank) == 2  # FIFO capacity
    buffer = io.BytesIO()
    torch.save(cp.state_dict(), buffer)
    restored = CopyPaste(bank_size=2, paste_prob=1.0, paste_fraction=0.25, seed=99)
    restored.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    a_images, a_targets = cp([image, image], [target, target])
    b_images, b_targets = restored([image, image], [target, target])
    assert all(torch.equal(x, y) for x, y in zip(a_images, b_images))
    assert all(torch.equal(x["boxes"], y["boxes"]) for x, y in zip(a_targets, b_targets))
    assert all(bool(t["pasted"].any()) for t in a_targets)
    never = CopyPaste(paste_prob=0.0)
    never.bank.push(_entry())
    assert never([image], [target])[1][0]["pasted"].tolist() == [False]
    with pytest.raises(IndexError):
        InstanceBank(1).sample(torch.Generator())


def test_paste_with_regions_boxes_every_instance_by_its_box_fill_minus_the_pasted_pixels():
    """``sim.paste_supervision: region`` (the release's ``copypaste.py``): an original's region is its box
    fill, rows and columns ``int(y1)..int(y2)`` inclusive, minus the pasted pixels; its box becomes that
    region's tight box (one pixel wider than an integer box the paste does not touch), a pasted instance's
    region is its pseudo mask."""
    entry = _entry()
    image = torch.zeros(3, 10, 10, dtype=torch.uint8)
    target = {"boxes": torch.tensor([[0.5, 0.0, 5.5, 6.0],  # A: fill rows 0..6, columns 0..5
                                     [6.0, 6.0, 9.0, 9.0],  # B: fill rows/columns 6..9, all pasted over
                                     [7.0, 0.0, 10.0, 3.0]]),  # C: untouched, fill columns 7..9, rows 0..3
              "labels": torch.tensor([0, 1, 2]), "masks": torch.zeros(3, 10, 10, dtype=torch.uint8)}
    _, plain = paste_instances(image, target, entry, [0, 1])
    assert "regions" not in plain
    _, out = paste_instances(image, target, entry, [0, 1], regions=True)
    assert out["labels"].tolist() == [0, 2, 4, 5]
    assert out["pasted"].tolist() == [False, False, True, True]
    regions = out["regions"]
    assert regions.shape == (4, 10, 10) and regions.dtype == torch.bool
    expected_a = torch.zeros(10, 10, dtype=torch.bool)
    expected_a[0:6, 0:3] = True  # columns 3..5 of rows 0..5 are instance 0's pasted pixels
    expected_a[6, 0:6] = True  # row 6 = int(6.0) belongs to the fill and is not pasted over
    assert torch.equal(regions[0], expected_a)
    assert out["boxes"][0].tolist() == [0.0, 0.0, 6.0, 7.0]
    assert out["boxes"][1].tolist() == [7.0, 0.0, 10.0, 4.0]  # clipped at the image, one row lower
    assert torch.equal(regions[2], out["masks"][2].bool()) and torch.equal(regions[3], out["masks"][3].bool())
    assert out["boxes"][2].tolist() == [3.0, 0.0, 6.0, 6.0]


def test_bank_entry_cuts_pseudo_masks_to_the_supervision_regions():
    probs = torch.full((1, 6, 6), 0.9)
    region = torch.zeros(1, 6, 6, dtype=torch.bool)
    region[0, 1:4, 1:3] = True
    entry = make_bank_entry(torch.zeros(3, 6, 6, dtype=torch.uint8), torch.tensor([[1.0, 1.0, 5.0, 5.0]]),
                            torch.tensor([3]), probs, thresh=0.7, regions=region)
    assert int(entry["masks"][0].sum()) == 6 and bool(entry["masks"][0][0:3, 0:2].all())
    assert make_bank_entry(torch.zeros(3, 6, 6, dtype=torch.uint8), torch.tensor([[1.0, 1.0, 5.0, 5.0]]),
                           torch.tensor([3]), probs, regions=torch.zeros(1, 6, 6, dtype=torch.bool)) is None
    with pytest.raises(ValueError, match="paste supervision"):
        CopyPaste(supervision="mask")


def test_release_draws_repeat_instances_and_keep_every_pasted_mask_whole():
    """``sim.paste_draws: release``: the released ``random.choices`` draws with replacement, and its
    ``masks_copy_paste`` keeps every pasted pseudo mask whole, so an instance drawn twice becomes two
    identical GTs; simbench's default lets the later copy cover the earlier one, which is then dropped."""
    g = torch.Generator().manual_seed(0)
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert select_instances(scores, 0.5, g, replacement=True).tolist() == [0, 0, 0]
    assert len(set(select_instances(scores, 0.5, g).tolist())) == 3
    entry = _entry()
    target = {"boxes": torch.tensor([[0.0, 0.0, 2.0, 2.0]]), "labels": torch.tensor([0]),
              "masks": torch.zeros(1, 10, 10, dtype=torch.uint8)}
    _, whole = paste_instances(torch.zeros(3, 10, 10, dtype=torch.uint8), target, entry, [0, 0],
                               regions=True, keep_whole=True)
    assert whole["labels"].tolist() == [0, 4, 4] and whole["pasted"].tolist() == [False, True, True]
    assert torch.equal(whole["masks"][1], whole["masks"][2]) and int(whole["masks"][1].sum()) == 18
    assert torch.equal(whole["regions"][1], whole["regions"][2])
    _, cut = paste_instances(torch.zeros(3, 10, 10, dtype=torch.uint8), target, entry, [0, 0])
    assert cut["labels"].tolist() == [0, 4]
    with pytest.raises(ValueError, match="paste draws"):
        CopyPaste(draws="twice")
