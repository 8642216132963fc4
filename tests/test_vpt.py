"""VPT (``peft_diffusion/methods/vpt.py``): Eq. 1-4 of arXiv 2203.12119 against the encoder layers run by hand,
what trains, files, remove, counts on CLIP ViT-B/16's vision config (meta device), bad inputs."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import CLIPModel, CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

import peft_diffusion as pd
import tiny
from peft_diffusion.api import sites
from peft_diffusion.io.files import AdapterFileError
from peft_diffusion.methods import VPT
from peft_diffusion.models import path as embedded_path


def _by_hand(base, pixels, prompts, deep):
    """[CLS, P_0, patches] through the frozen copy's layers; deep: P_i replaces the prompt slice before layer i."""
    p = prompts.shape[1]
    with torch.no_grad():
        h = base.pre_layrnorm(base.embeddings(pixels))
        h = torch.cat([h[:, :1], prompts[0].expand(len(h), -1, -1), h[:, 1:]], dim=1)
        for i, layer in enumerate(base.encoder.layers):
            if deep and i > 0:
                h = torch.cat([h[:, :1], prompts[i].expand(len(h), -1, -1), h[:, 1 + p:]], dim=1)
            h = layer(h, None)
        last = torch.cat([h[:, :1], h[:, 1 + p:]], dim=1)
        return last, base.post_layernorm(last[:, 0])


