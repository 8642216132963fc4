"""The functions users call. Models stay plain ``nn.Module``s / ``DiffusionPipeline``s; these act on them.

Every function takes a model or a pipeline. On a pipeline it acts on every ``nn.Module`` component
(``unet``, ``text_encoder``, ...); ``inject`` goes to the denoiser (``unet`` or ``transformer``) unless
``components=`` names others. Every function acts on sites of every kind (``core``: Host, Annex, ParamSite).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator

from torch import nn

from .config import MethodConfig
from .core import SITE_KINDS, Host, Site
from .core import inputs as _inputs
from .target import name_matches

logger = logging.getLogger(__name__)

DENOISERS = ("unet", "transformer", "prior")


def modules_of(obj) -> dict[str, nn.Module]:
    """{component name: module} of a pipeline; {"": model} for a model."""
    if isinstance(obj, nn.Module):
        return {"": obj}
    config = getattr(obj, "config", None)
    if isinstance(config, dict) and hasattr(type(obj), "components"):
        # a diffusers pipeline: its components read from its config, where they are (library, class) pairs (the
        # other entries are settings, whose attribute access diffusers deprecates); ``components`` also
        # inspects the constructor's signature, ~0.3 ms on every ``pd.inputs``
        found = {k: getattr(obj, k, None) for k, v in config.items() if not k.startswith("_")
                 and isinstance(v, (list, tuple))}
        return {k: v for k, v in found.items() if isinstance(v, nn.Module)}
    comps = getattr(obj, "components", None)
    if not isinstance(comps, dict):
        raise TypeError(f"expected an nn.Module or a diffusers pipeline, got {type(obj).__name__}")
    return {k: v for k, v in comps.items() if isinstance(v, nn.Module)}


def placed(model: nn.Module) -> Iterator[tuple[str, Site, nn.Module, str]]:
    """(site name, site, parent module, attribute) for every site of every kind in ``model``, in model order.

    Site names are what files and APIs use: a Host's module path, an Annex's annexed module path ("" for
    the model itself), ``<module>.<parameter>`` for a ParamSite; a Host's ``.base`` is not part of them.
    """
    def walk(module: nn.Module, prefix: str):
        for attr, child in list(module._modules.items()):
            if child is None:
                continue
            path = f"{prefix}.{attr}" if prefix else attr
            if isinstance(child, Site):
                yield child.public_name(prefix, attr), child, module, attr
                if isinstance(child, Host):  # annexes and parameter sites on the wrapped layer
                    yield from walk(child.base, path)
            else:
                yield from walk(child, path)

    return walk(model, "")


def sites(obj) -> Iterator[tuple[str, Site]]:
    """(qualified name, site) for every site of every kind; pipeline names are prefixed with their component."""
    for comp, model in modules_of(obj).items():
        for name, site, _, _ in placed(model):
            yield (f"{comp}.{name}" if comp and name else comp or name), site


hosts = sites  # the name older code uses: every kind of site has the same bookkeeping


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


def module_at(model: nn.Module, path: str) -> nn.Module:
    """The module at ``path`` ("" = the model), looking through Hosts to the layer they wrap."""
    module = model
    for part in path.split(".") if path else ():
        module = getattr(module.base if isinstance(module, Host) else module, part)
    return module.base if isinstance(module, Host) else module


def site_for(model: nn.Module, site: str, kind: str, create: bool = False) -> Site | nn.Module | None:
    """The site of ``kind`` named ``site``: created on demand with ``create``; without it, the site if there
    is one, else what a delta there is built on (the layer, the module, the parameter), None when nothing fits.
    """
    if kind == "host":
        module = model.get_submodule(site) if site else model
        if isinstance(module, Host) or not create:
            return module
        parent_name, _, child = site.rpartition(".")
        host = Host(module).train(module.training)
        setattr(module_at(model, parent_name) if parent_name else model, child, host)
        return host
    if kind == "annex":
        module = module_at(model, site)
        return SITE_KINDS["annex"].install(module) if create else module
    owner_name, _, pname = site.rpartition(".")
    owner = module_at(model, owner_name)
    if create:
        return SITE_KINDS["param"].install(owner, pname)
    tensor = SITE_KINDS["param"].tensor_of(owner, pname)
    if tensor is None:
        raise AttributeError(f"{type(owner).__name__} {owner_name!r} has no parameter or buffer {pname!r}")
    return tensor


def place(model: nn.Module, deltas: dict[str, nn.Module], name: str, weight: float | None = None) -> None:
    """Put built deltas ({site: delta}) into the model, creating each delta's kind of site once; ``weight``:
    the adapter's weight wherever it now runs (None: the sites' default, 1).

    New modules take the train/eval mode of the module they join (dropout must not run in an eval model).
    """
    for site, delta in deltas.items():
        where = site_for(model, site, delta.site_kind, create=True)
        mode = where.base.training if isinstance(where, Host) else where.training
        where.add(name, delta.train(mode))
    if weight is not None:  # every site that runs it: a delta may also have placed linked ones (annexes)
        for _, where in sites(model):
            if name in where.active:
                where.active[name] = float(weight)


def adapter_parameters(obj) -> set[int]:
    """ids of every parameter that belongs to an adapter (any site, any kind)."""
    return {id(p) for _, site in sites(obj) for p in site.deltas.parameters()}


def freeze_base(obj) -> None:
    """Stop gradients to every parameter that is not part of an adapter, in every component."""
    adapter = adapter_parameters(obj)
    for model in modules_of(obj).values():
        for p in model.parameters():
            if id(p) not in adapter:
                p.requires_grad_(False)


def check_new_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without dots, got {name!r}")
    if hasattr(nn.ModuleDict, name):  # sites keep deltas in a ModuleDict: "half", "train", "to" would clash
        raise ValueError(f"adapter name {name!r} is the name of a torch.nn.Module attribute; pick another name")
    if name in adapter_names(model):
        raise ValueError(f"adapter {name!r} already exists in {type(model).__name__}; remove it or pick another name")


def inject(obj, config: MethodConfig, name: str = "default", components: tuple[str, ...] | None = None,
           freeze: bool = True):
    """Add adapter ``name`` of method ``config`` at every target site; returns ``obj``.

    Every delta of every component is built before anything is touched, so an error leaves the model
    unchanged. With ``freeze`` every parameter of every component that is not an adapter's stops requiring
    grad (adapters keep their setting), as diffusers' training scripts and peft leave a pipeline.
    """
    if not isinstance(config, MethodConfig):
        raise TypeError(f"config must be a method config such as LoRA(...), got {type(config).__name__}")
    plans = []
    for model in _pick(obj, components or config.components):
        check_new_name(model, name)
        cfg = config.bind(obj, model, name).resolved(model)
        kind = cfg.site_kind
        found = cfg.select(model)
        if not found:
            what = "parameter" if kind == "param" else "module"
            raise ValueError(f"target {cfg.target} matches no {what} of {type(model).__name__}")
        foreign = _foreign_layers(model, found) if kind == "host" else []
        if foreign:
            raise TypeError(f"{type(model).__name__} holds adapter layers of another library at {foreign[:3]}: "
                            "remove them first (diffusers: pipe.unload_lora_weights(); peft: model.unload())")
        built = {}
        for site in found:
            module = site_for(model, site, cfg.kind_of(model, site))
            built[site] = cfg.build(module.base if isinstance(module, Host) else module, site)
        plans.append((model, built))
    for model, built in plans:  # every component built before any is touched
        place(model, built, name)
    if freeze:
        freeze_base(obj)
    return obj


def _foreign_layers(model: nn.Module, found: list[str]) -> list[str]:
    """Selected sites that are (or sit in) peft's tuner layers, e.g. after diffusers' ``load_lora_weights``."""
    out = []
    for site in found:
        module = model.get_submodule(site)
        if hasattr(module, "base_layer") or type(module).__module__.startswith("peft."):
            out.append(site)
    return out


@contextlib.contextmanager
def inputs(obj, **named):
    """Per-call inputs for the adapters of ``obj`` (a pipeline or model) inside the block:
    ``with pd.inputs(pipe, image_embeds=e): pipe(...)``. Contexts nest; see ``core.inputs``."""
    with _inputs.given(list(modules_of(obj).values()), named):
        yield obj


def after_step(obj, step: int, total: int) -> None:
    """Let methods that act between optimizer steps do so (Delta-LoRA's update of W, IncreLoRA's rank
    growth): a config class that defines ``after_step(deltas, step, total)`` gets it called once per
    optimizer step with {qualified site: delta} of every adapter built from that config. Trainers call this
    after ``optimizer.step()`` and before the gradients are cleared; ``step`` counts from 1 to ``total``.
    """
    groups: dict[int, tuple] = {}
    for q, host in sites(obj):
        for delta in host.deltas.values():
            hook = getattr(delta.config, "after_step", None)
            if hook is not None:
                groups.setdefault(id(delta.config), (hook, {}))[1][q] = delta
    for hook, deltas in groups.values():
        hook(deltas, step, total)


def _by_config(obj, hook_name: str) -> list[tuple]:
    """(config, {qualified site: delta}) of every adapter config that defines ``hook_name``, in model order."""
    groups: dict[int, tuple] = {}
    for q, site in sites(obj):
        for delta in site.deltas.values():
            if getattr(delta.config, hook_name, None) is not None:
                groups.setdefault(id(delta.config), (delta.config, {}))[1][q] = delta
    return list(groups.values())


def scoring_batches(obj) -> int:
    """How many batches the scoring passes of ``obj``'s adapters want (0: none needs one); see ``prepare``."""
    return max((int(cfg.scoring_batches) for cfg, _ in _by_config(obj, "prepare")), default=0)


