"""Every registered method trains through the DreamBooth trainer by changing only the ``[method]`` table.

For each method: a short run on the tiny pipeline checkpoints only adapter tensors and exports one file; the
file loads into a fresh pipeline with ``load_adapter``; the loaded pipeline's U-Net prediction for the
instance prompt differs from the base's; removing the adapter gives the base's prediction back exactly.
A registered method without a table here fails.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import peft_diffusion as pd
from peft_diffusion.registry import METHODS
from peft_diffusion.methods.token_rows import expand_prompt
from peft_diffusion.training import dreambooth as db
from test_dreambooth import make_config

# the token methods name a new token "<sks>" (the instance captions say "sks": they are rewritten)
TABLES = {
    "lora": {"method": "lora", "r": 2},
    "dora": {"method": "dora", "r": 2},
    "delta-lora": {"method": "delta-lora", "r": 2, "start_step": 1},
    "increlora": {"method": "increlora", "r": 1, "max_r": 2, "target_rank": 2, "interval": 1, "warmup": 1},
    "loha": {"method": "loha", "r": 2},
    "lokr": {"method": "lokr", "r": 2},
    "krona": {"method": "krona", "target": "unet-cross-attn", "factor": 4},
    "diffusekrona": {"method": "diffusekrona", "factor": [4, 2]},
    "textual-inversion": {"method": "textual-inversion", "token": "<sks>", "num_vectors": 2, "init_word": "cat"},
    "ed-lora": {"method": "ed-lora", "token": "<sks>", "init_word": "cat"},
    # masked / sparse selective methods (scoring passes run before training; Diff pruning prunes at the end)
    "masking": {"method": "masking", "threshold": 0.01, "init_scale": 1.05},
    "fish": {"method": "fish", "density": 0.05, "scoring_batches": 2},
    "child-tuning-d": {"method": "child-tuning-d", "density": 0.05, "scoring_batches": 2},
    "child-tuning-f": {"method": "child-tuning-f", "density": 0.5},
    "diff-pruning": {"method": "diff-pruning", "density": 0.05, "l0_weight": 1e-4},
    "lt-sft": {"method": "lt-sft", "density": 0.05, "scoring_batches": 2, "dense_lr": 1e-3},
    # dense selective methods
    "partial-ft": {"method": "partial-ft", "blocks": ["up_blocks.1.attentions"]},
    "bitfit": {"method": "bitfit"},
    "ln-tuning": {"method": "ln-tuning"},
    "difffit": {"method": "difffit"},
    # bottleneck adapters (annexes on the U-Net's transformer blocks)
    "houlsby": {"method": "houlsby", "reduction": 4},
    "pfeiffer": {"method": "pfeiffer", "reduction": 4},
    "parallel-adapter": {"method": "parallel-adapter", "reduction": 4, "scale": 0.5},
    "compacter": {"method": "compacter", "reduction": 4, "phm_dim": 2},
    "compacter++": {"method": "compacter++", "reduction": 4, "phm_dim": 2},
    # an image prompt per item (the instance image, through a tiny CLIP image encoder: IMAGE_ENCODER)
    "ip-adapter": {"method": "ip-adapter"},
    # a condition map per item (canny maps detected from the instance images: the folder holds no map files);
    # no prior preservation (class images have no maps): CONTROL
    "t2i-adapter": {"method": "t2i-adapter", "control_type": "canny", "num_res_blocks": 1},
    "controlnet": {"method": "controlnet", "control_type": "canny"},
    "controlnet-lora": {"method": "controlnet-lora", "control_type": "canny", "r": 2},
    "controlnext": {"method": "controlnext", "control_type": "canny", "embedding_channels": [8, 16],
                    "channels": [16, 32], "time_channels": 16, "time_embed_dim": 32},
    # key/value prefixes in the U-Net's cross-attention (prefix tuning folds its MLP on the last step)
    "prefix-tuning": {"method": "prefix-tuning", "num_virtual_tokens": 4},
    "p-tuning-v2": {"method": "p-tuning-v2", "num_virtual_tokens": 4},
    # hybrids: prefixes in the cross-attention + a parallel FFN adapter (MAM); gated LoRA on to_q / to_v +
    # gated prefixes + a gated FFN adapter (UniPELT); both fold their prefix MLP on the last step
    "mam": {"method": "mam", "num_virtual_tokens": 4, "size": 8},
    "unipelt": {"method": "unipelt", "num_virtual_tokens": 4, "encoder_hidden_size": 8, "r": 2, "size": 8},
    # a token-dependent shift after the feed-forward of the U-Net's transformer blocks
    "adapter-bias": {"method": "adapter-bias"},
    # a mixture of FFN adapters routed at random while training, averaged in the exported prediction
    "adamix": {"method": "adamix", "reduction": 4},
    # FacT on the U-Net's attention + FF projections, U / V shared by all of them
    "fact": {"method": "fact", "r": 2},
}
# methods that take a condition image: trained without prior preservation, predicted with a condition
CONTROL = {"t2i-adapter", "controlnet", "controlnet-lora", "controlnext"}
# methods that take an image prompt: their run gets a tiny image encoder, their prediction an image embedding
IMAGE_ENCODER = {"ip-adapter"}


@pytest.fixture(scope="session")
def image_encoder_dir(tmp_path_factory):
    from test_ip_adapter import tiny_image_encoder

    folder = tmp_path_factory.mktemp("image-encoder")
    tiny_image_encoder().save_pretrained(folder)
    return folder


# methods for class-conditional DiTs train through the trainer's DiT side, on a DiT base (tests/test_dit.py:
# test_train_new_class_and_generate_it); every other method trains on the U-Net pipeline here
DIT_ONLY = {"new-class"}
# methods for the language backbones (no U-Net to train): input soft prompts need n positions beyond the input,
# and the pipelines pad the text encoder's input to its whole position table (77 of CLIP's 77); LLaMA-Adapter
# needs LLaMA attention. tests/test_soft_prompts.py, samples/lm_prompt_table.py and samples/llama_adapter_lm.py
# train them on the shapes LM until the trainer has an LM task
LANGUAGE_ONLY = {"prompt-tuning", "p-tuning", "llama-adapter"}


# visual prompts for a CLIP vision tower: no DreamBooth role (the pipeline's image encoder only feeds IP-Adapter);
# they train through the CLIP heads (samples/clip_fewshot_table.py) until the trainer has a CLIP task
CLIP_VISION_ONLY = {"vpt", "vp"}
# Convpass: bypasses on the vision tower's square patch grid (a U-Net block does not see its grid's shape)
CLIP_VISION_ONLY |= {"convpass"}


def test_every_method_has_a_table():
    assert sorted(TABLES) == sorted(set(METHODS) - DIT_ONLY - LANGUAGE_ONLY - CLIP_VISION_ONLY)
    assert DIT_ONLY | LANGUAGE_ONLY | CLIP_VISION_ONLY <= set(METHODS)


@pytest.fixture
def token_instances(instance_dir, tmp_path):
    folder = tmp_path / "subject-token"
    folder.mkdir()
    for f in instance_dir.iterdir():
        if f.suffix == ".txt":
            (folder / f.name).write_text(f.read_text().replace("sks", "<sks>"))
        else:
            (folder / f.name).write_bytes(f.read_bytes())
    return folder


def _prediction(pipe, prompt: str) -> torch.Tensor:
    ids = pipe.tokenizer(expand_prompt(prompt, pipe.tokenizer), padding="max_length", return_tensors="pt",
                         max_length=pipe.tokenizer.model_max_length, truncation=True).input_ids
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        return pipe.unet(latents, torch.tensor([500]), pipe.text_encoder(ids)[0]).sample


@pytest.mark.parametrize("method", sorted(TABLES))
def test_method_trains_exports_and_loads(method, tiny_pipe_dir, instance_dir, token_instances, class_cache, tmp_path,
                                         image_encoder_dir):
    import contextlib

    from diffusers import StableDiffusionPipeline

    table = TABLES[method]
    token = "token" in table
    extra = {"image_encoder": str(image_encoder_dir)} if method in IMAGE_ENCODER else {}
    if method in CONTROL:
        extra["prior_preservation"] = False
    cfg = make_config(tiny_pipe_dir, token_instances if token else instance_dir, class_cache, tmp_path / "run",
                      steps=3, lr=2e-2, method=table, checkpoint_every=3, **extra)
    path = db.train(cfg)
    trained = load_file(path.parent / "checkpoints/step-000003/trainable.safetensors")
    assert trained and all(".deltas.dreambooth." in k for k in trained)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    prompt = "a <sks> cross" if token else "a sks cross"
    image = torch.randn(1, 16, generator=torch.Generator().manual_seed(0))
    given = pd.inputs(pipe, image_embeds=image) if method in IMAGE_ENCODER else contextlib.nullcontext()
    if method in CONTROL:  # the 8 x 8 latents of _prediction: a 16 x 16 condition (the tiny VAE's factor 2)
        given = pd.inputs(pipe, control_image=torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)))
    with given:
        base = _prediction(pipe, "a sks cross")
        name = pd.load_adapter(pipe, path)
        loaded = {f"{c}.{k}": v for c, m in pd.api.modules_of(pipe).items() for k, v in m.state_dict().items()
                  if ".deltas." in k}
        assert loaded, "nothing loaded"
        after = _prediction(pipe, prompt)
        assert (after - base).abs().max() > 1e-4, f"{method}: the trained adapter changes nothing"
        pd.remove(pipe, name)
        torch.testing.assert_close(_prediction(pipe, "a sks cross"), base, atol=0, rtol=0)


@pytest.mark.parametrize("method", ["delta-lora", "increlora"])
def test_trainer_exports_their_plain_lora_for_diffusers(method, tiny_pipe_dir, instance_dir, class_cache, tmp_path):
    """Same run twice (seeded): the native file loaded here and the diffusers export loaded by diffusers'
    own ``load_lora_weights`` predict the same."""
    from diffusers import StableDiffusionPipeline

    preds = {}
    for fmt in ("native", "diffusers"):
        cfg = make_config(tiny_pipe_dir, instance_dir, class_cache, tmp_path / fmt, steps=3, lr=2e-2,
                          method=TABLES[method], export_format=fmt)
        path = db.train(cfg)
        pipe = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
        if fmt == "native":
            pd.load_adapter(pipe, path)
        else:
            pipe.load_lora_weights(path)
        preds[fmt] = _prediction(pipe, "a sks cross")
    base = _prediction(StableDiffusionPipeline.from_pretrained(tiny_pipe_dir), "a sks cross")
    assert (preds["native"] - base).abs().max() > 1e-4
    torch.testing.assert_close(preds["diffusers"], preds["native"], atol=1e-5, rtol=0)
