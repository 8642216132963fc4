"""The analytic reader: reads every shapes-world attribute of an image with fixed rules; it learns nothing.

Why a second reader: the oracle is a CNN trained on crisp generator images (plus augmentations); a blurry
four-armed blob is, to it, close enough to a cross. This reader asks for the world renderer's own geometry
instead, so a blob that has lost the cross's thin arms or the stripes' bands reads as something else. It
shares nothing with the oracle but the world's definitions (palette, outlines, region centres).

Rules, per image (32x32 RGB; other sizes are area-resized, as the oracle does):

``background``  the palette background nearest to the median of the one-pixel border ring (the world keeps
                every shape at least half a pixel inside the image).
``colour``      foreground = pixels far (> ``FG_DISTANCE``) from the measured background; each interior
                foreground pixel votes for its nearest palette colour or darkened palette colour (a stripe
                is the colour darkened by ``draw.STRIPE_DARKEN``), and the colour with the most votes wins.
``shape``       a soft foreground mask (distance to the background, scaled by the foreground/background
                contrast) keeps its largest connected blob; each shape of ``ALL_SHAPES`` is rendered by
                ``draw`` (same outlines, same 4x supersampled box filter) at a geometry fitted to the blob's
                extent and refined by a small grid search over centre and size; the shape whose ideal mask
                overlaps best (soft IoU) wins. ``iou`` is reported with the reading.
``size``        the fitted half-extent against the midpoint of the two nominal sizes.
``position``    the region whose canonical centre (for the read size) is nearest the fitted centre.
``striped``     the row profile of the foreground's brightness (relative to its colour) inside the fitted
                mask's interior has a period-``STRIPE_PERIOD`` component of at least ``STRIPE_MIN`` (clean
                stripes give about 0.3: bands at 45 % brightness; a flat fill gives about 0).

On fresh generator images every attribute reads at or near 100 % (``tests/test_analytic.py``). Use it like
the oracle: ``AnalyticReader().read(images)`` -> one dict per image, ``accuracy(images, attrs, keys)``.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
from PIL import Image

from . import world
from .draw import STRIPE_DARKEN, STRIPE_PERIOD, SUPERSAMPLE, outline, supersampled_mask
from .draw import CIRCLE_RADIUS

__all__ = ["AnalyticReader", "read", "accuracy", "FG_DISTANCE", "STRIPE_MIN"]

FG_DISTANCE = 35.0  # RGB distance from the background above which a pixel is foreground (palette minimum: 58)
STRIPE_MIN = 0.1  # period-4 amplitude of the brightness profile that counts as stripes
_SIZE_SPLIT = (5.5 + 8.5) / 2  # the nominal half-extents of "small" and "large"
_PALETTE = np.array([world.RGB[c] for c in world.COLOURS], dtype=np.float32)
_CANDIDATES = np.concatenate([_PALETTE, np.round(_PALETTE * STRIPE_DARKEN)])  # bright, then dark
_BACKGROUNDS = np.array([world.BACKGROUND_RGB[b] for b in world.BACKGROUNDS], dtype=np.float32)


def _unit_extent(shape: str) -> tuple[float, float]:
    """Half-width and half-height of a shape's outline in its unit frame."""
    poly = outline(shape)
    if poly is None:
        return CIRCLE_RADIUS, CIRCLE_RADIUS
    xs, ys = [p[0] for p in poly], [p[1] for p in poly]
    return (max(xs) - min(xs)) / 2, (max(ys) - min(ys)) / 2


_EXTENT = {s: _unit_extent(s) for s in world.ALL_SHAPES}


@functools.lru_cache(maxsize=1 << 16)
def _coverage(shape: str, cx: float, cy: float, half: float, size: int = world.IMAGE_SIZE) -> np.ndarray:
    """Area coverage (0..1, float32 HxW) of ``shape`` drawn exactly as ``draw`` draws it."""
    img = Image.fromarray(supersampled_mask(shape, cx, cy, half, size).astype(np.uint8) * 255)
    # 0/255 hard edges, so PIL's box reduction is ``draw``'s exact box filter (to 1/255)
    return np.asarray(img.reduce(SUPERSAMPLE), dtype=np.float32) / 255


