"""Attention processors (``pd.set_attention`` and diffusers' own setters) keep every kind of adapter working.

On the tiny Stable-Diffusion pipeline, for a representative method of each site kind (Host: LoRA, LoHa,
LoKr, DoRA; Annex: Houlsby; ParamSite: BitFit, DiffFit, FISH; token rows: textual inversion): prompt
encoding -> U-Net -> VAE decode gives the same output and the same adapter gradients under every processor as
under SDPA, and switching processors with adapters in place, then removing the adapters, leaves the
processors the user chose.
"""
from __future__ import annotations

import copy
import tomllib
from pathlib import Path

import pytest
import torch

import peft_diffusion as pd
import tiny
from peft_diffusion import (BitFit, DiffFit, DoRA, FISHMask, Houlsby, LoHa, LoKr, LoRA, Target, TextualInversion,
                            inject, remove)
from peft_diffusion.attention import attention_layers

PROMPT = "a photo of a cat"
METHODS = {
    "lora": LoRA(r=4),
    "loha": LoHa(r=2),
    "lokr": LoKr(r=2),
    "dora": DoRA(r=4),
    "houlsby": Houlsby(reduction=4),
    "bitfit": BitFit(),
    "difffit": DiffFit(),
    "fish": FISHMask(density=0.05, target=Target(include=(r".*to_[qkv]\.weight", r".*to_out\.0\.bias"), types=())),
    "textual-inversion": TextualInversion(token="<cat>", init_word="dog"),
}


def _diffusers_sliced(pipe):
    pipe.enable_attention_slicing("max")


def _diffusers_classic(pipe):
    from diffusers.models.attention_processor import AttnProcessor

    pipe.unet.set_attn_processor(AttnProcessor())


def _diffusers_default(pipe):
    pipe.unet.set_default_attn_processor()
    pipe.vae.set_default_attn_processor()


SETTERS = {
    "sliced": lambda pipe: pd.set_attention(pipe, "sliced"),
    "sliced-1": lambda pipe: pd.set_attention(pipe, "sliced", slice_size=1),
    "classic": lambda pipe: pd.set_attention(pipe, "classic"),
    "diffusers-enable_attention_slicing": _diffusers_sliced,
    "diffusers-set_attn_processor": _diffusers_classic,
    "diffusers-set_default_attn_processor": _diffusers_default,
}


