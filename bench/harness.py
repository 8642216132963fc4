"""What the bench scripts share: the U-Nets they time (the embedded base's, SD1.5's from its config), peak
resident memory, the fresh-subprocess-per-variant runner, timed steps.

Each script measures one variant per fresh subprocess (so one variant's allocator state and page placement do
not leak into the next) by running itself with ``--child ARGS...``; the child prints one JSON line last, and
``run_child`` returns it as a dict (or exits with the child's stderr tail when it fails). ``timed_steps`` runs
one untimed warm-up call and then times ``steps`` calls, wall clock and process CPU time.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_BASE = ROOT / "peft_diffusion/models/shapes-base"

# Stable Diffusion 1.5's U-Net config (diffusers' UNet2DConditionModel arguments), for random-weight builds
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)


def build_unet(model: str):
    """After ``torch.manual_seed(0)``: the embedded base's U-Net (fp32) for a model name starting with
    ``shapes-base``, else SD1.5's architecture from ``SD15_UNET`` with random weights."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if model.startswith("shapes-base"):
        return UNet2DConditionModel.from_pretrained(str(EMBEDDED_BASE), subfolder="unet", torch_dtype=torch.float32)
    return UNet2DConditionModel(**SD15_UNET)


def peak_mb() -> float:
    """The process's peak resident memory so far (``ru_maxrss``), in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_child(script: str, args, what: str, env: dict | None = None) -> dict:
    """Run ``python script --child *args`` in a fresh process (cwd: the repository root, ``env`` added to the
    environment) and return the JSON object its last stdout line holds; exit naming ``what`` if it fails."""
    cmd = [sys.executable, script, "--child", *map(str, args)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                         env=None if env is None else {**os.environ, **env})
    if out.returncode:
        sys.exit(f"child {what} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def timed_steps(step, steps: int, usage: list | None = None) -> tuple[list[float], list[float], object]:
    """Call ``step()`` once untimed (the warm-up), then ``steps`` times: (wall seconds, process CPU seconds,
    the last call's return value). ``usage``, when given, gets (system CPU seconds, minor page faults) of each
    timed call: on the CPU, fresh tensor memory is paid for in page faults, counted as system time."""
    wall, cpu, result = [], [], None
    for i in range(steps + 1):
        r0 = resource.getrusage(resource.RUSAGE_SELF) if usage is not None else None
        t0, c0 = time.perf_counter(), time.process_time()
        result = step()
        if i:
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            if usage is not None:
                r1 = resource.getrusage(resource.RUSAGE_SELF)
                usage.append((r1.ru_stime - r0.ru_stime, r1.ru_minflt - r0.ru_minflt))
    return wall, cpu, result


def median(xs) -> float:
    return statistics.median(xs)


def interleaved(calls: dict, rounds: int, warmup: int = 1) -> dict[str, tuple[list[float], list[float]]]:
    """Time each of ``calls`` (label -> function) once per round, every other round in reverse order, after
    ``warmup`` untimed rounds, so that load drifts hit every call alike: label -> (wall s, process CPU s)."""
    out = {label: ([], []) for label in calls}
    for i in range(warmup + rounds):
        for label in (list(calls) if i % 2 == 0 else list(calls)[::-1]):
            t0, c0 = time.perf_counter(), time.process_time()
            calls[label]()
            if i >= warmup:
                out[label][0].append(time.perf_counter() - t0)
                out[label][1].append(time.process_time() - c0)
    return out
