"""CUDA graphs of the cached DiT forward: one graph per cache layout, captured once, replayed.

A block of the rollout is a handful of forwards of the same shapes over the same buffers: the KV
cache is preallocated, the prompt's text keys/values sit in buffers of their own
(:attr:`KVCache.text_kv <model.kv_cache.KVCache.text_kv>`), and the one thing that changes what
a forward computes, besides the values of its inputs, is the cache's layout
(:attr:`KVCache.layout <model.kv_cache.KVCache.layout>`): how many tokens are held (0 for the
first block, then ``local_attn_size - num_frame_per_block`` frames' worth, and after a KV Flush
``sink + flush_keep`` frames, the layouts while the window fills, one frame after an image
start: a handful of values for a whole video), and for the clean pass
which frames it writes into the held slots. Each layout's forward is captured as a CUDA graph
and replayed: one launch instead of thousands of kernel launches, so the GPU no longer waits for
the host to issue them. The first block's clean pass runs once per video: it is captured in the
second video and replayed from the third.

Eager, outside the graph: the cache's bookkeeping, which writes the same buffers in place
(:meth:`~model.kv_cache.KVCache.prepare` turning held keys at a layout change, ``set_text``, the
moves of ``flush``), and the rollout's few elementwise steps between forwards. Captured: patch
and time embedding, every block (assembling its attention window from the held keys and values
and the block's, attention, feed-forward; a clean pass's writes into the held slots) and the
head. A replay reads

* the block's latents, timesteps and RoPE table, copied into the graph's static inputs first;
* the cache's key/value buffers and the text buffers, at their fixed addresses;
* the weights (moving the model, ``.to()``, drops the graphs).

A layout is captured at its second forward: the first runs eagerly (lazy initialisation, cuBLAS
and cuDNN plans, ``torch.compile``); the second runs as the warm-up on a side stream that capture
needs, its output that call's, and then the graph is recorded (recording executes nothing);
replays start at the third. All graphs share one memory pool (they never run concurrently).
Capture is checked per thread (``capture_error_mode="thread_local"``): the mp4 writer's thread
keeps waiting on its CUDA events meanwhile. A capture that fails turns the graphs off, with one
warning: every forward runs eagerly from then on (a capture that fails part-way can leave the
caching allocator's bookkeeping of captures and its pool behind, pytorch#180395 and #190308, so
no other is tried). Another cache (or new text buffers) drops the graphs, and their pool with
them: a later capture starts a new pool (the first capture leaves cuBLAS's workspace in its pool
for good, so a pool whose graphs are gone cannot be handed to a capture again).

``capture=False`` is the dry run the CPU tests use, through the same calls: "capture" runs the
call's forward on the static inputs as the warm-up does and records nothing, and "replay" runs the
forward again on exactly those arguments, its static inputs refreshed by the same copies. That is
what a graph replay reads; if a forward needed anything the captured one does not hold (another
buffer, another layout), or a capture ran a forward twice, the output differs from the eager
forward's, and the tests compare them.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Callable

import torch

log = logging.getLogger(__name__)

# core(x, t, rope_table, layers) -> flow prediction; layers: one LayerKV per block
Core = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, list], torch.Tensor]


class CaptureFailed(Exception):
    """Recording a graph failed; ``out`` is the output of the call's forward, which did run."""

    def __init__(self, out: torch.Tensor):
        super().__init__("CUDA graph capture failed")
        self.out = out


