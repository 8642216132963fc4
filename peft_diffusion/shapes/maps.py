"""Exact condition maps of a shapes-world image, drawn from its attributes and geometry (no detector).

- ``mask``: the shape's area coverage of each pixel, 0 (background) .. 255 (fully inside), from the same
  supersampled mask ``draw`` fills and the same box filter: a pixel of coverage k/16 in the map is a pixel
  that ``render`` blends as k/16 shape colour (without stripes: ``(bg * (16 - k) + colour * k + 8) // 16``).
- ``outline``: the inner boundary band of the shape, ``width`` output pixels wide: the supersampled mask minus
  its erosion by a square of half-side ``width * SUPERSAMPLE`` (PIL's ``MinFilter``), box-filtered the same
  way. It lies inside the mask, and covers every pixel the shape covers only in part.

Both are single-channel ("L") images of ``size x size`` pixels (default: the world's 32); at another size the
geometry is scaled by ``size / IMAGE_SIZE``, so the map stays aligned with the image resized to that size.
Stripes do not change either map: they are drawn inside the shape.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from .draw import SUPERSAMPLE, supersampled_mask
from .world import IMAGE_SIZE, Sample, _check

__all__ = ["MAP_KINDS", "mask", "outline", "world_map"]

MAP_KINDS = ("mask", "outline")


def _scaled(attrs: dict, geometry, size: int) -> np.ndarray:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"map size must be a positive int, got {size!r}")
    _check(attrs)
    if "shape" not in attrs:
        raise KeyError("a condition map needs the attribute 'shape'")
    if geometry is None or len(geometry) != 3:
        raise ValueError(f"geometry must be (centre x, centre y, half-extent) in pixels, got {geometry!r}")
    k = size / IMAGE_SIZE
    cx, cy, half = (float(v) * k for v in geometry)
    return supersampled_mask(attrs["shape"], cx, cy, half, size)


def _box(big: np.ndarray, size: int) -> Image.Image:
    """Average SUPERSAMPLE x SUPERSAMPLE blocks of a boolean map into 0..255 (round half up), as ``draw`` does."""
    s = SUPERSAMPLE
    n = big.reshape(size, s, size, s).sum(axis=(1, 3), dtype=np.uint32)
    return Image.fromarray(((n * 255 + (s * s) // 2) // (s * s)).astype(np.uint8), mode="L")


def mask(attrs: dict, geometry: tuple[float, float, float], size: int = IMAGE_SIZE) -> Image.Image:
    """The shape's coverage map ("L", ``size x size``) for ``attrs`` (``shape`` is what matters) at ``geometry``."""
    return _box(_scaled(attrs, geometry, size), size)


def outline(attrs: dict, geometry: tuple[float, float, float], size: int = IMAGE_SIZE,
            width: float = 1.0) -> Image.Image:
    """The shape's inner outline band ("L", ``size x size``), ``width`` output pixels wide (0.25 .. 8)."""
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0.25 <= width <= 8:
        raise ValueError(f"outline width must be a number of pixels in [0.25, 8], got {width!r}")
    big = _scaled(attrs, geometry, size)
    r = max(1, round(width * SUPERSAMPLE))
    eroded = Image.fromarray(big.astype(np.uint8) * 255, mode="L").filter(ImageFilter.MinFilter(2 * r + 1))
    return _box(big & ~(np.asarray(eroded) > 127), size)


def world_map(sample: Sample, kind: str, size: int = IMAGE_SIZE, **opts) -> Image.Image:
    """The exact map ``kind`` ("mask" or "outline") of a world ``Sample``, from its attributes and geometry."""
    if kind not in MAP_KINDS:
        raise ValueError(f"unknown world map {kind!r}; the world draws: {', '.join(MAP_KINDS)}")
    if not isinstance(sample, Sample):
        raise TypeError(f"world_map needs a shapes Sample (attributes + geometry), got {type(sample).__name__}")
    if kind == "mask":
        if opts:
            raise TypeError(f"map 'mask' takes no options, got {sorted(opts)}")
        return mask(sample.attrs, sample.geometry, size)
    unknown = set(opts) - {"width"}
    if unknown:
        raise TypeError(f"map 'outline' takes only 'width', got {sorted(unknown)}")
    return outline(sample.attrs, sample.geometry, size, **opts)
