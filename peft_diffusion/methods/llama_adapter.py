"""LLaMA-Adapter v1 — Zhang et al., "LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init
Attention", arXiv 2303.16199.

Learnable adaption prompts P_l (``adapter_len`` = K tokens of width C) in the top ``adapter_layers`` = L
attention layers of a LLaMA model. Every token t of layer l attends to the prompt through the layer's own
(frozen) key and value projections, with a softmax of its own over the K prompt keys and a gate g_l that
starts at zero (the paper's zero-init attention, Eq. 6-8):

    S_K = Q_t (P_l W_k)^T / sqrt(d_head)            (Eq. 6; the prompt keys carry no rotary position)
    S_g = [g_l * softmax(S_K); softmax(S_{M+1})]      (Eq. 8: the word tokens' attention is left as it was)
    out = attention(x) + W_o (g_l softmax(S_K) (P_l W_v))

so with g_l = 0 the model is bit-identical at init. Grouped-query models repeat the prompt's key/value heads
as the layer does its own. ``gate="head"`` (default) keeps one gate per head, as the authors' code does
(``torch.zeros(1, n_heads, 1, 1)``) and as the 1.2M count of the paper implies; ``gate="layer"`` keeps one
scalar per layer, peft's ``AdaptionPromptConfig`` layout (``adaption_gate`` of shape (1,)), for exact
comparison and file exchange. The prompt starts N(0, 1), as in the authors' code and peft.

Placement: an Annex (``core.Annex``) on each of the top L ``LlamaAttention`` modules; its post hook adds the
prompt branch to the module's output (query recomputed from the hook's ``hidden_states`` and
``position_embeddings``), so the module, its keys and the KV cache are untouched (cached decoding works: the
prompt branch depends on the new tokens only). Trained and saved per layer: ``adaption_prompt`` (K, C) and
``adaption_gate`` (n_heads,) or (1,). Not mergeable (a softmax sits between prompt and output): ``pd.fuse``
leaves it running and ``pd.fuse(model, [name])`` refuses. peft's adapter folders (``adapter_model.safetensors``
+ ``adapter_config.json``) load with ``load_adapter(model, folder)`` and are written by ``save_peft``
(``io/peft_adaption_prompt.py``); peft's layout holds ``gate="layer"`` adapters only. (peft applies ``o_proj``
with its bias to the prompt branch; LLaMA's projections have none, and here the bias is never added twice.)

v2 (Gao et al., "LLaMA-Adapter V2", arXiv 2304.15010, Sec. 3.1), options of the same config: ``norms``
trains every RMSNorm weight (a zero-init dense delta, ``dense.py``; saved ``<norm>.weight.delta``) and
``bias_scale`` turns every Linear of every decoder layer into y = s * (W x + b) (b = 0, s = 1 at init, per
output channel; an annex on the Linear, saved ``adapter_bias`` / ``adapter_scale``), so v2 also starts
bit-identical. The prompt branch runs through the adapted q/k/v projections and o_proj's linear part
(o_proj(x) - o_proj(0)), as the authors' code adds the prompt output before W_o. v2's early fusion of visual
prompts is not here.

Count (tests/test_llama_adapter.py, meta device): LLaMA-7B, K = 10, L = 30, per-head gates:
30 x (10 x 4096 + 32) = 1,229,760; peft's layout 30 x (10 x 4096 + 1) = 1,228,830.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MethodConfig
from ..core import AnnexDelta, Host
from ..registry import register_method
from ..target import class_names
from .dense import DenseDelta, delta_dtype, owner_of

ATTENTION = ("LlamaAttention",)  # the attention classes whose forward this branch reproduces the query of
GATES = ("head", "layer")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """transformers' LLaMA rotation (imported here, not at module import: the CLI's help must not load transformers)."""
    from transformers.models.llama.modeling_llama import rotate_half

    return rotate_half(x)


def attention_layers(model: nn.Module) -> list[str]:
    """Qualified names of the model's LLaMA attention modules, in model order."""
    return [n for n, m in model.named_modules() if class_names(m) & set(ATTENTION) and ".deltas." not in n]


