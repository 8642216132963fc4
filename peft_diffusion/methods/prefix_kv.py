"""Per-layer key/value prefixes: the injection shared by prefix tuning (``prefix_tuning.py``) and P-tuning v2
(``p_tuning_v2.py``); where the values live and their config: ``prefix_source.py``.

Every attention layer l gets n learned keys P_k^l and values P_v^l that its queries attend to beside the
sequence's own: head(x) = softmax(q [P_k^l; K]^T / sqrt(d)) [P_v^l; V] (Li & Liang, arXiv 2101.00190, Sec. 4.2;
Liu et al., arXiv 2110.07602, Fig. 2). The prefix positions are always attended (padding and causal masks
apply to the sequence's keys only). The ``PrefixSource`` puts a transient ``PrefixInject`` delta in an annex on
every supported attention module (the module, its parameters and its attention processor are untouched;
``remove`` takes the hooks away):

- ``LlamaAttention``, ``BertSelfAttention`` (they call ``past_key_values.update(k, v, layer)`` after their
  projections): the pre hook passes a ``PrefixCache`` that returns [P_k; K], [P_v; V] (around the model's own
  cache when there is one) and widens the attention mask by n attended columns.
- ``CLIPAttention`` (no cache argument): the post hook recomputes the attention with the prefixes from the
  module's own projections (the module's own pass is discarded: twice the attention cost).
- diffusers' ``Attention`` with ``is_cross_attention`` (U-Net ``attn2``, PixArt's cross-attention): the pre
  hook puts a one-shot forward hook on ``to_k`` / ``to_v`` (whatever sits there: a LoRA Host included) that puts
  the n prefix rows before the text tokens' projected keys / values, so whatever processor runs sees n + S text
  keys (a prompt-tuning variant for diffusion: n free keys/values per cross-attention). Self-attention modules
  are left alone; an encoder attention mask or fused projections are refused (the processor would not see the
  prefix columns).

Positions follow peft, which passes the prefixes as ``past_key_values`` of length n: the sequence's positions
start at n. LLaMA: peft's prefix keys are not rotated and the queries sit at positions n + p; since
R(n + p)^T = R(p)^T R(-n)^T, the prefix keys here are rotated by -n and the queries stay at p (same scores).
BERT: the absolute position ids start at n (a transient ``PositionShift`` on ``BertEmbeddings``). CLIP text and
diffusers cross-attention (no peft counterpart): positions unchanged. Position ids given by the caller are
left as they are (peft drops them). The adapter's weight switches the prefixes off at 0 and does not scale them
otherwise.
"""
from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..core import AnnexDelta

if TYPE_CHECKING:
    from .prefix_source import PrefixSource

# attention class -> (kv heads, head dim) of a module, and how the prefixes get in ("cache", "recompute" or
# "projection": see the module docstring)
ATTENTION = {
    "LlamaAttention": (lambda m: (m.config.num_key_value_heads, m.head_dim), "cache"),
    "BertSelfAttention": (lambda m: (m.num_attention_heads, m.attention_head_size), "cache"),
    "CLIPAttention": (lambda m: (m.num_heads, m.head_dim), "recompute"),
    "Attention": (lambda m: (m.inner_kv_dim // (m.inner_dim // m.heads), m.inner_dim // m.heads), "projection"),
}
SUPPORTED = ["LlamaAttention", "BertSelfAttention", "CLIPAttention", "diffusers Attention (cross-attention)"]


def supported(m: nn.Module) -> bool:
    name = type(m).__name__
    if name == "Attention":  # diffusers' cross-attention only (another library's "Attention" is not it)
        return type(m).__module__.startswith("diffusers.") and bool(getattr(m, "is_cross_attention", False))
    return name in ATTENTION


SHIFTED_EMBEDDINGS = ("BertEmbeddings",)  # absolute position ids start at n, as with peft's past_key_values


def attention_modules(model: nn.Module, what: str) -> list[tuple[str, nn.Module]]:
    """The supported attention modules of ``model`` in model order; a clear error when there is none."""
    found = [(n, m) for n, m in model.named_modules() if supported(m) and ".deltas." not in n]
    if not found:
        seen = sorted({type(m).__name__ + (" (self-attention)" if type(m).__name__ == "Attention" else "")
                       for m in model.modules() if "attention" in type(m).__name__.lower()})
        raise ValueError(f"{what} does not know the attention of this {type(model).__name__} "
                         f"(its attention classes: {seen or 'none'}); supported: {SUPPORTED}")
    return found


def geometry(model: nn.Module, what: str) -> tuple[tuple[int, int], ...]:
    """(kv heads, head dim) of each of ``model``'s supported attention modules, in model order."""
    return tuple(tuple(ATTENTION[type(m).__name__][0](m)) for _, m in attention_modules(model, what))


def describe(geo) -> str:
    """``geo`` in words: "2 attention layers x 2 kv heads x 8 head dims" when the layers agree."""
    if len(set(geo)) == 1:
        return f"{len(geo)} attention layers x {geo[0][0]} kv heads x {geo[0][1]} head dims"
    return f"{len(geo)} attention layers with (kv heads, head dim) {[tuple(g) for g in geo]}"


def offsets(geo) -> list[int]:
    """Where each layer's keys start in a table row (its values follow after heads x head dim)."""
    out, at = [], 0
    for h, d in geo:
        out.append(at)
        at += 2 * h * d
    return out + [at]


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

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The sequence's cached length (prefixes not counted), as the model's own cache reports it."""
        return self.inner.get_seq_length(layer_idx) if self.inner is not None else 0

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
        self.pending: list = []  # one-shot hooks on to_k / to_v (diffusers cross-attention) not yet run

    def prefixes(self, module):
        src = self.source[0]
        k, v = src.kv(self.layer)
        if src.rotary and self.how == "cache":  # peft's unrotated keys seen from queries at n + p: rotated by -n
            k = rotate(k, src.rotary[0], -src.config.num_virtual_tokens)
        return k, v

    def pre(self, module, args, kwargs, weight):
        if self.how == "projection" and weight != 0:
            return self.before_projections(module, args, kwargs)
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

    def before_projections(self, module, args, kwargs):
        """diffusers cross-attention: the next ``to_k`` / ``to_v`` outputs get the prefix rows in front."""
        self.clear()
        mask = args[2] if len(args) > 2 else kwargs.get("attention_mask")
        if mask is not None or module.fused_projections:
            raise ValueError(f"prefix keys/values on diffusers' cross-attention ({self.source[0].site or 'model'} "
                             f"layer {self.layer}) take no encoder attention mask and no fused projections")
        for proj, rows in zip((module.to_k, module.to_v), self.prefixes(module)):
            self.prepend(proj, rows.transpose(0, 1).flatten(1))
        return None

    def prepend(self, proj: nn.Module, rows: torch.Tensor) -> None:
        def hook(layer, args, out):
            handle.remove()  # one call: the processor's projection of the text tokens
            self.pending.remove(handle)
            return torch.cat([rows.to(out.dtype).expand(out.shape[0], -1, -1), out], 1)

        handle = proj.register_forward_hook(hook)
        self.pending.append(handle)

    def clear(self) -> None:
        for handle in self.pending:
            handle.remove()
        self.pending.clear()

    def detach(self, site) -> None:
        self.clear()

    def post(self, module, args, kwargs, output, weight):
        self.clear()
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
