"""T2I-Adapter folders as diffusers writes and reads them (``T2IAdapter.save_pretrained`` / ``from_pretrained``):
``config.json`` + ``diffusion_pytorch_model.safetensors``, which ``StableDiffusionAdapterPipeline`` runs. We add
``peft_diffusion.json`` (the method config: its condition kind) beside them; diffusers ignores it.

``save_t2i_adapter(pipe, folder, name)`` writes adapter ``name`` (atomically: a temporary sibling folder,
renamed when complete). ``load_t2i_adapter(pipe, folder, name, weight)`` reads such a folder, written by us or
by diffusers, into ``pipe``'s U-Net as a ``t2i-adapter`` (JSON and safetensors only: a folder holding only a
pickled ``.bin`` is refused). Every check (the config, the tensors' names and shapes, the U-Net's and the VAE's
shapes) runs before the model is touched; a mismatch names both sides.
"""
from __future__ import annotations

import json
from pathlib import Path

from .. import api
from ..methods.t2i_adapter import T2IAdapterConfig, T2IAdapterDelta
from .files import write_folder

CONFIG, WEIGHTS, OURS = "config.json", "diffusion_pytorch_model.safetensors", "peft_diffusion.json"
FIELDS = ("adapter_type", "channels", "num_res_blocks", "downscale_factor", "in_channels")


def _delta(obj, name: str) -> T2IAdapterDelta:
    for _, site in api.sites(obj):
        delta = site.deltas[name] if name in site.deltas else None
        if isinstance(delta, T2IAdapterDelta):
            return delta
    raise ValueError(f"no T2I-Adapter named {name!r} here; adapters: {api.adapter_names(obj)}")


def save_t2i_adapter(obj, folder, name: str = "default") -> Path:
    """Write T2I-Adapter ``name`` of ``obj`` as a diffusers ``T2IAdapter`` folder; returns the folder."""
    delta = _delta(obj, name)
    def fill(tmp: Path) -> None:
        delta.t2i_adapter.save_pretrained(tmp, safe_serialization=True)
        (tmp / OURS).write_text(json.dumps({"config": delta.config.to_dict()}, indent=1, sort_keys=True))

    return write_folder(folder, fill)


def read_folder(folder) -> tuple[T2IAdapterConfig, dict]:
    """(the method config, the tensors) of a T2I-Adapter folder; ValueError naming what is wrong."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CONFIG).is_file():
        raise ValueError(f"{folder} is not a T2I-Adapter folder: it has no {CONFIG}")
    cfg = json.loads((folder / CONFIG).read_text())
    if cfg.get("_class_name", "T2IAdapter") != "T2IAdapter":
        raise ValueError(f"{folder / CONFIG} describes a {cfg.get('_class_name')}, not a T2IAdapter")
    if not (folder / WEIGHTS).is_file():
        pickled = sorted(p.name for p in folder.glob("*.bin"))
        hint = f" (only {pickled}: pickled weights are not loaded; re-save with safe_serialization)" if pickled else ""
        raise ValueError(f"{folder} has no {WEIGHTS}{hint}")
    extra = {}
    if (folder / OURS).is_file():
        ours = json.loads((folder / OURS).read_text()).get("config", {})
        extra = {k: ours[k] for k in ("control_type", "control_options") if k in ours}
    try:
        config = T2IAdapterConfig(**{k: cfg[k] for k in FIELDS if k in cfg}, **extra)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{folder / CONFIG}: {e}") from None
    return config, load_file(str(folder / WEIGHTS))


def load_t2i_adapter(obj, folder, name: str = "t2i", weight: float = 1.0, trainable: bool = False, **control) -> str:
    """Load a diffusers ``T2IAdapter`` folder into ``obj``'s U-Net as adapter ``name`` with ``weight``;
    ``control`` (``control_type=``, ``control_options=``) overrides the condition kind recorded in the folder."""
    config, tensors = read_folder(folder)
    if control:
        config = T2IAdapterConfig.from_dict({**config.to_dict(), **control})
    (unet,) = api._pick(obj, None)
    api.check_new_name(unet, name)
    try:
        bound = config.bind(obj, unet, name)
    except ValueError as e:
        raise ValueError(f"{folder}: {e}") from None
    delta = bound.build(unet, "", init=False)
    expected = delta.t2i_adapter.state_dict()
    missing, unknown = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    bad = [f"{k}: {tuple(t.shape)} in the folder, {tuple(expected[k].shape)} here" for k, t in tensors.items()
           if k in expected and t.shape != expected[k].shape]
    if missing or unknown or bad:
        raise ValueError(f"{folder / WEIGHTS} does not fit its {CONFIG}: missing {missing[:5]}, unknown "
                         f"{unknown[:5]}, shapes {bad[:5]}")
    device = next(unet.parameters()).device
    delta.t2i_adapter.load_state_dict({k: t.to(device, expected[k].dtype) for k, t in tensors.items()}, assign=True)
    delta.requires_grad_(trainable)
    api.place(unet, {"": delta}, name, weight)
    return name


__all__ = ["save_t2i_adapter", "load_t2i_adapter", "read_folder"]
