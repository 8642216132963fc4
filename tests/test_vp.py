"""VP, the padding prompt (``peft_diffusion/methods/vp.py``, arXiv 2203.17274): x + frame against the base model
fed the framed pixels by hand, zero init = identity, what trains, files, remove, the ViT-B/16 count at 224 px,
bad inputs."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

import peft_diffusion as pd
import tiny
from peft_diffusion.api import sites
from peft_diffusion.io.files import AdapterFileError
from peft_diffusion.methods import VP


def _frame_by_hand(d, size, p):
    f = torch.zeros(1, 3, size, size)
    f[..., :p, :] = d.pad_up.detach()
    f[..., size - p:, :] = d.pad_down.detach()
    f[..., p:size - p, :p] = d.pad_left.detach()
    f[..., p:size - p, size - p:] = d.pad_right.detach()
    return f


@pytest.mark.parametrize("key", ["clip-vision", "clip"])
def test_formula_x_plus_frame(key, make_model):
    model = make_model(key)
    base = copy.deepcopy(model)
    torch.manual_seed(0)
    pd.inject(model, VP(padding=5, init="normal"))
    site = "embeddings" if key == "clip-vision" else "vision_model.embeddings"
    delta = dict(sites(model))[site].deltas["default"]
    assert delta.pad_up.shape == (1, 3, 5, 32) and delta.pad_left.shape == (1, 3, 22, 5)
    frame = _frame_by_hand(delta, 32, 5)
    assert (frame[..., 5:27, 5:27] == 0).all() and (frame[..., :5, :] != 0).all()
    inputs = tiny.MODELS[key][1](batch=2)
    framed = {**inputs, "pixel_values": inputs["pixel_values"] + frame}
    torch.testing.assert_close(tiny.run(model, inputs), tiny.run(base, framed), atol=1e-5, rtol=0)
    assert not torch.allclose(tiny.run(model, inputs), tiny.run(base, inputs), atol=1e-3)
    pd.set_adapters(model, {"default": 0.5})  # an adapter weight scales the frame
    half = {**inputs, "pixel_values": inputs["pixel_values"] + 0.5 * frame}
    torch.testing.assert_close(tiny.run(model, inputs), tiny.run(base, half), atol=1e-5, rtol=0)


def test_zero_init_is_identity_and_only_the_frame_trains(make_model):
    model = make_model("clip-vision")
    inputs = tiny.clip_vision_inputs(batch=2)
    base_out = tiny.run(model, inputs)
    pd.inject(model, VP(padding=4))
    torch.testing.assert_close(tiny.run(model, inputs), base_out, atol=0, rtol=0)
    trainable = sorted(n.rsplit(".", 1)[1] for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["pad_down", "pad_left", "pad_right", "pad_up"]
    params = [p for p in model.parameters() if p.requires_grad]
    w = torch.randn(32, generator=torch.Generator().manual_seed(1))
    optim = torch.optim.Adam(params, lr=5e-2)
    losses = []
    for _ in range(20):
        loss = (model(**inputs).pooler_output @ w).mean()
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses[::5]
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_save_load_and_remove(make_model, tmp_path):
    model = make_model("clip-vision")
    types, state, hooks = tiny.module_types(model), tiny.snapshot(model), tiny.hooks_and_processors(model)
    torch.manual_seed(0)
    pd.inject(model, VP(padding=3, init="normal"))
    inputs = tiny.clip_vision_inputs()
    out = tiny.run(model, inputs)
    path = pd.save_adapter(model, tmp_path / "vp.safetensors")
    fresh = make_model("clip-vision")
    pd.load_adapter(fresh, path)
    torch.testing.assert_close(tiny.run(fresh, inputs), out, atol=0, rtol=0)
    pd.remove(model)
    assert tiny.module_types(model) == types and tiny.hooks_and_processors(model) == hooks
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_count_on_clip_vit_b16_at_224():
    config = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              image_size=224, patch_size=16)
    with torch.device("meta"):
        model = CLIPVisionModel(config)
    pd.inject(model, VP(padding=30))
    assert pd.parameter_report(model).adapters["default"]["trainable"] == 3 * (224 ** 2 - 164 ** 2) == 69_840


def _tower(image_size):
    return CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                            num_attention_heads=4, image_size=image_size, patch_size=8)).eval()


def test_bad_inputs_leave_the_model_untouched(make_model, tmp_path):
    for bad in ({"padding": 0}, {"padding": True}, {"init": "uniform"}):
        with pytest.raises(ValueError, match="VP"):
            VP(**bad)
    model = make_model("clip-vision")
    state, hooks = tiny.snapshot(model), tiny.hooks_and_processors(model)
    with pytest.raises(ValueError, match=r"padding 16 leaves no image inside the 32 px input.*below 16"):
        pd.inject(model, VP(padding=16))
    bert = make_model("bert")
    with pytest.raises(ValueError, match="VP needs a CLIP-style vision tower.*BertModel has none"):
        pd.inject(bert, VP(padding=2))
    assert not list(sites(bert)) and not list(sites(model)) and tiny.hooks_and_processors(model) == hooks
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    # an image of another size: an error naming both, not a silent resize
    pd.inject(model, VP(padding=4))
    with pytest.raises(ValueError, match=r"pixel values of shape \(1, 3, 64, 64\).*\[N, 3, 32, 32\]"):
        model(pixel_values=torch.randn(1, 3, 64, 64), interpolate_pos_encoding=True)
    # a frame file for another image size: both shapes named, the other model untouched
    path = pd.save_adapter(model, tmp_path / "vp.safetensors")
    other = _tower(48)
    other_state = tiny.snapshot(other)
    with pytest.raises(AdapterFileError, match=r"pad_\w+ has shape \(1, 3, 4, 32\) in the file but \(1, 3, 4, 48\)"):
        pd.load_adapter(other, path)
    assert not list(sites(other)) and all(torch.equal(other.state_dict()[k], v) for k, v in other_state.items())
