"""Deltas: one adapter at one site, with one lifecycle whatever the site's kind.

``Delta`` is the base: a method config, the site's name, and ``merge``/``unmerge`` where the math allows.
Each kind of site runs its deltas through its own entry points:

- a ``Host`` (leaf layer) calls ``forward(base, x, out, weight)`` (and ``edit_input`` / ``whole``);
  ``WeightDelta`` serves every method whose update is a weight difference dW (LoRA, LoHa, LoKr, ...): it
  only needs ``delta_weight()``, and forward, merge and unmerge go through the base layer's own op;
- an ``Annex`` (new modules beside any module) calls ``pre(module, args, kwargs, weight)`` before the module
  runs and ``post(module, args, kwargs, output, weight)`` after it (``AnnexDelta``);
- a ``ParamSite`` (one named parameter or buffer) asks ``ParamDelta.apply(param, weight)`` for the tensor the
  module computes with, and merges with an in-place add.
"""
from __future__ import annotations

import torch
from torch import nn

from .layers import weight_op

__all__ = ["Delta", "WeightDelta", "AnnexDelta", "ParamDelta"]


class Delta(nn.Module):
    """One adapter at one site. Subclasses define ``forward(base, x, out, weight)`` -> the new output.

    ``category`` is the survey's family (selective, additive, prompt, reparameterization, hybrid).
    ``config`` is the method config that built the delta (a plain attribute, not a module).
    """

    category = "reparameterization"
    # which kind of site holds it: "host" (a leaf layer), "annex" (beside any module), "param" (a parameter)
    site_kind = "host"
    mergeable = False
    # a delta that lives and dies with another part of its adapter (ED-LoRA's router hooks): not saved,
    # not counted; its owner places and removes it
    transient = False
    # ``edit_input(base, x, weight)`` rewrites the base layer's input before it runs (textual inversion: token
    # ids the base embedding lacks); ``forward`` still receives the original input
    edits_input = False
    # a mergeable delta with nothing to fold into the weights (ED-LoRA's token rows): ``fuse`` leaves it
    # running and unfused, so an adapter whose other parts merge can be fused as a whole
    runs_when_fused = False

    def __init__(self, config, site: str):
        super().__init__()
        self.config = config
        self.site = site

    def edit_input(self, base: nn.Module, x, weight: float):
        return x

    def whole(self, base: nn.Module, x, weight: float):
        """The base layer's output and this delta's in one go (a faster path), or None to run them apart.

        Asked only when this delta is the site's one active, unfused adapter and the layer got no extra
        arguments; it must give the same values as ``self(base, x, base(x), weight)``."""
        return None

    def attach(self, site) -> None:
        """Called once the delta is placed in ``site``: state outside the module tree (a tokenizer) goes here."""

    def detach(self, site) -> None:
        """Called once the delta has left ``site``: undoes ``attach``."""

    def fit_file(self, tensors: dict) -> None:
        """Called by ``load_adapter`` with this site's tensors from a file, before they are checked against
        ``state_dict()`` and before the model is touched. A delta whose saved form varies (dense while it
        trains, sparse once pruned) takes the file's form here; a ValueError (an index outside the parameter,
        non-finite values) is reported naming the file and the site."""

    def merge(self, base: nn.Module, weight: float) -> None:
        raise RuntimeError(f"{type(self).__name__} at {self.site} cannot be fused into the base weights")

    def unmerge(self, base: nn.Module, weight: float) -> None:
        raise RuntimeError(f"{type(self).__name__} at {self.site} cannot be unfused")


class WeightDelta(Delta):
    """A delta that is a weight difference dW shaped like ``base.weight`` (scale included).

    Subclasses define ``delta_weight()``; they may override ``forward``/``merge`` with a cheaper path.
    """

    mergeable = True

    def forward(self, base, x, out, weight):
        dw = self.delta_weight()
        return out + weight * weight_op(base, x.to(dw.dtype), dw).to(out.dtype)

    @torch.no_grad()
    def merge(self, base, weight):
        w = base.weight
        w.add_((self.delta_weight().float() * weight).to(w.dtype))

    @torch.no_grad()
    def unmerge(self, base, weight):
        w = base.weight
        w.sub_((self.delta_weight().float() * weight).to(w.dtype))


class AnnexDelta(Delta):
    """A delta made of new modules that run beside an existing module (bottleneck adapters, IP-Adapter's
    key/value projections, prefix keys/values, residuals from a side network).

    ``pre`` may return new ``(args, kwargs)`` for the module (None: unchanged); ``post`` may return a new
    output (None: unchanged). Per-call inputs beyond the module's own arguments come from
    ``peft_diffusion.core.inputs`` (``pd.inputs(pipe, ...)``).
    """

    site_kind = "annex"

    def pre(self, module: nn.Module, args: tuple, kwargs: dict, weight: float):
        return None

    def post(self, module: nn.Module, args: tuple, kwargs: dict, output, weight: float):
        return None

    def forward(self, *args, **kwargs):  # an annex delta runs through pre/post only
        raise RuntimeError(f"{type(self).__name__} runs through its annex's hooks, not by calling it")


class ParamDelta(Delta):
    """A delta on one named parameter (or buffer) p of a module: the module computes with
    ``apply(p, weight)`` = p + weight * value() in place of p, and ``merge`` adds in place.

    Subclasses define ``value()`` (a dense tensor shaped like p), or override ``apply``/``merge``/``unmerge``
    with a cheaper form (sparse deltas: an index add of the trained entries only).
    """

    site_kind = "param"
    mergeable = True

    def apply(self, param: torch.Tensor, weight: float) -> torch.Tensor:
        v = self.value()
        return param + (v * weight if weight != 1.0 else v).to(param.dtype)

    @torch.no_grad()
    def merge(self, param, weight):
        param.add_((self.value().float() * weight).to(param.dtype))

    @torch.no_grad()
    def unmerge(self, param, weight):
        param.sub_((self.value().float() * weight).to(param.dtype))

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"{type(self).__name__} runs through its parameter site, not by calling it")
