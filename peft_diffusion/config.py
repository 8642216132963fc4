"""Base class of method configs: a dataclass with the method's hyper-parameters and its target."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import nn

from .presets import default_target, preset
from .target import Target


def as_target(value, what: str) -> Target | None:
    """A config field that names sites: a ``Target``, a preset name, a dict from ``Target.to_dict`` (files and
    TOML tables) or None; ``what`` names the field in the error."""
    if isinstance(value, str):
        return preset(value)
    if isinstance(value, dict):
        return Target.from_dict(value)
    if value is None or isinstance(value, Target):
        return value
    raise TypeError(f"{what} must be a Target, a preset name or None, not {type(value).__name__}")


@dataclasses.dataclass
class MethodConfig:
    """Hyper-parameters of one method and where it goes.

    target: a ``Target``, a preset name, or None for the model's default preset.
    Subclasses are dataclasses registered with ``registry.register_method`` and define
    ``build(base, site, init=True) -> Delta``; ``init=False`` builds uninitialised parameters for loading.
    """

    method: ClassVar[str] = ""
    category: ClassVar[str] = ""
    # the delta's state_dict keys at one site, used to split file keys into (site, parameter): declared once
    # here, so file formats keep no per-method key tables
    param_names: ClassVar[tuple[str, ...]] = ()
    # the kind of site its deltas live in: "host" (leaf layers), "annex" (beside modules), "param" (parameters)
    site_kind: ClassVar[str] = "host"
    # the pipeline components ``inject`` puts the method into when none are named (None: the denoiser)
    components: ClassVar[tuple[str, ...] | None] = None
    # methods whose update is exactly a plain LoRA define ``as_lora(sites) -> (sites, alphas)``: per site
    # the ``lora_A.weight`` / ``lora_B.weight`` of that LoRA and its scale as an alpha (scale * rank), so
    # that formats holding LoRA only (diffusers, kohya, LyCORIS) can carry them (``io.lora_equivalent``)
    as_lora: ClassVar = None

    target: Target | str | None = None

    def __post_init__(self):
        self.target = as_target(self.target, "target")

    def bind(self, obj, model: nn.Module, name: str) -> "MethodConfig":
        """The config as adapter ``name`` uses it in ``model`` (a component of ``obj``, or ``obj`` itself).

        ``inject`` and ``load_adapter`` call it once per model before building. Methods that need more than
        the model override it (textual inversion takes the pipeline's tokenizer and the adapter name as the
        token); the default is the config itself.
        """
        return self

    def select(self, model: nn.Module) -> list[str]:
        """The names of the sites this (resolved) config puts deltas in."""
        return self.target.select(model, self.site_kind)

    def kind_of(self, model: nn.Module, site: str) -> str:
        """The kind of site ``site`` is in ``model``: ``site_kind``, unless the method puts deltas in several
        kinds (DiffFit: parameters and annexes), which override this (``inject`` and ``load_adapter`` ask)."""
        return self.site_kind

    def resolved(self, model: nn.Module) -> "MethodConfig":
        """This config with ``target`` filled from the model's default preset when it was left empty."""
        if self.target is not None:
            return self
        return dataclasses.replace(self, target=default_target(model))

    def to_dict(self) -> dict:
        out = {"method": self.method}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, Target) else value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "MethodConfig":
        data = {k: v for k, v in data.items() if k != "method"}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} settings {unknown}; valid: {sorted(names)}")
        return cls(**data)
