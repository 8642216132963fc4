"""Per-layer key/value prefixes: the shared part of prefix tuning (``prefix_tuning.py``) and P-tuning v2
(``p_tuning_v2.py``).

Every attention layer l gets n learned keys P_k^l and values P_v^l that its queries attend to beside the
sequence's own: head(x) = softmax(q [P_k^l; K]^T / sqrt(d)) [P_v^l; V] (Li & Liang, arXiv 2101.00190, Sec. 4.2;
Liu et al., arXiv 2110.07602, Fig. 2). The prefix positions are always attended (padding and causal masks
apply to the sequence's keys only).

Where the values live: one ``PrefixSource`` delta in an annex on the model itself (site ""), holding either
the table ``prefix`` [layers, 2, n, kv heads, head dim] (P-tuning v2; prefix tuning once folded) or prefix
tuning's reparameterisation P = MLP(E) (``embedding.weight`` [n, kv width], ``transform.0`` kv width ->
hidden, tanh, ``transform.2`` hidden -> layers * 2 * kv width; peft's layout and names). When placed it puts a
transient ``PrefixInject`` delta in an annex on every supported attention module (the module, its parameters
and its attention processor are untouched; ``remove`` takes the hooks away):

- ``LlamaAttention``, ``BertSelfAttention`` (they call ``past_key_values.update(k, v, layer)`` after their
  projections): the pre hook passes a ``PrefixCache`` that returns [P_k; K], [P_v; V] (around the model's own
  cache when there is one) and widens the attention mask by n attended columns.
- ``CLIPAttention`` (no cache argument): the post hook recomputes the attention with the prefixes from the
  module's own projections (the module's own pass is discarded: twice the attention cost).

Positions follow peft, which passes the prefixes as ``past_key_values`` of length n: the sequence's positions
start at n. LLaMA: peft's prefix keys are not rotated and the queries sit at positions n + p; since
R(n + p)^T = R(p)^T R(-n)^T, the prefix keys here are rotated by -n and the queries stay at p (same scores).
BERT: the absolute position ids start at n (a transient ``PositionShift`` on ``BertEmbeddings``). CLIP text (no
peft counterpart): positions unchanged.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import ClassVar

import torch
from torch import nn

from ..config import MethodConfig
from ..core import Annex, AnnexDelta

# attention class -> (kv heads, head dim) of a module, and how the prefixes get in ("cache" or "recompute")
ATTENTION = {
    "LlamaAttention": (lambda m: (m.config.num_key_value_heads, m.head_dim), "cache"),
    "BertSelfAttention": (lambda m: (m.num_attention_heads, m.attention_head_size), "cache"),
    "CLIPAttention": (lambda m: (m.num_heads, m.head_dim), "recompute"),
}
SHIFTED_EMBEDDINGS = ("BertEmbeddings",)  # absolute position ids start at n, as with peft's past_key_values


def attention_modules(model: nn.Module, what: str) -> list[tuple[str, nn.Module]]:
    """The supported attention modules of ``model`` in model order; a clear error when there is none."""
    found = [(n, m) for n, m in model.named_modules() if type(m).__name__ in ATTENTION and ".deltas." not in n]
    if not found:
        seen = sorted({type(m).__name__ for m in model.modules() if "attention" in type(m).__name__.lower()})
        raise ValueError(f"{what} does not know the attention of this {type(model).__name__} "
                         f"(its attention classes: {seen or 'none'}); supported: {sorted(ATTENTION)}")
    return found


def geometry(model: nn.Module, what: str) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of ``model``'s supported attention modules (they must agree)."""
    mods = attention_modules(model, what)
    shapes = {ATTENTION[type(m).__name__][0](m) for _, m in mods}
    if len(shapes) != 1:
        raise ValueError(f"{what}: the attention modules of this {type(model).__name__} differ in (kv heads, head "
                         f"dim): {sorted(shapes)}; one prefix table needs one shape")
    return (len(mods), *shapes.pop())


