"""Convpass (``peft_diffusion/methods/convpass.py``, arXiv 2207.07039): the tower against its layers run by hand
with the bypass written out tap by tap (Sec. 3.2: X + MHSA(LN X) + s Convpass(LN X), the same beside the MLP),
the 3x3 neighbourhoods on the patch grid and the [CLS] token as its own 1x1 image, the published init, what
trains, files, counts on CLIP ViT-B/16's vision config (meta device), the embedded shapes CLIP, bad inputs."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import CLIPModel, CLIPVisionConfig, CLIPVisionModel

import peft_diffusion as pd
import tiny
from peft_diffusion.api import sites
from peft_diffusion.methods import Convpass
from peft_diffusion.models import path as embedded_path


def _quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def _bypass_by_hand(z_in, delta, s):
    """s * W_up g(conv3x3(g(W_down z))) with the 3x3 convolution summed tap by tap on the row-major g x g grid;
    [CLS] (position 0) sees only the centre tap (a 1x1 image, zero padding around it)."""
    z = _quick_gelu(z_in @ delta.adapter_down.weight.T + delta.adapter_down.bias)
    k, kb = delta.adapter_conv.weight, delta.adapter_conv.bias
    b, n, h = z.shape
    g = math.isqrt(n - 1)
    out = [z[:, 0] @ k[:, :, 1, 1].T + kb]
    for i in range(g):
        for j in range(g):
            acc = kb.expand(b, h)
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    if 0 <= i + di < g and 0 <= j + dj < g:
                        acc = acc + z[:, 1 + (i + di) * g + (j + dj)] @ k[:, :, 1 + di, 1 + dj].T
            out.append(acc)
    z = _quick_gelu(torch.stack(out, dim=1))
    return s * (z @ delta.adapter_up.weight.T + delta.adapter_up.bias)


def _tower_by_hand(base, pixels, deltas, s, attn_only=False):
    """The frozen copy's layers with the bypasses added: deltas[(layer, "self_attn" | "mlp")]."""
    h = base.pre_layrnorm(base.embeddings(pixels))
    for i, layer in enumerate(base.encoder.layers):
        a = layer.layer_norm1(h)
        h = h + layer.self_attn(hidden_states=a, attention_mask=None)[0] + _bypass_by_hand(a, deltas[i, "self_attn"], s)
        m = layer.layer_norm2(h)
        h = h + layer.mlp(m) + (0 if attn_only else _bypass_by_hand(m, deltas[i, "mlp"], s))
    return h, base.post_layernorm(h[:, 0])


