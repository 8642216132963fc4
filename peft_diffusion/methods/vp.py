"""VP (visual prompting, padding prompt) — Bahng et al., "Exploring Visual Prompts for Adapting Large-Scale
Models", arXiv 2203.17274, on a CLIP vision tower.

A learnable frame v_phi of width p around the image, added in pixel space (Sec. 3, Eq. 1: x + v_phi):
    x_prompted = x + frame,   frame = [up; [left, 0, right]; down]  (3 x S x S, zeros inside the border),
where x are the normalised pixel values the model takes (the paper's code adds the prompt after the
dataset's normalisation too). The frame is four tensors as in the paper's released padding prompter:
``pad_up`` / ``pad_down`` [1, C, p, S], ``pad_left`` / ``pad_right`` [1, C, S - 2p, p]. Where: an annex
(forward pre-hook, no module replaced) on the tower's ``CLIPVisionEmbeddings``, adding the frame to its
``pixel_values``; the image must be the tower's S x S (other sizes are an error, not a resize).

Init: ``init="zero"`` (default: the identity at init, the frame starts at nothing) or ``"normal"`` (the
paper's code: N(0, 1) entries, which starts away from the base model). An adapter weight w scales the frame.

Trained: the frame only, C * (S^2 - (S - 2p)^2) numbers: 69,840 for p = 30 at 224 px (CLIP ViT-B/16;
tests/test_vp.py, meta device). Saved: ``<embeddings>.pad_up`` / ``.pad_down`` / ``.pad_left`` /
``.pad_right``. Not mergeable (an input edit, not a weight change).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from ..config import MethodConfig
from ..core import AnnexDelta
from ..registry import register_method
from .clip_vision import select_in_towers

INITS = ("zero", "normal")


@register_method("vp")
@dataclasses.dataclass
class VP(MethodConfig):
    """padding: p, the frame's width in pixels (1 <= p < S / 2); init: "zero" (identity) or "normal" (the
    paper's); target: None (every CLIP vision tower's embeddings) or a Target selecting them."""

    category: ClassVar[str] = "prompt"
    site_kind: ClassVar[str] = "annex"
    param_names: ClassVar[tuple[str, ...]] = ("pad_up", "pad_down", "pad_left", "pad_right")
    components: ClassVar[tuple[str, ...]] = ("image_encoder",)

    padding: int = 30
    init: str = "zero"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.padding, bool) or not isinstance(self.padding, int) or self.padding < 1:
            raise ValueError(f"VP padding must be a positive integer, got {self.padding!r}")
        if self.init not in INITS:
            raise ValueError(f"VP init must be one of {INITS}, got {self.init!r}")

    def resolved(self, model: nn.Module) -> "VP":
        return self

    def select(self, model: nn.Module) -> list[str]:
        return select_in_towers(self, model, "embeddings")

    def build(self, base: nn.Module, site: str, init: bool = True):
        return PadPrompt(self, site, base, init)


class PadPrompt(AnnexDelta):
    """The frame of one vision tower, added to the pixel values its embeddings receive."""

    category = "prompt"
    mergeable = False

    def __init__(self, config: VP, site: str, embeddings: nn.Module, init: bool = True):
        super().__init__(config, site)
        size, p = int(embeddings.image_size), config.padding
        channels = embeddings.patch_embedding.in_channels
        if 2 * p >= size:
            raise ValueError(f"VP padding {p} leaves no image inside the {size} px input of {site!r} "
                             f"(padding must be below {(size + 1) // 2})")
        self.size = size
        ref = embeddings.patch_embedding.weight
        dtype = torch.float32 if ref.dtype in (torch.float16, torch.bfloat16) else ref.dtype
        device = ref.device if init else "meta"
        inner = size - 2 * p

        def frame(*shape):
            t = torch.zeros(1, channels, *shape, device=device, dtype=dtype)
            if init and config.init == "normal":
                t.normal_()
            return nn.Parameter(t)

        self.pad_up, self.pad_down = frame(p, size), frame(p, size)
        self.pad_left, self.pad_right = frame(inner, p), frame(inner, p)

    def frame(self) -> torch.Tensor:
        """[1, C, S, S]: the four borders around zeros."""
        c, inner = self.pad_left.shape[1], self.pad_left.shape[2]
        middle = self.pad_left.new_zeros(1, c, inner, inner)
        middle = torch.cat([self.pad_left, middle, self.pad_right], dim=3)
        return torch.cat([self.pad_up, middle, self.pad_down], dim=2)

    def pre(self, module, args, kwargs, weight):
        x = args[0] if args else kwargs.get("pixel_values")
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.pad_left.shape[1], self.size, self.size):
            raise ValueError(f"VP at {self.site!r}: pixel values of shape {tuple(x.shape)} given; its frame is "
                             f"for [N, {self.pad_left.shape[1]}, {self.size}, {self.size}]")
        f = self.frame() * weight if weight != 1.0 else self.frame()
        x = x + f.to(x.dtype)
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "pixel_values": x})
