"""Per-call inputs: what a method needs beyond its module's own arguments (an image prompt's embeddings, a
condition's features, a region mask), given for the duration of one or more pipeline calls.

``pd.inputs(pipe, image_embeds=...)`` (``api.inputs``) enters a context; an annex delta asks
``lookup("image_embeds", module)`` while its module runs. Contexts nest (the inner one wins for the names it
gives, the outer ones stay visible) and are scoped to the models they were given, so two pipelines in one
process do not see each other's inputs. A ``contextvars`` variable keeps them apart across threads and
asyncio tasks. ``fit_batch`` lines a tensor up with the batch a module sees, e.g. classifier-free guidance's
[negative; positive] concatenation.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch
from torch import nn

__all__ = ["given", "lookup", "fit_batch"]

# innermost last: (_Scope of the models it covers, {name: value})
_STACK: contextvars.ContextVar[tuple] = contextvars.ContextVar("peft_diffusion_inputs", default=())
_MISSING = object()


class _Scope:
    """The modules of the given models. The models themselves answer at once (the U-Net an adapter's hook asks
    about is usually one of them); any other module is looked up in the set of every submodule, built on the
    first such question, so entering a context costs no walk of the models."""

    __slots__ = ("models", "roots", "_every")

    def __init__(self, models: list[nn.Module]):
        self.models = tuple(models)
        self.roots = frozenset(id(m) for m in self.models)
        self._every = None

    def __contains__(self, module: nn.Module) -> bool:
        if id(module) in self.roots:
            return True
        if self._every is None:
            self._every = frozenset(id(m) for model in self.models for m in model.modules())
        return id(module) in self._every


@contextlib.contextmanager
def given(models: list[nn.Module], named: dict):
    token = _STACK.set(_STACK.get() + ((_Scope(models), dict(named)),))
    try:
        yield
    finally:
        _STACK.reset(token)


def lookup(name: str, module: nn.Module, default=_MISSING):
    """The innermost value of ``name`` given for a model that holds ``module``; ``default`` (or a KeyError
    naming what is given) when none is."""
    for covered, named in reversed(_STACK.get()):
        if name in named and module in covered:
            return named[name]
    if default is not _MISSING:
        return default
    given_now = sorted({n for covered, named in _STACK.get() if module in covered for n in named})
    raise KeyError(f"per-call input {name!r} is not given for {type(module).__name__} (given: {given_now}): "
                   f"call the model inside `with peft_diffusion.inputs(pipe, {name}=...)`")


def fit_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    """``t`` with its first dimension made ``batch``: as it is, or tiled when it divides ``batch`` (the copies
    a pipeline makes: classifier-free guidance's [negative; positive], images per prompt)."""
    n = t.shape[0]
    if n == batch:
        return t
    if n and batch % n == 0:
        return t.repeat(batch // n, *[1] * (t.dim() - 1))
    raise ValueError(f"a per-call input with batch {n} cannot serve a batch of {batch}")
