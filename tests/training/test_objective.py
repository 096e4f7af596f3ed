"""The diffusion loss on a zero-terminal-SNR schedule (builtin:toy's): min-SNR weighting stays finite at t = T."""

import torch
from diffusers import DDPMScheduler

from dreambooth_dora.training.objective import Conditioning, diffusion_loss


class _Echo(torch.nn.Module):
    """A stand-in UNet whose output is its input times a learnable scalar, so the loss has a gradient."""

    def __init__(self):
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x, t, encoder_hidden_states):
        class Out:
            sample = x * self.k

        return Out()


def test_min_snr_weighting_is_finite_on_zero_terminal_snr_for_both_prediction_types():
    latents = torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = Conditioning(torch.zeros(64, 4, 16))
    for prediction_type in ("epsilon", "v_prediction"):
        sched = DDPMScheduler(rescale_betas_zero_snr=True, prediction_type=prediction_type)
        assert float(sched.alphas_cumprod[-1]) == 0.0  # the schedule really reaches SNR 0
        unet = _Echo()
        # Seed 15 draws t = 999 (SNR exactly 0) among the 64 timesteps; checked below with the same draws.
        g = torch.Generator().manual_seed(15)
        torch.randn(latents.shape, generator=g)
        assert (torch.randint(0, 1000, (64,), generator=g) == 999).any()
        loss = diffusion_loss(unet, sched, latents, cond, generator=torch.Generator().manual_seed(15), snr_gamma=5.0)
        assert torch.isfinite(loss), prediction_type
        loss.backward()
        assert torch.isfinite(unet.k.grad) and unet.k.grad != 0, prediction_type
