"""Teaching the embedded DiT a class it never saw: LoRA, DiffFit and a full fine-tune of the same blocks.

    python samples/dit_table.py [--steps 400] [--arms lora,difffit,full] [--out out/dit_table] [--quick]

The task (issue 11, "Must show"): the embedded class-conditional DiT (``peft_diffusion/models/shapes-dit``, 25
shape x colour classes, the cross held out) learns the class "yellow cross" from the 5 images of the U-Net
demo's subject (``samples/subject``: yellow crosses, unstriped, on every background). Yellow crosses, not
crosses of every colour: the DiT trainer teaches one new class per run from one image folder, and a class of
this DiT is one shape in one colour, like the 25 it knows. Every arm trains through the DiT path of
``peft-diffusion train`` (``peft_diffusion/training/dit.py``): the ``new-class`` method grows each block's
class-embedding table by one row (id 1001), trained in every arm (its learning rate ``embedding_lr``, the
same for all), with

- ``lora``: new-class's own LoRA (r 8) on the attention and feed-forward layers of every block (the ``dit``
  preset: attn1 q/k/v/out, ff.net.0.proj, ff.net.2);
- ``difffit``: DiffFit as ``[extra_method]`` (every bias, a gamma on each attention / feed-forward output;
  ``embeddings = false``: the new row is the class embedding that trains, the old classes' rows stay);
- ``full``: ``partial-ft`` of every parameter of the same four transformer blocks as ``[extra_method]``
  (attention, feed-forward, their adaLN-Zero modulation and timestep embedders; the old classes' table rows
  excepted, as in the other arms): full fine-tuning of those blocks as a registered method.

Same data, prior preservation (the base's own images of its 25 classes, 15 % of them trained with the null
class), step budget, batch and seed; only the method and its learning rate differ (``ARMS``).

Measured for the untrained base and each arm: class fidelity of the new class (its images read as a yellow
cross, shape and colour, by the oracle and by the analytic reader of ``peft_diffusion.shapes.scoring``; the
base row reads its null class, the row the new class starts from), drift on the 25 old classes (shape +
colour accuracy per class, ``peft_diffusion.shapes.dit_eval.class_report``, same seeds before and after,
both readers), trainable parameters (both adapters of an arm), adapter file size (both files), seconds per
training step (the trainer's loop, after the prior images). Prints a Markdown table and writes it with the
raw numbers to ``<out>/table.md`` and ``<out>/results.json``.

``--quick`` checks the script end to end (fewer prior and evaluation images, fewer denoising steps; with
``--steps 5`` about 20 s on 2 CPU cores): its figures mean nothing. The full table (README) took about 5 minutes
on one thread on a shared machine.
"""
import argparse
import json
import logging
import time
from pathlib import Path

import torch

import peft_diffusion as pd
from peft_diffusion.models import SHAPES_DIT
from peft_diffusion.models import path as embedded_path
from peft_diffusion.shapes import dit_eval, scoring
from peft_diffusion.training import dit as dit_trainer
from peft_diffusion.training.dreambooth_config import load_config

REPO = Path(__file__).resolve().parents[1]
DIT = embedded_path(SHAPES_DIT)
LABEL = "yellow cross"
TARGET = {"shape": "cross", "colour": "yellow"}
ROWS = {"method": "new-class", "labels": [LABEL], "lora": False}
NO_CLASS_TABLES = {"exclude": [r".*class_embedder.*"], "types": []}  # a partial-ft target: every other parameter


def blocks() -> list[str]:
    layers = json.loads((DIT / "transformer" / "config.json").read_text())["num_layers"]
    return [f"transformer_blocks.{i}" for i in range(layers)]


# arm -> ([method], [extra_method] or {}, trainer settings besides the shared ones)
ARMS = {
    "lora": ({"method": "new-class", "labels": [LABEL], "r": 8, "alpha": 8}, {}, {"lr": 2e-3}),
    "difffit": (ROWS, {"method": "difffit", "embeddings": False}, {"lr": 5e-3}),
    "full": (ROWS, {"method": "partial-ft", "blocks": blocks(), "target": NO_CLASS_TABLES}, {"lr": 2e-4}),
}
DESCRIBE = {
    "lora": "LoRA r 8, attention + MLP of every block, lr 2e-3",
    "difffit": "DiffFit (biases, gammas), lr 5e-3",
    "full": "full fine-tune of the 4 blocks (partial-ft), lr 2e-4",
}

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--arms", default=",".join(ARMS))
parser.add_argument("--steps", type=int, default=400, help="optimizer steps of every arm")
parser.add_argument("--batch-size", type=int, default=4)
parser.add_argument("--embedding-lr", type=float, default=5e-3, help="learning rate of the new class's rows")
parser.add_argument("--per-class", type=int, default=8, help="images per old class (25 classes)")
parser.add_argument("--new-images", type=int, default=100, help="images of the new class")
parser.add_argument("--eval-steps", type=int, default=20, help="denoising steps of the evaluation images")
parser.add_argument("--guidance", type=float, default=4.0)
parser.add_argument("--num-class-images", type=int, default=200, help="prior images (the base's 25 classes)")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--out", default=str(REPO / "out" / "dit_table"))
parser.add_argument("--quick", action="store_true",
                    help="an end-to-end check: 2 images per old class, 10 of the new one, 25 prior images, 5 "
                         "denoising steps (the figures mean nothing)")
