"""Pretrain the embedded diffusion transformer: a class-conditional DiT over the embedded base's VAE latents.

    python train/pretrain_dit.py [--key=value ...]      (about 18 CPU minutes on one thread: 19 minutes of wall
                                                         time beside another one-thread job on 2 cores)

The DiT/DiffFit setting (Peebles & Xie, arXiv 2212.09748; Xie et al., arXiv 2304.06648) on the shapes world:
diffusers' ``DiTTransformer2DModel`` (adaLN-Zero blocks, a class-label embedding per block) denoises the
latents of the embedded Stable-Diffusion pipeline's VAE (``peft_diffusion/models/shapes-base/vae``, read as
it is: its latent channels, size and scaling factor set the DiT's input). Classes are the world's
(shape, colour) pairs, 25 (``peft_diffusion.shapes.dit_eval.CLASSES``); the cross and stripes are held
out, as in base pretraining, so a fine-tune can teach the cross as a new class.

Stages: data (``world.dataset``: never a cross), VAE latents (the latent mean, times the VAE's scaling
factor, as ``DiTPipeline`` decodes them), DiT training (epsilon, min-SNR, label dropout for
classifier-free guidance), then the ``DiTPipeline`` folder is saved, reloaded as a user would (no dtype
argument) and scored per class by both readers (``peft_diffusion.shapes.dit_eval``). Writes a model card
(``README.md``), ``metrics.json`` and a sample grid.

Why these settings:

- ``num_embeds_ada_norm`` is 1000 although there are 25 classes: ``DiTPipeline`` hard-codes the null
  (unconditional) class id 1000 for classifier-free guidance, and diffusers' label embedding keeps that
  row at index ``num_classes``; ids 25..999 are never trained. They cost 975 rows per block (the card
  gives the size).
- Patches are sized so the DiT sees a 4x4 grid of tokens whatever the VAE (8x8 latents: patch 2; 16x16:
  patch 4): 16 tokens keep a step cheap on 2 CPU cores, and a 32x32 image holds one shape in one of 3x3
  regions, which a 4x4 grid locates. Measured: 8x8 tokens (patch 1, batch 64, 1.8x the CPU time per step)
  read no better after 1200 steps (oracle 24 %, analytic 13 %, against 26 % / 22 %).
- Steps, on the previous base's factor-4 VAE (8x8 latents): 1200 read 26 % (oracle) / 22 % (analytic), 2400
  56 % / 51 %. On today's factor-2 VAE (16x16 latents, the shapes kept exactly): 5000, the default, 76 % /
  61 % (colour 99.5 %; the misses are shapes, stars worst), still short of the 85 % bar; the model card
  gives the per-class figures. Not yet tried for lack of time: more steps, a wider or deeper DiT, patches
  of 2 (8x8 tokens) on the new latents.
- adaLN-Zero initialisation (``zero_init``, the DiT paper's Sec. 3.2): diffusers builds ``DiTTransformer2DModel``
  with PyTorch's default init (it expects pretrained weights). Trained that way with these settings, the DiT
  read 13 % (oracle: shape and colour both right) after 1200 steps, its images several blobs of roughly the
  class's colour; every block starting as the identity and the output at zero is what this script does.
- The VAE's files are copied into the folder (``vae/``): ``DiTPipeline.from_pretrained(path)`` needs the
  whole pipeline in one folder, and ~2 MB is cheaper than a loader users would have to know about.
"""
import dataclasses
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DiTPipeline, DiTTransformer2DModel
from tqdm.auto import tqdm
from transformers import get_scheduler

from peft_diffusion.shapes import dit_eval, world
from peft_diffusion.shapes.scoring import readers
from peft_diffusion.training import config as config_lib
from peft_diffusion.training.evaluate import grid
from peft_diffusion.training.losses import diffusion_loss, diffusion_target

NULL_CLASS = 1000  # DiTPipeline's hard-coded unconditional class id


