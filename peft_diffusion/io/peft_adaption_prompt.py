"""peft's adaption-prompt (LLaMA-Adapter v1) files: ``adapter_model.safetensors`` of a peft adapter folder, keys
``base_model.model.<attention module>.adaption_prompt`` (1, K, C) and ``.adaption_gate`` (1,) per adapted layer.

The settings are read from the tensors (K from the prompt, the number of layers from the keys, one gate per
layer), so ``adapter_config.json`` is not needed to load; ``methods.llama_adapter.save_peft`` writes both files
for ``PeftModel.from_pretrained``. Our per-head gates (``gate="head"``) have no place in this layout.
"""
from __future__ import annotations

from collections import defaultdict

from ..registry import method_config, register_format
from .adapter_data import AdapterData

METHOD = "llama-adapter"
PREFIX = "base_model.model."
PARAMS = ("adaption_prompt", "adaption_gate")


class PeftAdaptionPrompt:
    name = "peft-adaption-prompt"
    alias = "peft"
    methods = (METHOD,)
    default_file = "adapter_model.safetensors"

    @staticmethod
    def detect(tensors: dict, metadata: dict) -> bool:
        return bool(tensors) and all(k.rsplit(".", 1)[-1] in PARAMS for k in tensors)

    @staticmethod
    def to_native(tensors: dict, metadata: dict, module_names=None) -> AdapterData:
        sites: dict = defaultdict(dict)
        sources: dict = defaultdict(list)
        for key, t in tensors.items():
            site, param = key.removeprefix(PREFIX).rsplit(".", 1)
            if param == "adaption_prompt":
                if t.ndim != 3 or t.shape[0] != 1:
                    raise ValueError(f"{key} has shape {tuple(t.shape)}; peft's prompts are (1, tokens, width)")
                t = t[0]
            sites[site][param] = t
            sources["", site].append(key)
        lengths = {p["adaption_prompt"].shape[0] for p in sites.values() if "adaption_prompt" in p}
        if len(lengths) != 1:
            raise ValueError(f"the layers' prompts have {sorted(lengths) or 'no'} token counts; one is needed")
        config = method_config(METHOD)(adapter_len=int(lengths.pop()), adapter_layers=len(sites), gate="layer")
        return AdapterData({"": config}, {"": dict(sites)}, sources=dict(sources))

    @staticmethod
    def from_native(data: AdapterData) -> tuple[dict, dict]:
        if len(data.configs) != 1:
            raise ValueError(f"peft adapter files hold one model's adapter, not components {sorted(data.configs)}")
        (comp, config), = data.configs.items()
        if config.method != METHOD:
            raise ValueError(f"the peft-adaption-prompt format holds LLaMA-Adapters, not {config.method!r}")
        if config.norms or config.bias_scale:
            raise ValueError("peft's adaption prompt holds v1 only (prompts and gates); this adapter also trains "
                             "v2's norms / biases and scales: save it in the native format")
        if config.gate != "layer":
            raise ValueError(f"peft's adaption prompt has one gate per layer; this adapter has gate={config.gate!r} "
                             "(one per head): save it in the native format, or train it with gate='layer'")
        flat = {}
        for site, params in data.tensors[comp].items():
            flat[f"{PREFIX}{site}.adaption_prompt"] = params["adaption_prompt"][None]
            flat[f"{PREFIX}{site}.adaption_gate"] = params["adaption_gate"]
        return flat, {"format": "pt"}


register_format(PeftAdaptionPrompt)
