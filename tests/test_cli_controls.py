"""``peft-diffusion generate`` with --control / --control-type / --controlnet / --t2i-adapter / --image-prompt on the
tiny pipeline: each condition type writes the grid (condition | generation), the images are the composer
pipeline's, the maps are ``pd.condition``'s (training's preprocessing); bad input answers with one line, exit 2.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import peft_diffusion as pd
from peft_diffusion.cli import main
from peft_diffusion.shapes import world

REPO_MODELS = Path(__file__).resolve().parents[1] / "peft_diffusion/models"
CAPTION = "a large red circle on a white background, top left"


@pytest.fixture(scope="module")
def files(tiny_pipe_dir, tmp_path_factory):
    """A ControlNet and a T2I-Adapter for the tiny U-Net (random, so they act), one for another U-Net, an
    IP-Adapter for the embedded shapes-clip, and a world image."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from test_composer import controlnet, t2i
    from test_ip_adapter import perturb

    import tiny
    from peft_diffusion.training.call_inputs import attach_image_encoder

    root = tmp_path_factory.mktemp("controls")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    controlnet(pipe.unet, 1).save_pretrained(root / "cn")
    t2i(1).save_pretrained(root / "t2i")
    other = UNet2DConditionModel(**dict(tiny.UNET_CONFIG, block_out_channels=(16, 32)))
    controlnet(other, 1).save_pretrained(root / "cn-other")
    attach_image_encoder(pipe, "", "cpu")
    pd.inject(pipe, pd.IPAdapter(), "ip")
    perturb(pipe, "ip")
    ip = pd.save_adapter(pipe, root / "ip.safetensors", "ip", format="ip-adapter")
    world.sample_at(0, 3).image.save(root / "scene.png")
    return {"cn": root / "cn", "t2i": root / "t2i", "cn-other": root / "cn-other", "ip": ip, "scene": root / "scene.png"}


def cells(path, n_cols, size=32):
    arr = np.asarray(Image.open(path))
    return [arr[r:r + size, c:c + size] for r in range(0, arr.shape[0], size) for c in range(0, n_cols * size, size)]


def args(tiny_pipe_dir, out, *extra):
    return ["generate", "--base", str(tiny_pipe_dir), "--prompt", "a photo of a cat", "--n", "1", "--steps", "2",
            "--out", str(out), *extra]


@pytest.mark.parametrize("kind", ["canny", "shuffle", "lineart_standard", "mask", "outline", "none"])
def test_each_condition_type_writes_the_grid(files, tiny_pipe_dir, tmp_path, kind, capsys):
    image = f"world:{CAPTION}" if kind in ("mask", "outline") else str(files["scene"])
    model = ["--t2i-adapter", str(files["t2i"])] if kind in ("shuffle", "none") else ["--controlnet", str(files["cn"])]
    assert main(args(tiny_pipe_dir, tmp_path, "--control", f"{image}:0.8", "--control-type", kind, *model)) == 0
    assert f"control-0-{kind} | 1 generated" in capsys.readouterr().out
    cond, gen = cells(tmp_path / "grid.png", 2)
    scene = world.from_attrs(world.parse_caption(CAPTION)) if kind in ("mask", "outline") else Image.open(files["scene"])
    assert np.array_equal(cond, np.asarray(pd.condition(scene, kind, size=32)))  # training's preprocessing
    assert np.array_equal(cond, np.asarray(Image.open(tmp_path / f"control-0-{kind}.png")))
    assert np.array_equal(gen, np.asarray(Image.open(tmp_path / "00-a-photo-of-a-cat-0.png")))


