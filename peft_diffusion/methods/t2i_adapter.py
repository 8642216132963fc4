"""T2I-Adapter — Mou et al., "T2I-Adapter: Learning Adapters to Dig out More Controllable Ability for
Text-to-Image Diffusion Models", arXiv 2302.08453.

A small convolutional network F_AD turns a condition map C (edges, a mask, ...) into one feature map per
U-Net level, F_c = F_AD(C) (Eq. 1), added to the U-Net encoder's features at that level: F_enc^i + F_c^i
(Eq. 2); several adapters combine as F_c = sum_k w_k F_AD^k(C_k) (Eq. 3). The network is diffusers'
``T2IAdapter`` ("full_adapter", "full_adapter_xl" or "light_adapter"), held by an annex on the U-Net itself:
its pre-hook computes the features from this call's ``control_image`` (``training/condition_inputs.py``: [B, 3,
H, W] in [0, 1] at pixel size; a dict {adapter name: tensor} for several), scales them by the adapter's weight
(``pd.set_adapters``: diffusers' ``adapter_conditioning_scale``; several adapters: ``MultiAdapter``'s
``adapter_weights``) and hands them to the U-Net as diffusers' pipelines do
(``down_intrablock_additional_residuals``, added to what is already there). No control image: the U-Net runs
exactly as the base. Weights default to 1 each (``MultiAdapter`` without ``adapter_weights`` takes 1/n each);
features are added at every denoising step (diffusers' ``adapter_conditioning_factor`` < 1, which stops them
for the last steps, has no counterpart: leave the condition out of those calls).

Shapes: the U-Net adds feature i after down block i's last layer, before its downsampler when the block has
cross-attention, after it otherwise (diffusers' ``UNet2DConditionModel``), so the resolutions it wants follow
its block types. ``full_adapter`` gives levels 0, 1, 2, ... (SD1.5's layout, cross-attention blocks first);
``full_adapter_xl`` levels 0, 0, 1, 1 (SDXL's and the embedded shapes-base's, a plain ``DownBlock2D`` first);
``light_adapter`` len(channels) + 1 levels 0, 1, 2, ... with its last two channel counts equal (SD1.5: [320,
640, 1280]). ``channels``, ``downscale_factor`` (the VAE factor times 2 for each level before the first
feature) and ``num_res_blocks`` (2 full, 4 light) are read from the pipeline when left empty; a variant that
cannot give the U-Net's shapes is refused naming both (the light adapter on the embedded base: 32, 64, 128
channels need two distinct last levels).

Trained: the whole ``T2IAdapter`` (the U-Net is frozen). Saved: ``t2i_adapter.adapter.*`` on the U-Net natively;
``io/t2i_adapter.py`` writes and reads diffusers' ``save_pretrained`` folder, which
``StableDiffusionAdapterPipeline`` runs. Not mergeable: the features depend on the call's condition image.
SD1.5 (meta device): full 77,369,280 trainable parameters; light (channels [320, 640, 1280], 4 res blocks)
18,689,200 (tests/test_t2i_adapter.py).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from ..config import MethodConfig
from ..core import AnnexDelta, fit_batch
from ..registry import register_method
from .control_image import ControlFields, control_input

TYPES = ("full_adapter", "full_adapter_xl", "light_adapter")
RESIDUALS = "down_intrablock_additional_residuals"
MAX_BLOCKS, MAX_RES = 8, 8  # body blocks and res blocks whose names are declared (files split keys with them)


def _names() -> tuple[str, ...]:
    out = ["conv_in.weight", "conv_in.bias"]
    for i in range(MAX_BLOCKS):
        for conv in ("in_conv", "out_conv"):
            out += [f"body.{i}.{conv}.{p}" for p in ("weight", "bias")]
        out += [f"body.{i}.resnets.{r}.{c}.{p}" for r in range(MAX_RES) for c in ("block1", "block2")
                for p in ("weight", "bias")]
    return tuple(f"t2i_adapter.adapter.{n}" for n in out)


def unet_levels(unet: nn.Module) -> list[tuple[int, int]]:
    """(channels, level) of each feature the U-Net adds (level: halvings of the latent), one per down block,
    then one more its mid block takes when the shapes agree (SDXL's T2I-Adapter-XL)."""
    cfg = getattr(unet, "config", None)
    blocks = getattr(unet, "down_blocks", None)
    if blocks is None or cfg is None or not hasattr(cfg, "block_out_channels"):
        raise ValueError(f"T2I-Adapter feeds a diffusers UNet2DConditionModel's down blocks; got {type(unet).__name__}")
    out, level = [], 0
    for block, ch in zip(blocks, cfg.block_out_channels):
        down = getattr(block, "downsamplers", None) is not None
        if getattr(block, "has_cross_attention", False):
            out.append((ch, level))
            level += down
        else:
            level += down
            out.append((ch, level))
    return out


def adapter_levels(kind: str, channels) -> list[tuple[int, int]]:
    """(channels, level) of each feature diffusers' ``T2IAdapter`` of ``kind`` gives (level 0: its first one)."""
    channels = list(channels)
    if kind == "full_adapter":
        return [(c, i) for i, c in enumerate(channels)]
    if kind == "full_adapter_xl":
        return [(c, 0 if i < 2 else 1) for i, c in enumerate(channels)]
    return [(c, i) for i, c in enumerate(channels + channels[-1:])]


@register_method("t2i-adapter")
@dataclasses.dataclass
class T2IAdapterConfig(ControlFields, MethodConfig):
    """adapter_type: "full_adapter", "full_adapter_xl" or "light_adapter"; channels, num_res_blocks,
    downscale_factor: diffusers' ``T2IAdapter`` arguments (None: from the U-Net and the pipeline's VAE factor);
    in_channels: the condition's channels (3); control_type / control_options: the condition (``ControlFields``).
    The target is the U-Net itself (site "")."""

    category: ClassVar[str] = "additive"
    site_kind: ClassVar[str] = "annex"
    param_names: ClassVar[tuple[str, ...]] = _names()

    adapter_type: str = "full_adapter"
    channels: list | None = None
    num_res_blocks: int | None = None
    downscale_factor: int | None = None
    in_channels: int = 3

    def __post_init__(self):
        super().__post_init__()
        self.check_control()
        if self.adapter_type not in TYPES:
            raise ValueError(f"T2I-Adapter adapter_type must be one of {TYPES}, got {self.adapter_type!r}")
        if self.target is not None:
            raise ValueError("T2I-Adapter lives on the U-Net itself and takes no target")
        if self.channels is not None:
            self.channels = list(self.channels)
            if not self.channels or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 4
                                            for c in self.channels):
                raise ValueError(f"T2I-Adapter channels must be a list of integers >= 4, got {self.channels!r}")
            if len(self.channels) + 1 > MAX_BLOCKS:
                raise ValueError(f"T2I-Adapter takes at most {MAX_BLOCKS - 1} channel counts, got {len(self.channels)}")
        for f in ("num_res_blocks", "downscale_factor", "in_channels"):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"T2I-Adapter {f} must be a positive integer, got {v!r}")
        if self.num_res_blocks is not None and self.num_res_blocks > MAX_RES:
            raise ValueError(f"T2I-Adapter num_res_blocks must be at most {MAX_RES}, got {self.num_res_blocks}")

    def resolved(self, model: nn.Module) -> "T2IAdapterConfig":
        return self

    def bind(self, obj, model: nn.Module, name: str) -> "T2IAdapterConfig":
        """The config filled in for this U-Net (and the pipeline's VAE factor), checked against its shapes."""
        need = unet_levels(model)
        light = self.adapter_type == "light_adapter"
        block_out = [c for c, _ in need]
        channels = self.channels or (block_out[:-1] if light else block_out)
        have = adapter_levels(self.adapter_type, channels)
        wanted = [(c, lv - need[0][1]) for c, lv in need]
        if have != wanted and not (len(have) == len(wanted) + 1 and have[:-1] == wanted
                                   and have[-1] == wanted[-1]):  # one more: the mid block's (SDXL)
            fit = [t for t in TYPES if adapter_levels(t, block_out[:-1] if t == "light_adapter" else block_out)
                   == wanted]
            raise ValueError(f"T2I-Adapter {name!r}: a {self.adapter_type} with channels {channels} gives features "
                             f"(channels, level) {have} but this {type(model).__name__} (block_out_channels "
                             f"{block_out}) adds {wanted}; " + (f"use adapter_type {fit[0]!r}" if fit else
                                                                "no diffusers T2IAdapter type gives these shapes"))
        vae = None if isinstance(obj, nn.Module) else getattr(obj, "vae_scale_factor", None)
        own = vae * 2 ** need[0][1] if vae else None  # pixels per latent, times the levels before feature 0
        if own and self.downscale_factor and self.downscale_factor != own:
            raise ValueError(f"T2I-Adapter {name!r}: its downscale_factor is {self.downscale_factor} but this pipeline "
                             f"needs {own} (VAE factor {vae} x 2^{need[0][1]} for the U-Net's first feature level)")
        df = self.downscale_factor or own
        if df is None:
            raise ValueError(f"T2I-Adapter {name!r}: the VAE factor is unknown (a lone {type(model).__name__}): set "
                             "downscale_factor (the VAE factor times 2 per level before the U-Net's first feature) "
                             "or inject into the pipeline")
        bound = dataclasses.replace(self, channels=list(channels), downscale_factor=df,
                                    num_res_blocks=self.num_res_blocks or (4 if light else 2))
        bound._name = name
        return bound

    def select(self, model: nn.Module) -> list[str]:
        unet_levels(model)
        return [""]

    def build(self, base: nn.Module, site: str, init: bool = True):
        if site != "":
            raise ValueError(f"T2I-Adapter lives on the U-Net itself (site ''), not at {site!r}")
        return T2IAdapterDelta(self, site, base, init)


