"""The functions users call. Models stay plain ``nn.Module``s / ``DiffusionPipeline``s; these act on them.

Every function takes a model or a pipeline. On a pipeline it acts on every ``nn.Module`` component
(``unet``, ``text_encoder``, ...); ``inject`` goes to the denoiser (``unet`` or ``transformer``) unless
``components=`` names others.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator

from torch import nn

from .config import MethodConfig
from .core import Host
from .target import name_matches

logger = logging.getLogger(__name__)

DENOISERS = ("unet", "transformer", "prior")


def modules_of(obj) -> dict[str, nn.Module]:
    """{component name: module} of a pipeline; {"": model} for a model."""
    if isinstance(obj, nn.Module):
        return {"": obj}
    comps = getattr(obj, "components", None)
    if not isinstance(comps, dict):
        raise TypeError(f"expected an nn.Module or a diffusers pipeline, got {type(obj).__name__}")
    return {k: v for k, v in comps.items() if isinstance(v, nn.Module)}


def hosts(obj) -> Iterator[tuple[str, Host]]:
    """(qualified name, host) for every Host; pipeline names are prefixed with their component."""
    for comp, model in modules_of(obj).items():
        for name, module in model.named_modules():
            if isinstance(module, Host):
                yield (f"{comp}.{name}" if comp else name), module


def adapter_names(obj) -> list[str]:
    seen: dict[str, None] = {}
    for _, host in hosts(obj):
        seen.update(dict.fromkeys(host.deltas))
    return list(seen)


def active_adapters(obj) -> dict[str, float]:
    out: dict[str, float] = {}
    for _, host in hosts(obj):
        for name, w in host.active.items():
            out.setdefault(name, w)
    return out


def place(model: nn.Module, deltas: dict[str, nn.Module], name: str) -> None:
    """Put built deltas ({site: delta}) into the model, wrapping each site in a Host once.

    New modules take the train/eval mode of the layer they wrap (dropout must not run in an eval model).
    """
    for site, delta in deltas.items():
        module = model.get_submodule(site)
        if not isinstance(module, Host):
            parent_name, _, child = site.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            module = Host(module).train(module.training)
            setattr(parent, child, module)
        module.add(name, delta.train(module.base.training))


def freeze_base(model: nn.Module) -> None:
    """Stop gradients to every parameter that is not part of an adapter."""
    adapter = {id(p) for _, host in hosts(model) for p in host.deltas.parameters()}
    for p in model.parameters():
        if id(p) not in adapter:
            p.requires_grad_(False)


def check_new_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without dots, got {name!r}")
    if name in adapter_names(model):
        raise ValueError(f"adapter {name!r} already exists in {type(model).__name__}; remove it or pick another name")


def inject(obj, config: MethodConfig, name: str = "default", components: tuple[str, ...] | None = None,
           freeze: bool = True):
    """Add adapter ``name`` of method ``config`` at every target site; returns ``obj``.

    Every delta of every component is built before anything is touched, so an error leaves the model
    unchanged. With ``freeze`` the base parameters stop requiring grad (adapters keep their setting).
    """
    if not isinstance(config, MethodConfig):
        raise TypeError(f"config must be a method config such as LoRA(...), got {type(config).__name__}")
    plans = []
    for model in _pick(obj, components or config.components):
        check_new_name(model, name)
        cfg = config.bind(obj, model, name).resolved(model)
        sites = cfg.target.select(model)
        if not sites:
            raise ValueError(f"target {cfg.target} matches no module of {type(model).__name__}")
        built = {}
        for site in sites:
            module = model.get_submodule(site)
            built[site] = cfg.build(module.base if isinstance(module, Host) else module, site)
        plans.append((model, built))
    for model, built in plans:  # every component built before any is touched
        place(model, built, name)
        if freeze:
            freeze_base(model)
    return obj


def after_step(obj, step: int, total: int) -> None:
    """Let methods that act between optimizer steps do so (Delta-LoRA's update of W, IncreLoRA's rank
    growth): a config class that defines ``after_step(deltas, step, total)`` gets it called once per
    optimizer step with {qualified site: delta} of every adapter built from that config. Trainers call this
    after ``optimizer.step()`` and before the gradients are cleared; ``step`` counts from 1 to ``total``.
    """
    groups: dict[int, tuple] = {}
    for q, host in hosts(obj):
        for delta in host.deltas.values():
            hook = getattr(delta.config, "after_step", None)
            if hook is not None:
                groups.setdefault(id(delta.config), (hook, {}))[1][q] = delta
    for hook, deltas in groups.values():
        hook(deltas, step, total)


def _pick(obj, names) -> list[nn.Module]:
    comps = modules_of(obj)
    if "" in comps:
        return [comps[""]]
    names = names or [n for n in DENOISERS if n in comps][:1]
    missing = [n for n in names if n not in comps]
    if missing or not names:
        raise ValueError(f"pipeline has no component {missing or list(DENOISERS)}; it has {sorted(comps)}")
    return [comps[n] for n in names]


def set_adapters(obj, adapters: dict | list | str) -> None:
    """Activate exactly these adapters with these weights (a hot swap: nothing is re-injected).

    ``adapters``: a name, a list of names (weight 1), or {name: weight}. A weight may be a float or a dict
    {pattern: float} over qualified module names: a component or block prefix ("unet", "text_encoder",
    "unet.down_blocks.0") or a target-style pattern ("attn2.to_k"); the longest matching pattern wins,
    1.0 where none matches.
    """
    if isinstance(adapters, str):
        adapters = [adapters]
    if not isinstance(adapters, dict):
        adapters = dict.fromkeys(adapters, 1.0)
    known = adapter_names(obj)
    unknown = [n for n in adapters if n not in known]
    if unknown:
        raise ValueError(f"unknown adapters {unknown}; loaded: {known}")
    for qname, host in hosts(obj):
        new = {n: (_weight_at(w, qname) if isinstance(w, dict) else float(w))
               for n, w in adapters.items() if n in host.deltas}
        changed = [n for n in host.merged if new.get(n) != host.merged[n]]
        if changed:
            raise RuntimeError(f"adapters {changed} are fused at {qname}: unfuse them before changing their weights")
        host.active = new


def _weight_at(weights: dict, qname: str) -> float:
    """The weight of the longest pattern that names ``qname``, a module above it, or matches as in targets."""
    best = None
    for pattern in weights:
        if qname.startswith(pattern + ".") or name_matches(pattern, qname):
            best = pattern if best is None or len(pattern) > len(best) else best
    return 1.0 if best is None else float(weights[best])


def disable_adapters(obj) -> None:
    """Switch every unfused adapter off (the base model runs); ``enable_adapters`` switches them back."""
    fused = sorted({n for _, h in hosts(obj) for n in h.merged})
    if fused:
        raise RuntimeError(f"adapters {fused} are fused into the base weights: unfuse them before disabling")
    for _, host in hosts(obj):
        host.enabled = False


def enable_adapters(obj) -> None:
    for _, host in hosts(obj):
        host.enabled = True


@contextlib.contextmanager
def scaled(obj, scale: float):
    """Multiply every active adapter's weight by ``scale`` inside the block (diffusers' per-call scale)."""
    saved = [(host, dict(host.active)) for _, host in hosts(obj) if not host.merged]
    for host, active in saved:
        host.active = {n: w * scale for n, w in active.items()}
    try:
        yield obj
    finally:
        for host, active in saved:
            host.active = active


def _known(obj, names) -> None:
    unknown = [n for n in names if n not in adapter_names(obj)]
    if unknown:
        raise ValueError(f"unknown adapters {unknown}; loaded: {adapter_names(obj)}")


def fuse(obj, names: list[str] | None = None, exact: bool = False) -> None:
    """Merge adapters (default: the active ones) into the base weights with their active weights.

    ``exact`` keeps a copy of the base weights so ``unfuse`` restores them bit for bit (costs memory).
    """
    if any(not host.enabled for _, host in hosts(obj)):
        raise RuntimeError("adapters are disabled: enable_adapters before fusing")
    active = active_adapters(obj)
    names = list(active) if names is None else list(names)
    _known(obj, names)
    inactive = [n for n in names if n not in active]
    if inactive:
        raise ValueError(f"adapters {inactive} are not active; set_adapters them with a weight before fusing")
    for _, host in hosts(obj):
        for name in names:
            if name in host.active and name not in host.merged:
                host.fuse(name, host.active[name], exact=exact)


def unfuse(obj, names: list[str] | None = None) -> None:
    """Take fused adapters (default: all) back out of the base weights, last fused first."""
    if names is not None:
        _known(obj, names)
    for _, host in hosts(obj):
        for name in reversed([n for n in host.merged if names is None or n in names]):
            host.unfuse(name)


def remove(obj, name: str | None = None) -> None:
    """Remove adapter ``name`` (default: all). Fused ones are unfused first; a site left without adapters
    gets its original module back, so the module tree and state_dict keys are as before injection."""
    if name is not None:
        _known(obj, [name])
    unfuse(obj, None if name is None else [name])
    for model in modules_of(obj).values():
        for qname, host in [(n, m) for n, m in model.named_modules() if isinstance(m, Host)]:
            for n in [name] if name is not None else list(host.deltas):
                if n in host.deltas:
                    host.drop(n)
            if not host.deltas:
                parent_name, _, child = qname.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child, host.base)


@dataclasses.dataclass
class Report:
    """Parameter counts: per adapter, per method category, and for the whole model."""

    adapters: dict[str, dict]
    categories: dict[str, dict]
    model_total: int
    model_trainable: int

    def __str__(self) -> str:
        lines = [f"{'adapter':<20}{'method':<19}{'category':<20}{'trainable':>12}{'total':>12}"]
        for n, row in self.adapters.items():
            lines.append(f"{n:<20}{row['method']:<19}{row['category']:<20}{row['trainable']:>12,}{row['total']:>12,}")
        for c, row in self.categories.items():
            lines.append(f"{'[' + c + ']':<59}{row['trainable']:>12,}{row['total']:>12,}")
        lines.append(f"{'model':<59}{self.model_trainable:>12,}{self.model_total:>12,}")
        return "\n".join(lines)


def parameter_report(obj) -> Report:
    adapters: dict[str, dict] = {}
    for _, host in hosts(obj):
        for n, delta in host.deltas.items():
            row = adapters.setdefault(n, {"method": delta.config.method, "category": delta.category,
                                          "trainable": 0, "total": 0})
            for p in delta.parameters():
                row["total"] += p.numel()
                row["trainable"] += p.numel() if p.requires_grad else 0
    categories: dict[str, dict] = {}
    for row in adapters.values():
        cat = categories.setdefault(row["category"], {"trainable": 0, "total": 0})
        cat["trainable"] += row["trainable"]
        cat["total"] += row["total"]
    params = [p for m in modules_of(obj).values() for p in m.parameters()]
    return Report(adapters, categories, sum(p.numel() for p in params),
                  sum(p.numel() for p in params if p.requires_grad))
