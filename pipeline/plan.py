"""Script → Plan: requested seconds → latent blocks → exact video frames, and the event before
each block. Pure arithmetic (no model), so ``inference.py --dry_run`` can print it anywhere.

Geometry. The VAE decodes L latent frames into ``1 + temporal_factor·(L − 1)`` video frames, so
the first block of ``frames_per_block`` latent frames yields ``1 + tf·(fpb − 1)`` video frames
(9 for 3 and 4) and every later block ``tf·fpb`` (12). :func:`video_frames_after` gives the
video frames after n blocks; block i covers ``[video_frames_after(i), video_frames_after(i+1))``.

Rules.
- ``total_frames = round(total requested seconds × fps)`` (at least 1), and the video has the
  fewest blocks whose frames cover it; the frames the last block makes beyond it are trimmed.
- Segment k ends at the block boundary nearest its cumulative requested end time (ties go to
  the earlier boundary), keeping at least one block for itself and for each later segment;
  the last segment ends at the last block and at ``total_frames``.
- A segment's frame range runs from the first video frame of its first block to the end of
  its last block: the ranges are contiguous and cover ``[0, total_frames)``.
- Events before a segment's first block: ``start`` (block 0), ``flush`` (every ``|``), ``cut``
  (a segment carrying ``#``: the rollout flushes, then shifts the RoPE positions). Other blocks
  have no event (None).
- A segment whose planned length differs from its request by more than half a block is
  reported in :attr:`Plan.warnings` and logged.
- Shorter than a block: every segment gets at least one block. When the prompt has more
  segments than the fewest covering blocks (say ``a[0.1s] | b[0.1s]``), each segment still gets
  one block and ``total_frames`` grows to every frame of those blocks, so no segment has an
  empty frame range; the longer video is reported.
"""
from __future__ import annotations

import bisect
import logging
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

from pipeline.grammar import Script, parse
from utils.errors import ConfigError, PromptError, UserError

logger = logging.getLogger(__name__)

START, FLUSH, CUT = "start", "flush", "cut"


def video_frames_after(num_blocks: int, frames_per_block: int, temporal_factor: int,
                       lead_frames: int = 0) -> int:
    """Video frames decoded from ``lead_frames`` given latent frames (1 for an image start)
    followed by the first ``num_blocks`` latent blocks (nothing at all → 0 frames)."""
    latents = lead_frames + frames_per_block * max(num_blocks, 0)
    if latents <= 0:
        return 0
    return 1 + temporal_factor * (latents - 1)


