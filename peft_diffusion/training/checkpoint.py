"""Training checkpoints: written atomically, resumed exactly.

A checkpoint is a folder ``<root>/step-NNNNNN/`` with

- ``adapter.safetensors``   the adapter as a native file (loads with ``load_adapter``, LoRA also in diffusers)
- ``trainable.safetensors`` the tensors of the adapter (and of the run's other adapters, a DiT run's second
                            method) under the pipeline's own state_dict keys
                            (``<component>.<module path>.deltas.<name>.<param>``), what resuming reads
- ``optimizer.pt``, ``scheduler.pt``  their ``state_dict()``s (read back with weights-only loading)
- ``rng-<rank>.pt``         each process's python / numpy / torch (and CUDA) random states
- ``state.json``            the step, the process count, and whatever the trainer adds

It is written under ``<root>/.tmp-step-NNNNNN`` and renamed into place once every file is written and
synced, so a crash or an error while writing leaves the checkpoints already there untouched. Every process
writes its own random state; the main process writes the rest and renames. Only complete folders (named
``step-*`` with a ``state.json``) count as checkpoints. A trainer without accelerate (the DiT's) passes
``SingleProcess()`` where an ``Accelerator`` goes.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ..adapter_files import save_adapter
from ..api import modules_of
from ..core import Site
from ..io import write_file

logger = logging.getLogger(__name__)

STATE = "state.json"
_NAME = re.compile(r"^step-(\d+)$")


class SingleProcess:
    """What ``save`` and ``restore_rng`` use of an ``accelerate.Accelerator``, for one process on the CPU."""

    is_main_process, process_index, num_processes, device = True, 0, 1, torch.device("cpu")

    def wait_for_everyone(self) -> None:
        pass

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def adapter_state(pipe, name: str) -> dict[str, torch.Tensor]:
    """Every tensor of adapter ``name`` in ``pipe``, under ``<component>.<its state_dict key>``.

    The keys follow the module tree (an annex's or a parameter site's own path, ``...peft_annex`` /
    ``...peft_param_bias``), not the sites' public names: those are what ``load_adapter_state`` finds."""
    out = {}
    for comp, model in modules_of(pipe).items():
        for path, site in model.named_modules():
            if isinstance(site, Site) and name in site.deltas:
                for key, t in site.deltas[name].state_dict().items():
                    out[f"{comp}.{path}.deltas.{name}.{key}"] = t.detach().cpu().contiguous()
    if not out:
        raise ValueError(f"no adapter named {name!r} in the pipeline")
    return out


@torch.no_grad()
def load_adapter_state(pipe, tensors: dict[str, torch.Tensor]) -> None:
    """Copy tensors written by ``adapter_state`` into the same adapter of ``pipe`` (all keys must fit)."""
    comps = modules_of(pipe)
    by_comp: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        comp, _, rest = key.partition(".")
        by_comp.setdefault(comp, {})[rest] = t
    for comp, part in by_comp.items():
        if comp not in comps:
            raise ValueError(f"checkpoint holds component {comp!r}, the pipeline has {sorted(comps)}")
        own = comps[comp].state_dict(keep_vars=True)
        missing = sorted(set(part) - set(own))
        if missing:
            raise ValueError(f"checkpoint tensors fit no module of {comp}: {missing[:5]}")
        for key, t in part.items():
            if own[key].shape != t.shape:
                raise ValueError(f"{comp}.{key}: shape {tuple(t.shape)} in the checkpoint, {tuple(own[key].shape)} here")
            own[key].copy_(t)


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                      "has_gauss": has_gauss, "cached": cached}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders under ``root``, oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _NAME.match(p.name)) and (p / STATE).is_file()]
    return [p for _, p in sorted(found)]


def latest(root: str | os.PathLike) -> Path | None:
    found = checkpoints(root)
    return found[-1] if found else None


def save(root: str | os.PathLike, step: int, accelerator, pipe, name: str, optimizer, scheduler,
         state: dict | None = None, keep: int = 0, others: tuple[str, ...] = ()) -> Path:
    """Write the checkpoint of ``step`` atomically (call on every process); keep the newest ``keep`` (0: all).
    ``others``: more adapters trained in the run, whose tensors go into ``trainable.safetensors`` too.

    An error on any process removes the temporary folder and raises on every process.
    """
    root = Path(root)
    final, tmp = root / f"step-{step:06d}", root / f".tmp-step-{step:06d}"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    error = None
    try:
        torch.save(rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
        if main:
            save_adapter(pipe, tmp / "adapter.safetensors", name)
            tensors = {k: t for n in (name, *others) for k, t in adapter_state(pipe, n).items()}
            write_file(tmp / "trainable.safetensors", tensors, {})  # usual file mode, not 0600
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            info = {"step": step, "num_processes": accelerator.num_processes, **(state or {})}
            (tmp / STATE).write_text(json.dumps(info, indent=1, default=str))
    except Exception as e:  # noqa: BLE001 - re-raised below, after every process knows
        error = e
    failed = accelerator.gather(torch.tensor([error is not None], device=accelerator.device)).any().item()
    if failed:
        accelerator.wait_for_everyone()
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is not None:
            raise RuntimeError(f"writing checkpoint {final} failed; earlier checkpoints are intact: {error}") from error
        raise RuntimeError(f"writing checkpoint {final} failed on another process; earlier checkpoints are intact")
    accelerator.wait_for_everyone()
    if main:
        for f in tmp.iterdir():
            _fsync(f)
        if final.exists():  # the same step written again (a rerun): swap, then drop the old one
            old = root / f".old-step-{step:06d}"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        _fsync(root)
        if keep > 0:
            for stale in checkpoints(root)[:-keep]:
                shutil.rmtree(stale)
        logger.info("checkpoint %s written", final)
    accelerator.wait_for_everyone()
    return final


def load(path: str | os.PathLike, pipe, optimizer, scheduler) -> dict:
    """Restore the adapter, optimizer and scheduler of a checkpoint written by ``save``; returns its
    ``state.json``. The random states are ``restore_rng``'s job (the trainer calls it at the first step)."""
    path = Path(path)
    if not (path / STATE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE})")
    info = json.loads((path / STATE).read_text())
    load_adapter_state(pipe, load_file(path / "trainable.safetensors"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
    return info


def restore_rng(path: str | os.PathLike, accelerator) -> None:
    """Set this process's random states to those saved in checkpoint ``path``."""
    path = Path(path)
    rng = path / f"rng-{accelerator.process_index}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, map_location="cpu", weights_only=True))
    else:
        logger.warning("%s has no random state for process %d (it was written by fewer processes)", path,
                       accelerator.process_index)
