"""Bad input of issue 11: a base of the wrong kind for the command (a DiT where a U-Net pipeline is expected
and vice versa), a class label outside the model's classes, a tokenizer that does not fit its text tower:
each a clear error naming what was expected, raised before any work (no class image generated, no step
trained, nothing written).
"""
from __future__ import annotations

import pytest

from peft_diffusion.cli import main
from peft_diffusion.models import SHAPES_BASE, SHAPES_DIT
from peft_diffusion.models import path as embedded_path
from peft_diffusion.training import dit as dit_trainer
from peft_diffusion.training import dreambooth as db
from peft_diffusion.training.config import ConfigError

DIT = embedded_path(SHAPES_DIT)


@pytest.fixture(scope="module")
def wide_tokenizer_pipe(tiny_pipe_dir, tmp_path_factory):
    """The tiny pipeline saved with two tokens more in its tokenizer than its text encoder has rows."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    rows = pipe.text_encoder.get_input_embeddings().num_embeddings
    pipe.tokenizer.add_tokens(["<extra-1>", "<extra-2>"])
    assert len(pipe.tokenizer) == rows + 2
    folder = tmp_path_factory.mktemp("wide") / "pipe"
    pipe.save_pretrained(folder)
    return folder, len(pipe.tokenizer), pipe.text_encoder.config.vocab_size


# ---------------------------------------------------------------- a tokenizer that does not fit its text tower

def test_tokenizer_larger_than_the_text_encoder_names_both_sizes(wide_tokenizer_pipe):
    folder, tokens, vocab = wide_tokenizer_pipe
    with pytest.raises(ConfigError, match=rf"tokenizer has {tokens} tokens but its text_encoder has a vocabulary "
                                          rf"of {vocab} \(vocab_size; {vocab} embedding rows\)"):
        db.load_pipeline(str(folder))


def test_train_and_generate_refuse_it_before_any_work(wide_tokenizer_pipe, instance_dir, tmp_path, capsys):
    folder, tokens, vocab = wide_tokenizer_pipe
    out, cache = tmp_path / "out", tmp_path / "cache"
    toml = tmp_path / "run.toml"
    toml.write_text(f'base = "{folder}"\ninstance_dir = "{instance_dir}"\noutput_dir = "{out}"\n'
                    f'class_cache = "{cache}"\nclass_prompts = ["a red circle"]\nprogress = false\nsteps = 1\n')
    assert main(["train", str(toml)]) == 2
    err = capsys.readouterr().err
    assert f"has {tokens} tokens but its text_encoder has a vocabulary of {vocab}" in err and "Traceback" not in err
    assert not cache.exists() and not (out / "adapter.safetensors").exists() and not (out / "checkpoints").exists()
    assert main(["generate", "--base", str(folder), "--prompt", "a red circle", "--out", str(tmp_path / "g")]) == 2
    assert f"has {tokens} tokens" in capsys.readouterr().err and not (tmp_path / "g").exists()


# ---------------------------------------------------------------- the wrong kind of base

def test_u_net_trainer_refuses_a_dit_folder_before_loading(instance_dir, tmp_path):
    cfg = db.load_config(None, {"base": str(DIT), "instance_dir": str(instance_dir), "output_dir": str(tmp_path),
                                "prior_preservation": False, "progress": False})
    with pytest.raises(ConfigError, match=r"is a DiTPipeline folder .* a text-to-image pipeline with a U-Net"):
        db.train(cfg)  # the API path (the CLI picks the DiT trainer for this base)
    with pytest.raises(ConfigError, match="DiTPipeline folder"):
        db.load_pipeline(str(DIT))


def test_dit_loader_refuses_a_u_net_pipeline():
    with pytest.raises(ConfigError, match="is a U-Net pipeline: a class-conditional DiT .* was expected"):
        dit_trainer.load_dit(embedded_path(SHAPES_BASE))


def test_dit_trainer_refuses_a_u_net_pipeline_and_the_cli_says_so(tmp_path, capsys):
    toml = tmp_path / "run.toml"  # the default base: the embedded shapes-base, a U-Net pipeline
    toml.write_text(f'instance_dir = "{tmp_path}"\noutput_dir = "{tmp_path / "out"}"\nprior_preservation = false\n'
                    '[method]\nmethod = "new-class"\n')
    assert main(["train", str(toml)]) == 2
    assert "needs a class-conditional DiT base" in capsys.readouterr().err


# ---------------------------------------------------------------- class labels outside the model

@pytest.fixture(scope="module")
def crosses(tmp_path_factory):
    from peft_diffusion.shapes import world

    folder = tmp_path_factory.mktemp("cross")
    for i, s in enumerate(world.subject_dataset(2, seed=3, colour="yellow", striped=False)):
        s.image.save(folder / f"{i}.png")
    return folder


@pytest.mark.parametrize("over, message", [
    ({"class_prompts": ["red circle", "30"]}, r"class_prompts: class label 30 is outside this model's classes: 0\.\.24"),
    ({"class_prompts": ["striped cross"]}, r"class_prompts: 'striped cross' is not a class of this model"),
    ({"method.init_label": "500"}, r"init_label 500 is outside this model's classes: 0\.\.24, or 1000"),
], ids=["id", "name", "init-label"])
def test_dit_trainer_class_labels_outside_the_model(over, message, crosses, tmp_path, monkeypatch):
    def no_generation(*a, **k):
        raise AssertionError("work started before the labels were checked")

    monkeypatch.setattr(dit_trainer, "_generate", no_generation)
    values = {"base": str(DIT), "instance_dir": str(crosses), "output_dir": str(tmp_path / "out"),
              "method.method": "new-class", "class_prompts": ["red circle"], "validation_every": -1, **over}
    with pytest.raises(ConfigError, match=message):
        dit_trainer.train_dit(db.load_config(None, values))
    assert not (tmp_path / "out").exists()
