"""diffusers textual-inversion files: ``learned_embeds.safetensors`` (or a weights-only ``.bin``) holding
``{token: tensor [n, width]}`` (or ``[width]``), read by ``pipe.load_textual_inversion``; a token with n
vectors becomes the tokens ``tok, tok_1, ..., tok_{n-1}``. The file names the token; ``load_adapter(...,
name=...)`` replaces it. Two-encoder (SDXL) adapters are written as ``{clip_l, clip_g}``, the layout
diffusers' docs load into ``text_encoder`` / ``text_encoder_2`` one at a time (see ``a1111_embedding``).
Also the shared helpers of the embedding formats.
"""
from __future__ import annotations

import torch
from torch import nn

from ..registry import method_config, register_format
from .adapter_data import AdapterData

METHOD = "textual-inversion"
PARAM = "emb_params"
SDXL_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
CLIP_SITE = "text_model.embeddings.token_embedding"  # the site when the component is not there to ask


def embedding_site(module_names, comp: str) -> str:
    """The token embedding among the model's layers: the Embedding with the most rows (position and
    token-type embeddings are smaller)."""
    layers = (module_names(comp) if module_names is not None else None) or {}
    found = [(n, m) for n, m in dict(layers).items() if isinstance(m, nn.Embedding)]
    if not found:
        return CLIP_SITE
    return max(found, key=lambda nm: (nm[1].num_embeddings, -len(nm[0])))[0]


def embedding_data(vectors: dict[str, torch.Tensor], module_names, name: str | None = None,
                   keys: dict[str, list[str]] | None = None) -> AdapterData:
    """AdapterData of {component: vectors}; the token stays unset (it becomes the adapter name). ``keys``:
    component -> the file keys behind its vectors, for the load report."""
    configs, tensors, sources = {}, {}, {}
    for comp, t in vectors.items():
        if not t.is_floating_point() or t.ndim not in (1, 2) or t.numel() == 0:
            raise ValueError(f"a token embedding is a float tensor [vectors, width] or [width], "
                             f"got {t.dtype} of shape {tuple(t.shape)}")
        t = t.reshape(1, -1) if t.ndim == 1 else t
        configs[comp] = method_config(METHOD)(num_vectors=t.shape[0])
        site = embedding_site(module_names, comp)
        tensors[comp] = {site: {PARAM: t}}
        sources[comp, site] = list((keys or {}).get(comp, []))
    return AdapterData(configs, tensors, name=name, sources=sources)


def embedding_vectors(data: AdapterData, fmt: str) -> dict[str, torch.Tensor]:
    """{component: [n, width]} of a textual-inversion adapter (a text encoder without a name is the first)."""
    out = {}
    for comp, sites in data.tensors.items():
        cfg = data.configs[comp]
        if cfg.method != METHOD or len(sites) != 1:
            raise ValueError(f"{fmt} embedding files hold textual inversion (one token embedding per text "
                             f"encoder), not {cfg.method!r} on {len(sites)} modules of {comp or 'a model'!r}")
        comp = comp or "text_encoder"
        if comp not in SDXL_KEYS:
            raise ValueError(f"{fmt} embedding files hold text_encoder / text_encoder_2 embeddings, not {comp!r}")
        out[comp] = next(iter(sites.values()))[PARAM]
    return out


def clip_pair(vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {SDXL_KEYS[c]: t for c, t in vectors.items()}


class DiffusersEmbedding:
    name = "ti-diffusers"
    alias = "diffusers"  # what users ask for: format="diffusers"
    methods = (METHOD,)
    default_file = "learned_embeds.safetensors"

    @staticmethod
    def detect(tensors: dict, metadata: dict) -> bool:
        if len(tensors) != 1:
            return False
        (key, t), = tensors.items()
        # a token, not a module path (a token with a dot needs format="ti-diffusers")
        return "." not in key and t.is_floating_point() and t.ndim in (1, 2)

    @staticmethod
    def to_native(tensors: dict, metadata: dict, module_names=None) -> AdapterData:
        (token, t), = tensors.items()
        return embedding_data({"text_encoder": t}, module_names, name=token, keys={"text_encoder": [token]})

    @staticmethod
    def from_native(data: AdapterData) -> tuple[dict, dict]:
        vectors = embedding_vectors(data, "diffusers")
        if "text_encoder_2" in vectors:
            return clip_pair(vectors), {}
        token = next(iter(data.configs.values())).token or data.name
        return {token: vectors["text_encoder"]}, {}


register_format(DiffusersEmbedding)
