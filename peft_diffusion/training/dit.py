"""Teaching a class-conditional diffusion transformer (a ``DiTPipeline`` folder, e.g. the embedded shapes-dit)
a new class from instance images: the DiT side of ``peft-diffusion train``.

A DiT has no text encoder: a class is a label. The instance images (e.g. the shapes world's crosses) get a new
label: the ``new-class`` method (``methods/new_class.py``) grows each block's class-embedding table by one
row and, with its ``lora`` option, adds LoRA on the ``dit`` preset's layers; both train, both are saved in one
adapter file (the class's name in its header). Prior preservation works as in the U-Net trainer, with class
labels where the U-Net has class prompts: ``class_prompts`` are names (or ids) of the base's classes (its
``id2label``), the base generates ``num_class_images`` images of them, and
``prior_empty_fraction`` of the prior items train with the null class, which keeps the unconditional
prediction, and so classifier-free guidance, the base's.

The same ``Config`` as the U-Net trainer (``dreambooth_config``); keys that mean nothing without a text
encoder (``train_text_encoder``, ``instance_prompt``...) must stay at their defaults. ``[extra_method]``
trains a second method into the transformer beside the new class (with ``lora = false`` in ``[method]``: the
new class's rows + DiffFit, or + a full fine-tune of blocks with ``partial-ft``), saved as
``adapter-<method>.safetensors`` next to ``adapter.safetensors``; ``generate`` takes both ``--adapter``s.

Checkpoints, resuming and stopping are the U-Net trainer's (``checkpoint.py``, ``run_control.py``):
``checkpoint_every`` writes ``output_dir/checkpoints/step-N`` (every adapter's tensors, the optimizer and
learning-rate scheduler states, the random states, the losses so far), ``resume = "latest"`` continues a run
exactly (the items of step k are drawn from a generator seeded by (seed, k), so a resumed run trains on the
same items as an uninterrupted one), and SIGINT / SIGTERM finish the current step, write its checkpoint and
raise ``TrainingInterrupted``. Not in this path (yet): accelerate's distribution and mixed precision,
periodic validation grids: a run writes ``validation/final.png`` (the new class and the first prior classes).

``base_kind`` and ``resolve_class_label`` also serve the CLI, which checks the kind of a ``--base`` before it
loads anything.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from .. import api
from ..adapter_files import save_adapter
from ..methods.new_class import NewClass, new_class_ids
from . import checkpoint
from .config import ConfigError
from .data import load_instances
from .dreambooth_config import RESUME_FREE, Config, NonFiniteLossError, check_snr_offset, method_config
from .evaluate import grid
from .losses import diffusion_loss, diffusion_target
from .run_control import StopSignals, TrainingInterrupted, resume_point

logger = logging.getLogger(__name__)

__all__ = ["base_kind", "load_dit", "class_ids", "resolve_class_label", "check_dit_config", "train_dit"]

NULL_CLASS = 1000  # ``DiTPipeline``'s unconditional class id (hard-coded there)
_UNCHANGED = ("train_text_encoder", "instance_prompt", "resolution", "prediction_type", "grad_accum",
              "mixed_precision", "gradient_checkpointing")


def base_kind(base: str | Path) -> str:
    """"dit" (a ``DiTPipeline`` folder), "unet" (a pipeline with a U-Net) or "" (unknown: a hub id, a folder
    without ``model_index.json``), read from the folder's ``model_index.json`` without loading a model."""
    index = Path(base) / "model_index.json"
    if not index.is_file():
        return ""
    info = json.loads(index.read_text())
    if info.get("_class_name") == "DiTPipeline" or "transformer" in info and "unet" not in info:
        return "dit"
    return "unet" if "unet" in info else ""