def test_images_are_the_composer_pipelines(files, tiny_pipe_dir, tmp_path):
    from peft_diffusion.composer import AdapterComposerPipeline
    from peft_diffusion.controls import Control

    extra = ["--control", f"{files['scene']}:0.7", "--control", f"world:{CAPTION}:1.5", "--control-type", "canny",
             "--control-type", "mask", "--controlnet", str(files["cn"]), "--t2i-adapter", str(files["t2i"]),
             "--adapter", f"{files['ip']}:0.6", "--image-prompt", str(files["scene"]), "--n", "2", "--guidance", "3"]
    assert main(args(tiny_pipe_dir, tmp_path, *extra)) == 0
    grid = cells(tmp_path / "grid.png", 5)  # canny | mask | image prompt | 2 generated
    assert len(grid) == 5 and np.array_equal(grid[2], np.asarray(Image.open(files["scene"])))
    pipe = AdapterComposerPipeline.from_pretrained(str(tiny_pipe_dir))
    pipe.set_progress_bar_config(disable=True)
    controls = [Control(str(files["cn"]), Image.open(files["scene"]), 0.7, "canny"),
                Control(str(files["t2i"]), world.from_attrs(world.parse_caption(CAPTION)), 1.5, "mask")]
    ref = pipe(["a photo of a cat"] * 2, num_inference_steps=2, guidance_scale=3.0, output_type="np",
               generator=[torch.Generator().manual_seed(i) for i in range(2)], adapters={str(files["ip"]): 0.6},
               image_prompt=Image.open(files["scene"]).convert("RGB"), controls=controls).images
    ref = (np.clip(ref, 0, 1) * 255).round().astype(np.uint8)
    assert np.array_equal(np.stack(grid[3:]), ref)
    assert pipe.image_encoder is not None  # the embedded shapes-clip, attached for the IP-Adapter file
    without = copy.deepcopy(pipe)(["a photo of a cat"], num_inference_steps=2, guidance_scale=3.0, output_type="np",
                                   generator=[torch.Generator().manual_seed(0)]).images
    assert np.abs(without[0] - ref[0] / 255).max() > 0.01


def test_condition_image_mode_is_converted_and_size_resized_or_refused(files, tiny_pipe_dir, tmp_path, capsys):
    rgb = Image.open(files["scene"])
    rgb.convert("RGBA").save(tmp_path / "rgba.png")
    rgb.resize((64, 64), Image.Resampling.NEAREST).save(tmp_path / "big.png")
    Image.new("RGB", (64, 32)).save(tmp_path / "wide.png")
    base = ["--control-type", "canny", "--controlnet", str(files["cn"])]
    assert main(args(tiny_pipe_dir, tmp_path / "a", "--control", str(files["scene"]), *base)) == 0
    assert main(args(tiny_pipe_dir, tmp_path / "b", "--control", str(tmp_path / "rgba.png"), *base)) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a/grid.png")), np.asarray(Image.open(tmp_path / "b/grid.png")))
    assert main(args(tiny_pipe_dir, tmp_path / "c", "--control", str(tmp_path / "big.png"), *base)) == 0
    assert Image.open(tmp_path / "c/grid.png").size == (64, 32)
    capsys.readouterr()
    assert main(args(tiny_pipe_dir, tmp_path / "d", "--control", str(tmp_path / "wide.png"), *base)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: condition image is 64x32 but the target size is 32x32") and err.count("\n") == 1


@pytest.mark.parametrize("case", ["other-unet", "no-ip-adapter", "count", "types", "wrong-flag", "caption", "missing",
                                  "dit"])
def test_bad_input_one_line_exit_2(files, tiny_pipe_dir, tmp_path, case, capsys):
    scene = str(files["scene"])
    extra, message = {
        "other-unet": (["--control", scene, "--controlnet", str(files["cn-other"])],
                       "control 0 (controlnet {}) was made for another U-Net: it has block_out_channels=(16, 32) but "
                       "this pipeline's U-Net has block_out_channels=(32, 64)".format(files["cn-other"])),
        "no-ip-adapter": (["--image-prompt", scene], "--image-prompt needs an IP-Adapter among the --adapter files"),
        "count": (["--control", scene, "--control", scene, "--controlnet", str(files["cn"])],
                  "2 --control image(s) but 1 control model(s)"),
        "types": (["--control", scene, "--control-type", "canny", "--control-type", "mask", "--controlnet",
                   str(files["cn"])], "2 --control-type values for 1 --control images"),
        "wrong-flag": (["--control", scene, "--controlnet", str(files["t2i"])],
                       f"--controlnet {files['t2i']} holds a T2IAdapter: pass it with --t2i-adapter"),
        "caption": (["--control", "world:a red circle", "--control-type", "mask", "--controlnet", str(files["cn"])],
                    "--control world:a red circle: not a full shapes-world caption"),
        "missing": (["--control", str(tmp_path / "nope.png"), "--controlnet", str(files["cn"])],
                    "no such image file"),
        "dit": (["--base", str(REPO_MODELS / "shapes-dit"), "--control", scene, "--controlnet", str(files["cn"])],
                "--image-prompt and --control are for text-to-image bases, not a DiT"),
    }[case]
    assert main(args(tiny_pipe_dir, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
