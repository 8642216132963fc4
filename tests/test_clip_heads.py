"""CoOp, CLIP-Adapter and Tip-Adapter(-F): classifiers around the frozen embedded CLIP (``shapes-clip``).

They are not registered methods (no site in the model: ``peft_diffusion/methods/clip_heads.py`` says why), so
they are not in the contract matrix; this file checks the same things directly: each formula against an
independent computation (atol 1e-5), the trainable set, gradients reaching only it, the model untouched,
save / load round trips, bad input, and the parameter counts on CLIP ViT-B/16's config (meta device).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from peft_diffusion.io.files import AdapterFileError
from peft_diffusion.methods import CLIPAdapter, CoOp, TipAdapter
from peft_diffusion.models import path as embedded_path
from peft_diffusion.shapes import clip_eval, world

CLIP = embedded_path("shapes-clip")
NAMES = ["red circle", "blue square", "green star", "yellow heart"]
TEMPLATE = "a {}"


@pytest.fixture(scope="module")
def clip():
    from transformers import CLIPModel, CLIPTokenizer

    return CLIPModel.from_pretrained(CLIP).eval(), CLIPTokenizer.from_pretrained(CLIP)


@pytest.fixture(scope="module")
def images():
    samples = world.dataset(8, seed=11)
    return clip_eval.pixel_values([s.image for s in samples])


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {k: p.requires_grad for k, p in model.named_parameters()})


def assert_untouched(model, snap):
    state, flags = snap
    now = model.state_dict()
    assert set(now) == set(state) and all(torch.equal(now[k], v) for k, v in state.items())
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def zero_shot_logits(model, tok, pixels, names=NAMES):
    """CLIP's own zero-shot classifier (clip_eval's features), times its logit scale."""
    with torch.no_grad():
        f = nn.functional.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        return model.logit_scale.exp() * f @ clip_eval.text_features(model, tok, [TEMPLATE.format(n) for n in names]).T


def coop_reference(model, tok, head, pixels):
    """CoOp's logits computed another way: the context as real embedding rows of new token ids in a copy of
    the model, tokenized prompts "<ctx_1> ... <ctx_M> name." run through the stock text tower."""
    ref = copy.deepcopy(model)
    emb = ref.text_model.embeddings.token_embedding
    v, m = emb.num_embeddings, head.n_ctx
    ctx = head.ctx.detach().reshape(-1, emb.embedding_dim)
    emb.weight = nn.Parameter(torch.cat([emb.weight.detach(), ctx]))
    ids = []
    for c, name in enumerate(NAMES):
        start = v + (c * m if head.class_specific else 0)
        row = [tok.bos_token_id, *range(start, start + m), *tok(name + ".", add_special_tokens=False).input_ids,
               tok.eos_token_id]
        ids.append(row + [tok.eos_token_id] * (16 - len(row)))
    with torch.no_grad():
        text = nn.functional.normalize(ref.get_text_features(input_ids=torch.tensor(ids)).pooler_output, dim=-1)
        f = nn.functional.normalize(ref.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    return ref.logit_scale.exp() * f @ text.T


@pytest.mark.parametrize("class_specific", [False, True])
def test_coop_formula(clip, images, class_specific):
    model, tok = clip
    head = CoOp(model, tok, NAMES, n_ctx=4, class_specific=class_specific, seed=0)
    with torch.no_grad():
        head.ctx.normal_(0, 0.5)
    torch.testing.assert_close(head(pixel_values=images), coop_reference(model, tok, head, images), atol=1e-5,
                               rtol=0)


def test_coop_init_text_is_the_words_prompt(clip, images):
    """Context from "a" (1 token) == the prompt "a <name>." run as plain text."""
    model, tok = clip
    head = CoOp(model, tok, NAMES, n_ctx=1, init_text="a")
    with torch.no_grad():
        text = clip_eval.text_features(model, tok, [f"a {n}." for n in NAMES])
        f = nn.functional.normalize(model.get_image_features(pixel_values=images).pooler_output, dim=-1)
    torch.testing.assert_close(head(pixel_values=images), model.logit_scale.exp() * f @ text.T, atol=1e-5, rtol=0)


@pytest.mark.parametrize("text_alpha", [None, 0.3])
def test_clip_adapter_formula_and_identity_at_init(clip, images, text_alpha):
    model, tok = clip
    head = CLIPAdapter(model, tok, NAMES, alpha=0.4, text_alpha=text_alpha, template=TEMPLATE)
    # W2 = 0: f* = 0.6 f, which normalises to f: zero-shot CLIP's logits exactly
    torch.testing.assert_close(head(pixel_values=images), zero_shot_logits(model, tok, images), atol=1e-5, rtol=0)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.3)
        f = model.get_image_features(pixel_values=images).pooler_output
        w = model.get_text_features(**tok([TEMPLATE.format(n) for n in NAMES], padding="max_length",
                                          return_tensors="pt")).pooler_output
    adapt = lambda a, x: torch.relu(x @ a.down.weight.T) @ a.up.weight.T  # noqa: E731
    f = 0.4 * adapt(head.visual, f) + 0.6 * f
    if text_alpha is not None:
        w = 0.3 * adapt(head.text, w) + 0.7 * w
    want = model.logit_scale.exp() * nn.functional.normalize(f, dim=-1) @ nn.functional.normalize(w, dim=-1).T
    torch.testing.assert_close(head(pixel_values=images).detach(), want, atol=1e-5, rtol=0)


def test_clip_adapter_official_init(clip, images):
    """The released code's form: random W2 (not zero-shot at init) and a ReLU after W2."""
    model, tok = clip
    torch.manual_seed(0)
    head = CLIPAdapter(model, tok, NAMES, official_init=True, template=TEMPLATE)
    assert head.visual.up.weight.abs().sum() > 0
    with torch.no_grad():
        f = model.get_image_features(pixel_values=images).pooler_output
        text = clip_eval.text_features(model, tok, [TEMPLATE.format(n) for n in NAMES])
        f = 0.2 * torch.relu(torch.relu(f @ head.visual.down.weight.T) @ head.visual.up.weight.T) + 0.8 * f
        want = model.logit_scale.exp() * nn.functional.normalize(f, dim=-1) @ text.T
        got = head(pixel_values=images)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(got, zero_shot_logits(model, tok, images), atol=1e-3)


