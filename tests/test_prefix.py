"""Prefix tuning and P-tuning v2 (methods/prefix_tuning.py, p_tuning_v2.py, prefix_kv.py; io/peft_prefix.py):
peft 0.21.2's PrefixTuningConfig as the peer (same values loaded into both, same outputs), fold, peft folders
both ways, masks and the cache path, CLIP's recomputed attention against a manual computation, bad input."""
from __future__ import annotations

import pytest
import torch

import tiny
import peft_diffusion as pd
from peft_diffusion.api import sites
from peft_diffusion.io import AdapterFileError, read_file
from peft_diffusion.io.peft_prefix import from_peft, to_peft
from peft_diffusion.methods import PrefixTuning, PTuningV2, fold_prefix
from peft_diffusion.methods.prefix_source import PrefixSource

peft = pytest.importorskip("peft")
TASKS = {"llama": "CAUSAL_LM", "bert": "FEATURE_EXTRACTION"}
N = 3


def source(model, name="p") -> PrefixSource:
    (delta,) = [s.deltas[name] for _, s in sites(model)
                if name in s.deltas and isinstance(s.deltas[name], PrefixSource)]
    return delta


def inputs(batch=2):
    x = tiny.token_inputs(batch=batch)
    mask = torch.ones(batch, 8, dtype=torch.long)
    mask[-1, 5:] = 0  # a padded row: the prefix columns stay attended, the padding does not
    return {**x, "attention_mask": mask}


def out(model, x):
    with torch.no_grad():
        return tiny.main_output(model(**x))


def peft_pair(key, projection):
    """(peft model, our model with the same prefix values)."""
    config = peft.PrefixTuningConfig(task_type=TASKS[key], num_virtual_tokens=N, prefix_projection=projection,
                                     encoder_hidden_size=16)
    theirs = peft.get_peft_model(tiny.MODELS[key][0](), config)
    encoder = theirs.prompt_encoder.default
    ours = tiny.MODELS[key][0]()
    pd.inject(ours, PrefixTuning(num_virtual_tokens=N, encoder_hidden_size=16) if projection
              else PTuningV2(num_virtual_tokens=N), "p")
    src = source(ours)
    with torch.no_grad():
        if projection:
            src.load_state_dict(encoder.state_dict())
        else:
            src.prefix.copy_(encoder.embedding.weight)  # peft's flattened layout is ours
    return theirs, ours


@pytest.mark.parametrize("key", ["llama", "bert"])
@pytest.mark.parametrize("projection", [False, True])
def test_same_outputs_as_peft(key, projection):
    theirs, ours = peft_pair(key, projection)
    x = inputs()
    base = out(tiny.MODELS[key][0](), x)
    mine = out(ours, x)
    assert (mine - base).abs().max() > 1e-3  # the prefixes do change attention
    torch.testing.assert_close(mine, out(theirs, x), atol=1e-5, rtol=0)
    no_mask = {"input_ids": x["input_ids"]}  # the sdpa path without a mask: causal mask built for the prefix
    torch.testing.assert_close(out(ours, no_mask), out(theirs, no_mask), atol=1e-5, rtol=0)


@pytest.mark.parametrize("key", ["llama", "bert"])
def test_same_outputs_as_peft_eager(key):
    """The eager attention path (additive float masks) as well as sdpa's (boolean masks or none)."""
    theirs, ours = peft_pair(key, projection=False)
    for model in (theirs.get_base_model(), ours):
        model.set_attn_implementation("eager")
    assert ours.config._attn_implementation == "eager"
    x = inputs()
    torch.testing.assert_close(out(ours, x), out(theirs, x), atol=1e-5, rtol=0)


