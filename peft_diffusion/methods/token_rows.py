"""New tokens for text encoders: the tokenizer side and the embedding rows that serve them.

Shared by the token methods (textual inversion, ED-LoRA). A tokenizer is not an ``nn.Module``, so it never
lives in the module tree: a pipeline pairs ``text_encoder`` with ``tokenizer`` (``text_encoder_2`` with
``tokenizer_2``...), and a lone text encoder gets its tokenizer with ``set_tokenizer``. The new rows live in a
``TokenRows`` delta at the text encoder's token embedding (the Host is the only structural change): it maps
its token ids to a valid id before the base embedding runs and puts its own vectors at those positions.
Tokens are added to the tokenizer when the delta is placed and removed exactly when it leaves.

API: ``set_tokenizer``, ``find_tokenizer``, ``input_embedding``, ``vector_tokens``, ``expand_prompt``,
``token_ids``, ``init_word_ids``, ``add_tokens``, ``remove_tokens``, ``TokenRows``.
"""
from __future__ import annotations

import json
import logging

import torch
from torch import nn

from ..core import Delta, Host

logger = logging.getLogger(__name__)

_ATTR = "peft_diffusion_tokenizer"  # where ``set_tokenizer`` keeps a lone model's tokenizer (a plain attribute)


def set_tokenizer(model: nn.Module, tokenizer) -> nn.Module:
    """Pair a lone text encoder with its tokenizer, for token methods injected into the model alone."""
    check_tokenizer(tokenizer)
    setattr(model, _ATTR, tokenizer)
    return model


def find_tokenizer(obj, model: nn.Module):
    """The tokenizer of ``model``: its pipeline's (``text_encoder_N`` <-> ``tokenizer_N``) or the one set with
    ``set_tokenizer``; None when it has none."""
    comps = getattr(obj, "components", None)
    if obj is not model and isinstance(comps, dict):
        for name, module in comps.items():
            if module is model and name.startswith("text_encoder"):
                tokenizer = comps.get("tokenizer" + name[len("text_encoder"):])
                if tokenizer is not None:
                    return check_tokenizer(tokenizer)
    return getattr(model, _ATTR, None)


def check_tokenizer(tokenizer):
    # tokens are removed by rewriting the Rust tokenizer's added-token table: only tokenizers-backed ones work
    backend = getattr(tokenizer, "_tokenizer", None)
    if not hasattr(backend, "to_str") or not hasattr(tokenizer, "add_tokens"):
        raise TypeError(f"{type(tokenizer).__name__} is not a tokenizers-backed (fast) transformers tokenizer: "
                        "new tokens could not be removed exactly")
    return tokenizer


def input_embedding(model: nn.Module) -> str:
    """Qualified name of the model's token embedding (``model.get_input_embeddings()``), Host or not."""
    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if getter is not None else None
    for name, module in model.named_modules():
        if embedding is not None and module is embedding:
            base = module.base if isinstance(module, Host) else module
            if isinstance(base, nn.Embedding):
                return name
    raise ValueError(f"cannot find the token embedding of {type(model).__name__}: pass "
                     "target=Target(include=('<its name>',), types=('Embedding',))")


def vector_tokens(token: str, n: int) -> list[str]:
    """diffusers' names for the ``n`` vectors of one token: ``tok, tok_1, ..., tok_{n-1}``."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def expand_prompt(prompt: str, tokenizer) -> str:
    """Write each multi-vector token of ``prompt`` out as ``tok tok_1 ... tok_{n-1}`` (what diffusers'
    ``maybe_convert_prompt`` does in the pipelines; trainers that tokenize prompts themselves need it)."""
    added = tokenizer.get_added_vocab()
    for token in dict.fromkeys(tokenizer.tokenize(prompt)):
        if token in added and f"{token}_1" in added:
            n = 1
            while f"{token}_{n}" in added:
                n += 1
            prompt = prompt.replace(token, " ".join(vector_tokens(token, n)))
    return prompt


def token_ids(tokenizer, tokens: list[str]) -> list[int | None]:
    """The id each token already has, None for new ones. A word the tokenizer makes into one vocabulary
    token exists too: CLIP's "cat" is "cat</w>" (an added "cat" would take over every "cat" in prompts)."""
    vocab = tokenizer.get_vocab()
    out = []
    for t in tokens:
        pieces = [t] if t in vocab else tokenizer.tokenize(t)
        out.append(vocab[pieces[0]] if len(pieces) == 1 and pieces[0] in vocab else None)
    return out


def init_word_ids(tokenizer, word: str, base: nn.Embedding) -> list[int]:
    """The base-vocabulary ids of ``word``, whose rows initialise new token vectors (``init_word``)."""
    if tokenizer is None:
        raise ValueError("init_word needs the text encoder's tokenizer: inject into the pipeline, or call "
                         "peft_diffusion.methods.token_rows.set_tokenizer(text_encoder, tokenizer) first")
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if ids and max(ids) >= base.num_embeddings:
        raise ValueError(f"init_word {word!r} holds added tokens the base embedding lacks")
    return ids


