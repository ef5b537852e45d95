"""Distribution Matching Distillation (DMD2 as Self-Forcing trains it): the generator loss and the
critic (fake score) loss.

Both scores are bidirectional Wan2.1 DiTs predicting the flow ``ε − x0`` for a whole clip:

* the *real score* is the frozen base model, with classifier-free guidance against the
  negative prompt: ``real = c + g·(c − u)``;
* the *fake score* (critic) starts from the same weights and is trained with the flow-matching
  loss on the generator's clips, so it tracks the generator's distribution.

Generator loss (Self-Forcing's DMD, docs/TRAINING.md): draw one timestep per clip uniformly in
``[min_score_timestep, N)``, shift it, clamp to ``[0.02·N, 0.98·N]``; re-noise the clip ``x``;
without grad take both scores' x0 predictions; ``grad = (fake − real) / mean|x − real|``
(per sample); loss ``0.5·MSE(x, stopgrad(x − grad))`` in float64, whose gradient with respect
to ``x`` is ``grad / numel``: the clip is pushed from the fake towards the real distribution.

Critic loss: the same timestep draw on a clip generated without grad; MSE between the fake
score's flow prediction and ``ε − x``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from model.scheduler import FlowMatchScheduler
from model.wan import WanDiT

# Score timesteps are clamped to [0.02 N, 0.98 N] after the shift (Self-Forcing's min/max step).
MIN_STEP_FRACTION, MAX_STEP_FRACTION = 0.02, 0.98


class DMD:
    def __init__(self, real_score: WanDiT, fake_score: WanDiT, scheduler: FlowMatchScheduler, *,
                 guidance_scale: float = 3.0, min_score_timestep: int = 0):
        n = scheduler.num_train_timesteps
        if not 0 <= min_score_timestep < n:
            raise ValueError(f"min_score_timestep must lie in [0, {n}), got {min_score_timestep}")
        self.real_score, self.fake_score, self.scheduler = real_score, fake_score, scheduler
        self.guidance_scale = float(guidance_scale)
        self.min_score_timestep = int(min_score_timestep)
        self.min_step, self.max_step = int(MIN_STEP_FRACTION * n), int(MAX_STEP_FRACTION * n)

    def sample_timestep(self, batch: int, num_frames: int, generator: torch.Generator | None,
                        device) -> torch.Tensor:
        """``[B, F]`` timesteps, one per clip: uniform integer in [min_score_timestep, N), shifted,
        clamped."""
        gen_device = generator.device if generator is not None else device
        t = torch.randint(self.min_score_timestep, self.scheduler.num_train_timesteps, (batch,),
                          generator=generator, device=gen_device)
        t = self.scheduler.shift_timestep(t.double()).clamp(self.min_step, self.max_step).float()
        return t.to(device)[:, None].expand(batch, num_frames)

    def _x0(self, model: WanDiT, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        flow = model(x_t, t, context)
        return self.scheduler.x0_from_flow(flow.float(), x_t.float(), t)

    def generator_loss(self, x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """DMD loss of a generated clip ``x`` ``[B, F, C, h, w]`` (with grad); ``cond``/``uncond``:
        the prompt's and the negative prompt's text embeddings ``[B, L, d]``."""
        b, f = x.shape[:2]
        t = self.sample_timestep(b, f, generator, x.device)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32).to(x.dtype)
        with torch.no_grad():
            x_t = self.scheduler.add_noise(x.detach(), noise, t)
            fake = self._x0(self.fake_score, x_t, t, cond)
            real_cond = self._x0(self.real_score, x_t, t, cond)
            real_uncond = self._x0(self.real_score, x_t, t, uncond)
            real = real_cond + self.guidance_scale * (real_cond - real_uncond)
            normalizer = (x.detach().float() - real).abs().mean(dim=tuple(range(1, x.dim())), keepdim=True)
            grad = torch.nan_to_num((fake - real) / normalizer)
        x64 = x.double()
        loss = 0.5 * F.mse_loss(x64, (x64 - grad.double()).detach(), reduction="mean")
        # metrics stay on the device (no host sync before the backward); the trainer reads them after its step
        return loss, {"dmd_grad_mean_abs": grad.abs().mean(), "score_timestep": t[:, 0].mean()}

    def critic_loss(self, x: torch.Tensor, cond: torch.Tensor,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Flow-matching loss of the fake score on a generated clip ``x`` (no grad to ``x``)."""
        x = x.detach()
        b, f = x.shape[:2]
        t = self.sample_timestep(b, f, generator, x.device)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32).to(x.dtype)
        x_t = self.scheduler.add_noise(x, noise, t)
        flow = self.fake_score(x_t, t, cond)
        target = self.scheduler.flow_target(x.float(), noise.float())
        loss = F.mse_loss(flow.float(), target)
        return loss, {"critic_timestep": t[:, 0].mean()}
