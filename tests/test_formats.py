"""Adapter files against the peers: diffusers + peft in both directions, older diffusers names, kohya."""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import peft_diffusion as pd
import tiny
from peft_diffusion.api import hosts

ATOL = 1e-5


def outputs(pipe):
    """(text-encoder hidden states, U-Net output) for fixed inputs."""
    ids = pipe.tokenizer(["a photo of sks dog"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        context = pipe.text_encoder(ids)[0]
        inputs = tiny.unet_inputs()
        inputs["encoder_hidden_states"] = context
        return context, pipe.unet(**inputs).sample


def assert_close(a, b, atol=ATOL):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


def peft_lora_file(pipe, path, metadata=True):
    """A LoRA made and saved by diffusers + peft (random B, alpha != r)."""
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False))
    pipe.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"],
                                             init_lora_weights=False))
    return save_peft_adapters(pipe, path, metadata)


def save_peft_adapters(pipe, path, metadata=True):
    """Save the peft adapters of the U-Net and text encoder as diffusers does (with its metadata header)."""
    extra = {}
    if metadata:
        extra = dict(unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
                     text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["default"].to_dict())
    StableDiffusionPipeline.save_lora_weights(
        path, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder), **extra)
    return path / "pytorch_lora_weights.safetensors"


def our_lora(pipe):
    """Our LoRA on U-Net (alpha != r, a rank pattern) and text encoder (rsLoRA), with non-zero B."""
    pd.inject(pipe, pd.LoRA(r=4, alpha=6, rank_pattern={"attn2.to_k": 2}, alpha_pattern={"attn1.to_q": 1.0}),
              "mine")
    pd.inject(pipe, pd.LoRA(r=2, alpha=3, rslora=True), "mine", components=("text_encoder",))
    tiny.randomize(pipe, "mine", std=0.2)


@pytest.mark.parametrize("metadata", [True, False])
def test_peft_file_loads_like_diffusers(tiny_pipe_dir, tmp_path, metadata):
    maker = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    path = peft_lora_file(maker, tmp_path, metadata=metadata)
    theirs = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    theirs.load_lora_weights(path)
    ours = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    name = pd.load_adapter(ours, path)
    assert name == "pytorch_lora_weights"
    base = outputs(StableDiffusionPipeline.from_pretrained(tiny_pipe_dir))
    expected = outputs(theirs)
    assert (expected[1] - base[1]).abs().max() > 1e-3  # the LoRA does something
    assert_close(outputs(ours), expected)


@pytest.mark.parametrize("fmt", ["diffusers", "native"])
def test_our_file_loads_in_diffusers(tiny_pipe, tiny_pipe_dir, tmp_path, fmt):
    our_lora(tiny_pipe)
    expected = outputs(tiny_pipe)
    path = pd.save_adapter(tiny_pipe, tmp_path / f"{fmt}.safetensors", "mine", format=fmt)
    theirs = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    theirs.load_lora_weights(path)
    assert_close(outputs(theirs), expected)
    again = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    assert pd.load_adapter(again, path) == ("mine" if fmt == "native" else fmt)
    assert_close(outputs(again), expected)


def test_kohya_round_trip(tiny_pipe, tiny_pipe_dir, tmp_path):
    our_lora(tiny_pipe)
    expected = outputs(tiny_pipe)
    path = pd.save_adapter(tiny_pipe, tmp_path / "k.safetensors", "mine", format="kohya")
    keys = load_file(path)
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_") for k in keys)  # A1111's CLIP names
    assert {k.rsplit(".", 2)[-2] + "." + k.rsplit(".", 1)[-1] if k.endswith("weight") else "alpha" for k in keys} == {
        "lora_down.weight", "lora_up.weight", "alpha"}
    again = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    pd.load_adapter(again, path)
    assert_close(outputs(again), expected)


def test_kohya_export_loads_in_diffusers(tiny_pipe, tiny_pipe_dir, tmp_path):
    """One alpha per component: diffusers 0.42 falls back to a global alpha for SD1.x attention modules
    whose alpha differs from the most common one, so per-module alphas are checked by hand below."""
    pd.inject(tiny_pipe, pd.LoRA(r=4, alpha=6), "mine")
    pd.inject(tiny_pipe, pd.LoRA(r=2, alpha=3, rslora=True), "mine", components=("text_encoder",))
    tiny.randomize(tiny_pipe, "mine", std=0.2)
    expected = outputs(tiny_pipe)
    path = pd.save_adapter(tiny_pipe, tmp_path / "k.safetensors", "mine", format="kohya")
    theirs = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    theirs.load_lora_weights(path)
    assert_close(outputs(theirs), expected)