@dataclasses.dataclass
class Config:
    out: str = "peft_diffusion/models/shapes-dit"
    vae_from: str = "peft_diffusion/models/shapes-base"  # a pipeline folder (its vae/) or a vae folder
    seed: int = 0
    threads: int = 1  # measured: on a busy 2-core machine 2 threads ran a step 15x slower than 1 (tiny matmuls)
    n_images: int = 10000
    # DiT
    heads: int = 4
    head_dim: int = 32
    layers: int = 4
    tokens_per_side: int = 4  # patch size = latent size / this
    steps: int = 5000
    batch: int = 128
    lr: float = 1e-3
    warmup: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0  # 0: the never-used class rows stay at their seeded init instead of decaying
    # Target and schedule: v-prediction on a zero-terminal-SNR schedule (Lin et al., arXiv 2305.08891), v-loss
    # weight min(SNR + 1, 5) / (SNR + 1), sampling from t = 999 ("trailing"). Measured with everything else as
    # here, shape + colour by oracle / analytic: epsilon + min-SNR 5 on the plain linear schedule 76 / 61 %
    # (stars worst), these settings 88 / 78 %.
    prediction_type: str = "v_prediction"
    zero_terminal_snr: bool = True
    beta_schedule: str = "linear"
    timestep_spacing: str = "trailing"
    min_snr_gamma: float = 5.0
    snr_offset: float = 1.0  # v-loss weight min(SNR + 1, gamma) / (SNR + 1): see peft_diffusion/training/losses.py
    class_dropout: float = 0.1  # label dropout for classifier-free guidance (diffusers' default)
    zero_init: bool = True  # adaLN-Zero: modulations and the output projection start at zero (DiT paper, Sec. 3.2)
    # evaluation
    eval_per_class: int = 8
    eval_seed: int = 0
    eval_steps: int = 20
    guidance: float = 4.0
    eval: bool = True  # False: save the folder and stop (the slow test's shortened run)


def stage_clock():
    """(wall seconds, this process's CPU seconds) now; CPU time / threads estimates an idle machine's wall time."""
    return time.perf_counter(), time.process_time()


cfg = config_lib.load(Config, overrides=sys.argv[1:])
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
log = logging.getLogger("pretrain_dit")
torch.set_num_threads(cfg.threads)
torch.manual_seed(cfg.seed)  # also seeds diffusers' label dropout, which draws from the global generator
out = Path(cfg.out)
out.mkdir(parents=True, exist_ok=True)
times: dict[str, dict] = {}


def record(stage: str, start: tuple[float, float], steps: int | None = None) -> None:
    wall, cpu = time.perf_counter() - start[0], time.process_time() - start[1]
    times[stage] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}
    if steps:
        times[stage].update(steps=steps, steps_per_s=round(steps / wall, 3), cpu_s_per_step=round(cpu / steps, 4))
    log.info("%s: %s", stage, times[stage])


# ---------------------------------------------------------------- VAE (frozen, the base pipeline's)
src = Path(cfg.vae_from)
vae_dir = src / "vae" if (src / "vae").is_dir() else src
vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch.float32).eval().requires_grad_(False)
latent_channels = vae.config.latent_channels
scale = vae.config.scaling_factor
log.info("vae: %s (latent channels %d, scaling factor %.4f)", vae_dir, latent_channels, scale)

# ---------------------------------------------------------------- data and latents (never the subject)
start = stage_clock()
samples = world.dataset(cfg.n_images, seed=cfg.seed)
assert not any(s.attrs["shape"] == world.SUBJECT_SHAPE for s in samples)
pixels = torch.from_numpy(world.to_array(samples)).permute(0, 3, 1, 2).float().div(127.5).sub(1)
labels = torch.tensor([dit_eval.CLASSES.index((s.attrs["shape"], s.attrs["colour"])) for s in samples])
with torch.no_grad():
    latents = torch.cat([vae.encode(pixels[i:i + 500]).latent_dist.mean for i in range(0, len(pixels), 500)])
latents = latents * scale
latent_size = latents.shape[-1]
patch = latent_size // cfg.tokens_per_side
assert patch * cfg.tokens_per_side == latent_size, f"latent size {latent_size} is not divisible by {cfg.tokens_per_side}"
log.info("data: %d images, latents %s (std %.3f), %d classes, patch %d", len(latents), tuple(latents.shape[1:]),
         latents.std().item(), len(dit_eval.CLASSES), patch)
record("data_and_latents", start)

# ---------------------------------------------------------------- DiT
start = stage_clock()
dit = DiTTransformer2DModel(num_attention_heads=cfg.heads, attention_head_dim=cfg.head_dim,
                            in_channels=latent_channels, out_channels=latent_channels, num_layers=cfg.layers,
                            sample_size=latent_size, patch_size=patch, num_embeds_ada_norm=NULL_CLASS)
for block in dit.transformer_blocks:  # diffusers fixes the dropout at 0.1 in the block; the config decides here
    block.norm1.emb.class_embedder.dropout_prob = cfg.class_dropout
if cfg.zero_init:  # diffusers builds DiT for loading weights, so its init is PyTorch's default, not the paper's
    with torch.no_grad():
        for block in dit.transformer_blocks:  # each block starts as the identity: gates alpha = 0
            block.norm1.linear.weight.zero_()
            block.norm1.linear.bias.zero_()
        for layer in (dit.proj_out_1, dit.proj_out_2):  # final adaLN modulation and projection start at zero
            layer.weight.zero_()
            layer.bias.zero_()
noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule=cfg.beta_schedule,
                                prediction_type=cfg.prediction_type, rescale_betas_zero_snr=cfg.zero_terminal_snr)
