"""save_adapter / load_adapter: adapters to and from files, for one model or a whole pipeline.

Loading detects the format, checks every key and shape against the model and builds every delta before
the model is touched: a file for another architecture raises and leaves the model as it was.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from torch import nn

from .api import DENOISERS, adapter_names, check_new_name, hosts, modules_of, place, remove, site_for
from .core import SUPPORTED_LAYERS, Host, Site
from .io import (WRAPPERS, AdapterData, AdapterFileError, KeyLedger, LoadReport, UnmatchedKeysError, encode,
                 read_adapter, resolve_path, write_file)
from .target import class_names

logger = logging.getLogger(__name__)


def component_name(model: nn.Module) -> str:
    """The pipeline component a lone model usually is ("" when it is not a pipeline part)."""
    name = type(model).__name__
    if "UNet" in name:
        return "unet"
    if type(model).__module__.startswith("diffusers") and "Transformer" in name:
        return "transformer"
    if name.startswith(("CLIPTextModel", "T5EncoderModel")):
        return "text_encoder"
    return ""


def wrapper_prefix(model: nn.Module) -> str:
    prefix = WRAPPERS.get(type(model).__name__, "")
    return prefix if prefix and not hasattr(model, prefix[:-1]) else ""


def base_tensors(model: nn.Module):
    """(name, tensor) of the model's own parameters and buffers as named before injection."""
    def walk(module: nn.Module, prefix: str):
        yield from ((prefix + n, t) for n, t in module.named_parameters(prefix="", recurse=False))
        yield from ((prefix + n, t) for n, t in module.named_buffers(prefix="", recurse=False))
        for n, child in module.named_children():
            if isinstance(child, Site) and not isinstance(child, Host):
                continue  # annexes and parameter sites are adapters, not the base model
            yield from walk(child.base if isinstance(child, Host) else child, f"{prefix}{n}.")

    return walk(model, "")


def fingerprint(model: nn.Module) -> str:
    """sha256 over the base model's parameter names and shapes (adapters excluded), 16 hex digits."""
    h = hashlib.sha256()
    for key, t in base_tensors(model):
        h.update(f"{key}:{tuple(t.shape)}\n".encode())
    return h.hexdigest()[:16]


def save_adapter(obj, path: str | os.PathLike, name: str = "default", format: str = "native") -> Path:
    """Write adapter ``name`` of a model or pipeline to a safetensors file (atomically); returns the path.

    format: "native" (ours; LoRA files also load in diffusers), "diffusers" (peft layout with
    ``lora_adapter_metadata``; textual inversion: ``learned_embeds``), "kohya" (``lora_unet_*`` /
    ``lora_te_*`` with per-module alphas; LoRA, LoHa, LoKr), "lycoris" (LyCORIS' ``lycoris_*`` naming for one
    model, kohya's for several) or "a1111" (textual inversion ``emb_params`` / ``clip_l``+``clip_g``).
    Delta-LoRA and IncreLoRA keep their training state in "native" files and are written as their exact
    plain LoRA in the others.
    """
    configs, tensors, prints = {}, {}, {}
    for comp, model in modules_of(obj).items():
        file_comp = comp or component_name(model)
        sites = {site: host.deltas[name] for site, host in hosts(model)
                 if name in host.deltas and not host.deltas[name].transient}
        if sites:
            configs[file_comp] = next(iter(sites.values())).config
            tensors[file_comp] = {wrapper_prefix(model) + s: dict(d.state_dict()) for s, d in sites.items()}
            prints[file_comp] = fingerprint(model)
    if not tensors:
        raise ValueError(f"no adapter named {name!r}; loaded: {adapter_names(obj)}")
    fmt, (flat, meta) = encode(format, AdapterData(configs, tensors, name=name, fingerprints=prints))
    return write_file(path, flat, meta, default_name=getattr(fmt, "default_file", None))


def _targets(obj, comps: list[str], path=None) -> dict[str, nn.Module | None]:
    """file component -> the model it loads into (None: nowhere; for a lone model, another component)."""
    mods = modules_of(obj)
    if "" in mods:  # a lone model
        model = mods[""]
        if len(comps) == 1:
            return {comps[0]: model}
        guess = component_name(model)
        if guess not in comps:
            raise AdapterFileError(f"{path or 'the file'}: holds components {comps}: load it into the pipeline, "
                                   f"or pass the file of one component")
        return {c: model if c == guess else None for c in comps}
    denoiser = next((mods[n] for n in DENOISERS if n in mods), None)
    return {c: mods.get(c) if c else denoiser for c in comps}


def _foreign(model: nn.Module, comp: str) -> bool:
    """Whether ``comp`` of a file is another kind of component than ``model`` (a text encoder's keys given to a
    lone U-Net): the loader skips such components as it does when the file holds several."""
    kinds = [("unet", "transformer"), ("text_encoder", "text_encoder_2", "text_encoder_3")]
    own = component_name(model)
    return any(own in k for k in kinds) and any(comp in k for k in kinds) and not any(
        own in k and comp in k for k in kinds)


