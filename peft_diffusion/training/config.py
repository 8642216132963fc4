"""Typed script configs: a dataclass, filled from a TOML file and ``--key=value`` overrides.

Unknown keys and values of the wrong type raise ``ConfigError`` naming the key and listing the valid ones,
before any work starts.
"""
from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A config key or value that the script does not accept."""


def _convert(name: str, kind, value):
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [k for k in typing.get_args(kind) if k is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        kind = options[0]
        origin = typing.get_origin(kind)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if kind in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        try:
            number = kind(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None
        if kind is int and isinstance(value, float) and value != number:
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return number
    if kind is str:
        return str(value)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        return list(value) if origin is list else tuple(value)
    if origin is dict or kind is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a table, got {value!r}")
        return value
    return value


def build(cls, values: dict):
    """``cls(**values)`` with every key checked and every value converted to the field's type."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}; valid keys: {', '.join(sorted(fields))}")
    cfg = cls(**{k: _convert(k, hints[k], v) for k, v in values.items()})
    check = getattr(cfg, "check", None)
    if check is not None:
        check()
    return cfg


def parse_overrides(args: list[str]) -> dict:
    """``["--steps=200", "--lr", "1e-3", "--overwrite"]`` -> {"steps": "200", "lr": "1e-3", "overwrite": "true"}
    (dashes in keys become _). A bare ``--key`` (last, or followed by another ``--key``) means true, the way
    command-line switches read; a key that is no switch then says it wants a number or a word."""
    out, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"expected --key=value, got {arg!r}")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                value = "true"
            else:
                value, i = args[i + 1], i + 1
        out[key.replace("-", "_")] = value
        i += 1
    return out


def read_toml(path: str | Path | None) -> dict:
    """The tables of a TOML config file ({} for None); a missing or malformed file is a ``ConfigError``."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e


def load(cls, path: str | Path | None = None, overrides: list[str] | dict | None = None):
    """A ``cls`` config from a TOML file (optional) with command-line overrides on top."""
    values = read_toml(path)
    values.update(overrides if isinstance(overrides, dict) else parse_overrides(list(overrides or [])))
    return build(cls, values)
