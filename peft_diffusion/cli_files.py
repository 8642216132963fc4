"""The CLI's file commands: ``inspect`` (what an adapter file holds) and ``convert`` (write it in another
format, or ``--list-formats``: which formats it can be written as)."""
from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

from .cli import _held_warnings, _load_adapter, _load_base, site_kind

__all__ = ["inspect_file", "cmd_inspect", "list_formats", "cmd_convert"]

A1111_LORA = "kohya"
TOKEN_METHODS = {"textual-inversion"}


def _methods_of(file: str) -> set[str]:
    """The method names an adapter file holds (from its own header or its keys)."""
    from .io import FORMATS, detect, read_file

    tensors, metadata = read_file(file)
    data = FORMATS[detect(tensors, metadata)].to_native(tensors, metadata, None)
    return {getattr(cfg, "method", "?") for cfg in data.configs.values()}


def _writer_name(target: str, methods: set[str]) -> str:
    """The format that writes ``--to target`` for ``methods``: A1111 reads LoRA, LoHa and LoKr files in kohya's
    key layout and token embeddings in its own, so "a1111" means one or the other."""
    if target == "a1111" and methods and not methods <= TOKEN_METHODS:
        return A1111_LORA
    return target


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


def list_formats(pipe, name: str, methods: set[str]) -> dict[str, str]:
    """{format: "" when adapter ``name`` (of ``methods``) in ``pipe`` can be written in it, else why not},
    found by writing it into a temporary folder: the formats' own checks are the only complete list."""
    from .adapter_files import save_adapter
    from .io import writable

    out = {}
    with tempfile.TemporaryDirectory() as tmp, _held_warnings():
        for fmt in sorted(writable()):
            try:
                save_adapter(pipe, Path(tmp) / f"{fmt}.safetensors", name, format=_writer_name(fmt, methods))
                out[fmt] = ""
            except ValueError as e:
                out[fmt] = str(e)
    return out


def cmd_convert(args) -> int:
    from .adapter_files import save_adapter

    pipe = _load_base(args.base)
    if args.list_formats:
        name = _load_adapter(pipe, args.list_formats, base=args.base)
        methods = _methods_of(args.list_formats)
        print(f"{args.list_formats} ({', '.join(sorted(methods))}) can be written as:")
        for fmt, why in list_formats(pipe, name, methods).items():
            print(f"  {fmt:14} {'yes' if not why else 'no: ' + why}")
        return 0
    name = _load_adapter(pipe, args.input, base=args.base)
    fmt = _writer_name(args.to, _methods_of(args.input))
    path = save_adapter(pipe, args.output, name, format=fmt)
    note = f" (A1111 reads {fmt}'s key layout)" if fmt != args.to else ""
    print(f"{args.input} -> {path} ({args.to}){note}")
    return 0
