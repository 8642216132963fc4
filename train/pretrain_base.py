"""Pretrain the embedded base model: a tiny Stable-Diffusion-architecture pipeline on the shapes world.

    python train/pretrain_base.py [--key=value ...]      (about 15-25 minutes on 2 CPU cores)

Stages, in order: the oracle (the measuring instrument, trained on generator images only), the VAE, the
U-Net (the CLIP text encoder stays frozen at its seeded random init: on this world a trained one is no
better), then evaluation of generated images by the oracle on held-out prompts. Writes a diffusers
``save_pretrained`` folder (fp16 weights) with a model card, and the oracle next to it. The world's held-out
subject (the striped cross) never appears in the training data.
"""
import dataclasses
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, get_scheduler

from peft_diffusion.shapes import oracle as oracle_lib
from peft_diffusion.shapes import world
from peft_diffusion.tiny import write_clip_vocab
from peft_diffusion.training import config as config_lib
from peft_diffusion.training.evaluate import generate, grid
from peft_diffusion.training.losses import diffusion_loss


@dataclasses.dataclass
class Config:
    out: str = "peft_diffusion/models/shapes-base"
    oracle_out: str = "peft_diffusion/models/oracle.safetensors"
    seed: int = 0
    threads: int = 2
    n_images: int = 20000
    # oracle
    oracle_steps: int = 800
    # VAE: 32x32x3 -> 8x8x4
    vae_steps: int = 1200
    vae_batch: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    # text encoder (frozen, random)
    text_dim: int = 64
    max_tokens: int = 16
    # U-Net
    unet_steps: int = 2000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    warmup: int = 200
    min_lr_ratio: float = 0.1
    min_snr_gamma: float = 5.0
    empty_caption_p: float = 0.1  # for classifier-free guidance
    omit_p: float = 0.3  # each of size / background / position left out of a caption with this chance
    # evaluation
    eval_prompts: int = 100
    eval_seed: int = 777
    eval_steps: int = 20
    guidance: float = 4.0
    fp16: bool = True


cfg = config_lib.load(Config, overrides=sys.argv[1:])
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
log = logging.getLogger("pretrain")
torch.set_num_threads(cfg.threads)
torch.manual_seed(cfg.seed)
out = Path(cfg.out)
out.mkdir(parents=True, exist_ok=True)
times = {}
t0 = time.perf_counter()

# ---------------------------------------------------------------- oracle
oracle_path = Path(cfg.oracle_out)
if oracle_path.is_file():
    oracle = oracle_lib.Oracle.load(str(oracle_path))
    log.info("oracle: loaded %s", oracle_path)
else:
    oracle = oracle_lib.train_oracle(steps=cfg.oracle_steps, seed=cfg.seed)
    oracle.save(str(oracle_path))
oracle_acc = oracle_lib.evaluate(oracle, n=3000)
log.info("oracle accuracy on fresh generator images: %s", {k: round(v, 4) for k, v in oracle_acc.items()})
times["oracle"] = time.perf_counter() - t0

# ---------------------------------------------------------------- data (never the subject)
samples = world.dataset(cfg.n_images, seed=cfg.seed)
assert not any(s.attrs["shape"] == world.SUBJECT_SHAPE for s in samples)
pixels = torch.from_numpy(world.to_array(samples)).permute(0, 3, 1, 2).float().div(127.5).sub(1)
attrs = [s.attrs for s in samples]
log.info("data: %d images %s", len(pixels), tuple(pixels.shape[1:]))

# ---------------------------------------------------------------- VAE
t1 = time.perf_counter()
vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64),
                    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                    layers_per_block=1, norm_num_groups=32, sample_size=world.IMAGE_SIZE)
opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
gen = torch.Generator().manual_seed(cfg.seed)
for step in (bar := tqdm(range(cfg.vae_steps), desc="vae")):
    x = pixels[torch.randint(len(pixels), (cfg.vae_batch,), generator=gen)]
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample(generator=gen)).sample
    loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + cfg.kl_weight * posterior.kl().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    bar.set_postfix(loss=f"{loss.item():.4f}")
vae.eval().requires_grad_(False)
with torch.no_grad():
    latents = torch.cat([vae.encode(pixels[i:i + 512]).latent_dist.mean for i in range(0, len(pixels), 512)])
    test = pixels[-256:]
    vae_mse = F.mse_loss(vae.decode(vae.encode(test).latent_dist.mean).sample, test).item()
