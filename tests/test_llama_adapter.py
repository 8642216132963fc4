"""LLaMA-Adapter v1 (``methods/llama_adapter.py``): the same logits as peft's AdaptionPromptConfig with the same
prompts and gates loaded into both (grouped-query tiny LLaMA), peft adapter folders both ways, per-head gates,
cached decoding, the LLaMA-7B count on the meta device, identity and trainable set, bad inputs."""
from __future__ import annotations

import json

import pytest
import torch
from peft import AdaptionPromptConfig, PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import peft_diffusion as pd
import tiny
from peft_diffusion.api import sites
from peft_diffusion.io import AdapterFileError, UnmatchedKeysError
from peft_diffusion.methods import LlamaAdapter
from peft_diffusion.methods.llama_adapter import save_peft

IDS = torch.randint(0, 99, (2, 9), generator=torch.Generator().manual_seed(5))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def llama(layers=2, hidden=32, heads=4, kv_heads=2):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=99, hidden_size=hidden, intermediate_size=37,
                                        num_hidden_layers=layers, num_attention_heads=heads,
                                        num_key_value_heads=kv_heads, max_position_embeddings=64)).eval()


def ours(model, name="a"):
    return {s: site.deltas[name] for s, site in sites(model) if name in site.deltas}


def peft_model(adapter_len=3, adapter_layers=2, **kw):
    return get_peft_model(llama(**kw), AdaptionPromptConfig(adapter_len=adapter_len, adapter_layers=adapter_layers,
                                                              task_type="CAUSAL_LM")).eval()


def peft_params(model):
    return {n.removeprefix("base_model.model."): p for n, p in model.named_parameters() if "adaption_" in n}


def randomize(params, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.7)


@pytest.mark.parametrize("kv_heads", [2, 4])  # grouped-query and plain multi-head attention
def test_same_logits_as_peft(kv_heads):
    theirs = peft_model(kv_heads=kv_heads)
    randomize(peft_params(theirs).values())
    model = pd.inject(llama(kv_heads=kv_heads), LlamaAdapter(adapter_len=3, adapter_layers=2, gate="layer"), "a")
    with torch.no_grad():
        for site, delta in ours(model).items():
            delta.adaption_prompt.copy_(peft_params(theirs)[f"{site}.adaption_prompt"][0])
            delta.adaption_gate.copy_(peft_params(theirs)[f"{site}.adaption_gate"])
    out = logits(model)
    assert not torch.allclose(out, logits(llama(kv_heads=kv_heads)), atol=1e-3)  # the prompts do something
    torch.testing.assert_close(out, logits(theirs), atol=1e-5, rtol=0)
    # per-head gates all equal to peft's scalar: the same model
    heads = pd.inject(llama(kv_heads=kv_heads), LlamaAdapter(adapter_len=3, adapter_layers=2), "a")
    with torch.no_grad():
        for site, delta in ours(heads).items():
            assert delta.adaption_gate.shape == (4,)
            delta.adaption_prompt.copy_(ours(model)[site].adaption_prompt)
            delta.adaption_gate.fill_(float(ours(model)[site].adaption_gate))
    torch.testing.assert_close(logits(heads), out, atol=1e-6, rtol=0)


def test_peft_folders_both_ways(tmp_path):
    theirs = peft_model(adapter_layers=1)
    randomize(peft_params(theirs).values())
    theirs.save_pretrained(tmp_path / "peft")
    model = llama()
    assert pd.load_adapter(model, tmp_path / "peft", name="a") == "a"
    (site, delta), = ours(model).items()
    assert site == "model.layers.1.self_attn"
    assert (delta.config.adapter_len, delta.config.adapter_layers, delta.config.gate) == (3, 1, "layer")
    torch.testing.assert_close(logits(model), logits(theirs), atol=1e-5, rtol=0)
    # ours -> a peft folder PeftModel.from_pretrained reads
    with torch.no_grad():
        delta.adaption_gate.mul_(-2.0)
    folder = save_peft(model, tmp_path / "ours", "a")
    assert json.loads((folder / "adapter_config.json").read_text())["adapter_layers"] == 1
    back = PeftModel.from_pretrained(llama(), folder).eval()
    torch.testing.assert_close(logits(back), logits(model), atol=1e-5, rtol=0)


