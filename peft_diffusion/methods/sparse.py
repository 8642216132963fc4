"""What the sparse selective methods share (FISH, Child-Tuning D, LT-SFT; Diff pruning once pruned): a config
base with a per-tensor density, the sparse delta (indices buffer + values parameter, applied with an index
add), and the two scoring passes that choose masks: Fisher information and a short dense fine-tune.

Masks are chosen per parameter tensor: a tensor of n entries keeps round(density * n) of them (``masks.entries``),
so the shapes of every delta follow from the config and the model alone (files load by shape, and the
trainer's optimizer holds the values parameter from the start; a scoring pass only rewrites which entries
they are). ``density_pattern`` gives some tensors another density (the longest matching pattern wins).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import zlib

import torch
from torch import nn

from ..config import MethodConfig
from ..core import ParamDelta
from ..presets import default_target
from ..target import Target, lookup
from . import masks

logger = logging.getLogger(__name__)

__all__ = ["SelectiveConfig", "SparseDelta", "weights_of", "fisher", "dense_change", "trained_dtype"]


def weights_of(target: Target) -> Target:
    """A module target (a preset) as the parameter target of those modules' ``weight`` tensors."""
    def suffix(patterns):
        return tuple(rf"(?:{p})\.weight" for p in patterns)
    include = suffix(target.include) if target.include else (r".*\.weight",)
    return dataclasses.replace(target, include=include, exclude=suffix(target.exclude))


def trained_dtype(param: torch.Tensor) -> torch.dtype:
    """Deltas of half-precision parameters train in float32 (as LoRA's do); others follow the parameter."""
    return torch.float32 if param.dtype in (torch.float16, torch.bfloat16) else param.dtype


@dataclasses.dataclass
class SelectiveConfig(MethodConfig):
    """Base of the masked / sparse methods: ``density`` (fraction of each tensor's entries the mask keeps, in
    (0, 1]), ``density_pattern`` ({name pattern: density} overrides). ``target`` selects parameters
    (``<module>.<parameter>`` names); left empty it is the ``weight`` of the model's default preset modules."""

    category = "selective"
    site_kind = "param"

    density: float = 0.01
    density_pattern: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        masks.check_density(self.density, type(self).__name__)
        for pattern, d in self.density_pattern.items():
            masks.check_density(d, f"{type(self).__name__} density_pattern[{pattern!r}]")

    def density_at(self, site: str) -> float:
        return lookup(self.density_pattern, site, self.density)

    def resolved(self, model: nn.Module) -> "SelectiveConfig":
        if self.target is not None:
            return self
        return dataclasses.replace(self, target=weights_of(default_target(model)))

    def select(self, model: nn.Module) -> list[str]:
        found = super().select(model)
        floats = [q for q in found if _tensor(model, q).is_floating_point()]  # integer buffers have no delta
        return floats


def _tensor(model: nn.Module, q: str) -> torch.Tensor:
    owner, _, name = q.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    module = getattr(module, "base", module)  # a Host's layer
    return module._parameters.get(name) if name in module._parameters else module._buffers[name]


class SparseDelta(ParamDelta):
    """k = round(density * numel) entries of one parameter: ``indices`` (flat, int32 where they fit; a buffer)
    and ``values`` (trained). Before a scoring pass the entries are a random subset seeded by the site name
    (and ``scored`` is False); ``set_mask`` puts the chosen ones in place, values zero."""

    category = "selective"

    def __init__(self, config: SelectiveConfig, site: str, param: torch.Tensor, init: bool = True):
        super().__init__(config, site)
        self.numel = param.numel()
        k = masks.entries(self.numel, config.density_at(site))
        g = torch.Generator().manual_seed(zlib.crc32(site.encode()))
        idx = masks.random_subset(self.numel, k, g) if init else torch.zeros(k, dtype=torch.long)
        self.register_buffer("indices", idx.to(param.device, masks.index_dtype(self.numel)))
        self.values = nn.Parameter(torch.zeros(k, dtype=trained_dtype(param), device=param.device))
        self.scored = not init
        self._site: tuple = ()

    def attach(self, site) -> None:
        self._site = (site,)  # a plain reference: the site is our parent

    def detach(self, site) -> None:
        self._site = ()

    def base_tensor(self) -> torch.Tensor:
        if not self._site:
            raise RuntimeError(f"{type(self).__name__} at {self.site} is not placed in a model")
        return self._site[0].tensor

    @torch.no_grad()
    def set_mask(self, indices: torch.Tensor) -> None:
        if indices.numel() != self.indices.numel():
            raise ValueError(f"{self.site}: a mask of {indices.numel()} entries for {self.indices.numel()} slots")
        self.indices.copy_(indices.to(self.indices.dtype))
        self.values.zero_()
        self.scored = True

    def apply(self, param, weight):
        return masks.sparse_apply(param, self.indices, self.values, weight)

    def merge(self, param, weight):
        masks.sparse_add_(param, self.indices, self.values, weight)

    def unmerge(self, param, weight):
        masks.sparse_add_(param, self.indices, self.values, -weight)

    def fit_file(self, tensors: dict) -> None:
        if "indices" in tensors and "values" in tensors:
            masks.check_sparse(tensors["indices"], tensors["values"], self.numel, self.site)


