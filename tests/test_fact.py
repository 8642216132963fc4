"""FacT (methods/fact.py): the TT and TK increments against a by-hand loop over the d x d slices, the adapted
model against a copy whose weights got the by-hand increments (CLIP vision / text, BERT, LLaMA, GPT-2, diffusers
U-Net and PixArt attention), one U / V per model shared by every layer, bit-exact start with V = 0, exact
fuse / unfuse, save / load, remove, the CLIP ViT-B/16 counts on the meta device (and the paper's VTAB averages
from the published per-task ranks), bad inputs."""
from __future__ import annotations

import copy

import pytest
import torch

import peft_diffusion as pd
import tiny
from peft_diffusion.api import sites
from peft_diffusion.methods.fact import FacTDelta, FacTFactors
from peft_diffusion.target import Target
from test_bottleneck import _same, _snapshot

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def _deltas(model, name="a"):
    return {s: site.deltas[name] for s, site in sites(model) if name in site.deltas}


def _layers(model, name="a"):
    return {s: d for s, d in _deltas(model, name).items() if s}


def clip_vision_mlp():
    """A tiny CLIP vision tower whose MLP width (64) is a multiple of the hidden size (32), as in ViT-B."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(0)
    return CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, image_size=32, patch_size=8)).eval()


def clip_text_mlp():
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=16)).eval()


def bert_mlp():
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=64)).eval()


def llama_mlp():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64)).eval()


# (name, model builder, inputs, config, expected block d)
CASES = [
    ("clip-vision", clip_vision_mlp, tiny.clip_vision_inputs, pd.FacT(r=4, scale=2.0), 32),
    ("clip-text", clip_text_mlp, tiny.clip_text_inputs, pd.FacT(r=3, variant="tk", scale=0.5), 32),
    ("bert", bert_mlp, tiny.token_inputs, pd.FacT(r=4), 32),
    ("llama", llama_mlp, tiny.token_inputs, pd.FacT(r=2, variant="tk"), 16),  # k / v: 16 wide (2 kv heads)
    ("gpt2", tiny.tiny_gpt2, tiny.token_inputs, pd.FacT(r=4, scale=3.0), 32),  # Conv1D: c_attn = 3 slices
    ("unet", tiny.tiny_unet, tiny.unet_inputs, pd.FacT(r=2), None),
    ("pixart", tiny.tiny_pixart, tiny.pixart_inputs, pd.FacT(r=2, variant="tk"), 16),
]


def _slices_by_hand(delta: FacTDelta, shared: FacTFactors) -> torch.Tensor:
    """dW (out, in) = s * V Sigma_n U^T written slice by slice, n = i b + j, Sigma_n read from the stored cores
    (TT) or built as sum_k C[:, :, k] P[n, k] (TK)."""
    cfg = delta.config
    u, v, r, s = shared.fact_u, shared.fact_v, cfg.r, cfg.scale
    d = u.shape[0]
    dw = torch.zeros(delta.a * d, delta.b * d)
    for i in range(delta.a):
        for j in range(delta.b):
            if cfg.variant == "tt":
                sigma = delta.fact_core[i * r:(i + 1) * r, j * r:(j + 1) * r]
            else:
                p = delta.fact_p[i * delta.b + j]
                sigma = sum(shared.fact_c[:, :, k] * p[k] for k in range(r))
            dw[i * d:(i + 1) * d, j * d:(j + 1) * d] = s * v @ sigma @ u.T
    return dw


@pytest.mark.parametrize("key, build, make_inputs, config, block", CASES, ids=[c[0] for c in CASES])
def test_increments_by_hand_and_the_model_with_them_added(key, build, make_inputs, config, block):
    model = build()
    reference = copy.deepcopy(model)
    inputs = make_inputs()
    base = tiny.run(model, inputs)
    pd.inject(model, config, "a")
    assert torch.equal(tiny.run(model, inputs), base)  # V = 0: bit-exact start
    tiny.perturb_trainable(model, std=0.2)
    shared = _deltas(model)[""]
    layers = _layers(model)
    assert block is None or shared.config.block == block
    assert shared.fact_u.shape == shared.fact_v.shape == (shared.config.block, config.r)
    with torch.no_grad():
        for site, delta in layers.items():
            hand = _slices_by_hand(delta, shared)
            layer = reference.get_submodule(site)
            if type(layer).__name__ == "Conv1D":  # GPT-2 stores (in, out)
                hand = hand.T
            torch.testing.assert_close(delta.delta_weight(), hand, atol=1e-5, rtol=0)
            layer.weight.add_(hand)
        torch.testing.assert_close(tiny.run(model, inputs), tiny.run(reference, inputs), atol=1e-5, rtol=1e-5)


def test_default_targets_follow_the_paper(make_model):
    """Attention q / k / v / o and both MLP layers of every block; ViT-style slicing (fc1: 4 x 1, fc2: 1 x 4)."""
    model = clip_vision_mlp()
    pd.inject(model, pd.FacT(r=4), "a")
    layers = _layers(model)
    names = sorted({s.rsplit(".", 1)[1] for s in layers})
    assert names == ["fc1", "fc2", "k_proj", "out_proj", "q_proj", "v_proj"] and len(layers) == 12
    shape = {s.rsplit(".", 1)[1]: (d.a, d.b, tuple(d.fact_core.shape)) for s, d in layers.items()}
    assert shape["q_proj"] == (1, 1, (4, 4)) and shape["fc1"] == (2, 1, (8, 4)) and shape["fc2"] == (1, 2, (4, 8))
    bert = bert_mlp()
    pd.inject(bert, pd.FacT(r=2), "a")
    assert len(_layers(bert)) == 2 * 6  # query, key, value, attention.output.dense, intermediate.dense, output.dense
    unet = make_model("unet")
    pd.inject(unet, pd.FacT(r=2), "a")
    kinds = {s.split("transformer_blocks.0.")[1] for s in _layers(unet)}
    assert kinds == {f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")} | \
        {"ff.net.0.proj", "ff.net.2"}


def test_one_shared_u_and_v_per_model(make_model):
    model = clip_vision_mlp()
    pd.inject(model, pd.FacT(r=4), "a")
    us = [n for n, _ in model.named_parameters() if n.endswith(("fact_u", "fact_v", "fact_c"))]
    assert us == ["peft_annex.deltas.a.fact_u", "peft_annex.deltas.a.fact_v"]
    shared = model.peft_annex.deltas["a"]
    assert all(d.config._shared.get(s) is shared for s, d in _layers(model).items())
    # at init only V gets a gradient (U and the cores are behind V = 0)
    model.train()
    tiny.main_output(model(**tiny.clip_vision_inputs())).pow(2).mean().backward()
    assert shared.fact_v.grad.abs().sum() > 0 and not shared.fact_u.grad.any()
    assert all(not d.fact_core.grad.any() for d in _layers(model).values())
    # once V moved, U's gradient is the sum of every layer's: one tensor, read by all of them
    tiny.perturb_trainable(model, std=0.2)
    layers = list(_layers(model).values())
    g = torch.Generator().manual_seed(5)
    probes = [torch.randn(d.delta_weight().shape, generator=g) for d in layers]
    model.zero_grad()
    sum((d.delta_weight() * t).sum() for d, t in zip(layers, probes)).backward()
    total = shared.fact_u.grad.clone()
    per_layer = torch.zeros_like(total)
    for d, t in zip(layers, probes):
        model.zero_grad()
        (d.delta_weight() * t).sum().backward()
        assert shared.fact_u.grad.abs().sum() > 0
        per_layer += shared.fact_u.grad
    torch.testing.assert_close(total, per_layer, atol=1e-5, rtol=1e-5)
    pd.inject(model, pd.FacT(r=2, variant="tk"), "b")  # a second adapter has factors of its own
    second = model.peft_annex.deltas["b"]
    assert second.fact_u is not shared.fact_u and second.fact_c.shape == (2, 2, 2)
    assert all(d.config._shared.get(s) is second for s, d in _layers(model, "b").items())


@pytest.mark.parametrize("variant", ["tt", "tk"])
def test_fuse_and_unfuse_exact(variant):
    model = clip_vision_mlp()
    weights = {n: p.clone() for n, p in model.named_parameters()}
    inputs = tiny.clip_vision_inputs()
    pd.inject(model, pd.FacT(r=4, variant=variant, scale=0.7), "a")
    tiny.perturb_trainable(model, std=0.2)
    out = tiny.run(model, inputs)
    shared = model.peft_annex.deltas["a"]
    with torch.no_grad():
        hands = {s: _slices_by_hand(d, shared) for s, d in _layers(model).items()}
    pd.fuse(model)
    for s, hand in hands.items():
        site = model.get_submodule(s)
        assert site.merged == {"a": 1.0}
        torch.testing.assert_close(site.base.weight, weights[f"{s}.weight"] + hand, atol=1e-6, rtol=0)
    assert model.peft_annex.merged == {}  # nothing to fold from the shared factors
    torch.testing.assert_close(tiny.run(model, inputs), out, atol=1e-5, rtol=0)
    pd.unfuse(model)
    for s in hands:
        torch.testing.assert_close(model.get_submodule(s).base.weight, weights[f"{s}.weight"], atol=1e-6, rtol=0)
    torch.testing.assert_close(tiny.run(model, inputs), out, atol=1e-5, rtol=0)
    now = {s: model.get_submodule(s).base.weight.clone() for s in hands}
    pd.fuse(model, ["a"], exact=True)
    pd.unfuse(model)
    assert all(torch.equal(model.get_submodule(s).base.weight, now[s]) for s in hands)
    pd.set_adapters(model, {"a": 0.5})  # the adapter weight scales dW
    half = tiny.run(model, inputs)
    pd.fuse(model)
    torch.testing.assert_close(tiny.run(model, inputs), half, atol=1e-5, rtol=0)


def test_dropout_acts_on_the_rank_r_activations_in_training_only():
    model = clip_vision_mlp()
    inputs = tiny.clip_vision_inputs()
    pd.inject(model, pd.FacT(r=4, dropout=0.5), "a")
    tiny.perturb_trainable(model, std=0.2)
    out = tiny.run(model, inputs)
    assert torch.equal(tiny.run(model, inputs), out)  # eval: no dropout
    model.train()
    with torch.no_grad():
        a, b = tiny.main_output(model(**inputs)), tiny.main_output(model(**inputs))
    assert not torch.allclose(a, b)


def test_save_load_remove(tmp_path):
    model = clip_text_mlp()
    before = _snapshot(model)
    inputs = tiny.clip_text_inputs()
    pd.inject(model, pd.FacT(r=3, variant="tk"), "a")
    tiny.perturb_trainable(model, std=0.2)
    out = tiny.run(model, inputs)
    path = pd.save_adapter(model, tmp_path / "fact.safetensors", "a")
    fresh = clip_text_mlp()
    assert pd.load_adapter(fresh, path) == "a"  # the name stored in the file
    torch.testing.assert_close(tiny.run(fresh, inputs), out, atol=1e-6, rtol=0)
    assert fresh.peft_annex.deltas["a"].config.block == 32  # recorded in the file's config
    pd.remove(model)
    _same(_snapshot(model), before)


def test_one_tower_of_a_clip_model(tmp_path):
    """Injected into ``CLIPModel.vision_model`` (the paper's setting inside a VLM), saved from and loaded into
    the whole CLIPModel: the factors' site is then "vision_model"."""
    model = tiny.tiny_clip()
    inputs = tiny.clip_inputs()
    base = tiny.run(model, inputs)
    model.requires_grad_(False)  # inject freezes the tower it is given, not the text side
    pd.inject(model.vision_model, pd.FacT(r=2, target="clip-vision"), "a")
    assert [s for s, _ in sites(model) if not s.startswith("vision_model.")] == ["vision_model"]
    tiny.perturb_trainable(model, std=0.2)
    out = tiny.run(model, inputs)
    assert not torch.allclose(out, base, atol=1e-4)
    path = pd.save_adapter(model, tmp_path / "tower.safetensors", "a")
    fresh = tiny.tiny_clip()
    pd.load_adapter(fresh, path)
    torch.testing.assert_close(tiny.run(fresh, inputs), out, atol=1e-6, rtol=0)
    assert all(s.startswith("vision_model") for s, _ in sites(fresh))


# CLIP ViT-B/16's vision tower: 12 blocks of d = 768, MLP 3072: 12 slices per block, 144 in all
VIT_B = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
             patch_size=16)


