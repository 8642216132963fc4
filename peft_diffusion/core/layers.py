"""The leaf layers a ``Host`` wraps, and running their own operation with another weight."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["layer_dims", "weight_op", "is_transposed", "SUPPORTED_LAYERS", "WEIGHT_LAYERS"]

# transformers' GPT-2 ``Conv1D`` stores its weight as (in, out); it is matched by class name so that this
# bottom layer does not import transformers.
_TRANSPOSED = ("Conv1D",)
WEIGHT_LAYERS = ("Linear", "Conv1d", "Conv2d", "Conv3d") + _TRANSPOSED
# what a Host may wrap: the weight layers, and token embeddings (for new-token rows, see ``tokens.py``)
SUPPORTED_LAYERS = WEIGHT_LAYERS + ("Embedding",)


def is_transposed(base: nn.Module) -> bool:
    return type(base).__name__ in _TRANSPOSED


def layer_dims(base: nn.Module) -> tuple[int, int, tuple[int, ...]]:
    """(in_features, out_features, kernel_size) of a supported layer; kernel () for linear layers."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features, ()
    if isinstance(base, nn.modules.conv._ConvNd):
        return base.in_channels // base.groups, base.out_channels, tuple(base.kernel_size)
    if is_transposed(base):
        n_in, n_out = base.weight.shape
        return n_in, n_out, ()
    raise TypeError(f"{type(base).__name__} is not a supported layer type (supported: {', '.join(WEIGHT_LAYERS)})")


def weight_op(base: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Run the base layer's own operation with another weight and no bias."""
    if isinstance(base, nn.Linear):
        return F.linear(x, weight)
    if isinstance(base, nn.modules.conv._ConvNd):
        return base._conv_forward(x, weight, None)
    if is_transposed(base):
        return x @ weight
    raise TypeError(f"{type(base).__name__} is not a supported layer type")


