"""The DiT side of ``peft-diffusion train`` (``training/dit.py``) on the embedded shapes-dit: checkpoints and
exact resume, SIGINT / SIGTERM, runs already in the output folder, and a second method beside the new class
(``[extra_method]``: the DiT table's DiffFit and full fine-tuning arms).
"""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from peft_diffusion.cli import main
from peft_diffusion.models import SHAPES_DIT
from peft_diffusion.models import path as embedded_path
from peft_diffusion.shapes import world
from peft_diffusion.training import checkpoint
from peft_diffusion.training import dit as dit_trainer
from peft_diffusion.training.config import ConfigError
from peft_diffusion.training.dreambooth_config import load_config
from peft_diffusion.training.run_control import TrainingInterrupted

DIT = embedded_path(SHAPES_DIT)


@pytest.fixture(scope="module")
def crosses(tmp_path_factory):
    """Four yellow crosses, the new class's instance images."""
    folder = tmp_path_factory.mktemp("cross")
    for i, s in enumerate(world.subject_dataset(4, seed=3, colour="yellow", striped=False)):
        s.image.save(folder / f"{i}.png")
    return folder


def config(crosses, out, **over):
    values = dict(base=str(DIT), instance_dir=str(crosses), output_dir=str(out), steps=4, batch_size=2,
                  lr=5e-3, class_prompts=["red circle", "blue star"], num_class_images=2, class_steps=2,
                  validation_every=-1, checkpoint_every=0, log_every=1, threads=1,
                  method={"method": "new-class", "labels": ["yellow cross"], "r": 2, "dropout": 0.1})
    values.update(over)
    return load_config(None, values)


def tensors(path):
    return load_file(path)


def assert_same(a, b):
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys() and ta
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_half_run_then_resume_equals_the_whole_run(crosses, tmp_path):
    # a constant learning rate (a schedule's length is ``steps``: the signal test below resumes a cosine one);
    # LoRA dropout: the random state must resume too
    over = dict(weight_decay=0.1)
    whole = dit_trainer.train_dit(config(crosses, tmp_path / "whole", checkpoint_every=2, **over))
    assert [p.name for p in checkpoint.checkpoints(tmp_path / "whole" / "checkpoints")] == \
        ["step-000002", "step-000004"]
    # N/2 steps (the same schedule: steps is what a resumed run may change), then on to N
    half = config(crosses, tmp_path / "split", checkpoint_every=2, **over)
    half.steps = 2
    dit_trainer.train_dit(half)
    resumed = dit_trainer.train_dit(config(crosses, tmp_path / "split", checkpoint_every=2, resume="latest", **over))
    assert_same(whole, resumed)
    assert_same(tmp_path / "whole/checkpoints/step-000004/trainable.safetensors",
                tmp_path / "split/checkpoints/step-000004/trainable.safetensors")
    whole_losses = json.loads((tmp_path / "whole/losses.json").read_text())["losses"]
    assert json.loads((tmp_path / "split/losses.json").read_text())["losses"] == whole_losses and len(whole_losses) == 4


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_checkpoints_the_step_and_resume_finishes_it_exactly(signum, crosses, tmp_path, monkeypatch,
                                                                      capsys):
    # cosine schedule with warm-up: the scheduler's state must resume too
    whole = dit_trainer.train_dit(config(crosses, tmp_path / "whole", lr_scheduler="cosine", lr_warmup_steps=1))
    toml = tmp_path / "dit.toml"
    toml.write_text(f'base = "{DIT}"\ninstance_dir = "{crosses}"\noutput_dir = "{tmp_path / "out"}"\nsteps = 4\n'
                    'batch_size = 2\nlr = 5e-3\nclass_prompts = ["red circle", "blue star"]\nnum_class_images = 2\n'
                    'class_steps = 2\nvalidation_every = -1\ncheckpoint_every = 0\nlog_every = 1\nthreads = 1\n'
                    'lr_scheduler = "cosine"\nlr_warmup_steps = 1\n[method]\nmethod = "new-class"\nlabels = ["yellow cross"]\nr = 2\ndropout = 0.1\n')
    real, calls = dit_trainer.diffusion_loss, []
    handler_before = signal.getsignal(signal.SIGINT)

    def signalled(*a, **k):  # Ctrl-C (or a scheduler's SIGTERM) during step 2
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signum)
        return real(*a, **k)

    monkeypatch.setattr(dit_trainer, "diffusion_loss", signalled)
    assert main(["train", str(toml)]) == 128 + signum
    err = capsys.readouterr().err.strip().splitlines()
    out = tmp_path / "out"
    assert [p.name for p in checkpoint.checkpoints(out / "checkpoints")] == ["step-000002"]
    assert err[-1].startswith(f"stopped by {signal.Signals(signum).name} at step 2 of 4: checkpoint ")
    assert f"resume with: peft-diffusion train {toml} --resume=latest" in err[-1]
    assert not (out / "adapter.safetensors").exists()
    assert signal.getsignal(signal.SIGINT) is handler_before  # handlers restored (SIG_IGN under nohup)
    monkeypatch.setattr(dit_trainer, "diffusion_loss", real)
    assert main(["train", str(toml)]) == 2  # a run is there: resume or overwrite
    assert "already holds a run (step-000002)" in capsys.readouterr().err
    assert main(["train", str(toml), "--resume=latest"]) == 0
    assert_same(whole, out / "adapter.safetensors")


