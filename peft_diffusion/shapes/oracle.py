"""The shapes-world oracle: a tiny CNN that reads every attribute of a 32x32 image.

One convolutional trunk (about 0.15 M parameters at the default ``width=32``) and one linear head per
attribute: ``shape`` (the five world shapes and the subject's cross), ``colour``, ``background``,
``size``, ``position`` (the 3x3 grid) and ``striped``. It is trained on world images drawn on the fly from
its own distribution (``oracle_attrs``: every shape including the cross, stripes on any shape, so the
stripes head reads stripes rather than crosses), through augmentations that imitate what a small VAE and
diffusion model produce: colour jitter, Gaussian blur, low-frequency smudges and pixel noise.

Input conventions of ``Oracle.read`` / ``accuracy``:

* a list of PIL images or ``Sample``s, or a uint8 array (HxWx3 or NxHxWx3): values 0..255, and
  ``value_range`` is not used;
* a float tensor or array, NxCxHxW (torch layout) or NxHxWxC (numpy layout): pass ``value_range=(-1, 1)``
  (raw VAE decodes, training batches) or ``value_range=(0, 1)`` (``output_type="pt"``/``"np"`` pipeline
  outputs). Float input without ``value_range`` is an error rather than a guess.

Images of another size are area-resized to 32x32. Files are safetensors (weights plus a JSON config in
the metadata); nothing is pickled.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .world import (ALL_SHAPES, BACKGROUNDS, COLOURS, IMAGE_SIZE, POSITIONS, SIZES, SUBJECT_SHAPE, Sample,
                    from_attrs)

__all__ = ["HEADS", "Oracle", "oracle_attrs", "oracle_set", "augment", "to_input", "train_oracle",
           "accuracy", "evaluate"]

logger = logging.getLogger(__name__)

HEADS: dict[str, tuple] = {
    "shape": ALL_SHAPES,
    "colour": COLOURS,
    "background": BACKGROUNDS,
    "size": SIZES,
    "position": POSITIONS,
    "striped": (False, True),
}
# Stripes on the oracle's own images: often on the cross, sometimes on any other shape.
_STRIPE_P = {"cross": 0.5, "other": 0.25}
_TRAIN_STREAM, _EVAL_STREAM = 0x7A11, 0xE7A1  # keep the training and evaluation draws apart


def oracle_attrs(rng: np.random.Generator) -> dict:
    """One attribute dict of the oracle's distribution: everything uniform, stripes on any shape."""
    attrs = {k: v[rng.integers(len(v))] for k, v in HEADS.items() if k != "striped"}
    p = _STRIPE_P["cross" if attrs["shape"] == SUBJECT_SHAPE else "other"]
    attrs["striped"] = bool(rng.random() < p)
    return attrs


