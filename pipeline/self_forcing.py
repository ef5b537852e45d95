"""The training-time self-rollout of Self-Forcing: the causal generator produces a whole clip
block by block over its own KV cache, exactly as at inference, with gradient truncation.

It runs the same two functions as the inference rollout (:func:`pipeline.rollout.denoise_block`
and :func:`pipeline.rollout.commit_block`) over the same :class:`~model.kv_cache.KVCache`, so
positions, cache layout and numerics are shared; with ``grad=False`` and the last exit step it
produces exactly what :func:`pipeline.rollout.rollout` yields for the same generator.

Per clip, each block:

1. denoises from fresh noise with the few-step list, stopping at the block's *exit step* e:
   steps before e run without grad (predict x0, re-noise to the next timestep with fresh
   noise), step e runs with grad and its x0 is the block's output;
2. is run once more, clean, at ``context_noise`` and without grad, to write its keys and values
   into the cache (skipped for the last block: nothing reads the cache after it).

Gradient therefore reaches the parameters only through the exit step's forward of each block;
the keys and values the later blocks attend to are detached (Self-Forcing's truncation).
"""
from __future__ import annotations

from typing import Sequence

import torch

from model.kv_cache import KVCache
from model.wan import WanDiT
from pipeline.rollout import RolloutSettings, commit_block, denoise_block


def draw_exit_steps(num_blocks: int, num_steps: int, same_across_blocks: bool,
                    generator: torch.Generator) -> list[int]:
    """Exit step per block, uniform over the few-step list. Seed ``generator`` the same on every
    rank so that all ranks take the same path (Self-Forcing broadcasts rank 0's draw)."""
    n = 1 if same_across_blocks else num_blocks
    draws = torch.randint(num_steps, (n,), generator=generator, device=generator.device).tolist()
    return draws * num_blocks if same_across_blocks else draws


def self_forcing_rollout(model: WanDiT, cache: KVCache, settings: RolloutSettings, context: torch.Tensor, *,
                         num_frames: int, latent_shape: Sequence[int], exit_steps: Sequence[int],
                         generator: torch.Generator | None = None, grad: bool = True,
                         grad_from_frame: int = 0, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Roll out a clip of ``num_frames`` latent frames ``[B, F, C, h, w]`` (F a multiple of the
    block size) over ``cache`` (reset here; its batch size is the clip's).

    ``exit_steps[i]``: the denoising step whose x0 is block i's output. ``grad``: record the
    exit step's forward for blocks starting at or after ``grad_from_frame`` (all by default).
    Noise is drawn from ``generator`` in the inference rollout's order. ``dtype``: latent dtype
    (default: the cache's, i.e. the model's compute dtype)."""
    block = settings.block_frames
    if num_frames % block:
        raise ValueError(f"num_frames {num_frames} is not a multiple of the block size {block}")
    num_blocks = num_frames // block
    if len(exit_steps) != num_blocks:
        raise ValueError(f"need one exit step per block ({num_blocks}), got {len(exit_steps)}")
    device = cache.k_rot.device
    dtype = dtype or cache.k_rot.dtype
    timesteps = settings.timesteps(device)
    if any(not 0 <= e < len(timesteps) for e in exit_steps):
        raise ValueError(f"exit steps {list(exit_steps)} outside the {len(timesteps)}-step list")
    scheduler = settings.scheduler()
    batch = cache.batch_size
    cache.reset()
    # a window shorter than the clip evicts frames before the backward: checkpointed forwards
    # keep a copy of what they attended to (model/kv_cache.PinnedKV)
    cache.pin_copies = cache.capacity < num_frames
    outputs = []
    for i in range(num_blocks):
        noise = torch.randn((batch, block, *latent_shape), generator=generator, device=device,
                            dtype=torch.float32).to(dtype)
        clean = denoise_block(model, cache, noise, context, timesteps, scheduler, generator=generator,
                              exit_step=int(exit_steps[i]), grad=grad and i * block >= grad_from_frame)
        if i + 1 < num_blocks:
            commit_block(model, cache, clean, context, settings.context_noise, generator, scheduler)
        outputs.append(clean)
    return torch.cat(outputs, dim=1)
