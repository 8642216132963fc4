"""Method and format registries: two dicts and their decorators.

Methods register their config dataclass under a short name (``"lora"``); formats register an object with
``detect``/``to_native``/``from_native``. The io layer reaches method configs only through ``METHODS``.
"""
from __future__ import annotations

from typing import Any

METHODS: dict[str, type] = {}
FORMATS: dict[str, Any] = {}


def register_method(name: str):
    def deco(cls):
        if name in METHODS:
            raise ValueError(f"method {name!r} is already registered by {METHODS[name].__name__}")
        cls.method = name
        METHODS[name] = cls
        return cls

    return deco


def register_format(fmt):
    if fmt.name in FORMATS:
        raise ValueError(f"format {fmt.name!r} is already registered")
    FORMATS[fmt.name] = fmt
    return fmt


def method_config(name: str):
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; registered: {', '.join(sorted(METHODS))}") from None


def config_from_dict(data: dict):
    """The method config a dict from ``MethodConfig.to_dict`` describes."""
    return method_config(data["method"]).from_dict(data)
