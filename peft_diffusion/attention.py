"""Choosing diffusers' attention processors for every attention layer of a pipeline or model, in one call.

    pd.set_attention(pipe, "sdpa")                    # torch scaled_dot_product_attention (the default)
    pd.set_attention(pipe, "xformers")                # xformers' memory-efficient kernel, when installed
    pd.set_attention(pipe, "sliced", slice_size=1)    # attention in slices of heads, for low memory
    pd.set_attention(pipe, "classic")                 # diffusers' plain bmm + softmax processor

The processors are diffusers' own (``AttnProcessor2_0``, ``XFormersAttnProcessor``, ``SlicedAttnProcessor``,
``AttnProcessor``, and their ``AddedKV`` versions for layers with added key/value projections), set on every
``diffusers.models.attention_processor.Attention`` layer of every component (U-Net, VAE, transformer, and
modules inside adapter annexes alike).

Why adapters keep working under any processor, ours or set by diffusers' own setters
(``unet.set_attn_processor``, ``pipe.enable_attention_slicing``, ``set_default_attn_processor``): a processor
is code that calls the layer's submodules (``attn.to_q(x)``, ``attn.to_out[0](h)``, ``attn.group_norm``...).
A ``Host`` *is* such a submodule, an ``Annex`` runs from hooks on a module's call, and a ``ParamSite`` from
hooks on its owner's call, so every processor runs them; none of them reads or sets ``attn.processor``, and
removing an adapter leaves the processor the user set.

Slicing (``slice_size``): the query/key/value rows of (batch x heads) are processed ``slice_size`` at a time;
``"auto"`` = half of each layer's heads (diffusers' default), ``"max"`` = one at a time, or a positive int.
It lowers the peak of inference; a training step keeps every slice's attention probabilities for the
backward pass, so it saves little there (``bench/attention_memory.py`` measures it).

Errors name what is wrong and leave every processor as it was: an unknown kind, a bad slice size, xformers not
installed (``pip install peft-diffusion[xformers]``) or no CUDA for it, a layer whose processor is not one of
the default family (diffusers' IP-Adapter or Custom Diffusion processors hold weights that a swap would drop:
use diffusers' setters for those), a layer whose ``scale_qk`` is off (SDPA would ignore its scale).
"""
from __future__ import annotations

import logging

from torch import nn

from .api import modules_of

logger = logging.getLogger(__name__)

__all__ = ["KINDS", "set_attention", "attention_kinds"]

KINDS = ("sdpa", "xformers", "sliced", "classic")
XFORMERS_HINT = "pip install peft-diffusion[xformers]"


def _families():
    """(plain, added-kv) processor classes by kind, and the kind of each known processor class."""
    from diffusers.models import attention_processor as ap

    plain = {"sdpa": ap.AttnProcessor2_0, "xformers": ap.XFormersAttnProcessor, "sliced": ap.SlicedAttnProcessor,
             "classic": ap.AttnProcessor}
    added = {"sdpa": ap.AttnAddedKVProcessor2_0, "xformers": ap.XFormersAttnAddedKVProcessor,
             "sliced": ap.SlicedAttnAddedKVProcessor, "classic": ap.AttnAddedKVProcessor}
    kind_of = {cls: k for table in (plain, added) for k, cls in table.items()}
    return plain, added, kind_of


def attention_layers(obj) -> list[tuple[str, nn.Module]]:
    """(qualified name, layer) of every diffusers ``Attention`` layer of a model or of every pipeline component."""
    from diffusers.models.attention_processor import Attention

    out = []
    for comp, model in modules_of(obj).items():
        for name, module in model.named_modules():
            if isinstance(module, Attention):
                out.append((f"{comp}.{name}" if comp and name else comp or name, module))
    return out


def attention_kinds(obj) -> dict[str, str]:
    """{qualified layer name: "sdpa" | "xformers" | "sliced" | "classic", or the processor's class name when it is
    not one of these} for every diffusers attention layer of ``obj``."""
    _, _, kind_of = _families()
    return {name: kind_of.get(type(layer.processor), type(layer.processor).__name__)
            for name, layer in attention_layers(obj)}


def _check_slice_size(slice_size) -> None:
    if slice_size in ("auto", "max"):
        return
    if isinstance(slice_size, bool) or not isinstance(slice_size, int) or slice_size < 1:
        raise ValueError(f"slice_size must be 'auto', 'max' or a positive int, got {slice_size!r}")


def _check_xformers() -> None:
    import torch
    from diffusers.utils import is_xformers_available

    if not is_xformers_available():
        raise ImportError(f"attention 'xformers' needs the xformers package, which is not installed: {XFORMERS_HINT}")
    if not torch.cuda.is_available():
        raise RuntimeError("attention 'xformers' runs on CUDA only and no CUDA device is available; "
                           "use 'sdpa' (the default) or 'sliced' on this machine")


def set_attention(obj, kind: str = "sdpa", *, slice_size: int | str = "auto", attention_op=None):
    """Set the attention processor ``kind`` on every diffusers attention layer of ``obj`` (a model or a
    pipeline); returns ``obj``. ``slice_size`` applies to "sliced", ``attention_op`` (an xformers op) to
    "xformers". Every layer is checked before any is changed."""
    if kind not in KINDS:
        raise ValueError(f"unknown attention kind {kind!r}; supported: {', '.join(KINDS)}")
    if kind == "sliced":
        _check_slice_size(slice_size)
    layers = attention_layers(obj)
    if not layers:
        raise ValueError(f"{type(obj).__name__} has no diffusers attention layer to set a processor on")
    plain, added, kind_of = _families()
    foreign = [f"{name} ({type(layer.processor).__name__})" for name, layer in layers
               if type(layer.processor) not in kind_of]
    if foreign:
        raise ValueError(f"set_attention swaps only diffusers' default processors (one of {', '.join(KINDS)}); "
                         f"{len(foreign)} layer(s) use others whose state a swap would drop, e.g. "
                         f"{', '.join(foreign[:3])}. Use diffusers' own setters for those models.")
    if kind == "sdpa":
        unscaled = [name for name, layer in layers if not layer.scale_qk]
        if unscaled:
            raise ValueError(f"attention 'sdpa' ignores the layer scale, and {len(unscaled)} layer(s) have "
                             f"scale_qk=False, e.g. {', '.join(unscaled[:3])}; use 'classic' or 'sliced'")
    if kind == "xformers":
        _check_xformers()
    for _, layer in layers:
        cls = (added if layer.added_kv_proj_dim is not None else plain)[kind]
        if kind == "sliced":
            size = {"auto": max(1, layer.sliceable_head_dim // 2), "max": 1}.get(slice_size, slice_size)
            processor = cls(size)
        elif kind == "xformers":
            processor = cls(attention_op=attention_op)
        else:
            processor = cls()
        layer.set_processor(processor)
    logger.info("attention %r set on %d layer(s)", kind, len(layers))
    return obj
