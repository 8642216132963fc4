"""AUTOMATIC1111 / kohya textual-inversion files.

- ``.pt``: ``{"string_to_token": {"*": 265}, "string_to_param": {"*": tensor [n, width]}, "name", "step",
  "sd_checkpoint", "sd_checkpoint_name"}``, read weights-only (``io/files.py`` flattens the nested dict to
  ``string_to_param.*``);
- ``.safetensors``: ``{"emb_params": tensor [n, width]}``;
- SDXL: ``{"clip_l": [n, 768], "clip_g": [n, 1280]}`` for ``text_encoder`` / ``text_encoder_2``.

A1111 names the token after the file (``path.stem``): the loader's default adapter name, which becomes the
token. We write ``emb_params`` (or the SDXL pair) as safetensors.
"""
from __future__ import annotations

from ..registry import register_format
from .adapter_data import AdapterData
from .ti_diffusers import METHOD, PARAM, SDXL_KEYS, clip_pair, embedding_data, embedding_vectors

PT_PARAM = "string_to_param.*"
PT_IGNORED = ("string_to_token.*",)  # A1111's placeholder id in the original repo's files, unused


class A1111Embedding:
    name = "a1111"
    methods = (METHOD,)

    @staticmethod
    def detect(tensors: dict, metadata: dict) -> bool:
        keys = set(tensors)
        return PT_PARAM in keys or keys == {PARAM} or bool(keys) and keys <= set(SDXL_KEYS.values())

    @staticmethod
    def to_native(tensors: dict, metadata: dict, module_names=None) -> AdapterData:
        if PT_PARAM in tensors:
            vectors, used = {"text_encoder": tensors[PT_PARAM]}, {PT_PARAM, *PT_IGNORED}
            keys = {"text_encoder": sorted(used & set(tensors))}
        elif PARAM in tensors:
            vectors, used = {"text_encoder": tensors[PARAM]}, {PARAM}
            keys = {"text_encoder": [PARAM]}
        else:
            vectors = {c: tensors[k] for c, k in SDXL_KEYS.items() if k in tensors}
            used = set(SDXL_KEYS.values())
            keys = {c: [k] for c, k in SDXL_KEYS.items() if k in tensors}
        data = embedding_data(vectors, module_names, keys=keys)
        data.unknown = sorted(set(tensors) - used)
        return data

    @staticmethod
    def from_native(data: AdapterData) -> tuple[dict, dict]:
        vectors = embedding_vectors(data, "A1111")
        if "text_encoder_2" in vectors:
            return clip_pair(vectors), {}
        return {PARAM: vectors["text_encoder"]}, {}


register_format(A1111Embedding)
