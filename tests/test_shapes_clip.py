"""The embedded CLIP model (``peft_diffusion/models/shapes-clip``) and its script ``train/pretrain_clip.py``."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peft_diffusion.models import path as embedded_path
from peft_diffusion.shapes import clip_eval, world

ROOT = Path(__file__).resolve().parents[1]
CLIP = embedded_path("shapes-clip")
BASE = embedded_path("shapes-base")


def test_loads_as_users_load_it_and_shares_the_pipelines_text_tower():
    """CLIPModel / CLIPVisionModelWithProjection / CLIPImageProcessor / CLIPTokenizer all load the folder with no
    dtype argument; the text tower's tensors are the pipeline's text encoder's, bit for bit."""
    from safetensors.torch import load_file
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer, CLIPVisionModelWithProjection

    model = CLIPModel.from_pretrained(CLIP)
    vision = CLIPVisionModelWithProjection.from_pretrained(CLIP)
    assert next(model.parameters()).dtype == torch.float32
    text = load_file(str(BASE / "text_encoder" / "model.safetensors"))
    ours = model.text_model.state_dict()
    assert {k.removeprefix("text_model.") for k in text} == set(ours)
    assert all(torch.equal(ours[k.removeprefix("text_model.")], v) for k, v in text.items())
    tok, base_tok = CLIPTokenizer.from_pretrained(CLIP), CLIPTokenizer.from_pretrained(BASE / "tokenizer")
    assert tok.get_vocab() == base_tok.get_vocab()
    proc = CLIPImageProcessor.from_pretrained(CLIP)
    images = [s.image for s in world.dataset(4, seed=3)]
    pixels = proc(images=images, return_tensors="pt").pixel_values
    assert torch.allclose(pixels, clip_eval.pixel_values(images), atol=1e-6)  # the processor = the training input
    with torch.no_grad():
        a = vision(pixel_values=pixels).image_embeds
        b = model.get_image_features(pixel_values=pixels)
    b = b if torch.is_tensor(b) else b.pooler_output
    torch.testing.assert_close(a, b)


def test_card_figures_are_the_models():
    """The zero-shot figures of metrics.json (the card's source) re-measured with the same evaluation."""
    from transformers import CLIPModel, CLIPTokenizer

    metrics = json.loads((CLIP / "metrics.json").read_text())
    model, tok = CLIPModel.from_pretrained(CLIP).eval(), CLIPTokenizer.from_pretrained(CLIP)
    n = metrics["eval_images"] if "eval_images" in metrics else 1000
    again = clip_eval.evaluate_clip(model, tok, n=n)
    for part in ("zero_shot", "shifted_striped", "shifted_cross"):
        for k, v in metrics[part].items():
            assert again[part][k] == pytest.approx(v, abs=1e-6), (part, k)
    card = (CLIP / "README.md").read_text()
    assert f"{metrics['zero_shot']['shape']:.1%}" in card and "Rebuild: `python train/pretrain_clip.py`" in card


@pytest.mark.slow
def test_pretrain_script_short_run_loss_falls(tmp_path):
    """train/pretrain_clip.py end to end, shortened: the loss falls and the folder loads with the text tower
    unchanged."""
    out = tmp_path / "clip"
    cmd = [sys.executable, str(ROOT / "train" / "pretrain_clip.py"), f"--out={out}", f"--base={BASE}",
           "--threads=1", "--n_images=512", "--steps=40", "--batch=64", "--warmup=5", "--eval_images=50"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["loss_last"] < 0.9 * metrics["loss_first"], metrics
    assert metrics["text_tower_is_the_pipelines"] is True
    assert "Rebuild: `python train/pretrain_clip.py`" in (out / "README.md").read_text()
