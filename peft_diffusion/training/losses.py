"""The denoising loss shared by pretraining and fine-tuning scripts.

Targets: epsilon (the noise) or v = alpha_t * eps - sigma_t * x0 (Salimans & Ho, arXiv 2202.00512), as the
scheduler's ``prediction_type`` says. Min-SNR weighting (Hang et al., arXiv 2303.09556, eq. 8):
w_t = min(SNR_t, gamma) / SNR_t for epsilon, / (SNR_t + 1) for v-prediction.
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
                   min_snr_gamma: float | None = None) -> torch.Tensor:
    """Per-sample mean squared error (shape [batch]), min-SNR weighted when ``min_snr_gamma`` is set."""
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
    if min_snr_gamma:
        snr = compute_snr(scheduler, timesteps).float()
        weight = snr.clamp(max=min_snr_gamma)
        weight = weight / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else weight / snr
        loss = loss * weight
    return loss