def blocks_for_frames(frames: int, frames_per_block: int, temporal_factor: int,
                      lead_frames: int = 0) -> int:
    """The fewest blocks whose video frames cover ``frames``."""
    if frames <= video_frames_after(0, frames_per_block, temporal_factor, lead_frames):
        return 0
    first = video_frames_after(1, frames_per_block, temporal_factor, lead_frames)
    later = temporal_factor * frames_per_block
    return 1 + max(0, -(-(frames - first) // later))


class PerBlock(Sequence):
    """A read-only per-block column of a plan, stored per segment so that the plan of a very long
    video stays small. It indexes, slices (to a tuple), iterates and compares equal to the tuple
    it stands for: block i gets ``on_first[k]`` if it is segment k's first block, otherwise
    ``elsewhere[k]``."""

    def __init__(self, first_blocks: tuple[int, ...], total: int, on_first: tuple,
                 elsewhere: tuple):
        self._key = (tuple(first_blocks), total, tuple(on_first), tuple(elsewhere))

    def __len__(self) -> int:
        return self._key[1]

    def __getitem__(self, index):
        starts, total, on_first, elsewhere = self._key
        if isinstance(index, slice):
            return tuple(self[i] for i in range(*index.indices(total)))
        i = operator.index(index)
        i = i + total if i < 0 else i
        if not 0 <= i < total:
            raise IndexError(f"block {index} out of range for a plan of {total} blocks")
        k = bisect.bisect_right(starts, i) - 1
        return on_first[k] if i == starts[k] else elsewhere[k]

    def __eq__(self, other):
        if isinstance(other, PerBlock):
            return self._key == other._key
        if isinstance(other, (tuple, list)):
            return len(other) == len(self) and all(map(operator.eq, self, other))
        return NotImplemented

    def __hash__(self):
        return hash(self._key)

    def __repr__(self) -> str:
        shown = ", ".join(repr(v) for v in self[:8])
        return f"PerBlock([{shown}{', ...' if len(self) > 8 else ''}], len={len(self)})"


@dataclass(frozen=True)
class PlannedSegment:
    text: str
    subtitle: str | None
    requested_seconds: float
    actual_seconds: float       # (frames[1] - frames[0]) / fps
    first_block: int
    num_blocks: int
    event: str                  # what happens before first_block: start | flush | cut
    frames: tuple[int, int]     # video frames [first, end)


@dataclass(frozen=True)
class Plan:
    fps: float
    frames_per_block: int       # latent frames per block
    total_blocks: int
    total_frames: int           # video frames written
    segments: tuple[PlannedSegment, ...]
    block_segment: PerBlock     # segment index of each block
    block_events: PerBlock      # event before each block: start | flush | cut | None
    temporal_factor: int        # video frames per latent frame (the VAE's)
    warnings: tuple[str, ...] = ()
    lead_frames: int = 0        # latent frames given before the first block (1: image start)

    def frames_after(self, num_blocks: int) -> int:
        """Video frames decoded from the lead frames and the first ``num_blocks`` blocks (before
        trimming)."""
        return video_frames_after(num_blocks, self.frames_per_block, self.temporal_factor, self.lead_frames)

    def block_frames(self, block: int) -> tuple[int, int]:
        """Video frames ``[first, end)`` of ``block`` that are written (the last one trimmed;
        block 0 includes the lead frames' video)."""
        return (0 if block == 0 else min(self.frames_after(block), self.total_frames),
                min(self.frames_after(block + 1), self.total_frames))

    def segment_of_frame(self, frame: int) -> int:
        """Index of the segment that shows video frame ``frame``."""
        if not 0 <= frame < self.total_frames:
            raise IndexError(f"frame {frame} out of range for a plan of {self.total_frames} frames")
        return bisect.bisect_right([s.frames[0] for s in self.segments], frame) - 1

    def to_json_dict(self) -> dict:
        return {
            "fps": self.fps,
            "frames_per_block": self.frames_per_block,
            "total_blocks": self.total_blocks,
            "total_frames": self.total_frames,
            "segments": [
                {"text": s.text, "subtitle": s.subtitle,
                 "requested_seconds": s.requested_seconds, "actual_seconds": s.actual_seconds,
                 "first_block": s.first_block, "num_blocks": s.num_blocks, "event": s.event,
                 "frames": [s.frames[0], s.frames[1]]}
                for s in self.segments
            ],
        }


def _nearest_boundary(target: float, lo: int, hi: int, fpb: int, tf: int, lead: int) -> int:
    """The block count in ``[lo, hi]`` whose video-frame boundary is nearest ``target`` frames."""
    guess = math.floor((target - 1 + tf - tf * lead) / (tf * fpb))  # solves video_frames_after(b) = target
    candidates = {min(max(b, lo), hi) for b in (guess, guess + 1)}
    return min(candidates, key=lambda b: (abs(video_frames_after(b, fpb, tf, lead) - target), b))


def make_plan(script: Script, fps: float, frames_per_block: int,
              temporal_factor: int, lead_frames: int = 0) -> Plan:
    """Plan ``script`` at ``fps`` with blocks of ``frames_per_block`` latent frames (module
    docstring has the rules). ``lead_frames`` latent frames (an image start: 1) come before the
    first block and count towards the first segment."""
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise ConfigError(f"fps must be a positive number, got {fps!r}")
    for name, value in (("num_frame_per_block", frames_per_block),
                        ("VAE temporal factor", temporal_factor)):
        if not (isinstance(value, int) and value >= 1):
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if not script.segments:
        raise ValueError("a Script needs at least one segment")
    fpb, tf = frames_per_block, temporal_factor
    num = len(script.segments)

    cumulative = list(accumulate(s.seconds for s in script.segments))
    if not math.isfinite(cumulative[-1] * fps):
        raise PromptError(f"the prompt asks for {cumulative[-1]:.3g} s of video, too long to plan; "
                          "shorten the durations", position=0, segment=None)
    total_frames = max(1, round(cumulative[-1] * fps))
    lead = lead_frames
    covering = blocks_for_frames(total_frames, fpb, tf, lead)
    total_blocks = max(covering, num)
    warnings = []
    if total_blocks > covering:  # more segments than blocks
        requested, total_frames = total_frames, video_frames_after(total_blocks, fpb, tf, lead)
        warnings.append(f"{num} segment(s) need a block each: the video is {total_frames} frames "
                        f"({total_frames / fps:g} s), not the requested {requested} ({requested / fps:g} s); "
                        f"a block is {tf * fpb / fps:g} s, so make the segments at least that long")
        logger.warning("%s", warnings[-1])

    end_blocks, previous = [], 0
    for k, seconds in enumerate(cumulative):
        if k == num - 1:
            end = total_blocks
        else:
            end = _nearest_boundary(seconds * fps, previous + 1, total_blocks - (num - 1 - k),
                                    fpb, tf, lead)
        end_blocks.append(end)
        previous = end

    half_block = tf * fpb / fps / 2
    segments, first = [], 0
    for k, (seg, end) in enumerate(zip(script.segments, end_blocks)):
        frames = (0 if k == 0 else video_frames_after(first, fpb, tf, lead),
                  total_frames if k == num - 1 else min(video_frames_after(end, fpb, tf, lead),
                                                        total_frames))
        actual = (frames[1] - frames[0]) / fps
        event = START if k == 0 else CUT if seg.cut else FLUSH
        segments.append(PlannedSegment(seg.text, seg.subtitle, seg.seconds, actual, first,
                                       end - first, event, frames))
        if abs(actual - seg.seconds) > half_block + 1e-9:
            warnings.append(f"segment {k + 1} ('{seg.text[:40]}'): requested {seg.seconds:g} s, "
                            f"planned {actual:g} s (frames {frames[0]}-{frames[1]}); blocks are "
                            f"{2 * half_block:g} s, so durations snap to block boundaries")
            logger.warning("%s", warnings[-1])
        first = end

    starts = tuple(s.first_block for s in segments)
    return Plan(
        fps=fps, frames_per_block=fpb, total_blocks=total_blocks, total_frames=total_frames,
        segments=tuple(segments),
        block_segment=PerBlock(starts, total_blocks, tuple(range(num)), tuple(range(num))),
        block_events=PerBlock(starts, total_blocks, tuple(s.event for s in segments),
                              (None,) * num),
        temporal_factor=tf, warnings=tuple(warnings), lead_frames=lead)


def plan_prompt(prompt: str, cfg, temporal_factor: int, image_start: bool = False) -> Plan:
    """Parse and plan one prompt with the timing keys of a config."""
    return plan_script(parse(prompt, float(cfg.default_segment_seconds)), cfg, temporal_factor, image_start)


def plan_script(script: Script, cfg, temporal_factor: int, image_start: bool = False) -> Plan:
    """Plan a parsed prompt with the timing keys of a config."""
    return make_plan(script, fps=cfg.fps, frames_per_block=int(cfg.num_frame_per_block),
                     temporal_factor=temporal_factor, lead_frames=1 if image_start else 0)


def check_prompts(prompts: list[str], cfg, temporal_factor: int, image_start: bool = False,
                  where: Sequence[str] | None = None) -> list[Plan]:
    """Parse and plan every prompt before any model loads; the first bad one is the error. Its
    message starts with ``where[i]`` (``prompts.txt line 6``) when given, else ``prompt i`` (1-based)
    when there are several."""
    plans = []
    for i, prompt in enumerate(prompts):
        try:
            plans.append(plan_prompt(prompt, cfg, temporal_factor, image_start))
        except UserError as exc:
            prefix = f"{where[i]}: " if where is not None else f"prompt {i + 1}: " if len(prompts) > 1 else ""
            raise type(exc)(f"{prefix}{exc}") from exc
    return plans
