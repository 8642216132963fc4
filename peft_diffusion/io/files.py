"""Reading and writing adapter files safely.

Reading: safetensors, or ``.bin``/``.pt``/``.ckpt`` through ``torch.load(weights_only=True)`` (never
unpickles code). Whatever is wrong with a file's bytes (truncated, bit flips, a damaged or ambiguous header,
pickled code, a tensor claiming more values than the file stores, NaN/inf) raises ``CorruptFileError``, a
subclass of ``AdapterFileError`` naming the file and the problem: reading never lets another exception out
(``bench/fuzz_loader.py`` checks it on thousands of damaged files).
Writing: safetensors only, atomically (a temporary file in the same folder, fsync, then ``os.replace``), so
an interrupted save never corrupts an existing file.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

PICKLE_SUFFIXES = (".bin", ".pt", ".ckpt", ".pth")
DEFAULT_FILE = "pytorch_lora_weights.safetensors"


# safetensors' own limit on the JSON header; a larger claim is damage, and reading it would cost memory
MAX_HEADER = 100_000_000


class AdapterFileError(ValueError):
    """An adapter file that cannot be read or does not fit the model; the message names the file."""


class CorruptFileError(AdapterFileError):
    """The file's bytes are damaged or unsafe: it is no readable safetensors / torch file, or holds NaN/inf."""


class UnmatchedKeysError(AdapterFileError):
    """Keys of the file fit no module of the model. ``report`` (a ``LoadReport``) lists, per component, the
    keys that would be used, the ones that fit nothing and the modules left without keys."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


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


def _unique_keys(pairs: list) -> dict:
    """A JSON object as a dict, refusing a key written twice: parsers keep the first or the last copy, so which
    tensor a reader gets would depend on the reader."""
    out = dict(pairs)
    if len(out) < len(pairs):
        seen: set = set()
        dup = sorted({k for k, _ in pairs if k in seen or seen.add(k)})
        raise ValueError(f"duplicate keys {dup[:3]}")
    return out


def check_safetensors_header(path: Path) -> None:
    """Check what safetensors leaves to chance: a header length larger than the file (or than safetensors
    allows) and duplicate keys in the JSON header, which safetensors resolves silently."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptFileError(f"{path} has {size} bytes, too short for a safetensors file (corrupt or "
                                   f"truncated?)")
        n = struct.unpack("<Q", head)[0]
        if n > min(size - 8, MAX_HEADER):
            raise CorruptFileError(f"{path}: its header claims {n} bytes but {size - 8} follow the length "
                                   f"(corrupt or truncated, or not a safetensors file)")
        text = f.read(n)
    try:
        header = json.loads(text, object_pairs_hook=_unique_keys)
        if not isinstance(header, dict):
            raise ValueError(f"a JSON {type(header).__name__}, not an object")
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CorruptFileError(f"{path}: damaged safetensors header (corrupt or truncated?): {e}") from e


def _stored(t: torch.Tensor) -> bool:
    """Whether the file stores every value ``t`` shows: a pickled tensor may claim any size over a tiny storage
    (stride 0), which would cost a reader time and memory out of all proportion to the file."""
    if t.numel() == 0:
        return True
    span = 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))
    return t.numel() <= span and (t.storage_offset() + span) * t.element_size() <= t.untyped_storage().nbytes()


def read_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of an adapter file; nested pickled dicts are flattened with dotted keys."""
    path = resolve_path(path)
    if path.suffix in PICKLE_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CorruptFileError(f"{path}: refused to load (weights-only loading rejects pickled code, or the "
                                   f"pickle is damaged): {e}") from e
        except Exception as e:  # noqa: BLE001 - torch's reader fails on damaged bytes in many ways (zip, ints...)
            raise CorruptFileError(f"{path} is not a readable torch file (corrupt or truncated?): "
                                   f"{type(e).__name__}: {e}") from e
        tensors, meta = {}, {}
        _flatten(obj, "", tensors, meta)
        for key, t in tensors.items():
            if not _stored(t):
                raise CorruptFileError(f"{path}: tensor {key!r} claims shape {tuple(t.shape)} but the file stores "
                                       f"{t.untyped_storage().nbytes()} bytes for it")
    else:
        check_safetensors_header(path)
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - SafetensorError, and torch's for dtypes it cannot build
            raise CorruptFileError(f"{path} is not a readable safetensors file (corrupt or truncated?): "
                                   f"{type(e).__name__}: {e}") from e
        meta.pop("format", None)
    if not tensors:
        raise AdapterFileError(f"{path} holds no tensors")
    for key, t in tensors.items():
        if t.is_floating_point() and not _finite(t):
            raise CorruptFileError(f"{path}: tensor {key!r} contains NaN or inf values")
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


def write_folder(folder: str | os.PathLike, fill) -> Path:
    """Write a folder atomically: ``fill(tmp)`` writes a temporary sibling, which then takes ``folder``'s
    place (an existing folder is moved aside first and removed after), so readers see the old folder or the
    new one, never a half-written one; on any error the temporary folder goes and ``folder`` is as it was."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}.{os.urandom(4).hex()}"
    tmp, old = folder.with_name(f".{folder.name}.tmp-{tag}"), folder.with_name(f".{folder.name}.old-{tag}")
    try:
        fill(tmp)
        if folder.exists():
            os.rename(folder, old)
        os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return folder
