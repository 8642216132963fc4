"""The adapter lifecycle on the tiny U-Net, the tiny CLIP text encoder and the tiny SD pipeline:
inject, identity at init, fuse/unfuse, remove, several adapters, hot swap, disable/enable, scaled,
per-component weights, error paths, parameter_report, torch.compile."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import tiny
from peft_diffusion import (LoRA, Target, active_adapters, adapter_names, disable_adapters, enable_adapters, fuse,
                            inject, parameter_report, remove, scaled, set_adapters, unfuse)
from peft_diffusion.api import hosts
from peft_diffusion.core import Host

INPUTS = {"unet": tiny.unet_inputs, "clip-text": tiny.clip_text_inputs}


@pytest.fixture(params=["unet", "clip-text"])
def model_and_inputs(request, make_model):
    return make_model(request.param), INPUTS[request.param]()


def adapted(model, inputs, name="a", config=None, std=0.05, seed=1):
    """Inject ``name`` and give it a non-zero delta; returns the base output (taken before injection)."""
    base = tiny.run(model, inputs)
    inject(model, config or LoRA(r=4), name)
    tiny.randomize(model, name, std=std, seed=seed)
    return base


# ---------------------------------------------------------------- identity, fuse, unfuse

def test_identity_at_init(model_and_inputs):
    model, inputs = model_and_inputs
    base = tiny.run(model, inputs)
    inject(model, LoRA(r=4), "a")
    assert any(isinstance(m, Host) for m in model.modules())
    assert torch.equal(tiny.run(model, inputs), base)


def test_fused_equals_unfused_and_unfuse_restores(model_and_inputs):
    model, inputs = model_and_inputs
    w0 = tiny.snapshot(model)
    base = adapted(model, inputs)
    out = tiny.run(model, inputs)
    assert not torch.allclose(out, base, atol=1e-4), "the randomised delta must change the output"
    fuse(model)
    assert all(h.merged == {"a": 1.0} for _, h in hosts(model))
    torch.testing.assert_close(tiny.run(model, inputs), out, atol=1e-5, rtol=0)
    unfuse(model)
    assert all(not h.merged for _, h in hosts(model))
    after = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".deltas." not in k}
    assert after.keys() == w0.keys()
    for k, v in w0.items():
        torch.testing.assert_close(after[k], v, atol=1e-6, rtol=0, msg=k)
    torch.testing.assert_close(tiny.run(model, inputs), out, atol=1e-5, rtol=0)


def test_exact_fuse_then_unfuse_is_bit_for_bit(model_and_inputs):
    model, inputs = model_and_inputs
    adapted(model, inputs)
    before = tiny.snapshot(model)
    fuse(model, exact=True)
    assert not all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    unfuse(model)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_exact_fuse_after_plain_fuse_restores_the_base(text_encoder):
    before = tiny.snapshot(text_encoder)
    inject(text_encoder, LoRA(r=4), "a")
    inject(text_encoder, LoRA(r=4), "b")
    tiny.randomize(text_encoder, "a", seed=1)
    tiny.randomize(text_encoder, "b", seed=2)
    fuse(text_encoder, ["a"])
    fuse(text_encoder, ["b"], exact=True)
    unfuse(text_encoder, ["b"])
    unfuse(text_encoder, ["a"])
    remove(text_encoder)
    for k, v in before.items():
        torch.testing.assert_close(text_encoder.state_dict()[k], v, atol=1e-6, rtol=0, msg=k)


# ---------------------------------------------------------------- remove

def test_remove_restores_module_tree_and_state_dict(unet):
    types, state = tiny.module_types(unet), tiny.snapshot(unet)
    inject(unet, LoRA(r=4, target="unet-all"), "a")
    inject(unet, LoRA(r=2), "b")
    tiny.randomize(unet, "a")
    tiny.randomize(unet, "b", seed=3)
    remove(unet, "b")
    assert adapter_names(unet) == ["a"]
    remove(unet)
    assert adapter_names(unet) == []
    assert tiny.module_types(unet) == types
    assert list(unet.state_dict()) == list(state)
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in state.items())


def test_remove_unfuses_fused_adapters_first(text_encoder):
    types, state = tiny.module_types(text_encoder), tiny.snapshot(text_encoder)
    inject(text_encoder, LoRA(r=4), "a")
    tiny.randomize(text_encoder, "a")
    fuse(text_encoder)
    remove(text_encoder)
    assert tiny.module_types(text_encoder) == types
    assert list(text_encoder.state_dict()) == list(state)
    for k, v in state.items():
        torch.testing.assert_close(text_encoder.state_dict()[k], v, atol=1e-6, rtol=0, msg=k)


def test_remove_unknown_adapter_raises(text_encoder):
    inject(text_encoder, LoRA(r=2), "a")
    with pytest.raises(ValueError, match=r"unknown adapters \['zz'\]; loaded: \['a'\]"):
        remove(text_encoder, "zz")


# ---------------------------------------------------------------- several adapters, hot swap

def test_each_site_adds_the_weighted_sum_of_its_deltas(text_encoder):
    inject(text_encoder, LoRA(r=4), "a")
    inject(text_encoder, LoRA(r=2, alpha=3.0), "b")
    tiny.randomize(text_encoder, "a", seed=1)
    tiny.randomize(text_encoder, "b", seed=2)
    g = torch.Generator().manual_seed(0)
    sites = list(hosts(text_encoder))
    xs = {q: torch.randn(2, 5, h.base.in_features, generator=g) for q, h in sites}

    def site_outputs(adapters):
        set_adapters(text_encoder, adapters)
        with torch.no_grad():
            return {q: h(xs[q]) for q, h in sites}

    base, a, b = site_outputs({}), site_outputs(["a"]), site_outputs(["b"])
    ab = site_outputs({"a": 0.7, "b": -0.4})
    for q, _ in sites:
        torch.testing.assert_close(ab[q] - base[q], 0.7 * (a[q] - base[q]) - 0.4 * (b[q] - base[q]),
                                   atol=1e-6, rtol=0)


def test_model_output_is_the_weighted_sum_to_first_order(model_and_inputs):
    model, inputs = model_and_inputs
    base = adapted(model, inputs, "a", std=1e-3, seed=1)  # small deltas: the model is nearly linear in them
    inject(model, LoRA(r=2), "b")
    tiny.randomize(model, "b", std=1e-3, seed=2)
    set_adapters(model, "a")
    out_a = tiny.run(model, inputs)
    set_adapters(model, ["b"])
    out_b = tiny.run(model, inputs)
    set_adapters(model, {"a": 0.7, "b": -0.4})
    out_ab = tiny.run(model, inputs)
    expected = 0.7 * (out_a - base) - 0.4 * (out_b - base)
    assert expected.abs().max() > 1e-4
    torch.testing.assert_close(out_ab - base, expected, atol=2e-2 * expected.abs().max().item(), rtol=0)


def _identity(model):
    return {q: (id(h), {n: id(d) for n, d in h.deltas.items()}) for q, h in hosts(model)}, \
           [id(p) for p in model.parameters()]


def test_set_adapters_hot_swaps_without_reinjection(model_and_inputs):
    model, inputs = model_and_inputs
    base = adapted(model, inputs, "a", seed=1)
    inject(model, LoRA(r=4), "b")
    tiny.randomize(model, "b", seed=2)
    assert active_adapters(model) == {"a": 1.0, "b": 1.0}  # inject adds the new adapter to the active set
    ids = _identity(model)
    set_adapters(model, "a")
    out_a = tiny.run(model, inputs)
    set_adapters(model, "b")
    out_b = tiny.run(model, inputs)
    set_adapters(model, {"a": 0.5})
    out_half = tiny.run(model, inputs)
    set_adapters(model, "a")
    assert torch.equal(tiny.run(model, inputs), out_a)
    assert not torch.allclose(out_a, out_b, atol=1e-4)
    assert not torch.allclose(out_half, out_a, atol=1e-4)
    set_adapters(model, [])
    assert torch.equal(tiny.run(model, inputs), base)
    assert _identity(model) == ids


def test_disable_and_enable(model_and_inputs):
    model, inputs = model_and_inputs
    base = adapted(model, inputs)
    out = tiny.run(model, inputs)
    disable_adapters(model)
    assert torch.equal(tiny.run(model, inputs), base)
    assert active_adapters(model) == {"a": 1.0}
    enable_adapters(model)
    assert torch.equal(tiny.run(model, inputs), out)


def test_scaled_context_manager(text_encoder):
    inputs = tiny.clip_text_inputs()
    base = adapted(text_encoder, inputs)
    out = tiny.run(text_encoder, inputs)
    with scaled(text_encoder, 0.0):
        assert torch.equal(tiny.run(text_encoder, inputs), base)
    with scaled(text_encoder, 2.0):
        out2 = tiny.run(text_encoder, inputs)
        assert active_adapters(text_encoder) == {"a": 2.0}
    assert torch.equal(tiny.run(text_encoder, inputs), out)
    set_adapters(text_encoder, {"a": 2.0})
    assert torch.equal(tiny.run(text_encoder, inputs), out2)
    set_adapters(text_encoder, "a")
    with pytest.raises(KeyError), scaled(text_encoder, 3.0):
        raise KeyError("boom")
    assert active_adapters(text_encoder) == {"a": 1.0}


# ---------------------------------------------------------------- error paths

def test_fuse_inactive_adapter_raises(text_encoder):
    inject(text_encoder, LoRA(r=2), "a")
    inject(text_encoder, LoRA(r=2), "b")
    set_adapters(text_encoder, "a")
    with pytest.raises(ValueError, match=r"\['b'\] are not active"):
        fuse(text_encoder, ["b"])
    assert all(not h.merged for _, h in hosts(text_encoder))


def test_disable_while_fused_raises(text_encoder):
    inject(text_encoder, LoRA(r=2), "a")
    fuse(text_encoder)
    with pytest.raises(RuntimeError, match="fused"):
        disable_adapters(text_encoder)
    assert all(h.enabled for _, h in hosts(text_encoder))


def test_changing_weight_of_fused_adapter_raises(text_encoder):
    inject(text_encoder, LoRA(r=2), "a")
    fuse(text_encoder)
    with pytest.raises(RuntimeError, match="unfuse them"):
        set_adapters(text_encoder, {"a": 0.5})
    set_adapters(text_encoder, {"a": 1.0})  # same weight: allowed


def test_set_adapters_unknown_name_lists_known(text_encoder):
    inject(text_encoder, LoRA(r=2), "a")
    inject(text_encoder, LoRA(r=2), "b")
    with pytest.raises(ValueError, match=r"unknown adapters \['zz'\]; loaded: \['a', 'b'\]"):
        set_adapters(text_encoder, {"a": 1.0, "zz": 1.0})
    assert active_adapters(text_encoder) == {"a": 1.0, "b": 1.0}  # unchanged


def test_inject_rejects_duplicate_and_bad_names(text_encoder):
    inject(text_encoder, LoRA(r=2), "a")
    with pytest.raises(ValueError, match="already exists"):
        inject(text_encoder, LoRA(r=2), "a")
    for bad in ("", "x.y"):
        with pytest.raises(ValueError, match="adapter name"):
            inject(text_encoder, LoRA(r=2), bad)
    with pytest.raises(TypeError, match="method config"):
        inject(text_encoder, {"r": 2}, "c")


def test_inject_keeps_train_eval_mode(text_encoder):
    assert not text_encoder.training  # from_pretrained and the tiny builders give eval-mode models
    inputs = tiny.clip_text_inputs()
    inject(text_encoder, LoRA(r=4, dropout=0.5), "a")
    tiny.randomize(text_encoder, "a")
    assert not any(m.training for m in text_encoder.modules())
    assert torch.equal(tiny.run(text_encoder, inputs), tiny.run(text_encoder, inputs))


class GroupedConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.conv = nn.Conv2d(4, 4, 3, groups=2)


def test_inject_leaves_model_untouched_when_a_build_fails(unet):
    net = GroupedConvNet()
    types, state = tiny.module_types(net), tiny.snapshot(net)
    with pytest.raises(ValueError, match="grouped"):  # proj builds fine, conv fails: nothing is placed
        inject(net, LoRA(r=2, target=Target(types=("Linear", "Conv2d"))), "a")
    assert tiny.module_types(net) == types
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    assert all(p.requires_grad for p in net.parameters()), "freeze must not run when the build fails"

    types = tiny.module_types(unet)
    with pytest.raises(ValueError, match="matches no module"):
        inject(unet, LoRA(r=2, target=Target(include=("no_such_layer",))), "a")
    assert tiny.module_types(unet) == types
    assert all(p.requires_grad for p in unet.parameters())


def test_inject_on_pipeline_is_all_or_nothing(tiny_pipe):
    types = {c: tiny.module_types(m) for c, m in tiny_pipe.components.items() if isinstance(m, nn.Module)}
    with pytest.raises(ValueError, match="matches no module"):  # to_q exists in the unet only
        inject(tiny_pipe, LoRA(r=2, target=Target(include=("to_q",))), "a", components=("unet", "text_encoder"))
    assert adapter_names(tiny_pipe) == []
    assert {c: tiny.module_types(m) for c, m in tiny_pipe.components.items() if isinstance(m, nn.Module)} == types


# ---------------------------------------------------------------- pipelines

def test_tiny_pipeline_tokenizer_and_call(tiny_pipe, tiny_pipe_dir):
    assert (tiny_pipe_dir / "model_index.json").exists()
    tok = tiny_pipe.tokenizer
    ids = tok("a photo of a cat").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>",
                                              "<|endoftext|>"]
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of a cat"
    assert tok("zebra!").input_ids[1:-1]  # unknown words fall back to byte-level pieces
    image = tiny_pipe(**tiny.pipe_call_kwargs()).images
    assert image.shape == (1, 32, 32, 3) and torch.isfinite(torch.as_tensor(image)).all()


def test_inject_on_pipeline_goes_to_the_denoiser(tiny_pipe):
    inject(tiny_pipe, LoRA(r=2), "a")
    names = [q for q, _ in hosts(tiny_pipe)]
    assert len(names) == 32 and all(q.startswith("unet.") for q in names)


def test_inject_on_pipeline_components(tiny_pipe):
    inject(tiny_pipe, LoRA(r=2), "a", components=("unet", "text_encoder"))
    comps = [q.split(".")[0] for q, _ in hosts(tiny_pipe)]
    assert comps.count("unet") == 32 and comps.count("text_encoder") == 8  # each component's default preset
    with pytest.raises(ValueError, match=r"no component \['transformer'\]"):
        inject(tiny_pipe, LoRA(r=2), "b", components=("transformer",))


def test_pipeline_runs_with_adapters_and_weight_zero_is_the_base(tiny_pipe):
    base = tiny_pipe(**tiny.pipe_call_kwargs()).images
    inject(tiny_pipe, LoRA(r=4), "a", components=("unet", "text_encoder"))
    tiny.randomize(tiny_pipe, "a", std=0.2)
    adapted_image = tiny_pipe(**tiny.pipe_call_kwargs()).images
    assert abs(adapted_image - base).max() > 1e-4
    set_adapters(tiny_pipe, {"a": 0.0})
    assert (tiny_pipe(**tiny.pipe_call_kwargs()).images == base).all()


def _text_and_unet(pipe, ids, unet_in):
    with torch.no_grad():
        return pipe.text_encoder(ids)[0], pipe.unet(**unet_in).sample


@pytest.fixture
def pipe_with_a(tiny_pipe):
    ids = tiny_pipe.tokenizer("a photo of a cat", return_tensors="pt").input_ids
    unet_in = tiny.unet_inputs()
    base = _text_and_unet(tiny_pipe, ids, unet_in)
    inject(tiny_pipe, LoRA(r=4), "a", components=("unet", "text_encoder"))
    tiny.randomize(tiny_pipe, "a")
    return tiny_pipe, ids, unet_in, base


def _weights(pipe, name="a"):
    return {q: h.active.get(name) for q, h in hosts(pipe)}


def test_per_component_weights(pipe_with_a):
    pipe, ids, unet_in, (te_base, unet_base) = pipe_with_a
    set_adapters(pipe, {"a": {"unet": 1.0, "text_encoder": 0.0}})
    assert {w for q, w in _weights(pipe).items() if q.startswith("text_encoder.")} == {0.0}
    te_out, unet_out = _text_and_unet(pipe, ids, unet_in)
    assert torch.equal(te_out, te_base)
    assert not torch.allclose(unet_out, unet_base, atol=1e-4)


def test_per_block_weights(pipe_with_a):
    pipe = pipe_with_a[0]
    set_adapters(pipe, {"a": {"unet": 0.5, "unet.down_blocks.0": 0.0, "text_encoder": 1.0}})
    for q, w in _weights(pipe).items():
        assert w == (0.0 if q.startswith("unet.down_blocks.0.") else 0.5 if q.startswith("unet.") else 1.0), q


def test_per_component_weights_by_regex(pipe_with_a):
    pipe, ids, unet_in, (te_base, unet_base) = pipe_with_a
    set_adapters(pipe, {"a": {r"text_encoder\..*": 0.0, r"unet\.down_blocks\.0\..*": 0.5}})
    for q, w in _weights(pipe).items():
        assert w == (0.0 if q.startswith("text_encoder.") else 0.5 if q.startswith("unet.down_blocks.0.") else 1.0)
    te_out, unet_out = _text_and_unet(pipe, ids, unet_in)
    assert torch.equal(te_out, te_base)
    assert not torch.allclose(unet_out, unet_base, atol=1e-4)


# ---------------------------------------------------------------- parameter_report

# (in, out) of each unet-attn site of the tiny U-Net: 32-channel transformers (down 0, up 1 x2) and the
# 64-channel mid block, cross-attention keys/values from 32-dim text states
_UNET_ATTN_DIMS = 3 * (8 * [(32, 32)]) + 4 * [(64, 64)] + [(64, 64), (32, 64), (32, 64), (64, 64)]


def test_parameter_report_matches_hand_counts(unet):
    base_total = sum(p.numel() for p in unet.parameters())
    inject(unet, LoRA(r=2), "a")
    inject(unet, LoRA(r=4, fa=True), "b")
    lora_a = sum(2 * (i + o) for i, o in _UNET_ATTN_DIMS)
    lora_b_total = sum(4 * (i + o) for i, o in _UNET_ATTN_DIMS)
    lora_b_trainable = sum(4 * o for _, o in _UNET_ATTN_DIMS)  # LoRA-FA trains B only
    assert (lora_a, lora_b_total, lora_b_trainable) == (4992, 9984, 5120)
    report = parameter_report(unet)
    assert report.adapters == {
        # injecting "b" froze the base only (inject's freeze=True); "a" keeps training
        "a": {"method": "lora", "category": "reparameterization", "trainable": lora_a, "total": lora_a},
        "b": {"method": "lora", "category": "reparameterization", "trainable": lora_b_trainable,
              "total": lora_b_total},
    }
    assert report.categories == {"reparameterization": {"trainable": lora_a + lora_b_trainable,
                                                        "total": lora_a + lora_b_total}}
    assert report.model_total == base_total + lora_a + lora_b_total
    assert report.model_trainable == lora_a + lora_b_trainable
    assert "reparameterization" in str(report)


def test_parameter_report_on_a_pipeline(tiny_pipe):
    total = sum(p.numel() for m in tiny_pipe.components.values() if isinstance(m, nn.Module) for p in m.parameters())
    inject(tiny_pipe, LoRA(r=4), "a", components=("unet", "text_encoder"))
    n = sum(4 * (i + o) for i, o in _UNET_ATTN_DIMS) + 8 * 4 * (32 + 32)
    report = parameter_report(tiny_pipe)
    assert report.adapters["a"]["trainable"] == report.adapters["a"]["total"] == n
    assert report.model_total == total + n
    # after inject only adapter parameters require grad, in every component (the VAE too), as diffusers'
    # training scripts and peft leave a pipeline
    assert report.model_trainable == n
    assert not any(p.requires_grad for p in tiny_pipe.vae.parameters())


# ---------------------------------------------------------------- torch.compile

def test_torch_compile_matches_eager(unet):
    # inductor takes ~75 s to compile this U-Net on the 2-core test machines; aot_eager ~9 s still runs
    # dynamo and AOTAutograd through the Host wrappers
    inputs = tiny.unet_inputs()
    adapted(unet, inputs)
    eager = tiny.run(unet, inputs)
    torch._dynamo.reset()
    compiled = torch.compile(unet, backend="aot_eager")
    torch.testing.assert_close(tiny.run(compiled, inputs), eager, atol=1e-5, rtol=0)
