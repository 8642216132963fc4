"""IP-Adapter's image projections: image-encoder features -> N context tokens for the decoupled cross-attention
(``ip_adapter.py``).

- ``LinearProjection`` (IP-Adapter, arXiv 2308.06721 Sec. 3.2): the image encoder's pooled, projected
  embedding [B, D] -> Linear -> [B, N, C] -> LayerNorm(C). diffusers' ``ImageProjection`` computes the same.
- ``Resampler`` (IP-Adapter Plus): a small perceiver resampler (Jaegle et al., arXiv 2103.03206; Flamingo's
  form) over the encoder's patch features [B, L, W] (its penultimate hidden states): N learned queries attend
  to [features; queries] ``depth`` times, each block attention + feed-forward with residuals, then
  Linear -> LayerNorm(C). diffusers' ``IPAdapterPlusImageProjection`` computes the same.

Their module names are the ones IP-Adapter files use (``proj``/``norm``; ``latents``, ``proj_in``,
``layers.<i>.0.{norm1,norm2,to_q,to_kv,to_out}``, ``layers.<i>.1.{0,1,3}``, ``proj_out``, ``norm_out``), so
the file format copies these keys as they are. Heads are 64 wide, the width diffusers' loader assumes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HEAD_DIM = 64


class LinearProjection(nn.Module):
    def __init__(self, embed_dim: int, context_dim: int, num_tokens: int, device=None, dtype=None):
        super().__init__()
        self.num_tokens, self.context_dim = num_tokens, context_dim
        self.proj = nn.Linear(embed_dim, num_tokens * context_dim, device=device, dtype=dtype)
        self.norm = nn.LayerNorm(context_dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).reshape(x.shape[0], self.num_tokens, self.context_dim))


class PerceiverAttention(nn.Module):
    """Queries (the latents) attend to the image features and themselves; keys and values from one Linear."""

    def __init__(self, dim: int, heads: int, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        inner = heads * HEAD_DIM
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, **kw), nn.LayerNorm(dim, **kw)
        self.to_q = nn.Linear(dim, inner, bias=False, **kw)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False, **kw)
        self.to_out = nn.Linear(inner, dim, bias=False, **kw)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)

        def heads(t):
            return t.reshape(t.shape[0], t.shape[1], self.heads, HEAD_DIM).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.to_q(latents)), heads(k), heads(v))
        return self.to_out(out.transpose(1, 2).reshape(latents.shape[0], latents.shape[1], -1))


class Resampler(nn.Module):
    def __init__(self, embed_dim: int, context_dim: int, num_tokens: int, hidden_dim: int, depth: int, heads: int,
                 ff_mult: int = 4, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.latents = nn.Parameter(torch.randn(1, num_tokens, hidden_dim, **kw) / hidden_dim ** 0.5)
        self.proj_in = nn.Linear(embed_dim, hidden_dim, **kw)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(hidden_dim, heads, **kw),
                           nn.Sequential(nn.LayerNorm(hidden_dim, **kw),
                                         nn.Linear(hidden_dim, hidden_dim * ff_mult, bias=False, **kw),
                                         nn.GELU(), nn.Linear(hidden_dim * ff_mult, hidden_dim, bias=False, **kw))])
            for _ in range(depth))
        self.proj_out = nn.Linear(hidden_dim, context_dim, **kw)
        self.norm_out = nn.LayerNorm(context_dim, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latents = self.latents.expand(x.shape[0], -1, -1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


def resampler_names(depth: int) -> tuple[str, ...]:
    """The state_dict keys of a ``Resampler`` of ``depth`` blocks (for a config's declared parameter names)."""
    block = ("0.norm1.weight", "0.norm1.bias", "0.norm2.weight", "0.norm2.bias", "0.to_q.weight", "0.to_kv.weight",
             "0.to_out.weight", "1.0.weight", "1.0.bias", "1.1.weight", "1.3.weight")
    return ("latents", "proj_in.weight", "proj_in.bias", "proj_out.weight", "proj_out.bias", "norm_out.weight",
            "norm_out.bias") + tuple(f"layers.{i}.{k}" for i in range(depth) for k in block)
