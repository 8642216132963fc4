"""The methods, by the survey's categories (arXiv 2501.13787). Importing this module registers them.

reparameterization: LoRA (with rsLoRA and LoRA-FA options)
reparameterization: DoRA, Delta-LoRA, IncreLoRA (LoRA variants, each on LoRA's delta)
reparameterization: LoHa; LoKr, KronA, DiffuseKronA (one Kronecker delta)
prompt: Textual Inversion (new token vectors in the text encoder)
hybrid: ED-LoRA (layer-wise token embeddings + LoRA in text encoder and U-Net)
selective, masked / sparse: binary masking (STE), FISH mask, Child-Tuning D / F, Diff pruning, LT-SFT
  (shared mask math in ``masks.py``, the sparse delta and scoring passes in ``sparse.py``)
"""
from .child_tuning import ChildTuningD, ChildTuningF
from .delta_lora import DeltaLoRA
from .diff_pruning import DiffPruning
from .dora import DoRA
from .ed_lora import EDLoRA
from .fish import FISHMask
from .increlora import IncreLoRA
from .loha import LoHa
from .lokr import DiffuseKronA, KronA, LoKr
from .lora import LoRA
from .lt_sft import LTSFT
from .masking import Masking
from .textual_inversion import TextualInversion

__all__ = ["LoRA", "DoRA", "DeltaLoRA", "IncreLoRA", "LoHa", "LoKr", "KronA", "DiffuseKronA", "TextualInversion",
           "EDLoRA", "Masking", "FISHMask", "ChildTuningD", "ChildTuningF", "DiffPruning", "LTSFT"]
