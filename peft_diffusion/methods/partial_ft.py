"""Partial fine-tuning (layer freezing) — the selective baseline of the PEFT surveys (arXiv 2501.13787,
Sec. "selective"; e.g. Lee et al., "What Would Elsa Do? Freezing Layers During Transformer Fine-Tuning",
arXiv 1911.03090, which fine-tunes only the last blocks).

Chosen blocks or parameters train, everything else stays frozen: p' = p + d for each selected parameter p,
d dense and zero at init (so the adapted model starts bit-identical to the base), trained in place of p.
What trains is named by ``blocks`` (module paths: every parameter under them, e.g. ``("up_blocks.3",)`` or
``("encoder.layer.11",)``) and/or ``target`` (parameter patterns ``<module>.<parameter>``, e.g.
``Target(include=(r".*attn2\\.to_[kv]\\.weight",), types=())``, Custom Diffusion's key/value weights);
with both, a parameter must be under a block and match the target.

Trained: one dense delta per selected parameter (as many numbers as the parameter). Saved:
``<module>.<parameter>.delta``. Merges exactly (p += d).
"""
from __future__ import annotations

import dataclasses

from torch import nn

from ..registry import register_method
from ..target import Target
from .dense import DenseSelective

ANY_PARAMETER = Target(types=())


@register_method("partial-ft")
@dataclasses.dataclass
class PartialFT(DenseSelective):
    """Every parameter under ``blocks`` (module paths) and matching ``target`` (parameter patterns)."""

    blocks: tuple[str, ...] = ()

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.blocks, str):
            self.blocks = (self.blocks,)
        self.blocks = tuple(self.blocks)
        bad = [b for b in self.blocks if not isinstance(b, str) or not b or b != b.strip(".")]
        if bad:
            raise ValueError(f"PartialFT blocks are module paths such as 'up_blocks.3', got {bad}")

    def resolved(self, model: nn.Module) -> "PartialFT":
        if not self.blocks and self.target is None:
            raise ValueError("PartialFT needs what to train: blocks=('up_blocks.3', ...) (module paths) and/or "
                             "target=Target(include=(<parameter patterns>,), types=())")
        known = {n for n, _ in model.named_modules()}
        missing = [b for b in self.blocks if b not in known]
        if missing:
            raise ValueError(f"PartialFT blocks {missing} are not modules of this {type(model).__name__} "
                             f"(its top-level modules: {[n for n, _ in model.named_children()]})")
        return self if self.target is not None else dataclasses.replace(self, target=ANY_PARAMETER)

    def select(self, model: nn.Module) -> list[str]:
        found = super().select(model)
        if not self.blocks:
            return found
        return [q for q in found if any(q.startswith(b + ".") for b in self.blocks)]