@pytest.mark.parametrize("variant, r, count", [("tt", 8, 21_504), ("tt", 16, 61_440), ("tt", 4, 8_448),
                                               ("tk", 32, 86_528), ("tk", 16, 30_976)])
def test_clip_vit_b16_counts_on_meta(variant, r, count):
    from transformers import CLIPVisionConfig, CLIPVisionModel
    with torch.device("meta"):
        vit = CLIPVisionModel(CLIPVisionConfig(**VIT_B))
    pd.inject(vit, pd.FacT(r=r, variant=variant), "a")
    d, slices = 768, 144
    expected = 2 * d * r + (slices * r * r if variant == "tt" else r ** 3 + slices * r)
    assert pd.parameter_report(vit).adapters["a"]["trainable"] == expected == count
    assert len(_layers(vit)) == 72 and sum(x.a * x.b for x in _layers(vit).values()) == slices


@pytest.mark.parametrize("target, count", [(None, 3_785_344), ("unet-attn", 1_462_144)])
def test_sd15_unet_counts_on_meta(target, count):
    """SD1.5: widths 320 / 640 / 1280 and 768-wide text features (cross-attention to_k / to_v): d = gcd = 64."""
    from diffusers import UNet2DConditionModel
    from test_sd15_counts import SD15_UNET
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    pd.inject(unet, pd.FacT(r=8, target=target), "a")
    assert unet.peft_annex.deltas["a"].config.block == 64
    slices = sum(m.weight.shape[0] * m.weight.shape[1] // 64 ** 2 for s, m in unet.named_modules()
                 if s.endswith(".base") and isinstance(m, torch.nn.Linear))
    assert pd.parameter_report(unet).adapters["a"]["trainable"] == 2 * 64 * 8 + 64 * slices == count


