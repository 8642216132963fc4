"""Binary masking — Zhao, Lin, Jaggi and Schütze, "Masking as an Efficient Alternative to Finetuning for
Pretrained Language Models", arXiv 2004.12406.

Instead of changing weights, learn which to keep (sec. 3): real-valued scores M_r, one per entry of W, give a
binary mask by a threshold, and the layer computes with the masked weight

    M = 1[M_r >= tau],   W' = W ⊙ M,

trained with the straight-through estimator: dL/dM_r := dL/dM = dL/dW' ⊙ W (``masks.binary_ste``). Scores
start at ``init_scale`` * tau (> tau: every entry kept, so the model starts as the base exactly); the paper's
defaults are tau = 5e-3 and scores starting at 2 tau (``init_scale`` 2). As a parameter delta,
W' = W + weight * W ⊙ (M - 1), so an adapter weight in (0, 1) interpolates towards the masked weight.

Trained: ``mask_scores`` (shaped like W). Saved: ``mask_scores`` (float; the binary mask is
``mask_scores >= threshold``), so a file is as large as a dense delta. Merges: the zeroed entries are
scaled by (1 - weight) in place and their original values kept (only those entries) so that unmerging
restores them exactly.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ..core import ParamDelta
from ..registry import register_method
from . import masks
from .sparse import SelectiveConfig


@register_method("masking")
@dataclasses.dataclass
class Masking(SelectiveConfig):
    """Learned binary masks on the selected weights: threshold ``threshold``, scores start at
    ``init_scale * threshold``. ``density`` is unused (every entry has a score)."""

    param_names = ("mask_scores",)

    density: float = 1.0
    threshold: float = 5e-3
    init_scale: float = 2.0

    def __post_init__(self):
        super().__post_init__()
        for key in ("threshold", "init_scale"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"Masking {key} must be a finite number, got {v!r}")
        if self.threshold * self.init_scale < self.threshold:
            raise ValueError("Masking init_scale * threshold must be >= threshold (every entry kept at init), got "
                             f"{self.init_scale} * {self.threshold}")

    def build(self, param: torch.Tensor, site: str, init: bool = True) -> "MaskingDelta":
        return MaskingDelta(self, site, param)


class MaskingDelta(ParamDelta):
    category = "selective"

    def __init__(self, config: Masking, site: str, param: torch.Tensor):
        super().__init__(config, site)
        start = float(config.threshold * config.init_scale)
        self.mask_scores = nn.Parameter(torch.full(param.shape, start, dtype=torch.float32, device=param.device))
        self._dropped: dict[float, tuple] = {}  # merge weight -> (flat indices, their values before the merge)

    def mask(self) -> torch.Tensor:
        return masks.binary_ste(self.mask_scores, self.config.threshold)

    def apply(self, param, weight):
        off = (self.mask() - 1).to(param.dtype)
        return param + param * (off * weight if weight != 1.0 else off)

    @torch.no_grad()
    def merge(self, param, weight):
        idx = (self.mask_scores < self.config.threshold).reshape(-1).nonzero().squeeze(1)
        flat = param.view(-1)
        self._dropped[weight] = (idx, flat[idx].clone())
        flat[idx] = flat[idx] * (1.0 - weight)

    @torch.no_grad()
    def unmerge(self, param, weight):
        if weight not in self._dropped:
            raise RuntimeError(f"Masking at {self.site} was not fused with weight {weight}")
        idx, kept = self._dropped.pop(weight)
        param.view(-1)[idx] = kept

    def fit_file(self, tensors: dict) -> None:
        t = tensors.get("mask_scores")
        if t is not None and t.is_floating_point() and torch.isnan(t).any():
            raise ValueError(f"{self.site}: {int(torch.isnan(t).sum())} mask scores are NaN")
