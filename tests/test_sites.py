"""The three kinds of site (Host, Annex, ParamSite) under one lifecycle, and per-call inputs.

The deltas here are small test-local ones (not registered methods: the registered ones are in the contract
matrix); they exercise what the core promises whatever the method: identity when switched off, weights,
disable/enable, fuse/unfuse (exact), remove restoring module tree, keys, hooks and processors, gradients
reaching only the delta, and no stale state when a forward raises.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import tiny
from peft_diffusion import (LoRA, Target, disable_adapters, enable_adapters, fuse, inject, parameter_report, remove,
                            scaled, set_adapters, unfuse)
from peft_diffusion.api import inputs, placed, sites
from peft_diffusion.config import MethodConfig
from peft_diffusion.core import Annex, AnnexDelta, ParamDelta, ParamSite, fit_batch, lookup


class Shift(AnnexDelta):
    """out + weight * shift (a per-channel vector), optionally plus a per-call input ``extra``."""

    category = "additive"

    def __init__(self, config, site, width):
        super().__init__(config, site)
        self.shift = nn.Parameter(torch.zeros(width))

    def post(self, module, args, kwargs, output, weight):
        extra = lookup("extra", module, default=None)
        out = output + weight * self.shift
        return out if extra is None else out + fit_batch(extra, out.shape[0])


class Offset(ParamDelta):
    category = "selective"

    def __init__(self, config, site, param):
        super().__init__(config, site)
        self.delta = nn.Parameter(torch.zeros_like(param))

    def value(self):
        return self.delta


@dataclasses.dataclass
class ShiftConfig(MethodConfig):
    site_kind = "annex"
    category = "additive"

    def build(self, base, site, init=True):
        return Shift(self, site, base.out_features)


@dataclasses.dataclass
class OffsetConfig(MethodConfig):
    site_kind = "param"
    category = "selective"

    def build(self, base, site, init=True):
        return Offset(self, site, base)


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3))


X = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))


def set_all(m, std):
    """Every delta parameter random with ``std`` (not a constant: the LayerNorm would cancel a uniform shift)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, site in sites(m):
            for d in site.deltas.values():
                for p in d.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * std)


def test_annex_and_param_sites_keep_the_module_and_restore_exactly():
    m = model()
    base, keys, types, hooks = m(X), tiny.snapshot(m), tiny.module_types(m), tiny.hooks_and_processors(m)
    inject(m, ShiftConfig(target=Target(include=("0",), types=(nn.Linear,))), "shift")
    inject(m, OffsetConfig(target=Target(include=("bias",), types=(nn.LayerNorm,))), "bias")
    # the annexed / owning modules stay themselves; their own keys are unchanged; adapters are new keys
    assert type(m[0]) is nn.Linear and type(m[1]) is nn.LayerNorm
    assert isinstance(m[0].peft_annex, Annex) and isinstance(m[1].peft_param_bias, ParamSite)
    assert {k: v for k, v in m.state_dict().items() if k in keys}.keys() == keys.keys()
    assert [q for q, _ in sites(m)] == ["0", "1.bias"]
    assert torch.equal(m(X), base)  # identity at init
    set_all(m, 0.1)
    out = m(X)
    assert not torch.allclose(out, base)
    # the frozen parameter is never changed nor shadowed outside forward
    assert torch.equal(m[1].bias, keys["1.bias"]) and "bias" not in vars(m[1])
    remove(m, "shift")
    assert not hasattr(m[0], "peft_annex") and not torch.equal(m(X), base)
    remove(m)
    assert tiny.module_types(m) == types and tiny.hooks_and_processors(m) == hooks
    assert list(m.state_dict()) == list(keys) and all(torch.equal(m.state_dict()[k], v) for k, v in keys.items())
    assert torch.equal(m(X), base)


def test_gradients_reach_only_the_deltas():
    m = model()
    inject(m, OffsetConfig(target=Target(include=("weight",), types=("LayerNorm",))), "w")
    inject(m, ShiftConfig(target=Target(include=("3",))), "s")
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"1.peft_param_weight.deltas.w.delta", "3.peft_annex.deltas.s.shift"}
    m(X).pow(2).sum().backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if n in trainable)
    assert all(p.grad is None for n, p in m.named_parameters() if n not in trainable)
    report = parameter_report(m)
    assert report.adapters["w"] == {"method": "", "category": "selective", "trainable": 8, "total": 8}
    assert report.model_trainable == 8 + 3


def test_weights_disable_scaled_and_exact_fuse():
    m = model()
    base = m(X)
    inject(m, OffsetConfig(target=Target(include=("bias",), types=())), "b")
    inject(m, ShiftConfig(target=Target(include=("3",))), "s")
    set_all(m, 0.2)
    full = m(X)
    set_adapters(m, {"b": 0.0, "s": 0.0})
    assert torch.allclose(m(X), base, atol=1e-6)
    set_adapters(m, {"b": 1.0, "s": 1.0})
    disable_adapters(m)
    assert torch.equal(m(X), base)
    enable_adapters(m)
    assert torch.equal(m(X), full)
    with scaled(m, 0.0):
        assert torch.allclose(m(X), base, atol=1e-6)
    # the parameter delta merges (in place, exact with a backup); the annex cannot and keeps running
    keys = tiny.snapshot(m)
    fuse(m, exact=True)
    assert all(s.merged == {"b": 1.0} for q, s in sites(m) if q.endswith("bias"))
    assert not m[3].peft_annex.merged
    torch.testing.assert_close(m(X), full, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="cannot be fused"):
        fuse(m, ["s"])
    unfuse(m)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in keys.items())
    assert torch.equal(m(X), full)