def test_kohya_file_with_per_module_alphas(tiny_pipe, tiny_pipe_dir, tmp_path):
    """Each module's own alpha / rank is its scale: checked against W + alpha/r * up @ down by hand."""
    g = torch.Generator().manual_seed(3)
    sd, expected_pipe = {}, StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    sites = [n for n, m in tiny_pipe.unet.named_modules() if n.endswith(("to_q", "to_v", "proj_in"))]
    assert sites
    for i, site in enumerate(sites):
        layer = expected_pipe.unet.get_submodule(site)
        rank, alpha = 2 + i % 3, [1.0, 4.0, 16.0][i % 3]
        shape = layer.weight.shape
        down = torch.randn(rank, *shape[1:], generator=g) * 0.3
        up = torch.randn(shape[0], rank, *([1] * (len(shape) - 2)), generator=g) * 0.3
        stem = "lora_unet_" + site.replace(".", "_")
        sd.update({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up,
                   f"{stem}.alpha": torch.tensor(alpha)})
        with torch.no_grad():
            layer.weight += (alpha / rank) * (up.flatten(1) @ down.flatten(1)).view(shape)
    save_file(sd, tmp_path / "alphas.safetensors")
    pd.load_adapter(tiny_pipe, tmp_path / "alphas.safetensors")
    assert_close(outputs(tiny_pipe), outputs(expected_pipe))


OLD_RENAMES = {"lora_A.weight": "lora.down.weight", "lora_B.weight": "lora.up.weight"}


@pytest.mark.parametrize("layout", ["lora.down", "processor", "lora_linear_layer"])
def test_older_diffusers_names(tiny_pipe_dir, tmp_path, layout):
    maker = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    new = load_file(peft_lora_file(maker, tmp_path, metadata=False))
    old = {}
    for key, t in new.items():
        site, _, param = key.rpartition(".lora_")
        updown = "down" if param.startswith("A") else "up"
        if layout == "processor" and key.startswith("unet."):
            block, _, proj = site.rpartition(".")
            proj = "to_out" if proj == "0" else proj
            block = block.removesuffix(".to_out")
            old[f"{block}.processor.{proj}_lora.{updown}.weight"] = t
        elif layout == "lora_linear_layer" and key.startswith("text_encoder."):
            old[f"{site}.lora_linear_layer.{updown}.weight"] = t
        else:
            old[f"{site}.lora.{updown}.weight"] = t
    save_file(old, tmp_path / "old.safetensors")
    ours = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    pd.load_adapter(ours, tmp_path / "old.safetensors")
    theirs = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    theirs.load_lora_weights(tmp_path / "pytorch_lora_weights.safetensors")
    assert_close(outputs(ours), outputs(theirs))


def unet_output(unet):
    with torch.no_grad():
        return unet(**tiny.unet_inputs()).sample


@pytest.mark.parametrize("fmt", ["native", "kohya"])
def test_loaded_tensors_own_their_storage_and_compute_bit_for_bit(tiny_pipe, tiny_pipe_dir, tmp_path, fmt):
    """Not views into the file's buffer (which would keep it alive and misalign the data: BLAS kernels pick
    their code path by alignment, so the loaded adapter would round differently from the saved one)."""
    our_lora(tiny_pipe)
    expected = outputs(tiny_pipe)
    path = pd.save_adapter(tiny_pipe, tmp_path / "a.safetensors", "mine", format=fmt)
    again = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    pd.load_adapter(again, path)
    loaded = [p for n, p in again.unet.named_parameters() if ".deltas." in n]
    assert loaded and all(p.untyped_storage().nbytes() == p.numel() * p.element_size() for p in loaded)
    assert_close(outputs(again), expected, atol=0)


