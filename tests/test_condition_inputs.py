"""The shared spatial-condition path of the trainer (training/condition_inputs.py)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from peft_diffusion import conditions
from peft_diffusion.core import fit_batch
from peft_diffusion.training import condition_inputs as ci
from peft_diffusion.training.data import DataError, load_instances


@dataclasses.dataclass
class Cfg(ci.ControlFields):
    pass


class Pipe:  # what the hooks read of a pipeline
    class unet:
        device = torch.device("cpu")


def test_world_folder_maps_are_the_generators(tmp_path):
    folder = ci.write_world(tmp_path / "w", 3, seed=5, kind="mask")
    inst = load_instances(folder, 32)
    assert len(inst.paths) == 3 and (folder / "conditions" / "00002.png").is_file()  # maps folder is not read as images
    with ci.training_run(inst.paths, validation_images=2):
        maps = ci.training_maps(Cfg(control_type="mask"), inst.pixels)
        val = ci.validation_inputs(Cfg(), Pipe, inst.pixels)[ci.INPUT]
    assert maps.shape == (3, 3, 32, 32) and maps.dtype == torch.float32 and 0 <= maps.min() and maps.max() <= 1
    want = ci.control_tensor([c for _, _, c in conditions.WorldConditions(3, 5, "mask")])
    assert torch.equal(maps, want)
    assert torch.equal(val, maps[:2])


def test_batch_items_get_their_own_maps_and_prior_items_are_refused(tmp_path):
    folder = ci.write_world(tmp_path / "w", 4, seed=1)
    inst = load_instances(folder, 32)
    with ci.training_run(inst.paths):
        make = ci.batch_inputs(Cfg(), Pipe, inst.pixels)
        maps = ci.training_maps(Cfg(), inst.pixels)
    named, drop = make({"instance": torch.tensor([2, 0]), "prior": torch.tensor([-1, -1])})
    assert drop is None and torch.equal(named[ci.INPUT], maps[[2, 0]])
    with pytest.raises(DataError, match="prior_preservation = false"):
        make({"instance": torch.tensor([1]), "prior": torch.tensor([3])})


def test_detector_maps_are_computed_like_generate(tmp_path):
    folder = ci.write_world(tmp_path / "w", 2, seed=2)
    inst = load_instances(folder, 32)
    maps = ci.training_maps(Cfg(control_type="canny"), inst.pixels)  # no files needed
    with Image.open(folder / "00001.png") as im:
        assert torch.equal(maps[1:], ci.prepare_control(im.convert("RGB"), "canny", 32))


def test_missing_or_distorted_map_is_a_clear_error(tmp_path):
    folder = ci.write_world(tmp_path / "w", 2, seed=3)
    inst = load_instances(folder, 32)
    (folder / "conditions" / "00001.png").unlink()
    with ci.training_run(inst.paths), pytest.raises(DataError, match="no condition map for .*00001.png"):
        ci.training_maps(Cfg(), inst.pixels)
    Image.new("RGB", (32, 16)).save(folder / "conditions" / "00001.png")
    with ci.training_run(inst.paths), pytest.raises(DataError, match="is 32x16 but its image .* is 32x32"):
        ci.training_maps(Cfg(), inst.pixels)
    with pytest.raises(ValueError, match="control_type must be one of"):
        Cfg(control_type="depth").check_control()
    with pytest.raises(TypeError, match="takes no option"):
        Cfg(control_type="canny", control_options={"sigma": 1}).check_control()


def test_control_input_contract():
    from torch import nn

    from peft_diffusion import api

    m = nn.Linear(1, 1)
    x = torch.rand(2, 3, 8, 8)
    assert ci.control_input(m, "a") is None
    with api.inputs(m, control_image=x):
        assert ci.control_input(m, "a") is x
    with api.inputs(m, control_image={"a": x}):
        assert ci.control_input(m, "a") is x and ci.control_input(m, "b") is None
    with api.inputs(m, control_image=x[0]), pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        ci.control_input(m, "a")
    assert torch.equal(fit_batch(x, 4), torch.cat([x, x]))  # CFG's [negative; positive] copies


def test_side_by_side_pairs_each_image_with_its_map():
    images = np.random.default_rng(0).integers(0, 255, (4, 8, 8, 3), dtype=np.uint8)
    maps = torch.zeros(2, 3, 8, 8)
    maps[1] = 1
    shown, cols = ci.side_by_side(images, {ci.INPUT: maps})
    assert cols == 4 and shown.shape == (8, 8, 8, 3)
    assert (shown[0] == 0).all() and (shown[2] == 255).all() and (shown[4] == 0).all()
    assert np.array_equal(shown[1], images[0]) and np.array_equal(shown[7], images[3])
    assert ci.side_by_side(images, {}) is None
