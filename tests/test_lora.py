"""LoRA specifics: the low-rank path equals the base op with delta_weight() on every layer kind, rank/alpha
patterns, rsLoRA, LoRA-FA, init, dropout, the trainable set, config validation."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import tiny
from peft_diffusion import LoRA, Target, fuse, inject, unfuse
from peft_diffusion.api import hosts
from peft_diffusion.core import weight_op

ALL_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d", "Conv1D")


def _layers():
    torch.manual_seed(0)
    return {
        "linear": (nn.Linear(6, 5), (3, 6)),
        "linear-3d-input": (nn.Linear(6, 5, bias=False), (2, 3, 6)),
        "conv2d-1x1": (nn.Conv2d(4, 6, 1), (2, 4, 5, 5)),
        "conv2d-3x3-stride2-pad1": (nn.Conv2d(4, 6, 3, stride=2, padding=1), (2, 4, 7, 7)),
        "conv2d-3x3-dilated": (nn.Conv2d(4, 6, 3, padding=2, dilation=2, bias=False), (1, 4, 6, 6)),
        "conv2d-same": (nn.Conv2d(4, 6, 3, padding="same"), (1, 4, 5, 5)),
        "conv1d": (nn.Conv1d(4, 6, 3, padding=1), (2, 4, 9)),
        "conv3d": (nn.Conv3d(2, 3, 2, stride=2), (1, 2, 4, 4, 4)),
        "gpt2-conv1d": (Conv1D(5, 6), (2, 3, 6)),  # Conv1D(nf=out, nx=in), weight stored (in, out)
    }


def _full_op(base, x, weight):
    """The base layer's forward with another weight, bias included."""
    if isinstance(base, nn.Linear):
        return F.linear(x, weight, base.bias)
    if isinstance(base, nn.modules.conv._ConvNd):
        return base._conv_forward(x, weight, base.bias)
    return x @ weight + base.bias


def _wrapped(layer, **lora):
    model = nn.Sequential(layer)
    inject(model, LoRA(target=Target(types=ALL_TYPES), **lora), "a")
    tiny.randomize(model, "a", std=0.3)
    host = model[0]
    return model, host, host.deltas["a"]


@pytest.mark.parametrize("kind", list(_layers()))
def test_low_rank_path_equals_base_op_with_delta_weight(kind):
    layer, shape = _layers()[kind]
    w0 = layer.weight.detach().clone()
    model, host, delta = _wrapped(layer, r=3, alpha=5.0)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    dw = delta.delta_weight()
    assert dw.shape == w0.shape
    with torch.no_grad():
        out = model(x)
        zero = torch.zeros_like(out)
        torch.testing.assert_close(delta(host.base, x, zero, 1.0), weight_op(host.base, x, dw), atol=1e-5, rtol=0)
        torch.testing.assert_close(delta(host.base, x, zero, 0.5), 0.5 * weight_op(host.base, x, dw), atol=1e-5,
                                   rtol=0)
        torch.testing.assert_close(out, _full_op(host.base, x, w0 + dw), atol=1e-5, rtol=0)
        fuse(model)
        torch.testing.assert_close(host.base.weight, w0 + dw, atol=1e-6, rtol=0)
        torch.testing.assert_close(model(x), out, atol=1e-5, rtol=0)
        unfuse(model)
        torch.testing.assert_close(host.base.weight, w0, atol=1e-6, rtol=0)


def test_delta_weight_is_scaled_b_times_a():
    _, host, delta = _wrapped(nn.Linear(6, 5), r=3, alpha=6.0)
    torch.testing.assert_close(delta.delta_weight(), 2.0 * delta.lora_B.weight @ delta.lora_A.weight)
    _, host, delta = _wrapped(Conv1D(5, 6), r=3, alpha=6.0)
    torch.testing.assert_close(delta.delta_weight(), 2.0 * (delta.lora_B.weight @ delta.lora_A.weight).T)


