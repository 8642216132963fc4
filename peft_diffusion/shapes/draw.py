"""Rasterising one shapes-world image: outlines in unit coordinates, 4x supersampling, box downsampling.

Every outline lives in a unit frame (x right, y down) whose bounding box is [-1, 1] on its longer axis and
centred on the origin, so ``half`` (the half-extent in output pixels) means the same size for every shape.
The image is drawn ``SUPERSAMPLE`` times larger with PIL (hard edges) and averaged over
``SUPERSAMPLE x SUPERSAMPLE`` blocks, which is an exact area (box) filter: clean antialiased edges, no
ringing, and reproducible bytes because the averaging is integer arithmetic.

Pure numpy + PIL; no torch.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["SUPERSAMPLE", "STRIPE_PERIOD", "STRIPE_DARKEN", "outline", "supersampled_mask", "draw"]

SUPERSAMPLE = 4
# Stripes are horizontal bands STRIPE_PERIOD output pixels apart, half of each band dark. Two-pixel bands
# survive a 32x32 image and an 8x VAE; finer ones blur into a flat darker colour.
STRIPE_PERIOD = 4
# A stripe is the shape colour darkened, not a second colour, so the colour the oracle reads stays one of
# the five on every background.
STRIPE_DARKEN = 0.45


def _normalise(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Centre the bounding box on the origin and scale its longer side to 2."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    cx, cy = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
    s = max(max(xs) - min(xs), max(ys) - min(ys)) / 2
    return [((x - cx) / s, (y - cy) / s) for x, y in points]


def _star() -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        r = 1.0 if k % 2 == 0 else 0.42
        a = -math.pi / 2 + k * math.pi / 5
        pts.append((r * math.cos(a), r * math.sin(a)))
    return _normalise(pts)


def _heart() -> list[tuple[float, float]]:
    pts = []
    for k in range(72):
        t = 2 * math.pi * k / 72
        x = 16 * math.sin(t) ** 3
        y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
        pts.append((x, y))
    return _normalise(pts)


def _cross(w: float = 0.34) -> list[tuple[float, float]]:
    return [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w),
            (-1, -w), (-w, -w)]


# Polygons in the unit frame; "circle" is drawn as an ellipse. The square is a little smaller than its
# bounding frame so that its area is close to the circle's.
_POLYGONS = {
    "square": [(-0.86, -0.86), (0.86, -0.86), (0.86, 0.86), (-0.86, 0.86)],
    "triangle": [(0.0, -1.0), (1.0, 1.0), (-1.0, 1.0)],
    "star": _star(),
    "heart": _heart(),
    "cross": _cross(),
}
CIRCLE_RADIUS = 0.95


def outline(shape: str) -> list[tuple[float, float]] | None:
    """The unit-frame polygon of ``shape``; ``None`` for the circle, which is an ellipse."""
    if shape == "circle":
        return None
    try:
        return list(_POLYGONS[shape])
    except KeyError:
        raise ValueError(f"unknown shape {shape!r}; known: circle, {', '.join(_POLYGONS)}") from None


def _mask(shape: str, cx: float, cy: float, half: float, size: int) -> np.ndarray:
    """Boolean supersampled mask of one shape centred at (cx, cy) output pixels, half-extent ``half``."""
    s = SUPERSAMPLE
    img = Image.new("L", (size * s, size * s), 0)
    d = ImageDraw.Draw(img)
    poly = outline(shape)
    if poly is None:
        r = CIRCLE_RADIUS * half * s
        d.ellipse([cx * s - r, cy * s - r, cx * s + r, cy * s + r], fill=255)
    else:
        d.polygon([(cx * s + x * half * s, cy * s + y * half * s) for x, y in poly], fill=255)
    return np.asarray(img) > 127


def supersampled_mask(shape: str, cx: float, cy: float, half: float, size: int) -> np.ndarray:
    """The boolean mask ``draw`` fills, ``SUPERSAMPLE`` times the output size: the exact geometry of an image
    (``shapes.maps`` draws its condition maps from it)."""
    return _mask(shape, cx, cy, half, size)


def draw(shape: str, colour: tuple[int, int, int], background: tuple[int, int, int], cx: float, cy: float,
         half: float, striped: bool = False, size: int = 32) -> np.ndarray:
    """One ``size x size`` RGB image (uint8, HxWx3) of ``shape`` at (cx, cy) with half-extent ``half``.

    Stripes, when asked, are horizontal dark bands inside the shape, phased on the shape's centre so a
    striped shape looks the same wherever it sits.
    """
    s = SUPERSAMPLE
    mask = _mask(shape, cx, cy, half, size)
    big = np.empty(mask.shape + (3,), dtype=np.uint16)
    big[...] = np.asarray(background, dtype=np.uint16)
    big[mask] = np.asarray(colour, dtype=np.uint16)
    if striped:
        rows = (np.arange(size * s) - cy * s) % (STRIPE_PERIOD * s) < (STRIPE_PERIOD * s / 2)
        dark = np.round(np.asarray(colour) * STRIPE_DARKEN).astype(np.uint16)
        band = mask & rows[:, None]
        big[band] = dark
    # Exact box filter: sum each s x s block, round half up.
    summed = big.reshape(size, s, size, s, 3).sum(axis=(1, 3), dtype=np.uint32)
    return ((summed + (s * s) // 2) // (s * s)).astype(np.uint8)
