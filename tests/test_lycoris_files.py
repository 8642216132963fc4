"""LyCORIS files against lycoris-lora itself, both directions, on the tiny U-Net (and CLIP text encoder).

Reading: a network built by lycoris-lora (``create_lycoris`` -> ``lycoris_`` keys, ``lycoris.kohya.create_network``
-> ``lora_unet_`` / ``lora_te_`` keys) with random weights, saved by LyCORIS, loads into a fresh model with
``load_adapter`` and gives LyCORIS' output. Writing: our adapter saved with format "lycoris" / "kohya" loads
with ``create_lycoris_from_weights`` / LyCORIS' kohya ``create_network_from_weights`` and gives our output.
Files of LyCORIS algorithms we do not implement are refused by name, the model untouched.
"""
from __future__ import annotations

import copy
import logging
from types import SimpleNamespace

import pytest
import torch
from lycoris import create_lycoris, create_lycoris_from_weights
from lycoris.kohya import LycorisNetworkKohya, create_network, create_network_from_weights
from lycoris.logging import logger as lycoris_logger
from safetensors.torch import load_file, save_file

import peft_diffusion as pd
import tiny
from peft_diffusion.api import hosts
from peft_diffusion.io import detect
from peft_diffusion.registry import method_config

ATOL = 1e-5
lycoris_logger.setLevel(logging.ERROR)
LoHa, LoKr = method_config("loha"), method_config("lokr")


