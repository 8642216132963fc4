"""Named targets for the models users adapt, as frozen data.

Module names follow diffusers 0.42 and transformers 5.x. ``default_target(model)`` picks the preset for a
model class when a method config leaves ``target`` empty.
"""
from __future__ import annotations

from torch import nn

from .target import Target, class_names

_UNET_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
_UNET_FF = ("ff.net.0.proj", "ff.net.2")
_RESNET_CONVS = (r".*resnets\.\d+\.conv1", r".*resnets\.\d+\.conv2", r".*resnets\.\d+\.conv_shortcut")

PRESETS: dict[str, Target] = {
    # diffusers UNet2DConditionModel: self- and cross-attention projections (what diffusers' scripts train)
    "unet-attn": Target(include=_UNET_ATTN, within=("Attention",)),
    "unet-attn-ff": Target(include=_UNET_ATTN + _UNET_FF),
    # + the resnet convolutions (LoCon-style), 3x3 and 1x1, and the transformer in/out projections
    "unet-all": Target(include=_UNET_ATTN + _UNET_FF + _RESNET_CONVS + ("proj_in", "proj_out"),
                       types=("Linear", "Conv2d")),
    "unet-cross-attn": Target(include=tuple(rf".*attn2\.{m}" for m in ("to_q", "to_k", "to_v", r"to_out\.0"))),
    # DiT / PixArt-style Transformer2DModel: attention and feed-forward of every block
    "dit": Target(include=_UNET_ATTN + _UNET_FF, exclude=(r".*proj_out.*", r".*adaln.*", r".*caption_projection.*")),
    "clip-text": Target(include=("q_proj", "k_proj", "v_proj", "out_proj"), within=("CLIPEncoder",)),
    "clip-text-mlp": Target(include=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"), within=("CLIPEncoder",)),
    "clip-vision": Target(include=("q_proj", "k_proj", "v_proj", "out_proj"), within=("CLIPEncoder",)),
    # transformers CLIPModel (a VLM: text and vision towers): the attention projections of both towers
    "clip": Target(include=("q_proj", "k_proj", "v_proj", "out_proj"), within=("CLIPEncoder",)),
    "t5-encoder": Target(include=("q", "k", "v", "o"), within=("T5Attention",)),
    "bert": Target(include=("query", "key", "value", "attention.output.dense")),
    "llama": Target(include=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    "gpt2": Target(include=("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"), types=("Conv1D",)),
}

# model class name -> preset, for configs that leave ``target`` empty
DEFAULT_PRESET: dict[str, str] = {
    "UNet2DConditionModel": "unet-attn",
    "Transformer2DModel": "dit",
    "DiTTransformer2DModel": "dit",
    "PixArtTransformer2DModel": "dit",
    "CLIPTextModel": "clip-text",
    "CLIPTextModelWithProjection": "clip-text",
    "CLIPVisionModel": "clip-vision",
    "CLIPVisionModelWithProjection": "clip-vision",
    "CLIPModel": "clip",
    "T5EncoderModel": "t5-encoder",
    "BertModel": "bert",
    "LlamaModel": "llama",
    "LlamaForCausalLM": "llama",
    "GPT2Model": "gpt2",
    "GPT2LMHeadModel": "gpt2",
}


def preset(name: str) -> Target:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None


def default_target(model: nn.Module) -> Target:
    for cls in type(model).__mro__:
        if cls.__name__ in DEFAULT_PRESET:
            return PRESETS[DEFAULT_PRESET[cls.__name__]]
    raise ValueError(
        f"no default target for {type(model).__name__}: pass target=Target(...) or a preset "
        f"({', '.join(PRESETS)}); models with defaults: {', '.join(DEFAULT_PRESET)}"
    )


__all__ = ["PRESETS", "DEFAULT_PRESET", "preset", "default_target", "class_names"]
