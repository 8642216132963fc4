"""LoHa — low-rank Hadamard product, from Hyeon-Woo et al., "FedPara: Low-Rank Hadamard Product for
Communication-Efficient Federated Learning", arXiv 2108.06098, as LyCORIS (lycoris-lora) defines it.

    dW = (W1a W1b) * (W2a W2b) * alpha / r          (* = elementwise product)

with W1a, W2a in R^{out x r} and W1b, W2b in R^{r x in*k}: two rank-r matrices whose Hadamard product has
rank up to r^2 for 4 r (in + out) parameters. With ``use_tucker`` on k x k convolutions each factor is a
Tucker product instead, R[p, q, ...] = sum_ij T[i, j, ...] A[i, p] B[j, q] (FedPara's Prop. 3), with
T in R^{r x r x k...}, A in R^{r x out}, B in R^{r x in}. Initialisation is LyCORIS': W1a ~ N(0, 0.1^2),
W1b, W2b ~ N(0, 1), T ~ N(0, 0.1^2) and W2a = 0, so dW = 0 at init.

Trained: all factors. Saved: ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b`` (+ ``hada_t1``,
``hada_t2``), the LyCORIS names and shapes, so a LyCORIS file maps 1:1. Merges exactly (W += dW).
Serves Linear and Conv1d/2d/3d layers (any kernel); other layer types are an error at inject time.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ..config import MethodConfig
from ..core import WeightDelta, is_transposed, layer_dims, weight_op
from ..registry import register_method
from ..target import lookup
from .lora import adapter_dtype


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def check_rank_alpha(method: str, r, alpha, rank_pattern: dict, alpha_pattern: dict) -> None:
    """The rank / alpha validation LoHa and the Kronecker family share (LoRA's rules)."""
    bad = {k: v for k, v in {"r": r, **rank_pattern}.items() if not _positive_int(v)}
    if bad:
        raise ValueError(f"{method} ranks (r, rank_pattern) must be positive integers, got {bad}")
    alphas = {"alpha": alpha} if alpha is not None else {}
    bad = {k: v for k, v in {**alphas, **alpha_pattern}.items()
           if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)}
    if bad:
        raise ValueError(f"{method} alpha values must be finite numbers, got {bad}")


def weight_layer_dims(base: nn.Module, site: str, method: str) -> tuple[int, int, tuple[int, ...]]:
    """(in, out, kernel) of a layer whose weight is (out, in / groups, *kernel); anything else is an error."""
    if is_transposed(base) or getattr(base, "transposed", False) or \
            not isinstance(base, (nn.Linear, nn.modules.conv._ConvNd)):
        raise TypeError(f"{method} serves Linear and Conv1d/Conv2d/Conv3d layers; {site} is a "
                        f"{type(base).__name__} (leave it out of the target)")
    return layer_dims(base)