def _layer_names(model: nn.Module) -> dict[str, nn.Module]:
    """Names a file may use for the model's adapter-capable layers (with and without a wrapper prefix), each
    with its layer: formats that infer per-site settings from tensor shapes (LyCORIS LoKr) read its dims."""
    layers = {n: m.base if isinstance(m, Host) else m for n, m in model.named_modules()
              if isinstance(m, Host) or (class_names(m) & set(SUPPORTED_LAYERS) and ".deltas." not in n)}
    wrapper = wrapper_prefix(model)
    return {**layers, **{wrapper + n: m for n, m in layers.items()}} if wrapper else layers


def load_adapter(obj, path: str | os.PathLike, name: str | None = None, scale: float = 1.0,
                 skip_unknown: bool = False, trainable: bool = False, format: str | None = None,
                 report: bool = False) -> str | LoadReport:
    """Load an adapter file into a model or pipeline, active with weight ``scale``; returns its name.

    The format is detected (native, diffusers/peft, older diffusers names, kohya/A1111, LyCORIS) unless given.
    ``name`` defaults to the name stored in the file, else the file name (with ``_1``, ``_2``... added when
    taken). Keys that fit no module raise ``UnmatchedKeysError`` unless ``skip_unknown`` (then a warning).
    ``trainable`` leaves the adapter's parameters requiring grad (to go on training it). ``report=True``
    returns a ``LoadReport`` instead of the name: every file key used or ignored, per component, and the
    modules of the kinds the file adapts that got no key (``print`` it to see why an adapter does nothing).
    A file that cannot be loaded raises ``AdapterFileError`` (or a subclass) naming it, the model untouched.
    """
    path = resolve_path(path)

    def module_names(comp: str) -> dict[str, nn.Module] | None:  # for formats that resolve names against the model
        model = _targets(obj, [comp])[comp]
        if model is None or _foreign(model, comp):
            return None  # nothing to resolve against: the component is skipped (lone model) or unknown (pipeline)
        return _layer_names(model)

    fmt_name, data = read_adapter(path, format, module_names)
    name = _pick_name(obj, name, data.name or path.stem)
    ledger = KeyLedger(path, fmt_name, data, zeros=report)

    unknown = list(data.unknown)
    lone = "" in modules_of(obj)
    plans = []
    for comp, model in _targets(obj, list(data.tensors), path).items():
        prefix = f"{comp}." if comp else ""
        if model is None and lone:
            logger.info("%s: skipped component %r (loading into a lone %s)", path, comp, type(obj).__name__)
            ledger.skip(comp, *data.tensors[comp], component=True)
            continue
        if model is None:
            unknown += [f"{prefix}{s}.{p}" for s, ps in data.tensors[comp].items() for p in ps]
            ledger.skip(comp, *data.tensors[comp])
            continue
        if data.fingerprints.get(comp) and data.fingerprints[comp] != fingerprint(model):
            logger.warning("%s: made for a model with other parameter shapes than this %s", path,
                           type(model).__name__)
        deltas = {}
        # a lone model's "component" may be its own first submodule (GPT-2's ``transformer.h.0...``)
        head = f"{comp}." if lone and comp and comp != component_name(model) else ""
        config = data.configs[comp].bind(obj, model, name)
        for site, params in data.tensors[comp].items():
            # per-site settings follow the file's names; the layer is found under the model's own
            found = _resolve(model, site, head, config.kind_of)
            if found is None:
                unknown += [f"{prefix}{site}.{p}" for p in params]
                ledger.skip(comp, site)
                continue
            model_site, layer = found
            delta = _build(config, layer, site, f"{path}: {prefix}{site}")
            try:
                delta.fit_file(params)
            except ValueError as e:
                raise AdapterFileError(f"{path}: {prefix}{site}: {e}") from e
            expected = delta.state_dict()
            for p, t in params.items():
                if p not in expected:
                    unknown.append(f"{prefix}{site}.{p}")
                elif t.shape != expected[p].shape:
                    raise AdapterFileError(f"{path}: {prefix}{site}.{p} has shape {tuple(t.shape)} in the file but "
                                           f"{tuple(expected[p].shape)} in this {type(model).__name__}")
                elif t.is_floating_point() != expected[p].is_floating_point():  # ints or bools for weights
                    raise AdapterFileError(f"{path}: {prefix}{site}.{p} holds {t.dtype} values; this adapter "
                                           f"needs {expected[p].dtype}")
            missing = sorted(set(expected) - set(params))
            if missing:
                raise AdapterFileError(f"{path}: {prefix}{site} lacks {missing}")
            params = {p: t for p, t in params.items() if p in expected}
            ledger.use(comp, site, model_site, params)
            deltas[model_site] = (delta, layer, params)
        plans.append((model, deltas))
    if unknown:
        msg = f"{path}: {len(unknown)} keys fit no module of this model: {unknown[:10]}"
        if not skip_unknown:
            raise UnmatchedKeysError(msg + " (pass skip_unknown=True to load the rest; load_adapter(..., "
                                     "report=True) lists every key)", ledger.finish(None, module_names, False))
        logger.warning(msg)
    if not any(d for _, d in plans):
        raise UnmatchedKeysError(f"{path}: nothing in the file fits this model",
                                 ledger.finish(None, module_names, False))

    data.tensors.clear()  # from here the plans hold the file's tensors, each dropped once copied: the peak
    for model, deltas in plans:  # stays near one file size; every tensor into its delta before any is placed
        for delta, layer, params in deltas.values():
            dtypes = {k: v.dtype for k, v in delta.state_dict().items()}
            # own, aligned storage for each tensor (not a view into the file's buffer): kernels pick their code
            # path by alignment, so a loaded adapter computes exactly what the saved one did
            device = _device(layer)
            delta.load_state_dict({p: t.to(device, dtypes[p], copy=True) for p, t in params.items()}, assign=True)
            params.clear()
            if not trainable:
                delta.requires_grad_(False)
    try:
        for model, deltas in plans:
            place(model, {site: delta for site, (delta, _, _) in deltas.items()}, name)
            for _, host in hosts(model):
                if name in host.active:
                    host.active[name] = float(scale)
    except BaseException:  # a pipeline is changed by all of the file or by none of it
        if name in adapter_names(obj):
            remove(obj, name)
        raise
    return ledger.finish(name, module_names, True) if report else name


