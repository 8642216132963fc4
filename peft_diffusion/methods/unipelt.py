"""UniPELT — Mao et al., "UniPELT: A Unified Framework for Parameter-Efficient Language Model Tuning",
arXiv 2110.07577 (Sec. 3, Fig. 1).

A union of three existing parts, each multiplied by a learned gate G in (0, 1) computed from the input of the
part (Sec. 3: G_m = sigmoid(W_Gm x), W_Gm: d -> 1, with a bias here); as the official code's adapter and prefix
gates, G is the sigmoid averaged over the tokens, one per example: G = mean_t sigmoid(W x_t + b):

- LoRA on the query and value projections (``lora.py``): h = W0 x + G_L (alpha / r) B A x, x the projection's
  input (the pooling of the LoRA gate follows the two gates whose official code we read);
- prefix tuning on every attention layer (``prefix_tuning.py`` / ``prefix_kv.py``): the layer's prefixes
  become G_P P_k, G_P P_v, x the attention module's input (the official ``prefix_gate``, padding included in
  the mean);
- a serial bottleneck adapter after the feed-forward sub-layer (``bottleneck.py``, Pfeiffer placement, as the
  UniPELT code): h <- h + G_A adapter(h), x = h the adapter's input (the official ``Adapter.gate``; its
  optional LayerNorm before the adapter is not part of ours).

With every gate at 1 it is exactly LoRA + prefix tuning + a Pfeiffer adapter applied separately (tested).
Defaults (UniPELT's settings as far as we know them; state them when reporting): prefix length 10 with the MLP
reparameterisation (hidden 512, folded on the trainer's last step as ``PrefixTuning``), LoRA r = 8, alpha =
16 on query / value, adapter bottleneck 48, ReLU. The gates are nn.Linear's default init (G about 0.5).

Trained: the three parts and their gates. Saved: one file: ``prefix`` (or ``embedding.weight`` /
``transform.*``) and ``prefix_gate.<layer>.*`` at site "", ``<q/v>.lora_A.weight`` / ``.lora_B.weight`` /
``.gate.*``, ``<ffn>.adapter_down.*`` / ``.adapter_up.*`` / ``.gate.*``. Does not merge (the LoRA gate depends
on the input). Not the identity at init: the prefixes change attention from the first step (LoRA B = 0 and
adapter W_up, b_up = 0 give the identity for those two parts). Prefix gating is on the cache path (LLaMA,
BERT) and diffusers' cross-attention; CLIP's recomputed attention is refused.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from ..config import as_target
from ..core import Delta, layer_dims
from ..registry import register_method
from ..target import Target
from .bottleneck import Bottleneck, BottleneckDelta
from .lora import LoRA, LoRADelta
from .mam import HybridPrefixSource
from .pfeiffer import Pfeiffer
from .prefix_kv import ATTENTION, PrefixCache, PrefixInject, attention_modules
from .prefix_source import PrefixKV
from .prefix_tuning import PrefixTuning

QUERY_VALUE = Target(include=("query", "value", "q_proj", "v_proj", "to_q", "to_v"))
QUERY_ATTRS = ("q_proj", "query", "to_q")


def _gate(width: int, like: torch.Tensor, init: bool) -> nn.Linear:
    return nn.Linear(width, 1, device=like.device if init else "meta", dtype=like.dtype)


def pooled(gate: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """G = mean over the tokens of sigmoid(W x_t + b), one per example ([batch, 1, ..., 1]; a 2-d input: one
    per row), as the official code's gates."""
    g = torch.sigmoid(gate(x.to(gate.weight.dtype)))
    return g.mean(dim=tuple(range(1, g.dim() - 1)), keepdim=True) if g.dim() > 2 else g


class GatedLoRADelta(LoRADelta):
    """h = W0 x + G_L * s B A x, G_L = mean_t sigmoid(gate(x_t)) per example."""

    mergeable = False
    merge = Delta.merge
    unmerge = Delta.unmerge

    def __init__(self, config, site: str, base: nn.Module, init: bool = True):
        if layer_dims(base)[2]:
            raise ValueError(f"UniPELT's LoRA part gates linear projections; {site} is a {type(base).__name__}")
        super().__init__(config, site, base, init)
        self.gate = _gate(layer_dims(base)[0], self.lora_A.weight, init)

    def forward(self, base, x, out, weight):
        xa = x.to(self.lora_A.weight.dtype)
        h = self.lora_B(self.lora_A(self.dropout(xa))) * (weight * self.scaling)
        return out + (pooled(self.gate, xa) * h).to(out.dtype)


