"""AdaMix — Wang et al., "AdaMix: Mixture-of-Adaptations for Parameter-efficient Model Tuning", arXiv 2205.12410.

A bottleneck adapter h <- h + f(h W_down_i + b_down_i) W_up_j + b_up_j whose projections are mixtures of M
"adaptation modules" (Sec. 3): M down-projections and M up-projections per placement. Training routes
stochastically: every forward pass of every adapter draws one down-projection i and one up-projection j
uniformly and independently (torch's global generator: ``torch.manual_seed`` makes a run repeatable), so the
whole batch goes through that pair. Inference uses "adaptation merging": the down-projections and the
up-projections are each averaged (W = (1/M) sum_i W_i, biases alike) into ONE adapter, so an eval pass is
deterministic and costs what one bottleneck adapter costs. In eval mode the averaged weights are used on
every call; ``merge_experts(model)`` makes it permanent by swapping each mixture for a plain bottleneck adapter
(``houlsby.py``/``pfeiffer.py``'s delta, saved and loaded as that method) holding the averages.

Consistency regularisation (Sec. 3): two stochastic passes of the same batch should agree; the paper adds
(lambda / 2) (KL(p1 || p2) + KL(p2 || p1)) to the task loss. ``consistency_loss(out1, out2)`` computes it (each
KL with the other pass as a fixed target, as the published code does); ``kind="mse"`` is its analogue for
regression outputs such as a denoiser's noise prediction. Usage, in train mode::

    out1, out2 = model(**batch).logits, model(**batch).logits   # two independent routes
    loss = task_loss(out1) + lam * consistency_loss(out1, out2)

Placement: one mixture after the feed-forward sub-layer of each block, before the block's residual (and BERT's
LayerNorm): where the published code puts it (``BertOutput`` / ``RobertaOutput`` after ``dense``, GPT-2's MLP
after ``c_proj``), i.e. Pfeiffer's placement, and what the paper's BERT-base count (0.89 M: 12 adapters of
size 48) adds up to. ``attention=True`` adds one after the attention sub-layer too (Houlsby's placement).
Placement per model and the serial residual come from ``bottleneck.py``.

Init: the M modules of a projection start as copies of one ``nn.Linear`` init (the published code deep-copies
one module), so averaging combines modules that left one starting point; the up-projections start at zero,
so the model starts bit-exact. ``share_up`` / ``share_down``: one up- (down-) projection for all routes; the
released GLUE scripts use share_up (the default here). Activation: gelu (the published code's).

Trained: per adapter the stacked projections. Saved: ``<sub-layer>.adapter_down.weight`` (M_down, m, d),
``.adapter_down.bias`` (M_down, m), ``.adapter_up.weight`` (M_up, d, m), ``.adapter_up.bias`` (M_up, d). Not
mergeable into the base weights (a nonlinearity sits between the projections): ``pd.fuse(pipe)`` leaves it
running and ``pd.fuse(pipe, [name])`` refuses.

Counts (tests/test_adamix.py, BERT-base on the meta device, size 48, M = 4, share_up): 2,223,360 trained;
894,528 after ``merge_experts`` (the paper's 0.89 M), equal to a Pfeiffer adapter of size 48.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core import Annex
from ..registry import register_method
from .bottleneck import Bottleneck, BottleneckDelta
from .houlsby import Houlsby
from .pfeiffer import Pfeiffer


class MixtureLinear(nn.Module):
    """M linear maps x W_i^T + b_i (``weight`` (M, out, in), ``bias`` (M, out)): in training each call uses
    one drawn uniformly; in eval the average of the M."""

    def __init__(self, d_in: int, d_out: int, experts: int, device, dtype, init: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, d_out, d_in, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(experts, d_out, device=device, dtype=dtype))
        if init:
            one = nn.Linear(d_in, d_out, device=device, dtype=dtype)
            with torch.no_grad():
                self.weight.copy_(one.weight.expand_as(self.weight))
                self.bias.copy_(one.bias.expand_as(self.bias))

    def averaged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the merged module: the mean over the M modules."""
        return self.weight.mean(0), self.bias.mean(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and len(self.weight) > 1:
            i = int(torch.randint(len(self.weight), (1,)))
            return F.linear(x, self.weight[i], self.bias[i])
        return F.linear(x, *self.averaged())


class AdaMixDelta(BottleneckDelta):
    """One AdaMix mixture beside one sub-layer: ``BottleneckDelta`` with mixture projections."""

    def projection(self, d_in, d_out, device, dtype, init):
        cfg = self.config
        # called for the down-projection first (``adapter_down`` is not set yet), then the up-projection
        up = "adapter_down" in self._modules
        experts = 1 if (cfg.share_up if up else cfg.share_down) else cfg.num_experts
        return MixtureLinear(d_in, d_out, experts, device, dtype, init)

    def merged(self, module: nn.Module) -> BottleneckDelta:
        """The plain bottleneck adapter (Houlsby's or Pfeiffer's config) holding the averaged projections;
        ``module`` is the sub-layer this mixture sits beside."""
        cfg = self.config
        plain = (Houlsby if cfg.attention else Pfeiffer)(size=self.adapter_down.weight.shape[1],
                                                          activation=cfg.activation, target=cfg.target)
        delta = BottleneckDelta(plain, self.site, module, init=False)
        with torch.no_grad():
            (wd, bd), (wu, bu) = self.adapter_down.averaged(), self.adapter_up.averaged()
            state = {"adapter_down.weight": wd, "adapter_down.bias": bd, "adapter_up.weight": wu,
                     "adapter_up.bias": bu}
            delta.load_state_dict({k: v.detach().clone() for k, v in state.items()}, assign=True)
        return delta.requires_grad_(self.adapter_down.weight.requires_grad).train(self.training)


@register_method("adamix")
@dataclasses.dataclass
class AdaMix(Bottleneck):
    """Mixture-of-adaptations bottleneck adapters. num_experts: M; share_up / share_down: one up- (down-)
    projection for every route; attention: also after the attention sub-layer (Houlsby's placement; default:
    after the feed-forward sub-layer only); reduction, size, activation (default gelu), target: as
    ``Bottleneck``."""

    delta_class: ClassVar[type] = AdaMixDelta

    activation: str = "gelu"
    num_experts: int = 4
    share_up: bool = True
    share_down: bool = False
    attention: bool = False

    def __post_init__(self):
        super().__post_init__()
        n = self.num_experts
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"AdaMix num_experts must be a positive integer, got {n!r}")
        for f in ("share_up", "share_down", "attention"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"AdaMix {f} must be True or False, got {getattr(self, f)!r}")

    @property
    def roles(self) -> tuple[str, ...]:
        return ("attn", "ffn") if self.attention else ("ffn",)


