"""The DreamBooth trainer on the tiny pipeline: resume, accumulation, processes, export, bad input, failures."""
from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from peft_diffusion.training import checkpoint
from peft_diffusion.training import dreambooth as db
from peft_diffusion.training.config import ConfigError
from peft_diffusion.training.data import DataError, ItemStream, load_instances

REPO = Path(__file__).resolve().parents[1]


def make_config(tiny_pipe_dir, instance_dir=None, class_cache=None, out=None, **over) -> db.Config:
    values = dict(base=str(tiny_pipe_dir), instance_dir=str(instance_dir), output_dir=str(out),
                  class_cache=str(class_cache), class_prompts=["a red circle", "a blue star on a white background"],
                  num_class_images=4, class_steps=2, steps=4, batch_size=2, lr=5e-3, min_snr_gamma=5.0,
                  validation_every=-1, checkpoint_every=0, log_with="none", progress=False)
    values.update(over)
    return db.load_config(None, values)


@pytest.fixture
def run(tiny_pipe_dir, instance_dir, class_cache, tmp_path):
    def go(name="run", **over):
        over = {"instance_dir": instance_dir, "class_cache": class_cache, **over}
        return db.train(make_config(tiny_pipe_dir, out=tmp_path / name, **over))
    return go


def max_diff(a: Path, b: Path) -> float:
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys()
    return max((ta[k] - tb[k]).abs().max().item() for k in ta)


class Stop(Exception):
    pass


def stop_after_first_checkpoint(monkeypatch, go) -> None:
    """Run ``go()`` as a process that dies right after writing its first checkpoint."""
    real_save = checkpoint.save

    def save_then_stop(*args, **kwargs):
        real_save(*args, **kwargs)
        raise Stop

    monkeypatch.setattr(checkpoint, "save", save_then_stop)
    with pytest.raises(Stop):
        go()
    monkeypatch.setattr(checkpoint, "save", real_save)


# ---------------------------------------------------------------- reproducibility

def test_resume_ends_with_the_same_adapter(run, tmp_path, monkeypatch):
    over = dict(steps=6, checkpoint_every=3, lr_scheduler="cosine", lr_warmup_steps=2, method={
        "method": "lora", "r": 4, "alpha": 4, "dropout": 0.1, "target": "unet-cross-attn"}, log_with="csv")
    whole = run("whole", **over)
    stop_after_first_checkpoint(monkeypatch, lambda: run("split", **over))
    assert [p.name for p in checkpoint.checkpoints(tmp_path / "split" / "checkpoints")] == ["step-000003"]
    resumed = run("split", resume="latest", **over)
    assert max_diff(whole, resumed) <= 1e-6
    assert max_diff(whole.parent / "checkpoints/step-000006/trainable.safetensors",
                    resumed.parent / "checkpoints/step-000006/trainable.safetensors") <= 1e-6
    steps = [line.split(",")[0] for line in (tmp_path / "split/logs/log.csv").read_text().splitlines()[1:]]
    assert steps == ["6"]  # log_every 10: only the last step; the resumed log is not duplicated


@pytest.mark.parametrize("table", [{"method": "bitfit"}, {"method": "houlsby", "reduction": 8},
                                   {"method": "fish", "density": 0.05, "scoring_batches": 2}],
                         ids=["param-site", "annex", "scored-mask"])
def test_resume_with_every_site_kind(table, run, monkeypatch):
    """Checkpoints hold the tensors of parameter sites and annexes under their module paths (a checkpoint
    keyed by the sites' public names did not load); a scored mask resumes without scoring again."""
    over = dict(steps=4, checkpoint_every=2, method=table)
    whole = run("whole", **over)
    stop_after_first_checkpoint(monkeypatch, lambda: run("split", **over))
    assert max_diff(whole, run("split", resume="latest", **over)) == 0


def test_gradient_accumulation_equals_the_larger_batch(run):
    big = run("big", steps=3, batch_size=2, grad_accum=1)
    accumulated = run("acc", steps=3, batch_size=1, grad_accum=2)
    assert max_diff(big, accumulated) <= 1e-5


