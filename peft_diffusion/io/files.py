"""Reading and writing adapter files safely.

Reading: safetensors, or ``.bin``/``.pt``/``.ckpt`` through ``torch.load(weights_only=True)`` (never
unpickles code). Corrupt or truncated files and NaN/inf tensors raise ``AdapterFileError``.
Writing: safetensors only, atomically (a temporary file in the same folder, fsync, then ``os.replace``), so
an interrupted save never corrupts an existing file.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

PICKLE_SUFFIXES = (".bin", ".pt", ".ckpt", ".pth")
DEFAULT_FILE = "pytorch_lora_weights.safetensors"


class AdapterFileError(ValueError):
    """An adapter file that cannot be read or does not fit the model."""


def resolve_path(path: str | os.PathLike) -> Path:
    """The file behind ``path``; a folder holding one adapter file (or diffusers' default name) works."""
    path = Path(path)
    if path.is_dir():
        if (path / DEFAULT_FILE).is_file():
            return path / DEFAULT_FILE
        found = sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise AdapterFileError(f"{path} is a folder with {len(found)} .safetensors files: name the file")
        return found[0]
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {path} does not exist")
    return path


def _flatten(obj, prefix: str, tensors: dict, meta: dict) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), tensors, meta)
    elif isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
    else:
        meta[prefix] = str(obj)


def _finite(t: torch.Tensor) -> bool:
    """Whether every value is finite, in one reduction: NaN and inf reach the min or the max."""
    if t.numel() == 0:
        return True
    try:
        lo, hi = torch.aminmax(t)
    except (NotImplementedError, RuntimeError):  # dtypes without aminmax (float8)
        return bool(torch.isfinite(t).all())
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def read_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of an adapter file; nested pickled dicts are flattened with dotted keys."""
    path = resolve_path(path)
    if path.suffix in PICKLE_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise AdapterFileError(f"{path}: refused to load (weights-only loading rejects pickled code): {e}") from e
        except (RuntimeError, EOFError, OSError) as e:
            raise AdapterFileError(f"{path} is not a readable torch file (corrupt or truncated?): {e}") from e
        tensors, meta = {}, {}
        _flatten(obj, "", tensors, meta)
    else:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise AdapterFileError(f"{path} is not a readable safetensors file (corrupt or truncated?): {e}") from e
        meta.pop("format", None)
    if not tensors:
        raise AdapterFileError(f"{path} holds no tensors")
    for key, t in tensors.items():
        if t.is_floating_point() and not _finite(t):
            raise AdapterFileError(f"{path}: tensor {key!r} contains NaN or inf values")
    return tensors, meta


def write_file(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
               default_name: str | None = None) -> Path:
    """Write a safetensors file atomically; returns its path. A folder gets ``default_name`` (the format's
    usual file name, diffusers' LoRA name when None)."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise ValueError(f"{path}: adapters are saved as .safetensors only")
    if path.is_dir() or not path.suffix:
        path = path / (default_name or DEFAULT_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    # the file gets the mode open() gives new files (0666 less the umask, so 0644 usually): it is a file users
    # share, but mkstemp and safetensors' own writer both leave 0600, and os.replace keeps the mode
    tmp = path.parent / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        mode = os.stat(tmp).st_mode & 0o777  # 0666 less the umask, read without changing the process umask
        save_file(tensors, tmp, metadata={k: str(v) for k, v in metadata.items()})
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
