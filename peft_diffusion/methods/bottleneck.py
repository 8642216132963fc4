"""Bottleneck adapters: the shared module, the placement table and the config base of Houlsby, Pfeiffer and
the parallel adapter (``houlsby.py``, ``pfeiffer.py``, ``parallel_adapter.py`` hold one method each).

One adapter at one sub-layer of hidden size d: f(h W_down + b_down) W_up + b_up, W_down d x m, W_up m x d,
m = ``size`` or d // ``reduction``. W_up and b_up start at zero, so the model starts bit-exact; W_down keeps
nn.Linear's default init. Saved: ``<site>.adapter_down.weight/.bias``, ``<site>.adapter_up.weight/.bias``.
Not mergeable (a nonlinearity sits between the projections): ``pd.fuse(pipe)`` leaves them running and
``pd.fuse(pipe, [name])`` refuses.

Where they go (``BLOCKS``: block class -> (role, sub-layer path) per sub-layer; the adapter is an Annex on
that sub-layer, whose output is the sub-layer's output before the block adds its residual):

- diffusers ``BasicTransformerBlock`` (U-Net transformers, DiT, PixArt): attn ``attn1``, ``attn2`` (where there
  is one), ffn ``ff``; transformers ``CLIPEncoderLayer``: ``self_attn``, ``mlp``; ``LlamaDecoderLayer``:
  ``self_attn``, ``mlp``; ``GPT2Block``: ``attn``, ``crossattention``, ``mlp``; T5: the ``SelfAttention`` /
  ``EncDecAttention`` / ``DenseReluDense`` inside ``T5LayerSelfAttention`` / ``T5LayerCrossAttention`` /
  ``T5LayerFF`` (the residual and dropout are added by those wrappers). Attention modules of transformers
  return tuples: only the first element (the hidden states) changes.
- BERT adds residual + LayerNorm inside ``BertSelfOutput`` / ``BertOutput``; the serial adapters sit on their
  ``dense`` projection, so out = LN(dropout(h + f(h)) + x) with h = dense(...): Houlsby's placement before the
  residual and the LayerNorm (the adapter-hub code applies dropout before the adapter instead; at eval the
  two are identical). The parallel branch rewrites ``BertOutput``'s residual input x -> x + s f(x), which
  gives LN(FFN(x) + s f(x) + x) exactly.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from ..config import MethodConfig
from ..core import AnnexDelta, Host, layer_dims
from ..target import Target, class_names
from .dense import module_at

# block class -> ((role, sub-layer path relative to the block), ...); a missing path (a self-attention-only
# block's attn2) is skipped. Roles: "attn", "ffn", and "parallel" where the parallel branch cannot simply
# sit on the feed-forward module (BERT: its residual input).
BLOCKS = {
    "BasicTransformerBlock": (("attn", "attn1"), ("attn", "attn2"), ("ffn", "ff")),
    "CLIPEncoderLayer": (("attn", "self_attn"), ("ffn", "mlp")),
    "BertLayer": (("attn", "attention.output.dense"), ("attn", "crossattention.output.dense"),
                  ("ffn", "output.dense"), ("parallel", "output")),
    "T5LayerSelfAttention": (("attn", "SelfAttention"),),
    "T5LayerCrossAttention": (("attn", "EncDecAttention"),),
    "T5LayerFF": (("ffn", "DenseReluDense"),),
    "LlamaDecoderLayer": (("attn", "self_attn"), ("ffn", "mlp")),
    "GPT2Block": (("attn", "attn"), ("attn", "crossattention"), ("ffn", "mlp")),
}
# sub-layer class -> the projection whose output size is the hidden size d
OUT_LAYER = {
    "Attention": "to_out.0", "FeedForward": "net.2", "CLIPAttention": "out_proj", "CLIPMLP": "fc2",
    "BertOutput": "dense", "T5Attention": "o", "T5DenseActDense": "wo", "T5DenseGatedActDense": "wo",
    "LlamaAttention": "o_proj", "LlamaMLP": "down_proj", "GPT2Attention": "c_proj", "GPT2MLP": "c_proj",
}
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU, "tanh": nn.Tanh}


def output_layer(module: nn.Module, site: str) -> tuple[str, nn.Module]:
    """(path relative to ``module``, layer) of the projection whose output size is the hidden size d: the
    module itself ("") when it is a projection, else its ``OUT_LAYER`` projection."""
    layer = module.base if isinstance(module, Host) else module
    if type(layer).__name__ in ("Linear", "Conv1D"):
        return "", layer
    rel = next((OUT_LAYER[c] for c in class_names(layer) if c in OUT_LAYER), None)
    found = module_at(layer, rel) if rel else None
    if found is None:
        raise ValueError(f"adapter at {site!r}: no known output projection in a "
                         f"{type(layer).__name__} (known sub-layers: {sorted(OUT_LAYER)})")
    return rel, found


def hidden_size(module: nn.Module, site: str) -> int:
    """d of the sub-layer at ``site``: its own out size for a projection, else its ``OUT_LAYER`` projection's."""
    return layer_dims(output_layer(module, site)[1])[1]


