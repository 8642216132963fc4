"""peft-diffusion: parameter-efficient fine-tuning for diffusion models and their backbones."""
from .version import __version__

from . import methods  # noqa: F401  (registers the methods)
from .api import (active_adapters, adapter_names, disable_adapters, enable_adapters, fuse, inject, inputs,
                  parameter_report, remove, scaled, set_adapters, unfuse)
from .adapter_files import load_adapter, save_adapter
from .attention import attention_kinds, set_attention
from .conditions import condition
from .config import MethodConfig
from .io import AdapterFileError, CorruptFileError, UnmatchedKeysError
from .io.report import LoadReport
from .core import Annex, AnnexDelta, Delta, Host, ParamDelta, ParamSite, WeightDelta
from .methods import DeltaLoRA, DiffuseKronA, DoRA, EDLoRA, IncreLoRA, KronA, LoHa, LoKr, LoRA, TextualInversion
from .methods import BitFit, DiffFit, LNTuning, PartialFT
from .methods import Houlsby, ParallelAdapter, Pfeiffer
from .methods import ControlNet, ControlNetLoRA, ControlNeXt
from .methods.controlnet_files import controlnet_of, load_controlnet, save_controlnet
from .methods import IPAdapter, T2IAdapterConfig
from .io.t2i_adapter import load_t2i_adapter, save_t2i_adapter
from .methods.image_prompt import image_prompt, set_ip_adapter_scale
from .methods import LTSFT, ChildTuningD, ChildTuningF, DiffPruning, FISHMask, Masking, NewClass
from .methods import PrefixTuning, PTuningV2, fold_prefix
from .methods import PromptTuning, PTuning
from .methods.p_tuning import fold as fold_prompt_encoder
from .io.peft_prompt import load_peft_prompt, save_peft_prompt
from .methods import LlamaAdapter
from .methods import Compacter, CompacterPP
from .methods import VP, VPT
from .methods import MAM, UniPELT
from .methods import AdapterBias, Convpass
from .methods import AdaMix, FacT, merge_experts
from .presets import PRESETS, preset
from .registry import METHODS
from .target import Target

__all__ = [
    "inject", "set_adapters", "disable_adapters", "enable_adapters", "fuse", "unfuse", "remove", "scaled",
    "adapter_names", "active_adapters", "parameter_report", "save_adapter", "load_adapter", "inputs",
    "set_attention", "attention_kinds", "condition",
    "AdapterFileError", "CorruptFileError", "UnmatchedKeysError", "LoadReport",
    # methods (peft_diffusion/methods/__init__.py lists them by category)
    "LoRA", "DoRA", "DeltaLoRA", "IncreLoRA", "LoHa", "LoKr", "KronA", "DiffuseKronA", "TextualInversion", "EDLoRA",
    "PartialFT", "BitFit", "LNTuning", "DiffFit", "Houlsby", "Pfeiffer", "ParallelAdapter",
    "IPAdapter", "image_prompt", "set_ip_adapter_scale", "T2IAdapterConfig", "save_t2i_adapter", "load_t2i_adapter",
    "ControlNet", "ControlNetLoRA", "ControlNeXt", "controlnet_of", "save_controlnet", "load_controlnet",
    "Masking", "FISHMask", "ChildTuningD", "ChildTuningF", "DiffPruning", "LTSFT", "NewClass",
    "PrefixTuning", "PTuningV2", "fold_prefix",
    "PromptTuning", "PTuning", "fold_prompt_encoder", "save_peft_prompt", "load_peft_prompt",
    "LlamaAdapter", "Compacter", "CompacterPP", "VPT", "VP", "MAM", "UniPELT",
    "AdapterBias", "Convpass",
    "MethodConfig", "Target", "PRESETS", "preset", "METHODS", "Delta", "WeightDelta", "AnnexDelta", "ParamDelta",
    "Host", "Annex", "ParamSite", "__version__",
]
__all__ += ["AdaMix", "FacT", "merge_experts"]
