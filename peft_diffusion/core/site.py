"""What the three kinds of site share: named deltas, the active weights, what is fused, on/off.

A site is the only structural change peft-diffusion makes to a model, and each kind undoes itself exactly
(``uninstall``): module tree, state_dict keys, attention processors and hooks as they were.

- ``Host`` (``host.py``) wraps one leaf layer (Linear, Conv, Embedding): weight deltas, token rows.
- ``Annex`` (``annex.py``) sits beside any module, owns new modules and the hooks that run them.
- ``ParamSite`` (``param_site.py``) changes one named parameter or buffer of a module.
"""
from __future__ import annotations

import torch
from torch import nn

from .delta import Delta

__all__ = ["Site"]


class Site(nn.Module):
    """Named deltas at one place of a model.

    ``active``: adapter name -> weight, the deltas that run (fused ones are skipped: they live in the base
    tensors). ``merged``: adapter name -> the weight it was fused with, in fuse order. ``enabled`` switches
    every unfused delta off at once. ``backup``: adapter name -> copies of the tensors an exact fuse changes,
    restored bit for bit when that adapter is unfused last-in first-out.
    """

    kind = ""

    def __init__(self):
        super().__init__()
        self.deltas = nn.ModuleDict()
        self.active: dict[str, float] = {}
        self.merged: dict[str, float] = {}
        self.enabled = True
        self.backup: dict[str, dict[str, torch.Tensor]] = {}

    # ---- what a kind defines
    def fuse_target(self):
        """What ``Delta.merge`` / ``unmerge`` change in place (the layer, the annexed module, the parameter)."""
        raise TypeError(f"{type(self).__name__} defines no fuse target")

    def fused_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors a fuse changes, by name (copied for an exact fuse)."""
        return {}

    def public_name(self, parent: str, attr: str) -> str:
        """The site's name in files and APIs, given its parent's module path and its attribute name there."""
        return f"{parent}.{attr}" if parent else attr

    def uninstall(self, parent: nn.Module, attr: str) -> None:
        """Take the site out of ``parent`` (where it is attribute ``attr``), restoring what it changed."""
        raise TypeError(f"{type(self).__name__} defines no uninstall")

    # ---- the shared lifecycle
    def running(self) -> list[tuple[Delta, float]]:
        """(delta, weight) of the active, unfused deltas, in activation order; none when disabled."""
        if not self.enabled:
            return []
        return [(self.deltas[n], w) for n, w in self.active.items() if n not in self.merged]

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
        delta = self.deltas[name]
        if name in self.merged or delta.runs_when_fused:
            return
        if exact:  # the tensors as they are before this fuse; valid while unfusing in reverse order
            self.backup[name] = {k: t.detach().clone() for k, t in self.fused_tensors().items()}
        delta.merge(self.fuse_target(), weight)
        self.merged[name] = weight

    @torch.no_grad()
    def unfuse(self, name: str) -> None:
        order = list(self.merged)
        weight = self.merged.pop(name)
        saved = self.backup.pop(name, None)
        if saved is not None and order[-1] == name:
            for k, t in self.fused_tensors().items():
                t.copy_(saved[k])
            return
        self.deltas[name].unmerge(self.fuse_target(), weight)
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
