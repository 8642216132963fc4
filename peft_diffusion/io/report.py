"""Which keys of an adapter file a load used, ignored or left without a match, per component.

The most common complaint about LoRA loaders is an adapter that "does nothing": the file's keys name modules
the model does not have (another architecture's block names, a missing or extra prefix, the text encoder's
keys for a pipeline without one), so nothing or only part of it lands, and with ``skip_unknown`` the rest
goes with one warning line. ``load_adapter(..., report=True)`` returns a ``LoadReport`` that names every file
key and where it went, the layers of the kinds the file adapts that got no key (a file that fits half the
model), and the tensors that are all zeros (an untrained LoRA B: no effect). ``UnmatchedKeysError`` carries
the same report when the load is refused.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict

import torch

from .adapter_data import COMPONENTS, AdapterData, unwrapped

SHOWN = 8  # keys or modules listed per line of the text form; the report itself keeps them all


def _kind(site: str) -> tuple[str, ...]:
    """The kind of layer a site is: its last two names without indices (``attn2.to_k``, ``self_attn.q_proj``,
    ``resnets.conv1``), what tells "the same layer in another block" apart from other layers."""
    return tuple(p for p in site.split(".") if not p.isdigit())[-2:]


def _file_component(key: str) -> str:
    """The component a key that fits nothing names, as far as its prefix tells ("" when it does not)."""
    head = key.partition(".")[0]
    if head in COMPONENTS:
        return head
    for prefix, comp in (("lora_unet_", "unet"), ("lora_te2_", "text_encoder_2"), ("lora_te1_", "text_encoder"),
                         ("lora_te_", "text_encoder")):
        if key.startswith(prefix):
            return comp
    return ""


def _all_zero(t) -> bool:
    """Whether a non-empty tensor holds only zeros; one min/max reduction (``any`` is several times slower on
    floats, and this runs on every tensor of the file)."""
    if t.numel() == 0:
        return False
    try:
        lo, hi = torch.aminmax(t.reshape(-1))
    except (NotImplementedError, RuntimeError):  # dtypes without aminmax (bool, float8)
        return not bool(t.any())
    return bool(lo == 0) and bool(hi == 0)


@dataclasses.dataclass
class ComponentReport:
    """One component's share of the file. ``used``: file keys loaded; ``ignored``: file keys that fit no module
    (only a load with ``skip_unknown`` gets past them); ``skipped``: keys of a component the target does not
    hold (a pipeline's file given to a lone model); ``missing``: modules of the kinds the file adapts that
    got no key; ``zero``: loaded tensors that are all zeros (``site.parameter``; looked for when the load asked
    for a report); ``sites``: modules adapted."""

    used: list[str] = dataclasses.field(default_factory=list)
    ignored: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)
    zero: list[str] = dataclasses.field(default_factory=list)
    sites: int = 0


@dataclasses.dataclass
class LoadReport:
    """What ``load_adapter(..., report=True)`` returns: the adapter's ``name`` and, per file component ("" for
    keys without a component prefix), the keys used, ignored and the modules missing. ``str()`` is the
    readable form; ``loaded`` is False for the report an ``UnmatchedKeysError`` carries."""

    path: str
    format: str
    name: str | None
    components: dict[str, ComponentReport]
    loaded: bool = True

    @property
    def used(self) -> list[str]:
        return [k for c in self.components.values() for k in c.used]

    @property
    def ignored(self) -> list[str]:
        return [k for c in self.components.values() for k in c.ignored]

    @property
    def skipped(self) -> list[str]:
        return [k for c in self.components.values() for k in c.skipped]

    @property
    def missing(self) -> list[str]:
        return [f"{comp}.{m}" if comp else m for comp, c in self.components.items() for m in c.missing]

    def __str__(self) -> str:
        state = f"loaded as {self.name!r}" if self.loaded else "not loaded"
        lines = [f"{self.path} ({self.format} format): {state}"]
        for comp, c in self.components.items():
            summary = f"{len(c.used)} keys used on {c.sites} modules"
            if c.skipped:
                summary = f"{len(c.skipped)} keys skipped (the target has no such component)"
            if c.ignored:
                summary += f", {len(c.ignored)} keys fit no module"
            if c.missing:
                summary += f", {len(c.missing)} modules of the same kinds got no key"
            lines.append(f"  {comp or 'model'}: {summary}")
            for label, items in (("fit no module", c.ignored), ("no key for", c.missing),
                                 ("all zeros (no effect)", c.zero)):
                if items:
                    lines.append(f"    {label} ({len(items)}):")
                    lines += [f"      {item}" for item in items[:SHOWN]]
                    if len(items) > SHOWN:
                        lines.append(f"      ... and {len(items) - SHOWN} more")
        if not self.used:
            lines.append("  no key of the file fits this model: it was made for another architecture or naming")
        return "\n".join(lines)


class KeyLedger:
    """Collects a load's report while ``load_adapter`` plans it: ``use`` and ``skip`` per site, ``finish``
    once the outcome is known. Sites are the format's; keys are the file's (``AdapterData.sources``), or the
    ``component.site.param`` names for formats whose keys are exactly those."""

    def __init__(self, path, fmt: str, data: AdapterData, zeros: bool = True):
        self.path, self.fmt, self.data = str(path), fmt, data
        self.zeros = zeros  # look for all-zero tensors (a pass over every tensor: only when a report is asked for)
        self.parts: dict[str, ComponentReport] = defaultdict(ComponentReport)
        self.adapted: dict[str, set[str]] = defaultdict(set)
        for key in data.unknown:
            self.parts[_file_component(key)].ignored.append(key)

    def keys(self, comp: str, site: str) -> list[str]:
        found = self.data.sources.get((comp, site))
        if found:
            return list(found)
        return [".".join(x for x in (comp, site, p) if x) for p in self.data.tensors[comp][site]]

    def skip(self, comp: str, *sites: str, component: bool = False) -> None:
        """Sites of the file that fit no module (``component``: of a component the target does not hold)."""
        part = self.parts[comp]
        for site in sites:
            (part.skipped if component else part.ignored).extend(self.keys(comp, site))

    def use(self, comp: str, site: str, model_site: str, params: dict) -> None:
        """A site loaded at ``model_site`` with ``params``; the site's keys of other parameters fit nothing."""
        keys = self.keys(comp, site)
        others = [p for p in self.data.tensors[comp][site] if p not in params]
        unused = [k for k in keys if any(k.endswith(p) for p in others)]
        part = self.parts[comp]
        part.used += [k for k in keys if k not in unused]
        part.ignored += unused
        part.sites += 1
        if self.zeros:
            part.zero += [f"{site}.{p}" for p, t in params.items() if _all_zero(t)]
        self.adapted[comp].add(unwrapped(model_site))

    def finish(self, name: str | None, layers, loaded: bool) -> LoadReport:
        """The report; ``layers(component)`` gives the model's adapter-capable layers by name."""
        for comp, adapted in self.adapted.items():
            kinds = {_kind(s) for s in adapted}
            names = dict.fromkeys(unwrapped(n) for n in layers(comp) or {})
            self.parts[comp].missing = [n for n in names if n not in adapted and _kind(n) in kinds]
        comps = dict(self.parts)
        return LoadReport(self.path, self.fmt, name, {c: comps[c] for c in sorted(comps)}, loaded)