def test_tip_adapter_formula(clip, images):
    model, tok = clip
    labels = [0, 1, 2, 3, 0, 1]
    head = TipAdapter.from_few_shot(model, tok, NAMES, labels, pixel_values=images[:6], alpha=1.7, beta=3.0,
                                    template=TEMPLATE)
    with torch.no_grad():
        raw = model.get_image_features(pixel_values=images).pooler_output
    keys = raw[:6] / raw[:6].norm(dim=-1, keepdim=True)
    values = torch.zeros(6, 4)
    values[torch.arange(6), torch.tensor(labels)] = 1
    f = raw / raw.norm(dim=-1, keepdim=True)
    want = zero_shot_logits(model, tok, images) + 1.7 * torch.exp(-3.0 * (1 - f @ keys.T)) @ values
    torch.testing.assert_close(head(pixel_values=images), want, atol=1e-5, rtol=0)
    # beta -> large, alpha = 0: CLIP alone
    assert torch.allclose(TipAdapter(model, tok, NAMES, keys, values, alpha=0.0, template=TEMPLATE)(
        image_features=raw), zero_shot_logits(model, tok, images), atol=1e-5)


def train_steps(head, feats, labels, steps=15, lr=1e-2):
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(head(image_features=feats), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def make_heads(model, tok, images):
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    return {
        "coop": CoOp(model, tok, NAMES, n_ctx=4, seed=0),
        "coop-csc": CoOp(model, tok, NAMES, n_ctx=2, class_specific=True, seed=0),
        "clip-adapter": CLIPAdapter(model, tok, NAMES, text_alpha=0.2, template=TEMPLATE),
        "tip-adapter": TipAdapter.from_few_shot(model, tok, NAMES, labels, pixel_values=images, template=TEMPLATE),
        "tip-adapter-f": TipAdapter.from_few_shot(model, tok, NAMES, labels, pixel_values=images, fine_tune=True,
                                                  template=TEMPLATE),
    }, labels


TRAINED = {"coop": {"ctx"}, "coop-csc": {"ctx"}, "tip-adapter": set(), "tip-adapter-f": {"cache_keys"},
           "clip-adapter": {"visual.down.weight", "visual.up.weight", "text.down.weight", "text.up.weight"}}


def test_trainable_sets_gradients_and_model_untouched(clip, images):
    """Only the method's tensors train and get gradients; the loss falls; the CLIPModel (whose parameters
    require grad, as loaded) keeps its tensors, flags and hooks and gets no .grad."""
    model, tok = clip
    snap = snapshot(model)
    heads, labels = make_heads(model, tok, images)
    feats = heads["coop"].encode_images(images)
    for name, head in heads.items():
        assert {k for k, p in head.named_parameters() if p.requires_grad} == TRAINED[name], name
        assert set(head.state_dict()) >= TRAINED[name]
        if not TRAINED[name]:
            continue
        losses = train_steps(head, feats, labels)
        assert losses[-1] < losses[0], (name, losses)
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters() if p.requires_grad)
    assert_untouched(model, snap)


