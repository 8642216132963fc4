"""Mask math shared by the masked / sparse selective methods (FISH, Child-Tuning, Diff pruning, LT-SFT,
binary masking): pure functions on tensors, no modules, no state.

A sparse delta of a parameter p is a pair (flat indices into p, values); the tensor a module computes with is
p + weight * scatter(values at indices), formed by one ``index_add`` over p's flat view, so no dense delta
tensor exists and gradients reach the values only (a gather of p's gradient at the indices).
"""
from __future__ import annotations

import math

import torch

__all__ = ["check_density", "entries", "index_dtype", "top_k", "sparse_apply", "sparse_add_", "check_sparse",
           "random_subset", "keep_threshold", "bernoulli_keep", "hard_concrete", "gated_diff", "hard_concrete_l0",
           "binary_ste"]

INT32_MAX = 2**31 - 1


def check_density(density, who: str) -> float:
    """``density`` as a float in (0, 1], or a ValueError naming ``who``."""
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ValueError(f"{who}: density must be a number in (0, 1], got {density!r}")
    return float(density)


def entries(numel: int, density: float) -> int:
    """How many of ``numel`` entries a mask of ``density`` keeps: round(density * numel), at least one."""
    return max(1, min(numel, int(round(density * numel))))


def index_dtype(numel: int) -> torch.dtype:
    """int32 where every flat index of a tensor of ``numel`` entries fits, else int64 (halves sparse files)."""
    return torch.int32 if numel - 1 <= INT32_MAX else torch.int64


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices of the ``k`` largest entries of ``scores``, ascending (ties: the lower index wins, so the
    choice is deterministic), as int64."""
    flat = scores.detach().reshape(-1).float()
    if not 0 < k <= flat.numel():
        raise ValueError(f"top_k: k={k} is outside 1..{flat.numel()}")
    # a stable descending sort keeps equal scores in index order (torch.topk's tie order is unspecified)
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    return torch.sort(order).values


def random_subset(numel: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` distinct flat indices below ``numel``, ascending, drawn with ``generator``."""
    return torch.sort(torch.randperm(numel, generator=generator)[:k]).values


def keep_threshold(p: float) -> tuple[int, int]:
    """(bits w, threshold k) of a Bernoulli(p) draw made by comparing w random bits, read as an integer u in
    [0, 2^w), with k: P(u < k) = k / 2^w. w is the fewest of 8, 16, 32 bits for which p 2^w is an integer (then
    k / 2^w = p exactly: 0.5, 0.25, 0.3125...), else 32 with k = round(p 2^32): within 2^-33 of p, finer than
    p's own float32 value (0.3: 1.2e-10 off). k = 2^w means every entry is kept."""
    for w in (8, 16, 32):
        if (p * 2**w).is_integer():
            return w, int(p * 2**w)
    return 32, max(1, round(p * 2**32))


# a w-bit view of random 64-bit words, and the offset that maps unsigned u in [0, 2^w) onto that view's values
_VIEWS = {8: (torch.uint8, 0), 16: (torch.int16, 2**15), 32: (torch.int32, 2**31)}


