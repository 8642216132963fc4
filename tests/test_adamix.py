"""AdaMix (methods/adamix.py): bit-exact start with the modules as copies of one init, stochastic routing checked
against a by-hand replay of torch's generator, the averaged (merged) adapter against a by-hand single adapter
with mean weights and against a Pfeiffer adapter loaded with them, ``merge_experts``, the consistency loss by
hand, placement and sharing options, save / load, remove, refusal to fuse, BERT-base / RoBERTa-large counts on
the meta device, bad inputs."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import peft_diffusion as pd
import tiny
from peft_diffusion.api import sites
from peft_diffusion.methods.adamix import AdaMixDelta, MixtureLinear, consistency_loss
from peft_diffusion.target import Target
from test_bottleneck import _same, _snapshot

MLP = "model.layers.1.mlp"


def _deltas(model, name="a"):
    return {s: site.deltas[name] for s, site in sites(model) if name in site.deltas}


def _llama_mlp_base(mlp, x):
    """LLaMA's MLP by hand from its (unhooked) projections."""
    return mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))


def _x(shape=(2, 5, 32), seed=3):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_identity_at_init_and_modules_start_as_copies(make_model):
    model = make_model("llama")
    inputs = tiny.MODELS["llama"][1]()
    base = tiny.run(model, inputs)
    pd.inject(model, pd.AdaMix(reduction=4, num_experts=3, share_up=False), "a")
    deltas = _deltas(model)
    assert sorted(deltas) == ["model.layers.0.mlp", "model.layers.1.mlp"]  # after the FFN only
    for d in deltas.values():
        down, up = d.adapter_down, d.adapter_up
        assert down.weight.shape == (3, 8, 32) and up.weight.shape == (3, 32, 8)
        assert all(torch.equal(down.weight[i], down.weight[0]) and torch.equal(down.bias[i], down.bias[0])
                   for i in range(3))
        assert down.weight.abs().sum() > 0 and not up.weight.any() and not up.bias.any()
    assert torch.equal(tiny.run(model, inputs), base)
    model.train()  # every route starts at the identity too
    with torch.no_grad():
        assert torch.equal(tiny.main_output(model(**inputs)), base)


@pytest.mark.parametrize("share_up, share_down", [(False, False), (True, False), (False, True)])
def test_training_route_by_hand(make_model, share_up, share_down):
    """In training each call draws a down-projection i, then an up-projection j, uniformly from torch's
    generator; the output is the sub-layer's plus gelu(h W_down_i^T + b_down_i) W_up_j^T + b_up_j."""
    model = make_model("llama")
    pd.inject(model, pd.AdaMix(reduction=4, num_experts=4, share_up=share_up, share_down=share_down), "a")
    tiny.perturb_trainable(model, std=0.3)
    model.train()
    mlp, delta = model.get_submodule(MLP), _deltas(model)[MLP]
    wd, bd = delta.adapter_down.weight, delta.adapter_down.bias
    wu, bu = delta.adapter_up.weight, delta.adapter_up.bias
    assert len(wu) == (1 if share_up else 4) and len(wd) == (1 if share_down else 4)
    x = _x()
    routes, outputs = set(), []
    with torch.no_grad():
        h = _llama_mlp_base(mlp, x)
        for seed in range(12):
            torch.manual_seed(seed)  # replay the draws the adapter makes (none for a shared projection)
            i = int(torch.randint(4, (1,))) if len(wd) > 1 else 0
            j = int(torch.randint(4, (1,))) if len(wu) > 1 else 0
            hand = h + F.gelu(h @ wd[i].T + bd[i]) @ wu[j].T + bu[j]
            torch.manual_seed(seed)
            out = mlp(x)
            torch.testing.assert_close(out, hand, atol=1e-5, rtol=0)
            routes.add((i, j))
            outputs.append(out)
    assert len(routes) > 3  # the routes vary from call to call
    assert not torch.allclose(outputs[0], outputs[1]) or not torch.allclose(outputs[0], outputs[2])
    torch.manual_seed(7)
    with torch.no_grad():
        again = mlp(x)
    torch.manual_seed(7)
    with torch.no_grad():
        assert torch.equal(mlp(x), again)  # seedable