def prepare(obj, loss_fn, batches) -> list[str]:
    """Run the scoring passes that choose what selective methods train, before training (FISH and
    Child-Tuning_D: Fisher information; LT-SFT: a short dense fine-tune, then rewound).

    A config class that defines ``prepare(deltas, loss_fn, batches)`` (and ``scoring_batches``, how many it
    wants) gets it called once with {qualified site: delta} of every adapter built from that config.
    ``loss_fn(batch)`` returns the scalar training loss of one batch, computed through ``obj``; ``batches``
    is a list (or iterable) of at least ``scoring_batches(obj)`` batches. Hooks change their deltas in place
    (masks, not parameter shapes), so an optimizer made earlier stays valid. Returns one summary line per
    config (also logged).
    """
    batches = list(batches)
    lines = []
    for cfg, deltas in _by_config(obj, "prepare"):
        if len(batches) < int(cfg.scoring_batches):
            logger.warning("%s wants %d scoring batches; %d given", cfg.method, cfg.scoring_batches, len(batches))
        line = cfg.prepare(deltas, loss_fn, batches)
        if line:
            lines.append(line)
    return lines


def regularizer(obj):
    """The sum of the extra loss terms of ``obj``'s adapters (Diff pruning's L0 penalty), or None when none
    has one. A config class that defines ``regularizer(deltas) -> tensor or None`` gets {qualified site:
    delta} of its adapter; trainers add the result to the loss of every micro-step."""
    terms = [t for cfg, deltas in _by_config(obj, "regularizer") if (t := cfg.regularizer(deltas)) is not None]
    return sum(terms[1:], terms[0]) if terms else None


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


