"""Few-shot classification on the embedded CLIP's shifted domains: zero-shot CLIP, CoOp, CLIP-Adapter,
Tip-Adapter, Tip-Adapter-F, a linear probe, and visual prompts in the vision tower (VPT shallow / deep, VP).

    python samples/clip_fewshot_table.py [--shots 1,4,16] [--domains striped,cross] [--out out/clip_fewshot]

The shifted domains are the embedded CLIP's (``peft_diffusion/models/shapes-clip/README.md``,
``peft_diffusion.shapes.clip_eval``): its test sets are the card's, so the zero-shot row reproduces the card.

- ``striped``: the 25 shape x colour classes ("red circle", prompt "a red circle"), every image striped (CLIP
  never saw stripes: zero-shot 41.7 % on the card). Few-shot set: K striped images per class.
- ``cross``: 30 classes, the held-out shape "cross" added in each colour (zero-shot 19.1 % on the card's
  1000 cross images). Few-shot set: K ordinary world images per class, crosses for the cross classes.

Both domains also score 1000 fresh ordinary world images (``world.dataset(1000, 4321)``, the card's
zero-shot set) among the same classes: what a method keeps of the original domain. The few-shot images are
drawn with their own seed (``--seed``), apart from every test image.

Settings (one per method, chosen before measuring, not tuned on the test sets): CoOp 4 context tokens,
N(0, 0.02) init, unified; CLIP-Adapter reduction 4 with alpha = 0.2 (the paper's generic value) and 0.6 (its
fine-grained value); Tip-Adapter alpha = 1, beta = 5.5 (the paper's initial values; note the CLIP term here
carries shapes-clip's logit scale 21.4, not OpenAI CLIP's 100); Tip-Adapter with alpha and beta chosen by
leave-one-out on the few-shot set (``leave_one_out``: the paper searches a validation set we do not use);
Tip-Adapter-F the same with its keys trained; linear probe: a linear layer on the L2-normalised image feature,
zero init. Every trained arm: full-batch AdamW, cross-entropy, ``--steps`` steps (CoOp and CLIP-Adapter lr 2e-3
as CoOp's paper's SGD rate, Tip-Adapter-F lr 1e-3 as its paper, linear probe lr 1e-2). Single seed.

Visual prompts (``pd.inject`` into the frozen CLIPModel's vision tower; the image is classified zero-shot-style,
logit_scale * cos(image feature, frozen class text feature), the prompts trained with cross-entropy through
the whole tower): VPT shallow and deep with p = 8 tokens (64 patches here; Xavier-uniform init as the paper),
VP with a 4 px frame on the 32 px images (4/32, about the paper's 30/224; zero init). They need the tower in
every step, so they train on minibatches of ``--prompt-batch`` (32) images for ``--prompt-steps`` (50) steps,
AdamW lr 1e-2 (VPT) and 5e-2 (VP, pixel units), settings fixed before measuring; their test images run through
the prompted tower.
Prints a Markdown table per domain; ``--out`` also writes ``table.md`` and ``results.json``.
"""
import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import peft_diffusion as pd
from peft_diffusion.methods import VP, VPT, CLIPAdapter, CoOp, TipAdapter
from peft_diffusion.methods.clip_heads import adapter_parameters
from peft_diffusion.models import path as embedded_path
from peft_diffusion.shapes import clip_eval, world

CLIP = embedded_path("shapes-clip")
TEMPLATE = "a {}"  # "a red circle": the world's caption of the class, the card's zero-shot prompt
EVAL_SEED = 4321  # clip_eval.evaluate_clip's: world set seed, striped seed + 1, cross seed + 2


def classes(domain: str) -> list[tuple[str, str]]:
    shapes = world.SHAPES if domain == "striped" else world.ALL_SHAPES
    return list(itertools.product(shapes, world.COLOURS))


def few_shot(domain: str, shots: int, seed: int) -> tuple[list, list[int]]:
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for k, (shape, colour) in enumerate(classes(domain)):
        for _ in range(shots):
            attrs = {**world.sample(rng).attrs, "shape": shape, "colour": colour, "striped": domain == "striped"}
            images.append(world.from_attrs(attrs, rng).image)
            labels.append(k)
    return images, labels