def _perturb(model, name="default", seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, site in sites(model):
            for p in site.deltas[name].parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def _deltas(model, prefix="", name="default"):
    out = {}
    for s, site in sites(model):
        rest = s[len(prefix):].split(".")  # encoder.layers.<i>.<sub-layer>
        out[int(rest[2]), rest[3]] = site.deltas[name]
    return out


@pytest.mark.parametrize("config", [Convpass(scale=0.5), Convpass(dim=3, conv_init="xavier", scale=2.0),
                                    Convpass(dim=4, attn_only=True)], ids=["identity", "xavier", "attn-only"])
def test_formula_against_layers_by_hand(config, make_model):
    model = make_model("clip-vision")
    base = copy.deepcopy(model)
    pd.inject(model, config)
    subs = ("self_attn",) if config.attn_only else ("self_attn", "mlp")
    assert sorted(n for n, _ in sites(model)) == sorted(f"encoder.layers.{i}.{s}" for i in (0, 1) for s in subs)
    _perturb(model)
    deltas = _deltas(model)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(pixel_values=pixels)
        last, pooled = _tower_by_hand(base, pixels, deltas, config.scale, config.attn_only)
        torch.testing.assert_close(out.last_hidden_state, last, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.pooler_output, pooled, atol=1e-5, rtol=0)
        pd.set_adapters(model, {"default": 0.5})  # the adapter weight scales s
        _, pooled = _tower_by_hand(base, pixels, deltas, 0.5 * config.scale, config.attn_only)
        torch.testing.assert_close(model(pixel_values=pixels).pooler_output, pooled, atol=1e-5, rtol=0)
        assert not torch.allclose(pooled, base(pixel_values=pixels).pooler_output, atol=1e-3)


def test_3x3_neighbourhoods_and_the_cls_token(make_model):
    """Changing one patch token changes the bypass at exactly its 3x3 neighbours; [CLS] only changes itself."""
    model = pd.inject(make_model("clip-vision"), Convpass(dropout=0.0))
    _perturb(model)
    delta = dict(sites(model))["encoder.layers.0.mlp"].deltas["default"]
    x = torch.randn(1, 17, 32, generator=torch.Generator().manual_seed(2))  # [CLS] + 4 x 4 patches
    with torch.no_grad():
        ref = delta.branch(x, 1.0)
        y = x.clone()
        y[0, 1 + 1 * 4 + 2] += 1.0  # the patch at row 1, column 2
        changed = ((delta.branch(y, 1.0) - ref).abs().amax(-1) > 1e-7)[0].nonzero().flatten().tolist()
        assert changed == [1 + r * 4 + c for r in (0, 1, 2) for c in (1, 2, 3)]
        y = x.clone()
        y[0, 0] += 1.0
        changed = ((delta.branch(y, 1.0) - ref).abs().amax(-1) > 1e-7)[0].nonzero().flatten().tolist()
        assert changed == [0]


def test_published_init_and_bit_exact_start(make_model):
    model = make_model("clip-vision")
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(pixel_values=pixels).last_hidden_state
    torch.manual_seed(0)
    pd.inject(model, Convpass(dim=8), "id")
    pd.inject(model, Convpass(dim=8, conv_init="xavier"), "xa")
    with torch.no_grad():
        assert torch.equal(model(pixel_values=pixels).last_hidden_state, ref)  # W_up = 0, b_up = 0
    for name in ("id", "xa"):
        d = dict(sites(model))["encoder.layers.1.self_attn"].deltas[name]
        assert d.adapter_down.weight.shape == (8, 32) and d.adapter_up.weight.shape == (32, 8)
        assert d.adapter_down.weight.abs().max() <= math.sqrt(6 / (32 + 8))  # uniform Xavier
        assert not d.adapter_up.weight.any() and not d.adapter_up.bias.any()
        assert not d.adapter_down.bias.any() and not d.adapter_conv.bias.any()
    k = dict(sites(model))["encoder.layers.1.self_attn"].deltas["id"].adapter_conv.weight
    expected = torch.zeros(8, 8, 3, 3)
    expected[:, :, 1, 1] = torch.eye(8)
    assert torch.equal(k, expected)
    k = dict(sites(model))["encoder.layers.1.self_attn"].deltas["xa"].adapter_conv.weight
    bound = math.sqrt(6 / (2 * 8 * 9))
    assert k.abs().max() <= bound and k[:, :, 0, 0].abs().sum() > 0


def test_only_the_bypasses_train_and_learn(make_model):
    model = make_model("clip-vision")
    pd.inject(model, Convpass(scale=1.0))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 4 * 6 and all(".peft_annex.deltas.default.adapter_" in n for n in trainable)
    before = {k: v.clone() for k, v in model.state_dict().items() if ".deltas." not in k}
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    w = torch.randn(32, generator=torch.Generator().manual_seed(5))
    model.train()
    opt = torch.optim.Adam(trainable.values(), lr=1e-2)
    losses = []
    for step in range(30):
        loss = (model(pixel_values=pixels).pooler_output @ w).mean()
        opt.zero_grad()
        loss.backward()
        if step == 0:  # W_up = 0: only the up projections get a gradient at first
            assert all((p.grad.abs().sum() > 0) == (".adapter_up." in n) for n, p in trainable.items())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses[::10]
    after = {k: v for k, v in model.state_dict().items() if ".deltas." not in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_embedded_shapes_clip_image_features(tmp_path):
    """shapes-clip's CLIPModel (8 x 8 patch grid, 4 layers of width 96): only the vision tower gets bypasses;
    get_image_features = visual_projection(post_layernorm(x_N[CLS])) by hand; the text side is untouched."""
    clip = CLIPModel.from_pretrained(embedded_path("shapes-clip")).eval()
    base = copy.deepcopy(clip)
    ids = torch.tensor([[0, 5, 9, 12, 2]])
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(6)) * 2 - 1

    def features(model):
        with torch.no_grad():
            img, txt = model.get_image_features(pixel_values=pixels), model.get_text_features(input_ids=ids)
        return [f if torch.is_tensor(f) else f.pooler_output for f in (img, txt)]

    ref_img, ref_txt = features(clip)
    pd.inject(clip, Convpass(scale=0.1))
    layers = sorted({s.rsplit(".", 1)[0] for s, _ in sites(clip)})
    assert layers == [f"vision_model.encoder.layers.{i}" for i in range(4)]
    img, txt = features(clip)
    assert torch.equal(img, ref_img) and torch.equal(txt, ref_txt)
    _perturb(clip)
    img, txt = features(clip)
    with torch.no_grad():
        _, pooled = _tower_by_hand(base.vision_model, pixels, _deltas(clip, "vision_model."), 0.1)
        torch.testing.assert_close(img, base.visual_projection(pooled), atol=1e-5, rtol=0)
    assert torch.equal(txt, ref_txt) and not torch.allclose(img, ref_img, atol=1e-4)
    path = pd.save_adapter(clip, tmp_path / "convpass.safetensors")
    fresh = CLIPModel.from_pretrained(embedded_path("shapes-clip")).eval()
    pd.load_adapter(fresh, path)
    torch.testing.assert_close(features(fresh)[0], img, atol=0, rtol=0)


@pytest.mark.parametrize("attn_only, count", [(False, 327_552), (True, 163_776)])
def test_counts_on_clip_vit_b16(attn_only, count):
    config = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              image_size=224, patch_size=16)
    with torch.device("meta"):
        model = CLIPVisionModel(config)
    pd.inject(model, Convpass(dim=8, attn_only=attn_only))
    d, h, layers = 768, 8, 12
    per_bypass = (2 * h + 1) * d + 9 * h * h + 2 * h  # Sec. 3.2: 2 L ((2h + 1) d + 9 h^2 + 2 h) for both
    trainable = pd.parameter_report(model).adapters["default"]["trainable"]
    assert trainable == (1 if attn_only else 2) * layers * per_bypass == count