def test_tip_adapter_f_starts_at_tip_adapter(clip, images):
    model, tok = clip
    heads, _ = make_heads(model, tok, images)
    torch.testing.assert_close(heads["tip-adapter-f"](pixel_values=images), heads["tip-adapter"](pixel_values=images))


def test_save_load_round_trip(clip, images, tmp_path):
    model, tok = clip
    heads, labels = make_heads(model, tok, images)
    feats = heads["coop"].encode_images(images)
    for name, head in heads.items():
        if TRAINED[name]:
            train_steps(head, feats, labels, steps=3)
        path = head.save(tmp_path / name)
        assert path.suffix == ".safetensors"
        again = type(head).load(path, model, tok)
        assert again.classnames == NAMES and again.config() == head.config()
        assert set(again.state_dict()) == set(head.state_dict())
        assert all(torch.equal(again.state_dict()[k], v) for k, v in head.state_dict().items())
        torch.testing.assert_close(again(image_features=feats), head(image_features=feats), atol=1e-6, rtol=0)


@pytest.mark.parametrize("bad", [["red circle", ""], ["red circle", "   "]])
def test_class_names_that_tokenize_to_nothing(clip, images, bad):
    model, tok = clip
    snap = snapshot(model)
    for build in (lambda: CoOp(model, tok, bad), lambda: CLIPAdapter(model, tok, bad),
                  lambda: TipAdapter.from_few_shot(model, tok, bad, [0, 1], pixel_values=images[:2])):
        with pytest.raises(ValueError, match="tokenize to nothing") as e:
            build()
        assert repr(bad[1]) in str(e.value)
    assert_untouched(model, snap)


def test_bad_settings(clip, images):
    model, tok = clip
    with pytest.raises(ValueError, match=r"16 positions"):
        CoOp(model, tok, NAMES, n_ctx=12)  # start + 12 + "red circle ." + end = 17 > 16
    with pytest.raises(ValueError, match=r"is 2 tokens but n_ctx is 4"):
        CoOp(model, tok, NAMES, n_ctx=4, init_text="a red")
    with pytest.raises(ValueError, match="unique"):
        CoOp(model, tok, ["red circle", "red circle"])
    with pytest.raises(ValueError, match=r"8 few-shot images but 3 labels"):
        TipAdapter.from_few_shot(model, tok, NAMES, [0, 1, 2], pixel_values=images)
    with pytest.raises(ValueError, match=r"class indices in 0\.\.3"):
        TipAdapter.from_few_shot(model, tok, NAMES, [0, 4], pixel_values=images[:2])
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        CLIPAdapter(model, tok, NAMES, alpha=1.5)
    with pytest.raises(ValueError, match=r"this CLIP's are \[N, 64\]"):
        CoOp(model, tok, NAMES, n_ctx=2)(image_features=torch.zeros(2, 32))


