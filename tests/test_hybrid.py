"""MAM (methods/mam.py) and UniPELT (methods/unipelt.py): each equals its parts injected separately with the same
tensors (UniPELT with its gates forced to 1), UniPELT's three gates against hand computations, the folded file
round trip, counts on BERT-base's config (meta device) against the parts and by hand, bad input."""
from __future__ import annotations

import pytest
import torch

import tiny
import peft_diffusion as pd
from peft_diffusion.api import sites
from peft_diffusion.methods import MAM, LoRA, ParallelAdapter, Pfeiffer, PrefixTuning, PTuningV2, UniPELT
from peft_diffusion.methods import fold_prefix
from peft_diffusion.methods.prefix_kv import attention_modules, offsets
from peft_diffusion.target import Target


def deltas(model, name) -> dict:
    """{site: delta} of adapter ``name`` (its saved parts; the per-layer injections are left out)."""
    return {q: s.deltas[name] for q, s in sites(model) if name in s.deltas and not s.deltas[name].transient}


def inputs(key, batch=2):
    if key == "unet":
        return tiny.unet_inputs(batch=batch)
    x = tiny.token_inputs(batch=batch)
    mask = torch.ones(batch, 8, dtype=torch.long)
    mask[-1, 5:] = 0  # a padded row
    return {**x, "attention_mask": mask}


def out(model, x):
    with torch.no_grad():
        return tiny.main_output(tiny.call(model, x))


