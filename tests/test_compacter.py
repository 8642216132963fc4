"""Compacter / Compacter++ (methods/compacter.py): the PHM weight and the adapter output against a hand
computation with torch.kron, one shared rule tensor per adapter reached from every layer (also when a stack runs
without the model's own forward), bit-exact start, trainable set, save / load, remove, the T5-base count on the
meta device, bad inputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import peft_diffusion as pd
from peft_diffusion.api import sites
from peft_diffusion.io.files import AdapterFileError
from peft_diffusion.methods import Compacter, CompacterPP, LNTuning
from test_bottleneck import _run, _same, _snapshot
import tiny


def _deltas(model, name="a"):
    return {s: site.deltas[name] for s, site in sites(model) if name in site.deltas}


def _t5(d_model=32):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    return T5EncoderModel(T5Config(vocab_size=99, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, dropout_rate=0.0)).eval()


def test_phm_weight_and_adapter_output_by_hand(make_model):
    model = make_model("t5").eval()
    pd.inject(model, Compacter(reduction=4, rank=2, phm_dim=4), "a")
    tiny.perturb_trainable(model, std=0.3)
    deltas = _deltas(model)
    rules = deltas[""].phm_rule
    assert rules.shape == (4, 4, 4)
    site = "encoder.block.1.layer.1.DenseReluDense"
    delta = deltas[site]
    for phm, shape in ((delta.adapter_down, (8, 32)), (delta.adapter_up, (32, 8))):
        expected = sum(torch.kron(rules[i], phm.s[i] @ phm.t[i].T) for i in range(4))
        assert expected.shape == shape
        torch.testing.assert_close(phm.weight(), expected, atol=1e-5, rtol=0)
    # the adapter's output on the feed-forward sub-layer: wo(relu(wi(x))) + W_up^T gelu(W_down x + b_down) + b_up
    ff = model.get_submodule(site)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = ff.wo(torch.relu(ff.wi(x)))
        w_down = sum(torch.kron(rules[i], delta.adapter_down.s[i] @ delta.adapter_down.t[i].T) for i in range(4))
        w_up = sum(torch.kron(rules[i], delta.adapter_up.s[i] @ delta.adapter_up.t[i].T) for i in range(4))
        hidden = F.gelu(base @ w_down.T + delta.adapter_down.bias)
        hand = base + hidden @ w_up.T + delta.adapter_up.bias
        torch.testing.assert_close(ff(x), hand, atol=1e-5, rtol=0)
        assert not torch.allclose(ff(x), base, atol=1e-3)


def test_one_shared_rule_tensor(make_model):
    """One phm_rule parameter per adapter; every PHM layer computes with it, its gradient sums all layers', and
    a stack run on its own (as ``generate`` runs T5's encoder) still reaches it."""
    model = make_model("t5").eval()
    pd.inject(model, Compacter(reduction=4), "a")
    rules = [n for n, _ in model.named_parameters() if n.endswith("phm_rule")]
    assert rules == ["peft_annex.deltas.a.phm_rule"]
    rule = model.peft_annex.deltas["a"].phm_rule
    layers = [d for s, d in _deltas(model).items() if s]
    assert len(layers) == 4  # 2 blocks x (self-attention, feed-forward)
    assert all(d.adapter_down.rules.get(s) is rule and d.adapter_up.rules.get(s) is rule for d in layers
               for s in (d.site,))
    tiny.perturb_trainable(model, std=0.3)
    ids = tiny.MODELS["t5"][1]()
    ids = ids["input_ids"] if isinstance(ids, dict) else ids[0]
    with torch.no_grad():
        whole = model(input_ids=ids).last_hidden_state
        alone = model.encoder(input_ids=ids).last_hidden_state  # the model-level hook does not run
    assert torch.equal(whole, alone)
    model(input_ids=ids).last_hidden_state.pow(2).mean().backward()
    assert rule.grad is not None and rule.grad.abs().sum() > 0
    pd.inject(model, CompacterPP(reduction=4), "b")  # a second adapter has rules of its own
    other = model.peft_annex.deltas["b"].phm_rule
    assert other is not rule and all(d.adapter_down.rules.get(d.site) is other for s, d in _deltas(model, "b").items()
                                     if s)


@pytest.mark.parametrize("key, config", [
    ("t5", Compacter(reduction=4)), ("t5", CompacterPP(reduction=4, rank=2)), ("bert", Compacter(reduction=4)),
    ("unet", CompacterPP(reduction=4, phm_dim=2)), ("llama", CompacterPP(reduction=4, phm_dim=2))],
    ids=lambda v: v if isinstance(v, str) else v.method)
def test_identity_trainable_round_trip_remove(key, config, make_model, tmp_path):
    model = make_model(key).eval()
    before, ref = _snapshot(model), _run(model, key)
    pd.inject(model, config, "a")
    assert torch.equal(_run(model, key), ref)  # bit-exact: the up-projection's s and bias start at zero
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    ours = {n for n, p in model.named_parameters() if ".peft_annex.deltas.a." in f".{n}"}
    assert trainable == ours and sum(n.endswith("phm_rule") for n in trainable) == 1
    roles = {"attn", "ffn"} if config.method == "compacter" else {"ffn"}
    assert len(_deltas(model)) - 1 == len(pd.Houlsby().select(model) if roles == {"attn", "ffn"}
                                          else pd.Pfeiffer().select(model))
    tiny.perturb_trainable(model, std=0.3)
    out = _run(model, key)
    assert not torch.equal(out, ref)
    path = pd.save_adapter(model, tmp_path / "a.safetensors", "a")
    other = make_model(key).eval()
    pd.load_adapter(other, path, name="a")
    torch.testing.assert_close(_run(other, key), out, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cannot be fused"):
        pd.fuse(model, ["a"])
    pd.remove(model, "a")
    _same(_snapshot(model), before)
    assert torch.equal(_run(model, key), ref)


def test_t5_base_compacter_pp_count():
    """Compacter++ on T5-base's config (meta device): after the feed-forward sub-layer of the 12 encoder and
    12 decoder blocks (24 adapters), d = 768, m = 768 // 32 = 24, n = 4, rank 1. Per adapter: down PHM
    s (4, 6, 1) + t (4, 192, 1) = 792 and its bias 24; up PHM s (4, 192, 1) + t (4, 6, 1) = 792 and its bias
    768: 2,376; 24 x 2,376 = 57,024, plus ONE shared rule tensor (4, 4, 4) = 64 for the whole model: 57,088.
    The paper also trains the layer norms (its config: unfreeze_layer_norms); LN tuning on T5-base adds 62 T5
    RMS-norm weights (12 x 2 + 1 encoder, 12 x 3 + 1 decoder) x 768 = 47,616 (T5's norms have no bias):
    104,704 together, 0.04697 % of T5-base's 222,903,552 (the paper's 0.047 %). The issue's figure, 104,768,
    is 64 more, exactly one (4, 4, 4) rule tensor more. Reading the published Compacter code
    (rabeehk/compacter, seq2seq/third_party/models/t5/modeling_t5.py, shared_phm_rule): T5ForConditionalGeneration
    creates ONE phm_rule (n, n, n) and sets it into every PHMLinear, down and up, encoder and decoder, i.e. the
    same 57,088 + 47,616 as here; AdapterHub's ``adapters`` (init_shared_parameters) also keeps one per adapter
    per model. So the extra 64 looks like a second rule set (e.g. one for the down and one for the up
    projections) in the issue's counting, not in the paper's code; we could not run that code to confirm.
    104,768 = 104,704 + 64 is checked below."""
    from transformers import T5Config, T5ForConditionalGeneration

    with torch.device("meta"):
        model = T5ForConditionalGeneration(T5Config(d_model=768, d_ff=3072, d_kv=64, num_heads=12, num_layers=12,
                                                    vocab_size=32128))
    base = sum(p.numel() for p in model.parameters())
    assert base == 222_903_552
    pd.inject(model, CompacterPP(reduction=32, phm_dim=4, rank=1), "c")
    pd.inject(model, LNTuning(), "ln")
    report = pd.parameter_report(model).adapters
    assert len(_deltas(model, "c")) == 1 + 24
    per_adapter = (4 * 6 + 4 * 192) + 24 + (4 * 192 + 4 * 6) + 768
    assert per_adapter == 2_376
    assert report["c"]["trainable"] == 24 * per_adapter + 64 == 57_088
    assert report["ln"]["trainable"] == 62 * 768 == 47_616
    total = report["c"]["trainable"] + report["ln"]["trainable"]
    assert total == 104_704 and total + 64 == 104_768
    assert round(100 * total / base, 3) == 0.047


def test_phm_dim_must_divide_both_widths_model_untouched(make_model):
    model = make_model("t5")
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"phm_dim n = 3 does not divide the hidden size d = 32"):
        pd.inject(model, Compacter(reduction=4, phm_dim=3), "a")
    with pytest.raises(ValueError, match=r"phm_dim n = 8 does not divide the bottleneck width m = 4 "
                                         r"\(d 32 // reduction 8\)"):
        pd.inject(model, CompacterPP(reduction=8, phm_dim=8), "a")
    _same(_snapshot(model), before)
    assert not list(sites(model))
    for bad in (dict(phm_dim=0), dict(rank=True), dict(rule_std=0.0), dict(rule_std="x")):
        with pytest.raises(ValueError):
            Compacter(**bad)


@pytest.mark.parametrize("saved, loaded", [(32, 48), (48, 32)])
def test_file_for_another_width_refused_model_untouched(saved, loaded, tmp_path):
    src = pd.inject(_t5(saved), CompacterPP(reduction=4), "a")
    path = pd.save_adapter(src, tmp_path / "a.safetensors", "a")
    dst = _t5(loaded)
    before = _snapshot(dst)
    with pytest.raises(AdapterFileError, match=rf"has shape .* in the file but .* in this T5EncoderModel"):
        pd.load_adapter(dst, path)
    _same(_snapshot(dst), before)
    assert not list(sites(dst))


@pytest.mark.parametrize("config", [Compacter(reduction=4), CompacterPP(reduction=4)], ids=lambda c: c.method)
def test_learns_a_perturbed_t5(config):
    """200 Adam steps (lr 3e-3, the paper's) fitting the tiny T5's outputs to those of a perturbed copy: the
    loss falls below 60 % of its start (measured: Compacter 0.258 -> 0.089 with 544 trainable parameters,
    Compacter++ 0.258 -> 0.132 with 304) and the shared rules move off their N(0, 1e-4) init."""
    ids = torch.randint(0, 99, (8, 8), generator=torch.Generator().manual_seed(0))
    teacher = tiny.tiny_t5_encoder()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
        target = teacher(input_ids=ids).last_hidden_state
    model = pd.inject(tiny.tiny_t5_encoder(), config, "a").train()
    rule0 = model.peft_annex.deltas["a"].phm_rule.detach().clone()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(200):
        loss = (model(input_ids=ids).last_hidden_state - target).pow(2).mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.6 * losses[0]
    assert (model.peft_annex.deltas["a"].phm_rule - rule0).abs().max() > 1e-3