def test_sets(domain: str) -> dict:
    index = {c: k for k, c in enumerate(classes(domain))}
    shifted = clip_eval.shifted_set(domain, 1000, EVAL_SEED + (1 if domain == "striped" else 2))
    fresh = world.dataset(1000, EVAL_SEED)
    return {name: ([s.image for s in samples], [index[(s.attrs["shape"], s.attrs["colour"])] for s in samples])
            for name, samples in (("shifted", shifted), ("world", fresh))}


def train(head: nn.Module, feats: torch.Tensor, labels: torch.Tensor, steps: int, lr: float, **opt) -> None:
    params = [p for p in head.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=lr, **opt)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(head(image_features=feats), labels)
        optim.zero_grad()
        loss.backward()
        optim.step()


class LinearProbe(nn.Module):
    """Logistic regression on the L2-normalised image feature (CLIP's linear-probe baseline)."""

    def __init__(self, dim: int, n_cls: int, scale: float):
        super().__init__()
        self.fc = nn.Linear(dim, n_cls)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)
        self.scale = scale

    def forward(self, image_features):
        return self.fc(nn.functional.normalize(image_features, dim=-1)) * self.scale


def arms(model, tok, names, feats, labels, steps):
    """(name, head, train seconds) for each method, trained on the few-shot features."""
    yield "zero-shot CLIP", CLIPAdapter(model, tok, names, alpha=0.0, template=TEMPLATE), None
    for name, build, lr, opt in (
        ("CoOp (M = 4)", lambda: CoOp(model, tok, names, n_ctx=4, seed=0), 2e-3, {}),
        ("CLIP-Adapter (alpha 0.2)", lambda: CLIPAdapter(model, tok, names, alpha=0.2, template=TEMPLATE), 2e-3, {}),
        ("CLIP-Adapter (alpha 0.6)", lambda: CLIPAdapter(model, tok, names, alpha=0.6, template=TEMPLATE), 2e-3, {}),
        ("Tip-Adapter", lambda: TipAdapter.from_few_shot(model, tok, names, labels, image_features=feats,
                                                         template=TEMPLATE), None, {}),
        (LOO, lambda: leave_one_out(TipAdapter.from_few_shot(
            model, tok, names, labels, image_features=feats, template=TEMPLATE), feats, labels), None, {}),
        ("Tip-Adapter-F", lambda: TipAdapter.from_few_shot(model, tok, names, labels, image_features=feats,
                                                           fine_tune=True, template=TEMPLATE), 1e-3, {"eps": 1e-4}),
        ("linear probe", lambda: LinearProbe(feats.shape[1], len(names), 30.0), 1e-2, {}),
    ):
        torch.manual_seed(0)
        start = time.perf_counter()
        head = build()
        if lr is not None:
            train(head, feats, labels, steps, lr, **opt)
        yield name, head, time.perf_counter() - start


PROMPTS = (  # (row, config, AdamW lr): injected into the vision tower for the duration of the arm
    ("VPT-shallow (p = 8)", VPT(num_tokens=8), 1e-2),
    ("VPT-deep (p = 8)", VPT(num_tokens=8, deep=True), 1e-2),
    ("VP (padding 4, zero init)", VP(padding=4), 5e-2),
)


def prompt_arms(model, tok, names, pixels, labels, steps, batch):
    """(name, head, train seconds, trained numbers) for each visual prompt, live in ``model`` while yielded."""
    head = CLIPAdapter(model, tok, names, alpha=0.0, template=TEMPLATE)  # zero-shot classifier, frozen text
    for name, config, lr in PROMPTS:
        torch.manual_seed(0)
        start = time.perf_counter()
        pd.inject(model, config, "prompt", freeze=False)  # the heads freeze the base tower while it runs
        try:
            params = adapter_parameters(model)
            optim = torch.optim.AdamW(params, lr=lr)
            g = torch.Generator().manual_seed(0)
            for _ in range(steps):
                idx = torch.randperm(len(labels), generator=g)[:batch]
                loss = nn.functional.cross_entropy(head(pixel_values=pixels[idx]), labels[idx])
                optim.zero_grad()
                loss.backward()
                optim.step()
            yield name, head, time.perf_counter() - start, sum(p.numel() for p in params)
        finally:
            pd.remove(model, "prompt")