def bernoulli_keep(like: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """(keep, q): a tensor shaped and typed like ``like`` holding 1 with probability q and 0 otherwise, each
    entry independent, and q = k / 2^w, the exact keep probability (``keep_threshold``; q = p for dyadic p).

    Why not ``bernoulli_(p)``: on the CPU it costs one generator call and a float compare per entry (about 11 ns
    each, most of Child-Tuning_F's overhead on a large U-Net); here ``random_`` fills 64-bit words, each
    giving 64 / w entries their w bits, and one integer compare writes the mask (about 1-3 ns per entry).
    The draw uses torch's default generator of ``like``'s device, so ``torch.manual_seed`` fixes it."""
    w, k = keep_threshold(p)
    if k >= 2**w:
        return torch.ones_like(like), 1.0
    n = like.numel()
    words = torch.empty(-(-n * w // 64), dtype=torch.int64, device=like.device).random_(-2**63, None)  # all 64 bits
    view, offset = _VIEWS[w]
    u = words.view(view)[:n].view(like.shape)
    return torch.lt(u, k - offset, out=torch.empty_like(like, memory_format=torch.contiguous_format)), k / 2**w


def sparse_apply(p: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """p + weight * scatter(values at indices), out of place (differentiable in ``values``)."""
    v = values * weight if weight != 1.0 else values
    return p.reshape(-1).index_add(0, indices, v.to(p.dtype)).view_as(p)


@torch.no_grad()
def sparse_add_(p: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, weight: float) -> None:
    """p[indices] += weight * values in place (merge; ``weight`` < 0 unmerges), accumulated in float32."""
    flat = p.view(-1)
    flat[indices.long()] = (flat[indices.long()].float() + values.float() * weight).to(p.dtype)


def check_sparse(indices: torch.Tensor, values: torch.Tensor, numel: int, where: str) -> None:
    """ValueError naming ``where`` unless ``indices`` are distinct integer flat indices in [0, numel) and
    ``values`` finite floats of the same length (what a damaged or foreign file may break)."""
    if indices.is_floating_point() or indices.dtype == torch.bool or indices.dim() != 1:
        raise ValueError(f"{where}: indices must be a 1-D integer tensor, got {indices.dtype} {tuple(indices.shape)}")
    if values.dim() != 1 or values.numel() != indices.numel():
        raise ValueError(f"{where}: {values.numel()} values for {indices.numel()} indices")
    if indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= numel:
            raise ValueError(f"{where}: index {lo if lo < 0 else hi} is outside the parameter's {numel} entries")
        if torch.unique(indices).numel() != indices.numel():
            raise ValueError(f"{where}: indices repeat")
    if values.is_floating_point() and not torch.isfinite(values).all():
        raise ValueError(f"{where}: {int((~torch.isfinite(values)).sum())} values are not finite")


def hard_concrete(log_alpha: torch.Tensor, beta: float, left: float, right: float, sample: bool,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Hard-concrete gates z in [0, 1] (Louizos et al., arXiv 1712.01312, eq. 10-11).

    Sampled: u ~ U(0, 1), s = sigmoid((log u - log(1 - u) + log_alpha) / beta), z = clamp(s (r - l) + l, 0, 1).
    Not sampled (evaluation): z = clamp(sigmoid(log_alpha) (r - l) + l, 0, 1).
    """
    if sample:
        u = torch.rand(log_alpha.shape, generator=generator, device=log_alpha.device if generator is None else "cpu")
        u = u.to(log_alpha.device, log_alpha.dtype).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / beta)
    else:
        s = torch.sigmoid(log_alpha)
    return (s * (right - left) + left).clamp(0.0, 1.0)


class _GatedDiff(torch.autograd.Function):
    """base + weight * z ⊙ w with sampled hard-concrete gates z, in one node (``base`` None: weight * z ⊙ w):
    the gates are computed in place without autograd, only z and weight * dz/dlog_alpha are kept for the
    backward pass (the composed ops keep about ten tensors), and the frozen parameter is added in the same pass
    as the product (one ``addcmul``: no separate z ⊙ w tensor, no extra add node)."""

    @staticmethod
    def forward(ctx, w, log_alpha, base, weight, beta, left, right):
        with torch.no_grad():
            # logit with eps clamps u to [1e-6, 1 - 1e-6] first (as hard_concrete does), in the same pass
            s = torch.rand(log_alpha.shape, device=log_alpha.device, dtype=log_alpha.dtype).logit_(1e-6)
            s.add_(log_alpha)
            if beta != 1.0:
                s.div_(beta)
            s.sigmoid_()
            z = torch.mul(s, right - left).add_(left)
            # dz/dlog_alpha = (r - l) / beta * s (1 - s) where the clamp lets z through (0 < z < 1), else 0; one
            # scratch tensor holds 1 - s, then each side's 0/1 mask (comparisons written into floats: a bool
            # mask costs a slow bool-to-float multiply): the forward allocates s, z and that scratch only (fresh
            # memory is paid in page faults on a large U-Net)
            scratch = 1 - s
            s.mul_(scratch).mul_(torch.gt(z, 0, out=scratch)).mul_(torch.lt(z, 1, out=scratch))
            dz = s.mul_((right - left) / beta * weight)  # weight * dz/dlog_alpha, in s's memory
            del scratch
            z.clamp_(0.0, 1.0)
        ctx.save_for_backward(w, z, dz)
        ctx.weight = weight
        if base is None:
            return z * w if weight == 1.0 else (z * w).mul_(weight)
        return torch.addcmul(base, z, w, value=weight)

    @staticmethod
    def backward(ctx, grad):
        w, z, dz = ctx.saved_tensors
        gw = ga = None
        if ctx.needs_input_grad[0]:
            gw = grad * z if ctx.weight == 1.0 else (grad * z).mul_(ctx.weight)
        if ctx.needs_input_grad[1]:
            ga = (grad * w).mul_(dz)
        return gw, ga, grad if ctx.needs_input_grad[2] else None, None, None, None, None


def gated_diff(w: torch.Tensor, log_alpha: torch.Tensor, beta: float, left: float, right: float,
               sample: bool, base: torch.Tensor | None = None, weight: float = 1.0) -> torch.Tensor:
    """weight * z ⊙ w with hard-concrete gates z (``hard_concrete``), plus ``base`` when given (the parameter a
    module computes with: base + weight * z ⊙ w); sampled gates go through one fused autograd node."""
    if sample:
        return _GatedDiff.apply(w, log_alpha, base, float(weight), float(beta), float(left), float(right))
    out = hard_concrete(log_alpha, beta, left, right, False) * w
    out = out if weight == 1.0 else out * weight
    return out if base is None else base + out


def hard_concrete_l0(log_alpha: torch.Tensor, beta: float, left: float, right: float) -> torch.Tensor:
    """The expected number of non-zero gates, sum sigmoid(log_alpha - beta log(-l / r)) (ibid., eq. 12)."""
    return torch.sigmoid(log_alpha - beta * math.log(-left / right)).sum()


def binary_ste(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """1[scores >= threshold] forward, identity backward (the straight-through estimator): the gradient
    reaching the binary mask is passed to the real-valued scores unchanged."""
    hard = (scores >= threshold).to(scores.dtype)
    return hard + (scores - scores.detach())
