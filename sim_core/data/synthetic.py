"""The procedurally generated demo dataset (DESIGN.md section 4).

The demo compares box-supervised methods, so the data must contain exactly the
phenomena on which they differ; a dataset of flat discs would rank them all equal:

* non-convex, class-specific shapes (ring with a hole, crescent, cross, star, L,
  U): the box filled as a mask is a poor mask, and a ring's hole shows the
  background inside the box;
* class-specific textures and colour tints on textured, noisy backgrounds:
  class structure is learnable;
* low-contrast instances: the background takes the object's colour on one side
  of it (a soft halo or a touching blob), or the object takes the background's
  colour (camouflage, only texture and outline remain), so pixel-colour
  affinity (BoxInst's pairwise term, the level-set energy) leaks or breaks
  there, while class structure (SIM's prototypes) still helps;
* groups of same-class instances that overlap and occlude each other: a
  semantic map alone merges them, only instance reasoning separates them;
* small (COCO area < 32^2) and medium objects.

Instances are painted back to front; an annotation is the *visible* part of an
instance and its box is the tight box of that visible mask. Instances with fewer
than ``min_visible_area`` visible pixels are removed before painting, so no
unannotated sliver of an object remains in the image.

Determinism: image ``i`` of split ``s`` draws from its own generator seeded by
``SeedSequence(seed, spawn_key=(s, i))``, so the same seed and config give
identical pixels and json bytes, and changing ``num_train`` leaves the val
images unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from sim_core.data import synthetic_shapes as shapes
from sim_core.errors import InputError
from sim_core.io_utils import atomic_write_bytes, atomic_write_json

DEFAULT_SYNTHETIC_CFG: dict[str, Any] = {
    "seed": 0,
    "num_train": 2000,
    "num_val": 300,
    "image_size": 128,
    "num_classes": 6,  # at most len(CLASS_SPECS)
    "min_objects": 2,  # objects placed per image before occlusion culling
    "max_objects": 5,
    "small_size": [12, 30],  # extent in pixels of the longer object axis
    "large_size": [48, 88],
    "p_small": 0.25,  # probability that an object (or group) is drawn from small_size
    "aspect_max": 1.3,  # longer / shorter object axis is drawn from [1, aspect_max]
    "max_tilt": 30.0,  # degrees of rotation away from a quarter turn (45 = any angle)
    "p_low_contrast": 0.6,  # per object: the colour contrast to the background vanishes in places
    "p_camouflage": 0.25,  # share of low-contrast objects coloured like the background
    "p_background_patch": 0.25,  # share with a touching blob of their colour (the rest: halo)
    "p_overlap_same_class": 0.5,  # per image: a group of overlapping same-class objects
    "group_size": [2, 3],
    "group_spacing": [0.45, 0.8],  # centre distance / (sum of the two half extents)
    "placement_tries": 8,  # centre candidates per object outside the same-class group
    "spread_spacing": 1.0,  # wanted centre distance / (sum of half extents) for those objects
    "min_visible_area": 16,  # instances with fewer visible pixels are removed
    "background_knots": 4,  # the colour field is interpolated from a knots x knots grid
    "background_variation": 0.3,  # colour spread of the field's knots (0 flat, 1 unrelated)
    "background_grain": 8.0,  # amplitude of the background grain, in grey levels
    "background_clutter": 3,  # at most this many unannotated ellipses
    "texture_contrast": 0.3,  # relative brightness step between an object's two colours
    "noise_std": 5.0,  # Gaussian pixel noise over the whole image
    "preview_images": 16,
}

_INT_KEYS = ("seed", "num_train", "num_val", "image_size", "num_classes", "min_objects",
             "max_objects", "min_visible_area", "placement_tries", "background_knots", "background_clutter",
             "preview_images")
_PROB_KEYS = ("p_small", "p_low_contrast", "p_camouflage", "p_background_patch",
              "p_overlap_same_class")
_PAIR_KEYS = ("small_size", "large_size", "group_size", "group_spacing")
_WHERE = "params.yaml: synthetic"


def resolve_synthetic_cfg(cfg: dict | None) -> dict[str, Any]:
    """Defaults overlaid with ``cfg``, type- and range-checked (InputError names the key)."""
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(DEFAULT_SYNTHETIC_CFG))
    if unknown:
        raise InputError(_WHERE, f"unknown key(s) {unknown}; known: {sorted(DEFAULT_SYNTHETIC_CFG)}")
    out = {**DEFAULT_SYNTHETIC_CFG, **cfg}

    def fail(key: str, problem: str) -> None:
        raise InputError(_WHERE, f"{problem} (got {out[key]!r})", record=key)

    for key in _INT_KEYS:
        if isinstance(out[key], bool) or not isinstance(out[key], (int, np.integer)):
            fail(key, "must be an integer")
        out[key] = int(out[key])
        if out[key] < 0:
            fail(key, "must be >= 0")
    for key in (*_PROB_KEYS, "aspect_max", "max_tilt", "spread_spacing",
                "texture_contrast", "background_variation", "background_grain", "noise_std"):
        if isinstance(out[key], bool) or not isinstance(out[key], (int, float)):
            fail(key, "must be a number")
        out[key] = float(out[key])
    for key in _PROB_KEYS:
        if not 0.0 <= out[key] <= 1.0:
            fail(key, "must be a probability in [0, 1]")
    for key in _PAIR_KEYS:
        pair = out[key]
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in pair)):
            fail(key, "must be a pair [low, high] of numbers")
        if not 0 < pair[0] <= pair[1]:
            fail(key, "must satisfy 0 < low <= high")
        out[key] = [pair[0], pair[1]]
    if not 1 <= out["num_classes"] <= len(shapes.CLASS_SPECS):
        fail("num_classes", f"must be between 1 and {len(shapes.CLASS_SPECS)}")
    if out["image_size"] < 32:
        fail("image_size", "must be at least 32")
    if out["num_train"] < 1 or out["num_val"] < 1:
        fail("num_train" if out["num_train"] < 1 else "num_val", "must be at least 1")
    if not 1 <= out["min_objects"] <= out["max_objects"]:
        fail("min_objects", "must satisfy 1 <= min_objects <= max_objects")
    if out["min_visible_area"] < 1:
        fail("min_visible_area", "must be at least 1 (annotations are never empty)")
    if out["aspect_max"] < 1.0:
        fail("aspect_max", "must be >= 1")
    if out["p_camouflage"] + out["p_background_patch"] > 1.0:
        fail("p_background_patch", "p_camouflage + p_background_patch must be <= 1")
    if not 0.0 <= out["background_variation"] <= 1.0:
        fail("background_variation", "must be in [0, 1]")
    if not 0.0 <= out["texture_contrast"] < 1.0:
        fail("texture_contrast", "must be in [0, 1)")
    if not 0.0 <= out["max_tilt"] <= 45.0:
        fail("max_tilt", "must be in [0, 45] degrees")
    if out["background_knots"] < 2:
        fail("background_knots", "must be at least 2")
    if out["noise_std"] < 0 or out["background_grain"] < 0:
        fail("noise_std" if out["noise_std"] < 0 else "background_grain", "must be >= 0")
    if any(not float(x).is_integer() or x < 1 for x in out["group_size"]):
        fail("group_size", "must be a pair of integers >= 1")
    out["group_size"] = [int(x) for x in out["group_size"]]
    return out


def categories(num_classes: int) -> list[dict[str, Any]]:
    """COCO categories, ids 1..num_classes, named after their shape."""
    return [{"id": i + 1, "name": spec.name, "supercategory": "shape"}
            for i, spec in enumerate(shapes.CLASS_SPECS[:num_classes])]


@dataclass
class _Instance:
    """One placed object and its rasterised full (unoccluded) footprint."""

    class_index: int
    window: tuple[int, int, int, int]  # y0, y1, x0, x1 of the footprint in the image
    footprint: np.ndarray  # bool, window-sized
    weight: np.ndarray  # texture mixing weight, window-sized
    primary: np.ndarray
    secondary: np.ndarray
    contrast_mode: str  # "" (normal), "halo", "patch" or "camouflage"
    centre: np.ndarray
    half_major: float

    def full_mask(self, size: int) -> np.ndarray:
        y0, y1, x0, x1 = self.window
        mask = np.zeros((size, size), dtype=bool)
        mask[y0:y1, x0:x1] = self.footprint
        return mask


def _place(rng: np.random.Generator, cfg: dict, class_index: int, half_major: float,
           centre: np.ndarray) -> _Instance:
    """Rasterise one instance of ``class_index`` whose longer half axis is ``half_major``."""
    spec = shapes.CLASS_SPECS[class_index]
    size = cfg["image_size"]
    half_minor = half_major / rng.uniform(1.0, cfg["aspect_max"])
    a, b = (half_major, half_minor) if rng.random() < 0.5 else (half_minor, half_major)
    # Quarter turns plus a tilt: every orientation occurs, axis-near ones more often.
    angle = rng.integers(4) * np.pi / 2 + np.deg2rad(rng.uniform(-cfg["max_tilt"], cfg["max_tilt"]))
    params = shapes.sample_shape_params(spec.shape, rng)
    period = spec.period * rng.uniform(0.85, 1.15)
    phase = rng.uniform(0.0, 2 * np.pi)
    primary, secondary = shapes.class_colours(spec, rng, cfg["texture_contrast"])
    contrast_mode = ""
    if rng.random() < cfg["p_low_contrast"]:
        draw = rng.random()
        contrast_mode = ("camouflage" if draw < cfg["p_camouflage"] else
                         "patch" if draw < cfg["p_camouflage"] + cfg["p_background_patch"] else "halo")

    reach = np.hypot(a, b)
    x0, x1 = max(int(centre[0] - reach), 0), min(int(np.ceil(centre[0] + reach)) + 1, size)
    y0, y1 = max(int(centre[1] - reach), 0), min(int(np.ceil(centre[1] + reach)) + 1, size)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    dx, dy = xx - centre[0], yy - centre[1]
    cos, sin = np.cos(angle), np.sin(angle)
    xl, yl = dx * cos + dy * sin, -dx * sin + dy * cos
    u, v = xl / a, yl / b
    footprint = shapes.shape_mask(spec.shape, u, v, params)
    weight = shapes.texture(spec, xl, yl, u, period, phase)
    return _Instance(class_index, (y0, y1, x0, x1), footprint, weight, primary, secondary,
                     contrast_mode, centre, half_major)


def _layout(rng: np.random.Generator, cfg: dict) -> list[_Instance]:
    """Objects of one image in depth order (back to front), before occlusion culling.

    Overlap is concentrated in the same-class group (the phenomenon under test):
    other objects try ``placement_tries`` centres and take the first one that keeps
    ``spread_spacing`` times the summed half extents from every placed object (else
    the farthest try), so they occlude each other less than uniform placement would.
    """
    size = cfg["image_size"]
    count = int(rng.integers(cfg["min_objects"], cfg["max_objects"] + 1))
    placed: list[_Instance] = []

    def half_extent(extent_range: list | None = None) -> float:
        if extent_range is None:
            extent_range = cfg["small_size"] if rng.random() < cfg["p_small"] else cfg["large_size"]
        return rng.uniform(*extent_range) / 2.0

    def random_centre(half_major: float) -> np.ndarray:
        margin = min(0.6 * half_major, size / 2.0)
        return rng.uniform(margin, size - margin, 2)

    if count >= 2 and rng.random() < cfg["p_overlap_same_class"]:
        lo, hi = cfg["group_size"]
        members = min(int(rng.integers(lo, hi + 1)), count)
        class_index = int(rng.integers(cfg["num_classes"]))
        extent_range = cfg["small_size"] if rng.random() < cfg["p_small"] else cfg["large_size"]
        first = half_extent(extent_range)
        placed.append(_place(rng, cfg, class_index, first, random_centre(first)))
        for _ in range(members - 1):
            anchor = placed[int(rng.integers(len(placed)))]
            half_major = half_extent(extent_range)
            direction = rng.uniform(0.0, 2 * np.pi)
            distance = rng.uniform(*cfg["group_spacing"]) * (anchor.half_major + half_major)
            centre = np.clip(anchor.centre + distance * np.array([np.cos(direction), np.sin(direction)]),
                             0.0, size - 1.0)
            placed.append(_place(rng, cfg, class_index, half_major, centre))
    while len(placed) < count:
        class_index = int(rng.integers(cfg["num_classes"]))
        half_major = half_extent()
        best, best_score = None, -np.inf
        for _ in range(max(cfg["placement_tries"], 1)):
            centre = random_centre(half_major)
            score = min((np.linalg.norm(centre - p.centre) / (p.half_major + half_major) for p in placed),
                        default=np.inf)
            if score > best_score:
                best, best_score = centre, score
            if score >= cfg["spread_spacing"]:
                break
        placed.append(_place(rng, cfg, class_index, half_major, best))
    return [placed[i] for i in rng.permutation(len(placed))]


def generate_image(rng: np.random.Generator, cfg: dict | None = None
                   ) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One image ``uint8 [H, W, 3]`` and its annotations ``[(category_id, visible mask)]``.

    Annotations are listed back to front; their masks are disjoint and each has at
    least ``min_visible_area`` pixels.
    """
    cfg = resolve_synthetic_cfg(cfg)
    size = cfg["image_size"]
    instances = _layout(rng, cfg)

    # Occlusion culling, front to back: an instance is visible where nothing in front
    # of it (and kept) covers it. Dropping one only uncovers instances behind it.
    covered = np.zeros((size, size), dtype=bool)
    kept: list[tuple[_Instance, np.ndarray]] = []
    for inst in reversed(instances):
        full = inst.full_mask(size)
        visible = full & ~covered
        if int(visible.sum()) >= cfg["min_visible_area"]:
            kept.append((inst, visible))
            covered |= full
    kept.reverse()

    canvas = shapes.background(rng, size, cfg["background_knots"], cfg["background_variation"],
                               cfg["background_grain"], cfg["background_clutter"])
    # Low contrast, three ways. Halo: the background fades into the object's mean
    # colour around a point near its outline. Patch: an unannotated blob of that
    # colour touches the object. In both, stride-4 colour affinity sees no edge
    # there and leaks out of the object, while the object keeps its class tint.
    # Camouflage: both object colours are shifted so that its mean colour equals
    # the background at one of its pixels; only texture and shape separate it.
    for inst, visible in kept:
        if not inst.contrast_mode:
            continue
        mean_weight = float(inst.weight[inst.footprint].mean())
        mean_colour = inst.primary * (1.0 - mean_weight) + inst.secondary * mean_weight
        direction = rng.uniform(0.0, 2 * np.pi)
        unit = np.array([np.cos(direction), np.sin(direction)])
        if inst.contrast_mode == "camouflage":
            ys, xs = np.nonzero(visible)
            pick = int(rng.integers(len(ys)))
            shift = canvas[ys[pick], xs[pick]] - mean_colour
            inst.primary = np.clip(inst.primary + shift, 0.0, 255.0)
            inst.secondary = np.clip(inst.secondary + shift, 0.0, 255.0)
        elif inst.contrast_mode == "halo":
            centre = inst.centre + rng.uniform(0.6, 1.0) * inst.half_major * unit
            shapes.blend_halo(canvas, centre, rng.uniform(0.45, 0.75) * inst.half_major, mean_colour)
        else:
            centre = inst.centre + rng.uniform(0.5, 0.9) * inst.half_major * unit
            axes = inst.half_major * np.array([rng.uniform(0.3, 0.6), rng.uniform(0.2, 0.45)])
            shapes.paint_ellipse(canvas, centre, np.maximum(axes, 2.0), rng.uniform(0, np.pi),
                                 mean_colour + rng.normal(0.0, 3.0, 3))
    for inst, _ in kept:
        y0, y1, x0, x1 = inst.window
        w = inst.weight[inst.footprint][:, None]
        canvas[y0:y1, x0:x1][inst.footprint] = inst.primary + (inst.secondary - inst.primary) * w
    canvas = canvas.astype(np.float32)
    if cfg["noise_std"] > 0:
        canvas += np.float32(cfg["noise_std"]) * rng.standard_normal(canvas.shape, dtype=np.float32)
    np.rint(canvas, out=canvas)
    image = np.clip(canvas, 0, 255, out=canvas).astype(np.uint8)
    return image, [(inst.class_index + 1, visible) for inst, visible in kept]


