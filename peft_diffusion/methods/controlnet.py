"""ControlNet — Zhang, Rao, Agrawala, "Adding Conditional Control to Text-to-Image Diffusion Models",
arXiv 2302.05543.

Eq. (2): y_c = F(x; Theta) + Z(F(x + Z(c; Theta_z1); Theta_c); Theta_z2): a trainable copy Theta_c of the
U-Net's encoder (conv_in, time embedding, down blocks, mid block) reads the latent plus the embedded condition
c, and zero convolutions Z (1x1, weights and biases 0) add its block outputs to the frozen U-Net's skip
connections and mid block. The copy is diffusers' ``ControlNetModel.from_unet(unet)``; its output goes in as
``down_block_additional_residuals`` / ``mid_block_additional_residual``, exactly as
``StableDiffusionControlNetPipeline`` calls the two models (same inputs, residuals times the conditioning
scale). Here the copy sits in an annex on the U-Net itself: a pre-hook runs it on this call's
``control_image`` (``control_image.py``) and hands the residuals to the U-Net, added to any already given
(several ControlNets sum, as diffusers' ``MultiControlNetModel`` does). The conditioning scale is the
adapter's weight (``pd.set_adapters(pipe, {"edges": 0.8, "depth": 0.5})``).

Condition embedding (the paper's E: 4x4 stride-2 convolutions mapping 512 px to 64 x 64 latents; diffusers'
``ControlNetConditioningEmbedding``: conv_in, then per entry of ``conditioning_embedding_out_channels`` after
the first a 3x3 conv and a 3x3 stride-2 conv, then a zero conv_out): its downscale is 2^(entries - 1), which
must equal the VAE's factor. ``embedding_channels`` defaults to diffusers' (16, 32, 96, 256) cut to
log2(downscale) + 1 entries: SD's factor 8 keeps all four; the embedded shapes base (32 px images, factor-2
VAE, 16 x 16 latents) gets (16, 32): 32 px -> 16 x 16, 32 channels = the U-Net's block_out_channels[0].
``downscale`` is read from the pipeline's VAE (2^(len(vae.config.block_out_channels) - 1), as diffusers'
pipelines compute ``vae_scale_factor``); for a lone U-Net it is given, or follows ``embedding_channels``, or is 8.

Not supported (diffusers' pipeline options): guess mode, control_guidance_start / end, global pooling.
Trained: the whole copy, the condition embedding and the zero convolutions. Saved: natively (``save_adapter``,
keys ``controlnet.<ControlNetModel key>`` on the U-Net's site) and as a diffusers folder
(``controlnet_files.save_controlnet``: ``save_pretrained``, which ``StableDiffusionControlNetPipeline`` runs);
``load_controlnet`` takes a diffusers-made folder. Identity at init (zero convolutions). Not mergeable (a
second network). SD1.5: 361,279,120 trainable parameters (tests/test_controlnet.py).
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import nn

from ..config import MethodConfig
from ..core import AnnexDelta
from ..registry import register_method
from .control_image import ControlFields, call_kwargs, control_tensor, given_condition

DIFFUSERS_CHANNELS = (16, 32, 96, 256)  # ControlNetModel's default conditioning_embedding_out_channels
UNET_INPUTS = ("class_labels", "timestep_cond", "attention_mask", "added_cond_kwargs")  # what it shares with the copy


def vae_factor(obj) -> int | None:
    """The pixel / latent factor of a pipeline's VAE (None: no VAE, e.g. a lone U-Net)."""
    vae = None if isinstance(obj, nn.Module) else getattr(obj, "vae", None)
    if vae is None:
        return None
    return 2 ** (len(vae.config.block_out_channels) - 1)


def embedding_for(downscale: int) -> tuple[int, ...]:
    steps = math.log2(downscale) if downscale >= 1 else -1
    if steps != int(steps) or not 0 <= steps < len(DIFFUSERS_CHANNELS):
        raise ValueError(f"ControlNet downscale must be 1, 2, 4 or 8 (a VAE factor), got {downscale!r}; give "
                         "embedding_channels for others")
    return DIFFUSERS_CHANNELS[: int(steps) + 1]


def adapter_dtype(ref: torch.Tensor) -> torch.dtype:
    return torch.float32 if ref.dtype in (torch.float16, torch.bfloat16) else ref.dtype


def _copy_settings(unet: nn.Module) -> None:
    if not hasattr(unet, "config") or "UNet2DConditionModel" not in {c.__name__ for c in type(unet).__mro__}:
        raise ValueError(f"a ControlNet copies a diffusers UNet2DConditionModel; got {type(unet).__name__}")


