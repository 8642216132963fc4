"""FacT — Jie & Deng, "FacT: Factor-Tuning for Lightweight Adaptation on Vision Transformer", arXiv 2212.03145.

FacT stacks the weight increments of a whole model into one tensor of d x d slices and factorises it with
factors SHARED across layers. Every targeted weight (out, in) with out = a d, in = b d is cut into a x b slices
(ViT-B: q, k, v, o are one 768 x 768 slice each, fc1 / fc2 four each: 12 slices per block, 144 in all), and

    FacT-TT:  dW_n = s V Sigma_n U^T          Sigma_n an r x r core per slice n
    FacT-TK:  dW_n = s V (C x_3 P_n) U^T      Sigma_n = sum_k C[:, :, k] P[n, k], C (r, r, r), P (slices, r)

with U, V (d x r) shared by every layer of the model (and C in TK). Per layer in torch's (out, in) layout:
dW = s (I_a (x) V) Sigma (I_b (x) U)^T, Sigma the (a r, b r) block matrix of the layer's slice cores. (The
paper writes x W: its U is our input-side factor and its Sigma ours transposed.) The forward runs the factors
(x -> U^T per input block -> Sigma -> dropout -> V per output block), as the published code does, dropout
(its 0.1) on the rank-r activations. The block size d is ``block``, by default the greatest common divisor of
the targeted layers' widths (ViT: the hidden size); it is stored in the config when the adapter is placed.
A transformers ``CLIPModel`` is one model: its two towers then share one U, V (d = the gcd of both widths);
inject into ``model.vision_model`` alone for the paper's setting.

Init (the published code): V = 0, so dW = 0 and the model starts bit-exact; U as ``nn.Linear(d, r)``'s
weight; TT cores as ``nn.Linear``'s weight (kaiming-uniform, fan-in b r); TK: C and P Glorot-uniform over the
whole (r, r, r) and (r, slices) tensors. Targets (default, per model): the attention q / k / v / o projections
and the two MLP layers of every block (CLIP text / vision, BERT, T5, LLaMA, GPT-2; diffusers U-Nets: to_q,
to_k, to_v, to_out.0, ff.net.0.proj, ff.net.2; DiT / PixArt: the ``dit`` preset).

Where the factors live: ``fact_u``, ``fact_v`` (and ``fact_c``) once per model, in a model-level annex (site
""), reached by every layer through the adapter's bound config at call time (Compacter's arrangement: they
exist once in ``parameters()``, the optimizer and the file, and gather every layer's gradient); each Host
holds its layer's cores: ``fact_core`` (a r, b r) in TT, its rows of P ``fact_p`` (a b, r) in TK. Trained and
saved: those. Merges exactly (a weight delta: W += s dW through ``WeightDelta``); the shared annex has nothing
to fold and keeps its tensors while the layers are fused.

Counts (tests/test_fact.py, CLIP ViT-B/16 vision tower on the meta device, 144 slices, d = 768):
TT = 2 d r + 144 r^2: r = 8: 21,504, r = 16: 61,440, r = 4: 8,448; TK = 2 d r + r^3 + 144 r: r = 32: 86,528,
r = 16: 30,976. The paper's 0.040 M (TT) and 0.069 M (TK) are averages over VTAB-1k's 19 tasks with the
published per-task ranks (TT: nine at 8, nine at 16, one at 4: 39,734; TK: thirteen at 32, six at 16: 68,985).
SD1.5's U-Net (widths 320 / 640 / 1280 and 768-wide text features: d = 64), TT r = 8: 3,785,344 on the attention
+ FF projections, 1,462,144 on the attention projections alone (``unet-attn``).
"""
from __future__ import annotations

import dataclasses
import math
from functools import reduce

import torch
from torch import nn

from ..config import MethodConfig
from ..core import SUPPORTED_LAYERS, AnnexDelta, WeightDelta, is_transposed, layer_dims
from ..presets import PRESETS, default_target
from ..registry import register_method
from ..target import Target, class_names
from .dense import module_at
from .lora import adapter_dtype

VARIANTS = ("tt", "tk")
_CLIP = PRESETS["clip-text-mlp"]  # q / k / v / out_proj / fc1 / fc2 of every CLIPEncoder (text and vision)
# model class -> FacT's default target (attention and MLP); other models: their default preset (the ``dit``,
# ``llama`` and ``gpt2`` presets hold both already)
DEFAULT_TARGETS = {
    "UNet2DConditionModel": PRESETS["unet-attn-ff"],
    "CLIPTextModel": _CLIP, "CLIPTextModelWithProjection": _CLIP, "CLIPVisionModel": _CLIP,
    "CLIPVisionModelWithProjection": _CLIP, "CLIPModel": _CLIP, "CLIPTextTransformer": _CLIP,
    "CLIPVisionTransformer": _CLIP,
    "BertModel": Target(include=("query", "key", "value", "output.dense", "intermediate.dense"), within=("BertLayer",)),
    "T5EncoderModel": Target(include=("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"), within=("T5Block",)),
}
LAYERS = ("Linear", "Conv1D")


