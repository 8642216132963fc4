"""Soft prompts: what prompt tuning (``prompt_tuning.py``) and P-tuning (``p_tuning.py``) share.

Both put n learnable "virtual token" embeddings P in R^{n x d} in front of a transformers model's input
embeddings X_e in R^{L x d}: the model runs on [P; X_e] (Lester et al., arXiv 2104.08691, Sec. 2). The delta
is an annex on the model itself (site ""): its forward pre-hook rewrites the call, the model's own code,
modules and state_dict keys stay as they are, ``remove`` restores them exactly.

What the pre-hook does to one call (L input tokens, batch B):

- ``input_ids`` -> ``inputs_embeds`` = [P; embed(input_ids)] (the model's own ``get_input_embeddings()``), as
  peft does; a model whose forward takes no ``inputs_embeds`` (``CLIPTextModel``) gets n placeholder ids in
  front of its ids instead, and a one-call hook on its token embedding swaps P in for their rows, so what the
  model derives from the ids (CLIP's pooled end-of-text position) still lines up;
- ``attention_mask`` gets n ones in front; ``token_type_ids`` n zeros; ``position_ids`` / ``cache_position``
  (when given) become [0..n-1, p + n];
- ``labels`` of a decoder-only or token-level head (shaped like the ids) get n x -100 in front, so the
  model's own loss ignores the virtual positions; sequence-level labels and a seq2seq model's decoder labels
  are left alone (T5: the prompt goes in front of the encoder's input only).

Outputs keep the virtual positions, as peft's do: a causal LM's logits are [B, n + L, V] (the first n rows
are the virtual tokens'); BERT's pooler reads the first position, which is now the first virtual token (as in
peft). Soft prompts change the input by design: not the identity at init (the contract test checks that
disabling the adapter gives the base model back exactly instead). Not mergeable: there is no weight to fold
them into. The adapter weight scales P.

Limits: a call that continues a key/value cache (``generate`` with ``use_cache=True`` after its first step) is
refused with a clear error; ``generate(..., use_cache=False)`` reruns whole sequences and works. A seq2seq
call given ``encoder_outputs`` is refused too: they were computed without the prompt (a seq2seq model's
``generate`` runs its encoder directly, bypassing the hook), so seq2seq generation is not supported.
Models with a learned position table (BERT, CLIP) must fit n + L positions: a prompt that leaves no room, or
a call that overflows, is refused naming both numbers. A diffusers pipeline pads its CLIP input to the whole
table (77 of 77), so input soft prompts do not fit there (prefix keys/values are the diffusion variant).
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import ClassVar

import torch
from torch import nn

from ..config import MethodConfig
from ..core import AnnexDelta, Host

POSITION_TABLES = ("position_embeddings", "position_embedding", "wpe", "embed_positions")


def token_embedding(model: nn.Module) -> nn.Embedding:
    """The model's input token embedding (the layer a Host wraps, if one does)."""
    getter = getattr(model, "get_input_embeddings", None)
    emb = getter() if callable(getter) else None
    base = emb.base if isinstance(emb, Host) else emb
    if not isinstance(base, nn.Embedding):
        raise ValueError(f"soft prompts go in front of a transformers model's input embeddings; "
                         f"{type(model).__name__} has no get_input_embeddings() giving an nn.Embedding")
    return base


