"""``ParamSite``: deltas on one named parameter (or buffer) of a module — biases, norm weights, class or
position embeddings, masked entries of a weight (the selective family).

The site is a child of the module that owns the parameter, under ``peft_param_<name>``. While the module
runs, ``module.<name>`` reads p' = p + sum of weight * delta (each ``ParamDelta.apply``): a forward pre-hook
puts p' in the module's instance ``__dict__``, which Python's attribute lookup finds before ``nn.Module``'s
parameter table, and a forward hook (``always_call``: also when forward raises) takes it out again. So the
frozen parameter is never copied into the model or changed: ``_parameters``, the state_dict keys and values
stay as they were, and gradients reach only the delta. ``fuse`` adds in place (``ParamDelta.merge``).

Only code that reads the parameter while its own module runs sees the delta (a weight tied to another
module, e.g. an LM head sharing the token embedding, keeps the base values there).
"""
from __future__ import annotations

import torch
from torch import nn

from .site import Site

__all__ = ["ParamSite", "PREFIX"]

PREFIX = "peft_param_"


class ParamSite(Site):
    """The deltas of parameter ``name`` of one module (see ``Site`` for the shared bookkeeping)."""

    kind = "param"

    def __init__(self, module: nn.Module, name: str):
        super().__init__()
        self.owner = (module,)  # a plain reference: the module is our parent
        self.name = name
        self.handles: list = []

    @staticmethod
    def tensor_of(module: nn.Module, name: str) -> torch.Tensor | None:
        """Parameter or buffer ``name`` of ``module`` itself (not of a submodule); None when it has none."""
        found = module._parameters.get(name)
        return module._buffers.get(name) if found is None else found

    @classmethod
    def install(cls, module: nn.Module, name: str) -> "ParamSite":
        attr = PREFIX + name
        existing = module._modules.get(attr)
        if isinstance(existing, ParamSite):
            return existing
        if cls.tensor_of(module, name) is None:
            raise ValueError(f"{type(module).__name__} has no parameter or buffer {name!r}")
        site = cls(module, name).train(module.training)
        site.handles = [module.register_forward_pre_hook(site._pre),
                        module.register_forward_hook(site._post, always_call=True)]
        module.add_module(attr, site)
        return site

    def uninstall(self, parent: nn.Module, attr: str) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        parent.__dict__.pop(self.name, None)
        delattr(parent, attr)

    def public_name(self, parent: str, attr: str) -> str:
        return f"{parent}.{self.name}" if parent else self.name

    @property
    def tensor(self) -> torch.Tensor:
        return self.tensor_of(self.owner[0], self.name)

    def fuse_target(self):
        return self.tensor

    def fused_tensors(self):
        return {self.name: self.tensor}

    def effective(self) -> torch.Tensor:
        """The tensor the module computes with now (the base one when nothing runs)."""
        p = self.tensor
        for delta, w in self.running():
            p = delta.apply(p, w)
        return p

    def _pre(self, module, args):
        run = self.running()
        if run:
            module.__dict__[self.name] = self.effective()
        else:
            module.__dict__.pop(self.name, None)

    def _post(self, module, args, output):
        module.__dict__.pop(self.name, None)