@register_method("controlnet")
@dataclasses.dataclass
class ControlNet(ControlFields, MethodConfig):
    """downscale: the pixel / latent factor (None: the pipeline VAE's, else 8); embedding_channels: the
    condition embedding's channels (None: from ``downscale``); conditioning_channels: channels of the
    condition image; channel_order: "rgb" or "bgr" (diffusers' ``controlnet_conditioning_channel_order``);
    control_type / control_options: the condition the trainer and ``generate`` make (``ControlFields``)."""

    category: ClassVar[str] = "additive"
    site_kind: ClassVar[str] = "annex"
    # a prefix (ends with "."): every key of the copy, whose names follow the U-Net's architecture
    param_names: ClassVar[tuple[str, ...]] = ("controlnet.",)

    downscale: int | None = None
    embedding_channels: tuple[int, ...] | None = None
    conditioning_channels: int = 3
    channel_order: str = "rgb"

    def __post_init__(self):
        super().__post_init__()
        if self.target is not None:
            raise ValueError(f"{type(self).__name__} sits on the U-Net itself and takes no target, got {self.target}")
        self.check_control()
        if self.embedding_channels is not None:
            self.embedding_channels = tuple(int(c) for c in self.embedding_channels)
            if not self.embedding_channels or min(self.embedding_channels) < 1:
                raise ValueError(f"ControlNet embedding_channels must be positive ints, got {self.embedding_channels}")
        if self.downscale is not None:
            embedding_for(self.downscale)
        if isinstance(self.conditioning_channels, bool) or not isinstance(self.conditioning_channels, int) \
                or self.conditioning_channels < 1:
            raise ValueError(f"ControlNet conditioning_channels must be a positive int, got {self.conditioning_channels!r}")
        if self.channel_order not in ("rgb", "bgr"):
            raise ValueError(f"ControlNet channel_order must be 'rgb' or 'bgr', got {self.channel_order!r}")

    @property
    def factor(self) -> int:
        return 2 ** (len(self.embedding_channels) - 1)

    def resolved(self, model: nn.Module):
        return self

    def select(self, model: nn.Module) -> list[str]:
        return [""]

    def bind(self, obj, model: nn.Module, name: str):
        _copy_settings(model)
        found = vae_factor(obj)
        given = 2 ** (len(self.embedding_channels) - 1) if self.embedding_channels else None
        down = self.downscale or found or given or 8
        if found is not None and self.downscale is not None and found != self.downscale:
            raise ValueError(f"ControlNet {name!r}: downscale {self.downscale} but the pipeline's VAE scales by {found}")
        channels = self.embedding_channels or embedding_for(down)
        if 2 ** (len(channels) - 1) != down:
            raise ValueError(f"ControlNet {name!r}: embedding_channels {channels} downscale by "
                             f"{2 ** (len(channels) - 1)} but the latents are 1/{down} of the pixels")
        return dataclasses.replace(self, downscale=down, embedding_channels=channels)

    def build(self, base: nn.Module, site: str, init: bool = True):
        if site != "":
            raise ValueError(f"a ControlNet sits on the U-Net itself (site ''), not at {site!r}")
        _copy_settings(base)
        return ControlNetDelta(self, site, base, init)

    def copy_of(self, unet: nn.Module, weights: bool) -> nn.Module:
        """``ControlNetModel.from_unet(unet)`` with this config's condition embedding, on the U-Net's device
        (float32 for a half-precision U-Net, as adapters train); ``weights``: copy the U-Net's tensors."""
        from diffusers import ControlNetModel

        if self.embedding_channels is None:
            raise ValueError("ControlNet has no embedding_channels: inject it (bind sizes it from the base)")
        ref = next(unet.parameters())
        with torch.device(ref.device):
            copy = ControlNetModel.from_unet(unet, controlnet_conditioning_channel_order=self.channel_order,
                                             conditioning_embedding_out_channels=self.embedding_channels,
                                             load_weights_from_unet=weights and ref.device.type != "meta",
                                             conditioning_channels=self.conditioning_channels)
        dtype = adapter_dtype(ref)
        if copy.dtype != dtype:
            copy = copy.to(dtype)
        return copy.train(unet.training)


class ControlNetDelta(AnnexDelta):
    """A ControlNet copy beside the U-Net; its pre-hook adds the copy's residuals to the U-Net's call."""

    category = "additive"

    def __init__(self, config: ControlNet, site: str, unet: nn.Module, init: bool = True):
        super().__init__(config, site)
        self.adapter = ""
        # loading (init=False) replaces every tensor: built on the meta device, nothing copied
        self.controlnet = config.copy_of(unet if init else _Meta(unet), weights=init)

    def attach(self, site) -> None:
        self.adapter = next(n for n, d in site.deltas.items() if d is self)

    def residuals(self, unet, kwargs: dict, weight: float):
        """(down residuals, mid residual) of this call's condition, or None without one."""
        value = given_condition(unet, kwargs)
        if value is None:
            return None
        sample = kwargs["sample"]
        ref = next(self.controlnet.parameters())
        h, w = sample.shape[-2:]
        cond = control_tensor(value, self.adapter, sample.shape[0], (w * self.config.factor, h * self.config.factor),
                              self.config.conditioning_channels, ref.device, ref.dtype)
        if cond is None:
            return None
        extra = {k: kwargs[k] for k in UNET_INPUTS if kwargs.get(k) is not None}
        down, mid = self.controlnet(sample.to(ref.dtype), kwargs["timestep"],
                                    encoder_hidden_states=kwargs["encoder_hidden_states"].to(ref.dtype),
                                    controlnet_cond=cond, conditioning_scale=weight, return_dict=False, **extra)
        return [d.to(sample.dtype) for d in down], mid.to(sample.dtype)

    def pre(self, unet, args, kwargs, weight):
        kwargs = call_kwargs(unet, args, kwargs)
        out = self.residuals(unet, kwargs, weight)
        if out is None:
            return None
        down, mid = out
        prev_down, prev_mid = kwargs.get("down_block_additional_residuals"), kwargs.get("mid_block_additional_residual")
        if prev_down is not None:
            if len(prev_down) != len(down):
                raise ValueError(f"the U-Net call already carries {len(prev_down)} down residuals; this ControlNet "
                                 f"gives {len(down)}")
            down = [a + b for a, b in zip(prev_down, down)]
        kwargs["down_block_additional_residuals"] = tuple(down)
        kwargs["mid_block_additional_residual"] = mid if prev_mid is None else prev_mid + mid
        return (), kwargs


class _Meta:
    """A U-Net's config and a meta-device parameter: what ``from_unet`` reads, for building without weights."""

    def __init__(self, unet: nn.Module):
        self.config = unet.config
        ref = next(unet.parameters())
        self._ref = torch.empty(0, device="meta", dtype=ref.dtype)
        self.training = unet.training

    def parameters(self):
        return iter([self._ref])
