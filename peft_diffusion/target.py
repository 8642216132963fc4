"""Where to inject: include/exclude name patterns, module types and ancestor classes.

A pattern matches a qualified module name when it equals the name, is a dotted suffix of it
(``"to_q"`` matches ``"...attn1.to_q"``), or is a regular expression that matches the whole name or a
dotted suffix of it (``r"attn2\\.to_[kv]"``), the rule peft applies to ``rank_pattern``.
"""
from __future__ import annotations

import dataclasses
import re
from functools import lru_cache

from torch import nn

from .core import SUPPORTED_LAYERS, Host


@lru_cache(maxsize=4096)
def _regex(pattern: str):
    try:
        return re.compile(rf"(?:.*\.)?(?:{pattern})")
    except re.error:
        return None


def name_matches(pattern: str, name: str) -> bool:
    if name == pattern or name.endswith("." + pattern):
        return True
    rx = _regex(pattern)
    return rx is not None and rx.fullmatch(name) is not None


def lookup(patterns: dict, name: str, default):
    """Value of the most specific (longest) pattern in ``patterns`` that matches ``name``."""
    best = None
    for pattern in patterns:
        if name_matches(pattern, name) and (best is None or len(pattern) > len(best)):
            best = pattern
    return default if best is None else patterns[best]


def class_names(module: nn.Module) -> set[str]:
    return {c.__name__ for c in type(module).__mro__}


@dataclasses.dataclass(frozen=True)
class Target:
    """Which modules of a model receive a delta.

    include: name patterns (empty = every module of an allowed type); exclude: name patterns;
    types: class names the module must be (or inherit from); within: class names of which at least one
    ancestor must be an instance (empty = anywhere).
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    types: tuple[str, ...] = ("Linear",)
    within: tuple[str, ...] = ()

    def __post_init__(self):
        for field in ("include", "exclude", "types", "within"):
            value = getattr(self, field)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, field, tuple(value))
        unknown = [t for t in self.types if t not in SUPPORTED_LAYERS]
        if unknown:
            raise ValueError(f"Target.types {unknown} are not supported layer types: {list(SUPPORTED_LAYERS)}")

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "Target":
        return cls(**{k: tuple(v) for k, v in data.items()})

    def select(self, model: nn.Module) -> list[str]:
        """Qualified names of the matching modules, in model order. A Host counts as its base layer."""
        found: list[str] = []
        within = set(self.within)

        def walk(module: nn.Module, prefix: str, in_ancestor: bool) -> None:
            for child_name, child in module.named_children():
                name = f"{prefix}.{child_name}" if prefix else child_name
                layer = child.base if isinstance(child, Host) else child
                if self._wanted(name, layer, in_ancestor):
                    found.append(name)
                if not isinstance(child, Host):  # supported layers are leaves: nothing to find inside a Host
                    walk(child, name, in_ancestor or bool(class_names(child) & within))

        walk(model, "", bool(class_names(model) & within))
        return found

    def _wanted(self, name: str, module: nn.Module, in_ancestor: bool) -> bool:
        if not class_names(module) & set(self.types):
            return False
        if self.within and not in_ancestor:
            return False
        if self.include and not any(name_matches(p, name) for p in self.include):
            return False
        return not any(name_matches(p, name) for p in self.exclude)
