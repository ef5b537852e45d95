"""pipeline/self_forcing.py: the training self-rollout is the inference rollout, with gradient only
through each block's exit step; activation checkpointing gives the same gradients."""
import dataclasses

import pytest
import torch

import pipeline.self_forcing as sf
from model.wan import WanDiT
from pipeline.rollout import RolloutSettings, plan_blocks, rollout
from pipeline.self_forcing import draw_exit_steps, self_forcing_rollout
from tests.conftest import TINY_DIT, randomize
from utils.config import load_config

LATENT = (4, 4, 6)  # C, h, w
FRAMES = 9          # 3 blocks of 3


pytestmark = pytest.mark.usefixtures("single_thread")


def settings(window=FRAMES, sink=0, policy="absolute"):
    base = RolloutSettings.from_config(load_config(None, []))
    return dataclasses.replace(base, local_attn_size=window, sink_size=sink, policy=policy)


def context(batch=1, seed=3):
    return torch.randn(batch, TINY_DIT["text_len"], TINY_DIT["text_dim"], generator=torch.Generator().manual_seed(seed))


def run(model, s, exits, grad=True, seed=5, batch=1):
    cache = s.new_cache(model, batch, LATENT[1:], dtype=torch.float32, device="cpu")
    return self_forcing_rollout(model, cache, s, context(batch), num_frames=FRAMES, latent_shape=LATENT,
                                exit_steps=exits, generator=torch.Generator().manual_seed(seed), grad=grad), cache


def test_full_denoise_equals_the_inference_rollout(tiny_dit):
    """Exit at the last step, no grad: exactly what pipeline.rollout yields (same cache, positions, noise)."""
    s = settings()
    with torch.no_grad():
        got, _ = run(tiny_dit, s, [3, 3, 3], grad=False)
    cache = s.new_cache(tiny_dit, 1, LATENT[1:])
    blocks = rollout(tiny_dit, cache, s, plan_blocks([None] * 3, [0] * 3, [context()]), latent_shape=LATENT,
                     generator=torch.Generator().manual_seed(5))
    want = torch.cat([clean for _, clean in blocks], dim=1)
    assert torch.equal(got, want)


def test_gradient_only_through_the_exit_step(monkeypatch):
    model = randomize(WanDiT(**TINY_DIT))
    forwards = []  # (grad enabled, output has a graph) per model forward
    model.register_forward_hook(lambda m, args, out: forwards.append((torch.is_grad_enabled(), out.grad_fn is not None)))
    blocks = []
    real_denoise = sf.denoise_block
    monkeypatch.setattr(sf, "denoise_block", lambda *a, **k: blocks.append(real_denoise(*a, **k)) or blocks[-1])
    exits = [2, 2, 2]
    clip, cache = run(model, settings(), exits)

    # 3 blocks x (exit+1 denoising forwards) + 2 clean passes (the last block's is skipped)
    assert len(forwards) == 3 * (exits[0] + 1) + 2
    with_graph = [i for i, (enabled, graph) in enumerate(forwards) if graph]
    assert all(enabled for enabled, graph in forwards if graph)
    # exactly the exit-step forward of each block records a graph
    assert with_graph == [2, 6, 10], forwards
    assert clip.requires_grad and clip.shape == (1, FRAMES, *LATENT)
    for buf in (cache.k_rot, cache.v):
        assert not buf.requires_grad and buf.grad_fn is None
    # a later block's output has no path back to an earlier block's output (the cache is detached)
    assert torch.autograd.grad(blocks[2].sum(), blocks[0], allow_unused=True) == (None,)
    clip.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_no_grad_rollout_has_no_graph(tiny_dit):
    clip, _ = run(tiny_dit, settings(), [1, 1, 1], grad=False)
    assert clip.grad_fn is None and not clip.requires_grad


@pytest.mark.parametrize("exits", [[0, 0, 0], [3, 1, 2]])
def test_gradient_checkpointing_gives_the_same_gradients(exits):
    grads = []
    for ckpt in (False, True):
        model = randomize(WanDiT(**TINY_DIT))
        model.gradient_checkpointing = ckpt
        clip, _ = run(model, settings(), exits)
        clip.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.equal(grads[0], grads[1])