def test_a_forward_that_raises_leaves_no_shadow_parameter():
    m = model()
    inject(m, OffsetConfig(target=Target(include=("0.weight",), types=())), "w")
    set_all(m, 0.5)
    with pytest.raises(RuntimeError):
        m(torch.randn(2, 5))  # wrong width: the Linear raises with the patched weight in place
    assert "weight" not in vars(m[0]) and m[0].weight is m[0]._parameters["weight"]


def test_param_site_beside_a_host_on_the_same_layer():
    m = model()
    base = m(X)
    inject(m, LoRA(r=2, target=Target(include=("0",))), "lora")
    inject(m, OffsetConfig(target=Target(include=("0.bias",), types=())), "bias")
    assert [q for q, _ in sites(m)] == ["0", "0.bias"]  # the Host's ``.base`` is not part of site names
    set_all(m, 0.1)
    assert not torch.allclose(m(X), base)
    fuse(m)
    unfuse(m)
    remove(m, "lora")
    assert type(m[0]) is nn.Linear and [q for q, _ in sites(m)] == ["0.bias"]
    remove(m)
    assert torch.equal(m(X), base) and not list(placed(m))


def test_per_call_inputs_nest_scope_and_fit_the_batch():
    m, other = model(), model()
    inject(m, ShiftConfig(target=Target(include=("3",))), "s")
    base = m(X)
    e = torch.ones(1, 3)
    with inputs(m, extra=e):
        torch.testing.assert_close(m(X), base + 1)  # one row tiled over the batch of 5
        with inputs(m, extra=2 * e):
            torch.testing.assert_close(m(X), base + 2)
        torch.testing.assert_close(m(X), base + 1)
        with inputs(other, extra=5 * e):  # scoped to the model it was given for
            torch.testing.assert_close(m(X), base + 1)
    assert torch.equal(m(X), base)
    with pytest.raises(KeyError, match="per-call input 'extra' is not given"):
        lookup("extra", m[3])
    with pytest.raises(ValueError, match="batch 2 cannot serve a batch of 5"):
        fit_batch(torch.ones(2, 3), 5)
    cfg_batch = torch.stack([torch.zeros(3), torch.ones(3)])
    assert torch.equal(fit_batch(cfg_batch, 4), torch.cat([cfg_batch, cfg_batch]))


def test_targets_take_classes_and_kinds():
    m = model()
    assert Target(types=(nn.Linear,)).select(m) == ["0", "3"]
    assert Target(types=nn.LayerNorm).types == ("LayerNorm",)
    assert Target(include=("bias",), types=()).select(m, "param") == ["0.bias", "1.bias", "3.bias"]
    assert Target(types=(nn.Sequential,)).select(m, "annex") == [""]  # the model itself
    with pytest.raises(TypeError, match="classes or class names"):
        Target(types=(3,))
    with pytest.raises(ValueError, match="matches no parameter"):
        inject(m, OffsetConfig(target=Target(include=("nope",), types=())), "x")
    assert not list(sites(m))


def test_a_pipeline_holding_diffusers_lora_layers_is_refused(tiny_pipe, tmp_path):
    pytest.importorskip("peft")
    from peft import LoraConfig

    from peft_diffusion import AdapterFileError, load_adapter, save_adapter

    donor = copy.deepcopy(tiny_pipe)
    inject(donor, LoRA(r=2, target=Target(include=("to_q",))), "mine")
    path = save_adapter(donor, tmp_path / "mine.safetensors", "mine")
    tiny_pipe.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k"]))
    types = tiny.module_types(tiny_pipe.unet)
    with pytest.raises(TypeError, match="unload_lora_weights"):
        inject(tiny_pipe, LoRA(r=2))
    with pytest.raises(AdapterFileError, match="unload_lora_weights"):
        load_adapter(tiny_pipe, path)
    assert tiny.module_types(tiny_pipe.unet) == types


def test_adapter_names_that_are_module_attributes_are_refused():
    m = model()
    for name in ("half", "train", "to"):
        with pytest.raises(ValueError, match="torch.nn.Module attribute"):
            inject(m, LoRA(r=2, target=Target(include=("0",))), name)
    assert not list(sites(m))


def test_the_public_api_exports_every_registered_method():
    import peft_diffusion as pd

    exported = {id(getattr(pd, n)) for n in pd.__all__}  # by identity: PRESETS and METHODS are dicts
    missing = [name for name, cls in pd.METHODS.items() if id(cls) not in exported]
    assert not missing, f"registered methods not exported from peft_diffusion: {missing}"
