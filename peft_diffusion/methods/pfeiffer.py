"""Pfeiffer adapters — Pfeiffer et al., "AdapterFusion: Non-Destructive Task Composition for Transfer
Learning", arXiv 2005.00247.

One serial bottleneck adapter per transformer block, after the feed-forward sub-layer only (the
configuration their search found best, Sec. 3): h <- h + f(h W_down + b_down) W_up + b_up on the feed-forward
output, before the block's residual (and BERT's LayerNorm). Placement per model and the shared module:
``bottleneck.py``. Trained: W_down, b_down, W_up, b_up (m = d // reduction, or ``size``); W_up and b_up start
at zero (bit-exact start). Saved: ``<sub-layer>.adapter_down.*`` / ``.adapter_up.*``. Not mergeable:
``pd.fuse(pipe)`` leaves it running, ``pd.fuse(pipe, [name])`` refuses. AdapterFusion's second stage (a
learned attention over several trained adapters) is not part of this method.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from ..registry import register_method
from .bottleneck import Bottleneck, BottleneckDelta


@register_method("pfeiffer")
@dataclasses.dataclass
class Pfeiffer(Bottleneck):
    """A serial adapter after the feed-forward sub-layer of each block."""

    roles: ClassVar[tuple[str, ...]] = ("ffn",)
    delta_class: ClassVar[type] = BottleneckDelta
