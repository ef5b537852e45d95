"""Flow matching as Wan and Self-Forcing use it.

``x_t = (1 - σ) x0 + σ ε``; the network predicts the flow ``ε - x0``, so ``x0 = x_t - σ·flow``.
The schedule is ``σ(s) = shift·s / (1 + (shift - 1)·s)`` over ``s = linspace(1, 0, N + 1)[:-1]``
with ``N = num_train_timesteps``, and timestep = N·σ (a float; it goes into the sinusoidal
embedding as is). Few-step inference lists such as [1000, 750, 500, 250] are *warped* onto the
shifted schedule: step k becomes ``timesteps[N - k]``, i.e. [1000, 937.5, 833.33, 625.0] for
shift 5.
"""
from __future__ import annotations

from typing import Sequence

import torch


class FlowMatchScheduler:
    def __init__(self, shift: float = 5.0, num_train_timesteps: int = 1000):
        self.shift = float(shift)
        self.num_train_timesteps = int(num_train_timesteps)
        s = torch.linspace(1.0, 0.0, self.num_train_timesteps + 1, dtype=torch.float64)[:-1]
        self.sigmas = self.shift_sigma(s)
        self.timesteps = self.sigmas * self.num_train_timesteps

    def shift_sigma(self, s: torch.Tensor) -> torch.Tensor:
        return self.shift * s / (1 + (self.shift - 1) * s)

    def shift_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """Shift a timestep drawn uniformly in [0, N]: N·σ(t / N)."""
        n = self.num_train_timesteps
        return self.shift_sigma(t / n) * n

    def warp(self, steps: Sequence[int]) -> torch.Tensor:
        """Few-step list → timesteps on the shifted schedule (float32, ``[len(steps)]``)."""
        n = self.num_train_timesteps
        table = torch.cat([self.timesteps, torch.zeros(1, dtype=torch.float64)])
        return torch.stack([table[n - int(k)] for k in steps]).float()

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float32) / self.num_train_timesteps

    @staticmethod
    def _expand(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-sample or per-frame σ ([B] or [B, F]) broadcast over x ``[B, F, C, H, W]``."""
        return sigma.reshape(*sigma.shape, *([1] * (x.dim() - sigma.dim())))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = self._expand(self.sigma(t).to(x0.device), x0)
        return ((1 - s) * x0.float() + s * noise.float()).to(x0.dtype)

    def x0_from_flow(self, flow: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = self._expand(self.sigma(t).to(x_t.device), x_t)
        return (x_t.float() - s * flow.float()).to(x_t.dtype)

    def flow_from_x0(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`x0_from_flow` (σ > 0)."""
        s = self._expand(self.sigma(t).to(x_t.device), x_t)
        return ((x_t.float() - x0.float()) / s).to(x_t.dtype)

    def flow_target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The training target of the flow prediction: ε − x0."""
        return noise - x0
