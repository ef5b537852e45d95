"""The Infinity-RoPE self-rollout: latent blocks, one after another, over one KV cache.

For each block: apply its event to the cache (``flush``: KV Flush; ``cut``: KV Flush then RoPE
Cut), denoise the block with the few-step list and yield it, then, when the next block is asked
for, run the clean block once more to write it into the cache. Nothing is kept but the cache
(preallocated) and the block in hand, so memory does not depend on the length of the video. The
blocks' events and prompts are read one at a time, as they are needed: a plan (batch inference)
and a live session (actions steered while the video plays, ``pipeline/live.py``) drive this
same loop.

The same two functions, :func:`denoise_block` and :func:`commit_block`, drive the training-time
self-rollout (``pipeline/self_forcing.py``): training and inference share one code path.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch

from model.kv_cache import KVCache
from model.scheduler import FlowMatchScheduler
from model.wan import WanDiT


@dataclass(frozen=True)
class RolloutSettings:
    """What the rollout needs from the config (every value derives from it)."""

    block_frames: int
    local_attn_size: int
    sink_size: int
    flush_keep: int
    policy: str
    cut_offset: int
    denoising_steps: tuple[int, ...]
    warp: bool
    shift: float
    num_train_timestep: int
    context_noise: float

    @classmethod
    def from_config(cls, cfg) -> "RolloutSettings":
        return cls(block_frames=int(cfg.num_frame_per_block), local_attn_size=int(cfg.local_attn_size),
                   sink_size=int(cfg.sink_size), flush_keep=int(cfg.flush_keep), policy=str(cfg.position_policy),
                   cut_offset=int(cfg.rope_cut_offset), denoising_steps=tuple(int(s) for s in cfg.denoising_step_list),
                   warp=bool(cfg.warp_denoising_step), shift=float(cfg.timestep_shift),
                   num_train_timestep=int(cfg.num_train_timestep), context_noise=float(cfg.context_noise))

    @property
    def first_steady_block(self) -> int:
        """Index of the first block that attends to a full window (sink + context + itself): from
        there on every block sees the same cache layout, until an event changes it."""
        return max(1, math.ceil((self.local_attn_size - self.block_frames) / self.block_frames))

    def scheduler(self) -> FlowMatchScheduler:
        return FlowMatchScheduler(self.shift, self.num_train_timestep)

    def timesteps(self, device=None) -> torch.Tensor:
        """The denoising timesteps, warped onto the shifted schedule when configured."""
        steps = self.scheduler().warp(self.denoising_steps) if self.warp else \
            torch.tensor(self.denoising_steps, dtype=torch.float32)
        return steps.to(device)

    def new_cache(self, model: WanDiT, batch_size: int, latent_hw: tuple[int, int], **kw) -> KVCache:
        return model.new_cache(batch_size=batch_size, height=latent_hw[0], width=latent_hw[1],
                               block_frames=self.block_frames, local_attn_size=self.local_attn_size,
                               sink_size=self.sink_size, policy=self.policy, cut_offset=self.cut_offset, **kw)


def denoise_block(model: WanDiT, cache: KVCache, noise: torch.Tensor, context: torch.Tensor,
                  timesteps: torch.Tensor, scheduler: FlowMatchScheduler, *,
                  generator: torch.Generator | None = None, exit_step: int | None = None,
                  grad: bool = False) -> torch.Tensor:
    """Few-step denoising of one block ``noise`` ``[B, f, C, h, w]`` over the cache → x0.

    Step i predicts x0 at ``timesteps[i]``; if it is not the last (or the exit step), x0 is
    re-noised to ``timesteps[i+1]`` with fresh noise. ``exit_step`` stops early (Self-Forcing
    training); with ``grad=True`` only that step's forward records a graph. The cache is only
    read (the block's keys are staged, not committed)."""
    b, f = noise.shape[:2]
    last = len(timesteps) - 1 if exit_step is None else exit_step
    x = noise
    for i in range(last + 1):
        t = timesteps[i].expand(b, f)
        with torch.set_grad_enabled(grad and i == last):
            flow = model(x, t, context, kv_cache=cache)
            x0 = scheduler.x0_from_flow(flow, x, t)
        if i == last:
            return x0
        fresh = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32).to(x0.dtype)
        x = scheduler.add_noise(x0.detach(), fresh, timesteps[i + 1].expand(b, f))
    raise AssertionError("unreachable")


@torch.no_grad()
def commit_block(model: WanDiT, cache: KVCache, clean: torch.Tensor, context: torch.Tensor,
                 context_noise: float, generator: torch.Generator | None, scheduler: FlowMatchScheduler) -> None:
    """The clean pass: run the finished block at timestep ``context_noise`` and append its keys
    and values to the cache. With ``context_noise > 0`` the block is first re-noised to that
    timestep on ``scheduler``'s schedule (as Self-Forcing's training does); at 0 (the config's
    default, and Self-Forcing's inference) it goes in clean."""
    t = torch.full(clean.shape[:2], float(context_noise), device=clean.device)
    x = clean.detach()
    if context_noise > 0:
        fresh = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32).to(x.dtype)
        x = scheduler.add_noise(x, fresh, t)
    model(x, t, context, kv_cache=cache, commit=True)


