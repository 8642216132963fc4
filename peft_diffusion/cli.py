"""peft-diffusion: train, generate with, inspect and convert PEFT adapters of diffusers pipelines.

    peft-diffusion train CONFIG.toml [--key=value ...]       DreamBooth training (training.dreambooth)
    peft-diffusion generate [--base PATH] [--adapter FILE[:WEIGHT] ...] --prompt TEXT ... [--out DIR]
    peft-diffusion generate ... [--image-prompt IMG] [--control IMG[:WEIGHT] --control-type KIND --controlnet DIR ...]
    peft-diffusion generate --base DIT_FOLDER [--adapter FILE] --class-label NAME_OR_ID ...   (a class-conditional DiT)
    peft-diffusion inspect FILE                              format, method, targets, ranks, parameter counts
    peft-diffusion convert IN OUT --to FORMAT [--base PATH]  (convert --list-formats IN: what IN can become)

``--base`` defaults to the embedded shapes-world model (``peft_diffusion/models/shapes-base``, package data); any
diffusers pipeline folder or hub id works. Errors in the input (arguments, config, data, adapter files) print
one line and exit with 2; a stopped training run exits with 128 + the signal's number.

torch is imported with the package, diffusers and transformers only by the commands that run a model, so
``--help`` and argument errors answer without loading them.
"""
from __future__ import annotations

import argparse
import logging
import re
import shlex
import signal
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

from .version import __version__

__all__ = ["main", "site_kind", "parse_adapter", "build_parser"]

SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "dpm": "DPMSolverMultistepScheduler"}
DTYPES = ("float32", "float16", "bfloat16")
# what a1111 means for the methods it does not hold as an embedding: the kohya key layout, which A1111 reads
# metadata keys under which adapter files name the model they were trained on (kohya, ModelSpec, peft)
BASE_NAME_KEYS = ("ss_sd_model_name", "modelspec.architecture", "base_model_name_or_path")


class UsageError(ValueError):
    """A command-line value the command cannot use (printed as one line, exit code 2)."""


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


def _device(spec: str | None):
    """The torch device ``--device`` names (None: CUDA when there is one, else the CPU), checked before any
    model loads: a typo or a missing GPU is one line, not torch's traceback."""
    import torch

    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {spec!r} is not a device name: use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"--device {spec}: no CUDA GPU is available here (torch {torch.__version__}, "
                             f"CUDA {torch.version.cuda or 'not built in'}); use --device cpu")
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {spec}: there are {count} CUDA devices (cuda:0 to cuda:{count - 1})")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"--device {spec}: Apple's MPS is not available here; use --device cpu")
    elif device.type != "cpu":
        raise UsageError(f"--device {spec}: only cpu, cuda[:N] and mps are supported")
    return device


def _load_base(base: str | None, dtype: str = "float32"):
    import torch

    from .training.dreambooth import DEFAULT_BASE, load_pipeline

    base = base or str(DEFAULT_BASE)
    if not Path(base).exists() and Path(base) == DEFAULT_BASE:
        raise FileNotFoundError(f"the embedded base {base} is missing: reinstall peft-diffusion "
                                f"(it ships as package data) or pass --base PATH")
    return load_pipeline(base, dtype=getattr(torch, dtype))


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextmanager
def _held_warnings():
    """Hold back the library's warnings while a step runs: the caller prints them after success and drops
    them when the step fails with an error that says the same (a file for another model warns, then raises)."""
    log = logging.getLogger("peft_diffusion")
    handler, propagate = _Collect(), log.propagate
    log.addHandler(handler)
    log.propagate = False
    try:
        yield handler.messages
    finally:
        log.removeHandler(handler)
        log.propagate = propagate


def _load_adapter(pipe, file: str, scale: float = 1.0, base: str | None = None) -> str:
    """``load_adapter`` with one-line errors: an adapter that does not fit the base says so once and points at
    ``--base`` (naming the model when the file does)."""
    from .adapter_files import load_adapter
    from .io import AdapterFileError, read_file

    _, metadata = read_file(file)  # unreadable files fail here, with their own message
    with _held_warnings() as warnings:
        try:
            from .composer import attach_image_encoder_for

            attach_image_encoder_for(pipe, file)  # an IP-Adapter file on a base without one: the embedded shapes-clip
            name = load_adapter(pipe, file, scale=scale)
        except AdapterFileError as e:
            named = next((metadata[k] for k in BASE_NAME_KEYS if metadata.get(k)), None)
            hint = (f"the file names its model: {named!r}; pass --base with that pipeline" if named else
                    "it was made for another model: pass --base with the pipeline it was trained on")
            using = f"--base {base}" if base else "the embedded shapes-base (no --base given)"
            raise UsageError(f"{e} [using {using}; {hint}]") from None
    for message in warnings:
        print(f"warning: {message}", file=sys.stderr)
    return name


