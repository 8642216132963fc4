"""LT-SFT — Ansell, Ponti, Korhonen and Vulić, "Composable Sparse Fine-Tuning for Cross-Lingual Transfer",
arXiv 2110.07560 (Lottery-Ticket Sparse Fine-Tuning).

Sec. 3.1: (1) fine-tune the candidate parameters densely, theta_0 -> theta_1; (2) keep the k entries that
changed most, mask = top_k |theta_1 - theta_0|; (3) rewind to theta_0 and fine-tune only the kept entries:
theta = theta_0 + scatter(v), v in R^k. Step (1) is the scoring pass ``peft_diffusion.api.prepare(model,
loss_fn, batches)``: ``scoring_batches`` AdamW steps at ``dense_lr`` on float32 copies of the selected
tensors (the rest of the model as it is), after which every tensor is restored bit for bit. Differences from
the paper: phase (1) is short (the paper runs it as long as phase 3) and k is chosen per tensor
(round(density * numel)), not over the whole model; the paper's L1 regularisation towards theta_0 in
phase 3 is left to the optimizer's weight decay, which pulls v towards 0, i.e. theta towards theta_0.

Trained: ``values`` (k per tensor). Saved: ``indices`` (int32 where they fit) and ``values``. Merges exactly.
Until the scoring pass runs, each tensor's entries are a random subset.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..registry import register_method
from .sparse import SelectiveConfig, SparseDelta, dense_change, set_top_k


@register_method("lt-sft")
@dataclasses.dataclass
class LTSFT(SelectiveConfig):
    """Sparse fine-tuning of the ``density`` most-changed entries per tensor after a short dense fine-tune."""

    param_names = ("indices", "values")

    scoring_batches: int = 8
    dense_lr: float = 1e-4

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.scoring_batches, bool) or not isinstance(self.scoring_batches, int) or self.scoring_batches < 1:
            raise ValueError(f"LTSFT scoring_batches must be a positive integer, got {self.scoring_batches!r}")
        if isinstance(self.dense_lr, bool) or not isinstance(self.dense_lr, (int, float)) or not (
                math.isfinite(self.dense_lr) and self.dense_lr > 0):
            raise ValueError(f"LTSFT dense_lr must be a positive number, got {self.dense_lr!r}")

    def build(self, param: torch.Tensor, site: str, init: bool = True) -> SparseDelta:
        return SparseDelta(self, site, param, init)

    def prepare(self, deltas: dict, loss_fn, batches: list) -> str:
        """Dense fine-tune over the first ``scoring_batches`` batches, keep the most-changed entries, rewind."""
        used = batches[: self.scoring_batches]
        change = dense_change(deltas, loss_fn, used, self.dense_lr)
        return set_top_k(deltas, change, f"LT-SFT mask ({len(used)} dense steps at lr {self.dense_lr:g})")
