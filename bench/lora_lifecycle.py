"""LoRA lifecycle on the SD1.5 U-Net: peft-diffusion against diffusers + peft, in one process.

    python bench/lora_lifecycle.py [--quick]

The U-Net is Stable Diffusion 1.5's architecture built from its config (random weights, fp32, CPU, two
threads, nothing downloaded). The adapter is a rank-16 LoRA on every attention and feed-forward Linear of the
16 transformer blocks (to_q, to_k, to_v, to_out.0, ff.net.0.proj, ff.net.2: 160 layers). One diffusers-format
file with random nonzero lora_A / lora_B is written once, by diffusers' own ``save_lora_weights``, and both
libraries load it. Each library acts on its own copy of the U-Net (same weights); a third, plain copy is the
no-adapter reference. Timed, as medians over rounds that visit every step in turn (so that load drifts on a
shared machine hit every step alike; every other round in reverse order where the steps allow it):

- load: ``pd.load_adapter(unet, file)`` against ``pipe.load_lora_weights(file)`` on a StableDiffusionPipeline
  around the same U-Net (tiny dummy text encoder and VAE); the call only, the adapter removed after each.
- fuse / unfuse: ``pd.fuse`` / ``pd.unfuse`` against ``pipe.fuse_lora()`` / ``pipe.unfuse_lora()``, and the
  floor: a bare in-place ``addmm_`` (W += B A) over the same 160 weights.
- forward: batch 1, 64x64 latent, 77 tokens, ``torch.inference_mode``, with 0 (loaded, none active), 1 and 3
  (weights 1, 0.5, 0.25) active unfused adapters; overhead = forward / plain forward of the same round - 1.

Correctness is checked on the way (the comparison is only fair if both compute the same thing): ours and
diffusers + peft agree within 1e-4 unfused, fused and with three adapters, each library's fuse moves every
one of the 160 base weights, and both LoRA parameter counts equal the count the layer shapes give. Exit status
1 when a check fails (not when a target is missed).
"""
from __future__ import annotations

import argparse
import gc
import re
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import peft_diffusion as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import SD15_UNET  # noqa: E402  (re-exported: other scripts import it from here too)

RANK, ALPHA = 16, 16
SUFFIXES = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
SITE = re.compile(r".*transformer_blocks\.\d+\.(?:attn[12]\.(?:to_[qkv]|to_out\.0)|ff\.net\.(?:0\.proj|2))")
N_LAYERS = 160
TOL = 1e-4
THREE = {"a": 1.0, "b": 0.5, "c": 0.25}  # adapter weights of the three-adapter forward


# ------------------------------------------------------------------------------------------- models


def build_unet(source: nn.Module | None = None):
    """The SD1.5 U-Net, seeded; with ``source``, a copy of its weights (built on meta, then assigned)."""
    from diffusers import UNet2DConditionModel

    if source is None:
        torch.manual_seed(0)
        return UNet2DConditionModel(**SD15_UNET).eval()
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    unet.load_state_dict({k: v.clone() for k, v in source.state_dict().items()}, strict=True, assign=True)
    return unet.eval()


