"""peft-diffusion's own files: ``{component}.{module}.{delta parameter}`` keys plus a JSON header.

Header ``peft_diffusion``: format version, package version, adapter name, and per component the method
config and the base-model fingerprint. Parameter names are the ecosystem's (``lora_A.weight``, ...), so a
native LoRA or DoRA file also carries diffusers' ``lora_adapter_metadata`` and loads in ``load_lora_weights``.
"""
from __future__ import annotations

import json
from collections import defaultdict

from ..registry import config_from_dict, register_format
from ..version import __version__
from .adapter_data import AdapterData, join_keys, split_component, split_param
from .diffusers_lora import HEADER as LORA_HEADER, METHODS as LORA_METHODS, lora_header

HEADER = "peft_diffusion"
FORMAT_VERSION = 1


class Native:
    name = "native"

    @staticmethod
    def detect(tensors: dict, metadata: dict) -> bool:
        return HEADER in metadata

    @staticmethod
    def to_native(tensors: dict, metadata: dict, module_names=None) -> AdapterData:
        try:
            header = json.loads(metadata[HEADER])
            version = header["format_version"]
            comps = header["components"]
            if not isinstance(version, int) or not isinstance(comps, dict):
                raise TypeError(f"format_version {version!r}, components of type {type(comps).__name__}")
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"damaged peft_diffusion header: {e}") from e
        if version > FORMAT_VERSION:
            raise ValueError(f"file format version {version} is newer than this peft-diffusion reads "
                             f"({FORMAT_VERSION}): upgrade peft-diffusion")
        configs = {}
        for c, v in comps.items():
            try:
                configs[c] = config_from_dict(v["config"])
            except Exception as e:  # noqa: BLE001 - any field of any method config may be damaged
                raise ValueError(f"damaged peft_diffusion header: the {c or 'model'} config does not build "
                                 f"({type(e).__name__}: {e})") from e
        grouped: dict = defaultdict(lambda: defaultdict(dict))
        sources: dict = {}
        unknown = []
        named = tuple(c for c in configs if c)
        for key, t in tensors.items():
            comp, rest = split_component(key, named)
            hit = split_param(rest, configs[comp].param_names) if comp in configs else None
            if hit is None:
                unknown.append(key)
            else:
                grouped[comp][hit[0]][hit[1]] = t
                sources.setdefault((comp, hit[0]), []).append(key)
        name = header.get("name") if isinstance(header.get("name"), str) else None
        return AdapterData(configs, {c: dict(s) for c, s in grouped.items()}, name=name,
                           fingerprints={c: str(v.get("fingerprint") or "") for c, v in comps.items()},
                           unknown=unknown, sources=sources)

    @staticmethod
    def from_native(data: AdapterData) -> tuple[dict, dict]:
        header = {"format_version": FORMAT_VERSION, "version": __version__, "name": data.name,
                  "components": {c: {"config": cfg.to_dict(), "fingerprint": data.fingerprints.get(c, "")}
                                 for c, cfg in data.configs.items()}}
        meta = {HEADER: json.dumps(header, sort_keys=True)}
        if all(cfg.method in LORA_METHODS for cfg in data.configs.values()):
            meta[LORA_HEADER] = lora_header(data)
        return join_keys(data), meta


register_format(Native)
