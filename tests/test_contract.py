"""The contract every registered method keeps (ARCHITECTURE.md, "House rules").

Parametrized over EVERY method in ``peft_diffusion.registry.METHODS``: a registered method without an entry
in ``EXAMPLES`` fails here. For each example: identity at init, the trainable set is exactly that adapter's
parameters (and gradients reach them), merge == unmerged output after the trainable parameters moved (or a
clear error when the method cannot merge), remove restores the module tree and the state_dict, and a
native save / load round trip gives the same parameters and output.
"""
from __future__ import annotations

import pytest
import torch

import tiny
from peft_diffusion import LoRA, TextualInversion, disable_adapters, fuse, inject, load_adapter, remove, save_adapter, unfuse
from peft_diffusion.api import hosts
from peft_diffusion.config import MethodConfig
from peft_diffusion.methods import DeltaLoRA, DiffuseKronA, DoRA, EDLoRA, IncreLoRA, KronA, LoHa, LoKr
from peft_diffusion.methods import LTSFT, ChildTuningD, ChildTuningF, DiffPruning, FISHMask, Masking
from peft_diffusion.methods import BitFit, DiffFit, LNTuning, NewClass, PartialFT
from peft_diffusion.methods import Houlsby, ParallelAdapter, Pfeiffer
from peft_diffusion.methods import Compacter, CompacterPP
from peft_diffusion.methods import IPAdapter, T2IAdapterConfig
from peft_diffusion.methods import LlamaAdapter
from peft_diffusion.methods import ControlNet, ControlNetLoRA, ControlNeXt
from peft_diffusion.methods import PrefixTuning, PTuningV2
from peft_diffusion.methods import PTuning, PromptTuning
from peft_diffusion.methods import VP, VPT
from peft_diffusion.methods import MAM, UniPELT
from peft_diffusion.methods import AdapterBias, Convpass
from peft_diffusion.methods import AdaMix, FacT
from peft_diffusion.target import Target
from peft_diffusion.registry import METHODS

