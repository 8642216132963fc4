"""The adapter composer pipeline (pipelines/adapter_composer, peft_diffusion/composer.py) against diffusers' stock
pipelines on the tiny SD pipeline: one ControlNet = StableDiffusionControlNetPipeline, several = its
MultiControlNet; one T2I-Adapter = StableDiffusionAdapterPipeline, several = its MultiAdapter; an IP-Adapter file
of ours = the stock pipeline after diffusers' load_ip_adapter; a LoRA alone = the plain pipeline with the adapter
loaded (all atol 1e-5, same seed, classifier-free guidance on). Loading with ``custom_pipeline=`` from the
repository folder, on the embedded base too; region masks; bad input.
"""
from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import peft_diffusion as pd
import tiny
from peft_diffusion.composer import AdapterComposerPipeline
from peft_diffusion.controls import Control
from peft_diffusion.shapes import world

REPO = Path(__file__).resolve().parents[1]
CUSTOM = "pipelines/adapter_composer"
KW = dict(prompt="a photo of a cat", num_inference_steps=3, guidance_scale=5.0, height=32, width=32, output_type="np")


def run(pipe, **kw):
    return pipe(**KW, generator=torch.Generator().manual_seed(tiny.SEED), **kw).images


def components(pipe):
    return {k: v for k, v in pipe.components.items()}


@pytest.fixture(scope="module")
def composer_parts(tiny_pipe_dir):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_pipe_dir, custom_pipeline=str(REPO / CUSTOM), trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe(composer_parts):
    return copy.deepcopy(composer_parts)


