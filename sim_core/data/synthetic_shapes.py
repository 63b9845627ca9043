"""Drawing primitives of the synthetic dataset: shapes, textures, colours, backgrounds.

Everything here is vectorised numpy on coordinate grids, so one image costs a few
milliseconds. The primitives exist to create the phenomena that separate the
box-supervised methods (see ``synthetic.py``):

* shapes are non-convex (ring with a hole, crescent, cross, star, L, U), so a
  box filled as a mask is a poor mask and the hole of a ring shows background
  inside the box;
* textures and tints are class-specific, so class structure is learnable from
  appearance, not only from the outline;
* backgrounds are smooth colour fields plus grain, clutter and pixel noise, so
  "everything that differs from a flat colour is object" does not work.

``render_preview`` draws the dataset's preview sheet (boxes and mask outlines).

Shapes are defined in a normalised object frame ``(u, v)`` in ``[-1, 1]^2``;
textures in the rotated object frame measured in pixels, so that texture
frequency does not depend on object size.
"""
from __future__ import annotations

import colorsys
import functools
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("ring", "crescent", "cross", "star", "l_shape", "u_shape")
TEXTURES = ("stripes", "dots", "checker", "gradient", "fine_stripes", "waves")


@dataclass(frozen=True)
class ClassSpec:
    """Appearance of one class: outline, surface pattern and colour tint."""

    name: str
    shape: str
    texture: str
    hue: float  # centre of the class tint, in [0, 1)
    period: float  # texture period in pixels (before per-instance jitter)
    stripe_angle: float  # stripe orientation in the object frame, radians


# One entry per category id (1-based in the json, in this order).
CLASS_SPECS: tuple[ClassSpec, ...] = (
    ClassSpec("ring", "ring", "stripes", 0.00, 6.0, np.pi / 4),
    ClassSpec("crescent", "crescent", "dots", 0.13, 6.0, 0.0),
    ClassSpec("cross", "cross", "checker", 0.33, 8.0, 0.0),
    ClassSpec("star", "star", "gradient", 0.50, 0.0, 0.0),
    ClassSpec("l_shape", "l_shape", "fine_stripes", 0.63, 3.5, 0.0),
    ClassSpec("u_shape", "u_shape", "waves", 0.80, 7.0, 0.0),
)


def sample_shape_params(shape: str, rng: np.random.Generator) -> dict[str, float]:
    """Per-instance shape parameters (hole size, bar width, number of points...).

    The ranges keep every shape clearly non-convex: the box-filled mask of an
    unoccluded instance covers roughly 1.6-2.5 times its true area.
    """
    if shape == "ring":
        return {"inner": float(rng.uniform(0.4, 0.55))}
    if shape == "crescent":
        return {"offset": float(rng.uniform(0.65, 0.9)), "cut": float(rng.uniform(0.65, 0.8))}
    if shape == "cross":
        return {"width": float(rng.uniform(0.33, 0.45))}
    if shape == "star":
        return {"points": float(rng.integers(5, 7)), "inner": float(rng.uniform(0.55, 0.7))}
    if shape == "l_shape":
        return {"thickness": float(rng.uniform(0.4, 0.5))}
    if shape == "u_shape":
        return {"thickness": float(rng.uniform(0.33, 0.45))}
    raise ValueError(f"unknown shape {shape!r}")


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray, params: dict[str, float]) -> np.ndarray:
    """Boolean mask of ``shape`` at normalised object coordinates ``(u, v)``."""
    inside_square = (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    if shape == "ring":
        rho = u * u + v * v
        return (rho <= 1.0) & (rho >= params["inner"] ** 2)
    if shape == "crescent":
        # A disc with an offset, slightly smaller disc bitten out of it.
        rho = u * u + v * v
        bite = (u - params["offset"]) ** 2 + v * v
        return (rho <= 1.0) & (bite > params["cut"] ** 2)
    if shape == "cross":
        w = params["width"]
        return inside_square & ((np.abs(u) <= w) | (np.abs(v) <= w))
    if shape == "star":
        return _star_mask(u, v, int(params["points"]), params["inner"])
    if shape == "l_shape":
        t = params["thickness"]
        return inside_square & ((u <= -1.0 + 2 * t) | (v >= 1.0 - 2 * t))
    if shape == "u_shape":
        t = params["thickness"]
        notch = (np.abs(u) < 1.0 - 2 * t) & (v < 1.0 - 2 * t)
        return inside_square & ~notch
    raise ValueError(f"unknown shape {shape!r}")


def _star_mask(u: np.ndarray, v: np.ndarray, points: int, inner: float) -> np.ndarray:
    """Exact regular star polygon (outer radius 1, inner radius ``inner``).

    Folding the angle into the half-sector ``[0, pi/points]`` reduces the test to
    one half-plane: the edge from the outer vertex (1, 0) to the inner vertex.
    """
    sector = 2 * np.pi / points
    phi = np.mod(np.arctan2(v, u), sector)
    phi = np.minimum(phi, sector - phi)
    rho = np.sqrt(u * u + v * v)
    px, py = rho * np.cos(phi), rho * np.sin(phi)
    bx, by = inner * np.cos(np.pi / points), inner * np.sin(np.pi / points)
    return (bx - 1.0) * py - by * (px - 1.0) >= 0.0


def texture(
    spec: ClassSpec, xl: np.ndarray, yl: np.ndarray, u: np.ndarray, period: float, phase: float
) -> np.ndarray:
    """Mixing weight in [0, 1] between an instance's two colours.

    ``xl, yl`` are rotated object-frame coordinates in pixels; ``u`` is the
    normalised coordinate (for the gradient, which spans the object).
    """
    kind = spec.texture
    if kind in ("stripes", "fine_stripes"):
        along = xl * np.cos(spec.stripe_angle) + yl * np.sin(spec.stripe_angle)
        return np.clip(0.5 + 1.5 * np.sin(2 * np.pi * along / period + phase), 0.0, 1.0)
    if kind == "checker":
        s = np.sin(2 * np.pi * xl / period + phase) * np.sin(2 * np.pi * yl / period + phase)
        return np.clip(0.5 + 2.0 * s, 0.0, 1.0)
    if kind == "dots":
        dx = np.mod(xl + phase, period) - period / 2
        dy = np.mod(yl + phase, period) - period / 2
        return (dx * dx + dy * dy <= (0.3 * period) ** 2).astype(np.float64)
    if kind == "gradient":
        return np.clip((u + 1.0) / 2.0, 0.0, 1.0)
    if kind == "waves":
        return 0.5 + 0.5 * np.sin(2 * np.pi * np.sqrt(xl * xl + yl * yl) / period + phase)
    raise ValueError(f"unknown texture {kind!r}")


def hsv_to_rgb255(h: float, s: float, v: float) -> np.ndarray:
    """One HSV colour (all in [0, 1], hue wraps) as float RGB in [0, 255]."""
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float64) * 255.0


