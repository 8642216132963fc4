"""LyCORIS files (lycoris-lora, KohakuBlueleaf): LoCon, LoHa and LoKr, read and written.

Keys are ``<prefix>_<module path with _>.<parameter>``. The prefix is ``lycoris`` for a network built with
``lycoris.create_lycoris(model)`` (paths relative to that one model, read back by
``create_lycoris_from_weights``), or kohya's ``lora_unet`` / ``lora_te`` / ``lora_te1`` / ``lora_te2`` for one
built through ``lycoris.kohya`` (sd-scripts), the naming A1111 and ComfyUI load. The parameter names tell the
algorithm of each module (lycoris/modules/*.py ``weight_list``):

  LoCon  lora_down.weight, lora_up.weight [, lora_mid.weight]          -> our ``lora``
  LoHa   hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b [, hada_t1, hada_t2] -> ``loha`` (same names)
  LoKr   lokr_w1 | lokr_w1_a + lokr_w1_b, lokr_w2 | lokr_w2_a + lokr_w2_b [, lokr_t2] -> ``lokr`` (same names)

and a 0-d ``alpha`` per module: scale = alpha / rank, alpha 0 or missing meaning scale 1; a LoKr module whose
two Kronecker factors are both full matrices has scale 1 whatever its alpha (LyCORIS's rule, which ComfyUI and
A1111 follow). Reading infers each module's rank, alpha, tucker use and LoKr factor from the tensor shapes and
writes them as exact per-site patterns, so the method's ``build(layer, site)`` yields the file's shapes. A
tucker LoCon (``lora_mid``) is folded into a plain LoRA of the same rank: A = mid x_1 down, exactly.

Writing: ``format="lycoris"`` names one model ``lycoris_...`` (several components take kohya's prefixes,
which is what LyCORIS's kohya loader reads); ``format="kohya"`` always writes kohya's prefixes.
Other LyCORIS algorithms (OFT, BOFT, IA3, GLoRA, full, norms, DoRA, T-LoRA) raise an error naming them.
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict

import torch

from ..registry import method_config, register_format
from .adapter_data import AdapterData, matrix, scalar
from .kohya import PREFIXES as KOHYA_PREFIXES, SUFFIXES as KOHYA_SUFFIXES, Sites, file_prefixes

PREFIXES = {"lycoris": "", **KOHYA_PREFIXES}  # key prefix -> component ("": the model the network was built on)
LORA_NAMES = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")  # kohya's names for LoRA's tensors
NATIVE = ("loha", "lokr")  # our methods that save under LyCORIS' own names (their configs' ``param_names``)


def method_of(param: str) -> str | None:
    """Our method whose saved tensors include LyCORIS parameter ``param`` (None: not one we read)."""
    if param in LORA_NAMES:
        return "lora"
    return next((m for m in NATIVE if param in method_config(m).param_names), None)


REQUIRED = {  # what every module of a method needs; "a|b c": a, or both b and c
    "lora": ("lora_down.weight", "lora_up.weight"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "lokr": ("lokr_w1|lokr_w1_a lokr_w1_b", "lokr_w2|lokr_w2_a lokr_w2_b"),
}
# our method -> LyCORIS's ``algo``; KronA / DiffuseKronA are LoKr with both factors full (scale 1)
ALGO = {"lora": "locon", "loha": "loha", "lokr": "lokr", "krona": "lokr", "diffusekrona": "lokr"}
UNSUPPORTED = {  # parameter name -> the LyCORIS algorithm it reveals
    "oft_blocks": "OFT (diag-oft / boft)", "rescale": "OFT rescaling (rescaled=True)",
    "on_input": "IA3", "weight": "IA3", **dict.fromkeys(("diff", "diff_b"), "full fine-tuning (algo=full)"),
    **dict.fromkeys(("w_norm", "b_norm"), "norm-layer tuning (train_norm)"),
    **dict.fromkeys(("a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight"), "GLoRA"),
    "dora_scale": "DoRA weight decomposition (dora_wd)", "lokr_t1": "LoKr with a tucker w1 (lokr_t1)",
    **dict.fromkeys(("lambda_layer", "q_layer.weight", "p_layer.weight"), "T-LoRA"),
}
OFT_KIND = {3: "Diag-OFT (diag-oft)", 4: "BOFT (boft)"}  # oft_blocks' dimensions tell the two apart


def split_key(key: str) -> tuple[str, str, str] | None:
    """(component, underscored module path, parameter) of a LyCORIS key, or None."""
    stem, _, param = key.partition(".")
    for prefix in sorted(PREFIXES, key=len, reverse=True):
        if stem.startswith(prefix + "_") and param:
            return PREFIXES[prefix], stem[len(prefix) + 1:], param
    return None


def unsupported(tensors: dict) -> None:
    """Raise naming every algorithm we do not implement and the keys that revealed it."""
    found: dict[str, list[str]] = defaultdict(list)
    for key, t in tensors.items():
        parts = split_key(key)
        if parts and parts[2] in UNSUPPORTED:
            algo = OFT_KIND.get(t.ndim, UNSUPPORTED[parts[2]]) if parts[2] == "oft_blocks" else UNSUPPORTED[parts[2]]
            found[algo].append(key)
    if found:
        raise ValueError("LyCORIS algorithms not supported: " + "; ".join(
            f"{algo} (keys such as {sorted(keys)[:3]})" for algo, keys in found.items()))


def _alpha(params: dict, rank: int) -> float:
    alpha = float(params["alpha"]) if "alpha" in params else 0.0
    return alpha or float(rank)  # LyCORIS: alpha None or 0 means alpha = rank


def _patterns(values: dict[str, float]) -> tuple[float, dict]:
    """The most common value and {site: value} for the sites that differ from it."""
    common = Counter(values.values()).most_common(1)[0][0]
    return common, {s: v for s, v in values.items() if v != common}


def _missing(method: str, params: dict) -> list[str]:
    return [need for need in REQUIRED[method] if not any(set(alt.split()) <= params.keys() for alt in need.split("|"))]


def read_locon(sites: dict, layers) -> tuple:
    ranks, alphas, out = {}, {}, {}
    for site, p in sites.items():
        down = p["lora_down.weight"]
        if "lora_mid.weight" in p:  # tucker: dW = up x mid x down; mid (r, r, *k) folded into down (r, in, 1..)
            down = torch.einsum("pq...,qi->pi...", p["lora_mid.weight"].float(), down.flatten(1).float()).to(down.dtype)
        ranks[site] = down.shape[0]
        alphas[site] = _alpha(p, down.shape[0])
        out[site] = {"lora_A.weight": down, "lora_B.weight": p["lora_up.weight"]}
    r, rank_pattern = _patterns(ranks)
    alpha, alpha_pattern = _patterns(alphas)
    return method_config("lora")(r=r, alpha=alpha, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern), out


def read_loha(sites: dict, layers) -> tuple:
    ranks, alphas = {}, {}
    for site, p in sites.items():
        ranks[site] = p["hada_w1_b"].shape[0]
        alphas[site] = _alpha(p, ranks[site])
    r, rank_pattern = _patterns(ranks)
    alpha, alpha_pattern = _patterns(alphas)
    config = method_config("loha")(r=r, alpha=alpha, use_tucker=any("hada_t1" in p for p in sites.values()),
                                   rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    return config, {s: {k: t for k, t in p.items() if k != "alpha"} for s, p in sites.items()}


def lokr_rank(p: dict) -> int | None:
    """The rank of a LoKr module, None when both factors are full matrices."""
    if "lokr_w1_a" in p:
        return p["lokr_w1_a"].shape[1]
    if "lokr_t2" in p:
        return p["lokr_t2"].shape[0]
    if "lokr_w2_a" in p:
        return p["lokr_w2_a"].shape[1]
    return None


def _lokr_factors(p: dict, layer) -> list:
    """Factor settings worth trying at one module: -1 (the balanced split), every factor size the file shows,
    and last the pair (a, c), W1's exact shape, which fits any split (LyCORIS' unbalanced_factorization too)."""
    w1 = p.get("lokr_w1")
    a, c = tuple(w1.shape) if w1 is not None else (p["lokr_w1_a"].shape[0], p["lokr_w1_b"].shape[1])
    out_dim, in_dim = layer.weight.shape[:2]
    return [-1] + sorted({a, c, out_dim // a, in_dim // c, max(a, c)}) + [(a, c)]


def _fits(LoKr, trial: dict, layer, site: str, shapes: dict) -> bool:
    try:
        return _shapes(LoKr(**trial).build(layer, site, init=False)) == shapes
    except ValueError:  # a pair that does not divide this layer
        return False


def read_lokr(sites: dict, layers) -> tuple:
    LoKr = method_config("lokr")
    ranks = {s: lokr_rank(p) for s, p in sites.items()}
    low = {s: r for s, r in ranks.items() if r is not None}
    flags = dict(use_tucker=any("lokr_t2" in p for p in sites.values()),
                 decompose_both=any("lokr_w1_a" in p for p in sites.values()), full_matrix=not low)
    r, rank_pattern = _patterns(low) if low else (1, {})
    alpha, alpha_pattern = _patterns({s: _alpha(sites[s], low[s]) for s in low}) if low else (1.0, {})
    full = ranks.keys() - low.keys() if low else ()  # (all full: full_matrix says it)
    for site in full:  # both factors full among low-rank modules: a rank this large builds them full
        w1, w2 = sites[site]["lokr_w1"], sites[site]["lokr_w2"]
        rank_pattern[site] = max(w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1])
    factors = {}
    for site, p in sites.items():  # the factor shows only against the real layer: try candidates by building
        layer = layers.get(site) if layers else None
        if layer is None:  # no model (inspection): the default factor
            continue
        shapes = {k: tuple(t.shape) for k, t in p.items() if k != "alpha"}
        trial = dict(r=rank_pattern.get(site, r), **flags)
        fits = [f for f in _lokr_factors(p, layer) if _fits(LoKr, {**trial, "factor": f}, layer, site, shapes)]
        if not fits:
            raise ValueError(f"LyCORIS LoKr module {site} has shapes {shapes}, which LoKr does not build for a "
                             f"{tuple(layer.weight.shape)} weight with these settings: {trial}")
        factors[site] = fits
    counts = Counter(f for fits in factors.values() for f in fits)
    factor = max(counts, key=lambda f: (counts[f], f == -1, isinstance(f, int))) if counts else -1
    config = LoKr(r=r, alpha=alpha, factor=factor, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                  factor_pattern={s: fits[0] for s, fits in factors.items() if factor not in fits}, **flags)
    return config, {s: {k: t for k, t in p.items() if k != "alpha"} for s, p in sites.items()}


def _shapes(delta) -> dict:
    return {k: tuple(v.shape) for k, v in delta.state_dict().items()}


def _alpha_tensor(value: float) -> torch.Tensor:
    return torch.tensor(float(value), dtype=torch.float32)


def locon_keys(config, site: str, params: dict) -> dict:
    down = params["lora_A.weight"]
    return {"lora_down.weight": down, "lora_up.weight": params["lora_B.weight"],
            "alpha": _alpha_tensor(config.scale(site) * down.shape[0])}  # alpha/r = our scale, rsLoRA included


def loha_keys(config, site: str, params: dict) -> dict:
    return {**params, "alpha": _alpha_tensor(config.scale(site) * params["hada_w1_b"].shape[0])}


def lokr_keys(config, site: str, params: dict) -> dict:
    r = lokr_rank(params)  # None: both factors full, scale 1 in every reader whatever alpha says
    return {**params, "alpha": _alpha_tensor(1.0 if r is None else config.scale(site) * r)}


READERS = {"lora": read_locon, "loha": read_loha, "lokr": read_lokr}
WRITERS = {"lora": locon_keys, "loha": loha_keys, "lokr": lokr_keys, "krona": lokr_keys, "diffusekrona": lokr_keys}


def group(tensors: dict, module_names, sources: dict | None = None) -> tuple[dict, dict, list[str]]:
    """component -> site -> {parameter: tensor}; component -> {site: layer} (none without a model); and the
    keys that name no module of the model (or only its alpha). ``sources`` gets (component, site) -> file keys.
    Every factor must have 2 dimensions or more and every alpha one value: the readers take ranks from them."""
    grouped: dict = defaultdict(lambda: defaultdict(dict))
    keys: dict = defaultdict(list)  # (component, site) -> its file keys
    resolve = Sites(module_names)

    def split(key):
        parts = split_key(key)
        return parts if parts is not None and (method_of(parts[2]) is not None or parts[2] == "alpha") else None

    placed, unknown = resolve.place(tensors, split)
    for key, comp, site, param, t in placed:
        if param == "alpha":
            scalar(key, t)
        else:
            matrix(key, t)
        grouped[comp][site][param] = t
        keys[comp, site].append(key)
    out: dict = defaultdict(dict)
    for comp, sites in grouped.items():
        for site, params in sites.items():
            if set(params) == {"alpha"}:
                unknown += keys[comp, site]
            else:
                out[comp][site] = params
                if sources is not None:
                    sources[comp, site] = keys[comp, site]
    layers_of = resolve.layers
    return dict(out), {c: {s: layers_of[c][s] for s in sites} for c, sites in out.items() if c in layers_of}, unknown


def network_args(config) -> dict:
    """sd-scripts' ``ss_network_args`` for LyCORIS (what its trainer would resume with)."""
    args = {"algo": ALGO[config.method]}
    for key in ("use_tucker", "factor", "decompose_both", "full_matrix"):
        if hasattr(config, key):
            args[key] = getattr(config, key)
    return args