def test_per_head_gates_differ_by_head_and_do_not_fit_peft(tmp_path):
    model = pd.inject(llama(), LlamaAdapter(adapter_len=2, adapter_layers=1), "a")
    (_, delta), = ours(model).items()
    with torch.no_grad():
        delta.adaption_gate.copy_(torch.tensor([0.0, 0.0, 1.0, 0.0]))  # head 2 only
    out = logits(model)
    with torch.no_grad():
        delta.adaption_gate.copy_(torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert not torch.allclose(out, logits(model), atol=1e-4)
    with pytest.raises(ValueError, match="one gate per layer.*gate='head'"):
        save_peft(model, tmp_path / "x", "a")
    assert not (tmp_path / "x").exists()
    path = pd.save_adapter(model, tmp_path / "native.safetensors", "a")  # the native format keeps them
    fresh = llama()
    pd.load_adapter(fresh, path)
    torch.testing.assert_close(logits(fresh), logits(model), atol=0, rtol=0)


def test_identity_trainable_set_and_cached_decoding():
    base = llama()
    ref = logits(base)
    model = pd.inject(llama(), LlamaAdapter(adapter_len=4), "a")  # adapter_layers=None: every layer
    assert torch.equal(logits(model), ref)  # zero gates: bit-exact
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.self_attn.peft_annex.deltas.a.{p}" for i in (0, 1)
                         for p in ("adaption_prompt", "adaption_gate")}
    model.train()
    model(input_ids=IDS).logits.pow(2).mean().backward()
    # zero gates: the gate gets a gradient at once, the prompt only once the gate has moved (zero-init attention)
    assert all(ours(model)[s].adaption_gate.grad.abs().sum() > 0 for s in ours(model))
    model.eval()
    tiny.perturb_trainable(model, std=0.5)
    full = logits(model)
    with torch.no_grad():  # one token at a time through the KV cache: the prompt branch sees the new token only
        out = model(input_ids=IDS[:, :5], use_cache=True)
        steps = [out.logits]
        for t in range(5, IDS.shape[1]):
            out = model(input_ids=IDS[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="cannot be fused"):
        pd.fuse(model, ["a"])


def _count(config, **kw):
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    pd.inject(model, LlamaAdapter(**kw), "a")
    deltas = ours(model)
    assert all(p.is_meta for d in deltas.values() for p in d.parameters())
    return len(deltas), sum(p.numel() for d in deltas.values() for p in d.parameters())


def test_llama_7b_count_meta():
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         vocab_size=32000)
    assert _count(config, adapter_len=10, adapter_layers=30) == (30, 1_229_760)  # 30 x (10 x 4096 + 32)
    assert _count(config, adapter_len=10, adapter_layers=30, gate="layer") == (30, 1_228_830)  # peft's


def test_bad_inputs(tmp_path):
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    with pytest.raises(ValueError, match="LlamaAttention.*GPT2LMHeadModel has none"):
        pd.inject(gpt2, LlamaAdapter(), "a")
    model = llama()
    before, hooks = tiny.snapshot(model), tiny.hooks_and_processors(model)
    with pytest.raises(ValueError, match="adapter_layers=3 but this LlamaForCausalLM has 2 attention layers"):
        pd.inject(model, LlamaAdapter(adapter_layers=3), "a")
    for bad in (dict(adapter_len=0), dict(adapter_layers=0), dict(gate="token"), dict(target="unet-attn")):
        with pytest.raises(ValueError, match="LlamaAdapter"):
            LlamaAdapter(**bad)
    # files for another width and for other layer counts: refused, the model untouched
    wide = pd.inject(llama(hidden=48), LlamaAdapter(adapter_len=2, adapter_layers=1), "w")
    deep = pd.inject(llama(layers=4), LlamaAdapter(adapter_len=2, adapter_layers=2), "d")
    shallow = pd.inject(llama(layers=2), LlamaAdapter(adapter_len=2, adapter_layers=1), "s")
    files = {n: pd.save_adapter(m, tmp_path / f"{n}.safetensors", n) for n, m in
             (("w", wide), ("d", deep), ("s", shallow))}
    with pytest.raises(AdapterFileError, match=r"adaption_prompt has shape \(2, 48\) in the file but \(2, 32\)"):
        pd.load_adapter(model, files["w"])
    with pytest.raises(UnmatchedKeysError, match="model.layers.3.self_attn"):
        pd.load_adapter(model, files["d"])
    with pytest.raises(AdapterFileError, match="layer 1 of 4: the adapter was made for a model with another layer"):
        pd.load_adapter(llama(layers=4), files["s"])
    assert tiny.hooks_and_processors(model) == hooks and not list(sites(model))
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_v2_norms_bias_scale_identity_trainable_and_round_trip(tmp_path):
    ref = logits(llama())
    config = LlamaAdapter(adapter_len=2, adapter_layers=1, norms=True, bias_scale=True)
    model = pd.inject(llama(), config, "a")
    assert torch.equal(logits(model), ref)  # b = 0, s = 1, norm deltas 0, gates 0: bit-exact
    assert all(".deltas.a." in n for n, p in model.named_parameters() if p.requires_grad)
    linears = [f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.q_proj", "self_attn.k_proj",
               "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    norms = [f"model.layers.{i}.{n}" for i in (0, 1) for n in ("input_layernorm", "post_attention_layernorm")]
    deltas = ours(model)
    assert set(deltas) == {"model.layers.1.self_attn", *linears, *(f"{n}.weight" for n in norms + ["model.norm"])}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == (
        2 * 32 + 4  # prompt + per-head gates
        + 2 * sum(deltas[q].adapter_bias.numel() for q in linears)  # bias + scale per output channel
        + 32 * 5)  # five RMSNorm weights
    model.train()
    model(input_ids=IDS).logits.pow(2).mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    model.eval()
    tiny.perturb_trainable(model, std=0.3)
    path = pd.save_adapter(model, tmp_path / "v2.safetensors", "a")
    fresh = llama()
    pd.load_adapter(fresh, path)
    torch.testing.assert_close(logits(fresh), logits(model), atol=0, rtol=0)
    with pytest.raises(ValueError, match="v1 only"):
        save_peft(model, tmp_path / "peft", "a")
    pd.remove(model)
    assert torch.equal(logits(model), ref)


def test_v2_output_scale_acts_on_the_prompt_branch_too():
    """The authors add the prompt output before W_o, so v2's scale on o_proj scales it with the rest."""
    v1 = pd.inject(llama(), LlamaAdapter(adapter_len=3, adapter_layers=1), "a")
    v2 = pd.inject(llama(), LlamaAdapter(adapter_len=3, adapter_layers=1, bias_scale=True), "a")
    tiny.perturb_trainable(v1, std=0.5)
    site = "model.layers.1.self_attn"
    with torch.no_grad():
        for n in ("adaption_prompt", "adaption_gate"):
            getattr(ours(v2)[site], n).copy_(getattr(ours(v1)[site], n))
        ours(v2)[site + ".o_proj"].adapter_scale.fill_(3.0)
    h = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(1))
    pos = torch.arange(9)[None].expand(2, -1)

    def attention(model):
        with torch.no_grad():
            rope = model.model.rotary_emb(h, pos)
            return model.model.layers[1].self_attn(hidden_states=h, position_embeddings=rope,
                                                   attention_mask=None)[0]
    torch.testing.assert_close(attention(v2), 3.0 * attention(v1), atol=1e-5, rtol=1e-5)


