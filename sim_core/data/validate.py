"""The one gate for COCO-format json: every ground truth and results file passes here first.

Wherever a COCO json enters (``prepare``, ``evaluate --gt/--results``,
``import``, the report, the training and inference loaders) it is checked
here before pycocotools or faster-coco-eval sees it. Those libraries trust
their input: a compressed RLE whose runs add up past height x width hangs
pycocotools or writes past its buffer, a polygon with a text coordinate is a
traceback, a 4-number polygon is silently read as a box, a huge polygon
coordinate makes it allocate gigabytes. Every problem raises
:class:`InputError` naming the file, the record (``annotations[12] (id 104)``,
``record 3 (image_id 7)``) and the problem, with user values quoted in at most
about 100 characters.

What is checked (ground truth): a JSON object with ``images``, ``annotations``,
``categories`` lists; unique non-negative integer ids; category names;
relative image file names; positive integer image sizes (at most 2^31 - 1
pixels, COCO's RLE counts are 32-bit); annotations with a known image and
category, ``iscrowd`` 0/1, a bbox of 4 finite numbers with non-negative width
and height, a finite non-negative area, and a segmentation that is either
polygons (lists of an even number of finite numbers, each within one image
size of the image) or an RLE whose ``size`` is the image's [h, w] and whose
runs are non-negative and add up to exactly h x w. Compressed counts strings
are decoded here, in linear time (vectorised over all strings of a file), not
by pycocotools. Results get the same RLE and box checks plus finite scores
and ground-truth image/category ids.

Accepted oddities are repaired, the same way for every caller, and counted in
``events``: polygon parts with fewer than 3 points (real COCO has them) are
dropped, and for training data (``purpose="train"``) boxes are clipped to the
image and records with a zero-area box or no polygon left are skipped. For
evaluation (``purpose="evaluate"``) no ground-truth record is dropped or
moved: an annotation left without a polygon keeps an empty mask, so AP counts
the same objects.
"""
from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import numpy as np

from sim_core.errors import InputError, quote

MAX_PIXELS = 2**31 - 1  # pycocotools stores run lengths as 32-bit integers
MAX_ID = 2**63 - 1
MAX_CHARS_PER_COUNT = 7  # what pycocotools writes for any count below 2^31
IOU_TYPES = ("segm", "bbox")
_BYTES_REPR = re.compile(r"^b(['\"]).*\1$", re.DOTALL)


def is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float (not bool, not text)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int too large for a float
        return False


