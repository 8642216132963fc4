"""Delta-LoRA — Zi et al., "Delta-LoRA: Fine-Tuning High-Rank Parameters with the Delta of Low-Rank
Matrices", arXiv 2309.02411.

What it adds over LoRA: the frozen weight learns too, without gradients or optimizer state of its own.
After each optimizer step t past a start step K, the paper (Algorithm 1) moves W by the change of the
low-rank product that step made,

    W(t+1) = W(t) + lambda * (s B(t+1) A(t+1) - s B(t) A(t)),      h = W(t) x + s B(t) A(t) x,

with update ratio lambda, and removes dropout from the LoRA path so that dL/dW equals dL/d(BA).
The sum telescopes: for t > K, W(t) = W0 + lambda s (B(t) A(t) - B_K A_K), with B_K A_K the factors after
step K. We keep exactly that: W is never written while training; the delta adds
lambda s (B A - B_K A_K) x to the output, detached (the paper's W gets no gradient), and ``after_step``
keeps the snapshot (``lora_A_K``, ``lora_B_K``) equal to the current factors until step K, so the term is
zero until then and afterwards holds the paper's accumulated update exactly. This form is exact in float
(a base in fp16 would round per-step updates of size lr away), makes the saved file reproduce the trained
model, and leaves W0 untouched, so ``remove`` restores it bit for bit without a backup. (Resuming from a
trainer checkpoint is exact; a loaded file trained on in a *new* run from step 1 re-snapshots up to its K,
which drops its earlier update of W unless its start_step is 0.)

Trained: A and B (the update of W follows them). Saved: ``lora_A.weight``, ``lora_B.weight`` and the
snapshot ``lora_A_K``, ``lora_B_K``. Merges exactly: dW = s ((1 + lambda) B A - lambda B_K A_K), which is a
plain LoRA of rank 2r, B' = [(1 + lambda) B, -lambda B_K], A' = [A; A_K] (rank r while the snapshot equals the
factors): the form written to diffusers, kohya and LyCORIS files (``as_lora``).
"""
from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..core import WeightDelta
from ..registry import register_method
from .lora import LoRA, LoRADelta

logger = logging.getLogger(__name__)


@register_method("delta-lora")
@dataclasses.dataclass
class DeltaLoRA(LoRA):
    """LoRA whose frozen weight follows the low-rank product's updates.

    update_ratio: the paper's lambda. start_step: the paper's K, the optimizer steps before W starts moving
    (the first change of W is the one step K + 1 makes to s B A).
    """

    param_names = LoRA.param_names + ("lora_A_K", "lora_B_K")

    update_ratio: float = 2.0
    start_step: int = 500

    def __post_init__(self):
        super().__post_init__()
        if self.dropout:
            raise ValueError(f"Delta-LoRA needs dropout=0 (the paper removes it so that dL/dW = dL/d(BA)), "
                             f"got {self.dropout}")
        if isinstance(self.update_ratio, bool) or not isinstance(self.update_ratio, (int, float)):
            raise ValueError(f"Delta-LoRA update_ratio must be a number, got {self.update_ratio!r}")
        if isinstance(self.start_step, bool) or not isinstance(self.start_step, int) or self.start_step < 0:
            raise ValueError(f"Delta-LoRA start_step must be an integer >= 0, got {self.start_step!r}")

    def build(self, base: nn.Module, site: str, init: bool = True) -> "DeltaLoRADelta":
        return DeltaLoRADelta(self, site, base, init)

    def as_lora(self, sites: dict) -> tuple[dict, dict]:
        """The exact plain LoRA of each site: rank 2r, B' = [(1 + lambda) B, -lambda B_K], A' = [A; A_K] (the
        scale unchanged); rank r (A, B) while the snapshot still equals the factors."""
        out, alphas = {}, {}
        for site, p in sites.items():
            a, b, ak, bk = p["lora_A.weight"], p["lora_B.weight"], p["lora_A_K"], p["lora_B_K"]
            if not (torch.equal(a, ak) and torch.equal(b, bk)):
                lam = float(self.update_ratio)
                a, b = torch.cat([a, ak]), torch.cat([(1 + lam) * b, -lam * bk], dim=1)
            out[site] = {"lora_A.weight": a, "lora_B.weight": b}
            alphas[site] = self.scale(site) * a.shape[0]
        return out, alphas

    @torch.no_grad()
    def after_step(self, deltas: dict, step: int, total: int) -> None:
        """Until step K the snapshot follows the factors (W does not move); after it, W(t) - W0 is implicit."""
        if step == 1 and total <= self.start_step:
            logger.warning("Delta-LoRA: start_step=%d >= the %d training steps, W is never updated (plain LoRA)",
                           self.start_step, total)
        if step <= self.start_step:
            for delta in deltas.values():
                if delta.lora_B.weight.requires_grad:  # a loaded, frozen adapter keeps its update of W
                    delta.snapshot()


class DeltaLoRADelta(LoRADelta):
    def __init__(self, config: DeltaLoRA, site: str, base: nn.Module, init: bool = True):
        super().__init__(config, site, base, init)
        self.update_ratio = float(config.update_ratio)
        # B_K A_K starts as the initial factors, so the update term is zero (identity at init) until K
        self.register_buffer("lora_A_K", self.lora_A.weight.detach().clone())
        self.register_buffer("lora_B_K", self.lora_B.weight.detach().clone())

    @torch.no_grad()
    def snapshot(self) -> None:
        self.lora_A_K.copy_(self.lora_A.weight)
        self.lora_B_K.copy_(self.lora_B.weight)

    def _low_rank(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """B (A x) with the layer kinds of lora_A / lora_B (a conv with the base kernel, then 1x1)."""
        if isinstance(self.lora_A, nn.Linear):
            return F.linear(F.linear(x, a), b)
        return self.lora_B._conv_forward(self.lora_A._conv_forward(x, a, None), b, None)

    def forward(self, base, x, out, weight):
        x = x.to(self.lora_A.weight.dtype)
        y = self._low_rank(x, self.lora_A.weight, self.lora_B.weight)
        # value s ((1 + lambda) B A x - lambda B_K A_K x), gradient through s B A x only: W(t) is not trained
        moved = y.detach() - self._low_rank(x, self.lora_A_K, self.lora_B_K)  # (W(t) - W0) x / (lambda s)
        return out + ((weight * self.scaling) * (y + self.update_ratio * moved)).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        a, b = self.lora_A.weight, self.lora_B.weight
        ak, bk = self.lora_A_K, self.lora_B_K
        r = self.update_ratio
        dw = ((1 + r) * b.flatten(1) @ a.flatten(1) - r * bk.flatten(1) @ ak.flatten(1)) * self.scaling
        dw = dw.view(b.shape[0], *a.shape[1:])
        return dw.T if self.transposed else dw

    # LoRA's in-place merge adds s B A only; the snapshot term must go in too
    merge = WeightDelta.merge
    unmerge = WeightDelta.unmerge
