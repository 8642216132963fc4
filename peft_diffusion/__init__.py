"""peft-diffusion: parameter-efficient fine-tuning for diffusion models and their backbones."""
__version__ = "0.1.0"

from . import methods  # noqa: F401  (registers the methods)
from .api import (active_adapters, adapter_names, disable_adapters, enable_adapters, fuse, inject,
                  parameter_report, remove, scaled, set_adapters, unfuse)
from .config import MethodConfig
from .core import Delta, Host, WeightDelta
from .methods import LoRA
from .presets import PRESETS, preset
from .registry import METHODS
from .target import Target

__all__ = [
    "inject", "set_adapters", "disable_adapters", "enable_adapters", "fuse", "unfuse", "remove", "scaled",
    "adapter_names", "active_adapters", "parameter_report", "LoRA", "MethodConfig", "Target", "PRESETS",
    "preset", "METHODS", "Delta", "WeightDelta", "Host", "__version__",
]
