"""CLIP-Adapter — Gao et al., "CLIP-Adapter: Better Vision-Language Models with Feature Adapters",
arXiv 2110.04544.

Sec. 3.2 (the adapter and residual-blending equations): a two-layer bottleneck A(f) = ReLU(f W1) W2
(W1: D x D/r, W2: D/r x D, no biases) on CLIP's image feature f, blended with a residual ratio alpha,
    f* = alpha A_v(f) + (1 - alpha) f,
optionally the same on the class text features W (``text_alpha``: W* = beta A_t(W) + (1 - beta) W, the
paper's beta), then logits = logit_scale * cos(f*, W*_i). The class text features are the frozen text
tower's for ``template.format(name)`` (the paper's hand-written prompts; "a photo of a {}." by default).
Paper: r = 4; alpha about 0.2 works best on generic data, about 0.6 on fine-grained data.

Init (our choice, stated): W2 starts at zero, so f* = (1 - alpha) f and, because the logits use the
L2-normalised feature, the logits start exactly at zero-shot CLIP's (identity at init). ``official_init=True``
builds the released code's form instead (gaopengcuhk/CLIP-Adapter: both layers nn.Linear's default init and
a ReLU after the second layer too), which does not start at zero-shot; with a zero W2 that trailing ReLU
would give W1 and W2 no gradient, hence the two options.

Trained: W1 and W2 of the image adapter (and of the text adapter when ``text_alpha`` is set): 2 D^2 / r
numbers each, 131,072 on CLIP ViT-B/16's 512-d feature with r = 4 (tests/test_clip_heads.py, meta device).
Saved: ``visual.down.weight``, ``visual.up.weight`` (``text.*`` likewise) with the class names and config.
Does not merge (a nonlinear function of the feature). A classifier object around the frozen CLIPModel, not
an injected method: ``clip_heads.py`` says why.
"""
from __future__ import annotations

import torch
from torch import nn

from .clip_heads import CLIPHead


class FeatureAdapter(nn.Module):
    """A(f) = ReLU(f W1) W2 (then ReLU again with ``trailing_relu``), bias-free; ``zero_up`` zeroes W2."""

    def __init__(self, dim: int, reduction: int, zero_up: bool, trailing_relu: bool, device=None):
        super().__init__()
        self.down = nn.Linear(dim, dim // reduction, bias=False, device=device)
        self.up = nn.Linear(dim // reduction, dim, bias=False, device=device)
        self.trailing_relu = trailing_relu
        if zero_up:
            nn.init.zeros_(self.up.weight)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        out = self.up(torch.relu(self.down(f)))
        return torch.relu(out) if self.trailing_relu else out


class CLIPAdapter(CLIPHead):
    """Residual bottleneck adapters on CLIP's image feature (and optionally the class text features).

    reduction: r (hidden D // r); alpha: image residual ratio; text_alpha: text residual ratio (None: no text
    adapter); template: class prompt; official_init: the released code's init (not identity at init).
    """

    method = "clip-adapter"

    def __init__(self, clip: nn.Module, tokenizer, classnames, reduction: int = 4, alpha: float = 0.2,
                 text_alpha: float | None = None, template: str = "a photo of a {}.", official_init: bool = False):
        super().__init__(clip, tokenizer, classnames)
        dim = self.feature_dim
        if isinstance(reduction, bool) or not isinstance(reduction, int) or not 1 <= reduction <= dim:
            raise ValueError(f"CLIPAdapter reduction must be an integer in 1..{dim} (the feature width), "
                             f"got {reduction!r}")
        for what, a in (("alpha", alpha), ("text_alpha", text_alpha)):
            if a is not None and not (isinstance(a, (int, float)) and 0.0 <= a <= 1.0):
                raise ValueError(f"CLIPAdapter {what} must be in [0, 1], got {a!r}")
        if "{}" not in template:
            raise ValueError(f"CLIPAdapter template must hold '{{}}' for the class name, got {template!r}")
        self.reduction, self.alpha, self.text_alpha = reduction, float(alpha), text_alpha
        self.template, self.official_init = template, bool(official_init)
        device = clip.logit_scale.device
        def make():
            return FeatureAdapter(dim, reduction, zero_up=not official_init, trailing_relu=official_init,
                                  device=device)

        self.visual = make()
        self.text = make() if text_alpha is not None else None
        if device.type == "meta":
            self.register_buffer("class_features", torch.empty(len(self.classnames), dim, device="meta"),
                                 persistent=False)
        else:
            self.register_buffer("class_features", self.encode_texts(self.prompts()).float(), persistent=False)

    def prompts(self) -> list[str]:
        return [self.template.format(n) for n in self.classnames]

    def config(self) -> dict:
        return {"reduction": self.reduction, "alpha": self.alpha, "text_alpha": self.text_alpha,
                "template": self.template, "official_init": self.official_init}

    def text_features(self) -> torch.Tensor:
        w = self.class_features
        if self.text is not None:
            w = self.text_alpha * self.text(w) + (1 - self.text_alpha) * w
        return w

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        f = features.to(self.visual.down.weight.dtype)
        f = self.alpha * self.visual(f) + (1 - self.alpha) * f
        image = nn.functional.normalize(f, dim=-1)
        text = nn.functional.normalize(self.text_features(), dim=-1)
        return self.logit_scale() * image @ text.T