def test_eval_uses_the_averaged_adapter_by_hand(make_model):
    """Eval is deterministic and equals ONE adapter whose weights are the means of the modules; merge_experts
    swaps in that adapter (a Pfeiffer delta), and a Pfeiffer adapter loaded with the means gives the same."""
    model = make_model("llama")
    inputs = tiny.MODELS["llama"][1]()
    reference = copy.deepcopy(model)
    pd.inject(model, pd.AdaMix(reduction=4, num_experts=4, share_up=False), "a")
    tiny.perturb_trainable(model, std=0.3)
    mlp, delta = model.get_submodule(MLP), _deltas(model)[MLP]
    x = _x()
    with torch.no_grad():
        wd, bd = sum(delta.adapter_down.weight) / 4, sum(delta.adapter_down.bias) / 4
        wu, bu = sum(delta.adapter_up.weight) / 4, sum(delta.adapter_up.bias) / 4
        h = _llama_mlp_base(mlp, x)
        hand = h + F.gelu(h @ wd.T + bd) @ wu.T + bu
        torch.testing.assert_close(mlp(x), hand, atol=1e-5, rtol=0)
        # the average of the products would be another function: merging averages weights, not outputs
        outputs = sum(F.gelu(h @ delta.adapter_down.weight[i].T + delta.adapter_down.bias[i])
                      @ delta.adapter_up.weight[i].T + delta.adapter_up.bias[i] for i in range(4)) / 4
        assert not torch.allclose(h + outputs, hand, atol=1e-4)
    out = tiny.run(model, inputs)
    assert torch.equal(tiny.run(model, inputs), out)  # deterministic
    means = {s: {k: v.mean(0).clone() for k, v in d.state_dict().items()} for s, d in _deltas(model).items()}

    pd.inject(reference, pd.Pfeiffer(size=8, activation="gelu"), "p")
    with torch.no_grad():
        for s, d in _deltas(reference, "p").items():
            d.load_state_dict(means[s])
    torch.testing.assert_close(tiny.run(reference, inputs), out, atol=1e-5, rtol=0)

    assert pd.merge_experts(model) == 2
    merged = _deltas(model)
    assert all(type(d).__name__ == "BottleneckDelta" and d.config.method == "pfeiffer" for d in merged.values())
    assert all(torch.equal(merged[s].state_dict()[k], means[s][k]) for s in merged for k in means[s])
    torch.testing.assert_close(tiny.run(model, inputs), out, atol=1e-5, rtol=0)
    model.train()  # a merged adapter no longer routes
    with torch.no_grad():
        torch.testing.assert_close(tiny.main_output(model(**inputs)), out, atol=1e-5, rtol=0)


def test_merged_adapter_saves_loads_and_removes(make_model, tmp_path):
    model = make_model("bert")
    before = _snapshot(model)
    inputs = tiny.MODELS["bert"][1]()
    pd.inject(model, pd.AdaMix(reduction=4, attention=True), "a")
    assert sorted(_deltas(model)) == ["encoder.layer.0.attention.output.dense", "encoder.layer.0.output.dense",
                                      "encoder.layer.1.attention.output.dense", "encoder.layer.1.output.dense"]
    tiny.perturb_trainable(model)
    path = pd.save_adapter(model, tmp_path / "mix.safetensors", "a")
    fresh = make_model("bert")
    pd.load_adapter(fresh, path, name="a")
    out = tiny.run(model, inputs)
    torch.testing.assert_close(tiny.run(fresh, inputs), out, atol=1e-6, rtol=0)
    assert pd.merge_experts(model, "a") == 4
    assert pd.parameter_report(model).adapters["a"]["method"] == "houlsby"
    path = pd.save_adapter(model, tmp_path / "merged.safetensors", "a")
    other = make_model("bert")
    pd.load_adapter(other, path, name="m")
    torch.testing.assert_close(tiny.run(other, inputs), out, atol=1e-5, rtol=0)
    pd.remove(model)
    _same(_snapshot(model), before)


def test_not_mergeable_into_the_base(make_model):
    model = make_model("gpt2")
    pd.inject(model, pd.AdaMix(reduction=4), "a")
    tiny.perturb_trainable(model)
    inputs = tiny.MODELS["gpt2"][1]()
    out = tiny.run(model, inputs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="cannot be fused"):
        pd.fuse(model, ["a"])
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    pd.fuse(model)  # the default leaves it running
    assert torch.equal(tiny.run(model, inputs), out)


