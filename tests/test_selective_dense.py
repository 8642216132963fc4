"""The dense selective methods (partial fine-tuning, BitFit, LN tuning, DiffFit) beyond the contract matrix:

- trainable counts on the real architectures, built from their configs on the meta device, against an
  independent count of the same parameters and the papers' figures (BERT-base/large, SD1.5's U-Net, DiT-XL/2);
- peers: peft's ``LNTuningConfig`` and ``LoraConfig(bias="all")`` train the same set as LN tuning / BitFit on
  a tiny BERT and, given the same values, compute the same outputs;
- DiffFit's fuse over a layer that holds both a bias delta and a gamma, adapter weights, and bad inputs
  (clear errors naming what is wrong, the model untouched); diffusers' format refuses these methods.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tiny
import peft_diffusion as pd
from peft_diffusion import BitFit, DiffFit, LNTuning, PartialFT, Target
from peft_diffusion.api import sites
from test_sd15_counts import SD15_UNET

# DiT-XL/2 (Peebles & Xie, arXiv 2212.09748) as diffusers' DiTTransformer2DModel: 28 layers, 16 heads x 72,
# patch 2, 32x32x4 latents, 1000 classes, learned sigma (8 output channels)
DIT_XL_2 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
                norm_elementwise_affine=False)
BERT_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)


def _count(model, config) -> int:
    pd.inject(model, config, "count")
    try:
        assert all(p.is_meta for _, s in sites(model) for p in s.deltas.parameters())
        return pd.parameter_report(model).adapters["count"]["trainable"]
    finally:
        pd.remove(model)


def _meta(build):
    with torch.device("meta"):
        return build()


def _bert(**kw):
    from transformers import BertConfig, BertModel
    return _meta(lambda: BertModel(BertConfig(**kw)))


def _biases(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias")


# ---------------------------------------------------------------- counts on real architectures


@pytest.mark.parametrize("kw, total, expected, paper", [({}, 109_482_240, 102_912, 0.09),
                                                        (BERT_LARGE, 335_141_888, 272_384, 0.08)])
def test_bitfit_bert_counts_match_the_paper(kw, total, expected, paper):
    """BitFit (Table 1): 0.09 % of BERT-base, 0.08 % of BERT-large."""
    model = _bert(**kw)
    assert sum(p.numel() for p in model.parameters()) == total
    assert _count(model, BitFit()) == _biases(model) == expected
    assert round(100 * expected / total, 2) == paper


def test_ln_tuning_bert_base_equals_peft():
    from peft import LNTuningConfig, get_peft_model

    ours = _count(_bert(), LNTuning())
    theirs, _ = get_peft_model(_bert(), LNTuningConfig(target_modules=["LayerNorm"])).get_nb_trainable_parameters()
    independent = sum(p.numel() for m in _bert().modules() if isinstance(m, nn.LayerNorm) for p in m.parameters())
    assert ours == theirs == independent == 38_400  # 25 LayerNorms x (768 + 768)


def _gamma_channels(model) -> int:
    """Output channels of every residual branch's last layer, found from diffusers' block classes."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    n = 0
    for m in model.modules():
        if isinstance(m, BasicTransformerBlock):
            n += sum(a.to_out[0].out_features for a in (m.attn1, m.attn2) if a is not None)
            n += m.ff.net[2].out_features
        elif isinstance(m, ResnetBlock2D):
            n += m.conv2.out_channels
    return n


def _norm_weights(model) -> int:
    return sum(m.weight.numel() for m in model.modules()
               if isinstance(m, (nn.GroupNorm, nn.LayerNorm)) and m.weight is not None)


def test_difffit_sd15_unet_count():
    from diffusers import UNet2DConditionModel

    unet = _meta(lambda: UNet2DConditionModel(**SD15_UNET))
    biases, norms, gammas = _biases(unet), _norm_weights(unet), _gamma_channels(unet)
    assert (biases, norms, gammas) == (343_684, 100_160, 57_600)
    assert _count(unet, DiffFit()) == biases + norms + gammas == 501_444  # 0.058 % of 859,520,964
    assert _count(unet, DiffFit(gamma=False)) == biases + norms  # no class embedding in SD1.5


