"""Tip-Adapter — Zhang et al., "Tip-Adapter: Training-free Adaption of CLIP for Few-shot Classification",
arXiv 2111.03930.

A cache model built from the few-shot set without training: keys F = the L2-normalised CLIP image features of
the N K few-shot images [NK, D], values L = their one-hot labels [NK, C]. For a test image with normalised
feature f, Eq. (4) with the affinity A defined just before it:
    A = exp(-beta (1 - f F^T)),    logits = alpha A L + f W_c^T,
W_c the normalised class text features of ``template.format(name)``. As in the released code, the CLIP term
carries CLIP's logit scale (the code's 100 for OpenAI's CLIP; the embedded shapes-clip's own exp(logit_scale)
here). Defaults alpha = 1, beta = 5.5: the released configs' initial values, which the paper then searches
per dataset on a validation set (``samples/clip_fewshot_table.py`` also picks them by leave-one-out).

Tip-Adapter-F (``fine_tune=True``, the paper's fine-tuned variant): the keys F become trainable (values,
alpha, beta fixed), starting from the training-free cache, so the model starts exactly at Tip-Adapter; they
are not re-normalised while training (as the released code's ``adapter.weight``). Plain Tip-Adapter trains nothing.
The released code also averages each key over 10 augmented views of its image; ``from_few_shot`` takes the
features it is given (augment before encoding if wanted).

Saved: ``cache_keys`` [NK, D], ``cache_values`` [NK, C] (one-hot), with alpha, beta, fine_tune, template and
the class names. Counts: NK x D trained numbers in Tip-Adapter-F (16 shots x 1000 classes x 512 = 8,192,000
on ImageNet with CLIP ViT-B/16's 512-d feature), none in Tip-Adapter. Does not merge. A classifier object
around the frozen CLIPModel, not an injected method: ``clip_heads.py`` says why.
"""
from __future__ import annotations

import torch
from torch import nn

from ..io.files import AdapterFileError
from .clip_heads import CLIPHead


class TipAdapter(CLIPHead):
    """The cache model on CLIP's zero-shot classifier. Build it with ``from_few_shot``; ``keys`` [NK, D] and
    ``values`` [NK, C] directly when loading (``load``)."""

    method = "tip-adapter"

    def __init__(self, clip: nn.Module, tokenizer, classnames, keys: torch.Tensor, values: torch.Tensor,
                 alpha: float = 1.0, beta: float = 5.5, fine_tune: bool = False,
                 template: str = "a photo of a {}."):
        super().__init__(clip, tokenizer, classnames)
        dim, n_cls = self.feature_dim, len(self.classnames)
        if keys.ndim != 2 or keys.shape[1] != dim:
            raise ValueError(f"Tip-Adapter cache keys are {tuple(keys.shape)}: features of width {keys.shape[-1]} "
                             f"but this CLIP's features are {dim} wide")
        if values.ndim != 2 or tuple(values.shape) != (keys.shape[0], n_cls):
            raise ValueError(f"Tip-Adapter cache values are {tuple(values.shape)}; expected ({keys.shape[0]}, "
                             f"{n_cls}): one row per key ({keys.shape[0]} keys), one column per class ({n_cls})")
        for what, v in (("alpha", alpha), ("beta", beta)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0:
                raise ValueError(f"Tip-Adapter {what} must be a number >= 0, got {v!r}")
        if "{}" not in template:
            raise ValueError(f"Tip-Adapter template must hold '{{}}' for the class name, got {template!r}")
        self.alpha, self.beta, self.fine_tune, self.template = float(alpha), float(beta), bool(fine_tune), template
        device = clip.logit_scale.device
        self.cache_keys = nn.Parameter(keys.detach().float().to(device).clone(), requires_grad=self.fine_tune)
        self.register_buffer("cache_values", values.detach().float().to(device).clone())
        if device.type == "meta":
            self.register_buffer("class_features", torch.empty(n_cls, dim, device="meta"), persistent=False)
        else:
            text = self.encode_texts([template.format(n) for n in self.classnames]).float()
            self.register_buffer("class_features", nn.functional.normalize(text, dim=-1), persistent=False)

    @classmethod
    def from_few_shot(cls, clip: nn.Module, tokenizer, classnames, labels, pixel_values: torch.Tensor | None = None,
                      image_features: torch.Tensor | None = None, **kwargs) -> "TipAdapter":
        """The training-free cache of a few-shot set: its images (or raw features) and integer labels."""
        if (pixel_values is None) == (image_features is None):
            raise ValueError("pass exactly one of pixel_values and image_features")
        labels = torch.as_tensor(labels, dtype=torch.long)
        n_cls = len(classnames)
        if labels.ndim != 1 or labels.numel() == 0 or int(labels.min()) < 0 or int(labels.max()) >= n_cls:
            raise ValueError(f"labels must be a non-empty 1-D list of class indices in 0..{n_cls - 1}, got "
                             f"{labels.tolist() if labels.numel() < 20 else tuple(labels.shape)}")
        head = cls.__new__(cls)
        CLIPHead.__init__(head, clip, tokenizer, classnames)
        feats = head.encode_images(pixel_values) if image_features is None else image_features
        if len(feats) != len(labels):
            raise ValueError(f"{len(feats)} few-shot images but {len(labels)} labels")
        keys = nn.functional.normalize(feats.detach().float(), dim=-1)
        values = nn.functional.one_hot(labels, n_cls).float()
        return cls(clip, tokenizer, classnames, keys, values, **kwargs)

    def config(self) -> dict:
        return {"alpha": self.alpha, "beta": self.beta, "fine_tune": self.fine_tune, "template": self.template}

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        f = nn.functional.normalize(features.to(self.cache_keys.dtype), dim=-1)
        clip_logits = self.logit_scale() * f @ self.class_features.T
        affinity = torch.exp(-self.beta * (1 - f @ self.cache_keys.T))
        return clip_logits + self.alpha * affinity @ self.cache_values

    @classmethod
    def load(cls, path, clip: nn.Module, tokenizer) -> "TipAdapter":
        tensors, names, config = cls.read(path)
        keys, values = tensors.get("cache_keys"), tensors.get("cache_values")
        if keys is None or values is None:
            raise AdapterFileError(f"{path}: a Tip-Adapter file holds cache_keys and cache_values, found "
                                   f"{sorted(tensors)}")
        try:
            head = cls(clip, tokenizer, names, keys, values, **config)
        except ValueError as e:
            raise AdapterFileError(f"{path}: {e}") from None
        return head.load_tensors(tensors, path)