def _template(shape: str, cx: float, cy: float, half: float) -> np.ndarray:
    q = 8.0  # geometry quantised to 1/8 pixel so refinements hit the cache
    return _coverage(shape, round(cx * q) / q, round(cy * q) / q, round(half * q) / q)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean mask (numpy only; 32x32 is small)."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best, best_size, current = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = current
                        stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else np.zeros_like(mask)


def _interior(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` whose four neighbours are in it too."""
    m = np.pad(mask, 1)
    return mask & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]


def _soft_iou(a: np.ndarray, t: np.ndarray) -> float:
    return float(np.minimum(a, t).sum() / max(np.maximum(a, t).sum(), 1e-6))


def _initial(shape: str, box: tuple[float, float, float, float]) -> tuple[float, float, float]:
    """The geometry (cx, cy, half) that puts ``shape``'s outline on the blob's box."""
    left, right, top, bottom = box
    ex, ey = _EXTENT[shape]
    return (left + right) / 2, (top + bottom) / 2, max((right - left) / (2 * ex), (bottom - top) / (2 * ey), 1.0)


def _refine(alpha: np.ndarray, shape: str, start: tuple[float, float, float],
            steps: Sequence[float]) -> tuple[float, tuple[float, float, float]]:
    """Pattern search on (cx, cy, half): move to the best of the six neighbours until none is better, then
    halve the step. Returns (soft IoU, geometry)."""
    best = (_soft_iou(alpha, _template(shape, *start)), start)
    for step in steps:
        for _ in range(6):
            cx, cy, h = best[1]
            moves = [(cx + step, cy, h), (cx - step, cy, h), (cx, cy + step, h), (cx, cy - step, h),
                     (cx, cy, h + step), (cx, cy, h - step)]
            cand = max(((_soft_iou(alpha, _template(shape, *g)), g) for g in moves if g[2] > 1.0),
                       key=lambda c: c[0])
            if cand[0] <= best[0]:
                break
            best = cand
    return best


def _nearest_region(cx: float, cy: float, size: str) -> str:
    dist = {p: np.hypot(*np.subtract(world._geometry({"size": size, "position": p}, None)[:2], (cx, cy)))
            for p in world.POSITIONS}
    return min(dist, key=dist.get)


def _stripe_amplitude(img: np.ndarray, fg: np.ndarray, region: np.ndarray) -> float:
    """Period-``STRIPE_PERIOD`` amplitude of the row profile of brightness relative to ``fg`` in ``region``."""
    ratio = (img @ fg) / float(fg @ fg)
    rows = [y for y in range(img.shape[0]) if region[y].any()]
    if len(rows) < STRIPE_PERIOD:
        return 0.0
    profile = np.array([np.median(ratio[y][region[y]]) for y in rows])
    ys = np.array(rows, dtype=np.float64)
    wave = np.exp(-2j * np.pi * ys / STRIPE_PERIOD)
    return float(2 * abs(((profile - profile.mean()) * wave).sum()) / len(rows))


def read_array(img: np.ndarray) -> dict:
    """Read one HxWx3 image (uint8 or float 0..255, 32x32). Returns the attributes plus ``iou`` (the best
    template overlap) and ``stripe_amplitude``; ``shape`` is None for an image with no foreground."""
    img = np.asarray(img, dtype=np.float32)
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    bg = np.median(border, axis=0)
    background = world.BACKGROUNDS[int(np.argmin(((_BACKGROUNDS - bg) ** 2).sum(1)))]
    dist = np.sqrt(((img - bg) ** 2).sum(-1))
    rough = dist > FG_DISTANCE
    out = {"background": background, "shape": None, "colour": None, "size": None, "position": None,
           "striped": False, "iou": 0.0, "stripe_amplitude": 0.0}
    if not rough.any():
        return out
    voters = _interior(rough)
    if voters.sum() < 3:
        voters = rough
    pix = img[voters]
    nearest = np.argmin(((pix[:, None, :] - _CANDIDATES[None]) ** 2).sum(-1), axis=1) % len(_PALETTE)
    votes = np.bincount(nearest, minlength=len(_PALETTE))
    k = int(np.argmax(votes))
    out["colour"] = world.COLOURS[k]
    fg, dark = _PALETTE[k], _CANDIDATES[len(_PALETTE) + k]
    contrast = min(np.linalg.norm(fg - bg), np.linalg.norm(dark - bg))
    alpha = np.clip((dist - 0.25 * contrast) / (0.5 * contrast), 0, 1)
    blob = _largest_component(alpha > 0.5)
    if not blob.any():
        return out
    grown = blob.copy()  # keep the blob's antialiased rim, drop everything else
    grown[1:] |= blob[:-1]
    grown[:-1] |= blob[1:]
    grown[:, 1:] |= grown[:, :-1].copy()
    grown[:, :-1] |= grown[:, 1:].copy()
    alpha = alpha * grown
    cols, rows = alpha.max(0), alpha.max(1)
    xs, ys = np.nonzero(cols > 0.5)[0], np.nonzero(rows > 0.5)[0]
    box = (xs[0] + 1 - cols[xs[0]], xs[-1] + cols[xs[-1]], ys[0] + 1 - rows[ys[0]], ys[-1] + rows[ys[-1]])
    # every shape coarsely, then the two best finely
    fits = {s: _refine(alpha, s, _initial(s, box), (0.5,)) for s in world.ALL_SHAPES}
    for s in sorted(fits, key=lambda s: -fits[s][0])[:2]:
        fits[s] = _refine(alpha, s, fits[s][1], (0.25, 0.125))
    shape = max(fits, key=lambda s: fits[s][0])
    iou, (cx, cy, half) = fits[shape]
    size = "large" if half >= _SIZE_SPLIT else "small"
    inside = (_template(shape, cx, cy, half) > 0.99) & grown  # pixels wholly inside the fitted outline
    region = _interior(inside)  # away from the edges too, unless that leaves too few rows (small stars)
    if region.any(1).sum() < STRIPE_PERIOD + 2:
        region = inside
    amp = _stripe_amplitude(img, fg, region)
    out.update(shape=shape, size=size, position=_nearest_region(cx, cy, size), striped=amp >= STRIPE_MIN,
               iou=iou, stripe_amplitude=amp, geometry=(cx, cy, half))
    return out


def _to_uint8_arrays(images, value_range=None) -> np.ndarray:
    """Any input the oracle accepts -> float array N x 32 x 32 x 3 in 0..255."""
    from .oracle import to_input  # the one input convention of both readers (and its resize to 32x32)

    x = to_input(images, value_range)
    return ((x.permute(0, 2, 3, 1).numpy() + 1) * 127.5).astype(np.float32)


class AnalyticReader:
    """The oracle's reading interface (``read``, ``predict``-free) for the analytic rules of this module."""

    name = "analytic"

    def read(self, images, value_range: tuple[float, float] | None = None, details: bool = False) -> list[dict]:
        """One attribute dict per image (keys of ``oracle.HEADS``; with ``details`` also ``iou``,
        ``stripe_amplitude`` and ``geometry``). Inputs as the oracle's ``read``."""
        arrays = _to_uint8_arrays(images, value_range)
        reads = [read_array(a) for a in arrays]
        if not details:
            keys = world.KEYS
            reads = [{k: r[k] for k in keys} for r in reads]
        return reads


def read(images, value_range: tuple[float, float] | None = None, details: bool = False) -> list[dict]:
    """``AnalyticReader().read``."""
    return AnalyticReader().read(images, value_range, details)


def accuracy(images, attrs: dict | Sequence[dict], keys: Sequence[str] = ("shape", "colour"),
             value_range: tuple[float, float] | None = None) -> dict[str, float]:
    """The oracle's ``accuracy`` for the analytic reader: per-key fractions and ``"all"`` (every key at once)."""
    from .scoring import accuracy_of_reads

    return accuracy_of_reads(read(images, value_range), attrs, keys)