class T2IAdapterDelta(AnnexDelta):
    """diffusers' ``T2IAdapter`` beside the U-Net; its pre-hook adds weight * F_AD(control_image) to the U-Net's
    ``down_intrablock_additional_residuals``."""

    category = "additive"

    def __init__(self, config: T2IAdapterConfig, site: str, unet: nn.Module, init: bool = True):
        super().__init__(config, site)
        from diffusers import T2IAdapter

        if config.channels is None or config.downscale_factor is None:
            raise ValueError("T2IAdapterConfig must be bound to its U-Net (inject / load_adapter do it) before build")
        ref = next(unet.parameters())
        dtype = torch.float32 if ref.dtype in (torch.float16, torch.bfloat16) else ref.dtype
        with torch.device(ref.device if init else "meta"):
            self.t2i_adapter = T2IAdapter(in_channels=config.in_channels, channels=list(config.channels),
                                          num_res_blocks=config.num_res_blocks,
                                          downscale_factor=config.downscale_factor,
                                          adapter_type=config.adapter_type)
        if dtype != torch.float32:  # (diffusers warns on any ModelMixin.to(dtype))
            self.t2i_adapter.to(dtype)
        self.levels = unet_levels(unet)
        self._cache: tuple | None = None

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """F_AD(x); reused while nothing can have changed (no autograd, the same tensor, unchanged in place, and
        the same parameters: a denoising loop computes it once, as diffusers' pipelines do)."""
        params = list(self.t2i_adapter.parameters())
        p = params[0]
        key = None
        if not torch.is_grad_enabled():
            try:
                key = (x._version, p.device, p.dtype, tuple(q._version for q in params))
            except RuntimeError:  # inference-mode tensors keep no version counter: no reuse
                key = None
        if key is not None and self._cache is not None and self._cache[0] is x and self._cache[1] == key:
            return self._cache[2]
        out = self.t2i_adapter(x.to(p.device, p.dtype))
        self._cache = (x, key, out) if key is not None else None
        return out

    def channels_of(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with this adapter's input channels: an RGB map for a one-channel adapter (diffusers' sketch and
        canny ones take "L" images) becomes its luma, as PIL's ``convert("L")`` (a grey map: its own channel)."""
        want, have = self.config.in_channels, x.shape[1]
        if have == want:
            return x
        if want == 1 and have == 3:
            if torch.equal(x[:, :1].expand_as(x), x):
                return x[:, :1]
            return (x * x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        raise ValueError(f"control_image has {have} channels; this T2I-Adapter takes {want} (in_channels)")

    def pre(self, unet, args, kwargs, weight):
        x = control_input(unet, getattr(self.config, "_name", None))
        if x is None or weight == 0:
            return None
        sample = args[0] if args else kwargs["sample"]
        df = self.config.downscale_factor
        want = [s * df // 2 ** self.levels[0][1] for s in sample.shape[-2:]]
        if list(x.shape[-2:]) != want:
            raise ValueError(f"control_image is {x.shape[-1]}x{x.shape[-2]} pixels but these {sample.shape[-1]}x"
                             f"{sample.shape[-2]} latents take {want[1]}x{want[0]} (resize it to the image size)")
        x = self.channels_of(x)
        feats = [fit_batch(f * weight, sample.shape[0]).to(sample.dtype) for f in self.features(x)]
        existing = kwargs.get(RESIDUALS)
        if existing is not None:
            if len(existing) != len(feats):
                raise ValueError(f"{RESIDUALS} already holds {len(existing)} tensors; this T2I-Adapter gives "
                                 f"{len(feats)}: adapters for other U-Net layouts cannot combine")
            feats = [a + b for a, b in zip(existing, feats)]
        return args, {**kwargs, RESIDUALS: feats}
