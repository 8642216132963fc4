"""Measure an IP-Adapter on the shapes world: does an image prompt alone (empty text) reproduce the prompt
image's shape and colour? Held-out world samples (their own seed stream) are the image prompts; each is
generated three ways with the same seed: empty text without the image (the base: chance), empty text with the
image, and the image's full caption with the image. Both readers (the embedded oracle and the analytic reader)
score shape and colour against the image prompt's attributes. Single seed per image (image i: seed + i).

    python samples/ip_adapter_eval.py out/ip-adapter/adapter.safetensors --n 200 --out out/ip-eval
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import peft_diffusion as pd
from peft_diffusion.models import SHAPES_BASE
from peft_diffusion.models import path as embedded_path
from peft_diffusion.shapes import scoring, world
from peft_diffusion.training.call_inputs import attach_image_encoder
from peft_diffusion.training.evaluate import generate, side_by_side

KEYS = ("shape", "colour")


def with_image(pipe, images, prompts, seed, steps, guidance, batch) -> np.ndarray:
    out = []
    for i in range(0, len(prompts), batch):
        with pd.image_prompt(pipe, images[i:i + batch]):
            out.append(generate(pipe, prompts[i:i + batch], seed=seed + i, steps=steps, guidance=guidance,
                                batch_size=batch))
    return np.concatenate(out)


def measure(pipe, n: int, seed: int, steps: int, guidance: float, batch: int):
    samples = [world.sample_at(seed, i) for i in range(n)]
    images, attrs = [s.image for s in samples], [s.attrs for s in samples]
    empty = [""] * n
    t0 = time.perf_counter()
    base = generate(pipe, empty, seed=seed, steps=steps, guidance=guidance, batch_size=batch)  # no image: the base
    image_only = with_image(pipe, images, empty, seed, steps, guidance, batch)
    image_and_text = with_image(pipe, images, [s.caption for s in samples], seed, steps, guidance, batch)
    reader_map = scoring.readers()
    report = {"n": n, "seed": seed, "steps": steps, "guidance": guidance,
              "empty_text_no_image": scoring.score(base, attrs, keys=KEYS, reader_map=reader_map),
              "empty_text_with_image": scoring.score(image_only, attrs, keys=KEYS, reader_map=reader_map),
              "caption_with_image": scoring.score(image_and_text, attrs, keys=KEYS, reader_map=reader_map),
              "seconds": round(time.perf_counter() - t0, 1)}
    return report, side_by_side(np.stack([np.asarray(im) for im in images[:16]]), base, image_only)


def main() -> None:
    from diffusers import StableDiffusionPipeline

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("adapter", help="an IP-Adapter file (peft-diffusion train's adapter.safetensors)")
    p.add_argument("--base", default=str(embedded_path(SHAPES_BASE)))
    p.add_argument("--image-encoder", default="", help="CLIP vision folder; default: the embedded shapes-clip")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=4242, help="held-out stream (training folders use seed 0)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--out", default=None, help="folder for results.json and grid.png (prompt | base | image only)")
    a = p.parse_args()
    pipe = StableDiffusionPipeline.from_pretrained(a.base)
    pipe.set_progress_bar_config(disable=True)
    attach_image_encoder(pipe, a.image_encoder, pipe.device)
    pd.load_adapter(pipe, a.adapter)
    report, picture = measure(pipe, a.n, a.seed, a.steps, a.guidance, a.batch)
    print(json.dumps(report, indent=2))
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "results.json").write_text(json.dumps(report, indent=2))
        picture.save(Path(a.out) / "grid.png")


if __name__ == "__main__":
    main()