def oracle_set(n: int, seed: int) -> list[Sample]:
    """``n`` fresh clean images of the oracle's distribution (sample i from ``default_rng((seed, tag, i))``)."""
    out = []
    for i in range(n):
        rng = np.random.default_rng((seed, _EVAL_STREAM, i))
        out.append(from_attrs(oracle_attrs(rng), rng))
    return out


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Oracle(nn.Module):
    """The CNN and its reading helpers. ``width`` sets the channel count of the first stage.

    The trunk ends on an 8x8 map. Shape, colour, background, size and stripes read its global max and
    mean pools, which makes them translation invariant (they learn each shape once, not once per grid
    cell); position reads a small 1x1 projection of the map flattened, which keeps where things are.
    """

    def __init__(self, width: int = 32, hidden: int = 64):
        super().__init__()
        self.config = {"width": width, "hidden": hidden}
        w = width
        self.trunk = nn.Sequential(
            _conv(3, w), _conv(w, w), nn.MaxPool2d(2),              # 16x16
            _conv(w, 2 * w), _conv(2 * w, 2 * w), nn.MaxPool2d(2),  # 8x8
            _conv(2 * w, 2 * w), _conv(2 * w, 2 * w),               # receptive field 29 px: a large shape
        )
        self.pooled = nn.Sequential(nn.Linear(4 * w, hidden), nn.ReLU())
        self.where = nn.Sequential(nn.Conv2d(2 * w, 4, 1), nn.ReLU(), nn.Flatten())
        self.heads = nn.ModuleDict({k: nn.Linear(4 * 64 if k == "position" else hidden, len(v))
                                    for k, v in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per head for a batch in [-1, 1], Nx3x32x32."""
        f = self.trunk(x)
        h = self.pooled(torch.cat([f.amax((2, 3)), f.mean((2, 3))], 1))
        where = self.where(f)
        return {k: head(where if k == "position" else h) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images, value_range: tuple[float, float] | None = None,
                batch_size: int = 512) -> dict[str, torch.Tensor]:
        """Class indices per head (index into ``HEADS[key]``) for images in any accepted form."""
        x = to_input(images, value_range)
        was_training = self.training
        self.eval()
        try:
            parts = [self(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
        finally:
            self.train(was_training)
        return {k: torch.cat([p[k] for p in parts]).argmax(-1) for k in HEADS}

    def read(self, images, value_range: tuple[float, float] | None = None) -> list[dict]:
        """One attribute dict per image (the keys of ``HEADS``); see the module docstring for inputs."""
        idx = self.predict(images, value_range)
        n = len(next(iter(idx.values())))
        return [{k: HEADS[k][int(idx[k][i])] for k in HEADS} for i in range(n)]

    def save(self, path: str) -> None:
        """Weights and config to a safetensors file."""
        meta = {"config": json.dumps(self.config), "heads": json.dumps({k: list(v) for k, v in HEADS.items()})}
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, path, metadata=meta)

    @classmethod
    def load(cls, path: str) -> Oracle:
        """An oracle saved by ``save``; refuses a file whose heads differ from this world's."""
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        if "config" not in meta or "heads" not in meta:
            raise ValueError(f"{path} is not an oracle file (no config/heads metadata)")
        heads = {k: tuple(v) for k, v in json.loads(meta["heads"]).items()}
        if heads != HEADS:
            raise ValueError(f"{path} was trained for other classes: {heads}")
        oracle = cls(**json.loads(meta["config"]))
        oracle.load_state_dict(load_file(path))
        return oracle.eval()


def to_input(images, value_range: tuple[float, float] | None = None) -> torch.Tensor:
    """Images in any accepted form -> float tensor in [-1, 1], Nx3x32x32."""
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)):
        if images and isinstance(images[0], Sample):
            images = [s.image for s in images]
        if not images or not all(isinstance(im, Image.Image) for im in images):
            raise TypeError("a list must hold PIL images or Samples")
        images = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            images = images[None]
        x = torch.from_numpy(np.ascontiguousarray(images))
        if x.shape[-1] == 3 and x.shape[1] != 3:
            x = x.permute(0, 3, 1, 2)
    elif isinstance(images, torch.Tensor):
        x = images.detach().cpu()
        if x.ndim == 3:
            x = x[None]
    else:
        raise TypeError(f"cannot read images of type {type(images).__name__}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected N images with 3 channels, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        x = x.float() / 127.5 - 1
    else:
        if value_range is None:
            raise ValueError("float images need value_range=(-1, 1) or (0, 1)")
        lo, hi = value_range
        x = (x.float() - lo) / (hi - lo) * 2 - 1
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")
    return x.clamp(-1, 1).contiguous()


def _gaussian_kernels(sigma: torch.Tensor, k: int = 5) -> torch.Tensor:
    r = torch.arange(k, dtype=torch.float32) - k // 2
    g = torch.exp(-(r[None] ** 2) / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))
    g = g / g.sum(-1, keepdim=True)
    return g[:, :, None] * g[:, None, :]  # N x k x k


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Imitate generated images: colour jitter, blur, low-frequency smudges, pixel noise. x in [0, 1]."""
    n = x.shape[0]

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * u(0.8, 1.15, n, 1, 1, 1) + mean
    x = x * u(0.9, 1.1, n, 3, 1, 1) * u(0.88, 1.12, n, 1, 1, 1) + u(-0.05, 0.05, n, 3, 1, 1)
    sigma = u(0.0, 1.0, n) * (torch.rand(n, generator=g) < 0.6)
    kern = _gaussian_kernels(sigma).repeat_interleave(3, 0)[:, None]  # 3n x 1 x 5 x 5
    x = F.conv2d(F.pad(x.reshape(1, 3 * n, *x.shape[-2:]), (2, 2, 2, 2), mode="replicate"), kern,
                 groups=3 * n).reshape(x.shape)
    smudge = torch.randn(n, 3, 4, 4, generator=g) * u(0.0, 0.06, n, 1, 1, 1)
    x = x + F.interpolate(smudge, size=x.shape[-2:], mode="bilinear", align_corners=False)
    x = x + torch.randn(x.shape, generator=g) * u(0.0, 0.05, n, 1, 1, 1)
    return x.clamp(0, 1)


def _batch(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    imgs, labels = [], {k: [] for k in HEADS}
    for _ in range(n):
        attrs = oracle_attrs(rng)
        imgs.append(from_attrs(attrs, rng).array)
        for k in HEADS:
            labels[k].append(HEADS[k].index(attrs[k]))
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255
    return x, {k: torch.tensor(v) for k, v in labels.items()}


def train_oracle(steps: int = 800, seed: int = 0, width: int = 32, hidden: int = 64, batch_size: int = 64,
                 lr: float = 2e-3, warmup: int = 20, loss_weights: dict[str, float] | None = None,
                 log_every: int = 200) -> Oracle:
    """Train an oracle from scratch on freshly drawn, augmented world images.

    Deterministic given ``seed`` (and the torch thread count, which can change float summation order).

    AdamW with linear warm-up and cosine decay to zero; the loss is a weighted sum of the heads' cross
    entropies. ``loss_weights`` defaults to ``{"shape": 3}``, others 1: shape is the slowest head, its loss
    sits on a plateau near ln 6 for hundreds of steps at equal weights (and at higher learning rates),
    which tripling its weight removes. Returns the oracle in eval mode.
    """
    weights = {k: 1.0 for k in HEADS} | ({"shape": 3.0} if loss_weights is None else dict(loss_weights))
    torch.manual_seed(seed)
    oracle = Oracle(width, hidden)
    rng = np.random.default_rng((seed, _TRAIN_STREAM))
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(oracle.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    oracle.train()
    start = time.perf_counter()
    for step in range(steps):
        x, y = _batch(rng, batch_size)
        out = oracle(augment(x, g) * 2 - 1)
        loss = sum(weights[k] * F.cross_entropy(out[k], y[k]) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            logger.info("oracle step %d/%d loss %.4f (%.1f s)", step + 1, steps, loss.item(),
                        time.perf_counter() - start)
    return oracle.eval()


def accuracy(oracle: Oracle, images, attrs: dict | Sequence[dict], keys: Sequence[str] = ("shape", "colour"),
             value_range: tuple[float, float] | None = None) -> dict[str, float]:
    """Fraction of images whose read ``keys`` match ``attrs`` (one dict per image, or one for all).

    Returns one fraction per key and ``"all"``: the fraction where every key matches at once (e.g.
    ``keys=("shape", "colour")`` with ``{"shape": "cross", "colour": "yellow"}`` is the subject rate).
    """
    idx = oracle.predict(images, value_range)
    n = len(next(iter(idx.values())))
    if isinstance(attrs, dict):
        attrs = [attrs] * n
    if len(attrs) != n:
        raise ValueError(f"{n} images but {len(attrs)} attribute dicts")
    unknown = [k for k in keys if k not in HEADS]
    if unknown:
        raise KeyError(f"the oracle has no head for {unknown}; heads: {', '.join(HEADS)}")
    hits = {k: torch.tensor([HEADS[k].index(a[k]) for a in attrs]) == idx[k] for k in keys}
    out = {k: v.float().mean().item() for k, v in hits.items()}
    out["all"] = torch.stack(list(hits.values())).all(0).float().mean().item()
    return out


def evaluate(oracle: Oracle, n: int = 3000, seed: int = 12345) -> dict[str, float]:
    """Accuracy of every head on ``n`` fresh clean images of the oracle's distribution."""
    samples = oracle_set(n, seed)
    return accuracy(oracle, samples, [s.attrs for s in samples], keys=tuple(HEADS))