class LycorisFiles:
    name = "lycoris"

    @staticmethod
    def detect(tensors: dict, metadata: dict) -> bool:
        """``lycoris_`` keys, or kohya keys with parameters a plain kohya LoRA does not have."""
        for key in tensors:
            parts = split_key(key)
            if parts and (key.startswith("lycoris_") or parts[2] not in KOHYA_SUFFIXES):
                return True
        return False

    @staticmethod
    def to_native(tensors: dict, metadata: dict, module_names=None) -> AdapterData:
        unsupported(tensors)
        sources: dict = {}
        grouped, layers, unknown = group(tensors, module_names, sources)
        configs, out = {}, {}
        for comp, sites in grouped.items():
            methods: dict = defaultdict(list)  # method -> its sites
            for site, p in sites.items():
                found = {method_of(k) for k in p if k != "alpha"}
                if len(found) > 1:
                    raise ValueError(f"LyCORIS module {site} mixes {sorted(ALGO[m] for m in found)} parameters")
                method = found.pop()
                if _missing(method, p):
                    raise ValueError(f"LyCORIS {ALGO[method]} module {site} lacks {_missing(method, p)}")
                methods[method].append(site)
            if len(methods) > 1:
                raise ValueError("the file mixes LyCORIS algorithms in one model (" + ", ".join(
                    f"{ALGO[m]} at {s[0]}" for m, s in methods.items()) + "): one adapter holds one method")
            configs[comp], out[comp] = READERS[next(iter(methods))](sites, layers.get(comp))
        return AdapterData(configs, out, unknown=unknown, sources=sources)

    @staticmethod
    def from_native(data: AdapterData, kohya: bool = False) -> tuple[dict, dict]:
        comps = list(data.tensors)
        prefix_of = file_prefixes(comps) if kohya or len(comps) > 1 else {comps[0]: "lycoris"}
        tensors = {}
        for comp, sites in data.tensors.items():
            cfg = data.configs[comp]
            if cfg.method not in WRITERS or comp not in prefix_of:
                raise ValueError(f"LyCORIS files hold {sorted(WRITERS)} on unet/transformer/text encoders, not "
                                 f"{cfg.method!r} on {comp or 'an unnamed component'!r}")
            for site, params in sites.items():
                stem = f"{prefix_of[comp]}_{site.replace('.', '_')}"
                tensors.update({f"{stem}.{k}": t for k, t in WRITERS[cfg.method](cfg, site, params).items()})
        first = data.configs[comps[0]]
        meta = {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(network_args(first)),
                "ss_network_dim": json.dumps(first.r),
                "ss_network_alpha": json.dumps(first.r if first.alpha is None else first.alpha)}
        return tensors, meta


register_format(LycorisFiles)
