"""The per-call spatial condition of the control methods (ControlNet, ControlNet-LoRA, ControlNeXt).

Name: ``control_image``, given with ``pd.inputs(pipe, control_image=...)``: a tensor [B, C, H, W] (or
[C, H, W]) of floats in [0, 1] at pixel size, as diffusers' pipelines feed ``ControlNetModel`` (their control
image processor: RGB, no normalisation); a PIL image or a list of them (any mode: converted to RGB with alpha
composited on white, resized to the pixel size when the aspect ratio agrees, as ``conditions.condition``
does); or a dict {adapter name: one of those} when several control adapters run in one call (an adapter
missing from the dict gets no condition; without one the adapter leaves the U-Net as it is). The same
name and forms as the T2I-Adapter's (``training/condition_inputs.py`` gives them in training).

The batch is lined up with the U-Net's (``fit_batch``: classifier-free guidance's two halves get the same
condition, as ``StableDiffusionControlNetPipeline`` concatenates it). ``fit_batch`` tiles: U-Net item i gets
condition i % B. With several prompts, several conditions and ``num_images_per_prompt`` > 1, diffusers repeats
each condition per image instead (``repeat_interleave``): give the conditions already repeated that way. A condition of the wrong size, channel
count, dtype or value range is refused with both sides named, before anything runs.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..core import fit_batch, lookup

NAME = "control_image"


@dataclasses.dataclass
class ControlFields:
    """The fields every control method's config has (a mixin: list it before ``MethodConfig``): the condition
    the trainer makes from its images (``training/condition_inputs.py``) and ``generate`` from a user's image,
    ``control_type`` a ``conditions.KINDS`` name and ``control_options`` that kind's options."""

    control_type: str = "mask"
    control_options: dict = dataclasses.field(default_factory=dict)

    def check_control(self) -> None:
        from .. import conditions

        if self.control_type not in conditions.KINDS:
            raise ValueError(f"control_type must be one of {', '.join(conditions.KINDS)}, got {self.control_type!r}")
        if not isinstance(self.control_options, dict):
            raise ValueError(f"control_options must be a table of {self.control_type!r}'s options, "
                             f"got {type(self.control_options).__name__}")
        conditions._options(self.control_type, dict(self.control_options))  # unknown options: a clear error


def control_input(model: torch.nn.Module, adapter: str | None = None):
    """This call's ``control_image`` tensor for ``adapter`` (the value, or its entry in a dict), None when none
    is given; a ValueError names what is wrong with a value of the wrong type or shape (the T2I-Adapter's
    reader: tensors only)."""
    value = lookup(NAME, model, None)
    if isinstance(value, dict):
        value = value.get(adapter)
    if value is None:
        return None
    if not torch.is_tensor(value) or value.ndim != 4 or value.shape[1] not in (1, 3) or not value.is_floating_point():
        shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
        raise ValueError(f"{NAME} must be a float tensor [B, 3, H, W] (or [B, 1, H, W]) with values in [0, 1] "
                         f"(condition maps via training.condition_inputs.control_tensor), got {shape}")
    return value


def _from_pil(images, size: tuple[int, int], channels: int) -> torch.Tensor:
    from ..conditions import _fit, to_rgb

    if channels != 3:
        raise ValueError(f"a PIL control image gives 3 channels but this adapter takes {channels}: pass a tensor")
    arrays = [np.asarray(_fit(to_rgb(im), size), dtype=np.float32) / 255.0 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def control_tensor(value, adapter: str, batch: int, size: tuple[int, int], channels: int, device, dtype,
                   what: str = NAME) -> torch.Tensor | None:
    """``value`` (see the module docstring) as a [batch, channels, H, W] tensor for adapter ``adapter``; ``size``
    is (width, height) in pixels. None when it holds no condition for this adapter."""
    from PIL import Image

    if isinstance(value, dict):
        value = value.get(adapter)
        what = f"{what}[{adapter!r}]"
    if value is None:
        return None
    if isinstance(value, Image.Image) or (isinstance(value, (list, tuple)) and value
                                          and all(isinstance(v, Image.Image) for v in value)):
        value = _from_pil([value] if isinstance(value, Image.Image) else value, size, channels)
    if not torch.is_tensor(value):
        raise TypeError(f"{what} must be a tensor [B, {channels}, H, W] in [0, 1], a PIL image or a list of them, "
                        f"got {type(value).__name__}")
    if value.ndim == 3:
        value = value.unsqueeze(0)
    w, h = size
    if value.ndim != 4 or value.shape[1] != channels:
        raise ValueError(f"{what} has shape {tuple(value.shape)}; this adapter takes [B, {channels}, {h}, {w}]")
    if tuple(value.shape[-2:]) != (h, w):
        raise ValueError(f"{what} is {value.shape[-1]}x{value.shape[-2]} pixels but this call's latents need a "
                         f"{w}x{h} condition (latent size x the condition embedding's downscale): resize it to the "
                         "generated image's size")
    if not value.is_floating_point():
        raise ValueError(f"{what} holds {value.dtype} values; it must be floats in [0, 1] (divide 0-255 images "
                         "by 255)")
    lo, hi = (float(v) for v in torch.aminmax(value.detach()))  # one pass, one device sync
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"{what} spans [{lo:.3g}, {hi:.3g}]; a control image holds values in [0, 1] (as diffusers' "
                         "control image processor gives: not normalised to [-1, 1], not 0-255)")
    return fit_batch(value.to(device, dtype), batch)


def given_condition(module, kwargs: dict):
    """This call's ``control_image`` (``pd.inputs``), None when none is given."""
    return lookup(NAME, module, None)


def call_kwargs(module, args: tuple, kwargs: dict) -> dict:
    """The module's call as keyword arguments only (positional ones named by its forward's signature)."""
    if not args:
        return dict(kwargs)
    import inspect

    names = [n for n in inspect.signature(module.forward).parameters]
    return {**dict(zip(names, args)), **kwargs}
