"""Diff pruning — Guo, Rush and Kim, "Parameter-Efficient Transfer Learning with Diff Pruning", arXiv 2012.07463.

The task's parameters are theta = theta_0 + delta with a sparse difference vector delta = z ⊙ w (eq. 2), the
gates z from the hard-concrete relaxation of the L0 norm (Louizos et al., arXiv 1712.01312):

    u ~ U(0, 1), s = sigmoid((log u - log(1 - u) + log_alpha) / beta), z = clamp(s (r - l) + l, 0, 1),

trained with the expected L0 penalty  lambda * sum sigmoid(log_alpha - beta log(-l / r))  (eq. 5) added to
the task loss: the config's ``regularizer(deltas)``, which ``peft_diffusion.api.regularizer`` sums and the
DreamBooth trainer adds to its loss (``l0_weight`` = lambda). Gates are sampled while the delta trains with
autograd on; otherwise (evaluation, merging) z = clamp(sigmoid(log_alpha) (r - l) + l, 0, 1). At the end of
training (``after_step`` at the last step, or ``delta.prune()``) delta is magnitude-pruned to ``density``
(sec. 3.3: the top round(density * numel) entries of |z ⊙ w| per tensor) and kept as a sparse delta.
Differences from the paper: no structured (group) penalty and no second fine-tuning phase with the pruned
mask fixed (the trainer's optimizer holds the dense tensors; a further run can load the pruned file with
``trainable=True``).

Trained: ``diff`` (w) and ``log_alpha``, both shaped like the parameter, w = 0 at init (identity). Saved:
before pruning ``diff`` and ``log_alpha`` (the training state); after pruning ``indices`` (int32 where they
fit) and ``values`` only, about 8 bytes per kept entry. Merges exactly in either form.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ..core import ParamDelta
from ..registry import register_method
from . import masks
from .sparse import SelectiveConfig, trained_dtype


@register_method("diff-pruning")
@dataclasses.dataclass
class DiffPruning(SelectiveConfig):
    """delta = z ⊙ w with hard-concrete gates (``beta``, stretch ``left``/``right``, gates start at
    ``init_log_alpha``), L0 penalty weight ``l0_weight``; magnitude-pruned to ``density`` at the end."""

    param_names = ("diff", "log_alpha", "indices", "values")

    density: float = 0.005
    l0_weight: float = 1.25e-7
    init_log_alpha: float = 5.0
    beta: float = 1.0
    left: float = -1.5
    right: float = 1.5

    def __post_init__(self):
        super().__post_init__()
        for key in ("l0_weight", "init_log_alpha", "beta", "left", "right"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"DiffPruning {key} must be a finite number, got {v!r}")
        if self.l0_weight < 0 or self.beta <= 0 or not self.left < 0 < 1 < self.right:
            raise ValueError(f"DiffPruning needs l0_weight >= 0, beta > 0 and left < 0 < 1 < right, got "
                             f"{self.l0_weight}, {self.beta}, {self.left}, {self.right}")

    def build(self, param: torch.Tensor, site: str, init: bool = True) -> "DiffPruningDelta":
        return DiffPruningDelta(self, site, param)

    def regularizer(self, deltas: dict) -> torch.Tensor | None:
        """l0_weight * the expected number of open gates over the unpruned deltas (None when all are pruned)."""
        terms = [masks.hard_concrete_l0(d.log_alpha, self.beta, self.left, self.right)
                 for d in deltas.values() if not d.pruned and d.log_alpha.requires_grad]
        return self.l0_weight * torch.stack(terms).sum() if terms else None

    def after_step(self, deltas: dict, step: int, total: int) -> None:
        if step >= total:
            for d in deltas.values():
                if not d.pruned:
                    d.prune()


class DiffPruningDelta(ParamDelta):
    category = "selective"

    def __init__(self, config: DiffPruning, site: str, param: torch.Tensor):
        super().__init__(config, site)
        self.numel, self.k = param.numel(), masks.entries(param.numel(), config.density_at(site))
        dtype = trained_dtype(param)
        self.diff = nn.Parameter(torch.zeros(param.shape, dtype=dtype, device=param.device))
        self.log_alpha = nn.Parameter(torch.full(param.shape, float(config.init_log_alpha), dtype=dtype,
                                                 device=param.device))
        self.pruned = False

    def gates(self, sample: bool) -> torch.Tensor:
        c = self.config
        return masks.hard_concrete(self.log_alpha, c.beta, c.left, c.right, sample)

    def value(self) -> torch.Tensor:  # the dense form
        c = self.config
        return masks.gated_diff(self.diff, self.log_alpha, c.beta, c.left, c.right,
                                self.training and torch.is_grad_enabled())

    def apply(self, param, weight):
        if self.pruned:
            return masks.sparse_apply(param, self.indices, self.values, weight)
        if self.training and torch.is_grad_enabled() and param.dtype == self.diff.dtype:
            c = self.config  # sampled gates: p + weight * z ⊙ w in one node (one pass, no z ⊙ w tensor)
            return masks.gated_diff(self.diff, self.log_alpha, c.beta, c.left, c.right, True, param, weight)
        return super().apply(param, weight)

    def merge(self, param, weight):
        if self.pruned:
            return masks.sparse_add_(param, self.indices, self.values, weight)
        return super().merge(param, weight)

    def unmerge(self, param, weight):
        if self.pruned:
            return masks.sparse_add_(param, self.indices, self.values, -weight)
        return super().unmerge(param, weight)

    def _become_sparse(self, indices: torch.Tensor, values: torch.Tensor, trainable: bool) -> None:
        del self.diff, self.log_alpha
        self.register_buffer("indices", indices.to(masks.index_dtype(self.numel)))
        self.values = nn.Parameter(values, requires_grad=trainable)
        self.pruned = True

    @torch.no_grad()
    def prune(self) -> None:
        """Keep the ``density`` largest |z ⊙ w| entries (evaluation gates) as indices + values."""
        if self.pruned:
            return
        delta = (self.gates(False) * self.diff).reshape(-1)
        idx = masks.top_k(delta.abs(), self.k).to(delta.device)
        self._become_sparse(idx, delta[idx].clone(), self.diff.requires_grad)

    def fit_file(self, tensors: dict) -> None:
        """A file holding ``indices`` and ``values`` (a pruned adapter) makes this delta the pruned form."""
        if "indices" in tensors and "values" in tensors and "diff" not in tensors:
            masks.check_sparse(tensors["indices"], tensors["values"], self.numel, self.site)
            device = self.diff.device
            self._become_sparse(torch.zeros(self.k, dtype=torch.long, device=device),
                                torch.zeros(self.k, dtype=self.diff.dtype, device=device), True)
        for key in ("diff", "log_alpha"):
            t = tensors.get(key)
            if t is not None and t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"{self.site}: {int((~torch.isfinite(t)).sum())} {key} values are not finite")
