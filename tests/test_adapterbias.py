"""AdapterBias (``peft_diffusion/methods/adapter_bias.py``, arXiv 2205.00305): placement on every family the
bottleneck adapters support, bit-exact start, the shift alpha_i v against BERT's and LLaMA's feed-forward run
by hand (the published ``BertOutput``), its rank-one token dependence, what trains, files, remove, counts on
BERT-base / BERT-large (meta device), bad inputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import peft_diffusion as pd
import tiny
from peft_diffusion.api import sites
from peft_diffusion.methods import AdapterBias
from peft_diffusion.target import Target
from test_bottleneck import KEYS, _run, _same, _snapshot


def _perturb(obj, name="a", seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, site in sites(obj):
            if name in site.deltas:
                for p in site.deltas[name].parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _delta(model, site, name="a"):
    return dict(sites(model))[site].deltas[name]


@pytest.mark.parametrize("alpha_from", ["intermediate", "output"])
@pytest.mark.parametrize("key", KEYS)
def test_every_family_identity_trainable_files_remove(key, alpha_from, make_model, tmp_path):
    model = make_model(key).eval()
    before, ref = _snapshot(model), _run(model, key)
    pd.inject(model, AdapterBias(alpha_from=alpha_from), "a")
    assert torch.equal(_run(model, key), ref)  # v = 0: bit-exact
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".deltas.a.", 1)[1] in AdapterBias.param_names for n in trainable)
    _perturb(model)
    out = _run(model, key)
    assert not torch.allclose(out, ref, atol=1e-5)
    path = pd.save_adapter(model, tmp_path / "a.safetensors", "a")
    other = make_model(key).eval()
    pd.load_adapter(other, path, name="a")
    torch.testing.assert_close(_run(other, key), out, rtol=0, atol=0)
    pd.remove(model, "a")
    _same(_snapshot(model), before)
    assert torch.equal(_run(model, key), ref)


def test_placement_is_the_ffn_output_projection(make_model):
    def placed(key):
        return sorted(s for s, _ in sites(pd.inject(make_model(key), AdapterBias(), "a")))

    assert placed("bert") == [f"encoder.layer.{i}.output.dense" for i in (0, 1)]
    assert placed("t5") == [f"encoder.block.{i}.layer.1.DenseReluDense.wo" for i in (0, 1)]
    assert placed("gpt2") == [f"transformer.h.{i}.mlp.c_proj" for i in (0, 1)]
    assert placed("llama") == [f"model.layers.{i}.mlp.down_proj" for i in (0, 1)]
    assert placed("clip-text") == [f"encoder.layers.{i}.mlp.fc2" for i in (0, 1)]
    unet = placed("unet")
    assert len(unet) == 4 and all(s.endswith("transformer_blocks.0.ff.net.2") for s in unet)
    model = pd.inject(make_model("bert"), AdapterBias(), "a")
    delta = _delta(model, "encoder.layer.0.output.dense")
    assert delta.adapter_vector.shape == (32,) and delta.adapter_alpha.weight.shape == (1, 37)  # d = 32, d_ff = 37
    assert torch.equal(delta.adapter_vector, torch.zeros(32))
    model = pd.inject(make_model("bert"), AdapterBias(alpha_from="output"), "a")
    assert _delta(model, "encoder.layer.0.output.dense").adapter_alpha.weight.shape == (1, 32)


def test_bert_output_against_the_published_formula(make_model):
    """BertOutput: LN(dropout(dense(r)) + L_alpha(r) v + x), r the intermediate (the published code's forward)."""
    model = make_model("bert").eval()
    pd.inject(model, AdapterBias(), "a")
    _perturb(model)
    out_mod = model.encoder.layer[0].output
    delta = _delta(model, "encoder.layer.0.output.dense")
    g = torch.Generator().manual_seed(3)
    r, x = torch.randn(2, 5, 37, generator=g), torch.randn(2, 5, 32, generator=g)
    w, b = out_mod.dense.weight, out_mod.dense.bias
    wa, ba, v = delta.adapter_alpha.weight[0], delta.adapter_alpha.bias[0], delta.adapter_vector
    with torch.no_grad():
        h = torch.einsum("bti,oi->bto", r, w) + b
        alpha = (r * wa).sum(-1, keepdim=True) + ba  # one number per token
        expected = F.layer_norm(h + alpha * v + x, (32,), out_mod.LayerNorm.weight, out_mod.LayerNorm.bias,
                                out_mod.LayerNorm.eps)
        torch.testing.assert_close(out_mod(r, x), expected, atol=1e-5, rtol=0)
        pd.set_adapters(model, {"a": 0.5})  # the weight scales the shift
        expected = F.layer_norm(h + 0.5 * alpha * v + x, (32,), out_mod.LayerNorm.weight, out_mod.LayerNorm.bias,
                                out_mod.LayerNorm.eps)
        torch.testing.assert_close(out_mod(r, x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("alpha_from", ["intermediate", "output"])
def test_llama_mlp_shift_is_rank_one_and_token_dependent(alpha_from, make_model):
    model = make_model("llama").eval()
    mlp = model.model.layers[1].mlp
    x = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        inter = F.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
        plain = inter @ mlp.down_proj.weight.T
        torch.testing.assert_close(mlp(x), plain, atol=1e-5, rtol=0)
    pd.inject(model, AdapterBias(alpha_from=alpha_from), "a")
    _perturb(model)
    delta = _delta(model, "model.layers.1.mlp.down_proj")
    src = inter if alpha_from == "intermediate" else plain
    with torch.no_grad():
        alpha = src @ delta.adapter_alpha.weight[0] + delta.adapter_alpha.bias  # (1, 6)
        shift = mlp(x) - plain
        torch.testing.assert_close(shift, alpha[..., None] * delta.adapter_vector, atol=1e-5, rtol=0)
    # B = v alpha^T: every token's shift lies along v, with its own size
    assert torch.linalg.matrix_rank(shift[0], atol=1e-4) == 1
    assert alpha.std() > 1e-3  # tokens get shifts of different sizes


def test_only_v_and_alpha_train_and_learn(make_model):
    model = make_model("bert")
    pd.inject(model, AdapterBias(), "a")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(trainable) == sorted(f"encoder.layer.{i}.output.dense.peft_annex.deltas.a.{k}" for i in (0, 1)
                                       for k in AdapterBias.param_names)
    before = {k: v.clone() for k, v in model.state_dict().items() if ".deltas." not in k}
    x = tiny.token_inputs(batch=2)
    target = torch.randn(32, generator=torch.Generator().manual_seed(5))
    model.train()
    opt = torch.optim.Adam(trainable.values(), lr=1e-2)
    losses = []
    for step in range(25):
        loss = (model(**x).last_hidden_state @ target).mean()
        opt.zero_grad()
        loss.backward()
        if step == 0:  # v = 0: only v gets a gradient at first (L_alpha's is v times something)
            assert all(p.grad.abs().sum() > 0 for n, p in trainable.items() if n.endswith("adapter_vector"))
            assert all(p.grad.abs().sum() == 0 for n, p in trainable.items() if "adapter_alpha" in n)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses[::5]
    after = {k: v for k, v in model.state_dict().items() if ".deltas." not in k}
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("hidden, layers, alpha_from, count", [
    (768, 12, "intermediate", 46_092), (1024, 24, "intermediate", 122_904), (768, 12, "output", 18_444)])
def test_bert_counts(hidden, layers, alpha_from, count):
    from transformers import BertConfig, BertModel

    with torch.device("meta"):
        bert = BertModel(BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                    intermediate_size=4 * hidden))
    pd.inject(bert, AdapterBias(alpha_from=alpha_from), "n")
    src = 4 * hidden if alpha_from == "intermediate" else hidden
    assert pd.parameter_report(bert).adapters["n"]["trainable"] == layers * (hidden + src + 1) == count


@pytest.mark.parametrize("config, message", [
    (AdapterBias(target=Target(types=("BertIntermediate",))), r"BertIntermediate.*not a block.*BasicTransformerBlock"),
    (AdapterBias(target=Target(include=("nothing",))), "AdapterBias target .* matches no module"),
])
def test_bad_target_is_refused_and_model_untouched(config, message, make_model):
    model = make_model("bert")
    before = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        pd.inject(model, config, "a")
    _same(_snapshot(model), before)


def test_bad_settings_unknown_model_and_fuse(make_model):
    with pytest.raises(ValueError, match=r"AdapterBias alpha_from must be one of \['intermediate', 'output'\]"):
        AdapterBias(alpha_from="input")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"AdapterBias finds no block it knows in this Sequential"):
        pd.inject(model, AdapterBias(), "a")
    assert not list(sites(model))
    model = pd.inject(make_model("gpt2").eval(), AdapterBias(), "a")
    _perturb(model)
    out = _run(model, "gpt2")
    with pytest.raises(ValueError, match="cannot be fused"):
        pd.fuse(model, ["a"])
    pd.fuse(model)  # leaves it running, unfused
    assert torch.equal(_run(model, "gpt2"), out)