class GatedAdapterDelta(BottleneckDelta):
    """h <- h + G_A * adapter(h) on the feed-forward output, G_A = mean_t sigmoid(gate(h_t)) per example."""

    def __init__(self, config, site: str, module: nn.Module, init: bool = True):
        super().__init__(config, site, module, init)
        self.gate = _gate(self.adapter_down.in_features, self.adapter_down.weight, init)

    def branch(self, h, weight):
        return super().branch(h, weight) * pooled(self.gate, h).to(h.dtype)


class GatedPrefixCache(PrefixCache):
    """[G_P P_k; K], [G_P P_v; V]; ``gate`` [batch]."""

    def __init__(self, keys, values, inner, gate):
        super().__init__(keys, values, inner)
        self.gate = gate

    def update(self, key, value, layer_idx, *args, **kwargs):
        if self.inner is not None:
            key, value = self.inner.update(key, value, layer_idx, *args, **kwargs)
        b, g = key.shape[0], self.gate.to(key.dtype).view(-1, 1, 1, 1)
        pk = self.keys.to(key.dtype).unsqueeze(0).expand(b, -1, -1, -1) * g
        pv = self.values.to(value.dtype).unsqueeze(0).expand(b, -1, -1, -1) * g
        return torch.cat([pk, key], 2), torch.cat([pv, value], 2)


class GatedPrefixInject(PrefixInject):
    """One layer's prefixes times G_P = mean_t sigmoid(W x_t + b) (per example) from the module's input."""

    gate_value = None

    def gate(self, hidden: torch.Tensor) -> torch.Tensor:
        return pooled(self.source[0].prefix_gate[self.layer], hidden).flatten()

    def pre(self, module, args, kwargs, weight):
        if self.how == "projection" and weight != 0:
            self.gate_value = self.gate(args[0] if args else kwargs["hidden_states"])
        out = super().pre(module, args, kwargs, weight)
        if out is None or self.how != "cache":
            return out
        (hidden,), kw = out
        c = kw["past_key_values"]
        kw["past_key_values"] = GatedPrefixCache(c.keys, c.values, c.inner, self.gate(hidden))
        return out

    def prepend(self, proj: nn.Module, rows: torch.Tensor) -> None:
        g = self.gate_value

        def hook(layer, args, out):
            handle.remove()
            self.pending.remove(handle)
            r = rows.to(out.dtype).expand(out.shape[0], -1, -1) * g.to(out.dtype).view(-1, 1, 1)
            return torch.cat([r, out], 1)

        handle = proj.register_forward_hook(hook)
        self.pending.append(handle)


class GatedPrefixSource(HybridPrefixSource):
    """The prefix table (or its MLP) plus one gate per attention layer (``prefix_gate``)."""

    inject_class = GatedPrefixInject

    def __init__(self, config, site: str, model: nn.Module, init: bool = True):
        super().__init__(config, site, model, init)
        ref = next(model.parameters())
        like = torch.empty(0, device=ref.device, dtype=torch.float32 if ref.dtype in (torch.float16, torch.bfloat16)
                           else ref.dtype)
        widths = [next(getattr(m, a) for a in QUERY_ATTRS if hasattr(m, a)).weight.shape[1]
                  for _, m in attention_modules(model, "UniPELT")]
        self.prefix_gate = nn.ModuleList(_gate(w, like, init) for w in widths)


