"""The denoising loss shared by pretraining and fine-tuning scripts.

Targets: epsilon (the noise) or v = alpha_t * eps - sigma_t * x0 (Salimans & Ho, arXiv 2202.00512), as the
scheduler's ``prediction_type`` says. Min-SNR weighting (Hang et al., arXiv 2303.09556, eq. 8):
w_t = min(SNR_t, gamma) / SNR_t for epsilon, / (SNR_t + 1) for v-prediction. With ``snr_offset`` = 1 (v only):
w_t = min(SNR_t + 1, gamma) / (SNR_t + 1), i.e. the clean-image error weighs min(SNR_t + 1, gamma): capped at
gamma where the image is nearly clean (min-SNR's point) but never below 1 where it is nearly pure noise, where
plain min-SNR weighs it SNR_t (-> 0 at a zero-terminal-SNR schedule's last step, which would then go untrained).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction_type {kind!r} is not supported (epsilon, v_prediction)")


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, scheduler=None, timesteps=None,
                   min_snr_gamma: float | None = None, snr_offset: float = 0.0) -> torch.Tensor:
    """Per-sample mean squared error (shape [batch]), min-SNR weighted when ``min_snr_gamma`` is set."""
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
    if min_snr_gamma:
        snr = compute_snr(scheduler, timesteps).float()
        if snr_offset and scheduler.config.prediction_type != "v_prediction":
            raise ValueError("snr_offset needs v-prediction (with epsilon the weight would be infinite at SNR 0)")
        weight = (snr + snr_offset).clamp(max=min_snr_gamma)
        if scheduler.config.prediction_type == "v_prediction":
            weight = weight / (snr + 1)
        else:  # epsilon: min(SNR, gamma) / SNR -> 1 as SNR -> 0 (a zero-terminal-SNR schedule's last step)
            weight = torch.where(snr > 0, weight / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))
        loss = loss * weight
    return loss
