"""The peft-diffusion command on the tiny pipeline: inspect, convert, generate, train, errors."""
from __future__ import annotations


import pytest
import torch
from PIL import Image

import peft_diffusion as pd
from peft_diffusion.api import hosts
from peft_diffusion.cli import main, parse_adapter, site_kind
from peft_diffusion.shapes import world


@pytest.fixture(scope="module")
def adapter_files(tiny_pipe_dir, tmp_path_factory):
    """The same random LoRA (U-Net attention r=4, text encoder r=2 alpha 4) in the three formats."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    pd.inject(pipe, pd.LoRA(r=4, alpha=4), "subject")
    pd.inject(pipe, pd.LoRA(r=2, alpha=4, target="clip-text"), "subject", components=("text_encoder",))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
        for name, p in pipe.text_encoder.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    root = tmp_path_factory.mktemp("adapters")
    return {fmt: pd.save_adapter(pipe, root / f"{fmt}.safetensors", "subject", format=fmt)
            for fmt in ("native", "diffusers", "kohya")}


@pytest.mark.parametrize("fmt", ["native", "diffusers", "kohya"])
def test_inspect(adapter_files, fmt, capsys):
    assert main(["inspect", str(adapter_files[fmt])]) == 0
    out = capsys.readouterr().out
    assert f"format      {fmt}" in out
    assert "[unet]" in out and "[text_encoder]" in out
    assert "method      lora" in out and "r=4 x" in out and "r=2 x" in out
    assert "alphas      4 x" in out  # text encoder: alpha 4 at rank 2 survives every format
    total = sum(t.numel() for t in pd.io.read_file(adapter_files[fmt])[0].values() if t.ndim == 2)
    assert f"parameters  {total:,}" in out
    assert ("to_q x" in out) and ("q_proj x" in out)
    if fmt == "native":
        assert "name        subject" in out and "fingerprint" in out


def _deltas(pipe, name):
    return {q: h.deltas[name].delta_weight() for q, h in hosts(pipe) if name in h.deltas}


def test_convert_round_trip(adapter_files, tiny_pipe_dir, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    kohya, diffusers_file, native = tmp_path / "k.safetensors", tmp_path / "d.safetensors", tmp_path / "n.safetensors"
    base = ["--base", str(tiny_pipe_dir)]
    assert main(["convert", str(adapter_files["native"]), str(kohya), "--to", "kohya"] + base) == 0
    assert main(["convert", str(kohya), str(diffusers_file), "--to", "diffusers"] + base) == 0
    assert main(["convert", str(diffusers_file), str(native), "--to", "native"] + base) == 0
    assert "(native)" in capsys.readouterr().out
    before, after = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir), StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    a, b = _deltas(before, pd.load_adapter(before, adapter_files["native"])), _deltas(after, pd.load_adapter(after, native))
    assert a.keys() == b.keys() and len(a) > 0
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_generate_writes_pngs_and_a_grid(adapter_files, tiny_pipe_dir, tmp_path, capsys):
    out = tmp_path / "gen"
    args = ["generate", "--base", str(tiny_pipe_dir), "--adapter", f"{adapter_files['native']}:0.5",
            "--adapter", str(adapter_files["kohya"]), "--prompt", "a sks cat", "--prompt", "a dog", "--n", "2",
            "--steps", "2", "--out", str(out)]
    assert main(args) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["00-a-sks-cat-0.png", "00-a-sks-cat-1.png", "01-a-dog-0.png", "01-a-dog-1.png", "grid.png"]
    assert Image.open(out / "grid.png").size == (64, 64)
    assert "weight 0.5" in capsys.readouterr().out


def test_train_command(tiny_pipe_dir, tmp_path):
    folder = tmp_path / "subject"
    folder.mkdir()
    for i, s in enumerate(world.subject_dataset(2, seed=4)):
        s.image.save(folder / f"{i}.png")
    toml = tmp_path / "db.toml"
    toml.write_text(f'base = "{tiny_pipe_dir}"\ninstance_dir = "{folder}"\ninstance_prompt = "a sks cross"\n'
                    f'output_dir = "{tmp_path / "out"}"\nprior_preservation = false\nprogress = false\n'
                    f'validation_every = -1\nlog_with = "none"\ncheckpoint_every = 0\n[method]\nmethod = "lora"\nr = 2\n')
    assert main(["train", str(toml), "--steps=2", "--batch_size", "2", "--method.target=unet-attn"]) == 0
    info = pd.io.read_file(tmp_path / "out/adapter.safetensors")[0]
    assert any("attn1" in k for k in info)  # the override reached the method table


def test_errors_exit_2_with_one_line(tmp_path, capsys):
    toml = tmp_path / "bad.toml"
    toml.write_text("stepz = 1\n")
    assert main(["train", str(toml)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config keys ['stepz']; valid keys:") and "steps" in err
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a file")
    assert main(["inspect", str(junk)]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing.safetensors")]) == 2


def test_parse_adapter_and_site_kind():
    assert parse_adapter("a.safetensors:0.5") == ("a.safetensors", 0.5)
    assert parse_adapter("C:/x/a.safetensors") == ("C:/x/a.safetensors", 1.0)
    assert parse_adapter("dir:with:colons/a.safetensors:-1") == ("dir:with:colons/a.safetensors", -1.0)
    assert site_kind("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0") == "attn2.to_out.0"
    assert site_kind("text_model.encoder.layers.1.self_attn.q_proj") == "self_attn.q_proj"
    assert site_kind("down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q") == "attn2_to_q"