@dataclasses.dataclass
class PrefixKV(MethodConfig):
    """Shared settings. num_virtual_tokens: n; prefix_projection: train through the MLP reparameterisation;
    encoder_hidden_size: the MLP's hidden width (None: the kv width, peft's default). layers, heads, head_dim:
    the model's geometry, filled in when bound to a model and stored in files (a file for another model is
    refused naming both)."""

    category: ClassVar[str] = "prompt"
    site_kind: ClassVar[str] = "annex"
    param_names: ClassVar[tuple[str, ...]] = ("prefix", "embedding.weight", "transform.0.weight", "transform.0.bias",
                                              "transform.2.weight", "transform.2.bias")

    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    layers: int | None = None
    heads: int | None = None
    head_dim: int | None = None

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        if self.target is not None:
            raise ValueError(f"{name} puts prefixes in every supported attention layer; it takes no target")
        for f in ("num_virtual_tokens", "encoder_hidden_size", "layers", "heads", "head_dim"):
            v = getattr(self, f)
            if (v is not None or f == "num_virtual_tokens") and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name} {f} must be a positive integer, got {v!r}")

    def bind(self, obj, model: nn.Module, name: str) -> "PrefixKV":
        found = geometry(model, type(self).__name__)
        mine = (self.layers, self.heads, self.head_dim)
        if None not in mine and mine != found:
            raise ValueError(f"{type(self).__name__} {name!r} was made for {mine[0]} attention layers x {mine[1]} kv "
                             f"heads x {mine[2]} head dims; this {type(model).__name__} has {found[0]} x {found[1]} "
                             f"x {found[2]}")
        return dataclasses.replace(self, layers=found[0], heads=found[1], head_dim=found[2])

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

    def __init__(self, config: PrefixKV, site: str, model: nn.Module, init: bool = True):
        super().__init__(config, site)
        ref = next(model.parameters())
        dtype = torch.float32 if ref.dtype in (torch.float16, torch.bfloat16) else ref.dtype
        kw = dict(device=ref.device if init else "meta", dtype=dtype)
        n, L, H, d = config.num_virtual_tokens, config.layers, config.heads, config.head_dim
        if config.prefix_projection:
            width, hidden = H * d, config.encoder_hidden_size or H * d
            self.embedding = nn.Embedding(n, width, **kw)
            self.transform = nn.Sequential(nn.Linear(width, hidden, **kw), nn.Tanh(),
                                           nn.Linear(hidden, L * 2 * width, **kw))
        else:  # N(0, 1), as peft's nn.Embedding of the flattened table
            self.prefix = nn.Parameter(torch.randn(L, 2, n, H, d, **kw) if init else torch.empty(L, 2, n, H, d, **kw))
        self.links: list[tuple[Annex, AnnexDelta]] = []
        self.rotary: tuple = ()

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of one layer, each [kv heads, n, head dim]."""
        c = self.config
        if not c.prefix_projection:
            return self.prefix[layer, 0].transpose(0, 1), self.prefix[layer, 1].transpose(0, 1)
        h = self.transform[1](self.transform[0](self.embedding.weight))
        width = c.heads * c.head_dim
        rows = slice(2 * layer * width, (2 * layer + 2) * width)
        out = nn.functional.linear(h, self.transform[2].weight[rows], self.transform[2].bias[rows])
        k, v = out.unflatten(-1, (2, c.heads, c.head_dim)).unbind(1)
        return k.transpose(0, 1), v.transpose(0, 1)

    def table(self) -> torch.Tensor:
        """Every layer's prefixes as one [layers, 2, n, kv heads, head dim] tensor."""
        if not self.config.prefix_projection:
            return self.prefix
        return table_from_mlp(self.state_dict(), self.config)

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

    def fit_file(self, tensors: dict) -> None:
        t = tensors.get("prefix")
        want = (self.config.layers, 2, self.config.num_virtual_tokens, self.config.heads, self.config.head_dim)
        if t is not None and tuple(t.shape) != want:
            raise ValueError(f"the file's prefix table is {tuple(t.shape)} (layers, 2, n, kv heads, head dim); this "
                             f"model needs {want}")

    # ---- placement of the per-layer injections
    def attach(self, site: Annex) -> None:
        model = site.owner[0]
        name = next(n for n, d in site.deltas.items() if d is self)
        mods = attention_modules(model, type(self.config).__name__)
        self.rotary = next(((m,) for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")), ())
        self.links = [(Annex.install(m), PrefixInject(self, i, ATTENTION[type(m).__name__][1]))
                      for i, (_, m) in enumerate(mods)]
        self.links += [(Annex.install(m), PositionShift(self)) for m in model.modules()
                       if type(m).__name__ in SHIFTED_EMBEDDINGS]
        for annex, delta in self.links:
            annex.add(name, delta)
            annex.active[name] = site.active.get(name, 1.0)

    def detach(self, site: Annex) -> None:
        for annex, delta in self.links:  # ``remove`` may have taken some out already
            name = next((n for n, d in annex.deltas.items() if d is delta), None)
            if name is not None:
                annex.drop(name)
            owner = annex.owner[0]
            if not annex.deltas and owner._modules.get(Annex.ATTR) is annex:
                annex.uninstall(owner, Annex.ATTR)
        self.links.clear()
        self.rotary = ()


def table_from_mlp(tensors: dict, config: PrefixKV) -> torch.Tensor:
    """The [layers, 2, n, kv heads, head dim] table that the reparameterisation's tensors give."""
    h = torch.tanh(nn.functional.linear(tensors["embedding.weight"], tensors["transform.0.weight"],
                                        tensors["transform.0.bias"]))
    flat = nn.functional.linear(h, tensors["transform.2.weight"], tensors["transform.2.bias"])
    return to_table(flat, config)


def to_table(flat: torch.Tensor, config: PrefixKV) -> torch.Tensor:
    """peft's flattened past key values [n, layers * 2 * kv width] -> [layers, 2, n, kv heads, head dim]."""
    n, L, H, d = config.num_virtual_tokens, config.layers, config.heads, config.head_dim
    return flat.reshape(n, L * 2, H, d).transpose(0, 1).reshape(L, 2, n, H, d)


def to_flat(table: torch.Tensor) -> torch.Tensor:
    """[layers, 2, n, kv heads, head dim] -> peft's flattened [n, layers * 2 * kv width]."""
    L, _, n, H, d = table.shape
    return table.reshape(L * 2, n, H, d).transpose(0, 1).reshape(n, L * 2 * H * d)


def rotate(keys: torch.Tensor, rotary: nn.Module, offset: int) -> torch.Tensor:
    """``keys`` [H, n, d] rotated by RoPE position ``offset`` (the model's own rotary module, scale removed)."""
    x = keys.new_zeros(1, 1, keys.shape[-1])
    cos, sin = rotary(x.float(), torch.tensor([[0, offset]], device=keys.device))
    scale = cos[0, 0, 0]
    cos, sin = (cos[0, 1] / scale).to(keys.dtype), (sin[0, 1] / scale).to(keys.dtype)
    half = keys.shape[-1] // 2
    rotated_half = torch.cat((-keys[..., half:], keys[..., :half]), -1)
    return keys * cos + rotated_half * sin


def widen_mask(mask, n: int, q_len: int, past: int, causal: bool, device):
    """The attention mask with n attended prefix columns in front; None stays None unless causal."""
    if mask is None:
        if not causal or q_len == 1:
            return None
        k = torch.arange(past + q_len, device=device)
        q = torch.arange(q_len, device=device) + past
        inner = k[None, :] <= q[:, None]
        return torch.cat([inner.new_ones(q_len, n), inner], 1)[None, None]
    if mask.dim() != 4:
        raise ValueError(f"prefix keys/values need a 4-d attention mask, got shape {tuple(mask.shape)}")
    fill = torch.ones if mask.dtype == torch.bool else torch.zeros
    return torch.cat([fill(*mask.shape[:-1], n, dtype=mask.dtype, device=mask.device), mask], -1)


class PrefixCache:
    """What an attention module's ``past_key_values.update(k, v, layer)`` sees: [P_k; K], [P_v; V], the
    sequence's part through the model's own cache (``inner``) when there is one."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, inner):
        self.keys, self.values, self.inner = keys, values, inner

    def update(self, key, value, layer_idx, *args, **kwargs):
        if self.inner is not None:
            key, value = self.inner.update(key, value, layer_idx, *args, **kwargs)
        b = key.shape[0]
        pk = self.keys.to(key.dtype).unsqueeze(0).expand(b, -1, -1, -1)
        pv = self.values.to(value.dtype).unsqueeze(0).expand(b, -1, -1, -1)
        return torch.cat([pk, key], 2), torch.cat([pv, value], 2)


class PrefixInject(AnnexDelta):
    """One attention module's part (transient): feeds layer ``layer``'s prefixes into it."""

    category = "prompt"
    transient = True

    def __init__(self, source: PrefixSource, layer: int, how: str):
        super().__init__(source.config, "")
        self.source, self.layer, self.how = (source,), layer, how
        self.signatures: dict = {}

    def prefixes(self, module):
        src = self.source[0]
        k, v = src.kv(self.layer)
        if src.rotary:  # peft's unrotated prefix keys seen from queries at n + p, rotated here by -n
            k = rotate(k, src.rotary[0], -src.config.num_virtual_tokens)
        return k, v

    def pre(self, module, args, kwargs, weight):
        if self.how != "cache" or weight == 0:
            return None
        sig = self.signatures.get(type(module))
        if sig is None:
            sig = self.signatures[type(module)] = inspect.signature(type(module).forward)
        bound = sig.bind_partial(module, *args, **kwargs).arguments
        bound.pop("self", None)
        extra = bound.pop("kwargs", {})
        hidden = bound.pop("hidden_states")
        inner = bound.get("past_key_values")
        inner = getattr(inner, "self_attention_cache", inner)  # an encoder-decoder cache: its self part
        past = inner.get_seq_length(module.layer_idx) if inner is not None else 0
        k, v = self.prefixes(module)
        causal = bool(getattr(module, "is_causal", False))
        bound["attention_mask"] = widen_mask(bound.get("attention_mask"), k.shape[1], hidden.shape[1], past, causal,
                                             hidden.device)
        bound["past_key_values"] = PrefixCache(k, v, inner)
        return (hidden,), {**bound, **extra}

    def post(self, module, args, kwargs, output, weight):
        if self.how != "recompute" or weight == 0:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        k_pre, v_pre = self.prefixes(module)
        b, t, _ = hidden.shape
        split = lambda x: x.view(b, t, -1, k_pre.shape[-1]).transpose(1, 2)  # noqa: E731
        q, k, v = split(module.q_proj(hidden)), split(module.k_proj(hidden)), split(module.v_proj(hidden))
        k = torch.cat([k_pre.to(k.dtype).expand(b, -1, -1, -1), k], 2)
        v = torch.cat([v_pre.to(v.dtype).expand(b, -1, -1, -1), v], 2)
        causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", False)))
        mask = widen_mask(mask, k_pre.shape[1], t, 0, causal, hidden.device)
        drop = module.dropout if module.training else 0.0
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, scale=module.scale)
        out = module.out_proj(out.transpose(1, 2).reshape(b, t, -1))
        return (out, None) if isinstance(output, tuple) else out


class PositionShift(AnnexDelta):
    """BERT's embeddings (transient): position ids start after the n prefix positions, as with peft."""

    category = "prompt"
    transient = True

    def __init__(self, source: PrefixSource):
        super().__init__(source.config, "")
        self.source = (source,)

    def pre(self, module, args, kwargs, weight):
        if weight == 0 or kwargs.get("position_ids") is not None or len(args) > 2:
            return None
        n = self.source[0].config.num_virtual_tokens
        return args, {**kwargs, "past_key_values_length": kwargs.get("past_key_values_length", 0) + n}