# ---------------------------------------------------------------- scoring passes


def _prepared(deltas: dict) -> dict:
    """{site: base tensor} of the deltas (parameters: scoring needs their gradients)."""
    tensors = {q: d.base_tensor() for q, d in deltas.items()}
    bad = [q for q, t in tensors.items() if not isinstance(t, nn.Parameter)]
    if bad:
        raise ValueError(f"scoring needs gradients of parameters; {bad[:3]} are buffers")
    return tensors


@contextlib.contextmanager
def _requiring_grad(tensors: dict):
    """The tensors require grad inside the block; each gets its own setting back after it."""
    flags = {q: t.requires_grad for q, t in tensors.items()}
    try:
        for t in tensors.values():
            t.requires_grad_(True)
        yield
    finally:
        for q, t in tensors.items():
            t.requires_grad_(flags[q])


def fisher(deltas: dict, loss_fn, batches: list) -> dict[str, torch.Tensor]:
    """The empirical Fisher information of each delta's base tensor: the mean over ``batches`` of the squared
    gradient of ``loss_fn(batch)`` (float32, shaped like the tensor). Only these gradients are computed
    (``torch.autograd.grad``): no ``.grad`` of the model is touched."""
    tensors = _prepared(deltas)
    scores = {q: torch.zeros(t.shape, dtype=torch.float32, device=t.device) for q, t in tensors.items()}
    with _requiring_grad(tensors):
        for batch in batches:
            grads = torch.autograd.grad(loss_fn(batch), list(tensors.values()), allow_unused=True)
            for q, g in zip(tensors, grads):
                if g is not None:
                    scores[q].add_(g.float().square())
    return {q: s / max(1, len(batches)) for q, s in scores.items()}


def dense_change(deltas: dict, loss_fn, batches: list, lr: float) -> dict[str, torch.Tensor]:
    """|theta_T - theta_0| of each delta's base tensor after a short dense fine-tune of those tensors alone
    (one AdamW step per batch, float32 master copies), then rewound: every tensor is restored bit for bit."""
    tensors = _prepared(deltas)
    start = {q: t.detach().clone() for q, t in tensors.items()}
    masters = {q: nn.Parameter(t.detach().float().clone()) for q, t in tensors.items()}
    opt = torch.optim.AdamW(list(masters.values()), lr=lr, weight_decay=0.0)
    try:
        with _requiring_grad(tensors):
            for batch in batches:
                grads = torch.autograd.grad(loss_fn(batch), list(tensors.values()), allow_unused=True)
                for q, g in zip(tensors, grads):
                    masters[q].grad = None if g is None else g.float()
                opt.step()
                with torch.no_grad():
                    for q, t in tensors.items():
                        t.copy_(masters[q])
        return {q: (masters[q].detach() - start[q].float()).abs() for q in tensors}
    finally:
        with torch.no_grad():
            for q, t in tensors.items():
                t.copy_(start[q])


def set_top_k(deltas: dict, scores: dict[str, torch.Tensor], what: str) -> str:
    """Give each sparse delta the top-k entries of its scores; returns a one-line summary for the log."""
    kept = total = 0
    for q, d in deltas.items():
        d.set_mask(masks.top_k(scores[q], d.indices.numel()))
        kept, total = kept + d.indices.numel(), total + d.numel
    line = f"{what}: kept {kept:,} of {total:,} entries ({kept / max(1, total):.3%}) in {len(deltas)} tensors"
    logger.info(line)
    return line