# ------------------------------------------------------------------------------------------ reading
def read_json(path: str | Path, what: str = "annotation") -> Any:
    """Parse a JSON file; a missing, unreadable or invalid file is an :class:`InputError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(path, f"{what} file not found") from None
    except IsADirectoryError:
        raise InputError(path, f"{what} file is a directory") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read {what} file ({quote(str(exc))})") from None
    try:
        return json.loads(text, parse_constant=_no_constants)
    except json.JSONDecodeError as exc:
        raise InputError(path, f"{what} is not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})") from None
    except ValueError as exc:  # NaN/Infinity literals, integers with too many digits
        raise InputError(path, f"{what} is not valid JSON ({quote(str(exc))})") from None
    except RecursionError:
        raise InputError(path, f"{what} is not usable JSON (nested too deeply)") from None


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


# ------------------------------------------------------------------------------------ ground truth
@dataclass
class CheckedCoco:
    """A ground truth that passed the gate; records are cleaned copies."""

    where: str
    images: dict[int, dict]  # ascending id
    categories: list[dict]  # ascending id
    annotations: list[dict]  # input order, skipped records removed
    extra: dict[str, Any] = field(default_factory=dict)
    events: list[tuple[str, int, int]] = field(default_factory=list)  # (kind, image_id, ann_id)

    @property
    def sizes(self) -> dict[int, tuple[int, int]]:
        return {i: (img["height"], img["width"]) for i, img in self.images.items()}

    @property
    def category_ids(self) -> set[int]:
        return {c["id"] for c in self.categories}

    def to_dict(self) -> dict:
        out = dict(self.extra)
        out.update({"images": list(self.images.values()), "annotations": self.annotations,
                    "categories": self.categories})
        return out


def load_gt(path: str | Path, purpose: str = "evaluate", require_segmentation: bool = True) -> CheckedCoco:
    """Read and check a ground-truth file (see :func:`check_gt`)."""
    return check_gt(read_json(path, "ground truth"), path, purpose, require_segmentation)


def check_gt(raw: Any, where: str | Path, purpose: str = "evaluate",
             require_segmentation: bool = True) -> CheckedCoco:
    """Check a COCO instances dict; ``purpose`` is "train" or "evaluate" (see the module docstring).

    ``require_segmentation=False`` accepts annotations without a segmentation
    (box-only evaluation); a segmentation that is present is always checked.
    """
    if purpose not in ("train", "evaluate"):
        raise ValueError(f"purpose must be 'train' or 'evaluate', got {purpose!r}")
    where = str(where)
    if not isinstance(raw, dict):
        kind = "a list (is this a results file?)" if isinstance(raw, list) else type(raw).__name__
        raise InputError(where, f"top level must be a JSON object with images, annotations, categories; got {kind}")
    missing = [k for k in ("images", "annotations", "categories") if k not in raw]
    if missing:
        raise InputError(where, f"missing top-level key(s): {', '.join(missing)}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(raw[key], list):
            raise InputError(where, f"top-level '{key}' must be a list, got {type(raw[key]).__name__}")
    categories = _check_categories(where, raw["categories"])
    images = _check_images(where, raw["images"])
    cat_ids = {c["id"] for c in categories}
    checked = CheckedCoco(where, images, categories, [],
                          {k: v for k, v in raw.items() if k not in ("images", "annotations", "categories")})
    pending: list[tuple[int, str, str, int]] = []  # compressed RLE: (annotation index, record, counts, h*w)
    seen: set[int] = set()
    records = []
    for index, ann in enumerate(raw["annotations"]):
        cleaned, record = _check_annotation(where, index, ann, images, cat_ids, seen, require_segmentation)
        seg = cleaned.get("segmentation")
        if isinstance(seg, dict) and isinstance(seg["counts"], str):
            h, w = seg["size"]
            pending.append((index, record, seg["counts"], h * w))
        records.append((index, record, cleaned))
    _check_compressed(where, pending)
    for index, record, ann in records:
        kept = _repair(checked, ann, purpose)
        if kept is not None:
            checked.annotations.append(kept)
    return checked


def _record(kind: str, index: int, rec: Any) -> str:
    ident = rec.get("id") if isinstance(rec, dict) else None
    return f"{kind}[{index}] (id {quote(ident, 40)})" if ident is not None else f"{kind}[{index}]"


def _check_id(where: str, record: str, value: Any, what: str = "'id'") -> int:
    if not is_int(value) or not 0 <= value <= MAX_ID:
        raise InputError(where, f"{what} must be a non-negative integer, got {quote(value)}", record=record)
    return int(value)


def _check_categories(where: str, records: list) -> list[dict]:
    if not records:
        raise InputError(where, "'categories' is empty; at least one category is needed")
    by_id: dict[int, dict] = {}
    for index, cat in enumerate(records):
        record = _record("categories", index, cat)
        if not isinstance(cat, dict):
            raise InputError(where, f"category must be an object, got {type(cat).__name__}", record=record)
        cid = _check_id(where, record, cat.get("id"))
        if not isinstance(cat.get("name"), str) or not cat["name"]:
            raise InputError(where, "category needs a non-empty 'name'", record=record)
        if cid in by_id:
            raise InputError(where, "duplicate category id", record=record)
        by_id[cid] = cat
    return [by_id[i] for i in sorted(by_id)]


def _check_images(where: str, records: list) -> dict[int, dict]:
    if not records:
        raise InputError(where, "'images' is empty")
    images: dict[int, dict] = {}
    for index, img in enumerate(records):
        record = _record("images", index, img)
        if not isinstance(img, dict):
            raise InputError(where, f"image record must be an object, got {type(img).__name__}", record=record)
        image_id = _check_id(where, record, img.get("id"))
        if image_id in images:
            raise InputError(where, "duplicate image id", record=record)
        name = img.get("file_name")
        if not isinstance(name, str) or not name:
            raise InputError(where, "image record needs a non-empty 'file_name'", record=record)
        record = f"images[{index}] (id {image_id}, {quote(name, 60)})"
        pure = PurePosixPath(name)
        if pure.is_absolute() or ".." in pure.parts or "\\" in name or any(ord(ch) < 32 for ch in name):
            raise InputError(where, "file_name must be a relative path inside the image folder "
                                    "(no '..', no absolute path, no control characters)", record=record)
        for key in ("width", "height"):
            if not is_int(img.get(key)) or img[key] <= 0:
                raise InputError(where, f"'{key}' must be a positive integer, got {quote(img.get(key))}", record=record)
        if img["width"] * img["height"] > MAX_PIXELS:
            raise InputError(where, f"image of {img['width']}x{img['height']} pixels is larger than "
                                    f"COCO's RLE can describe ({MAX_PIXELS} pixels)", record=record)
        images[image_id] = img
    return {i: images[i] for i in sorted(images)}


def _check_annotation(where: str, index: int, ann: Any, images: dict[int, dict], cat_ids: set[int],
                      seen: set[int], require_segmentation: bool) -> tuple[dict, str]:
    record = _record("annotations", index, ann)
    if not isinstance(ann, dict):
        raise InputError(where, f"annotation must be an object, got {type(ann).__name__}", record=record)
    needed = ["id", "image_id", "category_id", "bbox"] + (["segmentation"] if require_segmentation else [])
    missing = [k for k in needed if k not in ann]
    if missing:
        raise InputError(where, f"annotation lacks {', '.join(missing)}", record=record)
    ann_id = _check_id(where, record, ann["id"])
    if ann_id in seen:
        raise InputError(where, "duplicate annotation id", record=record)
    seen.add(ann_id)
    image_id = ann["image_id"]
    if not is_int(image_id) or image_id not in images:
        raise InputError(where, f"image_id {quote(image_id)} is not in 'images'", record=record)
    if not is_int(ann["category_id"]) or ann["category_id"] not in cat_ids:
        raise InputError(where, f"category_id {quote(ann['category_id'])} is not in 'categories'", record=record)
    crowd = ann.get("iscrowd", 0)
    if not is_int(crowd) or crowd not in (0, 1):
        raise InputError(where, f"iscrowd must be 0 or 1, got {quote(crowd)}", record=record)
    check_box(where, record, ann["bbox"])
    area = ann.get("area")
    if area is not None and (not is_number(area) or area < 0):
        raise InputError(where, f"area must be a finite non-negative number, got {quote(area)}", record=record)
    cleaned = dict(ann)
    cleaned["iscrowd"] = int(crowd)
    if not require_segmentation and ann.get("segmentation", None) in ([], None, {}):
        cleaned.pop("segmentation", None)  # a box-only annotation: no mask (annotation tools write [] or null)
    elif "segmentation" in ann:
        img = images[image_id]
        cleaned["segmentation"] = check_segmentation(where, record, ann["segmentation"], img["height"], img["width"])
    return cleaned, record


def check_box(where: str | Path, record: str, bbox: Any) -> list[float]:
    """``[x, y, w, h]``: four finite numbers, width and height >= 0."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise InputError(where, f"bbox must be [x, y, width, height] (4 numbers), got {quote(bbox)}", record=record)
    if not all(is_number(v) for v in bbox):
        raise InputError(where, f"bbox {quote(bbox)} has a non-finite or non-numeric value", record=record)
    if bbox[2] < 0 or bbox[3] < 0:
        raise InputError(where, f"bbox {quote(bbox)} has negative width or height (expected [x, y, w, h])",
                         record=record)
    return [float(v) for v in bbox]


