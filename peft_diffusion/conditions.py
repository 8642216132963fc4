"""Condition maps for the control adapters (ControlNet, T2I-Adapter, ControlNeXt): one function for training
data and for generation, ``condition(image, kind, **opts) -> PIL.Image`` (RGB).

Kinds
=====

=====================  ===================================================================================
``canny``              controlnet-aux ``CannyDetector`` (OpenCV Canny); ``low_threshold=100``,
                       ``high_threshold=200``, ``detect_resolution``
``shuffle``            controlnet-aux ``ContentShuffleDetector`` (a random smooth warp of the image);
                       ``seed=0`` (deterministic), ``f`` (noise period in detector pixels; default
                       ``detect_resolution // 2``, controlnet-aux's 256 at its 512), ``detect_resolution``
``lineart_standard``   controlnet-aux ``LineartStandardDetector`` (difference of Gaussians, no network);
                       ``gaussian_sigma=6.0``, ``intensity_threshold=8``, ``detect_resolution``
``mask``, ``outline``  the shapes world's exact maps, drawn from a ``shapes.Sample``'s attributes and
                       geometry (``shapes.maps``); ``outline`` takes ``width=1.0``. Not detected from pixels:
                       a plain image is refused (pass its ready-made map with kind ``none``)
``none``               the image itself, converted and sized like every other kind (a ready-made map)
=====================  ===================================================================================

controlnet-aux detectors that need no download (read in controlnet_aux 0.0.10's source): ``CannyDetector``,
``ContentShuffleDetector``, ``LineartStandardDetector`` (numpy + OpenCV only), and the training-time
augmenters beside the shuffle (``ColorShuffleDetector``, ``GrayDetector``, ``DownSampleDetector``,
``Image2MaskShuffleDetector``: raw HxWx3 arrays, unseeded global RNG). ``MediapipeFaceDetector`` ships its
model inside the ``mediapipe`` wheel, which is not a dependency (not installed: it draws nothing without it).
Every other detector loads weights from the Hugging Face hub (``from_pretrained`` -> ``hf_hub_download``:
HED, PiDiNet, MLSD, MiDaS, ZoE, LeReS, NormalBAE, Lineart, Lineart-anime, OpenPose, SAM, TEED, Anyline) or
from OpenMMLab URLs (DWPose, which also needs mmcv / mmdet / mmpose): none is offered here.

Input, size and mode
====================

``image``: a PIL image, a uint8 numpy array (HxW or HxWxC), or a ``shapes.Sample``. Images with alpha
(RGBA, LA, PA, P with transparency) are composited on white (as controlnet-aux's ``HWC3`` does); every other
mode is converted to RGB. ``size`` = the output size, an int (square) or (width, height); default: the
image's own size. An image of another size is resized to ``size`` (PIL Lanczos) before the detector runs when
the aspect ratios agree within 1 %; otherwise ``ValueError`` names both sizes (crop first: a condition map
must not be distorted). The output is always RGB at exactly ``size``.

Detectors run at ``detect_resolution`` (default: the smallest multiple of 64 at least the short side of
``size``: controlnet-aux sizes its working image in multiples of 64), and their map is resized to ``size``
with PIL's bilinear filter (antialiased when shrinking). At ``size`` 512 and the defaults, ``canny`` is
exactly ``CannyDetector()(image)``.

Determinism: ``shuffle`` seeds numpy's global generator (which controlnet-aux draws from) with ``seed`` and
restores its state afterwards, so the map depends only on the image, the options and the seed (not
thread-safe with other users of numpy's global generator). Every other kind is deterministic by itself.

controlnet-aux is imported on the first detector call, never with ``peft_diffusion``.
"""
from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

__all__ = ["KINDS", "DETECTORS", "condition", "WorldConditions"]

# kind -> the options it takes (with their defaults; detect_resolution None = from the size)
DETECTORS = {
    "canny": {"low_threshold": 100, "high_threshold": 200, "detect_resolution": None},
    "shuffle": {"seed": 0, "f": None, "detect_resolution": None},
    "lineart_standard": {"gaussian_sigma": 6.0, "intensity_threshold": 8, "detect_resolution": None},
}
WORLD_MAPS = {"mask": {}, "outline": {"width": 1.0}}
KINDS = tuple(DETECTORS) + tuple(WORLD_MAPS) + ("none",)
ASPECT_TOLERANCE = 0.01


def _target(size, image_size: tuple[int, int]) -> tuple[int, int]:
    if size is None:
        return image_size
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise ValueError(f"size must be a positive int or (width, height), got {size!r}")
    return int(size[0]), int(size[1])