def test_model_level_save_and_unprefixed_keys(tiny_pipe, tiny_pipe_dir, tmp_path):
    our_lora(tiny_pipe)
    expected = unet_output(tiny_pipe.unet)
    path = pd.save_adapter(tiny_pipe.unet, tmp_path / "unet.safetensors", "mine", format="diffusers")
    assert all(k.startswith("unet.") for k in load_file(path))
    fresh = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    pd.load_adapter(fresh.unet, path)
    torch.testing.assert_close(unet_output(fresh.unet), expected, atol=ATOL, rtol=0)
    with safe_open(path, "pt") as f:  # a model-level file: keys and header without the component prefix
        header = {k.removeprefix("unet."): v for k, v in json.loads(f.metadata()["lora_adapter_metadata"]).items()}
    save_file({k.removeprefix("unet."): v for k, v in load_file(path).items()}, tmp_path / "bare.safetensors",
              metadata={"lora_adapter_metadata": json.dumps(header)})
    bare = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    pd.load_adapter(bare, tmp_path / "bare.safetensors")  # unprefixed keys go to the denoiser
    torch.testing.assert_close(unet_output(bare.unet), expected, atol=ATOL, rtol=0)
    # a whole-pipeline file into a lone model: its component is picked by the model's class
    both = pd.save_adapter(tiny_pipe, tmp_path / "both.safetensors", "mine")
    lone = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir).unet
    pd.load_adapter(lone, both)
    torch.testing.assert_close(unet_output(lone), expected, atol=ATOL, rtol=0)


def test_scale_and_names(tiny_pipe, tiny_pipe_dir, tmp_path):
    our_lora(tiny_pipe)
    path = pd.save_adapter(tiny_pipe, tmp_path / "a.safetensors", "mine")
    fresh = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    base = outputs(fresh)[1]
    assert pd.load_adapter(fresh, path, scale=0.5) == "mine"
    half = outputs(fresh)[1]
    assert {h.active["mine"] for _, h in hosts(fresh)} == {0.5}
    pd.set_adapters(fresh, {"mine": 1.0})
    full = outputs(fresh)[1]
    pd.set_adapters(fresh, {"mine": 0.5})
    torch.testing.assert_close(outputs(fresh)[1], half, atol=0, rtol=0)
    assert (full - half).abs().max() > 1e-3 and (half - base).abs().max() > 1e-3
    assert pd.load_adapter(fresh, path) == "mine_1"
    with pytest.raises(ValueError, match="already exists"):
        pd.load_adapter(fresh, path, name="mine")
    assert all(not p.requires_grad for n, p in fresh.unet.named_parameters() if "deltas" in n)


# ---------------------------------------------------------------- bad input


def unchanged(pipe, before_types, before_state):
    assert tiny.module_types(pipe.unet) == before_types
    after = tiny.snapshot(pipe.unet)
    assert after.keys() == before_state.keys()
    assert all(torch.equal(after[k], before_state[k]) for k in after)
    assert pd.adapter_names(pipe) == []


def test_shape_mismatch_names_key_and_shapes(tiny_pipe, tiny_pipe_dir, tmp_path):
    our_lora(tiny_pipe)
    path = pd.save_adapter(tiny_pipe, tmp_path / "a.safetensors", "mine", format="diffusers")
    sd = load_file(path)
    key = sorted(k for k in sd if k.startswith("unet.") and "lora_B" in k)[3]
    sd[key] = torch.zeros(sd[key].shape[0] + 1, sd[key].shape[1])
    save_file(sd, tmp_path / "bad.safetensors")
    fresh = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    types, state = tiny.module_types(fresh.unet), tiny.snapshot(fresh.unet)
    with pytest.raises(pd.AdapterFileError) as err:
        pd.load_adapter(fresh, tmp_path / "bad.safetensors")
    msg = str(err.value)
    assert key in msg and str(tuple(sd[key].shape)) in msg and str((sd[key].shape[0] - 1, sd[key].shape[1])) in msg
    unchanged(fresh, types, state)


def test_unknown_keys_error_or_skip(tiny_pipe, tiny_pipe_dir, tmp_path, caplog):
    our_lora(tiny_pipe)
    sd = load_file(pd.save_adapter(tiny_pipe, tmp_path / "a.safetensors", "mine", format="diffusers"))
    sd["unet.down_blocks.9.attentions.0.to_q.lora_A.weight"] = torch.zeros(4, 8)
    sd["unet.down_blocks.9.attentions.0.to_q.lora_B.weight"] = torch.zeros(8, 4)
    save_file(sd, tmp_path / "extra.safetensors")
    fresh = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    types, state = tiny.module_types(fresh.unet), tiny.snapshot(fresh.unet)
    with pytest.raises(pd.AdapterFileError, match=r"down_blocks\.9"):
        pd.load_adapter(fresh, tmp_path / "extra.safetensors")
    unchanged(fresh, types, state)
    with caplog.at_level("WARNING"):
        pd.load_adapter(fresh, tmp_path / "extra.safetensors", skip_unknown=True)
    assert "down_blocks.9" in caplog.text
    assert pd.adapter_names(fresh) == ["extra"]


