"""Per-call inputs in training: what a method needs beside the caption (an image prompt, a condition
image), made once per run and handed to the U-Net per batch with ``pd.inputs``.

The hook is a method-config method, found like ``after_step``: a config that defines
``batch_inputs(pipe, pixels, dropout)`` gets the pipeline (its image encoder registered), the instance images
(``[N, 3, H, W]`` in [-1, 1]) and the run's ``image_prompt_dropout``, and returns a function
``batch -> (inputs, drop_text)``: the per-call inputs for the whole U-Net batch (instance items, then prior
items) and a mask of the items whose caption is replaced by the empty one (None: none). Configs that need
an image encoder say so with ``needs_image_encoder = True``. Validation images get the inputs of
``validation_inputs(pipe, pixels, guidance)`` (guidance: whether the pipeline runs classifier-free guidance).
The control methods' configs (``ControlFields``) define neither: their condition maps come from
``condition_inputs``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from .. import api
from ..methods.control_image import ControlFields
from ..models import path as embedded_path
from . import condition_inputs
from .config import ConfigError

logger = logging.getLogger(__name__)

EMBEDDED_ENCODER = "shapes-clip"


def attach_image_encoder(pipe, folder: str, device) -> None:
    """Register a CLIP image encoder (``CLIPVisionModelWithProjection``; a ``CLIPModel`` folder loads its vision
    tower) and its image processor on ``pipe``: ``folder``, else the base's own, else the embedded shapes-clip."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    own = None  # the folder the encoder came from, whose image processor settings go with it
    if not folder and getattr(pipe, "image_encoder", None) is not None:
        encoder = pipe.image_encoder
        source = "the base's image_encoder"
    else:
        try:
            source = folder or str(embedded_path(EMBEDDED_ENCODER))
        except FileNotFoundError as e:
            raise ConfigError(f"this method takes an image prompt and needs an image encoder: set image_encoder to "
                              f"a CLIPVisionModelWithProjection folder ({e})") from None
        if not Path(source).is_dir():
            raise ConfigError(f"image_encoder {source!r} is not a folder (a CLIPVisionModelWithProjection or CLIPModel "
                              "saved with save_pretrained)")
        encoder = CLIPVisionModelWithProjection.from_pretrained(source)
        own = Path(source)
    processor = getattr(pipe, "feature_extractor", None)
    if processor is None:
        size = encoder.config.image_size
        has_own = own is not None and (own / "preprocessor_config.json").is_file()
        processor = CLIPImageProcessor.from_pretrained(own) if has_own else CLIPImageProcessor(size=size, crop_size=size)
    encoder.requires_grad_(False).eval().to(device)
    pipe.register_modules(image_encoder=encoder, feature_extractor=processor)
    logger.info("image encoder: %s (%s, %d-wide embedding)", source, type(encoder).__name__,
                encoder.config.projection_dim)


def needs_image_encoder(method) -> bool:
    return bool(getattr(method, "needs_image_encoder", False))


def _takers(pipe, hook: str) -> list:
    """The adapter configs of ``pipe`` that take per-call inputs in training: those defining ``hook`` and the
    control methods' (``ControlFields``: their condition maps come from ``condition_inputs``), in model order."""
    found = {id(cfg): cfg for cfg, _ in api._by_config(pipe, hook)}
    found.update({id(cfg): cfg for cfg, _ in api._by_config(pipe, "control_type") if isinstance(cfg, ControlFields)})
    return list(found.values())


def per_call_inputs(pipe, pixels: torch.Tensor, dropout: float):
    """``batch -> (inputs, drop_text)`` for the adapters of ``pipe`` that take per-call inputs, or None."""
    makers = [condition_inputs.batch_inputs(cfg, pipe, pixels) if isinstance(cfg, ControlFields)
              else cfg.batch_inputs(pipe, pixels, dropout) for cfg in _takers(pipe, "batch_inputs")]
    if not makers:
        return None

    def inputs(batch: dict):
        named, drop = {}, None
        for make in makers:
            more, mask = make(batch)
            named.update(more)
            drop = mask if drop is None else (drop if mask is None else drop | mask)
        return named, drop

    return inputs


def validation_inputs(pipe, pixels: torch.Tensor, guidance: bool) -> dict:
    """The per-call inputs the adapters of ``pipe`` want for validation images ({} when none does)."""
    out = {}
    for cfg in _takers(pipe, "validation_inputs"):
        out.update(condition_inputs.validation_inputs(cfg, pipe, pixels) if isinstance(cfg, ControlFields)
                   else cfg.validation_inputs(pipe, pixels, guidance))
    return out
