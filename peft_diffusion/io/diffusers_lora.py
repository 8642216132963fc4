"""diffusers / peft LoRA files: ``{component}.{module}.lora_A.weight`` / ``.lora_B.weight``.

The ``lora_adapter_metadata`` header is a flat JSON of peft's LoraConfig with keys prefixed per component
(``"unet.r"``, ``"unet.lora_alpha"``, ...). Without it diffusers takes the most common rank as ``r`` and
alpha = rank for every module (scale 1): we read such files the same way. We always write the header,
with exact per-module rank and alpha patterns, so strength survives the trip.

DoRA (``use_dora=True``) adds ``{module}.lora_magnitude_vector`` per module; diffusers decides DoRA from the
header's ``use_dora`` (or, without a header, from those keys), so DoRA files get ``use_dora`` written, and
a file whose keys and header disagree is refused rather than loaded as something else.
"""
from __future__ import annotations

import json
from collections import defaultdict

from ..registry import method_config, register_format
from .adapter_data import AdapterData, join_keys, lora_config, matrix, split_component, split_param, unwrapped

HEADER = "lora_adapter_metadata"
LORA_PARAMS = ("lora_A.weight", "lora_B.weight")
MAGNITUDE = "lora_magnitude_vector"
METHODS = ("lora", "dora")  # what this layout holds (DoRA = LoRA + MAGNITUDE)
UNSUPPORTED = {"lora_B.bias": "LoRA with bias (lora_bias=True)"}


def unsupported_keys(keys) -> None:
    for marker, what in UNSUPPORTED.items():
        found = [k for k in keys if marker in k]
        if found:
            raise ValueError(f"{what} is not supported yet (keys such as {found[0]!r})")


def group_lora(tensors: dict, sources: dict | None = None) -> tuple[dict, list[str]]:
    """component -> site -> {lora_A.weight, lora_B.weight[, lora_magnitude_vector]}, and the other keys;
    ``sources`` gets (component, site) -> file keys."""
    grouped: dict = defaultdict(lambda: defaultdict(dict))
    unknown = []
    for key, t in tensors.items():
        comp, rest = split_component(key)
        hit = split_param(rest, LORA_PARAMS + (MAGNITUDE,))
        if hit is None:
            unknown.append(key)
            continue
        grouped[comp][hit[0]][hit[1]] = matrix(key, t) if hit[1] in LORA_PARAMS else t
        if sources is not None:
            sources.setdefault((comp, hit[0]), []).append(key)
    return {c: dict(s) for c, s in grouped.items()}, unknown


def is_dora(comp: str, sites: dict, header: dict | None) -> bool:
    """Whether a component's adapter is DoRA: its magnitude keys, checked against the header's use_dora."""
    keyed = any(MAGNITUDE in params for params in sites.values())
    said = None if header is None else header.get("use_dora")
    if said is not None and bool(said) != keyed:
        what = "has no" if said else "has DoRA"
        raise ValueError(f"lora_adapter_metadata says use_dora={bool(said)} but {comp or 'the file'} {what} "
                         f"{MAGNITUDE} keys: a DoRA file with the wrong header, or a damaged one")
    return keyed


def config_from_header(kwargs: dict, dora: bool = False):
    """Our LoRA (or DoRA) config from the LoraConfig fields of a ``lora_adapter_metadata`` header."""
    if kwargs.get("lora_bias"):
        raise ValueError("LoRA with bias is not supported yet (lora_bias=True in lora_adapter_metadata)")
    try:
        r = int(kwargs.get("r", 8))
        return method_config("dora" if dora else "lora")(
            r=r, alpha=float(kwargs.get("lora_alpha", r)), rslora=bool(kwargs.get("use_rslora", False)),
            rank_pattern=dict(kwargs.get("rank_pattern") or {}), alpha_pattern=dict(kwargs.get("alpha_pattern") or {}))
    except (TypeError, ValueError, OverflowError) as e:  # a value of the wrong type or range in the header
        raise ValueError(f"lora_adapter_metadata holds an invalid LoraConfig "
                         f"(r={kwargs.get('r')!r}, lora_alpha={kwargs.get('lora_alpha')!r}): {e}") from e


def lora_header(data: AdapterData) -> str:
    """diffusers' ``lora_adapter_metadata``: per component, the LoraConfig with exact per-module patterns."""
    header = {}
    for comp, sites in data.tensors.items():
        cfg = data.configs[comp]
        if cfg.method not in METHODS:
            raise ValueError(f"diffusers LoRA files hold LoRA or DoRA only, not {cfg.method!r} (diffusers cannot load "
                             "it): save it with format='native', which load_adapter reads")
        # diffusers strips a wrapper prefix (``text_model.``) from keys but not from the config, whose
        # names peft matches as suffixes: the header names modules without it
        ranks = {unwrapped(s): cfg.rank(s) for s in sites}
        alphas = {unwrapped(s): cfg.scale(s) * (cfg.rank(s) ** 0.5 if cfg.rslora else cfg.rank(s)) for s in sites}
        exact = lora_config(ranks, alphas)
        prefix = f"{comp}." if comp else ""
        header.update({
            f"{prefix}r": exact.r, f"{prefix}lora_alpha": exact.alpha, f"{prefix}use_rslora": cfg.rslora,
            f"{prefix}rank_pattern": exact.rank_pattern, f"{prefix}alpha_pattern": exact.alpha_pattern,
            f"{prefix}target_modules": sorted(ranks), f"{prefix}lora_dropout": cfg.dropout,
            f"{prefix}use_dora": cfg.method == "dora",
        })
    return json.dumps(header, sort_keys=True)


class DiffusersLoRA:
    name = "diffusers"

    @staticmethod
    def detect(tensors: dict, metadata: dict) -> bool:
        return any(".lora_A." in k or ".lora_B." in k or "lora_magnitude_vector" in k for k in tensors)

    @staticmethod
    def to_native(tensors: dict, metadata: dict, module_names=None) -> AdapterData:
        unsupported_keys(tensors)
        sources: dict = {}
        grouped, unknown = group_lora(tensors, sources)
        header = json.loads(metadata[HEADER]) if metadata.get(HEADER) else None
        if header is not None and not isinstance(header, dict):
            raise ValueError(f"{HEADER} is a JSON {type(header).__name__}, not an object")
        configs = {}
        for comp, sites in grouped.items():
            if header is not None:
                prefix = f"{comp}." if comp else ""
                kwargs = {k[len(prefix):]: v for k, v in header.items() if k.startswith(prefix)} if prefix else header
                if not kwargs and comp:  # a model-level save writes the config unprefixed
                    kwargs = {k: v for k, v in header.items() if "." not in k}
                configs[comp] = config_from_header(kwargs, is_dora(comp, sites, kwargs))
            else:
                ranks = {s: p["lora_A.weight"].shape[0] for s, p in sites.items() if "lora_A.weight" in p}
                configs[comp] = lora_config(ranks, {s: float(r) for s, r in ranks.items()})
                if is_dora(comp, sites, None):
                    configs[comp] = method_config("dora").from_dict(configs[comp].to_dict())
        return AdapterData(configs, grouped, unknown=unknown, sources=sources)

    @staticmethod
    def from_native(data: AdapterData) -> tuple[dict, dict]:
        return join_keys(data), {HEADER: lora_header(data)}


register_format(DiffusersLoRA)
