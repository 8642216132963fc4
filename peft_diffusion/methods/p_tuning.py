"""P-tuning — Liu et al., "GPT Understands, Too", arXiv 2103.10385.

Sec. 3.2: the virtual tokens' embeddings are not free parameters but the output of a prompt encoder over m
trainable inputs h_0..h_m: h_i = MLP([LSTM(h_{0:i}) : LSTM(h_{i:m})]) (a bidirectional LSTM, then an MLP),
which the paper finds trains more stably than free embeddings. The template {[P_0:i], x, [P_i+1:m], y} is
reduced here, as in peft, to all virtual tokens in front of the input: [h(P); X_e]; how they reach the model:
``soft_prompt.py``. Two encoders, with peft's layout and names (``PromptEncoderConfig``): ``"mlp"`` (peft's
default: Linear(d, h), ReLU, Linear(h, h), ReLU, Linear(h, d) on each input) and ``"lstm"`` (the paper's:
bidirectional LSTM of hidden size h and ``encoder_num_layers`` layers, then Linear(2h, 2h), ReLU,
Linear(2h, d)); h = ``encoder_hidden_size`` (default d).

Trained: ``embedding.weight`` [n, d] and the encoder (``mlp_head.*``, ``lstm_head.*``). After training,
``fold(model, name)`` runs the encoder once and keeps only its output as ``prompt_embeddings`` [n, d]: the same
prompt, with the encoder gone (the saved form for inference; peft saves the same). Saved natively: whichever
form the adapter is in (the encoder form resumes training; loading a file of ``prompt_embeddings`` gives the
folded form); ``io/peft_prompt.py`` always writes the folded prompt, as peft's ``P_TUNING`` files hold. Not
mergeable into the model, not the identity at init.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from ..registry import register_method
from .soft_prompt import SoftPrompt, SoftPromptDelta, token_embedding

ENCODERS = ("mlp", "lstm")


@register_method("p-tuning")
@dataclasses.dataclass
class PTuning(SoftPrompt):
    """n = ``num_virtual_tokens`` virtual tokens made by a prompt encoder (``encoder``: "mlp" or "lstm")."""

    param_names: ClassVar[tuple[str, ...]] = ("prompt_embeddings", "embedding.weight", "mlp_head.", "lstm_head.")

    encoder: str = "mlp"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.encoder not in ENCODERS:
            raise ValueError(f"PTuning encoder must be one of {ENCODERS}, got {self.encoder!r}")
        for field in ("encoder_hidden_size", "encoder_num_layers"):
            v = getattr(self, field)
            if not (v is None and field == "encoder_hidden_size") and (isinstance(v, bool) or not isinstance(v, int)
                                                                         or v < 1):
                raise ValueError(f"PTuning {field} must be a positive integer, got {v!r}")
        if not isinstance(self.encoder_dropout, (int, float)) or not 0.0 <= self.encoder_dropout < 1.0:
            raise ValueError(f"PTuning encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}")

    def build(self, base: nn.Module, site: str, init: bool = True) -> "PTuningDelta":
        return PTuningDelta(self, site, base, init)


class PTuningDelta(SoftPromptDelta):
    """P = encoder(``embedding.weight``), or the stored ``prompt_embeddings`` once folded."""

    def __init__(self, config: PTuning, site: str, model: nn.Module, init: bool = True):
        super().__init__(config, site, model)
        ref = token_embedding(model).weight
        kw = dict(device=ref.device if init else "meta", dtype=self.param_dtype(model))
        d, h = self.width, config.encoder_hidden_size or self.width
        self.embedding = nn.Embedding(self.n, d, **kw)
        self.lstm_head = None
        if config.encoder == "lstm":
            self.lstm_head = nn.LSTM(d, h, num_layers=config.encoder_num_layers, dropout=config.encoder_dropout,
                                     bidirectional=True, batch_first=True, **kw)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h, **kw), nn.ReLU(), nn.Linear(2 * h, d, **kw))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(d, h, **kw), nn.ReLU(), nn.Linear(h, h, **kw), nn.ReLU(),
                                          nn.Linear(h, d, **kw))
        self.prompt_embeddings = None  # the folded form

    @property
    def folded(self) -> bool:
        return self.prompt_embeddings is not None

    def prompt(self) -> torch.Tensor:
        if self.folded:
            return self.prompt_embeddings
        x = self.embedding.weight.unsqueeze(0)
        if self.lstm_head is not None:
            x = self.lstm_head(x)[0]
        return self.mlp_head(x)[0]

    @torch.no_grad()
    def fold(self) -> None:
        """Keep the encoder's output as ``prompt_embeddings`` and drop the encoder (the same prompt)."""
        if self.folded:
            return
        self._to_folded(self.prompt().detach().clone())

    def _to_folded(self, rows: torch.Tensor) -> None:
        grad = self.embedding.weight.requires_grad
        del self.embedding, self.mlp_head, self.lstm_head
        self.embedding = self.mlp_head = self.lstm_head = None
        self.prompt_embeddings = nn.Parameter(rows, requires_grad=grad)

    def fit_file(self, tensors: dict) -> None:
        super().fit_file(tensors)
        if "prompt_embeddings" in tensors and not self.folded:
            if len(tensors) > 1:
                raise ValueError(f"holds both a folded prompt (prompt_embeddings) and encoder tensors "
                                 f"{sorted(k for k in tensors if k != 'prompt_embeddings')[:3]}")
            self._to_folded(torch.empty(self.n, self.width, device="meta", dtype=self.embedding.weight.dtype))


def fold(obj, name: str = "default") -> int:
    """Fold P-tuning adapter ``name``'s prompt encoder into plain prompt embeddings; returns how many sites."""
    from ..api import sites

    done = 0
    for _, site in sites(obj):
        delta = site.deltas[name] if name in site.deltas else None
        if isinstance(delta, PTuningDelta):
            delta.fold()
            done += 1
    if not done:
        raise ValueError(f"no P-tuning adapter named {name!r} here")
    return done
