"""LoHa and the Kronecker family (LoKr, KronA, DiffuseKronA): identity at init, dW against dense references,
the factored Kronecker forward against the dense one, LyCORIS' factor rule, errors, Tucker factors, and
outputs equal to lycoris-lora's own modules holding the same weights."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from lycoris import LohaModule, LokrModule
from lycoris.functional import factorization as lycoris_factorization
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_diffusion import Target, inject
from peft_diffusion.api import hosts
from peft_diffusion.core import weight_op
from peft_diffusion.methods.loha import LoHa, _Hadamard
from peft_diffusion.methods.kronecker import factorization, kron_matmul
from peft_diffusion.methods.lokr import DiffuseKronA, KronA, LoKr
from peft_diffusion.presets import preset
from peft_diffusion.registry import config_from_dict

LAYERS = {
    "linear": (lambda: nn.Linear(24, 40), (2, 5, 24)),
    "conv1x1": (lambda: nn.Conv2d(12, 20, 1), (2, 12, 5, 5)),
    "conv3x3": (lambda: nn.Conv2d(12, 20, 3, padding=1), (2, 12, 6, 6)),
}
TYPES = Target(types=("Linear", "Conv1d", "Conv2d", "Conv3d", "Conv1D", "Embedding"))


def _layer(kind, seed=0):
    torch.manual_seed(seed)
    make, shape = LAYERS[kind]
    return make(), torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))


def _randomize(module, seed=3, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _adapter_out(delta, base, x, weight=1.0):
    with torch.no_grad():
        return delta(base, x, base(x), weight)


CONFIGS = [
    LoHa(r=3, alpha=1.5), LoHa(r=2, use_tucker=True),
    LoKr(r=2, alpha=1.0), LoKr(r=1, decompose_both=True, use_tucker=True), LoKr(factor=2, full_matrix=True),
    LoKr(r=2, factor=(4, 3)), KronA(), DiffuseKronA(factor=(4, 2)),
]


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.method}-{id(c) % 997}")
def test_identity_at_init(config, kind):
    base, x = _layer(kind)
    delta = config.build(base, "layer")
    assert not delta.delta_weight().any()
    torch.testing.assert_close(_adapter_out(delta, base, x), base(x).detach(), atol=0, rtol=0)


def test_loha_delta_weight_is_the_hadamard_product():
    base, _ = _layer("conv3x3")
    delta = LoHa(r=3, alpha=6.0).build(base, "c")
    _randomize(delta)
    p = dict(delta.named_parameters())
    ref = 2.0 * (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
    assert p["hada_w1_b"].shape == (3, 12 * 9)  # the kernel is flattened into the input side
    torch.testing.assert_close(delta.delta_weight(), ref.view(20, 12, 3, 3))


def test_loha_tucker_delta_weight():
    base, _ = _layer("conv3x3")
    delta = LoHa(r=2, alpha=1.0, use_tucker=True).build(base, "c")
    _randomize(delta)
    p = dict(delta.named_parameters())
    assert p["hada_t1"].shape == (2, 2, 3, 3) and p["hada_w1_a"].shape == (2, 20) and p["hada_w1_b"].shape == (2, 12)

    def rebuild(t, a, b):  # sum_ij t[i, j] a[i, p] b[j, q], written as two tensordots
        return torch.tensordot(a.T, torch.tensordot(t, b, dims=([1], [0])), dims=([1], [0])).permute(0, 3, 1, 2)

    ref = 0.5 * rebuild(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"]) * rebuild(p["hada_t2"], p["hada_w2_a"],
                                                                                  p["hada_w2_b"])
    torch.testing.assert_close(delta.delta_weight(), ref)


def test_hadamard_backward_matches_autograd():
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in ((5, 2), (2, 7)) * 2]
    assert torch.autograd.gradcheck(lambda *t: _Hadamard.apply(*t, 0.7), args)


@pytest.mark.parametrize("w1_first", [False, True])
@pytest.mark.parametrize("low_rank", [False, True])
def test_kron_matmul_gradients(w1_first, low_rank):
    """The hand-written backward (which recomputes the intermediate instead of keeping it) against numerical
    derivatives, in float64, for both contraction orders and a full or rank-2 W2."""
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)

    w2 = (t(4, 2), t(2, 5)) if low_rank else (t(4, 5), None)
    x, w1 = t(2, 3, 15), t(2, 3)
    assert torch.autograd.gradcheck(lambda x, w1, a, b: kron_matmul(x, w1, a, b, w1_first), (x, w1, *w2))
    dense = torch.kron(w1, w2[0] if w2[1] is None else w2[0] @ w2[1])
    torch.testing.assert_close(kron_matmul(x, w1, *w2, w1_first), F.linear(x, dense))


@pytest.mark.parametrize("config", [LoKr(r=2, alpha=1.0), LoKr(r=1, decompose_both=True), LoKr(factor=4, r=64),
                                    LoKr(r=2, factor=(8, 3)), DiffuseKronA(factor=(2, 12))],
                         ids=["lowrank-w2", "decompose-both", "full-both", "pair", "pair-w1-first"])
def test_kronecker_delta_weight_and_factored_forward(config):
    base, x = _layer("linear")
    delta = config.build(base, "fc")
    _randomize(delta)
    assert delta.factored, "a Linear whose factors are not degenerate must not build dW in forward"
    p = dict(delta.named_parameters())
    w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
    w2 = p["lokr_w2"] if "lokr_w2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]
    dw = delta.scaling * torch.kron(w1, w2)
    torch.testing.assert_close(delta.delta_weight(), dw)
    # forward and gradients of the factored path against the dense x dW^T
    out = base(x).detach()
    y = delta(base, x, out, 0.5)
    torch.testing.assert_close(y, out + 0.5 * F.linear(x, dw.detach()), atol=1e-5, rtol=1e-5)
    y.square().sum().backward()
    got = {k: v.grad.clone() for k, v in p.items()}
    delta.zero_grad()
    (out + 0.5 * F.linear(x, delta.delta_weight())).square().sum().backward()
    for k, v in p.items():
        torch.testing.assert_close(got[k], v.grad, atol=1e-4, rtol=1e-4)


def test_factor_pair_orders_and_scale_rules():
    base, _ = _layer("linear")
    assert DiffuseKronA(factor=(2, 12)).build(base, "fc").w2_first is False  # W1 (2 x 12) first: less work
    assert DiffuseKronA(factor=(10, 2)).build(base, "fc").w2_first is True  # W2 (4 x 12) first
    assert LoKr(r=2, alpha=1.0).build(base, "fc").scaling == 0.5
    assert LoKr(r=64, alpha=1.0).build(base, "fc").scaling == 1.0  # both factors full: LyCORIS' scale 1
    assert LoKr(r=2, alpha=1.0).scale("fc") == 0.5 and LoKr(r=64, alpha=1.0).scale("fc", base) == 1.0
    assert not LoKr().build(nn.Linear(13, 7), "prime").factored  # 1 x n factors: dense is as cheap


@pytest.mark.parametrize("dim", [1, 7, 12, 127, 128, 250, 320, 360, 512, 640, 768, 1024, 1280, 2560, 3072])
def test_factorization_matches_lycoris(dim):
    for factor in (-1, 1, 2, 3, 4, 8, 16, 64):
        assert factorization(dim, factor) == tuple(lycoris_factorization(dim, factor)), (dim, factor)


def test_factor_that_does_not_divide_is_an_error_naming_the_layer():
    model = nn.Sequential(nn.Linear(24, 40), nn.Linear(40, 30))
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"^1: Kronecker factor \(4, 3\) does not fit this 30 x 40 layer: "
                                         r"a1=4 does not divide 30 \(divisors near it: \[2, 3, 5, 6\]\); "
                                         r"a2=3 does not divide 40 \(divisors near it: \[1, 2, 4, 5\]\)"):
        inject(model, LoKr(factor=(4, 3), target=Target()))
    assert not list(hosts(model)) and all(torch.equal(model.state_dict()[k], v) for k, v in keys.items())
    inject(model, LoKr(factor=(4, 3), factor_pattern={"1": (5, 4)}, target=Target()))  # the suggested fix
    assert tuple(model[1].deltas["default"].lokr_w1.shape) == (5, 4)


@pytest.mark.parametrize("bad, match", [
    (dict(factor=0), "factor must be -1, a positive int, or a pair"),
    (dict(factor=(4, 0)), "factor must be -1"),
    (dict(factor_pattern={"q": (1, 2, 3)}), r"factor_pattern\['q'\] must be"),
    (dict(r=0), "ranks"), (dict(rank_pattern={"q": 1.5}), "ranks"), (dict(alpha=float("nan")), "alpha"),
])
def test_bad_settings_are_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        LoKr(**bad)
    if "factor" not in str(bad):
        with pytest.raises(ValueError, match=match):
            LoHa(**bad)


@pytest.mark.parametrize("layer", [Conv1D(5, 6), nn.Embedding(10, 4), nn.ConvTranspose2d(4, 4, 3)],
                         ids=["gpt2-conv1d", "embedding", "conv-transpose"])
@pytest.mark.parametrize("config", [LoHa(), LoKr()], ids=["loha", "lokr"])
def test_unsupported_layers_are_refused_at_inject(config, layer):
    match = f"serves Linear and Conv1d/Conv2d/Conv3d layers; 0 is a {type(layer).__name__}"
    with pytest.raises(TypeError, match=match):
        config.build(layer, "0")
    if type(layer).__name__ in TYPES.types:  # what a target can select: refused before the model is touched
        model = nn.Sequential(layer)
        with pytest.raises(TypeError, match=match):
            inject(model, type(config)(target=TYPES))
        assert model[0] is layer


def test_kronecker_tucker_on_a_kxk_conv():
    base, x = _layer("conv3x3")
    delta = LoKr(r=1, use_tucker=True, decompose_both=True).build(base, "c")
    shapes = {k: tuple(v.shape) for k, v in delta.state_dict().items()}
    assert shapes == {"lokr_w1_a": (4, 1), "lokr_w1_b": (1, 3), "lokr_t2": (1, 1, 3, 3), "lokr_w2_a": (1, 5),
                      "lokr_w2_b": (1, 4)}
    assert not delta.factored  # conv layers build dW once and run the layer's own conv
    _randomize(delta)
    p = dict(delta.named_parameters())
    w2 = torch.einsum("ij...,ip,jq->pq...", p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
    dw = torch.kron((p["lokr_w1_a"] @ p["lokr_w1_b"])[:, :, None, None], w2)
    torch.testing.assert_close(delta.delta_weight(), dw)
    torch.testing.assert_close(_adapter_out(delta, base, x), base(x) + weight_op(base, x, dw.detach()))


def test_krona_and_diffusekrona_defaults():
    assert KronA().full_matrix and KronA().factor == -1
    d = DiffuseKronA()
    assert (d.factor, d.full_matrix, d.target) == ((64, 8), True, preset("unet-attn"))
    torch.manual_seed(0)
    delta = d.build(nn.Linear(768, 320), "attn2.to_k")
    assert tuple(delta.lokr_w1.shape) == (64, 8) and tuple(delta.lokr_w2.shape) == (5, 96)
    assert delta.scaling == 1.0 and not delta.lokr_w2.any()
    assert abs(delta.lokr_w1.std().item() - 1 / 64) < 0.003  # the paper's code: A ~ N(0, 1/a1^2)
    again = config_from_dict(json.loads(json.dumps(DiffuseKronA(factor_pattern={"to_k": [32, 8]}).to_dict())))
    assert type(again) is DiffuseKronA and again.factor == (64, 8) and again.factor_pattern == {"to_k": (32, 8)}


def test_half_precision_layer_trains_float32_factors():
    base = nn.Linear(24, 40).to(torch.bfloat16)
    for config in (LoHa(r=2), LoKr(r=2)):
        delta = config.build(base, "fc")
        _randomize(delta)
        assert all(p.dtype == torch.float32 for p in delta.parameters())
        x = torch.randn(3, 24, dtype=torch.bfloat16)
        out = base(x)
        y = delta(base, x, out, 1.0)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), (out.float() + F.linear(x.float(), delta.delta_weight())),
                                   atol=0.05, rtol=0.02)


# ---------------------------------------------------------------- against lycoris-lora's own modules

def _versus_lycoris(ours_config, theirs, kind, **theirs_kwargs):
    base, x = _layer(kind)
    lyco = theirs("lyco", base, 1.0, **theirs_kwargs)
    _randomize(lyco)
    delta = ours_config.build(base, "layer")
    mine = dict(delta.named_parameters())
    lyco_params = dict(lyco.named_parameters())
    assert {k: tuple(v.shape) for k, v in mine.items()} == {k: tuple(lyco_params[k].shape) for k in mine}
    assert set(lyco_params) == set(mine), "every LyCORIS parameter maps onto ours by name"
    delta.load_state_dict({k: lyco_params[k].detach() for k in mine})
    with torch.no_grad():
        expected = lyco(x)
        torch.testing.assert_close(_adapter_out(delta, base, x), expected, atol=1e-5, rtol=0)
        assert (expected - base(x)).abs().max() > 1e-2, "the comparison must see a nonzero update"
    if kind == "linear" and theirs is LokrModule:  # LyCORIS' own factored path gives the same
        lyco.bypass_mode = True
        with torch.no_grad():
            torch.testing.assert_close(_adapter_out(delta, base, x), lyco(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("tucker", [False, True])
def test_loha_equals_lycoris(kind, tucker):
    _versus_lycoris(LoHa(r=3, alpha=2.0, use_tucker=tucker), LohaModule, kind, lora_dim=3, alpha=2.0,
                    use_tucker=tucker)


LOKR_CASES = {  # name: (our settings, LyCORIS' LokrModule settings)
    "decomposed-w2": (dict(r=2, alpha=1.0), dict(lora_dim=2, alpha=1.0)),
    "decompose-both": (dict(r=1, alpha=3.0, decompose_both=True), dict(lora_dim=1, alpha=3.0, decompose_both=True)),
    "full-by-rank": (dict(r=8, alpha=2.0), dict(lora_dim=8, alpha=2.0)),
    "full-matrix-factor-4": (dict(full_matrix=True, factor=4), dict(lora_dim=4, alpha=1.0, full_matrix=True, factor=4)),
    "tucker": (dict(r=1, alpha=2.0, use_tucker=True), dict(lora_dim=1, alpha=2.0, use_tucker=True)),
}


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("case", list(LOKR_CASES))
def test_lokr_equals_lycoris(kind, case):
    ours, theirs = LOKR_CASES[case]
    _versus_lycoris(LoKr(**ours), LokrModule, kind, **theirs)
