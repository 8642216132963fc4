"""Kronecker-product math shared by LoKr, KronA and DiffuseKronA (``lokr.py``): LyCORIS' factor rule, and
y = x (W1 (x) W2)^T computed without building the out x in product W1 (x) W2; and Compacter's PHM weight
(``compacter.py``), a sum of Kronecker products with low-rank right factors (``kron_sum``).

With torch's row-major layout, x[n, i d + j] = X[n, i, j] (X[n]: c x d) and y[n, p b + q] = Y[n, p, q]
(Y[n]: a x b), so (W1 (x) W2) vec(X[n]) = vec(W1 X[n] W2^T). ``KronMatmul`` runs both products as single
large GEMMs on X' = X permuted to (c, N, d) and keeps only x and the factors for backward: the intermediate
(W1 X or X W2^T, as big as x) is recomputed there. Plain autograd on the same ops would keep it (or a copy
of it) per layer until backward, which for a U-Net's many tokens costs more memory than dW itself.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS' split of ``dim`` into (m, n), m <= n, m n = dim: (factor, dim / factor) sorted when factor
    divides dim, else the largest divisor m with m <= factor (-1: no bound) and m^2 <= dim."""
    if factor > 0 and dim % factor == 0:
        return min(factor, dim // factor), max(factor, dim // factor)
    bound = math.isqrt(dim) if factor < 0 else min(factor, math.isqrt(dim))
    m = max(d for d in range(1, bound + 1) if dim % d == 0)
    return m, dim // m


def _right(z, w2a, w2b):
    """z (..., d) -> z W2^T (..., b), W2 = w2a (full) or w2a w2b (rank r, never multiplied out)."""
    return F.linear(z, w2a) if w2b is None else F.linear(F.linear(z, w2b), w2a)


def _right_t(z, w2a, w2b):
    """z (..., b) -> z W2 (..., d)."""
    return z @ w2a if w2b is None else (z @ w2a) @ w2b


def _swap(t: torch.Tensor, n: int, p: int, q: int) -> torch.Tensor:
    """(n, p, q) -> (p, n, q) as a contiguous (p, n q) matrix."""
    return t.reshape(n, p, q).transpose(0, 1).reshape(p, n * q)


class KronMatmul(torch.autograd.Function):
    """kron_matmul(x, W1, W2a, W2b, w1_first) = x (W1 (x) W2)^T for x (..., c d), W1 (a, c), W2 (b, d) = W2a
    (W2b None) or W2a W2b. ``w1_first``: contract with W1 before W2 (cheaper for some factor shapes)."""

    @staticmethod
    def forward(ctx, x, w1, w2a, w2b, w1_first: bool):
        (a, c), b = w1.shape, w2a.shape[0]
        d = (w2a if w2b is None else w2b).shape[1]
        n = x.numel() // (c * d)
        xp = _swap(x, n, c, d)  # X' (c, N d)
        if w1_first:
            yp = _right((w1 @ xp).view(a * n, d), w2a, w2b)  # (W1 X') W2^T: (a N, b)
        else:
            yp = w1 @ _right(xp.view(c * n, d), w2a, w2b).view(c, n * b)  # W1 (X' W2^T): (a, N b)
        ctx.save_for_backward(x, w1, w2a, w2b)
        ctx.dims, ctx.w1_first = (n, a, b, c, d), w1_first
        y = yp.new_empty(*x.shape[:-1], a * b)  # a fresh tensor, not a view: callers may add into it in place
        y.view(n, a, b).copy_(yp.view(a, n, b).transpose(0, 1))
        return y

    @staticmethod
    def backward(ctx, g):
        x, w1, w2a, w2b = ctx.saved_tensors
        n, a, b, c, d = ctx.dims
        need_x, need_w1, need_w2 = ctx.needs_input_grad[0], ctx.needs_input_grad[1], any(ctx.needs_input_grad[2:4])
        gp, xp = _swap(g, n, a, b), _swap(x, n, c, d)  # G' (a, N b), X' (c, N d)
        gx = gw1 = gw2 = None
        if ctx.w1_first:  # Y' = (W1 X') W2^T
            p = _right_t(gp.view(a * n, b), w2a, w2b).view(a, n * d)  # G' W2: (a, N d)
            gx = w1.T @ p if need_x else None
            gw1 = p @ xp.T if need_w1 else None
            gw2 = gp.view(a * n, b).T @ (w1 @ xp).view(a * n, d) if need_w2 else None  # W1 X' recomputed
        else:  # Y' = W1 (X' W2^T)
            q = (w1.T @ gp).view(c * n, b)  # W1^T G': (c N, b)
            gx = _right_t(q, w2a, w2b) if need_x else None
            gw2 = q.T @ xp.view(c * n, d) if need_w2 else None
            if need_w1:  # X' W2^T recomputed
                gw1 = gp @ _right(xp.view(c * n, d), w2a, w2b).view(c, n * b).T
        gx = _swap(gx, c, n, d).view(x.shape) if gx is not None else None
        if w2b is None or gw2 is None:
            return gx, gw1, gw2, None, None
        return gx, gw1, gw2 @ w2b.T, w2a.T @ gw2, None


def kron_matmul(x, w1, w2a, w2b=None, w1_first: bool = False) -> torch.Tensor:
    return KronMatmul.apply(x, w1, w2a, w2b, w1_first)


def kron_sum(rules: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """The PHM weight W = sum_i A_i (x) (s_i t_i^T) (Compacter, arXiv 2106.04647, Eqs. 3 and 5) as one
    (a b, c d) matrix: rules A (n, a, c), left s (n, b, r), right t (n, d, r). Entry [p b + q, u d + v] is
    sum_i A_i[p, u] B_i[q, v] with B_i = s_i t_i^T, torch.kron's layout; nothing larger than W is formed."""
    blocks = left @ right.transpose(1, 2)  # B_i: (n, b, d)
    (n, a, c), b, d = rules.shape, blocks.shape[1], blocks.shape[2]
    return torch.einsum("iac,ibd->abcd", rules, blocks).reshape(a * b, c * d)
