"""Compacter and Compacter++ — Mahabadi, Henderson, Ruder, "Compacter: Efficient Low-Rank Hypercomplex Adapter
Layers", arXiv 2106.04647.

A bottleneck adapter h <- h + PHM_up(f(PHM_down(h))) whose two projections are parameterized hypercomplex
multiplication layers (Eq. 3): PHM(x) = x W^T + b with W = sum_{i=1..n} A_i (x) B_i, where the "rules" A_i
(n x n) are SHARED by every adapter layer of the model and B_i = s_i t_i^T is low-rank (Eq. 5; rank 1 by
default). Here W is (out, in) in torch's layout: A_i (n, n), s_i (out / n, r), t_i (in / n, r); the math is
``kronecker.kron_sum``. n must divide the hidden size d and the bottleneck width m = d // reduction. (The
published code and AdapterHub compute y = x H with H = sum_i A_i (x) W_i (in, out), i.e. H = W^T: their rules
are ours transposed.) Activation: gelu by default (the paper's config uses the tanh approximation, gelu_new).
Compacter places adapters after the attention and after the feed-forward sub-layer (Houlsby's placement),
Compacter++ after the feed-forward sub-layer only (Pfeiffer's); placement per model family, the serial
residual and the activation come from ``bottleneck.py`` (the PHM layers replace its two Linears).

Shared rules: one (n, n, n) tensor ``phm_rule`` in a model-level annex (site "", as IP-Adapter keeps its image
projection there), and each adapter reads it at call time through the adapter's bound config (a plain
reference set when the rules are placed, cleared when removed). The rules therefore exist once in
``parameters()``, the optimizer and the file, get the summed gradient of every layer, and reach adapters
that run without the model's own forward (``model.encoder(...)`` in ``generate``), which a value handed
over by the model-level hook would not. One set serves the down and up projections of every adapter.

Trained: the rules and, per adapter, s_i, t_i and the bias of both PHM layers. Init: rules N(0, rule_std)
(the paper's config: 1e-4), s and t Glorot-uniform per i, biases zero, and the up-projection's s at zero, so
W_up = 0 and the model starts bit-exact (its t stays random: the first gradient of s_up is not zero). Saved:
``phm_rule`` on the model and ``<sub-layer>.adapter_down.s`` / ``.t`` / ``.bias``, ``.adapter_up.*`` per
adapter. Not mergeable (a nonlinearity sits between the projections): ``pd.fuse`` leaves it running and
``pd.fuse(pipe, [name])`` refuses. The paper also trains the layer norms: here that is ``LNTuning`` as a
second adapter.

Count (tests/test_compacter.py, T5-base's config on the meta device): Compacter++, reduction 32, n = 4,
rank 1: 57,088 = 24 FFN adapters x 2,376 + one 64-entry rule set; with LN tuning's 47,616 layer-norm weights
(the paper's config also trains them), 104,704 = 0.047 % of 222,903,552. The published code (one ``phm_rule``
on the T5 model, set into every PHM layer) has the same parts; the figure 104,768 quoted in issue 13 is 64 =
one (4, 4, 4) rule tensor more (as if down- and up-projections had a rule set each; neither that code nor
AdapterHub's ``adapters`` does that).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core import AnnexDelta
from ..registry import register_method
from .bottleneck import Bottleneck, BottleneckDelta, widths
from .kronecker import kron_sum


class _Rules:
    """The adapter's shared rules, as its PHM layers reach them: the model-level delta that holds them."""

    delta = None

    def get(self, site: str) -> torch.Tensor:
        if self.delta is None:
            raise RuntimeError(f"Compacter adapter at {site!r}: its shared rules (phm_rule, on the model's site "
                               "'') are not in this model; load the whole adapter file")
        return self.delta.phm_rule


