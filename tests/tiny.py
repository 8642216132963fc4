"""Tiny models built from config, deterministically, with nothing downloaded.

Plain functions: ``tiny_<model>()`` builds a model in eval mode (seeded), ``<model>_inputs()`` builds an
example input (a dict of keyword arguments, also seeded), and ``run(model, inputs)`` returns the main
output tensor. The Stable-Diffusion parts come from ``peft_diffusion.tiny`` (the samples use them too).
"""
from __future__ import annotations

import torch

from peft_diffusion.tiny import (SEED, SEQ, TEXT_HIDDEN, UNET_CONFIG, tiny_clip_text, tiny_clip_tokenizer,  # noqa: F401
                                 tiny_scheduler, tiny_sd_pipeline, tiny_unet, tiny_vae, write_clip_vocab)


def unet_inputs(batch: int = 1, seq: int = 8):
    g = torch.Generator().manual_seed(SEED + 1)
    return {
        "sample": torch.randn(batch, 4, 16, 16, generator=g),
        "timestep": torch.tensor([10] * batch),
        "encoder_hidden_states": torch.randn(batch, seq, UNET_CONFIG["cross_attention_dim"], generator=g),
    }


def unet_image_inputs(batch: int = 1):
    """U-Net inputs with an image prompt as diffusers' pipelines pass one (``added_cond_kwargs``): 5 x 16 features,
    five images' 16-wide embeddings to a plain IP-Adapter, one image's 5 patch features to a plus one."""
    g = torch.Generator().manual_seed(SEED + 7)
    return {**unet_inputs(batch), "added_cond_kwargs": {"image_embeds": [torch.randn(batch, 5, 16, generator=g)]}}


PER_CALL = "per_call"  # an inputs dict's per-call inputs: given with ``pd.inputs`` around the call (``call``)


def unet_control_inputs(batch: int = 1):
    """U-Net inputs with a condition image as a per-call input (T2I-Adapter, ControlNet): [B, 3, 32, 32] in [0, 1]
    (the 16 x 16 latents of a factor-2 VAE)."""
    g = torch.Generator().manual_seed(SEED + 8)
    return {**unet_inputs(batch), PER_CALL: {"control_image": torch.rand(batch, 3, 32, 32, generator=g)}}


def clip_text_inputs(vocab_size: int = 1000, batch: int = 1, seq: int = 8):
    g = torch.Generator().manual_seed(SEED + 2)
    return {"input_ids": torch.randint(3, vocab_size - 1, (batch, seq), generator=g)}



def pipe_call_kwargs(steps: int = 2):
    """Arguments for a deterministic, cheap pipeline call returning latents-decoded numpy images."""
    return dict(prompt="a photo of a cat", num_inference_steps=steps, guidance_scale=1.0, height=32, width=32,
                output_type="np", generator=torch.Generator().manual_seed(SEED))


# ---------------------------------------------------------------- other backbones for the presets

def tiny_clip_vision():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(SEED)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32)
    return CLIPVisionModel(config).eval()


def clip_vision_inputs(batch: int = 1):
    g = torch.Generator().manual_seed(SEED + 3)
    return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}


def tiny_clip():
    """A tiny transformers CLIPModel (text and vision towers, projections): the VLM backbone."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(SEED)
    config = CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=2,
                         pad_token_id=2),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)
    return CLIPModel(config).eval()


def clip_inputs(batch: int = 1):
    g = torch.Generator().manual_seed(SEED + 7)
    return {"input_ids": torch.randint(3, 98, (batch, 8), generator=g),
            "pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}


def tiny_t5_encoder():
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(SEED)
    config = T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, dropout_rate=0.0)
    return T5EncoderModel(config).eval()


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(SEED)
    config = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=64)
    return BertModel(config).eval()


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(SEED)
    config = GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=98,
                        eos_token_id=98)
    return GPT2LMHeadModel(config).eval()


def token_inputs(vocab_size: int = 99, batch: int = 1, seq: int = 8):
    g = torch.Generator().manual_seed(SEED + 4)
    return {"input_ids": torch.randint(0, vocab_size, (batch, seq), generator=g)}


def tiny_pixart():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(SEED)
    return PixArtTransformer2DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8,
                                    num_attention_heads=2, caption_channels=32, in_channels=4,
                                    cross_attention_dim=16, out_channels=8, norm_num_groups=8).eval()


def pixart_inputs(batch: int = 1):
    g = torch.Generator().manual_seed(SEED + 5)
    return {
        "hidden_states": torch.randn(batch, 4, 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(batch, 6, 32, generator=g),
        "timestep": torch.tensor([10] * batch),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }


def tiny_dit():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(SEED)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2,
                                 sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=8).eval()


def dit_inputs(batch: int = 1):
    g = torch.Generator().manual_seed(SEED + 6)
    return {"hidden_states": torch.randn(batch, 4, 8, 8, generator=g), "timestep": torch.tensor([10] * batch),
            "class_labels": torch.tensor([1] * batch)}


def clip_tokenizer():
    """The tiny CLIP tokenizer (its vocabulary files written to a temporary folder, read, then deleted)."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        return tiny_clip_tokenizer(folder)


