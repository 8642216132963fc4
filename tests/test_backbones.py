"""The method contract on the three embedded backbones (issue 11, "Must show": LoRA/LoHa/LoKr/DoRA and the
bottleneck / selective methods inject, train, save, load and fuse on all three).

Backbones: the embedded DiT's transformer (``shapes-dit``, a diffusers ``DiTTransformer2DModel``), the
embedded CLIP (``shapes-clip``, a transformers ``CLIPModel``: both towers adapted by one adapter) and the
embedded LM (``shapes-lm``, a ``LlamaForCausalLM``). Each method runs with its default target (the model's
default preset, or the method's own site rule); for each backbone x method, through the public API only:

- identity at init: the adapted model's output is bit-identical to the base's;
- only the adapter's parameters require grad;
- a few optimizer steps change the output, and change adapter tensors only (the base tensors stay bit-equal);
- ``save_adapter`` / ``load_adapter`` into a fresh copy of the base gives the same output;
- ``fuse`` gives the unfused output (atol 1e-5) where the method merges, else ``fuse(model, [name])``
  refuses with a clear error and ``fuse(model)`` leaves it running;
- ``remove`` gives back the exact base: module tree, state_dict (keys and values), hooks and processors.

A method that has nothing to act on in a backbone (BitFit on the LM, whose layers have no biases; LN tuning
on the DiT, whose norms carry no parameters) must refuse at ``inject`` with an error naming why, leaving the
model untouched.
"""
from __future__ import annotations

import copy

import pytest
import torch

import peft_diffusion as pd
import tiny
from peft_diffusion.api import adapter_parameters, prepare, scoring_batches, unmergeable
from peft_diffusion.models import path as embedded_path

NAME = "a"
BACKBONES = ("dit", "clip", "lm")

# method -> config; one config serves every backbone (default targets), so a backbone without a default
# would fail here: that is what the presets are for
METHODS = {
    "lora": pd.LoRA(r=2),
    "loha": pd.LoHa(r=2),
    "lokr": pd.LoKr(r=2, factor=4),
    "dora": pd.DoRA(r=2),
    "houlsby": pd.Houlsby(reduction=8),
    "pfeiffer": pd.Pfeiffer(reduction=8),
    "parallel-adapter": pd.ParallelAdapter(reduction=8, scale=0.5),
    "bitfit": pd.BitFit(),
    "ln-tuning": pd.LNTuning(),
    "difffit": pd.DiffFit(),
    "fish": pd.FISHMask(density=0.05, scoring_batches=2),
    "partial-ft": None,  # blocks differ per backbone: PARTIAL_FT
}
# partial fine-tuning of one late block (both towers' last layers for CLIP)
PARTIAL_FT = {
    "dit": pd.PartialFT(blocks=("transformer_blocks.3",)),
    "clip": pd.PartialFT(blocks=("text_model.encoder.layers.1", "vision_model.encoder.layers.3")),
    "lm": pd.PartialFT(blocks=("model.layers.3",)),
}
# (backbone, method) -> what inject's error says: nothing to train there
REFUSED = {
    ("lm", "bitfit"): "has no bias parameter",
    ("dit", "ln-tuning"): "no LayerNorm, GroupNorm or RMSNorm layer with parameters",
}


# ---------------------------------------------------------------- the backbones, their inputs and outputs

def _load(kind: str) -> torch.nn.Module:
    if kind == "dit":
        from diffusers import DiTTransformer2DModel

        return DiTTransformer2DModel.from_pretrained(embedded_path("shapes-dit") / "transformer").eval()
    if kind == "clip":
        from transformers import CLIPModel

        return CLIPModel.from_pretrained(embedded_path("shapes-clip")).eval()
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(embedded_path("shapes-lm")).eval()


def _inputs(kind: str, model) -> dict:
    g = torch.Generator().manual_seed(0)
    if kind == "dit":
        c, s = model.config.in_channels, model.config.sample_size
        return {"hidden_states": torch.randn(2, c, s, s, generator=g), "timestep": torch.tensor([100, 700]),
                "class_labels": torch.tensor([0, 13])}
    if kind == "clip":
        from transformers import AutoTokenizer

        from peft_diffusion.shapes import clip_eval, world

        tok = AutoTokenizer.from_pretrained(embedded_path("shapes-clip"))
        samples = world.dataset(2, 7)
        enc = tok([s.caption for s in samples], padding="max_length", truncation=True, return_tensors="pt")
        return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask,
                "pixel_values": clip_eval.pixel_values([s.image for s in samples])}
    from peft_diffusion.shapes import language

    tok = language.build_tokenizer()
    lines = [language.line(prompt, answer) for _, prompt, answer in language.examples(("shape", "colour"), 1, seed=3)]
    enc = tok(lines, padding=True, return_tensors="pt")
    return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}


