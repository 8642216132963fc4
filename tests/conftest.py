"""Fixtures over the tiny models of ``tiny.py``: built once per session, handed out as fresh copies."""
from __future__ import annotations

import copy

import pytest
import torch

import tiny


def pytest_configure(config):
    # The test machines share two cores between several workers: one intra-op thread is ~50x faster here
    # than two contending ones (a tiny U-Net forward: 25 ms against 1.2 s).
    torch.set_num_threads(1)

    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


_BASES: dict[str, torch.nn.Module] = {}


def _fresh(key: str) -> torch.nn.Module:
    """A private copy of the tiny model ``key`` of ``tiny.MODELS`` (built once, then deep-copied)."""
    if key not in _BASES:
        _BASES[key] = tiny.MODELS[key][0]()
    return copy.deepcopy(_BASES[key])


@pytest.fixture
def make_model():
    """make_model("gpt2") -> a fresh tiny model; the keys are those of ``tiny.MODELS``."""
    return _fresh


@pytest.fixture
def unet():
    return _fresh("unet")


@pytest.fixture
def text_encoder():
    return _fresh("clip-text")


@pytest.fixture(scope="session")
def tiny_pipe_dir(tmp_path_factory):
    """A tiny Stable-Diffusion pipeline saved with ``save_pretrained`` (its tokenizer files written locally)."""
    root = tmp_path_factory.mktemp("tiny-sd")
    pipe = tiny.tiny_sd_pipeline(root / "src")
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


@pytest.fixture
def fresh(tiny_pipe_dir):
    """fresh() -> a new ``StableDiffusionPipeline.from_pretrained`` of the tiny pipeline, as often as asked."""
    def make():
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    return make


@pytest.fixture
def tiny_pipe(tiny_pipe_dir):
    """A fresh ``StableDiffusionPipeline.from_pretrained`` of the saved tiny pipeline (the path users run)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------- the DreamBooth trainer's inputs


@pytest.fixture(scope="session")
def instance_dir(tmp_path_factory):
    """Three subject images (a cross) with "sks" captions, written by the shapes world."""
    from peft_diffusion.shapes import world

    folder = tmp_path_factory.mktemp("subject")
    for i, s in enumerate(world.subject_dataset(3, seed=4)):
        s.image.save(folder / f"s{i}.png")
        (folder / f"s{i}.txt").write_text(world.caption(s.attrs, identifier="sks", omit=("colour", "striped")))
    return folder


@pytest.fixture(scope="session")
def class_cache(tmp_path_factory):
    """One class-image cache for every trainer test (its folders are keyed by what made the images)."""
    return tmp_path_factory.mktemp("class-cache")