def test_trainable_set_and_fold(tmp_path):
    """While training only E and the MLP require grad; fold keeps the outputs and leaves the table only."""
    model = tiny.tiny_llama()
    pd.inject(model, PrefixTuning(num_virtual_tokens=N, encoder_hidden_size=8), "p")
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [f"peft_annex.deltas.p.{k}" for k in ("embedding.weight", "transform.0.bias",
                                                              "transform.0.weight", "transform.2.bias",
                                                              "transform.2.weight")]
    x = inputs()
    before = out(model, x)
    assert fold_prefix(model, "p") == 1 and fold_prefix(model, "p") == 0
    torch.testing.assert_close(out(model, x), before, atol=1e-5, rtol=0)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["peft_annex.deltas.p.prefix"]
    path = pd.save_adapter(model, tmp_path / "p.safetensors", "p")
    tensors, _ = read_file(path)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {"prefix": (N, 2 * 2 * 2 * 8)}  # layers x k/v x heads x d
    fresh = tiny.tiny_llama()
    pd.load_adapter(fresh, path)
    torch.testing.assert_close(out(fresh, x), before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("key", ["llama", "bert"])
def test_files_to_and_from_peft(key, tmp_path):
    theirs, ours = peft_pair(key, projection=True)  # ours still holds the MLP: folded on the way to peft
    x = inputs()
    expected = out(theirs, x)
    ours_file = pd.save_adapter(ours, tmp_path / "ours.safetensors", "p")
    folder = to_peft(ours_file, tmp_path / "peft_dir", TASKS[key])
    loaded = peft.PeftModel.from_pretrained(tiny.MODELS[key][0](), folder)
    torch.testing.assert_close(out(loaded, x), expected, atol=1e-5, rtol=0)

    theirs.save_pretrained(tmp_path / "theirs")  # peft saves the folded table
    back = from_peft(tmp_path / "theirs", tmp_path / "back.safetensors")
    fresh = tiny.MODELS[key][0]()
    pd.load_adapter(fresh, back, name="q")
    torch.testing.assert_close(out(fresh, x), expected, atol=1e-5, rtol=0)


def test_causal_and_cache_on_llama():
    """A later token never changes earlier logits; decoding with the model's own cache gives the full pass."""
    model = tiny.tiny_llama()
    pd.inject(model, PTuningV2(num_virtual_tokens=N), "p")
    ids = tiny.token_inputs()["input_ids"]
    full = out(model, {"input_ids": ids})
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 99
    torch.testing.assert_close(out(model, {"input_ids": changed})[:, :-1], full[:, :-1], atol=1e-6, rtol=0)
    with torch.no_grad():
        first = model(input_ids=ids[:, :5], use_cache=True)
        rest = model(input_ids=ids[:, 5:], past_key_values=first.past_key_values, use_cache=True)
    assert first.past_key_values.get_seq_length() == 8  # the cache holds the sequence only, not the prefix
    torch.testing.assert_close(rest.logits, full[:, 5:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("padded", [False, True])
def test_clip_attention_against_manual(padded):
    """CLIP text (no peft counterpart): every layer's output against softmax(q [P_k; K]^T s + mask) [P_v; V], the
    mask causal (and without the padded keys) on the sequence, open on the prefix."""
    model = tiny.tiny_clip_text()
    attn = [m for m in model.modules() if type(m).__name__ == "CLIPAttention"]
    pd.inject(model, PTuningV2(num_virtual_tokens=2), "p")
    seen = {}  # hooks after the annex's: they see its output
    handles = [a.register_forward_hook(lambda m, a_, k, o, i=i: seen.__setitem__(i, (a_, k, o[0])), with_kwargs=True)
               for i, a in enumerate(attn)]
    keep = torch.ones(2, 8, dtype=torch.long)
    keep[1, 6:] = 0
    model(**tiny.clip_text_inputs(batch=2), **({"attention_mask": keep} if padded else {}))
    src = source(model)
    for i, a in enumerate(attn):
        args, kwargs, got = seen[i]
        h = args[0] if args else kwargs["hidden_states"]
        b, t, _ = h.shape
        heads = lambda y: y.view(b, t, a.num_heads, a.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = heads(a.q_proj(h)), heads(a.k_proj(h)), heads(a.v_proj(h))
        rows = src.prefix.detach()[:, i * 64:(i + 1) * 64].reshape(2, 2, 4, 8)  # n, k/v, heads, head dim
        k = torch.cat([rows[:, 0].transpose(0, 1).expand(b, -1, -1, -1), k], 2)
        v = torch.cat([rows[:, 1].transpose(0, 1).expand(b, -1, -1, -1), v], 2)
        scores = q @ k.transpose(-1, -2) * a.scale
        inner = torch.ones(t, t, dtype=torch.bool).tril() & (keep.bool()[:, None, None, :] if padded else True)
        allowed = torch.cat([torch.ones(*inner.shape[:-1], 2, dtype=torch.bool), inner], -1)
        scores = scores.masked_fill(~allowed, float("-inf"))
        manual = a.out_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1))
        torch.testing.assert_close(got, manual, atol=1e-5, rtol=0)
    for handle in handles:
        handle.remove()


def test_unsupported_attention_names_it():
    model = tiny.tiny_gpt2()
    state, hooks, types = tiny.snapshot(model), tiny.hooks_and_processors(model), tiny.module_types(model)
    with pytest.raises(ValueError, match=r"GPT2Attention.*supported: \['LlamaAttention', 'BertSelfAttention', "
                                         r"'CLIPAttention', 'diffusers Attention \(cross-attention\)'\]"):
        pd.inject(model, PrefixTuning(num_virtual_tokens=2), "p")
    assert tiny.module_types(model) == types and tiny.hooks_and_processors(model) == hooks
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_diffusers_self_attention_only_is_refused():
    from diffusers import DiTTransformer2DModel

    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1,
                                sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    with pytest.raises(ValueError, match=r"DiTTransformer2DModel \(its attention classes: \['Attention "
                                         r"\(self-attention\)'\]\); supported: .*cross-attention"):
        pd.inject(dit, PTuningV2(num_virtual_tokens=2), "p")
    assert not pd.adapter_names(dit)


def _llama(**changes):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(LlamaConfig(**{**config, **changes})).eval()


@pytest.mark.parametrize("changes, theirs", [({"num_hidden_layers": 3}, "3 attention layers x 2 kv heads x 8"),
                                             ({"num_key_value_heads": 4}, "2 attention layers x 4 kv heads x 8"),
                                             ({"hidden_size": 64}, "2 attention layers x 2 kv heads x 16")])
def test_file_for_another_geometry_is_refused(changes, theirs, tmp_path):
    model = _llama()
    pd.inject(model, PTuningV2(num_virtual_tokens=2), "p")
    path = pd.save_adapter(model, tmp_path / "p.safetensors", "p")
    other = _llama(**changes)
    state, hooks, types = tiny.snapshot(other), tiny.hooks_and_processors(other), tiny.module_types(other)
    with pytest.raises(ValueError, match=rf"made for 2 attention layers x 2 kv heads x 8 head dims; this "
                                         rf"LlamaForCausalLM has {theirs}"):
        pd.load_adapter(other, path)
    assert tiny.module_types(other) == types and tiny.hooks_and_processors(other) == hooks
    assert list(other.state_dict()) == list(state)


def test_damaged_table_shape_names_both(tmp_path):
    """A file whose config fits the model but whose table does not: the table's shape and the needed one."""
    model = _llama()
    pd.inject(model, PTuningV2(num_virtual_tokens=2), "p")
    path = pd.save_adapter(model, tmp_path / "p.safetensors", "p")
    tensors, meta = read_file(path)
    from peft_diffusion.io import write_file

    write_file(tmp_path / "bad.safetensors", {"prefix": tensors["prefix"][:, :48]}, meta)
    fresh = _llama()
    with pytest.raises(AdapterFileError, match=r"\(2, 48\) \(n, width\); 2 attention layers x 2 kv heads x 8 "
                                               r"head dims need \(2, 64\)"):
        pd.load_adapter(fresh, tmp_path / "bad.safetensors")
    assert not [n for n, _ in fresh.named_modules() if "peft_annex" in n]


def test_p_tuning_v2_refuses_projection():
    with pytest.raises(ValueError, match="PrefixTuning"):
        PTuningV2(prefix_projection=True)


@pytest.mark.parametrize("projection", [False, True])
def test_unet_cross_attention_against_manual(projection):
    """diffusers' U-Net: every cross-attention (attn2) against softmax(q [P_k; K]^T s) [P_v; V] with n free keys /
    values in front of the text tokens' (layers of different widths in one table); self-attention untouched."""
    model = tiny.tiny_unet()
    x = tiny.unet_inputs(batch=2)
    cross = [(n, m) for n, m in model.named_modules() if n.endswith("attn2")]
    config = (PrefixTuning(num_virtual_tokens=2, encoder_hidden_size=8) if projection
              else PTuningV2(num_virtual_tokens=2))
    pd.inject(model, config, "p")
    src = source(model)
    assert len(set(src.config.geometry)) > 1 and len(src.config.geometry) == len(cross)
    seen = {}
    handles = [m.register_forward_hook(lambda m_, a, k, o, n=n: seen.__setitem__(n, (a, k, o)), with_kwargs=True)
               for n, m in model.named_modules() if n.endswith(("attn1", "attn2"))]
    with torch.no_grad():
        model(**x)
        for i, (name, attn) in enumerate(cross):
            args, kwargs, got = seen[name]
            h, e = args[0] if args else kwargs["hidden_states"], kwargs["encoder_hidden_states"]
            b, d = h.shape[0], attn.inner_dim // attn.heads
            pk, pv = src.kv(i)  # [heads, n, head dim]
            heads = lambda y: y.view(b, -1, attn.heads, d).transpose(1, 2)  # noqa: E731
            q, k, v = heads(attn.to_q(h)), heads(attn.to_k(e)), heads(attn.to_v(e))
            k, v = torch.cat([pk.expand(b, -1, -1, -1), k], 2), torch.cat([pv.expand(b, -1, -1, -1), v], 2)
            scores = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)
            manual = attn.to_out[0]((scores @ v).transpose(1, 2).reshape(b, -1, attn.inner_dim))
            torch.testing.assert_close(got, manual, atol=1e-5, rtol=0)
        base = tiny.tiny_unet()
        for name, m in base.named_modules():  # self-attention: the same outputs as without the adapter
            if name.endswith("attn1"):
                args, kwargs, got = seen[name]
                torch.testing.assert_close(got, m(*args, **kwargs), atol=1e-6, rtol=0)
    for handle in handles:
        handle.remove()
    assert not any(m.to_k._forward_hooks for _, m in cross)  # the one-shot hooks are gone after the call


def test_unet_encoder_mask_is_refused():
    model = tiny.tiny_unet()
    pd.inject(model, PTuningV2(num_virtual_tokens=2), "p")
    x = tiny.unet_inputs()
    with pytest.raises(ValueError, match="no encoder attention mask"):
        model(**x, encoder_attention_mask=torch.ones(1, 8))
    assert not any(m._forward_hooks for n, m in model.named_modules() if n.endswith(("to_k", "to_v")))


def test_trainer_last_step_folds():
    """``after_step`` at the last step (what the trainers call) folds the MLP away; earlier steps keep it."""
    model = tiny.tiny_llama()
    types, hooks, state = tiny.module_types(model), tiny.hooks_and_processors(model), tiny.snapshot(model)
    pd.inject(model, PrefixTuning(num_virtual_tokens=N, encoder_hidden_size=8), "p")
    x = inputs()
    before = out(model, x)
    pd.api.after_step(model, 1, 2)
    assert source(model).config.prefix_projection
    pd.api.after_step(model, 2, 2)
    assert not source(model).config.prefix_projection and sorted(source(model).state_dict()) == ["prefix"]
    torch.testing.assert_close(out(model, x), before, atol=1e-5, rtol=0)
    pd.remove(model)  # a folded adapter leaves as cleanly
    assert tiny.module_types(model) == types and tiny.hooks_and_processors(model) == hooks
    assert list(model.state_dict()) == list(state)


def test_two_adapters_and_disable():
    """Two prefix adapters at once attend to both prefixes; disabling gives the base model back exactly."""
    model = tiny.tiny_llama()
    base = out(model, inputs())
    pd.inject(model, PTuningV2(num_virtual_tokens=2), "a")
    one = out(model, inputs())
    pd.inject(model, PTuningV2(num_virtual_tokens=3), "b")
    both = out(model, inputs())
    assert (both - one).abs().max() > 1e-3
    pd.set_adapters(model, ["a"])
    torch.testing.assert_close(out(model, inputs()), one, atol=0, rtol=0)
    pd.disable_adapters(model)
    torch.testing.assert_close(out(model, inputs()), base, atol=0, rtol=0)


# ---------------------------------------------------------------- counts on real configs (meta device)

def _count(model, config) -> int:
    pd.inject(model, config, "c")
    n = pd.parameter_report(model).adapters["c"]["trainable"]
    pd.remove(model)
    return n


def test_counts_on_real_configs():
    """LLaMA-7B (32 layers, 4096 wide, n = 20): P-tuning v2 20 * 32 * 2 * 4096 = 5,242,880; prefix tuning with a
    512-wide MLP (Li & Liang's) 81,920 (E) + 2,097,664 + 134,479,872 (MLP) = 136,659,456 while training, 5,242,880
    once folded. BERT-base (12 x 768, n = 20): 368,640. SD1.5's U-Net (16 cross-attentions: 2 x (320 + 640 + 1280)
    down, 1280 mid, 3 x (1280 + 640 + 320) up = 12,480 wide; n = 4): 4 * 2 * 12,480 = 99,840."""
    from diffusers import UNet2DConditionModel
    from test_sd15_counts import SD15_UNET
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        llama = LlamaForCausalLM(LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                             num_attention_heads=32, num_key_value_heads=32, vocab_size=32000))
        bert = BertModel(BertConfig())
        unet = UNet2DConditionModel(**SD15_UNET)
    assert _count(llama, PTuningV2(num_virtual_tokens=20)) == 5_242_880
    assert _count(llama, PrefixTuning(num_virtual_tokens=20, encoder_hidden_size=512)) == 136_659_456
    assert _count(bert, PTuningV2(num_virtual_tokens=20)) == 368_640
    assert _count(unet, PTuningV2(num_virtual_tokens=4)) == 99_840