def other_width_clip():
    """shapes-clip's architecture with 32-wide projections and a 32-wide text tower, from config."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig.from_pretrained(CLIP)
    config.projection_dim = config.vision_config.projection_dim = 32
    config.text_config.hidden_size, config.text_config.intermediate_size = 32, 64
    torch.manual_seed(0)
    return CLIPModel(config).eval()


def test_files_for_another_model_or_method(clip, images, tmp_path):
    """A cache / context / adapter file for another feature width: an error naming both widths, the model
    untouched; a file of another method: an error naming both methods."""
    model, tok = clip
    heads, _ = make_heads(model, tok, images)
    other = other_width_clip()
    snap = snapshot(other)
    for name, cls in (("tip-adapter", TipAdapter), ("coop", CoOp), ("clip-adapter", CLIPAdapter)):
        path = heads[name].save(tmp_path / name)
        with pytest.raises(ValueError) as e:
            cls.load(path, other, tok)
        msg = str(e.value)
        assert str(path) in msg and "32" in msg and "64" in msg, msg
    assert_untouched(other, snap)
    with pytest.raises(AdapterFileError, match=r"holds a 'coop' file, not 'tip-adapter'"):
        TipAdapter.load(tmp_path / "coop" / "coop.safetensors", model, tok)


def vit_b16_on_meta():
    """CLIP ViT-B/16's architecture (openai/clip-vit-base-patch16: text width 512, 12 layers, 8 heads, 77
    positions, vocabulary 49,408; vision width 768, 12 layers, 12 heads, 16 px patches of 224 px; projection
    512) on the meta device."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=16),
        projection_dim=512)
    with torch.device("meta"):
        return CLIPModel(config)


def test_counts_on_clip_vit_b16():
    """CoOp, 16 context tokens: 16 x 512 = 8,192 (the paper's unified context); class-specific on 1000 classes
    16 x 512 x 1000. CLIP-Adapter, reduction 4 on the 512-d image feature, bias-free as the released code:
    512 x 128 + 128 x 512 = 131,072 (262,144 with the text adapter). Tip-Adapter-F, 16 shots x 1000 classes:
    8,192,000 keys; Tip-Adapter trains none."""
    from transformers import CLIPTokenizer

    model, tok = vit_b16_on_meta(), CLIPTokenizer.from_pretrained(CLIP)  # any CLIP tokenizer builds the prompts
    assert sum(p.numel() for p in model.parameters()) == 149_620_737  # ViT-B/16's published ~149.6 M
    names = [f"class{i}" for i in range(1000)]
    count = lambda h: sum(p.numel() for p in h.parameters() if p.requires_grad)  # noqa: E731
    assert count(CoOp(model, tok, names[:10], n_ctx=16)) == 8_192
    assert count(CoOp(model, tok, names, n_ctx=16, class_specific=True)) == 8_192_000
    assert count(CLIPAdapter(model, tok, names[:10], reduction=4)) == 131_072
    assert count(CLIPAdapter(model, tok, names[:10], reduction=4, text_alpha=0.2)) == 262_144
    keys, values = torch.empty(16_000, 512, device="meta"), torch.empty(16_000, 1000, device="meta")
    assert count(TipAdapter(model, tok, names, keys, values, fine_tune=True)) == 8_192_000
    assert count(TipAdapter(model, tok, names, keys, values)) == 0


