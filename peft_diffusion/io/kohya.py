"""kohya-ss / A1111 / ComfyUI LoRA files.

Keys: ``lora_unet_<module path with _>.lora_down.weight``, ``.lora_up.weight`` and a 0-d ``.alpha``; text
encoders ``lora_te_`` (SD1.x), ``lora_te1_`` / ``lora_te2_`` (SDXL). Each module's scale is its own
alpha / rank (alpha = rank when the key is missing). Underscored paths are ambiguous, so reading resolves
them against the model's real module names (without a model, sites keep their underscored names).
LoHa and LoKr adapters are written in this naming by the LyCORIS format (io/lycoris.py), which also reads
kohya-named files with LyCORIS parameters.
"""
from __future__ import annotations

import json
from collections import defaultdict

import torch

from ..registry import FORMATS, register_format
from .adapter_data import AdapterData, lora_config, matrix, per_site, scalar

PREFIXES = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder",
            "lora_te2": "text_encoder_2"}
SUFFIXES = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight", "alpha": "alpha"}


def file_prefixes(comps) -> dict[str, str]:
    """component -> key prefix, for the components one file holds (SDXL's two text encoders: te1 / te2)."""
    two_encoders = "text_encoder_2" in comps
    return {"unet": "lora_unet", "transformer": "lora_unet", "": "lora_unet",
            "text_encoder": "lora_te1" if two_encoders else "lora_te", "text_encoder_2": "lora_te2"}


def split_key(key: str) -> tuple[str, str, str] | None:
    """(component, underscored module path, our parameter name) of a kohya key, or None."""
    stem, _, suffix = key.partition(".")
    if suffix not in SUFFIXES:
        return None
    for prefix in sorted(PREFIXES, key=len, reverse=True):
        if stem.startswith(prefix + "_"):
            return PREFIXES[prefix], stem[len(prefix) + 1:], SUFFIXES[suffix]
    return None


class Sites:
    """Underscored module paths -> the model's module names, per component, looked up once per component.

    ``module_names(comp)`` is the loader's {module name: layer} of a component; ``module_names`` None, or
    None for a component, means no model to resolve against (inspecting a file, or a component the loader
    will skip): sites keep their underscored names."""

    def __init__(self, module_names):
        self.module_names = module_names
        self.layers: dict[str, dict] = {}  # component -> {module name: layer}
        self.lookup: dict[str, dict[str, str]] = {}  # component -> {underscored name: module name}

    def site(self, comp: str, flat: str) -> str | None:
        if self.module_names is None:
            return flat
        if comp not in self.lookup:
            names = self.module_names(comp)
            if names is not None:
                self.layers[comp] = dict(names)
            self.lookup[comp] = None if names is None else {n.replace(".", "_"): n for n in names}
        return flat if self.lookup[comp] is None else self.lookup[comp].get(flat)

    def place(self, tensors: dict, split=split_key) -> tuple[list, list[str]]:
        """([(key, component, site, parameter, tensor)] of the keys ``split`` reads and that name a module of
        the model, [the other keys])."""
        placed, unknown = [], []
        for key, t in tensors.items():
            parts = split(key)
            site = None if parts is None else self.site(parts[0], parts[1])
            if site is None:
                unknown.append(key)
            else:
                placed.append((key, parts[0], site, parts[2], t))
        return placed, unknown


class KohyaLoRA:
    name = "kohya"

    @staticmethod
    def detect(tensors: dict, metadata: dict) -> bool:
        return any(k.split("_", 2)[:2] in (["lora", "unet"], ["lora", "te"], ["lora", "te1"], ["lora", "te2"])
                   for k in tensors)

    @staticmethod
    def to_native(tensors: dict, metadata: dict, module_names=None) -> AdapterData:
        grouped: dict = defaultdict(lambda: defaultdict(dict))
        alphas: dict = defaultdict(dict)
        sources: dict = defaultdict(list)
        placed, unknown = Sites(module_names).place(tensors)
        for key, comp, site, param, t in placed:
            if param == "alpha":
                alphas[comp][site] = scalar(key, t)
            else:
                grouped[comp][site][param] = matrix(key, t)
            sources[comp, site].append(key)
        configs = {}
        for comp, sites in grouped.items():
            ranks = {s: p["lora_A.weight"].shape[0] for s, p in sites.items() if "lora_A.weight" in p}
            configs[comp] = lora_config(ranks, {s: alphas[comp].get(s, float(r)) for s, r in ranks.items()})
        unknown += [k for (comp, site), keys in sources.items() if site not in grouped.get(comp, {}) for k in keys]
        return AdapterData(configs, {c: dict(s) for c, s in grouped.items()}, unknown=unknown, sources=dict(sources))

    @staticmethod
    def from_native(data: AdapterData) -> tuple[dict, dict]:
        if any(cfg.method != "lora" for cfg in data.configs.values()):  # LoHa / LoKr in kohya's naming
            return FORMATS["lycoris"].from_native(data, kohya=True)
        prefix_of = file_prefixes(data.tensors)
        tensors = {}
        dims = set()
        for comp, sites in data.tensors.items():
            cfg = data.configs[comp]
            if cfg.method != "lora" or comp not in prefix_of:
                raise ValueError(f"kohya files hold LoRA, LoHa or LoKr on unet/transformer/text encoders, not "
                                 f"{cfg.method!r} on {comp or 'an unnamed component'!r}")
            ranks, alphas = per_site(cfg, sites)
            dims.update(ranks.values())
            for site, params in sites.items():
                stem = f"{prefix_of[comp]}_{site.replace('.', '_')}"
                tensors[f"{stem}.lora_down.weight"] = params["lora_A.weight"]
                tensors[f"{stem}.lora_up.weight"] = params["lora_B.weight"]
                tensors[f"{stem}.alpha"] = torch.tensor(alphas[site], dtype=torch.float32)
        meta = {"ss_network_module": "networks.lora", "ss_network_dim": json.dumps(sorted(dims)[-1])}
        return tensors, meta


register_format(KohyaLoRA)
