"""T2I-Adapter (methods/t2i_adapter.py, io/t2i_adapter.py): diffusers' T2IAdapter as an annex on the U-Net.

Peers: our saved folder in diffusers' ``StableDiffusionAdapterPipeline`` gives our images (same seed), a
T2IAdapter made by diffusers loads into ours with its outputs, two adapters with weights equal diffusers'
``MultiAdapter``; SD1.5 counts on the meta device; the trainer; bad input.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import peft_diffusion as pd
import tiny
from peft_diffusion.api import hosts
from peft_diffusion.io.t2i_adapter import read_folder
from peft_diffusion.models import SHAPES_BASE
from peft_diffusion.models import path as embedded_path
from peft_diffusion.training import condition_inputs as ci
from test_sd15_counts import SD15_UNET

NAME = "t2i"


def control(batch=1, size=32, seed=3):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def perturb(obj, std=0.05):
    """Move the adapters' parameters away from their init (the peers must agree on trained adapters)."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, site in hosts(obj):
            for p in site.deltas.parameters():
                p.add_(torch.randn(p.shape, generator=g) * std)


def adapter_pipeline(pipe, adapter):
    from diffusers import StableDiffusionAdapterPipeline

    return StableDiffusionAdapterPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                          unet=pipe.unet, adapter=adapter, scheduler=pipe.scheduler,
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def images(pipe, guidance=3.0, **kw):
    pipe.set_progress_bar_config(disable=True)
    return pipe(["a photo of a cat", "a dog"], num_inference_steps=3, guidance_scale=guidance, height=32, width=32,
                output_type="np", generator=torch.Generator().manual_seed(0), **kw).images


@pytest.fixture(scope="module")
def embedded():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(embedded_path(SHAPES_BASE))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def light_unet():
    """A tiny U-Net in SD1.5's layout whose last two levels share their width: what the light adapter fits."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**{**tiny.UNET_CONFIG, "block_out_channels": (32, 64, 64),
                                   "down_block_types": ("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
                                   "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2,
                                   "attention_head_dim": (2, 4, 4)}).eval()


# ---------------------------------------------------------------- counts and shapes

@pytest.mark.parametrize("kind, count", [("full_adapter", 77_369_280), ("light_adapter", 18_689_200)])
def test_sd15_trainable_counts(kind, count):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    pd.inject(unet, pd.T2IAdapterConfig(adapter_type=kind, downscale_factor=8), "count")
    assert pd.parameter_report(unet).adapters["count"]["trainable"] == count
    assert {p.requires_grad for n, p in unet.named_parameters() if ".deltas." not in n} == {False}


def test_embedded_base_takes_the_xl_layout(embedded):
    """The embedded base's first block is a plain DownBlock2D (its feature is added after its downsampler):
    diffusers' full_adapter_xl gives the (channels, level) it needs; full and light are refused naming both."""
    with pytest.raises(ValueError, match=r"full_adapter with channels \[32, 64, 128\] gives .* adds .*"
                                         r"use adapter_type 'full_adapter_xl'"):
        pd.inject(embedded, pd.T2IAdapterConfig(), NAME)
    with pytest.raises(ValueError, match="light_adapter"):
        pd.inject(embedded, pd.T2IAdapterConfig(adapter_type="light_adapter"), NAME)
    assert not list(hosts(embedded))
    pd.inject(embedded, pd.T2IAdapterConfig(adapter_type="full_adapter_xl"), NAME)
    try:
        (delta,) = [s.deltas[NAME] for _, s in hosts(embedded)]
        assert delta.config.downscale_factor == 4 and delta.config.channels == [32, 64, 128]  # VAE 2 x 2
    finally:
        pd.remove(embedded)