def fact_target(model: nn.Module) -> Target:
    for cls in type(model).__mro__:
        if cls.__name__ in DEFAULT_TARGETS:
            return DEFAULT_TARGETS[cls.__name__]
    return default_target(model)


class _Shared:
    """The adapter's shared factors, as its layers reach them: the model-level delta that holds them."""

    delta = None

    def get(self, site: str) -> "FacTFactors":
        if self.delta is None:
            raise RuntimeError(f"FacT layer at {site!r}: its shared factors (fact_u, fact_v, on the model's site '') "
                               "are not in this model; load the whole adapter file")
        return self.delta


@register_method("fact")
@dataclasses.dataclass
class FacT(MethodConfig):
    """Factor-tuning: dW = s (I (x) V) Sigma (I (x) U)^T with U, V shared model-wide. r: rank; scale: s;
    variant: "tt" (a core per slice) or "tk" (Tucker: a shared (r, r, r) core and a row of P per slice);
    dropout: on the rank-r activations; block: the slice size d (None: the gcd of the targeted widths);
    target: default per model (attention + MLP)."""

    category = "reparameterization"
    param_names = ("fact_u", "fact_v", "fact_c", "fact_core", "fact_p")

    r: int = 8
    scale: float = 1.0
    variant: str = "tt"
    dropout: float = 0.1
    block: int | None = None

    def __post_init__(self):
        super().__post_init__()
        for f in ("r",) + (("block",) if self.block is not None else ()):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"FacT {f} must be a positive integer, got {v!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise ValueError(f"FacT scale must be a finite number, got {self.scale!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"FacT variant must be one of {VARIANTS}, got {self.variant!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"FacT dropout must be in [0, 1), got {self.dropout!r}")
        if self.block is not None and self.r > self.block:
            raise ValueError(f"FacT rank r={self.r} exceeds the block size {self.block}")

    def bind(self, obj, model: nn.Module, name: str) -> "FacT":
        """This config for ``model``: its target filled in, the block size found (unless set: a file's config
        holds it), a fresh holder of the factors."""
        bound = dataclasses.replace(self, target=self.target if self.target is not None else fact_target(model))
        if bound.block is None:
            widths = sorted({w for _, layer in bound._layers(model) for w in layer_dims(layer)[:2]})
            bound.block = reduce(math.gcd, widths)
            if self.r > bound.block:
                raise ValueError(f"FacT rank r={self.r} exceeds the block size {bound.block} (the greatest common "
                                 f"divisor of the targeted widths {widths}): leave out the layers whose widths lower "
                                 "it (an MLP width that is no multiple of the hidden size), or lower r")
        bound._shared = _Shared()
        return bound

    def select(self, model: nn.Module) -> list[str]:
        layers, block = self._layers(model), self.block
        odd = [f"{s} ({layer_dims(layer)[1]} x {layer_dims(layer)[0]})" for s, layer in layers
               if any(w % block for w in layer_dims(layer)[:2])]
        if odd:
            raise ValueError(f"FacT block {block} does not divide the widths of {odd[:4]}: pick a block that "
                             "divides every targeted width, or leave those layers out of the target")
        self._slices = sum((layer_dims(layer)[0] // block) * (layer_dims(layer)[1] // block) for _, layer in layers)
        return [""] + [s for s, _ in layers]

    def _layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        found = self.target.select(model, "host")
        if not found:
            raise ValueError(f"FacT target {self.target} matches no layer of {type(model).__name__}")
        layers = [(s, module_at(model, s)) for s in found]
        bad = [f"{s} ({type(layer).__name__})" for s, layer in layers if type(layer).__name__ not in LAYERS]
        if bad:
            raise ValueError(f"FacT factorises Linear (and GPT-2 Conv1D) weights; the target selects {bad[:4]}")
        return layers

    def resolved(self, model: nn.Module) -> "FacT":
        return self  # ``bind`` fills the target

    def kind_of(self, model: nn.Module, site: str) -> str:
        # the factors sit on the model FacT was injected into: "" for it, a path when that was a submodule
        layer = module_at(model, site)
        return "host" if layer is not None and class_names(layer) & set(SUPPORTED_LAYERS) else "annex"

    def build(self, base: nn.Module, site: str, init: bool = True):
        if not hasattr(self, "_shared"):
            raise RuntimeError("a FacT config builds once bound to its model (pd.inject and pd.load_adapter do this)")
        # the model itself holds the factors (a file may name its site "text_model." for a lone CLIP tower)
        if site == "" or not class_names(base) & set(SUPPORTED_LAYERS):
            return FacTFactors(self, "", base, init)
        return FacTDelta(self, site, base, init)


class FacTFactors(AnnexDelta):
    """U, V (d x r) (and TK's core C) beside the whole model; it changes no call itself."""

    category = "reparameterization"
    mergeable = True
    runs_when_fused = True  # nothing to fold: the layers' deltas carry the update

    def __init__(self, config: FacT, site: str, model: nn.Module, init: bool = True):
        super().__init__(config, site)
        ref = next(model.parameters())
        d, r = config.block, config.r
        factory = {"device": ref.device if init else "meta",
                   "dtype": torch.float32 if ref.dtype in (torch.float16, torch.bfloat16) else ref.dtype}
        self.fact_u = nn.Parameter(torch.empty(d, r, **factory))
        self.fact_v = nn.Parameter(torch.zeros(d, r, **factory))
        if config.variant == "tk":
            self.fact_c = nn.Parameter(torch.empty(r, r, r, **factory))
        if init:
            nn.init.uniform_(self.fact_u, -1 / math.sqrt(d), 1 / math.sqrt(d))  # nn.Linear(d, r)'s weight
            if config.variant == "tk":
                nn.init.xavier_uniform_(self.fact_c)

    def attach(self, site) -> None:
        self.config._shared.delta = self

    def detach(self, site) -> None:
        if self.config._shared.delta is self:
            self.config._shared.delta = None


class FacTDelta(WeightDelta):
    """One layer's slices: its cores (TT) or its rows of P (TK); U, V (and C) come from the shared factors."""

    def __init__(self, config: FacT, site: str, base: nn.Module, init: bool = True):
        super().__init__(config, site)
        if type(base).__name__ not in LAYERS:
            raise TypeError(f"FacT factorises Linear (and GPT-2 Conv1D) weights; {site} is a {type(base).__name__}")
        n_in, n_out, _ = layer_dims(base)
        d, r = config.block, config.r
        if n_in % d or n_out % d:
            raise ValueError(f"FacT block {d} does not divide {site}'s widths ({n_out} x {n_in})")
        self.a, self.b = n_out // d, n_in // d
        self.transposed = is_transposed(base)
        factory = {"device": base.weight.device if init else "meta", "dtype": adapter_dtype(base)}
        if config.variant == "tt":
            self.fact_core = nn.Parameter(torch.empty(self.a * r, self.b * r, **factory))
            if init:
                nn.init.kaiming_uniform_(self.fact_core, a=math.sqrt(5))  # nn.Linear(b r, a r)'s weight
        else:
            self.fact_p = nn.Parameter(torch.empty(self.a * self.b, r, **factory))
            if init:  # the rows of one Glorot-uniform (r, slices) P
                bound = math.sqrt(6 / (r + config._slices))
                nn.init.uniform_(self.fact_p, -bound, bound)
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()

    def core(self, shared: FacTFactors) -> torch.Tensor:
        """Sigma: the (a r, b r) block matrix of this layer's slice cores, slice (i, j) at block (i, j)."""
        r = self.config.r
        if self.config.variant == "tt":
            return self.fact_core
        cores = torch.einsum("okm,nm->nok", shared.fact_c, self.fact_p)  # (a b, r, r): C x_3 P_n
        return cores.view(self.a, self.b, r, r).transpose(1, 2).reshape(self.a * r, self.b * r)

    def delta_weight(self) -> torch.Tensor:
        shared = self.config._shared.get(self.site)
        u, v, r = shared.fact_u, shared.fact_v, self.config.r
        sigma = self.core(shared).view(self.a, r, self.b, r)
        dw = torch.einsum("pk,ikjl,ql->ipjq", v, sigma, u).reshape(self.a * len(v), self.b * len(u))
        dw = dw * self.config.scale
        return dw.T if self.transposed else dw

    def forward(self, base, x, out, weight):
        shared = self.config._shared.get(self.site)
        u, v = shared.fact_u, shared.fact_v
        h = (x.to(u.dtype).unflatten(-1, (self.b, len(u))) @ u).flatten(-2)  # U^T on each input block
        h = self.dropout(h @ self.core(shared).T)
        y = (h.unflatten(-1, (self.a, self.config.r)) @ v.T).flatten(-2)  # V on each output block
        return out + (y * (weight * self.config.scale)).to(out.dtype)