def test_a_signal_before_the_first_step_stops_at_once(crosses, tmp_path, monkeypatch):
    real = dit_trainer.load_dit

    def load_then_signal(*a, **k):
        pipe = real(*a, **k)
        os.kill(os.getpid(), signal.SIGINT)
        return pipe

    monkeypatch.setattr(dit_trainer, "load_dit", load_then_signal)
    with pytest.raises(TrainingInterrupted) as info:
        dit_trainer.train_dit(config(crosses, tmp_path / "out", checkpoint_every=1))
    assert info.value.step == 0 and info.value.checkpoint is None
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_overwrite_replaces_a_previous_run(crosses, tmp_path):
    out = tmp_path / "out"
    dit_trainer.train_dit(config(crosses, out, steps=2, checkpoint_every=1, checkpoints_keep=0))
    with pytest.raises(ConfigError, match="already holds a run"):
        dit_trainer.train_dit(config(crosses, out, steps=1))
    dit_trainer.train_dit(config(crosses, out, steps=1, checkpoint_every=1, overwrite=True))
    assert [p.name for p in checkpoint.checkpoints(out / "checkpoints")] == ["step-000001"]


@pytest.mark.parametrize("extra", [{"method": "difffit", "embeddings": False},
                                   {"method": "partial-ft", "blocks": ["transformer_blocks.3"]}],
                         ids=["difffit", "partial-ft"])
def test_extra_method_trains_beside_the_new_class_and_resumes(extra, crosses, tmp_path, capsys):
    method = {"method": "new-class", "labels": ["yellow cross"], "lora": False}
    whole = dit_trainer.train_dit(config(crosses, tmp_path / "whole", method=method, extra_method=extra))
    second = tmp_path / "whole" / f"adapter-{extra['method']}.safetensors"
    assert second.is_file() and all(".lora_" not in k for k in tensors(whole))
    half = config(crosses, tmp_path / "split", method=method, extra_method=extra, checkpoint_every=2)
    half.steps = 2
    dit_trainer.train_dit(half)
    dit_trainer.train_dit(config(crosses, tmp_path / "split", method=method, extra_method=extra,
                                 checkpoint_every=2, resume="latest"))
    assert_same(whole, tmp_path / "split" / "adapter.safetensors")
    assert_same(second, tmp_path / "split" / second.name)
    # both files generate the new class
    assert main(["generate", "--base", str(DIT), "--adapter", str(whole), "--adapter", str(second),
                 "--class-label", "yellow cross", "--n", "1", "--steps", "2", "--out", str(tmp_path / "gen")]) == 0
    assert (tmp_path / "gen" / "00-yellow-cross-0.png").is_file()


def test_config_refusals(crosses, tmp_path):
    with pytest.raises(ConfigError, match=r"\[extra_method\] is a second method .* not new-class"):
        dit_trainer.train_dit(config(crosses, tmp_path, extra_method={"method": "new-class"}))
    with pytest.raises(ConfigError, match="grad_accum: not used when training a DiT base"):
        dit_trainer.train_dit(config(crosses, tmp_path, grad_accum=2))
    cfg = load_config(None, {"instance_dir": str(crosses), "prior_preservation": False,
                             "extra_method": {"method": "difffit"}})  # the embedded U-Net base
    with pytest.raises(ConfigError, match="extra_method .* is for DiT bases"):
        dit_trainer.pick_trainer(cfg)