def check_segmentation(where: str, record: str, segm: Any, height: int, width: int) -> Any:
    """A ground-truth segmentation: polygons or RLE (compressed strings are checked later, in bulk)."""
    if isinstance(segm, list):
        if not segm:
            raise InputError(where, "segmentation is an empty polygon list", record=record)
        for part_index, part in enumerate(segm):
            if not isinstance(part, list) or not all(is_number(v) for v in part):
                raise InputError(where, f"polygon {part_index} must be a flat list of finite numbers, "
                                        f"got {quote(part)}", record=record)
            if len(part) % 2:
                raise InputError(where, f"polygon {part_index} needs an even number of finite coordinates, "
                                        f"got {len(part)}", record=record)
            xs, ys = part[0::2], part[1::2]
            if part and (min(xs) < -width or max(xs) > 2 * width or min(ys) < -height or max(ys) > 2 * height):
                raise InputError(where, f"polygon {part_index} has a point far outside the {width}x{height} image "
                                        "(more than one image size away)", record=record)
        return segm
    if isinstance(segm, dict):
        return check_rle(where, record, segm, (height, width), compressed_later=True)
    raise InputError(where, f"segmentation must be a polygon list or an RLE dict, got {type(segm).__name__}",
                     record=record)


def _repair(checked: CheckedCoco, ann: dict, purpose: str) -> dict | None:
    """Drop degenerate polygon parts; for training also clip boxes and skip unusable records."""
    image_id, ann_id = ann["image_id"], ann["id"]
    img = checked.images[image_id]
    height, width = img["height"], img["width"]
    events = checked.events
    if purpose == "train":
        x, y, w, h = (float(v) for v in ann["bbox"])
        x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
        if x1 <= x0 or y1 <= y0:
            events.append(("zero_area_box", image_id, ann_id))
            return None
        if x < 0 or y < 0 or x + w > width or y + h > height:
            events.append(("clipped_box", image_id, ann_id))
            ann["bbox"] = [x0, y0, x1 - x0, y1 - y0]
    segm = ann.get("segmentation")
    if isinstance(segm, list):
        kept = [part for part in segm if len(part) >= 6]
        events.extend(("degenerate_polygon_part", image_id, ann_id) for _ in range(len(segm) - len(kept)))
        if not kept:
            if purpose == "train":
                events.append(("no_valid_polygon", image_id, ann_id))
                return None
            kept = {"size": [height, width], "counts": [height * width]}  # an empty mask, the object still counts
        ann["segmentation"] = kept
    if ann.get("area") is None and "segmentation" not in ann:
        ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])  # box-only: the box's area
    elif purpose == "train" and ann.get("area") is None:
        from sim_core.data.coco import annotation_rle
        from pycocotools import mask as mask_utils

        ann["area"] = float(mask_utils.area(annotation_rle(ann["segmentation"], height, width)))
    return ann


