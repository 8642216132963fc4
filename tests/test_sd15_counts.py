"""Trainable-parameter counts on the real Stable Diffusion 1.5 U-Net, built from its config on the meta device
(nothing downloaded, no memory): LoRA against the published figure, LoHa and LoKr against lycoris-lora's own
modules on the same layers, DiffuseKronA against its closed form (LyCORIS' integer factor cannot express a
64 x 8 first factor). The adapters are the attention projections to_q / to_k / to_v / to_out.0 of the 16
transformer blocks (128 layers), what diffusers' DreamBooth LoRA script trains.

Figures (r = 4, alpha = r): LoRA 797,184; LoHa 1,594,368; LoKr (factor -1) 106,496; DiffuseKronA (64 x 8,
both factors full) 248,176.
"""
from __future__ import annotations

import pytest
import torch
from lycoris import LoConModule, LohaModule, LokrModule

import peft_diffusion as pd
from peft_diffusion.api import hosts
from peft_diffusion.methods import DiffuseKronA, LoHa, LoKr

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
ATTN = pd.Target(include=("to_q", "to_k", "to_v", "to_out.0"), within=("Attention",))


@pytest.fixture(scope="module")
def unet():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        model = UNet2DConditionModel(**SD15_UNET)
    assert sum(p.numel() for p in model.parameters()) == 859_520_964  # SD1.5's U-Net
    return model


def _count(unet, config) -> int:
    """Trainable adapter parameters of ``config`` injected on the meta U-Net (then removed again)."""
    pd.inject(unet, config, "count")
    try:
        deltas = [h.deltas["count"] for _, h in hosts(unet)]
        assert len(deltas) == 128
        assert all(p.is_meta for d in deltas for p in d.parameters()), "deltas live on the base weight's device"
        return pd.parameter_report(unet).adapters["count"]["trainable"]
    finally:
        pd.remove(unet)


def _lycoris_count(unet, module, **kwargs) -> int:
    with torch.device("meta"):
        return sum(p.numel() for site in ATTN.select(unet)
                   for p in module("lyco", unet.get_submodule(site), 1.0, **kwargs).parameters())


def test_lora_r4_is_the_known_figure(unet):
    assert _count(unet, pd.LoRA(r=4, target=ATTN)) == 797_184 == _lycoris_count(unet, LoConModule, lora_dim=4)


def test_loha_r4_equals_lycoris(unet):
    assert _count(unet, LoHa(r=4, target=ATTN)) == 1_594_368 == _lycoris_count(unet, LohaModule, lora_dim=4)


def test_lokr_default_factor_r4_equals_lycoris(unet):
    assert _count(unet, LoKr(r=4, target=ATTN)) == 106_496 == _lycoris_count(unet, LokrModule, lora_dim=4,
                                                                             factor=-1)


def test_diffusekrona_defaults(unet):
    closed_form = sum(64 * 8 + (layer.out_features // 64) * (layer.in_features // 8)
                      for layer in map(unet.get_submodule, ATTN.select(unet)))
    assert _count(unet, DiffuseKronA()) == 248_176 == closed_form  # its default target is these 128 layers
