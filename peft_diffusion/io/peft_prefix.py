"""Prefix tuning / P-tuning v2 files to and from peft's adapter folders (``adapter_config.json`` +
``adapter_model.safetensors`` holding ``prompt_embeddings`` [n, layers * 2 * kv width]: every layer's keys and
values, flattened as peft's ``PrefixEncoder`` gives them, the reparameterisation already applied; our table
has that layout, so only the configs are translated).

``to_peft(our_file, folder, task_type)`` writes our native file as such a folder (a file still holding the MLP
is folded on the way, as peft does when it saves); ``from_peft(folder, our_file)`` writes peft's folder as a
native ``prefix-tuning`` file (the folded table), which ``load_adapter`` loads (a mismatch with the model is
refused there, naming both geometries). Neither needs the model; both write atomically and read safetensors
and JSON only.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from ..methods.prefix_kv import describe
from ..methods.prefix_source import PrefixKV, table_from_mlp
from ..methods.prefix_tuning import PrefixTuning
from . import encode, read_adapter
from .adapter_data import AdapterData
from .files import AdapterFileError, read_file, write_file, write_folder

CONFIG, WEIGHTS, KEY = "adapter_config.json", "adapter_model.safetensors", "prompt_embeddings"


def to_peft(path, folder, task_type: str = "CAUSAL_LM") -> Path:
    """Write our prefix file ``path`` as a peft ``PREFIX_TUNING`` folder for ``task_type``; returns the folder."""
    _, data = read_adapter(path)
    if len(data.configs) != 1 or not isinstance(next(iter(data.configs.values())), PrefixKV):
        raise AdapterFileError(f"{path}: not a prefix-tuning / P-tuning v2 file of one model "
                               f"(methods: {[c.method for c in data.configs.values()]})")
    (comp, cfg), = data.configs.items()
    (tensors,) = data.tensors[comp].values()
    if len(set(cfg.geometry)) != 1:
        raise AdapterFileError(f"{path}: made for {describe(cfg.geometry)}; peft's prefix files hold one width for "
                               "every layer")
    table = table_from_mlp(tensors) if cfg.prefix_projection else tensors["prefix"]
    (heads, head_dim), layers = cfg.geometry[0], len(cfg.geometry)
    config = {"peft_type": "PREFIX_TUNING", "task_type": task_type, "num_virtual_tokens": cfg.num_virtual_tokens,
              "token_dim": heads * head_dim, "num_attention_heads": heads, "num_layers": layers,
              "num_transformer_submodules": 1, "encoder_hidden_size": cfg.encoder_hidden_size or heads * head_dim,
              "prefix_projection": False, "inference_mode": True, "base_model_name_or_path": None}

    def fill(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        save_file({KEY: table.contiguous()}, str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))

    return write_folder(folder, fill)


def from_peft(folder, path, name: str = "default") -> Path:
    """Write peft's ``PREFIX_TUNING`` folder as our native prefix file ``path``; returns the file's path."""
    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise AdapterFileError(f"{folder}: no readable {CONFIG} ({type(e).__name__}: {e})") from e
    if config.get("peft_type") != "PREFIX_TUNING":
        raise AdapterFileError(f"{folder}: a {config.get('peft_type')!r} adapter, not PREFIX_TUNING")
    if config.get("num_transformer_submodules", 1) != 1:
        raise AdapterFileError(f"{folder}: encoder-decoder prefixes (num_transformer_submodules="
                               f"{config['num_transformer_submodules']}) are not supported")
    tensors, _ = read_file(folder / WEIGHTS)
    if set(tensors) != {KEY}:
        raise AdapterFileError(f"{folder / WEIGHTS}: expected only {KEY!r}, found {sorted(tensors)}")
    flat = tensors[KEY]
    n, layers, heads = config["num_virtual_tokens"], config["num_layers"], config["num_attention_heads"]
    head_dim = config["token_dim"] // heads
    if tuple(flat.shape) != (n, layers * 2 * heads * head_dim):
        raise AdapterFileError(f"{folder}: {KEY} is {tuple(flat.shape)}; its config ({n} tokens, {layers} layers, "
                               f"{heads} heads x {head_dim}) needs {(n, layers * 2 * heads * head_dim)}")
    cfg = PrefixTuning(num_virtual_tokens=n, prefix_projection=False, geometry=((heads, head_dim),) * layers)
    data = AdapterData({"": cfg}, {"": {"": {"prefix": flat}}}, name=name)
    _, (flat_tensors, meta) = encode("native", data)
    return write_file(path, flat_tensors, meta)
