"""Selective methods: train step time and memory against LoRA and against a full fine-tune of the attention
weights, one run. Masked / sparse ones (FISH, Child-Tuning_F, Diff pruning) against the full fine-tune of the same
tensors; the dense bias / norm ones (BitFit, LN tuning, DiffFit) against LoRA.

    python bench/selective_step.py [--quick] [--only base|sd15] [--steps N] [--threads N] [--rounds N]
                                   [--variants full,lora,...] [--interleaved] [--profile VARIANT]

The tensors: the ``weight`` of every attention projection (to_q, to_k, to_v, to_out.0 of every Attention
module: the ``unet-attn`` preset, which the selective methods take by default). Variants, each in a fresh
subprocess, ``--rounds`` times in alternating order:

- full:       those weights themselves require grad (the base otherwise frozen): dense AdamW over them
- lora:       ``pd.LoRA(r=8, target="unet-attn")`` on the same modules
- fish:       ``pd.methods.FISHMask(density=0.005)`` (the scoring pass is not timed: it runs once)
- ct-f:       ``pd.methods.ChildTuningF(density=0.3)`` (dense delta, Bernoulli gradient mask)
- diff-prune: ``pd.methods.DiffPruning(density=0.005)`` with its L0 term added to the loss
- bitfit:     ``pd.methods.BitFit()`` (every bias), ln: ``pd.methods.LNTuning()`` (every norm layer),
  difffit:    ``pd.methods.DiffFit()`` (biases, norms, class embedding, a gamma per residual branch): their
  defaults on the U-Net, against ``lora`` (r 8 on LoRA's default U-Net target, the same ``unet-attn`` preset)
- bitfit-native, ln-native, difffit-native: the floors of those three: the very parameters the method trains
  (DiffFit: without its gammas, which are new) trained natively (``requires_grad`` on them, no delta, no
  hook). A method whose floor is above LoRA's time cannot meet its target however it is implemented: the
  backward pass must reach the first layer whose bias trains (``conv_in``), where LoRA's stops at the first
  attention block.

``--interleaved`` measures time only: every asked variant of a model built in ONE process and stepped in
turn (alternating order), which removes the spread between processes (allocator state, page placement,
what else ran on the machine in that process's minutes). It holds one U-Net per variant: on SD1.5 about
4-8 GB each, so choose two or three there with ``--variants``. ``--profile VARIANT`` prints where one
variant's step time goes (torch.profiler, ops by self CPU time). ``--only base`` / ``--only sd15`` runs one
half; each half prints how long it took.

A step: noise and timesteps (fixed seed), ``unet(noisy, t, context).sample``, MSE (+ the regulariser), backward,
AdamW step, zero_grad. One warm-up step, then the median of N timed steps, wall clock and process CPU time (the
ratios are judged on CPU time: on a machine shared with other jobs, wall time mostly measures the others). Memory: growth of peak RSS
(``ru_maxrss``) from after build + inject to after the timed steps (activations, gradients, optimizer state;
CPU), and the optimizer's state exactly (bytes of every tensor AdamW holds after its first step).

Two U-Nets: (a) the embedded base ``peft_diffusion/models/shapes-base`` (fp32), batch 8, its own latent size
(``unet.config.sample_size``), context (8, 16, 64); (b) SD1.5's U-Net architecture from its config (random
weights, fp32), batch 1, latent 32x32 (256 px), context (1, 77, 768). Targets: a masked method's step time <=
1.2x the full fine-tune's; optimizer memory proportional to the trained entries where the method allows (FISH:
yes; Child-Tuning_F and Diff pruning train dense tensors, so theirs is the full fine-tune's or twice it);
BitFit / LN tuning / DiffFit step time <= LoRA's.
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
from harness import EMBEDDED_BASE as EMBEDDED, build_unet as build, peak_mb, run_child as run_script  # noqa: E402
from harness import timed_steps  # noqa: E402
#          name: (batch, latent side (None: the U-Net config's sample_size), context tokens, context dim,
#                 timed steps full, quick)
MODELS = {"shapes-base": (8, None, 16, 64, 10, 3), "sd15-256px": (1, 32, 77, 768, 2, 1)}  # SD1.5: ~10 min idle
HALVES = {"base": "shapes-base", "sd15": "sd15-256px"}  # --only
VARIANTS = ("full", "lora", "fish", "ct-f", "diff-prune", "bitfit", "ln", "difffit", "bitfit-native", "ln-native",
            "difffit-native")
MASKED = ("fish", "ct-f", "diff-prune")  # judged against "full"
DENSE = ("bitfit", "ln", "difffit")  # judged against "lora"; "<method>-native" is each one's floor
TARGET_TIME = 1.2  # x full, masked methods
TARGET_DENSE = 1.0  # x lora, dense selective methods


def latent_side(model: str) -> int:
    """The latent side a step uses: fixed for SD1.5 at 256 px, the embedded U-Net's own ``sample_size``."""
    side = MODELS[model][1]
    if side is not None:
        return side
    from diffusers import UNet2DConditionModel

    size = UNet2DConditionModel.load_config(str(EMBEDDED), subfolder="unet")["sample_size"]
    return size if isinstance(size, int) else size[0]


