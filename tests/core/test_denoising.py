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
