"""DDIM arithmetic shared by inversion and denoising.

The same `ddim_step` moves a latent down the noise schedule (sampling) or up it (inversion), so
that inversion is the exact mirror of the sampler it feeds. The schedule is taken from the model's
own DDIM scheduler (SD 2.1-base: 1000 training steps, `steps_offset` 1, final alpha = alpha_0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler


@dataclass(frozen=True)
class DDIMSchedule:
    """The timesteps a sampler visits, and the cumulative alphas around them.

    timesteps[i] is the UNet timestep of step i (descending). alphas[i] is alpha_cumprod at
    timesteps[i]; alphas[-1] is the alpha the last step lands on (the scheduler's final alpha).
    """

    timesteps: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor
    final_alpha: float
    prediction_type: str

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def alpha_at(self, timestep: int) -> torch.Tensor:
        """alpha_cumprod at a training timestep; -1 means the clean end of the schedule."""
        if timestep < 0:
            return torch.tensor(self.final_alpha, dtype=torch.float64)
        return self.alphas_cumprod[timestep]


def ddim_schedule(scheduler: DDIMScheduler, steps: int) -> DDIMSchedule:
    if steps < 1:
        raise ValueError(f"the number of sampling steps must be >= 1, got {steps}")
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.clone().long()
    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)
    final_alpha = float(scheduler.final_alpha_cumprod)
    alphas = torch.cat([alphas_cumprod[timesteps], torch.tensor([final_alpha], dtype=torch.float64)])
    return DDIMSchedule(timesteps, alphas, alphas_cumprod, final_alpha, scheduler.config.prediction_type)


def split_prediction(model_output: torch.Tensor, sample: torch.Tensor, alpha: torch.Tensor, prediction_type: str):
    """(noise, clean latent) from a UNet output at a sample whose cumulative alpha is `alpha`."""
    a = alpha.to(torch.float64)
    sqrt_a, sqrt_1ma = a.sqrt().item(), (1 - a).sqrt().item()
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (sample - sqrt_1ma * eps) / sqrt_a
    elif prediction_type == "v_prediction":
        x0 = sqrt_a * sample - sqrt_1ma * model_output
        eps = sqrt_a * model_output + sqrt_1ma * sample
    elif prediction_type == "sample":
        x0 = model_output
        eps = (sample - sqrt_a * x0) / sqrt_1ma
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    return eps, x0


def ddim_step(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    alpha_from: torch.Tensor,
    alpha_to: torch.Tensor,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """Deterministic DDIM move (eta = 0) from cumulative alpha `alpha_from` to `alpha_to`.

    A larger alpha means less noise: alpha_to > alpha_from denoises, alpha_to < alpha_from
    inverts. The arithmetic runs in float32 even for half-precision latents.
    """
    eps, x0 = split_prediction(model_output.float(), sample.float(), alpha_from, prediction_type)
    a_to = alpha_to.to(torch.float64)
    return (a_to.sqrt().item() * x0 + (1 - a_to).sqrt().item() * eps).to(sample.dtype)


def classifier_free_guidance(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    return uncond + scale * (cond - uncond)
