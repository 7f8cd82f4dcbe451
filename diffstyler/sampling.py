"""Samplers as stateless steps, and the schedules they walk: DDIM and flow matching.

Two kinds of schedule, one protocol (`Schedule`):
- `DDIMSchedule` (SD 1.x / 2.x / SDXL): timesteps and cumulative alphas from the model's DDIM
  scheduler (SD 2.1-base: 1000 training steps, `steps_offset` 1, final alpha = alpha_0).
  `ddim_step` moves a latent down the schedule (sampling) or up it (inversion), so inversion is
  the exact mirror of the sampler it feeds.
- `FlowSchedule` (SD 3.5, FLUX.1): the noise levels sigma (1 = noise, 0 = clean) of the model's
  flow-matching scheduler, with its shift. A step is Euler on the predicted velocity
  (`flow_euler_step`); inversion integrates the same ODE backwards, by Euler or by a second-order
  step (`INVERSION_SOLVERS`).

A schedule knows its timesteps (what the denoiser reads, on the 0-1000 scale for both kinds), how
to step from level i to i + 1 (`step`) and the moves of an inversion (`inversion_moves`), with
`substeps` finer moves between the sampler's levels. `invert` is the one inversion loop; it
keeps the latent at every sampler level (the trajectory the method reads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

# model(x, timestep) -> prediction, for one batch of latents at one timestep
Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# callback(move index, timestep, latent) after each inversion move
InversionCallback = Callable[[int, int, torch.Tensor], None]

# How flow-matching inversion integrates the ODE backwards: Euler (one evaluation per move), the
# explicit midpoint (RF-Solver's second-order step: two), FireFlow (the midpoint, whose velocity
# is reused as the next move's first estimate: one per move, plus one).
INVERSION_SOLVERS = ("euler", "midpoint", "fireflow")


@dataclass(frozen=True)
class Move:
    """One inversion move from level `start` to the noisier level `end`; `keep`: `end` is one of
    the sampler's levels (its latent goes into the trajectory)."""

    start: float
    end: float
    keep: bool


class Schedule(Protocol):
    timesteps: torch.Tensor

    @property
    def num_steps(self) -> int: ...

    def step(self, sample: torch.Tensor, model_output: torch.Tensor, i: int) -> torch.Tensor: ...

    def inversion_moves(self, substeps: int = 1) -> list[Move]: ...

    def invert_move(self, model: Model, sample: torch.Tensor, move: Move, state: dict) -> torch.Tensor: ...


