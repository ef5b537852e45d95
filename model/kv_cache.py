"""The rolling self-attention cache of the causal rollout, and the temporal positions it hands out.

Every idea of Infinity-RoPE that touches attention lives here:

* **Sink + window.** A block attends to at most ``local_attn_size`` latent frames: ``sink_size``
  sink frames (the first frames generated, never evicted), a ring of the most recent context
  frames (``local_attn_size - sink_size - block_frames`` of them, oldest first) and the block
  being generated. Per layer the cache holds the sink and the ring only; a layer's forward
  attends to its held frames followed by the block's (one concatenation, a layer's window, freed
  after the layer), and the clean pass (:meth:`KVCache.begin_forward` with ``commit``) copies the
  frames that stay from that window into the held slots. The cache is allocated once and never
  grows, however long the video.
* **Positions are data.** Every key is rotated at the position the cache assigns it now, and
  re-rotated when that position changes (fast path, below):

  - ``absolute`` (plain Self-Forcing): a frame's position is its global latent index;
  - ``relativistic`` (Block-Relativistic RoPE): the attended frames, in temporal order (sink,
    context, current block), get positions 0, 1, 2, ... Until the window is full this equals
    the absolute positions; afterwards no position exceeds ``local_attn_size - 1``.
  - **RoPE Cut** (:meth:`KVCache.cut`): for the next block only, the block's positions jump by
    ``cut_offset``; the block after it returns to plain positions.
* **KV Flush** (:meth:`KVCache.flush`): keep the sink and the last ``keep`` context frames, drop
  the rest and the cross-attention cache, so a new prompt takes effect at once.

Fast path: only rotated keys are stored. Each slot remembers the temporal position its key is
rotated at; when the layout changes (once per block: a commit, a flush, a cut block's frames
entering the context) the keys whose position changed are turned by the difference, layer by
layer (the float32 temporaries of one layer, not of thirty), before the next forward
(:meth:`KVCache.prepare`). Rotations compose, so this
equals rotating the raw key at its new position; a key is turned at most once per layout change
and leaves the window after a few (1 in steady state with window 6 and blocks of 3; the sink
never moves). No raw keys are kept: the cache is two buffers (rotated keys, values), not three.
``naive_rope=True`` keeps the raw keys and re-rotates every one of them at its current position
at every forward, which is the oracle the tests compare against.

What a transformer block sees of the cache is a :class:`LayerKV`: its layer's rows of the two
buffers, the held length and the prompt's text keys/values. The bookkeeping (:meth:`prepare`,
:meth:`set_text`, :meth:`begin_forward`) runs once per forward before the blocks, and a clean
pass's copies into the held slots after each block (:meth:`LayerKV.finish`), so a block compiles
with ``torch.compile`` into one graph without a break, shared by all layers and by denoising
steps and clean passes alike.
"""
from __future__ import annotations

from typing import Callable

import torch

from model.rope import Rope, rotate

POLICIES = ("absolute", "relativistic")


