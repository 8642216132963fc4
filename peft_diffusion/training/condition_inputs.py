"""Spatial conditions in training (T2I-Adapter, ControlNet, ControlNeXt): the condition map of every training
image, handed to the U-Net as the per-call input ``control_image``. One contract for every control method.

The per-call input ``control_image``
====================================

A float tensor ``[B, 3, H, W]``, values in [0, 1], ``H x W`` = the images' pixel size (not the latents'): what
diffusers' ``StableDiffusionAdapterPipeline`` / ``StableDiffusionControlNetPipeline`` hand their adapter or
ControlNet after preprocessing (RGB / 255, no normalisation). ``B`` is 1 (one map for every item), the prompt
batch, or the U-Net batch: ``core.fit_batch`` tiles it over the copies a pipeline makes (classifier-free
guidance's [negative; positive]), so image i of a batch gets map ``i % B``. [B, 1, H, W] is accepted too (a
method taking one channel may also reduce an RGB map itself). Several control adapters with
different conditions: a dict ``{adapter name: tensor}``. Given with ``pd.inputs(pipe, control_image=...)``; a
delta reads it with ``control_input(model, adapter_name)`` (None: no condition this call: the delta must then
leave the U-Net's output exactly the base's). ``control_tensor(maps)`` turns PIL maps into it.

Method configs
==============

A control method's config inherits ``ControlFields`` (``methods/control_image.py``: fields ``control_type``, a
``conditions.KINDS`` name, default ``"mask"``, and ``control_options``, that kind's options as a dict); the
trainer's per-call hooks (``training/call_inputs.py``) give every such config its maps through this module's
``batch_inputs`` / ``validation_inputs`` (methods do not import the trainer).

``control_type`` is saved with the adapter (its config), so ``generate`` can prepare a user's condition image
the same way: ``conditions.condition(image, control_type, size=resolution, **control_options)`` then
``control_tensor`` (``prepare_control``). Control methods train without prior preservation (the class images
have no condition maps); the trainer's config check refuses the combination.

Data: ``instance_dir`` as for DreamBooth (images, ``<stem>.txt`` captions) and
==============================================================================

- detector kinds (``canny``, ``shuffle``, ``lineart_standard``): each map is computed from its training image
  (after the trainer's resize and crop) by ``conditions.condition``: the same call ``generate`` makes;
- ``mask``, ``outline`` (the shapes world's exact maps, which need the generator's geometry) and ``none``
  (maps made elsewhere, as in diffusers' train_t2i_adapter / train_controlnet datasets): read from
  ``<instance_dir>/conditions/<stem>.<any image suffix>``, one per image, fitted exactly like their image
  (same resize and centre crop); a missing map, or one whose aspect ratio differs from its image's, is a
  ``DataError`` naming both files.

``write_world(folder, n, seed, kind)`` (or ``python -m peft_diffusion.training.write_world FOLDER --n 200
--kind mask``) writes such a folder from the shapes world: ``00000.png``, ``00000.txt``,
``conditions/00000.png``...; sample i is ``shapes.sample_at(seed, i)``.

Validation grids show, for each validation image j, the map of instance image ``j % N`` and the generation
side by side (``side_by_side``).
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import conditions
from ..methods.control_image import NAME as INPUT, ControlFields, control_input  # noqa: F401 (this module's API)
from .data import DataError, _read_image, fit, to_rgb

logger = logging.getLogger(__name__)

MAPS_FOLDER = "conditions"
FROM_FILES = ("mask", "outline", "none")  # kinds read from <instance_dir>/conditions, not detected
_RUN: contextvars.ContextVar[dict] = contextvars.ContextVar("peft_diffusion_control_run", default={})


# ---------------------------------------------------------------- the per-call input

def control_tensor(maps) -> torch.Tensor:
    """PIL images (or one) -> the ``control_image`` tensor [N, 3, H, W] in [0, 1] (RGB; all the same size)."""
    maps = [maps] if isinstance(maps, Image.Image) else list(maps)
    sizes = {m.size for m in maps}
    if len(sizes) != 1:
        raise ValueError(f"condition maps of one batch must share a size, got {sorted(sizes)}")
    arr = np.stack([np.asarray(conditions.to_rgb(m), dtype=np.uint8) for m in maps])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(255)


def prepare_control(image, kind: str, size, **opts) -> torch.Tensor:
    """A user's condition image as ``control_image`` [1, 3, H, W]: ``conditions.condition`` then
    ``control_tensor`` (what the trainer does to its images; ``size`` an int or (width, height))."""
    return control_tensor(conditions.condition(image, kind, size=size, **opts))


# ---------------------------------------------------------------- the trainer's maps

@contextlib.contextmanager
def training_run(paths, validation_images: int = 1):
    """Set by the trainer around its hooks: the instance files (maps read from files need them) and how many
    validation images a prompt has (one map each)."""
    token = _RUN.set({"paths": [Path(p) for p in paths], "validation_images": int(validation_images)})
    try:
        yield
    finally:
        _RUN.reset(token)


def _map_file(image_path: Path) -> Path:
    folder = image_path.parent / MAPS_FOLDER
    found = sorted(p for p in folder.glob(f"{image_path.stem}.*") if p.is_file()) if folder.is_dir() else []
    found = [p for p in found if p.suffix.lower() != ".txt"]
    if not found:
        raise DataError(f"no condition map for {image_path}: expected {folder / image_path.stem}.png "
                        f"(maps of kind mask / outline / none are read from the '{MAPS_FOLDER}' folder)")
    return found[0]


def _read_map(image_path: Path, resolution: int) -> Image.Image:
    path = _map_file(image_path)
    cond = _read_image(path)
    if cond is None:
        raise DataError(f"condition map {path} is not a readable image")
    with Image.open(image_path) as im:
        w, h = im.size
    cw, ch = cond.size
    if abs(cw * h - w * ch) > conditions.ASPECT_TOLERANCE * max(cw * h, w * ch):
        raise DataError(f"condition map {path} is {cw}x{ch} but its image {image_path} is {w}x{h}: the aspect ratios "
                        "differ, so the two cannot be cropped alike")
    return fit(to_rgb(cond), resolution)


def training_maps(config: ControlFields, pixels: torch.Tensor) -> torch.Tensor:
    """``control_image`` [N, 3, R, R] for the N training images (``pixels`` [N, 3, R, R] in [-1, 1])."""
    config.check_control()
    kind, n, res = config.control_type, pixels.shape[0], pixels.shape[-1]
    if kind in FROM_FILES:
        paths = _RUN.get().get("paths")
        if paths is None or len(paths) != n:
            raise DataError(f"control_type {kind!r} reads its maps from files, but the trainer gave "
                            f"{'no' if paths is None else len(paths)} instance files for {n} images")
        maps = [_read_map(p, res) for p in paths]
    else:
        arr = ((pixels.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        maps = [conditions.condition(Image.fromarray(a), kind, size=res, **config.control_options) for a in arr]
    logger.info("condition maps: %d of kind %s at %dx%d", n, kind, res, res)
    return control_tensor(maps)


def batch_inputs(config: ControlFields, pipe, pixels: torch.Tensor):
    """The trainer's ``batch -> (inputs, drop_text)``: each item gets its own image's map."""
    maps = training_maps(config, pixels).to(pipe.unet.device)

    def make(batch):
        if "prior" in batch and bool((batch["prior"] >= 0).any()):
            raise DataError("control methods train without prior preservation (class images have no condition "
                            "maps): set prior_preservation = false")
        return {INPUT: maps[batch["instance"].to(maps.device)]}, None

    return make


def validation_inputs(config: ControlFields, pipe, pixels: torch.Tensor) -> dict:
    """The maps of the first ``validation_images`` training images (repeated when there are fewer)."""
    k = max(1, _RUN.get().get("validation_images", 1))
    maps = training_maps(config, pixels)
    return {INPUT: maps[torch.arange(k) % len(maps)].to(pipe.unet.device)}


def side_by_side(images: np.ndarray, given: dict) -> tuple[np.ndarray, int] | None:
    """(images with each one's condition map before it, images per row) for a validation grid, or None when
    no ``control_image`` was given. ``images``: uint8 [N, H, W, 3], N a multiple of the maps' count."""
    maps = given.get(INPUT)
    if isinstance(maps, dict):
        maps = next(iter(maps.values()), None)
    if maps is None:
        return None
    k = maps.shape[0]
    shown = (maps.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    if shown.shape[1:] != images.shape[1:]:
        shown = np.stack([np.asarray(Image.fromarray(m).resize(images.shape[2:0:-1], Image.Resampling.NEAREST))
                          for m in shown])
    pairs = np.stack([np.stack([shown[i % k], img]) for i, img in enumerate(images)])
    return pairs.reshape(-1, *images.shape[1:]), 2 * k


# ---------------------------------------------------------------- a shapes-world folder

def write_world(folder, n: int, seed: int = 0, kind: str = "mask", include_subject: bool = False, **opts) -> Path:
    """Write ``n`` shapes-world samples with captions and their exact ``kind`` maps (see the module docstring)."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} is not empty: write the world into a new folder")
    (folder / MAPS_FOLDER).mkdir(parents=True, exist_ok=True)
    for i, (image, caption, cond) in enumerate(conditions.WorldConditions(n, seed, kind,
                                                                          include_subject=include_subject, **opts)):
        image.save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(caption + "\n", encoding="utf-8")
        cond.save(folder / MAPS_FOLDER / f"{i:05d}.png")
    return folder


def _main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m peft_diffusion.training.write_world",
                                description="Write shapes-world training images, captions and condition maps.")
    p.add_argument("folder")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kind", default="mask", choices=("mask", "outline"))
    a = p.parse_args(argv)
    print(write_world(a.folder, a.n, a.seed, a.kind))
