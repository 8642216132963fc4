"""Generating images for evaluation and scoring them with the shapes-world oracle."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


@torch.no_grad()
def generate(pipe, prompts: list[str], seed: int = 0, steps: int = 20, guidance: float = 4.0,
             batch_size: int = 16, size: int | None = None, height: int | None = None, width: int | None = None,
             negative_prompt: str | None = None) -> np.ndarray:
    """uint8 images (N x H x W x 3) for ``prompts``; image i uses generator seed ``seed + i``, so a prompt's
    image does not depend on the batch it falls in. ``size`` sets both sides (default: the base's own)."""
    size = size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = height or size, width or size
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        gens = [torch.Generator(pipe.device).manual_seed(seed + start + i) for i in range(len(chunk))]
        negative = None if negative_prompt is None else [negative_prompt] * len(chunk)
        images = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
                      negative_prompt=negative, generator=gens, output_type="np").images
        out.append((np.clip(images, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out)


def grid(images: np.ndarray, cols: int) -> Image.Image:
    """One picture of N equally sized uint8 images, ``cols`` per row."""
    n, h, w, c = images.shape
    rows = -(-n // cols)
    canvas = np.full((rows * h, cols * w, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        canvas[r * h:(r + 1) * h, k * w:(k + 1) * w] = img
    return Image.fromarray(canvas)


def side_by_side(*columns: np.ndarray, rows: int = 16) -> Image.Image:
    """One picture whose row i shows image i of each column (uint8 N x H x W x 3 arrays), first ``rows`` rows:
    e.g. condition | without | with."""
    n = min(rows, *(len(c) for c in columns))
    stacked = np.stack([np.stack([c[i] for c in columns]) for i in range(n)])
    return grid(stacked.reshape(-1, *columns[0].shape[1:]), len(columns))
