"""DoRA — Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv 2402.09353.

What it adds over LoRA: the adapted weight is split into a magnitude and a direction (Eq. 5),

    W' = m * (W0 + s B A) / ||W0 + s B A||_c

with ||.||_c the norm of each output channel (row of a Linear weight, filter of a Conv weight, as peft
computes it) and m a trained vector initialised to ||W0||_c, so that with B = 0 the model starts unchanged.
As in the paper (section 4.3) and peft, the norm is detached: it takes part in the forward value but gets no
gradient, which saves the memory of back-propagating through it. An adapter weight w scales s (peft's
``set_scale``): W' = m (W0 + w s B A) / ||W0 + w s B A||_c, m untouched.

Trained: A, B and m. Saved: ``lora_A.weight``, ``lora_B.weight``, ``lora_magnitude_vector`` (shape (out,)
for linear layers, (1, out, 1, 1) for Conv2d), the names and shapes peft's ``get_peft_model_state_dict``
writes, so files load in diffusers' ``load_lora_weights`` (with ``use_dora`` in the metadata; diffusers 0.42
with transformers 5.23 loads a text encoder's DoRA without its magnitudes, the U-Net's correctly).
Merges exactly (W <- W'). DoRA is not additive: unfusing divides by m / ||W0 + s B A||_c kept from the
fuse, which restores W0 within float error when adapters are unfused in reverse fuse order (what
``unfuse`` does); ``fuse(exact=True)`` restores it bit for bit.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..core import weight_op
from ..registry import register_method
from .lora import LoRA, LoRADelta, adapter_dtype


@register_method("dora")
@dataclasses.dataclass
class DoRA(LoRA):
    """LoRA with a trained per-output-channel magnitude (same hyper-parameters as ``LoRA``)."""

    param_names = LoRA.param_names + ("lora_magnitude_vector",)

    def build(self, base: nn.Module, site: str, init: bool = True) -> "DoRADelta":
        return DoRADelta(self, site, base, init)


def channel_norm(v: torch.Tensor) -> torch.Tensor:
    """||v||_c of a weight laid out (out, ...), shaped (out, 1, ...) to broadcast against it."""
    return v.flatten(1).norm(dim=1).view(-1, *[1] * (v.dim() - 1))


class DoRADelta(LoRADelta):
    def __init__(self, config: DoRA, site: str, base: nn.Module, init: bool = True):
        super().__init__(config, site, base, init)
        n_out = self._w0(base).shape[0]
        kernel = base.weight.dim() - 2 if isinstance(base, nn.modules.conv._ConvNd) else 0
        # peft's shapes, so the file keys load there unchanged
        shape = (1, n_out) + (1,) * kernel if kernel else (n_out,)
        if init:
            m = channel_norm(self._w0(base)).reshape(shape).to(adapter_dtype(base))
        else:
            m = torch.empty(shape, device="meta", dtype=adapter_dtype(base))
        self.lora_magnitude_vector = nn.Parameter(m)
        self.fused_norm: torch.Tensor | None = None  # ||W0 + s B A||_c at fuse time, to unfuse

    def _w0(self, base: nn.Module) -> torch.Tensor:
        """The base weight as (out, in, ...) in the adapter's dtype (GPT-2's Conv1D stores it transposed)."""
        w = base.weight.to(self.lora_A.weight.dtype)
        return w.T if self.transposed else w

    def _layout(self, w: torch.Tensor) -> torch.Tensor:
        return w.T if self.transposed else w

    def _direction(self, base: nn.Module, weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W0, V = W0 + w s B A, ||V||_c detached), laid out (out, in, ...)."""
        a, b = self.lora_A.weight, self.lora_B.weight
        ba = (b.flatten(1) @ a.flatten(1)).view(b.shape[0], *a.shape[1:])
        w0 = self._w0(base)
        v = w0 + (weight * self.scaling) * ba
        return w0, v, channel_norm(v.detach())

    def delta_weight(self, base: nn.Module | None = None, weight: float = 1.0) -> torch.Tensor:
        """W' - W0 in the base layer's layout (needs the base layer: DoRA depends on W0)."""
        if base is None:
            raise TypeError("DoRA's weight difference depends on the base weight: call delta_weight(base)")
        w0, v, norm = self._direction(base, weight)
        g = self.lora_magnitude_vector.view(norm.shape) / norm
        return self._layout(g * v - w0)

    def forward(self, base, x, out, weight):
        # One op with W' - W0 = (g - 1) W0 + g w s B A: the base output in ``out`` may already hold other
        # adapters, so it cannot be rescaled by g in place. Dropout acts on this path's input only, as in peft.
        dw = self.delta_weight(base, weight)
        return out + weight_op(base, self.dropout(x.to(dw.dtype)), dw).to(out.dtype)

    @torch.no_grad()
    def merge(self, base, weight):
        _, v, norm = self._direction(base, weight)
        self.fused_norm = norm
        w = base.weight
        w.copy_(self._layout(self.lora_magnitude_vector.view(norm.shape) / norm * v).to(w.dtype))

    @torch.no_grad()
    def unmerge(self, base, weight):
        if self.fused_norm is None:
            raise RuntimeError(f"DoRA at {self.site} was not fused through merge(): nothing to unfuse")
        w = base.weight
        norm = self.fused_norm.to(w.device)
        g = self.lora_magnitude_vector.view(norm.shape) / norm
        a, b = self.lora_A.weight, self.lora_B.weight
        ba = (b.flatten(1) @ a.flatten(1)).view(b.shape[0], *a.shape[1:])
        w0 = self._w0(base) / g - (weight * self.scaling) * ba
        w.copy_(self._layout(w0).to(w.dtype))
        self.fused_norm = None