# method name -> [(tiny model key from tiny.MODELS, config)]. Add every new method here (several configs
# are welcome: each option that changes what is built or trained deserves one).
EXAMPLES: dict[str, list[tuple[str, MethodConfig]]] = {
    "lora": [
        ("unet", LoRA(r=4, target="unet-all")),  # Linear and 1x1 / 3x3 Conv2d sites
        ("gpt2", LoRA(r=2, alpha=4.0, rslora=True, fa=True)),  # transposed Conv1D, B-only training
        ("pixart", LoRA(r=2, init="gaussian", rank_pattern={"to_q": 3}, alpha_pattern={"ff.net.2": 1.0})),
        ("clip-text", LoRA(r=3, dropout=0.1)),
    ],
    "dora": [
        ("unet", DoRA(r=4, target="unet-all")),  # magnitudes (out,) on Linear, (1, out, 1, 1) on Conv2d
        ("gpt2", DoRA(r=2, alpha=4.0, fa=True)),  # transposed Conv1D: norms over its columns
        ("clip-text", DoRA(r=3, dropout=0.1, rank_pattern={"q_proj": 2})),
    ],
    # perturbing A and B leaves the snapshot B_K A_K behind: W's implicit update is non-zero in every test
    "delta-lora": [
        ("unet", DeltaLoRA(r=4, target="unet-all")),
        ("gpt2", DeltaLoRA(r=2, update_ratio=0.5, start_step=0, fa=True)),
    ],
    # perturbing moves the masked slots too: they must still contribute nothing and round-trip
    "increlora": [
        ("unet", IncreLoRA(r=2, max_r=4, target_rank=3, target="unet-all")),
        ("pixart", IncreLoRA(r=1, rank_pattern={"to_q": 2}, max_r=3, target_rank=2, init="gaussian")),
        ("gpt2", IncreLoRA(r=1, max_r=2, target_rank=2, alpha=2.0)),
    ],
    "loha": [
        ("unet", LoHa(r=2, target="unet-all")),  # Linear, 1x1 and 3x3 Conv2d sites
        ("unet", LoHa(r=2, alpha=1.0, use_tucker=True, target="unet-all")),  # Tucker factors on the 3x3 convs
        ("pixart", LoHa(r=3, rank_pattern={"to_q": 2}, alpha_pattern={"ff.net.2": 1.0})),
        ("clip-text", LoHa(r=2)),
    ],
    "lokr": [
        ("unet", LoKr(r=2, target="unet-all")),  # factored Linear path, dense conv path, low-rank W2
        ("unet", LoKr(r=1, alpha=2.0, decompose_both=True, use_tucker=True, target="unet-all")),
        # sites with both factors full and sites with a low-rank W2 in one adapter; a W1 shape given as a pair
        ("pixart", LoKr(r=2, factor=4, factor_pattern={"to_q": (4, 2)}, rank_pattern={"to_k": 1},
                        alpha_pattern={"ff.net.2": 1.0})),
        ("clip-text", LoKr(factor=2, full_matrix=True)),
    ],
    "krona": [("unet", KronA(target="unet-all")), ("clip-text", KronA(factor=4))],
    # the tiny U-Net's 32 / 64 channels take 8 x 4 factors (SD's take the default 64 x 8)
    "diffusekrona": [("unet", DiffuseKronA(factor=(8, 4)))],
    # the inputs ("a photo of a cat") must run in the base model, so the token served is an existing word
    # (overwrite, starting from its own row); "photo_1" is a new token and row
    "textual-inversion": [
        ("clip-text-tokenizer", TextualInversion(token="cat", overwrite=True)),
        ("clip-text-tokenizer", TextualInversion(token="photo", num_vectors=2, overwrite=True)),
    ],
    # a lone U-Net holds the LoRA part; a lone text encoder the LoRA part and the layer table, sized by
    # ``layers`` (no U-Net to route to), with a tokenizer and without one (the token is the adapter name)
    "ed-lora": [
        ("unet", EDLoRA(token="<c>")),
        ("clip-text-tokenizer", EDLoRA(token="<c>", init_word="dog", layers=("a", "b", "c"))),
        ("clip-text", EDLoRA(r=2, num_vectors=1, layers=("a", "b"), text_target="clip-text-mlp")),
    ],
    # a new class label on the tiny DiT: one row past each block's table + LoRA on the dit preset (rows
    # alone, lora=False, leave the base ids' outputs as they are by design: tests/test_dit.py covers them)
    "new-class": [("dit", NewClass(r=2, labels=("cross",)))],
    # masked / sparse selective methods on parameters: the default target (the preset modules' weights),
    # conv kernels and biases by pattern, a per-pattern density
    "masking": [("unet", Masking()), ("gpt2", Masking(threshold=0.01))],
    "fish": [
        ("unet", FISHMask(density=0.05, target=Target(include=(r".*conv\d?\.weight", r".*to_q\.bias"), types=()))),
        ("clip-text", FISHMask(density=0.1, density_pattern={"q_proj.weight": 0.5})),
    ],
    "child-tuning-d": [("unet", ChildTuningD(density=0.2)), ("gpt2", ChildTuningD())],
    "child-tuning-f": [("unet", ChildTuningF(density=0.5)), ("clip-text", ChildTuningF())],
    # perturbing moves w and log_alpha: the gates (evaluation form) scale the difference
    "diff-pruning": [("unet", DiffPruning(density=0.05)), ("pixart", DiffPruning(init_log_alpha=0.0))],
    "lt-sft": [("unet", LTSFT(density=0.02)), ("clip-text", LTSFT(density=0.3, dense_lr=1e-3))],
    # dense selective methods: by blocks and by parameter patterns; default targets on each backbone kind
    "partial-ft": [
        ("unet", PartialFT(blocks=("up_blocks.1",))),
        ("bert", PartialFT(target=Target(include=(r".*attention\.self\.value\.weight",), types=()))),
        ("llama", PartialFT(blocks=("model.layers.1",), target=Target(include=(r".*_proj\.weight",), types=()))),
    ],
    "bitfit": [("unet", BitFit()), ("bert", BitFit()), ("pixart", BitFit()), ("gpt2", BitFit())],
    "ln-tuning": [("unet", LNTuning()), ("bert", LNTuning()), ("llama", LNTuning()), ("clip-text", LNTuning())],
    # gammas on U-Net transformer and ResNet blocks, DiT / PixArt blocks, CLIP / BERT / LLaMA layers
    "difffit": [
        ("unet", DiffFit()), ("dit", DiffFit()), ("pixart", DiffFit(embeddings=False)), ("clip-text", DiffFit()),
        ("bert", DiffFit(gamma_target=Target(include=(r".*output\.dense",)))), ("llama", DiffFit()),
    ],    # bottleneck adapters (annexes): diffusers blocks, CLIP / BERT / T5 / LLaMA / GPT-2 layers
    "houlsby": [("unet", Houlsby(reduction=4)), ("pixart", Houlsby(size=4, activation="gelu")), ("bert", Houlsby(reduction=4)),
                ("t5", Houlsby(reduction=4)), ("gpt2", Houlsby(reduction=4))],
    "pfeiffer": [("dit", Pfeiffer(reduction=4)), ("clip-text", Pfeiffer(reduction=4)), ("llama", Pfeiffer(size=3))],
    # PHM bottleneck adapters; the shared rules sit in an annex on the model itself (site "")
    "compacter": [("t5", Compacter(reduction=4)), ("unet", Compacter(reduction=4, phm_dim=2, rank=2)),
                  ("bert", Compacter(reduction=4))],
    "compacter++": [("t5", CompacterPP(reduction=4)), ("pixart", CompacterPP(size=4, phm_dim=2)),
                    ("llama", CompacterPP(reduction=4, phm_dim=2))],
    # the inputs carry an image prompt (diffusers' added_cond_kwargs): identity at init needs to_v_ip at zero
    # (init="zero"); without an image prompt the default init is the identity too (tests/test_ip_adapter.py)
    "ip-adapter": [("unet-image", IPAdapter(image_embed_dim=16, init="zero")),
                   ("unet-image", IPAdapter(image_embed_dim=16, plus=True, num_tokens=3, depth=2, heads=1,
                                            hidden_dim=24, init="zero"))],
    # a control image per call (tiny.PER_CALL; a lone U-Net has no VAE: downscale 2 = 32 px for 16 x 16
    # latents, the embedded base's); identity at init through the zero convolutions (ControlNeXt: its zero gate)
    "controlnet": [("unet-control", ControlNet(downscale=2))],
    "controlnet-lora": [("unet-control", ControlNetLoRA(downscale=2, r=2)),
                        ("unet-control", ControlNetLoRA(downscale=2, r=2, lora_target="unet-attn"))],
    "controlnext": [("unet-control", ControlNeXt(downscale=2, embedding_channels=(8, 16), channels=(16, 32),
                                                 time_channels=16, time_embed_dim=32, gate=True)),
                    ("unet-control", ControlNeXt(downscale=2, embedding_channels=(8,), channels=(16,), groups=(4,),
                                                 time_channels=16, time_embed_dim=32, gate=True, lora=True, r=2,
                                                 block="mid_block"))],
    # a lone U-Net: downscale_factor is the tiny VAE's 2 (a pipeline gives it); the condition is a per-call input
    "t2i-adapter": [("unet-control", T2IAdapterConfig(downscale_factor=2)),
                    ("unet-control", T2IAdapterConfig(downscale_factor=2, num_res_blocks=1))],
    "parallel-adapter": [("unet", ParallelAdapter(reduction=4, scale=0.1)), ("bert", ParallelAdapter(reduction=4)),
                         ("llama", ParallelAdapter(reduction=4, scale=0.5)), ("t5", ParallelAdapter(reduction=4))],
    # key/value prefixes in every attention layer: LLaMA (cache path, RoPE), BERT (cache path, shifted positions),
    # CLIP text (recomputed attention), diffusers cross-attention (U-Net attn2, PixArt: rows before the text
    # tokens' keys / values); with and without the MLP reparameterisation
    "prefix-tuning": [("llama", PrefixTuning(num_virtual_tokens=3, encoder_hidden_size=8)),
                      ("bert", PrefixTuning(num_virtual_tokens=2, prefix_projection=False)),
                      ("clip-text", PrefixTuning(num_virtual_tokens=2)),
                      ("unet", PrefixTuning(num_virtual_tokens=2, encoder_hidden_size=8))],
    "p-tuning-v2": [("llama", PTuningV2(num_virtual_tokens=3)), ("bert", PTuningV2(num_virtual_tokens=2)),
                    ("clip-text", PTuningV2(num_virtual_tokens=4)), ("unet", PTuningV2(num_virtual_tokens=2)),
                    ("pixart", PTuningV2(num_virtual_tokens=2))],
    # soft prompts (an annex on the model itself): LLaMA, BERT, T5 encoder (inputs_embeds path), CLIP text
    # (placeholder-id path); vocabulary init; P-tuning's MLP and LSTM encoders
    "prompt-tuning": [("llama", PromptTuning(num_virtual_tokens=3)), ("bert", PromptTuning(num_virtual_tokens=2)),
                      ("t5", PromptTuning(num_virtual_tokens=2, init="vocab")),
                      ("clip-text", PromptTuning(num_virtual_tokens=4))],
    "p-tuning": [("llama", PTuning(num_virtual_tokens=3, encoder_hidden_size=8)),
                 ("bert", PTuning(num_virtual_tokens=2, encoder="lstm", encoder_hidden_size=6)),
                 ("clip-text", PTuning(num_virtual_tokens=2, encoder="lstm", encoder_num_layers=1))],
    # zero-gated adaption prompts on the tiny LLaMA (grouped-query attention): per-head gates in the top layer,
    # peft's one gate per layer in both; v2's norms, biases and scales
    "llama-adapter": [("llama", LlamaAdapter(adapter_len=3, adapter_layers=1)),
                      ("llama", LlamaAdapter(adapter_len=2, gate="layer")),
                      ("llama", LlamaAdapter(adapter_len=2, adapter_layers=1, norms=True, bias_scale=True))],  # v2
    # visual prompts in the CLIP vision tower, alone and inside a CLIPModel: VPT shallow, deep (transient swaps in
    # the later layers' annexes) with prompt dropout; VP's zero-init frame (the identity at init)
    "vpt": [("clip-vision", VPT(num_tokens=3)), ("clip-vision", VPT(num_tokens=2, deep=True, dropout=0.1)),
            ("clip", VPT(num_tokens=2, deep=True))],
    "vp": [("clip-vision", VP(padding=4)), ("clip", VP(padding=3))],
    # hybrids of the prefix part: MAM (prefix + parallel FFN adapter), UniPELT (gated LoRA + prefix + adapter)
    "mam": [("bert", MAM(num_virtual_tokens=2, size=8)), ("llama", MAM(num_virtual_tokens=3, size=8,
                                                                        encoder_hidden_size=8)),
            ("unet", MAM(num_virtual_tokens=2, size=8, prefix_projection=False))],
    "unipelt": [("bert", UniPELT(num_virtual_tokens=2, encoder_hidden_size=8, r=2, size=8)),
                ("llama", UniPELT(num_virtual_tokens=3, prefix_projection=False, r=2, size=8)),
                ("unet", UniPELT(num_virtual_tokens=2, encoder_hidden_size=8, r=2, size=8))],
    # a token-dependent shift on each FFN's output projection (alpha from its input, or from its output)
    "adapter-bias": [("unet", AdapterBias()), ("bert", AdapterBias()), ("gpt2", AdapterBias(alpha_from="output")),
                     ("llama", AdapterBias()), ("t5", AdapterBias())],
    # convolutional bypasses on the CLIP vision tower's patch grid, alone and inside a CLIPModel
    "convpass": [("clip-vision", Convpass()), ("clip-vision", Convpass(dim=4, conv_init="xavier", attn_only=True)),
                 ("clip", Convpass(scale=0.1, dropout=0.0))],
    # mixtures of bottleneck adapters (averaged in eval): FFN only (shared up-projection), Houlsby's placement
    # with nothing shared, a shared down-projection on the U-Net
    "adamix": [("bert", AdaMix(reduction=4)), ("llama", AdaMix(size=4, num_experts=3, share_up=False, attention=True)),
               ("unet", AdaMix(reduction=4, share_up=False, share_down=True)), ("gpt2", AdaMix(reduction=4))],
    # FacT weight deltas with U / V shared model-wide (site-'' annex): TT and TK; CLIP vision attention (the tiny
    # MLP width 37 shares no divisor with 32), GPT-2's Conv1D, the U-Net's attention + FF, LLaMA's 16-wide k / v
    "fact": [("clip-vision", FacT(r=2, target="clip-vision")), ("gpt2", FacT(r=4, variant="tk")),
             ("unet", FacT(r=2)), ("llama", FacT(r=2, variant="tk", target=Target(include=("q_proj", "k_proj", "v_proj",
                                                                                           "o_proj")))),
             ("pixart", FacT(r=2, dropout=0.0))],
}

