"""MAM adapter — He et al., "Towards a Unified View of Parameter-Efficient Transfer Learning", arXiv 2110.04366
(Sec. 4.6, "Mix-And-Match adapter").

A union of two existing parts, with no gate (the paper has none):

- prefix tuning on every attention layer (``prefix_tuning.py``): head(x) = softmax(q [P_k; K]^T / sqrt(d))
  [P_v; V], trained through the MLP reparameterisation P = MLP(E) and folded to the plain [n, width] table
  on the trainer's last step, exactly as ``PrefixTuning``;
- a scaled parallel adapter beside every feed-forward sub-layer (``parallel_adapter.py``): out = FFN(x) +
  s * (f(x W_down + b_down) W_up + b_up) (Eq. 9 with scaling s; on BERT the branch joins ``BertOutput``'s
  residual input).

Defaults: the paper's MAM setting, "prefix tuning with l = 30 at attention, scaled parallel adapter with
r = 512 at FFN, s = 4" (Table 4 / Sec. 4.6), ReLU in the adapter; the prefix MLP's hidden width is left at
peft's default (the kv width; ``encoder_hidden_size`` sets it). Sites: the model itself ("", the prefix table
and its per-layer injections) and each block's FFN sub-layer (the parallel branch), one config, one file.
Trained: E and the MLP (or the table once folded / ``prefix_projection=False``), W_down, b_down, W_up, b_up
(W_up, b_up zero at init). Saved: ``prefix`` (or ``embedding.weight`` / ``transform.*``) at site "" and
``<ffn>.adapter_down.*`` / ``.adapter_up.*``. Does not merge. Not the identity at init: the prefixes change
attention from the first step (the adapter branch alone starts at zero).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import nn

from ..api import sites
from ..registry import register_method
from .bottleneck import Bottleneck
from .parallel_adapter import ParallelAdapter, ParallelDelta
from .prefix_source import PrefixKV, PrefixSource
from .prefix_tuning import PrefixTuning


@register_method("mam")
@dataclasses.dataclass
class MAM(PrefixKV):
    """Prefix tuning (n = ``num_virtual_tokens``) + a parallel adapter (``size`` / ``reduction``,
    ``activation``, ``scale``) on the feed-forward sub-layers. The deltas of both parts carry this config."""

    category: ClassVar[str] = "hybrid"
    param_names: ClassVar[tuple[str, ...]] = PrefixKV.param_names + Bottleneck.param_names
    roles: ClassVar[tuple[str, ...]] = ParallelAdapter.roles  # read by ``Bottleneck.select``

    num_virtual_tokens: int = 30
    prefix_projection: bool = True
    size: int | None = 512
    reduction: int = 16
    activation: str = "relu"
    scale: float = 4.0

    def __post_init__(self):
        super().__post_init__()
        try:
            self.adapter_part()  # the parallel adapter's own checks
        except ValueError as e:
            raise ValueError(f"MAM: {e}") from e

    def prefix_part(self) -> PrefixTuning:
        """The prefix tuning these settings describe (same tensors, same placement)."""
        return PrefixTuning(num_virtual_tokens=self.num_virtual_tokens, prefix_projection=self.prefix_projection,
                            encoder_hidden_size=self.encoder_hidden_size, geometry=self.geometry)

    def adapter_part(self) -> ParallelAdapter:
        """The parallel adapter these settings describe."""
        return ParallelAdapter(size=self.size, reduction=self.reduction, activation=self.activation,
                               scale=self.scale)

    def select(self, model: nn.Module) -> list[str]:
        # the FFN sites first ("MAM finds no block" names the part that does not apply); the prefix part's
        # attention was checked by ``bind``
        try:
            ffn = Bottleneck.select(self, model)
        except ValueError as e:
            raise ValueError(f"MAM's parallel-adapter part: {e}") from e
        return [""] + ffn

    def bind(self, obj, model: nn.Module, name: str) -> "MAM":
        try:
            return super().bind(obj, model, name)
        except ValueError as e:
            raise ValueError(f"MAM's prefix-tuning part: {e}") from e

    def build(self, base: nn.Module, site: str, init: bool = True):
        return HybridPrefixSource(self, site, base, init) if site == "" else ParallelDelta(self, site, base, init)

    def after_step(self, deltas: dict, step: int, total: int) -> None:
        PrefixTuning.after_step(self, deltas, step, total)  # folds the prefix MLP on the trainer's last step


class HybridPrefixSource(PrefixSource):
    """The prefix part of a hybrid: when it folds (the trainer's last step or ``fold_prefix``) every other part
    of its adapter takes the folded config too, so a saved file's header (written from one site's config)
    describes the table the file holds."""

    where: tuple = ()

    def attach(self, site) -> None:
        self.where = (site.owner[0], next(n for n, d in site.deltas.items() if d is self))
        super().attach(site)

    def fold(self) -> None:
        old = self.config
        super().fold()
        if self.where and self.config is not old:
            model, name = self.where
            for _, s in sites(model):
                delta = s.deltas[name] if name in s.deltas else None
                if delta is not None and delta.config is old:
                    delta.config = self.config

    def detach(self, site) -> None:
        super().detach(site)
        self.where = ()
