"""IncreLoRA — Zhang et al., "IncreLoRA: Incremental Parameter Allocation Method for Parameter-Efficient
Fine-tuning", arXiv 2308.12043.

What it adds over LoRA: ranks start small and grow during training where they matter, up to a total
budget. The update of a module is a sum of rank-1 components, dW = s * sum_{k active} b_k a_k^T. Its
importance is the sensitivity of dW (the paper's module score, as in its code):

    S = sum_ij |dW_ij * dL/d(dW)_ij| / sqrt(numel(dW)),

smoothed as in AdaLoRA: I <- b1 I + (1 - b1) S, U <- b2 U + (1 - b2) |S - I|, importance I * U. Every
``interval`` steps after ``warmup``, the ``top_h`` most important modules that still have room get ``grow``
new components each, until the adapter holds ``target_rank`` x (number of modules) components.

Kept fixed for the trainer's optimizer (it holds the parameters): each module preallocates ``max_r``
components (A: (max_r, in), B: (out, max_r)) and a ``rank_mask`` buffer selects the active ones (a prefix:
components are activated in order). A masked component contributes nothing and gets zero gradients. Under
AdamW a zero gradient leaves both moments at zero, so the update is 0 and decoupled weight decay shrinks the
slot's values (zeros stay zero: masked slots hold zeros until activated). When a slot is activated its a_k
gets LoRA's random init and b_k = 0, so growth does not change the output; its Adam moments start at zero
but the tensor's step count is shared (no bias correction left), so its first updates are about
(1 - 0.9) / sqrt(1 - 0.999) ~ 3x a fresh Adam's with AdamW's default betas (the paper restarts the LR
warm-up after each allocation; the schedule belongs to the trainer, so we don't).

Differences from the paper, for a plain LoRA-shaped adapter: components are LoRA pairs (b_k, a_k) rather
than the paper's SVD-like B diag(E) A, hence no "advance learning" of reserved components and no
orthogonality regulariser (the DreamBooth loss has no place for one); the scale is alpha / r with the
initial r, where the paper divides by the current rank (which would rescale learned components at growth).

Trained: A and B. Saved: ``lora_A.weight`` (max_r, in), ``lora_B.weight`` (out, max_r), ``rank_mask`` and
the smoothed scores ``score_avg`` / ``score_unc`` (so a resumed run grows as an uninterrupted one). We keep
every preallocated slot in the file: the trainer resumes from the same tensors, and masked slots are zeros
in training, so ``lora_A``/``lora_B`` are a plain rank-max_r LoRA with the adapter's output. Merges exactly.
Diffusers, kohya and LyCORIS files get the plain LoRA of the switched-on components (``as_lora``), with
per-module ranks.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import zlib
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from ..core import WeightDelta, weight_op
from ..registry import register_method
from ..target import lookup
from .lora import LoRA, LoRADelta, _positive_int

logger = logging.getLogger(__name__)


@register_method("increlora")
@dataclasses.dataclass
class IncreLoRA(LoRA):
    """LoRA whose ranks grow by importance. ``r`` / ``rank_pattern``: the starting ranks; ``max_r``: the
    components preallocated per module; ``target_rank``: the average rank at which growth stops."""

    param_names = LoRA.param_names + ("rank_mask", "score_avg", "score_unc")

    r: int = 2
    max_r: int = 12
    target_rank: int = 8
    interval: int = 20
    warmup: int = 100
    top_h: int = 8
    grow: int = 1
    beta1: float = 0.85
    beta2: float = 0.85

    def __post_init__(self):
        super().__post_init__()
        for key in ("max_r", "target_rank", "interval", "top_h", "grow"):
            if not _positive_int(getattr(self, key)):
                raise ValueError(f"IncreLoRA {key} must be a positive integer, got {getattr(self, key)!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"IncreLoRA warmup must be an integer >= 0, got {self.warmup!r}")
        too_big = {k: v for k, v in {"r": self.r, **self.rank_pattern}.items() if v > self.max_r}
        if too_big or self.target_rank > self.max_r:
            raise ValueError(f"IncreLoRA starting ranks and target_rank={self.target_rank} must be <= "
                             f"max_r={self.max_r}; too big: {too_big}")
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise ValueError(f"IncreLoRA beta1 and beta2 must be in (0, 1), got {self.beta1}, {self.beta2}")

    def initial_rank(self, site: str) -> int:
        return lookup(self.rank_pattern, site, self.r)

    def rank(self, site: str) -> int:
        return self.max_r  # what LoRADelta allocates

    def scale(self, site: str) -> float:
        r = self.initial_rank(site)
        alpha = lookup(self.alpha_pattern, site, self.r if self.alpha is None else self.alpha)
        return alpha / math.sqrt(r) if self.rslora else alpha / r

    def as_lora(self, sites: dict) -> tuple[dict, dict]:
        """The exact plain LoRA of each site: its switched-on components only (rank = their number; one zero
        component where none is on), the scale unchanged."""
        out, alphas = {}, {}
        for site, p in sites.items():
            on = p["rank_mask"].bool()
            if not on.any():
                on = torch.arange(on.numel(), device=on.device) == 0
                p = {"lora_A.weight": p["lora_A.weight"], "lora_B.weight": torch.zeros_like(p["lora_B.weight"])}
            out[site] = {"lora_A.weight": p["lora_A.weight"][on], "lora_B.weight": p["lora_B.weight"][:, on]}
            alphas[site] = self.scale(site) * int(on.sum())
        return out, alphas

    def build(self, base: nn.Module, site: str, init: bool = True) -> "IncreLoRADelta":
        return IncreLoRADelta(self, site, base, init)

    @torch.no_grad()
    def after_step(self, deltas: dict, step: int, total: int) -> None:
        """Smooth this step's sensitivities; every ``interval`` steps after ``warmup``, grow the top modules."""
        live = {q: d for q, d in deltas.items() if d.lora_B.weight.requires_grad}  # not loaded, frozen ones
        if not live:
            return
        scores = torch.stack([d.score_step for d in live.values()]).float()
        if dist.is_available() and dist.is_initialized():  # every process must pick the same modules
            dist.all_reduce(scores)
            scores /= dist.get_world_size()
        for d, s in zip(live.values(), scores):
            d.smooth(s)
        if step <= self.warmup or step % self.interval:
            return
        ranks = torch.stack([d.rank_mask.sum() for d in live.values()]).round().long().tolist()
        left = self.target_rank * len(live) - sum(ranks)
        importance = torch.stack([d.score_avg * d.score_unc for d in live.values()]).float().tolist()
        order = sorted((i for i, r in enumerate(ranks) if r < self.max_r), key=lambda i: -importance[i])
        names = list(live)
        for i in order[: self.top_h]:
            n = min(self.grow, self.max_r - ranks[i], left)
            if n <= 0:
                break
            live[names[i]].activate(n, step)
            left -= n
            logger.info("IncreLoRA step %d: %s rank %d -> %d (importance %.3g)", step, names[i], ranks[i],
                        ranks[i] + n, importance[i])
        for d in live.values():
            d.scoring = left > 0  # budget spent: stop paying for dW's gradient


