"""Where to inject: include/exclude name patterns, module types and ancestor classes.

A target selects sites of one kind (``Target.select(model, kind)``): leaf layers for a ``Host``
(``"host"``), any module for an ``Annex`` (``"annex"``), or parameters and buffers, named
``<module>.<parameter>``, for a ``ParamSite`` (``"param"``; ``types`` and ``within`` then filter the module
that owns the parameter).

A pattern matches a qualified module name when it equals the name, is a dotted suffix of it
(``"to_q"`` matches ``"...attn1.to_q"``), or is a regular expression that matches the whole name or a
dotted suffix of it (``r"attn2\\.to_[kv]"``), the rule peft applies to ``rank_pattern``.
"""
from __future__ import annotations

import dataclasses
import re
from functools import lru_cache

from torch import nn

from .core import SUPPORTED_LAYERS, Host, Site


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
    types: classes or class names the module must be (or inherit from; empty = any, for annexes and
    parameters); within: classes or class names of which at least one ancestor must be an instance (empty =
    anywhere). Classes are kept by name, so targets stay plain data.
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
            if isinstance(value, type):
                value = (value,)
            names = tuple(v.__name__ if isinstance(v, type) else v for v in value)
            bad = [v for v in names if not isinstance(v, str) or not v]
            if bad:
                raise TypeError(f"Target.{field} takes classes or class names, got {bad}")
            object.__setattr__(self, field, names)

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "Target":
        return cls(**{k: tuple(v) for k, v in data.items()})

    def select(self, model: nn.Module, kind: str = "host") -> list[str]:
        """Qualified names of the matching sites of ``kind``, in model order. A Host counts as its base layer;
        the modules peft-diffusion adds (sites and their deltas) are never selected.

        host: leaf layers a Host can wrap; annex: any module, the model itself included (name ""); param:
        ``<module>.<name>`` of each parameter and buffer whose module fits ``types``/``within``.
        """
        if kind == "host":
            unknown = [t for t in self.types if t not in SUPPORTED_LAYERS]
            if unknown or not self.types:
                raise ValueError(f"Target.types {unknown or '()'} are not supported layer types for this method "
                                 f"(it wraps leaf layers: {list(SUPPORTED_LAYERS)})")
        elif kind not in ("annex", "param"):
            raise ValueError(f"unknown site kind {kind!r}: host, annex or param")
        found: list[str] = []
        within = set(self.within)

        def visit(module: nn.Module, name: str, in_ancestor: bool) -> None:
            if kind == "param":
                if self._wanted(name, module, in_ancestor, check_name=False):
                    for p, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                        q = f"{name}.{p}" if name else p
                        if self._wanted(q, module, True, check_type=False):
                            found.append(q)
            elif (name or kind == "annex") and self._wanted(name, module, in_ancestor):
                found.append(name)

        def walk(module: nn.Module, prefix: str, in_ancestor: bool) -> None:
            for child_name, child in module.named_children():
                name = f"{prefix}.{child_name}" if prefix else child_name
                if isinstance(child, Host):
                    if kind == "host":  # leaf layers: nothing to find inside a Host
                        visit(child.base, name, in_ancestor)
                        continue
                    child = child.base
                elif isinstance(child, Site):
                    continue
                visit(child, name, in_ancestor)
                walk(child, name, in_ancestor or bool(class_names(child) & within))

        top = bool(class_names(model) & within)
        if kind != "host":
            visit(model, "", False)
        walk(model, "", top)
        return found

    def _wanted(self, name: str, module: nn.Module, in_ancestor: bool, check_name: bool = True,
                check_type: bool = True) -> bool:
        if check_type and self.types and not class_names(module) & set(self.types):
            return False
        if not check_name:
            return not self.within or in_ancestor
        if self.within and not in_ancestor:
            return False
        if self.include and not any(name_matches(p, name) for p in self.include):
            return False
        return not any(name_matches(p, name) for p in self.exclude)
