"""peft's soft-prompt adapter folders (``PeftModel.save_pretrained`` of a ``PromptTuningConfig`` or
``PromptEncoderConfig``): ``adapter_config.json`` + ``adapter_model.safetensors`` holding one tensor,
``prompt_embeddings`` [n, d] (for P-tuning the prompt encoder's output: peft saves the folded prompt too).

``save_peft_prompt(obj, folder, name)`` writes adapter ``name`` (prompt tuning, or P-tuning folded on the fly)
as such a folder, atomically, with ``inference_mode`` true and ``num_transformer_submodules`` 1 (one prompt in
front of the input: for T5 the encoder's, as ours is); ``PeftModel.from_pretrained(model, folder)`` runs it.
``load_peft_prompt(obj, folder, name)`` reads one written by peft or by us (JSON and safetensors only: a folder
holding only a pickled ``adapter_model.bin`` is refused). Every check (the peft type, the token count and width
of the config against the tensor, the width against the model's embeddings) runs before the model is
touched; a mismatch names both sides. Seq2seq files with a decoder prompt too (peft's default for
``SEQ_2_SEQ_LM``: ``num_transformer_submodules`` 2) are refused: our prompt goes in front of the encoder only.
"""
from __future__ import annotations

import json
from pathlib import Path

from .. import api
from ..registry import method_config
from .files import write_folder

CONFIG, WEIGHTS, KEY = "adapter_config.json", "adapter_model.safetensors", "prompt_embeddings"
TYPES = {"prompt-tuning": "PROMPT_TUNING", "p-tuning": "P_TUNING"}


def _delta(model, name: str):
    for _, site in api.sites(model):
        delta = site.deltas[name] if name in site.deltas else None
        if delta is not None and delta.config.method in TYPES:
            return delta
    raise ValueError(f"no prompt-tuning or P-tuning adapter named {name!r} here; adapters: {api.adapter_names(model)}")


def _task_type(model) -> str:
    cls = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
                         ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"),
                         ("ForConditionalGeneration", "SEQ_2_SEQ_LM")):
        if cls.endswith(suffix):
            return task
    return "FEATURE_EXTRACTION"


def save_peft_prompt(obj, folder, name: str = "default", components=("text_encoder",)) -> Path:
    """Write soft-prompt adapter ``name`` of ``obj`` (a model, or a pipeline's ``components``) as a peft folder."""
    from safetensors.torch import save_file

    (model,) = api._pick(obj, components)
    delta = _delta(model, name)
    cfg, mc = delta.config, getattr(model, "config", None)
    prompt = delta.prompt().detach().float().cpu().contiguous()
    header = {"peft_type": TYPES[cfg.method], "task_type": _task_type(model), "inference_mode": True,
              "num_virtual_tokens": delta.n, "token_dim": delta.width, "num_transformer_submodules": 1,
              "num_attention_heads": getattr(mc, "num_attention_heads", None),
              "num_layers": getattr(mc, "num_hidden_layers", getattr(mc, "num_layers", None)),
              "base_model_name_or_path": getattr(mc, "_name_or_path", None) or None, "revision": None}
    if cfg.method == "prompt-tuning":
        header.update(prompt_tuning_init="RANDOM", prompt_tuning_init_text=None, tokenizer_name_or_path=None)
    else:
        header.update(encoder_reparameterization_type=cfg.encoder.upper(),
                      encoder_hidden_size=cfg.encoder_hidden_size or delta.width,
                      encoder_num_layers=cfg.encoder_num_layers, encoder_dropout=cfg.encoder_dropout)

    def fill(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        save_file({KEY: prompt}, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(header, indent=2, sort_keys=True))

    return write_folder(folder, fill)


def read_folder(folder):
    """(the method config, the prompt tensor) of a peft soft-prompt folder; ValueError naming what is wrong."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CONFIG).is_file():
        raise ValueError(f"{folder} is not a peft adapter folder: it has no {CONFIG}")
    if not (folder / WEIGHTS).is_file():
        pickled = (" (only adapter_model.bin: pickled weights are not loaded)"
                   if (folder / "adapter_model.bin").is_file() else "")
        raise ValueError(f"{folder} has no {WEIGHTS}{pickled}")
    try:
        cfg = json.loads((folder / CONFIG).read_text())
    except ValueError as e:
        raise ValueError(f"{folder / CONFIG} is not valid JSON: {e}") from None
    kind = {v: k for k, v in TYPES.items()}.get(cfg.get("peft_type"))
    if kind is None:
        raise ValueError(f"{folder / CONFIG}: peft_type {cfg.get('peft_type')!r} is not a soft prompt this loader "
                         f"reads ({sorted(TYPES.values())})")
    tensors = load_file(str(folder / WEIGHTS))
    if set(tensors) != {KEY}:
        raise ValueError(f"{folder / WEIGHTS} holds {sorted(tensors)[:5]}; a peft soft prompt holds only {KEY!r}")
    t, n, width = tensors[KEY], cfg.get("num_virtual_tokens"), cfg.get("token_dim")
    subs = cfg.get("num_transformer_submodules") or 1
    if subs != 1:
        raise ValueError(f"{folder / CONFIG}: num_transformer_submodules {subs} (a decoder prompt as well, peft's "
                         "seq2seq default); only an input prompt (1) is supported")
    if t.ndim != 2 or t.shape[0] != n or (width is not None and t.shape[1] != width):
        raise ValueError(f"{folder}: {CONFIG} says {n} virtual tokens of width {width}, {WEIGHTS} holds a "
                         f"prompt of shape {tuple(t.shape)}")
    if kind == "prompt-tuning":
        config = method_config(kind)(num_virtual_tokens=n)
    else:
        enc = str(cfg.get("encoder_reparameterization_type", "MLP")).lower()
        config = method_config(kind)(num_virtual_tokens=n, encoder=enc,
                                     encoder_hidden_size=cfg.get("encoder_hidden_size") or None,
                                     encoder_num_layers=cfg.get("encoder_num_layers") or 2,
                                     encoder_dropout=cfg.get("encoder_dropout") or 0.0)
    return config, t


def load_peft_prompt(obj, folder, name: str = "prompt", weight: float = 1.0, trainable: bool = False,
                     components=("text_encoder",)) -> str:
    """Load a peft soft-prompt folder into ``obj`` (a model, or a pipeline's ``components``) as adapter ``name``
    (P-tuning arrives folded: its prompt, without the encoder); returns the name."""
    config, t = read_folder(folder)
    (model,) = api._pick(obj, components)
    api.check_new_name(model, name)
    try:
        delta = config.bind(obj, model, name).build(model, "", init=False)
        delta.fit_file({KEY: t})
    except ValueError as e:
        raise ValueError(f"{folder}: {e} ({type(model).__name__})") from None
    ref = delta.state_dict()[KEY]
    device = next(model.parameters()).device
    delta.load_state_dict({KEY: t.to(device, ref.dtype, copy=True)}, assign=True)
    delta.requires_grad_(trainable)
    api.place(model, {"": delta}, name, weight)
    return name


__all__ = ["save_peft_prompt", "load_peft_prompt", "read_folder"]