def tiny_pipeline(unet):
    """A StableDiffusionPipeline around ``unet`` with tiny dummy text encoder and VAE (for load_lora_weights)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                                num_hidden_layers=2, vocab_size=1000, projection_dim=32,
                                                bos_token_id=0, eos_token_id=2, pad_token_id=1)).eval()
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                        norm_num_groups=8).eval()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=None, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def lora_sites(unet) -> dict[str, nn.Linear]:
    sites = {n: m for n, m in unet.named_modules() if isinstance(m, nn.Linear) and SITE.fullmatch(n)}
    assert len(sites) == N_LAYERS and all(n.endswith(SUFFIXES) for n in sites), len(sites)
    return sites


def write_lora_file(folder: Path, unet) -> Path:
    """A diffusers-format LoRA file (random nonzero A and B), written by diffusers itself."""
    from diffusers import StableDiffusionPipeline

    g = torch.Generator().manual_seed(1)
    layers = {}
    for name, lin in lora_sites(unet).items():
        layers[f"{name}.lora_A.weight"] = torch.randn(RANK, lin.in_features, generator=g) / lin.in_features ** 0.5
        layers[f"{name}.lora_B.weight"] = torch.randn(lin.out_features, RANK, generator=g) * (0.2 / RANK ** 0.5)
    metadata = {"r": RANK, "lora_alpha": ALPHA, "target_modules": list(SUFFIXES), "use_dora": False,
                "use_rslora": False, "lora_bias": False}
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata,
                                              weight_name="lora.safetensors")
    return folder / "lora.safetensors"


def unet_inputs():
    g = torch.Generator().manual_seed(2)
    return dict(sample=torch.randn(1, 4, 64, 64, generator=g), timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, 77, SD15_UNET["cross_attention_dim"], generator=g))


@torch.inference_mode()
def forward(unet, inputs) -> torch.Tensor:
    return unet(**inputs).sample


# ------------------------------------------------------------------------------------------- timing


def timed(call, before=None, after=None) -> float:
    """Seconds ``call()`` takes; ``before`` and ``after`` run untimed."""
    if before is not None:
        before()
    gc.collect()
    t0 = time.perf_counter()
    call()
    dt = time.perf_counter() - t0
    if after is not None:
        after()
    return dt


def rounds(steps: dict, repeats: int, warmup: int = 1, alternate: bool = True) -> dict[str, list[float]]:
    """Time every step once per round, rounds in turn, so that load drifts hit all steps alike.

    steps: label -> (call, before, after). The first ``warmup`` rounds are dropped. With ``alternate`` every
    other round runs the steps in reverse order, so no step always runs right after another.
    """
    times = {label: [] for label in steps}
    for i in range(warmup + repeats):
        order = list(steps) if not alternate or i % 2 == 0 else list(reversed(steps))
        for label in order:
            dt = timed(*steps[label])
            if i >= warmup:
                times[label].append(dt)
    return times


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> str:
    return f"median {med(xs):.3f}  min {min(xs):.3f}  max {max(xs):.3f}  (n={len(xs)})"


# ------------------------------------------------------------------------------------------- the steps


def peft_lora_params(unet, name: str) -> int:
    return sum(p.numel() for n, p in unet.named_parameters() if ".lora_" in n and n.endswith(f".{name}.weight"))


def fused_weight(unet, site: str) -> torch.Tensor:
    """The base weight at ``site`` under either library's wrapper (ours: Host.base, peft: base_layer)."""
    module = unet.get_submodule(site)
    layer = module.base if isinstance(module, pd.Host) else module.get_base_layer()
    return layer.weight