@register_method("unipelt")
@dataclasses.dataclass
class UniPELT(PrefixKV):
    """Gated LoRA (``r``, ``alpha``, ``lora_target``: default the query / value projections) + gated prefix
    tuning (``num_virtual_tokens``, ``prefix_projection``, ``encoder_hidden_size``) + a gated Pfeiffer adapter
    (``size`` / ``reduction``, ``activation``). Every delta carries this config."""

    category: ClassVar[str] = "hybrid"
    param_names: ClassVar[tuple[str, ...]] = (PrefixKV.param_names + LoRA.param_names + Bottleneck.param_names
                                              + ("gate.weight", "gate.bias", "prefix_gate."))
    roles: ClassVar[tuple[str, ...]] = Pfeiffer.roles  # read by ``Bottleneck.select``
    _lora_sites = frozenset()  # set on the copy ``bind`` returns (not a field)

    num_virtual_tokens: int = 10
    prefix_projection: bool = True
    encoder_hidden_size: int | None = 512
    r: int = 8
    alpha: float | None = 16
    dropout: float = 0.0
    init: str = "kaiming"
    rslora: bool = False
    fa: bool = False
    rank_pattern: dict = dataclasses.field(default_factory=dict)
    alpha_pattern: dict = dataclasses.field(default_factory=dict)
    lora_target: Target | str | None = None
    size: int | None = 48
    reduction: int = 16
    activation: str = "relu"

    rank = LoRA.rank
    scale = LoRA.scale

    def __post_init__(self):
        super().__post_init__()
        self.lora_target = as_target(self.lora_target, "UniPELT lora_target")
        try:  # each part's own checks
            LoRA(r=self.r, alpha=self.alpha, dropout=self.dropout, init=self.init, rslora=self.rslora, fa=self.fa,
                 rank_pattern=self.rank_pattern, alpha_pattern=self.alpha_pattern)
            Pfeiffer(size=self.size, reduction=self.reduction, activation=self.activation)
        except ValueError as e:
            raise ValueError(f"UniPELT: {e}") from e

    def bind(self, obj, model: nn.Module, name: str) -> "UniPELT":
        try:
            bound = super().bind(obj, model, name)
            bad = sorted({type(m).__name__ for _, m in attention_modules(model, "UniPELT's prefix part")
                          if ATTENTION[type(m).__name__][1] == "recompute"})
            if bad:
                raise ValueError(f"UniPELT's gated prefixes do not support {bad} in this {type(model).__name__} "
                                 "(recomputed attention); supported: LlamaAttention, BertSelfAttention, diffusers "
                                 "cross-attention")
        except ValueError as e:
            raise ValueError(e.args[0] if e.args[0].startswith("UniPELT's") else f"UniPELT's prefix part: {e}") from e
        lora = (self.lora_target or QUERY_VALUE).select(model, "host")
        if not lora:
            raise ValueError(f"UniPELT's LoRA part: lora_target {self.lora_target or QUERY_VALUE} matches no layer "
                             f"of this {type(model).__name__}")
        bound._lora_sites = frozenset(lora)
        return bound

    def select(self, model: nn.Module) -> list[str]:
        try:
            ffn = Bottleneck.select(self, model)
        except ValueError as e:
            raise ValueError(f"UniPELT's adapter part: {e}") from e
        both = sorted(self._lora_sites & set(ffn))
        if both:
            raise ValueError(f"UniPELT: lora_target selects the adapter's sites {both[:3]}; the parts need their own")
        lora = [s for s in (self.lora_target or QUERY_VALUE).select(model, "host") if s in self._lora_sites]
        return [""] + lora + ffn

    def kind_of(self, model: nn.Module, site: str) -> str:
        return "host" if site in self._lora_sites else "annex"

    def build(self, base: nn.Module, site: str, init: bool = True):
        if site == "":
            return GatedPrefixSource(self, site, base, init)
        if site in self._lora_sites:
            return GatedLoRADelta(self, site, base, init)
        return GatedAdapterDelta(self, site, base, init)

    after_step = PrefixTuning.after_step  # folds the prefix MLP on the trainer's last step

    def prefix_part(self) -> PrefixTuning:
        """The prefix tuning of these settings (ungated)."""
        return PrefixTuning(num_virtual_tokens=self.num_virtual_tokens, prefix_projection=self.prefix_projection,
                            encoder_hidden_size=self.encoder_hidden_size, geometry=self.geometry)

    def lora_part(self) -> LoRA:
        return LoRA(r=self.r, alpha=self.alpha, dropout=self.dropout, init=self.init, rslora=self.rslora, fa=self.fa,
                    rank_pattern=self.rank_pattern, alpha_pattern=self.alpha_pattern,
                    target=Target(include=tuple(sorted(self._lora_sites))) if self._lora_sites else self.lora_target)

    def adapter_part(self) -> Pfeiffer:
        return Pfeiffer(size=self.size, reduction=self.reduction, activation=self.activation)
