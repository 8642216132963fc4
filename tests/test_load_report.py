"""``load_adapter(..., report=True)``: every file key used or ignored per component, the modules of the kinds the
file adapts that got no key, and all-zero tensors, so a user sees why an adapter "does nothing"."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import peft_diffusion as pd
import tiny
from peft_diffusion.io import LoadReport, UnmatchedKeysError


def _file(model, tmp_path, fmt="kohya", randomize=True, **kwargs):
    pd.inject(model, pd.LoRA(r=2), "mine", **kwargs)
    if randomize:
        tiny.randomize(model, "mine")
    path = pd.save_adapter(model, tmp_path / f"{fmt}.safetensors", "mine", format=fmt)
    pd.remove(model)
    return path


def test_default_return_is_still_the_name(unet, tmp_path):
    assert pd.load_adapter(unet, _file(unet, tmp_path)) == "kohya"  # kohya files name no adapter: the file stem


@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "native", "lycoris"])
def test_full_match_uses_every_key(fmt, unet, tmp_path):
    path = _file(unet, tmp_path, fmt)
    keys = sorted(load_file(path))
    report = pd.load_adapter(unet, path, name="mine", report=True)
    assert isinstance(report, LoadReport) and report.loaded and report.name == "mine"
    assert sorted(report.used) == keys  # the file's own spelling (kohya's underscores, alphas included)
    assert report.ignored == [] and report.missing == []
    (comp, part), = report.components.items()
    assert part.sites == len(list(pd.api.hosts(unet)))
    assert f"{len(keys)} keys used on {part.sites} modules" in str(report)


def test_half_matching_file_names_ignored_keys_and_missing_modules(unet, tmp_path):
    # a file whose up-block keys use another naming: half the adapter would silently go with skip_unknown
    sd = load_file(_file(unet, tmp_path))
    renamed = {k.replace("lora_unet_up_blocks_", "lora_unet_output_blocks_"): v for k, v in sd.items()}
    save_file(renamed, tmp_path / "partial.safetensors")
    moved = sorted(k for k in renamed if "output_blocks" in k)
    assert 0 < len(moved) < len(renamed)

    with pytest.raises(UnmatchedKeysError, match="report=True") as err:
        pd.load_adapter(unet, tmp_path / "partial.safetensors")
    assert not err.value.report.loaded and sorted(err.value.report.ignored) == moved
    assert pd.adapter_names(unet) == []

    report = pd.load_adapter(unet, tmp_path / "partial.safetensors", skip_unknown=True, report=True)
    assert sorted(report.ignored) == moved
    assert sorted(report.used) == sorted(set(renamed) - set(moved))
    up_layers = sorted(n for n, _ in pd.api.hosts(SimpleNamespace(components={"": _adapted(unet)}))
                       if n.startswith("up_blocks"))
    assert up_layers and sorted(report.components["unet"].missing) == up_layers
    text = str(report)
    assert f"{len(moved)} keys fit no module" in text
    assert f"{len(up_layers)} modules of the same kinds got no key" in text
    assert "lora_unet_output_blocks_" in text and f"no key for ({len(up_layers)}):\n      up_blocks." in text


def _adapted(unet):
    """A copy of ``unet`` with the same LoRA on every layer the file targets (to list the layers it covers)."""
    import copy

    other = copy.deepcopy(unet)
    pd.remove(other)
    pd.inject(other, pd.LoRA(r=2), "all")
    return other


def test_file_for_another_model_says_nothing_fits(text_encoder, unet, tmp_path):
    path = _file(text_encoder, tmp_path, "diffusers")  # a text-encoder LoRA given to a U-Net
    with pytest.raises(UnmatchedKeysError) as err:
        pd.load_adapter(unet, path, skip_unknown=True)
    report = err.value.report
    assert report.used == [] and sorted(report.ignored) == sorted(load_file(path))
    assert "no key of the file fits this model" in str(report)
    assert pd.adapter_names(unet) == []


def test_untrained_adapter_shows_all_zero_tensors(unet, tmp_path):
    report = pd.load_adapter(unet, _file(unet, tmp_path, "diffusers", randomize=False), report=True)
    zero = report.components["unet"].zero
    assert zero and all(z.endswith("lora_B.weight") for z in zero)
    assert len(zero) == report.components["unet"].sites
    assert "all zeros (no effect)" in str(report)


def test_pipeline_report_per_component(unet, text_encoder, tmp_path):
    pipe = SimpleNamespace(components={"unet": unet, "text_encoder": text_encoder})
    pd.inject(pipe, pd.LoRA(r=2), "mine")
    pd.inject(pipe, pd.LoRA(r=2), "mine", components=("text_encoder",))
    tiny.randomize(pipe, "mine")
    path = pd.save_adapter(pipe, tmp_path / "both.safetensors", "mine", format="kohya")
    pd.remove(pipe)
    report = pd.load_adapter(pipe, path, report=True)
    assert set(report.components) == {"unet", "text_encoder"}
    assert all(k.startswith("lora_te_") for k in report.components["text_encoder"].used)
    assert all(k.startswith("lora_unet_") for k in report.components["unet"].used)
    assert sorted(report.used) == sorted(load_file(path))
    assert "  text_encoder: " in str(report) and "  unet: " in str(report)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_pipeline_file_into_a_lone_unet_skips_the_text_encoder(fmt, unet, text_encoder, tmp_path):
    pipe = SimpleNamespace(components={"unet": unet, "text_encoder": text_encoder})
    pd.inject(pipe, pd.LoRA(r=2), "mine")
    pd.inject(pipe, pd.LoRA(r=2), "mine", components=("text_encoder",))
    path = pd.save_adapter(pipe, tmp_path / "both.safetensors", "mine", format=fmt)
    pd.remove(pipe)
    report = pd.load_adapter(unet, path, report=True)  # kohya's text-encoder keys raised here before
    keys = load_file(path)
    assert report.ignored == [] and sorted(report.used + report.skipped) == sorted(keys)
    assert report.components["text_encoder"].skipped and not report.components["text_encoder"].used
    assert "text_encoder: " in str(report) and "skipped (the target has no such component)" in str(report)


def test_textual_inversion_report(tmp_path):
    model = tiny.tiny_clip_text_tokenizer()
    save_file({"<cat>": torch.randn(2, model.get_input_embeddings().weight.shape[1])}, tmp_path / "cat.safetensors")
    report = pd.load_adapter(model, tmp_path / "cat.safetensors", report=True)
    assert report.name == "<cat>" and report.used == ["<cat>"] and report.ignored == []