# --------------------------------------------------------------------------------------------- RLE
def counts_text(counts: Any) -> Any:
    """Compressed counts as ``str`` (bytes and the text ``"b'...'"`` decoded); lists pass through."""
    if isinstance(counts, (bytes, bytearray)):
        return bytes(counts).decode("ascii")
    if isinstance(counts, str) and _BYTES_REPR.match(counts):
        value = ast.literal_eval(counts)
        if isinstance(value, bytes):
            return value.decode("ascii")
    return counts


def check_rle(where: str | Path, record: str, segm: Any, image_hw: tuple[int, int],
              compressed_later: bool = False) -> dict:
    """An RLE dict of the image's size; uncompressed runs checked here, strings too unless ``compressed_later``."""
    if not isinstance(segm, dict) or "size" not in segm or "counts" not in segm:
        raise InputError(where, "segmentation must be an RLE object with 'size' and 'counts'", record=record)
    size = segm["size"]
    if not isinstance(size, (list, tuple)) or len(size) != 2 or not all(is_int(v) for v in size):
        raise InputError(where, f"RLE needs 'size' [height, width], got {quote(size)}", record=record)
    if (int(size[0]), int(size[1])) != tuple(image_hw):
        raise InputError(where, f"RLE size {quote(size)} differs from the image size {list(image_hw)} "
                                "[height, width]", record=record)
    total = image_hw[0] * image_hw[1]
    try:
        counts = counts_text(segm["counts"])
    except (ValueError, SyntaxError, UnicodeDecodeError, MemoryError, RecursionError):
        raise InputError(where, "RLE counts look like bytes text but cannot be decoded", record=record) from None
    if isinstance(counts, list):
        if not all(is_int(c) and c >= 0 for c in counts):
            raise InputError(where, "uncompressed RLE counts must be non-negative integers", record=record)
        covered = sum(int(c) for c in counts)
        if covered != total:
            raise InputError(where, f"RLE counts cover {covered} pixels, the image has {total}", record=record)
        counts = [int(c) for c in counts]
    elif isinstance(counts, str):
        if not compressed_later:
            _check_compressed(where, [(0, record, counts, total)])
    else:
        raise InputError(where, f"RLE counts must be a string or a list, got {type(counts).__name__}",
                         record=record)
    return {**segm, "size": [int(size[0]), int(size[1])], "counts": counts}


def _check_compressed(where: str | Path, pending: Sequence[tuple[int, str, str, int]]) -> None:
    """Raise for the first string in ``pending`` (index, record, counts, pixels) that is corrupt or wrong-sized."""
    if not pending:
        return
    bad = rle_string_problems([p[2] for p in pending], [p[3] for p in pending])
    if bad is not None:
        position, problem = bad
        raise InputError(where, problem, record=pending[position][1])


