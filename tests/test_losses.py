"""The shared denoising loss: targets per prediction type and min-SNR weights, also on a zero-terminal-SNR
schedule (the embedded bases' since 2026-12-03), where SNR at the last step is exactly 0."""
import pytest
import torch
from diffusers import DDPMScheduler

from peft_diffusion.training.losses import diffusion_loss, diffusion_target


def schedule(kind: str, zero: bool) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012, prediction_type=kind, rescale_betas_zero_snr=zero)


def test_v_target_is_alpha_eps_minus_sigma_x0():
    s = schedule("v_prediction", True)
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    a = s.alphas_cumprod[t].sqrt()[:, None, None, None]
    sig = (1 - s.alphas_cumprod[t]).sqrt()[:, None, None, None]
    torch.testing.assert_close(diffusion_target(s, x0, eps, t), a * eps - sig * x0)
    # zero terminal SNR: at t = 999 the noisy input is pure noise and v = -x0
    torch.testing.assert_close(diffusion_target(s, x0, eps, t)[2], -x0[2], atol=1e-6, rtol=0)
    assert torch.equal(diffusion_target(schedule("epsilon", False), x0, eps, t), eps)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_min_snr_weights_finite_at_zero_terminal_snr(kind):
    s = schedule(kind, True)
    t = torch.tensor([0, 10, 500, 998, 999])
    pred, target = torch.ones(5, 4, 2, 2), torch.zeros(5, 4, 2, 2)
    plain = diffusion_loss(pred, target)
    weighted = diffusion_loss(pred, target, s, t, min_snr_gamma=5.0)
    assert torch.isfinite(weighted).all(), weighted
    snr = s.alphas_cumprod[t] / (1 - s.alphas_cumprod[t])
    expected = snr.clamp(max=5.0) / ((snr + 1) if kind == "v_prediction" else snr)
    if kind == "epsilon":
        expected[-1] = 1.0  # the limit of min(SNR, 5) / SNR as SNR -> 0
    torch.testing.assert_close(weighted, plain * expected.float(), rtol=1e-5, atol=1e-6)
    assert weighted[0] < plain[0]  # t = 0 has SNR >> 5: down-weighted


def test_snr_offset_floors_the_high_noise_weight_for_v():
    s = schedule("v_prediction", True)
    t = torch.tensor([0, 500, 999])
    pred, target = torch.ones(3, 4, 2, 2), torch.zeros(3, 4, 2, 2)
    snr = s.alphas_cumprod[t] / (1 - s.alphas_cumprod[t])
    got = diffusion_loss(pred, target, s, t, min_snr_gamma=5.0, snr_offset=1.0)
    torch.testing.assert_close(got, (snr + 1).clamp(max=5.0).float() / (snr + 1).float(), rtol=1e-5, atol=1e-6)
    assert got[-1] == 1.0  # pure noise: the plain v-loss, where min-SNR alone gives 0
    assert diffusion_loss(pred, target, s, t, min_snr_gamma=5.0)[-1] == 0.0
    with pytest.raises(ValueError, match="snr_offset needs v-prediction"):
        diffusion_loss(pred, target, schedule("epsilon", True), t, min_snr_gamma=5.0, snr_offset=1.0)
