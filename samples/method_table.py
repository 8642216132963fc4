"""The personalization methods side by side on the sample subject: same data, same step budget, same oracle.

    python samples/method_table.py [--methods lora,loha,...] [--steps 400] [--out out/methods]

Each method trains `samples/dreambooth.toml` (prior preservation, 400 steps, batch 4) with its own `[method]`
table from METHODS below, then the oracle reads the subject rate ("sks cross" prompts: a yellow cross) and
the accuracy on ordinary world prompts (class-prompt drift) from images made with the same seeds as the
untrained base's; both readers of `peft_diffusion.shapes.scoring` (the oracle and the analytic
reader) give each figure. Prints a Markdown table (trainable parameters, file size, figures) and writes it with the
raw numbers to <out>/table.md and <out>/results.json. Takes about 1-2 minutes a method on 2 CPU cores.
"""
import argparse
import dataclasses
import json
import logging
from pathlib import Path

import peft_diffusion as pd
from peft_diffusion.training.dreambooth import DEFAULT_BASE, load_config, load_pipeline, train
from subject_eval import REPO, measure

# method tables ([method] in the TOML) and the trainer settings each runs with besides the TOML's. Token methods
# get a new token "<sks>" ("sks" is a word of the base's vocabulary): their captions and prompts say "<sks>".
METHODS = {
    "lora": ({"method": "lora", "r": 8, "alpha": 8, "target": "unet-all"}, {"lr": 2e-3}),
    "loha": ({"method": "loha", "r": 4, "alpha": 4, "target": "unet-all"}, {"lr": 2e-3}),
    "lokr": ({"method": "lokr", "r": 8, "target": "unet-all"}, {"lr": 8e-3}),
    "dora": ({"method": "dora", "r": 8, "alpha": 8, "target": "unet-all"}, {"lr": 2e-3}),
    "textual-inversion": ({"method": "textual-inversion", "token": "<sks>", "num_vectors": 2,
                           "init_word": "yellow star"}, {"lr": 2e-2}),
    "ed-lora": ({"method": "ed-lora", "token": "<sks>", "init_word": "star"}, {"lr": 2e-3, "embedding_lr": 5e-3}),
    # selective (issue 10): every bias / norm parameter / DiffFit's set of the U-Net; masked methods on the
    # default target's weights (the U-Net's attention projections) at the density named
    "bitfit": ({"method": "bitfit"}, {"lr": 5e-3}),
    "ln-tuning": ({"method": "ln-tuning"}, {"lr": 5e-3}),
    "difffit": ({"method": "difffit"}, {"lr": 5e-3}),
    "fish": ({"method": "fish", "density": 0.005, "scoring_batches": 8}, {"lr": 5e-3}),
    "child-tuning-d": ({"method": "child-tuning-d", "density": 0.1, "scoring_batches": 8}, {"lr": 1e-3}),
    "diff-pruning": ({"method": "diff-pruning", "density": 0.005}, {"lr": 5e-3}),
    # additive: Houlsby bottlenecks after attention and feed-forward of every U-Net transformer block
    "houlsby": ({"method": "houlsby", "reduction": 4}, {"lr": 2e-3}),
}
TOKEN = "<sks>"


def token_subject(folder: Path) -> Path:
    """A copy of the sample subject whose captions name the new token instead of the word "sks"."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in sorted((REPO / "samples/subject").iterdir()):
        if f.suffix == ".txt":
            (folder / f.name).write_text(f.read_text().replace("sks", TOKEN))
        else:
            (folder / f.name).write_bytes(f.read_bytes())
    return folder


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--methods", default=",".join(METHODS))
parser.add_argument("--steps", type=int, default=400)
parser.add_argument("--out", default="out/methods")
args = parser.parse_args()
logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)

results = {}
pipe = load_pipeline(str(DEFAULT_BASE))
results["base"] = dict(measure(pipe)[0], params=0, kib=0)
for name in args.methods.split(","):
    table, settings = METHODS[name]
    token = "token" in table
    subject = token_subject(out / "subject-token") if token else REPO / "samples/subject"
    cfg = load_config(REPO / "samples/dreambooth.toml",
                      {"output_dir": str(out / name), "instance_dir": str(subject),
                       "class_cache": str(out / "class-cache"), "base": str(DEFAULT_BASE), "steps": args.steps,
                       "validation_every": -1, "checkpoint_every": 0, "progress": False, "overwrite": True,
                       **settings})
    cfg = dataclasses.replace(cfg, method=table)
    adapter = train(cfg)
    pipe = load_pipeline(str(DEFAULT_BASE))
    pd.load_adapter(pipe, adapter)
    params = sum(p.numel() for _, h in pd.api.hosts(pipe) for p in h.deltas.parameters())
    results[name] = dict(measure(pipe, TOKEN if token else "sks")[0], params=params,
                         kib=adapter.stat().st_size / 1024, settings=settings, config=table)
    print(f"{name}: {results[name]}", flush=True)

lines = ["| method | subject (yellow cross), oracle / analytic | world prompts (drift), oracle / analytic | "
         "trainable parameters | file |", "|---|---|---|---|---|"]
for name, r in results.items():
    figures = (f"{r['subject']:.0%} / {r['subject_analytic']:.0%} | "
               f"{r['class_prompts']:.0%} / {r['class_prompts_analytic']:.0%}")
    if name == "base":
        lines.append(f"| untrained base | {figures} | - | - |")
    else:
        lines.append(f"| {name} | {figures} | {r['params']:,} | {r['kib']:.0f} KiB |")
(out / "table.md").write_text("\n".join(lines) + "\n")
(out / "results.json").write_text(json.dumps(results, indent=2))
print("\n".join(lines))
