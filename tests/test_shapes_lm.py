"""The embedded shapes LM (peft_diffusion/models/shapes-lm): it loads as users load it, its tokenizer covers the
language, its model card's figures re-measure, adapters run on it, and its script rebuilds it (slow)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

import peft_diffusion as pd
from peft_diffusion.models import path as model_path
from peft_diffusion.shapes import language, world

REPO = Path(__file__).resolve().parents[1]
LM = model_path(language.SHAPES_LM)


@pytest.fixture(scope="module")
def lm():
    return language.load_lm()


def test_loads_with_plain_from_pretrained_in_fp32():
    model = LlamaForCausalLM.from_pretrained(LM)
    tokenizer = AutoTokenizer.from_pretrained(LM)
    assert model.dtype == torch.float32 and model.config.dtype == torch.float32
    assert len(tokenizer) == model.config.vocab_size == len(language.VOCAB)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    assert (LM / "README.md").is_file() and (LM / "generation_config.json").is_file()
    assert sum(f.stat().st_size for f in LM.glob("*.safetensors")) < 10 * 2**20


def test_tokenizer_covers_every_line_and_round_trips(lm):
    _, tokenizer = lm
    prompt, answer = "a large red circle on a pink background, top left. Q: what colour is the shape? A:", "red"
    ids = tokenizer(language.line(prompt, answer)).input_ids
    assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer.convert_ids_to_tokens(ids)[-11:] == ["left", ".", "Q:", "what", "colour", "is", "the", "shape",
                                                          "?", "A:", "red"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == language.line(prompt, answer)
    for _, p, a in language.examples(language.TYPES, 30, seed=1, split="all"):
        assert tokenizer.unk_token_id not in tokenizer(language.line(p, a)).input_ids
    for attrs in language.combos("all"):
        assert tokenizer.unk_token_id not in tokenizer(world.caption(attrs)).input_ids


def test_split_is_disjoint_and_covers_the_world():
    train, test = language.combos("train"), language.combos("test")
    key = lambda a: tuple(sorted(a.items()))  # noqa: E731
    assert not {key(a) for a in train} & {key(a) for a in test}
    assert len(train) + len(test) == len(language.combos("all")) == 2520
    assert any(a["striped"] for a in test) and set(language.HELD_OUT_TYPES) | set(language.PRETRAINED_TYPES) == set(language.TYPES)
    assert language.examples(("position",), 5, seed=3) == language.examples(("position",), 5, seed=3)
    answers = [a for _, _, a in language.examples(("striped", "is_colour"), 400, seed=0, split="train")]
    assert 0.4 < answers.count("yes") / len(answers) < 0.6  # balanced yes/no


def test_vocabulary_mismatch_is_a_clear_error_before_any_work(lm):
    model, _ = lm
    bigger = AutoTokenizer.from_pretrained(LM)
    bigger.add_tokens(["hexagon"])
    with pytest.raises(ValueError, match=rf"{len(language.VOCAB) + 1} tokens but the model expects vocab_size "
                                         rf"{len(language.VOCAB)}"):
        language.evaluate_lm(model, bigger, n=1)


def test_model_card_figures_re_measure(lm):
    """The card's accuracies (metrics.json) come back from the embedded model; pretrained types pass the bar."""
    metrics = json.loads((LM / "metrics.json").read_text())
    acc = language.evaluate_lm(*lm, language.TYPES, n=metrics["eval"]["n"], seed=metrics["eval"]["seed"])
    for qtype, value in acc.items():
        assert value == pytest.approx(metrics["accuracy"][qtype], abs=0.01), qtype  # argmax ties may flip by thread count
    assert min(acc[t] for t in language.PRETRAINED_TYPES) >= 0.9
    assert "python -m peft_diffusion.shapes.language" in (LM / "README.md").read_text()


def _batch(tokenizer, types, n, seed):
    lines = [language.line(p, a) for _, p, a in language.examples(types, n, seed, split="train")]
    enc = tokenizer([t + tokenizer.eos_token for t in lines], padding=True, return_tensors="pt",
                    add_special_tokens=True)
    return enc.input_ids, enc.attention_mask, enc.input_ids.masked_fill(enc.attention_mask == 0, -100)


def test_lora_injects_trains_saves_loads_and_fuses(lm, tmp_path):
    """The llama preset: LoRA(r=4) on every attention and MLP projection; one step moves only the adapter."""
    _, tokenizer = lm
    model = LlamaForCausalLM.from_pretrained(LM)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pd.inject(model, pd.LoRA(r=4), "x")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".deltas.x.lora_" in n for n in trainable)
    hosts = [n for n, m in model.named_modules() if isinstance(m, pd.Host)]
    assert len(hosts) == 7 * model.config.num_hidden_layers  # q k v o gate up down in every layer
    ids, mask, labels = _batch(tokenizer, ("background",), 4, seed=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    opt.step()
    with torch.no_grad():
        tuned = model(input_ids=ids, attention_mask=mask).logits
    path = pd.save_adapter(model, tmp_path / "x.safetensors", name="x")

    fresh = LlamaForCausalLM.from_pretrained(LM)
    assert {k: v for k, v in fresh.state_dict().items()}.keys() == before.keys()
    assert pd.load_adapter(fresh, path) == "x"
    with torch.no_grad():
        loaded = fresh(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(loaded, tuned)
        pd.fuse(fresh)
        torch.testing.assert_close(fresh(input_ids=ids, attention_mask=mask).logits, tuned, atol=1e-4, rtol=1e-4)
    base = LlamaForCausalLM.from_pretrained(LM)
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=ids, attention_mask=mask).logits, tuned)


@pytest.mark.slow
def test_script_rebuilds_and_loss_falls(tmp_path):
    """A shortened ``train/pretrain_lm.py`` end to end (50 steps, ~15-35 s on shared cores): folder written, loss falls."""
    out = tmp_path / "lm"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "train/pretrain_lm.py"), f"--out={out}", "--steps=50",
                           "--warmup=10", "--log_every=20", "--eval_n=5", "--threads=1"],
                          env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["loss_end"] < 0.5 * metrics["loss_start"], metrics
    model, tokenizer = language.load_lm(out)
    assert model.dtype == torch.float32 and len(tokenizer) == model.config.vocab_size
    assert "Rebuild: `python train/pretrain_lm.py`" in (out / "README.md").read_text()
    assert np.isfinite(metrics["times"]["train_cpu_s"])
