"""What the dense selective methods share (partial fine-tuning, BitFit, LN tuning, DiffFit's parameter part):
a zero-initialised dense delta on one parameter, and a config base that selects parameters.

A dense delta d on parameter p makes the module compute with p + w * d (``ParamSite``); d = 0 at init, so the
adapted model starts bit-identical to the base, and ``fuse`` adds w * d into p in place (exact up to the
rounding of one add). Training d from zero is training p itself, with p left untouched: the base stays
shareable between adapters and the file holds d only (``<module>.<parameter>.delta``).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..config import MethodConfig
from ..core import Host, ParamDelta

__all__ = ["DenseDelta", "DenseSelective", "NORM_SUFFIXES", "norm_classes", "module_at", "owner_of", "delta_dtype"]

# class-name endings of normalisation layers: torch's LayerNorm / GroupNorm, transformers' LlamaRMSNorm,
# T5LayerNorm..., diffusers' RMSNorm, FP32LayerNorm; matched by name so the RMSNorm-like classes of every
# library count without importing them
NORM_SUFFIXES = ("LayerNorm", "GroupNorm", "RMSNorm")


def norm_classes(model: nn.Module) -> tuple[str, ...]:
    """The class names (own or inherited) of ``model``'s normalisation layers that hold parameters."""
    names = set()
    for m in model.modules():
        if m._parameters and any(p is not None for p in m._parameters.values()):
            names.update(c.__name__ for c in type(m).__mro__ if c.__name__.endswith(NORM_SUFFIXES))
    return tuple(sorted(names))


def module_at(model: nn.Module, path: str) -> nn.Module | None:
    """The module at ``path`` ("" = the model), looking through Hosts to the layer they wrap; None if none."""
    module = model
    for part in path.split(".") if path else ():
        module = getattr(module.base if isinstance(module, Host) else module, part, None)
        if not isinstance(module, nn.Module):
            return None
    return module.base if isinstance(module, Host) else module


def owner_of(model: nn.Module, site: str) -> tuple[nn.Module | None, str]:
    """(the module holding parameter ``site`` = ``<module>.<name>``, name); module None when there is none."""
    path, _, name = site.rpartition(".")
    return module_at(model, path), name


def delta_dtype(param: torch.Tensor) -> torch.dtype:
    """Deltas of half-precision parameters train in float32 (as LoRA's do); others follow the parameter."""
    return torch.float32 if param.dtype in (torch.float16, torch.bfloat16) else param.dtype


class DenseDelta(ParamDelta):
    """d, shaped like the parameter, zero at init; the module computes with p + w * d."""

    category = "selective"

    def __init__(self, config, site: str, param: torch.Tensor, init: bool = True):
        super().__init__(config, site)
        if not param.is_floating_point():
            raise TypeError(f"{site} holds {param.dtype} values: only floating-point parameters can be trained")
        self.delta = nn.Parameter(torch.zeros(param.shape, dtype=delta_dtype(param),
                                              device=param.device if init else "meta"))

    def value(self) -> torch.Tensor:
        return self.delta


@dataclasses.dataclass
class DenseSelective(MethodConfig):
    """Base of the dense selective configs: ``target`` selects parameters (``<module>.<parameter>`` names;
    ``types``/``within`` filter the owning module); only ``nn.Parameter``s are taken (buffers such as running
    statistics are not trained). Subclasses fill ``target`` in ``resolved`` when it is left empty."""

    category = "selective"
    site_kind = "param"
    param_names = ("delta",)

    def select(self, model: nn.Module) -> list[str]:
        found = []
        for q in self.target.select(model, "param"):
            owner, name = owner_of(model, q)
            if owner is not None and isinstance(owner._parameters.get(name), nn.Parameter):
                found.append(q)
        return found

    def build(self, base: torch.Tensor, site: str, init: bool = True) -> DenseDelta:
        return DenseDelta(self, site, base, init)