def attach(unet, variant: str) -> int:
    """Set the variant up; returns the number of entries of the selected tensors."""
    import peft_diffusion as pd
    from peft_diffusion.methods import BitFit, ChildTuningF, DiffFit, DiffPruning, FISHMask, LNTuning
    from peft_diffusion.methods.sparse import weights_of
    from peft_diffusion.presets import preset

    torch.manual_seed(1)
    names = weights_of(preset("unet-attn")).select(unet, "param")
    entries = sum(unet.get_parameter(n).numel() for n in names)
    unet.requires_grad_(False)
    if variant == "full":
        for n in names:
            unet.get_parameter(n).requires_grad_(True)
    elif variant == "lora":
        pd.inject(unet, pd.LoRA(r=8, alpha=8, target="unet-attn"), "b")
    elif variant.endswith("-native"):  # the method's own parameters, trained natively
        config = {"bitfit": BitFit(), "ln": LNTuning(), "difffit": DiffFit()}[variant[: -len("-native")]]
        config = config.resolved(unet)
        for q in config.select(unet):
            if not isinstance(config, DiffFit) or config.kind_of(unet, q) == "param":  # not DiffFit's gammas
                unet.get_parameter(q).requires_grad_(True)
    else:
        config = {"fish": FISHMask(density=0.005), "ct-f": ChildTuningF(density=0.3),
                  "diff-prune": DiffPruning(density=0.005), "bitfit": BitFit(), "ln": LNTuning(),
                  "difffit": DiffFit()}[variant]
        pd.inject(unet, config, "b")
    return entries


def setup(model: str, variant: str):
    import peft_diffusion as pd

    batch, _, tokens, dim, _, _ = MODELS[model]
    side = latent_side(model)
    unet = build(model)
    entries = attach(unet, variant)
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(42)
    latents = torch.randn(batch, 4, side, side, generator=g)
    context = torch.randn(batch, tokens, dim, generator=g)
    regularizing = variant == "diff-prune"

    def step() -> float:
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        pred = unet(latents + noise, t, context).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        if regularizing:
            loss = loss + pd.api.regularizer(unet)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    def opt_bytes() -> int:
        return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t)
                   and t.dim() > 0)

    return step, sum(p.numel() for p in params), entries, opt_bytes