def image_rng(seed: int, split_index: int, image_index: int) -> np.random.Generator:
    """The generator of one image; independent of the number of images per split."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(split_index, image_index)))


def encode_annotation(mask: np.ndarray, ann_id: int, image_id: int, category_id: int) -> dict[str, Any]:
    """COCO annotation with an RLE (``counts`` as str), the mask's area and tight box."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    bbox = [float(x) for x in mask_utils.toBbox(rle)]
    return {"id": ann_id, "image_id": image_id, "category_id": category_id,
            "segmentation": {"size": [int(x) for x in rle["size"]], "counts": rle["counts"].decode("ascii")},
            "area": int(mask.sum()), "bbox": bbox, "iscrowd": 0}


def write_synthetic(out_dir: Path, cfg: dict) -> None:
    """Write ``images/``, ``train.json``, ``val.json`` and ``preview.png`` into ``out_dir``."""
    cfg = resolve_synthetic_cfg(cfg)
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    cats = categories(cfg["num_classes"])
    preview: list[tuple[np.ndarray, list[tuple[int, np.ndarray]]]] = []
    for split_index, split in enumerate(("train", "val")):
        images, annotations = [], []
        for index in range(cfg[f"num_{split}"]):
            image, objects = generate_image(image_rng(cfg["seed"], split_index, index), cfg)
            image_id, file_name = index + 1, f"{split}_{index:06d}.png"
            Image.fromarray(image).save(image_dir / file_name, format="PNG", compress_level=1)
            images.append({"id": image_id, "file_name": file_name,
                           "width": cfg["image_size"], "height": cfg["image_size"]})
            for category_id, mask in objects:
                annotations.append(encode_annotation(mask, len(annotations) + 1, image_id, category_id))
            if split == "val" and len(preview) < cfg["preview_images"]:
                preview.append((image, objects))
        info = {"description": f"simbench synthetic dataset, {split} split",
                "generator_config": cfg}
        atomic_write_json(out_dir / f"{split}.json",
                          {"info": info, "licenses": [], "images": images,
                           "annotations": annotations, "categories": cats}, indent=None)
    if preview:
        atomic_write_bytes(out_dir / "preview.png", shapes.render_preview(preview, cats))


def box_fill_iou(annotations: list[dict[str, Any]]) -> np.ndarray:
    """IoU of each annotation's box filled as a mask with its true mask (= area / box area).

    The box-only reference method scores this IoU at best; the dataset is built so
    that it is clearly below what a good segmentation reaches.
    """
    return np.array([a["area"] / (a["bbox"][2] * a["bbox"][3]) for a in annotations], dtype=np.float64)

