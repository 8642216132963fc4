"""``Host``: the site around one leaf layer (Linear, Conv, Embedding), for weight deltas and token rows.

A ``Host`` keeps the original layer as ``host.base`` and runs each active, unfused delta after it
(``out = delta(base, x, out, weight)``); removing the last delta puts the original layer back, so the module
tree and the state_dict keys are exactly as before.
"""
from __future__ import annotations

import torch
from torch import nn

from .site import Site

__all__ = ["Host"]


class Host(Site):
    """Wraps one layer; holds named deltas (see ``Site`` for the active / merged / enabled bookkeeping)."""

    kind = "host"

    def __init__(self, base: nn.Module):
        super().__init__()
        if isinstance(base, Site):
            raise TypeError(f"cannot wrap a {type(base).__name__} in a Host")
        self.base = base

    def fuse_target(self):
        return self.base

    def fused_tensors(self):
        return dict(self.base.named_parameters(recurse=False))

    def uninstall(self, parent: nn.Module, attr: str) -> None:
        setattr(parent, attr, self.base)

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
