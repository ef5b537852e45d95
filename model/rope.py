"""3D rotary position embedding of Wan2.1, rotated by explicit positions.

A head of width ``d`` is split into a temporal part of ``d - 4*(d//6)`` channels and two spatial
parts (height, width) of ``2*(d//6)`` channels each (44/42/42 for d = 128). Within a part, channel
pair ``i`` rotates by ``position * theta ** (-2i / d_part)``; pairs are consecutive channels.

Positions are data: the temporal position of every frame is passed in, never taken from the
frame's index in a tensor. That is what lets the KV cache hand out absolute, block-relativistic
or cut positions (``model/kv_cache.py``), and there is no table with a 1024-position ceiling:
angles are computed from the positions asked for.

Angles are computed in float64 (a row per token, frame × grid), memoised per run of positions
as float32 (cos, sin) tables, and applied in float32. The rotation itself is one complex multiply per element
(:func:`rotate`, the fast path: one pass over the keys instead of the several of a real-valued
formulation); :func:`apply_rope` takes the (cos, sin) pair and gives the same result. The tables
:func:`rotate` takes are real, ``[L, 2, head_dim // 2, 2]``: ``[:, 0]`` the (cos, sin) pairs, a
complex64 table's layout, viewed as complex without a copy in eager code; ``[:, 1]`` the
(-sin, sin) pairs a compiled block multiplies the swapped pair by (:func:`_rotate_signed`), so
that its rotation is loads and multiply-adds only (inductor generates no code for complex
operators, and a sign selected inside the kernel made the fused norm + rotation + window
expression long enough for torch 2.11's inductor to write it out in float32: §23).
"""
from __future__ import annotations

from typing import Sequence

import torch

# (start, count) runs of consecutive temporal positions, one run per group of frames.
PositionRuns = Sequence[tuple[int, int]]


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Channels of the (t, h, w) parts of one head: 44, 42, 42 for a 128-wide head."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


