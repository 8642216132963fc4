"""BitFit — Ben Zaken, Ravfogel and Goldberg, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models", arXiv 2106.10199.

Only the bias terms train (Sec. 2): every affine map y = W x + b of the network becomes y = W x + (b + d),
W frozen, d trained from zero; the paper's BERT list is the biases of the query/key/value projections, the
attention output, both feed-forward layers and the LayerNorms' beta, which is every parameter named ``bias``.
It reports 0.09 % of BERT-base's and 0.08 % of BERT-large's parameters (Table 1); built here from their configs,
BitFit trains 102,912 of 109,482,240 (0.094 %) and 272,384 of 335,141,888 (0.081 %) (tests/test_selective_dense.py).

Target: every parameter named ``bias`` (the default), or ``target`` (e.g. only the query biases, the
paper's Sec. 4 variant: ``Target(include=(r".*query\\.bias",), types=())``).
Trained: one dense delta per bias. Saved: ``<module>.bias.delta``. Merges exactly (b += d).
"""
from __future__ import annotations

import dataclasses

from torch import nn

from ..registry import register_method
from ..target import Target
from .dense import DenseSelective

ALL_BIASES = Target(include=("bias",), types=())


@register_method("bitfit")
@dataclasses.dataclass
class BitFit(DenseSelective):
    """Bias terms only; ``target`` left empty = every parameter named ``bias``."""

    def resolved(self, model: nn.Module) -> "BitFit":
        return self if self.target is not None else dataclasses.replace(self, target=ALL_BIASES)

    def select(self, model: nn.Module) -> list[str]:
        found = super().select(model)
        if not found and self.target == ALL_BIASES:  # e.g. LLaMA: its linear layers are built without biases
            raise ValueError(f"BitFit trains bias terms and this {type(model).__name__} has no bias parameter: "
                             "nothing to train (LNTuning or DiffFit train its norm layers; target=... chooses "
                             "other parameters)")
        return found
