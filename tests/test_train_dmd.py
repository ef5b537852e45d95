"""model/dmd.py: the DMD generator loss and the critic loss, against their definitions (Self-Forcing's)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from model.dmd import DMD
from model.scheduler import FlowMatchScheduler
from model.wan import WanDiT
from tests.conftest import TINY_DIT, randomize

SHAPE = (2, 3, 4, 4, 6)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def dmd():
    real = randomize(WanDiT(**TINY_DIT), seed=1).requires_grad_(False)
    fake = randomize(WanDiT(**TINY_DIT), seed=2)
    return DMD(real, fake, FlowMatchScheduler(5.0), guidance_scale=3.0, min_score_timestep=0)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g)
    cond = torch.randn(2, TINY_DIT["text_len"], TINY_DIT["text_dim"], generator=g)
    uncond = torch.randn(1, TINY_DIT["text_len"], TINY_DIT["text_dim"], generator=g).expand(2, -1, -1)
    return x, cond, uncond


def test_timesteps_are_uniform_shifted_and_clamped(dmd):
    g = torch.Generator().manual_seed(0)
    t = dmd.sample_timestep(4000, 3, g, "cpu")
    assert t.shape == (4000, 3) and (t == t[:, :1]).all()  # one timestep per clip
    assert t.min() >= 20 and t.max() <= 980
    raw = torch.randint(0, 1000, (4000,), generator=torch.Generator().manual_seed(0)).double()
    u = raw / 1000
    want = (1000 * 5 * u / (1 + 4 * u)).clamp(20, 980).float()
    assert torch.allclose(t[:, 0], want)
    # the shift pushes timesteps up: median of shift(U[0,1000)) is 1000*5*0.5/3 = 833
    assert 780 < t[:, 0].median() < 880


def test_generator_loss_matches_its_definition(dmd):
    x, cond, uncond = inputs()
    x = x.requires_grad_(True)
    loss, info = dmd.generator_loss(x, cond, uncond, torch.Generator().manual_seed(9))
    assert loss.dtype == torch.float64 and torch.isfinite(loss)
    # metrics stay tensors on the device: reading them (a host sync) waits until after the backward
    assert all(isinstance(v, torch.Tensor) and v.device == x.device and not v.requires_grad for v in info.values())

    # the same draws, by hand
    g = torch.Generator().manual_seed(9)
    t = dmd.sample_timestep(2, 3, g, "cpu")
    eps = torch.randn(SHAPE, generator=g)
    sched = dmd.scheduler
    x_t = sched.add_noise(x.detach(), eps, t)
    with torch.no_grad():
        fake = sched.x0_from_flow(dmd.fake_score(x_t, t, cond), x_t, t)
        rc = sched.x0_from_flow(dmd.real_score(x_t, t, cond), x_t, t)
        ru = sched.x0_from_flow(dmd.real_score(x_t, t, uncond), x_t, t)
    real = rc + 3.0 * (rc - ru)
    norm = (x.detach() - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    grad = (fake - real) / norm
    want = 0.5 * F.mse_loss(x.detach().double(), (x.detach() - grad).double())
    assert torch.allclose(loss, want, rtol=1e-6)
    assert info["dmd_grad_mean_abs"] == pytest.approx(grad.abs().mean().item(), rel=1e-5)

    # its gradient pushes x along grad (scaled by 1/numel); the scores get none
    loss.backward()
    assert torch.allclose(x.grad, grad / x.numel(), rtol=1e-5, atol=1e-12)
    assert all(p.grad is None for p in dmd.fake_score.parameters())
    assert all(p.grad is None for p in dmd.real_score.parameters())


def test_generator_loss_is_zero_when_fake_equals_real_without_guidance():
    real = randomize(WanDiT(**TINY_DIT), seed=1).requires_grad_(False)
    d = DMD(real, copy.deepcopy(real), FlowMatchScheduler(5.0), guidance_scale=0.0)
    x, cond, uncond = inputs()
    loss, _ = d.generator_loss(x.requires_grad_(True), cond, uncond, torch.Generator().manual_seed(1))
    assert loss.item() == 0.0


def test_critic_loss_is_flow_matching_on_a_detached_clip(dmd):
    x, cond, _ = inputs()
    x = x.requires_grad_(True)
    loss, _ = dmd.critic_loss(x, cond, torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    t = dmd.sample_timestep(2, 3, g, "cpu")
    eps = torch.randn(SHAPE, generator=g)
    with torch.no_grad():
        flow = dmd.fake_score(dmd.scheduler.add_noise(x.detach(), eps, t), t, cond)
    assert torch.allclose(loss, F.mse_loss(flow, eps - x.detach()))
    loss.backward()
    assert x.grad is None  # no gradient to the generator's clip
    assert all(p.grad is not None for p in dmd.fake_score.parameters())
    assert all(p.grad is None for p in dmd.real_score.parameters())
