"""``peft-diffusion generate`` with an image prompt and spatial controls: ``--image-prompt IMG``,
``--control IMG[:WEIGHT]`` (repeatable) with ``--control-type`` and ``--controlnet FOLDER`` / ``--t2i-adapter
FOLDER`` (repeatable, paired in order with the --control images). Runs the composer pipeline
(``peft_diffusion/composer.py``); condition maps are made by ``peft_diffusion.conditions`` as in training. The
grid shows, per prompt, the condition maps (and the image prompt) | the generated images.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli import UsageError

WORLD = "world:"  # --control world:CAPTION: a shapes-world scene drawn from its caption (its exact mask / outline)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .conditions import KINDS

    p.add_argument("--image-prompt", default=None, metavar="IMG",
                   help="image prompt for an IP-Adapter among the --adapter files (the embedded shapes-clip encodes "
                        "it when the base has no image encoder)")
    p.add_argument("--control", action="append", default=[], metavar="IMG[:WEIGHT]",
                   help="condition image with its weight (default 1); repeat for several. IMG is an image file or "
                        "world:CAPTION (a shapes-world scene, e.g. 'world:a large red circle on a white background, "
                        "top left')")
    p.add_argument("--control-type", action="append", default=[], choices=KINDS, metavar="KIND",
                   help=f"condition map made of each --control image, as in training: {', '.join(KINDS)} (none: "
                        "the image is the map; mask/outline: the world's exact map of a world:CAPTION, or a "
                        "ready-made map file). One for all, or one per --control (default: none)")
    p.add_argument("--controlnet", dest="control_models", action="append", default=[], metavar="FOLDER",
                   type=lambda s: ("controlnet", s), help="ControlNetModel folder (save_pretrained); repeatable")
    p.add_argument("--t2i-adapter", dest="control_models", action="append", metavar="FOLDER",
                   type=lambda s: ("t2i-adapter", s), help="T2IAdapter folder (save_pretrained); repeatable. "
                   "--controlnet and --t2i-adapter folders pair, in the order given, with the --control images")


def composing(args) -> bool:
    return bool(args.image_prompt or args.control or args.control_models or args.control_type)


def check(args) -> None:
    """Argument checks that need no model."""
    from .cli import parse_adapter

    n, models = len(args.control), len(args.control_models)
    if n != models:
        raise UsageError(f"{n} --control image(s) but {models} control model(s) (--controlnet / --t2i-adapter): "
                         "each --control pairs with one model, in order")
    if args.control_type and len(args.control_type) not in (1, n):
        raise UsageError(f"{len(args.control_type)} --control-type values for {n} --control images: give one for "
                         "all or one per --control")
    for spec in args.control:
        image, _ = parse_adapter(spec)
        if not image.startswith(WORLD) and not Path(image).is_file():
            raise UsageError(f"--control {spec}: no such image file {image!r} (or use world:CAPTION)")
    if args.image_prompt and not Path(args.image_prompt).is_file():
        raise UsageError(f"--image-prompt {args.image_prompt}: no such image file")
    for flag, folder in args.control_models:
        if not Path(folder).is_dir():
            raise UsageError(f"--{flag} {folder}: not a folder (a model saved with save_pretrained)")


def controls(args, size: tuple[int, int]):
    """The ``Control``s of the arguments, and the condition maps (uint8 HxWx3) the pipeline will use."""
    import numpy as np

    from .cli import parse_adapter
    from .conditions import condition
    from .controls import Control, folder_class

    kinds = args.control_type * len(args.control) if len(args.control_type) == 1 else args.control_type
    kinds = kinds or ["none"] * len(args.control)
    out, maps = [], []
    for spec, kind, (flag, folder) in zip(args.control, kinds, args.control_models):
        cls = folder_class(folder)
        if cls != {"controlnet": "ControlNetModel", "t2i-adapter": "T2IAdapter"}[flag]:
            other = "--t2i-adapter" if cls == "T2IAdapter" else "--controlnet"
            raise UsageError(f"--{flag} {folder} holds a {cls}: pass it with {other}")
        image, weight = parse_adapter(spec)
        image = load_image(image, kind)
        if kind in ("mask", "outline") and not hasattr(image, "attrs"):
            kind = "none"  # a ready-made map file (the world's maps are drawn from a scene, not detected)
        control = Control(folder, image, weight, kind)
        out.append(control)
        maps.append(np.asarray(condition(image, kind, size=size)))
    return out, maps


def load_image(spec: str, kind: str):
    """A shapes ``Sample`` of ``world:CAPTION``, else the image file (PIL)."""
    if spec.startswith(WORLD):
        from .shapes import world

        text = spec[len(WORLD):]
        try:
            attrs = world.parse_caption(text)
            attrs.pop("identifier", None)
            return world.from_attrs(attrs)
        except (KeyError, ValueError) as e:
            raise UsageError(f"--control {spec}: not a full shapes-world caption ({e.args[0] if e.args else e}); "
                             "e.g. world:a large red circle on a white background, top left") from None
    from PIL import Image

    try:
        with Image.open(spec) as im:
            im.load()
            return im.copy()
    except OSError as e:
        raise UsageError(f"{spec}: not an image PIL can read ({e})") from None


def generate(pipe, args, prompts: list[str], height: int, width: int):
    """(generated uint8 images, grid) through the composer pipeline."""
    import numpy as np
    import torch
    from PIL import Image

    from .composer import AdapterComposerPipeline
    from .methods.image_prompt import _ip_configs
    from .training.evaluate import grid

    composer = AdapterComposerPipeline.from_pipe(pipe)
    composer.set_progress_bar_config(disable=True)
    prompt_image = None
    if args.image_prompt:
        if not _ip_configs(composer):
            raise UsageError("--image-prompt needs an IP-Adapter among the --adapter files (an ip-adapter file, e.g. "
                             "one trained with [method] method = \"ip-adapter\"); none is loaded")
        prompt_image = load_image(args.image_prompt, "none").convert("RGB")
    specs, maps = controls(args, (width, height))
    out = []
    for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start:start + args.batch_size]
        gens = [torch.Generator(composer.device).manual_seed(args.seed + start + i) for i in range(len(chunk))]
        images = composer(chunk, num_inference_steps=args.steps, guidance_scale=args.guidance, height=height,
                          width=width, negative_prompt=None if args.negative_prompt is None else
                          [args.negative_prompt] * len(chunk), generator=gens, output_type="np",
                          image_prompt=prompt_image, controls=specs).images
        out.append((np.clip(images, 0, 1) * 255).round().astype(np.uint8))
    images = np.concatenate(out)
    shown = maps + ([np.asarray(prompt_image.resize((width, height), Image.Resampling.LANCZOS))] if prompt_image else [])
    rows = [np.stack(shown + list(images[p * args.n:(p + 1) * args.n])) for p in range(len(prompts) // args.n)]
    return images, grid(np.concatenate(rows), len(shown) + args.n), shown


def save_conditions(out: Path, shown, args) -> None:
    from PIL import Image

    kinds = (args.control_type * len(args.control) if len(args.control_type) == 1 else args.control_type) or \
        ["none"] * len(args.control)
    names = [f"control-{i}-{k}.png" for i, k in enumerate(kinds)] + (["image-prompt.png"] if args.image_prompt else [])
    for name, image in zip(names, shown):
        Image.fromarray(image).save(out / name)
    if shown:
        print(f"grid columns: {', '.join(n[:-4] for n in names)} | {args.n} generated", file=sys.stdout)
