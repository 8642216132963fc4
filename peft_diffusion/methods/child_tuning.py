"""Child-Tuning — Xu et al., "Raise a Child in Large Language Model: Towards Effective and Generalizable
Fine-tuning", arXiv 2109.05687.

Only a child network is updated: w_{t+1} = w_t - lr * (dL/dw_t ⊙ M_t) (eq. 4), in two variants.

- Child-Tuning_D (task-driven, ``ChildTuningD``): M is fixed before training, the top p_D entries of the
  Fisher information F(w) = 1/|D| sum_j (dL_j/dw)^2 (eq. 7-8) estimated from ``scoring_batches`` batches
  (``peft_diffusion.api.prepare``; the trainer runs it). A fixed mask is a sparse delta: ``indices`` +
  ``values``, applied with an index add, optimizer state only for the kept entries. Difference from the
  paper: p_D (``density``) is taken per tensor, not over the whole model at once.
- Child-Tuning_F (task-free, ``ChildTuningF``): a fresh mask every backward pass, M_t ~ Bernoulli(p_F), with
  the kept gradients scaled by 1/p_F so that their expectation is the full gradient (eq. 5-6); p_F is
  ``density``. Every entry can change, so the delta is dense (``delta``, shaped like the parameter, zero at
  init); the mask is applied to the gradient in the backward pass of the delta itself (an autograd function),
  so it holds whatever the optimizer. As in the paper's ChildTuningAdamW, the masked gradient then enters the
  optimizer, so Adam's momentum may still move an entry masked in this step (plain SGD moves exactly the
  kept entries). Under gradient accumulation each micro-step draws its own mask.

Trained: D ``values``; F ``delta``. Saved: D ``indices`` (int32 where they fit) + ``values``; F ``delta``.
Both merge exactly (an in-place add).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..core import ParamDelta
from ..registry import register_method
from . import masks
from .sparse import SelectiveConfig, SparseDelta, fisher, set_top_k, trained_dtype


@register_method("child-tuning-d")
@dataclasses.dataclass
class ChildTuningD(SelectiveConfig):
    """Child-Tuning_D: the top-``density`` Fisher entries per tensor, fixed, from ``scoring_batches`` batches."""

    param_names = ("indices", "values")

    density: float = 0.1
    scoring_batches: int = 8

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.scoring_batches, bool) or not isinstance(self.scoring_batches, int) or self.scoring_batches < 1:
            raise ValueError(f"ChildTuningD scoring_batches must be a positive integer, got {self.scoring_batches!r}")

    def build(self, param: torch.Tensor, site: str, init: bool = True) -> SparseDelta:
        return SparseDelta(self, site, param, init)

    def prepare(self, deltas: dict, loss_fn, batches: list) -> str:
        used = batches[: self.scoring_batches]
        return set_top_k(deltas, fisher(deltas, loss_fn, used), f"Child-Tuning_D (Fisher over {len(used)} batches)")


@register_method("child-tuning-f")
@dataclasses.dataclass
class ChildTuningF(SelectiveConfig):
    """Child-Tuning_F: a dense delta whose gradient keeps each entry with probability ``density`` per step."""

    param_names = ("delta",)

    density: float = 0.3

    def build(self, param: torch.Tensor, site: str, init: bool = True) -> "ChildTuningFDelta":
        return ChildTuningFDelta(self, site, param)


class _BernoulliGrad(torch.autograd.Function):
    """Identity forward; backward keeps each gradient entry with probability q, scaled by 1/q (eq. 5-6):
    E[M ⊙ g / q] = g. q is p itself for dyadic p (0.5, 0.25...), else p rounded to 32 bits (0.3 -> 1.2e-10
    off, below p's float32 resolution), and the scale uses that q, so the gradient stays exactly unbiased
    (``masks.bernoulli_keep``: 8 to 32 random bits per entry instead of one generator call each)."""

    @staticmethod
    def forward(ctx, x, p):
        ctx.p = p
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if ctx.p >= 1.0:
            return grad, None
        keep, q = masks.bernoulli_keep(grad, ctx.p)  # 0 / 1, then masked and scaled in place
        return keep.mul_(grad).mul_(1.0 / q), None


class ChildTuningFDelta(ParamDelta):
    category = "selective"

    def __init__(self, config: ChildTuningF, site: str, param: torch.Tensor):
        super().__init__(config, site)
        self.delta = nn.Parameter(torch.zeros(param.shape, dtype=trained_dtype(param), device=param.device))

    def value(self) -> torch.Tensor:
        d = self.delta
        return _BernoulliGrad.apply(d, self.config.density_at(self.site)) if d.requires_grad else d

    def fit_file(self, tensors: dict) -> None:
        t = tensors.get("delta")
        if t is not None and t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"{self.site}: {int((~torch.isfinite(t)).sum())} delta values are not finite")