def stock(cls, pipe, **extra):
    out = cls(**{k: v for k, v in components(pipe).items() if k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")},
              safety_checker=None, feature_extractor=None, requires_safety_checker=False, **extra)
    out.set_progress_bar_config(disable=True)
    return out


def controlnet(unet, seed: int):
    """A ControlNet copy of ``unet`` (condition embedding downsampling 2x, the tiny VAE's factor) with random zero
    convolutions, so that it changes the output."""
    from diffusers import ControlNetModel

    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "zero_conv" in name or "controlnet_mid_block" in name or "conv_out" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net


def t2i(seed: int, channels=(32, 64)):
    from diffusers import T2IAdapter

    torch.manual_seed(seed)
    return T2IAdapter(in_channels=3, channels=list(channels), num_res_blocks=1, downscale_factor=2,
                      adapter_type="full_adapter").eval()


def edges(i: int = 3):
    return pd.condition(world.sample_at(0, i), "canny", size=32)


# ---------------------------------------------------------------- loading


def test_custom_pipeline_from_the_repository_folder(tiny_pipe_dir, monkeypatch):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    monkeypatch.chdir(REPO)  # the call as README writes it: a path relative to the repository root
    for base in (str(tiny_pipe_dir), str(REPO / "peft_diffusion/models/shapes-base")):
        pipe = DiffusionPipeline.from_pretrained(base, custom_pipeline=CUSTOM, trust_remote_code=True)
        assert type(pipe).__name__ == "AdapterComposerPipeline"
        plain = StableDiffusionPipeline.from_pretrained(base)
        for p in (pipe, plain):
            p.set_progress_bar_config(disable=True)
        np.testing.assert_allclose(run(pipe), run(plain), atol=1e-5, rtol=0)
    if (REPO / ".git").exists():  # a fresh clone has the file: it is tracked, not ignored
        tracked = subprocess.run(["git", "ls-files", f"{CUSTOM}/pipeline.py"], cwd=REPO, capture_output=True, text=True)
        ignored = subprocess.run(["git", "check-ignore", "-q", f"{CUSTOM}/pipeline.py"], cwd=REPO)
        assert tracked.stdout.strip() == f"{CUSTOM}/pipeline.py" and ignored.returncode == 1


# ---------------------------------------------------------------- peers


def test_one_controlnet_equals_stock(pipe, tmp_path):
    from diffusers import StableDiffusionControlNetPipeline

    net = controlnet(pipe.unet, 1)
    net.save_pretrained(tmp_path / "cn")
    ref = run(stock(StableDiffusionControlNetPipeline, pipe, controlnet=net), image=edges(),
              controlnet_conditioning_scale=0.7, control_guidance_end=0.7)
    raw = world.sample_at(0, 3).image  # the pipeline makes the canny map itself
    ours = run(pipe, controls=[Control(str(tmp_path / "cn"), raw, 0.7, "canny", end=0.7)])
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    assert np.abs(ours - run(pipe)).max() > 1e-3  # the control does something


def test_two_controlnets_equal_multicontrolnet(pipe):
    from diffusers import StableDiffusionControlNetPipeline

    a, b = controlnet(pipe.unet, 1), controlnet(pipe.unet, 2)
    ref = run(stock(StableDiffusionControlNetPipeline, pipe, controlnet=[a, b]), image=[edges(3), edges(5)],
              controlnet_conditioning_scale=[0.6, 1.3])
    ours = run(pipe, controls=[(a, edges(3), 0.6), (b, edges(5), 1.3)])
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_guess_mode_equals_stock(pipe):
    from diffusers import StableDiffusionControlNetPipeline

    net = controlnet(pipe.unet, 1)
    ref = run(stock(StableDiffusionControlNetPipeline, pipe, controlnet=net), image=edges(), guess_mode=True)
    np.testing.assert_allclose(run(pipe, controls=[(net, edges())], guess_mode=True), ref, atol=1e-5, rtol=0)


def test_one_t2i_adapter_equals_stock(pipe, tmp_path):
    from diffusers import StableDiffusionAdapterPipeline

    adapter = t2i(1)
    adapter.save_pretrained(tmp_path / "t2i")
    ref = run(stock(StableDiffusionAdapterPipeline, pipe, adapter=adapter), image=edges(), adapter_conditioning_scale=0.8)
    ours = run(pipe, controls=[Control(str(tmp_path / "t2i"), world.sample_at(0, 3), 0.8, "canny")])
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    assert np.abs(ours - run(pipe)).max() > 1e-3


def test_two_t2i_adapters_equal_multiadapter(pipe):
    from diffusers import MultiAdapter, StableDiffusionAdapterPipeline

    a, b = t2i(1), t2i(2)
    ref = run(stock(StableDiffusionAdapterPipeline, pipe, adapter=MultiAdapter([a, b])), image=[edges(3), edges(5)],
              adapter_conditioning_scale=[0.5, 1.2])
    ours = run(pipe, controls=[(a, edges(3), 0.5), (b, edges(5), 1.2)])
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_lora_alone_equals_the_plain_pipeline_with_it(pipe, tmp_path):
    from diffusers import StableDiffusionPipeline

    plain = stock(StableDiffusionPipeline, copy.deepcopy(pipe))
    pd.inject(plain, pd.LoRA(r=4), "subject")
    tiny.randomize(plain, "subject", std=0.2)
    path = pd.save_adapter(plain, tmp_path / "lora.safetensors", "subject")
    pd.set_adapters(plain, {"subject": 0.6})
    ours = run(pipe, adapters={str(path): 0.6})
    np.testing.assert_allclose(ours, run(plain), atol=1e-5, rtol=0)
    assert np.abs(ours - run(pipe, adapters={})).max() > 1e-3  # {}: no adapter active this call
    np.testing.assert_allclose(run(pipe, adapters={"subject": 0.6}), ours, atol=1e-6, rtol=0)  # by name, not reloaded
    assert pd.adapter_names(pipe) == ["subject"]


def with_image_encoder(pipe):
    from test_ip_adapter import tiny_image_encoder
    from transformers import CLIPImageProcessor

    pipe.register_modules(image_encoder=tiny_image_encoder(), feature_extractor=CLIPImageProcessor(size=32, crop_size=32))
    return pipe


def ip_file(pipe, tmp_path, plus: bool = False):
    from test_ip_adapter import perturb

    maker = copy.deepcopy(pipe)
    pd.inject(maker, pd.IPAdapter(plus=True, num_tokens=6, heads=2, hidden_dim=40) if plus else pd.IPAdapter(), "ip")
    perturb(maker, "ip")
    return pd.save_adapter(maker, tmp_path, "ip", format="ip-adapter")


@pytest.mark.parametrize("plus", [False, True], ids=["plain", "plus"])
def test_ip_adapter_equals_stock_load_ip_adapter(pipe, tmp_path, plus):
    from diffusers import StableDiffusionPipeline
    from test_ip_adapter import image

    with_image_encoder(pipe)
    theirs = StableDiffusionPipeline(**copy.deepcopy(components(pipe)), requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    path = ip_file(pipe, tmp_path, plus)
    theirs.load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name, low_cpu_mem_usage=False)
    theirs.set_ip_adapter_scale(0.7)
    ours = run(pipe, adapters={str(path): 0.7}, image_prompt=image())
    np.testing.assert_allclose(ours, run(theirs, ip_adapter_image=image()), atol=1e-5, rtol=0)
    assert np.abs(ours - run(pipe, adapters={str(path): 0.7})).max() > 1e-3  # the image prompt does something


def test_lora_ip_adapter_and_controlnet_equal_stock_with_diffusers_loaders(pipe, tmp_path):
    """All three at once against StableDiffusionControlNetPipeline with diffusers' load_lora_weights (our LoRA
    file) and load_ip_adapter (our IP-Adapter file)."""
    from diffusers import StableDiffusionControlNetPipeline
    from test_ip_adapter import image

    with_image_encoder(pipe)
    net = controlnet(pipe.unet, 1)
    maker = copy.deepcopy(pipe)
    pd.inject(maker, pd.LoRA(r=4, target=pd.Target(include=("to_q", "to_k", "to_v", "to_out.0"))), "lora")
    tiny.randomize(maker, "lora", std=0.2)
    lora = pd.save_adapter(maker, tmp_path / "lora.safetensors", "lora")
    ip = ip_file(pipe, tmp_path)
    theirs = StableDiffusionControlNetPipeline(**copy.deepcopy(components(pipe)), controlnet=net,
                                               requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    theirs.load_lora_weights(str(lora), adapter_name="lora")
    theirs.load_ip_adapter(str(ip.parent), subfolder="", weight_name=ip.name, low_cpu_mem_usage=False)
    ref = run(theirs, ip_adapter_image=image(), image=edges(), controlnet_conditioning_scale=0.8)
    ours = run(pipe, adapters={str(lora): 1.0, str(ip): 1.0}, image_prompt=image(), controls=[(net, edges(), 0.8)])
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    for part in (dict(adapters={str(ip): 1.0}, image_prompt=image(), controls=[(net, edges(), 0.8)]),
                 dict(adapters={str(lora): 1.0}, controls=[(net, edges(), 0.8)]),
                 dict(adapters={str(lora): 1.0, str(ip): 1.0}, image_prompt=image())):
        assert np.abs(ours - run(pipe, **part)).max() > 1e-3  # each part counts


def test_everything_at_once_runs_and_each_part_counts(pipe):
    net, adapter = controlnet(pipe.unet, 1), t2i(1)
    both = run(pipe, controls=[(net, edges(3), 1.0), (adapter, edges(5), 1.0)])
    for alone in ([(net, edges(3), 1.0)], [(adapter, edges(5), 1.0)]):
        assert np.abs(both - run(pipe, controls=alone)).max() > 1e-3


def test_region_masks(pipe):
    net, adapter = controlnet(pipe.unet, 1), t2i(1)
    for model in (net, adapter):
        off = np.zeros((32, 32), dtype=np.float32)
        on = np.ones((32, 32), dtype=np.float32)
        np.testing.assert_allclose(run(pipe, controls=[Control(model, edges(), mask=off)]), run(pipe), atol=1e-6, rtol=0)
        np.testing.assert_allclose(run(pipe, controls=[Control(model, edges(), mask=on)]),
                                   run(pipe, controls=[(model, edges())]), atol=1e-6, rtol=0)
        half = on.copy()
        half[:, :16] = 0
        part = run(pipe, controls=[Control(model, edges(), mask=half)])
        assert np.abs(part - run(pipe)).max() > 1e-3 and np.abs(part - run(pipe, controls=[(model, edges())])).max() > 1e-3
    with pytest.raises(ValueError, match="region mask is 16x16 but the images are 32x32"):
        run(pipe, controls=[Control(net, edges(), mask=np.ones((16, 16)))])


def test_embedded_base_world_maps_and_its_t2i_adapter_kind():
    """On shapes-base: the world's exact mask through a ControlNet is the ready-made map's; its first down block
    has no cross-attention, so a T2I-Adapter is the XL kind (features after that block's downsampler and one for
    the mid block): it fits and acts, a plain full adapter is refused naming the shapes of both sides."""
    from diffusers import T2IAdapter

    base = AdapterComposerPipeline.from_pretrained(str(REPO / "peft_diffusion/models/shapes-base"))
    base.set_progress_bar_config(disable=True)
    net = controlnet(base.unet, 4)
    sample = world.sample_at(1, 2)
    kw = dict(KW, prompt=sample.caption)
    ours = base(**kw, controls=[(net, sample, 1.0, "mask")], generator=torch.Generator().manual_seed(0)).images
    ref = base(**kw, controls=[(net, pd.condition(sample, "mask", size=32))], generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)
    torch.manual_seed(0)
    xl = T2IAdapter(channels=[32, 64, 128, 128], num_res_blocks=1, downscale_factor=4, adapter_type="full_adapter_xl")
    plain = base(**kw, generator=torch.Generator().manual_seed(0)).images
    with_xl = base(**kw, controls=[(xl, sample, 1.0, "mask")], generator=torch.Generator().manual_seed(0)).images
    assert np.abs(with_xl - plain).max() > 1e-3
    full = T2IAdapter(channels=[32, 64, 128], num_res_blocks=1, downscale_factor=2)
    with pytest.raises(ValueError, match=r"gives features .* \[\(32, 16, 16\), \(64, 8, 8\), \(128, 4, 4\)\] but this "
                                         r"pipeline's U-Net down blocks take \[\(32, 8, 8\), \(64, 8, 8\), \(128, 4, 4\)\] "
                                         r"\(and its mid block \(128, 4, 4\)\).*full_adapter_xl"):
        base(**kw, controls=[(full, sample, 1.0, "mask")])


# ---------------------------------------------------------------- bad input


def test_control_for_another_unet_names_both_sides(pipe):
    from diffusers import UNet2DConditionModel

    other = UNet2DConditionModel(**dict(tiny.UNET_CONFIG, block_out_channels=(16, 32)))
    keys = list(pipe.unet.state_dict())
    with pytest.raises(ValueError, match=r"control 0 \(controlnet\) was made for another U-Net: it has "
                                         r"block_out_channels=\(16, 32\) but this pipeline's U-Net has "
                                         r"block_out_channels=\(32, 64\)"):
        run(pipe, controls=[(controlnet(other, 1), edges())])
    with pytest.raises(ValueError, match=r"control 1 \(t2i-adapter\) .* gives features .*\(16, 16, 16\).* "
                                         r"take \[\(32, 16, 16\), \(64, 8, 8\)\]"):
        run(pipe, controls=[(t2i(1), edges()), (t2i(1, channels=(16, 32)), edges())])
    from diffusers import ControlNetModel

    sd_scale = ControlNetModel.from_unet(pipe.unet)  # SD's condition embedding: 8x, the tiny VAE's latents: 2x
    with pytest.raises(ValueError, match=r"downsamples its condition image 8x \(conditioning_embedding_out_channels="
                                         r"\(16, 32, 96, 256\)\) but this pipeline's latents are 2x smaller"):
        run(pipe, controls=[(sd_scale, edges())])
    assert list(pipe.unet.state_dict()) == keys and not pd.adapter_names(pipe)


def test_condition_image_size_and_mode(pipe):
    adapter = t2i(1)
    rgb = world.sample_at(0, 3).image
    ref = run(pipe, controls=[(adapter, rgb, 1.0, "canny")])
    np.testing.assert_allclose(run(pipe, controls=[(adapter, rgb.convert("RGBA"), 1.0, "canny")]), ref, atol=1e-6, rtol=0)
    big = run(pipe, controls=[(adapter, rgb.resize((64, 64)), 1.0, "canny")])  # resized to the images' size
    assert big.shape == ref.shape
    from PIL import Image

    with pytest.raises(ValueError, match=r"64x32 but the target size is 32x32"):
        run(pipe, controls=[(adapter, Image.new("RGB", (64, 32)), 1.0, "canny")])


def test_image_prompt_without_ip_adapter(pipe):
    from test_ip_adapter import image

    with pytest.raises(ValueError, match="image_prompt needs an IP-Adapter among the loaded adapters"):
        run(pipe, image_prompt=image())


def test_bad_control_specs(pipe, tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        run(pipe, controls=[(str(tmp_path), edges())])
    (tmp_path / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    with pytest.raises(ValueError, match="holds a 'UNet2DConditionModel'; supported: ControlNetModel, T2IAdapter"):
        run(pipe, controls=[(str(tmp_path), edges())])
    with pytest.raises(ValueError, match="start < end"):
        Control(t2i(1), edges(), start=0.5, end=0.5)
    with pytest.raises(FileNotFoundError, match="neither a file nor a loaded adapter"):
        run(pipe, adapters={"missing.safetensors": 1.0})


def test_readme_example_runs(tmp_path, monkeypatch):
    """pipelines/README.md's Python example and its command line, as written, from a copy of the repository root."""
    import shlex

    from peft_diffusion.cli import main

    text = (REPO / "pipelines/README.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    shell = text.split("```bash\n", 1)[1].split("```", 1)[0]
    for name in ("pipelines", "peft_diffusion"):
        (tmp_path / name).symlink_to(REPO / name)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "pipelines/README.md", "exec"), scope)
    image = np.asarray(scope["images"][0])
    assert image.shape == (32, 32, 3) and (tmp_path / "out/composer/image.png").is_file()
    scope["scene"].image.save(tmp_path / "out/composer/scene.png")
    command = shell.split("\n", 1)[1].replace("\\\n", " ").replace("$world", "out/composer/scene.png")
    assert main(shlex.split(command)[1:] + ["--steps", "4"]) == 0
    grid = Image.open(tmp_path / "out/composer/cli/grid.png")
    assert grid.size == (32 * 6, 32)  # mask | image prompt | 4 images


def test_a_control_folder_written_again_is_loaded_again(pipe, tmp_path):
    controlnet(pipe.unet, 1).save_pretrained(tmp_path / "cn")
    first = run(pipe, controls=[(str(tmp_path / "cn"), edges())])
    assert len(pipe._control_models) == 1
    np.testing.assert_array_equal(run(pipe, controls=[(str(tmp_path / "cn"), edges())]), first)
    assert len(pipe._control_models) == 1  # the same folder: loaded once
    controlnet(pipe.unet, 2).save_pretrained(tmp_path / "cn")
    assert np.abs(run(pipe, controls=[(str(tmp_path / "cn"), edges())]) - first).max() > 1e-3
