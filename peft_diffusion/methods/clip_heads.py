"""Classifiers around a frozen ``transformers.CLIPModel``: what CoOp, CLIP-Adapter and Tip-Adapter share
(``coop.py``, ``clip_adapter.py``, ``tip_adapter.py`` hold one method each).

Why a classifier object and not an injected method (no ``MethodConfig``, no site, not in the contract matrix):
the three methods produce class logits over a fixed list of class names, logit_scale * cos(image feature,
class text feature), which a ``CLIPModel`` never computes by itself (its forward takes whatever texts come
with each call), and their trained state is tied to that list (CoOp's prompts are built around the class
names, Tip-Adapter's cache values are one-hot over the classes). A ``CLIPHead`` is a small ``nn.Module`` that
holds the CLIPModel by reference (not as a child: its ``parameters()`` and ``state_dict()`` are the method's
own tensors only) and its tokenizer. The CLIPModel is never changed: hooks live only for the duration of a
call, ``requires_grad`` flags are switched off while the frozen towers run and restored after, so no gradient
reaches the model's tensors (tests/test_clip_heads.py checks state, flags, hooks and ``.grad``). Adapters
injected into the CLIPModel with ``pd.inject`` (the deltas of its sites: LoRA, VPT, ...) are not frozen: they
train through a head when they require grad (the image features then keep their graph; CoOp's text
features always do; CLIP-Adapter's and Tip-Adapter's class text features are computed once, at build).

Files: safetensors (``io.files.write_file``, atomic; read back with ``io.files.read_file``, never unpickled).
Metadata: ``method``, ``classnames`` (JSON) and ``config`` (JSON, the head's hyper-parameters). Loading checks
the method, every tensor name and shape against the head built from the file's config on the given model,
and names both sides on a mismatch, before anything is loaded.

Use (``samples/clip_fewshot_table.py`` is a full example)::

    head = CoOp(clip, tokenizer, ["red circle", "blue square"], n_ctx=4)   # or CLIPAdapter(...), TipAdapter...
    feats = head.encode_images(pixel_values)          # once: the vision tower is frozen
    loss = F.cross_entropy(head(image_features=feats), labels)   # optimise head.parameters()
    head.save("coop.safetensors"); head = CoOp.load("coop.safetensors", clip, tokenizer)
"""
from __future__ import annotations

import contextlib
import json
import os

import torch
from torch import nn

from ..core import Site
from ..io.files import AdapterFileError, read_file, write_file

__all__ = ["CLIPHead", "frozen", "adapter_parameters", "raw_features", "check_classnames"]


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the adapters injected into ``model`` (its sites' deltas, not the layers they wrap)."""
    found = {id(p): p for m in model.modules() if isinstance(m, Site) for p in m.deltas.parameters()}
    return list(found.values())


@contextlib.contextmanager
def frozen(model: nn.Module):
    """Run ``model`` with its own parameters' ``requires_grad`` off (gradients may still flow to the inputs),
    restoring the flags after; injected adapters' parameters keep theirs."""
    keep = {id(p) for p in adapter_parameters(model)}
    flags = [(p, p.requires_grad) for p in model.parameters() if id(p) not in keep]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def raw_features(out) -> torch.Tensor:
    # transformers 5 returns an output object from get_*_features, 4.x a tensor
    return out if torch.is_tensor(out) else getattr(out, "pooler_output", out[0])


def check_classnames(tokenizer, classnames) -> list[str]:
    """The class names as a list: non-empty, unique strings that each tokenize to at least one token."""
    if isinstance(classnames, str) or not classnames:
        raise ValueError(f"classnames must be a non-empty list of strings, got {classnames!r}")
    names = list(classnames)
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise ValueError(f"class names must be strings, got {bad}")
    empty = [n for n in names if not tokenizer(n, add_special_tokens=False).input_ids]
    if empty:
        raise ValueError(f"class names {empty} tokenize to nothing with {type(tokenizer).__name__}: "
                         "every class needs at least one token")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"class names must be unique, repeated: {dupes}")
    return names