def merge_experts(obj, name: str | None = None) -> int:
    """Replace every AdaMix mixture of adapter ``name`` (default: every AdaMix adapter) in ``obj`` (a model or
    pipeline) by one bottleneck adapter holding its averaged projections (the paper's inference model); the
    adapter keeps its name and weight and from then on saves, loads and counts as ``pfeiffer`` (``houlsby``
    with ``attention=True``). Returns how many mixtures were merged."""
    from ..api import sites  # api sits above the methods

    count = 0
    for _, site in sites(obj):
        if not isinstance(site, Annex):
            continue
        for n, delta in list(site.deltas.items()):
            if isinstance(delta, AdaMixDelta) and name in (None, n):
                site.deltas[n] = delta.merged(site.owner[0])
                count += 1
    if name is not None and not count:
        raise ValueError(f"no AdaMix adapter named {name!r} in {type(obj).__name__}")
    return count


def consistency_loss(out1: torch.Tensor, out2: torch.Tensor, kind: str = "kl",
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """AdaMix's consistency term between the outputs of two stochastic passes over one batch.

    ``kind="kl"`` (the paper's, for logits over the last dimension): 1/2 (KL(p2 || p1) + KL(p1 || p2)), each KL
    with the other pass detached as its target, summed over classes and averaged over rows (every position of
    a sequence is a row; ``mask``, shaped like the outputs without their last dimension, keeps the rows where
    it is true). ``kind="mse"``: the mean squared difference, for regression outputs (a noise prediction)."""
    if out1.shape != out2.shape:
        raise ValueError(f"consistency_loss needs two outputs of one shape, got {tuple(out1.shape)} and "
                         f"{tuple(out2.shape)}")
    if kind == "mse":
        if mask is not None:
            raise ValueError("consistency_loss kind='mse' takes no mask")
        return F.mse_loss(out1.float(), out2.float())
    if kind != "kl":
        raise ValueError(f"consistency_loss kind must be 'kl' or 'mse', got {kind!r}")
    a, b = out1.float().reshape(-1, out1.shape[-1]), out2.float().reshape(-1, out2.shape[-1])
    if mask is not None:
        if tuple(mask.shape) != tuple(out1.shape[:-1]):
            raise ValueError(f"consistency_loss mask has shape {tuple(mask.shape)}; the outputs need "
                             f"{tuple(out1.shape[:-1])}")
        keep = mask.reshape(-1).bool()
        a, b = a[keep], b[keep]
    kl = F.kl_div(F.log_softmax(a, -1), F.softmax(b.detach(), -1), reduction="batchmean") + \
        F.kl_div(F.log_softmax(b, -1), F.softmax(a.detach(), -1), reduction="batchmean")
    return 0.5 * kl
