"""ControlNet training step: ours (``pd.ControlNet`` in an annex on the U-Net, the condition a per-call input)
against the same loop built from diffusers' ``ControlNetModel`` as its ``examples/controlnet/train_controlnet.py``
writes it (``ControlNetModel.from_unet(unet)``, the U-Net frozen, ``controlnet(...)`` then
``unet(..., down_block_additional_residuals=..., mid_block_additional_residual=...)``), one run.

    python bench/controlnet_step.py [--quick] [--threads N] [--rounds N] [--models shapes-base,sd15-256px]

Variants, each in a fresh subprocess, ``--rounds`` times in alternating order:

- diffusers:       the loop above; AdamW over the ControlNet's parameters
- ours:            ``pd.inject(unet, pd.ControlNet())``, ``with pd.inputs(unet, control_image=c): unet(...)``;
                   AdamW over the adapter's parameters
- controlnet-lora: ``pd.ControlNetLoRA(r=32)`` (information: a different method, not judged)
- controlnext:     ``pd.ControlNeXt()`` with the authors' SD1.5 module sizes (information, not judged)

A step: noise and timesteps (fixed seed), the forward, MSE against the noise, backward, AdamW step, zero_grad.
One warm-up step, then the median of N timed steps, wall clock and process CPU time (judged on CPU time: on a
shared machine wall time mostly measures the others). Memory: growth of peak RSS (``ru_maxrss``) from after
build + inject to after the timed steps (activations, gradients, optimizer state; CPU). Both ControlNets start
from the same seed, so the warm-up losses of ``ours`` and ``diffusers`` must agree (checked: the run exits 1
otherwise, a speed comparison being fair only if both compute the same thing).

U-Nets: (a) the embedded base ``peft_diffusion/models/shapes-base`` (fp32), batch 8, 16 x 16 latents, 32 px
conditions (its factor-2 VAE: condition embedding (16, 32)), context (8, 16, 64); (b) SD1.5's U-Net
architecture from its config (random weights, fp32), batch 1, 32 x 32 latents (256 px conditions, embedding
(16, 32, 96, 256)), context (1, 77, 768): about 10 GB of RSS per subprocess, so ``--quick`` runs (a) only.
Targets (issue 12): ours <= 1.0x diffusers' step time and memory.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from lora_lifecycle import SD15_UNET  # noqa: E402  (the same SD1.5 config dict)

EMBEDDED = ROOT / "peft_diffusion/models/shapes-base"
#          name: (batch, latent side, pixel factor, context tokens, context dim, timed steps full, quick)
MODELS = {"shapes-base": (8, 16, 2, 16, 64, 10, 3), "sd15-256px": (1, 32, 8, 77, 768, 3, 1)}
QUICK_MODELS = ("shapes-base",)
VARIANTS = ("diffusers", "ours", "controlnet-lora", "controlnext")
TARGET = 1.0  # ours x diffusers, time and memory


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def build(model: str):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if model == "shapes-base":
        return UNet2DConditionModel.from_pretrained(str(EMBEDDED), subfolder="unet", torch_dtype=torch.float32)
    return UNet2DConditionModel(**SD15_UNET)


def setup(model: str, variant: str):
    import peft_diffusion as pd
    from diffusers import ControlNetModel
    from peft_diffusion.methods.controlnet import embedding_for

    batch, side, factor, tokens, dim, _, _ = MODELS[model]
    unet = build(model)
    unet.requires_grad_(False)
    torch.manual_seed(1)  # the same ControlNet init for both
    if variant == "diffusers":
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=embedding_for(factor))
        controlnet.train()
        params = list(controlnet.parameters())
    else:
        config = {"ours": pd.ControlNet(downscale=factor), "controlnet-lora": pd.ControlNetLoRA(downscale=factor),
                  "controlnext": pd.ControlNeXt(downscale=factor)}[variant]
        pd.inject(unet, config, "b")
        params = [p for p in unet.parameters() if p.requires_grad]
    unet.train()
    opt = torch.optim.AdamW(params, lr=1e-5)
    g = torch.Generator().manual_seed(42)
    latents = torch.randn(batch, 4, side, side, generator=g)
    context = torch.randn(batch, tokens, dim, generator=g)
    cond = torch.rand(batch, 3, side * factor, side * factor, generator=g)

    def step() -> float:
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        noisy = latents + noise
        if variant == "diffusers":
            down, mid = controlnet(noisy, t, encoder_hidden_states=context, controlnet_cond=cond, return_dict=False)
            pred = unet(noisy, t, encoder_hidden_states=context, down_block_additional_residuals=list(down),
                        mid_block_additional_residual=mid).sample
        else:
            with pd.inputs(unet, control_image=cond):
                pred = unet(noisy, t, encoder_hidden_states=context).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step, sum(p.numel() for p in params)


def child(model: str, variant: str, steps: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    step, n_train = setup(model, variant)
    base = peak_mb()
    times, cpu, first = [], [], None
    for i in range(steps + 1):  # step 0 is the warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step()
        if i:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        else:
            first = loss
    return dict(time=statistics.median(times), cpu=statistics.median(cpu), mem=peak_mb() - base, trainable=n_train,
                loss=first)


def run_child(model, variant, steps, threads) -> dict:
    cmd = [sys.executable, __file__, "--child", model, variant, str(steps), str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        sys.exit(f"child {model} {variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1, help="subprocesses per variant, in alternating order")
    ap.add_argument("--models", default=None, help="comma-separated subset of " + ", ".join(MODELS))
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        model, variant, steps, threads = a.child
        print(json.dumps(child(model, variant, int(steps), int(threads))))
        return 0
    models = a.models.split(",") if a.models else list(QUICK_MODELS if a.quick else MODELS)
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        sys.exit(f"unknown model {unknown}: models are {', '.join(MODELS)}")
    print(f"torch {torch.__version__}, {a.threads} thread(s), {'quick' if a.quick else 'full'} mode", flush=True)
    same, met = True, True
    for model in models:
        batch, side, factor, tokens, dim, full, quick = MODELS[model]
        steps = quick if a.quick else full
        print(f"\n{model}: batch {batch}, latent {side}x{side}, condition {side * factor} px, context ({batch}, "
              f"{tokens}, {dim}), warm-up 1 + median of {steps} step(s), {a.rounds} round(s)", flush=True)
        runs = {v: [] for v in VARIANTS}
        for i in range(a.rounds):
            for v in (VARIANTS if i % 2 == 0 else VARIANTS[::-1]):
                runs[v].append(run_child(model, v, steps, a.threads))
                print(f"    ({model} {v}: {runs[v][-1]['cpu']:.3f} s cpu, {runs[v][-1]['time']:.3f} s wall per step)",
                      flush=True)
        res = {v: dict(rs[0], time=statistics.median(r["time"] for r in rs), cpu=statistics.median(r["cpu"] for r in rs),
                       mem=statistics.median(r["mem"] for r in rs)) for v, rs in runs.items()}
        d = res["diffusers"]
        agree = abs(res["ours"]["loss"] - d["loss"]) <= 1e-5 * max(1.0, abs(d["loss"]))
        same &= agree
        print(f"  warm-up loss: ours {res['ours']['loss']:.6f}, diffusers {d['loss']:.6f}"
              f" ({'same' if agree else 'DIFFERENT'})")
        print(f"  {'variant':<16}{'trainable':>13}{'wall s':>8}{'x diff':>8}{'cpu s':>8}{'x diff':>8}{'RSS MB':>9}{'x diff':>8}")
        for v, r in res.items():
            mx = r["mem"] / d["mem"] if d["mem"] > 0 else float("nan")
            tx = r["cpu"] / d["cpu"]
            line = ""
            if v == "ours":
                ok = tx <= TARGET and (mx <= TARGET or d["mem"] <= 0)
                met &= ok
                line = "  targets met" if ok else "  target MISSED"
            print(f"  {v:<16}{r['trainable']:>13,}{r['time']:>8.2f}{r['time'] / d['time']:>7.3f}x{r['cpu']:>8.2f}"
                  f"{tx:>7.3f}x{r['mem']:>9.1f}{mx:>7.3f}x{line}", flush=True)
    print(f"\n(target: ours <= {TARGET}x diffusers' step CPU time and peak-RSS growth; controlnet-lora and controlnext "
          "are other methods, shown for information)")
    print("ours vs diffusers: " + ("all targets met" if met else "some targets missed"))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
