"""Embedded models, shipped as package data so a plain ``pip install`` has them (found through
``importlib.resources``, so they work from any directory).

- ``shapes-base``: the shapes-world Stable-Diffusion pipeline (``train/pretrain_base.py``);
- ``shapes-dit``: a class-conditional DiT over shapes-base's VAE, a ``DiTPipeline`` folder (``train/pretrain_dit.py``);
- ``oracle.safetensors``: the shapes-world oracle that reads generated images (same script).

Each folder is a plain diffusers / transformers ``save_pretrained`` folder: ``from_pretrained(path(...))``
loads it on the CPU with no dtype argument.
"""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

__all__ = ["path", "SHAPES_BASE", "SHAPES_DIT", "ORACLE"]

SHAPES_BASE = "shapes-base"
SHAPES_DIT = "shapes-dit"
ORACLE = "oracle.safetensors"


def path(name: str) -> Path:
    """The file system path of embedded model ``name`` (a folder or a file beside this module)."""
    found = Path(str(files(__name__) / name))
    if not found.exists():
        known = sorted(p.name for p in Path(str(files(__name__))).iterdir() if not p.name.startswith(("_", ".")))
        raise FileNotFoundError(f"no embedded model {name!r} in {found.parent} (embedded: {known})")
    return found