vae.register_to_config(scaling_factor=float(1 / latents.std()))
latents = latents * vae.config.scaling_factor
log.info("vae: test MSE %.4f, latents %s, scaling factor %.4f", vae_mse, tuple(latents.shape[1:]),
         vae.config.scaling_factor)
times["vae"] = time.perf_counter() - t1

# ---------------------------------------------------------------- tokenizer and text encoder
with tempfile.TemporaryDirectory() as tmp:  # save_pretrained writes the tokenizer's own files
    vocab_file, merges_file = write_clip_vocab(tmp, words=world.VOCAB)
    tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=cfg.max_tokens)
text_encoder = CLIPTextModel(CLIPTextConfig(
    vocab_size=len(tokenizer), hidden_size=cfg.text_dim, intermediate_size=2 * cfg.text_dim, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=cfg.max_tokens, bos_token_id=tokenizer.bos_token_id,
    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)).eval().requires_grad_(False)
longest = max(len(tokenizer(world.caption(a)).input_ids) for a in world.all_attrs(include_subject=True))
assert longest <= cfg.max_tokens, f"captions need {longest} tokens"


def encode(prompts):
    ids = tokenizer(prompts, padding="max_length", max_length=cfg.max_tokens, return_tensors="pt").input_ids
    return text_encoder(ids)[0]


# ---------------------------------------------------------------- U-Net
t2 = time.perf_counter()
unet = UNet2DConditionModel(sample_size=latents.shape[-1], in_channels=4, out_channels=4, layers_per_block=1,
                            block_out_channels=(64, 128), down_block_types=("CrossAttnDownBlock2D",) * 2,
                            up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=cfg.text_dim,
                            attention_head_dim=8, norm_num_groups=32)
noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                beta_end=0.012, prediction_type="epsilon")
opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr)
lr_sched = get_scheduler("cosine_with_min_lr", opt, num_warmup_steps=cfg.warmup,
                         num_training_steps=cfg.unet_steps, scheduler_specific_kwargs={"min_lr_rate": cfg.min_lr_ratio})
rng = np.random.default_rng(cfg.seed)


def train_caption(a):
    if rng.random() < cfg.empty_caption_p:
        return ""
    omit = [k for k in ("size", "background", "position") if rng.random() < cfg.omit_p]
    return world.caption(a, omit=omit)


unet.train()
for step in (bar := tqdm(range(cfg.unet_steps), desc="unet")):
    idx = torch.from_numpy(rng.integers(len(latents), size=cfg.unet_batch))
    x0 = latents[idx]
    with torch.no_grad():
        context = encode([train_caption(attrs[i]) for i in idx.tolist()])
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(x0),), generator=gen)
    pred = unet(noise_scheduler.add_noise(x0, noise, t), t, context).sample
    loss = diffusion_loss(pred, noise, noise_scheduler, t, cfg.min_snr_gamma).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    opt.step()
    lr_sched.step()
    bar.set_postfix(loss=f"{loss.item():.4f}")
unet.eval().requires_grad_(False)
times["unet"] = time.perf_counter() - t2

# ---------------------------------------------------------------- save (fp16), reload, evaluate
pipe = StableDiffusionPipeline(
    vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
    scheduler=DDIMScheduler.from_config(noise_scheduler.config, clip_sample=False, set_alpha_to_one=False,
                                        steps_offset=1),
    safety_checker=None, feature_extractor=None, requires_safety_checker=False)
if cfg.fp16:
    pipe.to(torch.float16)
pipe.save_pretrained(out)
pipe = StableDiffusionPipeline.from_pretrained(out, dtype=torch.float32)
pipe.set_progress_bar_config(disable=True)

t3 = time.perf_counter()
eval_rng = np.random.default_rng(cfg.eval_seed)
held_out = [world.sample(eval_rng).attrs for _ in range(cfg.eval_prompts)]
results = {}
for style, omit in (("full", ()), ("short", ("size", "background", "position"))):
    prompts = [world.caption(a, omit=omit) for a in held_out]
    images = generate(pipe, prompts, seed=cfg.eval_seed, steps=cfg.eval_steps, guidance=cfg.guidance)
    keys = ("shape", "colour") if omit else ("shape", "colour", "background", "position")
    results[style] = oracle_lib.accuracy(oracle, images, held_out, keys=keys)
    grid(images[:32], 8).save(out / f"samples_{style}.png")
    log.info("%s prompts: %s", style, {k: round(v, 3) for k, v in results[style].items()})