@torch.no_grad()
def leave_one_out(head: TipAdapter, feats: torch.Tensor, labels: torch.Tensor) -> TipAdapter:
    """Tip-Adapter's alpha and beta chosen on the few-shot set itself: each image classified by CLIP plus the
    cache without its own key (the paper searches a grid on a validation set; we use no images beyond the K
    shots). Ties keep the first (smaller) values."""
    f = nn.functional.normalize(feats, dim=-1)
    clip_logits = head.logit_scale() * f @ head.class_features.T
    affinity = f @ head.cache_keys.T
    best = (-1.0, head.alpha, head.beta)
    for beta in BETAS:
        cache = torch.exp(-beta * (1 - affinity)).fill_diagonal_(0) @ head.cache_values
        for alpha in ALPHAS:
            acc = ((clip_logits + alpha * cache).argmax(-1) == labels).float().mean().item()
            if acc > best[0]:
                best = (acc, alpha, beta)
    head.alpha, head.beta = best[1], best[2]
    return head


LOO = "Tip-Adapter, alpha / beta by leave-one-out"
ALPHAS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
BETAS = (1.0, 3.0, 5.5, 8.0, 12.0, 20.0, 30.0)


@torch.no_grad()
def accuracy(head, feats, labels) -> float:
    return (head(image_features=feats).argmax(-1) == labels).float().mean().item()


@torch.no_grad()
def accuracy_pixels(head, pixels, labels) -> float:
    return (head(pixel_values=pixels).argmax(-1) == labels).float().mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shots", default="1,4,16")
    parser.add_argument("--domains", default="striped,cross")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--prompt-steps", type=int, default=50)
    parser.add_argument("--prompt-batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import CLIPModel, CLIPTokenizer

    model, tok = CLIPModel.from_pretrained(CLIP).eval(), CLIPTokenizer.from_pretrained(CLIP)
    encode = CLIPAdapter(model, tok, ["circle"], template=TEMPLATE).encode_images  # the frozen vision tower
    shots = [int(s) for s in args.shots.split(",")]
    results, tables, begin = {}, [], time.perf_counter()
    for domain in args.domains.split(","):
        names = [f"{colour} {shape}" for shape, colour in classes(domain)]
        test_pixels = {k: (clip_eval.pixel_values(im), torch.tensor(lb)) for k, (im, lb) in test_sets(domain).items()}
        tests = {k: (encode(px), lb) for k, (px, lb) in test_pixels.items()}
        rows: dict[str, dict] = {}
        for k in shots:
            images, labels = few_shot(domain, k, args.seed)
            pixels, labels = clip_eval.pixel_values(images), torch.tensor(labels)
            feats = encode(pixels)
            for name, head, seconds in arms(model, tok, names, feats, labels, args.steps):
                trained = 0 if seconds is None else sum(p.numel() for p in head.parameters() if p.requires_grad)
                row = rows.setdefault(name, {"params": trained})
                row[k] = {t: accuracy(head, *tests[t]) for t in tests} | {"seconds": seconds}
                if isinstance(head, TipAdapter):
                    row[k] |= {"alpha": head.alpha, "beta": head.beta}
            for name, head, seconds, trained in prompt_arms(model, tok, names, pixels, labels, args.prompt_steps,
                                                            args.prompt_batch):
                row = rows.setdefault(name, {"params": trained})
                row[k] = {t: accuracy_pixels(head, *test_pixels[t]) for t in test_pixels} | {"seconds": seconds}
        results[domain] = rows
        head = (f"| {domain}: shifted / world accuracy | trained | "
                + " | ".join(f"{k}-shot" for k in shots) + " |\n|---|---|" + "---|" * len(shots) + "\n")
        body = "".join(f"| {name} | {row['params']:,} | "
                       + " | ".join(f"{row[k]['shifted']:.1%} / {row[k]['world']:.1%}" for k in shots) + " |\n"
                       for name, row in rows.items())
        tables.append(head + body)
        print(tables[-1], flush=True)
        print("Tip-Adapter (alpha, beta) by leave-one-out: " + ", ".join(
            f"{k}-shot {rows[LOO][k]['alpha']:g}, {rows[LOO][k]['beta']:g}" for k in shots) + "\n")
    print(f"total {time.perf_counter() - begin:.0f} s ({time.process_time():.0f} s CPU)")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text("\n".join(tables))
        (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
