"""ControlNet, ControlNet-LoRA and ControlNeXt (``methods/controlnet*.py``, ``methods/controlnext.py``) against
diffusers' own ControlNet path: our saved folders in ``StableDiffusionControlNetPipeline`` (one and several
ControlNets), diffusers-made folders in ours, the conditioning scale, the ControlNet-LoRA file and its base
check, the per-call condition's errors, and trainable counts on SD1.5 built on the meta device.

SD1.5 figures (measured here): ControlNet 361,279,120 (the issue's figure); ControlNet-LoRA r = 32 on
``unet-all`` 24,768,144 (r = 128: 61,374,096); ControlNeXt with the authors' SD1.5 module sizes 3,489,344
(+ LoRA r = 4 on the attention projections: 4,286,528).
"""
from __future__ import annotations

import copy

import pytest
import torch

import tiny
import peft_diffusion as pd
from peft_diffusion.api import hosts
from peft_diffusion.methods.controlnet_lora import base_hash

ATOL = 1e-5


def control(seed: int = 3, batch: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def settle(obj, name: str, seed: int = 2, std: float = 0.05) -> None:
    """Move adapter ``name``'s trainable tensors away from init (zero convs included), deterministically."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, site in hosts(obj):
            if name in site.deltas:
                for p in site.deltas[name].parameters():
                    if p.requires_grad:
                        p.add_(torch.randn(p.shape, generator=g) * std)


def controlnet_pipeline(pipe, controlnet):
    from diffusers import StableDiffusionControlNetPipeline

    out = StableDiffusionControlNetPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                            unet=pipe.unet, scheduler=pipe.scheduler, controlnet=controlnet,
                                            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    out.set_progress_bar_config(disable=True)
    return out


def call(**extra):
    return {**tiny.pipe_call_kwargs(steps=2), "guidance_scale": 3.0, **extra}  # guidance: the doubled batch


# ---------------------------------------------------------------- peers: diffusers' pipeline and folders


def test_saved_folder_runs_in_diffusers_pipeline(fresh, tmp_path):
    from diffusers import ControlNetModel

    pipe, image = fresh(), control()
    pd.inject(pipe, pd.ControlNet(), "edges")
    assert pd.controlnet_of(pipe, "edges").config.conditioning_embedding_out_channels == (16, 32)  # factor-2 VAE
    settle(pipe, "edges")
    pd.set_adapters(pipe, {"edges": 0.7})
    with pd.inputs(pipe, control_image=image):
        ours = pipe(**call()).images
    with pd.inputs(pipe, control_image=image):  # the weight is the conditioning scale: 0 is the base
        pd.set_adapters(pipe, {"edges": 0.0})
        zero = pipe(**call()).images
    base = fresh()(**call()).images
    assert not torch.allclose(torch.from_numpy(ours), torch.from_numpy(base), atol=1e-3)
    torch.testing.assert_close(zero, base, atol=ATOL, rtol=0)
    folder = pd.save_controlnet(pipe, tmp_path / "cn", "edges")
    theirs = controlnet_pipeline(fresh(), ControlNetModel.from_pretrained(folder))(
        **call(image=image, controlnet_conditioning_scale=0.7)).images
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_several_controlnets_combine_like_multicontrolnet(fresh, tmp_path):
    from diffusers import ControlNetModel

    pipe, images = fresh(), {"edges": control(3), "mask": control(4)}
    for seed, name in enumerate(images):
        pd.inject(pipe, pd.ControlNet(), name)
        settle(pipe, name, seed=10 + seed)
    pd.set_adapters(pipe, {"edges": 0.8, "mask": 0.5})
    with pd.inputs(pipe, control_image=images):
        ours = pipe(**call()).images
    nets = [ControlNetModel.from_pretrained(pd.save_controlnet(pipe, tmp_path / n, n)) for n in images]
    theirs = controlnet_pipeline(fresh(), nets)(**call(image=list(images.values()),
                                                      controlnet_conditioning_scale=[0.8, 0.5])).images
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def _diffusers_step(unet, controlnet, inputs, image, scale=1.0):
    down, mid = controlnet(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"],
                           controlnet_cond=image, conditioning_scale=scale, return_dict=False)
    return unet(**inputs, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample


def test_diffusers_folder_loads_into_ours(tmp_path):
    from diffusers import ControlNetModel

    unet, inputs, image = tiny.tiny_unet(), tiny.unet_inputs(batch=2), control(batch=2)
    theirs = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    tiny.perturb_trainable(theirs, std=0.05, seed=7)
    theirs.save_pretrained(tmp_path / "cn")
    with torch.no_grad():
        expected = _diffusers_step(unet, theirs.eval(), inputs, image, scale=0.6)
    assert pd.load_controlnet(unet, tmp_path / "cn", "ext", scale=0.6) == "ext"
    assert not any(p.requires_grad for p in pd.controlnet_of(unet, "ext").parameters())
    with pd.inputs(unet, control_image=image):
        torch.testing.assert_close(tiny.run(unet, inputs), expected, atol=ATOL, rtol=0)
    # and back out: our folder is theirs, tensor for tensor
    pd.save_controlnet(unet, tmp_path / "again", "ext")
    again = ControlNetModel.from_pretrained(tmp_path / "again").state_dict()
    assert again.keys() == theirs.state_dict().keys()
    assert all(torch.equal(again[k], v) for k, v in theirs.state_dict().items())


def test_folder_for_another_unet_is_refused(tmp_path):
    from diffusers import ControlNetModel, UNet2DConditionModel

    other = UNet2DConditionModel(**{**tiny.UNET_CONFIG, "cross_attention_dim": 16, "block_out_channels": (16, 32)})
    ControlNetModel.from_unet(other, conditioning_embedding_out_channels=(16, 32)).save_pretrained(tmp_path / "cn")
    unet = tiny.tiny_unet()
    state, types = tiny.snapshot(unet), tiny.module_types(unet)
    with pytest.raises(ValueError) as err:
        pd.load_controlnet(unet, tmp_path / "cn", "x")
    msg = str(err.value)
    assert "block_out_channels: ControlNet [16, 32] vs U-Net [32, 64]" in msg
    assert "cross_attention_dim: ControlNet 16 vs U-Net 32" in msg
    assert tiny.module_types(unet) == types and pd.adapter_names(unet) == []
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in state.items())


def test_native_file_for_another_unet_is_refused(unet, tmp_path):
    from diffusers import UNet2DConditionModel

    pd.inject(unet, pd.ControlNet(downscale=2), "c")
    path = pd.save_adapter(unet, tmp_path / "c.safetensors", "c")
    other = UNet2DConditionModel(**{**tiny.UNET_CONFIG, "block_out_channels": (16, 32)})
    state, types = tiny.snapshot(other), tiny.module_types(other)
    with pytest.raises(pd.AdapterFileError, match=r"in the file but .* in this UNet2DConditionModel"):
        pd.load_adapter(other, path)
    assert tiny.module_types(other) == types and pd.adapter_names(other) == []
    assert all(torch.equal(other.state_dict()[k], v) for k, v in state.items())


# ---------------------------------------------------------------- lifecycle beyond the contract matrix


def test_scale_disable_enable_and_native_round_trip(unet, tmp_path):
    inputs, image = tiny.unet_inputs(), control()
    base = tiny.run(unet, inputs)
    pd.inject(unet, pd.ControlNet(downscale=2), "c")
    settle(unet, "c")
    with pd.inputs(unet, control_image=image):
        full = tiny.run(unet, inputs)
        pd.set_adapters(unet, {"c": 0.5})
        half = tiny.run(unet, inputs)
        pd.disable_adapters(unet)
        torch.testing.assert_close(tiny.run(unet, inputs), base, atol=0, rtol=0)
        pd.enable_adapters(unet)
        torch.testing.assert_close(tiny.run(unet, inputs), half, atol=0, rtol=0)
    torch.testing.assert_close(tiny.run(unet, inputs), base, atol=0, rtol=0)  # no condition: the base
    assert not torch.allclose(full, half, atol=1e-4)
    with pytest.raises(ValueError, match="cannot be fused"):
        pd.fuse(unet, ["c"])
    path = pd.save_adapter(unet, tmp_path / "c.safetensors", "c")
    fresh = tiny.tiny_unet()
    pd.load_adapter(fresh, path, scale=0.5)
    with pd.inputs(fresh, control_image=image):
        torch.testing.assert_close(tiny.run(fresh, inputs), half, atol=ATOL, rtol=0)


# ---------------------------------------------------------------- ControlNet-LoRA


def test_controlnet_lora_small_file_same_base_only(unet, tmp_path):
    inputs, image = tiny.unet_inputs(), control()
    pd.inject(unet, pd.ControlNetLoRA(downscale=2, r=2), "cl")
    settle(unet, "cl")
    lora_params = pd.parameter_report(unet).adapters["cl"]["trainable"]
    frozen = {k for k, _ in pd.controlnet_of(unet, "cl").named_buffers()}
    assert any(k.startswith("down_blocks.") for k in frozen)  # the copy: buffers, neither trained nor saved
    trained = {k for k, p in pd.controlnet_of(unet, "cl").named_parameters() if p.requires_grad}
    assert all(".lora_" in k or k.startswith(("controlnet_cond_embedding.", "controlnet_down_blocks.",
                                              "controlnet_mid_block.")) for k in trained)
    with pd.inputs(unet, control_image=image):
        out = tiny.run(unet, inputs)
    small = pd.save_adapter(unet, tmp_path / "cl.safetensors", "cl")

    full_unet = tiny.tiny_unet()
    pd.inject(full_unet, pd.ControlNet(downscale=2), "c")
    full_params = pd.parameter_report(full_unet).adapters["c"]["trainable"]
    big = pd.save_adapter(full_unet, tmp_path / "c.safetensors", "c")
    assert (lora_params, full_params) == (43_120, 423_344)
    assert small.stat().st_size < 0.12 * big.stat().st_size  # 185 kB against 1.7 MB here

    again = tiny.tiny_unet()
    pd.load_adapter(again, small)
    with pd.inputs(again, control_image=image):
        torch.testing.assert_close(tiny.run(again, inputs), out, atol=ATOL, rtol=0)
    # its diffusers folder: the copy with the LoRA merged, run by diffusers' own ControlNetModel
    from diffusers import ControlNetModel

    folder = pd.save_controlnet(again, tmp_path / "cl", "cl")
    with torch.no_grad():
        theirs = _diffusers_step(tiny.tiny_unet(), ControlNetModel.from_pretrained(folder).eval(), inputs, image)
    torch.testing.assert_close(theirs, out, atol=ATOL, rtol=0)

    other = tiny.tiny_unet()
    tiny.perturb_trainable(other.down_blocks, std=0.01)  # same architecture, other weights
    state = tiny.snapshot(other)
    with pytest.raises(ValueError) as err:
        pd.load_adapter(other, small)
    assert base_hash(unet) in str(err.value) and base_hash(other) in str(err.value)
    assert pd.adapter_names(other) == [] and all(torch.equal(other.state_dict()[k], v) for k, v in state.items())


# ---------------------------------------------------------------- ControlNeXt


def test_controlnext_cross_normalisation_and_gate(unet):
    inputs, image = tiny.unet_inputs(), control()
    base = tiny.run(unet, inputs)
    small = dict(downscale=2, embedding_channels=(8, 16), channels=(16, 32), time_channels=16, time_embed_dim=32)
    pd.inject(unet, pd.ControlNeXt(**small), "paper")  # the paper's design: no zero path, acts at once
    captured = {}
    handle = unet.down_blocks[0].register_forward_hook(lambda m, a, o: captured.update(out=o[0].clone()))
    with pd.inputs(unet, control_image=image):
        moved = tiny.run(unet, inputs)
    handle.remove()
    assert not torch.allclose(moved, base, atol=1e-4)
    torch.testing.assert_close(tiny.run(unet, inputs), base, atol=0, rtol=0)  # no condition: the base
    pd.remove(unet)
    # the block's output took x_m + s * CN(x_c): x_c with x_m's per-sample mean and std (Sec. 3.2)
    plain = {}
    handle = unet.down_blocks[0].register_forward_hook(lambda m, a, o: plain.update(out=o[0].clone()))
    tiny.run(unet, inputs)
    handle.remove()
    added = captured["out"] - plain["out"]
    torch.testing.assert_close(added.mean(), plain["out"].mean(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(added.std(), plain["out"].std(), atol=1e-5, rtol=1e-4)
    pd.inject(unet, pd.ControlNeXt(**small, gate=True), "gated")  # a zero gain: the base at init
    with pd.inputs(unet, control_image=image):
        torch.testing.assert_close(tiny.run(unet, inputs), base, atol=0, rtol=0)


# ---------------------------------------------------------------- the per-call condition's errors


def test_bad_conditions_are_refused_model_untouched(unet):
    from PIL import Image

    inputs, image = tiny.unet_inputs(), control()
    pd.inject(unet, pd.ControlNet(downscale=2), "c")
    settle(unet, "c")
    state = tiny.snapshot(unet)
    wide = image.clone()
    wide[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])
    bad = {
        "40x40 pixels but this call's latents need a 32x32": torch.rand(1, 3, 40, 40),
        r"shape \(1, 1, 32, 32\); this adapter takes \[B, 3, 32, 32\]": torch.rand(1, 1, 32, 32),
        "torch.uint8 values": (image * 255).to(torch.uint8),
        r"spans \[-1, 1\]": wide,
        "aspect ratios differ": Image.new("RGB", (64, 32)),
    }
    for message, value in bad.items():
        with pd.inputs(unet, control_image=value), pytest.raises(ValueError, match=message):
            tiny.run(unet, inputs)
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in state.items())
    # a PIL image of another mode and size (same aspect) is converted and resized, as the pipelines do
    pixels = (image * 255).round()
    with pd.inputs(unet, control_image=pixels / 255):
        out = tiny.run(unet, inputs)
    rgba = Image.fromarray(pixels[0].permute(1, 2, 0).numpy().astype("uint8")).convert("RGBA")
    with pd.inputs(unet, control_image=rgba):
        torch.testing.assert_close(tiny.run(unet, inputs), out, atol=ATOL, rtol=0)
    with pd.inputs(unet, control_image=rgba.resize((64, 64))):
        assert tiny.run(unet, inputs).shape == out.shape


# ---------------------------------------------------------------- SD1.5 counts (meta device)


@pytest.fixture(scope="module")
def sd15():
    from diffusers import UNet2DConditionModel
    from test_sd15_counts import SD15_UNET

    with torch.device("meta"):
        return UNet2DConditionModel(**SD15_UNET)


@pytest.mark.parametrize("config, expected", [
    (pd.ControlNet(), 361_279_120),
    (pd.ControlNetLoRA(r=32), 24_768_144),
    (pd.ControlNetLoRA(r=128), 61_374_096),
    (pd.ControlNeXt(), 3_489_344),
    (pd.ControlNeXt(lora=True), 4_286_528),
])
def test_sd15_counts(sd15, config, expected):
    unet = copy.deepcopy(sd15)
    pd.inject(unet, config, "count")
    assert all(p.is_meta for _, s in hosts(unet) for p in s.deltas["count"].parameters())
    assert pd.parameter_report(unet).adapters["count"]["trainable"] == expected


# ---------------------------------------------------------------- `peft-diffusion train`


def test_cli_train_controlnet_on_world_masks(tiny_pipe_dir, tmp_path):
    """A short `peft-diffusion train` of a ControlNet on shapes-world images with their exact mask maps (read
    from <instance_dir>/conditions), validated with condition | generation grids; the file loads and steers."""
    from diffusers import StableDiffusionPipeline

    from peft_diffusion.cli import main
    from peft_diffusion.training.condition_inputs import write_world

    folder = write_world(tmp_path / "world", n=2, seed=0, kind="mask")
    toml = tmp_path / "cn.toml"
    toml.write_text(f'base = "{tiny_pipe_dir}"\ninstance_dir = "{folder}"\ninstance_prompt = "a shape"\n'
                    f'output_dir = "{tmp_path / "out"}"\nprior_preservation = false\nprogress = false\n'
                    'validation_every = 2\nvalidation_prompts = ["a shape"]\nvalidation_steps = 1\n'
                    'log_with = "none"\ncheckpoint_every = 0\nlr = 1e-2\n'
                    '[method]\nmethod = "controlnet"\ncontrol_type = "mask"\n')
    assert main(["train", str(toml), "--steps=2", "--batch_size", "2"]) == 0
    grid = sorted((tmp_path / "out" / "validation").glob("*.png"))
    assert grid, "no validation grid"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    inputs = tiny.unet_inputs()
    base = tiny.run(pipe.unet, inputs)
    name = pd.load_adapter(pipe, tmp_path / "out" / "adapter.safetensors")
    assert pd.controlnet_of(pipe, name).config.conditioning_embedding_out_channels == (16, 32)
    with pd.inputs(pipe, control_image=control()):
        assert (tiny.run(pipe.unet, inputs) - base).abs().max() > 1e-5
    torch.testing.assert_close(tiny.run(pipe.unet, inputs), base, atol=0, rtol=0)


@pytest.mark.parametrize("config", [pd.ControlNet(downscale=2), pd.ControlNetLoRA(downscale=2, r=2),
                                    pd.ControlNeXt(downscale=2, embedding_channels=(8, 16), channels=(16, 32),
                                                   time_channels=16, time_embed_dim=32)])
def test_gradient_checkpointing_gives_the_same_gradients(config):
    """The trainer's ``gradient_checkpointing`` (``unet.enable_gradient_checkpointing()``) reaches the ControlNet
    copy inside the annex too (diffusers walks every submodule), and re-running blocks in backward must not lose
    this call's condition."""
    grads = []
    for checkpointing in (False, True):
        unet = tiny.tiny_unet()
        pd.inject(unet, config, "c")
        settle(unet, "c")
        if checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        with pd.inputs(unet, control_image=control(batch=2)):
            unet(**tiny.unet_inputs(batch=2)).sample.pow(2).mean().backward()
        grads.append({n: p.grad for n, p in unet.named_parameters() if p.requires_grad})
    if isinstance(config, pd.ControlNet):
        assert any(getattr(m, "gradient_checkpointing", False) for m in pd.controlnet_of(unet, "c").modules())
    assert grads[0].keys() == grads[1].keys() and all(g is not None for g in grads[1].values())
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-4)
