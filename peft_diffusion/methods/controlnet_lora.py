"""ControlNet-LoRA: a ControlNet (arXiv 2302.05543, ``controlnet.py``) whose copy of the U-Net's encoder stays
frozen at the base's weights and learns through LoRA (arXiv 2106.09685) on its layers: the small-file variant
users share (Stability AI's "Control-LoRA" files follow the same idea).

Same forward as the ControlNet: y_c = F(x; Theta) + Z(F(x + Z(c); Theta + dTheta); Theta_z2), with
dTheta = (alpha / r) B A on the copy's ``lora_target`` layers (default preset ``unet-all``: attention, feed-
forward, ResNet convolutions, transformer in/out projections). The frozen copy is rebuilt from the U-Net it
is injected or loaded into; its tensors are kept as non-persistent buffers, so they are neither trained, nor
counted, nor saved. Trained and saved: the LoRA factors (``controlnet.<layer>.deltas.lora.lora_A.weight``...),
the condition embedding and the zero convolutions, in one native safetensors file with the config in its
header, including ``base_hash``: a sha256 of the copied U-Net tensors (rounded to float16, so a half-precision
copy of the same base matches). Loading into a U-Net whose tensors hash otherwise is refused, naming both
hashes: the file is a difference from one base. Identity at init (zero convolutions). Not mergeable.
SD1.5, r = 32 on ``unet-all``: see tests/test_controlnet.py for the measured count and file size.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import ClassVar

from torch import nn

from ..config import as_target
from ..core import AnnexDelta
from ..registry import register_method
from .controlnet import ControlNet, ControlNetDelta

TRAINED = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")
COPIED = ("conv_in.", "time_embedding.", "class_embedding.", "add_embedding.", "down_blocks.", "mid_block.")
INNER = "lora"  # the LoRA adapter's name inside the copy


def base_hash(unet: nn.Module) -> str | None:
    """sha256 (16 hex digits) of the U-Net tensors a ControlNet copies, as float16; None on the meta device."""
    from ..adapter_files import base_tensors  # above methods; imported when called

    h = hashlib.sha256()
    for key, t in base_tensors(unet):
        if not key.startswith(COPIED) or not t.is_floating_point():
            continue
        if t.is_meta:
            return None
        h.update(key.encode())
        h.update(t.detach().to("cpu").half().numpy().tobytes())
    return h.hexdigest()[:16]


def freeze_copy(copy: nn.Module) -> None:
    """Turn every parameter of the copy outside ``TRAINED`` into a non-persistent buffer (same tensor)."""
    for mname, module in copy.named_modules():
        if (mname + ".").startswith(TRAINED):
            continue
        for pname, p in list(module._parameters.items()):
            if p is not None:
                del module._parameters[pname]
                module.register_buffer(pname, p.detach().requires_grad_(False), persistent=False)


@register_method("controlnet-lora")
@dataclasses.dataclass
class ControlNetLoRA(ControlNet):
    """r / alpha: the LoRA rank and alpha (scale alpha / r; alpha None = r); lora_target: the copy's layers that
    get LoRA; base_hash: set by ``inject`` (and checked by ``load_adapter``) from the base U-Net."""

    category: ClassVar[str] = "hybrid"

    r: int = 32
    alpha: float | None = None
    lora_target: object = "unet-all"
    base_hash: str | None = None

    def __post_init__(self):
        super().__post_init__()
        self.lora_target = as_target(self.lora_target, "ControlNetLoRA lora_target")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"ControlNetLoRA r must be a positive int, got {self.r!r}")

    def lora(self):
        from .lora import LoRA

        return LoRA(r=self.r, alpha=self.alpha, target=self.lora_target or "unet-all")

    def bind(self, obj, model: nn.Module, name: str):
        bound = super().bind(obj, model, name)
        found = base_hash(model)
        if self.base_hash and found and found != self.base_hash:
            raise ValueError(f"controlnet-lora {name!r} was made from a U-Net whose copied tensors hash to "
                             f"{self.base_hash}; this {type(model).__name__}'s hash to {found}. Its LoRA is a "
                             "difference from that base's weights: load it into the base it was trained on")
        return dataclasses.replace(bound, base_hash=self.base_hash or found)

    def build(self, base: nn.Module, site: str, init: bool = True):
        if site != "":
            raise ValueError(f"a ControlNet-LoRA sits on the U-Net itself (site ''), not at {site!r}")
        return ControlNetLoRADelta(self, site, base, init)


class ControlNetLoRADelta(ControlNetDelta):
    """The frozen copy (buffers) with this package's LoRA on its layers, plus the trained embedding and zero convs."""

    category = "hybrid"

    def __init__(self, config: ControlNetLoRA, site: str, unet: nn.Module, init: bool = True):
        AnnexDelta.__init__(self, config, site)  # not ControlNetDelta's: the copy always takes the base's weights
        self.adapter = ""
        copy = config.copy_of(unet, weights=True)
        freeze_copy(copy)
        from ..api import inject  # api sits above methods; imported when called

        inject(copy, config.lora(), INNER, freeze=False)
        self.controlnet = copy