def rle_counts(text: str) -> list[int] | None:
    """Run lengths of a COCO compressed RLE string, or None if it is corrupt (the reference decoder).

    Format (pycocotools' ``rleFrString``): each count is a little-endian
    sequence of 6-bit characters (offset 48), 5 data bits plus a continuation
    bit, sign-extended from the last character; counts from index 3 on are
    stored as the difference to the count two places before. A count longer
    than 7 characters or a negative run is corrupt.
    """
    counts: list[int] = []
    pos, n = 0, len(text)
    while pos < n:
        value, shift, more = 0, 0, True
        while more:
            if pos >= n or shift >= MAX_CHARS_PER_COUNT:
                return None
            char = ord(text[pos]) - 48
            if not 0 <= char < 64:
                return None
            value |= (char & 0x1F) << (5 * shift)
            more = bool(char & 0x20)
            pos += 1
            shift += 1
            if not more and (char & 0x10):
                value -= 1 << (5 * shift)
        if len(counts) > 2:
            value += counts[-2]
        if value < 0:
            return None
        counts.append(value)
    return counts


def rle_string_problems(texts: Sequence[str], totals: Sequence[int]) -> tuple[int, str] | None:
    """The first ``(position, problem)`` among compressed RLE strings, or None if all are valid.

    Valid means: decodable (see :func:`rle_counts`), no negative run, runs
    adding up to exactly ``totals[i]``. Vectorised over all strings at once,
    linear in their total length; agrees with :func:`rle_counts` (tested).
    """
    n_str = len(texts)
    lengths = np.fromiter((len(t) for t in texts), np.int64, n_str)
    try:
        buf = "".join(texts).encode("ascii")
    except UnicodeEncodeError:
        first = next(i for i, t in enumerate(texts) if not t.isascii())
        return first, "compressed RLE counts string is corrupt (non-ASCII character)"
    raw = np.frombuffer(buf, np.uint8).astype(np.int64) - 48
    corrupt = np.zeros(n_str, bool)
    sums = np.zeros(n_str, np.int64)
    if raw.size:
        owner = np.repeat(np.arange(n_str), lengths)
        corrupt[owner[(raw < 0) | (raw >= 64)]] = True
        c = np.clip(raw, 0, 63)
        term = (c & 0x20) == 0
        nonempty = np.flatnonzero(lengths > 0)
        last = (np.cumsum(lengths) - 1)[nonempty]
        corrupt[nonempty[~term[last]]] = True  # the last count of a string is unfinished
        term[last] = True
        begins = np.r_[True, term[:-1]]
        starts = np.flatnonzero(begins)
        count_of_char = np.cumsum(begins) - 1
        shift = np.arange(raw.size) - starts[count_of_char]
        corrupt[owner[shift >= MAX_CHARS_PER_COUNT]] = True
        shift = np.minimum(shift, MAX_CHARS_PER_COUNT - 1)
        value = np.add.reduceat((c & 0x1F) << (5 * shift), starts)
        ends = np.flatnonzero(term)
        negative = (c[ends] & 0x10) != 0
        value[negative] -= np.left_shift(1, 5 * (shift[ends][negative] + 1))
        count_owner = owner[starts]
        first_count = np.searchsorted(count_owner, np.arange(n_str))
        m = np.arange(starts.size) - first_count[count_owner]
        chain = count_owner * 3 + np.where(m == 0, 2, m % 2)  # runs 1,3,5,... and 2,4,6,... are delta chains
        order = np.lexsort((m, chain))
        sorted_values = value[order]
        csum = np.cumsum(sorted_values)
        chain_sorted = chain[order]
        chain_begin = np.r_[True, chain_sorted[1:] != chain_sorted[:-1]]
        begin_at = np.maximum.accumulate(np.where(chain_begin, np.arange(order.size), 0))
        counts = np.empty_like(value)
        counts[order] = csum - (csum[begin_at] - sorted_values[begin_at])
        corrupt[count_owner[counts < 0]] = True
        sums[nonempty] = np.add.reduceat(counts, first_count[nonempty])
    totals_arr = np.asarray(totals, np.int64)
    wrong = corrupt | (sums != totals_arr)
    if not wrong.any():
        return None
    first = int(np.argmax(wrong))
    if corrupt[first]:
        return first, "compressed RLE counts string is corrupt"
    return first, f"RLE counts cover {int(sums[first])} pixels, the image has {int(totals_arr[first])}"


