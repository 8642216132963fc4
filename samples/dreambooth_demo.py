"""The main job: DreamBooth a LoRA on the embedded shapes-world base and measure it with the oracle.

    python samples/dreambooth_demo.py [--out out/demo] [--key=value ...]   (about 2-3 minutes on 2 CPU cores)

Trains `samples/dreambooth.toml` (LoRA on U-Net cross-attention, prior preservation) on the 5 images of a
yellow cross in `samples/subject/` — a shape the base never saw — then generates before/after images with
the same seeds and prints what the oracle reads: the subject rate for "sks cross" prompts and the accuracy
on ordinary world prompts (drift). Extra `--key=value` arguments override the config
(e.g. `--prior_preservation=false` shows the drift without prior preservation). The class images land in
the TOML's cache (`out/class-cache` of the repository), so `peft-diffusion train samples/dreambooth.toml`
afterwards does not generate them again.
"""
import argparse
import json
import logging
from pathlib import Path

import numpy as np

import peft_diffusion as pd
from peft_diffusion.training.dreambooth import DEFAULT_BASE, load_config, load_pipeline, train
from peft_diffusion.training.evaluate import grid
from subject_eval import N, REPO, measure

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="out/demo")
args, overrides = parser.parse_known_args()
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
for noisy in ("diffusers", "transformers", "accelerate"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
out = Path(args.out)

# the TOML's own subject and class-image cache (its paths are relative to it), so that
# `peft-diffusion train samples/dreambooth.toml` after the demo reuses the class images; the demo always retrains
cfg = load_config(REPO / "samples/dreambooth.toml", [f"--output_dir={out}", "--overwrite=true"] + overrides)
adapter = train(cfg)

results, pictures = {}, []
for label in ("before", "after"):
    pipe = load_pipeline(str(DEFAULT_BASE))
    if label == "after":
        pd.load_adapter(pipe, adapter)
    results[label], subject_images, class_images = measure(pipe)
    pictures.append(np.concatenate([subject_images[:8], subject_images[N // 2:N // 2 + 8], class_images[:8]]))
grid(np.concatenate(pictures), 8).resize((8 * 96, 6 * 96), resample=0).save(out / "before_after.png")
(out / "metrics.json").write_text(json.dumps(results, indent=2))

print(f"\nadapter: {adapter} ({adapter.stat().st_size / 1024:.0f} KiB, loads with diffusers' load_lora_weights)")
print(f"grid: {out / 'before_after.png'} (rows 1-3 before, 4-6 after: 'a sks cross', 'a sks cross on ...', world prompts)")
print(f"{'':24}{'before':>10}{'after':>10}")
print(f"{'subject (cross, yellow)':24}{results['before']['subject']:>10.0%}{results['after']['subject']:>10.0%}")
print(f"{'world prompts (drift)':24}{results['before']['class_prompts']:>10.0%}{results['after']['class_prompts']:>10.0%}")
print(f"{'  same, analytic reader':24}{results['before']['class_prompts_analytic']:>10.0%}"
      f"{results['after']['class_prompts_analytic']:>10.0%}")
print(f"{'subject, analytic reader':24}{results['before']['subject_analytic']:>10.0%}"
      f"{results['after']['subject_analytic']:>10.0%}")