def tiny_clip_text_tokenizer():
    """The tiny CLIP text encoder sized to the tiny tokenizer, with that tokenizer set (for token methods)."""
    from peft_diffusion.methods.token_rows import set_tokenizer

    tokenizer = clip_tokenizer()
    model = tiny_clip_text(vocab_size=len(tokenizer), bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id)
    return set_tokenizer(model, tokenizer)


def prompt_inputs(prompt: str = "a photo of a cat"):
    return {"input_ids": clip_tokenizer()(prompt, return_tensors="pt").input_ids}


# name -> (builder, inputs builder), for tests that walk every backbone
MODELS = {
    "unet": (tiny_unet, unet_inputs),
    "unet-image": (tiny_unet, unet_image_inputs),  # with an image prompt: IP-Adapter
    "unet-control": (tiny_unet, unet_control_inputs),  # with a condition image (per-call): T2I-Adapter, ControlNet
    "clip-text": (tiny_clip_text, clip_text_inputs),
    "clip-text-tokenizer": (tiny_clip_text_tokenizer, prompt_inputs),  # tokenizer set: token methods
    "clip-vision": (tiny_clip_vision, clip_vision_inputs),
    "clip": (tiny_clip, clip_inputs),  # CLIPModel: both towers
    "t5": (tiny_t5_encoder, token_inputs),
    "bert": (tiny_bert, token_inputs),
    "llama": (tiny_llama, token_inputs),
    "gpt2": (tiny_gpt2, token_inputs),
    "pixart": (tiny_pixart, pixart_inputs),
    "dit": (tiny_dit, dit_inputs),
}


def main_output(out) -> torch.Tensor:
    """The main tensor of a model output (sample / logits / last hidden state)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple):
        return out[0]
    for key in ("sample", "logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if value is not None:
            return value
    return out[0]


def call(model, inputs: dict):
    """``model(**inputs)``, inside ``pd.inputs(model, **inputs[PER_CALL])`` when the inputs carry per-call ones."""
    inputs = dict(inputs)
    named = inputs.pop(PER_CALL, None)
    if not named:
        return model(**inputs)
    import peft_diffusion as pd

    with pd.inputs(model, **named):
        return model(**inputs)


def run(model, inputs: dict) -> torch.Tensor:
    """The model's main output tensor for keyword inputs, without autograd."""
    with torch.no_grad():
        return main_output(call(model, inputs))


# ---------------------------------------------------------------- helpers for adapter tests

def randomize(obj, name: str = "default", attr: str = "lora_B", std: float = 0.05, seed: int = 1) -> None:
    """Fill ``attr``'s weight of every delta of adapter ``name`` with N(0, std^2) (B is zero at init)."""
    from peft_diffusion.api import hosts

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, host in hosts(obj):
            if name in host.deltas:
                w = getattr(host.deltas[name], attr).weight
                w.copy_(torch.randn(w.shape, generator=g) * std)


def perturb_trainable(model, std: float = 0.05, seed: int = 2) -> None:
    """Add N(0, std^2) noise to every parameter that requires grad."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)


def module_types(model) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules()}


def hooks_and_processors(model) -> dict[str, tuple]:
    """Per module: its forward (pre-)hooks, the attributes in its instance dict that shadow parameters, and
    its diffusers attention processor's class; what a removed adapter must leave exactly as it found it."""
    out = {}
    for n, m in model.named_modules():
        shadow = sorted(k for k in vars(m) if k in m._parameters or k in m._buffers)
        processor = type(m.processor).__name__ if hasattr(m, "processor") else None
        out[n] = (tuple(m._forward_pre_hooks), tuple(m._forward_hooks), tuple(m._backward_hooks), shadow, processor)
    return out


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