def test_trainable_set_and_gradients(make_model):
    model = make_model("llama")
    pd.inject(model, pd.AdaMix(reduction=4, share_up=False), "a")
    ours = {id(p) for d in _deltas(model).values() for p in d.parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == ours
    model.train()
    torch.manual_seed(0)
    tiny.main_output(model(**tiny.MODELS["llama"][1]())).pow(2).mean().backward()
    for d in _deltas(model).values():
        # one up-projection module got the gradient, the others none (zero rows)
        used = [i for i in range(4) if d.adapter_up.weight.grad[i].abs().sum() > 0]
        assert len(used) == 1


def test_consistency_loss_by_hand():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 4, 5, generator=g, requires_grad=True)
    b = torch.randn(3, 4, 5, generator=g, requires_grad=True)
    p, q = a.softmax(-1), b.softmax(-1)
    kl_pq = (p * (p.log() - q.log())).sum(-1)  # KL(p || q) per row
    kl_qp = (q * (q.log() - p.log())).sum(-1)
    hand = 0.5 * (kl_pq + kl_qp).mean()
    loss = consistency_loss(a, b)
    torch.testing.assert_close(loss, hand, atol=1e-6, rtol=0)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    torch.testing.assert_close(consistency_loss(a, b, mask=mask), 0.5 * (kl_pq + kl_qp)[mask.bool()].mean(),
                               atol=1e-6, rtol=0)
    assert consistency_loss(a, a.detach().clone()).abs() < 1e-7
    loss.backward()  # each pass learns toward the other, detached, as the published code does
    ga = a.grad.clone()
    a.grad = None
    b.grad = None
    F.kl_div(F.log_softmax(a.reshape(-1, 5), -1), q.detach().reshape(-1, 5), reduction="batchmean").mul(0.5).backward()
    torch.testing.assert_close(ga, a.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(consistency_loss(a, b, kind="mse"), ((a - b) ** 2).mean(), atol=1e-6, rtol=0)


def test_two_stochastic_passes_disagree_and_the_loss_trains_the_adapter(make_model):
    model = make_model("llama")
    pd.inject(model, pd.AdaMix(reduction=4, num_experts=4, share_up=False), "a")
    tiny.perturb_trainable(model, std=0.3)
    model.train()
    inputs = tiny.MODELS["llama"][1]()
    torch.manual_seed(1)
    losses = []
    for _ in range(4):
        out1, out2 = tiny.main_output(model(**inputs)), tiny.main_output(model(**inputs))
        losses.append(consistency_loss(out1, out2))
    assert max(float(v.detach()) for v in losses) > 0
    sum(losses).backward()
    grads = [p.grad for d in _deltas(model).values() for p in d.parameters()]
    assert any(gr is not None and gr.abs().sum() > 0 for gr in grads)


@pytest.mark.parametrize("hidden, layers, size, trained, merged", [
    (768, 12, 48, 2_223_360, 894_528),     # BERT-base, the published script: the paper's 0.89 M
    (1024, 24, 16, 1_992_192, 811_392),    # RoBERTa-large's sizes (BERT layout): the paper's 0.8 M
])
def test_bert_counts_on_meta(hidden, layers, size, trained, merged):
    from transformers import BertConfig, BertModel
    with torch.device("meta"):
        bert = BertModel(BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                    intermediate_size=4 * hidden))
    pd.inject(bert, pd.AdaMix(size=size), "a")  # M = 4, share_up: 4 down-projections and one up-projection
    down, up = hidden * size + size, size * hidden + hidden
    assert pd.parameter_report(bert).adapters["a"]["trainable"] == layers * (4 * down + up) == trained
    pd.merge_experts(bert)
    assert pd.parameter_report(bert).adapters["a"]["trainable"] == layers * (down + up) == merged


def test_other_backbones_start_bit_exact(make_model):
    for key, cfg in (("unet", pd.AdaMix(reduction=4)), ("clip-text", pd.AdaMix(reduction=4, attention=True)),
                     ("t5", pd.AdaMix(reduction=4, share_down=True)), ("pixart", pd.AdaMix(size=4))):
        model = make_model(key)
        inputs = tiny.MODELS[key][1]()
        base = tiny.run(model, inputs)
        pd.inject(model, cfg, "a")
        assert _deltas(model) and all(isinstance(d, AdaMixDelta) for d in _deltas(model).values())
        assert torch.equal(tiny.run(model, inputs), base)


def test_bad_inputs_are_refused_and_model_untouched(make_model):
    for bad in (dict(num_experts=0), dict(num_experts=2.0), dict(share_up="yes"), dict(attention=1),
                dict(reduction=0), dict(activation="softmax")):
        with pytest.raises(ValueError):
            pd.AdaMix(**bad)
    model = make_model("bert")
    before = _snapshot(model)
    with pytest.raises(ValueError, match="matches no module"):
        pd.inject(model, pd.AdaMix(target=Target(include=("nothing",))), "a")
    _same(_snapshot(model), before)
    with pytest.raises(ValueError, match="no AdaMix adapter named 'a'"):
        pd.merge_experts(model, "a")
    with pytest.raises(ValueError, match="one shape"):
        consistency_loss(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="kind must be"):
        consistency_loss(torch.zeros(2, 3), torch.zeros(2, 3), kind="js")
    with pytest.raises(ValueError, match="mask has shape"):
        consistency_loss(torch.zeros(2, 3), torch.zeros(2, 3), mask=torch.ones(3))


def test_mixture_linear_alone():
    m = MixtureLinear(4, 3, 5, "cpu", torch.float32, init=True)
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    x = _x((2, 4))
    m.eval()
    torch.testing.assert_close(m(x), x @ m.weight.mean(0).T + m.bias.mean(0), atol=1e-6, rtol=0)
    m.train()
    torch.manual_seed(4)
    i = int(torch.randint(5, (1,)))
    torch.manual_seed(4)
    torch.testing.assert_close(m(x), x @ m.weight[i].T + m.bias[i], atol=1e-6, rtol=0)