def test_gradient_checkpointing_gives_the_same_adapter(run, monkeypatch):
    import torch.utils.checkpoint

    plain = run("plain", steps=2)
    real, calls = torch.utils.checkpoint.checkpoint, []
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    checkpointed = run("ckpt", steps=2, gradient_checkpointing=True)
    assert calls  # it did recompute
    assert max_diff(plain, checkpointed) <= 1e-6


def test_item_stream_depends_only_on_seed_and_index():
    a = ItemStream(0, 0, 10, 3, 5, (4, 2, 2), 1000, 0.5)
    b = ItemStream(0, 6, 4, 3, 5, (4, 2, 2), 1000, 0.5)
    for i in range(4):
        x, y = a[6 + i], b[i]
        assert x["instance"] == y["instance"] and x["prior"] == y["prior"]
        assert torch.equal(x["noise"], y["noise"]) and torch.equal(x["timesteps"], y["timesteps"])
        assert x["choice"] == y["choice"] and 0 <= x["choice"] < 1
    assert sorted(a[i]["instance"] for i in range(3)) == [0, 1, 2]  # each epoch a permutation


@pytest.mark.slow
def test_two_processes_match_one(tiny_pipe_dir, instance_dir, tmp_path):
    """torchrun --nproc_per_node 2 (accelerate MULTI_CPU, gloo) against one process, same global batch.

    Tolerance 1e-5 on the adapter tensors: the two runs see the same items; they differ only in the order
    of float additions (per-process gradients averaged by all-reduce against one batched backward).
    The two-process run goes first, on an empty class-image cache: its main process generates the class
    images while the other waits and then reads them; the single process reads the same cache.
    """
    cfg = make_config(tiny_pipe_dir, instance_dir, tmp_path / "cache", tmp_path / "two", steps=4, batch_size=2,
                      checkpoint_every=2, log_with="csv")
    toml = tmp_path / "two.toml"
    toml.write_text("\n".join(f"{k} = {_toml(getattr(cfg, k))}" for k in
                              ("base", "instance_dir", "output_dir", "class_cache", "class_prompts", "num_class_images",
                               "class_steps", "steps", "batch_size", "lr", "min_snr_gamma", "validation_every",
                               "checkpoint_every", "log_with", "progress")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(REPO / "train/dreambooth.py"), str(toml), "--threads=1"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("MULTI_CPU, 2 process(es)") == 2  # both processes in one gloo group
    assert proc.stderr.count("class images: generating") == 1
    two = tmp_path / "two" / "adapter.safetensors"
    rngs = sorted(p.name for p in (tmp_path / "two/checkpoints/step-000004").glob("rng-*.pt"))
    assert rngs == ["rng-0.pt", "rng-1.pt"]
    assert len((tmp_path / "two/logs/log.csv").read_text().splitlines()) == 2  # header + step 4, written once

    single = db.train(dataclasses.replace(cfg, output_dir=str(tmp_path / "one")))
    diff = max_diff(single, two)
    print(f"two processes vs one: max abs diff {diff:.2e}")
    assert diff <= 1e-5, diff


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\") + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return repr(v)


# ---------------------------------------------------------------- export, text encoder, prediction types

def test_export_loads_in_plain_diffusers_and_reproduces_images(run, tiny_pipe_dir):
    from diffusers import StableDiffusionPipeline

    import peft_diffusion as pd

    path = run("export", steps=3, lr=2e-2, train_text_encoder=True)
    kwargs = dict(prompt="a sks cross", num_inference_steps=3, guidance_scale=2.0, height=32, width=32,
                  output_type="np")
    ours = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    base_image = ours(**kwargs, generator=torch.Generator().manual_seed(3)).images[0]
    pd.load_adapter(ours, path)
    theirs = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    theirs.load_lora_weights(path)
    a = ours(**kwargs, generator=torch.Generator().manual_seed(3)).images[0]
    b = theirs(**kwargs, generator=torch.Generator().manual_seed(3)).images[0]
    assert np.abs(a - b).max() <= 1e-4
    assert np.abs(a - base_image).max() > 1e-3  # the adapter does something


def test_text_encoder_training_trains_only_its_adapter(run):
    path = run("te", steps=2, lr=2e-2, train_text_encoder=True, checkpoint_every=2)
    ckpt = path.parent / "checkpoints/step-000002"
    state = load_file(ckpt / "trainable.safetensors")
    assert {k.split(".")[0] for k in state} == {"unet", "text_encoder"}
    assert all(".deltas.dreambooth." in k for k in state)
    te_b = [v for k, v in state.items() if k.startswith("text_encoder") and "lora_B" in k]
    assert te_b and all(v.abs().max() > 0 for v in te_b)
    opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert len(opt["param_groups"]) == 2
    assert sum(len(g["params"]) for g in opt["param_groups"]) == len(state)


def test_bf16_mixed_precision_on_cpu(run):
    path = run("bf16", steps=2, mixed_precision="bf16", train_text_encoder=True)
    tensors = load_file(path)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())


def test_v_prediction_runs(run, monkeypatch):
    seen = []
    real = db.diffusion_target
    monkeypatch.setattr(db, "diffusion_target", lambda s, *a: seen.append(s.config.prediction_type) or real(s, *a))
    path = run("vpred", steps=2, prediction_type="v_prediction")
    assert path.is_file() and set(seen) == {"v_prediction"}


# ---------------------------------------------------------------- bad input

def _no_steps(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("a training step ran")

    monkeypatch.setattr(db, "diffusion_loss", fail)


def test_missing_or_empty_instance_folder(run, tmp_path, monkeypatch):
    _no_steps(monkeypatch)
    with pytest.raises(DataError, match="does not exist"):
        run(instance_dir=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no readable images"):
        run(instance_dir=str(tmp_path / "empty"))
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.md").write_text("not an image")
    (junk / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="no readable images .2 unreadable"):
        run(instance_dir=str(junk))


def test_mixed_images_are_converted_and_unreadable_ones_skipped(tmp_path, caplog):
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.new("RGBA", (40, 20), (255, 0, 0, 0)).save(folder / "a.png")       # transparent: composited on white
    Image.new("L", (16, 16), 80).save(folder / "b.jpg")
    Image.new("P", (64, 64)).save(folder / "c.gif")
    (folder / "d.png").write_bytes(b"garbage")
    (folder / "readme.md").write_text("hello")
    (folder / "b.txt").write_text("  a   grey square \n")
    with caplog.at_level(logging.WARNING):
        data = load_instances(folder, 32, prompt="a thing")
    assert data.pixels.shape == (3, 3, 32, 32)
    assert data.captions == [["a thing"], ["a grey square"], ["a thing"]]
    assert data.pixels[0].min() == 1.0  # white, not black
    assert "d.png" in caplog.text and "readme.md" in caplog.text


def test_caption_files_may_hold_several_captions(tmp_path, run, monkeypatch):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "y.png")
    (tmp_path / "x.txt").write_text("a sks cross on a gray background\n\n  a sks   cross \n")
    assert load_instances(tmp_path, 32, prompt="p").captions == [["a sks cross on a gray background", "a sks cross"], ["p"]]
    seen = []
    real = db.tokenize
    monkeypatch.setattr(db, "tokenize", lambda tok, caps: seen.extend(caps) or real(tok, caps))
    run("multi", steps=1, instance_dir=str(tmp_path), instance_prompt="p", prior_preservation=False)
    assert {"a sks cross on a gray background", "a sks cross", "p"} <= set(seen)


def test_image_without_caption_needs_a_prompt(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    with pytest.raises(DataError, match="no caption file"):
        load_instances(tmp_path, 32)
    (tmp_path / "x.txt").write_text("   ")
    with pytest.raises(DataError, match="is empty"):
        load_instances(tmp_path, 32, prompt="fallback")


BASE = ["--base=.", "--prior_preservation=false"]


def test_config_errors_list_valid_keys(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('stepz = 3\n')
    with pytest.raises(ConfigError, match=r"unknown config keys \['stepz'\]; valid keys: .*steps"):
        db.load_config(toml, BASE)
    with pytest.raises(ConfigError, match="valid keys: .*batch_size"):
        db.load_config(None, BASE + ["--batchsize=2"])
    with pytest.raises(ConfigError, match="unknown LoRA settings \\['rank'\\]; valid: .*'r'"):
        db.load_config(None, BASE + ["--method.rank=4"])
    with pytest.raises(ConfigError, match="unknown method 'lorax'; registered: .*lora"):
        db.load_config(None, BASE + ["--method.method=lorax"])
    with pytest.raises(ConfigError, match="'steps' is not a table"):
        db.load_config(None, BASE + ["--steps.x=1"])
    assert db.load_config(None, BASE + ["--method.r=4"]).method["r"] == 4
    assert db.load_config(None, BASE + ['--class_prompts=["a, b", "c"]']).class_prompts == ["a, b", "c"]


@pytest.mark.parametrize("override, message", [
    ("--lr=-1", "lr must be a positive finite number"),
    ("--lr=inf", "lr must be a positive finite number"),
    ("--steps=0", "steps must be >= 1"),
    ("--prior_empty_fraction=1.5", "prior_empty_fraction must be in"),
    ("--mixed_precision=fp8", "mixed_precision must be one of"),
    ("--prediction_type=sample", "prediction_type must be one of"),
    ("--lr_scheduler=exotic", "lr_scheduler must be one of"),
    ("--method.r=0", "rank r must be a positive integer"),
    ("--batch_size=two", "batch_size must be an integer"),
    ("--base=/no/such/model", "base model /no/such/model does not exist"),
])
def test_out_of_range_values(override, message):
    with pytest.raises(ConfigError, match=message):
        db.load_config(None, BASE + [override])


def test_snr_offset_needs_v_prediction(run, tmp_path):
    """The tiny base predicts epsilon: snr_offset is refused before any work, naming both settings."""
    with pytest.raises(ConfigError, match="snr_offset = 1 needs a v-prediction base .* trains for 'epsilon'"):
        run("snr", snr_offset=1.0)
    assert not (tmp_path / "snr" / "adapter.safetensors").exists()
    with pytest.raises(ConfigError, match="snr_offset must be a finite number >= 0"):
        db.load_config(None, BASE + ["--snr_offset=-1"])


def test_prior_needs_class_prompts():
    with pytest.raises(ConfigError, match="prior_preservation needs class_prompts"):
        db.load_config(None, {"base": "."})


# ---------------------------------------------------------------- failures during training

def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(run, tmp_path, monkeypatch):
    real, calls = db.diffusion_loss, []

    def poisoned(*a, **k):
        calls.append(1)
        loss = real(*a, **k)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(db, "diffusion_loss", poisoned)
    with pytest.raises(db.NonFiniteLossError, match="at step 3.*last good checkpoint is .*step-000002"):
        run("nan", steps=6, checkpoint_every=2)
    out = tmp_path / "nan"
    assert [p.name for p in checkpoint.checkpoints(out / "checkpoints")] == ["step-000002"]
    assert not (out / "adapter.safetensors").exists()
    assert all(torch.isfinite(t).all() for t in load_file(out / "checkpoints/step-000002/trainable.safetensors").values())


def test_failure_while_writing_a_checkpoint_keeps_the_previous(run, tmp_path, monkeypatch):
    real_save, calls = torch.save, []

    def flaky(obj, f, *a, **k):
        calls.append(str(f))
        if str(f).endswith("scheduler.pt") and sum(c.endswith("scheduler.pt") for c in calls) == 2:
            Path(f).write_bytes(b"half written")
            raise OSError("disk full")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", flaky)
    with pytest.raises(RuntimeError, match="writing checkpoint .*step-000004 failed; earlier checkpoints are intact"):
        run("flaky", steps=4, checkpoint_every=2)
    root = tmp_path / "flaky" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000002"]  # no temporary folder left
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    resumed = run("flaky", steps=4, checkpoint_every=2, resume="latest")  # the survivor resumes
    assert resumed.is_file()


def test_class_images_are_cached_and_reused(run, class_cache, monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    run("first", steps=1, class_cache=str(cache))
    folders = list(cache.iterdir())
    assert len(folders) == 1 and len(list(folders[0].glob("*.png"))) == 4

    def no_generation(*a, **k):
        raise AssertionError("class images generated again")

    monkeypatch.setattr("peft_diffusion.training.evaluate.generate", no_generation)
    run("second", steps=1, class_cache=str(cache))
    monkeypatch.undo()
    run("third", steps=1, class_cache=str(cache), num_class_images=5)  # other inputs, other folder
    assert len(list(cache.iterdir())) == 2


def test_validation_grids_callback_and_csv_log(tiny_pipe_dir, instance_dir, class_cache, tmp_path):
    seen = []

    def score(step, images, prompts):
        seen.append((step, images.shape, len(prompts)))
        return {"mean_pixel": float(images.mean())}

    cfg = make_config(tiny_pipe_dir, instance_dir, class_cache, tmp_path / "val", steps=2, validation_every=1,
                      validation_images=2, validation_steps=2, log_with="csv", log_every=1)
    out = db.train(cfg, on_validation=score).parent
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-000000.png", "step-000001.png",
                                                                      "step-000002.png"]
    assert Image.open(out / "validation/step-000002.png").size == (64, 64)  # 2 prompts x 2 images of 32 px
    assert [s[0] for s in seen] == [0, 1, 2] and seen[0][1] == (4, 32, 32, 3)
    rows = (out / "logs/log.csv").read_text().splitlines()
    assert rows[0].startswith("step,mean_pixel") and len(rows) == 1 + 3 + 2  # 3 validations, 2 steps
    assert "loss" in rows[0] and "prior_loss" in rows[0]


def test_tensorboard_logs(run, tmp_path):
    pytest.importorskip("tensorboard")
    path = run("tb", steps=1, log_with="tensorboard")
    assert list((path.parent / "logs").rglob("events.out.tfevents.*"))


def test_training_lowers_the_instance_loss(run, tiny_pipe_dir, instance_dir):
    """The loop optimises what it should: the denoising loss on the instance images, at noise and timesteps
    it never trained on, is lower with the exported adapter than without."""
    from diffusers import StableDiffusionPipeline

    import peft_diffusion as pd

    path = run("learn", steps=30, lr=1e-2, batch_size=3, prior_preservation=False, min_snr_gamma=0.0)

    def held_out_loss(pipe) -> float:
        data = load_instances(instance_dir, 32)
        with torch.no_grad():
            x0 = pipe.vae.encode(data.pixels).latent_dist.mean * pipe.vae.config.scaling_factor
            ids = pipe.tokenizer([cs[0] for cs in data.captions], padding="max_length", return_tensors="pt").input_ids
            context = pipe.text_encoder(ids)[0]
            g = torch.Generator().manual_seed(12345)
            total = 0.0
            for t in (100, 300, 500, 700, 900):
                noise = torch.randn(x0.shape, generator=g)
                tt = torch.full((len(x0),), t)
                pred = pipe.unet(pipe.scheduler.add_noise(x0, noise, tt), tt, context).sample
                total += torch.nn.functional.mse_loss(pred, noise).item()
        return total / 5

    before = held_out_loss(StableDiffusionPipeline.from_pretrained(tiny_pipe_dir))
    tuned = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    pd.load_adapter(tuned, path)
    after = held_out_loss(tuned)
    print(f"held-out instance loss {before:.4f} -> {after:.4f}")
    assert after < 0.9 * before, (before, after)
