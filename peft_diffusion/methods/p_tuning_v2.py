"""P-tuning v2 — Liu et al., "P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning Universally Across
Scales and Tasks", arXiv 2110.07602.

Deep prompt tuning: n continuous prompts in every layer as that layer's prefix keys and values (Fig. 2 (b)),
head(x) = softmax(q [P_k^l; K]^T / sqrt(d)) [P_v^l; V], trained directly, without a reparameterisation
(Sec. 3.3; peft's ``PrefixTuningConfig(prefix_projection=False)``). The paper's task heads (a linear
classifier instead of verbalisers) are the model's own.

Trained and saved: the table ``prefix`` [n, sum over layers of 2 * kv width] (peft's flattened layout; N(0, 1)
at init, as peft). Does
not merge into the weights; not the identity at init (prefixes change attention by design). Placement, masks
and positions: ``prefix_kv.py`` (shared with prefix tuning).
"""
from __future__ import annotations

import dataclasses

from ..registry import register_method
from .prefix_source import PrefixKV


@register_method("p-tuning-v2")
@dataclasses.dataclass
class PTuningV2(PrefixKV):
    """Deep prompts: a plain prefix table trained directly."""

    def __post_init__(self):
        super().__post_init__()
        if self.prefix_projection:
            raise ValueError("PTuningV2 trains its prefixes directly (prefix_projection=False); use PrefixTuning for "
                             "the MLP reparameterisation")
