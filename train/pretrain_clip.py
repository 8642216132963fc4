"""Pretrain the embedded CLIP model: a vision tower and projections aligned, contrastively, with the embedded
pipeline's own text encoder, on shapes-world images and captions.

    python train/pretrain_clip.py [--key=value ...]      (a few minutes on 2 CPU cores)

The text tower IS the pipeline's ``text_encoder`` (``peft_diffusion/models/shapes-base``), copied in and kept
frozen, so one set of text weights serves the diffusion pipeline and the vision-language model (the prompt
family's VLM, and the image encoder of the IP-Adapter). Trained: a ``CLIPVisionModel`` (a ViT over 4x4
patches of the 32x32 images), the visual and text projections and the temperature. Loss: CLIP's symmetric
InfoNCE (Radford et al., arXiv 2103.00020, Eq. in Fig. 3), with every caption that equals another in the
batch counted as a positive of both images (short captions repeat often in this world).

Writes a ``CLIPModel`` folder (``save_pretrained``; ``CLIPModel.from_pretrained`` and
``CLIPVisionModelWithProjection.from_pretrained`` both load it), the base's tokenizer, a
``CLIPImageProcessor`` config (32 px, mean = std = 0.5), a model card and ``metrics.json``
(``peft_diffusion.shapes.clip_eval.evaluate_clip``: zero-shot, retrieval, shifted domains).
"""
import dataclasses
import json
import logging
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextModel, CLIPTokenizer,
                          CLIPVisionConfig, get_scheduler)

from peft_diffusion.shapes import clip_eval, world
from peft_diffusion.training import config as config_lib


@dataclasses.dataclass
class Config:
    base: str = "peft_diffusion/models/shapes-base"
    out: str = "peft_diffusion/models/shapes-clip"
    seed: int = 0
    threads: int = 2
    n_images: int = 20000
    # vision tower
    hidden: int = 96
    layers: int = 4
    heads: int = 4
    patch: int = 4
    projection_dim: int = 64
    # training
    steps: int = 1500
    batch: int = 256
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.05
    omit_p: float = 0.5  # each of size / background / position left out of a caption with this probability
    eval_images: int = 1000


cfg = config_lib.load(Config, overrides=sys.argv[1:])
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
log = logging.getLogger("pretrain_clip")
torch.set_num_threads(cfg.threads)
torch.manual_seed(cfg.seed)
random.seed(cfg.seed)
t0, cpu0 = time.perf_counter(), time.process_time()

# ---------------------------------------------------------------- the frozen text tower, from the pipeline
base = Path(cfg.base)
tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer")
text_encoder = CLIPTextModel.from_pretrained(base / "text_encoder")
if text_encoder.config.vocab_size < len(tokenizer):
    raise SystemExit(f"tokenizer of {base} has {len(tokenizer)} tokens but the text encoder's vocabulary has "
                     f"{text_encoder.config.vocab_size} rows")
vision = CLIPVisionConfig(hidden_size=cfg.hidden, intermediate_size=2 * cfg.hidden, num_hidden_layers=cfg.layers,
                          num_attention_heads=cfg.heads, image_size=world.IMAGE_SIZE, patch_size=cfg.patch,
                          projection_dim=cfg.projection_dim)
model = CLIPModel(CLIPConfig(text_config=text_encoder.config.to_dict(), vision_config=vision.to_dict(),
                             projection_dim=cfg.projection_dim))
text_source = getattr(text_encoder, "text_model", text_encoder)
model.text_model.load_state_dict(text_source.state_dict())
model.text_model.requires_grad_(False)
log.info("CLIP: %d parameters, %d trained (text tower frozen: the pipeline's text encoder)",
         sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.parameters() if p.requires_grad))

# ---------------------------------------------------------------- data: world images, captions with omissions
samples = world.dataset(cfg.n_images, seed=cfg.seed)
rng = np.random.default_rng(cfg.seed)
captions = [world.caption(s.attrs, omit=[k for k in ("size", "background", "position") if rng.random() < cfg.omit_p])
            for s in samples]
pixels = clip_eval.pixel_values([s.image for s in samples])
enc = tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt")
with torch.no_grad():  # the text tower is frozen: its pooled outputs are computed once
    pooled = torch.cat([model.text_model(input_ids=enc.input_ids[i:i + 1024],
                                         attention_mask=enc.attention_mask[i:i + 1024]).pooler_output
                        for i in range(0, len(captions), 1024)])
caption_id = torch.tensor([{c: i for i, c in enumerate(dict.fromkeys(captions))}[c] for c in captions])
log.info("data: %d images, %d distinct captions", len(samples), int(caption_id.max()) + 1)