class PHMLinear(nn.Module):
    """x W^T + b with W = sum_i A_i (x) s_i t_i^T; A comes from the shared rules at call time."""

    def __init__(self, d_in: int, d_out: int, n: int, rank: int, rules: _Rules, site: str, device, dtype,
                 init: bool):
        super().__init__()
        self.s = nn.Parameter(torch.empty(n, d_out // n, rank, device=device, dtype=dtype))
        self.t = nn.Parameter(torch.empty(n, d_in // n, rank, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(d_out, device=device, dtype=dtype))
        self.rules, self.where = rules, site  # plain attributes, not modules
        if init:
            for i in range(n):
                nn.init.xavier_uniform_(self.s[i])
                nn.init.xavier_uniform_(self.t[i])

    def weight(self) -> torch.Tensor:
        return kron_sum(self.rules.get(self.where).to(self.s.dtype), self.s, self.t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)


class CompacterDelta(BottleneckDelta):
    """One Compacter adapter beside one sub-layer: ``BottleneckDelta`` with PHM projections."""

    category = "hybrid"

    def __init__(self, config: "Compacter", site: str, module: nn.Module, init: bool = True):
        d, m = widths(config, module, site)
        n = config.phm_dim
        for what, width in (("hidden size d", d), ("bottleneck width m", m)):
            if width % n:
                how = f" (size {config.size})" if config.size else f" (d {d} // reduction {config.reduction})"
                raise ValueError(f"{type(config).__name__} at {site!r}: phm_dim n = {n} does not divide the {what} = "
                                 f"{width}{how if what.startswith('bottleneck') else ''}; d = {d}, m = {m}: pick an "
                                 "n that divides both (or another reduction / size)")
        super().__init__(config, site, module, init)

    def projection(self, d_in, d_out, device, dtype, init):
        cfg = self.config
        return PHMLinear(d_in, d_out, cfg.phm_dim, cfg.rank, cfg._rules, self.site, device, dtype, init)

    def zero_up(self) -> None:
        nn.init.zeros_(self.adapter_up.s)
        nn.init.zeros_(self.adapter_up.bias)


class RulesDelta(AnnexDelta):
    """The shared rules A (n, n, n) beside the whole model; it changes no call itself."""

    category = "hybrid"
    mergeable = False

    def __init__(self, config: "Compacter", site: str, model: nn.Module, init: bool = True):
        super().__init__(config, site)
        ref = next(model.parameters())
        dtype = torch.float32 if ref.dtype in (torch.float16, torch.bfloat16) else ref.dtype
        n = config.phm_dim
        self.phm_rule = nn.Parameter(torch.empty(n, n, n, device=ref.device if init else "meta", dtype=dtype))
        if init:
            nn.init.normal_(self.phm_rule, std=config.rule_std)

    def attach(self, site) -> None:
        self.config._rules.delta = self

    def detach(self, site) -> None:
        if self.config._rules.delta is self:
            self.config._rules.delta = None


@register_method("compacter")
@dataclasses.dataclass
class Compacter(Bottleneck):
    """PHM adapters after the attention and the feed-forward sub-layers. phm_dim: n; rank: r of B_i = s_i t_i^T;
    rule_std: the rules' init std; reduction (default 32, the paper's), size, activation (default gelu), target:
    as ``Bottleneck``."""

    category: ClassVar[str] = "hybrid"
    param_names: ClassVar[tuple[str, ...]] = ("phm_rule",) + tuple(
        f"adapter_{p}.{t}" for p in ("down", "up") for t in ("s", "t", "bias"))
    roles: ClassVar[tuple[str, ...]] = ("attn", "ffn")
    delta_class: ClassVar[type] = CompacterDelta

    reduction: int = 32
    activation: str = "gelu"
    phm_dim: int = 4
    rank: int = 1
    rule_std: float = 1e-4

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        for f in ("phm_dim", "rank"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} {f} must be a positive integer, got {v!r}")
        if isinstance(self.rule_std, bool) or not isinstance(self.rule_std, (int, float)) or not self.rule_std > 0:
            raise ValueError(f"{name} rule_std must be a positive number, got {self.rule_std!r}")

    def bind(self, obj, model: nn.Module, name: str) -> "Compacter":
        bound = dataclasses.replace(self)
        bound._rules = _Rules()  # one rule holder per adapter per model
        return bound

    def select(self, model: nn.Module) -> list[str]:
        return [""] + super().select(model)

    def build(self, base: nn.Module, site: str, init: bool = True):
        if not hasattr(self, "_rules"):
            self._rules = _Rules()
        if site == "":
            return RulesDelta(self, site, base, init)
        return CompacterDelta(self, site, base, init)


@register_method("compacter++")
@dataclasses.dataclass
class CompacterPP(Compacter):
    """Compacter++: PHM adapters after the feed-forward sub-layer only."""

    roles: ClassVar[tuple[str, ...]] = ("ffn",)