NAME = "contract"
# methods that change the output from the start when their per-call input is given (T2I-Adapter: diffusers'
# T2IAdapter has no zero-initialised output, as in the paper); their identity at init is checked without it
NOT_IDENTITY_WITH_INPUT = {"t2i-adapter"}
# methods that change the output from the start by design: prefix keys/values are attended from the first
# step (prefix tuning, P-tuning v2); soft prompts put virtual tokens in front of the input, so the output also
# gains n positions (prompt tuning, P-tuning). Their identity test checks that the output does change and
# that disabling them gives the base output back exactly; the merge test starts from their output at init.
# VPT: new prompt tokens in the vision tower change every attention row from the start, as in the paper;
# MAM and UniPELT hold a prefix part
NOT_IDENTITY_AT_INIT = {"prefix-tuning", "p-tuning-v2", "prompt-tuning", "p-tuning", "vpt", "mam", "unipelt"}

def _cases():
    for method in sorted(METHODS):
        examples = EXAMPLES.get(method) or [None]
        for i, example in enumerate(examples):
            key = example[0] if example else "MISSING"
            yield pytest.param(method, example, id=f"{method}-{key}-{i}")


CASES = list(_cases())


def test_every_registered_method_has_examples():
    missing = sorted(set(METHODS) - set(EXAMPLES))
    assert not missing, f"registered methods without an entry in tests/test_contract.py EXAMPLES: {missing}"
    stale = sorted(set(EXAMPLES) - set(METHODS))
    assert not stale, f"EXAMPLES names methods that are not registered: {stale}"