def test_with_lora_weights_disable_and_bf16():
    """Beside a LoRA on the same projections: the prompt branch runs through the LoRA'd q/k/v; adapter weights,
    disabling and removing one adapter leave the other as it was; a bf16 model keeps its dtype."""
    lora_only = pd.inject(llama(), pd.LoRA(r=2), "l")
    tiny.perturb_trainable(lora_only, std=0.2)
    model = pd.inject(llama(), pd.LoRA(r=2), "l")
    with torch.no_grad():
        for p, q in zip(model.parameters(), lora_only.parameters()):
            p.copy_(q)
    pd.inject(model, LlamaAdapter(adapter_len=3), "a")
    assert torch.equal(logits(model), logits(lora_only))
    with torch.no_grad():
        for d in ours(model).values():
            d.adaption_gate.fill_(0.8)
    both = logits(model)
    assert not torch.allclose(both, logits(lora_only), atol=1e-3)
    pd.set_adapters(model, {"l": 1.0, "a": 0.0})
    assert torch.equal(logits(model), logits(lora_only))
    pd.set_adapters(model, {"l": 1.0, "a": 1.0})
    torch.testing.assert_close(logits(model), both, atol=0, rtol=0)
    pd.disable_adapters(model)
    assert torch.equal(logits(model), logits(llama()))
    pd.enable_adapters(model)
    pd.remove(model, "a")
    assert torch.equal(logits(model), logits(lora_only))
    half = pd.inject(llama().to(torch.bfloat16), LlamaAdapter(adapter_len=3), "a")
    (_, d), *_ = ours(half).items()
    assert d.adaption_prompt.dtype == torch.float32  # trains in fp32, as LoRA's factors do
    with torch.no_grad():
        d.adaption_gate.fill_(1.0)
    assert logits(half).dtype == torch.bfloat16 and torch.isfinite(logits(half)).all()


def test_llama_7b_v2_count_meta():
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         vocab_size=32000)
    norms = (2 * 32 + 1) * 4096
    bias_scale = 32 * 2 * (4 * 4096 + 2 * 11008 + 4096)  # q, k, v, o, gate, up, down: a bias and a scale per row
    assert _count(config, adapter_len=10, adapter_layers=30, norms=True, bias_scale=True) == (
        30 + 65 + 32 * 7, 1_229_760 + norms + bias_scale)  # 4,215,744


def test_damaged_peft_files(tmp_path):
    from safetensors.torch import save_file

    model = llama()
    before = tiny.snapshot(model)
    key = "base_model.model.model.layers.1.self_attn."
    cases = {"flat": {key + "adaption_prompt": torch.zeros(3, 32), key + "adaption_gate": torch.zeros(1)},
             "gate-only": {key + "adaption_gate": torch.zeros(1)},
             "per-head": {key + "adaption_prompt": torch.zeros(1, 3, 32), key + "adaption_gate": torch.zeros(4)}}
    errors = {"flat": r"peft's prompts are \(1, tokens, width\)", "gate-only": "no token counts",
              "per-head": r"adaption_gate has shape \(4,\) in the file but \(1,\)"}
    for name, tensors in cases.items():
        (tmp_path / name).mkdir()
        save_file(tensors, tmp_path / name / "adapter_model.safetensors")
        with pytest.raises(AdapterFileError, match=errors[name]):
            pd.load_adapter(model, tmp_path / name)
    assert not list(sites(model)) and list(model.state_dict()) == list(before)
