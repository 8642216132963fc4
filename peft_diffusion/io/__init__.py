"""File formats: one module each; ``detect`` picks the format of a file. Format sniffing lives only here."""
from __future__ import annotations

from ..registry import FORMATS
# importing the format modules registers them
from . import a1111_embedding, diffusers_lora, diffusers_old, kohya, lycoris, native, ti_diffusers  # noqa: F401
from .adapter_data import COMPONENTS, WRAPPERS, AdapterData
from .files import AdapterFileError, read_file, resolve_path, write_file

# most specific first: our header, LyCORIS (``lycoris_`` keys or kohya keys with LoHa/LoKr/... parameters),
# then kohya's LoRA, the older diffusers names, the peft layout; token embeddings last (diffusers' is any
# file of one vector or matrix under a key without dots)
DETECT_ORDER = ("native", "lycoris", "kohya", "diffusers-old", "diffusers", "a1111", "ti-diffusers")


def detect(tensors: dict, metadata: dict) -> str:
    for name in DETECT_ORDER:
        if FORMATS[name].detect(tensors, metadata):
            return name
    sample = sorted(tensors)[:5]
    raise AdapterFileError(f"unrecognised adapter file: keys such as {sample} match no known format "
                           f"({', '.join(DETECT_ORDER)})")


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


__all__ = ["AdapterData", "AdapterFileError", "COMPONENTS", "WRAPPERS", "detect", "read_file", "resolve_path", "write_file",
           "writable", "writer", "FORMATS"]
