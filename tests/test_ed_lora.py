"""ED-LoRA (Mix-of-Show): layer-wise token embeddings routed to each cross-attention layer through the stock
StableDiffusionPipeline (classifier-free guidance included), training reaches exactly the embeddings and the
two LoRA parts, one file saves and loads everything, the LoRA parts fuse while the tokens stay, and remove
restores tokenizer, models and hooks."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import tiny
from peft_diffusion import fuse, inject, load_adapter, remove, save_adapter, unfuse
from peft_diffusion.api import hosts
from peft_diffusion.core import Host
from peft_diffusion.methods.layer_tokens import LayerRows, cross_attention_layers
from peft_diffusion.methods.ed_lora import EDLoRA
from peft_diffusion.registry import config_from_dict
from peft_diffusion.methods.token_rows import expand_prompt

PROMPT = "a photo of <c>"


def rows(pipe, name: str = "c") -> LayerRows:
    return pipe.text_encoder.get_input_embeddings().deltas[name]


def trained(pipe, seed: int = 3, std: float = 0.3) -> None:
    """Move every trainable tensor (each layer's vectors apart, LoRA B off zero), as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in (pipe.text_encoder, pipe.unet):
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * std)


def generate(pipe, prompt: str = PROMPT, **kw) -> torch.Tensor:
    kw = {**tiny.pipe_call_kwargs(), "prompt": prompt, "guidance_scale": 7.5, "output_type": "latent", **kw}
    return pipe(**kw).images


def capture_attn2(pipe) -> dict[str, list[torch.Tensor]]:
    """encoder_hidden_states as each attn2 receives them (hooks added after ours run after ours)."""
    seen: dict[str, list[torch.Tensor]] = {}
    for name in cross_attention_layers(pipe.unet):
        def hook(module, args, kwargs, name=name):
            seen.setdefault(name, []).append(kwargs["encoder_hidden_states"].detach().clone())
        pipe.unet.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def encode(pipe, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return pipe.encode_prompt(prompt, "cpu", 1, False)[0]


def test_identity_at_init_and_tokens_in_the_pipeline(tiny_pipe):
    base = generate(tiny_pipe, "a photo of a cat")
    size = len(tiny_pipe.tokenizer)
    inject(tiny_pipe, EDLoRA(token="<c>", init_word="cat"), "c")
    assert len(tiny_pipe.tokenizer) == size + 2  # "<c>", "<c>_1": the pipeline expands one into both
    assert tiny_pipe.maybe_convert_prompt(PROMPT, tiny_pipe.tokenizer) == "a photo of <c> <c>_1"
    torch.testing.assert_close(generate(tiny_pipe, "a photo of a cat"), base, atol=0, rtol=0)
    table = rows(tiny_pipe).emb_params.detach()
    assert table.shape == (4, 2, 32)  # the tiny U-Net's 4 attn2 layers, 2 vectors of width 32
    word = tiny_pipe.tokenizer.convert_tokens_to_ids("cat</w>")
    cat = tiny_pipe.text_encoder.get_input_embeddings().base.weight[word]
    assert all(torch.equal(table[l, 1], cat) for l in range(4))  # V_class from the class word, in every layer
    assert 0 < float(table[:, 0].std()) < 0.05  # V_rand ~ N(0, 0.013^2)


def test_layer_order_is_down_mid_up(unet):
    assert cross_attention_layers(unet) == (
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2", "mid_block.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2", "up_blocks.1.attentions.1.transformer_blocks.0.attn2")


def test_each_layer_gets_its_own_encoding_through_cfg(tiny_pipe):
    inject(tiny_pipe, EDLoRA(token="<c>"), "c")
    trained(tiny_pipe)
    table = rows(tiny_pipe).emb_params.detach().clone()
    negative = encode(tiny_pipe, "")
    seen = capture_attn2(tiny_pipe)
    generate(tiny_pipe, num_images_per_prompt=2, num_inference_steps=1)
    # the reference for layer l: every layer's vectors set to layer l's, so the plain encoding is layer l's
    refs = []
    for l in range(table.shape[0]):
        with torch.no_grad():
            rows(tiny_pipe).emb_params.copy_(table[l].expand_as(table))
        refs.append(encode(tiny_pipe, PROMPT)[0])
    for l, name in enumerate(cross_attention_layers(tiny_pipe.unet)):
        states = seen[name][0]  # [negative, negative, positive, positive]: CFG concatenated them
        assert states.shape == (4, 77, 32)
        for i in (0, 1):
            assert torch.equal(states[i], negative[0])
        for i in (2, 3):
            torch.testing.assert_close(states[i], refs[l], atol=1e-5, rtol=1e-5)
    gaps = [float((refs[0] - ref).abs().max()) for ref in refs[1:]]
    assert min(gaps) > 1e-2, f"the layers' encodings must differ, got max gaps {gaps}"
    # IP-Adapter's forms: a (text states, image embeds) pair, or image tokens appended to the text ones
    first = rows(tiny_pipe)
    states, image = seen[cross_attention_layers(tiny_pipe.unet)[1]][0], torch.randn(4, 3, 32)
    with torch.no_grad():
        first.emb_params.copy_(table)
        encode(tiny_pipe, PROMPT)  # records what the pipeline call recorded, with the trained table
        unrouted = torch.cat([negative, negative, encode(tiny_pipe, PROMPT), encode(tiny_pipe, PROMPT)])
    _, kw = first._route(1, None, (None,), {"encoder_hidden_states": (unrouted, [image])})
    assert torch.equal(kw["encoder_hidden_states"][0], states) and kw["encoder_hidden_states"][1][0] is image
    _, kw = first._route(1, None, (None,), {"encoder_hidden_states": torch.cat([unrouted, image], 1)})
    assert torch.equal(kw["encoder_hidden_states"], torch.cat([states, image], 1))


def test_only_embeddings_and_lora_train_and_every_layer_learns(tiny_pipe):
    inject(tiny_pipe, EDLoRA(token="<c>", init_word="cat"), "c")
    te, unet = tiny_pipe.text_encoder, tiny_pipe.unet
    trainable = {f"{m}.{n}" for m, model in (("te", te), ("unet", unet))
                 for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".emb_params", ".lora_A.weight", ".lora_B.weight")) for n in trainable)
    assert any(".token_embedding.deltas.c.emb_params" in n for n in trainable)
    assert any(n.startswith("te.") and "lora_B" in n for n in trainable)
    assert any(n.startswith("unet.") and "attn2.to_k" in n for n in trainable)
    # one training step, the way a trainer runs it: text encoder then U-Net, both with grad
    ids = tiny_pipe.tokenizer(expand_prompt(PROMPT, tiny_pipe.tokenizer), padding="max_length",
                              max_length=77, return_tensors="pt").input_ids
    inputs = tiny.unet_inputs()
    pred = unet(inputs["sample"], inputs["timestep"], encoder_hidden_states=te(ids)[0]).sample
    pred.pow(2).mean().backward()
    grads = {n: p.grad for m, model in (("te", te), ("unet", unet)) for n, p in model.named_parameters()
             if p.requires_grad}
    table = rows(tiny_pipe).emb_params.grad
    assert all(float(table[l].abs().sum()) > 0 for l in range(table.shape[0])), "each layer's vectors get a gradient"
    # ... its own: layer l's vectors are read by attn2 number l alone (through the mean they would all be equal)
    assert all(not torch.allclose(table[0], table[l]) for l in range(1, table.shape[0]))
    for part in ("self_attn", "attn2"):  # B gets the gradient at init (A's is B^T times it: zero)
        assert any(float(g.abs().sum()) > 0 for n, g in grads.items() if "lora_B" in n and part in n)
    frozen = [n for model in (te, unet) for n, p in model.named_parameters()
              if not p.requires_grad and p.grad is not None]
    assert not frozen, f"base parameters received gradients: {frozen[:3]}"


