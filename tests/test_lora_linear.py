"""LoRA on a plain nn.Linear runs as one autograd node (``methods/lora_linear.py``): same values and gradients
as the unfused form, and the unfused form wherever something else must see the base layer run."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tiny
from peft_diffusion import LoRA, inject, set_adapters
from peft_diffusion.methods import DoRA
from peft_diffusion.methods.lora_linear import LoRALinear


def _site(bias=True, base_trainable=False, **lora):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5, bias=bias))
    inject(model, LoRA(target={"types": ["Linear"]}, **lora), "a", freeze=not base_trainable)
    tiny.randomize(model, "a", std=0.3)
    return model, model[0]


def _reference(host, x, weight=1.0):
    delta = host.deltas["a"]
    low = F.linear(F.linear(x, delta.lora_A.weight), delta.lora_B.weight)
    return F.linear(x, host.base.weight, host.base.bias) + weight * delta.scaling * low


def _grads(model, out):
    out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("shape", [(6,), (3, 6), (2, 4, 6)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("bias, base_trainable", [(True, False), (False, False), (True, True)],
                         ids=["bias", "no-bias", "base-trainable"])
@pytest.mark.parametrize("alpha, weight", [(None, 1.0), (3.0, 0.5)], ids=["unit-scale", "scaled"])
def test_one_node_equals_the_unfused_form(shape, bias, base_trainable, alpha, weight):
    model, host = _site(bias=bias, base_trainable=base_trainable, r=2, alpha=alpha)
    set_adapters(model, {"a": weight})
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = model(x)
    assert type(out.grad_fn).__name__ == "LoRALinearBackward"
    ours, ours_x = _grads(model, out), torch.autograd.grad(model(x).sum(), x)[0]
    model.zero_grad(set_to_none=True)
    ref = _reference(host, x, weight)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    theirs, theirs_x = _grads(model, ref), torch.autograd.grad(_reference(host, x, weight).sum(), x)[0]
    assert ours.keys() == theirs.keys()
    assert ("0.base.weight" in ours) == base_trainable
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=0, msg=name)
    torch.testing.assert_close(ours_x, theirs_x, atol=1e-6, rtol=0)


def test_gradcheck_in_double_precision():
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(s, dtype=torch.float64, generator=g, requires_grad=True)
            for s in [(2, 3, 4), (5, 4), (5,), (2, 4), (5, 2)]]
    assert torch.autograd.gradcheck(lambda *t: LoRALinear.apply(*t, 0.7), args)


def test_lora_fa_keeps_a_frozen_and_does_not_save_the_input():
    model, host = _site(r=2, fa=True)
    x = torch.randn(3, 6, requires_grad=True)
    out = model(x)
    assert type(out.grad_fn).__name__ == "LoRALinearBackward"
    assert out.grad_fn.saved_tensors[0] is None  # x is only needed for dL/dA and dL/dW
    grads = _grads(model, out)
    assert set(grads) == {"0.deltas.a.lora_B.weight"}
    torch.testing.assert_close(grads["0.deltas.a.lora_B.weight"],
                               _grads(model, _reference(host, x))["0.deltas.a.lora_B.weight"], atol=1e-6, rtol=0)


def _hooked(host):
    seen = []
    host.base.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    return seen


@pytest.mark.parametrize("case", ["base-hook", "backward-hook", "replaced-forward", "autocast", "dtype", "dropout", "subclass"])
def test_falls_back_to_the_unfused_form(case):
    model, host = _site(r=2, dropout=0.1 if case == "dropout" else 0.0)
    if case == "subclass":
        model = nn.Sequential(nn.Linear(6, 5))
        inject(model, DoRA(target={"types": ["Linear"]}, r=2), "a")
        host = model[0]
    x = torch.randn(3, 6)
    seen = _hooked(host) if case == "base-hook" else None
    if case == "backward-hook":
        host.base.register_full_backward_hook(lambda m, gi, go: None)
    if case == "replaced-forward":  # what accelerate's offload hooks do to a module
        original = host.base.forward
        host.base.forward = lambda *a, **k: original(*a, **k)
    if case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        assert out.dtype == torch.bfloat16
    elif case == "dtype":
        host.base.double()
        out = model(x.double())
    else:
        out = model(x)
    assert type(out.grad_fn).__name__ != "LoRALinearBackward"
    if seen is not None:
        assert seen == [(3, 5)]
