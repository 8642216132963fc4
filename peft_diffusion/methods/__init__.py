"""The methods, by the survey's categories (arXiv 2501.13787). Importing this module registers them.

reparameterization: LoRA (with rsLoRA and LoRA-FA options)
reparameterization: DoRA, Delta-LoRA, IncreLoRA (LoRA variants, each on LoRA's delta)
reparameterization: LoHa; LoKr, KronA, DiffuseKronA (one Kronecker delta)
reparameterization: FacT-TT / FacT-TK (weight deltas tensorised across layers, factors shared model-wide)
additive: IP-Adapter (decoupled cross-attention for image prompts; image projections in ``image_projection.py``,
  image prompts and per-block scales in ``image_prompt.py``)
additive: ControlNet (a trainable copy of the U-Net's encoder feeding its residuals; diffusers folders in
  ``controlnet_files.py``), ControlNet-LoRA (the copy frozen, LoRA on it), ControlNeXt (a light condition
  module joined once through cross normalisation); their per-call ``control_image`` in ``control_image.py``
additive: T2I-Adapter (diffusers' T2IAdapter on the U-Net, fed a per-call condition image)
additive: bottleneck adapters Houlsby, Pfeiffer, parallel adapter / AdaptFormer (annexes on the attention /
  feed-forward sub-layers; shared module and placement table in ``bottleneck.py``)
additive: AdaMix (a mixture of bottleneck adapters, stochastic routing, averaged for inference: ``merge_experts``)
additive: AdapterBias (a token-dependent shift alpha_i v after each FFN), Convpass (convolutional bypasses in CLIP ViTs)
prompt: Textual Inversion (new token vectors in the text encoder)
prompt: prefix tuning (MLP-reparameterised, folded after training), P-tuning v2 (deep prompts): key/value prefixes
  in every attention layer (shared: the table and its config in ``prefix_source.py``, the per-layer injection in
  ``prefix_kv.py``)
prompt: prompt tuning, P-tuning (virtual tokens in front of a transformers model's input embeddings; the
  prepending they share in ``soft_prompt.py``)
prompt: LLaMA-Adapter v1 (zero-gated adaption prompts in the top attention layers of a LLaMA model)
prompt: VPT shallow / deep (prompt tokens in a CLIP vision tower), VP (a learnable pixel frame on its input);
  where they go in the tower: ``clip_vision.py``
hybrid: Compacter, Compacter++ (bottleneck adapters with PHM projections and model-wide shared rules; the
  Kronecker-sum math in ``kronecker.py``)
hybrid: ED-LoRA (layer-wise token embeddings + LoRA in text encoder and U-Net)
hybrid: MAM (prefix tuning + a scaled parallel adapter on the FFN), UniPELT (gated LoRA on q/v + gated prefix
  tuning + a gated Pfeiffer adapter): unions of the parts above, one config and one file each
hybrid: DiffFit (biases, norms, class embedding + a gamma per residual branch)
hybrid: New class (a new class-embedding row per block of a class-conditional DiT + LoRA)
selective, dense: partial fine-tuning (chosen blocks / parameters), BitFit (biases), LN tuning (norm layers)
  (the zero-initialised dense parameter delta they share in ``dense.py``)
selective, masked / sparse: binary masking (STE), FISH mask, Child-Tuning D / F, Diff pruning, LT-SFT
  (shared mask math in ``masks.py``, the sparse delta and scoring passes in ``sparse.py``)
VLM classifiers around a frozen CLIPModel (not injected, not registered: ``clip_heads.py`` says why):
  CoOp (prompt: learned context before class names), CLIP-Adapter (additive: residual feature adapter),
  Tip-Adapter / Tip-Adapter-F (additive: few-shot cache model, keys fine-tuned in -F)
"""
from .adapter_bias import AdapterBias
from .bitfit import BitFit
from .child_tuning import ChildTuningD, ChildTuningF
from .compacter import Compacter, CompacterPP
from .clip_adapter import CLIPAdapter
from .controlnet import ControlNet
from .controlnet_lora import ControlNetLoRA
from .controlnext import ControlNeXt
from .convpass import Convpass
from .coop import CoOp
from .delta_lora import DeltaLoRA
from .difffit import DiffFit
from .diff_pruning import DiffPruning
from .dora import DoRA
from .ed_lora import EDLoRA
from .fish import FISHMask
from .increlora import IncreLoRA
from .ip_adapter import IPAdapter
from .llama_adapter import LlamaAdapter
from .ln_tuning import LNTuning
from .houlsby import Houlsby
from .loha import LoHa
from .lokr import DiffuseKronA, KronA, LoKr
from .lora import LoRA
from .lt_sft import LTSFT
from .mam import MAM
from .masking import Masking
from .new_class import NewClass
from .parallel_adapter import ParallelAdapter
from .p_tuning_v2 import PTuningV2
from .partial_ft import PartialFT
from .pfeiffer import Pfeiffer
from .prefix_tuning import PrefixTuning, fold_prefix
from .p_tuning import PTuning
from .prompt_tuning import PromptTuning
from .t2i_adapter import T2IAdapterConfig
from .textual_inversion import TextualInversion
from .tip_adapter import TipAdapter
from .vp import VP
from .vpt import VPT
from .unipelt import UniPELT
from .adamix import AdaMix, consistency_loss, merge_experts
from .fact import FacT

__all__ = ["LoRA", "DoRA", "DeltaLoRA", "IncreLoRA", "LoHa", "LoKr", "KronA", "DiffuseKronA", "TextualInversion",
           "EDLoRA", "NewClass", "Masking", "FISHMask", "ChildTuningD", "ChildTuningF", "DiffPruning", "LTSFT",
           "PartialFT", "BitFit", "LNTuning", "DiffFit", "Houlsby", "Pfeiffer", "ParallelAdapter", "IPAdapter",
           "T2IAdapterConfig", "ControlNet", "ControlNetLoRA", "ControlNeXt",
           "PrefixTuning", "PTuningV2", "fold_prefix", "PromptTuning", "PTuning", "LlamaAdapter",
           "Compacter", "CompacterPP", "CoOp", "CLIPAdapter", "TipAdapter", "VPT", "VP", "MAM", "UniPELT"]
__all__ += ["AdapterBias", "Convpass"]
__all__ += ["AdaMix", "consistency_loss", "merge_experts", "FacT"]
