"""Scoring a class-conditional diffusion transformer (``DiTPipeline``) on the shapes world.

The DiT's classes are the world's (shape, colour) pairs: ``CLASSES[i]`` is class id ``i``, named like a
short caption ("red circle"), 25 in all; the held-out subject (the cross) and stripes have no class. A class
fixes shape and colour only, so background, size and position are the model's own choice: a faithful model
draws them as the training data does (uniformly), a collapsed one always draws the same. The report gives,
per class, the fraction of images whose shape and colour both readers (the oracle and the analytic reader,
``shapes.scoring``) read as the class's, and, over all images, how the read backgrounds and positions are
spread (share of the most common value and normalised entropy, 1 = uniform).

    python -m peft_diffusion.shapes.dit_eval [--dit DIR] [--per-class 8] [--steps 20] [--guidance 4]

re-measures the model card of the embedded DiT (``peft_diffusion/models/shapes-dit``). Image ``j`` of class
``i`` uses generator seed ``seed + i * per_class + j``, so a figure never depends on the batch size.
Later learning tables (a new class taught to the DiT) reuse ``generate`` and ``class_accuracy``.
"""
from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch

from . import world
from .scoring import accuracy_of_reads, readers

__all__ = ["CLASSES", "class_names", "id2label", "class_attrs", "generate", "class_accuracy", "spread",
           "class_report"]

CLASSES: tuple[tuple[str, str], ...] = tuple((s, c) for s in world.SHAPES for c in world.COLOURS)


def class_names() -> list[str]:
    """Class names in id order: "<colour> <shape>", the world's short caption without the article."""
    return [f"{colour} {shape}" for shape, colour in CLASSES]


def id2label() -> dict[str, str]:
    """The ``id2label`` of a ``DiTPipeline`` folder (JSON keys are strings)."""
    return {str(i): name for i, name in enumerate(class_names())}


def class_attrs(label: int) -> dict:
    """``{"shape": ..., "colour": ...}`` of class id ``label``."""
    shape, colour = CLASSES[label]
    return {"shape": shape, "colour": colour}


@torch.no_grad()
def generate(pipe, class_labels: Sequence[int], seed: int = 0, steps: int = 20, guidance: float = 4.0,
             batch_size: int = 50) -> np.ndarray:
    """uint8 images (N x H x W x 3) of a ``DiTPipeline`` for ``class_labels``; image i uses generator seed
    ``seed + i``."""
    out = []
    labels = [int(v) for v in class_labels]
    for start in range(0, len(labels), batch_size):
        chunk = labels[start:start + batch_size]
        gens = [torch.Generator(pipe.device).manual_seed(seed + start + i) for i in range(len(chunk))]
        images = pipe(class_labels=chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                      output_type="np").images
        out.append((np.clip(images, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out)


def class_accuracy(reads: Sequence[dict], attrs: dict | Sequence[dict]) -> dict[str, float]:
    """Shape, colour and both at once (``"all"``) of ``reads`` against the class attributes."""
    return accuracy_of_reads(reads, attrs, ("shape", "colour"))


def spread(values: Sequence, choices: Sequence) -> dict:
    """How ``values`` spread over ``choices``: counts, share of the most common, normalised entropy."""
    counts = Counter(values)
    n = max(len(values), 1)
    p = np.array([counts.get(c, 0) / n for c in choices])
    entropy = -sum(q * math.log(q) for q in p if q > 0) / math.log(len(choices))
    return {"counts": {str(c): counts.get(c, 0) for c in choices}, "top_share": float(p.max()),
            "entropy": float(entropy)}


def class_report(pipe, per_class: int = 8, seed: int = 0, steps: int = 20, guidance: float = 4.0,
                 labels: Sequence[int] | None = None, reader_map: dict | None = None,
                 batch_size: int = 50) -> tuple[dict, np.ndarray]:
    """Generate ``per_class`` images for every class id in ``labels`` (default: all 25) and score them.

    Returns ``(report, images)``; ``report`` holds ``overall`` ({reader: shape/colour/all}), ``per_class``
    ({name: {reader: ...}}), ``worst_class`` ({reader: (name, all)}), ``background`` and ``position``
    ({reader: spread}) and the settings.
    """
    labels = list(range(len(CLASSES))) if labels is None else [int(v) for v in labels]
    reader_map = reader_map or readers()
    ids = [lab for lab in labels for _ in range(per_class)]
    images = generate(pipe, ids, seed=seed, steps=steps, guidance=guidance, batch_size=batch_size)
    attrs = [class_attrs(lab) for lab in ids]
    names = class_names()
    report: dict = {"overall": {}, "per_class": {names[lab]: {} for lab in labels}, "worst_class": {},
                    "background": {}, "position": {},
                    "settings": {"per_class": per_class, "seed": seed, "steps": steps, "guidance": guidance,
                                 "scheduler": type(pipe.scheduler).__name__}}
    for name, reader in reader_map.items():
        reads = reader.read(images)
        report["overall"][name] = class_accuracy(reads, attrs)
        for k, lab in enumerate(labels):
            sl = slice(k * per_class, (k + 1) * per_class)
            report["per_class"][names[lab]][name] = class_accuracy(reads[sl], attrs[sl])
        worst = min(labels, key=lambda lab: report["per_class"][names[lab]][name]["all"])
        report["worst_class"][name] = (names[worst], report["per_class"][names[worst]][name]["all"])
        report["background"][name] = spread([r["background"] for r in reads], world.BACKGROUNDS)
        report["position"][name] = spread([r["position"] for r in reads], world.POSITIONS)
    return report, images


def _main() -> None:
    from diffusers import DiTPipeline

    from ..models import SHAPES_DIT
    from ..models import path as embedded_path

    parser = argparse.ArgumentParser(description="Score a shapes-world DiTPipeline per class with both readers.")
    parser.add_argument("--dit", default=None, help="a DiTPipeline folder (default: the embedded shapes-dit)")
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = DiTPipeline.from_pretrained(args.dit or str(embedded_path(SHAPES_DIT)))
    pipe.set_progress_bar_config(disable=True)
    report, _ = class_report(pipe, per_class=args.per_class, seed=args.seed, steps=args.steps,
                             guidance=args.guidance)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    _main()
