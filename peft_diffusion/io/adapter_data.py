"""The in-memory form every file format converts to and from."""
from __future__ import annotations

import dataclasses
from collections import Counter

import torch

from ..registry import method_config

# first key segments that name a pipeline component
COMPONENTS = ("unet", "transformer", "prior", "decoder", "controlnet", "text_encoder", "text_encoder_2",
              "text_encoder_3", "image_encoder", "vae")

# transformers 5 flattened these models (no ``text_model`` submodule); files in the wild name their modules
# with the old wrapper prefix, and so do the files we write.
WRAPPERS = {"CLIPTextModel": "text_model.", "CLIPVisionModel": "vision_model."}


def unwrapped(site: str) -> str:
    for prefix in WRAPPERS.values():
        if site.startswith(prefix):
            return site[len(prefix):]
    return site


@dataclasses.dataclass
class AdapterData:
    """One adapter as files carry it.

    configs: component -> method config ("" = a file without component prefixes).
    tensors: component -> module path (site) -> {delta parameter name: tensor}.
    unknown: file keys the format could not place (the loader errors on them unless asked to skip).
    sources: (component, site) -> the file keys read for that site (alphas included), so a load report
      names keys as the file spells them; formats whose keys are ``component.site.param`` may leave it out.
    """

    configs: dict
    tensors: dict[str, dict[str, dict[str, torch.Tensor]]]
    name: str | None = None
    fingerprints: dict[str, str] = dataclasses.field(default_factory=dict)
    unknown: list[str] = dataclasses.field(default_factory=list)
    sources: dict[tuple[str, str], list[str]] = dataclasses.field(default_factory=dict)


def matrix(key: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` when it can be a factor matrix (or a conv kernel: 2 dimensions or more), else a ValueError naming
    the key: readers take ranks from these shapes."""
    if t.ndim < 2:
        raise ValueError(f"{key} has shape {tuple(t.shape)}; a factor needs 2 or more dimensions")
    return t


def scalar(key: str, t: torch.Tensor) -> float:
    """The one value of an ``alpha``-like tensor, else a ValueError naming the key."""
    if t.numel() != 1 or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{key} should hold one real number, not a {t.dtype} tensor of shape {tuple(t.shape)}")
    return float(t)


def split_component(key: str, components=COMPONENTS) -> tuple[str, str]:
    """(component, rest) of a key whose first segment names a component, else ("", key)."""
    head, _, rest = key.partition(".")
    return (head, rest) if head in components and rest else ("", key)


def split_param(key: str, param_names: tuple[str, ...]) -> tuple[str, str] | None:
    """(site, param) of ``site.param`` for a known delta parameter name, else None. A name ending with "." is a
    prefix: every key under it belongs to the delta (a whole model held by an annex, e.g. a ControlNet copy)."""
    for p in param_names:
        if p.endswith("."):
            if key.startswith(p):
                return "", key
            at = key.find("." + p)
            if at >= 0:
                return key[:at], key[at + 1:]
            continue
        if key.endswith("." + p):
            return key[: -len(p) - 1], p
        if key == p:  # a delta on the whole model (an annex of the model itself): site ""
            return "", p
    return None


def join_keys(data: AdapterData) -> dict[str, torch.Tensor]:
    """Flat ``component.site.param`` keys (no prefix for component "")."""
    out = {}
    for comp, sites in data.tensors.items():
        for site, params in sites.items():
            for p, t in params.items():
                out[".".join(part for part in (comp, site, p) if part)] = t
    return out


def lora_config(ranks: dict[str, int], alphas: dict[str, float], **extra):
    """A LoRA config with the most common rank and alpha, and exact per-site patterns for the rest."""
    if not ranks:
        raise ValueError("no site has its down (A) matrix, so no rank can be read")
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0] if alphas else r
    rank_pattern = {s: v for s, v in ranks.items() if v != r}
    alpha_pattern = {s: a for s, a in alphas.items() if a != alpha}
    return method_config("lora")(r=r, alpha=alpha, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, **extra)


def per_site(config, sites) -> tuple[dict[str, int], dict[str, float]]:
    """Each site's rank and its scale expressed as a kohya alpha (alpha = scale * rank)."""
    ranks = {s: config.rank(s) for s in sites}
    return ranks, {s: config.scale(s) * ranks[s] for s in sites}