def forward_names(model: nn.Module) -> list[str]:
    return [n for n, p in inspect.signature(model.forward).parameters.items()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def position_table(model: nn.Module) -> tuple[int | None, bool]:
    """(the model's position-table size or None, whether it is a learned table that n + L must fit)."""
    config = getattr(model, "config", None)
    size = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not isinstance(size, int):
        return None, False
    learned = any(isinstance(m, nn.Embedding) and name.rsplit(".", 1)[-1] in POSITION_TABLES
                  and m.num_embeddings == size for name, m in model.named_modules())
    return size, learned


@dataclasses.dataclass
class SoftPrompt(MethodConfig):
    """Shared settings: ``num_virtual_tokens`` (n). The site is the model itself; ``target`` is not used."""

    category: ClassVar[str] = "prompt"
    site_kind: ClassVar[str] = "annex"
    components: ClassVar[tuple[str, ...]] = ("text_encoder",)

    num_virtual_tokens: int = 8

    def __post_init__(self):
        super().__post_init__()
        n = self.num_virtual_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{type(self).__name__} num_virtual_tokens must be a positive integer, got {n!r}")
        if self.target is not None:
            raise ValueError(f"{type(self).__name__} goes on the model itself: leave target unset")

    def resolved(self, model: nn.Module) -> "SoftPrompt":
        return self

    def select(self, model: nn.Module) -> list[str]:
        return [""]


class SoftPromptDelta(AnnexDelta):
    """n virtual tokens in front of the input embeddings of ``model`` (the annexed model). Subclasses define
    ``prompt()`` -> P [n, d]."""

    category = "prompt"
    mergeable = False

    def __init__(self, config: SoftPrompt, site: str, model: nn.Module):
        super().__init__(config, site)
        emb = token_embedding(model)
        self.n, self.width = config.num_virtual_tokens, emb.embedding_dim
        self.table, self.learned_table = position_table(model)
        if self.table is not None and self.n >= self.table:
            raise ValueError(f"a prompt of {self.n} virtual tokens does not fit {type(model).__name__}'s position "
                             f"table of {self.table} positions (it must leave room for the input)")
        names = forward_names(model)
        if "inputs_embeds" not in names and "input_ids" not in names:
            raise ValueError(f"{type(model).__name__}.forward takes neither input_ids nor inputs_embeds: soft "
                             "prompts cannot reach its input")
        self.embeds_path = "inputs_embeds" in names
        eos = getattr(getattr(model, "config", None), "eos_token_id", None)
        self.placeholder = 1 if eos == 0 else 0  # never CLIP's end-of-text id (its pooling looks for it)
        self.encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        self.pending: list = []  # one-call embedding hooks of the placeholder path

    def prompt(self) -> torch.Tensor:
        raise NotImplementedError

    def param_dtype(self, model: nn.Module) -> torch.dtype:
        dtype = token_embedding(model).weight.dtype
        return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

    def check_prompt(self, t: torch.Tensor, what: str) -> None:
        """A ValueError naming both sides when ``t`` is not an [n, d] prompt for this model."""
        if t.ndim != 2 or tuple(t.shape) != (self.n, self.width):
            raise ValueError(f"{what} is a prompt of shape {tuple(t.shape)}; this adapter needs {self.n} virtual "
                             f"tokens of the model's width {self.width}, i.e. ({self.n}, {self.width})")

    def fit_file(self, tensors: dict) -> None:
        if "prompt_embeddings" in tensors:
            self.check_prompt(tensors["prompt_embeddings"], "the file's prompt_embeddings")

    def pre(self, module, args, kwargs, weight):
        names = forward_names(module)
        kw = {**dict(zip(names, args)), **kwargs}
        if self.encoder_decoder and kw.get("encoder_outputs") is not None:
            raise ValueError("soft prompts go in front of the encoder's input in this model's own forward; these "
                             "encoder_outputs were computed without it (generate runs the encoder directly): "
                             "seq2seq generation is not supported, call the model with input_ids")
        past = kw.get("past_key_values")
        if past is not None and (past.get_seq_length() if hasattr(past, "get_seq_length") else len(past)) > 0:
            raise ValueError("soft prompts run on whole sequences: this call continues a key/value cache "
                             "(generate with use_cache=True); pass use_cache=False")
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        x = embeds if embeds is not None else ids
        if x is None:
            return None
        if x.dim() != (3 if embeds is not None else 2):
            raise ValueError(f"soft prompts need batched inputs [B, L]; got input of shape {tuple(x.shape)}")
        b, length, n = x.shape[0], x.shape[1], self.n
        if self.learned_table and n + length > self.table:
            raise ValueError(f"{n} virtual tokens + {length} input tokens = {n + length} positions, more than "
                             f"{type(module).__name__}'s position table of {self.table}")
        p = self.prompt()
        p = p * weight if weight != 1.0 else p
        if self.embeds_path:
            if embeds is None:
                embeds = module.get_input_embeddings()(ids)
            kw.pop("input_ids", None)
            kw["inputs_embeds"] = torch.cat([p.to(embeds.dtype).expand(b, -1, -1), embeds], 1)
        else:
            self.drop_pending()  # a hook left by a call that failed before its embedding ran
            kw["input_ids"] = torch.cat([ids.new_full((b, n), self.placeholder), ids], 1)
            self._swap_rows(module, p, length + n)
        mask = kw.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError(f"soft prompts extend 2-d attention masks [B, L]; got {tuple(mask.shape)}")
            kw["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], 1)
        types = kw.get("token_type_ids")
        if types is not None:
            kw["token_type_ids"] = torch.cat([types.new_zeros(types.shape[0], n), types], 1)
        for key in ("position_ids", "cache_position"):
            pos = kw.get(key)
            if pos is not None:
                head = torch.arange(n, device=pos.device, dtype=pos.dtype).expand(*pos.shape[:-1], n)
                kw[key] = torch.cat([head, pos + n], -1)
        labels = kw.get("labels")
        if labels is not None and not self.encoder_decoder and labels.dim() == 2 and labels.shape[1] == length:
            kw["labels"] = torch.cat([labels.new_full((labels.shape[0], n), -100), labels], 1)
        return (), kw

    def _swap_rows(self, module, p: torch.Tensor, after: int) -> None:
        """Placeholder path: the token embedding's next output gets P at this prompt's placeholders (``after``:
        the ids' length once they were prepended, so prompts prepended later shift ours right)."""
        n = self.n

        def swap(_, __, out):
            handle.remove()
            self.pending.remove(handle)
            at = out.shape[1] - after
            rows = p.to(out.dtype).expand(out.shape[0], -1, -1)
            return torch.cat([out[:, :at], rows, out[:, at + n:]], 1)

        handle = module.get_input_embeddings().register_forward_hook(swap)
        self.pending.append(handle)

    def drop_pending(self) -> None:
        while self.pending:
            self.pending.pop().remove()

    def post(self, module, args, kwargs, output, weight):
        self.drop_pending()  # the embedding never ran (inputs_embeds given): no hook outlives its call
        return None

    def detach(self, site) -> None:
        self.drop_pending()