def test_corrupt_truncated_and_nonfinite_files(tiny_pipe, tmp_path):
    our_lora(tiny_pipe)
    path = pd.save_adapter(tiny_pipe, tmp_path / "a.safetensors", "mine")
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"\x00garbage" * 10)
    sd = load_file(path)
    key = next(iter(sd))
    sd[key][0, 0] = float("nan")
    save_file(sd, tmp_path / "nan.safetensors")
    target = tiny_pipe
    pd.remove(target)
    for bad, pattern in [("trunc", "corrupt or truncated"), ("junk", "corrupt or truncated"), ("nan", "NaN")]:
        with pytest.raises(pd.AdapterFileError, match=pattern):
            pd.load_adapter(target, tmp_path / f"{bad}.safetensors")
    with pytest.raises(FileNotFoundError):
        pd.load_adapter(target, tmp_path / "missing.safetensors")
    save_file({"something.else": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(pd.AdapterFileError, match="unrecognised"):
        pd.load_adapter(target, tmp_path / "other.safetensors")
    assert pd.adapter_names(target) == []


class _Exploit:
    def __reduce__(self):
        return (exec, ("open(__import__('os').environ['PD_PWNED'], 'w').write('x')",))


def test_pickled_files_load_weights_only(tiny_pipe, tmp_path, monkeypatch):
    our_lora(tiny_pipe)
    sd = load_file(pd.save_adapter(tiny_pipe, tmp_path / "a.safetensors", "mine", format="diffusers"))
    torch.save(sd, tmp_path / "plain.bin")
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PD_PWNED", str(marker))
    torch.save({"x": _Exploit(), **sd}, tmp_path / "evil.bin")
    pd.remove(tiny_pipe)
    with pytest.raises(pd.AdapterFileError, match="weights-only"):
        pd.load_adapter(tiny_pipe, tmp_path / "evil.bin")
    assert not marker.exists()
    assert pd.load_adapter(tiny_pipe, tmp_path / "plain.bin") == "plain"


def test_save_is_atomic(tiny_pipe, tmp_path, monkeypatch):
    our_lora(tiny_pipe)
    path = pd.save_adapter(tiny_pipe, tmp_path / "a.safetensors", "mine")
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr("peft_diffusion.io.files.save_file", crash)
    with torch.no_grad():
        next(p for n, p in tiny_pipe.unet.named_parameters() if "lora_B" in n).add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        pd.save_adapter(tiny_pipe, path, "mine")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_save_errors(tiny_pipe, tmp_path):
    our_lora(tiny_pipe)
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        pd.save_adapter(tiny_pipe, tmp_path / "x.safetensors", "nope")
    with pytest.raises(ValueError, match="cannot write format"):
        pd.save_adapter(tiny_pipe, tmp_path / "x.safetensors", "mine", format="diffusers-old")
    with pytest.raises(ValueError, match="safetensors only"):
        pd.save_adapter(tiny_pipe, tmp_path / "x.bin", "mine")
    assert list(tmp_path.iterdir()) == []


def test_unsupported_lora_variants_are_named(tiny_pipe, tiny_pipe_dir, tmp_path):
    our_lora(tiny_pipe)
    sd = load_file(pd.save_adapter(tiny_pipe, tmp_path / "a.safetensors", "mine", format="diffusers"))
    site = next(k for k in sd if k.endswith("lora_A.weight")).removesuffix(".lora_A.weight")
    sd[f"{site}.lora_B.bias"] = torch.zeros(4)  # (DoRA files are read since methods/dora.py: test_lora_variants)
    save_file(sd, tmp_path / "bias.safetensors")
    fresh = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    with pytest.raises(pd.AdapterFileError, match="LoRA with bias"):
        pd.load_adapter(fresh, tmp_path / "bias.safetensors")
    assert not list(hosts(fresh))


def test_write_folder_is_all_or_nothing(tmp_path):
    from peft_diffusion.io.files import write_folder

    folder = tmp_path / "adapter"
    write_folder(folder, lambda tmp: (tmp.mkdir(), (tmp / "a.json").write_text("1")))
    assert (folder / "a.json").read_text() == "1"

    def half(tmp):
        tmp.mkdir()
        (tmp / "a.json").write_text("2")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        write_folder(folder, half)
    assert (folder / "a.json").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    write_folder(folder, lambda tmp: (tmp.mkdir(), (tmp / "b.json").write_text("3")))
    assert sorted(p.name for p in folder.iterdir()) == ["b.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
