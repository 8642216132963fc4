"""Scoring a CLIP model on the shapes world: zero-shot classification by text prompts, image-text retrieval,
and the shifted domains (striped shapes, the held-out cross) that the prompt-family methods must learn.

Used by ``train/pretrain_clip.py`` for the model card of the embedded CLIP (``peft_diffusion/models/shapes-clip``)
and by later learning tables. Every function takes a ``transformers.CLIPModel`` (or anything with
``get_image_features`` / ``get_text_features``) and its tokenizer; images are the world's uint8 arrays.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch

from . import world

__all__ = ["pixel_values", "image_features", "text_features", "class_prompts", "zero_shot", "retrieval",
           "shifted_set", "evaluate_clip"]

# what CLIPImageProcessor does with the embedded model's preprocessor config (mean = std = 0.5)
MEAN = STD = 0.5


def pixel_values(images) -> torch.Tensor:
    """uint8 [N, H, W, 3] (or a list of arrays / PIL images) -> float [N, 3, H, W] in [-1, 1]."""
    x = torch.as_tensor(world.to_array(images) if not isinstance(images, np.ndarray) else images).float() / 255
    return ((x - MEAN) / STD).permute(0, 3, 1, 2).contiguous()


def _features(out) -> torch.Tensor:
    # transformers 5 returns an output object from get_*_features; 4.x a tensor
    return out if torch.is_tensor(out) else getattr(out, "pooler_output", out[0])


@torch.no_grad()
def image_features(model, images, batch: int = 512) -> torch.Tensor:
    x = pixel_values(images)
    feats = [_features(model.get_image_features(pixel_values=x[i:i + batch])) for i in range(0, len(x), batch)]
    return torch.nn.functional.normalize(torch.cat(feats), dim=-1)


@torch.no_grad()
def text_features(model, tokenizer, texts: list[str]) -> torch.Tensor:
    enc = tokenizer(list(texts), padding="max_length", truncation=True, return_tensors="pt")
    feats = _features(model.get_text_features(input_ids=enc.input_ids, attention_mask=enc.attention_mask))
    return torch.nn.functional.normalize(feats, dim=-1)


def class_prompts(shapes=world.SHAPES, colours=world.COLOURS) -> tuple[list[str], list[dict]]:
    """("a red circle", ...) for every shape x colour, with their attributes."""
    attrs = [{"shape": s, "colour": c} for s, c in itertools.product(shapes, colours)]
    return [world.caption(a) for a in attrs], attrs


def zero_shot(model, tokenizer, images, attrs: list[dict], shapes=world.SHAPES, colours=world.COLOURS) -> dict:
    """Accuracy of picking the best of the shape x colour prompts: per shape, per colour, and both."""
    prompts, classes = class_prompts(shapes, colours)
    best = (image_features(model, images) @ text_features(model, tokenizer, prompts).T).argmax(-1)
    picked = [classes[i] for i in best.tolist()]
    out = {k: float(np.mean([p[k] == a[k] for p, a in zip(picked, attrs)])) for k in ("shape", "colour")}
    out["both"] = float(np.mean([p["shape"] == a["shape"] and p["colour"] == a["colour"]
                                 for p, a in zip(picked, attrs)]))
    return out


def retrieval(model, tokenizer, samples) -> dict:
    """Top-1 image->text and text->image retrieval over full captions; a caption that several images share
    counts as found when any of them is picked."""
    captions = [s.caption for s in samples]
    sims = image_features(model, [s.image for s in samples]) @ text_features(model, tokenizer, captions).T
    same = torch.tensor([[a == b for b in captions] for a in captions])
    i2t = same[torch.arange(len(captions)), sims.argmax(1)].float().mean().item()
    t2i = same[sims.argmax(0), torch.arange(len(captions))].float().mean().item()
    return {"image_to_text": i2t, "text_to_image": t2i}


def shifted_set(kind: str, n: int, seed: int) -> list:
    """Fresh images of a shifted domain: "striped" (stripes on the world's shapes, which CLIP never saw) or
    "cross" (the held-out subject shape, in every colour)."""
    rng = np.random.default_rng(seed)
    if kind == "striped":
        return [world.from_attrs({**world.sample(rng).attrs, "striped": True}, rng) for _ in range(n)]
    if kind == "cross":
        return [world.from_attrs({**world.sample(rng).attrs, "shape": world.SUBJECT_SHAPE}, rng) for _ in range(n)]
    raise ValueError(f"unknown shifted domain {kind!r}: striped or cross")


def evaluate_clip(model, tokenizer, n: int = 1000, seed: int = 4321) -> dict:
    """The model card's figures: zero-shot on fresh world images, retrieval, and both shifted domains
    (the cross read among the 6 shapes with "cross" as a new class name)."""
    model.eval()
    fresh = world.dataset(n, seed)
    out = {"zero_shot": zero_shot(model, tokenizer, [s.image for s in fresh], [s.attrs for s in fresh]),
           "retrieval": retrieval(model, tokenizer, fresh[:200])}
    striped = shifted_set("striped", n, seed + 1)
    out["shifted_striped"] = zero_shot(model, tokenizer, [s.image for s in striped], [s.attrs for s in striped])
    cross = shifted_set("cross", n, seed + 2)
    out["shifted_cross"] = zero_shot(model, tokenizer, [s.image for s in cross], [s.attrs for s in cross],
                                     shapes=world.ALL_SHAPES)
    return out
