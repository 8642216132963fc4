"""Measure a spatial-condition adapter (T2I-Adapter; any method that reads the per-call ``control_image``) on the
shapes world: held-out samples (their own seed), their full captions, their exact condition maps.

For each sample the same caption is generated twice, without the condition (the base: text-only placement) and
with it; both readers (the embedded oracle and the analytic reader) score shape, position (placement) and
colour. Single seed per image (image i: seed + i). Prints JSON, optionally writes it with a grid
(condition | without | with, first 16 samples).

    python samples/control_eval.py out/t2i-adapter/adapter.safetensors --n 200
    python samples/control_eval.py FOLDER_OF_A_DIFFUSERS_T2I_ADAPTER_OR_CONTROLNET --n 200 --kind mask
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import peft_diffusion as pd
from peft_diffusion import conditions
from peft_diffusion.models import SHAPES_BASE
from peft_diffusion.models import path as embedded_path
from peft_diffusion.shapes import scoring, world
from peft_diffusion.training import condition_inputs as ci
from peft_diffusion.training.evaluate import generate, side_by_side

KEYS = ("shape", "position", "colour")


def load(pipe, adapter: str) -> str:
    """Load a native adapter file, or a diffusers ControlNet or T2I-Adapter folder (``save_pretrained``: its
    config.json names the class); returns its name."""
    folder = Path(adapter)
    if folder.is_dir():
        config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
        if config.get("_class_name") == "ControlNetModel":
            return pd.load_controlnet(pipe, adapter, "control")
        return pd.load_t2i_adapter(pipe, adapter, "control")
    return pd.load_adapter(pipe, adapter)


def control_kind(pipe, name: str, given: str | None) -> tuple[str, dict]:
    if given:
        return given, {}
    for _, site in pd.api.sites(pipe):
        if name in site.deltas and hasattr(site.deltas[name].config, "control_type"):
            cfg = site.deltas[name].config
            return cfg.control_type, dict(cfg.control_options)
    raise SystemExit(f"adapter {name!r} records no control_type: pass --kind")


def measure(pipe, name: str, n: int, seed: int, steps: int, guidance: float, kind: str | None, batch: int):
    kind, opts = control_kind(pipe, name, kind)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    samples = [world.sample_at(seed, i) for i in range(n)]
    prompts, attrs = [s.caption for s in samples], [s.attrs for s in samples]
    maps = ci.control_tensor([conditions.condition(s, kind, size=size, **opts) for s in samples])
    t0 = time.perf_counter()
    without = generate(pipe, prompts, seed=seed, steps=steps, guidance=guidance, batch_size=batch)
    with_cond = []
    for i in range(0, n, batch):
        with pd.inputs(pipe, control_image=maps[i:i + batch].to(pipe.device)):
            with_cond.append(generate(pipe, prompts[i:i + batch], seed=seed + i, steps=steps, guidance=guidance,
                                      batch_size=batch))
    with_cond = np.concatenate(with_cond)
    reader_map = scoring.readers()
    report = {"kind": kind, "n": n, "seed": seed, "steps": steps, "guidance": guidance,
              "without_condition": scoring.score(without, attrs, keys=KEYS, reader_map=reader_map),
              "with_condition": scoring.score(with_cond, attrs, keys=KEYS, reader_map=reader_map),
              "seconds": round(time.perf_counter() - t0, 1)}
    shown = (maps[:16].permute(0, 2, 3, 1) * 255).round().byte().numpy()
    return report, side_by_side(shown, without, with_cond)


def main() -> None:
    from diffusers import StableDiffusionPipeline

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("adapter", help="native adapter file (peft-diffusion train's adapter.safetensors) or a T2I folder")
    p.add_argument("--base", default=str(embedded_path(SHAPES_BASE)))
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=4242, help="held-out stream (training folders use seed 0)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--kind", default=None, help="condition kind; default: the adapter's control_type")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for results.json and grid.png")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    pipe = StableDiffusionPipeline.from_pretrained(a.base)
    pipe.set_progress_bar_config(disable=True)
    pipe.to("cuda" if torch.cuda.is_available() else "cpu")
    name = load(pipe, a.adapter)
    report, picture = measure(pipe, name, a.n, a.seed, a.steps, a.guidance, a.kind, a.batch)
    print(json.dumps(report, indent=2))
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "results.json").write_text(json.dumps(report, indent=2))
        picture.save(Path(a.out) / "grid.png")


if __name__ == "__main__":
    main()