times["eval"] = time.perf_counter() - t3

# ---------------------------------------------------------------- model card
params = {n: sum(p.numel() for p in m.parameters()) for n, m in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))}
size_mb = sum(f.stat().st_size for f in out.rglob("*.safetensors")) / 2**20
card = f"""# shapes-base: the embedded base model of peft-diffusion

A Stable-Diffusion-architecture pipeline (diffusers `save_pretrained` layout, fp16 weights, {size_mb:.1f} MB)
trained from scratch by this repository's `train/pretrain_base.py` on the procedural shapes world
(`peft_diffusion.shapes`): 32x32 RGB images of one shape ({", ".join(world.SHAPES)}) in one colour
({", ".join(world.COLOURS)}) on one background ({", ".join(world.BACKGROUNDS)}), two sizes, nine positions, with captions such as
"a large red circle on a white background, top left". The held-out subject shape ({world.SUBJECT_SHAPE}) and stripes never
appear in its training data.

Rebuild: `python train/pretrain_base.py` (seed {cfg.seed}; the config below is its default).

| part | architecture | parameters | training |
|---|---|---|---|
| VAE | AutoencoderKL (32, 64, 64), 4x8x8 latents | {params['vae']:,} | {cfg.vae_steps} steps, batch {cfg.vae_batch}, lr {cfg.vae_lr}, MSE + 0.5 L1 + {cfg.kl_weight} KL; test MSE {vae_mse:.4f} |
| text encoder | CLIPTextModel, hidden {cfg.text_dim}, 2 layers, {cfg.max_tokens} tokens | {params['text_encoder']:,} | none: frozen at its seeded random init |
| U-Net | UNet2DConditionModel (64, 128), cross-attention | {params['unet']:,} | {cfg.unet_steps} steps, batch {cfg.unet_batch}, AdamW lr {cfg.unet_lr}, {cfg.warmup} warm-up, cosine to {cfg.min_lr_ratio:.0%}, epsilon, min-SNR {cfg.min_snr_gamma}, {cfg.empty_caption_p:.0%} empty captions |

Data: {cfg.n_images} images of `world.dataset(n, seed={cfg.seed})`.

## Measured quality

The oracle (`{cfg.oracle_out}`, trained by the same script on generator images only) reads generated images;
accuracy on {cfg.eval_prompts} held-out prompts (attributes drawn with seed {cfg.eval_seed}), DDIM {cfg.eval_steps} steps, guidance {cfg.guidance}:

| prompts | shape | colour | shape and colour | other |
|---|---|---|---|---|
| full captions | {results['full']['shape']:.0%} | {results['full']['colour']:.0%} | see below | background {results['full']['background']:.0%}, position {results['full']['position']:.0%} |
| "a red circle" style | {results['short']['shape']:.0%} | {results['short']['colour']:.0%} | {results['short']['all']:.0%} | |

Full captions, every attribute at once: {results['full']['all']:.0%}. Oracle on fresh generator images: shape
{oracle_acc['shape']:.1%}, colour {oracle_acc['colour']:.1%}, background {oracle_acc['background']:.1%}, position {oracle_acc['position']:.1%}, stripes {oracle_acc['striped']:.1%}.

Times on this run (seconds): {json.dumps({k: round(v) for k, v in times.items()})}, {torch.get_num_threads()} threads.

Samples: `samples_full.png`, `samples_short.png` (first 32 held-out prompts).

Config: `{json.dumps(dataclasses.asdict(cfg))}`
"""
(out / "README.md").write_text(card)
(out / "metrics.json").write_text(json.dumps({"results": results, "oracle": oracle_acc, "times": times,
                                              "vae_test_mse": vae_mse, "config": dataclasses.asdict(cfg)}, indent=2))
log.info("done in %.0f s: %s", time.perf_counter() - t0, out)
if results["short"]["all"] < 0.8:
    log.warning("below the quality bar: %.0f%% of short prompts show shape and colour", 100 * results["short"]["all"])