def _output(kind: str, out) -> torch.Tensor:
    if kind == "clip":  # both towers' embeddings
        return torch.cat([out.text_embeds, out.image_embeds], dim=-1)
    return out.sample if kind == "dit" else out.logits


_BASES: dict[str, tuple] = {}


def _base(kind: str):
    """(pristine model, inputs, its output), loaded once per session; tests work on deep copies."""
    if kind not in _BASES:
        try:
            embedded_path({"dit": "shapes-dit", "clip": "shapes-clip", "lm": "shapes-lm"}[kind])
        except FileNotFoundError as e:
            pytest.skip(f"embedded model not there yet: {e}")
        model = _load(kind)
        inputs = _inputs(kind, model)
        _BASES[kind] = (model, inputs, _run(kind, model, inputs))
    return _BASES[kind]


def _run(kind, model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return _output(kind, model(**inputs))


def _fresh(kind: str) -> torch.nn.Module:
    return copy.deepcopy(_base(kind)[0])


def _tensors(model) -> dict[int, torch.Tensor]:
    """id -> a copy of every parameter and buffer (hosts keep the base layer's own tensor objects)."""
    return {id(t): t.detach().clone() for t in [*model.parameters(), *model.buffers()]}


def _train(kind, model, inputs, target, steps: int = 3) -> None:
    def loss_fn(_batch=None):
        return (_output(kind, model(**inputs)) - target).pow(2).mean()

    if scoring_batches(model):  # masked methods choose their entries first (FISH: Fisher information)
        assert prepare(model, loss_fn, [None] * scoring_batches(model))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()


CASES = [pytest.param(b, m, id=f"{b}-{m}") for b in BACKBONES for m in METHODS]


@pytest.mark.parametrize("kind, method", CASES)
def test_method_on_backbone(kind, method, tmp_path):
    base_model, inputs, base_out = _base(kind)
    config = METHODS[method] or PARTIAL_FT[kind]
    model = _fresh(kind)
    types, hooks = tiny.module_types(model), tiny.hooks_and_processors(model)
    state = tiny.snapshot(model)
    if (kind, method) in REFUSED:
        with pytest.raises(ValueError, match=REFUSED[kind, method]):
            pd.inject(model, config, NAME)
        assert tiny.module_types(model) == types and tiny.hooks_and_processors(model) == hooks
        assert all(p.requires_grad for p in model.parameters()), "a refused inject must not freeze the model"
        return

    # ---- identity at init, bit for bit
    pd.inject(model, config, NAME)
    assert pd.adapter_names(model) == [NAME]
    if kind == "clip":  # one adapter over both towers
        assert {q.split(".")[0] for q, _ in pd.api.sites(model)} >= {"text_model", "vision_model"}
    assert torch.equal(_run(kind, model, inputs), base_out), "the adapted model must start as the base"

    # ---- only the adapter trains
    ours = adapter_parameters(model)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable and trainable <= ours, "parameters outside the adapter require grad"

    # ---- a few steps move the output, and only adapter tensors
    before = _tensors(model)
    g = torch.Generator().manual_seed(1)
    target = base_out + 0.5 * torch.randn(base_out.shape, generator=g)
    model.train()
    _train(kind, model, inputs, target)
    model.eval()
    trained = _run(kind, model, inputs)
    assert not torch.allclose(trained, base_out, atol=1e-5), "training did not change the output"
    now = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    changed = {i for i, t in before.items() if not torch.equal(now[i], t)}
    assert changed, "no tensor changed"
    outside = changed - ours - {id(b) for _, s in pd.api.sites(model) for b in s.deltas.buffers()}
    assert not outside, f"{len(outside)} base tensors changed"

    # ---- save / load into a fresh base
    file = pd.save_adapter(model, tmp_path / "a.safetensors", NAME)
    other = _fresh(kind)
    assert pd.load_adapter(other, file) == NAME
    other.eval()
    loaded = _run(kind, other, inputs)
    torch.testing.assert_close(loaded, trained, atol=1e-6, rtol=0)

    # ---- fuse
    if unmergeable(other):
        with pytest.raises(ValueError, match="cannot be fused"):
            pd.fuse(other, [NAME])
        pd.fuse(other)  # what can merge does; this adapter keeps running
        assert torch.equal(_run(kind, other, inputs), loaded)
    else:
        pd.fuse(other)
        torch.testing.assert_close(_run(kind, other, inputs), loaded, atol=1e-5, rtol=0)
        pd.unfuse(other)
        torch.testing.assert_close(_run(kind, other, inputs), loaded, atol=1e-5, rtol=0)

    # ---- remove: the exact base
    pd.remove(model)
    assert tiny.module_types(model) == types
    assert tiny.hooks_and_processors(model) == hooks
    after = model.state_dict()
    assert list(after) == list(state)
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert torch.equal(_run(kind, model, inputs), base_out)