def test_unet_with_lora_on_to_k():
    """The one-shot rows go after whatever sits at to_k / to_v (a LoRA Host here): both adapters act, and
    removing the LoRA leaves the prefix-only output."""
    model = tiny.tiny_unet()
    x = tiny.unet_inputs()
    pd.inject(model, PTuningV2(num_virtual_tokens=2), "p")
    prefix_only = out(model, x)
    pd.inject(model, pd.LoRA(r=2, target=pd.Target(include=("attn2.to_k", "attn2.to_v"))), "l")
    tiny.randomize(model, "l")
    both = out(model, x)
    assert (both - prefix_only).abs().max() > 1e-4
    pd.remove(model, "l")
    torch.testing.assert_close(out(model, x), prefix_only, atol=0, rtol=0)


def test_generate_like_peft():
    """Greedy generation with the model's own cache (LLaMA): the same scores at every step as peft's."""
    theirs, ours = peft_pair("llama", projection=False)
    ids = tiny.token_inputs(batch=2)["input_ids"]
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, output_scores=True,
              return_dict_in_generate=True)
    with torch.no_grad():
        a, b = theirs.generate(input_ids=ids, **kw), ours.generate(input_ids=ids, **kw)
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.scores, b.scores, strict=True):
        torch.testing.assert_close(y, x, atol=1e-5, rtol=0)


def test_peft_conversion_refuses_what_it_cannot_hold(tmp_path):
    unet = tiny.tiny_unet()
    pd.inject(unet, PTuningV2(num_virtual_tokens=2), "p")
    path = pd.save_adapter(unet, tmp_path / "unet.safetensors", "p")
    with pytest.raises(AdapterFileError, match=r"attention layers with \(kv heads, head dim\).*one width"):
        to_peft(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    folder = tmp_path / "lora"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(AdapterFileError, match="'LORA' adapter, not PREFIX_TUNING"):
        from_peft(folder, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
