"""LoKr and LoHa train steps: peft-diffusion against lycoris-lora 4.1 in both of its modes, same layers and batch.

    python bench/lycoris_step.py [--quick] [--threads N] [--repeats N]

The layers are the U-Net's attention projections (to_q, to_k, to_v, to_out.0 of every transformer block:
128 Linears on SD1.5), each fed the activation it receives in a U-Net forward of the batch: the shapes come
from a forward of the U-Net on the meta device (SD1.5 config from ``lora_lifecycle.py``, batch 1, 64x64
latent = 512 px, 77 context tokens; ``--quick``: the tiny test U-Net, batch 2, 16x16 latent). Base weights
are random, frozen, and shared by every variant; inputs require grad, as activations do inside a U-Net.
A step: every layer forward, one backward from fixed random output gradients; no optimizer (the same for
all). Adapters (r 8, alpha 4: scale 1/2; LoKr factor -1, LyCORIS' default):

- ours:              ``pd.inject(layers, LoKr(r=8, alpha=4))`` / ``LoHa(r=8, alpha=4)``
- lycoris default:   ``LokrModule(name, layer, 1.0, 8, 4).apply_to()`` (rebuilds dW = W1 (x) W2 each step)
- lycoris bypass:    the same with ``bypass_mode=True`` (LoKr: the factored op chain; LoHa: dW then F.linear)

All variants hold the same adapter weights (lycoris' randomised, copied into ours); their outputs are checked
equal first. Time: interleaved rounds (every variant once per round, every other round in reverse order) after
one warm-up round; medians and minimums over rounds. Memory: (1) the peak resident memory during two steps above
the resident memory before them, sampled in a fresh subprocess per variant (``child``); (2) the bytes autograd
saves for backward beyond the inputs and base weights (every variant saves those), which is exact and immune
to the machine's load. Exit status 1 when a check fails, not when a target is missed.
"""
from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from harness import run_child as run_script  # noqa: E402
from lora_lifecycle import SD15_UNET  # noqa: E402

import peft_diffusion as pd  # noqa: E402
from peft_diffusion.methods import LoHa, LoKr  # noqa: E402

R, ALPHA = 8, 4.0
VARIANTS = ("lokr ours", "lokr lycoris", "lokr bypass", "loha ours", "loha lycoris", "loha bypass")
#        method: ((ratio against, time target), ...); peak memory target 1.0x against both
TARGETS = {"lokr": (("lycoris", 0.7), ("bypass", 1.0)), "loha": (("lycoris", 1.0), ("bypass", 1.0))}
TARGET_MEM = 1.0
TOL = 1e-4


def layer_shapes(quick: bool) -> list[tuple[str, int, int, tuple[int, ...]]]:
    """(site, in, out, input shape) of every attention projection, from a meta-device U-Net forward."""
    from diffusers import UNet2DConditionModel
    from peft_diffusion.tiny import UNET_CONFIG

    config, batch, side = (UNET_CONFIG, 2, 16) if quick else (SD15_UNET, 1, 64)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    shapes = {}

    def record(site):
        def hook(module, args, output):  # returns None: the output stays as it is
            shapes.setdefault(site, tuple(args[0].shape))
        return hook

    for site in pd.preset("unet-attn").select(unet):
        unet.get_submodule(site).register_forward_hook(record(site))
    with torch.no_grad(), torch.device("meta"):
        unet(torch.empty(batch, 4, side, side), torch.tensor([10] * batch),
             torch.empty(batch, 77, config["cross_attention_dim"]))
    return [(s, unet.get_submodule(s).in_features, unet.get_submodule(s).out_features, tuple(shapes[s]))
            for s in shapes]