def test_xl_layout_with_the_mid_block_feature_equals_diffusers():
    """SDXL's layout (a plain DownBlock2D first) with a fourth feature its mid block takes: our annex gives the
    U-Net what diffusers' full_adapter_xl gives it, bit for bit."""
    from diffusers import T2IAdapter, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**tiny.UNET_CONFIG, "block_out_channels": (32, 64, 64),
                                   "down_block_types": ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
                                   "up_block_types": ("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",),
                                   "attention_head_dim": (2, 4, 4)}).eval()
    inputs = tiny.unet_inputs(1)
    pd.inject(unet, pd.T2IAdapterConfig(adapter_type="full_adapter_xl", channels=[32, 64, 64, 64], downscale_factor=4,
                                        num_res_blocks=1), NAME)
    perturb(unet)
    (delta,) = [s.deltas[NAME] for _, s in hosts(unet)]
    ref = T2IAdapter(channels=[32, 64, 64, 64], num_res_blocks=1, downscale_factor=4, adapter_type="full_adapter_xl")
    ref.load_state_dict(delta.t2i_adapter.state_dict())
    x = control()
    with pd.inputs(unet, control_image=x):
        ours = tiny.run(unet, inputs)
    pd.disable_adapters(unet)
    with torch.no_grad():
        feats = ref(x)
        three = unet(**inputs, down_intrablock_additional_residuals=feats[:3]).sample
        theirs = unet(**inputs, down_intrablock_additional_residuals=feats).sample
    assert torch.equal(ours, theirs) and not torch.equal(ours, three)  # the mid block took the fourth


# ---------------------------------------------------------------- identity, training, lifecycle

def test_no_condition_is_the_base_bit_exact_and_only_the_adapter_trains(make_model):
    unet = make_model("unet")
    inputs = tiny.unet_inputs(2)
    types, keys, hooks = tiny.module_types(unet), list(unet.state_dict()), tiny.hooks_and_processors(unet)
    base = tiny.run(unet, inputs)
    pd.inject(unet, pd.T2IAdapterConfig(downscale_factor=2), NAME)
    perturb(unet)
    assert torch.equal(tiny.run(unet, inputs), base)
    x = control(2)
    with pd.inputs(unet, control_image=x):
        on = tiny.run(unet, inputs)
        unet.train()
        tiny.main_output(unet(**inputs)).pow(2).mean().backward()
    assert (on - base).abs().max() > 1e-3
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all(".deltas.t2i.t2i_adapter." in n for n in trainable)
    assert all(p.grad is not None for n, p in unet.named_parameters() if n in trainable)
    unet.eval()
    with pd.inputs(unet, control_image=x):
        pd.set_adapters(unet, {NAME: 0.0})
        assert torch.equal(tiny.run(unet, inputs), base)
        pd.set_adapters(unet, {NAME: 1.0})
        pd.disable_adapters(unet)
        assert torch.equal(tiny.run(unet, inputs), base)
        pd.enable_adapters(unet)
        assert torch.equal(tiny.run(unet, inputs), on)
        with pytest.raises(ValueError, match="cannot be fused"):
            pd.fuse(unet, [NAME])
    pd.remove(unet)
    assert tiny.module_types(unet) == types and list(unet.state_dict()) == keys
    assert tiny.hooks_and_processors(unet) == hooks


def test_weight_scales_the_features_like_adapter_conditioning_scale(make_model):
    from diffusers import T2IAdapter

    unet = make_model("unet")
    inputs = tiny.unet_inputs(1)
    pd.inject(unet, pd.T2IAdapterConfig(downscale_factor=2), NAME)
    perturb(unet)
    (delta,) = [s.deltas[NAME] for _, s in hosts(unet)]
    ref = T2IAdapter(channels=[32, 64], num_res_blocks=2, downscale_factor=2)
    ref.load_state_dict(delta.t2i_adapter.state_dict())
    x = control()
    pd.set_adapters(unet, {NAME: 0.6})
    with pd.inputs(unet, control_image=x):
        ours = tiny.run(unet, inputs)
    pd.disable_adapters(unet)
    with torch.no_grad():
        feats = [f * 0.6 for f in ref(x)]
        theirs = unet(**inputs, down_intrablock_additional_residuals=feats).sample
    assert torch.equal(ours, theirs)


# ---------------------------------------------------------------- peers