@register_method("llama-adapter")
@dataclasses.dataclass
class LlamaAdapter(MethodConfig):
    """adapter_len: prompt tokens K per layer; adapter_layers: the top L attention layers (None: all);
    gate: "head" (one zero-init gate per head, the authors') or "layer" (one per layer, peft's);
    norms / bias_scale: v2's extra trainables (every RMSNorm weight; s * (W x + b) on every Linear of every
    decoder layer)."""

    category: ClassVar[str] = "prompt"
    site_kind: ClassVar[str] = "annex"
    param_names: ClassVar[tuple[str, ...]] = ("adaption_prompt", "adaption_gate", "delta", "adapter_bias",
                                              "adapter_scale")

    adapter_len: int = 10
    adapter_layers: int | None = None
    gate: str = "head"
    norms: bool = False
    bias_scale: bool = False

    def __post_init__(self):
        super().__post_init__()
        for field in ("adapter_len", "adapter_layers"):
            v = getattr(self, field)
            if not (v is None and field == "adapter_layers") and (
                    not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"LlamaAdapter {field} must be a positive integer, got {v!r}")
        for field in ("norms", "bias_scale"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"LlamaAdapter {field} must be True or False, got {getattr(self, field)!r}")
        if self.gate not in GATES:
            raise ValueError(f"LlamaAdapter gate must be one of {GATES}, got {self.gate!r}")
        if self.target is not None:
            raise ValueError("LlamaAdapter places itself in the top adapter_layers LLaMA attention layers; "
                             f"it takes no target (got {self.target})")

    def resolved(self, model: nn.Module) -> "LlamaAdapter":
        return self  # ``select`` finds the attention layers itself

    def select(self, model: nn.Module) -> list[str]:
        layers = attention_layers(model)
        if not layers:
            raise ValueError(f"LlamaAdapter needs LLaMA attention layers ({', '.join(ATTENTION)}); this "
                             f"{type(model).__name__} has none")
        n = self.adapter_layers or len(layers)
        if n > len(layers):
            raise ValueError(f"LlamaAdapter adapter_layers={n} but this {type(model).__name__} has "
                             f"{len(layers)} attention layers")
        found = layers[len(layers) - n:]
        if self.norms:
            found += [f"{q}.weight" for q, m in model.named_modules() if "peft_annex" not in q
                      and any(c.endswith("RMSNorm") for c in class_names(m))
                      and isinstance(m._parameters.get("weight"), nn.Parameter)]
        if self.bias_scale:
            blocks = tuple(q.rpartition(".")[0] + "." for q in layers)
            found += [q.removesuffix(".base") if isinstance(model.get_submodule(q.rpartition(".")[0]), Host)
                      else q for q, m in model.named_modules()
                      if isinstance(m, nn.Linear) and q.startswith(blocks) and "peft_annex" not in q]
        return found

    def kind_of(self, model: nn.Module, site: str) -> str:
        owner, name = owner_of(model, site)
        return "param" if owner is not None and name in owner._parameters else "annex"

    def build(self, base, site: str, init: bool = True):
        if isinstance(base, torch.Tensor):
            return DenseDelta(self, site, base, init)  # an RMSNorm weight (v2)
        if isinstance(base, nn.Linear):
            return BiasScale(self, site, base, init)
        return AdaptionPrompt(self, site, base, init)


