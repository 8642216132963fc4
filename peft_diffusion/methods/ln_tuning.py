"""LN tuning — Zhao et al., "Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM Finetuning",
arXiv 2312.11420 (peft's ``LNTuningConfig``).

Only the normalisation layers train: LN(x) = (gamma + d_gamma) * (x - mu) / sigma + (beta + d_beta), every
other weight frozen, d trained from zero (the paper tunes the LayerNorms inside each attention block of the
LLM; here every normalisation layer the target selects). Default target: every LayerNorm, GroupNorm and
RMSNorm-like layer of the model, matched by class name (torch's ``LayerNorm``/``GroupNorm``, transformers'
``LlamaRMSNorm``, ``T5LayerNorm``..., diffusers' ``RMSNorm``, ``FP32LayerNorm``), resolved to the class names
found so the file records them. On BERT-base this is peft's ``LNTuningConfig`` set, 38,400 parameters
(tests/test_selective_dense.py).

Trained: a dense delta per norm weight and bias. Saved: ``<module>.weight.delta`` / ``.bias.delta``.
Merges exactly (gamma += d_gamma, beta += d_beta).
"""
from __future__ import annotations

import dataclasses

from torch import nn

from ..registry import register_method
from ..target import Target
from .dense import DenseSelective, norm_classes


@register_method("ln-tuning")
@dataclasses.dataclass
class LNTuning(DenseSelective):
    """Normalisation-layer weights and biases; ``target`` left empty = every norm layer of the model."""

    def resolved(self, model: nn.Module) -> "LNTuning":
        if self.target is not None:
            return self
        names = norm_classes(model)
        if not names:
            raise ValueError(f"{type(model).__name__} has no LayerNorm, GroupNorm or RMSNorm layer with "
                             "parameters: LN tuning has nothing to train (pass target=... to choose parameters)")
        return dataclasses.replace(self, target=Target(types=names))
