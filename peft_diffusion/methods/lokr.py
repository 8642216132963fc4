"""The Kronecker family: LoKr, KronA and DiffuseKronA, one delta with three sets of defaults.

    dW = (W1 (x) W2) * scale,   W1 in R^{a x c}, W2 in R^{b x d (x k...)},   out = a b, in = c d

- LoKr: LyCORIS' low-rank Kronecker update (Yeh et al., "Navigating Text-To-Image Customization: From
  LyCORIS Fine-Tuning to Model Evaluation", arXiv 2309.14859). Factor shapes follow LyCORIS'
  ``factorization`` (``factor``: -1 = as square as possible); W2, the larger factor, is W2a W2b of rank r
  unless r >= max(b, d) / 2 (then full); W1 is W1a W1b only with ``decompose_both``; with ``use_tucker``
  a k x k conv's W2 is a Tucker product T x W2a x W2b. scale = alpha / r, or 1 when both factors are full.
- KronA (Edalati et al., "KronA: Parameter Efficient Tuning with Kronecker Adapter", arXiv 2212.10650):
  dW = A_k (x) B_k with both factors full (``full_matrix``), scale 1.
- DiffuseKronA (Marjit et al., "DiffuseKronA: A Parameter Efficient Fine-tuning Method for Personalized
  Diffusion Models", arXiv 2402.17412): KronA on the U-Net attention projections (to_q, to_k, to_v,
  to_out.0) with A of shape a1 x a2 = 64 x 8 (the paper's setting), A ~ N(0, 1/a1^2), B = 0 (its code).

``factor`` may be an int (LyCORIS' rule) or a pair (a1, a2): the exact shape of W1, which must divide
(out, in). Init (LyCORIS): W1, W1a, W1b, W2a, T kaiming-uniform; W2 or W2b zero, so dW = 0 at init.
Trained: every factor. Saved: ``lokr_w1`` or ``lokr_w1_a``/``lokr_w1_b``, ``lokr_w2`` or
``lokr_w2_a``/``lokr_w2_b``, ``lokr_t2``: LyCORIS' names and shapes. Merges exactly (W += dW).
Forward on Linear layers: x (W1 (x) W2)^T without building dW, saving nothing but x and the factors for
backward (``kronecker.py``); on convolutions dW is built once per call and run through the layer's own conv.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, NamedTuple

import torch
from torch import nn

from ..config import MethodConfig
from ..core import WeightDelta, weight_op
from ..registry import register_method
from ..target import Target, lookup
from .kronecker import factorization, kron_matmul
from .loha import check_rank_alpha, tucker, weight_layer_dims
from .lora import adapter_dtype


def _near(n: int, a: int) -> list[int]:
    return sorted(sorted((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - a))[:4])


def _factor(value, where: str):
    """An int factor (-1 or >= 1) or a pair (a1, a2) of positive ints; lists (JSON, TOML) become tuples."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and \
            all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
        return tuple(value)
    if isinstance(value, int) and not isinstance(value, bool) and (value == -1 or value >= 1):
        return value
    raise ValueError(f"{where} must be -1, a positive int, or a pair (a1, a2) of positive ints (the shape of "
                     f"the first Kronecker factor), got {value!r}")


class Plan(NamedTuple):
    """Factor shapes at one layer: W1 is out[0] x inp[0], W2 is out[1] x inp[1] (x kernel)."""
    out: tuple[int, int]
    inp: tuple[int, int]
    kernel: tuple[int, ...]
    r: int
    w1_lowrank: bool
    w2: str  # "full", "lowrank" or "tucker"
    scale: float