class Rope:
    """Angle tables and rotation for one head width. Keeps a few recent tables on the device."""

    def __init__(self, head_dim: int, theta: float = 10000.0, memo_size: int = 32):
        if head_dim % 2 or head_dim < 6:
            raise ValueError(f"RoPE needs an even head dim >= 6, got {head_dim}")
        self.head_dim = head_dim
        self.split = rope_split(head_dim)
        self.theta = float(theta)
        self._inv_freq = [  # on the CPU even when the model is built under torch.device("meta")
            1.0 / self.theta ** (torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d) for d in self.split
        ]
        self._inv_on: dict = {}  # device → inverse frequencies there (copied once, not per table)
        self._memo: dict = {}
        self._memo_size = memo_size
        self.tables_built = 0  # tables computed (memo misses); a steady rollout stops adding to it

    def _inv(self, part: int, device) -> torch.Tensor:
        key = str(torch.device(device))
        if key not in self._inv_on:
            self._inv_on[key] = [f.to(device) for f in self._inv_freq]
        return self._inv_on[key][part]

    def table(self, t_positions: torch.Tensor, grid_h: int, grid_w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape ``[F * grid_h * grid_w, head_dim // 2]`` (float32) for tokens ordered
        frame-major then row then column, frame ``f`` at temporal position ``t_positions[f]``."""
        device = t_positions.device
        self.tables_built += 1
        t = t_positions.to(torch.float64)[:, None] * self._inv(0, device)[None]
        h = torch.arange(grid_h, device=device, dtype=torch.float64)[:, None] * self._inv(1, device)[None]
        w = torch.arange(grid_w, device=device, dtype=torch.float64)[:, None] * self._inv(2, device)[None]
        f = t.shape[0]
        angles = torch.cat(
            [
                t[:, None, None].expand(f, grid_h, grid_w, -1),
                h[None, :, None].expand(f, grid_h, grid_w, -1),
                w[None, None, :].expand(f, grid_h, grid_w, -1),
            ],
            dim=-1,
        ).reshape(f * grid_h * grid_w, -1)
        return torch.cos(angles).float(), torch.sin(angles).float()

    def freqs_for_runs(self, runs: PositionRuns, grid_h: int, grid_w: int, device) -> torch.Tensor:
        """Like :meth:`table` for frames whose temporal positions are the concatenated runs
        ``[(start, count), ...]``, as one table ``[L, 2, head_dim // 2, 2]`` (float32, see the
        module's docstring), the argument of :func:`rotate`. Built on the device from ``arange`` (no
        host-to-device copy, no synchronisation) and memoised: a rollout with relative positions
        reuses a handful of tables for its whole length."""
        key = (tuple((int(s), int(c)) for s, c in runs if c > 0), grid_h, grid_w, str(device))
        hit = self._memo.get(key)
        if hit is None:
            pos = torch.cat([torch.arange(s, s + c, device=device) for s, c in key[0]]) if key[0] else \
                torch.zeros(0, device=device, dtype=torch.long)
            hit = _with_signed_sines(*self.table(pos, grid_h, grid_w))
            self._remember(key, hit)
        return hit

    def table_for_runs(self, runs: PositionRuns, grid_h: int, grid_w: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`freqs_for_runs` as (cos, sin), each ``[L, head_dim // 2]`` (views of it)."""
        freqs = self.freqs_for_runs(runs, grid_h, grid_w, device)
        return cos_sin(freqs)

    def shift_freqs(self, delta: int, num_frames: int, grid_h: int, grid_w: int, device) -> torch.Tensor:
        """Table ``[num_frames * grid_h * grid_w, 2, head_dim // 2, 2]`` (the argument of
        :func:`rotate`) that turns keys already rotated at temporal position p to
        position p + ``delta``: the temporal channels by ``delta``, the spatial ones not at all
        (rotations compose). Memoised."""
        key = ("shift", int(delta), int(num_frames), grid_h, grid_w, str(device))
        hit = self._memo.get(key)
        if hit is None:
            self.tables_built += 1
            parts = [torch.full((self.split[0] // 2,), float(delta), dtype=torch.float64, device=device)
                     * self._inv(0, device), torch.zeros(sum(self.split[1:]) // 2, dtype=torch.float64, device=device)]
            angles = torch.cat(parts).expand(num_frames * grid_h * grid_w, -1)
            hit = _with_signed_sines(torch.cos(angles).float(), torch.sin(angles).float())
            self._remember(key, hit)
        return hit

    def _remember(self, key, value) -> None:
        if len(self._memo) >= self._memo_size:
            self._memo.pop(next(iter(self._memo)))
        self._memo[key] = value


def _with_signed_sines(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The table :func:`rotate` takes, from (cos, sin) ``[L, head_dim // 2]``: ``[L, 2, head_dim // 2, 2]``,
    the (cos, sin) pairs then the (-sin, sin) pairs (each part contiguous in its pairs)."""
    return torch.stack((torch.stack((cos, sin), dim=-1), torch.stack((-sin, sin), dim=-1)), dim=1)


def cos_sin(freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each ``[L, head_dim // 2]``, of a :func:`rotate` table (views)."""
    return freqs[:, 0, :, 0], freqs[:, 0, :, 1]


def rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, L, heads, head_dim]`` by a table ``freqs`` ``[L, 2, head_dim/2, 2]``
    (:meth:`Rope.freqs_for_runs`): channel pairs (2i, 2i+1) as the complex
    number x[2i] + j x[2i+1] times cos_i + j sin_i, in float32; the result has the dtype of ``x``.

    Eager: one complex multiply (bit-identical to :func:`_rotate_real`'s real formula on the CPU,
    and a single pass over ``x`` instead of several). Under ``torch.compile`` the real formula is
    used instead: the compiler fuses it into one kernel, and complex tensors are not its strong side."""
    if torch.compiler.is_compiling():
        return _rotate_signed(x, freqs[:, 0, :, :1], freqs[:, 1])
    xf = x.float()
    if xf.stride(-1) != 1 or xf.storage_offset() % 2 or any(st % 2 for st in xf.stride()[:-1]):
        xf = xf.contiguous()
    table = torch.view_as_complex(freqs[:, 0])  # a view: the (cos, sin) pairs are a complex64 table's layout
    out = torch.view_as_real(torch.view_as_complex(xf.unflatten(-1, (-1, 2))) * table[None, :, None, :])
    return out.flatten(-2).to(x.dtype)


def _rotate_signed(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """The rotation in real arithmetic: each pair (x1, x2) becomes (x1 c - x2 s, x2 c + x1 s),
    written as ``pairs * c + swapped * (-s, s)`` with ``swapped`` = (x2, x1); ``cos``
    ``[L, head_dim/2, 1]``, ``signed_sin`` ``[L, head_dim/2, 2]``. No concatenation of the
    rotated halves: a compiler writes the result straight into whatever consumes it (the
    attention's keys in the cache's dtype), where a stack of the two halves made inductor
    materialise it in float32 first (docs/PERFORMANCE.md §23). The same products and sums as the
    two-halves form, so the same values."""
    pairs = x.float().unflatten(-1, (-1, 2))
    return (pairs * cos[None, :, None] + pairs.flip(-1) * signed_sin[None, :, None]).flatten(-2).to(x.dtype)


def _rotate_real(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """:func:`_rotate_signed` from (cos, sin) tables ``[L, head_dim/2]``."""
    return _rotate_signed(x, cos[..., None], _with_signed_sines(cos, sin)[:, 1])


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape ``[B, L, heads, head_dim]`` by per-token tables ``[L, head_dim/2]``.

    Channel pairs (2i, 2i+1) are rotated as the complex number x[2i] + j x[2i+1] times
    exp(j angle_i), in float32; the result has the dtype of ``x``. (The same as
    :func:`rotate` with the table :func:`_with_signed_sines` makes of them.)"""
    if torch.compiler.is_compiling():
        return _rotate_real(x, cos, sin)
    return rotate(x, _with_signed_sines(cos, sin))