@pytest.mark.parametrize("deep", [False, True])
def test_formula_against_layers_by_hand(deep, make_model):
    model = make_model("clip-vision")
    base = copy.deepcopy(model)
    pd.inject(model, VPT(num_tokens=3, deep=deep))
    delta = dict(sites(model))["encoder"].deltas["default"]
    assert delta.prompt.shape == ((2 if deep else 1), 3, 32)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(pixel_values=pixels)
    last, pooled = _by_hand(base, pixels, delta.prompt.detach(), deep)
    assert out.last_hidden_state.shape == (2, 17, 32)  # [CLS, 16 patches]: the prompt positions are dropped
    torch.testing.assert_close(out.last_hidden_state, last, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.pooler_output, pooled, atol=1e-5, rtol=0)
    with torch.no_grad():  # the recorded inner states keep the prompt positions (documented)
        states = model(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert len(states) == 3 and all(h.shape == (2, 20, 32) for h in states)
    # the prompts matter: the [CLS] output differs from the base model's
    assert not torch.allclose(out.pooler_output, base(pixel_values=pixels).pooler_output, atol=1e-3)


def test_deep_in_the_embedded_clip_image_features():
    """shapes-clip's CLIPModel: get_image_features = visual_projection(post_layernorm(x_N[CLS])) of Eq. 3-4."""
    clip = CLIPModel.from_pretrained(embedded_path("shapes-clip")).eval()
    base = copy.deepcopy(clip.vision_model)
    torch.manual_seed(0)
    pd.inject(clip, VPT(num_tokens=5, deep=True))
    delta = dict(sites(clip))["vision_model.encoder"].deltas["default"]
    assert delta.prompt.shape == (4, 5, 96)  # 4 layers of width 96
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        feats = clip.get_image_features(pixel_values=pixels)
        feats = feats if torch.is_tensor(feats) else feats.pooler_output
        _, pooled = _by_hand(base, pixels, delta.prompt, deep=True)
        torch.testing.assert_close(feats, clip.visual_projection(pooled), atol=1e-5, rtol=0)


def test_uniform_xavier_init(make_model):
    model = make_model("clip-vision")
    torch.manual_seed(0)
    pd.inject(model, VPT(num_tokens=200, deep=True))
    prompt = dict(sites(model))["encoder"].deltas["default"].prompt
    bound = (6.0 / (3 * 8 * 8 + 32)) ** 0.5  # fan-in 3 x patch^2 (patch 8), fan-out d = 32
    assert prompt.abs().max() <= bound and prompt.abs().max() > 0.95 * bound
    assert abs(prompt.std().item() - bound / 3 ** 0.5) < 0.02 * bound  # U(-a, a): std a / sqrt(3)


@pytest.mark.parametrize("deep", [False, True])
def test_only_the_prompts_train_and_learn(deep, make_model):
    model = make_model("clip-vision")
    pd.inject(model, VPT(num_tokens=2, deep=deep))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["encoder.peft_annex.deltas.default.prompt"]
    prompt = model.get_parameter(trainable[0])
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    w = torch.randn(32, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items() if ".deltas." not in k}
    optim = torch.optim.Adam([prompt], lr=1e-2)
    losses = []
    for _ in range(30):
        loss = (model(pixel_values=pixels).pooler_output @ w).mean()  # push [CLS] along w
        optim.zero_grad()
        loss.backward()
        if not losses:  # every layer's prompt set gets a gradient (deep: each P_i reaches [CLS] through L_i+1..)
            assert all(g.abs().sum() > 0 for g in prompt.grad)
        optim.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses[::10]
    after = {k: v for k, v in model.state_dict().items() if ".deltas." not in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_save_load_remove_and_gradient_checkpointing(make_model, tmp_path):
    model = make_model("clip-vision")
    types, state, hooks = tiny.module_types(model), tiny.snapshot(model), tiny.hooks_and_processors(model)
    pd.inject(model, VPT(num_tokens=3, deep=True))
    assert sorted(n for n, _ in sites(model)) == ["encoder", "encoder.layers.1"]  # the swap in layer 1's annex
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(pixel_values=pixels).pooler_output
    path = pd.save_adapter(model, tmp_path / "vpt.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        # one tensor (the swaps save nothing), under the component's name (transformers' "vision_model" prefix)
        assert list(f.keys()) == ["vision_model.encoder.prompt"]
        assert tuple(f.get_tensor("vision_model.encoder.prompt").shape) == (2, 3, 32)
    fresh = make_model("clip-vision")
    pd.load_adapter(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(pixel_values=pixels).pooler_output, out, atol=0, rtol=0)
    # gradient checkpointing re-runs each layer with its hooks: the swap must happen again (same values, grads)
    model.train()
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable()
        prompt = dict(sites(model))["encoder"].deltas["default"].prompt
        prompt.grad = None
        model(pixel_values=pixels).pooler_output.pow(2).sum().backward()
        grads.append(prompt.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)
    model.gradient_checkpointing_disable()
    model.eval()
    pd.remove(model)
    assert tiny.module_types(model) == types and tiny.hooks_and_processors(model) == hooks
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def _vit_b16():
    config = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              image_size=224, patch_size=16)
    with torch.device("meta"):
        return CLIPVisionModel(config)


@pytest.mark.parametrize("deep, count", [(True, 460_800), (False, 38_400)])
def test_counts_on_clip_vit_b16(deep, count):
    model = _vit_b16()
    pd.inject(model, VPT(num_tokens=50, deep=deep))
    report = pd.parameter_report(model)
    assert report.adapters["default"]["trainable"] == count  # 50 x 12 x 768 deep, 50 x 768 shallow
    assert report.model_trainable == count


def test_many_tokens_no_position_limit(make_model):
    """Prompts take no position embedding: 100 tokens on a 16-patch tower run (no limit applies)."""
    model = make_model("clip-vision")
    pd.inject(model, VPT(num_tokens=100, deep=True))
    with torch.no_grad():
        out = model(pixel_values=torch.randn(1, 3, 32, 32))
    assert out.last_hidden_state.shape == (1, 17, 32) and torch.isfinite(out.pooler_output).all()


def _other_clip_vision(**kw):
    from transformers import CLIPVisionConfig

    settings = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                    patch_size=8)
    return CLIPVisionModel(CLIPVisionConfig(**{**settings, **kw})).eval()


@pytest.mark.parametrize("other, sides", [({"num_hidden_layers": 3}, ("(2, 3, 32)", "(3, 3, 32)", "3 layers")),
                                          ({"hidden_size": 48}, ("(2, 3, 32)", "(2, 3, 48)", "width 48"))])
def test_prompt_file_for_another_encoder_is_refused(other, sides, make_model, tmp_path):
    model = make_model("clip-vision")
    pd.inject(model, VPT(num_tokens=3, deep=True))
    path = pd.save_adapter(model, tmp_path / "vpt.safetensors")
    target = _other_clip_vision(**other)
    state, hooks = tiny.snapshot(target), tiny.hooks_and_processors(target)
    with pytest.raises(AdapterFileError) as err:
        pd.load_adapter(target, path)
    assert all(s in str(err.value) for s in sides), str(err.value)
    assert tiny.hooks_and_processors(target) == hooks and not list(sites(target))
    assert all(torch.equal(target.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("key", ["bert", "clip-text"])
def test_model_without_clip_vision_tower_is_refused(key, make_model):
    model = make_model(key)
    state, hooks = tiny.snapshot(model), tiny.hooks_and_processors(model)
    name = type(model).__name__
    with pytest.raises(ValueError, match=f"VPT needs a CLIP-style vision tower.*{name} has none"):
        pd.inject(model, VPT(num_tokens=2))
    assert tiny.hooks_and_processors(model) == hooks and not list(sites(model))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_bad_settings_and_targets(make_model):
    for bad in ({"num_tokens": 0}, {"num_tokens": 2.0}, {"deep": 1}, {"dropout": 1.0}):
        with pytest.raises(ValueError, match="VPT"):
            VPT(**bad)
    model = make_model("clip")
    with pytest.raises(ValueError, match=r"selects 'text_model.encoder', a CLIPEncoder.*vision_model.encoder"):
        pd.inject(model, VPT(num_tokens=2, target=pd.Target(include=(r"text_model\.encoder",), types=())))
    assert not list(sites(model))
    pd.inject(model, VPT(num_tokens=2, target=pd.Target(include=(r"vision_model\.encoder",), types=())))
    assert [n for n, _ in sites(model)] == ["vision_model.encoder"]


def test_two_active_vpt_adapters_are_refused(make_model):
    model = make_model("clip-vision")
    pd.inject(model, VPT(num_tokens=2), "a")
    pd.inject(model, VPT(num_tokens=3), "b")
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(RuntimeError, match=r"VPT adapters \['a', 'b'\] are active"):
        model(pixel_values=x)
    pd.set_adapters(model, "b")
    with torch.no_grad():
        assert model(pixel_values=x).last_hidden_state.shape == (1, 17, 32)


def test_prompts_trained_in_clip_load_into_its_vision_tower_alone(tmp_path):
    """A file saved from shapes-clip's CLIPModel loads into CLIPVisionModelWithProjection (a pipeline's image
    encoder) and gives the same image embeddings."""
    clip = CLIPModel.from_pretrained(embedded_path("shapes-clip")).eval()
    pd.inject(clip, VPT(num_tokens=4, deep=True))
    path = pd.save_adapter(clip, tmp_path / "vpt.safetensors")
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    tower = CLIPVisionModelWithProjection.from_pretrained(embedded_path("shapes-clip")).eval()
    pd.load_adapter(tower, path)
    with torch.no_grad():
        feats = clip.get_image_features(pixel_values=pixels)
        feats = feats if torch.is_tensor(feats) else feats.pooler_output
        torch.testing.assert_close(tower(pixel_values=pixels).image_embeds, feats, atol=1e-6, rtol=0)
