"""The ``peft-diffusion`` command.

    peft-diffusion train CONFIG.toml [--key=value ...]       DreamBooth training (training.dreambooth)
    peft-diffusion generate [--base PATH] --adapter FILE[:WEIGHT] ... --prompt TEXT ... [--n 4] [--out DIR]
    peft-diffusion inspect FILE                              format, method, targets, ranks, parameter counts
    peft-diffusion convert IN OUT --to diffusers|kohya|lycoris|a1111|native [--base PATH]

``--base`` defaults to the embedded shapes-world model (``peft_diffusion/models/shapes-base``, package data); any diffusers pipeline
folder or hub id works. Errors in the input (config, data, adapter files) print one line and exit with 2.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
from collections import Counter
from pathlib import Path

__all__ = ["main", "inspect_file", "site_kind", "parse_adapter"]


# ---------------------------------------------------------------- helpers

def parse_adapter(spec: str) -> tuple[str, float]:
    """``FILE[:WEIGHT]`` -> (file, weight); a colon not followed by a number is part of the path."""
    head, sep, tail = spec.rpartition(":")
    if sep:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def site_kind(site: str) -> str:
    """A site's layer kind without its block path: ``down_blocks.0....attn2.to_out.0`` -> ``attn2.to_out.0``
    (kohya's underscored names likewise: ``..._0_attn2_to_q`` -> ``attn2_to_q``)."""
    sep = "." if "." in site else "_"
    parts = site.split(sep)
    tail = []
    while parts and parts[-1].isdigit():
        tail.insert(0, parts.pop())
    last = max((i for i, p in enumerate(parts) if p.isdigit()), default=-1)
    return sep.join(parts[last + 1:] + tail)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "prompt"


def _load_base(base: str | None):
    from .training.dreambooth import DEFAULT_BASE, load_pipeline

    base = base or str(DEFAULT_BASE)
    if not Path(base).exists() and Path(base) == DEFAULT_BASE:
        raise FileNotFoundError(f"the embedded base {base} is missing: reinstall peft-diffusion "
                                f"(it ships as package data) or pass --base PATH")
    return load_pipeline(base)


# ---------------------------------------------------------------- commands

def cmd_train(args, overrides: list[str]) -> int:
    from .training.dreambooth import load_config, train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    path = train(load_config(args.config, overrides))
    print(f"adapter: {path}")
    return 0


def cmd_generate(args) -> int:
    import torch

    from .adapter_files import load_adapter
    from .api import set_adapters
    from .training.evaluate import generate, grid

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = _load_base(args.base)
    if args.device:
        pipe.to(args.device)
    weights = {}
    for spec in args.adapter:
        file, weight = parse_adapter(spec)
        name = load_adapter(pipe, file, scale=weight)
        weights[name] = weight
        print(f"adapter {name} <- {file} (weight {weight:g})")
    if weights:
        set_adapters(pipe, weights)
    prompts = [p for p in args.prompt for _ in range(args.n)]
    images = generate(pipe, prompts, seed=args.seed, steps=args.steps, guidance=args.guidance,
                      batch_size=args.batch_size, size=args.size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    for i, (prompt, image) in enumerate(zip(prompts, images)):
        p, k = divmod(i, args.n)
        Image.fromarray(image).save(out / f"{p:02d}-{_slug(prompt)}-{k}.png")
    grid(images, args.n).save(out / "grid.png")
    print(f"{len(images)} images and grid.png (one row per prompt) in {out}")
    return 0


def inspect_file(path: str) -> dict:
    """What an adapter file holds, per component: method, settings, sites, ranks, alphas, parameters."""
    from .io import FORMATS, detect, read_file, resolve_path

    path = resolve_path(path)
    tensors, metadata = read_file(path)
    fmt = detect(tensors, metadata)
    data = FORMATS[fmt].to_native(tensors, metadata, None)  # no model: kohya keeps its underscored names
    info = {"file": str(path), "bytes": path.stat().st_size, "format": fmt, "name": data.name,
            "tensors": len(tensors), "dtypes": sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()}),
            "components": {}, "unknown_keys": len(data.unknown)}
    for comp, sites in data.tensors.items():
        cfg = data.configs.get(comp)
        row = {"method": getattr(cfg, "method", "?"), "sites": len(sites),
               "parameters": sum(t.numel() for params in sites.values() for t in params.values()),
               "targets": dict(sorted(Counter(site_kind(s) for s in sites).items())),
               "fingerprint": data.fingerprints.get(comp) or None}
        if cfg is not None and hasattr(cfg, "rank"):
            ranks = {s: cfg.rank(s) for s in sites}
            row["ranks"] = dict(sorted(Counter(ranks.values()).items()))
            row["alphas"] = dict(sorted(Counter(round(cfg.scale(s) * ranks[s], 6) for s in sites).items()))
        if cfg is not None:
            target = getattr(cfg, "target", None)
            row["settings"] = {k: v for k, v in cfg.to_dict().items()
                               if k not in ("method", "target", "rank_pattern", "alpha_pattern") and v not in ({}, None)}
            row["target"] = None if target is None else target.to_dict()
        info["components"][comp or "(model)"] = row
    info["parameters"] = sum(c["parameters"] for c in info["components"].values())
    return info