def test_conv_with_reflect_padding():
    layer = nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect")
    model, host, delta = _wrapped(layer, r=2)
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(delta(host.base, x, torch.zeros(1, 6, 5, 5), 1.0),
                                   weight_op(host.base, x, delta.delta_weight()), atol=1e-5, rtol=0)


def test_half_precision_layer_gets_float32_adapter():
    layer = nn.Linear(8, 8).to(torch.bfloat16)
    w0 = layer.weight.detach().clone()
    model, host, delta = _wrapped(layer, r=2)
    assert delta.lora_A.weight.dtype == delta.lora_B.weight.dtype == torch.float32
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        out = model(x)
        assert out.dtype == torch.bfloat16
        ref = F.linear(x.float(), w0.float() + delta.delta_weight(), layer.bias.float())
        torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=2e-2)
        fuse(model)
        torch.testing.assert_close(model(x).float(), ref, atol=5e-2, rtol=2e-2)


def test_build_without_init_puts_parameters_on_meta():
    delta = LoRA(r=2).build(nn.Linear(4, 4), "x", init=False)
    assert all(p.device.type == "meta" for p in delta.parameters())


# ---------------------------------------------------------------- rank, alpha, scaling

def _deltas(model, name="a"):
    return {q: h.deltas[name] for q, h in hosts(model)}


def test_rank_and_alpha_patterns_longest_match_wins(unet):
    config = LoRA(r=4, alpha=8.0, rank_pattern={"to_q": 2, r"attn2\.to_q": 8},
                  alpha_pattern={"to_k": 1.0, "attn2.to_k": 16.0})
    inject(unet, config, "a")
    expected = {  # suffix -> (rank, scaling)
        "attn1.to_q": (2, 8.0 / 2), "attn2.to_q": (8, 8.0 / 8), "attn1.to_k": (4, 1.0 / 4),
        "attn2.to_k": (4, 16.0 / 4), "attn1.to_v": (4, 2.0), "attn2.to_v": (4, 2.0), "to_out.0": (4, 2.0),
    }
    deltas = _deltas(unet)
    assert len(deltas) == 32
    for site, delta in deltas.items():
        (rank, scaling), = [v for k, v in expected.items() if site.endswith(k)]
        assert delta.lora_A.weight.shape[0] == delta.lora_B.weight.shape[1] == rank == config.rank(site), site
        assert delta.scaling == pytest.approx(scaling) == config.scale(site), site


def test_default_alpha_equals_r():
    assert LoRA(r=8).scale("x") == 1.0
    assert LoRA(r=8, alpha=16).scale("x") == 2.0


def test_rslora_scaling():
    assert LoRA(r=16, alpha=8, rslora=True).scale("x") == pytest.approx(8 / math.sqrt(16))
    config = LoRA(r=16, alpha=8, rslora=True, rank_pattern={"to_q": 4})
    assert config.scale("a.to_q") == pytest.approx(8 / math.sqrt(4))
    _, _, delta = _wrapped(nn.Linear(6, 5), r=9, alpha=6.0, rslora=True)
    assert delta.scaling == pytest.approx(2.0)


# ---------------------------------------------------------------- training behaviour

def test_lora_fa_trains_b_only(text_encoder):
    inject(text_encoder, LoRA(r=4, fa=True), "a")
    inputs = tiny.clip_text_inputs(batch=2)
    text_encoder(**inputs).last_hidden_state.pow(2).mean().backward()
    deltas = _deltas(text_encoder)
    assert len(deltas) == 8
    for site, delta in deltas.items():
        assert not delta.lora_A.weight.requires_grad and delta.lora_A.weight.grad is None, site
        assert delta.lora_B.weight.requires_grad, site
        assert delta.lora_B.weight.grad is not None and delta.lora_B.weight.grad.abs().sum() > 0, site
    trainable = {n for n, p in text_encoder.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in text_encoder.named_parameters() if n.endswith(".deltas.a.lora_B.weight")}
    assert all(p.grad is None for n, p in text_encoder.named_parameters() if ".deltas." not in n)


