"""ControlNeXt — Peng et al., "ControlNeXt: Powerful and Efficient Control for Image and Video Generation",
arXiv 2408.06070.

No copy of the U-Net: a light convolutional module E (here: strided convolutions with GroupNorm + ReLU, diffusers
``ResnetBlock2D`` + ``Downsample2D`` stages on its own timestep embedding, a residual conv pair and a 1x1 output
conv, the layout of the authors' SD1.5 release) turns the condition c into features x_c, which join the U-Net's
features x_m once, after one block (``block``, default ``down_blocks.0`` as in the authors' SD1.5 code), through
Cross Normalisation (Sec. 3.2): x_c is pooled to x_m's size and given x_m's statistics,

    x_c' = (x_c - mu_c) / sigma_c * sigma_m + mu_m,   x_m <- x_m + s * g * x_c',

mu / sigma over each sample's (C, H, W). s is the adapter's weight (the control scale, ``pd.set_adapters``).
The paper's design has no zero-initialised path (Cross Normalisation replaces zero convolutions so the control
acts from the first step): with ``gate=False`` (the default, the paper) g = 1 is fixed and the model differs
from the base as soon as a condition is given. ``gate=True`` adds a trainable scalar g initialised at 0: the
base's output exactly at init (a zero scalar, not a zero convolution: g receives a gradient at once and E from
the first step g moves). With ``lora`` this package's LoRA goes on the U-Net's ``lora_target`` layers too
(default preset ``unet-attn``), as the paper trains ControlNeXt with a small part of the base.

Sites: E in an annex on the U-Net itself (its pre-hook reads this call's ``control_image``, see
``control_image.py``, and the timestep), g in an annex on ``block`` (its post-hook adds the normalised
features), LoRA in Hosts. The control features use E's own timestep embedding (128 -> 256, as the authors').
Trained: E, g (with ``gate``), LoRA (with ``lora``). Saved natively: ``controlnext.*`` on the U-Net's site,
``gain`` on the block's (a buffer with ``gate=False``), ``lora_A`` / ``lora_B``. Not mergeable (E depends on the
call's condition); the LoRA part alone fuses.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core import AnnexDelta
from ..presets import preset
from ..registry import register_method
from ..target import Target
from .control_image import ControlFields, call_kwargs, control_tensor, given_condition
from .controlnet import adapter_dtype, embedding_for, vae_factor
from .lora import LoRA, LoRADelta

EPS = 1e-12  # the authors' SD1.5 code


class _Call:
    """What the U-Net's annex hands to the block's annex of the same adapter in one call."""
    features: torch.Tensor | None = None


class ConditionModule(nn.Module):
    """E: condition image [B, C, H, W] in [0, 1] + timestep -> features with ``out_channels`` channels."""

    def __init__(self, cfg: "ControlNeXt", out_channels: int):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps
        from diffusers.models.resnet import Downsample2D, ResnetBlock2D

        self.time_proj = Timesteps(cfg.time_channels, True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(cfg.time_channels, cfg.time_embed_dim)
        layers, c_in = [], cfg.conditioning_channels
        for i, c in enumerate(cfg.embedding_channels):
            layers += [nn.Conv2d(c_in, c, 3, stride=2 if i == 0 else 1, padding=1), nn.GroupNorm(2, c), nn.ReLU()]
            c_in = c
        self.embedding = nn.Sequential(*layers)
        self.down_res, self.down_sample = nn.ModuleList(), nn.ModuleList()
        for c, g in zip(cfg.channels, cfg.groups):
            self.down_res.append(ResnetBlock2D(in_channels=c_in, out_channels=c, temb_channels=cfg.time_embed_dim,
                                               groups=g))
            self.down_sample.append(Downsample2D(c, use_conv=True, out_channels=c, padding=1, name="op"))
            c_in = c
        g = cfg.groups[-1]
        self.mid = nn.Sequential(nn.Conv2d(c_in, c_in, 3, padding=1), nn.ReLU(), nn.GroupNorm(g, c_in),
                                 nn.Conv2d(c_in, c_in, 3, padding=1), nn.GroupNorm(g, c_in))
        self.out = nn.Conv2d(c_in, out_channels, 1)

    def forward(self, cond: torch.Tensor, timestep) -> torch.Tensor:
        t = timestep if torch.is_tensor(timestep) else torch.tensor([timestep], device=cond.device)
        t = t.reshape(-1).to(cond.device).expand(cond.shape[0]) if t.numel() == 1 else t.to(cond.device)
        emb = self.time_embedding(self.time_proj(t).to(cond.dtype))
        x = self.embedding(cond)
        for res, down in zip(self.down_res, self.down_sample):
            x = down(res(x, emb))
        return self.out(self.mid(x) + x)


def _ints(v, what: str) -> tuple[int, ...]:
    out = tuple(v)
    if not out or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in out):
        raise ValueError(f"ControlNeXt {what} must be positive ints, got {v!r}")
    return out


@register_method("controlnext")
@dataclasses.dataclass
class ControlNeXt(ControlFields, LoRA):
    """block: the U-Net module whose output takes the control; embedding_channels / channels / groups /
    time_channels / time_embed_dim: E's sizes (defaults: the authors' SD1.5 module); gate: a zero-initialised
    trainable gain (identity at init); lora: LoRA (r, alpha...) on ``lora_target`` of the U-Net too;
    downscale: pixel / latent factor (None: the pipeline VAE's, else 8), which sizes the expected condition;
    control_type / control_options: the condition the trainer and ``generate`` make (``ControlFields``)."""

    category: ClassVar[str] = "additive"
    site_kind: ClassVar[str] = "annex"
    param_names: ClassVar[tuple[str, ...]] = ("controlnext.", "gain") + LoRA.param_names

    r: int = 4
    block: str = "down_blocks.0"
    embedding_channels: tuple[int, ...] = (64, 128)
    channels: tuple[int, ...] = (128, 256)
    groups: tuple[int, ...] = (4, 8)
    time_channels: int = 128
    time_embed_dim: int = 256
    conditioning_channels: int = 3
    gate: bool = False
    lora: bool = False
    lora_target: Target | str | None = None
    downscale: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.target is not None:
            raise ValueError(f"ControlNeXt takes block (the control module's place) and lora_target (the LoRA "
                             f"layers), not target; got target {self.target}")
        self.check_control()
        self.embedding_channels = _ints(self.embedding_channels, "embedding_channels")
        self.channels, self.groups = _ints(self.channels, "channels"), _ints(self.groups, "groups")
        if len(self.groups) != len(self.channels) or any(c % g for c, g in zip(self.channels, self.groups)):
            raise ValueError(f"ControlNeXt groups {self.groups} must divide channels {self.channels} one by one")
        if isinstance(self.lora_target, str):
            self.lora_target = preset(self.lora_target)
        elif isinstance(self.lora_target, dict):
            self.lora_target = Target.from_dict(self.lora_target)
        for f in ("gate", "lora"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"ControlNeXt {f} must be True or False, got {getattr(self, f)!r}")
        if self.downscale is not None:
            embedding_for(self.downscale)

    def resolved(self, model: nn.Module):
        return self

    def bind(self, obj, model: nn.Module, name: str):
        found = vae_factor(obj)
        if found is not None and self.downscale is not None and found != self.downscale:
            raise ValueError(f"ControlNeXt {name!r}: downscale {self.downscale} but the pipeline's VAE scales by {found}")
        bound = dataclasses.replace(self, downscale=self.downscale or found or 8)
        bound._call = _Call()
        return bound

    def select(self, model: nn.Module) -> list[str]:
        try:
            block = model.get_submodule(self.block)
        except AttributeError:
            raise ValueError(f"ControlNeXt block {self.block!r} is not a module of {type(model).__name__}") from None
        if not hasattr(block, "resnets"):
            raise ValueError(f"ControlNeXt block {self.block!r} is a {type(block).__name__}: pick a U-Net block with "
                             "ResNet layers (down_blocks.<i>, mid_block, up_blocks.<i>)")
        lora = (self.lora_target or preset("unet-attn")).select(model) if self.lora else []
        return ["", self.block] + lora

    def kind_of(self, model: nn.Module, site: str) -> str:
        return "annex" if site in ("", self.block) else "host"

    def build(self, base: nn.Module, site: str, init: bool = True):
        if not hasattr(self, "_call"):
            self._call = _Call()
        if site == "":
            return ControlNeXtDelta(self, site, base, init)
        if site == self.block:
            return GainDelta(self, site, base, init)
        delta = LoRADelta(self, site, base, init)
        delta.category = self.category
        return delta


class ControlNeXtDelta(AnnexDelta):
    """E beside the U-Net: its pre-hook computes this call's control features (None: no condition)."""

    category = "additive"

    def __init__(self, config: ControlNeXt, site: str, unet: nn.Module, init: bool = True):
        super().__init__(config, site)
        self.adapter = ""
        block = unet.get_submodule(config.block)
        ref = next(unet.parameters())
        with torch.device(ref.device if init else "meta"):
            self.controlnext = ConditionModule(config, block.resnets[-1].out_channels).to(adapter_dtype(ref))

    def attach(self, site) -> None:
        self.adapter = next(n for n, d in site.deltas.items() if d is self)

    def pre(self, unet, args, kwargs, weight):
        call = self.config._call
        # kept until the next U-Net call, not cleared after this one: gradient checkpointing may re-run the block
        call.features = None
        kwargs = call_kwargs(unet, args, kwargs)
        value = given_condition(unet, kwargs)
        if value is None or weight == 0:
            return None
        sample, f = kwargs["sample"], self.config.downscale
        ref = next(self.controlnext.parameters())
        cond = control_tensor(value, self.adapter, sample.shape[0], (sample.shape[-1] * f, sample.shape[-2] * f),
                              self.config.conditioning_channels, ref.device, ref.dtype)
        if cond is not None:
            call.features = self.controlnext(cond, kwargs["timestep"])
        return None


class GainDelta(AnnexDelta):
    """g beside the block: its post-hook adds s * g * CrossNorm(features) to the block's output sample."""

    category = "additive"

    def __init__(self, config: ControlNeXt, site: str, block: nn.Module, init: bool = True):
        super().__init__(config, site)
        ref = next(block.parameters())
        kw = dict(device=ref.device if init else "meta", dtype=adapter_dtype(ref))
        if config.gate:
            self.gain = nn.Parameter(torch.zeros((), **kw))
        else:
            self.register_buffer("gain", torch.ones((), **kw))

    def post(self, block, args, kwargs, output, weight):
        feats = self.config._call.features
        if feats is None or weight == 0:
            return None
        h = output[0] if isinstance(output, tuple) else output
        c = F.adaptive_avg_pool2d(feats.float(), h.shape[-2:])
        m = h.float()
        mu_m, sd_m = m.mean((1, 2, 3), keepdim=True), m.std((1, 2, 3), keepdim=True)
        mu_c, sd_c = c.mean((1, 2, 3), keepdim=True), c.std((1, 2, 3), keepdim=True)
        c = (c - mu_c) * (sd_m / (sd_c + EPS)) + mu_m
        new = h + (weight * self.gain.float() * c).to(h.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new