def load_dit(base: str | Path, dtype: torch.dtype = torch.float32):
    """The ``DiTPipeline`` at ``base``, progress bars off; ``ConfigError`` naming what was expected otherwise."""
    from diffusers import DiTPipeline

    kind = base_kind(base)
    if kind != "dit":
        raise ConfigError(f"base {base} is {'a U-Net pipeline' if kind == 'unet' else 'not a DiTPipeline folder'}: "
                          f"a class-conditional DiT (a DiTPipeline folder such as the embedded shapes-dit) was expected")
    pipe = DiTPipeline.from_pretrained(str(base), dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def class_ids(pipe) -> dict[str, int]:
    """{class name: id} the pipeline serves: its ``id2label`` names and the new classes of loaded adapters."""
    return {**pipe.labels, **new_class_ids(pipe.transformer)}


def resolve_class_label(pipe, spec: str | int) -> int:
    """A class id from a name ("red circle", or a new class's name) or a number; ``ValueError`` naming the
    valid ones when it is neither. Numbers must be ids the model was trained on (its ``id2label``, or any id
    below ``num_embeds_ada_norm`` when it has none) or a loaded new class's id."""
    named = class_ids(pipe)
    text = str(spec).strip()
    if text in named:
        return named[text]
    if text.lstrip("-").isdigit():
        label = int(text)
        base_ids = set(pipe.labels.values()) or set(range(pipe.transformer.config.num_embeds_ada_norm))
        if label in base_ids or label in named.values():
            return label
        lo, hi = (min(base_ids), max(base_ids)) if base_ids else (0, -1)
        new = sorted(set(named.values()) - base_ids)
        raise ValueError(f"class label {label} is outside this model's classes: {lo}..{hi}"
                         + (f" and the new classes {new}" if new else ""))
    raise ValueError(f"{text!r} is not a class of this model; classes: {', '.join(sorted(named, key=named.get))}")


def check_dit_config(cfg: Config) -> tuple[NewClass, object | None]:
    """(the ``new-class`` method config, the ``extra_method`` config or None) of a DiT run; ``ConfigError``
    for keys the DiT path cannot honour."""
    method = method_config(cfg.method)
    if not isinstance(method, NewClass):
        raise ConfigError(f"a DiT base ({cfg.base}) learns a new class with [method] method = \"new-class\" "
                          f"(its r, alpha, lora... options), not {cfg.method.get('method')!r}; another method "
                          f"trains beside it as [extra_method] (with lora = false in [method])")
    defaults = Config(base=cfg.base)
    changed = [k for k in _UNCHANGED if getattr(cfg, k) != getattr(defaults, k)]
    if changed:
        raise ConfigError(f"{', '.join(changed)}: not used when training a DiT base (no text encoder; see "
                          f"peft_diffusion.training.dit)")
    if not cfg.instance_dir:
        raise ConfigError("instance_dir is not set: give the folder of the new class's images (--instance_dir=PATH)")
    extra = method_config(cfg.extra_method, "extra_method") if cfg.extra_method else None
    if isinstance(extra, NewClass):
        raise ConfigError("[extra_method] is a second method beside [method]'s new class: not new-class again")
    return method, extra


def extra_name(cfg: Config) -> str:
    """The adapter name (and file ``adapter-<method>.safetensors``) of ``cfg``'s ``extra_method``."""
    return f"{cfg.adapter_name}-{cfg.extra_method['method']}"


def _step_seed(seed: int, step: int) -> int:
    """The seed of the generator that draws step ``step``'s items, noise and timesteps."""
    return (seed * 1_000_003 + step) % (2 ** 63)


@torch.no_grad()
def _generate(pipe, labels: list[int], seed: int, steps: int, guidance: float, batch: int = 50) -> torch.Tensor:
    """Images in [-1, 1] (N x 3 x H x W) of ``labels``; image i from generator seed ``seed + i``."""
    out = []
    for s in range(0, len(labels), batch):
        chunk = labels[s:s + batch]
        gens = [torch.Generator().manual_seed(seed + s + i) for i in range(len(chunk))]
        img = pipe(class_labels=chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                   output_type="pt").images
        out.append(img * 2 - 1)
    return torch.cat(out)


@torch.no_grad()
def _latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    return torch.cat([vae.encode(pixels[i:i + 64]).latent_dist.mean for i in range(0, len(pixels), 64)]) \
        * vae.config.scaling_factor


def train_dit(cfg: Config) -> Path:
    """Train a new class into the DiT at ``cfg.base`` from ``cfg.instance_dir``; returns the adapter file.

    Raises ``ConfigError``/``DataError`` on bad input before any step, ``NonFiniteLossError`` when the loss
    turns NaN/inf (the checkpoints written until then stay), ``TrainingInterrupted`` on SIGINT/SIGTERM.
    """
    method, extra = check_dit_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output_dir)
    resume_from = resume_point(cfg, out)
    start_step = json.loads((resume_from / checkpoint.STATE).read_text())["step"] if resume_from else 0
    with StopSignals() as stop:
        stop.step, stop.last_checkpoint = start_step, resume_from
        return _run(cfg, method, extra, resume_from, start_step, stop)