class KVCache:
    def __init__(
        self,
        *,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        grid: tuple[int, int],
        block_frames: int,
        local_attn_size: int,
        sink_size: int,
        rope: Rope,
        policy: str = "relativistic",
        cut_offset: int = 0,
        batch_size: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        naive_rope: bool = False,
    ):
        if policy not in POLICIES:
            raise ValueError(f"position policy must be one of {POLICIES}, got {policy!r}")
        if local_attn_size < sink_size + block_frames:
            raise ValueError(f"local_attn_size {local_attn_size} cannot hold sink {sink_size} + block {block_frames}")
        self.grid = (int(grid[0]), int(grid[1]))
        self.frame_tokens = self.grid[0] * self.grid[1]
        self.block_frames = block_frames
        self.capacity = local_attn_size  # frames
        self.sink_size = sink_size
        self.ring_size = local_attn_size - sink_size - block_frames
        self.policy = policy
        self.cut_offset = cut_offset
        self.rope = rope
        self.naive_rope = naive_rope
        self.pin_copies = False  # PinnedKV keeps copies of the held frames (training with eviction)
        self.precompute_text = True  # text keys/values once per prompt, before the blocks (set_text)
        self.batch_size = batch_size
        self.held_capacity = sink_size + self.ring_size  # frames kept between blocks
        shape = (num_layers, batch_size, self.held_capacity * self.frame_tokens, num_heads, head_dim)
        self.k_rot = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # the oracle only: un-rotated keys, every held one rotated again at every forward
        self.k_raw = torch.zeros(shape, dtype=dtype, device=device) if naive_rope else None
        # per layer, the prompt's cross-attention (keys, values), [batch, text_len, heads, head_dim]
        self.text_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.text_allocs = 0
        self.reset()

    # ------------------------------------------------------------------ bookkeeping (Python only)
    def reset(self) -> None:
        """Empty the cache for a new video (buffers are kept)."""
        self.n_sink = 0             # sink frames held
        self.n_ring = 0             # context frames held in the ring (slots after the sink, oldest first)
        self.frames_seen = 0        # global latent index of the next frame to be committed
        self.ring_first_frame = 0   # global latent index of the oldest context frame
        self.slot_frame: list[int | None] = [None] * self.held_capacity  # global frame index per slot
        self.slot_pos: list[int | None] = [None] * self.held_capacity    # position its stored key is rotated at
        self.writes: tuple = ()     # token copies window -> held slots the forward now running makes
        self.cut_pending = False
        self.version = 0            # bumped whenever stored frames or their positions change
        self._prepared = -1         # the version the stored rotations were brought up to
        self._ctx_table = (None, None)
        self.keys_turned = 0        # frames x layers re-rotated by prepare() (the tests count them)
        self.drop_cross_attention()

    @property
    def num_frames(self) -> int:
        """Frames held (sink + context), in slots ``0 .. num_frames - 1``."""
        return self.n_sink + self.n_ring

    def _ring_base(self) -> int:
        """Position of the oldest context frame."""
        return self.n_sink if self.policy == "relativistic" else self.ring_first_frame

    def context_runs(self) -> list[tuple[int, int]]:
        """Temporal positions of the held frames in slot order, as (start, count) runs."""
        # sink frames are the first frames: 0.. in both policies; the ring is in temporal order
        return [(0, self.n_sink), (self._ring_base(), self.n_ring)]

    def current_runs(self, num_frames: int) -> list[tuple[int, int]]:
        """Temporal positions of a block of ``num_frames`` frames generated now."""
        start = self.num_frames if self.policy == "relativistic" else self.frames_seen
        if self.cut_pending:
            start += self.cut_offset
        return [(start, num_frames)]

    def positions(self, num_frames: int) -> tuple[list[int], list[int]]:
        """(positions of held frames in slot order, positions of the current block)."""
        expand = lambda runs: [s + i for s, c in runs for i in range(c)]  # noqa: E731
        return expand(self.context_runs()), expand(self.current_runs(num_frames))

    # ---------------------------------------------------------------------------- events
    def cut(self) -> None:
        """RoPE Cut: the next block's positions jump by ``cut_offset`` (for that block only)."""
        self.cut_pending = True

    def flush(self, keep: int) -> None:
        """KV Flush: keep the sink and the ``keep`` most recent context frames, drop the rest and
        the cross-attention cache."""
        keep = max(0, min(keep, self.n_ring))
        drop = self.n_ring - keep
        if drop and keep:  # the kept frames move to the front of the ring, a frame at a time (in place)
            bufs = (self.k_rot, self.v) + ((self.k_raw,) if self.k_raw is not None else ())
            for i in range(keep):
                dst, src = self.sink_size + i, self.sink_size + drop + i
                for buf in bufs:
                    buf[:, :, self._tokens(dst)] = buf[:, :, self._tokens(src)]
                self.slot_frame[dst], self.slot_pos[dst] = self.slot_frame[src], self.slot_pos[src]
        for s in range(self.sink_size + keep, self.held_capacity):
            self.slot_frame[s] = self.slot_pos[s] = None
        self.n_ring = keep
        self.ring_first_frame = self.frames_seen - keep
        self.version += 1
        self.drop_cross_attention()

    def _commit_plan(self, num_frames: int) -> tuple[int, int, list[tuple[int, int, int]]]:
        """What the clean pass of a block of ``num_frames`` frames leaves in the cache: the new
        sink and ring sizes, and the frames copied from its attention window (held frames, then
        the block) into the held slots, as ``(slot, window frame, count)`` runs. The sink fills
        first; the ring keeps the newest frames after it, oldest first."""
        held, total = self.num_frames, self.num_frames + num_frames
        sink = min(self.sink_size, self.n_sink + num_frames)
        ring = min(self.ring_size, total - sink)
        copies = []
        for dst, src, count in ((self.n_sink, held, sink - self.n_sink), (sink, total - ring, ring)):
            if dst == src and src < held:  # held frames already in their slot stay
                skip = min(count, held - src)
                dst, src, count = dst + skip, src + skip, count - skip
            if count <= 0:
                continue
            if copies and copies[-1][0] + copies[-1][2] == dst and copies[-1][1] + copies[-1][2] == src:
                copies[-1] = (copies[-1][0], copies[-1][1], copies[-1][2] + count)  # one run
            else:
                copies.append((dst, src, count))
        return sink, ring, copies

    def begin_forward(self, num_frames: int, commit: bool) -> None:
        """Set what the blocks of the forward about to run write into the held slots: nothing
        for a denoising step; for the clean pass (``commit``), the frames that stay (the block's,
        and held ones that move), copied from each layer's window (:attr:`writes`, token runs)."""
        t = self.frame_tokens
        self.writes = tuple((d * t, s * t, c * t) for d, s, c in self._commit_plan(num_frames)[2]) if commit else ()

    def commit(self, num_frames: int) -> None:
        """Make the block of the last forward (its clean pass, which wrote it) part of the context:
        fill the sink first, then the ring, evicting the oldest context frames."""
        sink, ring, copies = self._commit_plan(num_frames)
        held, total = self.num_frames, self.num_frames + num_frames
        frames = self.slot_frame[:held] + [self.frames_seen + j for j in range(num_frames)]
        positions = self.slot_pos[:held] + self.positions(num_frames)[1]  # as the clean pass rotated them
        for dst, src, count in copies:
            self.slot_frame[dst:dst + count] = frames[src:src + count]
            self.slot_pos[dst:dst + count] = positions[src:src + count]
        for s in range(sink + ring, self.held_capacity):
            self.slot_frame[s] = self.slot_pos[s] = None
        self.n_sink, self.n_ring = sink, ring
        self.ring_first_frame = frames[total - ring] if ring else self.frames_seen + num_frames
        self.frames_seen += num_frames
        self.cut_pending = False
        self.writes = ()
        self.version += 1

    def drop_cross_attention(self) -> None:
        """Forget the prompt's text keys/values (their buffers stay allocated for the next prompt)."""
        self._text_context: torch.Tensor | None = None  # the prompt embedding text_kv holds, if any

    @property
    def has_text(self) -> bool:
        """The text keys/values of the current prompt are in :attr:`text_kv` (:meth:`set_text`)."""
        return self._text_context is not None

    # ------------------------------------------------------------------- used by the model
    def _tokens(self, slot: int, count: int = 1) -> slice:
        return slice(slot * self.frame_tokens, (slot + count) * self.frame_tokens)

    def context_table(self) -> torch.Tensor:
        """RoPE table of the held frames at their current positions (:func:`~model.rope.rotate`)."""
        if self._ctx_table[0] != self.version:
            table = self.rope.freqs_for_runs(self.context_runs(), *self.grid, self.k_rot.device)
            self._ctx_table = (self.version, table)
        return self._ctx_table[1]

    def current_table(self, num_frames: int) -> torch.Tensor:
        """RoPE table of a block of ``num_frames`` frames generated now (:func:`~model.rope.rotate`)."""
        return self.rope.freqs_for_runs(self.current_runs(num_frames), *self.grid, self.k_rot.device)

    def check_block(self, batch_size: int, num_frames: int) -> None:
        if batch_size != self.batch_size:
            raise ValueError(f"cache was allocated for batch {self.batch_size}, got {batch_size}")
        if num_frames > self.block_frames or self.num_frames + num_frames > self.capacity:
            raise ValueError(f"block of {num_frames} frames does not fit the cache "
                             f"({self.num_frames} held, capacity {self.capacity})")

    @torch.no_grad()
    def prepare(self) -> None:
        """Bring the stored rotations to the current layout, before a forward over the cache:
        every held key whose position changed since it was rotated is turned by the difference,
        one run of slots and one layer at a time. Nothing to do between the denoising steps of a
        block. (The naive oracle instead rotates every held raw key at its current position, at
        every forward.)"""
        if self.naive_rope:
            held = self.num_frames * self.frame_tokens
            if held:
                raw = self.k_raw[:, :, :held]
                self.k_rot[:, :, :held] = rotate(raw.flatten(0, 1), self.context_table()).view_as(raw)
            return
        if self._prepared == self.version:
            return
        want = self.positions(0)[0]
        slot = 0
        while slot < len(want):  # runs of consecutive slots turned by the same angle
            delta = want[slot] - self.slot_pos[slot]
            end = slot + 1
            while end < len(want) and want[end] - self.slot_pos[end] == delta:
                end += 1
            if delta:
                tokens = self._tokens(slot, end - slot)
                turn = self.rope.shift_freqs(delta, end - slot, *self.grid, self.k_rot.device)
                for layer in range(self.k_rot.shape[0]):  # a layer at a time: its float32 temporaries only
                    self.k_rot[layer, :, tokens] = rotate(self.k_rot[layer, :, tokens], turn)
                self.keys_turned += (end - slot) * self.k_rot.shape[0]
                for s in range(slot, end):
                    self.slot_pos[s] = want[s]
            slot = end
        self._prepared = self.version

    @torch.no_grad()
    def set_text(self, context: torch.Tensor, make_layer: Callable[[int], tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The cross-attention keys/values of every layer for the prompt embedding ``context``,
        ``make_layer(i)`` for layer i, computed once per prompt (until it changes or a flush drops
        them), before the blocks run: a compiled block then takes them as inputs, and a new prompt
        (a flush) needs no other graph. They are written into buffers allocated at the first
        prompt and kept for the cache's life (:attr:`text_kv`), so a new prompt changes their
        values, never their addresses (what a captured CUDA graph reads; ``text_allocs`` counts
        the allocations). Off with ``precompute_text = False`` (FSDP-sharded models, whose weights
        are gathered only inside each block's forward: the blocks compute them there)."""
        if not self.precompute_text or self._text_context is context:
            return
        for i in range(len(self.k_rot)):
            k, v = make_layer(i)
            if i == 0 and (self.text_kv is None or self.text_kv[0][0].shape != k.shape
                           or self.text_kv[0][0].dtype != k.dtype):  # first prompt, or another text length
                self.text_kv = [None] * len(self.k_rot)
                self.text_allocs += 1
            if self.text_kv[i] is None:
                self.text_kv[i] = (k.contiguous(), v.contiguous())
            else:
                self.text_kv[i][0].copy_(k)
                self.text_kv[i][1].copy_(v)
        self._text_context = context

    def layer(self, i: int) -> "LayerKV":
        """What layer ``i`` of the forward now running reads and writes (:meth:`prepare` ran)."""
        return LayerKV(self.k_rot[i], self.v[i], self.num_frames * self.frame_tokens,
                       self.k_raw[i] if self.k_raw is not None else None,
                       self.text_kv[i] if self.has_text else None, self.writes)

    def layers(self) -> list["LayerKV"]:
        """:meth:`layer` of every layer."""
        return [self.layer(i) for i in range(len(self.k_rot))]

    @property
    def layout(self) -> tuple:
        """What decides the work of a forward over this cache besides the block's shape: the held
        tokens and the clean pass's writes (a CUDA graph per layout)."""
        return self.num_frames, self.writes

    def memory_bytes(self) -> int:
        """Bytes of the key/value buffers (the text keys/values come on top; a layer's window
        exists only while that layer runs)."""
        return sum(t.numel() * t.element_size() for t in (self.k_raw, self.k_rot, self.v) if t is not None)

    def pinned(self) -> "PinnedKV":
        """This cache as the block being generated sees it now (for activation checkpointing)."""
        return PinnedKV(self)


class LayerKV:
    """One layer's part of the cache for one forward: what a transformer block attends to.

    Plain tensors and ints, so that ``torch.compile`` traces a block straight through it (no
    graph break) and the same compiled block serves every layer: ``k``/``v`` are views of the
    layer's held slots, ``held`` the tokens held before the current block (the value compiled
    code guards on: a handful of layouts), ``text`` the prompt's keys/values (or None: computed in
    the block), ``writes`` the clean pass's copies into the held slots (made by :meth:`finish`,
    outside the block)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, held: int, k_raw: torch.Tensor | None = None,
                 text: tuple[torch.Tensor, torch.Tensor] | None = None, writes: tuple = ()):
        self.k, self.v, self.held, self.k_raw, self.text, self.writes = k, v, held, k_raw, text, writes
        self.window: tuple[torch.Tensor, torch.Tensor] | None = None  # what the block attended to

    def attend(self, k: torch.Tensor, k_rot: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values to attend to, ``[B, tokens, H, D]``: the held ones, then the current
        block's (``k`` raw, ``k_rot`` rotated, ``v``), concatenated into a window of this layer's
        own, kept until :meth:`finish`. One concatenation per tensor: a compiled block writes the
        block's rotated keys straight into it (in the cache's dtype, no float32 copy), where
        assembling them in a preallocated buffer made the compiler copy that whole buffer twice
        (docs/PERFORMANCE.md §23). Under autograd the graph reaches the block's keys through it."""
        if self.k_raw is not None:  # (not reading writes here: a compiled block then never guards on it)
            self._raw = k.detach()  # the oracle's raw keys of the block, for the clean pass
        held = self.held
        self.window = torch.cat([self.k[:, :held], k_rot], dim=1), torch.cat([self.v[:, :held], v], dim=1)
        return self.window

    def finish(self) -> None:
        """After the layer's block ran: a clean pass copies the frames that stay from the window it
        attended to into the held slots (:attr:`KVCache.writes`); then the window is let go.
        Outside the block, so a compiled block is the same graph for a denoising step and a clean
        pass."""
        if self.writes:
            keys, values = self.window
            for dst, src, count in self.writes:
                self.k[:, dst:dst + count] = keys[:, src:src + count]
                self.v[:, dst:dst + count] = values[:, src:src + count]
                if self.k_raw is not None:
                    raw = torch.cat([self.k_raw[:, :self.held], self._raw], dim=1)
                    self.k_raw[:, dst:dst + count] = raw[:, src:src + count]
        self.window = None

    def cross(self, make: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The text's keys/values: the prompt's, computed once (:meth:`KVCache.set_text`); under
        autograd, or without them, ``make()`` (gradients reach the text projections)."""
        if torch.is_grad_enabled() or self.text is None:
            return make()
        return self.text


class PinnedKV:
    """A cache as one forward saw it, so that an activation-checkpoint recompute during backward
    (which runs after later blocks were committed) attends to the same held frames.

    During the original forward it delegates to the cache. In a recompute (the cache has moved
    on) it attends to the frames that were held then. With ``cache.pin_copies`` (set by a
    training rollout whose window is shorter than its clip, so frames are evicted before the
    backward) it keeps a copy of each layer's held keys and values from the original forward: the
    price is those frames' keys and values once per checkpointed forward. Without it, it reads
    them from the buffers, which is exact as long as none was evicted or flushed in between (a
    window that holds the whole clip); otherwise it raises instead of computing a wrong gradient."""

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.held = cache.num_frames
        self.version = cache.version
        self.slots = list(cache.slot_frame[:self.held])
        self.copies: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = {} if cache.pin_copies else None

    def layer(self, i: int) -> "_PinnedLayer":
        return _PinnedLayer(self, i)


class _PinnedLayer:
    writes = ()  # checkpointed forwards are denoising steps under autograd, never a clean pass

    def __init__(self, pinned: PinnedKV, i: int):
        self.pinned, self.i = pinned, i

    def attend(self, k: torch.Tensor, k_rot: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p, c, i = self.pinned, self.pinned.cache, self.i
        n = p.held * c.frame_tokens
        if c.version == p.version:
            out = c.layer(i).attend(k, k_rot, v)
            if p.copies is not None and i not in p.copies:
                p.copies[i] = (c.k_rot[i, :, :n].clone(), c.v[i, :, :n].clone())
            return out
        if p.copies is not None:
            held_k, held_v = p.copies[i]
            return torch.cat([held_k, k_rot], dim=1), torch.cat([held_v, v], dim=1)
        if c.slot_frame[:p.held] != p.slots:
            raise RuntimeError("the KV cache evicted or flushed frames between a checkpointed forward and its "
                               "backward; use a training window that holds the whole clip or turn off "
                               "gradient checkpointing")
        return torch.cat([c.k_rot[i, :, :n], k_rot], dim=1), torch.cat([c.v[i, :, :n], v], dim=1)

    def finish(self) -> None:
        """Nothing to write: the window went with the cache's own :class:`LayerKV` (original
        forward) or with this call's concatenation (recompute)."""

    def cross(self, make: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        return make()  # training forwards run under autograd: the text projections get gradients