def tucker(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """R[p, q, ...] = sum_ij t[i, j, ...] a[i, p] b[j, q]: LyCORIS' Tucker rebuild (a: rank x out, b: rank x in).

    Contiguous: einsum may return permuted strides, and a conv weight with those runs channels-last, which
    changes the memory format (and the rounding) of everything downstream."""
    return torch.einsum("ij...,ip,jq->pq...", t, a, b).contiguous()


class _Hadamard(torch.autograd.Function):
    """s (A1 B1) * (A2 B2) that keeps only the four factors for backward and rebuilds the two products there:
    plain autograd would hold both out x in products per layer until backward (LyCORIS does the same)."""

    @staticmethod
    def forward(ctx, a1, b1, a2, b2, s: float):
        ctx.save_for_backward(a1, b1, a2, b2)
        ctx.s = s
        return ((a1 * s) @ b1).mul_(a2 @ b2)  # the scale rides on the small factor, not on out x in

    @staticmethod
    def backward(ctx, grad):
        a1, b1, a2, b2 = ctx.saved_tensors
        s = ctx.s
        g1 = (a2 @ b2).mul_(grad)  # d/d(A1 B1), without s: it goes onto the rank-r results below
        ga1, gb1 = (g1 @ b1.T).mul_(s), (a1.T @ g1).mul_(s)
        del g1
        g2 = (a1 @ b1).mul_(grad)
        return ga1, gb1, (g2 @ b2.T).mul_(s), (a2.T @ g2).mul_(s), None


@register_method("loha")
@dataclasses.dataclass
class LoHa(MethodConfig):
    """Hadamard product of two rank-r updates, scale alpha / r (alpha None or 0: alpha = r, as LyCORIS).

    rank_pattern / alpha_pattern: {name pattern: value} overrides per module (the longest match wins).
    use_tucker: Tucker factors on convolutions with a kernel larger than 1 (1x1 convs and Linears keep the
    plain factors, as in LyCORIS).
    """

    category = "reparameterization"
    param_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    r: int = 8
    alpha: float | None = None
    use_tucker: bool = False
    rank_pattern: dict = dataclasses.field(default_factory=dict)
    alpha_pattern: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        check_rank_alpha("LoHa", self.r, self.alpha, self.rank_pattern, self.alpha_pattern)

    def rank(self, site: str) -> int:
        return lookup(self.rank_pattern, site, self.r)

    def scale(self, site: str) -> float:
        r = self.rank(site)
        alpha = lookup(self.alpha_pattern, site, self.alpha)
        return (alpha or r) / r

    def build(self, base: nn.Module, site: str, init: bool = True) -> "LoHaDelta":
        return LoHaDelta(self, site, base, init)


class LoHaDelta(WeightDelta):
    def __init__(self, config: LoHa, site: str, base: nn.Module, init: bool = True):
        super().__init__(config, site)
        n_in, n_out, kernel = weight_layer_dims(base, site, "LoHa")
        r = config.rank(site)
        self.scaling = config.scale(site)
        self.shape = (n_out, n_in, *kernel)
        self.tucker = config.use_tucker and any(k != 1 for k in kernel)
        factory = {"device": base.weight.device if init else "meta", "dtype": adapter_dtype(base)}

        def param(*shape):
            return nn.Parameter(torch.empty(shape, **factory))

        if self.tucker:
            self.hada_w1_a, self.hada_w1_b = param(r, n_out), param(r, n_in)
            self.hada_w2_a, self.hada_w2_b = param(r, n_out), param(r, n_in)
            self.hada_t1, self.hada_t2 = param(r, r, *kernel), param(r, r, *kernel)
        else:  # a conv kernel is flattened into the input side, as LyCORIS stores it
            n_cols = n_in * math.prod(kernel)
            self.hada_w1_a, self.hada_w1_b = param(n_out, r), param(r, n_cols)
            self.hada_w2_a, self.hada_w2_b = param(n_out, r), param(r, n_cols)
        if init:
            self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        if self.tucker:
            nn.init.normal_(self.hada_t1, std=0.1)
            nn.init.normal_(self.hada_t2, std=0.1)
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.normal_(self.hada_w2_b, std=1.0)
        nn.init.zeros_(self.hada_w2_a)  # dW = 0 at init; gradients still reach every factor through W2a

    def _dw(self, s: float) -> torch.Tensor:
        """s * dW / scale, shaped like the base weight."""
        if self.tucker:
            return tucker(self.hada_t1, self.hada_w1_a * s, self.hada_w1_b) * \
                tucker(self.hada_t2, self.hada_w2_a, self.hada_w2_b)
        dw = _Hadamard.apply(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, s)
        return dw.view(self.shape)

    def delta_weight(self) -> torch.Tensor:
        return self._dw(self.scaling)

    def forward(self, base, x, out, weight):
        # The adapter weight joins the scale inside dW, and the base output is added into the fresh
        # result in place: no output-sized multiply and no extra output-sized temporary.
        dw = self._dw(weight * self.scaling)
        return weight_op(base, x.to(dw.dtype), dw).to(out.dtype).add_(out)
