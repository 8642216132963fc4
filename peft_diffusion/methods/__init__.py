"""The methods, by the survey's categories (arXiv 2501.13787). Importing this module registers them.

reparameterization: LoRA (with rsLoRA and LoRA-FA options)
"""
from .lora import LoRA

__all__ = ["LoRA"]