@pytest.mark.parametrize("key", ["unet", "pixart", "bert", "clip-text", "llama"])
def test_models_without_a_vision_tower_are_refused(key, make_model):
    model = make_model(key)
    state, hooks = tiny.snapshot(model), tiny.hooks_and_processors(model)
    with pytest.raises(ValueError, match=f"Convpass needs the 2-D patch grid of a CLIP vision tower; this "
                                         f"{type(model).__name__} has none"):
        pd.inject(model, Convpass())
    assert tiny.hooks_and_processors(model) == hooks and not list(sites(model))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_bad_settings_targets_grids_and_fuse(make_model):
    for bad in ({"dim": 0}, {"dim": 2.0}, {"scale": "big"}, {"conv_init": "zeros"}, {"dropout": 1.0},
                {"attn_only": 1}):
        with pytest.raises(ValueError, match=f"Convpass {next(iter(bad))}"):
            Convpass(**bad)
    model = make_model("clip")
    with pytest.raises(ValueError, match=r"selects 'text_model.encoder.layers.0', a CLIPEncoderLayer.*vision_model"):
        pd.inject(model, Convpass(target=pd.Target(include=(r"text_model\.encoder\.layers\.0",), types=())))
    assert not list(sites(model))
    pd.inject(model, Convpass(target=pd.Target(include=(r"vision_model\.encoder\.layers\.1",), types=())))
    assert sorted(n for n, _ in sites(model)) == ["vision_model.encoder.layers.1.mlp",
                                                  "vision_model.encoder.layers.1.self_attn"]
    tower = pd.inject(make_model("clip-vision"), Convpass())
    _perturb(tower)
    with pytest.raises(ValueError, match=r"21 tokens are not \[CLS\] \+ a square grid of patches"):
        tower(pixel_values=torch.randn(1, 3, 32, 40), interpolate_pos_encoding=True)  # a 4 x 5 grid
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = tower(pixel_values=pixels).pooler_output
    with pytest.raises(ValueError, match="cannot be fused"):
        pd.fuse(tower, ["default"])
    pd.fuse(tower)  # leaves it running, unfused
    with torch.no_grad():
        assert torch.equal(tower(pixel_values=pixels).pooler_output, out)