def test_coop_through_a_host_at_the_token_embedding(clip, images):
    """A text tower whose token embedding is a Host (textual inversion injected): CoOp's hook on it gives the
    same logits for names without the new token, gradients reach the context, and removing the adapter
    afterwards restores the model."""
    import peft_diffusion as pd
    from peft_diffusion.methods.token_rows import set_tokenizer
    from peft_diffusion.target import Target

    model, tok = clip
    other, other_tok = copy.deepcopy(model), copy.deepcopy(tok)
    set_tokenizer(other.text_model, other_tok)
    pd.inject(other.text_model, pd.TextualInversion(token="<x>", target=Target(
        include=(r"embeddings\.token_embedding",), types=("Embedding",))), freeze=False)
    assert type(other.text_model.embeddings.token_embedding).__name__ == "Host"
    a, b = CoOp(model, tok, NAMES, n_ctx=3, seed=0), CoOp(other, other_tok, NAMES, n_ctx=3, seed=0)
    feats = a.encode_images(images)
    torch.testing.assert_close(b(image_features=feats), a(image_features=feats), atol=1e-6, rtol=0)
    b(image_features=feats).logsumexp(-1).sum().backward()
    assert b.ctx.grad is not None and b.ctx.grad.abs().sum() > 0
    pd.remove(other.text_model, "default")
    assert set(other.state_dict()) == set(model.state_dict())


def test_adapters_injected_into_clip_train_through_the_heads(clip, images):
    """LoRA injected into both towers (pd.inject, base frozen) trains through the heads; the base tensors get no
    gradient and keep their flags. (LoRA's B starts at zero: the first gradients reach B only.)"""
    import peft_diffusion as pd
    from peft_diffusion.methods.clip_heads import adapter_parameters
    from peft_diffusion.target import Target

    model, tok = clip
    other = copy.deepcopy(model)
    for tower in (other.text_model, other.vision_model):
        pd.inject(tower, pd.LoRA(r=2, target=Target(include=(r".*q_proj", r".*v_proj"), types=("Linear",))))
    lora = adapter_parameters(other)
    assert lora and all(p.requires_grad for p in lora)
    ours = {id(p) for p in lora}
    flags = {k: p.requires_grad for k, p in other.named_parameters()}
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    # CoOp: its text features and the image features (from pixels) both carry graphs; CLIP-Adapter's class
    # text features are fixed at build, so only the vision tower's LoRA learns through it
    heads = {("text_model", "vision_model"): CoOp(other, tok, NAMES, n_ctx=2, seed=0),
             ("vision_model",): CLIPAdapter(other, tok, NAMES, template=TEMPLATE)}
    for towers, head in heads.items():
        nn.functional.cross_entropy(head(pixel_values=images), labels).backward()
        got = {k for k, p in other.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert all("lora_B" in k for k in got), sorted(got)
        assert {k.split(".")[0] for k in got} == set(towers), sorted(got)
        assert all(p.grad is None for p in other.parameters() if id(p) not in ours)
        for p in lora:
            p.grad = None
    assert {k: p.requires_grad for k, p in other.named_parameters()} == flags
    # without a trainable adapter the image features carry no graph (the frozen tower costs no memory)
    assert not CLIPAdapter(model, tok, NAMES).encode_images(images[:1]).requires_grad and \
        not CoOp(model, tok, NAMES, n_ctx=2).encode_images(images[:1]).requires_grad


@pytest.mark.slow
def test_fewshot_table_script_runs_and_its_zero_shot_row_is_the_cards(tmp_path):
    """samples/clip_fewshot_table.py end to end, shortened (1 shot, 3 steps): every arm is measured, and the
    zero-shot row on its test sets is the model card's striped-domain and world figures."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "samples" / "clip_fewshot_table.py"), "--shots=1", "--domains=striped",
           "--steps=3", "--prompt-steps=2", f"--out={tmp_path}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True, timeout=300)
    rows = json.loads((tmp_path / "results.json").read_text())["striped"]
    assert len(rows) == 11 and all("1" in row for row in rows.values())  # 8 heads + VPT-shallow/-deep, VP
    card = json.loads((CLIP / "metrics.json").read_text())
    zero = rows["zero-shot CLIP"]["1"]
    assert zero["shifted"] == pytest.approx(card["shifted_striped"]["both"], abs=1e-6)
    assert zero["world"] == pytest.approx(card["zero_shot"]["both"], abs=1e-6)
