"""The analytic reader (learns nothing) and the scoring module that runs it next to the oracle."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from peft_diffusion.shapes import KEYS, Oracle, analytic, oracle_set, render, scoring, world
from peft_diffusion.shapes.analytic import AnalyticReader

ROOT = Path(__file__).resolve().parents[1]


def test_reads_fresh_generator_images():
    """Every attribute, on the oracle's distribution (stripes on any shape) and on the subject sets."""
    fresh = oracle_set(150, seed=4242)
    acc = analytic.accuracy(fresh, [s.attrs for s in fresh], keys=KEYS)
    assert all(v >= 0.98 for v in acc.values()), acc
    for name, samples in scoring.round_trip_sets(60, seed=7).items():
        acc = analytic.accuracy(samples, [s.attrs for s in samples], keys=KEYS)
        assert acc["all"] >= 0.97, (name, acc)


def test_blur_removes_stripes_and_arms():
    """What the reader exists for: a blurred subject is not read as a striped cross."""
    attrs = {"shape": "cross", "colour": "yellow", "background": "gray", "size": "small", "position": "center",
             "striped": True}
    crisp = render(attrs)
    read = AnalyticReader().read([crisp], details=True)[0]
    assert read["shape"] == "cross" and read["striped"] and read["iou"] > 0.9
    blurred = crisp.filter(ImageFilter.GaussianBlur(1.5))
    read = AnalyticReader().read([blurred], details=True)[0]
    assert not read["striped"] and read["iou"] < 0.9, read


def test_blank_image_reads_nothing():
    blank = Image.new("RGB", (32, 32), world.BACKGROUND_RGB["pink"])
    read = analytic.read([blank])[0]
    assert read["background"] == "pink" and read["shape"] is None
    assert analytic.accuracy([blank], {"shape": "circle", "colour": "red"})["all"] == 0.0


def test_same_interface_and_inputs_as_the_oracle():
    samples = oracle_set(6, seed=1)
    attrs = [s.attrs for s in samples]
    arr = world.to_array(samples)
    t01 = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255
    reader = AnalyticReader()
    by_list = reader.read(samples)
    assert reader.read(arr) == by_list == reader.read(t01, value_range=(0, 1))
    assert all(set(r) == set(KEYS) for r in by_list)
    with pytest.raises(ValueError):
        reader.read(t01)  # float without a stated range is refused, as by the oracle
    acc = scoring.accuracy(reader, samples, attrs, keys=("shape", "position"))
    assert set(acc) == {"shape", "position", "all"} and acc == analytic.accuracy(samples, attrs, ("shape", "position"))
    both = scoring.score(samples, attrs, keys=("shape",), oracle=Oracle(width=8, hidden=16))
    assert set(both) == set(scoring.READERS) and both["analytic"]["shape"] == 1.0


def test_accuracy_of_reads_counts_all_at_once():
    reads = [{"shape": "star", "colour": "red"}, {"shape": "star", "colour": "blue"}]
    acc = scoring.accuracy_of_reads(reads, {"shape": "star", "colour": "red"}, ("shape", "colour"))
    assert acc == {"shape": 1.0, "colour": 0.5, "all": 0.5}
    with pytest.raises(ValueError):
        scoring.accuracy_of_reads(reads, [{"shape": "star"}], ("shape",))


@pytest.mark.slow
def test_pretrain_script_short_run_loss_falls(tmp_path):
    """train/pretrain_base.py end to end, shortened: the losses fall and the folder loads as users load it."""
    from diffusers import StableDiffusionPipeline

    from peft_diffusion.models import ORACLE
    from peft_diffusion.models import path as embedded_path

    out = tmp_path / "base"
    cmd = [sys.executable, str(ROOT / "train" / "pretrain_base.py"), f"--out={out}",
           f"--oracle_out={embedded_path(ORACLE)}", "--threads=1", "--n_images=256", "--vae_steps=40",
           "--vae_batch=16", "--unet_steps=40", "--unet_batch=16", "--warmup=5", "--unet_channels=32,32,64",
           "--eval_prompts=2", "--eval_steps=2", "--roundtrip_images=4"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)
    metrics = json.loads((out / "metrics.json").read_text())
    for part in ("vae", "unet"):
        first, last = metrics["losses"][part]
        assert last < 0.9 * first, (part, metrics["losses"])
    assert set(metrics["vae_round_trip"]["subject"]) == set(scoring.READERS)
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.unet.config.sample_size == 16 and pipe.vae_scale_factor == 2
    assert next(pipe.text_encoder.parameters()).dtype == torch.float32
    assert (out / "README.md").read_text().count("oracle") > 1