def unmergeable(obj) -> dict[str, str]:
    """{adapter: a site where it cannot be fused} for every adapter with a part whose math does not merge
    (bottleneck adapters and other new modules)."""
    out: dict[str, str] = {}
    for q, site in sites(obj):
        for n, delta in site.deltas.items():
            if not (delta.mergeable or delta.runs_when_fused):
                out.setdefault(n, q)
    return out


def fuse(obj, names: list[str] | None = None, exact: bool = False) -> None:
    """Merge adapters (default: the active ones that can merge) into the base weights with their active weights.

    Adapters named in ``names`` must be mergeable everywhere (else an error, nothing touched); left to the
    default, adapters that cannot merge keep running unfused. ``exact`` keeps a copy of the base tensors so
    ``unfuse`` restores them bit for bit (costs memory).
    """
    if any(not host.enabled for _, host in hosts(obj)):
        raise RuntimeError("adapters are disabled: enable_adapters before fusing")
    active = active_adapters(obj)
    cannot = unmergeable(obj)
    if names is None:
        names = [n for n in active if n not in cannot]
        if any(n in cannot for n in active):
            logger.info("fuse: %s cannot merge and keep running unfused", [n for n in active if n in cannot])
    names = list(names)
    _known(obj, names)
    inactive = [n for n in names if n not in active]
    if inactive:
        raise ValueError(f"adapters {inactive} are not active; set_adapters them with a weight before fusing")
    bad = {n: cannot[n] for n in names if n in cannot}
    if bad:
        raise ValueError(f"adapters {sorted(bad)} cannot be fused into the base weights (e.g. at {next(iter(bad.values()))!r}:"
                         " new modules, not a weight change); they run unfused")
    for _, host in hosts(obj):
        for name in names:
            if name in host.active and name not in host.merged:
                host.fuse(name, host.active[name], exact=exact)


def unfuse(obj, names: list[str] | None = None) -> None:
    """Take fused adapters (default: all) back out of the base weights, last fused first."""
    if names is not None:
        _known(obj, names)
    # sites in reverse of ``fuse``'s order: fuses at two sites over one tensor (a bias delta, then a scale of
    # the layer holding it: DiffFit) do not commute
    for _, host in reversed(list(hosts(obj))):
        for name in reversed([n for n in host.merged if names is None or n in names]):
            host.unfuse(name)


def remove(obj, name: str | None = None) -> None:
    """Remove adapter ``name`` (default: all). Fused ones are unfused first; a site left without adapters
    gets its original module back, so the module tree and state_dict keys are as before injection."""
    if name is not None:
        _known(obj, [name])
    unfuse(obj, None if name is None else [name])
    for model in modules_of(obj).values():
        for _, site, parent, attr in list(placed(model)):
            for n in [name] if name is not None else list(site.deltas):
                if n in site.deltas:
                    site.drop(n)
            if not site.deltas and parent._modules.get(attr) is site:
                site.uninstall(parent, attr)


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
    for _, host in sites(obj):
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
