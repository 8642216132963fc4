"""Peak memory and time of one LoRA training step on the U-Net under each attention processor, one run.

    python bench/attention_memory.py [--models shapes-base-4x,sd15-256px,sd15-384px] [--steps N] [--threads N]
                                     [--batch N]   (N instead of each model's batch; each child prints as it ends)

Processors, set with ``pd.set_attention(unet, kind)`` after injecting the LoRA: ``sdpa`` (torch
scaled_dot_product_attention, diffusers' default), ``sliced`` (``slice_size="auto"``: half of each layer's
heads per slice, diffusers' default), ``sliced-max`` (one head at a time), ``classic`` (bmm + softmax).
xformers is not installed on the benchmark machine (no CUDA), so it is not measured.

A step: noise and timesteps (fixed seed), ``unet(noisy, t, context).sample``, MSE to the noise, backward,
AdamW step on the LoRA (rank 8, alpha 8, default target: the attention projections), zero_grad. One warm-up
step, then the median of ``--steps`` timed steps. Each (model, processor) runs in a fresh subprocess; memory
is the growth of peak RSS (``ru_maxrss``) from after build + inject to after the steps: the activations,
gradients and optimizer state of the step (CPU; GPU peak memory would be ``torch.cuda.max_memory_allocated``).
"Saved for backward" is exact and noise-free: the bytes of the tensors autograd keeps for the backward pass of
the first step (``torch.autograd.graph.saved_tensors_hooks``; weights excluded, each storage counted once).

Models: the embedded base U-Net (``peft_diffusion/models/shapes-base``) at 4x its latent size (32x32 instead
of 8x8: 1024 query tokens at the top level), batch 8, context (8, 16, 64); and SD1.5's U-Net architecture from
its config (random weights), batch 1, context (1, 77, 768), at 256 px (latent 32x32) and 384 px (latent 48x48).

Correctness in the same run: the first step's loss is the same under every processor (relative 1e-4), or the
script exits 1. Ratios are each processor's figure over SDPA's.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import build_unet as build, peak_mb, run_child as run_script  # noqa: E402

#        name: (batch, latent side, context tokens, context dim)
MODELS = {"shapes-base-4x": (8, 32, 16, 64), "sd15-256px": (1, 32, 77, 768), "sd15-384px": (1, 48, 77, 768)}
KINDS = {"sdpa": ("sdpa", {}), "sliced": ("sliced", {}), "sliced-max": ("sliced", {"slice_size": "max"}),
         "classic": ("classic", {})}
TOL = 1e-4


def child(model: str, kind: str, steps: int, threads: int, batch: int = 0) -> dict:
    import peft_diffusion as pd

    torch.set_num_threads(threads)
    default_batch, side, tokens, dim = MODELS[model]
    batch = batch or default_batch
    unet = build(model)
    torch.manual_seed(1)
    pd.inject(unet, pd.LoRA(r=8, alpha=8, init="gaussian"), "a")
    name, opts = KINDS[kind]
    pd.set_attention(unet, name, **opts)
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(42)
    latents = torch.randn(batch, 4, side, side, generator=g)
    context = torch.randn(batch, tokens, dim, generator=g)
    weights = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):  # what autograd keeps for the backward pass, weights excluded, each storage once
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    base = peak_mb()
    times, losses = [], []
    for i in range(steps + 1):  # step 0 is the warm-up
        t0 = time.perf_counter()
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x) if i == 0 else contextlib.nullcontext():
            loss = torch.nn.functional.mse_loss(unet(latents + noise, t, context).sample, noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if i:
            times.append(time.perf_counter() - t0)
    return dict(time=statistics.median(times), mem=peak_mb() - base, base=base, loss=losses[0],
                saved=sum(saved.values()) / 2**20,
                processors=sorted(set(pd.attention_kinds(unet).values())))


def run_child(model: str, kind: str, steps: int, threads: int, batch: int) -> dict:
    return run_script(__file__, (model, kind, steps, threads, batch), f"{model} {kind}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=0, help="batch size instead of each model's default (0)")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        model, kind, steps, threads, batch = args.child
        print(json.dumps(child(model, kind, int(steps), int(threads), int(batch))))
        return 0
    import diffusers

    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}; {args.threads} threads, "
          f"{args.steps} timed step(s) after 1 warm-up; CPU (no GPU timings on this machine)", flush=True)
    failed = False
    for model in args.models.split(","):
        if model not in MODELS:
            sys.exit(f"unknown model {model!r}; known: {', '.join(MODELS)}")
        batch, side, tokens, dim = MODELS[model]
        batch = args.batch or batch
        print(f"\n{model}: batch {batch}, latent {side}x{side} ({side * side} tokens at the top level), "
              f"context ({batch}, {tokens}, {dim})", flush=True)
        rows = {}
        for kind in KINDS:
            rows[kind] = run_child(model, kind, args.steps, args.threads, args.batch)
            print(f"  ({kind} done: {json.dumps(rows[kind])})", flush=True)
        ref = rows["sdpa"]
        print(f"{'processor':<12}{'step (s)':>10}{'peak RSS growth (MB)':>22}{'saved for backward (MB)':>25}"
              f"{'time/sdpa':>11}{'mem/sdpa':>10}{'saved/sdpa':>12}{'first loss':>13}")
        for kind, row in rows.items():
            ok = abs(row["loss"] - ref["loss"]) <= TOL * abs(ref["loss"])
            failed |= not ok
            print(f"{kind:<12}{row['time']:>10.3f}{row['mem']:>22.1f}{row['saved']:>25.1f}"
                  f"{row['time'] / ref['time']:>10.2f}x{row['mem'] / ref['mem']:>9.2f}x{row['saved'] / ref['saved']:>11.2f}x"
                  f"{row['loss']:>13.6f}{'' if ok else '  LOSS DIFFERS'}", flush=True)
        print(f"(baseline peak RSS after build + inject: {ref['base']:.0f} MB)")
    if failed:
        print("\nFAILED: a processor changed the first step's loss")
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
