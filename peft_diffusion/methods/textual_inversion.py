"""Textual Inversion — Gal et al., "An Image is Worth One Word: Personalizing Text-to-Image Generation
using Textual Inversion", arXiv 2208.01618.

Eq. (2): v* = argmin_v E[ || eps - eps_theta(z_t, t, c_theta(y_v)) ||^2 ]: a new pseudo-word S* gets an
embedding v in the text encoder's token-embedding space and only v is optimised; the generator and the
text encoder stay frozen. Here a token may have several vectors (diffusers' ``tok, tok_1, ...``, expanded in
prompts by the pipelines' ``maybe_convert_prompt``), initialised from a word's embedding (one token for all
vectors, or one token per vector), from the token's own row when it already exists (``overwrite``), or
N(0, std of the embedding) otherwise.

Trained: ``emb_params`` [num_vectors, width] (768 numbers per vector on SD1.5's CLIP ViT-L/14). Saved: the
same, as ``emb_params`` (native), ``learned_embeds`` (format="diffusers") or A1111 files (format="a1111").
Does not merge: tokens stay tokens, ``fuse`` raises. The adapter weight scales the vectors.

Where it goes: the text encoder (``components``), at its token embedding, wrapped by a Host whose
``TokenRows`` delta (``tokens.py``) serves the new ids. The tokenizer comes from the pipeline
(``text_encoder_N`` <-> ``tokenizer_N``) or, for a lone text encoder, from ``tokens.set_tokenizer``; without
one the tokens are ids from the embedding's size upward and ``init_word`` is unavailable. ``token`` defaults
to the adapter name, so loading an embedding file with ``name=`` names its token.
"""
from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from ..config import MethodConfig
from ..registry import register_method
from ..target import Target
from .token_rows import TokenRows, find_tokenizer, init_word_ids, input_embedding, token_ids, vector_tokens

logger = logging.getLogger(__name__)


@register_method("textual-inversion")
@dataclasses.dataclass
class TextualInversion(MethodConfig):
    """New token ``token`` with ``num_vectors`` trainable vectors in the text encoder's token embedding.

    overwrite: a token that already exists keeps its id and is served by this adapter (else an error).
    """

    category = "prompt"
    param_names = ("emb_params",)
    components = ("text_encoder",)
    _tokenizer = None  # set on the copy ``bind`` returns (not a field: configs hold no live objects)

    token: str | None = None
    num_vectors: int = 1
    init_word: str | None = None
    overwrite: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.token is not None and (not isinstance(self.token, str) or not self.token.strip()
                                       or self.token != self.token.strip()):
            raise ValueError(f"TextualInversion token must be a non-empty string without surrounding spaces, "
                             f"got {self.token!r}")
        if isinstance(self.num_vectors, bool) or not isinstance(self.num_vectors, int) or self.num_vectors < 1:
            raise ValueError(f"TextualInversion num_vectors must be a positive integer, got {self.num_vectors!r}")
        if self.init_word is not None and (not isinstance(self.init_word, str) or not self.init_word.strip()):
            raise ValueError(f"TextualInversion init_word must be a non-empty string or None, got {self.init_word!r}")
        if not isinstance(self.overwrite, bool):
            raise ValueError(f"TextualInversion overwrite must be True or False, got {self.overwrite!r}")

    def bind(self, obj, model: nn.Module, name: str) -> "TextualInversion":
        target = self.target if self.target is not None else Target(include=(input_embedding(model),),
                                                                    types=("Embedding",))
        bound = dataclasses.replace(self, token=self.token or name, target=target)
        bound._tokenizer = find_tokenizer(obj, model)
        return bound

    def build(self, base: nn.Module, site: str, init: bool = True) -> TokenRows:
        if not isinstance(base, nn.Embedding):
            raise TypeError(f"textual inversion goes into a token embedding (nn.Embedding), {site} is a "
                            f"{type(base).__name__}")
        if self.token is None:
            raise ValueError("TextualInversion needs a token: set token=... (inject and load_adapter use the "
                             "adapter name when it is unset)")
        tokens = vector_tokens(self.token, self.num_vectors)
        tokenizer = self._tokenizer
        ids = token_ids(tokenizer, tokens) if tokenizer is not None else [None] * len(tokens)
        existing = [t for t, i in zip(tokens, ids) if i is not None]
        if existing and not self.overwrite:
            raise ValueError(f"tokens {existing} already exist in the tokenizer's vocabulary: pick another token "
                             f"(or load with name=...), or pass overwrite=True to serve them from this adapter")
        if self.num_vectors > 1 and ids[0] is not None and self.token not in tokenizer.get_added_vocab():
            logger.warning("%r is a vocabulary word, not an added token: prompts do not expand it to its %d "
                           "vectors; write them out (%s)", self.token, self.num_vectors, " ".join(tokens))
        rows = self._initial_rows(base, tokenizer, ids) if init else None
        return TokenRows(self, site, base, tokens, tokenizer, rows)

    @torch.no_grad()
    def _initial_rows(self, base: nn.Embedding, tokenizer, ids: list[int | None]) -> torch.Tensor:
        weight, n = base.weight, len(ids)
        if self.init_word is not None:
            init = init_word_ids(tokenizer, self.init_word, base)
            if len(init) not in (1, n):
                raise ValueError(f"init_word {self.init_word!r} is {len(init)} tokens: it must be 1 token, or one "
                                 f"token per vector ({n})")
            return weight[init].float().expand(n, -1).clone()
        rows = torch.randn(n, base.embedding_dim, device=weight.device) * weight.float().std()
        for k, i in enumerate(ids):  # an overwritten token starts where it is
            if i is not None and i < base.num_embeddings:
                rows[k] = weight[i].float()
        return rows