# ---------------------------------------------------------------- commands

def cmd_train(args, overrides: list[str]) -> int:
    from .training.dit import pick_trainer
    from .training.dreambooth import TrainingInterrupted, load_config

    cfg = load_config(args.config, overrides)
    train = pick_trainer(cfg)  # the U-Net or the DiT trainer, by the base's kind (checked before any work)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("diffusers", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        path = train(cfg)
    except TrainingInterrupted as e:
        again = [a for a in overrides if not a.startswith(("--resume", "--overwrite"))]
        command = shlex.join(["peft-diffusion", "train", args.config, *again, "--resume=latest"])
        written = " written" if e.checkpoint and e.checkpoint.name == f"step-{e.step:06d}" else ""
        where = (f"checkpoint {e.checkpoint}{written}; resume with: {command}" if e.checkpoint else
                 "nothing to resume from (stopped before the first checkpoint)")
        print(f"stopped by {signal.Signals(e.signum).name} at step {e.step} of {cfg.steps}: {where}", file=sys.stderr)
        return e.exit_code
    print(f"adapter: {path}")
    return 0


def _check_generate(args) -> None:
    """Argument checks that need no model: they run before any model library loads."""
    if not args.prompt and not getattr(args, "class_label", None):
        raise UsageError("generate needs --prompt (or --class-label with a DiT base)")
    for key, low in (("n", 1), ("steps", 1), ("batch_size", 1), ("threads", 0)):
        value = getattr(args, key)
        if value < low:
            raise UsageError(f"--{key.replace('_', '-')} must be >= {low}, got {value}")
    if not args.guidance >= 0 or args.guidance == float("inf"):
        raise UsageError(f"--guidance must be a finite number >= 0, got {args.guidance}")
    for key in ("height", "width"):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise UsageError(f"--{key} must be a positive number of pixels, got {value}")
    from .cli_generate import check

    check(args)  # --image-prompt, --control and the control models


def _image_size(pipe, height: int | None, width: int | None) -> tuple[int, int]:
    """(height, width), the base's own size where not given; each must be a multiple of what the U-Net's
    down-sampling and the VAE need, else the pipeline would fail deep inside."""
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    step = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.down_block_types) - 1)
    height, width = height or native, width or native
    for key, value in (("height", height), ("width", width)):
        if value % step:
            raise UsageError(f"--{key} {value}: this base needs a multiple of {step} pixels (it was trained at "
                             f"{native}); e.g. {max(step, value // step * step)}")
    return height, width


def cmd_generate(args) -> int:
    import torch

    from . import cli_generate
    from .api import set_adapters
    from .training.evaluate import generate, grid

    _check_generate(args)
    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    from .training.dit import base_kind

    if base_kind(args.base or "") == "dit":
        return cmd_generate_dit(args, device)
    if args.class_label:
        raise UsageError(f"--class-label needs a class-conditional DiT base (a DiTPipeline folder such as the embedded "
                         f"shapes-dit); {args.base or 'the embedded shapes-base'} is a text-to-image pipeline: use --prompt")
    pipe = _load_base(args.base, args.dtype)
    height, width = _image_size(pipe, args.height, args.width)
    if args.scheduler:
        import diffusers

        pipe.scheduler = getattr(diffusers, SCHEDULERS[args.scheduler]).from_config(pipe.scheduler.config)
    pipe.to(device)
    weights = {}
    for spec in args.adapter:
        file, weight = parse_adapter(spec)
        name = _load_adapter(pipe, file, scale=weight, base=args.base)
        weights[name] = weight
        print(f"adapter {name} <- {file} (weight {weight:g})")
    if weights:
        set_adapters(pipe, weights)
    prompts = [p for p in args.prompt for _ in range(args.n)]
    if cli_generate.composing(args):  # image prompt, controls: the composer pipeline; grid = conditions | images
        images, picture, shown = cli_generate.generate(pipe, args, prompts, height, width)
    else:
        images = generate(pipe, prompts, seed=args.seed, steps=args.steps, guidance=args.guidance,
                          batch_size=args.batch_size, height=height, width=width, negative_prompt=args.negative_prompt)
        picture, shown = grid(images, args.n), []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    cli_generate.save_conditions(out, shown, args)

    for i, (prompt, image) in enumerate(zip(prompts, images)):
        p, k = divmod(i, args.n)
        Image.fromarray(image).save(out / f"{p:02d}-{_slug(prompt)}-{k}.png")
    picture.save(out / "grid.png")
    print(f"{len(images)} images and grid.png (one row per prompt) in {out.resolve()}")
    return 0


