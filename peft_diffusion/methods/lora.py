"""LoRA — Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685.

Eq. (3): h = W0 x + dW x = W0 x + (alpha / r) B A x, with A in R^{r x k}, B in R^{d x r}; B = 0 at init so
the adapted model starts identical to the base. Options:

- rsLoRA (Kalajdzievski, arXiv 2312.03732): scale alpha / sqrt(r) instead of alpha / r, so the update's
  size does not collapse as the rank grows.
- LoRA-FA (Zhang et al., arXiv 2308.03303): A stays frozen at its random init, only B is trained.
- init "kaiming" (A ~ kaiming-uniform, as nn.Linear and peft) or "gaussian" (A ~ N(0, 1/r)).

Conv layers: A is a convolution with the base kernel, stride, padding and dilation; B is 1x1, so
dW[o, i, ...] = sum_r B[o, r] A[r, i, ...]. GPT-2 ``Conv1D`` gets the transposed dW.
A plain ``nn.Linear`` and its LoRA train as one autograd node (``lora_linear.py``) when nothing else must see
the base layer run. Trained: A and B (B only with LoRA-FA). Saved: ``lora_A.weight``, ``lora_B.weight``.
Merges exactly (W += scale * B A, with one ``addmm_`` for linear layers).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MethodConfig
from ..core import WeightDelta, is_transposed, layer_dims
from ..registry import register_method
from ..target import lookup
from .lora_linear import LoRALinear

INITS = ("kaiming", "gaussian")


def adapter_dtype(base: nn.Module) -> torch.dtype:
    """Adapters of half-precision layers train in float32 (as peft does); others follow the layer."""
    dtype = base.weight.dtype
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


@register_method("lora")
@dataclasses.dataclass
class LoRA(MethodConfig):
    """Low-rank update B A with scale alpha/r (or alpha/sqrt(r) with ``rslora``).

    rank_pattern / alpha_pattern: {name pattern: value} overrides per module (the longest match wins).
    """

    category = "reparameterization"
    param_names = ("lora_A.weight", "lora_B.weight")

    r: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    init: str = "kaiming"
    rslora: bool = False
    fa: bool = False
    rank_pattern: dict = dataclasses.field(default_factory=dict)
    alpha_pattern: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        if not _positive_int(self.r):
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        bad = {k: v for k, v in self.rank_pattern.items() if not _positive_int(v)}
        if bad:
            raise ValueError(f"LoRA rank_pattern values must be positive integers, got {bad}")
        alphas = {"alpha": self.alpha} if self.alpha is not None else {}
        bad = {k: v for k, v in {**alphas, **self.alpha_pattern}.items()
               if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)}
        if bad:
            raise ValueError(f"LoRA alpha values must be finite numbers, got {bad}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.init not in INITS:
            raise ValueError(f"LoRA init must be one of {INITS}, got {self.init!r}")

    def rank(self, site: str) -> int:
        return lookup(self.rank_pattern, site, self.r)

    def scale(self, site: str) -> float:
        r = self.rank(site)
        alpha = lookup(self.alpha_pattern, site, self.r if self.alpha is None else self.alpha)
        return alpha / math.sqrt(r) if self.rslora else alpha / r

    def build(self, base: nn.Module, site: str, init: bool = True) -> "LoRADelta":
        return LoRADelta(self, site, base, init)


class LoRADelta(WeightDelta):
    def __init__(self, config: LoRA, site: str, base: nn.Module, init: bool = True):
        super().__init__(config, site)
        n_in, n_out, kernel = layer_dims(base)
        r = config.rank(site)
        self.scaling = config.scale(site)
        factory = {"device": base.weight.device if init else "meta", "dtype": adapter_dtype(base)}
        if kernel:
            conv = type(base)
            if base.groups != 1:
                raise ValueError(f"LoRA does not support grouped convolutions ({site} has groups={base.groups})")
            self.lora_A = conv(n_in, r, kernel, base.stride, base.padding, base.dilation, bias=False,
                               padding_mode=base.padding_mode, **factory)
            self.lora_B = conv(r, n_out, 1, bias=False, **factory)
        else:
            self.lora_A = nn.Linear(n_in, r, bias=False, **factory)
            self.lora_B = nn.Linear(r, n_out, bias=False, **factory)
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.transposed = is_transposed(base)
        self.plain = isinstance(base, nn.Linear)  # the fused addmm path of ``forward``
        # base and LoRA as one autograd node (``whole``): plain nn.Linear layers, for this class only
        # (subclasses change ``forward``)
        self.fusable = type(self) is LoRADelta and type(base) is nn.Linear and not config.dropout
        if init:
            self.reset()
        self.lora_A.weight.requires_grad_(not config.fa)

    @torch.no_grad()
    def reset(self) -> None:
        if self.config.init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1.0 / self.lora_A.weight.shape[0])
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, base, x, out, weight):
        # Output-sized tensors are the cost (rank-r ones are small): the scale goes on the rank-r activations
        # (skipped for a unit scale) and the base output is added into the fresh lora_B output in place: one
        # output-sized kernel and two output-sized temporaries fewer than ``out + s * y``. ``out`` itself is
        # never written (forward hooks may hold it).
        a, b = self.lora_A.weight, self.lora_B.weight
        scale = weight * self.scaling
        if self.plain and x.dtype == a.dtype == out.dtype:
            # linear layers: y = out + (s A x) B^T as ONE addmm (GEMM and add fused: one kernel and one
            # autograd node fewer per site than lora_B(h).add_(out), which shows on small, overhead-bound steps)
            h = F.linear(self.dropout(x) if self.config.dropout else x, a)
            if scale != 1.0:
                h = h * scale
            return torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), b.t()).view(out.shape)
        h = self.lora_A(self.dropout(x.to(a.dtype)))
        if scale != 1.0:
            h = h * scale
        return self.lora_B(h).to(out.dtype).add_(out)

    def whole(self, base, x, weight):
        """Linear layer + LoRA as one node (``lora_linear.LoRALinear``) when nothing else must see the base
        layer run: no hooks on it (forward or backward) or on this delta, its own ``forward`` (not replaced by e.g. an offload
        hook), one dtype throughout, no autocast."""
        if not self.fusable or base._forward_hooks or base._forward_pre_hooks or base._backward_hooks \
                or base._backward_pre_hooks or "forward" in base.__dict__ or self._forward_hooks \
                or self._forward_pre_hooks or type(x) is not torch.Tensor:
            return None
        w, a = base.weight, self.lora_A.weight
        if not x.dtype == w.dtype == a.dtype or torch.is_autocast_enabled(x.device.type):
            return None
        return LoRALinear.apply(x, w, base.bias, a, self.lora_B.weight, weight * self.scaling)

    def delta_weight(self) -> torch.Tensor:
        a, b = self.lora_A.weight, self.lora_B.weight
        dw = (b.flatten(1) @ a.flatten(1)).view(b.shape[0], *a.shape[1:]) * self.scaling
        return dw.T if self.transposed else dw

    @torch.no_grad()
    def merge(self, base, weight):
        self._addmm(base, weight)

    @torch.no_grad()
    def unmerge(self, base, weight):
        self._addmm(base, -weight)

    def _addmm(self, base, weight):
        w, a, b = base.weight, self.lora_A.weight, self.lora_B.weight
        if w.dtype != a.dtype or self.transposed:
            return super().merge(base, weight)
        # in place, no dW temporary: W (out, in*k) += s * B (out, r) @ A (r, in*k)
        w.view(w.shape[0], -1).addmm_(b.flatten(1), a.flatten(1), alpha=weight * self.scaling)
