"""A tiny Stable-Diffusion-architecture pipeline built from config: for tests, samples and docs.

Random weights, every component of a real ``StableDiffusionPipeline`` (U-Net, VAE, CLIP text encoder
with a word-level tokenizer whose files are written locally, scheduler). Nothing is downloaded. Save it
with ``save_pretrained`` and reload it with ``from_pretrained`` to exercise the code path users run.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

WORDS = ("a photo of sks cat dog red blue green circle square star on white black background picture "
         "the small large painting").split()


def write_tokenizer_files(folder: str | Path, words=WORDS) -> Path:
    """vocab.json and merges.txt of a small CLIP BPE tokenizer in which every word is one token.

    The vocabulary holds the letters a-z (alone and word-final), the merges that build each word letter
    by letter, the intermediate pieces, and the two special tokens; other text falls back to letters.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = letters + [c + "</w>" for c in letters]
    merges: list[str] = []
    for word in dict.fromkeys(words):
        left = word[0] if len(word) > 1 else word + "</w>"
        for i, right in enumerate(word[1:], start=1):
            right = right + "</w>" if i == len(word) - 1 else right
            merges.append(f"{left} {right}")
            left += right
            tokens.append(left)
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens + ["<|startoftext|>", "<|endoftext|>"]))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return folder


def tiny_pipeline(seed: int = 0, text_dim: int = 32, words=WORDS):
    """A ``StableDiffusionPipeline`` of about 0.3 M parameters working on 32x32 images (16x16 latents)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_dim, attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32)
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(tmp, words)
        tokenizer = CLIPTokenizer(f"{tmp}/vocab.json", f"{tmp}/merges.txt", model_max_length=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=text_dim, intermediate_size=2 * text_dim, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=len(tokenizer), max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