def check(label: str, a: torch.Tensor, b: torch.Tensor, failures: list[str]) -> None:
    diff = (a - b).abs().max().item()
    ok = diff <= TOL
    print(f"  {label:<44} max |difference| = {diff:.2e}  {'ok' if ok else 'FAIL'}")
    if not ok:
        failures.append(f"{label}: {diff:.2e} > {TOL}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats: a smoke run")
    args = parser.parse_args()
    n_ops, n_fwd = (3, 1) if args.quick else (7, 5)

    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")
    import diffusers
    import peft
    import transformers

    diffusers.utils.logging.set_verbosity_error()  # "no LoRA keys for the text encoder", on every load
    transformers.utils.logging.set_verbosity_error()

    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}, "
          f"peft_diffusion {pd.__version__}; {torch.get_num_threads()} threads; "
          f"repeats: {n_ops} (load/fuse/unfuse), {n_fwd} (forward){' [--quick]' if args.quick else ''}")

    t0 = time.perf_counter()
    plain = build_unet()
    ours = build_unet(plain)
    pipe = tiny_pipeline(build_unet(plain))
    theirs = pipe.unet
    print(f"built three SD1.5 U-Nets ({sum(p.numel() for p in plain.parameters()):,} parameters each) "
          f"in {time.perf_counter() - t0:.1f} s")
    inputs = unet_inputs()
    failures: list[str] = []

    with tempfile.TemporaryDirectory() as tmp:
        path = write_lora_file(Path(tmp), plain)

        # ---- load: the load call only; each library removes its adapter again after a repeat, untimed
        t = rounds({"ours": (lambda: pd.load_adapter(ours, path, name="bench"), None, lambda: pd.remove(ours)),
                    "theirs": (lambda: pipe.load_lora_weights(path, adapter_name="bench"), None,
                               pipe.unload_lora_weights)}, n_ops)
        load_ours, load_theirs = t["ours"], t["theirs"]
        print(f"load: ours {med(load_ours):.3f} s, diffusers {med(load_theirs):.3f} s")
        pd.load_adapter(ours, path, name="bench")
        pipe.load_lora_weights(path, adapter_name="bench")

        n_ours = pd.parameter_report(ours).adapters["bench"]["total"]
        n_theirs = peft_lora_params(theirs, "bench")
        expected = sum(RANK * (m.in_features + m.out_features) for m in lora_sites(plain).values())
        print(f"LoRA parameters: ours {n_ours:,}, peft {n_theirs:,} (expected {expected:,} over {N_LAYERS} layers)")
        if not n_ours == n_theirs == expected:
            failures.append(f"parameter counts differ: ours {n_ours}, peft {n_theirs}, expected {expected}")

        print("correctness (the same LoRA file loaded by each):")
        base_out = forward(plain, inputs)
        unfused = forward(ours, inputs)
        check("one adapter, unfused", unfused, forward(theirs, inputs), failures)
        effect = (unfused - base_out).abs().max().item()
        print(f"  {'(the LoRA moves the output by':<44} {effect:.2e})")
        if effect < 100 * TOL:
            failures.append(f"the LoRA barely changes the output ({effect:.2e}): the checks would prove nothing")

        # ---- fuse / unfuse, and the floor: a bare in-place addmm_ over the same 160 weights
        floor_layers = [(h.weight, h.deltas["bench"].lora_B.weight, h.deltas["bench"].lora_A.weight)
                        for _, h in pd.api.hosts(ours)]

        @torch.no_grad()
        def addmm_all(sign: float):
            for w, b, a in floor_layers:
                w.addmm_(b, a, alpha=sign)

        t = rounds({"fuse ours": (lambda: pd.fuse(ours), None, None),
                    "unfuse ours": (lambda: pd.unfuse(ours), None, None),
                    "fuse theirs": (pipe.fuse_lora, None, None),
                    "unfuse theirs": (pipe.unfuse_lora, None, None),
                    "floor": (lambda: addmm_all(1.0), None, lambda: addmm_all(-1.0))}, n_ops, alternate=False)
        fuse_ours, unfuse_ours, floor = t["fuse ours"], t["unfuse ours"], t["floor"]
        fuse_theirs, unfuse_theirs = t["fuse theirs"], t["unfuse theirs"]
        print(f"fuse: ours {med(fuse_ours):.3f} s, diffusers {med(fuse_theirs):.3f} s; "
              f"unfuse: ours {med(unfuse_ours):.3f} s, diffusers {med(unfuse_theirs):.3f} s; "
              f"addmm_ floor {med(floor):.3f} s")
        # a fuse that did nothing would still give the unfused output: check that every weight moves
        sites = list(lora_sites(plain))
        before = {m: [fused_weight(m, s)[0].clone() for s in sites] for m in (ours, theirs)}
        pd.fuse(ours)
        pipe.fuse_lora()
        for label, model in (("ours", ours), ("diffusers", theirs)):
            moved = sum(bool(fused_weight(model, s)[0].ne(row).any()) for s, row in zip(sites, before[model]))
            print(f"  {label + ': fused weights that moved':<44} {moved}/{len(sites)}  "
                  f"{'ok' if moved == len(sites) else 'FAIL'}")
            if moved != len(sites):
                failures.append(f"{label}: fuse left {len(sites) - moved} base weights unchanged")
        check("one adapter, fused", forward(ours, inputs), forward(theirs, inputs), failures)
        pd.unfuse(ours)
        pipe.unfuse_lora()
        check("ours fused, unfused: vs never fused", forward(ours, inputs), unfused, failures)

        # ---- forward: three adapters loaded in each; 0, 1 and 3 active, in rounds with the plain U-Net
        pd.remove(ours)
        pipe.unload_lora_weights()
        for name in THREE:
            pd.load_adapter(ours, path, name=name)
            pipe.load_lora_weights(path, adapter_name=name)

        def theirs_active(weights: dict):
            def activate():
                if weights:
                    pipe.enable_lora()
                    pipe.set_adapters(list(weights), list(weights.values()))
                else:
                    pipe.disable_lora()
            return activate

        outs = {}

        def step(key: str, model, activate):
            return lambda: outs.__setitem__(key, forward(model, inputs)), activate, None

        steps = {"plain": step("plain", plain, None)}
        for k, weights in ((1, {"a": 1.0}), (3, THREE), (0, {})):
            steps[f"ours {k}"] = step(f"ours {k}", ours, lambda w=weights: pd.set_adapters(ours, w))
            steps[f"peft {k}"] = step(f"peft {k}", theirs, theirs_active(weights))
        fwd = rounds(steps, n_fwd)
        check("three adapters (1, 0.5, 0.25), unfused", outs["ours 3"], outs["peft 3"], failures)
        check("ours, no active adapter: vs plain U-Net", outs["ours 0"], outs["plain"], failures)
        check("peft, no active adapter: vs plain U-Net", outs["peft 0"], outs["plain"], failures)

    # ------------------------------------------------------------------------------------ the table
    plain_t = med(fwd["plain"])

    def overhead(key: str) -> float:
        """Median over rounds of (forward / plain forward of the same round) - 1."""
        return med([t / p - 1.0 for t, p in zip(fwd[key], fwd["plain"])])

    rows = []  # (operation, ours, theirs, ratio text, target text, met)
    for op, o, t, limit in (("load", load_ours, load_theirs, 0.5), ("fuse", fuse_ours, fuse_theirs, 0.1),
                            ("unfuse", unfuse_ours, unfuse_theirs, 0.1)):
        ratio = med(o) / med(t)
        rows.append((f"{op} (s)", f"{med(o):.3f}", f"{med(t):.3f}", f"{ratio:.3f}x", f"<= {limit}x", ratio <= limit))
    rows.append(("forward, no adapter (s)", f"{plain_t:.3f}", f"{plain_t:.3f}", "(one plain U-Net)", "", None))
    for k in (0, 1, 3):
        o_t, p_t = med(fwd[f"ours {k}"]), med(fwd[f"peft {k}"])
        rows.append((f"forward, {k} active (s)", f"{o_t:.3f}", f"{p_t:.3f}", f"{o_t / p_t:.3f}x", "", None))
        o, t = overhead(f"ours {k}"), overhead(f"peft {k}")
        rows.append((f"  overhead, {k} active", f"{o:+.1%}", f"{t:+.1%}", "", "<= peft's" if k else "",
                     (o <= t) if k else None))

    print()
    print(f"LoRA lifecycle, SD1.5 U-Net (fp32, CPU, {torch.get_num_threads()} threads), rank {RANK}, "
          f"{N_LAYERS} layers, {n_ours:,} LoRA parameters; medians")
    header = ("operation", "ours", "diffusers+peft", "ours/theirs", "target", "met")
    widths = (32, 10, 16, 20, 12, 5)
    print("".join(f"{h:<{w}}" for h, w in zip(header, widths)))
    for row in rows:
        met = "" if row[5] is None else ("yes" if row[5] else "NO")
        print("".join(f"{c:<{w}}" for c, w in zip(row[:5] + (met,), widths)).rstrip())
    print(f"floor: bare in-place addmm_ over the same {N_LAYERS} weights: {med(floor):.3f} s")
    print()
    print("spread (seconds):")
    for label, xs in (("load ours", load_ours), ("load diffusers", load_theirs), ("fuse ours", fuse_ours),
                      ("fuse diffusers", fuse_theirs), ("unfuse ours", unfuse_ours),
                      ("unfuse diffusers", unfuse_theirs), ("addmm_ floor", floor),
                      *((f"forward {k}", v) for k, v in fwd.items())):
        print(f"  {label:<18} {spread(xs)}")

    missed = [r[0].split(" (")[0].strip() for r in rows if r[5] is False]
    print()
    print(f"targets: {'all met' if not missed else 'missed: ' + ', '.join(missed)}")
    if failures:
        print("CORRECTNESS FAILURES:\n  " + "\n  ".join(failures))
        return 1
    print(f"correctness: ours and diffusers+peft agree within {TOL:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
