"""Live action control: steer an endless video while it is generated.

A KV Flush or a RoPE Cut can happen at any block boundary, so the actions need not be written
before the first frame. :class:`LiveSession` is a steerable stream of decoded blocks::

    session = LiveSession(gen, "a red fox trots through a snowy forest", seed=0, output_folder="outputs")
    for block in session:                        # generated as you iterate; written to the mp4
        show(block.frames)                       # uint8 [n, H, W, 3]
        if block.index == 8:
            session.next_action("the fox pounces into the snow")          # KV Flush
        if block.index == 16:
            session.new_scene("a quiet harbour at sunrise", subtitle="the harbour")  # RoPE Cut
        if block.index == 24:
            session.stop()
    print(session.transcript)   # 'a red fox ...[6.5625s] | the fox ...[6s] | a quiet ...[6s#] ; | | the harbour'

``next_action`` / ``new_scene`` / ``stop`` may be called from any thread; each action lands on
the next block the rollout starts (one block at least per action, in the order submitted). The
session drives :meth:`VideoGenerator.render` (the rollout, cache, decoder and writer that batch
inference uses) with blocks it decides at the last moment, records the video as it goes, and
keeps a sidecar whose ``prompt`` is the session written in the prompt grammar, durations exact
to the block: ``inference.py --prompt "<that>" --seed S`` renders the same video frame for frame.

:class:`PlaybackClock` and :func:`paced` keep generation a bounded number of blocks ahead of
real-time playback (the web page and the terminal mode use them; a notebook may not need them).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from pipeline.generate import ABSOLUTE_TABLE_POSITIONS, VideoGenerator, output_name, recorded_paths, write_sidecar
from pipeline.grammar import Script, Segment, render
from pipeline.plan import CUT, FLUSH, START, blocks_for_frames, plan_script, video_frames_after
from pipeline.rollout import BlockSpec
from utils.errors import OutputError, UserError
from utils.video import VideoWriteError, VideoWriter

log = logging.getLogger(__name__)


class LiveError(UserError):
    """A steering request that cannot be carried out (empty text, session stopped, ...)."""


@dataclass(eq=False)
class Action:
    """One steering request. ``kind`` is ``start`` (the first action), ``flush`` (next action,
    same shot) or ``cut`` (new scene). ``block`` is the block it landed on (its segment's first
    block), None while it waits; ``submitted`` / ``landed`` are ``time.monotonic()`` stamps (when
    it was asked for, when its first block was ready)."""

    id: int
    kind: str
    text: str
    subtitle: str | None
    submitted: float
    warning: str | None = None
    block: int | None = None
    landed: float | None = None
    context: torch.Tensor | None = field(default=None, repr=False)  # set when it lands, dropped when its segment ends

    def to_json_dict(self, t0: float) -> dict:
        rel = lambda t: None if t is None else round(t - t0, 3)  # noqa: E731
        return {"id": self.id, "kind": self.kind, "text": self.text, "subtitle": self.subtitle,
                "block": self.block, "submitted_s": rel(self.submitted), "landed_s": rel(self.landed),
                "warning": self.warning}


@dataclass
class LiveBlock:
    """A block of a live session as written to its video. ``action`` is the action whose segment
    it belongs to; ``landed`` that action if it starts on this block (else None); ``seconds`` the
    wall time it took to generate, decode and write."""

    index: int
    frames: np.ndarray
    latents: torch.Tensor
    first_frame: int
    action: Action
    landed: Action | None
    seconds: float


class LiveSession:
    """A steerable stream of decoded blocks (module docstring). Iterate it once; it ends after
    :meth:`stop`. ``path`` (default: a new name in ``output_folder``) receives the mp4 and its
    sidecar ``.json``. Only one session at a time can use a :class:`VideoGenerator` (it owns one
    cache and one decoder)."""

    @property
    def encode_ahead(self) -> int:
        """Actions are encoded as they are sent while fewer than this wait: half the generator's
        kept texts, so that each is still kept when it lands. Later ones are encoded as they land."""
        return self.gen.TEXTS_KEPT // 2

    def __init__(self, generator: VideoGenerator, first_action: str, *, seed: int, subtitle: str | None = None,
                 output_folder: str | Path = "outputs", path: str | Path | None = None, index: int = 0,
                 checkpoint: str | None = None, image: str | Path | None = None):
        self.gen, self.cfg = generator, generator.cfg
        self.seed = int(seed)
        self.fps = float(self.cfg.fps)
        self.paths = recorded_paths(self.cfg, checkpoint, image)  # as the sidecar records them
        self.path = Path(path) if path is not None else output_name(Path(output_folder), index, first_action, seed)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pending: deque[Action] = deque()
        self._next_id = 0
        self.segments: list[Action] = []     # landed actions, one per segment, in order
        self.blocks_done = 0
        self.frames_written = 0
        self.complete = False
        self.error: str | None = None
        self.started = time.monotonic()
        self._started_iterating = False
        self._finished = threading.Event()
        self._warned_positions = False
        self._next_record = 0.0  # perf_counter time of the next per-block sidecar rewrite
        self._image_latent = None if image is None else generator.image_latent(image)
        self._pending.append(self._make_action(START, first_action, subtitle))

    # ------------------------------------------------------------------ steering (any thread)
    def next_action(self, text: str, subtitle: str | None = None) -> Action:
        """The next action, same shot (KV Flush), from the next block on."""
        return self._submit(FLUSH, text, subtitle)

    def new_scene(self, text: str, subtitle: str | None = None) -> Action:
        """A new scene (KV Flush + RoPE Cut), from the next block on."""
        return self._submit(CUT, text, subtitle)

    def stop(self) -> None:
        """End the session at the next block boundary (the block being generated is kept)."""
        self._stop.set()

    @property
    def stopping(self) -> threading.Event:
        """Set once :meth:`stop` was called (a waiter can watch it)."""
        return self._stop

    @property
    def finished(self) -> bool:
        """The video is closed and the sidecar final."""
        return self._finished.is_set()

    @property
    def pending(self) -> list[Action]:
        with self._lock:
            return list(self._pending)

    def _submit(self, kind: str, text: str, subtitle: str | None) -> Action:
        if self._stop.is_set() or self.finished:
            raise LiveError("the session has stopped; start a new one")
        action = self._make_action(kind, text, subtitle)  # encodes the prompt: outside the lock
        with self._lock:
            if self._stop.is_set():
                raise LiveError("the session has stopped; start a new one")
            self._pending.append(action)
        return action

    def _make_action(self, kind: str, text: str, subtitle: str | None) -> Action:
        text = " ".join(str(text).split())
        subtitle = " ".join(str(subtitle).split()) if subtitle is not None else ""
        if not text:
            raise LiveError("the action is empty; describe what should happen next, e.g. 'the fox jumps'")
        for what, value in (("action", text), ("subtitle", subtitle)):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:  # a lone surrogate: undecodable input, or a split emoji
                raise LiveError(f"the {what} has a character that is not valid text (at character {exc.start + 1}); "
                                f"type it again in UTF-8") from None
        encoder = self.gen.m.text_encoder
        tokens, limit = encoder.count_tokens(text), encoder.text_len
        warning = None
        if tokens > limit:
            warning = (f"the action has {tokens} tokens; the text encoder reads the first {limit}, "
                       f"the rest is ignored")
            log.warning("%s", warning)
        with self._lock:
            self._next_id += 1
            action_id = self._next_id
            queued = len(self._pending)
        # Encoded now, while it waits, if it will still be among the generator's kept texts when it
        # lands (a copy to the device then); a long queue (a script piped in at once) is encoded as
        # each action lands instead: what waits holds text only, however many actions are queued.
        if queued < self.encode_ahead:
            self.gen.keep_text(text)
        return Action(action_id, kind, text, subtitle or None, time.monotonic(), warning)

    # ------------------------------------------------------------------- the rollout's source
    def _blocks(self) -> Iterator[BlockSpec]:
        """What the rollout generates next, decided when it asks: the oldest waiting action
        (with its event), else more of the current one. Ends once :meth:`stop` was called."""
        index = 0
        while not self._stop.is_set():
            with self._lock:
                action = self._pending[0] if self._pending else None
            # its embedding, outside the lock (kept since it was sent, or encoded now); only this loop
            # takes actions off the queue, so the head is still this action afterwards
            context = None if action is None else self.gen.encode_text(action.text)
            with self._lock:
                if action is not None:
                    self._pending.popleft()
                    action.block, action.context = index, context
                    if self.segments:
                        self.segments[-1].context = None  # that segment is over: free its embedding
                    self.segments.append(action)
            current = self.segments[-1]
            yield BlockSpec(None if action is None else action.kind, current.context, len(self.segments) - 1)
            index += 1

    @property
    def subtitles(self) -> "_Subtitles":
        return _Subtitles(self.segments)

    def __iter__(self) -> Iterator[LiveBlock]:
        if self._started_iterating:
            raise RuntimeError("a LiveSession can be iterated only once")
        self._started_iterating = True
        if not self.gen.lock.acquire(blocking=False):
            raise LiveError("another session is using this generator; stop it first")
        width, height = int(self.cfg.width), int(self.cfg.height)
        writer = None
        try:
            # a recording: under its final name from the first frame, kept however the session ends;
            # written in line (no writer thread), so the sidecar never counts a frame not yet piped
            with VideoWriter(self.path, fps=self.fps, width=width, height=height, recording=True) as writer:
                t = time.perf_counter()
                for block in self.gen.render(self._blocks(), writer, seed=self.seed, subtitles=self.subtitles,
                                             image_latent=self._image_latent):
                    now = time.perf_counter()
                    action = self.segments[block.spec.segment]
                    landed = action if action.block == block.index else None
                    if landed is not None:
                        landed.landed = time.monotonic()
                    self.blocks_done = block.index + 1
                    self.frames_written = block.first_frame + len(block.frames)
                    self._check_positions()
                    self._write_record_in_step()
                    yield LiveBlock(block.index, block.frames.numpy(), block.latents, block.first_frame, action,
                                    landed, now - t)
                    t = time.perf_counter()
            self.complete = True
        except VideoWriteError as exc:  # disk full & co: the frames ffmpeg finished are kept
            self.frames_written, self.error = exc.frames_kept, str(exc)
            raise
        finally:
            if writer is not None and self.error is None and writer.frames_written > self.frames_written:
                # Ctrl-C or SIGTERM arrived while a block's frames were piped: the writer held it until
                # they were all sent, so that block is in the video, though it never reached the loop
                self.frames_written = writer.frames_written
                self.blocks_done = blocks_for_frames(
                    self.frames_written, int(self.cfg.num_frame_per_block), self.gen.m.vae.temporal_factor,
                    int(self._image_latent is not None))
            with self._lock:
                dropped, self._pending = list(self._pending), deque()
            self._stop.set()
            for action in dropped:
                log.warning("action %r was not generated: the session stopped first", action.text)
            for action in self.segments:
                action.context = None
            try:
                if self.path.exists():
                    self._write_record()
            except OutputError as exc:
                log.error("%s", exc)
            except Exception as exc:  # noqa: BLE001 - the generator must be freed whatever happens
                log.error("cannot write the record of %s: %s: %s", self.path, type(exc).__name__, exc)
            finally:
                self._finished.set()
                self.gen.lock.release()

    # --------------------------------------------------------------------------- the record
    @property
    def transcript(self) -> str:
        """The session so far as a prompt of the grammar: one segment per action, durations
        exact to the block, ``#`` on new scenes, subtitles after ``;``. Empty before the
        first block."""
        return render(self._script())

    def _script(self) -> Script:
        """The transcript as the grammar parses it (:func:`transcript_script`)."""
        done = [a for a in self.segments if a.block is not None and a.block < self.blocks_done]
        return transcript_script([(a.text, a.subtitle, a.kind == CUT, a.block) for a in done], self.blocks_done,
                                 fps=self.fps, frames_per_block=int(self.cfg.num_frame_per_block),
                                 temporal_factor=self.gen.m.vae.temporal_factor,
                                 lead_frames=int(self._image_latent is not None))

    def record(self) -> dict:
        """The sidecar: what any render records, with the transcript as its prompt, and the
        actions with the blocks they landed on. The plan is the transcript's, planned from the
        segments it was rendered from (what parsing it gives back), not parsed again: a record
        is written after every block, and parsing a long session's prompt costs more than a
        block's time."""
        script = self._script()
        plan = plan_script(script, self.cfg, self.gen.m.vae.temporal_factor,
                           self._image_latent is not None).to_json_dict() if script.segments else None
        return {"prompt": render(script), "seed": self.seed, **self.paths,
                "plan": plan, "config": {**OmegaConf.to_container(self.cfg, resolve=True), "seed": self.seed},
                "video": self.path.name,
                "frames_written": self.frames_written, "complete": self.complete, "error": self.error,
                "live": {"blocks": self.blocks_done,
                         "actions": [a.to_json_dict(self.started) for a in self.segments]}}

    def _write_record(self) -> None:
        write_sidecar(self.path, self.record())

    RECORD_SHARE = 0.02  # at most this share of the session's time goes to rewriting its sidecar

    def _write_record_in_step(self) -> None:
        """The sidecar rewritten as the session goes, so that a killed process leaves one that
        matches its video up to a block or so: after every block while that is quick, and once
        a long session's record (one segment per action) takes longer to write, no more often
        than keeps it to :attr:`RECORD_SHARE` of the time."""
        start = time.perf_counter()
        if start < self._next_record:
            return
        self._write_record()
        self._next_record = start + (time.perf_counter() - start) / self.RECORD_SHARE

    def _check_positions(self) -> None:
        """Absolute positions grow with the session: warn once when they pass the trained range."""
        latent_frames = self.blocks_done * int(self.cfg.num_frame_per_block) + (self._image_latent is not None)
        if not self._warned_positions and latent_frames > ABSOLUTE_TABLE_POSITIONS:
            self._warned_positions = True
            self.gen.warn_absolute_positions(latent_frames)


