"""Parallel adapter / AdaptFormer — He et al., "Towards a Unified View of Parameter-Efficient Transfer
Learning", arXiv 2110.04366; Chen et al., "AdaptFormer: Adapting Vision Transformers for Scalable Visual
Recognition", arXiv 2205.13535.

A scaled bottleneck branch beside each block's feed-forward sub-layer, fed with the feed-forward's input x:
out = FFN(x) + s * (f(x W_down + b_down) W_up + b_up) (He et al. Eq. 9 with scaling s; AdaptFormer's
AdaptMLP, s = 0.1 there). The block adds its residual afterwards. BERT adds the residual inside ``BertOutput``
before its LayerNorm; there the branch is added to that residual input, giving LN(FFN(x) + s f(x) + x).
Placement per model and the shared module: ``bottleneck.py``. Trained: W_down, b_down, W_up, b_up (m = d //
reduction, or ``size``); W_up and b_up start at zero (bit-exact start). Saved: ``<sub-layer>.adapter_down.*``
/ ``.adapter_up.*``. Not mergeable: ``pd.fuse(pipe)`` leaves it running, ``pd.fuse(pipe, [name])`` refuses.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from ..registry import register_method
from ..target import class_names
from .bottleneck import Bottleneck, BottleneckDelta


class ParallelDelta(BottleneckDelta):
    """out = FFN(x) + w * s * adapter(x); on ``BertOutput`` the residual input x becomes x + w * s * adapter(x)."""

    def __init__(self, config, site, module, init=True):
        super().__init__(config, site, module, init)
        self.residual_input = "BertOutput" in class_names(module)

    def pre(self, module, args, kwargs, weight):
        if not self.residual_input:
            return None
        w = weight * self.config.scale
        if len(args) > 1:
            return (args[0], args[1] + self.branch(args[1], w)) + tuple(args[2:]), kwargs
        return args, {**kwargs, "input_tensor": kwargs["input_tensor"] + self.branch(kwargs["input_tensor"], w)}

    def post(self, module, args, kwargs, output, weight):
        if self.residual_input:
            return None
        x = args[0] if args else next(v for k, v in kwargs.items() if k in ("hidden_states", "x"))
        return output + self.branch(x, weight * self.config.scale)


@register_method("parallel-adapter")
@dataclasses.dataclass
class ParallelAdapter(Bottleneck):
    """A parallel branch beside the feed-forward sub-layer; scale: s (AdaptFormer uses 0.1)."""

    roles: ClassVar[tuple[str, ...]] = ("parallel",)
    delta_class: ClassVar[type] = ParallelDelta

    scale: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            raise ValueError(f"ParallelAdapter scale must be a number, got {self.scale!r}")