def widths(config: "Bottleneck", module: nn.Module, site: str) -> tuple[int, int]:
    """(d, m) of the adapter at ``site``: the sub-layer's hidden size and the bottleneck width."""
    d = hidden_size(module, site)
    return d, config.size or max(1, d // config.reduction)


def find_blocks(config, model: nn.Module) -> list[str]:
    """The blocks (of ``BLOCKS``' classes) that ``config.target`` selects, all of them when it is None; errors
    name the method, the class found and the supported ones."""
    name = type(config).__name__
    if config.target is None:
        blocks = [b for b in Target(types=tuple(BLOCKS)).select(model, "annex")]
        if not blocks:
            raise ValueError(f"{name} finds no block it knows in this {type(model).__name__}; supported "
                             f"blocks: {sorted(BLOCKS)} (or pass target=Target(types=(...)) naming them)")
        return blocks
    blocks = config.target.select(model, "annex")
    for b in blocks:
        known = class_names(module_at(model, b)) & set(BLOCKS)
        if not known:
            raise ValueError(f"{name} target {config.target} selects {b or '<model>'!r}, a "
                             f"{type(module_at(model, b)).__name__}, which is not a block it knows; "
                             f"supported blocks: {sorted(BLOCKS)}")
    if not blocks:
        raise ValueError(f"{name} target {config.target} matches no module of {type(model).__name__}")
    return blocks


def sublayers(model: nn.Module, blocks: list[str], roles) -> list[str]:
    """The paths of the sub-layers with one of ``roles`` in ``blocks`` (``BLOCKS``' table; missing ones skipped)."""
    found = []
    for b in blocks:
        block = module_at(model, b)
        entries = next(BLOCKS[c] for c in class_names(block) if c in BLOCKS)
        wanted = set(roles)
        if "parallel" in wanted and not any(r == "parallel" for r, _ in entries):
            wanted = {"ffn"}  # the branch sits on the feed-forward module itself
        for role, rel in entries:
            path = f"{b}.{rel}" if b else rel
            if role in wanted and module_at(model, path) is not None:
                found.append(path)
    return found


@dataclasses.dataclass
class Bottleneck(MethodConfig):
    """Shared settings. reduction: m = d // reduction; size: m itself (overrides reduction); activation:
    relu, gelu, silu/swish or tanh; target: a Target choosing blocks (of ``BLOCKS``' classes; None = all)."""

    category: ClassVar[str] = "additive"
    site_kind: ClassVar[str] = "annex"
    param_names: ClassVar[tuple[str, ...]] = ("adapter_down.weight", "adapter_down.bias",
                                              "adapter_up.weight", "adapter_up.bias")
    roles: ClassVar[tuple[str, ...]] = ()

    reduction: int = 16
    size: int | None = None
    activation: str = "relu"

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        if not isinstance(self.reduction, int) or isinstance(self.reduction, bool) or self.reduction < 1:
            raise ValueError(f"{name} reduction must be a positive integer, got {self.reduction!r}")
        if self.size is not None and (not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1):
            raise ValueError(f"{name} size must be a positive integer or None, got {self.size!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"{name} activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")

    def resolved(self, model: nn.Module) -> "Bottleneck":
        return self  # ``select`` finds the blocks itself: there is no preset of sub-layers to fill in

    def select(self, model: nn.Module) -> list[str]:
        return sublayers(model, find_blocks(self, model), self.roles)

    def build(self, base: nn.Module, site: str, init: bool = True):
        return self.delta_class(self, site, base, init)


class BottleneckDelta(AnnexDelta):
    """One bottleneck f(h W_down + b_down) W_up + b_up beside one sub-layer. ``post``: the serial form
    h <- h + w * adapter(h) on the sub-layer's output (its first element if a tuple)."""

    category = "additive"
    mergeable = False

    def __init__(self, config: Bottleneck, site: str, module: nn.Module, init: bool = True):
        super().__init__(config, site)
        d, m = widths(config, module, site)
        ref = next(p for p in (module.base if isinstance(module, Host) else module).parameters())
        dtype = torch.float32 if ref.dtype in (torch.float16, torch.bfloat16) else ref.dtype
        device = ref.device if init else "meta"
        self.adapter_down = self.projection(d, m, device, dtype, init)
        self.act = ACTIVATIONS[config.activation]()
        self.adapter_up = self.projection(m, d, device, dtype, init)
        if init:
            self.zero_up()

    def projection(self, d_in: int, d_out: int, device, dtype, init: bool) -> nn.Module:
        """One projection with a ``bias`` (Compacter: a PHM layer in place of the Linear)."""
        return nn.Linear(d_in, d_out, device=device, dtype=dtype)

    def zero_up(self) -> None:
        """Zero the up-projection's output: the bit-exact start."""
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def branch(self, h: torch.Tensor, weight: float) -> torch.Tensor:
        dtype = self.adapter_down.bias.dtype
        out = self.adapter_up(self.act(self.adapter_down(h.to(dtype))))
        return (out * weight if weight != 1.0 else out).to(h.dtype)

    def post(self, module, args, kwargs, output, weight):
        if isinstance(output, tuple):
            return (output[0] + self.branch(output[0], weight),) + tuple(output[1:])
        return output + self.branch(output, weight)