def randomize(model, name, seed=3):
    """Every parameter of adapter ``name`` to random values (zero-initialised ones included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for d in deltas(model, name).values():
            for p in d.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def copy_parts(hybrid: dict, parts: dict) -> None:
    """Load each part's delta with the hybrid's tensors at the same site (the hybrid's gates left out)."""
    for site, delta in hybrid.items():
        state = {k: v for k, v in delta.state_dict().items() if "gate" not in k}
        parts[site].load_state_dict(state)


@pytest.mark.parametrize("key", ["bert", "llama", "unet"])
def test_mam_equals_prefix_plus_parallel_adapter(key):
    projection = key != "unet"
    cfg = MAM(num_virtual_tokens=3, size=8, scale=4.0, encoder_hidden_size=8, prefix_projection=projection)
    ours = tiny.MODELS[key][0]()
    pd.inject(ours, cfg, "m")
    randomize(ours, "m")
    theirs = tiny.MODELS[key][0]()
    pd.inject(theirs, PrefixTuning(num_virtual_tokens=3, encoder_hidden_size=8, prefix_projection=projection), "p")
    pd.inject(theirs, ParallelAdapter(size=8, scale=4.0), "a")
    ours_d = deltas(ours, "m")
    assert set(ours_d) == {""} | set(deltas(theirs, "a")) and set(deltas(theirs, "p")) == {""}
    copy_parts(ours_d, {**deltas(theirs, "a"), **deltas(theirs, "p")})
    x = inputs(key)
    got, want = out(ours, x), out(theirs, x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    pd.set_adapters(theirs, ["p"])  # the adapter part matters: prefixes alone differ
    assert (out(theirs, x) - got).abs().max() > 1e-3


def force_gates(model, name, value=50.0):
    """Every gate of UniPELT adapter ``name`` to sigmoid(value) whatever the input (50: exactly 1.0 in float32)."""
    with torch.no_grad():
        for d in deltas(model, name).values():
            for n, p in d.named_parameters():
                if "gate" in n:
                    p.fill_(0.0) if n.endswith("weight") else p.fill_(value)


@pytest.mark.parametrize("key", ["bert", "llama", "unet"])
def test_unipelt_with_gates_at_one_equals_its_parts(key):
    cfg = UniPELT(num_virtual_tokens=3, encoder_hidden_size=8, r=2, alpha=4, size=8)
    ours = tiny.MODELS[key][0]()
    pd.inject(ours, cfg, "u")
    randomize(ours, "u")
    force_gates(ours, "u")
    ours_d = deltas(ours, "u")
    lora_sites = sorted(s for s, d in ours_d.items() if hasattr(d, "lora_A"))
    theirs = tiny.MODELS[key][0]()
    pd.inject(theirs, LoRA(r=2, alpha=4, target=Target(include=tuple(lora_sites))), "l")
    pd.inject(theirs, PrefixTuning(num_virtual_tokens=3, encoder_hidden_size=8), "p")
    pd.inject(theirs, Pfeiffer(size=8), "a")
    parts = {**deltas(theirs, "l"), **deltas(theirs, "p"), **deltas(theirs, "a")}
    assert sorted(parts) == sorted(ours_d) and sorted(deltas(theirs, "l")) == lora_sites
    copy_parts(ours_d, parts)
    x = inputs(key)
    got = out(ours, x)
    torch.testing.assert_close(got, out(theirs, x), atol=1e-5, rtol=0)
    force_gates(ours, "u", 0.0)  # the gates act: at 0.5 the output moves
    assert (out(ours, x) - got).abs().max() > 1e-3


def test_unipelt_lora_and_adapter_gates_by_hand():
    """G_L = mean over tokens of sigmoid(w.x_t + b) per example on the LoRA delta; G_A likewise from the adapter's
    input h on its branch."""
    model = tiny.tiny_bert()
    pd.inject(model, UniPELT(num_virtual_tokens=2, prefix_projection=False, r=2, alpha=4, size=8), "u")
    randomize(model, "u")
    layer = model.encoder.layer[0]
    d = layer.attention.self.query.deltas["u"]
    x = torch.randn(2, 5, 32)
    base = layer.attention.self.query.base
    g = torch.sigmoid(x @ d.gate.weight.T + d.gate.bias).mean(1, keepdim=True)  # one per example
    want = base(x) + g * (4 / 2) * (x @ d.lora_A.weight.T @ d.lora_B.weight.T)
    with torch.no_grad():
        torch.testing.assert_close(layer.attention.self.query(x), want, atol=1e-5, rtol=0)
    a = layer.output.dense.peft_annex.deltas["u"]
    h = torch.randn(2, 5, 37)
    with torch.no_grad():
        y = layer.output.dense(h)
        base_y = torch.nn.functional.linear(h, layer.output.dense.weight, layer.output.dense.bias)
        branch = torch.relu(base_y @ a.adapter_down.weight.T + a.adapter_down.bias) @ a.adapter_up.weight.T \
            + a.adapter_up.bias
        want = base_y + torch.sigmoid(base_y @ a.gate.weight.T + a.gate.bias).mean(1, keepdim=True) * branch
    torch.testing.assert_close(y, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("key", ["bert", "llama", "unet"])
def test_unipelt_prefix_gate_by_hand(key):
    """G_P = mean over tokens of sigmoid(w.x_t + b) per example and layer, x the attention input: example i's
    output equals P-tuning v2 with each layer's table columns times G_P(l, i) (LoRA B and adapter W_up at zero).
    BERT and LLaMA: the cache path; the U-Net: the rows put before the cross-attention's to_k / to_v outputs."""
    model = tiny.MODELS[key][0]()
    pd.inject(model, UniPELT(num_virtual_tokens=3, prefix_projection=False, r=2, size=8), "u")
    src = deltas(model, "u")[""]
    with torch.no_grad():
        for lin in src.prefix_gate:
            lin.weight.normal_(0, 0.5)
            lin.bias.normal_(0, 0.5)
    attn = [m for _, m in attention_modules(model, "test")]
    seen = {}  # layer -> its input (the U-Net runs its layers in another order than the model lists them)
    def keep(i):
        return lambda m, a, k: seen.__setitem__(i, a[0] if a else k["hidden_states"])

    handles = [m.register_forward_pre_hook(keep(i), with_kwargs=True) for i, m in enumerate(attn)]
    x = inputs(key)
    got = out(model, x)
    for h in handles:
        h.remove()
    gates = torch.stack([torch.sigmoid(lin(h)).mean(1).flatten() for lin, h in zip(src.prefix_gate, [seen[i] for i in range(len(attn))])])
    assert gates.shape == (len(attn), 2) and (gates - 0.5).abs().max() > 0.01
    at = offsets(src.config.geometry)
    for i in range(2):
        ref = tiny.MODELS[key][0]()
        pd.inject(ref, PTuningV2(num_virtual_tokens=3), "p")
        with torch.no_grad():
            table = src.prefix.detach().clone()
            for l in range(len(attn)):
                table[:, at[l]:at[l + 1]] *= gates[l, i]
            deltas(ref, "p")[""].prefix.copy_(table)
        row = {k: v[i:i + 1] if v.dim() else v for k, v in x.items()}
        torch.testing.assert_close(out(ref, row), got[i:i + 1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("fold", ["trainer", "fold_prefix"])
@pytest.mark.parametrize("method", ["mam", "unipelt"])
def test_trainable_fold_and_file_round_trip(method, fold, tmp_path):
    """Only the hybrid's parameters train; the trainer's last step (or ``fold_prefix``) folds the prefix MLP
    (every part then carries the folded config); the one file loads into a fresh model with the same outputs;
    remove restores it all."""
    cfg = (MAM(num_virtual_tokens=3, size=8, encoder_hidden_size=8) if method == "mam"
           else UniPELT(num_virtual_tokens=3, encoder_hidden_size=8, r=2, size=8))
    model = tiny.tiny_llama()
    types, hooks, state = tiny.module_types(model), tiny.hooks_and_processors(model), tiny.snapshot(model)
    pd.inject(model, cfg, "h")
    ours = {id(p) for d in deltas(model, "h").values() for p in d.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and {id(p) for p in trainable} == ours
    randomize(model, "h")
    x = inputs("llama")
    before = out(model, x)
    if fold == "trainer":
        pd.api.after_step(model, 1, 2)
        assert deltas(model, "h")[""].config.prefix_projection
        pd.api.after_step(model, 2, 2)
    else:
        assert fold_prefix(model, "h") == 1
    folded = deltas(model, "h")
    assert "prefix" in folded[""].state_dict() and "embedding.weight" not in folded[""].state_dict()
    assert all(not d.config.prefix_projection for d in folded.values())
    torch.testing.assert_close(out(model, x), before, atol=1e-5, rtol=0)
    path = pd.save_adapter(model, tmp_path / "h.safetensors", "h")
    fresh = tiny.tiny_llama()
    pd.load_adapter(fresh, path)
    torch.testing.assert_close(out(fresh, x), before, atol=1e-5, rtol=0)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    pd.remove(model)
    assert tiny.module_types(model) == types and tiny.hooks_and_processors(model) == hooks
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


# ---------------------------------------------------------------- counts on BERT-base's config (meta device)

def _count(model, config) -> int:
    pd.inject(model, config, "c")
    n = pd.parameter_report(model).adapters["c"]["trainable"]
    pd.remove(model)
    return n


def test_counts_on_bert_base():
    """BERT-base (12 layers, d = 768, table width 12 x 2 x 768 = 18,432), the defaults:
    MAM (n = 30, prefix MLP hidden = 768, parallel adapter 512): E 23,040 + MLP 590,592 + 14,174,208 = 14,787,840
    (552,960 once folded) + adapters 12 x 787,712 = 9,452,544: 24,240,384 while training, 10,005,504 folded.
    UniPELT (n = 10, MLP hidden 512, LoRA r = 8 on q/v, adapter 48): prefix 7,680 + 393,728 + 9,455,616 =
    9,857,024 (184,320 folded) + prefix gates 12 x 769 + LoRA 24 x 12,288 = 294,912 + LoRA gates 24 x 769 +
    adapters 12 x 74,544 = 894,528 + adapter gates 12 x 769: 11,083,376 while training, 1,410,672 folded."""
    from transformers import BertConfig, BertModel

    with torch.device("meta"):
        bert = BertModel(BertConfig())
    mam, uni = _count(bert, MAM()), _count(bert, UniPELT())
    assert mam == _count(bert, PrefixTuning(num_virtual_tokens=30)) + _count(bert, ParallelAdapter(size=512))
    gates = 12 * 769 + 24 * 769 + 12 * 769
    parts = (_count(bert, PrefixTuning(num_virtual_tokens=10, encoder_hidden_size=512))
             + _count(bert, LoRA(r=8, target=Target(include=("query", "value"))))
             + _count(bert, Pfeiffer(size=48)))
    assert uni == parts + gates
    w = 12 * 2 * 768
    assert mam == 30 * 768 + (768 * 768 + 768) + (768 * w + w) + 12 * (2 * 768 * 512 + 512 + 768) == 24_240_384
    assert uni == (10 * 768 + (768 * 512 + 512) + (512 * w + w) + 24 * 2 * 8 * 768 + 12 * (2 * 768 * 48 + 48 + 768)
                   + gates) == 11_083_376
    assert 30 * w + 12 * 787_712 == 10_005_504 and 10 * w + gates + 294_912 + 894_528 == 1_410_672


# ---------------------------------------------------------------- bad input

def _untouched(model, make):
    types, hooks, state = tiny.module_types(model), tiny.hooks_and_processors(model), tiny.snapshot(model)
    make()
    assert tiny.module_types(model) == types and tiny.hooks_and_processors(model) == hooks
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("config, part", [(MAM(), "MAM's prefix-tuning part"), (UniPELT(), "UniPELT's prefix part")])
def test_no_supported_attention_names_the_part_and_class(config, part):
    model = tiny.tiny_gpt2()

    def make():
        with pytest.raises(ValueError, match=rf"{part}.*GPT2Attention.*supported"):
            pd.inject(model, config, "h")
    _untouched(model, make)


def test_unipelt_refuses_clip_recomputed_attention():
    model = tiny.MODELS["clip-text"][0]()

    def make():
        with pytest.raises(ValueError, match=r"UniPELT's gated prefixes do not support \['CLIPAttention'\]"):
            pd.inject(model, UniPELT(num_virtual_tokens=2), "h")
    _untouched(model, make)


@pytest.mark.parametrize("config, part", [(MAM(size=8), "MAM's parallel-adapter part"),
                                          (UniPELT(size=8), "UniPELT's adapter part")])
def test_no_block_names_the_adapter_part(config, part):
    """A lone BertAttention: the prefix part has its BertSelfAttention, the adapter part finds no block."""
    model = tiny.tiny_bert().encoder.layer[0].attention

    def make():
        with pytest.raises(ValueError, match=rf"{part}: .*finds no block it knows in this BertAttention"):
            pd.inject(model, config, "h")
    _untouched(model, make)


def test_bad_settings_name_the_part():
    with pytest.raises(ValueError, match="MAM: ParallelAdapter scale must be a number"):
        MAM(scale="big")
    with pytest.raises(ValueError, match="UniPELT: LoRA rank r must be a positive integer"):
        UniPELT(r=0)
    with pytest.raises(ValueError, match="UniPELT: Pfeiffer activation must be one of"):
        UniPELT(activation="cube")


# ---------------------------------------------------------------- gradients and the peer

@pytest.mark.parametrize("method", ["mam", "unipelt"])
def test_gradients_reach_every_part_and_gate(method):
    """Once the zero-initialised tensors moved, one backward pass gives every trainable tensor of the hybrid a
    non-zero gradient (the gates included)."""
    cfg = (MAM(num_virtual_tokens=3, size=8, encoder_hidden_size=8) if method == "mam"
           else UniPELT(num_virtual_tokens=3, encoder_hidden_size=8, r=2, size=8))
    model = tiny.tiny_bert()
    pd.inject(model, cfg, "h")
    randomize(model, "h")
    model.train()
    tiny.main_output(tiny.call(model, inputs("bert"))).pow(2).mean().backward()
    named = {f"{s}:{n}": p for s, d in deltas(model, "h").items() for n, p in d.named_parameters()}
    assert any("gate" in n for n in named) == (method == "unipelt")
    dead = [n for n, p in named.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, dead


@pytest.mark.parametrize("method", ["mam", "unipelt"])
def test_prefix_part_matches_peft(method):
    """With the other parts at their zero init (and UniPELT's prefix gates at 1), the hybrid gives peft 0.21's
    prefix tuning logits on tiny LLaMA from the same E and MLP values (atol 1e-5)."""
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(tiny.tiny_llama(), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16))
    ours = tiny.tiny_llama()
    pd.inject(ours, MAM(num_virtual_tokens=3, size=8, encoder_hidden_size=16) if method == "mam"
              else UniPELT(num_virtual_tokens=3, encoder_hidden_size=16, r=2, size=8), "h")
    if method == "unipelt":
        force_gates(ours, "h")
    src = deltas(ours, "h")[""]
    state = {k: v for k, v in src.state_dict().items() if "gate" not in k}
    with torch.no_grad():
        for k, v in theirs.prompt_encoder.default.state_dict().items():
            state[k].copy_(v)
    x = inputs("llama")
    torch.testing.assert_close(out(ours, x), out(theirs, x), atol=1e-5, rtol=0)