def randomize(net, std: float, seed: int = 0) -> None:
    """Every LyCORIS parameter N(0, std^2): up / w2 factors are zero at init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def config_of(model):
    return next(h.deltas[n].config for _, h in hosts(model) for n in h.deltas)


@pytest.fixture
def kohya_network(monkeypatch):
    """LyCORIS' kohya network class with its target lists restored after the test (presets set them on the
    class). Its default U-Net targets name ``time_embedding.linear_1`` twice on a diffusers U-Net (by the
    TimestepEmbedding class and by name), which its own duplicate check rejects: the names are dropped."""
    for attr in ("ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE", "TEXT_ENCODER_TARGET_REPLACE_MODULE",
                 "TEXT_ENCODER_TARGET_REPLACE_NAME"):
        monkeypatch.setattr(LycorisNetworkKohya, attr, getattr(LycorisNetworkKohya, attr))
    monkeypatch.setattr(LycorisNetworkKohya, "UNET_TARGET_REPLACE_NAME", [])
    return LycorisNetworkKohya


# ---------------------------------------------------------------- LyCORIS' files into ours

READ = {  # id -> (algo, create_lycoris settings, weight std)
    "locon": ("lora", dict(linear_dim=2, linear_alpha=3, conv_dim=3, conv_alpha=1.5), 0.1),
    "locon-tucker": ("lora", dict(linear_dim=2, linear_alpha=4, conv_dim=3, conv_alpha=2, use_tucker=True), 0.1),
    "loha": ("loha", dict(linear_dim=2, linear_alpha=3), 0.2),
    "loha-tucker": ("loha", dict(linear_dim=2, linear_alpha=3, conv_dim=3, use_tucker=True), 0.2),
    "lokr": ("lokr", dict(linear_dim=2, linear_alpha=3), 0.2),  # W1 full, W2 low-rank
    "lokr-some-full": ("lokr", dict(linear_dim=8, linear_alpha=3), 0.1),  # small layers: both full, scale 1
    "lokr-decompose-both": ("lokr", dict(linear_dim=1, linear_alpha=3, decompose_both=True, factor=8), 0.3),
    "lokr-factor-4": ("lokr", dict(linear_dim=2, linear_alpha=3, factor=4), 0.2),
    "lokr-full-matrix": ("lokr", dict(linear_dim=2, linear_alpha=3, full_matrix=True), 0.1),
    "lokr-unbalanced": ("lokr", dict(linear_dim=2, linear_alpha=3, unbalanced_factorization=True), 0.2),
    "lokr-tucker": ("lokr", dict(linear_dim=2, linear_alpha=3, conv_dim=2, conv_alpha=1, use_tucker=True), 0.2),
}


@pytest.mark.parametrize("case", READ)
def test_lycoris_file_loads_like_lycoris(case, unet, tmp_path):
    algo, settings, std = READ[case]
    inputs = tiny.unet_inputs()
    base = tiny.run(unet, inputs)
    theirs = copy.deepcopy(unet)
    net = create_lycoris(theirs, 1.0, algo=algo, **settings)
    net.apply_to()
    randomize(net, std)
    expected = tiny.run(theirs, inputs)
    assert (expected - base).abs().max() > 1e-2  # the adapter does something
    path = tmp_path / "lyco.safetensors"
    net.save_weights(str(path), torch.float32, None)
    assert detect(*pd.io.read_file(path)) == "lycoris"

    name = pd.load_adapter(unet, path)
    torch.testing.assert_close(tiny.run(unet, inputs), expected, atol=ATOL, rtol=0)
    assert len(list(hosts(unet))) == len(net.loras) == 83  # every Linear and Conv2d of the tiny U-Net
    cfg = config_of(unet)
    assert cfg.method == {"lora": "lora", "loha": "loha", "lokr": "lokr"}[algo]
    if case == "locon":  # ranks and alphas per layer kind, as LyCORIS' linear / conv settings
        assert (cfg.rank("conv_in"), cfg.scale("conv_in")) == (3, 0.5)
        assert (cfg.rank("time_embedding.linear_1"), cfg.scale("time_embedding.linear_1")) == (2, 1.5)
    if case == "lokr-factor-4":
        assert cfg.factor == 4 and not cfg.factor_pattern
    pd.remove(unet, name)
    torch.testing.assert_close(tiny.run(unet, inputs), base, atol=0, rtol=0)


@pytest.mark.parametrize("encoders", [1, 2])
def test_kohya_named_lycoris_file_with_text_encoders(encoders, unet, make_model, tmp_path, kohya_network):
    """LyCORIS' sd-scripts network (LoHa; ``lora_unet_`` and ``lora_te_``, or SDXL's ``lora_te1_`` /
    ``lora_te2_`` keys) into a U-Net with one or two CLIP text encoders."""
    ids, inputs = tiny.clip_text_inputs()["input_ids"], tiny.unet_inputs()
    names = ["text_encoder", "text_encoder_2"][:encoders]

    def outputs(tes, u):
        with torch.no_grad():
            return [te(ids)[0] for te in tes] + [u(**inputs).sample]

    encs = [make_model("clip-text") for _ in names]
    tes, u = [copy.deepcopy(te) for te in encs], copy.deepcopy(unet)
    net = create_network(1.0, 2, 3, None, tes if encoders == 2 else tes[0], u, algo="loha", preset="attn-mlp")
    net.apply_to(tes if encoders == 2 else tes[0], u, apply_text_encoder=True, apply_unet=True)
    randomize(net, 0.2)
    expected = outputs(tes, u)
    path = tmp_path / "kohya-loha.safetensors"
    net.save_weights(str(path), torch.float32, {})
    prefixes = {k.split("_", 2)[1] for k in load_file(path)}
    assert prefixes == ({"unet", "te"} if encoders == 1 else {"unet", "te1", "te2"})

    pd.load_adapter(SimpleNamespace(components={"unet": unet, **dict(zip(names, encs))}), path)
    for got, want in zip(outputs(encs, unet), expected):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


# ---------------------------------------------------------------- our files into LyCORIS

WRITE = {
    "lora": pd.LoRA(r=4, alpha=6, rank_pattern={"attn2.to_k": 2}, alpha_pattern={"attn1.to_q": 1.0}, target="unet-all"),
    "lora-rslora": pd.LoRA(r=2, alpha=3, rslora=True, target="unet-all"),
    "loha": LoHa(r=2, alpha=3, rank_pattern={"conv1": 3}, alpha_pattern={"to_v": 1.0}, target="unet-all"),
    "loha-tucker": LoHa(r=2, alpha=3, use_tucker=True, target="unet-all"),
    "lokr": LoKr(r=2, alpha=3, target="unet-all"),
    "lokr-some-full": LoKr(r=8, alpha=3, rank_pattern={"to_q": 2}, target="unet-all"),
    "lokr-decompose-both": LoKr(r=2, alpha=3, decompose_both=True, factor=8, target="unet-all"),
    "lokr-factor-4": LoKr(r=2, alpha=3, factor=4, target="unet-all"),
}


@pytest.mark.parametrize("fmt", ["lycoris", "kohya"])
@pytest.mark.parametrize("case", WRITE)
def test_our_file_loads_in_lycoris(case, fmt, unet, tmp_path, kohya_network):
    inputs = tiny.unet_inputs()
    base = tiny.run(unet, inputs)
    pristine = copy.deepcopy(unet)
    pd.inject(unet, WRITE[case], "mine")
    tiny.perturb_trainable(unet, std=0.1)
    expected = tiny.run(unet, inputs)
    assert (expected - base).abs().max() > 1e-2
    path = pd.save_adapter(unet, tmp_path / f"{case}.safetensors", "mine", format=fmt)
    keys = load_file(path)
    assert all(k.startswith("lycoris_" if fmt == "lycoris" else "lora_unet_") for k in keys)
    assert detect(*pd.io.read_file(path)) == ("kohya" if fmt == "kohya" and case.startswith("lora") else "lycoris")

    theirs = copy.deepcopy(pristine)
    if fmt == "lycoris":
        net, _ = create_lycoris_from_weights(1.0, str(path), theirs)
        net.apply_to()
    else:
        net, _ = create_network_from_weights(1.0, str(path), None, None, theirs)
        net.apply_to(None, theirs, apply_text_encoder=False, apply_unet=True)
    assert len(net.loras) == len(list(hosts(unet)))
    torch.testing.assert_close(tiny.run(theirs, inputs), expected, atol=ATOL, rtol=0)

    again = copy.deepcopy(pristine)  # and back into ours
    pd.load_adapter(again, path)
    torch.testing.assert_close(tiny.run(again, inputs), expected, atol=ATOL, rtol=0)


def test_text_encoder_and_unet_in_one_file(unet, text_encoder, tmp_path):
    """A pipeline's LoKr on U-Net and text encoder: kohya prefixes, A1111's ``text_model`` names, both
    "lycoris" and "kohya" (which are then the same layout) load back to the same outputs."""
    pipe = SimpleNamespace(components={"unet": unet, "text_encoder": text_encoder})
    pd.inject(pipe, LoKr(r=2, alpha=4), "mine")
    pd.inject(pipe, LoKr(r=2, alpha=2, factor=4), "mine", components=("text_encoder",))
    tiny.perturb_trainable(unet, std=0.1)
    tiny.perturb_trainable(text_encoder, std=0.1)
    ids, inputs = tiny.clip_text_inputs()["input_ids"], tiny.unet_inputs()
    with torch.no_grad():
        expected = text_encoder(ids)[0], tiny.run(unet, inputs)
    for fmt in ("lycoris", "kohya"):
        path = pd.save_adapter(pipe, tmp_path / f"{fmt}.safetensors", "mine", format=fmt)
        keys = load_file(path)
        assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lokr_") for k in keys)
        assert all(k.startswith(("lora_te_", "lora_unet_")) for k in keys)
        te, u = tiny.tiny_clip_text(), tiny.tiny_unet()
        pd.load_adapter(SimpleNamespace(components={"unet": u, "text_encoder": te}), path)
        with torch.no_grad():
            torch.testing.assert_close(te(ids)[0], expected[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(tiny.run(u, inputs), expected[1], atol=ATOL, rtol=0)


# ---------------------------------------------------------------- what we refuse

UNSUPPORTED = {  # id -> (algo, settings, the name the error must give)
    "diag-oft": ("diag-oft", {}, "Diag-OFT"),
    "boft": ("boft", {}, "BOFT"),
    "ia3": ("ia3", {}, "IA3"),
    "full": ("full", {}, "full fine-tuning"),
    "glora": ("glora", {}, "GLoRA"),
    "dora": ("lora", {"dora_wd": True}, "DoRA"),
    "norms": ("lora", {"train_norm": True}, "norm-layer tuning"),
}


@pytest.mark.parametrize("case", UNSUPPORTED)
def test_unsupported_algorithm_is_named_and_model_untouched(case, unet, tmp_path):
    algo, settings, label = UNSUPPORTED[case]
    net = create_lycoris(copy.deepcopy(unet), 1.0, linear_dim=4, linear_alpha=1, algo=algo, **settings)
    net.apply_to()
    path = tmp_path / f"{case}.safetensors"
    net.save_weights(str(path), torch.float32, None)
    types, state = tiny.module_types(unet), tiny.snapshot(unet)
    with pytest.raises(pd.io.AdapterFileError, match=label) as err:
        pd.load_adapter(unet, path)
    assert "['lycoris_conv_" in str(err.value)  # the keys that revealed it
    assert tiny.module_types(unet) == types and not list(hosts(unet))
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in state.items())


def test_mixed_algorithms_and_incomplete_modules_are_refused(unet, tmp_path):
    g = torch.Generator().manual_seed(0)
    loha = {f"hada_{n}": torch.randn(32, 2, generator=g) for n in ("w1_a", "w2_a")}
    loha.update({f"hada_{n}": torch.randn(2, 32, generator=g) for n in ("w1_b", "w2_b")})
    stem = "lycoris_down_blocks_0_attentions_0_transformer_blocks_0_attn1_"
    mixed = {f"{stem}to_q.{k}": v for k, v in loha.items()}
    mixed.update({f"{stem}to_k.lora_down.weight": torch.randn(2, 32, generator=g),
                  f"{stem}to_k.lora_up.weight": torch.randn(32, 2, generator=g)})
    save_file(mixed, tmp_path / "mixed.safetensors")
    state = tiny.snapshot(unet)
    with pytest.raises(pd.io.AdapterFileError, match="mixes LyCORIS algorithms"):
        pd.load_adapter(unet, tmp_path / "mixed.safetensors")
    partial = {f"{stem}to_q.{k}": v for k, v in loha.items() if k != "hada_w2_b"}
    save_file(partial, tmp_path / "partial.safetensors")
    with pytest.raises(pd.io.AdapterFileError, match="lacks.*hada_w2_b"):
        pd.load_adapter(unet, tmp_path / "partial.safetensors")
    assert not list(hosts(unet)) and all(torch.equal(unet.state_dict()[k], v) for k, v in state.items())
