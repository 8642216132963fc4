"""IP-Adapter files in the layout diffusers' ``pipe.load_ip_adapter`` reads (and the IP-Adapter authors publish):
``image_proj.<key>`` for the image projection and ``ip_adapter.<n>.to_k_ip.weight`` / ``.to_v_ip.weight`` per
cross-attention, no component prefix (the U-Net's).

The numbering is diffusers' (``UNet2DConditionLoadersMixin._convert_ip_adapter_attn_to_diffusers``): the
attention modules in model order, every one not named ``attn1`` (and not in ``motion_modules``) counts as a
cross-attention, and the i-th gets n = 2 i + 1. Reading therefore needs the model's module names; writing
needs an adapter on every cross-attention (the default target). The image projection's keys are the
method's own parameter names (``methods/image_projection.py``), so they are copied as they are; its kind and
sizes (plain: ``proj``/``norm``, 4 tokens in diffusers; plus: the resampler's ``latents``, ``layers.<i>``...)
are read from the shapes. Other kinds (Full, FaceID) are refused by name.
"""
from __future__ import annotations

import re

from ..registry import method_config, register_format
from .adapter_data import AdapterData

METHOD = "ip-adapter"
PROJ, ATTN = "image_proj.", "ip_adapter."
PARAMS = ("to_k_ip.weight", "to_v_ip.weight")
HEAD_DIM = 64  # diffusers' loader reads the resampler's heads as to_q rows // 64
PLUS_DEPTH = 4  # and builds this many resampler blocks (IPAdapterPlusImageProjection's default)


def cross_attention_sites(module_names) -> list[str]:
    """The model's cross-attentions in diffusers' numbering order, from its layer names (``to_k`` parents)."""
    out = {}
    for name in module_names:
        if name.endswith(".to_k"):
            parent = name[: -len(".to_k")]
            if not parent.endswith("attn1") and "motion_modules" not in parent:
                out[parent] = None
    return list(out)


def projection_config(proj: dict):
    """The IPAdapter config an ``image_proj`` state dict was made by (its sizes read from the shapes)."""
    cls = method_config(METHOD)
    if "proj.weight" in proj and "norm.weight" in proj:
        rows, dim = proj["proj.weight"].shape
        width = proj["norm.weight"].shape[0]
        if rows % width:
            raise ValueError(f"image_proj.proj.weight has {rows} rows, not a multiple of the token width {width}")
        return cls(image_embed_dim=int(dim), num_tokens=rows // width)
    if "latents" in proj:
        _, tokens, hidden = proj["latents"].shape
        depth = len({k.split(".")[1] for k in proj if re.match(r"layers\.\d+\.0\.to_q\.weight$", k)})
        heads = proj["layers.0.0.to_q.weight"].shape[0] // HEAD_DIM
        ff = proj["layers.0.1.1.weight"].shape[0]
        if ff != 4 * hidden:
            raise ValueError(f"the resampler's feed-forward is {ff} wide; only 4 x {hidden} is supported")
        return cls(image_embed_dim=int(proj["proj_in.weight"].shape[1]), num_tokens=int(tokens), plus=True,
                   depth=depth, heads=int(heads), hidden_dim=int(hidden))
    raise ValueError(f"image_proj of a kind this package does not build (keys {sorted(proj)[:4]}...): plain "
                     "(proj, norm) and plus (latents, proj_in, layers...) IP-Adapters are supported")


class IPAdapterFile:
    name = "ip-adapter"
    alias = "diffusers"  # what users ask for: format="diffusers" writes what diffusers' loader reads
    methods = (METHOD,)
    default_file = "ip-adapter.safetensors"

    @staticmethod
    def detect(tensors: dict, metadata: dict) -> bool:
        return bool(tensors) and all(k.startswith((PROJ, ATTN)) for k in tensors) and any(
            k.startswith(ATTN) and k.endswith(".to_k_ip.weight") for k in tensors)

    @staticmethod
    def to_native(tensors: dict, metadata: dict, module_names=None) -> AdapterData:
        proj = {k[len(PROJ):]: t for k, t in tensors.items() if k.startswith(PROJ)}
        config = projection_config(proj)
        layers = module_names("unet") if module_names is not None else None
        if not layers:
            raise ValueError("IP-Adapter files number the U-Net's cross-attentions: load the file into a U-Net "
                             "or a pipeline with one")
        sites = cross_attention_sites(layers)
        numbers = sorted({int(m.group(1)) for k in tensors if (m := re.match(r"ip_adapter\.(\d+)\.", k))})
        if len(numbers) != len(sites):
            raise ValueError(f"the file holds {len(numbers)} cross-attention layers (ip_adapter.<n>) but this U-Net "
                             f"has {len(sites)}: it was made for another U-Net")
        out = {"": {PROJ + k: t for k, t in proj.items()}}
        sources = {("unet", ""): [PROJ + k for k in proj]}
        used = set(sources["unet", ""])
        for i, site in enumerate(sites):
            keys = {p: f"{ATTN}{2 * i + 1}.{p}" for p in PARAMS}
            out[site] = {p: tensors[k] for p, k in keys.items() if k in tensors}
            sources["unet", site] = list(keys.values())
            used.update(keys.values())
        unknown = sorted(set(tensors) - used)
        return AdapterData({"unet": config}, {"unet": out}, unknown=unknown, sources=sources)

    @staticmethod
    def from_native(data: AdapterData) -> tuple[dict, dict]:
        if len(data.configs) != 1:
            raise ValueError(f"IP-Adapter files hold one U-Net's adapter, not components {sorted(data.configs)}")
        (comp, config), = data.configs.items()
        if config.method != METHOD:
            raise ValueError(f"the ip-adapter format holds IP-Adapters, not {config.method!r}")
        if config.target is not None:
            raise ValueError("diffusers' load_ip_adapter needs an adapter on every cross-attention; this one has a "
                             f"target ({config.target}): save it in the native format")
        if config.plus and config.depth != PLUS_DEPTH:
            raise ValueError(f"diffusers' load_ip_adapter builds {PLUS_DEPTH} resampler blocks; this adapter has "
                             f"{config.depth}: save it in the native format")
        sites = data.tensors[comp]
        flat = dict(sites.get("", {}))
        for i, site in enumerate(s for s in sites if s):
            for p in PARAMS:
                flat[f"{ATTN}{2 * i + 1}.{p}"] = sites[site][p]
        return flat, {}


register_format(IPAdapterFile)
