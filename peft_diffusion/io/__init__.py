"""File formats: one module each; ``detect`` picks the format of a file. Format sniffing lives only here."""
from __future__ import annotations

from ..registry import FORMATS
from . import diffusers_lora, diffusers_old, kohya, native  # noqa: F401  (register the formats)
from .adapter_data import COMPONENTS, WRAPPERS, AdapterData
from .files import AdapterFileError, read_file, resolve_path, write_file

# most specific first: our header, then kohya's prefixes, the older diffusers names, the peft layout
DETECT_ORDER = ("native", "kohya", "diffusers-old", "diffusers")


def detect(tensors: dict, metadata: dict) -> str:
    for name in DETECT_ORDER:
        if FORMATS[name].detect(tensors, metadata):
            return name
    sample = sorted(tensors)[:5]
    raise AdapterFileError(f"unrecognised adapter file: keys such as {sample} match no known format "
                           f"({', '.join(DETECT_ORDER)})")


def writer(name: str):
    fmt = FORMATS.get(name)
    if fmt is None or not hasattr(fmt, "from_native"):
        writable = [n for n, f in FORMATS.items() if hasattr(f, "from_native")]
        raise ValueError(f"cannot write format {name!r}; writable formats: {writable}")
    return fmt


__all__ = ["AdapterData", "AdapterFileError", "COMPONENTS", "WRAPPERS", "detect", "read_file", "resolve_path", "write_file",
           "writer", "FORMATS"]
