"""Scoring images and pipelines with both shapes-world readers: the oracle (a CNN) and the analytic reader.

The one evaluation module of the Stable-Diffusion backbone: pretraining (``train/pretrain_base.py``), its
model card, the DreamBooth demo and the method table (``samples/subject_eval.py``) all score through here,
so every figure is given by both readers, with the same seeds.

    python -m peft_diffusion.shapes.scoring [--base DIR] [--prompts 100] [--roundtrip 300]

re-measures the model card figures of the embedded base (VAE round trips and held-out prompts).

- ``accuracy(reader, images, attrs, keys)``: one reader, the oracle's ``accuracy`` interface;
- ``score(images, attrs, keys)``: ``{"oracle": {...}, "analytic": {...}}``;
- ``vae_round_trip_report(vae)``: round trips of fresh world images (stripes on a quarter), of the subject
  (crosses of every colour, half striped) and of the sample subject (yellow, unstriped), all keys;
- ``prompt_report(pipe)``: generated images for held-out full captions and "a red circle" style prompts.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import numpy as np
import torch

from . import world
from .analytic import AnalyticReader
from .oracle import HEADS, Oracle, to_input

__all__ = ["READERS", "accuracy_of_reads", "accuracy", "readers", "score", "vae_round_trip",
           "round_trip_sets", "vae_round_trip_report", "held_out_attrs", "prompt_report"]

READERS = ("oracle", "analytic")
_ROUNDTRIP_SEED = 31337  # the round-trip sets are drawn apart from every training stream


def accuracy_of_reads(reads: Sequence[dict], attrs: dict | Sequence[dict], keys: Sequence[str]) -> dict[str, float]:
    """Fraction of ``reads`` whose ``keys`` match ``attrs`` (one dict per read, or one for all), and ``"all"``."""
    if isinstance(attrs, dict):
        attrs = [attrs] * len(reads)
    if len(attrs) != len(reads):
        raise ValueError(f"{len(reads)} images but {len(attrs)} attribute dicts")
    unknown = [k for k in keys if k not in HEADS]
    if unknown:
        raise KeyError(f"no attribute {unknown}; attributes: {', '.join(HEADS)}")
    hits = np.array([[r[k] == a[k] for k in keys] for r, a in zip(reads, attrs)], dtype=bool).reshape(len(reads), len(keys))
    out = {k: float(hits[:, i].mean()) if len(reads) else 0.0 for i, k in enumerate(keys)}
    out["all"] = float(hits.all(1).mean()) if len(reads) else 0.0
    return out


def accuracy(reader, images, attrs: dict | Sequence[dict], keys: Sequence[str] = ("shape", "colour"),
             value_range: tuple[float, float] | None = None) -> dict[str, float]:
    """Per-key and all-at-once accuracy of ``reader`` (an ``Oracle`` or an ``AnalyticReader``)."""
    return accuracy_of_reads(reader.read(images, value_range), attrs, keys)


def readers(oracle: Oracle | None = None) -> dict:
    """{"oracle": the embedded oracle (or the one given), "analytic": an AnalyticReader}."""
    if oracle is None:
        from ..models import ORACLE
        from ..models import path as embedded_path

        oracle = Oracle.load(str(embedded_path(ORACLE)))
    return {"oracle": oracle, "analytic": AnalyticReader()}


def score(images, attrs: dict | Sequence[dict], keys: Sequence[str] = ("shape", "colour"),
          value_range: tuple[float, float] | None = None, oracle: Oracle | None = None,
          reader_map: dict | None = None) -> dict[str, dict[str, float]]:
    """``{reader: accuracy}`` for both readers."""
    reader_map = reader_map or readers(oracle)
    return {name: accuracy(r, images, attrs, keys, value_range) for name, r in reader_map.items()}


@torch.no_grad()
def vae_round_trip(vae, images, batch_size: int = 256) -> np.ndarray:
    """Encode (latent mean) and decode ``images`` (any reader input); uint8 N x H x W x 3."""
    x = to_input(images)
    dtype = next(vae.parameters()).dtype
    out = []
    for i in range(0, len(x), batch_size):
        rec = vae.decode(vae.encode(x[i:i + batch_size].to(dtype)).latent_dist.mean).sample.float()
        out.append(((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def round_trip_sets(n: int = 300, seed: int = _ROUNDTRIP_SEED) -> dict[str, list[world.Sample]]:
    """Fresh images for round trips: ``world`` (ordinary shapes, a quarter striped), ``subject`` (crosses of
    every colour, half striped) and ``yellow_cross`` (the sample subject: yellow, unstriped)."""
    sets: dict[str, list[world.Sample]] = {"world": [], "subject": [], "yellow_cross": []}
    for i in range(n):
        rng = np.random.default_rng((seed, 0, i))
        s = world.sample(rng)
        if rng.random() < 0.25:
            s = world.from_attrs({**s.attrs, "striped": True}, np.random.default_rng((seed, 0, i)))
        sets["world"].append(s)
        rng = np.random.default_rng((seed, 1, i))
        sets["subject"].append(world.sample(rng, shapes=(world.SUBJECT_SHAPE,), striped=0.5))
    sets["yellow_cross"] = world.subject_dataset(n, seed=seed, colour="yellow", striped=False)
    return sets


def vae_round_trip_report(vae, n: int = 300, oracle: Oracle | None = None,
                          seed: int = _ROUNDTRIP_SEED) -> dict[str, dict[str, dict[str, float]]]:
    """``{set: {reader: accuracy over every attribute}}`` for VAE round trips of ``round_trip_sets``."""
    reader_map = readers(oracle)
    report = {}
    for name, samples in round_trip_sets(n, seed).items():
        recon = vae_round_trip(vae, samples)
        report[name] = score(recon, [s.attrs for s in samples], keys=world.KEYS, reader_map=reader_map)
    return report


def held_out_attrs(n: int = 100, seed: int = 777) -> list[dict]:
    """Attributes of ``n`` held-out prompts (the world's distribution, drawn with their own seed)."""
    rng = np.random.default_rng(seed)
    return [world.sample(rng).attrs for _ in range(n)]


def prompt_report(pipe, n: int = 100, seed: int = 777, steps: int = 20, guidance: float = 4.0,
                  oracle: Oracle | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """Both readers on images generated for ``n`` held-out prompts, as full captions (every attribute:
    shape, colour, background, size, position) and "a red circle" style (shape and colour).

    Returns ``({"full": {reader: acc}, "short": {...}}, {"full": images, "short": images})``.
    """
    from ..training.evaluate import generate

    reader_map = readers(oracle)
    held = held_out_attrs(n, seed)
    report, images = {}, {}
    for style, omit, keys in (("full", (), ("shape", "colour", "background", "size", "position")),
                              ("short", ("size", "background", "position"), ("shape", "colour"))):
        prompts = [world.caption(a, omit=omit) for a in held]
        images[style] = generate(pipe, prompts, seed=seed, steps=steps, guidance=guidance)
        report[style] = score(images[style], held, keys=keys, reader_map=reader_map)
    return report, images


def _main() -> None:
    from diffusers import StableDiffusionPipeline

    from ..models import SHAPES_BASE
    from ..models import path as embedded_path

    parser = argparse.ArgumentParser(description="Re-measure a shapes-world base with both readers.")
    parser.add_argument("--base", default=str(embedded_path(SHAPES_BASE)))
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--roundtrip", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = StableDiffusionPipeline.from_pretrained(args.base)
    pipe.to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    result = {"vae_round_trip": vae_round_trip_report(pipe.vae, n=args.roundtrip)}
    if args.prompts:
        result["generated"] = prompt_report(pipe, n=args.prompts)[0]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    _main()
