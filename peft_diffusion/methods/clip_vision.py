"""Where visual prompts go in a CLIP vision tower: what VP (``vp.py``) and VPT (``vpt.py``) share.

A CLIP-style vision tower is a module with an ``embeddings`` child of class ``CLIPVisionEmbeddings`` (patch
embedding, [CLS], position embeddings) and an ``encoder`` child of class ``CLIPEncoder`` (its ``layers``):
transformers' ``CLIPVisionModel`` (5.x; ``CLIPVisionTransformer`` in 4.x), found inside ``CLIPModel`` (its
``vision_model``) and ``CLIPVisionModelWithProjection``. The text tower's ``CLIPEncoder`` sits beside
``CLIPTextEmbeddings`` and is never chosen.
"""
from __future__ import annotations

from torch import nn

from ..target import class_names
from .dense import module_at

EMBEDDINGS, ENCODER = "CLIPVisionEmbeddings", "CLIPEncoder"
SUPPORTED = ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel (its vision tower)")


def vision_towers(model: nn.Module) -> list[str]:
    """Paths ("" = the model) of the CLIP vision towers in ``model``, in model order."""
    found = []
    for name, m in model.named_modules():
        emb, enc = m._modules.get("embeddings"), m._modules.get("encoder")
        if emb is not None and enc is not None and EMBEDDINGS in class_names(emb) and ENCODER in class_names(enc):
            found.append(name)
    return found


def select_in_towers(config, model: nn.Module, child: str) -> list[str]:
    """The ``child`` ("embeddings" or "encoder") of each vision tower; with ``config.target`` set, the modules
    it selects, each of which must be such a child. Errors name the method, the class and the supported ones."""
    method = type(config).__name__
    wanted = EMBEDDINGS if child == "embeddings" else ENCODER
    towers = vision_towers(model)
    allowed = {f"{t}.{child}" if t else child for t in towers}
    if config.target is None:
        if not towers:
            raise ValueError(f"{method} needs a CLIP-style vision tower ({EMBEDDINGS} + {ENCODER}); this "
                             f"{type(model).__name__} has none. Supported: {', '.join(SUPPORTED)}")
        return sorted(allowed, key=[n for n, _ in model.named_modules()].index)
    chosen = config.target.select(model, "annex")
    bad = [c for c in chosen if c not in allowed]
    if bad or not chosen:
        what = f"{bad[0] or '<model>'!r}, a {type(module_at(model, bad[0])).__name__}" if bad else "nothing"
        raise ValueError(f"{method} target {config.target} selects {what}; it goes on the {wanted} of a CLIP "
                         f"vision tower (in this {type(model).__name__}: {sorted(allowed) or 'none'})")
    return chosen


__all__ = ["vision_towers", "select_in_towers", "SUPPORTED"]
