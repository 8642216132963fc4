"""A linear layer and its LoRA update as one autograd node (Hu et al., arXiv 2106.09685, Eq. (3)).

Forward:  y = x W^T + b + (s x A^T) B^T   — the LoRA term accumulated into the base GEMM's output in place.
Backward, with g = dL/dy and h = s x A^T (kept from the forward):
    gh      = s g B
    dL/dx   = g W + gh A                 (one GEMM, then one accumulating GEMM: no separate sum of the
                                          base and LoRA paths' input gradients)
    dL/dA   = gh^T x,   dL/dB = g^T h,   dL/dW = g^T x,   dL/db = sum g   (each only when required)

The values are those of ``F.linear(x, W, b) + s * F.linear(F.linear(x, A), B)``; what changes is the work
around them. Autograd would record four to six nodes per site (base GEMM, two LoRA GEMMs, scale, add,
reshapes) and sum the two input gradients in a separate kernel; on the small, overhead-bound steps of a
diffusion U-Net's cross-attention that bookkeeping is a large part of what LoRA adds to a training step
(``bench/dreambooth_step.py``). Saved for backward: x (only when dL/dA or dL/dW is needed), W, A, B and h,
the same tensors autograd keeps for the unfused form, so memory is unchanged.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


class LoRALinear(torch.autograd.Function):
    """``LoRALinear.apply(x, W, b, A, B, s)``; b may be None. The rank-r intermediates are kept as (r, N)
    (h^T, gh^T): CPU BLAS runs these skinny products about twice as fast with the rank on the rows (measured
    at the embedded base's cross-attention shapes, see ``bench/README.md``), and the transposed views go into
    the other GEMMs without copies."""

    @staticmethod
    def forward(ctx, x, w, bias, a, b, scale: float):
        x2 = x.reshape(-1, x.shape[-1])
        ht = a @ x2.t()
        if scale != 1.0:
            ht = ht * scale
        out = torch.addmm(bias, x2, w.t()) if bias is not None else x2 @ w.t()
        out.addmm_(ht.t(), b.t())
        needs_x = ctx.needs_input_grad[1] or ctx.needs_input_grad[3]
        ctx.save_for_backward(x2 if needs_x else None, w, a, b, ht)
        ctx.scale, ctx.x_shape = scale, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x2, w, a, b, ht = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b, _ = ctx.needs_input_grad
        g2 = g.reshape(-1, g.shape[-1])
        gx = gw = gbias = ga = gb = None
        if need_x or need_a:
            ght = b.t() @ g2.t()
            if ctx.scale != 1.0:
                ght = ght * ctx.scale
            if need_x:
                gx = (g2 @ w).addmm_(ght.t(), a).view(ctx.x_shape)
            if need_a:
                ga = ght @ x2
        if need_b:
            gb = (ht @ g2).t()
        if need_w:
            gw = g2.t() @ x2
        if need_bias:
            gbias = g2.sum(0)
        return gx, gw, gbias, ga, gb, None