class CLIPHead(nn.Module):
    """A classifier over ``classnames`` around a frozen CLIPModel ``clip`` with its ``tokenizer``.

    Subclasses set ``method`` and define ``config()`` (JSON-able hyper-parameters, the constructor's keyword
    arguments) and ``logits(features)`` (raw image features -> [N, classes]).
    """

    method = ""

    def __init__(self, clip: nn.Module, tokenizer, classnames):
        super().__init__()
        if not hasattr(clip, "get_image_features") or not hasattr(clip, "logit_scale"):
            raise TypeError(f"{type(self).__name__} needs a transformers CLIPModel, got {type(clip).__name__}")
        self._clip = (clip,)  # a plain reference: the model is not our child
        self.tokenizer = tokenizer
        self.classnames = check_classnames(tokenizer, classnames)

    @property
    def clip(self) -> nn.Module:
        return self._clip[0]

    @property
    def feature_dim(self) -> int:
        return self.clip.config.projection_dim

    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.detach().exp()

    def encode_images(self, pixel_values: torch.Tensor, batch: int = 512) -> torch.Tensor:
        """Raw (unnormalised) projected image features of the frozen vision tower, [N, projection_dim]; with a
        graph only when an adapter injected into the CLIPModel trains."""
        trains = torch.is_grad_enabled() and any(p.requires_grad for p in adapter_parameters(self.clip))
        with frozen(self.clip), torch.set_grad_enabled(trains):
            return torch.cat([raw_features(self.clip.get_image_features(pixel_values=pixel_values[i:i + batch]))
                              for i in range(0, len(pixel_values), batch)])

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded ids and mask for ``texts``; a text longer than the model's positions is an error."""
        limit = self.clip.config.text_config.max_position_embeddings
        enc = self.tokenizer(list(texts), padding="max_length", max_length=limit, return_tensors="pt",
                             truncation=False)
        if enc.input_ids.shape[1] > limit:
            long = [t for t, ids in zip(texts, self.tokenizer(list(texts)).input_ids) if len(ids) > limit]
            raise ValueError(f"prompts {long} are longer than the text tower's {limit} positions")
        device = self.clip.logit_scale.device
        return enc.input_ids.to(device), enc.attention_mask.to(device)

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Raw projected text features of the frozen text tower, [len(texts), projection_dim]."""
        ids, mask = self.tokenize(texts)
        with frozen(self.clip):
            return raw_features(self.clip.get_text_features(input_ids=ids, attention_mask=mask))

    def forward(self, pixel_values: torch.Tensor | None = None,
                image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits [N, classes] from images (``pixel_values``) or from their raw features
        (``encode_images``: compute once, train many steps)."""
        if (pixel_values is None) == (image_features is None):
            raise ValueError("pass exactly one of pixel_values and image_features")
        feats = self.encode_images(pixel_values) if image_features is None else image_features
        if feats.ndim != 2 or feats.shape[1] != self.feature_dim:
            raise ValueError(f"image features of shape {tuple(feats.shape)} given; this CLIP's are "
                             f"[N, {self.feature_dim}]")
        return self.logits(feats)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def config(self) -> dict:
        raise NotImplementedError

    # ---- files
    def save(self, path: str | os.PathLike):
        """Write the head's tensors (``state_dict``), class names and config to a safetensors file."""
        meta = {"method": self.method, "classnames": json.dumps(self.classnames), "config": json.dumps(self.config())}
        return write_file(path, dict(self.state_dict()), meta, default_name=f"{self.method}.safetensors")

    @classmethod
    def read(cls, path: str | os.PathLike) -> tuple[dict, list[str], dict]:
        """(tensors, class names, config) of a file this class wrote; errors name the file."""
        tensors, meta = read_file(path)
        if meta.get("method") != cls.method:
            raise AdapterFileError(f"{path} holds a {meta.get('method') or 'non-CLIP-head'!r} file, not "
                                   f"{cls.method!r}")
        try:
            names, config = json.loads(meta["classnames"]), json.loads(meta["config"])
        except (KeyError, ValueError) as e:
            raise AdapterFileError(f"{path}: unreadable classnames/config metadata ({e})") from e
        return tensors, names, config

    @classmethod
    def load(cls, path: str | os.PathLike, clip: nn.Module, tokenizer) -> "CLIPHead":
        """The head saved in ``path``, on ``clip`` with its ``tokenizer``; the model is not changed."""
        tensors, names, config = cls.read(path)
        return cls(clip, tokenizer, names, **config).load_tensors(tensors, path)

    def load_tensors(self, tensors: dict, path) -> "CLIPHead":
        """Check ``tensors`` against this head (names and shapes, both sides named), then load them."""
        ours = self.state_dict()
        missing, extra = sorted(set(ours) - set(tensors)), sorted(set(tensors) - set(ours))
        if missing or extra:
            raise AdapterFileError(f"{path}: tensors {sorted(tensors)} do not match this {type(self).__name__}'s "
                                   f"{sorted(ours)} (missing {missing}, unexpected {extra})")
        for k, t in tensors.items():
            if tuple(t.shape) != tuple(ours[k].shape):
                raise AdapterFileError(
                    f"{path}: {k!r} is {tuple(t.shape)} in the file but {tuple(ours[k].shape)} for this "
                    f"{type(self).__name__} (CLIP feature width {self.feature_dim}, text width "
                    f"{self.clip.config.text_config.hidden_size}, {len(self.classnames)} classes)")
        with torch.no_grad():
            for k, p in ours.items():
                p.copy_(tensors[k].to(p.dtype))
        return self
