"""CoOp — Zhou et al., "Learning to Prompt for Vision-Language Models" (Context Optimization), arXiv 2109.01134.

Eq. (2)-(3): the prompt of class i is t_i = [V]_1 [V]_2 ... [V]_M [CLASS_i], M learned context vectors of the
text tower's token-embedding width in front of the class name's token embeddings (here with CLIP's start
token before and "." + end token after, as the released code builds "X X ... X classname."); the class
feature g(t_i) is the text tower's output for it, and
    p(y = i | x) = exp(cos(g(t_i), f) / tau) / sum_j exp(cos(g(t_j), f) / tau),  1 / tau = CLIP's logit scale,
f the image feature. Unified context (one [M, width] shared by all classes, the default) or class-specific
context (``class_specific=True``: [classes, M, width]). Context init: N(0, 0.02^2) as the paper, or the token
embeddings of ``init_text`` (its token count must be M). Only the "end" class-token position is built.

Trained: the context only (16 x 512 = 8,192 numbers on CLIP ViT-B/16's text width 512;
tests/test_clip_heads.py builds it on the meta device). Saved: ``ctx`` with the class names and config.
Does not merge (a prompt, not a weight change).

Where it lives: a classifier object around the frozen CLIPModel (``clip_heads.CLIPHead``: why not an injected
method is said there), not an annex on the text tower, because the context goes at known positions of
prompts the method builds itself, one per class, and the class logits are the method's output. The context
reaches the text tower through a forward hook on its token embedding (``text_model.embeddings.
token_embedding``; a Host there works too) that lives only while ``text_features`` runs: it overwrites
positions 1..M (placeholders holding the start token's id, which keeps CLIP's end-token pooling right) with
the context.
"""
from __future__ import annotations

import torch
from torch import nn

from .clip_heads import CLIPHead, frozen, raw_features


class CoOp(CLIPHead):
    """Learned context in front of each class name. ``n_ctx``: M; ``class_specific``: one context per class;
    ``init_text``: initialise the context from this text's token embeddings (M tokens)."""

    method = "coop"

    def __init__(self, clip: nn.Module, tokenizer, classnames, n_ctx: int = 16, class_specific: bool = False,
                 init_text: str | None = None, seed: int | None = None):
        super().__init__(clip, tokenizer, classnames)
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1:
            raise ValueError(f"CoOp n_ctx must be a positive integer, got {n_ctx!r}")
        self.n_ctx, self.class_specific, self.init_text = n_ctx, bool(class_specific), init_text
        embedding = clip.text_model.embeddings.token_embedding
        weight = getattr(embedding, "base", embedding).weight
        width = weight.shape[1]
        self.register_buffer("ids", self._prompt_ids(), persistent=False)
        shape = (len(self.classnames), n_ctx, width) if self.class_specific else (n_ctx, width)
        if init_text is not None:
            init = tokenizer(init_text, add_special_tokens=False).input_ids
            if len(init) != n_ctx:
                raise ValueError(f"CoOp init_text {init_text!r} is {len(init)} tokens but n_ctx is {n_ctx}")
            with torch.no_grad():
                ctx = weight[torch.tensor(init, device=weight.device)].float().expand(shape).clone()
        else:
            gen = torch.Generator().manual_seed(seed) if seed is not None else None
            ctx = (torch.randn(shape, generator=gen) * 0.02).to(weight.device) if weight.device.type != "meta" \
                else torch.empty(shape, device="meta")
        self.ctx = nn.Parameter(ctx)

    def _prompt_ids(self) -> torch.Tensor:
        tok, limit = self.tokenizer, self.clip.config.text_config.max_position_embeddings
        bos, eos = tok.bos_token_id, tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        rows = []
        for name in self.classnames:
            row = [bos] + [bos] * self.n_ctx + tok(f"{name}.", add_special_tokens=False).input_ids + [eos]
            if len(row) > limit:
                raise ValueError(f"CoOp prompt for class {name!r} is {len(row)} tokens (start, {self.n_ctx} "
                                 f"context, name and '.', end) but the text tower has {limit} positions: use "
                                 f"a smaller n_ctx or a shorter name")
            rows.append(row + [pad] * (limit - len(row)))
        return torch.tensor(rows, device=self.clip.logit_scale.device)

    def config(self) -> dict:
        return {"n_ctx": self.n_ctx, "class_specific": self.class_specific, "init_text": self.init_text}

    def text_features(self) -> torch.Tensor:
        """Raw class text features [classes, projection_dim], differentiable in the context."""
        ids = self.ids
        mask = torch.ones_like(ids)  # causal attention: positions after the end token never reach its output
        ctx = self.ctx if self.class_specific else self.ctx.expand(len(ids), -1, -1)

        def put_context(module, args, out):
            return torch.cat([out[:, :1], ctx.to(out.dtype), out[:, 1 + self.n_ctx:]], dim=1)

        handle = self.clip.text_model.embeddings.token_embedding.register_forward_hook(put_context)
        try:
            with frozen(self.clip):
                return raw_features(self.clip.get_text_features(input_ids=ids, attention_mask=mask))
        finally:
            handle.remove()

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        text = nn.functional.normalize(self.text_features(), dim=-1)
        image = nn.functional.normalize(features.to(text.dtype), dim=-1)
        return self.logit_scale() * image @ text.T
