"""Layer-wise new tokens (P+, Voynov et al., arXiv 2303.09522; ED-LoRA, arXiv 2305.18292): one vector per
cross-attention layer for each new token, and the router that gives each layer its own prompt encoding.

``LayerRows`` is a ``TokenRows`` (``tokens.py``) whose ``emb_params`` is [layers, vectors, width]. A prompt
id of token i reads the mean of its layer vectors: that is what the pipeline's own encoding (the "default"
one) holds, and what a lone text encoder or a pooled output sees. The virtual id -(id * STRIDE + l + 1),
never a real id, reads layer l's vector. The router, in a pipeline:

- a forward hook on the text encoder: when the ids hold new tokens, those rows are encoded once more, all
  layers in one batch (each copy's tokens rewritten to that layer's virtual ids); the default rows and
  the per-layer encodings are recorded (a few, newest first; the per-layer ones keep their autograd graph);
- a forward pre-hook on each cross-attention module (``attn2``): rows of ``encoder_hidden_states`` that
  start with a recorded default row are replaced by that layer's encoding. Matching values, not objects,
  is what survives the pipelines: classifier-free guidance concatenates negative and positive rows,
  ``num_images_per_prompt`` repeats them, dtype/device moves are exact; IP-Adapter's (text, image) pair
  and image tokens appended to the text ones (a prefix match) keep their image part.

The router runs on annexes (``core.Annex``): a transient ``EncodeLayers`` delta (post hook) in the text
encoder's annex and a ``RouteLayer`` delta (pre hook) in each cross-attention module's annex, under the
adapter's own name, so they follow ``set_adapters`` / ``disable_adapters`` like the rest of the adapter. They
are placed when the token rows are (``attach``) and leave with them (``detach``); they hold nothing to save.
Several
adapters on one text encoder (multi-concept prompts) share one router: the first live one encodes every
adapter's tokens per layer, the first one routes.
"""
from __future__ import annotations

import collections

import torch
from torch import nn

from ..core import Annex, AnnexDelta, Host
from ..core.annex import unlink
from .token_rows import TokenRows

STRIDE = 1 << 12  # more than any model's cross-attention layers: (id, layer) <-> one virtual id


def cross_attention_layers(denoiser: nn.Module) -> tuple[str, ...]:
    """The ``attn2`` modules in execution order (down, mid, up blocks): Mix-of-Show's layer order."""
    names = [n for n, _ in denoiser.named_modules() if n.rsplit(".", 1)[-1] == "attn2"]
    rank = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    return tuple(sorted(names, key=lambda n: rank.get(n.split(".", 1)[0], 1)))


