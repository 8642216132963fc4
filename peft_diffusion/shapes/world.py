"""The shapes world: a seeded generator of 32x32 RGB images of one coloured shape, with captions.

It is the measuring instrument for the tiny Stable-Diffusion-architecture base model: every image is fully
described by a few categorical attributes, so a small oracle CNN (``shapes.oracle``) can read what a model
generated and score it against the prompt.

Attributes (the keys of every attribute dict)

=============  ===========================================================================================
``shape``      ``circle square triangle star heart`` (``SHAPES``), plus the held-out subject shape
               ``cross`` (``SUBJECT_SHAPE``), which base pretraining must never see
``colour``     ``red green blue yellow purple`` (``COLOURS``)
``background`` ``white black gray pink`` (``BACKGROUNDS``); every colour contrasts with every background
``size``       ``small large`` (``SIZES``): half-extent 5.5 / 8.5 pixels, +-6 % jitter
``position``   a 3x3 grid of regions (``POSITIONS``): ``top left``, ``top``, ``top right``, ``left``,
               ``center``, ``right``, ``bottom left``, ``bottom``, ``bottom right``; the centre is jittered
               by a quarter of the grid spacing, so regions never overlap, and no shape touches the edge
``striped``    ``True``/``False``: dark horizontal bands inside the shape. Only the subject has stripes in
               the world's datasets; ``render`` can draw them on any shape (the oracle trains on that)
=============  ===========================================================================================

Caption grammar (one grammar, every field in a fixed order; ``[...]`` is optional)::

    a [size] [striped] [colour] [identifier] shape [on a <background> background][, <position>]

e.g. ``"a large red circle on a white background, top left"`` or, for the subject,
``"a small striped yellow cross on a pink background, center"``. ``caption(attrs)`` writes every field the
dict holds (``striped`` only when true); ``caption(attrs, identifier="sks", omit=("colour", "striped"))``
writes DreamBooth-style instance captions such as ``"a large sks cross on a gray background, right"``.
``parse_caption`` inverts any caption of this grammar. ``VOCAB`` lists every word a caption can hold
(the comma is a word of its own; ``words(text)`` splits a caption the same way).

Determinism: sample ``i`` of ``dataset(n, seed)`` is drawn from ``numpy.random.default_rng((seed, i))``,
so it is the same whatever ``n`` is, and the bytes are identical across runs (the drawing is PIL's
rasteriser followed by integer arithmetic).
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .draw import draw

__all__ = [
    "SHAPES", "SUBJECT_SHAPE", "ALL_SHAPES", "COLOURS", "BACKGROUNDS", "SIZES", "POSITIONS", "RGB",
    "BACKGROUND_RGB", "IMAGE_SIZE", "IDENTIFIER", "SUBJECT", "KEYS", "VOCAB", "Sample", "render", "from_attrs",
    "caption",
    "parse_caption", "words", "sample", "sample_at", "dataset", "iter_samples", "subject_dataset",
    "all_attrs", "to_array",
]

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle", "star", "heart")
SUBJECT_SHAPE = "cross"
ALL_SHAPES = SHAPES + (SUBJECT_SHAPE,)
# Well separated in RGB (the closest pair, blue/purple, is ~125 apart) and each far from every background.
RGB = {
    "red": (215, 35, 35),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 30),
    "purple": (145, 55, 185),
}
COLOURS = tuple(RGB)
BACKGROUND_RGB = {
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "gray": (125, 125, 125),
    "pink": (250, 185, 200),
}
BACKGROUNDS = tuple(BACKGROUND_RGB)
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom",
             "bottom right")
IDENTIFIER = "sks"
# The DreamBooth subject: a striped cross; its colour is the fine-tuner's choice (``subject_dataset``).
SUBJECT = {"shape": SUBJECT_SHAPE, "striped": True}
KEYS = ("shape", "colour", "background", "size", "position", "striped")

_HALF = {"small": 5.5, "large": 8.5}  # half-extent in pixels
_SIZE_JITTER = 0.06
_MARGIN = 0.5  # pixels always kept free between the shape's bounding box and the image edge

VOCAB = tuple(dict.fromkeys(
    ["a", "on", "background", ",", "striped", IDENTIFIER] + list(SIZES) + list(COLOURS) + list(ALL_SHAPES)
    + list(BACKGROUNDS) + [w for p in POSITIONS for w in p.split()]))


@dataclass
class Sample:
    """One world image: ``image`` (PIL RGB, 32x32), its ``caption``, its ``attrs`` (the keys in ``KEYS``) and
    ``geometry`` = (centre x, centre y, half-extent) in pixels."""

    image: Image.Image
    caption: str
    attrs: dict
    geometry: tuple[float, float, float]

    @property
    def array(self) -> np.ndarray:
        """The image as a uint8 array, HxWx3."""
        return np.asarray(self.image)


def _check(attrs: dict) -> None:
    allowed = {"shape": ALL_SHAPES, "colour": COLOURS, "background": BACKGROUNDS, "size": SIZES,
               "position": POSITIONS, "striped": (False, True)}
    for key, value in attrs.items():
        if key not in allowed:
            raise KeyError(f"unknown attribute {key!r}; known: {', '.join(KEYS)}")
        if value not in allowed[key]:
            raise ValueError(f"{key}={value!r} is not one of {allowed[key]}")


def _geometry(attrs: dict, rng: np.random.Generator | None) -> tuple[float, float, float]:
    """Centre and half-extent; the canonical (un-jittered) ones when ``rng`` is None.

    The three region centres per axis are ``lo``, 16 and ``32 - lo``; each centre is jittered by a quarter
    of their spacing ``j``, and ``lo`` is the smallest value that keeps the largest jittered shape
    ``_MARGIN`` pixels inside the image: ``lo = reach + j`` with ``j = (16 - lo) / 4``.
    """
    half = _HALF[attrs["size"]]
    reach = half * (1 + _SIZE_JITTER) + _MARGIN
    lo = (reach + IMAGE_SIZE / 8) / 1.25
    spacing = IMAGE_SIZE / 2 - lo
    row, col = divmod(POSITIONS.index(attrs["position"]), 3)
    cx, cy = lo + col * spacing, lo + row * spacing
    if rng is not None:
        half *= 1 + rng.uniform(-_SIZE_JITTER, _SIZE_JITTER)
        j = spacing / 4
        cx += rng.uniform(-j, j)
        cy += rng.uniform(-j, j)
    return float(cx), float(cy), float(half)


def render(attrs: dict, rng: np.random.Generator | None = None,
           geometry: tuple[float, float, float] | None = None) -> Image.Image:
    """The image of a full attribute dict (every key of ``KEYS``; ``striped`` defaults to False).

    Without ``rng`` the shape sits at the canonical centre of its region at its nominal size; with one,
    position and size are jittered; ``geometry`` = (cx, cy, half) overrides both. Any combination is drawn,
    including stripes on non-subject shapes, which the world's datasets never produce.
    """
    attrs = {"striped": False, **attrs}
    _check(attrs)
    missing = [k for k in KEYS if k not in attrs]
    if missing:
        raise KeyError(f"render needs every attribute; missing {missing}")
    cx, cy, half = geometry if geometry is not None else _geometry(attrs, rng)
    arr = draw(attrs["shape"], RGB[attrs["colour"]], BACKGROUND_RGB[attrs["background"]], cx, cy, half,
               striped=attrs["striped"], size=IMAGE_SIZE)
    return Image.fromarray(arr, mode="RGB")


def from_attrs(attrs: dict, rng: np.random.Generator | None = None) -> Sample:
    """The ``Sample`` of a full attribute dict: jittered image when ``rng`` is given, caption, geometry."""
    attrs = {"striped": False, **attrs}
    _check(attrs)
    geom = _geometry(attrs, rng)
    return Sample(render(attrs, geometry=geom), caption(attrs), attrs, geom)


def caption(attrs: dict, identifier: str | None = None, omit: Iterable[str] = ()) -> str:
    """The caption of ``attrs`` in the world's grammar (see the module docstring).

    Fields missing from ``attrs`` or named in ``omit`` are left out; ``shape`` is required. ``identifier``
    (e.g. ``"sks"``; default: ``attrs["identifier"]`` if present, as ``parse_caption`` returns it) goes
    right before the shape noun, DreamBooth's "a [V] [class noun]".
    """
    attrs = dict(attrs)
    identifier = identifier or attrs.pop("identifier", None)
    _check(attrs)
    omit = set(omit)
    if "shape" not in attrs or "shape" in omit:
        raise ValueError("a caption needs the shape")
    has = {k: k in attrs and k not in omit for k in KEYS}
    parts = ["a"]
    if has["size"]:
        parts.append(attrs["size"])
    if has["striped"] and attrs["striped"]:
        parts.append("striped")
    if has["colour"]:
        parts.append(attrs["colour"])
    if identifier:
        parts.append(identifier)
    parts.append(attrs["shape"])
    if has["background"]:
        parts += ["on", "a", attrs["background"], "background"]
    text = " ".join(parts)
    if has["position"]:
        text += ", " + attrs["position"]
    return text


def words(text: str) -> list[str]:
    """Split a caption into the word-level tokens of ``VOCAB`` (the comma is a token of its own)."""
    return text.replace(",", " , ").split()


def parse_caption(text: str) -> dict:
    """The attribute dict of a caption in the world's grammar; raises ``ValueError`` on anything else.

    ``striped`` is always returned (False when the word is absent); an identifier word, when present, is
    returned under ``"identifier"``. Other fields absent from the caption are absent from the dict.
    """
    toks = words(text.strip().lower())
    out: dict = {}
    i = 0

    def take(options) -> str | None:
        nonlocal i
        if i < len(toks) and toks[i] in options:
            i += 1
            return toks[i - 1]
        return None

    if take(("a",)) is None:
        raise ValueError(f"caption must start with 'a': {text!r}")
    if (v := take(SIZES)) is not None:
        out["size"] = v
    out["striped"] = take(("striped",)) is not None
    if (v := take(COLOURS)) is not None:
        out["colour"] = v
    if i + 1 < len(toks) and toks[i] not in ALL_SHAPES and toks[i + 1] in ALL_SHAPES:
        out["identifier"] = toks[i]
        i += 1
    if (v := take(ALL_SHAPES)) is None:
        raise ValueError(f"no shape where one belongs in {text!r}")
    out["shape"] = v
    if take(("on",)) is not None:
        if take(("a",)) is None or (bg := take(BACKGROUNDS)) is None or take(("background",)) is None:
            raise ValueError(f"expected 'on a <background> background' in {text!r}")
        out["background"] = bg
    if take((",",)) is not None:
        rest = " ".join(toks[i:])
        if rest not in POSITIONS:
            raise ValueError(f"unknown position {rest!r} in {text!r}")
        out["position"] = rest
        i = len(toks)
    if i != len(toks):
        raise ValueError(f"unexpected words {toks[i:]} in {text!r}")
    return out


def _draw_attrs(rng: np.random.Generator, shapes, colours, backgrounds, sizes, positions, striped) -> dict:
    attrs = {
        "shape": shapes[rng.integers(len(shapes))],
        "colour": colours[rng.integers(len(colours))],
        "background": backgrounds[rng.integers(len(backgrounds))],
        "size": sizes[rng.integers(len(sizes))],
        "position": positions[rng.integers(len(positions))],
    }
    p = float(striped)
    attrs["striped"] = bool(attrs["shape"] == SUBJECT_SHAPE and rng.random() < p)
    return attrs


def sample(rng: np.random.Generator, shapes: Sequence[str] = SHAPES, colours: Sequence[str] = COLOURS,
           backgrounds: Sequence[str] = BACKGROUNDS, sizes: Sequence[str] = SIZES,
           positions: Sequence[str] = POSITIONS, striped: bool | float = False) -> Sample:
    """One sample with attributes drawn uniformly from the given choices, position and size jittered.

    ``striped`` (a probability, or a bool) applies to the subject shape only: the world never puts
    stripes on another shape. The default ``shapes`` excludes the subject.
    """
    for name, given, known in (("shape", shapes, ALL_SHAPES), ("colour", colours, COLOURS),
                               ("background", backgrounds, BACKGROUNDS), ("size", sizes, SIZES),
                               ("position", positions, POSITIONS)):
        if not given or any(v not in known for v in given):
            raise ValueError(f"{name} choices {tuple(given)} must be a non-empty subset of {known}")
    attrs = _draw_attrs(rng, tuple(shapes), tuple(colours), tuple(backgrounds), tuple(sizes),
                        tuple(positions), striped)
    return from_attrs(attrs, rng)


def sample_at(seed: int, index: int, include_subject: bool = False, subject_fraction: float = 1 / 6) -> Sample:
    """Sample ``index`` of the stream ``seed`` (its own generator, ``default_rng((seed, index))``).

    With ``include_subject`` a ``subject_fraction`` of the samples are the subject: striped crosses of any
    colour, background, size and position. Without it no sample is a cross (base pretraining).
    """
    rng = np.random.default_rng((seed, index))
    if include_subject and rng.random() < subject_fraction:
        return sample(rng, shapes=(SUBJECT_SHAPE,), striped=True)
    return sample(rng)


def iter_samples(seed: int, include_subject: bool = False, start: int = 0,
                 subject_fraction: float = 1 / 6) -> Iterator[Sample]:
    """The endless stream ``sample_at(seed, start), sample_at(seed, start + 1), ...``."""
    for i in itertools.count(start):
        yield sample_at(seed, i, include_subject, subject_fraction)


def dataset(n: int, seed: int, include_subject: bool = False, subject_fraction: float = 1 / 6) -> list[Sample]:
    """The first ``n`` samples of stream ``seed``; never a cross unless ``include_subject``."""
    return [sample_at(seed, i, include_subject, subject_fraction) for i in range(n)]


def subject_dataset(n: int, seed: int, colour: str = "yellow", striped: bool = True,
                    backgrounds: Sequence[str] = BACKGROUNDS, sizes: Sequence[str] = SIZES,
                    positions: Sequence[str] = POSITIONS) -> list[Sample]:
    """``n`` images of the subject (a ``colour`` cross, striped by default) for DreamBooth instance sets.

    Pose (position, size) and background vary, which keeps a fine-tune from copying the instance poses.
    Captions are the full world captions; write instance captions with ``caption(s.attrs, identifier=...)``.
    """
    out = []
    for i in range(n):
        rng = np.random.default_rng((seed, i, 1))  # the trailing 1 keeps it apart from dataset(seed)
        out.append(sample(rng, shapes=(SUBJECT_SHAPE,), colours=(colour,), backgrounds=backgrounds,
                          sizes=sizes, positions=positions, striped=striped))
    return out


def all_attrs(include_subject: bool = False) -> Iterator[dict]:
    """Every attribute combination the world's datasets can produce (the subject's only when asked)."""
    shapes = ALL_SHAPES if include_subject else SHAPES
    for shape, colour, bg, size, pos in itertools.product(shapes, COLOURS, BACKGROUNDS, SIZES, POSITIONS):
        stripes = (False, True) if shape == SUBJECT_SHAPE else (False,)
        for striped in stripes:
            yield {"shape": shape, "colour": colour, "background": bg, "size": size, "position": pos,
                   "striped": striped}


def to_array(items: Iterable) -> np.ndarray:
    """Stack samples or PIL images into a uint8 array, Nx32x32x3."""
    return np.stack([np.asarray(x.image if isinstance(x, Sample) else x, dtype=np.uint8) for x in items])
