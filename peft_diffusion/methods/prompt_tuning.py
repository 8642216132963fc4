"""Prompt tuning — Lester et al., "The Power of Scale for Parameter-Efficient Prompt Tuning", arXiv 2104.08691.

Sec. 2: a frozen model computes Pr_theta(Y | X); prompt tuning learns P_e in R^{n x d} and conditions on the
concatenation [P_e; X_e] in R^{(n + L) x d} of the prompt and the embedded input, maximising
Pr_{theta; theta_P}(Y | [P; X]) with only theta_P = P_e trained. How the prompt reaches the model (the input
rewrite, the attention mask, labels and positions, CLIP's placeholder path, the limits): ``soft_prompt.py``.

Init (Sec. 2.2 / peft's ``PromptTuningInit``): ``"random"`` N(0, s^2) with s the std of the model's token
embedding (the paper draws uniform in [-0.5, 0.5]; matching the embeddings' scale keeps the input in range for
any model); ``"vocab"``: rows of n token ids drawn uniformly from the vocabulary (the paper draws from the
5,000 most common tokens, peft from all); ``"text"``: the rows of ``init_text``'s tokens, cycled or cut to n
(as peft's TEXT init; the text's own tokens, without the tokenizer's special tokens, which peft includes). The
tokenizer comes from the pipeline or from ``token_rows.set_tokenizer(model, tokenizer)``.

Trained: ``prompt_embeddings`` [n, d] (T5-XXL, n = 5: 5 x 4096 = 20,480, the paper's count; tests/
test_soft_prompts.py). Saved: ``prompt_embeddings`` natively; ``io/peft_prompt.py`` writes and reads peft's
``adapter_model.safetensors`` + ``adapter_config.json`` (same key). Not mergeable, not the identity at init.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from ..registry import register_method
from .soft_prompt import SoftPrompt, SoftPromptDelta, token_embedding
from .token_rows import find_tokenizer

INITS = ("random", "vocab", "text")


@register_method("prompt-tuning")
@dataclasses.dataclass
class PromptTuning(SoftPrompt):
    """n = ``num_virtual_tokens`` trainable input embeddings in front of the input; ``init`` one of ``INITS``
    (``"text"`` needs ``init_text``)."""

    param_names: ClassVar[tuple[str, ...]] = ("prompt_embeddings",)
    _tokenizer = None  # set on the copy ``bind`` returns (configs hold no live objects)

    init: str = "random"
    init_text: str | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.init not in INITS:
            raise ValueError(f"PromptTuning init must be one of {INITS}, got {self.init!r}")
        if self.init == "text" and (not isinstance(self.init_text, str) or not self.init_text.strip()):
            raise ValueError(f"PromptTuning init='text' needs a non-empty init_text, got {self.init_text!r}")
        if self.init != "text" and self.init_text is not None:
            raise ValueError(f"PromptTuning init_text is used by init='text' only (init is {self.init!r})")

    def bind(self, obj, model: nn.Module, name: str) -> "PromptTuning":
        if self.init != "text":
            return self
        bound = dataclasses.replace(self)
        bound._tokenizer = find_tokenizer(obj, model)
        return bound

    def build(self, base: nn.Module, site: str, init: bool = True) -> "PromptTuningDelta":
        delta = PromptTuningDelta(self, site, base)
        if init:
            delta.prompt_embeddings.data = self.initial_rows(base).to(delta.prompt_embeddings.dtype)
        return delta

    @torch.no_grad()
    def initial_rows(self, model: nn.Module) -> torch.Tensor:
        weight, n = token_embedding(model).weight, self.num_virtual_tokens
        if self.init == "random":
            return torch.randn(n, weight.shape[1], device=weight.device) * weight.float().std()
        if self.init == "vocab":
            ids = torch.randint(0, weight.shape[0], (n,), device=weight.device)
        else:
            if self._tokenizer is None:
                raise ValueError("PromptTuning init='text' needs the model's tokenizer: inject into the pipeline, or "
                                 "call peft_diffusion.methods.token_rows.set_tokenizer(model, tokenizer) first")
            found = self._tokenizer(self.init_text, add_special_tokens=False).input_ids
            if not found:
                raise ValueError(f"PromptTuning init_text {self.init_text!r} tokenizes to nothing with "
                                 f"{type(self._tokenizer).__name__}: give a text with at least one token")
            if max(found) >= weight.shape[0]:
                raise ValueError(f"PromptTuning init_text {self.init_text!r} holds token ids up to {max(found)}, "
                                 f"past the model's {weight.shape[0]} embedding rows")
            ids = torch.tensor((found * n)[:n], device=weight.device)
        return weight[ids].float().clone()


class PromptTuningDelta(SoftPromptDelta):
    """P = ``prompt_embeddings`` [n, d], a plain parameter."""

    def __init__(self, config: PromptTuning, site: str, model: nn.Module):
        super().__init__(config, site, model)
        ref = token_embedding(model).weight
        self.prompt_embeddings = nn.Parameter(torch.empty(self.n, self.width, device=ref.device,
                                                          dtype=self.param_dtype(model)))

    def prompt(self) -> torch.Tensor:
        return self.prompt_embeddings