def child(model: str, variant: str, steps: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    step, n_train, entries, opt_bytes = setup(model, variant)
    base = peak_mb()
    usage = []
    times, cpu, _ = timed_steps(step, steps, usage)  # one warm-up step, then the timed ones
    return dict(time=statistics.median(times), tmin=min(times), cpu=statistics.median(cpu), mem=peak_mb() - base,
                opt_mb=opt_bytes() / 2**20, trainable=n_train, entries=entries,
                sys=statistics.median(u[0] for u in usage), faults=statistics.median(u[1] for u in usage))


def interleaved(model: str, variants, steps: int, threads: int) -> dict:
    """Time only, every variant in this one process, one step each per round in alternating order after one
    warm-up round: variant -> (median wall s, median CPU s)."""
    from harness import interleaved as rounds

    torch.set_num_threads(threads)
    calls = {v: setup(model, v)[0] for v in variants}
    times = rounds(calls, steps)
    return {v: (statistics.median(w), statistics.median(c)) for v, (w, c) in times.items()}


def profile(model: str, variant: str, steps: int, threads: int, rows: int = 30) -> None:
    """``--profile``: one warm-up step, then ``steps`` steps under ``torch.profiler`` in this process; prints the
    ops by self CPU time (where a variant's extra time goes) and the step's CPU time outside the profiler."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    torch.set_num_threads(threads)
    step, n_train, entries, _ = setup(model, variant)
    step()
    c0 = time.process_time()
    step()
    cpu = time.process_time() - c0
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    print(f"{model} {variant}: {n_train:,} trainable, one unprofiled step {cpu:.3f} s cpu; {steps} profiled step(s):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def run_child(model, variant, steps, threads) -> dict:
    return run_script(__file__, (model, variant, steps, threads), f"{model} {variant}")


def verdict(v: str, x_full: float, x_lora: float, floor_x_lora: float | None = None) -> tuple[str, bool]:
    """The variant's target line and whether it is met (references have none); ``floor_x_lora``: the dense
    method's native floor x lora, when it ran."""
    if v in MASKED:
        return ("  time yes" if x_full <= TARGET_TIME else "  time NO"), x_full <= TARGET_TIME
    if v in DENSE:
        met = x_lora <= TARGET_DENSE
        reach = " (its native floor is above the target too)" if (
            not met and floor_x_lora is not None and floor_x_lora > TARGET_DENSE) else ""
        return ("  time yes (x lora)" if met else f"  time NO (x lora){reach}"), met
    if v.endswith("-native"):
        return f"  floor of {v[: -len('-native')]}", True
    return "", True


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1, help="subprocesses per variant, in alternating order")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma-separated subset (full and lora, the references, always run)")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ", ".join(MODELS))
    ap.add_argument("--only", choices=sorted(HALVES), help="one half: base (the embedded U-Net) or sd15 (SD1.5 at "
                    "256 px); the same as --models shapes-base / sd15-256px")
    ap.add_argument("--steps", type=int, help="timed steps per child (default: 10 embedded, 2 SD1.5; --quick 3 / 1)")
    ap.add_argument("--profile", metavar="VARIANT", help="profile VARIANT in this process (torch.profiler, the "
                    "first of --models, 2 steps or --steps) and print its ops by self CPU time; no table")
    ap.add_argument("--interleaved", action="store_true", help="time only: the variants of a model in one process, "
                    "stepped in turn (one U-Net each: on SD1.5 choose 2-3 with --variants)")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.only:
        a.models = HALVES[a.only]
    if a.profile:
        profile(a.models.split(",")[0], a.profile, a.steps or 2, a.threads)
        return 0
    if a.child:
        model, variant, steps, threads = a.child
        print(json.dumps(child(model, variant, int(steps), int(threads))))
        return 0
    asked = set(a.variants.split(",")) | {"full", "lora"}
    models = a.models.split(",")
    unknown = sorted((asked - set(VARIANTS)) | (set(models) - set(MODELS)))
    if unknown:
        sys.exit(f"unknown variant or model {unknown}: variants are {', '.join(VARIANTS)}; models {', '.join(MODELS)}")
    variants = tuple(v for v in VARIANTS if v in asked)

    print(f"torch {torch.__version__}, {a.threads} thread(s), {'quick' if a.quick else 'full'} mode", flush=True)
    ok = {"masked": True, "dense": True}
    for model in models:
        started = time.perf_counter()
        batch, _, tokens, dim, full, quick = MODELS[model]
        side, steps = latent_side(model), a.steps or (quick if a.quick else full)
        print(f"\n{model}: batch {batch}, latent {side}x{side}, context ({batch}, {tokens}, {dim}), "
              f"warm-up 1 + median of {steps} step(s), {a.rounds} round(s)", flush=True)
        if a.interleaved:
            res = interleaved(model, variants, steps, a.threads)
            f, lo = res["full"], res["lora"]
            print(f"  {'variant':<16}{'wall s':>8}{'cpu s':>8}{'x full':>8}{'x lora':>8}   (interleaved, one process)")
            for v, (w, c) in res.items():
                floor = res.get(f"{v}-native")
                met, good = verdict(v, c / f[1], c / lo[1], floor[1] / lo[1] if floor else None)
                if v in MASKED or v in DENSE:
                    ok["masked" if v in MASKED else "dense"] &= good
                print(f"  {v:<16}{w:>8.3f}{c:>8.3f}{c / f[1]:>7.3f}x{c / lo[1]:>7.3f}x{met}", flush=True)
            print(f"  ({model} half: {time.perf_counter() - started:.0f} s wall)", flush=True)
            continue
        runs = {v: [] for v in variants}
        for i in range(a.rounds):
            for v in (variants if i % 2 == 0 else variants[::-1]):
                runs[v].append(run_child(model, v, steps, a.threads))
                print(f"    ({model} {v}: {runs[v][-1]['cpu']:.3f} s cpu, {runs[v][-1]['time']:.3f} s wall per step)",
                      flush=True)
        res = {v: dict(rs[0], time=statistics.median(r["time"] for r in rs), cpu=statistics.median(r["cpu"] for r in rs),
                       mem=statistics.median(r["mem"] for r in rs))
               for v, rs in runs.items()}
        f, lo = res["full"], res["lora"]
        print(f"  selected tensors: {f['entries']:,} entries (attention projection weights)")
        print(f"  {'variant':<16}{'trainable':>13}{'wall s':>8}{'x full':>8}{'cpu s':>8}{'x full':>8}{'x lora':>8}"
              f"{'RSS MB':>9}{'x full':>8}{'optim MB':>10}{'x full':>8}")
        for v, r in res.items():
            wf, tf, tl = r["time"] / f["time"], r["cpu"] / f["cpu"], r["cpu"] / lo["cpu"]
            mf = r["mem"] / f["mem"] if f["mem"] > 0 else float("nan")
            of = r["opt_mb"] / f["opt_mb"]
            floor = res.get(f"{v}-native")
            met, good = verdict(v, tf, tl, floor["cpu"] / lo["cpu"] if floor else None)
            if v in MASKED or v in DENSE:
                ok["masked" if v in MASKED else "dense"] &= good
            print(f"  {v:<16}{r['trainable']:>13,}{r['time']:>8.2f}{wf:>7.3f}x{r['cpu']:>8.2f}{tf:>7.3f}x{tl:>7.3f}x"
                  f"{r['mem']:>9.1f}{mf:>7.3f}x"
                  f"{r['opt_mb']:>10.2f}{of:>7.4f}x{met}", flush=True)
        print("  (system CPU s per step, part of cpu s: page faults of fresh tensor memory, and minor faults per "
              "step: " + ", ".join(f"{v} {r['sys']:.3f} s {r['faults']:,.0f}" for v, r in res.items()) + ")")
        print(f"  ({model} half: {time.perf_counter() - started:.0f} s wall for {len(variants) * a.rounds} children)",
              flush=True)
    print(f"\n(targets: masked methods' step time <= {TARGET_TIME}x the full fine-tune of the same tensors; BitFit / LN "
          f"tuning / DiffFit step time <= {TARGET_DENSE}x LoRA's; judged on the process CPU time per step, which a "
          "machine shared with other jobs inflates less than wall time)")
    if set(variants) & set(MASKED):
        print("masked methods (x full): " + ("all time targets met" if ok["masked"] else "some time targets missed"))
    if set(variants) & set(DENSE):
        print("BitFit / LN tuning / DiffFit (x lora): " + ("all time targets met" if ok["dense"]
                                                           else "some time targets missed"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