args = parser.parse_args()
if args.quick:
    args.per_class, args.new_images, args.eval_steps, args.num_class_images = 2, 10, 5, 25
unknown = [a for a in args.arms.split(",") if a not in ARMS]
if unknown:
    parser.error(f"unknown arms {unknown}; arms: {', '.join(ARMS)}")
logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
torch.set_num_threads(args.threads)
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
readers = scoring.readers()


def measure(pipe, label: int) -> dict:
    """Fidelity of class ``label`` (a yellow cross) and the old classes' accuracy, both readers."""
    images = dit_eval.generate(pipe, [label] * args.new_images, seed=10_000, steps=args.eval_steps,
                               guidance=args.guidance)
    fidelity = scoring.score(images, TARGET, reader_map=readers)
    report, _ = dit_eval.class_report(pipe, per_class=args.per_class, seed=0, steps=args.eval_steps,
                                      guidance=args.guidance, reader_map=readers)
    return {"new_class": fidelity, "old_classes": report["overall"],
            "old_worst": report["worst_class"], "per_class": report["per_class"]}


t_all = time.perf_counter()
results = {"settings": {**vars(args), "label": LABEL, "instances": "samples/subject (5 yellow crosses)"}}
pipe = dit_trainer.load_dit(DIT)
results["base"] = measure(pipe, dit_trainer.NULL_CLASS)  # the null class: what the new row starts from
print(f"base: new class (null) {results['base']['new_class']}, old classes {results['base']['old_classes']}",
      flush=True)
for arm in args.arms.split(","):
    method, extra, settings = ARMS[arm]
    run = out / arm
    cfg = load_config(None, {
        "base": str(DIT), "instance_dir": str(REPO / "samples" / "subject"), "output_dir": str(run),
        "overwrite": True, "seed": args.seed, "steps": args.steps, "batch_size": args.batch_size,
        "embedding_lr": args.embedding_lr, "class_prompts": dit_eval.class_names(),
        "num_class_images": args.num_class_images,
        "class_steps": args.eval_steps, "validation_every": 0,
        "validation_images": 4, "validation_steps": args.eval_steps, "checkpoint_every": 0,
        "log_every": max(args.steps // 4, 1), "threads": args.threads, "method": method, "extra_method": extra,
        **settings})
    t0 = time.perf_counter()
    adapter = dit_trainer.train_dit(cfg)
    seconds = time.perf_counter() - t0
    files = [adapter] + ([run / f"adapter-{extra['method']}.safetensors"] if extra else [])
    pipe = dit_trainer.load_dit(DIT)
    for f in files:
        pd.load_adapter(pipe, f)
    params = sum(p.numel() for _, s in pd.api.sites(pipe) for p in s.deltas.parameters())
    log = json.loads((run / "losses.json").read_text())
    results[arm] = {**measure(pipe, dit_trainer.class_ids(pipe)[LABEL]), "params": params,
                    "kib": sum(f.stat().st_size for f in files) / 1024, "s_per_step": log["s_per_step"],
                    "train_seconds": seconds, "loss_first": log["losses"][0], "loss_last": log["losses"][-1],
                    "method": method, "extra_method": extra, "trainer": settings}
    r = results[arm]
    print(f"{arm}: new class {r['new_class']}, old classes {r['old_classes']}, {params:,} parameters, "
          f"{r['kib']:.0f} KiB, {r['s_per_step']:.3f} s/step", flush=True)
results["seconds"] = time.perf_counter() - t_all


def pct(x: float) -> str:
    return f"{x:.0%}"


base = results["base"]
lines = [f"Teaching shapes-dit the class \"{LABEL}\" ({args.steps} steps, batch {args.batch_size} + "
         f"{args.batch_size} prior; {args.new_images} new-class images, {args.per_class} per old class)", "",
         "| arm | new class: yellow cross, oracle / analytic | old classes (25), oracle / analytic | "
         "trainable parameters | file | s / step |", "|---|---|---|---|---|---|",
         f"| untrained base (its null class) | {pct(base['new_class']['oracle']['all'])} / "
         f"{pct(base['new_class']['analytic']['all'])} | {pct(base['old_classes']['oracle']['all'])} / "
         f"{pct(base['old_classes']['analytic']['all'])} | - | - | - |"]
for arm in args.arms.split(","):
    r = results[arm]
    lines.append(f"| {DESCRIBE[arm]} | {pct(r['new_class']['oracle']['all'])} / {pct(r['new_class']['analytic']['all'])}"
                 f" | {pct(r['old_classes']['oracle']['all'])} / {pct(r['old_classes']['analytic']['all'])} | "
                 f"{r['params']:,} | {r['kib']:.0f} KiB | {r['s_per_step']:.3f} |")
if args.quick:
    lines += ["", "(--quick: an end-to-end check; these figures mean nothing)"]
(out / "table.md").write_text("\n".join(lines) + "\n")
(out / "results.json").write_text(json.dumps(results, indent=2))
print("\n".join(lines))