class Bench:
    """Shared frozen base weights, inputs and output gradients; one layer stack per variant."""

    def __init__(self, quick: bool):
        self.shapes = layer_shapes(quick)
        g = torch.Generator().manual_seed(0)
        self.weights = [(nn.Parameter(torch.randn(o, i, generator=g) / i ** 0.5, requires_grad=False),
                         nn.Parameter(torch.randn(o, generator=g) * 0.01, requires_grad=False))
                        for _, i, o, _ in self.shapes]
        self.xs = [torch.randn(shape, generator=g).requires_grad_() for *_, shape in self.shapes]
        self.grads = [torch.randn(*shape[:-1], o, generator=g) for _, _, o, shape in self.shapes]

    def layers(self) -> nn.ModuleList:
        stack = nn.ModuleList()
        for (w, b), (_, i, o, _) in zip(self.weights, self.shapes):
            with torch.device("meta"):
                layer = nn.Linear(i, o)
            layer.weight, layer.bias = w, b  # the same tensors in every stack
            stack.append(layer)
        return stack

    def build(self, variant: str, source: list | None = None):
        """(layer stack, trainable parameters, lycoris modules) of one variant; ``source``: lycoris modules
        whose weights ours copies."""
        from lycoris import LohaModule, LokrModule

        method, lib = variant.split()
        stack = self.layers()
        if lib == "ours":
            pd.inject(stack, (LoKr if method == "lokr" else LoHa)(r=R, alpha=ALPHA, target=pd.Target()), "a")
            for layer, lyco in zip(stack, source or []):
                delta = layer.deltas["a"]
                delta.load_state_dict({k: getattr(lyco, k).detach() for k in delta.state_dict()})
            return stack, [p for p in stack.parameters() if p.requires_grad], []
        module = LokrModule if method == "lokr" else LohaModule
        torch.manual_seed(1)
        lycos = [module(f"m{n}", layer, 1.0, R, ALPHA, bypass_mode=lib == "bypass") for n, layer in enumerate(stack)]
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():  # trained-like values: every factor nonzero
            for lyco in lycos:
                for p in lyco.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                lyco.apply_to()
        return stack, [p for lyco in lycos for p in lyco.parameters()], lycos

    def step(self, stack, params) -> None:
        torch.autograd.backward([layer(x) for layer, x in zip(stack, self.xs)], self.grads)
        for t in params + self.xs:
            t.grad = None

    def outputs(self, stack) -> list[torch.Tensor]:
        with torch.no_grad():
            return [layer(x) for layer, x in zip(stack, self.xs)]

    def saved_mb(self, stack) -> float:
        """MB autograd keeps for backward in one forward, beyond the inputs and the base weights."""
        common = {t.untyped_storage().data_ptr() for t in self.xs + [w for pair in self.weights for w in pair]}
        saved = {}

        def pack(t):
            if t.device.type != "meta" and t.untyped_storage().data_ptr() not in common:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            outs = [layer(x) for layer, x in zip(stack, self.xs)]
        del outs
        return sum(saved.values()) / 2 ** 20