@pytest.fixture(scope="module")
def base_pipe(tmp_path_factory):
    pipe = tiny.tiny_sd_pipeline(tmp_path_factory.mktemp("attn"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _forward(pipe, prompt: str) -> torch.Tensor:
    """Prompt -> text encoder -> U-Net -> VAE decoder (every attention layer of the pipeline runs)."""
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    context = pipe.text_encoder(ids)[0]
    latents = tiny.unet_inputs()["sample"]
    eps = pipe.unet(latents, torch.tensor([10]), encoder_hidden_states=context).sample
    return pipe.vae.decode(eps).sample


def _adapter_params(pipe) -> dict[str, torch.Tensor]:
    return {f"{comp}.{n}": p for comp, m in pipe.components.items() if isinstance(m, torch.nn.Module)
            for n, p in m.named_parameters() if p.requires_grad}


def _run(pipe, prompt: str):
    """(output, {trainable parameter: gradient}) of one step with an MSE loss to a fixed target."""
    params = _adapter_params(pipe)
    for p in params.values():
        p.grad = None
    out = _forward(pipe, prompt)
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    torch.nn.functional.mse_loss(out, target).backward()
    grads = {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}
    return out.detach(), grads


@pytest.mark.parametrize("method", list(METHODS))
def test_outputs_and_gradients_equal_under_every_processor(base_pipe, method):
    pipe = copy.deepcopy(base_pipe)
    prompt = f"a photo of a <cat>" if method == "textual-inversion" else PROMPT
    with torch.no_grad():
        plain = _forward(pipe, PROMPT)
    inject(pipe, METHODS[method], "a")
    tiny.perturb_trainable(pipe.unet if method != "textual-inversion" else pipe.text_encoder, std=0.1)
    assert set(pd.attention_kinds(pipe).values()) == {"sdpa"}  # diffusers' default on torch 2
    ref_out, ref_grads = _run(pipe, prompt)
    assert ref_grads, "no gradient reached the adapter"
    if method != "textual-inversion":  # (TI's prompt differs from the plain one anyway)
        assert (ref_out - plain).abs().max() > 1e-4, "the adapter does not change the output: the test cannot fail"
    for name, setter in SETTERS.items():
        setter(pipe)
        assert "sdpa" not in set(pd.attention_kinds(pipe.unet).values()), name
        out, grads = _run(pipe, prompt)
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
        assert grads.keys() == ref_grads.keys(), name
        for key, g in grads.items():
            torch.testing.assert_close(g, ref_grads[key], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name} {key}: {m}")
        pd.set_attention(pipe, "sdpa")
    out, _ = _run(pipe, prompt)
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", ["lora", "houlsby", "bitfit"])
def test_removing_adapters_keeps_the_processors_the_user_set(base_pipe, method):
    pipe = copy.deepcopy(base_pipe)
    pd.set_attention(pipe, "classic")  # set before injecting
    inject(pipe, METHODS[method], "a")
    assert set(pd.attention_kinds(pipe).values()) == {"classic"}
    pd.set_attention(pipe, "sliced", slice_size=1)  # switched with the adapter in place
    before = tiny.hooks_and_processors(pipe.unet)
    remove(pipe)
    layers = attention_layers(pipe)
    assert layers and all(type(a.processor).__name__ in ("SlicedAttnProcessor",) and a.processor.slice_size == 1
                          for _, a in layers)
    after = tiny.hooks_and_processors(pipe.unet)
    assert {n: v[-1] for n, v in after.items()} == {n: v[-1] for n, v in before.items() if n in after}
    # and the adapter-free model computes what a never-adapted one does under that processor
    fresh = copy.deepcopy(base_pipe)
    pd.set_attention(fresh, "sliced", slice_size=1)
    with torch.no_grad():
        torch.testing.assert_close(_forward(pipe, PROMPT), _forward(fresh, PROMPT), atol=0, rtol=0)


def test_a_layer_count_or_slice_set_by_diffusers_survives_inject_and_remove(base_pipe):
    pipe = copy.deepcopy(base_pipe)
    pipe.enable_attention_slicing(1)
    kinds = pd.attention_kinds(pipe)
    inject(pipe, LoRA(r=2), "a")
    inject(pipe, Houlsby(reduction=4), "b")
    assert pd.attention_kinds(pipe) == kinds
    # diffusers' dict setter sees the same layer names with adapters in place
    from diffusers.models.attention_processor import AttnProcessor

    names = list(pipe.unet.attn_processors)
    pipe.unet.set_attn_processor({n: AttnProcessor() for n in names})
    remove(pipe)
    assert list(pipe.unet.attn_processors) == names
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"AttnProcessor"}


def test_sliced_slice_sizes(base_pipe):
    pipe = copy.deepcopy(base_pipe)
    pd.set_attention(pipe.unet, "sliced")
    assert {a.processor.slice_size for _, a in attention_layers(pipe.unet)} == \
        {max(1, a.sliceable_head_dim // 2) for _, a in attention_layers(pipe.unet)}
    pd.set_attention(pipe.unet, "sliced", slice_size="max")
    assert {a.processor.slice_size for _, a in attention_layers(pipe.unet)} == {1}
    pd.set_attention(pipe.unet, "sliced", slice_size=3)
    assert {a.processor.slice_size for _, a in attention_layers(pipe.unet)} == {3}


def test_transformer_model_with_lora(make_model):
    model = make_model("pixart")
    inputs = tiny.pixart_inputs()
    inject(model, LoRA(r=2), "a")
    tiny.perturb_trainable(model)
    ref = tiny.run(model, inputs)
    for kind in ("sliced", "classic"):
        pd.set_attention(model, kind)
        torch.testing.assert_close(tiny.run(model, inputs), ref, atol=1e-5, rtol=1e-5)
    assert set(pd.attention_kinds(model).values()) == {"classic"}


# ---------------------------------------------------------------- errors leave every processor as it was

def test_unknown_kind_and_bad_slice_size(base_pipe):
    pipe = copy.deepcopy(base_pipe)
    kinds = pd.attention_kinds(pipe)
    with pytest.raises(ValueError, match=r"unknown attention kind 'flash'; supported: sdpa, xformers, sliced"):
        pd.set_attention(pipe, "flash")
    for bad in (0, -1, 1.5, True, "half"):
        with pytest.raises(ValueError, match="slice_size"):
            pd.set_attention(pipe, "sliced", slice_size=bad)
    assert pd.attention_kinds(pipe) == kinds


def test_xformers_missing_names_the_extra(base_pipe):
    from diffusers.utils import is_xformers_available

    if is_xformers_available():
        pytest.skip("xformers is installed here")
    pipe = copy.deepcopy(base_pipe)
    pd.set_attention(pipe, "classic")
    with pytest.raises(ImportError, match=r"pip install peft-diffusion\[xformers\]"):
        pd.set_attention(pipe, "xformers")
    assert set(pd.attention_kinds(pipe).values()) == {"classic"}


def test_pyproject_has_the_xformers_extra():
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert any(req.startswith("xformers") for req in pyproject["project"]["optional-dependencies"]["xformers"])


def test_foreign_processor_is_refused_untouched(base_pipe):
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    pipe = copy.deepcopy(base_pipe)
    layers = attention_layers(pipe.unet)
    name, layer = next((n, a) for n, a in layers if n.endswith("attn2"))
    layer.set_processor(IPAdapterAttnProcessor2_0(hidden_size=layer.inner_dim, cross_attention_dim=32))
    kinds = pd.attention_kinds(pipe)
    with pytest.raises(ValueError, match=rf"{name} \(IPAdapterAttnProcessor2_0\)"):
        pd.set_attention(pipe, "classic")
    assert pd.attention_kinds(pipe) == kinds


def test_a_model_without_attention_layers():
    with pytest.raises(ValueError, match="no diffusers attention layer"):
        pd.set_attention(torch.nn.Linear(2, 2), "sdpa")
