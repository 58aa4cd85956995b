"""Flow-matching Euler sampler of the distilled student (4 steps, shift 3, no guidance).

Reproduces diffusers' `FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3)
.set_timesteps(n)`: a linear grid of n sigmas from 1 to the shifted training minimum, shifted again
(σ' = s·σ / (1 + (s − 1)·σ)), with σ = 0 appended. For n = 4 the timesteps are
[1000, 857.6923, 602.1505, 8.928571]. One step is x ← x + (σ_{i+1} − σ_i)·v, in float32, with the
result cast back to the latent dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from liveavatar.config import SamplerConfig


@dataclass(frozen=True)
class Schedule:
    timesteps: tuple[float, ...]  # float32 values passed to the DiT
    sigmas: tuple[float, ...]  # len(timesteps) + 1, ending at 0

    def __len__(self) -> int:
        return len(self.timesteps)


def _shift(sigma, shift: float):
    return shift * sigma / (1 + (shift - 1) * sigma)


def make_schedule(cfg: SamplerConfig, steps: int | None = None) -> Schedule:
    n = steps or cfg.steps
    train_min = _shift(1.0 / cfg.num_train_timesteps, cfg.shift)
    s = np.linspace(1.0, train_min, n)
    sig = torch.from_numpy(_shift(s, cfg.shift)).to(torch.float32)
    t = sig * cfg.num_train_timesteps
    sig = torch.cat([sig, torch.zeros(1)])
    return Schedule(tuple(t.tolist()), tuple(sig.tolist()))


def euler_step(x: torch.Tensor, v: torch.Tensor, schedule: Schedule, i: int) -> torch.Tensor:
    """x_{i+1} = x_i + (σ_{i+1} − σ_i)·v in float32, returned in x.dtype."""
    # The float32 difference as a Python scalar: no host-to-device copy (or sync) per step.
    dt = (torch.tensor(schedule.sigmas[i + 1], dtype=torch.float32)
          - torch.tensor(schedule.sigmas[i], dtype=torch.float32)).item()
    return (x.float() + dt * v.float()).to(x.dtype)
