"""VPT (Visual Prompt Tuning) — Jia et al., "Visual Prompt Tuning", arXiv 2203.12119, on a CLIP vision tower.

p learnable prompt tokens P in R^{p x d} join the sequence right after [CLS] (Sec. 3.2):
- shallow (Eq. 1-2): [x_1, Z_1, E_1] = L_1([x_0, P, E_0]), then [x_i, Z_i, E_i] = L_i([x_{i-1}, Z_{i-1}, E_{i-1}]);
- deep (Eq. 3-4): a fresh P_{i-1} at the input of every layer L_i, the previous layer's prompt outputs Z_{i-1}
  discarded: [x_i, _, E_i] = L_i([x_{i-1}, P_{i-1}, E_{i-1}]).
The tower's outputs keep their shapes: the prompt positions are dropped from the encoder's output, so
``last_hidden_state`` is [CLS, patches] and the pooled output is post_layernorm(x_N[CLS]) as before (the
head reads [CLS], Eq. 2 / 4). ``output_hidden_states``: every recorded state (transformers records the
layers' inputs and outputs) keeps the prompts at positions 1..p, so a consumer of inner states (IP-Adapter
Plus reads the penultimate one) sees 1 + p + patches tokens there. Where: an annex (hooks, no module replaced) on the tower's ``CLIPEncoder``; its pre-hook
inserts P_0 into ``inputs_embeds``, i.e. after CLIP's ``pre_layrnorm`` (the input of the first layer, as in
the paper's ViT, which has no such norm), and its post-hook drops the prompt positions. Deep prompts: a
transient delta in each later layer's annex (pre-hook) swaps in that layer's P (placed and removed with the
adapter, nothing of its own to save). Prompts carry no position embedding, so no position table limits p;
the vision tower takes no attention mask (one given is an error). One VPT adapter runs at a time per tower.

Init: uniform Xavier as the paper's code, U(-a, a) with a = sqrt(6 / (3 * patch^2 + d)) (fan-in of the
patch embedding, fan-out d). Optional dropout on the prompts (the paper's code has one; 0 by default). Not
the identity at init: new tokens change every attention row by design (the contract matrix checks that the
output changes and keeps its shape). An adapter weight w scales the prompt vectors (w = 0 gives zero
prompts, not the base model: ``disable_adapters`` gives the base model).

Trained: P only, p * d numbers (shallow) or layers * p * d (deep). Saved: ``<encoder>.prompt``, shape
[1 or layers, p, d]. Not mergeable (new tokens, not a weight change). Counts on CLIP ViT-B/16's vision config
(d = 768, 12 layers, meta device, tests/test_vpt.py): p = 50 deep 460,800, shallow 38,400.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import nn

from ..config import MethodConfig
from ..core import Annex, AnnexDelta
from ..registry import register_method
from .clip_vision import select_in_towers


@register_method("vpt")
@dataclasses.dataclass
class VPT(MethodConfig):
    """num_tokens: p; deep: a prompt set per layer (else shallow: one, at the first layer's input); dropout on
    the prompts while training; target: None (every CLIP vision tower's encoder) or a Target selecting them."""

    category: ClassVar[str] = "prompt"
    site_kind: ClassVar[str] = "annex"
    param_names: ClassVar[tuple[str, ...]] = ("prompt",)
    components: ClassVar[tuple[str, ...]] = ("image_encoder",)  # a diffusers pipeline's CLIP vision tower

    num_tokens: int = 50
    deep: bool = False
    dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.num_tokens, bool) or not isinstance(self.num_tokens, int) or self.num_tokens < 1:
            raise ValueError(f"VPT num_tokens must be a positive integer, got {self.num_tokens!r}")
        if not isinstance(self.deep, bool):
            raise ValueError(f"VPT deep must be True or False, got {self.deep!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"VPT dropout must be in [0, 1), got {self.dropout!r}")

    def resolved(self, model: nn.Module) -> "VPT":
        return self  # ``select`` finds the vision towers itself

    def select(self, model: nn.Module) -> list[str]:
        return select_in_towers(self, model, "encoder")

    def build(self, base: nn.Module, site: str, init: bool = True):
        return VPTPrompts(self, site, base, init)


class VPTPrompts(AnnexDelta):
    """The prompts of one vision encoder: ``prompt`` [1 or layers, p, d]."""

    category = "prompt"
    mergeable = False

    def __init__(self, config: VPT, site: str, encoder: nn.Module, init: bool = True):
        super().__init__(config, site)
        vision = getattr(encoder, "config", None)
        if not isinstance(getattr(encoder, "layers", None), nn.ModuleList) or vision is None:
            raise ValueError(f"VPT at {site!r}: a {type(encoder).__name__} is not a CLIPEncoder with layers")
        self.n_layers, self.width = len(encoder.layers), vision.hidden_size
        ref = next(encoder.parameters())
        dtype = torch.float32 if ref.dtype in (torch.float16, torch.bfloat16) else ref.dtype
        shape = (self.n_layers if config.deep else 1, config.num_tokens, self.width)
        self.prompt = nn.Parameter(torch.empty(shape, device=ref.device if init else "meta", dtype=dtype))
        if init:
            bound = math.sqrt(6.0 / (vision.num_channels * vision.patch_size ** 2 + self.width))
            nn.init.uniform_(self.prompt, -bound, bound)
        self.dropout = nn.Dropout(config.dropout)
        self.inserted = False  # prompts were inserted in the current encoder call (its post-hook drops them)
        self.length = 0  # sequence length with the prompts: the later layers swap only sequences this long
        self.swaps: list[tuple[Annex, PromptSwap]] = []

    def fit_file(self, tensors: dict) -> None:
        t = tensors.get("prompt")
        if t is not None and tuple(t.shape) != tuple(self.prompt.shape):
            what = "layers" if self.config.deep else "prompt set (shallow)"
            raise ValueError(
                f"the file's VPT prompts are {tuple(t.shape)} (sets x tokens x width: {t.shape[0]} x "
                f"{t.shape[1] if t.dim() > 1 else '?'} x {t.shape[-1]}); this vision encoder needs "
                f"{tuple(self.prompt.shape)} ({self.prompt.shape[0]} {what}, width {self.width})")

    def tokens(self, layer: int, x: torch.Tensor, weight: float) -> torch.Tensor:
        """P for ``layer``, batched like ``x`` (dropout per sample, as the paper's code)."""
        p = self.prompt[layer] * weight if weight != 1.0 else self.prompt[layer]
        return self.dropout(p.to(x.dtype).expand(x.shape[0], -1, -1))

    def pre(self, module, args, kwargs, weight):
        annex = module._modules[Annex.ATTR]
        live = {id(d) for d, _ in annex.running()}
        running = [n for n, d in annex.deltas.items() if isinstance(d, VPTPrompts) and id(d) in live]
        if len(running) > 1:
            raise RuntimeError(f"VPT adapters {running} are active on one vision encoder ({self.site!r}): "
                               "activate one at a time (set_adapters)")
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        if mask is not None or kwargs.get("causal_attention_mask") is not None:
            raise ValueError(f"VPT at {self.site!r}: the vision encoder got an attention mask; VPT does not "
                             "extend masks (CLIP's vision tower passes none)")
        x = args[0] if args else kwargs["inputs_embeds"]
        x = torch.cat([x[:, :1], self.tokens(0, x, weight), x[:, 1:]], dim=1)
        self.inserted, self.length = True, x.shape[1]
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "inputs_embeds": x})

    def post(self, module, args, kwargs, output, weight):
        if not self.inserted:
            return None
        self.inserted = False
        p = self.config.num_tokens

        def drop(h):
            return torch.cat([h[:, :1], h[:, 1 + p:]], dim=1)

        if torch.is_tensor(output):
            return drop(output)
        if isinstance(output, tuple):
            return (drop(output[0]),) + tuple(output[1:])
        return type(output)(**{**output, "last_hidden_state": drop(output["last_hidden_state"])})

    def attach(self, site) -> None:
        if not self.config.deep:
            return
        name = next(n for n, d in site.deltas.items() if d is self)
        encoder = site.owner[0]
        for i in range(1, self.n_layers):
            layer = encoder.layers[i]
            annex, swap = Annex.install(layer), PromptSwap(self, i)
            annex.add(name, swap.train(layer.training))
            annex.active[name] = site.active.get(name, 1.0)
            self.swaps.append((annex, swap))

    def detach(self, site) -> None:
        for annex, swap in self.swaps:  # ``remove`` may have taken some out already
            name = next((n for n, d in annex.deltas.items() if d is swap), None)
            if name is not None:
                annex.drop(name)
            owner = annex.owner[0]
            if not annex.deltas and owner._modules.get(Annex.ATTR) is annex:
                annex.uninstall(owner, Annex.ATTR)
        self.swaps.clear()


class PromptSwap(AnnexDelta):
    """Deep VPT at layer i > 0 (pre-hook): the prompt positions of its input become P_i (Eq. 3)."""

    category = "prompt"
    transient = True

    def __init__(self, prompts: VPTPrompts, layer: int):
        super().__init__(prompts.config, f"{prompts.site}.layers.{layer}")
        self.prompts, self.layer = (prompts,), layer  # a plain reference: the prompts live at the encoder

    def pre(self, module, args, kwargs, weight):
        owner = self.prompts[0]
        x = args[0] if args else kwargs.get("hidden_states")
        # the length check (not a per-call flag) keeps gradient checkpointing's re-run of a layer right
        if not torch.is_tensor(x) or x.dim() != 3 or x.shape[1] != owner.length:
            return None
        p = owner.config.num_tokens
        x = torch.cat([x[:, :1], owner.tokens(self.layer, x, weight), x[:, 1 + p:]], dim=1)
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})