def transcript_script(segments: Sequence[tuple[str, str | None, bool, int]], blocks: int, *, fps: float,
                      frames_per_block: int, temporal_factor: int, lead_frames: int = 0) -> Script:
    """A script whose plan is exactly these segments: ``(text, subtitle, cut, first block)`` in
    order (the first at block 0), ``blocks`` blocks in all. Each duration is its segment's video
    frames / fps, so every boundary is the block boundary nearest the cumulative time and the
    total is exactly the frames generated (:mod:`pipeline.plan`). Rendered
    (:func:`~pipeline.grammar.render`), it is the session's transcript, which parses back to it."""
    ends = [first for _, _, _, first in segments[1:]] + [blocks]
    frames = lambda b: video_frames_after(b, frames_per_block, temporal_factor, lead_frames)  # noqa: E731
    return Script(tuple(Segment(text, (frames(end) - (0 if k == 0 else frames(first))) / fps, cut and k > 0, subtitle)
                        for k, ((text, subtitle, cut, first), end) in enumerate(zip(segments, ends))))


class _Subtitles:
    """``subtitles[segment]`` over a session's growing list of segments (no copy per block)."""

    def __init__(self, segments: list[Action]):
        self._segments = segments

    def __getitem__(self, segment: int) -> str | None:
        return self._segments[segment].subtitle


