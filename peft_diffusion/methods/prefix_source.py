"""Where the per-layer prefixes of prefix tuning and P-tuning v2 live, and their shared config.

One ``PrefixSource`` delta in an annex on the model itself (site "") holds either the table ``prefix``
[n, sum over layers of 2 * kv width] (P-tuning v2; prefix tuning once folded: per virtual token, layer 0's keys,
layer 0's values, layer 1's keys, ...; each kv heads x head dim; exactly peft's flattened ``prompt_embeddings``
when all layers have one width) or prefix tuning's reparameterisation P = MLP(E) (``embedding.weight``
[n, kv width of the first layer], ``transform.0`` -> hidden, tanh, ``transform.2`` hidden -> the table's width;
peft's layout and names). The config keeps each layer's (kv heads, head dim) (``geometry``), filled in from the
model and stored in files: a file for another model is refused naming both. When placed, the source puts the
per-layer injections of ``prefix_kv.py`` on the model's attention modules and takes them away when removed.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from ..config import MethodConfig
from ..core import Annex, AnnexDelta
from ..core.annex import unlink
from .prefix_kv import ATTENTION, SHIFTED_EMBEDDINGS, PositionShift, PrefixInject, attention_modules, describe, \
    geometry, offsets


@dataclasses.dataclass
class PrefixKV(MethodConfig):
    """Shared settings. num_virtual_tokens: n; prefix_projection: train through the MLP reparameterisation;
    encoder_hidden_size: the MLP's hidden width (None: the kv width, peft's default). geometry: (kv heads, head
    dim) per attention layer, filled in when bound to a model and stored in files (a file for another model is
    refused naming both)."""

    category: ClassVar[str] = "prompt"
    site_kind: ClassVar[str] = "annex"
    param_names: ClassVar[tuple[str, ...]] = ("prefix", "embedding.weight", "transform.0.weight", "transform.0.bias",
                                              "transform.2.weight", "transform.2.bias")

    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    geometry: tuple | None = None

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        if self.target is not None:
            raise ValueError(f"{name} puts prefixes in every supported attention layer; it takes no target")
        positive = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1  # noqa: E731
        for f in ("num_virtual_tokens", "encoder_hidden_size"):
            v = getattr(self, f)
            if (v is not None or f == "num_virtual_tokens") and not positive(v):
                raise ValueError(f"{name} {f} must be a positive integer, got {v!r}")
        if self.geometry is not None:  # lists from JSON files
            geo = self.geometry
            if not isinstance(geo, (list, tuple)) or not geo or not all(
                    isinstance(g, (list, tuple)) and len(g) == 2 and all(map(positive, g)) for g in geo):
                raise ValueError(f"{name} geometry must be a non-empty list of (kv heads, head dim) pairs of positive "
                                 f"integers, got {geo!r}")
            self.geometry = tuple(tuple(g) for g in geo)

    def bind(self, obj, model: nn.Module, name: str) -> "PrefixKV":
        found = geometry(model, type(self).__name__)
        if self.geometry is not None and self.geometry != found:
            raise ValueError(f"{type(self).__name__} {name!r} was made for {describe(self.geometry)}; this "
                             f"{type(model).__name__} has {describe(found)}")
        return dataclasses.replace(self, geometry=found)

    def width(self) -> int:
        """The table's row width: 2 * kv heads * head dim summed over the layers."""
        return offsets(self.geometry)[-1]

    def resolved(self, model: nn.Module) -> "PrefixKV":
        return self

    def select(self, model: nn.Module) -> list[str]:
        return [""]  # the source sits on the model; its injections go where ``attach`` finds attention

    def build(self, base: nn.Module, site: str, init: bool = True):
        return PrefixSource(self, site, base, init)


