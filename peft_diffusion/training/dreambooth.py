"""DreamBooth fine-tuning (Ruiz et al., arXiv 2208.12242) of any registered PEFT method, on accelerate.

    cfg = load_config("samples/dreambooth.toml", ["--steps=200"])
    adapter_file = train(cfg)

What a run does, in order: check the config; load the base pipeline (a diffusers folder or hub id with
``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``); read the instance images (captions:
``<image>.txt`` next to each, one or more lines, each item drawing one; else ``instance_prompt``); generate or
read the cached class images; encode every image to latents once (the posterior mean); inject the method
into the U-Net (and a second method into the text encoder when ``train_text_encoder``); train; write
validation grids, logs and checkpoints along the way; export the adapter as one file (native format:
``load_adapter`` reads it, and for LoRA so does diffusers' ``load_lora_weights``).

Loss per item (instance x, prior x_pr): ||eps_hat(x_t) - target||^2 + prior_loss_weight * ||... x_pr ...||^2,
min-SNR weighted when ``min_snr_gamma`` > 0; the target is the noise (epsilon) or v, as the base's scheduler
config says unless ``prediction_type`` overrides it. A fraction ``prior_empty_fraction`` of the prior items
is trained with the empty caption: the unconditional prediction then stays the base's, which keeps
classifier-free guidance from amplifying the fine-tune into ordinary prompts.

Distribution is accelerate's: the same code runs on one CPU, one GPU, ``accelerate launch`` or
``torchrun --nproc_per_node N`` (on CPU, accelerate's MULTI_CPU with gloo). ``batch_size`` is the global
batch per micro-step; accelerate splits it between the processes (``split_batches``), and every item is a
function of (seed, item index) alone (``data.ItemStream``), so N processes, gradient accumulation and a
resumed run all train on the same items as one uninterrupted process.

Relative paths in a config file are taken from the file's folder, on the command line from the working
directory; the default base is the embedded ``peft_diffusion/models/shapes-base`` (package data).

Stopping: SIGINT (Ctrl-C) or SIGTERM during training finishes the current step, writes a checkpoint of it
(atomically, like every checkpoint) and raises ``TrainingInterrupted``; ``resume = "latest"`` continues from
there. A second signal, or one before the first step, stops at once (nothing new is saved). A run into an
``output_dir`` that already holds one (an adapter or checkpoints) needs ``resume`` or ``overwrite``, so two
runs never mix their checkpoints.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from .. import api
from ..adapter_files import save_adapter
from ..methods.token_rows import expand_prompt
from . import call_inputs, checkpoint, condition_inputs
from .config import ConfigError
from .data import DataError, ItemStream, class_images, load_instances, weights_digest
from .dreambooth_config import (DEFAULT_BASE, RESUME_FREE, Config, NonFiniteLossError,  # noqa: F401 (re-exported)
                                config_dict, load_config, method_config)
from .evaluate import generate, grid
from .logs import CSVTracker
from .run_control import (StopSignals, TrainingInterrupted, clear_previous_run,  # noqa: F401 (re-exported)
                          previous_run, resume_point)
from .losses import diffusion_loss, diffusion_target

logger = logging.getLogger(__name__)

EMBEDDING_PARAMS = ".emb_params"  # token vectors of Textual Inversion / ED-LoRA (``tokens.TokenRows``)

# ---------------------------------------------------------------- the pieces of a run

def load_pipeline(base: str, dtype: torch.dtype = torch.float32):
    """The base pipeline, progress bars off; ``ConfigError`` when it lacks what DreamBooth needs (a DiT folder
    says so before loading) or when a tokenizer does not fit its text encoder (``check_vocab_sizes``)."""
    from diffusers import DiffusionPipeline

    from .dit import base_kind

    if base_kind(base) == "dit":
        cls = json.loads((Path(base) / "model_index.json").read_text()).get("_class_name", "a transformer pipeline")
        raise ConfigError(f"base {base} is a {cls} folder (a diffusion transformer, no U-Net): a text-to-image "
                          f"pipeline with a U-Net (unet, vae, text_encoder, tokenizer, scheduler) was expected here; "
                          f"a class-conditional DiT learns a new class through `peft-diffusion train` with [method] "
                          f"method = \"new-class\"")
    pipe = DiffusionPipeline.from_pretrained(base, dtype=dtype)
    missing = [c for c in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if getattr(pipe, c, None) is None]
    if missing:
        raise ConfigError(f"base {base} ({type(pipe).__name__}) lacks {missing}: DreamBooth here needs a "
                          f"Stable-Diffusion-style pipeline")
    check_vocab_sizes(pipe, base)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_vocab_sizes(pipe, base: str = "the pipeline") -> None:
    """``ConfigError`` naming both sizes when a tokenizer of ``pipe`` has more tokens than its text encoder has
    embedding rows (ids past the table would fail deep inside the first prompt's encoding, or index memory
    they do not own on a GPU)."""
    for tok_name, enc_name in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"),
                               ("tokenizer_3", "text_encoder_3")):
        tokenizer, encoder = getattr(pipe, tok_name, None), getattr(pipe, enc_name, None)
        if tokenizer is None or encoder is None or not hasattr(encoder, "get_input_embeddings"):
            continue
        rows = encoder.get_input_embeddings().num_embeddings
        if len(tokenizer) > rows:
            vocab = getattr(encoder.config, "vocab_size", rows)
            raise ConfigError(f"base {base}: its {tok_name} has {len(tokenizer)} tokens but its {enc_name} has a "
                              f"vocabulary of {vocab} (vocab_size; {rows} embedding rows): ids {rows} and up have no "
                              f"embedding. Use the tokenizer saved with that text encoder (or resize the encoder's "
                              f"embeddings to the tokenizer: text_encoder.resize_token_embeddings)")


def set_prediction_type(pipe, kind: str):
    """The training noise scheduler (DDPM on the base's schedule), the prediction type overridden if asked."""
    from diffusers import DDPMScheduler

    extra = {"prediction_type": kind} if kind else {}
    if kind and pipe.scheduler.config.get("prediction_type") != kind:
        logger.warning("training for %s prediction; the base's scheduler says %s", kind,
                       pipe.scheduler.config.get("prediction_type"))
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **extra)
    return DDPMScheduler.from_config(pipe.scheduler.config, **extra)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    n = tokenizer.model_max_length
    long = [c for c in captions if len(tokenizer(c).input_ids) > n]
    if long:
        logger.warning("%d captions are longer than the tokenizer's %d tokens and get cut, e.g. %r", len(long), n,
                       long[0])
    return tokenizer(captions, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids


@torch.no_grad()
def encode_images(vae, pixels: torch.Tensor, device, batch: int = 32) -> torch.Tensor:
    out = []
    for i in range(0, len(pixels), batch):
        latents = vae.encode(pixels[i:i + batch].to(device, vae.dtype)).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        out.append(((latents - shift) * vae.config.scaling_factor).float())
    return torch.cat(out)


def resolve_precision(choice: str, cpu: bool) -> str:
    if choice != "auto":
        return choice
    if not cpu and torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


# ---------------------------------------------------------------- the run

def train(cfg: Config, on_validation: Callable[[int, object, list[str]], dict] | None = None) -> Path:
    """Run DreamBooth training as ``cfg`` says; returns the exported adapter file.

    ``on_validation(step, images, prompts)`` (uint8 N x H x W x 3 images) may return metrics to log.
    Raises ``ConfigError``/``DataError`` on bad input before any step, ``NonFiniteLossError`` when the
    loss turns NaN/inf (the checkpoints written until then stay), ``TrainingInterrupted`` on SIGINT/SIGTERM.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output_dir)
    if not cfg.instance_dir:
        raise ConfigError("instance_dir is not set: give the folder of subject images (--instance_dir=PATH)")
    if cfg.extra_method:
        raise ConfigError(f"extra_method ({cfg.extra_method.get('method')!r}) is for DiT bases (a second method "
                          f"beside new-class); on a U-Net base put one method in [method]")
    cpu = cfg.cpu or not torch.cuda.is_available()  # accelerate needs cpu=True to see torchrun's CPU processes
    # one process clears a run that --overwrite replaces; the others find nothing to clear
    resume_from = resume_point(cfg, out, clear=int(os.environ.get("RANK", "0")) == 0)
    start_step = json.loads((resume_from / checkpoint.STATE).read_text())["step"] if resume_from else 0
    trackers = {"csv": [CSVTracker(out / "logs" / "log.csv", keep_until=start_step if resume_from else None)],
                "tensorboard": ["tensorboard"], "none": None}[cfg.log_with]
    fresh = not AcceleratorState._shared_state
    accelerator = Accelerator(
        cpu=cpu, mixed_precision=resolve_precision(cfg.mixed_precision, cpu),
        gradient_accumulation_steps=cfg.grad_accum, log_with=trackers,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        dataloader_config=DataLoaderConfiguration(split_batches=True))
    try:
        with StopSignals() as stop:
            stop.step, stop.last_checkpoint = start_step, resume_from
            return _run(cfg, accelerator, resume_from, start_step, on_validation, stop)
    finally:
        accelerator.end_training()
        if fresh:  # leave accelerate's process-wide state as found: the next train() may use other settings
            AcceleratorState._reset_state()
            GradientState._reset_state()


def _run(cfg: Config, accelerator, resume_from: Path | None, start_step: int, on_validation,
         stop: StopSignals) -> Path:
    out = Path(cfg.output_dir)
    if cfg.batch_size % accelerator.num_processes:
        raise ConfigError(f"batch_size {cfg.batch_size} must be divisible by the {accelerator.num_processes} processes")
    set_seed(cfg.seed)
    device, main = accelerator.device, accelerator.is_main_process
    logger.info("%s, %d process(es), device %s, mixed precision %s", accelerator.distributed_type,
                accelerator.num_processes, device, accelerator.mixed_precision)

    # ---- base pipeline and data (every check before the first step)
    pipe = load_pipeline(cfg.base)
    resolution = cfg.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    if resolution % pipe.vae_scale_factor:
        raise ConfigError(f"resolution {resolution} must be a multiple of the VAE factor {pipe.vae_scale_factor}")
    noise_scheduler = set_prediction_type(pipe, cfg.prediction_type)
    instances = load_instances(cfg.instance_dir, resolution, cfg.instance_prompt or None)
    logger.info("instance images: %d from %s", len(instances.captions), cfg.instance_dir)
    digest = weights_digest(pipe.unet, pipe.text_encoder, pipe.vae) if cfg.prior_preservation else ""
    pipe.to(device)
    prior_pixels, prior_prompts = None, []
    if cfg.prior_preservation:
        with accelerator.main_process_first():  # the main process generates; the others read its cache
            prior_pixels, prior_prompts, _ = class_images(
                pipe, cfg.class_prompts, cfg.num_class_images, cfg.class_cache, digest, seed=cfg.seed,
                steps=cfg.class_steps, guidance=cfg.class_guidance, resolution=resolution, generate_missing=main)

    # ---- latents and captions, once
    inst_latents = encode_images(pipe.vae, instances.pixels, device)
    prior_latents = encode_images(pipe.vae, prior_pixels, device) if prior_pixels is not None else None
    captions = list(dict.fromkeys([c for cs in instances.captions for c in cs] + prior_prompts + [""]))
    index = {c: i for i, c in enumerate(captions)}
    widest = max(len(cs) for cs in instances.captions)  # image i: captions inst_caption[i, :n_captions[i]]
    inst_caption = torch.tensor([[index[c] for c in cs] + [0] * (widest - len(cs)) for cs in instances.captions],
                                device=device)
    n_captions = torch.tensor([len(cs) for cs in instances.captions], device=device)
    prior_caption = torch.tensor([index[c] for c in prior_prompts], device=device, dtype=torch.long)
    empty_caption = index[""]

    # ---- adapters: only they train; frozen weights in the mixed-precision dtype
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False)
        if weight_dtype != torch.float32:
            part.to(dtype=weight_dtype)
    # the method goes where it says (U-Net for LoRA-style methods, text encoder for Textual Inversion, both
    # for ED-LoRA); ``train_text_encoder`` adds a second method to the text encoder
    method = method_config(cfg.method)
    if call_inputs.needs_image_encoder(method):  # an image prompt (IP-Adapter): the encoder joins the pipeline
        call_inputs.attach_image_encoder(pipe, cfg.image_encoder, device)
    api.inject(pipe, method, cfg.adapter_name)
    if cfg.train_text_encoder:
        api.inject(pipe, method_config(cfg.text_encoder_method, "text_encoder_method"), cfg.adapter_name,
                   components=("text_encoder",))
    if main:  # a format that cannot hold this method fails now, not after training
        with tempfile.TemporaryDirectory() as tmp:
            try:
                save_adapter(pipe, Path(tmp) / "check.safetensors", cfg.adapter_name, format=cfg.export_format)
            except ValueError as e:
                raise ConfigError(f"export_format {cfg.export_format!r}: {e}") from None
    lrs = {"unet": cfg.lr, "text_encoder": cfg.text_encoder_lr or cfg.lr}
    models = {k: getattr(pipe, k) for k in lrs if any(p.requires_grad for p in getattr(pipe, k).parameters())}
    te_trains = "text_encoder" in models  # then the captions are encoded anew every step
    groups = []
    for key, model in models.items():  # one group per model, and one for new token vectors (own rate)
        trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        for _, p in trained:
            p.data = p.data.float()  # trained in fp32 whatever the base dtype
        vectors = [p for n, p in trained if n.endswith(EMBEDDING_PARAMS)]
        rest = [p for n, p in trained if not n.endswith(EMBEDDING_PARAMS)]
        groups += [{"params": ps, "lr": lr} for ps, lr in ((rest, lrs[key]), (vectors, cfg.embedding_lr or cfg.lr)) if ps]
    logger.info("trainable parameters:\n%s", api.parameter_report(pipe))
    # after inject: token methods add tokens, and multi-vector ones are written out as the pipelines do
    ids = tokenize(pipe.tokenizer, [expand_prompt(c, pipe.tokenizer) for c in captions]).to(device)
    embeddings = None
    if not te_trains:
        with torch.no_grad():
            embeddings = torch.cat([pipe.text_encoder(ids[i:i + 64])[0] for i in range(0, len(ids), 64)]).float()
    if cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        if te_trains:
            pipe.text_encoder.gradient_checkpointing_enable()

    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=cfg.steps)
    if resume_from:  # before prepare: the states load into the plain objects
        info = checkpoint.load(resume_from, pipe, optimizer, lr_scheduler)
        changed = {k: (v, getattr(cfg, k)) for k, v in info.get("config", {}).items()
                   if k not in RESUME_FREE and hasattr(cfg, k) and v != getattr(cfg, k)}
        if changed:
            logger.warning("resuming with settings other than the checkpoint's (was, now): %s", changed)
        logger.info("resumed from %s at step %d", resume_from, start_step)

    # per-call inputs of the adapters (IP-Adapter's image prompts), with the captions they drop
    with condition_inputs.training_run(instances.paths, cfg.validation_images):  # condition maps read from files
        per_call = call_inputs.per_call_inputs(pipe, instances.pixels, cfg.image_prompt_dropout)

    def batch_loss(batch, unet, text_encoder):
        """(the loss, its per-item parts: instance, prior) of one batch."""
        inst = batch["instance"]
        x0, noise, t = inst_latents[inst], batch["noise"][:, 0], batch["timesteps"][:, 0]
        caption = inst_caption[inst, (batch["choice"] * n_captions[inst]).long()]
        if prior_latents is not None:
            prior = batch["prior"]
            x0 = torch.cat([x0, prior_latents[prior]])
            noise = torch.cat([noise, batch["noise"][:, 1]])
            t = torch.cat([t, batch["timesteps"][:, 1]])
            caption = torch.cat([caption, torch.where(batch["drop_prior_caption"], empty_caption,
                                                      prior_caption[prior])])
        extra, drop_text = per_call(batch) if per_call else ({}, None)
        if drop_text is not None:
            caption = torch.where(drop_text, empty_caption, caption)
        context = embeddings[caption] if embeddings is not None else text_encoder(ids[caption])[0]
        with api.inputs(pipe.unet, **extra):
            pred = unet(noise_scheduler.add_noise(x0, noise, t), t, context).sample
        losses = diffusion_loss(pred, diffusion_target(noise_scheduler, x0, noise, t), noise_scheduler, t,
                                cfg.min_snr_gamma or None)
        parts = losses.chunk(2) if prior_latents is not None else (losses,)
        loss = parts[0].mean() + (cfg.prior_loss_weight * parts[1].mean() if len(parts) == 2 else 0)
        return loss, parts

    n_scoring = api.scoring_batches(pipe)
    if n_scoring and not resume_from:  # selective methods choose what trains (FISH, Child-Tuning_D, LT-SFT)
        scoring = ItemStream(cfg.seed + 1, 0, n_scoring * cfg.batch_size, len(inst_latents),
                             len(prior_latents) if prior_latents is not None else 0, tuple(inst_latents.shape[1:]),
                             noise_scheduler.config.num_train_timesteps,
                             cfg.prior_empty_fraction if cfg.prior_preservation else 0.0)
        batches = [{k: v.to(device) for k, v in b.items()}
                   for b in torch.utils.data.DataLoader(scoring, batch_size=cfg.batch_size, shuffle=False)]
        t_scoring = time.perf_counter()
        with accelerator.autocast():
            lines = api.prepare(pipe, lambda b: batch_loss(b, pipe.unet, pipe.text_encoder)[0], batches)
        for line in lines:
            logger.info("scoring pass (%d batches, %.1f s): %s", n_scoring, time.perf_counter() - t_scoring, line)
    per_step = cfg.batch_size * cfg.grad_accum
    stream = ItemStream(cfg.seed, start_step * per_step, (cfg.steps - start_step) * per_step, len(inst_latents),
                        len(prior_latents) if prior_latents is not None else 0, tuple(inst_latents.shape[1:]),
                        noise_scheduler.config.num_train_timesteps,
                        cfg.prior_empty_fraction if cfg.prior_preservation else 0.0)
    loader = torch.utils.data.DataLoader(stream, batch_size=cfg.batch_size, shuffle=False)
    *trained, optimizer, lr_scheduler, loader = accelerator.prepare(*models.values(), optimizer, lr_scheduler, loader)
    prepared = dict(zip(models, trained))
    unet, text_encoder = prepared.get("unet", pipe.unet), prepared.get("text_encoder", pipe.text_encoder)
    models = list(models.values())
    params = [p for g in groups for p in g["params"]]
    # whether any adapter acts between steps: else the per-step walk over the pipeline's modules is skipped
    stepping = any(hasattr(d.config, "after_step") for _, h in api.hosts(pipe) for d in h.deltas.values())
    regularizing = any(hasattr(d.config, "regularizer") for _, h in api.hosts(pipe) for d in h.deltas.values())
    if main:
        accelerator.init_trackers("dreambooth", config=config_dict(cfg))

    def validate(step: int) -> None:
        if not main or cfg.validation_every < 0:
            return
        prompts = cfg.validation_prompts or [instances.captions[0][0]] + prior_prompts[:1]
        wanted = [p for p in prompts for _ in range(cfg.validation_images)]
        for m in models:
            m.eval()
        with condition_inputs.training_run(instances.paths, cfg.validation_images):  # image prompts, condition maps
            given = call_inputs.validation_inputs(pipe, instances.pixels, cfg.validation_guidance > 1)
        per_batch = 16 // cfg.validation_images * cfg.validation_images or cfg.validation_images  # whole rows
        with accelerator.autocast(), api.inputs(pipe, **given):
            images = generate(pipe, wanted, seed=cfg.validation_seed, steps=cfg.validation_steps,
                              guidance=cfg.validation_guidance, size=resolution, batch_size=per_batch)
        for m in models:
            m.train()
        (out / "validation").mkdir(parents=True, exist_ok=True)
        shown = condition_inputs.side_by_side(images, given)  # condition | generation
        grid(*(shown or (images, cfg.validation_images))).save(out / "validation" / f"step-{step:06d}.png")
        metrics = on_validation(step, images, wanted) if on_validation else None
        if metrics:
            logger.info("step %d validation: %s", step, metrics)
            accelerator.log(metrics, step=step)

    def save_checkpoint(step: int) -> Path:
        return checkpoint.save(out / "checkpoints", step, accelerator, pipe, cfg.adapter_name, optimizer,
                               lr_scheduler, {"config": dataclasses.asdict(cfg)}, keep=cfg.checkpoints_keep)

    # ---- training
    if start_step == 0:
        validate(0)
    for m in models:
        m.train()
    step, last_checkpoint = start_step, resume_from
    sums: dict[str, float] = {}
    bar = tqdm(total=cfg.steps, initial=start_step, disable=not (main and cfg.progress), desc="dreambooth")
    t0, t_step = time.perf_counter(), start_step
    rng_pending = resume_from
    stop.armed, stop_signal = True, 0
    for batch in loader:
        if rng_pending:  # after the loader has drawn its seed: the random stream goes on as if never stopped
            checkpoint.restore_rng(rng_pending, accelerator)
            rng_pending = None
        with accelerator.accumulate(*models):
            loss, parts = batch_loss(batch, unet, text_encoder)
            # one gather per micro-step: the losses, and whether a process was asked to stop (so that all
            # processes stop after the same step)
            flag = torch.tensor(float(stop.signum), device=loss.device)
            seen = accelerator.gather(torch.stack([loss.detach()] + [p.detach().mean() for p in parts] + [flag])[None])
            stop_signal = stop_signal or int(seen[:, -1].max().item())
            seen = seen[:, :-1]
            if not torch.isfinite(seen).all():
                where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
                raise NonFiniteLossError(f"loss is {seen[:, 0].tolist()} at step {step + 1}: training stopped before "
                                         f"using it; {where}")
            for k, v in zip(("loss", "instance_loss", "prior_loss"), seen.mean(0).tolist()):
                sums[k] = sums.get(k, 0.0) + v / cfg.grad_accum
            reg = api.regularizer(pipe) if regularizing else None  # extra loss terms (Diff pruning's L0)
            if reg is not None:
                sums["regularizer"] = sums.get("regularizer", 0.0) + reg.item() / cfg.grad_accum
            accelerator.backward(loss if reg is None else loss + reg)
            if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            if stepping and accelerator.sync_gradients:  # methods acting between steps (Delta-LoRA, IncreLoRA)
                api.after_step(pipe, step + 1, cfg.steps)
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            continue
        step += 1
        stop.step = step
        bar.update(1)
        bar.set_postfix(loss=f"{sums['loss']:.4f}")
        if step % cfg.log_every == 0 or step == cfg.steps:
            logs = {**sums, "lr": lr_scheduler.get_last_lr()[0], "s_per_step": (time.perf_counter() - t0) / (step - t_step)}
            accelerator.log(logs, step=step)
            t0, t_step = time.perf_counter(), step
        sums = {}
        if cfg.validation_every > 0 and step % cfg.validation_every == 0 and step != cfg.steps:
            validate(step)
        if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
            last_checkpoint = stop.last_checkpoint = save_checkpoint(step)
        if stop_signal:
            stop.armed = False  # a second signal while the checkpoint is written stops at once
            bar.close()
            if last_checkpoint is None or last_checkpoint.name != f"step-{step:06d}":
                last_checkpoint = save_checkpoint(step)
            raise TrainingInterrupted(stop_signal, step, last_checkpoint)
    bar.close()
    stop.armed = False

    # ---- export
    validate(cfg.steps)
    path = out / "adapter.safetensors"
    accelerator.wait_for_everyone()
    if main:
        save_adapter(pipe, path, cfg.adapter_name, format=cfg.export_format)
        logger.info("adapter written to %s", path)
    return path


__all__ = ["Config", "NonFiniteLossError", "ConfigError", "DataError", "TrainingInterrupted", "load_config", "train",
           "method_config", "load_pipeline", "DEFAULT_BASE"]