def test_difffit_dit_xl_2_count_against_the_paper():
    """The paper reports 0.83 M trainable (0.12 %) on DiT-XL/2 (675 M). DiT's norms are affine-free, so
    DiffFit is its biases, 2 gammas x 1152 per block, and the class table. diffusers' layout keeps a copy of
    the timestep MLP and of the 1001 x 1152 class table in every block (the original shares one), so:
    biases 551,840 here = 489,632 in the original layout + 27 copies x 2,304 timestep-MLP biases; gammas
    28 x 2 x 1152 = 64,512; class tables 28 x 1,153,152. Without the tables ours is 616,352 (0.082 % of
    749,826,464), 554,144 in the original layout (0.082 % of 675 M); the paper's remaining ~0.28 M is of the
    size of one downstream dataset's class table (1152 per class), which its figure includes; see the README."""
    from diffusers import DiTTransformer2DModel

    dit = _meta(lambda: DiTTransformer2DModel(**DIT_XL_2))
    total = sum(p.numel() for p in dit.parameters())
    biases, gammas = _biases(dit), _gamma_channels(dit)
    tables = sum(m.embedding_table.weight.numel() for m in dit.modules() if type(m).__name__ == "LabelEmbedding")
    assert (total, biases, gammas, tables) == (749_826_464, 551_840, 64_512, 28 * 1001 * 1152)
    assert _norm_weights(dit) == 0
    no_tables = _count(dit, DiffFit(embeddings=False))
    assert no_tables == biases + gammas == 616_352
    assert _count(dit, DiffFit()) == no_tables + tables
    original_layout = no_tables - 27 * 2 * 1152
    assert original_layout == 554_144 and round(100 * original_layout / 675e6, 3) == 0.082


# ---------------------------------------------------------------- peers: peft on a tiny BERT


def _peft_name(n: str) -> str:
    for part in ("base_model.model.", ".ln_tuning_layers.default", ".base_layer"):
        n = n.replace(part, "")
    return n


def _load_peer(ours, peft_model, names: dict[str, torch.Tensor]) -> None:
    """Give our deltas the values the peer's trainable tensors hold (delta = theirs - base)."""
    with torch.no_grad():
        for q, site in sites(ours):
            site.deltas["peer"].delta.copy_(names[q] - site.tensor)


