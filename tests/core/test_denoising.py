"""Each architecture's training maths (``core/denoising.py``) against diffusers' own functions."""

import pytest
import torch

from ice_lightning.core import denoising as dn


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "cosmap", "sigma_sqrt"])
def test_flow_weighting_schemes_draw_and_weight_as_diffusers(scheme):
    """The noise levels and loss weights of each ``weighting_scheme``, against diffusers' own functions."""
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    u = dn.sample_flow_sigmas(scheme, 64, torch.Generator().manual_seed(0), logit_mean=0.2, logit_std=0.8)
    ref = compute_density_for_timestep_sampling(scheme, 64, logit_mean=0.2, logit_std=0.8, mode_scale=1.29,
                                                generator=torch.Generator().manual_seed(0))  # fmt: skip
    if scheme == "logit_normal":  # diffusers draws torch.normal(mean, std); we draw mean + std * randn
        torch.testing.assert_close(u, ref, rtol=1e-5, atol=1e-6)
    elif scheme == "mode":
        torch.testing.assert_close(u, ref)
    torch.testing.assert_close(dn.flow_loss_weights(scheme, u), compute_loss_weighting_for_sd3(scheme, u).float())
    # the scheduler's static shift, and Flux's dynamic one at 256 tokens (mu = base_shift = 0.5)
    s = torch.tensor([0.25, 0.5, 0.75])
    torch.testing.assert_close(dn.shift_sigmas({"shift": 3.0}, s, 0), 3 * s / (1 + 2 * s))
    dyn = {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}
    e = torch.exp(torch.tensor(0.5))
    torch.testing.assert_close(dn.shift_sigmas(dyn, s, 256), e / (e + 1 / s - 1))


def _script_inputs(scheduler, latents, gen, offset, perturbation, gamma, prediction_type):
    """diffusers' train_text_to_image.py, its training step's noise, timesteps, target and Min-SNR loss weights."""
    from diffusers.training_utils import compute_snr

    noise = torch.randn(latents.shape, generator=gen)
    if offset:
        noise += offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=gen)
    if perturbation:
        new_noise = noise + perturbation * torch.randn(noise.shape, generator=gen)
    bsz = latents.shape[0]
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (bsz,), generator=gen).long()
    noisy = scheduler.add_noise(latents, new_noise if perturbation else noise, timesteps)
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    snr = compute_snr(scheduler, timesteps)
    weights = torch.stack([snr, gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    weights = weights / snr if prediction_type == "epsilon" else weights / (snr + 1)
    return noisy, timesteps, target, weights


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_options_draw_and_weigh_exactly_as_train_text_to_image(prediction_type):
    """--noise_offset, --input_perturbation and --snr_gamma: the same random draws in the same order give the
    script's noisy input, target and Min-SNR weights (diffusers' compute_snr)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(prediction_type=prediction_type)
    latents = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    want = _script_inputs(scheduler, latents, torch.Generator().manual_seed(1), 0.1, 0.05, 5.0, prediction_type)
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(latents.shape, generator=gen)
    got = dn.ddpm_training_input(scheduler, prediction_type, latents, noise,
                                 lambda b: torch.randint(0, 1000, (b,), generator=gen), gen, noise_offset=0.1,
                                 input_perturbation=0.05, snr_gamma=5.0)  # fmt: skip
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    ends = dn.ddpm_training_input(scheduler, prediction_type, latents, noise,
                                  lambda b: torch.tensor([0, 999] * (b // 2)), snr_gamma=5.0)[3]  # fmt: skip
    assert float(ends[0]) < 1e-3  # Min-SNR: the least noisy step (SNR ~ 1e4) weighs ~ gamma / SNR
    plain = dn.ddpm_training_input(scheduler, prediction_type, latents, noise, lambda b: got[1])
    assert plain[3] is None and not torch.equal(plain[0], got[0])  # the options changed the input


def test_prediction_type_override_and_flow_matching_refusal():
    from ice_lightning import ICEModule

    assert ICEModule("tiny:sd", prediction_type="v_prediction").objective == "v_prediction"
    with pytest.raises(ValueError, match="follow train_text_to_image.py's DDPM objectives.*flow matching"):
        ICEModule("tiny:flux", snr_gamma=5.0)
    with pytest.raises(ValueError, match="noise_offset and input_perturbation must be >= 0"):
        ICEModule("tiny:sd", noise_offset=-1.0)