class LayerRows(TokenRows):
    """Token rows per cross-attention layer: ``emb_params[l, i]`` is token i's vector for ``layers[l]``.

    ``encoder`` (the text encoder holding this delta) and ``denoiser`` (whose ``layers`` read the
    encodings) enable the router; without them (a lone text encoder) prompts read the mean vectors.
    """

    category = "hybrid"
    mergeable = True
    runs_when_fused = True  # nothing to fold into the weights: tokens stay tokens

    def __init__(self, config, site: str, base: nn.Embedding, tokens, tokenizer, rows, layers,
                 encoder: nn.Module | None = None, denoiser: nn.Module | None = None):
        super().__init__(config, site, base, tokens, tokenizer)
        shape, dtype = (len(layers), len(tokens), base.embedding_dim), self.emb_params.dtype
        self.emb_params = nn.Parameter(torch.empty(shape, device="meta", dtype=dtype) if rows is None
                                       else rows.detach().to(base.weight.device, dtype).clone())
        self.layers = tuple(layers)
        # plain references (a tuple): modules assigned as attributes would be registered inside this delta
        self.links = (encoder, denoiser) if encoder is not None and denoiser is not None else None
        self.records = collections.deque(maxlen=4)  # (default rows, per-layer encodings), newest first
        self.router: list[tuple[Annex, AnnexDelta]] = []  # (annex, its router delta) while placed
        self.busy = False
        self.at: tuple = ()  # (host,) while placed

    def _virtual(self, x: torch.Tensor):
        v = (-x - 1).clamp(min=0)
        return (x < 0).unsqueeze(-1) & ((v // STRIDE).unsqueeze(-1) == self.ids), v % STRIDE

    def edit_input(self, base, x, weight):
        return super().edit_input(base, x, weight).masked_fill(self._virtual(x)[0].any(-1), 0)

    def forward(self, base, x, out, weight):
        table = self.emb_params * weight if weight != 1.0 else self.emb_params
        hits, mean = self._hits(x), table.mean(0)
        # one-hot @ mean keeps every layer's vectors in the graph, as TokenRows does
        out = torch.where(hits.any(-1, keepdim=True), (hits.to(mean.dtype) @ mean).to(out.dtype), out)
        virtual, layer = self._virtual(x)
        at = virtual.any(-1)
        if at.any():
            out[at] = table[layer[at], virtual[at].long().argmax(-1)].to(out.dtype)
        return out

    def attach(self, host: Host) -> None:
        super().attach(host)
        self.at = (host,)
        if self.links is None:
            return
        name = next(n for n, d in host.deltas.items() if d is self)
        encoder, denoiser = self.links
        self.router = [(Annex.install(encoder), EncodeLayers(self))]
        self.router += [(Annex.install(denoiser.get_submodule(m)), RouteLayer(self, layer))
                        for layer, m in enumerate(self.layers)]
        for annex, delta in self.router:
            annex.add(name, delta)
            annex.active[name] = host.active.get(name, 1.0)

    def detach(self, host: Host) -> None:
        unlink(self.router)  # ``remove`` may have taken some out already
        self.router.clear()
        self.records.clear()
        self.at = ()
        super().detach(host)

    def _encode_layers(self, module, args, kwargs, output):
        if self.busy or not self.at or not self.at[0].enabled:
            return None
        host = self.at[0]
        live = [d for n, d in host.deltas.items() if isinstance(d, LayerRows) and n in host.active]
        ids = args[0] if args else kwargs.get("input_ids")
        if next((d for d in live if d.router), None) is not self or not torch.is_tensor(ids):
            return None
        ids = ids.reshape(-1, ids.shape[-1])
        ours = torch.cat([d.ids for d in live])
        rows = torch.isin(ids, ours).any(-1).nonzero().flatten()
        if rows.numel() == 0:
            return None
        n_layers, batch = len(self.layers), ids.shape[0]
        copies = ids[rows].repeat(n_layers, 1)  # layer-major: copy l * len(rows) + k is row k for layer l
        layer = torch.arange(n_layers, device=ids.device).repeat_interleave(rows.numel()).unsqueeze(-1)
        copies = torch.where(torch.isin(copies, ours), -(copies * STRIDE + layer + 1), copies)

        def tile(v):  # per-row arguments (attention mask, position ids) follow their rows
            if torch.is_tensor(v) and v.dim() and v.shape[0] == batch:
                return v[rows].repeat(n_layers, *[1] * (v.dim() - 1))
            return v

        args = (copies, *map(tile, args[1:])) if args else ()
        kwargs = {k: copies if k == "input_ids" else tile(v) for k, v in kwargs.items()}
        self.busy = True
        try:
            encoded = module(*args, **kwargs)[0]
        finally:
            self.busy = False
        self.records.appendleft((output[0][rows].detach(), encoded.unflatten(0, (n_layers, rows.numel()))))
        return None

    def _route(self, layer: int, module, args, kwargs):
        if not self.at:
            return None
        everyone = [d for d in self.at[0].deltas.values() if isinstance(d, LayerRows)]
        positional = "encoder_hidden_states" not in kwargs and len(args) > 1
        x = args[1] if positional else kwargs.get("encoder_hidden_states")
        text = x[0] if isinstance(x, tuple) and x else x  # IP-Adapter passes (text states, image embeds)
        if next(d for d in everyone if d.router) is not self or not torch.is_tensor(text) or text.dim() != 3:
            return None
        routed = swap_rows(text, [r for d in everyone for r in d.records], layer)
        if routed is text:
            return None
        routed = (routed, *x[1:]) if isinstance(x, tuple) else routed
        if positional:
            return (args[0], routed, *args[2:]), kwargs
        return args, {**kwargs, "encoder_hidden_states": routed}


class EncodeLayers(AnnexDelta):
    """The text encoder's part of the router (post hook): records the per-layer encodings of prompts that hold
    the rows' tokens (``LayerRows._encode_layers``)."""

    category = "hybrid"
    transient = True
    runs_when_fused = True

    def __init__(self, rows: LayerRows):
        super().__init__(rows.config, "")
        self.rows = (rows,)  # a plain reference: the rows live at the embedding's Host

    def post(self, module, args, kwargs, output, weight):
        return self.rows[0]._encode_layers(module, args, kwargs, output)


class RouteLayer(AnnexDelta):
    """One cross-attention module's part of the router (pre hook): swaps in its layer's encoding."""

    category = "hybrid"
    transient = True
    runs_when_fused = True

    def __init__(self, rows: LayerRows, layer: int):
        super().__init__(rows.config, rows.layers[layer])
        self.rows, self.layer = (rows,), layer

    def pre(self, module, args, kwargs, weight):
        return self.rows[0]._route(self.layer, module, args, kwargs)


def swap_rows(x: torch.Tensor, records, layer: int) -> torch.Tensor:
    """``x`` with each row that starts with a recorded default row replaced by its encoding for ``layer``;
    ``x`` itself when no row does."""
    out, todo = x, torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    for default, encoded in records:
        n = default.shape[1]
        if x.shape[1] < n or x.shape[2] != default.shape[2]:
            continue
        same = (x[:, None, :n] == default.to(x.device, x.dtype)[None]).flatten(2).all(-1) & todo[:, None]
        rows = same.any(-1).nonzero().flatten()
        if rows.numel() == 0:
            continue
        if out is x:
            out = x.clone()
        out[rows, :n] = encoded[layer, same[rows].long().argmax(-1)].to(x.device, x.dtype)
        todo[rows] = False
    return out
