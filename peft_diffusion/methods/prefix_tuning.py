"""Prefix tuning — Li & Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", arXiv 2101.00190.

Every attention layer attends to n learned key/value vectors before the sequence's own (Sec. 4.2):
head(x) = softmax(q [P_k; K]^T / sqrt(d)) [P_v; V]. During training the prefixes are reparameterised
(Sec. 4.3, Eq. 5): P = MLP(E), E an [n, kv width] embedding, MLP = Linear -> tanh -> Linear to the table's width
(sum over layers of 2 * kv width; peft's ``PrefixTuningConfig(prefix_projection=True)``, same names and
layout). After training (the trainer's last step, or ``fold_prefix(model, name)``) only P is kept: the [n, width]
table ``prefix`` (peft's flattened past key values); E and the MLP are dropped, as the paper does.

Trained: E and the MLP (``prefix_projection=True``, the default) or the table itself (``False``). Saved: what the
adapter holds when saved: E and the MLP during training (checkpoints resume exactly), the folded table once
folded (what the trainer exports; peft also saves the folded table, ``io.peft_prefix.to_peft`` writes peft's
folder). Does not merge into the weights: the prefixes are extra keys and values. Not the identity at init (the
prefixes change attention by design). Placement, masks and positions (peft's): ``prefix_kv.py``. Supported
attention: LlamaAttention, BertSelfAttention, CLIPAttention, diffusers' cross-attention (the U-Net's attn2: a
prompt-tuning variant for diffusion, n free keys/values beside the text tokens').
"""
from __future__ import annotations

import dataclasses

from ..api import modules_of, sites
from ..registry import register_method
from .prefix_source import PrefixKV, PrefixSource


@register_method("prefix-tuning")
@dataclasses.dataclass
class PrefixTuning(PrefixKV):
    """Prefix tuning; ``prefix_projection`` (default True) trains through the MLP reparameterisation."""

    prefix_projection: bool = True

    def after_step(self, deltas: dict, step: int, total: int) -> None:
        """The trainer's last step folds the reparameterisation away, so its exported file holds the table."""
        if step >= total:
            for delta in deltas.values():
                if (isinstance(delta, PrefixSource) and delta.config.prefix_projection
                        and delta.embedding.weight.requires_grad):  # not a loaded, frozen adapter
                    delta.fold()


def fold_prefix(obj, name: str = "default") -> int:
    """Fold adapter ``name``'s reparameterisation into its plain prefix table (in every component); returns
    how many sources were folded (0: nothing to fold). The outputs stay the same; E and the MLP are gone."""
    folded = 0
    for model in modules_of(obj).values():
        for _, site in sites(model):
            delta = site.deltas[name] if name in site.deltas else None
            if isinstance(delta, PrefixSource) and delta.config.prefix_projection:
                delta.fold()
                folded += 1
    return folded