def to_rgb(image) -> Image.Image:
    """A PIL RGB image of a PIL image or a uint8 array; alpha composited on white."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise ValueError(f"an array image must be uint8 HxW or HxWx(1|3|4), got {image.dtype} {image.shape}")
        image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, a uint8 array or a shapes Sample, got {type(image).__name__}")
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``image`` at ``size``: unchanged, resized when the aspect ratios agree, else a clear error."""
    if image.size == size:
        return image
    (w, h), (tw, th) = image.size, size
    if abs(w * th - tw * h) > ASPECT_TOLERANCE * max(w * th, tw * h):
        raise ValueError(f"condition image is {w}x{h} but the target size is {tw}x{th}: the aspect ratios differ "
                         f"({w / h:.3f} vs {tw / th:.3f}); crop the image to the target's aspect ratio first")
    return image.resize(size, Image.Resampling.LANCZOS)


def _options(kind: str, opts: dict) -> dict:
    table = DETECTORS.get(kind, WORLD_MAPS.get(kind, {}))
    unknown = sorted(set(opts) - set(table))
    if unknown:
        allowed = ", ".join(table) or "none"
        raise TypeError(f"condition kind {kind!r} takes no option(s) {unknown}; its options: {allowed}")
    return {**table, **opts}


def _detector(kind: str):
    """The controlnet-aux detector of ``kind``, imported on first use (controlnet-aux pulls timm, scipy, ...)."""
    with warnings.catch_warnings():  # it warns at import about optional packages (mediapipe, mmcv) we never use
        warnings.simplefilter("ignore")
        import controlnet_aux
    return {"canny": controlnet_aux.CannyDetector, "shuffle": controlnet_aux.ContentShuffleDetector,
            "lineart_standard": controlnet_aux.LineartStandardDetector}[kind]()


def _detect(kind: str, image: Image.Image, size: tuple[int, int], o: dict) -> Image.Image:
    res = o.pop("detect_resolution") or 64 * math.ceil(min(size) / 64)
    if isinstance(res, bool) or not isinstance(res, int) or res < 64:
        raise ValueError(f"detect_resolution must be an int >= 64, got {res!r}")
    arr = np.asarray(image, dtype=np.uint8)
    det = _detector(kind)
    if kind == "canny":
        out = det(arr, o["low_threshold"], o["high_threshold"], detect_resolution=res, image_resolution=res,
                  output_type="pil")
    elif kind == "lineart_standard":
        out = det(arr, guassian_sigma=o["gaussian_sigma"], intensity_threshold=o["intensity_threshold"],
                  detect_resolution=res, output_type="pil")
    else:
        seed = o["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"shuffle seed must be a non-negative int, got {seed!r}")
        state = np.random.get_state()
        np.random.seed(seed)
        try:
            out = det(arr, f=o["f"] or res // 2, detect_resolution=res, image_resolution=res, output_type="pil")
        finally:
            np.random.set_state(state)
    out = to_rgb(out)
    return out if out.size == size else out.resize(size, Image.Resampling.BILINEAR)


def condition(image, kind: str, *, size=None, **opts) -> Image.Image:
    """The condition map ``kind`` of ``image`` as a PIL RGB image of ``size`` (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"unknown condition kind {kind!r}; supported: {', '.join(KINDS)}")
    o = _options(kind, opts)
    from .shapes.world import Sample  # numpy + PIL only

    if kind in WORLD_MAPS:
        if not isinstance(image, Sample):
            raise TypeError(f"condition kind {kind!r} is drawn from a shapes Sample's attributes and geometry, not "
                            f"detected from pixels; got {type(image).__name__}. Pass the Sample, or a ready-made "
                            "map with kind 'none'")
        from .shapes.maps import world_map

        w, h = _target(size, image.image.size)
        if w != h:
            raise ValueError(f"the world's maps are square; got size {w}x{h}")
        return world_map(image, kind, w, **o).convert("RGB")
    rgb = to_rgb(image.image if isinstance(image, Sample) else image)
    target = _target(size, rgb.size)
    rgb = _fit(rgb, target)
    if kind == "none":
        return rgb
    return _detect(kind, rgb, target, o)


class WorldConditions:
    """Shapes-world training triples (image, caption, condition map), sample ``i`` being ``shapes.sample_at(seed,
    i)`` and its map ``condition(sample, kind, size=size, **opts)``; images at ``size`` too (Lanczos) when given.

    A sequence (``len``, indexing, iteration) of ``n`` items; nothing is cached, every item is rebuilt the same.
    """

    def __init__(self, n: int, seed: int, kind: str, *, size: int | None = None, include_subject: bool = False,
                 **opts):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if kind not in KINDS:
            raise ValueError(f"unknown condition kind {kind!r}; supported: {', '.join(KINDS)}")
        _options(kind, opts)
        self.n, self.seed, self.kind, self.size, self.include_subject, self.opts = n, seed, kind, size, include_subject, opts

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Image.Image, str, Image.Image]:
        if not -self.n <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} samples")
        from .shapes.world import sample_at

        s = sample_at(self.seed, i % self.n, self.include_subject)
        image = s.image if self.size is None else _fit(s.image, _target(self.size, s.image.size))
        return image, s.caption, condition(s, self.kind, size=self.size, **self.opts)

    def __iter__(self) -> Iterator[tuple[Image.Image, str, Image.Image]]:
        return (self[i] for i in range(self.n))