def _run(cfg: Config, method: NewClass, extra, resume_from: Path | None, start_step: int,
         stop: StopSignals) -> Path:
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    out = Path(cfg.output_dir)
    torch.manual_seed(cfg.seed)
    pipe = load_dit(cfg.base)
    check_snr_offset(cfg, pipe.scheduler)
    dit, vae = pipe.transformer, pipe.vae
    try:
        prior_labels = [resolve_class_label(pipe, c) for c in cfg.class_prompts] or sorted(set(pipe.labels.values()))
    except ValueError as e:
        raise ConfigError(f"class_prompts: {e}") from None
    null = dit.config.num_embeds_ada_norm
    known = sorted(set(pipe.labels.values())) or list(range(null))
    if method.init_label is not None and method.init_label not in known and method.init_label != null:
        raise ConfigError(f"[method] init_label {method.init_label} is outside this model's classes: "
                          f"{known[0]}..{known[-1]}, or {null} (the null class, the default)")
    resolution = dit.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    instances = load_instances(cfg.instance_dir, resolution, cfg.adapter_name)
    logger.info("instance images: %d from %s (%dx%d)", len(instances.captions), cfg.instance_dir, resolution,
                resolution)

    t0 = time.perf_counter()
    inst_latents = _latents(vae, instances.pixels.float())
    prior_latents = prior_ids = None
    if cfg.prior_preservation:  # the base's own images of its classes, before anything is injected
        prior_ids = torch.tensor([prior_labels[i % len(prior_labels)] for i in range(cfg.num_class_images)])
        images = _generate(pipe, prior_ids.tolist(), cfg.seed, cfg.class_steps, cfg.class_guidance)
        prior_latents = _latents(vae, images)
        logger.info("prior: %d images of %d classes (%.1f s)", len(images), len(prior_labels), time.perf_counter() - t0)

    api.inject(pipe, method, cfg.adapter_name)
    others = ()
    if extra is not None:
        others = (extra_name(cfg),)
        api.inject(pipe, extra, others[0])
    with tempfile.TemporaryDirectory() as tmp:  # a format that cannot hold a method fails now, not after training
        for name in (cfg.adapter_name, *others):
            try:
                save_adapter(pipe, Path(tmp) / f"{name}.safetensors", name, format=cfg.export_format)
            except ValueError as e:
                raise ConfigError(f"export_format {cfg.export_format!r}: {e}") from None
    new_label = (method.labels or (cfg.adapter_name,))[0]
    label = new_class_ids(dit)[new_label]
    logger.info("new class %r has id %d; trainable parameters:\n%s", new_label, label, api.parameter_report(pipe))
    trained = [(n, p) for n, p in dit.named_parameters() if p.requires_grad]
    params = [p for _, p in trained]
    rows = [p for n, p in trained if n.endswith(".emb_params")]  # the new class's rows: embedding_lr
    rest = [p for n, p in trained if not n.endswith(".emb_params")]
    groups = [{"params": ps, "lr": lr} for ps, lr in ((rest, cfg.lr), (rows, cfg.embedding_lr or cfg.lr)) if ps]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=cfg.steps)
    losses: list[float] = []
    if resume_from:
        info = checkpoint.load(resume_from, pipe, optimizer, lr_scheduler)
        losses = list(info.get("losses", []))[:start_step]
        changed = {k: (v, getattr(cfg, k)) for k, v in info.get("config", {}).items()
                   if k not in RESUME_FREE and hasattr(cfg, k) and v != getattr(cfg, k)}
        if changed:
            logger.warning("resuming with settings other than the checkpoint's (was, now): %s", changed)
        checkpoint.restore_rng(resume_from, checkpoint.SingleProcess())  # dropout in the adapters
        logger.info("resumed from %s at step %d", resume_from, start_step)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    # eval stops diffusers' own label dropout (the prior items drop labels here); the adapters train
    dit.eval()
    for _, site in api.sites(dit):
        site.deltas.train()

    def save_checkpoint(step: int) -> Path:
        return checkpoint.save(out / "checkpoints", step, checkpoint.SingleProcess(), pipe, cfg.adapter_name,
                               optimizer, lr_scheduler, {"config": dataclasses.asdict(cfg), "label": label,
                                                         "losses": losses}, keep=cfg.checkpoints_keep, others=others)

    def draw(seed: int):
        """(latents, labels, noise, timesteps) of one batch, all from a generator seeded with ``seed``."""
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randint(len(inst_latents), (cfg.batch_size,), generator=gen)
        x0, y = inst_latents[idx], torch.full((cfg.batch_size,), label)
        if prior_latents is not None:
            pidx = torch.randint(len(prior_latents), (cfg.batch_size,), generator=gen)
            drop = torch.rand(cfg.batch_size, generator=gen) < cfg.prior_empty_fraction
            x0 = torch.cat([x0, prior_latents[pidx]])
            y = torch.cat([y, torch.where(drop, null, prior_ids[pidx])])
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=gen)
        return x0, y, noise, t

    def batch_loss(batch) -> torch.Tensor:
        x0, y, noise, t = batch
        pred = dit(scheduler.add_noise(x0, noise, t), timestep=t, class_labels=y).sample
        per_item = diffusion_loss(pred, diffusion_target(scheduler, x0, noise, t), scheduler, t,
                                  cfg.min_snr_gamma or None, cfg.snr_offset)
        parts = per_item.chunk(2) if prior_latents is not None else (per_item,)
        return parts[0].mean() + (cfg.prior_loss_weight * parts[1].mean() if len(parts) == 2 else 0)

    n_scoring = api.scoring_batches(pipe)
    if n_scoring and not resume_from:  # selective methods choose what trains (FISH, Child-Tuning_D, LT-SFT)
        batches = [draw(_step_seed(cfg.seed + 1, i)) for i in range(n_scoring)]
        for line in api.prepare(pipe, batch_loss, batches):
            logger.info("scoring pass (%d batches): %s", n_scoring, line)
    stepping = any(hasattr(d.config, "after_step") for _, h in api.sites(dit) for d in h.deltas.values())
    last_checkpoint = resume_from
    t_loop = time.perf_counter()
    stop.armed = True
    for step in range(start_step, cfg.steps):
        loss = batch_loss(draw(_step_seed(cfg.seed, step)))
        if not torch.isfinite(loss):
            where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
            raise NonFiniteLossError(f"loss is {loss.item()} at step {step + 1}: training stopped before using it; "
                                     f"{where}")
        reg = api.regularizer(pipe)  # extra loss terms (Diff pruning's L0)
        optimizer.zero_grad(set_to_none=True)
        (loss if reg is None else loss + reg).backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        if stepping:  # methods acting between steps (Delta-LoRA, IncreLoRA)
            api.after_step(pipe, step + 1, cfg.steps)
        lr_scheduler.step()
        losses.append(loss.item())
        done = step + 1
        stop.step = done
        if done % cfg.log_every == 0 or done == cfg.steps:
            logger.info("step %d/%d loss %.4f", done, cfg.steps, sum(losses[-cfg.log_every:]) / len(losses[-cfg.log_every:]))
        if cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            last_checkpoint = stop.last_checkpoint = save_checkpoint(done)
        if stop.signum:
            stop.armed = False  # a second signal while the checkpoint is written stops at once
            if last_checkpoint is None or last_checkpoint.name != f"step-{done:06d}":
                last_checkpoint = save_checkpoint(done)
            raise TrainingInterrupted(stop.signum, done, last_checkpoint)
    stop.armed = False
    s_per_step = (time.perf_counter() - t_loop) / max(cfg.steps - start_step, 1)

    dit.eval()
    out.mkdir(parents=True, exist_ok=True)
    path = save_adapter(pipe, out / "adapter.safetensors", cfg.adapter_name, format=cfg.export_format)
    for name in others:
        save_adapter(pipe, out / f"adapter-{cfg.extra_method['method']}.safetensors", name, format=cfg.export_format)
    if cfg.validation_every >= 0:
        shown = [label] * cfg.validation_images + prior_labels[:1] * cfg.validation_images
        images = (_generate(pipe, shown, cfg.validation_seed, cfg.validation_steps, cfg.validation_guidance) + 1) * 127.5
        (out / "validation").mkdir(exist_ok=True)
        grid(images.clamp(0, 255).round().byte().permute(0, 2, 3, 1).numpy(), cfg.validation_images).save(
            out / "validation" / "final.png")
    (out / "losses.json").write_text(json.dumps({"label": label, "losses": losses, "s_per_step": s_per_step}))
    logger.info("adapter %s (new class id %d), %.1f s", path, label, time.perf_counter() - t0)
    return path