def test_saved_folder_runs_in_diffusers_adapter_pipeline(embedded, tmp_path):
    """Ours (the base pipeline with the annex, condition per call) == diffusers' StableDiffusionAdapterPipeline
    with our saved folder, same seed, on the embedded base (full_adapter_xl), with guidance."""
    from diffusers import StableDiffusionPipeline, T2IAdapter

    pd.inject(embedded, pd.T2IAdapterConfig(adapter_type="full_adapter_xl", control_type="mask"), NAME)
    try:
        perturb(embedded)
        x = control(2)
        with pd.inputs(embedded, control_image=x):
            ours = images(embedded)
        folder = pd.save_t2i_adapter(embedded, tmp_path / "t2i", NAME)
    finally:
        pd.remove(embedded)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors",
                                                         "peft_diffusion.json"]
    base = images(embedded)
    assert np.abs(ours - base).max() > 1e-3, "the condition must change the images"
    theirs = images(adapter_pipeline(StableDiffusionPipeline.from_pretrained(embedded_path(SHAPES_BASE)),
                                     T2IAdapter.from_pretrained(folder)), image=x)
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    config, _ = read_folder(folder)
    assert config.control_type == "mask" and config.adapter_type == "full_adapter_xl"


def test_diffusers_t2i_adapter_loads_into_ours(fresh, tmp_path):
    """A light T2IAdapter written by diffusers loads into ours (on a U-Net it fits) and gives the images of
    diffusers' pipeline."""
    from diffusers import StableDiffusionPipeline, T2IAdapter

    torch.manual_seed(4)
    adapter = T2IAdapter(channels=[32, 64], num_res_blocks=2, downscale_factor=2, adapter_type="light_adapter")
    adapter.save_pretrained(tmp_path / "theirs")
    x = control(1)
    pipe = StableDiffusionPipeline(**{**fresh().components, "unet": light_unet()})
    theirs = images(adapter_pipeline(pipe, adapter), guidance=1.0, image=x, adapter_conditioning_scale=0.8)
    assert pd.load_t2i_adapter(pipe, tmp_path / "theirs", NAME, weight=0.8) == NAME
    assert not any(p.requires_grad for _, s in hosts(pipe) for p in s.deltas.parameters())  # loaded frozen
    with pd.inputs(pipe, control_image=x):
        ours = images(pipe, guidance=1.0)
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    assert np.abs(ours - images(pipe, guidance=1.0)).max() > 1e-3  # without the condition: the base's images


def test_one_channel_adapter_takes_the_grey_map(fresh, tmp_path):
    """diffusers' sketch / canny adapters take one channel ("L" images): an RGB grey map gives what diffusers
    computes from its one channel."""
    from diffusers import T2IAdapter

    torch.manual_seed(6)
    T2IAdapter(in_channels=1, channels=[32, 64], num_res_blocks=1, downscale_factor=2).save_pretrained(tmp_path / "l")
    ref = T2IAdapter.from_pretrained(tmp_path / "l")
    pipe = fresh()
    pd.load_t2i_adapter(pipe, tmp_path / "l", NAME)
    grey = control(1)[:, :1]
    inputs = tiny.unet_inputs(1)
    with pd.inputs(pipe, control_image=grey.expand(1, 3, 32, 32)):
        ours = tiny.run(pipe.unet, inputs)
    pd.disable_adapters(pipe)
    with torch.no_grad():
        theirs = pipe.unet(**inputs, down_intrablock_additional_residuals=ref(grey)).sample
    assert torch.equal(ours, theirs)


def test_two_adapters_with_weights_equal_multi_adapter(fresh, tmp_path):
    from diffusers import MultiAdapter, T2IAdapter

    pipe = fresh()
    pd.inject(pipe, pd.T2IAdapterConfig(), "a")
    pd.inject(pipe, pd.T2IAdapterConfig(num_res_blocks=1), "b")
    perturb(pipe)
    folders = [pd.save_t2i_adapter(pipe, tmp_path / n, n) for n in ("a", "b")]
    xa, xb = control(2, seed=1), control(2, seed=2)
    pd.set_adapters(pipe, {"a": 0.7, "b": 0.4})
    with pd.inputs(pipe, control_image={"a": xa, "b": xb}):
        ours = images(pipe)
    multi = MultiAdapter([T2IAdapter.from_pretrained(f) for f in folders])
    theirs = images(adapter_pipeline(fresh(), multi), image=[xa, xb], adapter_conditioning_scale=[0.7, 0.4])
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    with pd.inputs(pipe, control_image={"a": xa}):  # b without its condition adds nothing
        only_a = images(pipe)
    assert np.abs(ours - only_a).max() > 1e-3


# ---------------------------------------------------------------- bad input

