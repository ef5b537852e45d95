import torch

from model.scheduler import FlowMatchScheduler


def test_shifted_schedule_and_warp():
    s = FlowMatchScheduler(shift=5.0, num_train_timesteps=1000)
    assert s.timesteps[0].item() == 1000.0           # σ(1) = 1 after the shift
    assert torch.all(s.timesteps[1:] < s.timesteps[:-1])
    warped = s.warp([1000, 750, 500, 250])
    assert torch.allclose(warped, torch.tensor([1000.0, 937.5, 833.3333, 625.0]), atol=1e-3)
    assert torch.allclose(s.sigma(warped), torch.tensor([1.0, 0.9375, 0.833333, 0.625]), atol=1e-6)
    assert s.warp([0]).item() == 0.0


def test_shift_timestep_matches_formula():
    s = FlowMatchScheduler(shift=5.0)
    t = torch.tensor([0.0, 250.0, 500.0, 1000.0])
    u = t / 1000
    assert torch.allclose(s.shift_timestep(t), 1000 * 5 * u / (1 + 4 * u))


def test_flow_x0_round_trip_and_noise():
    s = FlowMatchScheduler()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 4, 5, 6, generator=g), torch.randn(2, 3, 4, 5, 6, generator=g)
    t = torch.tensor([[937.5, 937.5, 937.5], [625.0, 400.0, 20.0]])   # per frame
    xt = s.add_noise(x0, eps, t)
    sigma = (t / 1000)[..., None, None, None]
    assert torch.allclose(xt, (1 - sigma) * x0 + sigma * eps, atol=1e-6)
    flow = s.flow_target(x0, eps)
    assert torch.allclose(s.x0_from_flow(flow, xt, t), x0, atol=1e-5)
    assert torch.allclose(s.flow_from_x0(x0, xt, t), flow, atol=1e-4)
    assert torch.equal(s.add_noise(x0, eps, torch.full((2,), 1000.0)), eps)