@register_method("lokr")
@dataclasses.dataclass
class LoKr(MethodConfig):
    """Kronecker update W1 (x) W2 (LyCORIS' LoKr). rank_pattern / alpha_pattern / factor_pattern: per-module
    overrides {name pattern: value} (the longest match wins); a factor is an int or a pair (a1, a2)."""

    category = "reparameterization"
    param_names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    w1_init: ClassVar[str] = "kaiming"  # "normal": N(0, 1 / a1^2), DiffuseKronA's

    r: int = 8
    alpha: float | None = None
    factor: int | tuple = -1
    decompose_both: bool = False
    use_tucker: bool = False
    full_matrix: bool = False
    rank_pattern: dict = dataclasses.field(default_factory=dict)
    alpha_pattern: dict = dataclasses.field(default_factory=dict)
    factor_pattern: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        check_rank_alpha(name, self.r, self.alpha, self.rank_pattern, self.alpha_pattern)
        self.factor = _factor(self.factor, f"{name} factor")
        self.factor_pattern = {k: _factor(v, f"{name} factor_pattern[{k!r}]") for k, v in self.factor_pattern.items()}

    def rank(self, site: str) -> int:
        return lookup(self.rank_pattern, site, self.r)

    def plan(self, base: nn.Module, site: str) -> Plan:
        """LyCORIS' factor shapes, which factor is full or low-rank, and the scale, for this layer."""
        n_in, n_out, kernel = weight_layer_dims(base, site, type(self).__name__)
        f = lookup(self.factor_pattern, site, self.factor)
        if isinstance(f, tuple):
            bad = [f"{what}={a} does not divide {n} (divisors near it: {_near(n, a)})"
                   for what, a, n in (("a1", f[0], n_out), ("a2", f[1], n_in)) if n % a]
            if bad:
                raise ValueError(f"{site}: Kronecker factor {f} does not fit this {n_out} x {n_in} layer: "
                                 f"{'; '.join(bad)}; set factor or factor_pattern for it to a pair that divides")
            out, inp = (f[0], n_out // f[0]), (f[1], n_in // f[1])
        else:
            out, inp = factorization(n_out, f), factorization(n_in, f)
        r = self.rank(site)
        w1_lowrank = self.decompose_both and not self.full_matrix and r < max(out[0], inp[0]) / 2
        if self.full_matrix or r >= max(out[1], inp[1]) / 2:
            w2 = "full"
        else:
            w2 = "tucker" if self.use_tucker and any(k != 1 for k in kernel) else "lowrank"
        scale = 1.0 if not w1_lowrank and w2 == "full" else self.scale(site)
        return Plan(out, inp, kernel, r, w1_lowrank, w2, scale)

    def scale(self, site: str, base: nn.Module | None = None) -> float:
        """alpha / r at ``site``; with the layer, 1 where both factors are full there (LyCORIS ignores alpha)."""
        if base is not None:
            return self.plan(base, site).scale
        r = self.rank(site)
        return (lookup(self.alpha_pattern, site, self.alpha) or r) / r  # alpha None or 0: alpha = r (LyCORIS)

    def build(self, base: nn.Module, site: str, init: bool = True) -> "KronDelta":
        return KronDelta(self, site, base, init)


@register_method("krona")
@dataclasses.dataclass
class KronA(LoKr):
    """KronA: both Kronecker factors full (scale 1); ``factor`` as LoKr's (-1: as square as possible)."""

    full_matrix: bool = True


@register_method("diffusekrona")
@dataclasses.dataclass
class DiffuseKronA(LoKr):
    """DiffuseKronA: full 64 x 8 A (x) B on the U-Net attention projections, A ~ N(0, 1/64^2), B = 0."""

    w1_init = "normal"
    target: Target | str | None = "unet-attn"
    factor: int | tuple = (64, 8)
    full_matrix: bool = True


class KronDelta(WeightDelta):
    def __init__(self, config: LoKr, site: str, base: nn.Module, init: bool = True):
        super().__init__(config, site)
        p = self.plan = config.plan(base, site)
        (a, b), (c, d), k, r = p.out, p.inp, p.kernel, p.r
        self.scaling = p.scale
        factory = {"device": base.weight.device if init else "meta", "dtype": adapter_dtype(base)}

        def param(*shape):
            return nn.Parameter(torch.empty(shape, **factory))

        if p.w1_lowrank:
            self.lokr_w1_a, self.lokr_w1_b = param(a, r), param(r, c)
        else:
            self.lokr_w1 = param(a, c)
        if p.w2 == "full":
            self.lokr_w2 = param(b, d, *k)
        elif p.w2 == "tucker":
            self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b = param(r, r, *k), param(r, b), param(r, d)
        else:  # a conv kernel is flattened into W2b's columns, as LyCORIS stores it
            self.lokr_w2_a, self.lokr_w2_b = param(b, r), param(r, d * math.prod(k))
        # Per-token multiply-adds of (W1 (x) W2) x = vec(W1 X W2^T), W2 applied first or W1 first, against
        # the dense x dW^T. Conv layers always take the dense path (one dW, the layer's own conv op).
        w2_cost = (lambda rows: rows * d * b) if p.w2 == "full" else (lambda rows: rows * r * (d + b))
        w2_first, w1_first = w2_cost(c) + a * c * b, a * c * d + w2_cost(a)
        self.w2_first = w2_first <= w1_first
        self.factored = not k and min(w2_first, w1_first) < a * b * c * d
        if init:
            self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        normal_w1 = hasattr(self, "lokr_w1") and self.config.w1_init == "normal"
        if normal_w1:
            nn.init.normal_(self.lokr_w1, std=1.0 / self.lokr_w1.shape[0])
        for name in ("lokr_t2", "lokr_w2_a") + (() if normal_w1 else ("lokr_w1", "lokr_w1_a", "lokr_w1_b")):
            if hasattr(self, name):
                nn.init.kaiming_uniform_(getattr(self, name), a=math.sqrt(5))
        nn.init.zeros_(self.lokr_w2 if hasattr(self, "lokr_w2") else self.lokr_w2_b)  # dW = 0 at init

    def _w1(self) -> torch.Tensor:
        return self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a @ self.lokr_w1_b

    def _w2(self) -> torch.Tensor:
        """W2 as b x d x kernel."""
        if hasattr(self, "lokr_w2"):
            return self.lokr_w2
        if hasattr(self, "lokr_t2"):
            return tucker(self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
        return (self.lokr_w2_a @ self.lokr_w2_b).view(self.plan.out[1], self.plan.inp[1], *self.plan.kernel)

    def _dw(self, s: float) -> torch.Tensor:
        """s * (W1 (x) W2), shaped like the base weight; s goes onto the small W1."""
        w1, w2 = self._w1(), self._w2()
        w1 = w1 * s if s != 1.0 else w1
        return torch.kron(w1.view(*w1.shape, *[1] * len(self.plan.kernel)), w2)

    def delta_weight(self) -> torch.Tensor:
        return self._dw(self.scaling)

    def forward(self, base, x, out, weight):
        s = weight * self.scaling
        if not self.factored:  # convolutions, and linears whose factors save nothing: dW, the layer's own op
            dw = self._dw(s)
            return weight_op(base, x.to(dw.dtype), dw).to(out.dtype).add_(out)
        # never builds dW (kronecker.py); the scale rides on the small W1, the base output is added in place
        w1 = self._w1()
        w1 = w1 * s if s != 1.0 else w1
        w2a, w2b = (self.lokr_w2, None) if hasattr(self, "lokr_w2") else (self.lokr_w2_a, self.lokr_w2_b)
        return kron_matmul(x.to(w1.dtype), w1, w2a, w2b, not self.w2_first).to(out.dtype).add_(out)