def test_the_papers_vtab_averages_from_the_published_ranks():
    """The paper's 0.040 M (TT) and 0.069 M (TK) are means over VTAB-1k's 19 tasks of per-task ranks (the
    published configs, JieShibo/PETL-ViT FacT/configs)."""
    tt = {4: 1, 8: 9, 16: 9}
    tk = {16: 6, 32: 13}
    d, slices = 768, 144
    mean_tt = sum(n * (2 * d * r + slices * r * r) for r, n in tt.items()) / 19
    mean_tk = sum(n * (2 * d * r + r ** 3 + slices * r) for r, n in tk.items()) / 19
    assert round(mean_tt) == 39_734 and round(mean_tt / 1e6, 3) == 0.040
    assert round(mean_tk) == 68_985 and round(mean_tk / 1e6, 3) == 0.069


def test_bad_inputs_are_refused_and_model_untouched(make_model):
    for bad in (dict(r=0), dict(r=2.0), dict(variant="cp"), dict(dropout=1.0), dict(scale=float("nan")),
                dict(block=0), dict(r=8, block=4)):
        with pytest.raises(ValueError):
            pd.FacT(**bad)
    cases = [
        # the tiny CLIP's MLP is 37 wide: the gcd of 32 and 37 is 1
        ("clip-vision", pd.FacT(r=2), r"rank r=2 exceeds the block size 1 .*\[32, 37\]"),
        ("bert", pd.FacT(r=2, block=5), r"block 5 does not divide the widths of \['encoder.layer.0.attention.self.query"),
        ("unet", pd.FacT(r=2, target=Target(include=("conv_in", "to_q"), types=("Linear", "Conv2d"))),
         r"Linear \(and GPT-2 Conv1D\).*conv_in \(Conv2d\)"),
        ("llama", pd.FacT(target=Target(include=("nothing",))), "matches no layer"),
    ]
    for key, config, message in cases:
        model = make_model(key)
        before = _snapshot(model)
        with pytest.raises(ValueError, match=message):
            pd.inject(model, config, "a")
        _same(_snapshot(model), before)
    model = make_model("llama")
    pd.inject(model, pd.FacT(r=2, target=Target(include=ATTN)), "a")
    model.peft_annex.deltas["a"].detach(None)  # the layers without their shared factors say so
    with pytest.raises(RuntimeError, match="shared factors"):
        tiny.run(model, tiny.token_inputs())
