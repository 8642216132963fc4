"""The only structural change peft-diffusion makes to a model: a ``Host`` around one module.

A ``Host`` keeps the original module as ``host.base`` and holds named ``Delta`` objects (one adapter at
this site each), the active set with its weights, and what is fused into the base weights. Removing the
last delta puts the original module back, so the module tree and the state_dict keys are exactly as before.

``Delta`` is one adapter at one site; it adds to the base output, and may rewrite the base input first
(``edit_input``) or keep state outside the module tree in step with its placement (``attach``/``detach``,
e.g. a tokenizer's new tokens). ``WeightDelta`` serves every method whose update is a weight
difference dW (LoRA, LoHa, LoKr, ...): it only needs ``delta_weight()``; forward, merge and unmerge then go
through the base layer's own operation (``F.linear`` / the conv op), so one class serves Linear, Conv2d
and GPT-2's transposed ``Conv1D``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Delta", "WeightDelta", "Host", "layer_dims", "weight_op", "is_transposed", "SUPPORTED_LAYERS",
           "WEIGHT_LAYERS"]

# transformers' GPT-2 ``Conv1D`` stores its weight as (in, out); it is matched by class name so that this
# bottom layer does not import transformers.
_TRANSPOSED = ("Conv1D",)
WEIGHT_LAYERS = ("Linear", "Conv1d", "Conv2d", "Conv3d") + _TRANSPOSED
# what a Host may wrap: the weight layers, and token embeddings (for new-token rows, see ``tokens.py``)
SUPPORTED_LAYERS = WEIGHT_LAYERS + ("Embedding",)


def is_transposed(base: nn.Module) -> bool:
    return type(base).__name__ in _TRANSPOSED


def layer_dims(base: nn.Module) -> tuple[int, int, tuple[int, ...]]:
    """(in_features, out_features, kernel_size) of a supported layer; kernel () for linear layers."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features, ()
    if isinstance(base, nn.modules.conv._ConvNd):
        return base.in_channels // base.groups, base.out_channels, tuple(base.kernel_size)
    if is_transposed(base):
        n_in, n_out = base.weight.shape
        return n_in, n_out, ()
    raise TypeError(f"{type(base).__name__} is not a supported layer type (supported: {', '.join(WEIGHT_LAYERS)})")


def weight_op(base: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Run the base layer's own operation with another weight and no bias."""
    if isinstance(base, nn.Linear):
        return F.linear(x, weight)
    if isinstance(base, nn.modules.conv._ConvNd):
        return base._conv_forward(x, weight, None)
    if is_transposed(base):
        return x @ weight
    raise TypeError(f"{type(base).__name__} is not a supported layer type")


class Delta(nn.Module):
    """One adapter at one site. Subclasses define ``forward(base, x, out, weight)`` -> the new output.

    ``category`` is the survey's family (selective, additive, prompt, reparameterization, hybrid).
    ``config`` is the method config that built the delta (a plain attribute, not a module).
    """

    category = "reparameterization"
    mergeable = False
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

    def attach(self, host: "Host") -> None:
        """Called once the delta is placed in ``host``: state outside the module tree (a tokenizer) goes here."""

    def detach(self, host: "Host") -> None:
        """Called once the delta has left ``host``: undoes ``attach``."""

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


class Host(nn.Module):
    """Wraps one module; holds named deltas, the active weights and the fused set.

    ``active``: adapter name -> weight, the deltas run in forward (fused ones are skipped: they live in
    the base weights). ``merged``: adapter name -> weight it was fused with, in fuse order. ``enabled``
    switches every unfused delta off at once. ``backup``: adapter name -> copies of the base parameters
    taken just before an exact fuse, restored bit for bit when that adapter is unfused last-in first-out.
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        if isinstance(base, Host):
            raise TypeError("cannot wrap a Host in a Host")
        self.base = base
        self.deltas = nn.ModuleDict()
        self.active: dict[str, float] = {}
        self.merged: dict[str, float] = {}
        self.enabled = True
        self.backup: dict[str, dict[str, torch.Tensor]] = {}

    # The base layer's attributes that diffusers/transformers code reads from a layer directly.
    @property
    def weight(self):
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x, *args, **kwargs):
        if not self.enabled:
            return self._base(x, *args, **kwargs)
        if len(self.active) == 1 and not self.merged:  # the common case, without the general loop's overhead
            name, w = next(iter(self.active.items()))
            delta = self.deltas[name]
            if not delta.edits_input:
                out = None if args or kwargs else delta.whole(self.base, x, w)
                return delta(self.base, x, self.base(x, *args, **kwargs), w) if out is None else out
        run = [(self.deltas[name], w) for name, w in self.active.items() if name not in self.merged]
        base_x = x
        for delta, w in run:
            if delta.edits_input:
                base_x = delta.edit_input(self.base, base_x, w)
        out = self._base(base_x, *args, **kwargs)
        for delta, w in run:
            out = delta(self.base, x, out, w)
        return out

    def _base(self, x, *args, **kwargs):
        try:
            return self.base(x, *args, **kwargs)
        except IndexError as e:  # new-token ids with their adapter switched off (textual inversion, ED-LoRA)
            if not isinstance(self.base, nn.Embedding) or not self.deltas or not torch.is_tensor(x) or not x.numel():
                raise
            raise IndexError(f"token id {int(x.max())} is past the {self.base.num_embeddings} rows of the base "
                             f"embedding: ids past it are new tokens of adapter(s) {list(self.deltas)}, disabled or "
                             "inactive here. Enable the adapter or drop its tokens from the prompt.") from e

    def add(self, name: str, delta: Delta) -> None:
        if name in self.deltas:
            raise ValueError(f"adapter {name!r} already exists at {delta.site}")
        self.deltas[name] = delta
        self.active[name] = 1.0
        try:
            delta.attach(self)
        except BaseException:
            del self.deltas[name]
            self.active.pop(name)
            raise

    @torch.no_grad()
    def fuse(self, name: str, weight: float, exact: bool = False) -> None:
        if name in self.merged or self.deltas[name].runs_when_fused:
            return
        if exact:  # the parameters as they are before this fuse; valid while unfusing in reverse order
            self.backup[name] = {k: p.detach().clone() for k, p in self.base.named_parameters(recurse=False)}
        self.deltas[name].merge(self.base, weight)
        self.merged[name] = weight

    @torch.no_grad()
    def unfuse(self, name: str) -> None:
        order = list(self.merged)
        weight = self.merged.pop(name)
        saved = self.backup.pop(name, None)
        if saved is not None and order[-1] == name:
            for k, p in self.base.named_parameters(recurse=False):
                p.copy_(saved[k])
            return
        self.deltas[name].unmerge(self.base, weight)
        for later in order[order.index(name) + 1:]:  # their copies still hold this adapter's update
            self.backup.pop(later, None)

    def drop(self, name: str) -> None:
        if name in self.merged:
            self.unfuse(name)
        delta = self.deltas[name]
        del self.deltas[name]
        self.active.pop(name, None)
        delta.detach(self)

    def extra_repr(self) -> str:
        return f"active={self.active}, merged={list(self.merged)}, enabled={self.enabled}"
