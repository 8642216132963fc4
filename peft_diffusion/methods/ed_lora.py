"""ED-LoRA — Gu et al., "Mix-of-Show: Decentralized Low-Rank Adaptation for Multi-Concept Customization of
Diffusion Models", arXiv 2305.18292 (Sec. 3.2, embedding-decomposed LoRA).

A concept is a new token V with ``num_vectors`` vectors (``tok, tok_1, ...``; the paper's V = V_rand V_class
is num_vectors=2, the first random N(0, init_std^2), the last from ``init_word``, the class word), and its
embedding is layer-wise as in P+ (arXiv 2303.09522): cross-attention layer l reads the prompt encoded with
the token's l-th embedding, c_l = E_text(y; V_l), so Attn_l = softmax(Q (W_k c_l)^T / sqrt(d)) W_v c_l. On top,
LoRA, h = W0 x + (alpha / r) B A x, on the text encoder's attention q/k/v/out and the U-Net's attention
to_q/k/v/out.0 (Mix-of-Show's ``CLIPAttention`` / ``Attention`` targets, rank 4, scale 1).

Trained: the embeddings ``emb_params`` [layers, num_vectors, width] and the LoRA A/B of both encoders.
Saved: one native file (components text_encoder: emb_params + lora_A/B, unet: lora_A/B) whose header keeps
the token, the layer list and the LoRA settings: ``load_adapter(pipe, file)`` restores all of it.
Merges: the LoRA parts fuse into the weights; the embeddings stay tokens (``fuse`` leaves them running).

Where it goes: ``components`` = text encoder (token embedding + LoRA sites, by exact name) and U-Net
(LoRA sites). The per-layer routing lives in ``layer_tokens.py`` (a hook re-encodes prompts holding the
token once per layer; a pre-hook on each attn2 swaps in its layer's encoding, also under classifier-free
guidance); see docs/design.md, "ED-LoRA". ``token`` defaults to the adapter name.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ..config import as_target
from ..core import Host
from .layer_tokens import STRIDE, LayerRows, cross_attention_layers
from ..presets import preset
from ..registry import register_method
from ..target import Target
from .token_rows import find_tokenizer, init_word_ids, input_embedding, token_ids, vector_tokens
from .lora import LoRA, LoRADelta


def _denoiser_of(obj) -> nn.Module | None:
    comps = getattr(obj, "components", None)
    if not isinstance(comps, dict):  # a lone model
        return None
    return next((comps[k] for k in ("unet", "transformer") if isinstance(comps.get(k), nn.Module)), None)


def _check(ok, what: str, value) -> None:
    if not ok:
        raise ValueError(f"EDLoRA {what}, got {value!r}")



@register_method("ed-lora")
@dataclasses.dataclass
class EDLoRA(LoRA):
    """Layer-wise token ``token`` + LoRA (rank ``r``, the LoRA options) in text encoder and U-Net.

    layers: the U-Net's cross-attention modules, one embedding each (empty: every ``attn2``, found when
    injected). text_target / unet_target: the LoRA sites (default: ``clip-text`` / ``unet-attn``); ``target``
    is per component and filled by ``bind`` (files carry the filled one).
    """

    category = "hybrid"
    param_names = LoRA.param_names + ("emb_params",)
    components = ("text_encoder", "unet")
    _tokenizer = _encoder = _denoiser = None  # live objects, set on the copy ``bind`` returns (not fields)

    r: int = 4
    token: str | None = None
    num_vectors: int = 2
    init_word: str | None = None
    init_std: float = 0.013
    layers: tuple[str, ...] = ()
    text_target: Target | str | None = None
    unet_target: Target | str | None = None

    def __post_init__(self):
        super().__post_init__()
        self.text_target = as_target(self.text_target, "EDLoRA text_target")
        self.unet_target = as_target(self.unet_target, "EDLoRA unet_target")
        self.layers = tuple(self.layers)
        t, n, w, std = self.token, self.num_vectors, self.init_word, self.init_std
        _check(t is None or (isinstance(t, str) and t and t == t.strip()), "token must be a non-empty string "
               "without surrounding spaces", t)
        _check(isinstance(n, int) and not isinstance(n, bool) and n >= 1, "num_vectors must be a positive integer", n)
        _check(w is None or (isinstance(w, str) and w.strip()), "init_word must be a non-empty string or None", w)
        _check(isinstance(std, (int, float)) and not isinstance(std, bool) and math.isfinite(std) and std >= 0,
               "init_std must be a finite number >= 0", std)
        _check(all(isinstance(m, str) and m for m in self.layers) and len(self.layers) < STRIDE,
               f"layers must be fewer than {STRIDE} module names", self.layers)

    def bind(self, obj, model: nn.Module, name: str) -> "EDLoRA":
        text = not cross_attention_layers(model)  # else the denoiser itself
        denoiser = _denoiser_of(obj) if text else model
        layers = self.layers or (cross_attention_layers(denoiser) if denoiser is not None else ())
        if not layers:
            raise ValueError("ED-LoRA needs the U-Net's cross-attention layers (one embedding each): inject into "
                             "the pipeline, or pass layers=(...) for a lone text encoder")
        if denoiser is not None:
            known = {n for n, _ in denoiser.named_modules()}
            missing = [n for n in layers if n not in known]
            if missing:
                raise ValueError(f"ED-LoRA layers {missing[:3]} are not modules of this {type(denoiser).__name__}")
        target = self.target
        if text:
            emb = input_embedding(model)
            host = model.get_submodule(emb)
            others = [d for d in host.deltas.values() if isinstance(d, LayerRows)] if isinstance(host, Host) else []
            if any(d.layers != tuple(layers) for d in others):
                raise ValueError("ED-LoRA adapters on one text encoder must share their cross-attention layers")
            if target is None:  # the LoRA sites and the token embedding, by exact name
                lora = self.text_target or preset("clip-text")
                target = Target(include=(emb, *lora.select(model)), types=(*lora.types, "Embedding"))
        elif target is None:
            target = self.unet_target or preset("unet-attn")
        bound = dataclasses.replace(self, token=self.token or name, layers=tuple(layers), target=target)
        if text:
            bound._tokenizer, bound._encoder, bound._denoiser = find_tokenizer(obj, model), model, denoiser
        return bound

    def build(self, base: nn.Module, site: str, init: bool = True):
        if not isinstance(base, nn.Embedding):
            delta = LoRADelta(self, site, base, init)
            delta.category = self.category
            return delta
        if self.token is None:
            raise ValueError("EDLoRA needs a token: set token=... (inject and load_adapter use the adapter name "
                             "when it is unset)")
        tokens = vector_tokens(self.token, self.num_vectors)
        if self._tokenizer is not None:
            existing = [t for t, i in zip(tokens, token_ids(self._tokenizer, tokens)) if i is not None]
            if existing:
                raise ValueError(f"tokens {existing} already exist in the tokenizer's vocabulary: ED-LoRA needs new "
                                 f"tokens (pick another token)")
        rows = self._initial_rows(base) if init else None
        return LayerRows(self, site, base, tokens, self._tokenizer, rows, self.layers, self._encoder, self._denoiser)

    @torch.no_grad()
    def _initial_rows(self, base: nn.Embedding) -> torch.Tensor:
        rows = torch.randn(self.num_vectors, base.embedding_dim, device=base.weight.device) * self.init_std
        if self.init_word is not None:
            ids = init_word_ids(self._tokenizer, self.init_word, base)
            if len(ids) != 1:
                raise ValueError(f"init_word {self.init_word!r} must be one token of the base vocabulary, it is "
                                 f"{len(ids)} tokens")
            rows[-1] = base.weight[ids[0]].float()
        return rows.expand(len(self.layers), -1, -1)  # every layer starts alike, as in Mix-of-Show
