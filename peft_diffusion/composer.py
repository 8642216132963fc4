"""AdapterComposerPipeline: a Stable-Diffusion-style pipeline that takes, per call, this package's adapter files
with weights, an image prompt (IP-Adapter, arXiv 2308.06721) and spatial controls (ControlNet, arXiv 2302.05543;
T2I-Adapter, arXiv 2302.08453; several at once with weights, optional region masks).

Load it the diffusers way from the repository (``pipelines/adapter_composer/pipeline.py`` re-exports this class)::

    pipe = DiffusionPipeline.from_pretrained(base, custom_pipeline="pipelines/adapter_composer", trust_remote_code=True)

or ``AdapterComposerPipeline.from_pretrained(base)`` / ``.from_pipe(pipe)``. The class lives in the package so
that ``peft-diffusion generate`` runs the same code. The denoising loop is diffusers' ControlNet pipeline's
(``StableDiffusionControlNetPipeline.__call__``) with T2I-Adapter features added as
``StableDiffusionAdapterPipeline`` adds them, so with one ControlNet, one T2I-Adapter, an IP-Adapter or a LoRA
alone it gives the stock pipeline's images (tests/test_composer.py, atol 1e-5).

Nothing trains here; nothing is merged (``adapters`` activates files' adapters with ``set_adapters``).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

from . import controls as ctl

__all__ = ["AdapterComposerPipeline"]


class AdapterComposerPipeline(StableDiffusionPipeline):
    """``pipe(prompt, adapters={file: weight}, image_prompt=img, controls=[Control(...)], ...)``; the other
    arguments are ``StableDiffusionPipeline``'s (plus ``guess_mode`` for ControlNets)."""

    # ---------------------------------------------------------------- adapters

    def use_adapters(self, adapters) -> dict[str, float]:
        """Activate exactly ``adapters`` ({file or loaded name: weight}, or a list of them at weight 1): files not
        loaded yet are loaded with ``pd.load_adapter`` (once; an IP-Adapter file without an image encoder on the
        pipeline gets the embedded shapes-clip first). Returns {name: weight}."""
        from .api import adapter_names, set_adapters

        if isinstance(adapters, (str, os.PathLike)):
            adapters = [adapters]
        if not isinstance(adapters, dict):
            adapters = dict(a if isinstance(a, tuple) else (a, 1.0) for a in adapters)
        files = self.__dict__.setdefault("_adapter_files", {})
        weights = {}
        for key, weight in adapters.items():
            path = Path(key)
            if path.is_file() or path.is_dir():
                resolved = str(path.resolve())
                if resolved not in files or files[resolved] not in adapter_names(self):
                    files[resolved] = self.load_adapter_file(resolved)
                name = files[resolved]
            elif str(key) in adapter_names(self):
                name = str(key)
            else:
                raise FileNotFoundError(f"adapter {key!r} is neither a file nor a loaded adapter (loaded: "
                                        f"{adapter_names(self)})")
            weights[name] = float(weight)
        set_adapters(self, weights)
        return weights

    def load_adapter_file(self, path: str, scale: float = 1.0) -> str:
        """``pd.load_adapter``, after ``attach_image_encoder_for(self, path)``."""
        from .adapter_files import load_adapter

        attach_image_encoder_for(self, path)
        return load_adapter(self, path, scale=scale)

    # ---------------------------------------------------------------- controls

    def prepare_controls(self, controls, width: int, height: int, batch: int, cfg: bool, guess_mode: bool):
        """(ControlNets as [(control, model, condition, mask)], T2I-Adapters as [(control, weighted features)]),
        every model checked against the U-Net before any of them runs."""
        device, dtype = self._execution_device, self.unet.dtype
        cache = self.__dict__.setdefault("_control_models", {})
        prepared = []
        for i, spec in enumerate(controls or ()):
            c = ctl.as_control(spec)
            folder = isinstance(c.model, (str, Path))
            key = ctl.folder_key(c.model) if folder else None  # a folder written again is loaded again
            model = cache.get(key) or ctl.load_model(c.model)
            label = f"control {i} ({ctl.kind_of(model)}{' ' + str(c.model) if folder else ''})"
            if ctl.kind_of(model) == "controlnet":
                ctl.check_controlnet(model, self.unet, self.vae_scale_factor, label)
            elif height % model.total_downscale_factor or width % model.total_downscale_factor:
                raise ValueError(f"{label} downsamples its condition {model.total_downscale_factor}x in all; the "
                                 f"image size {width}x{height} is not a multiple of it")
            if folder:
                cache[key] = model
            prepared.append((c, model, label, ctl.condition_tensor(c, model, (width, height)),
                             ctl.mask_tensor(c.mask, (width, height))))
        nets, adapters = [], []
        latent_hw = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        for c, model, label, cond, mask in prepared:
            model.to(device=device, dtype=dtype)
            if ctl.kind_of(model) == "controlnet":
                cond = cond.repeat_interleave(batch, dim=0).to(device=device, dtype=dtype)
                nets.append((c, model, torch.cat([cond] * 2) if cfg and not guess_mode else cond, mask))
                continue
            features = model(cond.to(device=device, dtype=dtype))
            ctl.check_adapter_features(features, self.unet, latent_hw, label)
            features = [ctl.masked(f * c.weight, mask).repeat_interleave(batch, dim=0) for f in features]
            adapters.append((c, [torch.cat([f] * 2) for f in features] if cfg else features))
        return nets, adapters

    @staticmethod
    def adapter_residuals(adapters, i: int, n: int):
        """The summed T2I-Adapter features of step ``i`` (diffusers' MultiAdapter sum; fresh tensors: the U-Net
        adds them in place), or None."""
        on = [features for c, features in adapters if ctl.keep(c, i, n)]
        if not on:
            return None
        out = [f.clone() for f in on[0]]
        for features in on[1:]:
            out = [a + b for a, b in zip(out, features)]
        return out

    def control_residuals(self, nets, i: int, n: int, t, latents, latent_input, prompt_embeds, guess_mode: bool):
        """The summed ControlNet residuals of step ``i`` (diffusers' MultiControlNetModel sum), or (None, None)."""
        if not nets:
            return None, None
        if guess_mode and self.do_classifier_free_guidance:
            model_input = self.scheduler.scale_model_input(latents, t)
            embeds = prompt_embeds.chunk(2)[1]
        else:
            model_input, embeds = latent_input, prompt_embeds
        down, mid = None, None
        for c, net, cond, mask in nets:
            d, m = net(model_input, t, encoder_hidden_states=embeds, controlnet_cond=cond,
                       conditioning_scale=c.weight * ctl.keep(c, i, n), guess_mode=guess_mode, return_dict=False)
            d, m = [ctl.masked(x, mask) for x in d], ctl.masked(m, mask)
            down, mid = (d, m) if down is None else ([a + b for a, b in zip(down, d)], mid + m)
        if guess_mode and self.do_classifier_free_guidance:
            down = [torch.cat([torch.zeros_like(x), x]) for x in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        return down, mid

    # ---------------------------------------------------------------- the call

    def image_prompt_context(self, image_prompt, scale):
        if image_prompt is None:
            return contextlib.nullcontext()
        from .methods.image_prompt import _ip_configs, image_prompt as prompt_context, set_ip_adapter_scale
        from .api import active_adapters

        if not _ip_configs(self):
            raise ValueError(f"image_prompt needs an IP-Adapter among the loaded adapters (load an ip-adapter file "
                             f"with adapters=...); loaded: {sorted(active_adapters(self)) or 'none'}")
        if scale is not None:
            set_ip_adapter_scale(self, scale)
        return prompt_context(self, image_prompt, negative=self.do_classifier_free_guidance)

    @torch.no_grad()
    def __call__(self, prompt=None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 50, timesteps=None, sigmas=None, guidance_scale: float = 7.5,
                 negative_prompt=None, num_images_per_prompt: int = 1, eta: float = 0.0, generator=None,
                 latents=None, prompt_embeds=None, negative_prompt_embeds=None, output_type: str = "pil",
                 return_dict: bool = True, cross_attention_kwargs=None, clip_skip: int | None = None, *,
                 adapters=None, image_prompt=None, image_prompt_scale=None, controls=None, guess_mode: bool = False):
        """Generate. ``adapters``: {file or name: weight} activated for this call and after (None: as they are);
        ``image_prompt``: PIL image(s) for the loaded IP-Adapter(s) (``image_prompt_scale``: a float or an
        InstantStyle block dict); ``controls``: ``Control``s or (model, image[, weight[, kind]]) tuples."""
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        self.check_inputs(prompt, height, width, None, negative_prompt, prompt_embeds, negative_prompt_embeds)
        self._guidance_scale, self._clip_skip, self._cross_attention_kwargs = guidance_scale, clip_skip, cross_attention_kwargs
        self._interrupt = False
        if adapters is not None:
            self.use_adapters(adapters)
        batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        device = self._execution_device
        cfg = self.do_classifier_free_guidance
        nets, adapters_in = self.prepare_controls(controls, width, height, batch_size * num_images_per_prompt, cfg,
                                             guess_mode)
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, num_images_per_prompt, cfg, negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, clip_skip=clip_skip)
        if cfg:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps, sigmas)
        self._num_timesteps = len(timesteps)
        latents = self.prepare_latents(batch_size * num_images_per_prompt, self.unet.config.in_channels, height, width,
                                       prompt_embeds.dtype, device, generator, latents)
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            scale = torch.tensor(guidance_scale - 1).repeat(batch_size * num_images_per_prompt)
            timestep_cond = self.get_guidance_scale_embedding(scale, embedding_dim=self.unet.config.time_cond_proj_dim
                                                              ).to(device=device, dtype=latents.dtype)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        with self.image_prompt_context(image_prompt, image_prompt_scale), self.progress_bar(total=len(timesteps)) as bar:
            for i, t in enumerate(timesteps):
                latent_input = torch.cat([latents] * 2) if cfg else latents
                latent_input = self.scheduler.scale_model_input(latent_input, t)
                down, mid = self.control_residuals(nets, i, len(timesteps), t, latents, latent_input, prompt_embeds,
                                                   guess_mode)
                intrablock = self.adapter_residuals(adapters_in, i, len(timesteps))
                noise_pred = self.unet(latent_input, t, encoder_hidden_states=prompt_embeds, timestep_cond=timestep_cond,
                                       cross_attention_kwargs=cross_attention_kwargs,
                                       down_block_additional_residuals=down, mid_block_additional_residual=mid,
                                       down_intrablock_additional_residuals=intrablock, return_dict=False)[0]
                if cfg:
                    uncond, text = noise_pred.chunk(2)
                    noise_pred = uncond + guidance_scale * (text - uncond)
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                bar.update()
        if output_type == "latent":
            image, nsfw = latents, None
        else:
            image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
            image, nsfw = self.run_safety_checker(image, device, prompt_embeds.dtype)
            denormalize = [True] * image.shape[0] if nsfw is None else [not x for x in nsfw]
            image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize)
        self.maybe_free_model_hooks()
        if not return_dict:
            return image, nsfw
        return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=nsfw)


def attach_image_encoder_for(pipe, path) -> bool:
    """Attach the embedded shapes-clip image encoder (``training.call_inputs.attach_image_encoder``) to ``pipe``
    when the adapter file ``path`` holds an adapter that takes an image prompt (an IP-Adapter) and ``pipe`` has
    no image encoder; True when it did. A file for another encoder then fails to load naming both widths."""
    from .adapter_files import _layer_names
    from .io import read_adapter

    if getattr(pipe, "image_encoder", None) is not None:
        return False
    _, data = read_adapter(path, None, lambda comp: _layer_names(getattr(pipe, comp)) if isinstance(
        getattr(pipe, comp, None), torch.nn.Module) else None)
    if not any(getattr(c, "needs_image_encoder", False) for c in data.configs.values()):
        return False
    from .training.call_inputs import attach_image_encoder

    attach_image_encoder(pipe, "", pipe.unet.device)
    pipe.image_encoder.to(dtype=pipe.unet.dtype)
    return True
