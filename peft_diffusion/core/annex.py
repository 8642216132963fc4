"""``Annex``: new modules beside any module (an attention block, a transformer block, a ResNet block, a whole
U-Net or transformers model), run by hooks on it.

The annex is a child of the annexed module under ``peft_annex`` (so ``.to()``, ``.parameters()`` and
optimizers see its deltas) and owns two hooks on it: a forward pre-hook that lets each active delta rewrite
the module's arguments (``AnnexDelta.pre``) and a forward hook that lets it rewrite the output
(``AnnexDelta.post``). The annexed module's own code, parameters, state_dict keys and diffusers' attention
processors are untouched; ``uninstall`` removes the hooks and the child, leaving the module exactly as before.
"""
from __future__ import annotations

from torch import nn

from .site import Site

__all__ = ["Annex", "unlink"]


class Annex(Site):
    """The annex of one module; holds named ``AnnexDelta``s (see ``Site`` for the shared bookkeeping)."""

    kind = "annex"
    ATTR = "peft_annex"

    def __init__(self, module: nn.Module):
        super().__init__()
        self.owner = (module,)  # a plain reference: the annexed module is our parent, not our child
        self.handles: list = []

    @classmethod
    def install(cls, module: nn.Module) -> "Annex":
        """The annex of ``module``, created and hooked on first use."""
        existing = module._modules.get(cls.ATTR)
        if isinstance(existing, Annex):
            return existing
        if existing is not None or hasattr(type(module), cls.ATTR):
            raise ValueError(f"{type(module).__name__} already has an attribute {cls.ATTR!r}")
        annex = cls(module).train(module.training)
        annex.handles = [module.register_forward_pre_hook(annex._pre, with_kwargs=True),
                         module.register_forward_hook(annex._post, with_kwargs=True)]
        module.add_module(cls.ATTR, annex)
        return annex

    def uninstall(self, parent: nn.Module, attr: str) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        delattr(parent, attr)

    def public_name(self, parent: str, attr: str) -> str:
        return parent  # the annexed module's own name ("" for a whole model)

    def fuse_target(self):
        return self.owner[0]

    def fused_tensors(self):
        ours = {id(p) for p in self.parameters()}
        return {k: p for k, p in self.owner[0].named_parameters() if id(p) not in ours}

    def _pre(self, module, args, kwargs):
        changed = False
        for delta, w in self.running():
            new = delta.pre(module, args, kwargs, w)
            if new is not None:
                args, kwargs = new
                changed = True
        return (args, kwargs) if changed else None

    def _post(self, module, args, kwargs, output):
        changed = False
        for delta, w in self.running():
            new = delta.post(module, args, kwargs, output, w)
            if new is not None:
                output, changed = new, True
        return output if changed else None


def unlink(links) -> None:
    """Take each (annex, delta) of ``links`` out of its annex (where ``remove`` has not already), uninstalling
    annexes left empty: what a delta that placed linked deltas in other modules' annexes (ED-LoRA's per-layer
    tokens, prefix tuning's per-layer keys/values) undoes when it leaves."""
    for annex, delta in links:
        name = next((n for n, d in annex.deltas.items() if d is delta), None)
        if name is not None:
            annex.drop(name)
        owner = annex.owner[0]
        if not annex.deltas and owner._modules.get(Annex.ATTR) is annex:
            annex.uninstall(owner, Annex.ATTR)
