"""Spatial control models at generation time: diffusers ``ControlNetModel`` (arXiv 2302.05543: residuals added to
the U-Net's skip connections and mid block) and ``T2IAdapter`` (arXiv 2302.08453: features added inside the
U-Net's down blocks, ``down_intrablock_additional_residuals``), several at once with a weight each, their
condition images made by ``peft_diffusion.conditions.condition`` (the preprocessing training uses).

Used by the composer pipeline (``peft_diffusion/composer.py``, ``pipelines/adapter_composer``) and by
``peft-diffusion generate --control``. Nothing here trains or saves: the models are the standard diffusers
classes the control methods save (``save_pretrained`` folders), loaded from safetensors only.

Combination rules (those of diffusers' ``MultiControlNetModel`` and ``MultiAdapter``): ControlNet residuals are
each scaled by their weight (``conditioning_scale``) and summed; T2I-Adapter features likewise
(``MultiAdapter(adapter_weights=...)``). A control's optional region ``mask`` (HxW in [0, 1], resized to each
residual's resolution with area averaging) multiplies its residuals: outside the mask the control adds nothing.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

CLASSES = ("ControlNetModel", "T2IAdapter")


@dataclasses.dataclass
class Control:
    """One spatial control of a call: ``model`` (a ``ControlNetModel`` / ``T2IAdapter`` or a folder saved with
    ``save_pretrained``), ``image`` (a PIL image, a uint8 array, or a ``shapes.Sample`` for the world's maps),
    ``weight``, ``kind`` (a ``conditions.KINDS`` name: the map made of ``image``; "none": ``image`` is the map),
    the fraction of the steps it acts in (``start``, ``end``: diffusers' ``control_guidance_start/end``) and an
    optional region ``mask`` (PIL image or HxW array; white = where the control acts)."""

    model: Any
    image: Any
    weight: float = 1.0
    kind: str = "none"
    start: float = 0.0
    end: float = 1.0
    mask: Any = None

    def __post_init__(self):
        if not isinstance(self.weight, (int, float)) or isinstance(self.weight, bool):
            raise ValueError(f"control weight must be a number, got {self.weight!r}")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ValueError(f"control start/end must satisfy 0 <= start < end <= 1, got {self.start}, {self.end}")


def as_control(spec) -> Control:
    """A ``Control`` of a ``Control``, a dict of its fields, or a tuple (model, image[, weight[, kind]])."""
    if isinstance(spec, Control):
        return spec
    if isinstance(spec, dict):
        return Control(**spec)
    if isinstance(spec, (tuple, list)) and 2 <= len(spec) <= 4:
        return Control(*spec)
    raise TypeError(f"a control is a Control, a dict or a (model, image[, weight[, kind]]) tuple, got {spec!r}")


def folder_class(folder: str | Path) -> str:
    """The diffusers class a saved model folder holds (config.json's ``_class_name``)."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"control model {folder}: no config.json (a ControlNetModel or T2IAdapter folder "
                                "saved with save_pretrained was expected)")
    name = json.loads(config.read_text()).get("_class_name")
    if name not in CLASSES:
        raise ValueError(f"control model {folder} holds a {name!r}; supported: {', '.join(CLASSES)} (give several "
                         "models as several controls, not a Multi* folder)")
    return name


def folder_key(folder) -> tuple:
    """A model folder's cache key: its path and its files' sizes and modification times."""
    folder = Path(folder).resolve()
    files = sorted(folder.glob("*.json")) + sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    return (str(folder),) + tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)


def load_model(spec):
    """A ``ControlNetModel`` / ``T2IAdapter`` object as it is, or loaded from its folder (safetensors only)."""
    import diffusers

    if isinstance(spec, (diffusers.ControlNetModel, diffusers.T2IAdapter)):
        return spec
    if not isinstance(spec, (str, Path)):
        raise TypeError(f"a control model is a ControlNetModel, a T2IAdapter or a folder, got {type(spec).__name__}")
    cls = getattr(diffusers, folder_class(spec))
    return cls.from_pretrained(str(spec), use_safetensors=True).eval().requires_grad_(False)


def kind_of(model) -> str:
    import diffusers

    return "controlnet" if isinstance(model, diffusers.ControlNetModel) else "t2i-adapter"


def check_controlnet(net, unet, vae_scale_factor: int, label: str) -> None:
    """``ValueError`` naming both sides when ``net`` was made for another U-Net or latent scale."""
    c, u = net.config, unet.config
    pairs = {"block_out_channels": (tuple(c.block_out_channels), tuple(u.block_out_channels)),
             "layers_per_block": (c.layers_per_block, u.layers_per_block),
             "cross_attention_dim": (c.cross_attention_dim, u.cross_attention_dim),
             "in_channels": (c.in_channels, u.in_channels),
             "down blocks": (len(c.down_block_types), len(u.down_block_types))}
    bad = {k: v for k, v in pairs.items() if v[0] != v[1]}
    if bad:
        ours = ", ".join(f"{k}={a}" for k, (a, _) in bad.items())
        theirs = ", ".join(f"{k}={b}" for k, (_, b) in bad.items())
        raise ValueError(f"{label} was made for another U-Net: it has {ours} but this pipeline's U-Net has {theirs}")
    factor = 2 ** (len(c.conditioning_embedding_out_channels) - 1)
    if factor != vae_scale_factor:
        raise ValueError(f"{label} downsamples its condition image {factor}x (conditioning_embedding_out_channels="
                         f"{tuple(c.conditioning_embedding_out_channels)}) but this pipeline's latents are "
                         f"{vae_scale_factor}x smaller than its images (the VAE's scale factor)")


def adapter_slots(unet, latent_hw: tuple[int, int]) -> tuple[list[tuple[int, int, int]], tuple[int, int, int]]:
    """The (channels, height, width) each U-Net down block adds a T2I-Adapter feature at, and the mid block's
    (which takes one more when the shapes agree, as SDXL's adapters do). As ``UNet2DConditionModel.forward``
    adds them: inside a cross-attention block before its downsampler, after a plain block (and its downsampler)."""
    h, w = latent_hw
    slots = []
    for block, c in zip(unet.down_blocks, unet.config.block_out_channels):
        nh, nw = (-(-h // 2), -(-w // 2)) if getattr(block, "downsamplers", None) is not None else (h, w)
        slots.append((c, h, w) if getattr(block, "has_cross_attention", False) else (c, nh, nw))
        h, w = nh, nw
    return slots, (unet.config.block_out_channels[-1], h, w)


def check_adapter_features(features, unet, latent_hw: tuple[int, int], label: str) -> None:
    """``ValueError`` naming both sides when a T2I-Adapter's features do not fit the U-Net's blocks."""
    slots, mid = adapter_slots(unet, latent_hw)
    got = [tuple(f.shape[1:]) for f in features]
    fits = all(g == e for g, e in zip(got, slots)) and (len(got) <= len(slots) or (
        len(got) == len(slots) + 1 and got[-1] == mid))
    if not fits:
        raise ValueError(f"{label} was made for another U-Net or image size: it gives features (channels, height, "
                         f"width) {got} but this pipeline's U-Net down blocks take {slots} (and its mid block {mid}); "
                         "a U-Net whose first down block has no cross-attention (SDXL, the embedded shapes-base) "
                         "takes adapter_type='full_adapter_xl'")


def channels_of(model) -> int:
    c = model.config
    return int(c.conditioning_channels if kind_of(model) == "controlnet" else c.in_channels)


def condition_tensor(control: Control, model, size: tuple[int, int]) -> torch.Tensor:
    """[1, C, H, W] in [0, 1] of the control's condition map at ``size`` = (width, height), as diffusers'
    pipelines make it of a PIL image of that size (uint8 / 255; C = the model's input channels)."""
    from .conditions import condition

    image = condition(control.image, control.kind, size=size)
    channels = channels_of(model)
    if channels not in (1, 3):
        raise ValueError(f"control model takes {channels}-channel condition images; only 1 (gray) and 3 (RGB) are "
                         "supported")
    arr = np.asarray(image.convert("L") if channels == 1 else image, dtype=np.float32) / 255.0
    arr = arr[..., None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())[None]


def mask_tensor(mask, size: tuple[int, int]) -> torch.Tensor | None:
    """A region mask as [1, 1, H, W] in [0, 1] at ``size`` = (width, height) (None: no mask)."""
    if mask is None:
        return None
    from PIL import Image

    if isinstance(mask, np.ndarray):
        if mask.ndim != 2:
            raise ValueError(f"a region mask array must be HxW, got shape {mask.shape}")
        arr = mask.astype(np.float32) / (255.0 if mask.dtype == np.uint8 else 1.0)
        mask = Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8))
    if not isinstance(mask, Image.Image):
        raise TypeError(f"a region mask is a PIL image or an HxW array, got {type(mask).__name__}")
    if mask.size != size:
        raise ValueError(f"region mask is {mask.size[0]}x{mask.size[1]} but the images are {size[0]}x{size[1]}")
    return torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)[None, None]


def masked(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return t
    return t * F.adaptive_avg_pool2d(mask.to(t.device, t.dtype), t.shape[-2:])


def keep(control: Control, i: int, n: int) -> float:
    """1.0 when step ``i`` of ``n`` lies in the control's [start, end] (diffusers' ``controlnet_keep``)."""
    return 1.0 - float(i / n < control.start or (i + 1) / n > control.end)