# ---------------------------------------------------------------- training
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
sched = get_scheduler("cosine", opt, num_warmup_steps=cfg.warmup, num_training_steps=cfg.steps)
g = torch.Generator().manual_seed(cfg.seed)
losses = []
model.train()
bar = tqdm(range(cfg.steps), desc="clip", mininterval=5)
for step in bar:
    idx = torch.randint(len(samples), (cfg.batch,), generator=g)
    # no flips or crops: positions ("top left") are part of the captions
    img = F.normalize(model.visual_projection(model.vision_model(pixel_values=pixels[idx]).pooler_output), dim=-1)
    txt = F.normalize(model.text_projection(pooled[idx]), dim=-1)
    logits = model.logit_scale.exp() * img @ txt.T
    same = (caption_id[idx, None] == caption_id[None, idx]).float()
    loss = (F.cross_entropy(logits, same / same.sum(1, keepdim=True))
            + F.cross_entropy(logits.T, same / same.sum(0, keepdim=True).T)) / 2
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, 4.6052)  # CLIP's cap: a temperature of at most 100
    losses.append(loss.item())
    bar.set_postfix(loss=f"{loss.item():.3f}")
train_s, train_cpu = time.perf_counter() - t0, time.process_time() - cpu0
model.eval()

# ---------------------------------------------------------------- save, reload as users do, evaluate
out = Path(cfg.out)
out.mkdir(parents=True, exist_ok=True)
model.save_pretrained(out)
tokenizer.save_pretrained(out)
CLIPImageProcessor(size={"shortest_edge": world.IMAGE_SIZE}, crop_size={"height": world.IMAGE_SIZE,
                   "width": world.IMAGE_SIZE}, image_mean=[clip_eval.MEAN] * 3, image_std=[clip_eval.STD] * 3,
                   resample=3).save_pretrained(out)
model = CLIPModel.from_pretrained(out)
same_text = all(torch.equal(a, b) for a, b in zip(model.text_model.state_dict().values(),
                                                  text_source.state_dict().values()))
metrics = clip_eval.evaluate_clip(model, CLIPTokenizer.from_pretrained(out), n=cfg.eval_images)
metrics.update(train_seconds=round(train_s, 1), train_cpu_seconds=round(train_cpu, 1),
               loss_first=round(float(np.mean(losses[:20])), 4), loss_last=round(float(np.mean(losses[-20:])), 4),
               text_tower_is_the_pipelines=same_text)
log.info("metrics: %s", json.dumps(metrics))
(out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
size_mb = sum(f.stat().st_size for f in out.iterdir()) / 2**20
zs, sh, cr = metrics["zero_shot"], metrics["shifted_striped"], metrics["shifted_cross"]
(out / "README.md").write_text(f"""# shapes-clip: the embedded CLIP model of peft-diffusion

A `CLIPModel` ({size_mb:.1f} MB, fp32) whose text tower is the embedded pipeline's text encoder
(`{cfg.base}/text_encoder`, frozen and identical: {same_text}), with a ViT vision tower
({cfg.layers} layers, width {cfg.hidden}, {cfg.patch}x{cfg.patch} patches of the 32x32 images) and projections to
{cfg.projection_dim} dimensions trained contrastively on {cfg.n_images} shapes-world images and their
captions (size, background and position each left out with probability {cfg.omit_p}; no cross, no stripes).
`CLIPModel.from_pretrained` and `CLIPVisionModelWithProjection.from_pretrained` load it (the image encoder
of IP-Adapter); `CLIPImageProcessor.from_pretrained` reads its preprocessing (32 px, mean = std = 0.5).

Rebuild: `python train/pretrain_clip.py` (config: `{json.dumps(dataclasses.asdict(cfg))}`): {cfg.steps} steps,
batch {cfg.batch}, seed {cfg.seed}; {train_s / 60:.1f} min wall, {train_cpu / 60:.1f} min CPU time.

Measured (`peft_diffusion.shapes.clip_eval.evaluate_clip`, {cfg.eval_images} fresh generator images, prompts
"a red circle" over the 25 shape x colour classes):

| | shape | colour | both |
|---|---|---|---|
| zero-shot, world images | {zs['shape']:.1%} | {zs['colour']:.1%} | {zs['both']:.1%} |
| shifted: striped shapes | {sh['shape']:.1%} | {sh['colour']:.1%} | {sh['both']:.1%} |
| shifted: the cross ("a red cross" among 30 classes) | {cr['shape']:.1%} | {cr['colour']:.1%} | {cr['both']:.1%} |

Retrieval top-1 over 200 full captions: image -> text {metrics['retrieval']['image_to_text']:.1%}, text -> image
{metrics['retrieval']['text_to_image']:.1%}. The shifted rows are what the prompt-family methods (CoOp, VPT,
CLIP-Adapter, ...) start from.
""")
log.info("wrote %s (%.1f MB) in %.1f min", out, size_mb, (time.perf_counter() - t0) / 60)
