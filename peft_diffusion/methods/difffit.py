"""DiffFit — Xie et al., "DiffFit: Unlocking Transferability of Large Diffusion Models via Simple
Parameter-Efficient Fine-Tuning", arXiv 2304.06648.

BitFit for diffusion models plus a learnable scale per residual branch (Sec. 3.2, Alg. 1): the biases, the
normalisation layers and the class embedding train, and each block's branches get a per-channel gamma,
initialised to 1, on their output: in a DiT block x <- x + gamma_1 * gate_msa * Attn(...),
x <- x + gamma_2 * gate_mlp * MLP(...). Here gamma scales the output of the layer that ends each branch
(same thing: the gate, dropout and the residual add act per channel after it):

- diffusers ``BasicTransformerBlock`` (U-Net transformers, DiT, PixArt): ``attn1.to_out.0``, ``attn2.to_out.0``
  (cross-attention, where there is one), ``ff.net.2``; ``ResnetBlock2D``: ``conv2``;
- transformers ``CLIPEncoderLayer``: ``self_attn.out_proj``, ``mlp.fc2``; ``BertLayer``:
  ``attention.output.dense``, ``output.dense``; ``LlamaDecoderLayer``: ``self_attn.o_proj``, ``mlp.down_proj``;
- or the Linear / Conv layers ``gamma_target`` names (e.g. the paper's placement ablation: blocks 1-14 only).

Trained: a dense delta (zero at init) on every bias, every normalisation-layer weight and bias and, with
``embeddings``, the class-label tables (DiT's ``class_embedder.embedding_table``, a U-Net's
``class_embedding``); ``target`` replaces that set by parameter patterns (each must be one of those kinds);
and the gammas (the gamma part's adapter weight w scales gamma - 1). Saved: ``<module>.<parameter>.delta`` and
``<layer>.gamma``. Merges exactly: the deltas add into their parameters, then each gamma multiplies its
layer's weight rows (output channels) and bias: W' = diag(g) W, b' = g * (b + d_b).

Counts (tests/test_selective_dense.py, meta-device builds): SD1.5's U-Net 501,444 (0.058 %); DiT-XL/2 in
diffusers' layout 616,352 without the class tables (0.082 %; 554,144 in the original layout, whose blocks
share one timestep MLP), against the paper's 0.83 M (0.12 %): the README ("DiffFit counts on DiT-XL/2")
explains the difference, and why ``embeddings=True`` costs 28 class tables in diffusers' layout.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..config import MethodConfig, as_target
from ..core import AnnexDelta, Host, is_transposed, layer_dims
from ..registry import register_method
from ..target import Target, class_names
from .dense import NORM_SUFFIXES, DenseDelta, delta_dtype, module_at, owner_of

# block class -> the layers ending its residual branches (relative paths; a missing one, such as a
# self-attention-only block's attn2, is skipped)
GAMMA_LAYERS = {
    "BasicTransformerBlock": ("attn1.to_out.0", "attn2.to_out.0", "ff.net.2"),
    "ResnetBlock2D": ("conv2",),
    "CLIPEncoderLayer": ("self_attn.out_proj", "mlp.fc2"),
    "BertLayer": ("attention.output.dense", "output.dense"),
    "LlamaDecoderLayer": ("self_attn.o_proj", "mlp.down_proj"),
}
ALL_PARAMETERS = Target(types=())



@register_method("difffit")
@dataclasses.dataclass
class DiffFit(MethodConfig):
    """Biases + norm parameters (+ class embedding) as dense deltas, and a gamma per residual branch.

    target: parameter patterns replacing the default bias / norm / class-embedding set; gamma_target: the
    layers whose output gets a gamma (default: ``GAMMA_LAYERS`` of the blocks found); gamma: add the gammas;
    embeddings: train the class-label tables in the default set.
    """

    category = "hybrid"
    site_kind = "param"  # the dense deltas; the gammas live in annexes (``kind_of``)
    param_names = ("delta", "gamma")

    gamma_target: Target | str | None = None
    gamma: bool = True
    embeddings: bool = True

    def __post_init__(self):
        super().__post_init__()
        self.gamma_target = as_target(self.gamma_target, "DiffFit gamma_target")
        for field in ("gamma", "embeddings"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"DiffFit {field} must be True or False, got {getattr(self, field)!r}")

    def resolved(self, model: nn.Module) -> "DiffFit":
        return self  # ``select`` finds the default sites of each kind

    def kind_of(self, model: nn.Module, site: str) -> str:
        owner, name = owner_of(model, site)
        held = owner is not None and (name in owner._parameters or name in owner._buffers)
        return "param" if held else "annex"

    def select(self, model: nn.Module) -> list[str]:
        # parameters first: a layer's bias delta must fuse before the gamma that scales the layer (``fuse``
        # walks sites in model order, and a parameter site joins the layer before its annex does)
        params, gammas = self._parameters(model), self._gammas(model) if self.gamma else []
        if not params and not gammas:
            raise ValueError(f"DiffFit finds no bias, normalisation-layer parameter or class embedding in this "
                             f"{type(model).__name__}, and no gamma layer: nothing to train")
        return params + gammas

    def _parameters(self, model: nn.Module) -> list[str]:
        found = []
        for q in (self.target or ALL_PARAMETERS).select(model, "param"):
            owner, name = owner_of(model, q)
            p = owner._parameters.get(name) if owner is not None else None
            if not isinstance(p, nn.Parameter):
                continue  # buffers (running statistics) are not trained
            kind = self._kind(owner, name, q)
            if kind is None and self.target is not None:
                raise ValueError(f"DiffFit trains biases, normalisation-layer parameters and class embeddings; "
                                 f"{q} ({type(owner).__name__}.{name}) is none of them (PartialFT trains any "
                                 "parameter)")
            if kind is not None and (kind != "embedding" or self.embeddings or self.target is not None):
                found.append(q)
        if self.target is not None and not found:
            raise ValueError(f"DiffFit target {self.target} matches no parameter of {type(model).__name__}")
        return found

    @staticmethod
    def _kind(owner: nn.Module, name: str, q: str) -> str | None:
        if name == "bias":
            return "bias"
        if any(c.endswith(NORM_SUFFIXES) for c in class_names(owner)):
            return "norm"
        if q.endswith("class_embedder.embedding_table.weight") or q.split(".")[0] == "class_embedding":
            return "embedding"
        return None

    def _gammas(self, model: nn.Module) -> list[str]:
        if self.gamma_target is not None:
            found = [s for s in self.gamma_target.select(model, "annex") if s]
            if not found:
                raise ValueError(f"DiffFit gamma_target {self.gamma_target} matches no layer of "
                                 f"{type(model).__name__}")
        else:
            found = []
            for block in ALL_PARAMETERS.select(model, "annex"):
                module = module_at(model, block)
                for cls in class_names(module) & set(GAMMA_LAYERS):
                    for rel in GAMMA_LAYERS[cls]:
                        path = f"{block}.{rel}" if block else rel
                        if module_at(model, path) is not None:
                            found.append(path)
            if not found:
                raise ValueError(f"DiffFit's gammas go on the layers ending the residual branches of "
                                 f"{sorted(GAMMA_LAYERS)}; this {type(model).__name__} has none: pass "
                                 "gamma_target=Target(include=(...)) or gamma=False")
        for path in found:
            layer = module_at(model, path)
            try:
                layer_dims(layer)
            except TypeError:
                raise ValueError(f"DiffFit gamma goes on a Linear or Conv layer (it merges into its weight rows); "
                                 f"{path} is a {type(layer).__name__}") from None
        return found

    def build(self, base, site: str, init: bool = True):
        if isinstance(base, torch.Tensor):
            delta = DenseDelta(self, site, base, init)
            delta.category = self.category
            return delta
        return Gamma(self, site, base, init)


class Gamma(AnnexDelta):
    """Per-output-channel scale g of one Linear / Conv layer's output, 1 at init; with adapter weight w the
    scale is 1 + w (g - 1)."""

    category = "hybrid"
    mergeable = True

    def __init__(self, config: DiffFit, site: str, layer: nn.Module, init: bool = True):
        super().__init__(config, site)
        if isinstance(layer, Host):
            layer = layer.base
        _, n_out, kernel = layer_dims(layer)
        self.spatial = len(kernel)  # conv outputs carry channels in dim 1, followed by this many dims
        self.transposed = is_transposed(layer)  # GPT-2's Conv1D stores (in, out)
        w = layer.weight
        self.gamma = nn.Parameter(torch.ones(n_out, dtype=delta_dtype(w), device=w.device if init else "meta"))

    def scale(self, weight: float) -> torch.Tensor:
        return self.gamma if weight == 1.0 else 1.0 + weight * (self.gamma - 1.0)

    def post(self, module, args, kwargs, output, weight):
        s = self.scale(weight).to(output.dtype)
        return output * (s.view(-1, *[1] * self.spatial) if self.spatial else s)

    @torch.no_grad()
    def merge(self, module, weight):
        self._rescale(module, self.scale(weight).float())

    @torch.no_grad()
    def unmerge(self, module, weight):
        s = self.scale(weight).float()
        if not bool((s != 0).all()):
            raise RuntimeError(f"DiffFit gamma at {self.site} holds zeros: its fuse cannot be undone by division "
                               "(fuse with exact=True to keep a copy)")
        self._rescale(module, 1.0 / s)

    def _rescale(self, module: nn.Module, s: torch.Tensor) -> None:
        w = module.weight
        w.copy_((w.float() * s.view((1, -1) if self.transposed else (-1, *[1] * (w.dim() - 1)))).to(w.dtype))
        b = module._parameters.get("bias")
        if b is not None:
            b.copy_((b.float() * s).to(b.dtype))