def pick_trainer(cfg: Config):
    """The trainer for ``cfg``'s base: ``train_dit`` for a DiT folder, else the U-Net trainer. A method that
    needs a DiT on a U-Net base is a ``ConfigError`` here, before anything loads."""
    from .dreambooth import train

    kind = base_kind(cfg.base)
    if kind == "dit":
        check_dit_config(cfg)
        return train_dit
    if cfg.extra_method:
        raise ConfigError(f"extra_method ({cfg.extra_method.get('method')!r}) is for DiT bases (a second method "
                          f"beside new-class); {cfg.base} is {'a U-Net pipeline' if kind == 'unet' else 'not one'}")
    if isinstance(method_config(cfg.method), NewClass):
        raise ConfigError(f"method new-class needs a class-conditional DiT base (a DiTPipeline folder such as the "
                          f"embedded shapes-dit); {cfg.base} is {'a U-Net pipeline' if kind == 'unet' else 'not one'}")
    return train


def class_label_specs(prompts: list[str], labels: list[str]) -> list[str]:
    """What ``generate`` asked a DiT for: ``--class-label`` values, and prompts naming a class ("a red
    circle" names "red circle")."""
    named = [p[2:].strip() if p.lower().startswith("a ") else p.strip() for p in prompts]
    return list(labels) + named


@torch.no_grad()
def generate_classes(pipe, specs: list[str], n: int, seed: int = 0, steps: int = 20, guidance: float = 4.0,
                     batch_size: int = 16):
    """(uint8 images N x H x W x 3, the class names) of ``n`` images per class spec (a name or an id, checked
    by ``resolve_class_label`` before anything is generated); image i uses generator seed ``seed + i``."""
    ids = [resolve_class_label(pipe, s) for s in specs]
    names = {v: k for k, v in class_ids(pipe).items()}
    wanted = [i for i in ids for _ in range(n)]
    images = (_generate(pipe, wanted, seed, steps, guidance, batch_size) + 1) * 127.5
    return images.clamp(0, 255).round().byte().permute(0, 2, 3, 1).numpy(), [names.get(i, str(i)) for i in ids]
