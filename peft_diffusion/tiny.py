"""Tiny Stable-Diffusion-architecture parts built from config: for tests, samples and docs.

Random weights, every component of a real ``StableDiffusionPipeline`` (U-Net, VAE, CLIP text encoder with
a byte-level BPE tokenizer whose vocab.json / merges.txt are written locally, scheduler). Nothing is
downloaded. Save the pipeline with ``save_pretrained`` and reload it with ``from_pretrained`` to exercise the
code path users run.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

SEED = 0

# ---------------------------------------------------------------- Stable Diffusion parts

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=(2, 4),
    norm_num_groups=8,
)
TEXT_HIDDEN = 32
SEQ = 77  # the tokenizer pads to this; CLIP's max positions


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(SEED)
    return UNet2DConditionModel(**UNET_CONFIG).eval()


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(SEED)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    ).eval()


def tiny_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable unicode map (the byte-level alphabet)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


WORDS = ("a", "photo", "of", "the", "cat", "dog", "sks", "in", "style", "painting", "picture", "an", "on", "with")


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: merge the best-ranked adjacent pair (every occurrence) until none applies."""
    while len(symbols) > 1:
        best = min(zip(symbols, symbols[1:]), key=lambda pair: ranks.get(pair, len(ranks) + 1))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def write_clip_vocab(directory: str | Path, words=WORDS) -> tuple[Path, Path]:
    """Write a small byte-level BPE vocabulary in CLIP's layout (vocab.json, merges.txt).

    Like CLIP's: every byte symbol, every byte symbol + "</w>", then merges that make each of ``words``
    one token, then the two special tokens; other text falls back to smaller pieces. A word's merges are
    added until BPE, run with every merge so far, turns it into one piece; a merge added later ranks
    lower, so it never changes how an earlier word splits. Returns the two paths.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    byte_map = _bytes_to_unicode()
    alphabet = list(byte_map.values())
    tokens = dict.fromkeys(alphabet + [c + "</w>" for c in alphabet])
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(words):
        chars = [byte_map[b] for b in word.encode("utf-8")]
        symbols = chars[:-1] + [chars[-1] + "</w>"]
        while len(pieces := _bpe(symbols, ranks)) > 1:
            ranks[(pieces[0], pieces[1])] = len(ranks)
            tokens[pieces[0] + pieces[1]] = None
    vocab = {t: i for i, t in enumerate([*tokens, "<|startoftext|>", "<|endoftext|>"])}
    vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in ranks) + "\n", encoding="utf-8")
    return vocab_path, merges_path


def tiny_clip_tokenizer(directory: str | Path, words=WORDS):
    from transformers import CLIPTokenizer

    write_clip_vocab(directory, words)
    return CLIPTokenizer.from_pretrained(str(directory), model_max_length=SEQ)


def tiny_clip_text(vocab_size: int = 1000, bos: int = 0, eos: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(SEED)
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=37,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=SEQ,
                            projection_dim=32, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    return CLIPTextModel(config).eval()


def tiny_sd_pipeline(directory: str | Path):
    """A tiny StableDiffusionPipeline; its tokenizer files are written under ``directory/tokenizer-src``."""
    from diffusers import StableDiffusionPipeline

    tokenizer = tiny_clip_tokenizer(Path(directory) / "tokenizer-src")
    text_encoder = tiny_clip_text(vocab_size=len(tokenizer), bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id)
    return StableDiffusionPipeline(vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=tiny_unet(),
                                   scheduler=tiny_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