# ------------------------------------------------------------------------------- playback pacing


class PlaybackClock:
    """Where real-time playback of a live stream is, in video frames. It advances at ``fps``
    while frames are waiting to be shown and it is not paused; it stalls when generation falls
    behind (as a player does when its buffer runs dry). Thread-safe."""

    def __init__(self, fps: float, now: Callable[[], float] = time.monotonic):
        self.fps = float(fps)
        self._now = now
        self._cond = threading.Condition()
        self.generated = 0        # frames handed to playback
        self._played = 0.0
        self._t: float | None = None
        self.paused = False

    def _advance(self) -> None:
        now = self._now()
        if self._t is not None and not self.paused:
            self._played = min(float(self.generated), self._played + (now - self._t) * self.fps)
        self._t = now

    def add(self, frames: int) -> None:
        """``frames`` more frames are ready to play (playback starts with the first)."""
        with self._cond:
            self._advance()
            self.generated += int(frames)
            self._cond.notify_all()

    @property
    def played(self) -> float:
        with self._cond:
            self._advance()
            return self._played

    @property
    def buffered(self) -> float:
        """Frames generated but not yet played."""
        with self._cond:
            self._advance()
            return self.generated - self._played

    def pause(self) -> None:
        with self._cond:
            self._advance()
            self.paused = True
            self._cond.notify_all()

    def resume(self) -> None:
        with self._cond:
            self._advance()
            self.paused = False
            self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    STOP_POLL_S = 0.1  # how soon a waiter notices ``stop``, paused or not

    def wait_for_room(self, max_buffered: float, stop: threading.Event) -> None:
        """Block while ``max_buffered`` frames or more wait to be played (or while paused),
        until ``stop`` is set: noticed within :attr:`STOP_POLL_S` (nobody has to wake the
        clock), at once after :meth:`wake`."""
        with self._cond:
            while not stop.is_set():
                self._advance()
                excess = self.generated - self._played - max_buffered
                if not self.paused and excess < 0:
                    return
                self._cond.wait(self.STOP_POLL_S if self.paused else min(self.STOP_POLL_S, excess / self.fps + 1e-3))


def paced(session: LiveSession, clock: PlaybackClock, ahead_blocks: int) -> Iterator[LiveBlock]:
    """Iterate ``session`` no faster than real-time playback: a block is started only while fewer
    than ``ahead_blocks`` blocks' worth of frames wait to be played, so an action lands at most
    about ``ahead_blocks + 1`` blocks after it is submitted."""
    cfg = session.cfg
    block_video_frames = session.gen.m.vae.temporal_factor * int(cfg.num_frame_per_block)
    for block in session:
        clock.add(len(block.frames))
        yield block
        clock.wait_for_room(ahead_blocks * block_video_frames, session.stopping)
