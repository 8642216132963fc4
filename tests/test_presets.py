"""Presets select exactly the expected modules of the real (tiny) models; Target and default_target semantics."""
from __future__ import annotations

import dataclasses

import pytest
from torch import nn

from peft_diffusion import LoRA, inject
from peft_diffusion.core import Host
from peft_diffusion.presets import DEFAULT_PRESET, PRESETS, default_target, preset
from peft_diffusion.target import Target, lookup, name_matches

# ---------------------------------------------------------------- expected selections, written out by hand

# tiny U-Net: CrossAttnDownBlock2D (1 transformer), mid block (1), CrossAttnUpBlock2D (layers_per_block+1 = 2)
_UNET_TRANSFORMERS = ("down_blocks.0.attentions.0", "mid_block.attentions.0",
                      "up_blocks.1.attentions.0", "up_blocks.1.attentions.1")
_PROJ = ("to_q", "to_k", "to_v", "to_out.0")


def _attn(prefixes, attns=("attn1", "attn2"), projs=_PROJ):
    return {f"{p}.transformer_blocks.0.{a}.{m}" for p in prefixes for a in attns for m in projs}


def _ff(prefixes):
    return {f"{p}.transformer_blocks.0.{m}" for p in prefixes for m in ("ff.net.0.proj", "ff.net.2")}


_UNET_RESNET_CONVS = {
    "down_blocks.0.resnets.0.conv1", "down_blocks.0.resnets.0.conv2",
    "down_blocks.1.resnets.0.conv1", "down_blocks.1.resnets.0.conv2", "down_blocks.1.resnets.0.conv_shortcut",
    "mid_block.resnets.0.conv1", "mid_block.resnets.0.conv2", "mid_block.resnets.1.conv1", "mid_block.resnets.1.conv2",
} | {f"up_blocks.{b}.resnets.{r}.{c}" for b in (0, 1) for r in (0, 1) for c in ("conv1", "conv2", "conv_shortcut")}
_UNET_PROJ_IO = {f"{p}.{m}" for p in _UNET_TRANSFORMERS for m in ("proj_in", "proj_out")}

_DIT_BLOCKS = ("transformer_blocks.0", "transformer_blocks.1")


def _blocks(blocks, names):
    return {f"{b}.{n}" for b in blocks for n in names}


_CLIP_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
_CLIP_LAYERS = ("encoder.layers.0", "encoder.layers.1")  # transformers 5.x: CLIPTextModel has no .text_model

# preset -> (tiny model key, exact set of selected qualified names)
EXPECTED = {
    "unet-attn": ("unet", _attn(_UNET_TRANSFORMERS)),
    "unet-attn-ff": ("unet", _attn(_UNET_TRANSFORMERS) | _ff(_UNET_TRANSFORMERS)),
    "unet-all": ("unet", _attn(_UNET_TRANSFORMERS) | _ff(_UNET_TRANSFORMERS) | _UNET_RESNET_CONVS | _UNET_PROJ_IO),
    "unet-cross-attn": ("unet", _attn(_UNET_TRANSFORMERS, attns=("attn2",))),
    "dit": ("pixart", _blocks(_DIT_BLOCKS, [f"{a}.{m}" for a in ("attn1", "attn2") for m in _PROJ]
                              + ["ff.net.0.proj", "ff.net.2"])),
    "clip-text": ("clip-text", _blocks(_CLIP_LAYERS, _CLIP_ATTN)),
    "clip-text-mlp": ("clip-text", _blocks(_CLIP_LAYERS, _CLIP_ATTN + ("mlp.fc1", "mlp.fc2"))),
    "clip-vision": ("clip-vision", _blocks(_CLIP_LAYERS, _CLIP_ATTN)),
    "clip": ("clip", _blocks([f"{t}.{layer}" for t in ("text_model", "vision_model") for layer in _CLIP_LAYERS],
                             _CLIP_ATTN)),
    "t5-encoder": ("t5", _blocks(("encoder.block.0.layer.0", "encoder.block.1.layer.0"),
                                 [f"SelfAttention.{m}" for m in "qkvo"])),
    "bert": ("bert", _blocks(("encoder.layer.0", "encoder.layer.1"),
                             ("attention.self.query", "attention.self.key", "attention.self.value",
                              "attention.output.dense"))),
    "llama": ("llama", _blocks(("model.layers.0", "model.layers.1"),
                               ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))),
    "gpt2": ("gpt2", _blocks(("transformer.h.0", "transformer.h.1"),
                             ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))),
}
EXPECTED_COUNTS = {"unet-attn": 32, "unet-attn-ff": 40, "unet-all": 69, "unet-cross-attn": 16, "dit": 20,
                   "clip-text": 8, "clip-text-mlp": 12, "clip-vision": 8, "clip": 16, "t5-encoder": 8, "bert": 8, "llama": 14,
                   "gpt2": 8}