def cmd_inspect(args) -> int:
    info = inspect_file(args.file)
    print(f"file        {info['file']} ({info['bytes']:,} bytes, {info['tensors']} tensors, {', '.join(info['dtypes'])})")
    print(f"format      {info['format']}")
    print(f"name        {info['name'] or '-'}")
    print(f"parameters  {info['parameters']:,}")
    for comp, row in info["components"].items():
        print(f"[{comp}]")
        print(f"  method      {row['method']}")
        print(f"  sites       {row['sites']}")
        print(f"  parameters  {row['parameters']:,}")
        if "ranks" in row:
            print("  ranks       " + ", ".join(f"r={r} x{n}" for r, n in row["ranks"].items()))
            print("  alphas      " + ", ".join(f"{a:g} x{n}" for a, n in row["alphas"].items()))
        if row.get("settings"):
            print("  settings    " + ", ".join(f"{k}={v}" for k, v in row["settings"].items()))
        if row.get("target"):
            print(f"  target      {row['target']}")
        print("  targets     " + ", ".join(f"{k} x{n}" for k, n in row["targets"].items()))
        if row["fingerprint"]:
            print(f"  fingerprint {row['fingerprint']}")
    if info["unknown_keys"]:
        print(f"unplaced keys {info['unknown_keys']}")
    return 0


def cmd_convert(args) -> int:
    from .adapter_files import load_adapter, save_adapter

    pipe = _load_base(args.base)
    name = load_adapter(pipe, args.input)
    path = save_adapter(pipe, args.output, name, format=args.to)
    print(f"{args.input} -> {path} ({args.to})")
    return 0


def _quiet_libraries() -> None:
    """No loading bars or advisory warnings from diffusers / transformers in a command's output."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def build_parser() -> argparse.ArgumentParser:
    from .io import writable

    parser = argparse.ArgumentParser(prog="peft-diffusion", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="DreamBooth training from a TOML config (+ --key=value overrides)")
    p.add_argument("config")

    p = sub.add_parser("generate", help="images from a base with adapters")
    p.add_argument("--base", help="diffusers pipeline folder or hub id (default: the embedded shapes base)")
    p.add_argument("--adapter", action="append", default=[], metavar="FILE[:WEIGHT]")
    p.add_argument("--prompt", action="append", required=True)
    p.add_argument("--n", type=int, default=4, help="images per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--size", type=int, default=None, help="image size (default: the base's)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="out/generate")

    p = sub.add_parser("inspect", help="what an adapter file holds")
    p.add_argument("file")

    p = sub.add_parser("convert", help="rewrite an adapter file in another format")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--to", required=True, choices=sorted(writable()))
    p.add_argument("--base", help="the pipeline the adapter belongs to (default: the embedded shapes base)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_libraries()
    parser = build_parser()
    if argv and argv[0] == "train":  # everything after the config is a --key=value override
        args, overrides = parser.parse_known_args(argv)
    else:
        args, overrides = parser.parse_args(argv), []
    try:
        if args.command == "train":
            return cmd_train(args, overrides)
        if args.command == "generate":
            if args.n < 1:
                parser.error("--n must be >= 1")
            return cmd_generate(args)
        if args.command == "inspect":
            return cmd_inspect(args)
        return cmd_convert(args)
    except (ValueError, KeyError, FileNotFoundError) as e:  # config, data and adapter-file errors
        print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