class AdaptionPrompt(AnnexDelta):
    """The adaption prompt and gate of one LLaMA attention layer (``post``: Eq. 6-8 on its output)."""

    category = "prompt"
    mergeable = False

    def __init__(self, config: LlamaAdapter, site: str, module: nn.Module, init: bool = True):
        super().__init__(config, site)
        if not class_names(module) & set(ATTENTION):
            raise ValueError(f"LlamaAdapter at {site!r}: a {type(module).__name__}, not one of {ATTENTION}")
        cfg = module.config
        total, idx = cfg.num_hidden_layers, getattr(module, "layer_idx", None)
        top = config.adapter_layers or total
        if top > total or (idx is not None and idx < total - top):
            raise ValueError(f"LlamaAdapter with adapter_layers={top} goes in the top {top} of the model's layers, "
                             f"but {site!r} is layer {idx} of {total}: the adapter was made for a model with "
                             "another layer count")
        ref = module.q_proj.weight
        dtype = torch.float32 if ref.dtype in (torch.float16, torch.bfloat16) else ref.dtype
        device = ref.device if init else "meta"
        heads = cfg.num_attention_heads
        self.adaption_prompt = nn.Parameter(torch.empty(config.adapter_len, cfg.hidden_size, device=device,
                                                        dtype=dtype))
        self.adaption_gate = nn.Parameter(torch.zeros(heads if config.gate == "head" else 1, device=device,
                                                      dtype=dtype))
        if init:
            nn.init.normal_(self.adaption_prompt)

    def branch(self, module: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, weight: float):
        """W_o (g softmax(Q K_p^T / sqrt(d)) V_p) for hidden states ``h`` (B, T, C)."""
        hd, groups = module.head_dim, module.num_key_value_groups
        q = module.q_proj(h).unflatten(-1, (-1, hd)).transpose(1, 2)  # (B, H, T, d)
        q = q * cos.unsqueeze(1) + _rotate_half(q) * sin.unsqueeze(1)
        p = self.adaption_prompt.to(q.dtype)
        k = module.k_proj(p).unflatten(-1, (-1, hd)).transpose(0, 1).repeat_interleave(groups, 0)  # (H, K, d)
        v = module.v_proj(p).unflatten(-1, (-1, hd)).transpose(0, 1).repeat_interleave(groups, 0)
        scores = F.softmax((q @ k.transpose(-1, -2)) / math.sqrt(hd), dim=-1, dtype=torch.float32).to(q.dtype)
        gate = self.adaption_gate * weight if weight != 1.0 else self.adaption_gate
        out = ((gate.to(q.dtype).view(-1, 1, 1) * scores) @ v).transpose(1, 2).flatten(2)  # (B, T, H d)
        # o_proj's linear part, through whatever adapts o_proj (v2's scale, a LoRA); its bias is not added twice
        return module.o_proj(out) - module.o_proj(out.new_zeros(out.shape[-1]))

    def post(self, module, args, kwargs, output, weight):
        h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        pos = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
        if pos is None:
            raise ValueError(f"LlamaAdapter at {self.site}: the attention was called without position_embeddings "
                             "(the rotary cos/sin its decoder layer passes)")
        main = output[0] if isinstance(output, tuple) else output
        new = main + self.branch(module, h, *pos, weight).to(main.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new


class BiasScale(AnnexDelta):
    """v2's bias and scale of one Linear layer: y = s * (W x + b), b = 0 and s = 1 at init (per output
    channel); with adapter weight w, b -> w b and s -> 1 + w (s - 1)."""

    category = "additive"
    mergeable = False  # (it could fold into W and b; the prompts beside it cannot, so the adapter never fuses)

    def __init__(self, config: LlamaAdapter, site: str, layer: nn.Linear, init: bool = True):
        super().__init__(config, site)
        w = layer.weight
        kw = dict(dtype=delta_dtype(w), device=w.device if init else "meta")
        self.adapter_bias = nn.Parameter(torch.zeros(layer.out_features, **kw))
        self.adapter_scale = nn.Parameter(torch.ones(layer.out_features, **kw))

    def post(self, module, args, kwargs, output, weight):
        b, s = self.adapter_bias, self.adapter_scale
        if weight != 1.0:
            b, s = b * weight, 1.0 + weight * (s - 1.0)
        return s.to(output.dtype) * (output + b.to(output.dtype))


PEFT_CONFIG, PEFT_FILE = "adapter_config.json", "adapter_model.safetensors"


def save_peft(model: nn.Module, folder, name: str = "default") -> Path:
    """Write adapter ``name`` as a peft adapter folder (``adapter_model.safetensors`` + ``adapter_config.json``,
    what ``PeftModel.from_pretrained`` reads), atomically: the folder is replaced whole. Only ``gate="layer"``
    adapters fit peft's layout."""
    from ..adapter_files import save_adapter
    from ..api import sites
    from ..io.files import write_folder

    found = [d for d in (s.deltas[name] for _, s in sites(model) if name in s.deltas) if isinstance(d, AdaptionPrompt)]
    if not found:
        raise ValueError(f"no LlamaAdapter named {name!r} in this {type(model).__name__}")
    config = found[0].config
    if config.norms or config.bias_scale:
        raise ValueError("peft's adaption prompt holds v1 only (prompts and gates); this adapter also trains "
                         "v2's norms / biases and scales: save it in the native format")
    peft_config = {"peft_type": "ADAPTION_PROMPT", "task_type": "CAUSAL_LM", "target_modules": "self_attn",
                   "adapter_len": config.adapter_len, "adapter_layers": len(found), "inference_mode": True}

    def fill(tmp: Path):
        tmp.mkdir()
        save_adapter(model, tmp / PEFT_FILE, name, format="peft")
        (tmp / PEFT_CONFIG).write_text(json.dumps(peft_config, indent=2))

    return write_folder(folder, fill)