def test_every_preset_has_an_expectation():
    assert set(EXPECTED) == set(PRESETS), "add the new preset to EXPECTED (and EXPECTED_COUNTS) in this file"
    assert set(EXPECTED_COUNTS) == set(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_selects_expected_modules(name, make_model):
    key, expected = EXPECTED[name]
    model = make_model(key)
    found = preset(name).select(model)
    assert len(found) == len(set(found)) == EXPECTED_COUNTS[name] == len(expected)
    assert set(found) == expected, (sorted(set(found) - expected), sorted(expected - set(found)))
    order = [n for n, _ in model.named_modules()]
    assert found == sorted(found, key=order.index), "select returns names in model order"


def test_unet_all_selects_convs_of_both_kernels_and_leaves_the_rest(make_model):
    unet = make_model("unet")
    found = PRESETS["unet-all"].select(unet)
    kernels = {unet.get_submodule(n).kernel_size for n in found if isinstance(unet.get_submodule(n), nn.Conv2d)}
    assert kernels == {(1, 1), (3, 3)}
    for never in ("conv_in", "conv_out", "time_embedding.linear_1", "down_blocks.0.downsamplers.0.conv",
                  "down_blocks.0.resnets.0.time_emb_proj"):
        assert never not in found


def test_gpt2_preset_picks_the_transposed_conv1d_layers(make_model):
    from transformers.pytorch_utils import Conv1D

    model = make_model("gpt2")
    found = PRESETS["gpt2"].select(model)
    assert all(isinstance(model.get_submodule(n), Conv1D) for n in found)
    assert "lm_head" not in found


def test_dit_preset_on_dit_transformer(make_model):
    model = make_model("dit")  # DiT blocks have self-attention only (no attn2)
    found = set(PRESETS["dit"].select(model))
    assert found == _blocks(_DIT_BLOCKS, [f"attn1.{m}" for m in _PROJ] + ["ff.net.0.proj", "ff.net.2"])
    assert not any("norm1" in n or "proj_out" in n for n in found)


# ---------------------------------------------------------------- default_target

DEFAULTS = {"unet": "unet-attn", "pixart": "dit", "dit": "dit", "clip-text": "clip-text",
            "clip-vision": "clip-vision", "clip": "clip", "t5": "t5-encoder", "bert": "bert", "llama": "llama", "gpt2": "gpt2"}


@pytest.mark.parametrize("key", sorted(DEFAULTS))
def test_default_target_per_model_class(key, make_model):
    model = make_model(key)
    assert default_target(model) == PRESETS[DEFAULTS[key]]
    assert DEFAULT_PRESET[type(model).__name__] == DEFAULTS[key]


def test_default_target_follows_subclasses(make_model):
    unet = make_model("unet")
    sub = type("MyUNet", (type(unet),), {})
    unet.__class__ = sub  # a user subclass of UNet2DConditionModel
    assert default_target(unet) == PRESETS["unet-attn"]


def test_config_without_target_uses_default(make_model):
    model = make_model("gpt2")
    inject(model, LoRA(r=2))
    hosted = sorted(n for n, m in model.named_modules() if isinstance(m, Host))
    assert hosted == sorted(EXPECTED["gpt2"][1])


def test_no_default_target_raises_with_known_models():
    with pytest.raises(ValueError, match="no default target for Sequential.*UNet2DConditionModel"):
        default_target(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="no default target"):
        inject(nn.Sequential(nn.Linear(2, 2)), LoRA(r=2))


def test_unknown_preset_raises_listing_known():
    with pytest.raises(KeyError, match="unknown preset 'nope'.*unet-attn"):
        preset("nope")
    with pytest.raises(KeyError, match="unknown preset"):
        LoRA(target="nope")


def test_unknown_type_raises():
    # LayerNorm is a fine target for methods on modules or parameters, not for a leaf-layer method
    with pytest.raises(ValueError, match="not supported layer types"):
        inject(nn.Sequential(nn.LayerNorm(2)), LoRA(r=2, target=Target(types=("LayerNorm",))))
    with pytest.raises(TypeError, match="target must be"):
        LoRA(target=42)


def test_presets_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["unet-attn"].include = ()


# ---------------------------------------------------------------- Target semantics on a hand-made tree

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = nn.Linear(4, 4)
        self.to_kv = nn.Linear(4, 4)
        self.conv = nn.Conv2d(4, 4, 1)


class MyLinear(nn.Linear):
    pass


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()
        self.other = nn.Module()
        self.other.to_q = nn.Linear(4, 4)
        self.other.q = MyLinear(4, 4)
        self.head = nn.Linear(4, 4)


def test_target_empty_include_takes_every_module_of_the_types():
    assert Target().select(Toy()) == ["block.to_q", "block.to_kv", "other.to_q", "other.q", "head"]
    assert Target(types=("Conv2d",)).select(Toy()) == ["block.conv"]
    assert Target(types=("Linear", "Conv2d")).select(Toy()) == [
        "block.to_q", "block.to_kv", "block.conv", "other.to_q", "other.q", "head"]


def test_target_types_follow_inheritance():
    assert "other.q" in Target(include=("q",)).select(Toy())  # MyLinear is a Linear


def test_target_include_is_dotted_suffix_or_full_regex():
    toy = Toy()
    assert Target(include=("to_q",)).select(toy) == ["block.to_q", "other.to_q"]
    assert Target(include=("block.to_q",)).select(toy) == ["block.to_q"]
    assert Target(include=("q",)).select(toy) == ["other.q"]  # not a substring match: "to_q" is not ".q"
    assert Target(include=("o_q",)).select(toy) == []
    assert Target(include=(r"block\.to_.*",)).select(toy) == ["block.to_q", "block.to_kv"]
    # a regex matches the whole name or a dotted suffix of it, never a part of a name segment
    assert Target(include=(r"to_.*",)).select(toy) == ["block.to_q", "block.to_kv", "other.to_q"]
    assert Target(include=(r"o_.*",)).select(toy) == []
    assert Target(include=(r"other\.(to_)?q",)).select(toy) == ["other.to_q", "other.q"]
    assert Target(include="head").include == ("head",)  # a string becomes a 1-tuple


def test_target_exclude_wins_over_include():
    toy = Toy()
    assert Target(include=("to_q", "to_kv"), exclude=("other.to_q",)).select(toy) == ["block.to_q", "block.to_kv"]
    assert Target(exclude=(r".*to_.*",)).select(toy) == ["other.q", "head"]


def test_target_within_requires_an_ancestor_class():
    toy = Toy()
    assert Target(within=("Block",)).select(toy) == ["block.to_q", "block.to_kv"]
    assert Target(within=("Block",), types=("Conv2d",)).select(toy) == ["block.conv"]
    assert Target(within=("Toy",)).select(toy) == Target().select(toy)  # the root counts as an ancestor
    assert Target(within=("Linear",)).select(toy) == []  # a module is not its own ancestor


def test_target_counts_a_host_as_its_base_and_does_not_look_inside():
    toy = Toy()
    inject(toy, LoRA(r=2, target=Target(include=("to_q",))), "a")
    assert isinstance(toy.block.to_q, Host)
    assert Target(include=("to_q",)).select(toy) == ["block.to_q", "other.to_q"]
    assert Target().select(toy) == ["block.to_q", "block.to_kv", "other.to_q", "other.q", "head"]  # no lora_A/B


def test_target_dict_round_trip():
    t = Target(include=("a",), exclude=("b",), types=("Linear", "Conv2d"), within=("Block",))
    assert Target.from_dict(t.to_dict()) == t
    assert LoRA(target=t.to_dict()).target == t


def test_lookup_longest_match_wins():
    patterns = {"to_q": 1, r".*attn2\.to_q": 2, "attn1.to_q": 3}
    assert lookup(patterns, "x.attn2.to_q", 0) == 2
    assert lookup(patterns, "x.attn1.to_q", 0) == 3
    assert lookup(patterns, "x.attn3.to_q", 0) == 1
    assert lookup(patterns, "x.to_k", 0) == 0
    assert name_matches("to_out.0", "a.to_out.0") and not name_matches("to_out.0", "a.to_out.01")
    assert not name_matches("to_out.0", "a.xto_out.0")
