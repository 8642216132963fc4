"""IP-Adapter — Ye et al., "IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image Diffusion
Models", arXiv 2308.06721.

Decoupled cross-attention (Eq. 5): Z = Attn(Q, K, V) + lambda * Attn(Q, K', V'), K' = c_i W'_k, V' = c_i W'_v,
where c_i are N context tokens made from an image prompt by an image projection (``image_projection.py``:
Linear + LayerNorm over the CLIP image embedding, or the "plus" resampler over its patch features). Two kinds
of annex: the projection beside the U-Net itself (its pre-hook turns this call's image prompt into tokens) and
``to_k_ip`` / ``to_v_ip`` beside each cross-attention. The image term is added where diffusers'
``IPAdapterAttnProcessor2_0`` adds it, to the input of the output projection, with the query the processor
computed (one-call hooks on ``to_q`` and ``to_out[0]``, so a LoRA there is respected and neither is computed
twice); a processor that calls neither (fused QKV) gets it after the fact through to_out's linear part.
Attention processors are not replaced.

lambda is the adapter's weight per site: ``pd.set_adapters`` (patterns) or ``set_ip_adapter_scale`` (diffusers'
InstantStyle dicts; ``image_prompt.py``). The image prompt is a per-call input: ``pd.image_prompt(pipe, images)`` or
``pd.inputs(pipe, image_embeds=..., negative_image_embeds=...)`` (the plus variant: ``image_hidden_states``,
``negative_image_hidden_states``); with a negative and a U-Net batch of 2k copies, the first half (classifier-
free guidance's unconditional half) gets the negative, as diffusers' pipelines lay it out. Without an input,
diffusers' own ``added_cond_kwargs={"image_embeds": [...]}`` is read (``pipe(..., ip_adapter_image_embeds=)``);
with none at all, the output is exactly the base's.

Trained: the projection and to_k_ip / to_v_ip (initialised from to_k / to_v as in the paper, or to_v_ip at zero
with ``init="zero"``: identity even with an image prompt). Saved: ``image_proj.*`` on the U-Net and
``<attn2>.to_k_ip.weight`` / ``.to_v_ip.weight``; format "ip-adapter" writes what diffusers' ``load_ip_adapter``
reads. Not mergeable (the image term depends on the call's image). SD1.5, 1024-wide embedding, 4 tokens:
22,319,616 trainable parameters (tests/test_ip_adapter.py).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MethodConfig
from ..core import AnnexDelta, Host, fit_batch, lookup
from ..registry import register_method
from .image_projection import LinearProjection, Resampler, resampler_names

MAX_DEPTH = 16  # resampler blocks whose names are declared (files split their keys with them)
INPUTS = {False: ("image_embeds", "negative_image_embeds"),
          True: ("image_hidden_states", "negative_image_hidden_states")}


def _layer(m: nn.Module) -> nn.Module:
    return m.base if isinstance(m, Host) else m


def is_cross_attention(m: nn.Module) -> bool:
    return "Attention" in type(m).__name__ and bool(getattr(m, "is_cross_attention", False)) and hasattr(m, "to_k")


class _Call:
    """What the U-Net's projection annex hands to the attention annexes of the same adapter in one call
    (``tokens``), and the last inference call's image features and tokens: a pipeline's denoising steps give the
    same image prompt each step, so its tokens (and each layer's K', V') are computed once per prompt."""
    tokens: torch.Tensor | None = None
    feats: torch.Tensor | None = None
    key: tuple | None = None
    cached: torch.Tensor | None = None

    def __deepcopy__(self, memo):  # a copied model starts with nothing in flight and nothing reused (the tokens
        return _Call()  # stay past the call for gradient checkpointing's recomputation, part of its graph)


class _Pass:
    """One cross-attention's state within a call: the query its processor computed, whether the image term was
    added, lambda, and the one-call hooks on ``to_q`` / ``to_out[0]``."""

    __slots__ = ("query", "added", "weight", "hooks", "kv_key", "kv")

    def __init__(self):
        self.query, self.added, self.weight, self.hooks = None, False, 1.0, []
        self.kv_key, self.kv = None, None  # K', V' of the last inference call's tokens, and what they came from

    def __deepcopy__(self, memo):
        return _Pass()

    def drop_hooks(self) -> None:
        for handle in self.hooks:
            handle.remove()
        self.hooks = []


def encoder_width(encoder: nn.Module, plus: bool) -> int:
    """The width of what the image encoder gives this variant: patch features (hidden_size) or the projected
    embedding (projection_dim)."""
    cfg = encoder.config
    width = getattr(cfg, "hidden_size", None) if plus else getattr(cfg, "projection_dim", None)
    if width is None or (not plus and not hasattr(encoder, "visual_projection")):
        raise ValueError(f"{type(encoder).__name__} gives no {'patch features' if plus else 'projected image embedding'}"
                         "; IP-Adapter needs a CLIPVisionModelWithProjection")
    return int(width)


@register_method("ip-adapter")
@dataclasses.dataclass
class IPAdapter(MethodConfig):
    """image_embed_dim: the image encoder's width (None: read from the pipeline's ``image_encoder``);
    num_tokens: N; plus: the resampler over patch features (depth blocks, heads of 64, hidden_dim wide, None =
    the U-Net's cross-attention width); init: "copy" (to_k_ip/to_v_ip from to_k/to_v) or "zero" (to_v_ip = 0);
    target: cross-attention modules (None: every one)."""

    category: ClassVar[str] = "additive"
    site_kind: ClassVar[str] = "annex"
    needs_image_encoder: ClassVar[bool] = True  # the trainer registers one (training/call_inputs.py)
    param_names: ClassVar[tuple[str, ...]] = (
        "to_k_ip.weight", "to_v_ip.weight", "image_proj.proj.weight", "image_proj.proj.bias",
        "image_proj.norm.weight", "image_proj.norm.bias") + tuple(f"image_proj.{n}" for n in resampler_names(MAX_DEPTH))

    image_embed_dim: int | None = None
    num_tokens: int = 4
    plus: bool = False
    depth: int = 4
    heads: int = 12
    hidden_dim: int | None = None
    init: str = "copy"

    def __post_init__(self):
        super().__post_init__()
        for f in ("num_tokens", "depth", "heads"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"IPAdapter {f} must be a positive integer, got {v!r}")
        if self.depth > MAX_DEPTH:
            raise ValueError(f"IPAdapter depth must be at most {MAX_DEPTH}, got {self.depth}")
        if self.init not in ("copy", "zero"):
            raise ValueError(f"IPAdapter init must be 'copy' or 'zero', got {self.init!r}")

    def resolved(self, model: nn.Module) -> "IPAdapter":
        return self

    def bind(self, obj, model: nn.Module, name: str) -> "IPAdapter":
        encoder = None if isinstance(obj, nn.Module) else getattr(obj, "image_encoder", None)
        width = encoder_width(encoder, self.plus) if encoder is not None else None
        dim = self.image_embed_dim
        if dim is None and width is None:
            raise ValueError(f"IP-Adapter {name!r}: the image encoder's width is unknown (no image_encoder in "
                             f"{type(obj).__name__}): set image_embed_dim or give the pipeline an image_encoder")
        if dim is not None and width is not None and dim != width:
            raise ValueError(f"IP-Adapter {name!r}: its image projection takes {dim}-wide image features but the "
                             f"pipeline's image encoder ({type(encoder).__name__}) gives {width}-wide ones "
                             f"({'hidden_size' if self.plus else 'projection_dim'}): use the encoder it was made for")
        bound = dataclasses.replace(self, image_embed_dim=dim or width)
        bound._call = _Call()
        return bound

    def batch_inputs(self, pipe, pixels: torch.Tensor, dropout: float):
        """The trainer's per-batch image prompts (``training/call_inputs.py``): each instance image prompts its
        own item; as in the paper (Sec. 3.3) an item drops its caption, its image or both, each with probability
        ``dropout``, drawn from the item's own random stream; prior items get the negative (no image)."""
        name = INPUTS[self.plus][0]
        encoded = self._encode(pipe, pixels, negative=True)
        pos, neg = encoded[name], encoded[INPUTS[self.plus][1]]

        def make(batch):
            inst = batch["instance"].to(pos.device)
            # one uniform per item, a function of the item alone: the normal CDF of one of its noise values
            u = torch.special.ndtr(batch["noise"][:, 0].flatten(1)[:, 0].float()).to(pos.device)
            drop_image = (u >= dropout) & (u < 3 * dropout)
            drop_text = (u < dropout) | ((u >= 2 * dropout) & (u < 3 * dropout))
            mask = drop_image.view(-1, *[1] * (pos.dim() - 1))
            prompts = torch.where(mask, neg[inst], pos[inst])
            n_prior = int((batch["prior"] >= 0).sum()) if "prior" in batch else 0
            if n_prior:  # the prior items follow the instance items in the U-Net batch
                prompts = torch.cat([prompts, neg[:1].expand(n_prior, *neg.shape[1:])])
                drop_text = torch.cat([drop_text, drop_text.new_zeros(n_prior)])
            return {name: prompts}, drop_text

        return make

    def validation_inputs(self, pipe, pixels: torch.Tensor, guidance: bool) -> dict:
        """The trainer's validation image prompt: the first instance image (the negative only with guidance)."""
        return self._encode(pipe, pixels[:1], negative=guidance)

    def _encode(self, pipe, pixels: torch.Tensor, negative: bool) -> dict:
        """``encode_image_prompt`` of training pixels ([N, 3, H, W] in [-1, 1]) through the pipe's processor."""
        images = ((pixels.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        clip = pipe.feature_extractor(images=list(images), do_rescale=False, return_tensors="pt").pixel_values
        from .image_prompt import encode_image_prompt

        return {k: v for k, v in encode_image_prompt(pipe, clip, negative=negative).items() if k in INPUTS[self.plus]}

    def select(self, model: nn.Module) -> list[str]:
        if self.target is None:
            found = [n for n, m in model.named_modules() if n and is_cross_attention(m) and ".deltas." not in n]
        else:
            found = [n for n in self.target.select(model, "annex") if n]
            bad = [n for n in found if not is_cross_attention(model.get_submodule(n))]
            if bad:
                raise ValueError(f"IPAdapter target {self.target} selects {bad[:3]}, which are not cross-attention "
                                 "modules (diffusers Attention with is_cross_attention)")
        if not found:
            raise ValueError(f"IPAdapter finds no cross-attention module in this {type(model).__name__}")
        return [""] + found

    def build(self, base: nn.Module, site: str, init: bool = True):
        if not hasattr(self, "_call"):
            self._call = _Call()
        if site == "":
            return ImageProjectionDelta(self, site, base, init)
        if not is_cross_attention(base):
            raise ValueError(f"IP-Adapter site {site!r} is a {type(base).__name__}, not a cross-attention")
        return IPAttentionDelta(self, site, base, init)


class ImageProjectionDelta(AnnexDelta):
    """The image projection beside the U-Net: its pre-hook makes this call's image tokens (None: no image)."""

    category = "additive"

    def __init__(self, config: IPAdapter, site: str, model: nn.Module, init: bool = True):
        super().__init__(config, site)
        if config.image_embed_dim is None:
            raise ValueError("IPAdapter needs image_embed_dim (inject into a pipeline with an image_encoder, or set it)")
        dims = {_layer(m.to_k).in_features for m in model.modules() if is_cross_attention(m)}
        if len(dims) != 1:
            raise ValueError(f"IP-Adapter needs one cross-attention width in {type(model).__name__}, found {sorted(dims)}")
        context = dims.pop()
        ref = next(model.parameters())
        kw = dict(device=ref.device if init else "meta",
                  dtype=torch.float32 if ref.dtype in (torch.float16, torch.bfloat16) else ref.dtype)
        if config.plus:
            self.image_proj = Resampler(config.image_embed_dim, context, config.num_tokens,
                                        config.hidden_dim or context, config.depth, config.heads, **kw)
        else:
            self.image_proj = LinearProjection(config.image_embed_dim, context, config.num_tokens, **kw)

    def features(self, model, args, kwargs) -> torch.Tensor | None:
        """This call's image features as [U-Net batch, images, ...], or None without an image prompt."""
        plus = self.config.plus
        sample = args[0] if args else kwargs["sample"]
        batch = sample.shape[0]
        pos = lookup(INPUTS[plus][0], model, None)
        if pos is None:
            extra = kwargs.get("added_cond_kwargs") or {}
            if getattr(getattr(model, "config", None), "encoder_hid_dim_type", None) == "ip_image_proj":
                return None  # diffusers' own IP-Adapter is loaded: those embeddings are its
            pos = extra.get("image_embeds")
            if isinstance(pos, (list, tuple)):
                if len(pos) != 1:
                    raise ValueError(f"added_cond_kwargs['image_embeds'] holds {len(pos)} tensors; one IP-Adapter "
                                     "reads one (give each adapter its input with pd.inputs)")
                pos = pos[0]
            return None if pos is None else fit_batch(self.shaped(pos, "added_cond_kwargs['image_embeds']"), batch)
        pos = self.shaped(pos, INPUTS[plus][0])
        neg = lookup(INPUTS[plus][1], model, None)
        if neg is not None and batch % (2 * pos.shape[0]) == 0:  # classifier-free guidance: [negative; positive]
            neg = self.shaped(neg, INPUTS[plus][1])
            return torch.cat([fit_batch(neg, batch // 2), fit_batch(pos, batch // 2)])
        return fit_batch(pos, batch)

    def shaped(self, t: torch.Tensor, what: str) -> torch.Tensor:
        ndim = 3 if self.config.plus else 2  # [B, L, W] patch features or [B, D] embeddings; one more: images
        if not torch.is_tensor(t) or t.ndim not in (ndim, ndim + 1):
            raise ValueError(f"{what} must be a tensor of {ndim} or {ndim + 1} dimensions, got "
                             f"{tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}")
        if t.shape[-1] != self.config.image_embed_dim:
            raise ValueError(f"{what} is {t.shape[-1]} wide but this IP-Adapter's image projection takes "
                             f"{self.config.image_embed_dim}-wide features (image_embed_dim)")
        return t.unsqueeze(1) if t.ndim == ndim else t

    def detach(self, site) -> None:
        call = self.config._call
        call.tokens = call.feats = call.key = call.cached = None

    def pre(self, model, args, kwargs, weight):
        self.config._call.tokens = None
        feats = self.features(model, args, kwargs)
        if feats is None:
            return None
        call = self.config._call
        key = _reuse_key(self.image_proj.parameters())
        if key is not None and call.feats is not None and call.key == key and call.feats.shape == feats.shape \
                and torch.equal(call.feats, feats):
            call.tokens = call.cached  # the same image features and weights as the last call: the same tokens
            return None
        p = next(self.image_proj.parameters())
        tokens = self.image_proj(feats.reshape(-1, *feats.shape[2:]).to(p.device, p.dtype))
        call.tokens = tokens.reshape(feats.shape[0], -1, tokens.shape[-1])
        # a copy: the features may be a view of the caller's tensor, which it may change in place
        call.feats, call.key, call.cached = (feats.clone(), key, call.tokens) if key is not None else (None, None, None)
        return None


def _reuse_key(params):
    """What must stay the same for a result computed from ``params`` to be reused (each one's storage and
    version: an optimizer step, ``load_adapter`` or ``.to()`` changes it); None while gradients are recorded
    (training needs the graph)."""
    if torch.is_grad_enabled():
        return None
    return tuple((p.data_ptr(), p._version) for p in params)


class IPAttentionDelta(AnnexDelta):
    """to_k_ip / to_v_ip beside one cross-attention; adds lambda * Attn(Q, K', V') before its output projection."""

    category = "additive"

    def __init__(self, config: IPAdapter, site: str, attn: nn.Module, init: bool = True):
        super().__init__(config, site)
        self.heads = attn.heads
        to_k, to_v = _layer(attn.to_k), _layer(attn.to_v)
        kw = dict(device=to_k.weight.device if init else "meta", dtype=torch.float32 if to_k.weight.dtype in (
            torch.float16, torch.bfloat16) else to_k.weight.dtype)
        self.to_k_ip = nn.Linear(to_k.in_features, to_k.out_features, bias=False, **kw)
        self.to_v_ip = nn.Linear(to_v.in_features, to_v.out_features, bias=False, **kw)
        if init:
            with torch.no_grad():
                self.to_k_ip.weight.copy_(to_k.weight)
                if config.init == "zero":
                    self.to_v_ip.weight.zero_()
                else:
                    self.to_v_ip.weight.copy_(to_v.weight)

    def pre(self, attn, args, kwargs, weight):
        """With an image prompt, two one-call hooks: keep the query the processor computes (``to_q``'s output)
        and add lambda * Attn(Q, K', V') to the input of ``to_out[0]``, where diffusers' processor adds it: one
        query and one output projection, shared with the text branch. ``post`` removes them. (Hooks kept from
        call to call measured no faster, and would have to follow a LoRA wrapping ``to_q`` later.)"""
        run = self._run
        run.drop_hooks()
        run.query, run.added = None, False
        if getattr(self.config, "_call", _Call).tokens is None or weight == 0:
            return None
        run.weight = weight
        run.hooks = [attn.to_q.register_forward_hook(self._keep_query),
                     attn.to_out[0].register_forward_pre_hook(self._add_before_out)]
        return None

    @property
    def _run(self) -> "_Pass":
        """This call's state, a plain object (``nn.Module.__setattr__`` costs microseconds per attribute)."""
        run = self.__dict__.get("_pass")
        if run is None:
            run = self.__dict__["_pass"] = _Pass()
        return run

    def detach(self, site) -> None:  # removed: no one-call hook of a call that failed half-way stays behind
        self._run.drop_hooks()
        self._run.kv_key, self._run.kv = None, None

    def _keep_query(self, module, args, output):
        self._run.query = output

    def _add_before_out(self, module, args):
        run = self._run
        if run.query is None or args[0].shape[:-1] != run.query.shape[:-1]:
            return None
        hidden = args[0] + self._image_term(run.query, run.weight)
        run.query, run.added = None, True
        return (hidden,) + tuple(args[1:])

    def _image_term(self, query: torch.Tensor, weight: float) -> torch.Tensor:
        """lambda * Attn(Q, K', V') in the heads-merged layout [B, L, inner]."""
        tokens = self.config._call.tokens
        b, heads = query.shape[0], self.heads
        head_dim = self.to_k_ip.out_features // heads
        dtype = self.to_k_ip.weight.dtype

        def split(t):
            return t.reshape(b, -1, heads, head_dim).transpose(1, 2)

        run, key = self._run, _reuse_key((self.to_k_ip.weight, self.to_v_ip.weight))
        if key is not None and run.kv is not None and run.kv_key[0] is tokens and run.kv_key[1:] == (b,) + key:
            k, v = run.kv
        else:
            tokens_b = fit_batch(tokens, b).to(dtype)
            k, v = split(self.to_k_ip(tokens_b)), split(self.to_v_ip(tokens_b))
            run.kv_key, run.kv = ((tokens, b) + key, (k, v)) if key is not None else (None, None)
        ip = F.scaled_dot_product_attention(split(query.to(dtype)), k, v)
        return ip.transpose(1, 2).reshape(b, -1, heads * head_dim).to(query.dtype) * weight

    def post(self, attn, args, kwargs, output, weight):
        run = self._run
        added_inside = run.added
        run.drop_hooks()
        run.query, run.added = None, False
        if added_inside or getattr(self.config, "_call", _Call).tokens is None or weight == 0:
            return None
        # The processor did not call to_q and to_out[0] (e.g. fused QKV projections): the term from scratch,
        # through to_out's linear part (to_out is affine: no bias twice), divided by rescale_output_factor
        hs = args[0] if args else kwargs["hidden_states"]
        if getattr(attn, "spatial_norm", None) is not None:
            hs = attn.spatial_norm(hs, kwargs.get("temb"))
        shape = hs.shape
        if hs.ndim == 4:
            hs = hs.view(shape[0], shape[1], -1).transpose(1, 2)
        if getattr(attn, "group_norm", None) is not None:
            hs = attn.group_norm(hs.transpose(1, 2)).transpose(1, 2)
        ip = self._image_term(attn.to_q(hs), weight)
        out_proj = attn.to_out[0]
        if type(out_proj) is nn.Linear:
            added = F.linear(ip, out_proj.weight)
        else:  # a Host (a LoRA on to_out) or another affine layer: its linear part, bias removed
            added = out_proj(ip) - out_proj(torch.zeros_like(ip[:1, :1]))
        added = attn.to_out[1](added)
        if len(shape) == 4:
            added = added.transpose(-1, -2).reshape(shape)
        return output + (added / attn.rescale_output_factor).to(output.dtype)
