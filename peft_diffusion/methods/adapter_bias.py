"""AdapterBias — Fu, Chen, Lee, Lee, "AdapterBias: Parameter-efficient Token-dependent Representation Shift for
Adapters in NLP Tasks", arXiv 2205.00305.

A token-dependent shift of each block's feed-forward output, B = v (x) alpha^T: per token i
h_i <- h_i + alpha_i v with alpha_i = L_alpha(r_i) = r_i w_alpha + b_alpha, v in R^d a learned vector and
L_alpha a linear layer to one output. The equation as the published code computes it (``BertOutput`` in its
``src/transformers/models/bert/modeling_bert.py``): r_i is the representation entering the feed-forward's
second projection (the d_ff-wide intermediate, ``nn.Linear(intermediate_size, 1)``), and the shift is added
to that projection's output before the block's residual (and BERT's LayerNorm). ``alpha_from="output"``
reads alpha_i from the projection's output h_i instead (a d -> 1 layer, the form issue 13 quotes).

Where: an Annex on the output projection of every feed-forward sub-layer that Pfeiffer adapters use
(``bottleneck.py``'s placement table: diffusers ``ff.net.2``, CLIP ``mlp.fc2``, BERT ``output.dense``, T5
``DenseReluDense.wo``, LLaMA ``mlp.down_proj``, GPT-2 ``mlp.c_proj``). A dropout the model applies after that
projection (BERT, GPT-2, T5's layer wrapper) also drops the shift while training; the published code adds
it after BERT's dropout. At eval the two are the same.

Init: v = 0, as the published code, so the model starts bit-exact; L_alpha keeps nn.Linear's default init
(so the first gradient of v is not zero). Trained: v and L_alpha, d + d_ff + 1 numbers per block (d + d + 1
with ``alpha_from="output"``). Saved: ``<projection>.adapter_vector``, ``.adapter_alpha.weight``,
``.adapter_alpha.bias`` (the published names). Not mergeable (the shift depends on the token):
``pd.fuse(pipe)`` leaves it running and ``pd.fuse(pipe, [name])`` refuses. The published code's option of one
L_alpha shared by all layers, and its training of the LayerNorms (``LNTuning`` as a second adapter trains every one),
are not part of this method.

Counts (tests/test_adapterbias.py, meta device): BERT-base 12 x (768 + 3,072 + 1) = 46,092; BERT-large
24 x (1,024 + 4,096 + 1) = 122,904. The published code also trains the embeddings' and every ``BertOutput``'s
LayerNorm ((1 + layers) x 2d: 19,968 / 51,200 more): 66,060 for BERT-base, 174,104 (about 0.17M) for BERT-large.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from ..config import MethodConfig
from ..core import AnnexDelta, layer_dims
from ..registry import register_method
from .bottleneck import find_blocks, output_layer, sublayers
from .dense import module_at

ALPHA_FROM = ("intermediate", "output")


@register_method("adapter-bias")
@dataclasses.dataclass
class AdapterBias(MethodConfig):
    """A token-dependent shift alpha_i v after each block's feed-forward sub-layer. alpha_from: "intermediate"
    (the published code: alpha from the second projection's input) or "output" (from its output); target: a
    Target choosing blocks of ``bottleneck.BLOCKS``' classes (None = all)."""

    category: ClassVar[str] = "additive"
    site_kind: ClassVar[str] = "annex"
    param_names: ClassVar[tuple[str, ...]] = ("adapter_vector", "adapter_alpha.weight", "adapter_alpha.bias")

    alpha_from: str = "intermediate"

    def __post_init__(self):
        super().__post_init__()
        if self.alpha_from not in ALPHA_FROM:
            raise ValueError(f"AdapterBias alpha_from must be one of {list(ALPHA_FROM)}, got {self.alpha_from!r}")

    def resolved(self, model: nn.Module) -> "AdapterBias":
        return self  # ``select`` finds the blocks itself

    def select(self, model: nn.Module) -> list[str]:
        out = []
        for path in sublayers(model, find_blocks(self, model), ("ffn",)):
            rel, _ = output_layer(module_at(model, path), path)
            out.append(f"{path}.{rel}" if rel else path)
        return out

    def build(self, base: nn.Module, site: str, init: bool = True):
        return AdapterBiasDelta(self, site, base, init)


class AdapterBiasDelta(AnnexDelta):
    """v and L_alpha beside one output projection: out <- out + w * L_alpha(src) v."""

    category = "additive"
    mergeable = False

    def __init__(self, config: AdapterBias, site: str, layer: nn.Module, init: bool = True):
        super().__init__(config, site)
        d_in, d, _ = layer_dims(layer)
        ref = layer.weight
        dtype = torch.float32 if ref.dtype in (torch.float16, torch.bfloat16) else ref.dtype
        device = ref.device if init else "meta"
        self.from_input = config.alpha_from == "intermediate"
        self.adapter_vector = nn.Parameter(torch.zeros(d, device=device, dtype=dtype))
        self.adapter_alpha = nn.Linear(d_in if self.from_input else d, 1, device=device, dtype=dtype)

    def shift(self, src: torch.Tensor, weight: float) -> torch.Tensor:
        """alpha_i v for every token of ``src`` (the projection's input or output), scaled by ``weight``."""
        v = self.adapter_vector * weight if weight != 1.0 else self.adapter_vector
        return self.adapter_alpha(src.to(v.dtype)) * v

    def post(self, module, args, kwargs, output, weight):
        src = (args[0] if args else next(iter(kwargs.values()))) if self.from_input else output
        return output + self.shift(src, weight).to(output.dtype)
