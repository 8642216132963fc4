"""File formats: one module each; ``detect`` picks the format of a file. Format sniffing lives only here."""
from __future__ import annotations

import dataclasses

from ..registry import FORMATS
# importing the format modules registers them
from . import a1111_embedding, diffusers_lora, diffusers_old, ip_adapter, kohya, lycoris, native, ti_diffusers  # noqa: F401
from . import peft_adaption_prompt  # noqa: F401
from .adapter_data import COMPONENTS, WRAPPERS, AdapterData, lora_config
from .files import AdapterFileError, CorruptFileError, UnmatchedKeysError, read_file, resolve_path, write_file
from .report import KeyLedger, LoadReport

# most specific first: our header, LyCORIS (``lycoris_`` keys or kohya keys with LoHa/LoKr/... parameters),
# then kohya's LoRA, the older diffusers names, IP-Adapter files (image_proj / ip_adapter keys only), peft's
# adaption prompts (adaption_prompt / adaption_gate keys only), the peft LoRA layout; token embeddings last
# (diffusers' is any file of one vector or matrix under a key without dots)
DETECT_ORDER = ("native", "lycoris", "kohya", "diffusers-old", "ip-adapter", "peft-adaption-prompt", "diffusers",
                "a1111", "ti-diffusers")


# what a format reader raises on content it cannot make sense of (a value of the wrong type or shape in a
# header or a tensor); ``read_adapter`` turns these into AdapterFileError naming the file
CONTENT_ERRORS = (ValueError, KeyError, TypeError, IndexError, AttributeError, ArithmeticError, RuntimeError)


def detect(tensors: dict, metadata: dict, source: str = "") -> str:
    for name in DETECT_ORDER:
        if FORMATS[name].detect(tensors, metadata):
            return name
    sample = sorted(tensors)[:5]
    raise AdapterFileError(f"{source + ': ' if source else ''}unrecognised adapter file: keys such as {sample} "
                           f"match no known format ({', '.join(DETECT_ORDER)})")


def read_adapter(path, format: str | None = None, module_names=None) -> tuple[str, AdapterData]:
    """(format name, AdapterData) of an adapter file, ``format`` detected unless given. ``module_names``
    (component -> {module name: layer}) lets formats with ambiguous names resolve them against a model.

    Everything a damaged or foreign file can make go wrong surfaces as ``AdapterFileError`` (or a subclass)
    with the file's path and the problem; an unknown ``format`` name is the caller's mistake (ValueError).
    """
    path = resolve_path(path)
    tensors, metadata = read_file(path)
    name = format or detect(tensors, metadata, str(path))
    if name not in FORMATS:
        raise ValueError(f"unknown format {name!r}; known: {list(FORMATS)}")
    try:
        return name, FORMATS[name].to_native(tensors, metadata, module_names)
    except AdapterFileError as e:
        if str(path) in str(e):
            raise
        raise type(e)(f"{path} ({name} format): {e}") from e
    except CONTENT_ERRORS as e:
        raise AdapterFileError(f"{path} ({name} format): {e}") from e


def writable() -> list[str]:
    """The names of the formats ``save_adapter`` can write (whether one fits a method is checked on writing)."""
    return [n for n, f in FORMATS.items() if hasattr(f, "from_native")]


def writer(name: str, methods=()):
    """The format that writes ``name`` for adapters of ``methods``. A format may also answer to a public name
    (``alias``) for the methods it holds (``methods``): "diffusers" is the peft LoRA layout, and
    ``learned_embeds`` for textual inversion."""
    for fmt in FORMATS.values():
        if getattr(fmt, "alias", None) == name and methods and set(methods) <= set(getattr(fmt, "methods", ())):
            return fmt
    fmt = FORMATS.get(name)
    if fmt is None or not hasattr(fmt, "from_native"):
        raise ValueError(f"cannot write format {name!r}; writable formats: {writable()}")
    return fmt


def lora_equivalent(data: AdapterData) -> AdapterData:
    """``data`` with every adapter that is exactly a plain LoRA (a config with ``as_lora``: Delta-LoRA, IncreLoRA)
    rewritten as that LoRA, for the formats that hold LoRA only; the others are left as they are."""
    configs, tensors = dict(data.configs), dict(data.tensors)
    for comp, cfg in data.configs.items():
        if cfg.as_lora is not None:
            sites, alphas = cfg.as_lora(data.tensors[comp])
            configs[comp] = lora_config({s: p["lora_A.weight"].shape[0] for s, p in sites.items()}, alphas)
            tensors[comp] = sites
    return dataclasses.replace(data, configs=configs, tensors=tensors)


def encode(name: str, data: AdapterData):
    """(format, (flat tensors, metadata)) of ``data`` written as format ``name``; only our own format keeps
    Delta-LoRA / IncreLoRA as such (with their training state), the others get their exact plain LoRA."""
    if name != "native":
        data = lora_equivalent(data)
    fmt = writer(name, {cfg.method for cfg in data.configs.values()})
    return fmt, fmt.from_native(data)


__all__ = ["AdapterData", "AdapterFileError", "COMPONENTS", "CorruptFileError", "KeyLedger", "LoadReport",
           "UnmatchedKeysError", "WRAPPERS", "FORMATS", "detect", "encode", "lora_equivalent", "read_adapter",
           "read_file", "resolve_path", "writable", "write_file", "writer"]