def cmd_generate_dit(args, device) -> int:
    """generate on a DiT base: classes from --class-label (names or ids) and prompts naming a class."""
    import torch
    from PIL import Image

    from .api import set_adapters
    from .training.dit import class_label_specs, generate_classes, load_dit
    from .training.evaluate import grid

    if args.negative_prompt or args.height or args.width or args.scheduler or args.image_prompt or args.control:
        raise UsageError("--negative-prompt, --height, --width, --scheduler, --image-prompt and --control are for "
                         "text-to-image bases, not a DiT")
    specs = class_label_specs(args.prompt, args.class_label)
    if not specs:
        raise UsageError("a DiT base generates classes: give --class-label NAME_OR_ID (or --prompt naming a class)")
    pipe = load_dit(args.base, getattr(torch, args.dtype))
    pipe.to(device)
    weights = {}
    for spec in args.adapter:
        file, weight = parse_adapter(spec)
        weights[_load_adapter(pipe, file, scale=weight, base=args.base)] = weight
    if weights:
        set_adapters(pipe, weights)
    images, names = generate_classes(pipe, specs, args.n, seed=args.seed, steps=args.steps, guidance=args.guidance,
                                     batch_size=args.batch_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        c, k = divmod(i, args.n)
        Image.fromarray(image).save(out / f"{c:02d}-{_slug(names[c])}-{k}.png")
    grid(images, args.n).save(out / "grid.png")
    print(f"{len(images)} images of {', '.join(names)} and grid.png (one row per class) in {out.resolve()}")
    return 0


def _quiet_libraries() -> None:
    """No loading bars or advisory warnings from diffusers / transformers in a command's output."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# ---------------------------------------------------------------- the parser

class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The default after every option's help (unless the help already says it in words), descriptions and
    epilogs as written."""

    def _get_help_string(self, action):
        if "(default:" in (action.help or "") or action.required or action.default in (None, []):
            return action.help
        return super()._get_help_string(action)


def train_epilog() -> str:
    """Every config key with its default and meaning, from the config dataclass (so it cannot go stale)."""
    from .registry import METHODS
    from .training.dreambooth_config import describe_keys

    lines = ["config keys (TOML: key = value at the top level; command line: --key=value or --key value, a bare",
             "--key means true; --method.KEY=VALUE sets a key of the [method] table, e.g. --method.r=4).",
             "Relative paths in the file are taken from the file's folder, on the command line from the",
             "working directory.", ""]
    width = max(len(k) for k, _, _ in describe_keys())
    for key, default, meaning in describe_keys():
        text = f"{meaning} (default: {default})"
        lines += textwrap.wrap(text, 100, initial_indent=f"  {key:<{width}}  ", subsequent_indent=" " * (width + 4))
    lines += ["", f"methods for [method] method = ...: {', '.join(sorted(METHODS))}",
              "(the table's other keys are that method's config fields, e.g. r, alpha, target for lora)",
              "", "Ctrl-C (or SIGTERM) writes a checkpoint of the current step; --resume=latest continues from it.",
              "A run into an output_dir that holds one needs --resume=latest or --overwrite.",
              "examples:", "  peft-diffusion train samples/dreambooth.toml --steps=600 --method.r=4",
              "  peft-diffusion train samples/dreambooth.toml --resume=latest"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from .io import writable

    parser = argparse.ArgumentParser(prog="peft-diffusion", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="peft-diffusion COMMAND --help tells more about each command.")
    parser.add_argument("--version", action="version", version=f"peft-diffusion {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="DreamBooth training from a TOML config (+ --key=value overrides)",
                       description="DreamBooth: teach a base pipeline a subject with any registered PEFT method.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=train_epilog())
    p.add_argument("config", help="TOML config file (e.g. samples/dreambooth.toml)")

    p = sub.add_parser("generate", help="images from a base with adapters", formatter_class=_Help,
                       description="Generate images from a base pipeline with adapters at given weights.\n"
                                   "Writes one PNG per image into --out, named <prompt number>-<prompt>-<image "
                                   "number>.png,\nand grid.png (one row per prompt; with --control / --image-prompt "
                                   "the condition maps and the image prompt first).")
    p.add_argument("--base", help="diffusers pipeline folder or hub id (default: the embedded shapes base)")
    p.add_argument("--adapter", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="adapter file to load, with its weight (default 1); repeat for several")
    p.add_argument("--prompt", action="append", default=[], help="prompt; repeat for several (one grid row each)")
    p.add_argument("--class-label", action="append", default=[], metavar="NAME_OR_ID",
                   help="a class of a DiT base (e.g. 'red circle', 3, or a new class's name); repeat for several")
    p.add_argument("--negative-prompt", default=None, help="what the images should not show (all prompts)")
    p.add_argument("--n", type=int, default=4, help="images per prompt")
    p.add_argument("--seed", type=int, default=0, help="image i of the run uses generator seed SEED + i")
    p.add_argument("--steps", type=int, default=20, help="denoising steps")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (0 or 1: off)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the base's own)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the base's own)")
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None,
                   help="sampler: " + ", ".join(f"{k} ({v})" for k, v in SCHEDULERS.items())
                        + " (default: the base's own)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights' dtype (half precision: GPU mostly)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda when there is one)")
    p.add_argument("--batch-size", type=int, default=16, help="images per pipeline call")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", default="out/generate", help="output folder (created; files in it are replaced)")
    from .cli_generate import add_arguments

    add_arguments(p)  # --image-prompt, --control, --control-type, --controlnet, --t2i-adapter

    p = sub.add_parser("inspect", help="what an adapter file holds",
                       description="Format, method, settings, targets, ranks and parameter counts of an adapter file.")
    p.add_argument("file", help="adapter file (.safetensors, .bin, .pt) or a folder holding one")

    formats = sorted(writable())
    p = sub.add_parser("convert", help="rewrite an adapter file in another format", formatter_class=_Help,
                       description="Load an adapter into the base pipeline and write it in another format.\n"
                                   "a1111 is A1111's embedding file for Textual Inversion, and kohya's key layout\n"
                                   "(which A1111 reads) for LoRA, LoHa and LoKr.")
    p.add_argument("input", nargs="?", help="adapter file to convert")
    p.add_argument("output", nargs="?", help="file to write (.safetensors)")
    p.add_argument("--to", choices=formats, help="target format")
    p.add_argument("--list-formats", metavar="FILE", help="list the formats FILE can be written in, and why not the others")
    p.add_argument("--base", help="the pipeline the adapter belongs to (default: the embedded shapes base)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] == "train":  # everything after the config is a --key=value override
        args, overrides = parser.parse_known_args(argv)
    else:
        args, overrides = parser.parse_args(argv), []
    if args.command == "convert":
        if args.list_formats and (args.input or args.to):
            parser.error("convert: --list-formats FILE takes no IN OUT --to")
        if not args.list_formats and not (args.input and args.output and args.to):
            parser.error("convert: needs IN OUT --to FORMAT (or --list-formats FILE)")
    if args.command == "generate" and not (args.prompt or args.class_label):
        parser.error("generate: needs --prompt TEXT (or --class-label NAME_OR_ID with a DiT base)")
    try:
        if args.command == "inspect":
            from .cli_files import cmd_inspect

            return cmd_inspect(args)
        if args.command == "generate":
            _check_generate(args)  # argument errors answer before diffusers and transformers load (seconds)
        _quiet_libraries()
        if args.command == "train":
            return cmd_train(args, overrides)
        if args.command == "generate":
            return cmd_generate(args)
        from .cli_files import cmd_convert

        return cmd_convert(args)
    except (ValueError, KeyError, FileNotFoundError) as e:  # arguments, config, data and adapter-file errors
        print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside training (loading, generating): nothing to save
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