# ----------------------------------------------------------------------------------------- results
REQUIRED_KEYS = {
    "segm": ("image_id", "category_id", "score", "segmentation"),
    "bbox": ("image_id", "category_id", "score", "bbox"),
}


def gt_sizes_and_categories(gt: Any) -> tuple[dict[int, tuple[int, int]], set[int]]:
    """``({image_id: (h, w)}, category ids)`` of a checked ground truth (a CheckedCoco or its dict)."""
    if isinstance(gt, CheckedCoco):
        return gt.sizes, gt.category_ids
    if not isinstance(gt, dict) or not isinstance(gt.get("images"), list) or not isinstance(gt.get("categories"), list):
        raise InputError("ground truth", "must be a COCO dict with 'images' and 'categories' lists")
    checked = check_gt({**gt, "annotations": []}, "ground truth")
    return checked.sizes, checked.category_ids


def check_results(results: Any, gt: Any, where: str | Path, iou_type: str | None = None) -> None:
    """Check a COCO results list against a ground truth (a :class:`CheckedCoco` or a COCO dict).

    ``iou_type`` "segm" or "bbox" requires that type's keys in every record;
    ``None`` requires the common keys plus at least one of ``segmentation`` /
    ``bbox``. A ``bbox`` or ``segmentation`` that is present is always checked;
    compressed RLE strings are decoded (in bulk, linear time). Results must be
    RLE: no detector writes polygons and pycocotools cannot score them.
    """
    if iou_type is not None and iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES} or None, got {iou_type!r}")
    if not isinstance(results, list):
        kind = "an object (is this a ground-truth file?)" if isinstance(results, dict) else type(results).__name__
        raise InputError(where, f"results must be a JSON list of detection records, got {kind}")
    sizes, cats = gt_sizes_and_categories(gt)
    required = REQUIRED_KEYS[iou_type] if iou_type else ("image_id", "category_id", "score")
    pending: list[tuple[int, str, str, int]] = []
    for i, rec in enumerate(results):
        if not isinstance(rec, dict):
            raise InputError(where, f"record is a {type(rec).__name__}, not an object", record=f"record {i}")
        record = f"record {i} (image_id {quote(rec.get('image_id'), 40)})"
        missing = [k for k in required if k not in rec]
        if missing:
            needed = f" (needed for {iou_type} evaluation)" if iou_type else ""
            raise InputError(where, f"missing key(s) {', '.join(missing)}{needed}", record=record)
        if iou_type is None and "segmentation" not in rec and "bbox" not in rec:
            raise InputError(where, "record has neither 'segmentation' nor 'bbox'", record=record)
        image_id = rec["image_id"]
        if not is_int(image_id) or int(image_id) not in sizes:
            raise InputError(where, f"image_id {quote(image_id)} is not an image of the ground truth", record=record)
        if not is_int(rec["category_id"]) or int(rec["category_id"]) not in cats:
            raise InputError(where, f"category_id {quote(rec['category_id'])} is not a category of the ground truth",
                             record=record)
        if not is_number(rec["score"]):
            raise InputError(where, f"score {quote(rec['score'])} is not a finite number", record=record)
        if "bbox" in rec:
            check_box(where, record, rec["bbox"])
        if "segmentation" in rec:
            segm = rec["segmentation"]
            if isinstance(segm, list):
                raise InputError(where, "segmentation is a polygon list; results must be RLE {'size', 'counts'}",
                                 record=record)
            checked = check_rle(where, record, segm, sizes[int(image_id)], compressed_later=True)
            if isinstance(checked["counts"], str):
                h, w = sizes[int(image_id)]
                pending.append((i, record, checked["counts"], h * w))
    _check_compressed(where, pending)


def load_results(path: str | Path, gt: Any, iou_type: str | None = None) -> list:
    """Read and check a results file against a checked ground truth."""
    records = read_json(path, "results")
    check_results(records, gt, path, iou_type)
    return records


__all__ = ["CheckedCoco", "check_box", "check_gt", "check_results", "check_rle", "counts_text", "is_int",
           "is_number", "load_gt", "load_results", "read_json", "rle_counts", "rle_string_problems"]
