"""Quickstart: inject a LoRA, train it a few steps, save it, and load it into plain diffusers.

Runs offline on a tiny pipeline built from config (random weights: the images are noise-like, the point
is the workflow). Usage: python samples/quickstart.py [--out out/quickstart] [--steps 30]
"""
import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from PIL import Image, ImageDraw

import peft_diffusion as pd
from peft_diffusion.tiny import tiny_sd_pipeline

parser = argparse.ArgumentParser()
parser.add_argument("--out", default="out/quickstart")
parser.add_argument("--steps", type=int, default=30)
args = parser.parse_args()
out = Path(args.out)
torch.manual_seed(0)

# 1. a base pipeline saved and reloaded the way users load one (any hub id or folder works the same)
tiny_sd_pipeline(out).save_pretrained(out / "base")
pipe = StableDiffusionPipeline.from_pretrained(out / "base")

# 2. four training images of one subject: a red circle at different places
def circle(cx, cy):
    img = Image.new("RGB", (32, 32), "white")
    ImageDraw.Draw(img).ellipse((cx - 7, cy - 7, cx + 7, cy + 7), fill="red")
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1

images = torch.stack([circle(x, y) for x, y in ((10, 10), (22, 10), (10, 22), (22, 22))])
ids = pipe.tokenizer(["a photo of sks circle"] * 4, padding="max_length", return_tensors="pt").input_ids

# 3. LoRA on the U-Net attention; only its parameters train
pd.inject(pipe.unet, pd.LoRA(r=4, alpha=4), "subject")
print(pd.parameter_report(pipe.unet))
params = [p for p in pipe.unet.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=5e-3)
with torch.no_grad():
    latents = pipe.vae.encode(images).latent_dist.mean * pipe.vae.config.scaling_factor
    context = pipe.text_encoder(ids)[0]
for step in range(args.steps):
    noise = torch.randn_like(latents)
    t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (len(latents),))
    pred = pipe.unet(pipe.scheduler.add_noise(latents, noise, t), t, context).sample
    loss = F.mse_loss(pred, noise)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 10 == 0 or step == args.steps - 1:
        print(f"step {step:3d}  loss {loss.item():.4f}")

# 4. save (native file: also a diffusers LoRA file) and generate with it
path = pd.save_adapter(pipe, out / "subject_lora.safetensors", "subject")
print(f"saved {path} ({path.stat().st_size / 1024:.0f} KiB)")
kwargs = dict(prompt="a photo of sks circle", height=32, width=32, num_inference_steps=10, output_type="np")
ours = pipe(**kwargs, generator=torch.Generator().manual_seed(1)).images[0]

# 5. a plain diffusers pipeline loads the same file and makes the same image
plain = StableDiffusionPipeline.from_pretrained(out / "base")
plain.load_lora_weights(path)
theirs = plain(**kwargs, generator=torch.Generator().manual_seed(1)).images[0]
diff = float(np.abs(ours - theirs).max())
print(f"diffusers load_lora_weights reproduces our image: max pixel difference {diff:.2e}")
Image.fromarray((np.concatenate([ours, theirs], axis=1) * 255).round().astype("uint8")).save(out / "ours_vs_diffusers.png")
if diff > 1e-4:
    raise SystemExit("mismatch between peft-diffusion and diffusers outputs")