class IncreLoRADelta(LoRADelta):
    def __init__(self, config: IncreLoRA, site: str, base: nn.Module, init: bool = True):
        super().__init__(config, site, base, init)
        a = self.lora_A.weight
        mask = torch.arange(config.max_r, device=a.device) < config.initial_rank(site)
        self.register_buffer("rank_mask", mask.to(a.dtype))
        self.register_buffer("score_avg", torch.zeros((), device=a.device))
        self.register_buffer("score_unc", torch.zeros((), device=a.device))
        # not in the state_dict, so not on "meta" when built for loading: it would never be replaced
        self.register_buffer("score_step", torch.zeros((), device=base.weight.device), persistent=False)
        # a fresh adapter measures sensitivities from its first step; a loaded one from its first allocation
        # step on (if it trains); off once the budget is spent
        self.scoring = init

    @torch.no_grad()
    def reset(self) -> None:
        super().reset()
        self.lora_A.weight[self.config.initial_rank(self.site):] = 0  # slots wait as zeros

    def delta_weight(self) -> torch.Tensor:
        a, b = self.lora_A.weight, self.lora_B.weight
        dw = ((b.flatten(1) * self.rank_mask) @ a.flatten(1)).view(b.shape[0], *a.shape[1:]) * self.scaling
        return dw.T if self.transposed else dw

    def forward(self, base, x, out, weight):
        if self.scoring and torch.is_grad_enabled():
            # through dW itself, so that a hook sees dL/d(dW) for the sensitivity (the paper's backward hook)
            dw = self.delta_weight()
            if dw.requires_grad:
                dw.register_hook(partial(self._sensitivity, dw.detach()))
            return out + weight * weight_op(base, self.dropout(x.to(dw.dtype)), dw).to(out.dtype)
        a = self.lora_A.weight
        h = self.lora_A(self.dropout(x.to(a.dtype)))
        mask = self.rank_mask.view(-1, *[1] * (a.dim() - 2))  # over h's channel dim (last for linear layers)
        return self.lora_B(h * (mask * (weight * self.scaling))).to(out.dtype).add_(out)

    def _sensitivity(self, dw: torch.Tensor, grad: torch.Tensor) -> None:
        # summed over the backward passes of one optimizer step (gradient accumulation)
        # (in float32: under fp16 autocast dW and its gradient are half, and the sum could overflow)
        self.score_step += (dw.float() * grad.float()).abs().sum() / math.sqrt(dw.numel())

    @torch.no_grad()
    def smooth(self, s: torch.Tensor) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        self.score_avg.mul_(b1).add_((1 - b1) * s)
        self.score_unc.mul_(b2).add_((1 - b2) * (s - self.score_avg).abs())
        self.score_step.zero_()

    @torch.no_grad()
    def activate(self, n: int, step: int) -> None:
        """Switch on the next ``n`` components: a_k drawn as LoRA draws A, b_k = 0 (the output is unchanged)."""
        a, b = self.lora_A.weight, self.lora_B.weight
        first = int(self.rank_mask.sum().round())
        for k in range(first, first + n):
            # seeded by site, step and slot, not the global RNG: every process draws the same values
            g = torch.Generator().manual_seed(zlib.crc32(f"{self.site}:{step}:{k}".encode()))
            if self.config.init == "gaussian":
                row = torch.randn(a[k].shape, generator=g) / a.shape[0]  # LoRA's N(0, 1/rows)
            else:  # kaiming-uniform with a = sqrt(5), as nn.Linear and LoRA: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
                row = (torch.rand(a[k].shape, generator=g) * 2 - 1) / math.sqrt(a[k].numel())
            a[k] = row.to(a.device, a.dtype)
            b[:, k] = 0
            self.rank_mask[k] = 1

    merge = WeightDelta.merge
    unmerge = WeightDelta.unmerge