def test_condition_of_the_wrong_size_or_mode(fresh):
    pipe = fresh()
    pd.inject(pipe, pd.T2IAdapterConfig(), NAME)
    with pd.inputs(pipe, control_image=control(1, size=48)), pytest.raises(ValueError, match="48x48 pixels but"):
        images(pipe)
    with pd.inputs(pipe, control_image=control(1)[:, 0]), pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        images(pipe)
    # a PIL condition of another mode and size is converted and resized (same aspect ratio) by prepare_control
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    x = ci.prepare_control(rgba, "none", 32)
    assert x.shape == (1, 3, 32, 32) and torch.equal(x, torch.ones_like(x))  # transparent: white
    with pytest.raises(ValueError, match="aspect ratios differ"):
        ci.prepare_control(Image.new("L", (64, 32)), "none", 32)


def test_folder_for_another_unet_is_refused_and_the_model_untouched(fresh, tmp_path):
    from diffusers import T2IAdapter

    T2IAdapter(channels=[320, 640, 1280, 1280], num_res_blocks=1, downscale_factor=8).save_pretrained(tmp_path / "sd")
    pipe = fresh()
    state = tiny.snapshot(pipe.unet)
    with pytest.raises(ValueError, match=r"channels \[320, 640, 1280, 1280\].*block_out_channels \[32, 64\]"):
        pd.load_t2i_adapter(pipe, tmp_path / "sd")
    T2IAdapter(channels=[32, 64], num_res_blocks=1, downscale_factor=8).save_pretrained(tmp_path / "df")
    with pytest.raises(ValueError, match="downscale_factor is 8 but this pipeline needs 2"):
        pd.load_t2i_adapter(pipe, tmp_path / "df")
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "T2IAdapter", "channels": [32, 64]}))
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickled weights are not loaded"):
        pd.load_t2i_adapter(pipe, folder)
    assert not list(hosts(pipe)) and tiny.snapshot(pipe.unet).keys() == state.keys()
    assert all(torch.equal(tiny.snapshot(pipe.unet)[k], v) for k, v in state.items())


# ---------------------------------------------------------------- the trainer

def test_peft_diffusion_train_with_mask_conditions(tiny_pipe_dir, tmp_path):
    """`peft-diffusion train` with [method] name = "t2i-adapter" on world images with their exact masks: the loss
    is finite, the file is saved and reloads with the trained outputs; the validation grid pairs condition |
    generation."""
    from diffusers import StableDiffusionPipeline

    from peft_diffusion.cli import main

    data = ci.write_world(tmp_path / "world", 4, seed=0, kind="mask")
    toml = tmp_path / "run.toml"
    toml.write_text(f'base = "{tiny_pipe_dir}"\ninstance_dir = "{data}"\noutput_dir = "{tmp_path / "out"}"\n'
                    'prior_preservation = false\nsteps = 3\nbatch_size = 2\nlr = 1e-3\nvalidation_every = 0\n'
                    'validation_images = 2\nvalidation_steps = 2\nvalidation_prompts = ["a red circle"]\n'
                    'checkpoint_every = 0\nprogress = false\nlog_every = 1\n'
                    '[method]\nmethod = "t2i-adapter"\ncontrol_type = "mask"\nnum_res_blocks = 1\n')
    assert main(["train", str(toml)]) == 0
    out = tmp_path / "out"
    log = (out / "logs" / "log.csv").read_text().splitlines()
    losses = [float(r.split(",")[log[0].split(",").index("loss")]) for r in log[1:] if r]
    assert len(losses) == 3 and all(np.isfinite(losses))
    grid = Image.open(out / "validation" / "step-000003.png")
    assert grid.size == (4 * 32, 32)  # map | image, map | image
    maps = ci.control_tensor([Image.open(data / "conditions" / f"0000{i}.png") for i in range(2)])
    assert np.array_equal(np.asarray(grid)[:, :32], (maps[0].permute(1, 2, 0) * 255).round().byte().numpy())

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    base = images(pipe)
    assert pd.load_adapter(pipe, out / "adapter.safetensors") == "dreambooth"
    with pd.inputs(pipe, control_image=maps):
        trained = images(pipe)
    assert np.abs(trained - base).max() > 1e-3
    (delta,) = [s.deltas["dreambooth"] for _, s in hosts(pipe)]
    assert delta.config.control_type == "mask"
