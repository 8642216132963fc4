"""New class: a new class label for a class-conditional diffusion transformer (DiT, arXiv 2212.09748), plus
LoRA (arXiv 2106.09685) on its attention and feed-forward layers.

A class-conditional DiT conditions every block on c = e_t + E[y]: ``E`` is a class-embedding table (diffusers'
``LabelEmbedding.embedding_table``, one per adaLN-Zero block, rows 0..num_classes, the last row the null class
of classifier-free guidance). Teaching it a class it has never seen (the shapes world's cross, say) needs a
label for it: here each table grows by one row per new class, E' = [E; v_1 .. v_k], served to ids
num_rows .. num_rows + k - 1 (the DiT of ``DiTPipeline`` has 1001 rows, so the first new class is id 1001),
as textual inversion serves new token ids (``token_rows.TokenRows``, here without a tokenizer). The base
rows are untouched, so every existing class (and the null class) generates as before. With ``lora`` the
usual low-rank update h = W0 x + (alpha / r) B A x goes on the ``dit`` preset's layers too, so the
transformer can learn the new class's appearance and not only its label.

Trained: ``emb_params`` [k, width] per block table (initialised from row ``init_label``, default the
table's last row, i.e. the unconditional class: the new class starts as "any image") and, with ``lora``,
LoRA's A/B. Saved: one native file; its header keeps ``labels`` (the new classes' names), so
``load_adapter`` restores the ids and names. Merges: the LoRA part fuses; the rows stay rows (a table
cannot grow by merging), ``fuse`` leaves them running. ``labels`` defaults to the adapter name.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..presets import preset
from ..registry import register_method
from ..target import Target
from .lora import LoRA, LoRADelta
from .token_rows import TokenRows

CLASS_TABLE = r".*class_embedder\.embedding_table"  # diffusers' LabelEmbedding table (DiT, AdaLayerNormZero)


def class_tables(model: nn.Module) -> list[str]:
    """Qualified names of ``model``'s class-embedding tables (with or without a Host around them)."""
    return Target(include=(CLASS_TABLE,), types=("Embedding",)).select(model)


def new_class_ids(model: nn.Module) -> dict[str, int]:
    """{class name: id} of the new classes that ``NewClass`` adapters placed in ``model`` (a DiT)."""
    from ..api import hosts  # api sits above methods; imported when called

    out: dict[str, int] = {}
    for _, host in hosts(model):
        for delta in host.deltas.values():
            if isinstance(delta, TokenRows) and isinstance(delta.config, NewClass):
                out.update(zip(delta.tokens, delta.token_ids))
    return out


@register_method("new-class")
@dataclasses.dataclass
class NewClass(LoRA):
    """New class labels ``labels`` (one new row each in every class-embedding table) + LoRA when ``lora``.

    init_label: the base row new rows start from (None: the table's last row, the unconditional class).
    lora_target: the LoRA sites (default: the ``dit`` preset); ``target`` is filled by ``bind``.
    """

    category = "hybrid"
    param_names = LoRA.param_names + ("emb_params",)
    components = ("transformer",)

    r: int = 4
    labels: tuple[str, ...] = ()
    init_label: int | None = None
    lora: bool = True
    lora_target: Target | str | None = None

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.lora_target, str):
            self.lora_target = preset(self.lora_target)
        elif isinstance(self.lora_target, dict):
            self.lora_target = Target.from_dict(self.lora_target)
        self.labels = (self.labels,) if isinstance(self.labels, str) else tuple(self.labels)
        if not all(isinstance(v, str) and v.strip() and v == v.strip() for v in self.labels):
            raise ValueError(f"NewClass labels must be non-empty names without surrounding spaces, got {self.labels!r}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"NewClass labels must differ from each other, got {self.labels!r}")
        if self.init_label is not None and (isinstance(self.init_label, bool) or not isinstance(self.init_label, int)
                                            or self.init_label < 0):
            raise ValueError(f"NewClass init_label must be a class id >= 0 or None, got {self.init_label!r}")
        if not isinstance(self.lora, bool):
            raise ValueError(f"NewClass lora must be True or False, got {self.lora!r}")

    def bind(self, obj, model: nn.Module, name: str) -> "NewClass":
        tables = class_tables(model)
        if not tables:
            raise ValueError(f"new-class needs a class-conditional model (class-embedding tables such as DiT's "
                             f"'...norm1.emb.class_embedder.embedding_table'); {type(model).__name__} has none")
        target = self.target
        if target is None:  # the tables and the LoRA sites, by exact name
            sites = (self.lora_target or preset("dit")).select(model) if self.lora else []
            target = Target(include=tuple(tables) + tuple(s for s in sites if s not in tables),
                            types=("Linear", "Embedding"))
        return dataclasses.replace(self, labels=self.labels or (name,), target=target)

    def build(self, base: nn.Module, site: str, init: bool = True):
        if not isinstance(base, nn.Embedding):
            if not self.lora:
                raise ValueError(f"new-class with lora=False puts nothing at {site} (a {type(base).__name__}): "
                                 f"target class-embedding tables only")
            delta = LoRADelta(self, site, base, init)
            delta.category = self.category
            return delta
        if not self.labels:
            raise ValueError("NewClass needs labels: set labels=(...) (inject and load_adapter use the adapter "
                             "name when it is unset)")
        rows = self._initial_rows(base, site) if init else None
        return TokenRows(self, site, base, list(self.labels), None, rows)

    @torch.no_grad()
    def _initial_rows(self, base: nn.Embedding, site: str) -> torch.Tensor:
        row = base.num_embeddings - 1 if self.init_label is None else self.init_label
        if row >= base.num_embeddings:
            raise ValueError(f"NewClass init_label {row} is past {site}'s {base.num_embeddings} rows")
        return base.weight[row].float().expand(len(self.labels), -1).clone()
