"""ControlNets as diffusers folders (``config.json`` + ``diffusion_pytorch_model.safetensors``), the form
``StableDiffusionControlNetPipeline`` / ``ControlNetModel.from_pretrained`` take, both ways.

``save_controlnet(pipe, folder, name)``: the adapter's ``ControlNetModel`` written with ``save_pretrained``
(safetensors), atomically (a temporary sibling folder renamed into place). A ControlNet-LoRA is written with
its LoRA merged into a full copy (the copy's buffers plus B A, as one ControlNetModel), so stock diffusers
runs it too.
``load_controlnet(pipe, folder, name)``: a diffusers-made ControlNet folder as adapter ``name`` (safetensors
only: no pickled ``.bin``). Its architecture is checked against the U-Net's before anything changes: a folder
for another U-Net is refused naming each setting that differs, with both values.
"""
from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from ..io.files import write_folder
from .controlnet import ControlNet, ControlNetDelta, adapter_dtype

# ControlNetModel settings that ``from_unet`` copies from the U-Net: a folder must agree with the base on each
ARCH = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
        "attention_head_dim", "num_attention_heads", "transformer_layers_per_block", "use_linear_projection",
        "only_cross_attention", "mid_block_type", "norm_num_groups", "class_embed_type", "num_class_embeds",
        "addition_embed_type", "encoder_hid_dim", "encoder_hid_dim_type", "upcast_attention",
        "resnet_time_scale_shift", "projection_class_embeddings_input_dim", "flip_sin_to_cos", "freq_shift")


def _unet_of(obj) -> nn.Module:
    from ..api import DENOISERS, modules_of

    mods = modules_of(obj)
    model = mods.get("") or next((mods[n] for n in DENOISERS if n in mods), None)
    if model is None:
        raise ValueError(f"{type(obj).__name__} has no U-Net")
    return model


def controlnet_of(obj, name: str = "default") -> nn.Module:
    """The live ``ControlNetModel`` of ControlNet adapter ``name`` in a pipeline or U-Net."""
    site = getattr(_unet_of(obj), "peft_annex", None)
    delta = site.deltas[name] if site is not None and name in site.deltas else None
    if not isinstance(delta, ControlNetDelta):
        found = [n for n, d in (site.deltas.items() if site is not None else ()) if isinstance(d, ControlNetDelta)]
        raise ValueError(f"no ControlNet adapter named {name!r} on this U-Net; ControlNet adapters: {found}")
    return delta.controlnet


def _plain_copy(model: nn.Module) -> nn.Module:
    """A ControlNet-LoRA's copy as a plain ControlNetModel: its buffers as parameters, each LoRA merged in."""
    from diffusers import ControlNetModel

    from ..api import hosts

    tensors = {k: t for k, t in [*model.named_parameters(), *model.named_buffers()] if ".deltas." not in k}
    for site, host in hosts(model):
        for p in ("weight", "bias"):
            t = tensors.pop(f"{site}.base.{p}", None)
            if t is not None:
                tensors[f"{site}.{p}"] = t
        w = host.base.weight.detach().clone()
        for n, delta in host.deltas.items():
            if n in host.active and n not in host.merged:
                w += (delta.delta_weight().float() * host.active[n]).to(w.dtype)
        tensors[f"{site}.weight"] = w
    plain = ControlNetModel.from_config(model.config)
    plain.load_state_dict({k: t.detach() for k, t in tensors.items()})
    return plain


def save_controlnet(obj, folder: str | os.PathLike, name: str = "default") -> Path:
    """Write ControlNet adapter ``name`` as a diffusers folder (``save_pretrained``, safetensors), atomically."""
    model = controlnet_of(obj, name)
    if any(".deltas." in k for k in model.state_dict()):
        model = _plain_copy(model)
    return write_folder(folder, lambda tmp: model.save_pretrained(tmp, safe_serialization=True))


def _mismatch(cn_config, unet_config) -> list[str]:
    out = []
    for key in ARCH:
        if key not in cn_config and key not in unet_config:
            continue
        a, b = cn_config.get(key), unet_config.get(key)
        norm = (lambda v: list(v) if isinstance(v, (tuple, list)) else v)
        if key == "num_attention_heads":  # None means "same as attention_head_dim" on both sides
            a = a or cn_config.get("attention_head_dim")
            b = b or unet_config.get("attention_head_dim")
        if key == "transformer_layers_per_block" and isinstance(a, int) and isinstance(b, (list, tuple)):
            a = [a] * len(b)
        if key == "transformer_layers_per_block" and isinstance(b, int) and isinstance(a, (list, tuple)):
            b = [b] * len(a)
        if norm(a) != norm(b):
            out.append(f"{key}: ControlNet {norm(a)} vs U-Net {norm(b)}")
    return out


def load_controlnet(obj, folder: str | os.PathLike, name: str = "default", scale: float = 1.0,
                    trainable: bool = False) -> str:
    """Load a diffusers ControlNet folder into ``obj`` (a pipeline or U-Net) as adapter ``name``."""
    from diffusers import ControlNetModel

    from ..api import inject, remove

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a diffusers ControlNet folder (no config.json)")
    if not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"{folder} holds no safetensors weights (pickled .bin files are not loaded)")
    config = ControlNetModel.load_config(folder)
    if config.get("_class_name") not in (None, "ControlNetModel"):
        raise ValueError(f"{folder} holds a {config.get('_class_name')}, not a ControlNetModel")
    unet = _unet_of(obj)
    bad = _mismatch(config, dict(unet.config))
    if bad:
        raise ValueError(f"{folder} is a ControlNet for another U-Net than this {type(unet).__name__}: "
                         + "; ".join(bad))
    cn = ControlNetModel.from_pretrained(folder, use_safetensors=True)
    method = ControlNet(embedding_channels=tuple(cn.config.conditioning_embedding_out_channels),
                        conditioning_channels=cn.config.conditioning_channels,
                        channel_order=cn.config.controlnet_conditioning_channel_order)
    ref = next(unet.parameters())
    cn = cn.to(ref.device, adapter_dtype(ref)).train(unet.training)
    unet_like = obj if not isinstance(obj, nn.Module) else unet
    inject(unet_like, method, name, freeze=False)  # builds the copy; then the folder's model takes its place
    delta = _unet_of(obj).peft_annex.deltas[name]
    if delta.controlnet.state_dict().keys() != cn.state_dict().keys():
        remove(unet_like, name)
        raise ValueError(f"{folder}: its ControlNetModel's tensors differ from the copy of this U-Net")
    delta.controlnet = cn
    cn.requires_grad_(trainable)
    site = _unet_of(obj).peft_annex
    site.active[name] = float(scale)
    return name


__all__ = ["controlnet_of", "save_controlnet", "load_controlnet"]