def _setup(method, example, make_model):
    if example is None:
        pytest.fail(f"method {method!r} is registered but has no example in tests/test_contract.py EXAMPLES")
    key, config = example
    assert isinstance(config, METHODS[method]), f"EXAMPLES[{method!r}] holds a {type(config).__name__}"
    model = make_model(key)
    return model, config, tiny.MODELS[key][1]()


def _adapter_params(model, name=NAME) -> dict[str, torch.nn.Parameter]:
    """The model's own names of adapter ``name``'s parameters (whatever kind of site holds them)."""
    ours = {id(p) for _, h in hosts(model) if name in h.deltas for p in h.deltas[name].parameters()}
    return {n: p for n, p in model.named_parameters() if id(p) in ours}


@pytest.mark.parametrize("method, example", CASES)
def test_identity_at_init(method, example, make_model):
    model, config, inputs = _setup(method, example, make_model)
    if method in NOT_IDENTITY_WITH_INPUT:
        inputs = {k: v for k, v in inputs.items() if k != tiny.PER_CALL}
    base = tiny.run(model, inputs)
    inject(model, config, NAME)
    assert list(hosts(model)), "the example must select at least one site"
    if method in NOT_IDENTITY_AT_INIT:
        out = tiny.run(model, inputs)
        assert out.shape != base.shape or not torch.allclose(out, base, atol=1e-5), "expected a change at init"
        disable_adapters(model)
        torch.testing.assert_close(tiny.run(model, inputs), base, atol=0, rtol=0)
        return
    torch.testing.assert_close(tiny.run(model, inputs), base, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method, example", CASES)
def test_trainable_set_is_the_adapter(method, example, make_model):
    model, config, inputs = _setup(method, example, make_model)
    inject(model, config, NAME)
    params = _adapter_params(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "the adapter has nothing to train"
    assert trainable <= set(params), f"trainable parameters outside the adapter: {sorted(trainable - set(params))[:5]}"
    model.train()
    tiny.main_output(tiny.call(model, inputs)).float().pow(2).mean().backward()
    assert any(params[n].grad is not None for n in trainable), "no gradient reaches the adapter"
    assert all(p.grad is None for n, p in model.named_parameters() if n not in params), "base received gradients"


@pytest.mark.parametrize("method, example", CASES)
def test_merge_equals_unmerged(method, example, make_model):
    model, config, inputs = _setup(method, example, make_model)
    base = tiny.run(model, inputs)
    inject(model, config, NAME)
    if method in NOT_IDENTITY_AT_INIT:  # its output at init (with a soft prompt: n more positions) is the reference
        base = tiny.run(model, inputs)
    tiny.perturb_trainable(model)
    out = tiny.run(model, inputs)
    assert not torch.allclose(out, base, atol=1e-5), "moving the trainable parameters must change the output"
    deltas = [h.deltas[NAME] for _, h in hosts(model)]
    if not all(d.mergeable for d in deltas):
        with pytest.raises(ValueError, match="cannot be fused"):
            fuse(model, [NAME])
        fuse(model)  # the default fuses what can merge; this adapter keeps running unfused
        assert not any(h.merged for _, h in hosts(model))
        assert torch.equal(tiny.run(model, inputs), out)
        return
    fuse(model)
    torch.testing.assert_close(tiny.run(model, inputs), out, atol=1e-5, rtol=1e-5)
    unfuse(model)
    torch.testing.assert_close(tiny.run(model, inputs), out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method, example", CASES)
def test_remove_restores_keys(method, example, make_model):
    model, config, inputs = _setup(method, example, make_model)
    types, state, hooks = tiny.module_types(model), tiny.snapshot(model), tiny.hooks_and_processors(model)
    inject(model, config, NAME)
    tiny.perturb_trainable(model)
    remove(model)
    assert tiny.module_types(model) == types
    assert tiny.hooks_and_processors(model) == hooks
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


# ---------------------------------------------------------------- save / load round trip


@pytest.mark.parametrize("method, example", CASES)
def test_save_load_round_trip(method, example, make_model, tmp_path):
    """Saved natively, loaded into a fresh copy: same parameters, same output; the delta's own state_dict
    names are the ones its config declares (the format layer splits file keys with them)."""
    model, config, inputs = _setup(method, example, make_model)
    inject(model, config, NAME)
    tiny.perturb_trainable(model)
    model.eval()
    out = tiny.run(model, inputs)
    for _, host in hosts(model):
        names = type(config).param_names  # some are optional; a name ending with "." is a prefix
        assert all(k in names or k.startswith(tuple(n for n in names if n.endswith(".")))
                   for k in host.deltas[NAME].state_dict())
    path = save_adapter(model, tmp_path / "a.safetensors", NAME)
    fresh = make_model(example[0])
    assert load_adapter(fresh, path) == NAME
    torch.testing.assert_close(tiny.run(fresh, inputs), out, atol=1e-6, rtol=1e-6)
    mine = {k: v for k, v in model.state_dict().items() if ".deltas." in k}
    theirs = {k: v for k, v in fresh.state_dict().items() if ".deltas." in k}
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
