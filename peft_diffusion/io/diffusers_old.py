"""Older diffusers LoRA names, read only (diffusers itself writes the peft layout since 0.2x).

- attention processors: ``unet.{block}.attn1.processor.to_q_lora.down.weight`` (``to_out_lora`` is
  ``to_out.0``); text encoder: ``...self_attn.to_q_lora.down.weight`` is ``q_proj``.
- LoRA-compatible layers: ``{module}.lora.down.weight`` / ``.lora.up.weight``.
- text encoder layers: ``{module}.lora_linear_layer.down.weight``.
- an optional ``{stem}.alpha`` gives that module scale alpha / rank; without one the scale is 1.
"""
from __future__ import annotations

import re
from collections import defaultdict

from ..registry import register_format
from .adapter_data import AdapterData, lora_config, matrix, scalar, split_component

# (regex on the key without its component and suffix, replacement): the first that matches is applied
STEM_RULES = (
    (re.compile(r"(.*self_attn)\.to_([qkv])_lora"), r"\1.\2_proj"),
    (re.compile(r"(.*self_attn)\.to_out_lora"), r"\1.out_proj"),
    (re.compile(r"(.*?)(?:\.processor)?\.to_([qkv])_lora"), r"\1.to_\2"),
    (re.compile(r"(.*?)(?:\.processor)?\.to_out_lora"), r"\1.to_out.0"),
    (re.compile(r"(.*)\.lora_linear_layer"), r"\1"),
    (re.compile(r"(.*)\.lora"), r"\1"),
)
SUFFIXES = {".down.weight": "lora_A.weight", ".up.weight": "lora_B.weight", ".alpha": "alpha"}
MARKERS = (".lora.down.", ".lora.up.", "_lora.down.", "_lora.up.", ".lora_linear_layer.")


def site_of(stem: str) -> str | None:
    for rx, repl in STEM_RULES:
        if rx.fullmatch(stem):
            return rx.sub(repl, stem)
    return None


class DiffusersOldLoRA:
    name = "diffusers-old"

    @staticmethod
    def detect(tensors: dict, metadata: dict) -> bool:
        return any(m in k for k in tensors for m in MARKERS)

    @staticmethod
    def to_native(tensors: dict, metadata: dict, module_names=None) -> AdapterData:
        grouped: dict = defaultdict(lambda: defaultdict(dict))
        alphas: dict = defaultdict(dict)
        sources: dict = defaultdict(list)
        unknown = []
        for key, t in tensors.items():
            comp, rest = split_component(key)
            suffix = next((s for s in SUFFIXES if rest.endswith(s)), None)
            site = site_of(rest[: -len(suffix)]) if suffix else None
            if site is None:
                unknown.append(key)
                continue
            if SUFFIXES[suffix] == "alpha":
                alphas[comp][site] = scalar(key, t)
            else:
                grouped[comp][site][SUFFIXES[suffix]] = matrix(key, t)
            sources[comp, site].append(key)
        configs = {}
        for comp, sites in grouped.items():
            ranks = {s: p["lora_A.weight"].shape[0] for s, p in sites.items() if "lora_A.weight" in p}
            configs[comp] = lora_config(ranks, {s: alphas[comp].get(s, float(r)) for s, r in ranks.items()})
        unknown += [k for (comp, site), keys in sources.items() if site not in grouped.get(comp, {}) for k in keys]
        return AdapterData(configs, {c: dict(s) for c, s in grouped.items()}, unknown=unknown, sources=dict(sources))


register_format(DiffusersOldLoRA)