@pytest.mark.parametrize("peer", ["ln-tuning", "bias-all"])
def test_peft_peers_train_the_same_set_and_compute_the_same(peer):
    from peft import LNTuningConfig, LoraConfig, get_peft_model

    base, inputs = tiny.tiny_bert(), tiny.token_inputs()
    if peer == "ln-tuning":
        theirs = get_peft_model(copy.deepcopy(base), LNTuningConfig(target_modules=["LayerNorm"]))
        config = LNTuning()
    else:  # LoRA's B starts at zero: with its biases trained, this peft model is BitFit (+ an idle LoRA)
        theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["query"], bias="all"))
        config = BitFit()
    trained = {_peft_name(n): p for n, p in theirs.named_parameters() if p.requires_grad and "lora_" not in n}
    ours = pd.inject(copy.deepcopy(base), config, "peer")
    assert {q for q, _ in sites(ours)} == set(trained)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in trained.values():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    _load_peer(ours, theirs, {q: p.detach() for q, p in trained.items()})
    expected = tiny.run(theirs, inputs)
    assert not torch.allclose(expected, tiny.run(base, inputs), atol=1e-4)
    torch.testing.assert_close(tiny.run(ours, inputs), expected, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- DiffFit: fuse, weights


def test_difffit_fuse_over_bias_and_gamma_of_one_layer(make_model):
    model, inputs = make_model("unet"), tiny.unet_inputs()
    state = tiny.snapshot(model)
    pd.inject(model, DiffFit(), "d")
    layer = model.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0")
    assert {type(s).__name__ for s in layer.children()} == {"ParamSite", "Annex"}  # bias delta + gamma
    tiny.perturb_trainable(model, std=0.2)
    out = tiny.run(model, inputs)
    for exact in (True, False):
        pd.fuse(model, exact=exact)
        torch.testing.assert_close(tiny.run(model, inputs), out, atol=1e-5, rtol=1e-5)
        pd.unfuse(model)
        for k, v in state.items():
            if exact:
                assert torch.equal(model.state_dict()[k], v), k
            else:
                torch.testing.assert_close(model.state_dict()[k], v, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(tiny.run(model, inputs), out, atol=1e-6, rtol=0)


def test_difffit_gamma_with_a_zero_unfuses_only_exactly(make_model):
    model, inputs = make_model("dit"), tiny.dit_inputs()
    pd.inject(model, DiffFit(), "d")
    gamma = next(s.deltas["d"] for _, s in sites(model) if s.kind == "annex")
    with torch.no_grad():
        gamma.gamma[0] = 0.0
    pd.fuse(model)
    with pytest.raises(RuntimeError, match=rf"gamma at {gamma.site} holds zeros.*exact=True"):
        pd.unfuse(model)


def test_adapter_weight_scales_deltas_and_gamma_minus_one(make_model):
    """Weight w: p + w d, and 1 + w (g - 1): the same as weight 1 with d and g moved by w."""
    model, inputs = make_model("pixart"), tiny.pixart_inputs()
    pd.inject(model, DiffFit(), "d")
    tiny.perturb_trainable(model, std=0.2)
    half = copy.deepcopy(model)
    with torch.no_grad():
        for _, site in sites(half):
            delta = site.deltas["d"]
            if hasattr(delta, "gamma"):
                delta.gamma.copy_(1 + 0.5 * (delta.gamma - 1))
            else:
                delta.delta.mul_(0.5)
    pd.set_adapters(model, {"d": 0.5})
    torch.testing.assert_close(tiny.run(model, inputs), tiny.run(half, inputs), atol=1e-6, rtol=1e-6)
    pd.set_adapters(model, {"d": 0.0})
    base = tiny.run(make_model("pixart"), inputs)
    torch.testing.assert_close(tiny.run(model, inputs), base, atol=1e-6, rtol=0)


def test_partial_ft_blocks_and_patterns(make_model):
    model = make_model("unet")
    pd.inject(model, PartialFT(blocks=("up_blocks.1.attentions.0",), target=Target(include=(r".*\.weight",), types=())))
    names = [q for q, _ in sites(model)]
    assert names and all(q.startswith("up_blocks.1.attentions.0.") and q.endswith(".weight") for q in names)
    under = {n for n, _ in make_model("unet").named_parameters()
             if n.startswith("up_blocks.1.attentions.0.") and n.endswith(".weight")}
    assert set(names) == under


# ---------------------------------------------------------------- bad input: clear errors, model untouched


def _t(*include):
    return Target(include=include, types=())


BAD = [
    ("unet", BitFit(target=_t(r".*nowhere\.bias")), r"matches no parameter of UNet2DConditionModel"),
    ("unet", PartialFT(blocks=("up_blocks.9",)), r"blocks \['up_blocks.9'\] are not modules"),
    ("unet", PartialFT(), r"needs what to train"),
    ("dit", LNTuning(), r"DiTTransformer2DModel has no LayerNorm, GroupNorm or RMSNorm layer with parameters"),
    ("unet", DiffFit(target=_t(r".*attn1\.to_q\.weight")),
     r"down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn1\.to_q\.weight \(Linear\.weight\) is none of"),
    ("unet", DiffFit(gamma_target=Target(include=("norm1",), types=())), r"transformer_blocks\.0\.norm1 is a LayerNorm"),
    ("unet", DiffFit(gamma_target=Target(include=("nothing",), types=())), r"gamma_target .* matches no layer"),
    ("t5", DiffFit(), r"gammas go on the layers .* this T5EncoderModel has none"),
    ("unet", DiffFit(target=_t(r".*nowhere\.bias")), r"DiffFit target .* matches no parameter"),
]


@pytest.mark.parametrize("key, config, message", BAD, ids=[f"{k}-{c.method}-{i}" for i, (k, c, _) in enumerate(BAD)])
def test_bad_input_errors_and_leaves_the_model(key, config, message, make_model):
    model = make_model(key)
    types, state, hooks = tiny.module_types(model), tiny.snapshot(model), tiny.hooks_and_processors(model)
    with pytest.raises(ValueError, match=message):
        pd.inject(model, config, "bad")
    assert tiny.module_types(model) == types and tiny.hooks_and_processors(model) == hooks
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_model_without_bias_or_norm():
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    with pytest.raises(ValueError, match="finds no bias, normalisation-layer parameter or class embedding in this "
                                         "Sequential, and no gamma layer"):
        pd.inject(model, DiffFit(gamma=False))
    with pytest.raises(ValueError, match="BitFit trains bias terms and this Sequential has no bias parameter"):
        pd.inject(model, BitFit())
    assert not list(sites(model))


@pytest.mark.parametrize("config", [BitFit(), LNTuning(), DiffFit(), PartialFT(blocks=("up_blocks.1",))])
def test_diffusers_format_refuses_with_a_clear_message(config, make_model, tmp_path):
    model = pd.inject(make_model("unet"), config, "a")
    with pytest.raises(ValueError, match=rf"hold LoRA or DoRA only, not '{config.method}'.*format='native'"):
        pd.save_adapter(model, tmp_path / "a.safetensors", "a", format="diffusers")
    assert not (tmp_path / "a.safetensors").exists()
    assert pd.load_adapter(make_model("unet"), pd.save_adapter(model, tmp_path / "n.safetensors", "a")) == "a"