def classifier_free_guidance(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    return uncond + scale * (cond - uncond)


def check_substeps(substeps: int) -> None:
    if substeps < 1:
        raise ValueError(f"inversion substeps must be >= 1, got {substeps}")


# --- DDIM ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DDIMSchedule:
    """The timesteps a DDIM sampler visits, and the cumulative alphas around them.

    timesteps[i] is the UNet timestep of step i (descending). alphas[i] is alpha_cumprod at
    timesteps[i]; alphas[-1] is the alpha the last step lands on (the scheduler's final alpha).
    """

    timesteps: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor
    final_alpha: float
    prediction_type: str
    solver: str = "euler"  # DDIM's inversion is first order: the only solver it has

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def alpha_at(self, timestep: int) -> torch.Tensor:
        """alpha_cumprod at a training timestep; -1 means the clean end of the schedule."""
        if timestep < 0:
            return torch.tensor(self.final_alpha, dtype=torch.float64)
        return self.alphas_cumprod[timestep]

    def noise_level(self, i: int) -> float:
        """Step i's timestep over the training length: what the paper code's Q/K blend reads."""
        return float(self.timesteps[i]) / 1000.0

    def step(self, sample: torch.Tensor, model_output: torch.Tensor, i: int) -> torch.Tensor:
        return ddim_step(sample, model_output, self.alphas[i], self.alphas[i + 1], self.prediction_type)

    def inversion_moves(self, substeps: int = 1) -> list[Move]:
        """The climb from the clean end (-1) through every sampler timestep, `substeps` integer
        timesteps per sampler step (fewer where two would round to one)."""
        check_substeps(substeps)
        levels = [-1] + self.timesteps.flip(0).tolist()
        moves = []
        for low, high in zip(levels[:-1], levels[1:]):
            inner = torch.linspace(low, high, substeps + 1)[1:].round().long().tolist()
            current = low
            for stop in [t for t in dict.fromkeys(inner) if t > low]:
                moves.append(Move(current, stop, stop == high))
                current = stop
        return moves

    def invert_move(self, model: Model, sample: torch.Tensor, move: Move, state: dict) -> torch.Tensor:
        # The noise is predicted at the current latent and the *target* timestep (the convention
        # of null-text inversion): the clean end has no timestep to evaluate at.
        output = model(sample, torch.tensor(int(move.end)))
        return ddim_step(sample, output, self.alpha_at(int(move.start)), self.alpha_at(int(move.end)), self.prediction_type)


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


# --- flow matching ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class FlowSchedule:
    """The noise levels of a flow-matching sampler: sigmas[i] at step i (descending, sigmas[0] the
    noisiest), sigmas[N] = 0 the clean end. timesteps[i] = 1000 sigmas[i] as the model reads it.
    x_sigma = (1 - sigma) x_0 + sigma noise; the model predicts the velocity noise - x_0."""

    timesteps: torch.Tensor
    sigmas: torch.Tensor  # [N + 1], float64
    solver: str = "euler"

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def noise_level(self, i: int) -> float:
        return float(self.sigmas[i])

    def step(self, sample: torch.Tensor, model_output: torch.Tensor, i: int) -> torch.Tensor:
        return flow_euler_step(sample, model_output, self.sigmas[i], self.sigmas[i + 1])

    def inversion_moves(self, substeps: int = 1) -> list[Move]:
        """The climb from sigma 0 through every sampler level, `substeps` equal moves in sigma per step."""
        check_substeps(substeps)
        levels = self.sigmas.flip(0).tolist()
        moves = []
        for low, high in zip(levels[:-1], levels[1:]):
            stops = torch.linspace(low, high, substeps + 1, dtype=torch.float64)[1:].tolist()
            current = low
            for index, stop in enumerate(stops):
                moves.append(Move(current, high if index == substeps - 1 else stop, index == substeps - 1))
                current = stop
        return moves

    def invert_move(self, model: Model, sample: torch.Tensor, move: Move, state: dict) -> torch.Tensor:
        return flow_inversion_step(model, sample, move.start, move.end, self.solver, state)


def flow_euler_step(sample: torch.Tensor, velocity: torch.Tensor, sigma_from, sigma_to) -> torch.Tensor:
    """x at `sigma_to` from x at `sigma_from` along the velocity (both directions), in float32."""
    delta = float(sigma_to) - float(sigma_from)
    return (sample.float() + delta * velocity.float()).to(sample.dtype)


def timestep_of(sigma: float) -> torch.Tensor:
    return torch.tensor(1000.0 * float(sigma), dtype=torch.float32)


def flow_inversion_step(model: Model, sample: torch.Tensor, sigma_from: float, sigma_to: float, solver: str,
                        state: dict) -> torch.Tensor:
    """One move of the ODE backwards (towards noise) from `sigma_from` to `sigma_to`.

    euler: the velocity at the start. midpoint: the velocity at the half-way point reached with
    the start's velocity (RF-Solver's second-order step). fireflow: the midpoint, whose first
    half-step uses the previous move's midpoint velocity (kept in `state`) instead of a new
    evaluation (FireFlow).
    """
    if solver == "euler":
        return flow_euler_step(sample, model(sample, timestep_of(sigma_from)), sigma_from, sigma_to)
    if solver not in ("midpoint", "fireflow"):
        raise ValueError(f"unknown inversion solver {solver!r}; one of {', '.join(INVERSION_SOLVERS)}")
    reused = state.get("velocity") if solver == "fireflow" else None
    start_velocity = reused if reused is not None else model(sample, timestep_of(sigma_from))
    sigma_mid = (sigma_from + sigma_to) / 2
    midpoint = flow_euler_step(sample, start_velocity, sigma_from, sigma_mid)
    velocity = model(midpoint, timestep_of(sigma_mid))
    state["velocity"] = velocity
    return flow_euler_step(sample, velocity, sigma_from, sigma_to)


# --- the inversion loop ------------------------------------------------------------------------------

def invert(model: Model, latents: torch.Tensor, schedule: Schedule, substeps: int = 1,
           callback: Optional[InversionCallback] = None, progress: bool = True) -> list[torch.Tensor]:
    """The trajectory of each latent [B, C, h, w] climbed to the schedule's noisiest level: one
    tensor [N + 1, C, h, w] per latent, indexed like the sampler (trajectory[i]: the latent at step
    i, trajectory[N]: the clean latent)."""
    kept, x, state = [latents], latents, {}
    for index, move in enumerate(tqdm(schedule.inversion_moves(substeps), desc="Inversion", disable=not progress, leave=False)):
        x = schedule.invert_move(model, x, move, state)
        if move.keep:
            kept.append(x)
        if callback is not None:
            callback(index, int(round(move.end if isinstance(schedule, DDIMSchedule) else 1000 * move.end)), x)
    return list(torch.stack(kept[::-1], dim=1).unbind(0))


def sample(model: Model, latents: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """Plain sampling from the schedule's noisiest level to the clean end (no method): what a
    reconstruction test runs after `invert`."""
    x = latents
    for i in range(schedule.num_steps):
        x = schedule.step(x, model(x, schedule.timesteps[i]), i)
    return x