def apply_event(cache: KVCache, event: str | None, flush_keep: int) -> None:
    """Execute a plan event: ``flush`` → KV Flush; ``cut`` → KV Flush + RoPE Cut; ``start`` (a
    video's first block) and None change nothing."""
    if event not in (None, "start", "flush", "cut"):
        raise ValueError(f"unknown block event {event!r}: expected None, 'start', 'flush' or 'cut'")
    if event in ("flush", "cut"):
        cache.flush(flush_keep)
    if event == "cut":
        cache.cut()


@dataclass(frozen=True)
class BlockSpec:
    """What one block of a rollout is made of: the event before it (``start`` | ``flush`` |
    ``cut`` | None), the text embedding it is generated with, the index of the segment
    (action) it belongs to, and whether it is the video's last block (``final``: the rollout
    ends after it without its clean pass, whose keys no block would read). Batch inference
    derives them from a plan (:func:`plan_blocks`); a live session decides each one when the
    rollout asks for it (and learns that it was the last only then)."""

    event: str | None
    context: torch.Tensor
    segment: int = 0
    final: bool = False


def plan_blocks(block_events: Sequence[str | None], block_segment: Sequence[int],
                contexts: Sequence[torch.Tensor]) -> Iterator[BlockSpec]:
    """The blocks of a planned video: block i has event ``block_events[i]`` and the embedding of
    its segment, ``contexts[block_segment[i]]``; the last one is ``final``."""
    if len(block_events) != len(block_segment):
        raise ValueError(f"{len(block_events)} block events for {len(block_segment)} block segments")
    for i, (event, segment) in enumerate(zip(block_events, block_segment)):
        yield BlockSpec(event, contexts[segment], segment, final=i == len(block_events) - 1)


@torch.no_grad()
def rollout(model: WanDiT, cache: KVCache, settings: RolloutSettings, blocks: Iterable[BlockSpec], *,
            latent_shape: tuple[int, int, int], generator: torch.Generator | None = None,
            image_latent: torch.Tensor | None = None) -> Iterator[tuple[BlockSpec, torch.Tensor]]:
    """Yield ``(spec, clean latent block [B, f, C, h, w])`` for each spec of ``blocks``.

    ``blocks`` is read lazily: spec i is taken only when block i is about to be generated (after
    block i - 1 was yielded and the consumer asked for more), so a live session can decide the
    next event and prompt at the last moment; the rollout ends when ``blocks`` does. The rollout
    only executes events, it does not decide them. ``image_latent`` ``[B, 1, C, h, w]`` (image
    start) is written into the cache as the first latent frame, with the first block's prompt,
    and the first generated block continues from it.

    A block is yielded as soon as it is denoised; its clean pass (which writes it into the cache)
    runs when the next block is asked for, before the next spec is read. So the frames of a block
    can be decoded one forward sooner after its spec was read: 4 forwards with four steps, not 5
    (the first block's frames, and a live action's, come a fifth of a block's DiT time earlier).
    The DiT's forwards and the random draws are the same, in the same order; the consumer must
    not change a yielded block in place before it asks for the next. A ``final`` spec ends the
    rollout after its block, without the clean pass nothing would read (a source that ends
    without marking its last spec, like a live session, pays that forward once, at the end)."""
    model_param = next(model.parameters())
    device, dtype = model_param.device, model_param.dtype
    batch = cache.batch_size
    timesteps = settings.timesteps(device)
    scheduler = settings.scheduler()
    cache.reset()
    specs = iter(blocks)
    last = None  # (clean block, its prompt) yielded, whose clean pass is still to run
    for i in itertools.count():
        if last is not None:  # the consumer asked for another block: the last one goes into the cache
            commit_block(model, cache, *last, settings.context_noise, generator, scheduler)
        spec = next(specs, None)  # read now, at the last moment before its denoising steps
        if spec is None:
            return
        if i == 0 and image_latent is not None:
            commit_block(model, cache, image_latent.to(device, dtype), spec.context, settings.context_noise,
                         generator, scheduler)
        apply_event(cache, spec.event, settings.flush_keep)
        noise = torch.randn((batch, settings.block_frames, *latent_shape), generator=generator, device=device,
                            dtype=torch.float32).to(dtype)
        clean = denoise_block(model, cache, noise, spec.context, timesteps, scheduler, generator=generator)
        yield spec, clean
        if spec.final:  # no block follows: its clean pass would write keys that nothing reads
            return
        last = clean, spec.context