def add_tokens(tokenizer, tokens: list[str]) -> list[str]:
    """Add the tokens the tokenizer lacks (as diffusers does: plain added tokens); returns those added."""
    new = [t for t, i in zip(tokens, token_ids(tokenizer, tokens)) if i is None]
    tokenizer.add_tokens(new)
    for t in new:
        if tokenizer.tokenize(t) != [t]:  # e.g. upper case under CLIP's lower-casing normalizer
            logger.warning("token %r does not survive %s's normalization: prompts cannot name it",
                           t, type(tokenizer).__name__)
    return new


def remove_tokens(tokenizer, tokens: list[str]) -> None:
    """Remove added tokens. Later added tokens move down to close the gap (the Rust added vocabulary is
    contiguous); removing the last added ones restores the tokenizer exactly."""
    if not tokens:
        return
    backend = check_tokenizer(tokenizer)._tokenizer
    state = json.loads(backend.to_str())
    gone = set(tokens)
    state["added_tokens"] = [t for t in state["added_tokens"] if t["content"] not in gone]
    tokenizer._tokenizer = type(backend).from_str(json.dumps(state))


class TokenRows(Delta):
    """New rows of a token embedding: ``emb_params[i]`` is the vector of ``tokens[i]`` (times the adapter
    weight). Without a tokenizer the tokens get ids from the embedding's size upward, after the ids other
    ``TokenRows`` of the same Host serve.
    """

    category = "prompt"
    edits_input = True

    def __init__(self, config, site: str, base: nn.Embedding, tokens: list[str], tokenizer=None,
                 rows: torch.Tensor | None = None):
        super().__init__(config, site)
        dtype = base.weight.dtype
        dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype  # train half models in fp32
        shape = (len(tokens), base.embedding_dim)
        if rows is None:  # to be loaded (``load_state_dict(assign=True)``)
            rows = torch.empty(shape, device="meta", dtype=dtype)
        elif tuple(rows.shape) != shape:
            raise ValueError(f"{site}: {len(tokens)} token vectors of width {base.embedding_dim} expected, "
                             f"got shape {tuple(rows.shape)}")
        else:
            rows = rows.detach().to(base.weight.device, dtype).clone()
        self.emb_params = nn.Parameter(rows)
        self.tokens = list(tokens)
        self.tokenizer = tokenizer
        self.added: list[str] = []  # tokens this delta put into the tokenizer (removed with it)
        self.token_ids: list[int] = []
        self.register_buffer("ids", torch.empty(0, dtype=torch.long, device=base.weight.device), persistent=False)

    def _set_ids(self, ids: list[int]) -> None:
        self.token_ids = [int(i) for i in ids]
        self.ids = torch.tensor(self.token_ids, dtype=torch.long, device=self.ids.device)

    def _siblings(self, host: Host) -> list["TokenRows"]:
        return [d for d in host.deltas.values() if isinstance(d, TokenRows) and d is not self]

    def attach(self, host: Host) -> None:
        if self.tokenizer is None:
            taken = [i for d in self._siblings(host) for i in d.token_ids]
            start = max([host.base.num_embeddings - 1, *taken]) + 1
            self._set_ids(list(range(start, start + len(self.tokens))))
            return
        self.added = add_tokens(self.tokenizer, self.tokens)
        self._set_ids(token_ids(self.tokenizer, self.tokens))

    def detach(self, host: Host) -> None:
        if self.tokenizer is None or not self.added:
            return
        siblings = [d for d in self._siblings(host) if d.tokenizer is self.tokenizer]
        kept = set()
        for d in siblings:  # a token another delta still serves stays, and that delta now owns it
            shared = [t for t in self.added if t in d.tokens]
            d.added += [t for t in shared if t not in d.added]
            kept.update(shared)
        before = self.tokenizer.get_added_vocab()
        remove_tokens(self.tokenizer, [t for t in self.added if t not in kept])
        self.added = []
        for d in siblings:
            d._set_ids(token_ids(self.tokenizer, d.tokens))
        ours = {t for d in siblings for t in d.tokens}
        moved = [t for t, i in self.tokenizer.get_added_vocab().items() if before[t] != i and t not in ours]
        if moved:
            logger.warning("removing %s's tokens moved the ids of tokens added after them: %s", self.site, moved)

    def _hits(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(-1) == self.ids  # [..., n]: which of our tokens each position holds

    def edit_input(self, base, x, weight):
        # the base embedding may lack our ids: it embeds id 0 there, and forward puts our rows over it
        return x.masked_fill(self._hits(x).any(-1), 0)

    def forward(self, base, x, out, weight):
        hits = self._hits(x)
        # one-hot @ rows: the vector of the token at each position (each id is ours at most once); the
        # product keeps emb_params in the graph even when no position holds our tokens
        rows = hits.to(self.emb_params.dtype) @ self.emb_params
        if weight != 1.0:
            rows = rows * weight
        return torch.where(hits.any(-1, keepdim=True), rows.to(out.dtype), out)

    def extra_repr(self) -> str:
        return f"tokens={self.tokens}, ids={self.token_ids}"