class _Captured:
    """One layout's graph, its static inputs and output, and the cache views it was captured on."""

    def __init__(self, core: Core, x: torch.Tensor, t: torch.Tensor, rope: torch.Tensor, layers: list,
                 real: bool = True):
        self.core, self.layers, self.real = core, layers, real
        self.x, self.t, self.rope = x.clone(), t.clone(), rope.clone()
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None

    def capture(self, pool, side: torch.cuda.Stream | None) -> torch.Tensor:
        """Run this call's forward on the static inputs (the warm-up a capture needs, on a side
        stream), then record the graph, which executes nothing; replays start with the next call.
        The forward runs once per call: a clean pass writes into the held slots it reads from, so
        running it twice would attend to the block it just wrote. Returns the output."""
        if self.real:
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.core(self.x, self.t, self.rope, self.layers)
            torch.cuda.current_stream().wait_stream(side)
        else:  # dry run
            out = self.core(self.x, self.t, self.rope, self.layers)
        out = out.clone()
        try:
            self.record(pool)
        except Exception as exc:
            raise CaptureFailed(out) from exc
        return out

    def record(self, pool) -> None:
        if not self.real:
            return
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream()
        try:
            # thread_local: the mp4 writer's thread may wait on a CUDA event while this thread
            # captures; only this thread's calls must be capturable
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                self.out = self.core(self.x, self.t, self.rope, self.layers)
        finally:  # a capture that raises can leave this thread on the capture's stream
            if torch.cuda.current_stream() != stream:
                torch.cuda.set_stream(stream)
        self.graph = graph

    def replay(self, x: torch.Tensor, t: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        self.x.copy_(x)
        self.t.copy_(t)
        self.rope.copy_(rope)
        if self.graph is not None:
            self.graph.replay()
        else:  # dry run: the captured forward's own arguments, as a replay reads them
            self.out = self.core(self.x, self.t, self.rope, self.layers)
        return self.out.clone()  # the next replay overwrites the static output


class CachedForwardGraphs:
    """The graphs of one model's cached forwards (:meth:`WanDiT.forward <model.wan.WanDiT.forward>`
    with a KV cache, without autograd). ``stats`` counts eager forwards, captures, replays and
    failed captures (for tests and benchmarks)."""

    def __init__(self, capture: bool = True):
        if capture and not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device")
        self.capture_graphs = capture
        self.stats: Counter = Counter()
        self.failed: str | None = None  # why the graphs are off, once a capture failed
        self._side = None  # the warm-up stream
        self.reset()

    def reset(self) -> None:
        """Drop every graph (and with them the buffers they hold) and their memory pool."""
        self._graphs: dict[tuple, _Captured] = {}
        self._seen: Counter = Counter()
        self._pool = None  # one memory pool for all graphs, made at the first capture
        self._owner: tuple | None = None  # (cache, its text allocation) the graphs were captured on

    def __call__(self, core: Core, cache, x: torch.Tensor, t: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        owner = (cache, cache.text_allocs)
        if self._owner is None or self._owner[0] is not cache or self._owner[1] != owner[1]:
            self.reset()
            self._owner = owner
        key = (tuple(x.shape), x.dtype, tuple(t.shape), t.dtype, tuple(rope.shape), cache.layout)
        captured = self._graphs.get(key)
        if captured is None:
            self._seen[key] += 1
            if self._seen[key] < 2 or self.failed is not None:
                self.stats["eager"] += 1
                return core(x, t, rope, cache.layers())
            return self._capture(core, cache, x, t, rope, key)
        self.stats["replayed"] += 1
        return captured.replay(x, t, rope)

    def _capture(self, core: Core, cache, x, t, rope, key) -> torch.Tensor:
        """Capture ``key``'s layout with this call's forward, which runs once (see
        :meth:`_Captured.capture`); its output is returned."""
        captured = _Captured(core, x, t, rope, cache.layers(), real=self.capture_graphs)
        if self.capture_graphs and self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
            self._side = self._side or torch.cuda.Stream()
        try:
            out = captured.capture(self._pool, self._side)
        except CaptureFailed as failed:  # an op that cannot be captured: no graphs from now on
            exc = failed.__cause__
            self.failed = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
            self.reset()
            self.stats["failed"] += 1
            self.stats["eager"] += 1
            log.warning("CUDA graph capture failed for the cache layout of %d held frames%s (%s); CUDA graphs are "
                        "off, every forward runs eagerly", cache.num_frames,
                        " (clean pass)" if cache.writes else "", self.failed)
            return failed.out
        self._graphs[key] = captured
        self.stats["captured"] += 1
        log.info("CUDA graph captured for the cache layout with %d held frames%s (%d in all)", cache.num_frames,
                 " (clean pass)" if cache.writes else "", len(self._graphs))
        return out

    def __len__(self) -> int:
        return len(self._graphs)