opt = torch.optim.AdamW(dit.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
lr_sched = get_scheduler("cosine_with_min_lr", opt, num_warmup_steps=cfg.warmup, num_training_steps=cfg.steps,
                         scheduler_specific_kwargs={"min_lr_rate": cfg.min_lr_ratio})
gen = torch.Generator().manual_seed(cfg.seed)
dit.train()
losses = []
for step in (bar := tqdm(range(cfg.steps), desc="dit", mininterval=10)):
    idx = torch.randint(len(latents), (cfg.batch,), generator=gen)
    x0, y = latents[idx], labels[idx]
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(x0),), generator=gen)
    pred = dit(noise_scheduler.add_noise(x0, noise, t), timestep=t, class_labels=y).sample
    loss = diffusion_loss(pred, diffusion_target(noise_scheduler, x0, noise, t), noise_scheduler, t,
                          cfg.min_snr_gamma, cfg.snr_offset).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
    opt.step()
    lr_sched.step()
    losses.append(loss.item())
    bar.set_postfix(loss=f"{loss.item():.4f}")
dit.eval().requires_grad_(False)
window = max(1, min(100, cfg.steps // 4))
loss_first, loss_last = float(np.mean(losses[:window])), float(np.mean(losses[-window:]))
log.info("dit loss: first %d steps %.4f, last %d %.4f", window, loss_first, window, loss_last)
record("dit", start, cfg.steps)

# ---------------------------------------------------------------- save, reload as a user would
pipe = DiTPipeline(transformer=dit, vae=vae, id2label=dit_eval.id2label(),
                   scheduler=DDIMScheduler.from_config(noise_scheduler.config, clip_sample=False,
                                                       set_alpha_to_one=False, timestep_spacing=cfg.timestep_spacing,
                                                       steps_offset=0 if cfg.timestep_spacing == "trailing" else 1))
pipe.register_to_config(id2label=dit_eval.id2label())  # model_index.json carries the class names
pipe.save_pretrained(out)
for name in ("config.json", "diffusion_pytorch_model.safetensors"):  # the base's own bytes, not a re-save
    shutil.copyfile(vae_dir / name, out / "vae" / name)
n_params = {"transformer": sum(p.numel() for p in dit.parameters()), "vae": sum(p.numel() for p in vae.parameters())}
size_mb = sum(f.stat().st_size for f in out.rglob("*.safetensors")) / 2**20
(out / "metrics.json").write_text(json.dumps({"losses": {"first": loss_first, "last": loss_last, "window": window},
                                              "times": times, "config": dataclasses.asdict(cfg)}, indent=2))
if not cfg.eval:
    log.info("saved %s (no evaluation)", out)
    raise SystemExit(0)
pipe = DiTPipeline.from_pretrained(out)  # no dtype argument: what users (and the tests) do
assert pipe.transformer.dtype == torch.float32 and pipe.labels, "the folder must load as float32 with its labels"
pipe.set_progress_bar_config(disable=True)

start = stage_clock()
report, images = dit_eval.class_report(pipe, per_class=cfg.eval_per_class, seed=cfg.eval_seed, steps=cfg.eval_steps,
                                       guidance=cfg.guidance, reader_map=readers())
record("eval", start)
grid(images[::max(1, cfg.eval_per_class // 2)][:50], 10).save(out / "samples.png")
for name, acc in report["overall"].items():
    log.info("%s: %s; worst class %s; background %s; position %s", name, {k: round(v, 3) for k, v in acc.items()},
             report["worst_class"][name], round(report["background"][name]["entropy"], 3),
             round(report["position"][name]["entropy"], 3))

# ---------------------------------------------------------------- model card
train_stages = ("data_and_latents", "dit")
train_wall = sum(times[k]["wall_s"] for k in train_stages)
train_cpu = sum(times[k]["cpu_s"] for k in train_stages)


def pct(x):
    return f"{100 * x:.0f}%"


class_rows = "\n".join(
    f"| {i} | {name} | " + " | ".join(f"{pct(r[k]['all'])}" for k in ("oracle", "analytic")) + " |"
    for i, (name, r) in enumerate(report["per_class"].items()))
spread_rows = "\n".join(
    f"| {attr} | {reader} | {res[reader]['top_share']:.2f} | {res[reader]['entropy']:.2f} | "
    + ", ".join(f"{k} {v}" for k, v in res[reader]["counts"].items()) + " |"
    for attr, res in (("background", report["background"]), ("position", report["position"])) for reader in res)
timing_rows = "\n".join(
    f"| {k} | {v.get('steps', '-')} | {v.get('steps_per_s', '-')} | {v['wall_s']:.0f} | {v['cpu_s']:.0f} | "
    f"{v['cpu_s'] / cfg.threads:.0f} |" for k, v in times.items())
ov = report["overall"]
card = f"""# shapes-dit: the embedded class-conditional diffusion transformer of peft-diffusion

A `DiTPipeline` folder (diffusers `save_pretrained` layout, {size_mb:.1f} MB, fp32; plain
`DiTPipeline.from_pretrained(path)` runs on CPU) trained from scratch by this repository's
`train/pretrain_dit.py`: a `DiTTransformer2DModel` ({cfg.layers} blocks, hidden {cfg.heads * cfg.head_dim},
{cfg.heads} heads, patch {patch} on {latent_channels}x{latent_size}x{latent_size} latents = {cfg.tokens_per_side}x{cfg.tokens_per_side} tokens,
{n_params['transformer']:,} parameters) over the latents of the embedded Stable-Diffusion pipeline's VAE
(`{vae_dir}`, copied here as `vae/`, {n_params['vae']:,} parameters, scaling factor {scale:.4f}).

Classes: the {len(dit_eval.CLASSES)} (shape, colour) pairs of the shapes world, id = shape index x 5 + colour index,
named in `model_index.json`'s `id2label` (`pipe.get_label_ids(["red circle"])`). The cross and stripes never
appear in its data. `num_embeds_ada_norm` is {NULL_CLASS} because `DiTPipeline` uses class id {NULL_CLASS} as the
unconditional class for guidance; ids {len(dit_eval.CLASSES)}..{NULL_CLASS - 1} are untrained rows.

Rebuild: `python train/pretrain_dit.py` (seed {cfg.seed}; the config below is its default).

Training: {cfg.n_images} images of `world.dataset(n, seed={cfg.seed})` (background, size and position uniform),
VAE latent means; {cfg.steps} steps, batch {cfg.batch}, AdamW lr {cfg.lr} (weight decay {cfg.weight_decay}),
{cfg.warmup} warm-up, cosine to {cfg.min_lr_ratio:.0%}; {cfg.prediction_type}, 1000-step {cfg.beta_schedule} DDPM schedule{" rescaled to zero terminal SNR" if cfg.zero_terminal_snr else ""},
{(f"v-loss weight min(SNR + {cfg.snr_offset:g}, {cfg.min_snr_gamma:g}) / (SNR + 1)" if cfg.snr_offset else f"min-SNR {cfg.min_snr_gamma:g}") if cfg.min_snr_gamma else "no min-SNR"}, sampling timesteps "{cfg.timestep_spacing}"; class labels dropped to the null class on {cfg.class_dropout:.0%} of samples. Loss: first
{window} steps {loss_first:.4f}, last {window} {loss_last:.4f}.

## Measured quality (oracle / analytic reader)

{cfg.eval_per_class} images per class, DDIM {cfg.eval_steps} steps, guidance {cfg.guidance}, image j of class i from
generator seed {cfg.eval_seed} + {cfg.eval_per_class}i + j (`python -m peft_diffusion.shapes.dit_eval` re-measures them).

Shape and colour both as the class's: **oracle {pct(ov['oracle']['all'])}, analytic reader {pct(ov['analytic']['all'])}**
(shape {pct(ov['oracle']['shape'])} / {pct(ov['analytic']['shape'])}, colour {pct(ov['oracle']['colour'])} / {pct(ov['analytic']['colour'])}).

| id | class | oracle | analytic |
|---|---|---|---|
{class_rows}

Background and position are not conditioned on: the table shows how the generated ones spread (uniform over
4 backgrounds: top share 0.25, entropy 1; over 9 positions: 0.11, 1).

| attribute | reader | top share | entropy | counts |
|---|---|---|---|---|
{spread_rows}

Samples: `samples.png` (two per class, by id, 10 per row).

## Times

{cfg.threads} threads. Wall time depends on what else the machine runs; "idle estimate" is CPU time / threads.

| stage | steps | steps/s | wall s | CPU s | idle estimate s |
|---|---|---|---|---|---|
{timing_rows}

Training (data, latents, DiT): {train_wall / 60:.1f} min wall, {train_cpu / 60:.1f} min CPU, idle estimate {train_cpu / cfg.threads / 60:.1f} min.

Config: `{json.dumps(dataclasses.asdict(cfg))}`
"""
(out / "README.md").write_text(card)
(out / "metrics.json").write_text(json.dumps({
    "generated": report, "times": times,
    "training_minutes": {"wall": train_wall / 60, "cpu": train_cpu / 60, "idle_estimate": train_cpu / cfg.threads / 60},
    "losses": {"first": loss_first, "last": loss_last, "window": window}, "params": n_params, "size_mb": size_mb,
    "patch_size": patch, "latent_shape": list(latents.shape[1:]), "config": dataclasses.asdict(cfg)}, indent=2))
log.info("done: %s", out)