class PrefixSource(AnnexDelta):
    """All layers' prefixes of one adapter (see the module docstring); runs no hook itself."""

    category = "prompt"
    mergeable = False  # the prefixes are extra keys and values, not a change of the weights
    inject_class = PrefixInject  # the per-layer part (UniPELT's gated source puts a gated one)

    def __init__(self, config: PrefixKV, site: str, model: nn.Module, init: bool = True):
        super().__init__(config, site)
        ref = next(model.parameters())
        dtype = torch.float32 if ref.dtype in (torch.float16, torch.bfloat16) else ref.dtype
        kw = dict(device=ref.device if init else "meta", dtype=dtype)
        n, (h0, d0) = config.num_virtual_tokens, config.geometry[0]
        if config.prefix_projection:
            token, hidden = h0 * d0, config.encoder_hidden_size or h0 * d0
            self.embedding = nn.Embedding(n, token, **kw)
            self.transform = nn.Sequential(nn.Linear(token, hidden, **kw), nn.Tanh(),
                                           nn.Linear(hidden, config.width(), **kw))
        else:  # N(0, 1), as peft's nn.Embedding of the flattened table
            shape = (n, config.width())
            self.prefix = nn.Parameter(torch.randn(shape, **kw) if init else torch.empty(shape, **kw))
        self.links: list[tuple[Annex, AnnexDelta]] = []
        self.rotary: tuple = ()

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of one layer, each [kv heads, n, head dim]."""
        geo = self.config.geometry
        at = slice(*offsets(geo)[layer:layer + 2])
        if self.config.prefix_projection:  # only this layer's rows of the last projection
            h = self.transform[1](self.transform[0](self.embedding.weight))
            out = nn.functional.linear(h, self.transform[2].weight[at], self.transform[2].bias[at])
        else:
            out = self.prefix[:, at]
        k, v = out.unflatten(-1, (2, *geo[layer])).unbind(1)
        return k.transpose(0, 1), v.transpose(0, 1)

    def table(self) -> torch.Tensor:
        """Every layer's prefixes as one [n, width] table (detached when computed from the MLP)."""
        if not self.config.prefix_projection:
            return self.prefix
        return table_from_mlp(self.state_dict())

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the reparameterisation by the table it gives (what is saved from then on)."""
        if not self.config.prefix_projection:
            return
        trainable = self.embedding.weight.requires_grad
        table = self.table().detach().clone()
        del self.embedding, self.transform
        self.prefix = nn.Parameter(table, requires_grad=trainable)
        self.config = dataclasses.replace(self.config, prefix_projection=False)
        for _, delta in self.links:
            delta.config = self.config

    def fit_file(self, tensors: dict) -> None:
        t = tensors.get("prefix")
        want = (self.config.num_virtual_tokens, self.config.width())
        if t is not None and tuple(t.shape) != want:
            raise ValueError(f"the file's prefix table is {tuple(t.shape)} (n, width); "
                             f"{describe(self.config.geometry)} need {want}")

    # ---- placement of the per-layer injections
    def attach(self, site: Annex) -> None:
        model = site.owner[0]
        name = next(n for n, d in site.deltas.items() if d is self)
        mods = attention_modules(model, type(self.config).__name__)
        self.rotary = next(((m,) for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")), ())
        self.links = [(Annex.install(m), self.inject_class(self, i, ATTENTION[type(m).__name__][1]))
                      for i, (_, m) in enumerate(mods)]
        self.links += [(Annex.install(m), PositionShift(self)) for m in model.modules()
                       if type(m).__name__ in SHIFTED_EMBEDDINGS]
        try:
            for annex, delta in self.links:
                annex.add(name, delta)
                annex.active[name] = site.active.get(name, 1.0)
        except BaseException:  # the site drops this delta without a detach: leave no hook behind
            self.detach(site)
            raise

    def detach(self, site: Annex) -> None:
        unlink(self.links)  # ``remove`` may have taken some out already
        self.links.clear()
        self.rotary = ()


def table_from_mlp(tensors: dict) -> torch.Tensor:
    """The [n, width] table that the reparameterisation's tensors give: transform(E), E's n rows."""
    h = torch.tanh(nn.functional.linear(tensors["embedding.weight"], tensors["transform.0.weight"],
                                        tensors["transform.0.bias"]))
    return nn.functional.linear(h, tensors["transform.2.weight"], tensors["transform.2.bias"])