def class_colours(spec: ClassSpec, rng: np.random.Generator, contrast: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Primary and secondary colour of an instance, drawn around the class tint.

    The secondary colour has the same hue and a brightness differing by about
    ``contrast`` (relative), so the texture is visible but an object is still
    mostly self-similar to colour-affinity cues, as real objects are.
    """
    hue = spec.hue + rng.uniform(-0.05, 0.05)
    sat = rng.uniform(0.45, 0.9)
    val = rng.uniform(0.55, 0.95)
    primary = hsv_to_rgb255(hue, sat, val)
    step = contrast * rng.uniform(0.8, 1.2)
    factor = 1.0 - step if val > 0.7 else 1.0 + step
    secondary = hsv_to_rgb255(hue, sat * rng.uniform(0.7, 1.0), min(val * factor, 1.0))
    return primary, secondary


@functools.lru_cache(maxsize=8)
def _interpolation_matrix(size: int, knots: int) -> np.ndarray:
    """Linear-interpolation weights ``[size, knots]`` from a knot grid to pixels."""
    pos = (np.arange(size) + 0.5) / size * (knots - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, knots - 2)
    frac = pos - lo
    mat = np.zeros((size, knots))
    mat[np.arange(size), lo] = 1.0 - frac
    mat[np.arange(size), lo + 1] = frac
    return mat


@functools.lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def background(rng: np.random.Generator, size: int, knots: int, variation: float, grain: float,
               clutter: int) -> np.ndarray:
    """A textured float RGB background ``[size, size, 3]`` in [0, 255].

    A bilinear colour field over a ``knots x knots`` grid of colours spread by
    ``variation`` (0 = flat, 1 = unrelated knots) around a mostly desaturated
    base colour, plus a sinusoidal grain of random orientation and period, plus
    up to ``clutter`` unannotated ellipses (convex distractors). The field is
    gentle enough that neighbouring background pixels are often colour-similar,
    as in real photographs, so colour affinity is informative except where an
    object is camouflaged.
    """
    base_hue, base_sat, base_val = rng.uniform(0.0, 1.0), rng.uniform(0.05, 0.5), rng.uniform(0.3, 0.85)
    grid = np.empty((knots, knots, 3))
    for i in range(knots):
        for j in range(knots):
            grid[i, j] = hsv_to_rgb255(
                base_hue + variation * rng.uniform(-0.12, 0.12),
                float(np.clip(base_sat + variation * rng.uniform(-0.25, 0.25), 0.0, 1.0)),
                float(np.clip(base_val + variation * rng.uniform(-0.3, 0.3), 0.1, 1.0)),
            )
    interp = _interpolation_matrix(size, knots)
    rows = (interp @ grid.reshape(knots, -1)).reshape(size, knots, 3)  # [y, knot_x, c]
    field = np.matmul(interp[None], rows)  # [y, x, c]
    yy, xx = _pixel_grid(size)
    angle, period = rng.uniform(0, np.pi), rng.uniform(10.0, 30.0)
    along = xx * np.cos(angle) + yy * np.sin(angle)
    wobble = 2.0 * np.sin(2 * np.pi * (xx * np.sin(angle) - yy * np.cos(angle)) / rng.uniform(20, 60))
    amplitude = rng.uniform(0.3, 1.0) * grain
    field += (amplitude * np.sin(2 * np.pi * (along + wobble) / period + rng.uniform(0, 2 * np.pi)))[..., None]
    for _ in range(int(rng.integers(0, clutter + 1))):
        colour = hsv_to_rgb255(rng.uniform(0, 1), rng.uniform(0.05, 0.6), rng.uniform(0.25, 0.95))
        paint_ellipse(field, rng.uniform(0, size, 2), rng.uniform(4, 0.2 * size, 2), rng.uniform(0, np.pi), colour)
    return field


def paint_ellipse(
    canvas: np.ndarray, centre: np.ndarray, axes: np.ndarray, angle: float, colour: np.ndarray
) -> None:
    """Fill a rotated ellipse (centre x, y; semi-axes; angle) with ``colour`` in place."""
    size_y, size_x = canvas.shape[:2]
    reach = float(axes.max())
    x0, x1 = max(int(centre[0] - reach), 0), min(int(centre[0] + reach) + 1, size_x)
    y0, y1 = max(int(centre[1] - reach), 0), min(int(centre[1] + reach) + 1, size_y)
    if x0 >= x1 or y0 >= y1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    dx, dy = xx - centre[0], yy - centre[1]
    c, s = np.cos(angle), np.sin(angle)
    inside = ((dx * c + dy * s) / axes[0]) ** 2 + ((-dx * s + dy * c) / axes[1]) ** 2 <= 1.0
    canvas[y0:y1, x0:x1][inside] = colour


def blend_halo(canvas: np.ndarray, centre: np.ndarray, sigma: float, colour: np.ndarray) -> None:
    """Blend ``colour`` into ``canvas`` in place around ``centre`` (weight 1 in the middle).

    Used to make the background take an object's colour on one side of it: there
    the object edge has no colour contrast, while the rest of the outline does.
    """
    size_y, size_x = canvas.shape[:2]
    reach = 3.5 * sigma
    x0, x1 = max(int(centre[0] - reach), 0), min(int(centre[0] + reach) + 1, size_x)
    y0, y1 = max(int(centre[1] - reach), 0), min(int(centre[1] + reach) + 1, size_y)
    if x0 >= x1 or y0 >= y1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    # Flat top (weight 1 within about 1.2 sigma), Gaussian fall-off outside.
    weight = np.minimum(2.0 * np.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2)
                                     / (2.0 * sigma * sigma)), 1.0)[..., None]
    window = canvas[y0:y1, x0:x1]
    window += weight * (colour - window)


_PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
            (145, 30, 180), (70, 240, 240), (240, 50, 230), (250, 250, 250), (0, 0, 0))


def render_preview(samples: list[tuple[np.ndarray, list[tuple[int, np.ndarray]]]],
                   cats: list[dict[str, Any]], scale: int = 2) -> bytes:
    """PNG bytes of a grid of images with each instance's box and mask outline.

    Each instance gets its own palette colour (box, outline and class name), so
    overlapping same-class instances can be told apart.
    """
    names = {c["id"]: c["name"] for c in cats}
    cols = int(np.ceil(np.sqrt(len(samples))))
    rows = int(np.ceil(len(samples) / cols))
    tile = samples[0][0].shape[0] * scale
    gap = 4
    sheet = Image.new("RGB", (cols * (tile + gap) + gap, rows * (tile + gap) + gap), (40, 40, 40))
    for k, (image, objects) in enumerate(samples):
        big = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1).copy()
        boxes = []
        for n, (category_id, mask) in enumerate(objects):
            colour = np.array(_PALETTE[n % len(_PALETTE)], dtype=np.uint8)
            m = np.repeat(np.repeat(mask, scale, axis=0), scale, axis=1)
            inner = m.copy()
            inner[1:, :] &= m[:-1, :]
            inner[:-1, :] &= m[1:, :]
            inner[:, 1:] &= m[:, :-1]
            inner[:, :-1] &= m[:, 1:]
            big[m & ~inner] = colour
            ys, xs = np.nonzero(mask)
            boxes.append((xs.min(), ys.min(), xs.max(), ys.max(), tuple(int(c) for c in colour),
                          names[category_id]))
        tile_img = Image.fromarray(big)
        draw = ImageDraw.Draw(tile_img)
        for x0, y0, x1, y1, colour, name in boxes:
            draw.rectangle((x0 * scale, y0 * scale, (x1 + 1) * scale - 1, (y1 + 1) * scale - 1),
                           outline=colour)
            draw.text((x0 * scale + 2, y0 * scale + 1), name, fill=colour)
        r, c = divmod(k, cols)
        sheet.paste(tile_img, (gap + c * (tile + gap), gap + r * (tile + gap)))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()