def test_plain_lora_trains_a_and_b(text_encoder):
    inject(text_encoder, LoRA(r=4), "a")
    text_encoder(**tiny.clip_text_inputs()).last_hidden_state.pow(2).mean().backward()
    for delta in _deltas(text_encoder).values():
        assert delta.lora_A.weight.grad is not None and delta.lora_B.weight.grad is not None


@pytest.mark.parametrize("layer", [nn.Linear(512, 256), nn.Conv2d(64, 32, 3)], ids=["linear", "conv"])
def test_gaussian_init(layer):
    torch.manual_seed(0)
    delta = LoRA(r=4, init="gaussian").build(layer, "x")
    assert delta.lora_A.weight.std().item() == pytest.approx(1 / 4, rel=0.08)
    assert delta.lora_A.weight.mean().abs().item() < 0.02
    assert torch.count_nonzero(delta.lora_B.weight) == 0


def test_kaiming_init():
    torch.manual_seed(0)
    delta = LoRA(r=4).build(nn.Linear(100, 50), "x")
    a = delta.lora_A.weight
    assert a.abs().max().item() <= 1 / math.sqrt(100) and a.std().item() > 0.5 / math.sqrt(3 * 100)
    assert torch.count_nonzero(delta.lora_B.weight) == 0


def test_dropout_only_in_train_mode():
    layer = nn.Linear(16, 16)
    w0 = layer.weight.detach().clone()
    model, host, delta = _wrapped(layer, r=4, dropout=0.5)
    assert isinstance(delta.dropout, nn.Dropout) and delta.dropout.p == 0.5
    x = torch.randn(4, 16)
    with torch.no_grad():
        model.train()
        torch.manual_seed(0)
        t1 = model(x)
        t2 = model(x)
        model.eval()
        e1, e2 = model(x), model(x)
    assert not torch.allclose(t1, t2)
    assert torch.equal(e1, e2)
    torch.testing.assert_close(e1, F.linear(x, w0 + delta.delta_weight(), layer.bias), atol=1e-5, rtol=0)
    assert not torch.allclose(t1, e1)
    _, _, plain = _wrapped(nn.Linear(4, 4), r=2)
    assert isinstance(plain.dropout, nn.Identity)


def test_trainable_set_is_exactly_the_lora_parameters(unet):
    inject(unet, LoRA(r=2, target="unet-all"), "a")
    names = [n for n, _ in unet.named_parameters()]
    lora = {n for n in names if ".deltas.a.lora_A." in n or ".deltas.a.lora_B." in n}
    assert len(lora) == 2 * 69
    assert {n for n, p in unet.named_parameters() if p.requires_grad} == lora


def test_inject_without_freeze_keeps_base_trainable(text_encoder):
    inject(text_encoder, LoRA(r=2), "a", freeze=False)
    assert all(p.requires_grad for p in text_encoder.parameters())


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("kwargs, message", [
    ({"r": 0}, "rank r must be a positive integer"),
    ({"r": -2}, "rank r must be a positive integer"),
    ({"r": 2.5}, "rank r must be a positive integer"),
    ({"rank_pattern": {"to_q": 0}}, "rank_pattern values must be positive integers"),
    ({"rank_pattern": {"to_q": 1.5}}, "rank_pattern values must be positive integers"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
    ({"init": "xavier"}, "init must be one of"),
])
def test_invalid_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRA(**kwargs)


def test_from_dict_rejects_unknown_settings_and_round_trips():
    with pytest.raises(ValueError, match=r"unknown LoRA settings \['rank'\]"):
        LoRA.from_dict({"method": "lora", "rank": 4})
    config = LoRA(r=4, alpha=2.0, rslora=True, rank_pattern={"to_q": 2}, target="unet-attn")
    assert LoRA.from_dict(config.to_dict()) == config


def test_grouped_conv_raises_clearly():
    with pytest.raises(ValueError, match="grouped convolutions.*groups=2"):
        LoRA(r=2).build(nn.Conv2d(4, 4, 3, groups=2), "conv")