def _build(config, layer, site: str, where: str):
    """The delta ``config`` builds at ``site``; settings read from a damaged file (a rank of 0, a factor that
    does not divide the layer...) raise AdapterFileError naming ``where``."""
    try:
        return config.build(layer, site, init=False)
    except AdapterFileError:
        raise
    except (ValueError, TypeError, ArithmeticError, IndexError, RuntimeError) as e:
        raise AdapterFileError(f"{where}: the file's settings do not build on this layer ({type(e).__name__}: "
                               f"{e})") from e


def _device(where):
    """The device a delta built on ``where`` (a layer, a module or a tensor) lives on."""
    if torch.is_tensor(where):
        return where.device
    return next(iter(where.parameters()), next(iter(where.buffers()), torch.empty(0))).device


def _layer(model: nn.Module, site: str, kind: str = "host"):
    """What a delta of ``kind`` at ``site`` is built on (the base layer of a Host, the module an annex sits
    beside, the parameter), None when the model has none there."""
    try:
        if kind != "host":
            return site_for(model, site, kind)
        module = model.get_submodule(site)
    except AttributeError:
        return None
    base = module.base if isinstance(module, Host) else module
    if hasattr(base, "base_layer") or type(base).__module__.startswith("peft."):
        raise AdapterFileError(f"{type(model).__name__} holds adapter layers of another library at {site!r}: remove "
                               "them first (diffusers: pipe.unload_lora_weights(); peft: model.unload())")
    return base if class_names(base) & set(SUPPORTED_LAYERS) else None


def _resolve(model: nn.Module, site: str, head: str, kind="host") -> tuple[str, nn.Module] | None:
    """(the model's name, what the delta is built on) for a file's site: as written, without a wrapper
    prefix, or under ``head``; None when the model has no such site. ``kind``: a site kind, or a config's
    ``kind_of(model, site)`` for methods whose deltas live in several kinds."""
    wrapper = wrapper_prefix(model)
    candidates = (site, site[len(wrapper):] if wrapper and site.startswith(wrapper) else None, head + site)
    for candidate in dict.fromkeys(c for c in candidates if c is not None):
        k = kind if isinstance(kind, str) else kind(model, candidate)
        if not candidate and k != "annex":
            continue
        layer = _layer(model, candidate, k)
        if layer is not None:
            return candidate, layer
    return None


def _pick_name(obj, name: str | None, fallback: str) -> str:
    taken = adapter_names(obj)
    if name is not None:
        for model in modules_of(obj).values():
            check_new_name(model, name)
        return name
    # only what an adapter name cannot hold goes: a file's token (``<cat>``) must survive as the name
    base = "".join("_" if c == "." or c.isspace() or not c.isprintable() else c for c in fallback) or "adapter"
    candidate, i = base, 0
    # a file stem can be an nn.Module attribute ("half.safetensors", "train.pt"): deltas are held in a
    # ModuleDict, which refuses such names
    while candidate in taken or hasattr(nn.ModuleDict(), candidate):
        i += 1
        candidate = f"{base}_{i}"
    return candidate
