"""FISH mask — Sung, Nair and Raffel, "Training Neural Networks with Fixed Sparse Masks", arXiv 2111.09839.

Before training, the empirical Fisher information of every candidate parameter is estimated from a few
batches (sec. 3.1):

    F_hat(theta) = 1/N sum_i (d/d theta log p(y_i | x_i))^2,

here the squared gradient of the training loss per batch (per example when a batch holds one), and the mask
keeps the k entries with the largest F_hat; training then updates only those: theta = theta_0 + scatter(v),
v in R^k. Difference from the paper: k is chosen per tensor (round(density * numel), ``density_pattern``
for overrides), not over the whole model at once, so every tensor's share is fixed by the config and files
load by shape.

The scoring pass is ``peft_diffusion.api.prepare(model, loss_fn, batches)`` (the DreamBooth trainer runs it
with ``scoring_batches`` batches); until it runs, each tensor's entries are a random subset. Applied with an
index add (no dense delta tensor; optimizer state is 2k numbers per tensor under Adam).

Trained: ``values`` (k per tensor). Saved: ``indices`` (int32 where they fit) and ``values``: a file of about
(4 + 4) k bytes per tensor. Merges exactly (an in-place index add).
"""
from __future__ import annotations

import dataclasses

import torch

from ..registry import register_method
from .sparse import SelectiveConfig, SparseDelta, fisher, set_top_k


@register_method("fish")
@dataclasses.dataclass
class FISHMask(SelectiveConfig):
    """Fixed sparse mask of the top-``density`` Fisher entries per tensor, from ``scoring_batches`` batches."""

    param_names = ("indices", "values")

    scoring_batches: int = 8

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.scoring_batches, bool) or not isinstance(self.scoring_batches, int) or self.scoring_batches < 1:
            raise ValueError(f"FISHMask scoring_batches must be a positive integer, got {self.scoring_batches!r}")

    def build(self, param: torch.Tensor, site: str, init: bool = True) -> SparseDelta:
        return SparseDelta(self, site, param, init)

    def prepare(self, deltas: dict, loss_fn, batches: list) -> str:
        """Estimate the Fisher information over the first ``scoring_batches`` batches; keep its top-k entries."""
        used = batches[: self.scoring_batches]
        return set_top_k(deltas, fisher(deltas, loss_fn, used), f"FISH mask (Fisher over {len(used)} batches)")
