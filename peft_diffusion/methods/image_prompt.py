"""The user side of IP-Adapter (``ip_adapter.py``): image prompts from PIL images through a CLIP image encoder
(``image_prompt`` / ``encode_image_prompt``) and lambda per layer / block (``set_ip_adapter_scale``).
"""
from __future__ import annotations

import contextlib

import torch

from .ip_adapter import INPUTS, ImageProjectionDelta, IPAdapter, IPAttentionDelta, encoder_width


def set_ip_adapter_scale(obj, scale, name: str | None = None) -> None:
    """lambda per cross-attention of the IP-Adapter ``name`` (default: every one) in ``obj`` (a pipeline or
    U-Net): a float, or diffusers' InstantStyle dict ({"down": {"block_2": [0.0, 1.0]}, "up": {...}, "mid": s};
    the blocks it leaves out get 0.0, as ``pipe.set_ip_adapter_scale`` does). Sets the adapter's site weights."""
    from ..api import modules_of, placed

    mods = modules_of(obj)
    unet = mods.get("unet", mods.get(""))
    if unet is None:
        raise ValueError(f"set_ip_adapter_scale: no U-Net in {type(obj).__name__} (components: {sorted(mods)})")
    if isinstance(scale, dict):
        from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales

        scale = _maybe_expand_lora_scales(unet, [scale], default_scale=0.0)[0]
    found = False
    for qname, site, _, _ in placed(unet):
        for n, delta in site.deltas.items():
            if isinstance(delta, IPAttentionDelta) and (name is None or n == name) and n in site.active:
                found = True
                if not isinstance(scale, dict):
                    site.active[n] = float(scale)
                for prefix, s in (scale.items() if isinstance(scale, dict) else ()):
                    if qname.startswith(prefix):
                        site.active[n] = float(s)
    if not found:
        raise ValueError(f"set_ip_adapter_scale: no active IP-Adapter{' ' + repr(name) if name else ''} in the U-Net")


def _ip_configs(obj) -> list[IPAdapter]:
    from ..api import sites

    return list({id(d.config): d.config for _, s in sites(obj) for d in s.deltas.values()
                 if isinstance(d, ImageProjectionDelta)}.values())


@torch.no_grad()
def encode_image_prompt(obj, images, image_encoder=None, feature_extractor=None, negative: bool = True) -> dict:
    """The per-call inputs of ``obj``'s IP-Adapters for ``images`` (PIL images, or pixel values [B, 3, H, W]):
    CLIP image embeddings (and patch features for plus adapters), with the negatives diffusers' pipelines use
    (zeros; the encoder's features of a black image for plus) unless ``negative=False``."""
    configs = _ip_configs(obj)
    if not configs:
        raise ValueError(f"image_prompt: {type(obj).__name__} holds no IP-Adapter")
    encoder = image_encoder if image_encoder is not None else getattr(obj, "image_encoder", None)
    if encoder is None:
        raise ValueError(f"image_prompt: no image encoder: {type(obj).__name__}.image_encoder is None and none was "
                         "given (pass image_encoder=CLIPVisionModelWithProjection, the IP-Adapter's encoder)")
    if torch.is_tensor(images) and images.ndim == 4:
        pixels = images
    else:
        processor = feature_extractor or getattr(obj, "feature_extractor", None)
        if processor is None:
            from transformers import CLIPImageProcessor

            size = encoder.config.image_size
            processor = CLIPImageProcessor(size=size, crop_size=size)
        pixels = processor(images, return_tensors="pt").pixel_values
    p = next(encoder.parameters())
    pixels = pixels.to(p.device, p.dtype)
    out = {}
    for plus in sorted({c.plus for c in configs}):
        for c in configs:
            if c.plus == plus and c.image_embed_dim != encoder_width(encoder, plus):
                raise ValueError(f"image_prompt: an IP-Adapter takes {c.image_embed_dim}-wide image features but "
                                 f"{type(encoder).__name__} gives {encoder_width(encoder, plus)}-wide ones")
        pos_name, neg_name = INPUTS[plus]
        if plus:
            out[pos_name] = encoder(pixels, output_hidden_states=True).hidden_states[-2]
            if negative:
                out[neg_name] = encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
        else:
            out[pos_name] = encoder(pixels).image_embeds
            if negative:
                out[neg_name] = torch.zeros_like(out[pos_name])
    return out


@contextlib.contextmanager
def image_prompt(obj, images, image_encoder=None, feature_extractor=None, negative: bool = True):
    """``with pd.image_prompt(pipe, image): pipe(prompt)``: the IP-Adapters of ``pipe`` see ``image`` in every
    call inside the block (see ``encode_image_prompt``)."""
    from ..api import inputs

    with inputs(obj, **encode_image_prompt(obj, images, image_encoder, feature_extractor, negative)):
        yield obj
