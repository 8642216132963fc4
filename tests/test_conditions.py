"""Condition maps (``peft_diffusion.conditions``, ``peft_diffusion.shapes.maps``): controlnet-aux detectors
called as controlnet-aux calls them, the world's exact mask and outline against the renderer, size / mode
handling, errors, the training triples, and no network access anywhere (every socket call fails here).
"""
from __future__ import annotations

import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from peft_diffusion.conditions import KINDS, WorldConditions, condition
from peft_diffusion.shapes import maps, world

ATTEMPTS: list = []


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every way to open a connection records the attempt and fails; each test ends with none attempted."""
    def refuse(*args, **kwargs):
        ATTEMPTS.append(args[:2])
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield
    assert not ATTEMPTS, f"network access attempted: {ATTEMPTS}"


def plain_samples(n: int = 30, seed: int = 7):
    return world.dataset(n, seed)


def _arr(image) -> np.ndarray:
    return np.asarray(image)


def test_controlnet_aux_is_imported_lazily():
    code = ("import sys, peft_diffusion, peft_diffusion.conditions, peft_diffusion.shapes.maps; "
            "print('controlnet_aux' in sys.modules, 'cv2' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# ---------------------------------------------------------------- controlnet-aux detectors

def test_canny_is_controlnet_aux_canny():
    from controlnet_aux import CannyDetector

    s = world.sample_at(0, 3)
    big = s.image.resize((512, 512), Image.Resampling.NEAREST)
    ours = condition(big, "canny")
    theirs = CannyDetector()(big)  # its defaults: thresholds 100 / 200, 512 px in and out
    assert ours.mode == "RGB" and ours.size == (512, 512)
    assert np.array_equal(_arr(ours), _arr(theirs))
    assert _arr(ours).max() == 255  # edges were found
    # a world image at its own 32 px: the detector at 64 px, its map resized to 32
    small = condition(s, "canny", low_threshold=50, high_threshold=150)
    ref = CannyDetector()(np.asarray(s.image), 50, 150, detect_resolution=64, image_resolution=64, output_type="pil")
    assert np.array_equal(_arr(small), _arr(ref.resize((32, 32), Image.Resampling.BILINEAR)))
    # its edges sit on the shape's boundary: none 2 px or more inside or outside the exact mask
    m = _arr(maps.mask(s.attrs, s.geometry))
    edge = _arr(small)[..., 0] > 0
    lo, hi = m.copy(), m.copy()  # min / max of the mask over each pixel's 5x5 neighbourhood
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            shifted = np.roll(np.roll(m, dy, 0), dx, 1)
            lo, hi = np.minimum(lo, shifted), np.maximum(hi, shifted)
    near = (hi > 0) & (lo < 255)
    assert edge.sum() > 20 and not (edge & ~near).any()


def test_shuffle_is_seeded_and_is_controlnet_aux_shuffle():
    from controlnet_aux import ContentShuffleDetector

    s = world.sample_at(0, 5)
    state = np.random.get_state()
    a = condition(s, "shuffle", seed=3)
    assert np.array_equal(np.random.get_state()[1], state[1])  # the global generator is left as it was
    assert np.array_equal(_arr(a), _arr(condition(s, "shuffle", seed=3)))
    assert not np.array_equal(_arr(a), _arr(condition(s, "shuffle", seed=4)))
    np.random.seed(3)
    ref = ContentShuffleDetector()(np.asarray(s.image), f=32, detect_resolution=64, image_resolution=64)
    assert np.array_equal(_arr(a), _arr(ref.resize((32, 32), Image.Resampling.BILINEAR)))
    # a warp of the image's own colours: a flat image stays flat
    flat = Image.new("RGB", (32, 32), (10, 200, 30))
    assert (_arr(condition(flat, "shuffle")) == (10, 200, 30)).all()


def test_lineart_standard_is_controlnet_aux_lineart_standard():
    from controlnet_aux import LineartStandardDetector

    # dark lines on light ground are what it draws: a blue square on white
    s = world.from_attrs({"shape": "square", "colour": "blue", "background": "white", "size": "large",
                          "position": "center"})
    ours = condition(s, "lineart_standard", gaussian_sigma=2.0)
    ref = LineartStandardDetector()(np.asarray(s.image), guassian_sigma=2.0, detect_resolution=64)
    assert ours.size == (32, 32) and np.array_equal(_arr(ours), _arr(ref))
    assert _arr(ours).max() > 0


# ---------------------------------------------------------------- the world's exact maps

def test_mask_is_the_renderers_coverage():
    for s in plain_samples():
        m = _arr(condition(s, "mask"))
        assert m.shape == (32, 32, 3) and (m == m[..., :1]).all()
        k = np.rint(m[..., 0].astype(np.int64) * 16 / 255).astype(np.int64)[..., None]
        assert np.array_equal((k * 255 + 8) // 16, m[..., :1].astype(np.int64))  # values on the 1/16 grid
        bg = np.asarray(world.BACKGROUND_RGB[s.attrs["background"]], dtype=np.int64)
        col = np.asarray(world.RGB[s.attrs["colour"]], dtype=np.int64)
        assert np.array_equal((bg * (16 - k) + col * k + 8) // 16, s.array.astype(np.int64)), s.caption


def test_mask_matches_the_geometry():
    for shape in ("circle", "square", "cross"):  # symmetric: the centroid is the centre
        for i in range(3):
            rng = np.random.default_rng((11, i))
            s = world.sample(rng, shapes=(shape,))
            cx, cy, half = s.geometry
            for size in (32, 96):
                m = _arr(maps.mask(s.attrs, s.geometry, size)).astype(np.float64)
                ys, xs = np.mgrid[0:size, 0:size] + 0.5
                k = size / 32
                # the renderer's own convention: PIL's rasteriser fills the last row / column of supersampled
                # pixels on the boundary too (up to 1/8 px towards bottom right); a misplaced map is >= 1/4 px off
                assert abs((m * xs).sum() / m.sum() - cx * k) < 0.2
                assert abs((m * ys).sum() / m.sum() - cy * k) < 0.2
                cols = np.nonzero(m.sum(axis=0))[0]
                extent = {"circle": 0.95, "square": 0.86, "cross": 1.0}[shape] * half * k
                assert abs((cols[-1] + 1 - cols[0]) / 2 - extent) <= 1.0


def test_striped_subject_mask_is_exact_where_the_image_is_background():
    for s in world.subject_dataset(6, seed=2):
        m = _arr(condition(s, "mask"))[..., 0]
        bg = np.asarray(world.BACKGROUND_RGB[s.attrs["background"]])
        is_bg = (s.array == bg).all(axis=2)
        assert np.array_equal(m == 0, is_bg)


def test_outline_is_the_inner_boundary_band():
    for s in plain_samples(10, seed=3):
        m = _arr(condition(s, "mask"))[..., 0].astype(int)
        o = _arr(condition(s, "outline"))[..., 0].astype(int)
        wide = _arr(condition(s, "outline", width=2.0))[..., 0].astype(int)
        assert (o <= m).all() and (o <= wide).all() and (wide <= m).all()
        assert (o[(m > 0) & (m < 255)] > 0).all()  # every pixel the shape covers in part
        full = m == 255
        deep = full.copy()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                deep &= np.roll(np.roll(full, dy, 0), dx, 1)
        assert (o[deep] == 0).all() and deep.any()  # nothing a pixel or more inside
        assert wide.sum() > o.sum()


# ---------------------------------------------------------------- size, mode, errors

def test_modes_are_converted_to_rgb():
    clear = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    assert condition(clear, "none").mode == "RGB"
    assert (_arr(condition(clear, "none")) == 255).all()  # alpha composited on white, as controlnet-aux's HWC3
    gray = Image.new("L", (32, 32), 77)
    assert (_arr(condition(gray, "none")) == 77).all()
    rgba = world.sample_at(0, 1).image.convert("RGBA")
    assert np.array_equal(_arr(condition(rgba, "canny")), _arr(condition(world.sample_at(0, 1), "canny")))
    arr = np.full((32, 32), 9, dtype=np.uint8)
    assert (_arr(condition(arr, "none")) == 9).all()
    with pytest.raises(ValueError, match="uint8"):
        condition(np.zeros((32, 32, 3), dtype=np.float32), "none")
    with pytest.raises(TypeError, match="PIL image"):
        condition("cat.png", "none")


def test_sizes_are_resized_or_refused():
    s = world.sample_at(0, 2)
    big = s.image.resize((64, 64), Image.Resampling.NEAREST)
    out = condition(big, "canny", size=32)
    assert out.size == (32, 32)
    assert np.array_equal(_arr(out), _arr(condition(big.resize((32, 32), Image.Resampling.LANCZOS), "canny")))
    assert condition(s, "mask", size=64).size == (64, 64)
    assert condition(s, "canny", size=(48, 48)).size == (48, 48)
    with pytest.raises(ValueError, match=r"64x32 but the target size is 32x32"):
        condition(Image.new("RGB", (64, 32)), "canny", size=32)
    for bad in (0, -3, (32,), (32, 0), 2.5, True):
        with pytest.raises(ValueError, match="size must be"):
            condition(s, "canny", size=bad)
    with pytest.raises(ValueError, match="square"):
        condition(s, "mask", size=(64, 32))


def test_errors_name_the_kind_and_the_supported_ones():
    s = world.sample_at(0, 0)
    with pytest.raises(ValueError, match=r"unknown condition kind 'depth'; supported: canny, shuffle, "
                                         r"lineart_standard, mask, outline, none"):
        condition(s, "depth")
    with pytest.raises(TypeError, match=r"kind 'canny' takes no option\(s\) \['sigma'\]; its options: "
                                        r"low_threshold, high_threshold, detect_resolution"):
        condition(s, "canny", sigma=1)
    with pytest.raises(TypeError, match=r"'mask' is drawn from a shapes Sample"):
        condition(s.image, "mask")
    with pytest.raises(ValueError, match="seed"):
        condition(s, "shuffle", seed=-1)
    with pytest.raises(ValueError, match="detect_resolution"):
        condition(s, "canny", detect_resolution=32)
    with pytest.raises(ValueError, match="outline width"):
        condition(s, "outline", width=0)
    assert set(KINDS) >= {"canny", "shuffle", "mask", "outline"}


# ---------------------------------------------------------------- training triples

def test_world_conditions_triples():
    data = WorldConditions(4, seed=5, kind="mask")
    assert len(data) == 4
    items = list(data)
    assert len(items) == 4
    for i, (image, caption, cond) in enumerate(items):
        s = world.sample_at(5, i)
        assert caption == s.caption and np.array_equal(_arr(image), s.array)
        assert cond.mode == "RGB" and np.array_equal(_arr(cond), _arr(condition(s, "mask")))
    again = WorldConditions(4, seed=5, kind="mask")[2]
    assert np.array_equal(_arr(again[2]), _arr(items[2][2])) and again[1] == items[2][1]
    image, _, cond = WorldConditions(2, seed=5, kind="canny", size=64, low_threshold=50)[1]
    assert image.size == cond.size == (64, 64)
    assert np.array_equal(_arr(cond), _arr(condition(image, "canny", low_threshold=50)))
    with pytest.raises(IndexError):
        data[4]
    with pytest.raises(ValueError, match="unknown condition kind"):
        WorldConditions(2, seed=0, kind="edges")
    with pytest.raises(TypeError, match="its options: width"):
        WorldConditions(2, seed=0, kind="outline", sigma=2)