def test_one_file_saves_and_loads_everything(tiny_pipe, fresh, tmp_path):
    inject(tiny_pipe, EDLoRA(token="<c>", num_vectors=3, r=2), "c")
    trained(tiny_pipe)
    out = generate(tiny_pipe)
    path = save_adapter(tiny_pipe, tmp_path / "c.safetensors", "c")
    with safe_open(str(path), "pt") as f:
        keys, header = list(f.keys()), json.loads(f.metadata()["peft_diffusion"])
    assert sorted(header["components"]) == ["text_encoder", "unet"]
    assert header["components"]["text_encoder"]["config"]["token"] == "<c>"
    assert any(k.endswith("token_embedding.emb_params") for k in keys)
    assert any(k.startswith("text_encoder.") and k.endswith("lora_A.weight") for k in keys)
    assert any(k.startswith("unet.") and k.endswith("lora_B.weight") for k in keys)

    other = fresh()
    assert load_adapter(other, path) == "c"
    assert other.tokenizer.tokenize("<c>_2") == ["<c>_2"]
    torch.testing.assert_close(generate(other), out, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(generate(other, "a photo of a cat"), out, atol=1e-3)
    with pytest.raises(ValueError, match="already exist"):  # the tokens are taken: the same file twice fails
        load_adapter(other, path, name="again")


def test_lora_parts_fuse_and_the_embeddings_stay_tokens(tiny_pipe):
    inject(tiny_pipe, EDLoRA(token="<c>"), "c")
    trained(tiny_pipe, std=0.05)
    out = generate(tiny_pipe)
    fuse(tiny_pipe)
    merged = {q: "c" in h.merged for q, h in hosts(tiny_pipe) if isinstance(h, Host)}  # not the router annexes
    assert not merged.pop("text_encoder.embeddings.token_embedding") and all(merged.values())
    torch.testing.assert_close(generate(tiny_pipe), out, atol=1e-4, rtol=1e-4)
    unfuse(tiny_pipe)
    torch.testing.assert_close(generate(tiny_pipe), out, atol=1e-4, rtol=1e-4)


def test_remove_restores_tokenizer_models_and_hooks(tiny_pipe):
    vocab, size = tiny_pipe.tokenizer.get_vocab(), len(tiny_pipe.tokenizer)
    types = {c: tiny.module_types(getattr(tiny_pipe, c)) for c in ("text_encoder", "unet")}
    states = {c: tiny.snapshot(getattr(tiny_pipe, c)) for c in ("text_encoder", "unet")}
    base = generate(tiny_pipe, "a photo of a cat")
    inject(tiny_pipe, EDLoRA(token="<c>"), "c")
    trained(tiny_pipe)
    generate(tiny_pipe)
    remove(tiny_pipe)
    assert tiny_pipe.tokenizer.get_vocab() == vocab and len(tiny_pipe.tokenizer) == size
    for c in ("text_encoder", "unet"):
        model = getattr(tiny_pipe, c)
        assert tiny.module_types(model) == types[c]
        assert all(torch.equal(model.state_dict()[k], v) for k, v in states[c].items())
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    torch.testing.assert_close(generate(tiny_pipe, "a photo of a cat"), base, atol=0, rtol=0)


def test_two_concepts_in_one_prompt_each_get_their_layer_vectors(tiny_pipe):
    inject(tiny_pipe, EDLoRA(token="<a>", num_vectors=1), "a")
    inject(tiny_pipe, EDLoRA(token="<b>", num_vectors=1), "b")
    trained(tiny_pipe)
    tables = {n: rows(tiny_pipe, n).emb_params.detach().clone() for n in "ab"}
    seen = capture_attn2(tiny_pipe)
    generate(tiny_pipe, "<a> and <b>", num_inference_steps=1)
    for l, name in enumerate(cross_attention_layers(tiny_pipe.unet)):
        with torch.no_grad():
            for n in "ab":
                rows(tiny_pipe, n).emb_params.copy_(tables[n][l].expand_as(tables[n]))
        torch.testing.assert_close(seen[name][0][1], encode(tiny_pipe, "<a> and <b>")[0], atol=1e-5, rtol=1e-5)


def test_lone_models_and_config_from_a_toml_table(text_encoder, unet):
    layers = cross_attention_layers(unet)
    cfg = config_from_dict({"method": "ed-lora", "token": "<c>", "r": 2, "layers": list(layers),
                            "text_target": "clip-text-mlp", "unet_target": {"include": ["attn2.to_k"]}})
    assert cfg.layers == layers and cfg.unet_target.include == ("attn2.to_k",)
    inject(unet, cfg, "c")  # a lone U-Net: the LoRA part only
    assert {q.rsplit(".", 2)[-2] for q, _ in hosts(unet)} == {"attn2"}
    inject(text_encoder, cfg, "c")  # a lone text encoder: table sized by ``layers``, no tokenizer, no router
    table = text_encoder.get_input_embeddings().deltas["c"]
    assert table.emb_params.shape == (4, 2, 32) and not table.router
    assert any(q.endswith("fc1") for q, _ in hosts(text_encoder))


def test_bad_input_is_refused_with_the_pipeline_untouched(tiny_pipe, text_encoder):
    size = len(tiny_pipe.tokenizer)
    with pytest.raises(ValueError, match="already exist"):
        inject(tiny_pipe, EDLoRA(token="cat"), "c")
    with pytest.raises(ValueError, match="one token"):
        inject(tiny_pipe, EDLoRA(token="<c>", init_word="cat dog"), "c")
    with pytest.raises(ValueError, match="not modules"):
        inject(tiny_pipe, EDLoRA(token="<c>", layers=("down_blocks.0.attn9",)), "c")
    assert len(tiny_pipe.tokenizer) == size and not list(hosts(tiny_pipe))
    with pytest.raises(ValueError, match="layers"):
        inject(text_encoder, EDLoRA(token="<c>"), "c")
    for bad in ({"num_vectors": 0}, {"token": " <c>"}, {"init_std": -1.0}, {"layers": ("",)}):
        with pytest.raises(ValueError):
            EDLoRA(**bad)
    with pytest.raises(TypeError):
        EDLoRA(text_target=3)