def rss_mb() -> float:
    """The process's resident memory now (MB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20


def child(variant: str, quick: bool, threads: int) -> dict:
    """Peak resident memory during two steps above the resident memory just before them. The parent starts
    this process with glibc's mmap threshold at 64 KiB, so every tensor of that size is mapped and unmapped
    by itself and the resident size follows the live tensors (a heap would keep freed setup temporaries
    resident and hide the steps' growth, as ``ru_maxrss`` growth did here); a thread samples it every 0.5 ms.
    """
    torch.set_num_threads(threads)
    bench = Bench(quick)
    stack, params, _ = bench.build(variant)
    base, peak, done = rss_mb(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    for _ in range(2):
        bench.step(stack, params)
    done.set()
    sampler.join()
    return {"mem": max(peak[0], rss_mb()) - base}


def run_child(variant: str, quick: bool, threads: int) -> float:
    env = {"MALLOC_MMAP_THRESHOLD_": "65536"}
    return run_script(__file__, (variant, int(quick), threads), repr(variant), env)["mem"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny U-Net layers, 2 rounds: a smoke run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7, --quick 2)")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0].replace("_", " "), a.child[1] == "1", int(a.child[2]))))
        return 0
    from importlib.metadata import version

    from lycoris.logging import logger as lycoris_logger

    # LyCORIS warns when a small layer's W2 is full rather than low-rank; our rule does the same (checked below)
    lycoris_logger.setLevel(logging.ERROR)
    torch.set_num_threads(a.threads)
    rounds = a.repeats or (2 if a.quick else 7)
    t0 = time.perf_counter()
    bench = Bench(a.quick)
    lycos, built = {}, {}
    for v in VARIANTS:  # lycoris variants first: ours copies their weights
        if not v.endswith("ours"):
            *built[v], lycos[v] = bench.build(v)
    for v in VARIANTS:
        if v.endswith("ours"):
            built[v] = list(bench.build(v, source=lycos[v.replace("ours", "lycoris")]))[:2]
    n_tokens = sum(torch.Size(s[:-1]).numel() for *_, s in bench.shapes)
    print(f"torch {torch.__version__}, lycoris-lora {version('lycoris-lora')}, "
          f"peft_diffusion {pd.__version__}; {a.threads} thread(s); {'quick' if a.quick else 'full'} mode")
    print(f"{len(bench.shapes)} attention projections, {n_tokens:,} input rows in all; r {R}, alpha {ALPHA}; "
          f"set up in {time.perf_counter() - t0:.1f} s")

    bad = False
    for method in ("lokr", "loha"):
        n = {v: sum(p.numel() for p in built[v][1]) for v in VARIANTS if v.startswith(method)}
        ref = bench.outputs(built[f"{method} ours"][0])
        base = bench.outputs(bench.layers())
        moved = max((o - b).abs().max().item() for o, b in zip(ref, base))
        for v in (f"{method} lycoris", f"{method} bypass"):
            diff = max((o - r).abs().max().item() for o, r in zip(bench.outputs(built[v][0]), ref))
            ok = diff <= TOL and n[v] == n[f"{method} ours"] and moved > 1e-3
            bad |= not ok
            print(f"  {v:<14} vs ours: max |difference| {diff:.2e} (the adapter moves outputs by {moved:.2e}), "
                  f"trainable {n[v]:,} vs {n[f'{method} ours']:,}  {'ok' if ok else 'MISMATCH'}")

    saved = {v: bench.saved_mb(built[v][0]) for v in VARIANTS}
    times = {v: [] for v in VARIANTS}
    for i in range(rounds + 1):  # round 0 is the warm-up
        for v in (VARIANTS if i % 2 == 0 else VARIANTS[::-1]):
            t = time.perf_counter()
            bench.step(*built[v])
            if i:
                times[v].append(time.perf_counter() - t)
    peak = {v: run_child(v.replace(" ", "_"), a.quick, a.threads) for v in VARIANTS}

    med = {v: statistics.median(ts) for v, ts in times.items()}
    print(f"\n{'variant':<14} {'median s':>9} {'min s':>8} {'peak MB':>8} {'saved MB':>9}   ({rounds} rounds)")
    for v in VARIANTS:
        print(f"{v:<14} {med[v]:>9.3f} {min(times[v]):>8.3f} {peak[v]:>8.1f} {saved[v]:>9.1f}")
    print(f"\n{'ours / theirs':<24} {'time x':>7} {'min x':>7} {'peak x':>7} {'saved x':>8}  targets")
    met_all = True
    for method, targets in TARGETS.items():
        ours = f"{method} ours"
        for lib, target in targets:
            v = f"{method} {lib}"
            tr = med[ours] / med[v]
            # peak RSS growth below the allocator's granularity (tiny layers) reads 0: no ratio to judge
            mr = peak[ours] / peak[v] if peak[v] > 0 else float("nan")
            sr = saved[ours] / saved[v] if saved[v] > 0 else float("nan")
            met_t, met_m = tr <= target, mr <= TARGET_MEM if mr == mr else None
            met_all &= met_t and met_m is not False
            print(f"{method} / lycoris {'bypass' if lib == 'bypass' else 'default':<8} {tr:>6.3f}x "
                  f"{min(times[ours]) / min(times[v]):>6.3f}x {mr:>6.3f}x {sr:>7.3f}x  time <= {target}x "
                  f"{'yes' if met_t else 'NO'}, peak <= {TARGET_MEM}x "
                  f"{'n/a' if met_m is None else 'yes' if met_m else 'NO'}")
    print("\nall targets met" if met_all else "\nsome targets missed")
    print("correctness: " + ("FAILED" if bad else f"every variant agrees with ours within {TOL}"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