def test_gradient_checkpointing_of_the_bidirectional_score():
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 3, *LATENT, generator=g), context(2)
    t = torch.tensor([[500.0] * 3, [900.0] * 3])
    grads = []
    for ckpt in (False, True):
        model = randomize(WanDiT(**TINY_DIT))
        model.gradient_checkpointing = ckpt
        model(x, t, ctx).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("exits", [[0, 0, 0], [3, 1, 2]])
def test_checkpointing_with_a_window_that_evicts_gives_the_same_gradients(exits):
    """The method's training window (sink 1 + window 6, relativistic) evicts frames before the
    backward: the recompute must attend to what the forward attended to."""
    s = settings(window=6, sink=1, policy="relativistic")
    grads = []
    for ckpt in (False, True):
        model = randomize(WanDiT(**TINY_DIT))
        model.gradient_checkpointing = ckpt
        clip, cache = run(model, s, exits)
        assert cache.frames_seen > cache.num_frames  # frames were evicted before this backward
        clip.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.equal(grads[0], grads[1])


def test_checkpointing_without_copies_refuses_a_cache_that_evicted():
    """A recompute after eviction without the copies would attend to other frames: it must fail,
    not mislead."""
    model = randomize(WanDiT(**TINY_DIT))
    model.gradient_checkpointing = True
    s = settings(window=6)
    cache = s.new_cache(model, 1, LATENT[1:], dtype=torch.float32, device="cpu")
    g = torch.Generator().manual_seed(0)
    block = lambda: torch.randn(1, 3, *LATENT, generator=g)  # noqa: E731
    t = torch.full((1, 3), 500.0)
    with torch.no_grad():
        model(block(), t, context(), kv_cache=cache, commit=True)
    out = model(block(), t, context(), kv_cache=cache)   # attends to the first block
    with torch.no_grad():
        for _ in range(2):
            model(block(), t, context(), kv_cache=cache, commit=True)  # evicts it
    with pytest.raises(RuntimeError, match="evicted"):
        out.square().mean().backward()


def test_the_method_training_rollout_is_the_inference_rollout(tiny_dit):
    """configs/self_forcing_dmd.yaml trains with the window, sink and positions that inference
    runs (sink 1 + window 6, relativistic): with the last exit step and no grad, the training
    rollout of 21 frames yields the inference rollout's blocks, bit for bit."""
    from pipeline.trainer import Trainer

    cfg = load_config("configs/self_forcing_dmd.yaml")
    tc = cfg.train
    assert (tc.local_attn_size, tc.sink_size, tc.position_policy) == (cfg.local_attn_size, cfg.sink_size,
                                                                      cfg.position_policy) == (6, 1, "relativistic")
    s = Trainer.rollout_settings(cfg)
    frames = int(tc.num_training_frames)
    blocks = frames // s.block_frames
    cache = s.new_cache(tiny_dit, 1, LATENT[1:], dtype=torch.float32, device="cpu")
    with torch.no_grad():
        got = self_forcing_rollout(tiny_dit, cache, s, context(), num_frames=frames, latent_shape=LATENT,
                                   exit_steps=[len(s.denoising_steps) - 1] * blocks,
                                   generator=torch.Generator().manual_seed(5), grad=False)
    inference = RolloutSettings.from_config(cfg)
    cache = inference.new_cache(tiny_dit, 1, LATENT[1:])
    out = rollout(tiny_dit, cache, inference, plan_blocks([None] * blocks, [0] * blocks, [context()]),
                  latent_shape=LATENT, generator=torch.Generator().manual_seed(5))
    want = [clean for _, clean in out]
    assert len(want) == 7 and all(torch.equal(a, b) for a, b in zip(got.split(s.block_frames, dim=1), want))


def test_exit_steps_are_shared_and_in_range():
    a = draw_exit_steps(7, 4, True, torch.Generator().manual_seed(11))
    b = draw_exit_steps(7, 4, True, torch.Generator().manual_seed(11))
    assert a == b and len(set(a)) == 1 and 0 <= a[0] < 4
    per_block = [draw_exit_steps(7, 4, False, torch.Generator().manual_seed(s)) for s in range(20)]
    assert all(len(p) == 7 and all(0 <= e < 4 for e in p) for p in per_block)
    assert any(len(set(p)) > 1 for p in per_block)
    with pytest.raises(ValueError, match="one exit step per block"):
        run(randomize(WanDiT(**TINY_DIT)), settings(), [1, 1])
