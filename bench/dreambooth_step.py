"""LoRA DreamBooth train step: peft-diffusion against diffusers + peft, same settings, one run.

    python bench/dreambooth_step.py [--quick] [--threads N] [--rounds N] [--interleaved]

A step: noise and timesteps (fixed seed), ``unet(noisy, t, context).sample``, MSE to the noise, backward,
AdamW step on the trainable parameters, zero_grad. Same inputs for both libraries. One warm-up step, then the
median of N timed steps. Adapter: rank 8, alpha 8, on attn2 to_q / to_k / to_v / to_out.0 (cross-attention);
base frozen.

- ours:   ``pd.inject(unet, pd.LoRA(r=8, alpha=8, target="unet-cross-attn"), "db")``
- theirs: ``unet.requires_grad_(False); unet.add_adapter(peft.LoraConfig(...same modules...))``
          (as diffusers' train_dreambooth_lora does)
- floor:  no adapter; only the biases of attn2.to_out.0 train. An adapter that itself costs nothing: the
          backward still runs from the loss down to the first cross-attention, as for LoRA (it stops a few
          ops short of LoRA's first to_q, so it is a lower bound). floor/peft is the best ratio ANY
          implementation of this LoRA step can reach: when it is above the time target, the target cannot be
          met at identical settings, whatever the adapter code does.

Two U-Nets: (a) the embedded base ``peft_diffusion/models/shapes-base`` (fp32), batch 8, latent 8x8, context (8, 16, 64);
(b) SD1.5's U-Net architecture from its config (random weights, fp32), batch 1, latent 32x32 (256 px, to keep
CPU time bounded), context (1, 77, 768). Each (model, library, gradient checkpointing) variant runs in a
fresh subprocess, ``--rounds`` times in alternating order (ours, peft, floor / floor, peft, ours, ...) so
that a slow spell of the machine does not fall on one library; the reported time is the median over rounds
of each subprocess's median step, with the fastest step alongside. ``--interleaved`` measures time only,
with the three variants built in ONE process and stepped in alternating order (no spread between
processes). Memory is the growth of peak RSS (``ru_maxrss``) from after build + inject to after the
timed steps: CPU peak RSS growth, an approximation of activation + gradient + optimizer memory.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import build_unet as build, peak_mb, run_child as run_script, timed_steps  # noqa: E402

R, ALPHA = 8, 8
MODULES = [r"attn2.to_q", r"attn2.to_k", r"attn2.to_v", r"attn2.to_out.0"]
#          name: (batch, latent side, context tokens, context dim, timed steps full, quick)
MODELS = {"shapes-base": (8, 8, 16, 64, 20, 5), "sd15-256px": (1, 32, 77, 768, 3, 1)}
LIBS = ("ours", "peft", "floor")
TARGET_TIME, TARGET_MEM = 0.95, 1.0


def attach(unet, lib: str) -> None:
    torch.manual_seed(1)
    if lib == "ours":
        import peft_diffusion as pd

        pd.inject(unet, pd.LoRA(r=R, alpha=ALPHA, target="unet-cross-attn"), "db")
    elif lib == "floor":
        unet.requires_grad_(False)
        for name, module in unet.named_modules():
            if name.endswith("attn2.to_out.0"):
                module.bias.requires_grad_(True)
    else:
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=R, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=MODULES))


def setup(model: str, lib: str, ckpt: bool):
    """(step function, trainable count, layer count) of one variant; the step returns its loss."""
    batch, side, tokens, dim, _, _ = MODELS[model]
    unet = build(model)
    attach(unet, lib)
    unet.train()
    if ckpt:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    n_layers = sum(1 for n, m in unet.named_modules() if n.endswith(tuple(MODULES)) and not n.endswith(".base"))
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(42)
    latents = torch.randn(batch, 4, side, side, generator=g)
    context = torch.randn(batch, tokens, dim, generator=g)

    def step() -> float:
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        noisy = latents + noise  # the scheduler's add_noise is elementwise; same cost for both sides
        pred = unet(noisy, t, context).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step, n_train, n_layers


def child(model: str, lib: str, ckpt: bool, steps: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    step, n_train, n_layers = setup(model, lib, ckpt)
    base = peak_mb()
    times, _, loss = timed_steps(step, steps)  # one warm-up step, then the timed ones
    return dict(time=statistics.median(times), tmin=min(times), mem=peak_mb() - base, base=base,
                trainable=n_train, layers=n_layers, loss=loss)


def interleaved(model: str, ckpt: bool, steps: int, threads: int) -> None:
    """Time only: the three variants in ONE process, one step each per round, alternating order. Removes the
    spread between processes (allocator state, page placement), which on a 60 ms step exceeds the adapter."""
    torch.set_num_threads(threads)
    steps_of = {lib: setup(model, lib, ckpt)[0] for lib in LIBS}
    times = {lib: [] for lib in LIBS}
    for i in range(steps + 3):  # 3 warm-up rounds
        for lib in (LIBS if i % 2 == 0 else LIBS[::-1]):
            t0 = time.perf_counter()
            steps_of[lib]()
            if i >= 3:
                times[lib].append(time.perf_counter() - t0)
    med = {lib: statistics.median(ts) for lib, ts in times.items()}
    print(f"{model} ckpt {'on' if ckpt else 'off'}, {steps} interleaved rounds: "
          + ", ".join(f"{lib} {med[lib]:.4f} s" for lib in LIBS)
          + f"; ours/peft {med['ours'] / med['peft']:.3f}x, floor/peft {med['floor'] / med['peft']:.3f}x", flush=True)


def run_child(model, lib, ckpt, steps, threads) -> dict:
    return run_script(__file__, (model, lib, int(ckpt), steps, threads), f"{model} {lib} ckpt={ckpt}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="subprocesses per variant, in alternating order")
    ap.add_argument("--interleaved", action="store_true",
                    help="time only: the three variants interleaved in one process, twice the usual steps each")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.interleaved:
        for model, (*_, full, quick) in MODELS.items():
            for ckpt in (False, True):
                interleaved(model, ckpt, 2 * (quick if a.quick else full), a.threads)
        return 0
    if a.child:
        model, lib, ckpt, steps, threads = a.child
        print(json.dumps(child(model, lib, ckpt == "1", int(steps), int(threads))))
        return 0

    print(f"torch {torch.__version__}, {a.threads} thread(s), {'quick' if a.quick else 'full'} mode")
    rows, ok, bad = [], True, False
    for model, (batch, side, tokens, dim, full, quick) in MODELS.items():
        steps = quick if a.quick else full
        print(f"\n{model}: batch {batch}, latent {side}x{side}, context ({batch}, {tokens}, {dim}), "
              f"warm-up 1 + median of {steps} step(s)", flush=True)
        for ckpt in (False, True):
            runs = {lib: [] for lib in LIBS}
            for i in range(1 if a.quick else a.rounds):
                for lib in (LIBS if i % 2 == 0 else LIBS[::-1]):
                    runs[lib].append(run_child(model, lib, ckpt, steps, a.threads))
            res = {lib: dict(rs[0], time=statistics.median(r["time"] for r in rs), tmin=min(r["tmin"] for r in rs),
                             mem=statistics.median(r["mem"] for r in rs)) for lib, rs in runs.items()}
            o, p, f = res["ours"], res["peft"], res["floor"]
            if (o["trainable"], o["layers"]) != (p["trainable"], p["layers"]):
                print(f"  MISMATCH: trainable {o['trainable']} vs {p['trainable']}, "
                      f"layers {o['layers']} vs {p['layers']}")
                bad = True
            elif not ckpt:
                print(f"  trainable parameters: {o['trainable']:,} on {o['layers']} layers (both)")
            rows.append((model, ckpt, o, p, f))
    print(f"\n{'model':<12} {'ckpt':<4} {'ours s':>8} {'peft s':>8} {'floor s':>8} {'time x':>7} {'floor x':>8} "
          f"{'ours MB':>8} {'peft MB':>8} {'mem x':>6}  targets (time <= {TARGET_TIME}x, mem <= {TARGET_MEM}x)")
    for model, ckpt, o, p, f in rows:
        tr, fr, mr = o["time"] / p["time"], f["time"] / p["time"], o["mem"] / p["mem"] if p["mem"] > 0 else float("nan")
        met_t, met_m = tr <= TARGET_TIME, mr <= TARGET_MEM
        ok &= met_t and met_m
        reach = "" if met_t or fr <= TARGET_TIME else " (floor above the target: unreachable)"
        print(f"{model:<12} {'on' if ckpt else 'off':<4} {o['time']:>8.3f} {p['time']:>8.3f} {f['time']:>8.3f} "
              f"{tr:>6.3f}x {fr:>7.3f}x {o['mem']:>8.1f} {p['mem']:>8.1f} {mr:>5.3f}x  "
              f"time {'yes' if met_t else 'NO'}{reach}, mem {'yes' if met_m else 'NO'}")
    print("\n(fastest steps, ours/peft/floor: "
          + ", ".join(f"{m} {'on' if c else 'off'} {o['tmin']:.3f}/{p['tmin']:.3f}/{f['tmin']:.3f}"
                      for m, c, o, p, f in rows) + ")")
    print("(baseline peak RSS after build + inject, ours/peft MB: "
          + ", ".join(f"{m} {'on' if c else 'off'} {o['base']:.0f}/{p['base']:.0f}" for m, c, o, p, f in rows) + ")")
    print("\nall targets met" if ok else "\nsome targets missed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
