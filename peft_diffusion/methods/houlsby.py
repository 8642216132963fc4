"""Houlsby adapters — Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", arXiv 1902.00751.

Two serial bottleneck adapters per transformer block, one after the attention sub-layer and one after the
feed-forward sub-layer (Fig. 2): h <- h + f(h W_down + b_down) W_up + b_up on the sub-layer's output, before
the block adds its residual (and, in BERT, its LayerNorm). Placement per model and the shared module:
``bottleneck.py``. Trained: W_down, b_down, W_up, b_up per adapter (m = d // reduction, or ``size``); W_up and
b_up start at zero, so the model starts bit-exact. Saved: ``<sub-layer>.adapter_down.weight`` /
``.adapter_down.bias`` / ``.adapter_up.weight`` / ``.adapter_up.bias``. Not mergeable (f is nonlinear):
``pd.fuse(pipe)`` leaves it running, ``pd.fuse(pipe, [name])`` refuses. The original layer norms that the
paper also trains are a separate method here (``LNTuning``), to combine with it as a second adapter.

Counts (tests/test_bottleneck.py, meta-device builds): SD1.5's U-Net, reduction 16: 4,686,180 (0.545 %);
BERT-base, size 48: 1,789,056 (1.63 %); BERT-large, size 64: 6,343,680 (1.89 %, adapters alone).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from ..registry import register_method
from .bottleneck import Bottleneck, BottleneckDelta


@register_method("houlsby")
@dataclasses.dataclass
class Houlsby(Bottleneck):
    """Serial adapters after the attention and after the feed-forward sub-layers."""

    roles: ClassVar[tuple[str, ...]] = ("attn", "ffn")
    delta_class: ClassVar[type] = BottleneckDelta
