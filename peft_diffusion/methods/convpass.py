"""Convpass — Jie, Deng, "Convolutional Bypasses Are Better Vision Transformer Adapters", arXiv 2207.07039.

A convolutional bypass beside the attention and the MLP of every ViT layer (Sec. 3.2):
X <- X + MHSA(LN(X)) + s * Convpass(LN(X)), then X <- X + MLP(LN(X)) + s * Convpass(LN(X)), where
Convpass(Z) = W_up(drop(g(Conv3x3(g(W_down Z))))): a 1x1 convolution d -> h (a Linear per token), QuickGELU
g(x) = x sigmoid(1.702 x), a 3x3 convolution h -> h (padding 1) over the tokens laid back on their 2-D patch
grid, g again, dropout, and a 1x1 convolution h -> d. The [CLS] token is its own 1x1 image (the paper's
"individual image"; with padding 1 only the kernel's centre tap reaches it), as the published code does.
Trainable numbers per layer 2 ((2h + 1) d + 9 h^2 + 2 h) (Sec. 3.2).

Where: an Annex on ``self_attn`` and on ``mlp`` of each ``CLIPEncoderLayer`` in a CLIP vision tower
(``clip_vision.py``; CLIPVisionModel(WithProjection), CLIPModel's vision tower, a pipeline's
``image_encoder``). Each sub-layer's input is LN(X) and its output is added to the residual by the layer,
so the bypass reads the input and is added to the output. The grid is [CLS] + g x g patches, g =
sqrt(tokens - 1); a sequence of another length (a non-square input with ``interpolate_pos_encoding``,
extra prompt tokens) is refused with an error. Vision towers only: a diffusers transformer block does not
see the height and width of its token grid (U-Net latents and PixArt inputs may be non-square), and the
text and language models have no grid; ``inject`` says so.

Init as the published code: W_down uniform Xavier, biases zero, W_up zero (the model starts bit-exact), the
3x3 kernel zero with the identity at its centre (``conv_init="identity"``, the code's default) or uniform
Xavier (``"xavier"``, which its per-dataset configs pick for about half of VTAB-1k). s: the paper searches
{0.01, 0.1, 1, 10, 100} per task; the code's default 1 is ours. Dropout 0.1 as the code. ``attn_only``: the
code's Convpass-attn variant (bypasses beside the attention only). Trained: W_down, b_down, the 3x3 kernel
and its bias, W_up, b_up. Saved: ``<sub-layer>.adapter_down.*``, ``.adapter_conv.*``, ``.adapter_up.*``
(the published names). Not mergeable (nonlinear, and a spatial convolution across tokens): ``pd.fuse`` leaves
it running and ``pd.fuse(pipe, [name])`` refuses.

Count (tests/test_convpass.py, CLIP ViT-B/16's vision config on the meta device, d = 768, h = 8, 12 layers):
24 x 13,648 = 327,552, the paper's 0.33M.
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
from ..target import class_names
from .bottleneck import hidden_size, sublayers
from .clip_vision import SUPPORTED, vision_towers
from .dense import module_at

CONV_INITS = ("identity", "xavier")


@register_method("convpass")
@dataclasses.dataclass
class Convpass(MethodConfig):
    """Convolutional bypasses in a CLIP vision tower. dim: h, the bottleneck channels (8 in the paper); scale:
    s; conv_init: "identity" or "xavier"; dropout; attn_only: beside the attention only; target: None (every
    layer of every vision tower) or a Target selecting some of those ``CLIPEncoderLayer``s."""

    category: ClassVar[str] = "additive"
    site_kind: ClassVar[str] = "annex"
    param_names: ClassVar[tuple[str, ...]] = tuple(f"adapter_{p}.{t}" for p in ("down", "conv", "up")
                                                   for t in ("weight", "bias"))
    components: ClassVar[tuple[str, ...]] = ("image_encoder",)  # a diffusers pipeline's CLIP vision tower

    dim: int = 8
    scale: float = 1.0
    conv_init: str = "identity"
    dropout: float = 0.1
    attn_only: bool = False

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"Convpass dim must be a positive integer, got {self.dim!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            raise ValueError(f"Convpass scale must be a number, got {self.scale!r}")
        if self.conv_init not in CONV_INITS:
            raise ValueError(f"Convpass conv_init must be one of {list(CONV_INITS)}, got {self.conv_init!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"Convpass dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.attn_only, bool):
            raise ValueError(f"Convpass attn_only must be True or False, got {self.attn_only!r}")

    def resolved(self, model: nn.Module) -> "Convpass":
        return self  # ``select`` finds the vision towers itself

    def select(self, model: nn.Module) -> list[str]:
        layers = []
        for t in vision_towers(model):
            encoder = f"{t}.encoder" if t else "encoder"
            layers += [f"{encoder}.layers.{i}" for i in range(len(module_at(model, encoder).layers))]
        if not layers:
            raise ValueError(f"Convpass needs the 2-D patch grid of a CLIP vision tower; this {type(model).__name__} "
                             f"has none (supported: {', '.join(SUPPORTED)}). Diffusers transformer blocks and "
                             "text / language models are not supported: their blocks do not see a square patch grid")
        if self.target is not None:
            chosen = self.target.select(model, "annex")
            bad = [c for c in chosen if c not in layers]
            if bad or not chosen:
                what = (f"{bad[0] or '<model>'!r}, a {type(module_at(model, bad[0])).__name__}" if bad else "nothing")
                raise ValueError(f"Convpass target {self.target} selects {what}; it goes on the CLIPEncoderLayers of "
                                 f"a CLIP vision tower (in this {type(model).__name__}: {layers[0]} ... {layers[-1]})")
            layers = [x for x in layers if x in chosen]
        return sublayers(model, layers, ("attn",) if self.attn_only else ("attn", "ffn"))

    def build(self, base: nn.Module, site: str, init: bool = True):
        return ConvpassDelta(self, site, base, init)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class ConvpassDelta(AnnexDelta):
    """One bypass beside one sub-layer: output <- output + w * s * Convpass(input)."""

    category = "additive"
    mergeable = False

    def __init__(self, config: Convpass, site: str, module: nn.Module, init: bool = True):
        super().__init__(config, site)
        if not {"CLIPAttention", "CLIPMLP"} & class_names(module):
            raise ValueError(f"Convpass at {site!r}: a {type(module).__name__} is not a CLIP attention or MLP")
        d, h = hidden_size(module, site), config.dim
        ref = next(module.parameters())
        dtype = torch.float32 if ref.dtype in (torch.float16, torch.bfloat16) else ref.dtype
        kw = dict(device=ref.device if init else "meta", dtype=dtype)
        self.adapter_down = nn.Linear(d, h, **kw)
        self.adapter_conv = nn.Conv2d(h, h, 3, padding=1, **kw)
        self.adapter_up = nn.Linear(h, d, **kw)
        self.dropout = nn.Dropout(config.dropout)
        if init:
            nn.init.xavier_uniform_(self.adapter_down.weight)
            if config.conv_init == "xavier":
                nn.init.xavier_uniform_(self.adapter_conv.weight)
            else:
                with torch.no_grad():
                    self.adapter_conv.weight.zero_()
                    self.adapter_conv.weight[:, :, 1, 1] = torch.eye(h, **kw)
            for p in (self.adapter_down.bias, self.adapter_conv.bias, self.adapter_up.weight, self.adapter_up.bias):
                nn.init.zeros_(p)

    def branch(self, x: torch.Tensor, weight: float) -> torch.Tensor:
        """s * weight * Convpass(x) for x = [CLS, g x g patches] of shape (batch, 1 + g^2, d)."""
        b, n, _ = x.shape
        g = math.isqrt(max(n - 1, 0))
        if n < 2 or g * g != n - 1:
            raise ValueError(f"Convpass at {self.site!r}: {n} tokens are not [CLS] + a square grid of patches "
                             "(a non-square image or extra prompt tokens); Convpass needs the g x g patch grid")
        z = quick_gelu(self.adapter_down(x.to(self.adapter_down.weight.dtype)))
        h = z.shape[-1]
        cls = self.adapter_conv(z[:, :1].reshape(b, 1, 1, h).permute(0, 3, 1, 2)).reshape(b, 1, h)
        grid = self.adapter_conv(z[:, 1:].reshape(b, g, g, h).permute(0, 3, 1, 2))
        z = torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(b, g * g, h)], dim=1)
        out = self.adapter_up(self.dropout(quick_gelu(z)))
        s = self.config.scale * weight
        return (out * s if s != 1.0 else out).to(x.dtype)

    def post(self, module, args, kwargs, output, weight):
        x = args[0] if args else kwargs["hidden_states"]
        if isinstance(output, tuple):
            return (output[0] + self.branch(x, weight),) + tuple(output[1:])
        return output + self.branch(x, weight)
