"""Video output: an mp4 written frame by frame, subtitles burned into frames, and a probe.

``VideoWriter`` pipes frames into ffmpeg (the binary bundled with imageio-ffmpeg) as they are
produced, so memory does not grow with the video's length. H.264, yuv420p, the configured fps.

What is left on disk:

- normal end: the finished file, under the final name (written as ``.<name>.partial.mp4`` in the
  same folder, then renamed atomically);
- interruption (Ctrl-C, or SIGTERM inside :func:`sigterm_as_interrupt`): ffmpeg is closed
  properly, so the file plays and holds every frame written so far, under the final name;
- any other error: nothing (the partial file is deleted); zero frames written: nothing;
- ffmpeg failing to write (disk full, quota, file-size limit): :class:`VideoWriteError`, and the
  frames it had finished stay under the final name. The file is a fragmented MP4 (a fragment
  per second), so a file cut short still plays up to its last complete fragment. A failure
  while ffmpeg finishes the file at close, whose exit status imageio-ffmpeg does not report, is
  caught too: a closed file must hold every frame sent, in whole fragments (its box headers say).

A *recording* (``VideoWriter(..., recording=True)``, what a live session uses) is written under
its final name from the first frame and kept however the writing ends, an error included: a
live session cannot be rendered again, so nothing it generated is thrown away.

A SIGINT/SIGTERM that arrives while a frame is being piped to ffmpeg is held until the frame is
complete (imageio-ffmpeg kills ffmpeg when an interrupt lands inside its generator, which would
leave an mp4 without its index). A SIGKILL of the Python process closes ffmpeg's input, and ffmpeg
then finishes the file with every frame it received: a playable file, under the hidden
``.partial`` name (under the final name for a recording). Only a power cut can leave a broken file.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import queue
import shutil
import signal
import threading
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from utils.errors import OutputError, UserError, first_line
from utils.fs import MIN_FREE_BYTES, reason

log = logging.getLogger(__name__)

FONT_PATH = Path(__file__).resolve().parent / "fonts" / "DejaVuSans-Bold.ttf"


class VideoSizeError(UserError, ValueError):
    """A frame size the encoder cannot take (yuv420p needs even width and height)."""


class VideoWriteError(OutputError):
    """Writing the video failed part-way (disk full, quota, file-size limit, ffmpeg gone). The
    frames ffmpeg finished stay a playable file under the final name: ``frames_kept`` of them."""

    def __init__(self, message: str, frames_kept: int):
        super().__init__(message)
        self.frames_kept = frames_kept


class Terminated(KeyboardInterrupt):
    """SIGTERM turned into an interruption by :func:`sigterm_as_interrupt`. It subclasses
    KeyboardInterrupt, so ``with VideoWriter(...)`` closes the file the same way as on Ctrl-C."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(f"received {signal.Signals(signum).name}")
        self.signum = signum


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _restore_handler(signum: int, handler) -> None:
    signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While active, SIGTERM raises :class:`Terminated` (a KeyboardInterrupt) in the main thread,
    so writers close cleanly. The previous handler is restored on exit. No-op off the main thread
    (Python only lets the main thread set signal handlers)."""
    if not _in_main_thread():
        log.debug("sigterm_as_interrupt: not in the main thread, SIGTERM handling unchanged")
        yield
        return

    def handler(signum, frame):
        raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        _restore_handler(signal.SIGTERM, previous)


@contextlib.contextmanager
def _signals_held(redeliver: bool = True):
    """Hold SIGINT/SIGTERM until the block ends, then deliver the first one that arrived to the
    handler that was in place before (so Ctrl-C still raises KeyboardInterrupt, just later).
    A signal held while the block raised, or with ``redeliver=False``, is logged and dropped."""
    if not _in_main_thread():
        yield
        return
    pending: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            _restore_handler(s, handler)
    if pending and redeliver:
        signal.raise_signal(pending[0])
    elif pending:
        log.warning("ignored %s while closing the video", signal.Signals(pending[0]).name)


def _uint8_frames(frames: torch.Tensor) -> torch.Tensor:
    """Float frames ``[T, 3, H, W]`` (or ``[3, H, W]``) in [-1, 1] → uint8 ``[T, H, W, 3]`` on
    their device: ``(x + 1) / 2 * 255``, rounded and clamped."""
    if not frames.is_floating_point():
        raise TypeError(f"tensor frames must be floating point in [-1, 1], got {frames.dtype}")
    x = frames.detach()
    x = x[None] if x.ndim == 3 else x
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"tensor frames must be [T, 3, H, W], got {list(frames.shape)}")
    return ((x.float() + 1) / 2 * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


class PendingFrames:
    """A block's frames on their way into the video, so that the host work runs off the
    generation's critical path.

    Made from the decoder's float frames ``[T, 3, H, W]``: on a GPU the uint8 conversion and the
    copy into pinned host memory are queued (no waiting; a CUDA event marks their end). What is
    left is host work: (on a CPU the uint8 conversion,) put ``lead`` frames first, keep the first
    ``stop`` frames, apply ``finish`` (the subtitle). :meth:`numpy` waits for the copy, does that once and
    returns uint8 ``[n, H, W, 3]``; a background :class:`VideoWriter` calls it in its thread while
    the next block is generated. ``len()`` and ``shape`` are known at once."""

    def __init__(self, frames: torch.Tensor, *, lead: np.ndarray | None = None, stop: int | None = None,
                 finish=None):
        self._float = self._host = self._ready = None
        frames = frames[None] if frames.ndim == 3 else frames
        if frames.is_cuda:
            u8 = _uint8_frames(frames)
            self._host = torch.empty(u8.shape, dtype=torch.uint8, pin_memory=True)
            self._host.copy_(u8, non_blocking=True)
            self._ready = torch.cuda.Event(blocking=True)  # a waiting thread sleeps instead of spinning a core
            self._ready.record()
        else:  # on a CPU the conversion itself is host work: it runs in numpy() too
            _uint8_frames(frames[:0])  # checks dtype and shape now
            self._float = frames.detach()
        t, _, h, w = frames.shape
        n = t + (len(lead) if lead is not None else 0)
        self.shape = (n if stop is None else max(0, min(n, stop)), h, w, 3)
        self._lead, self._stop, self._finish = lead, stop, finish
        self._array: np.ndarray | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:  # np.asarray(pending) works as for an array
        arr = self.numpy()
        return arr.astype(dtype) if dtype is not None else (arr.copy() if copy else arr)

    def numpy(self) -> np.ndarray:
        with self._lock:
            if self._array is None:
                if self._ready is not None:
                    self._ready.synchronize()
                host = self._host if self._float is None else _uint8_frames(self._float).contiguous()
                arr = host.numpy()
                if self._lead is not None:
                    arr = np.concatenate([self._lead, arr])
                arr = np.ascontiguousarray(arr[:self.shape[0]])
                self._array = self._finish(arr) if self._finish is not None else arr
                self._host = self._float = self._lead = None
            return self._array


def frames_to_uint8(frames) -> np.ndarray:
    """Frames as uint8 ``[T, H, W, 3]`` (C-contiguous numpy).

    Accepts a float torch tensor ``[T, 3, H, W]`` (or ``[3, H, W]``) in [-1, 1] — the VAE's
    output range: ``(x + 1) / 2 * 255``, rounded and clamped — a :class:`PendingFrames`, or a
    uint8 numpy array ``[T, H, W, 3]`` (or ``[H, W, 3]``), returned as is."""
    if isinstance(frames, torch.Tensor):
        arr = PendingFrames(frames).numpy()
    elif isinstance(frames, PendingFrames):
        arr = frames.numpy()
    elif isinstance(frames, np.ndarray):
        if frames.dtype != np.uint8:
            raise TypeError(f"numpy frames must be uint8 [T, H, W, 3], got {frames.dtype}")
        arr = frames[None] if frames.ndim == 3 else frames
    else:
        raise TypeError(f"frames must be a torch tensor or a numpy array, got {type(frames).__name__}")
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got {list(arr.shape)}")
    return np.ascontiguousarray(arr)


class VideoWriter:
    """Append frames to an H.264/yuv420p mp4 as they come::

        with sigterm_as_interrupt(), VideoWriter(path, fps, width, height) as writer:
            for frames in blocks:
                writer.write(frames)      # uint8 [T, H, W, 3] or float tensor [T, 3, H, W]

    ``crf`` is x264's constant-quality factor (0 lossless, 18 visually near-lossless, 51 worst).
    ``background=True`` pipes the frames to ffmpeg from a thread, so the caller goes on at once
    (at most ``queue_writes`` writes wait; an error shows up at a later write or at close).
    Use as a context manager (or call :meth:`close` / :meth:`abort`); see the module docstring
    for what each way of ending leaves on disk."""

    def __init__(self, path, fps: float, width: int, height: int, crf: int = 18,
                 preset: str = "medium", recording: bool = False, background: bool = False,
                 queue_writes: int = 2):
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise VideoSizeError(
                f"video size {width}x{height} cannot be encoded: H.264 with yuv420p needs a "
                f"positive, even width and height (e.g. {width + width % 2}x{height + height % 2})")
        if not fps > 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.path = Path(path)
        self.recording = bool(recording)
        self.partial_path = self.path if recording else partial_name(self.path)
        self.fps, self.width, self.height = float(fps), int(width), int(height)
        self.crf, self.preset = int(crf), preset
        self.frames_written = 0  # frames handed to ffmpeg
        self._encoder = None  # imageio-ffmpeg's generator; started on the first frame
        self._closed = False
        # background=True: a sender thread pipes frames to ffmpeg while the caller goes on (the
        # next block is generated meanwhile); at most `queue_writes` writes wait, so memory is bounded.
        self._queue: queue.Queue | None = queue.Queue(maxsize=queue_writes) if background else None
        self._sender: threading.Thread | None = None
        self._send_error: OSError | None = None

    def _start_encoder(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        encoder = imageio_ffmpeg.write_frames(
            str(self.partial_path), (self.width, self.height), pix_fmt_in="rgb24",
            pix_fmt_out="yuv420p", fps=self.fps, codec="libx264",
            quality=None,  # imageio's 0-10 scale would add its own -crf; ours is below
            macro_block_size=1,  # sizes are validated even; never let imageio rescale
            ffmpeg_log_level="error",
            # Fragmented MP4 (a fragment per second): a file cut short by a full disk, a quota or
            # a killed ffmpeg still plays up to its last complete fragment.
            output_params=["-crf", str(self.crf), "-preset", self.preset,
                           "-movflags", "+frag_keyframe+empty_moov+default_base_moof",
                           "-frag_duration", str(FRAGMENT_MICROSECONDS)])
        encoder.send(None)  # starts ffmpeg
        log.debug("ffmpeg (%s) encoding to %s", imageio_ffmpeg.get_ffmpeg_exe(), self.partial_path)
        return encoder

    def write(self, frames) -> None:
        """Append frames: uint8 numpy ``[T, H, W, 3]``, float tensor ``[T, 3, H, W]`` in [-1, 1],
        or :class:`PendingFrames` (finished in the sender thread when ``background``)."""
        if self._closed:
            raise RuntimeError(f"VideoWriter for {self.path} is already closed")
        arr = frames if isinstance(frames, PendingFrames) and self._queue is not None else frames_to_uint8(frames)
        if arr.shape[1:3] != (self.height, self.width):
            raise ValueError(f"frames are {arr.shape[2]}x{arr.shape[1]}, "
                             f"the video is {self.width}x{self.height}")
        if self._queue is None:
            with _signals_held():
                try:
                    self._send(arr)
                except OSError as exc:  # ffmpeg stopped taking frames: it could not write the file
                    raise self._salvage(exc) from None
            return
        if self._send_error is not None:
            raise self._salvage(self._stop_sender()) from None
        if self._sender is None:
            self._sender = threading.Thread(target=self._send_loop, name="video-writer", daemon=True)
            self._sender.start()
        self._queue.put(arr)  # waits while the queue is full

    def _send(self, arr: np.ndarray | PendingFrames) -> None:
        if isinstance(arr, PendingFrames):  # the sender thread finishes it (copy, subtitle)
            arr = arr.numpy()
        if self._encoder is None:
            self._encoder = self._start_encoder()
        for frame in arr:
            self._encoder.send(frame)
            self.frames_written += 1

    def _send_loop(self) -> None:
        while (arr := self._queue.get()) is not None:
            if self._send_error is None:  # after a failure keep draining, so no put() waits forever
                try:
                    self._send(arr)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                    self._send_error = exc

    def _stop_sender(self) -> OSError | None:
        """Let the sender pipe what is queued, stop it; its write error, if it had one (any other
        error is raised here, in the caller's thread)."""
        if self._sender is not None:
            self._queue.put(None)
            self._sender.join()
            self._sender = None
        if self._send_error is not None and not isinstance(self._send_error, OSError):
            error, self._send_error = self._send_error, None
            raise error
        return self._send_error

    def _salvage(self, exc: OSError) -> VideoWriteError:
        """After a failed write: keep what ffmpeg finished (a playable prefix) under the final
        name and say what happened in one line."""
        self._closed = True
        encoder, self._encoder = self._encoder, None
        if encoder is not None:
            with contextlib.suppress(Exception):
                encoder.close()
        kept = 0
        if self.partial_path.is_file() and self.partial_path.stat().st_size > 0:
            with contextlib.suppress(Exception):
                _trim_to_whole_fragments(self.partial_path)
                kept = imageio_ffmpeg.count_frames_and_secs(str(self.partial_path))[0]
        if kept:
            self._publish(kept)
        else:
            self.partial_path.unlink(missing_ok=True)
        why = _write_failure_reason(self.path.parent, exc)
        kept_text = (f"its first {kept} frames are kept there and play" if kept else "nothing playable was written")
        return VideoWriteError(f"writing {self.path} failed after {self.frames_written} frames were sent ({why}); "
                               f"{kept_text}; free some space or pass another --output_folder", kept)

    def _finish(self, keep: bool, redeliver: bool) -> None:
        if self._closed:
            return
        with _signals_held(redeliver):
            try:
                error = self._stop_sender()
            except BaseException:  # a bug surfaced from the sender thread: stop ffmpeg, keep nothing
                self._closed = True
                with contextlib.suppress(Exception):
                    self._encoder.close()
                self.partial_path.unlink(missing_ok=True)
                raise
            if error is not None and keep:
                raise self._salvage(error) from None
            self._closed = True
            try:
                if self._encoder is not None:
                    self._encoder.close()  # EOF on stdin: ffmpeg flushes and writes the index
                    self._encoder = None
            except BaseException:
                self.partial_path.unlink(missing_ok=True)
                raise
            produced = self.partial_path.is_file() and self.partial_path.stat().st_size > 0
            if keep and self.frames_written and produced:
                # imageio-ffmpeg does not report ffmpeg's exit status, so a write that failed as
                # ffmpeg wrote its last fragment (at close: a disk that fills at the very end)
                # would go unnoticed: the file must hold every frame that was sent, whole.
                good, frames = _whole_fragments(self.partial_path)
                if good < self.partial_path.stat().st_size or frames not in (None, self.frames_written):
                    raise self._salvage(OSError(f"the file holds {frames} whole frames of the "
                                                f"{self.frames_written} sent")) from None
                self._publish(self.frames_written)
                return
            self.partial_path.unlink(missing_ok=True)
        if keep and self.frames_written:  # ffmpeg's file is gone: the folder was removed, or the file
            raise VideoWriteError(f"writing {self.path} failed: {self.partial_path.name} is gone after "
                                  f"{self.frames_written} frames were sent (was the output folder removed?); "
                                  f"nothing was kept", 0)

    def _publish(self, frames: int) -> None:
        """Give the finished file its final name; a folder that no longer allows it (made read-only
        meanwhile) keeps the hidden one, said in one line."""
        if self.partial_path == self.path:
            return
        try:
            os.replace(self.partial_path, self.path)
        except OSError as exc:
            raise VideoWriteError(f"cannot name the finished video {self.path} ({reason(exc)}); its {frames} "
                                  f"frames are kept in {self.partial_path}: rename it by hand", frames) from None

    def close(self) -> None:
        """Finish the file and move it to its final name (no file if no frame was written)."""
        self._finish(keep=True, redeliver=True)
        if self.frames_written:
            log.info("wrote %d frames (%.2f s) to %s", self.frames_written,
                     self.frames_written / self.fps, self.path)
        else:
            log.warning("no frames were written; %s was not created", self.path)

    def abort(self) -> None:
        """Stop and delete what was written; nothing is left under either name."""
        self._finish(keep=False, redeliver=False)

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None and self._closed:  # already handled (a failed write was salvaged)
            return False
        if exc_type is None:
            self.close()
        elif issubclass(exc_type, KeyboardInterrupt) or self.recording:
            self._finish(keep=True, redeliver=False)
            if self.frames_written:
                log.warning("interrupted: kept the %d frames written so far in %s",
                            self.frames_written, self.path)
        else:
            self.abort()
        return False


FRAGMENT_MICROSECONDS = 1_000_000


def partial_name(path: Path) -> Path:
    """Where a :class:`VideoWriter` writes ``path`` until it is finished: ``.<name>.partial.mp4``."""
    return path.with_name(f".{path.stem}.partial{path.suffix}")


def _boxes(f, start: int, stop: int):
    """``(kind, offset, length)`` of the MP4 boxes between two offsets of an open file; a box that
    runs past ``stop`` (a file cut short) ends the walk."""
    end = start
    while end + 8 <= stop:
        f.seek(end)
        head = f.read(16)
        length, kind = int.from_bytes(head[:4], "big"), head[4:8]
        if length == 1 and len(head) == 16:
            length = int.from_bytes(head[8:16], "big")
        if length < 8 or end + length > stop:
            return
        yield kind, end, length
        end += length


def _whole_fragments(path: Path) -> tuple[int, int | None]:
    """The bytes of a fragmented MP4 up to its last complete fragment (a ``moof`` box and the
    ``mdat`` after it), and the frames those fragments hold (the sample counts of their ``trun``
    boxes; None if the ``moov`` does not announce fragments: an ffmpeg that ignored the
    fragmenting flags). Reads the box headers only."""
    good = frames = pending = 0
    fragmented = True  # until a moov says otherwise (a file without one holds no playable frame)
    with open(path, "rb") as f:
        for kind, offset, length in _boxes(f, 0, path.stat().st_size):
            if kind == b"moov":
                fragmented = any(b[0] == b"mvex" for b in _boxes(f, offset + 8, offset + length))
            if kind == b"moof":
                pending = 0
                for traf in (b for b in _boxes(f, offset + 8, offset + length) if b[0] == b"traf"):
                    for _, run, _ in (b for b in _boxes(f, traf[1] + 8, traf[1] + traf[2]) if b[0] == b"trun"):
                        f.seek(run + 12)  # size, type, version + flags
                        pending += int.from_bytes(f.read(4), "big")
                continue
            good = offset + length  # a fragment is whole once its mdat is; ftyp/moov are whole alone
            frames, pending = frames + pending, 0
    return good, frames if fragmented else None


def _trim_to_whole_fragments(path: Path) -> None:
    """Cut a fragmented MP4 that ffmpeg could not finish after its last complete fragment:
    demuxers refuse a file whose last fragment is cut. Truncating needs no free space."""
    good, _ = _whole_fragments(path)
    if good < path.stat().st_size:
        os.truncate(path, good)


def _write_failure_reason(folder: Path, exc: OSError) -> str:
    with contextlib.suppress(OSError):
        if shutil.disk_usage(folder).free < MIN_FREE_BYTES:
            return "no space left on the device"
    return f"ffmpeg stopped writing: {first_line(exc)}; a full disk, a quota or a file-size limit?"


# ---------------------------------------------------------------------------------- subtitles


@dataclass(frozen=True)
class SubtitleOverlay:
    """A rendered subtitle: rows ``top : top + height`` of the frame get
    ``frame * (1 - alpha) + white`` (``white`` is premultiplied by the fill's coverage)."""

    lines: tuple[str, ...]
    top: int
    alpha: np.ndarray  # [height, W, 1] float32 in [0, 1]: text plus outline coverage
    white: np.ndarray  # [height, W, 1] float32 in [0, 255]: 255 x fill coverage

    @property
    def height(self) -> int:
        return self.alpha.shape[0]


def load_font(path: str | Path | None, size: int) -> ImageFont.FreeTypeFont:
    """A TrueType/OpenType font (``.ttf``, ``.otf``, ``.ttc``) at ``size`` pixels; None: the bundled
    DejaVu Sans Bold. A file that is missing or not a font is a :class:`UserError`."""
    path = FONT_PATH if path is None else Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"subtitle_font {path} {'is a folder' if path.is_dir() else 'does not exist'}; "
                        f"give a .ttf, .otf or .ttc file, or leave it null for the bundled font")
    try:
        return ImageFont.truetype(str(path), size)
    except OSError as exc:
        raise UserError(f"subtitle_font {path} cannot be loaded as a font ({first_line(str(exc))}); "
                        f"give a .ttf, .otf or .ttc file") from None


class SubtitleRenderer:
    """Burns subtitles into frames: white text with a black outline, centred near the bottom,
    wrapped (by measured pixel width) to fit the frame. Font size defaults to height / 18 (at
    least 10 px); the font is the bundled DejaVu Sans Bold unless ``font_path`` gives another
    (config ``subtitle_font``: one with CJK or other scripts DejaVu lacks). Each distinct text is
    rendered once; burning it into frames is a numpy blend."""

    # a code point no font maps (a noncharacter): what the font draws for a character it lacks
    _NO_GLYPH = "\U0010FFFF"

    def __init__(self, width: int, height: int, font_size: int | None = None, font_path: str | Path | None = None):
        self.width, self.height = int(width), int(height)
        self.font_size = int(font_size) if font_size else max(10, round(self.height / 18))
        self.font_path = FONT_PATH if font_path is None else Path(font_path).expanduser()
        self.font = load_font(font_path, self.font_size)
        self._no_glyph = self._glyph(self._NO_GLYPH)
        self.stroke = max(1, round(self.font_size / 12))
        self.margin_x = max(2 * self.stroke, round(self.width * 0.04))
        self.margin_bottom = round(self.height * 0.05)
        self.max_text_width = self.width - 2 * self.margin_x
        ascent, descent = self.font.getmetrics()
        self.line_height = ascent + descent + 2 * self.stroke
        self.overlay = functools.lru_cache(maxsize=64)(self._render_overlay)

    def _glyph(self, char: str) -> tuple:
        mask = self.font.getmask(char)
        return mask.size, bytes(mask)

    def missing(self, text: str) -> str:
        """The distinct characters of ``text`` the font has no glyph for (they are drawn as its
        "missing glyph" box), in order of appearance."""
        return "".join(c for c in dict.fromkeys(text)
                       if not c.isspace() and unicodedata.category(c) not in ("Cc", "Cf")
                       and self._glyph(c) == self._no_glyph)

    def text_width(self, text: str) -> float:
        """Drawn width of one line in pixels, outline included."""
        return self.font.getlength(text) + 2 * self.stroke

    def _pieces(self, word: str) -> list[str]:
        """The word, or chunks of it that each fit on a line if it is too wide alone."""
        pieces, piece = [], ""
        for char in word:
            if piece and self.text_width(piece + char) > self.max_text_width:
                pieces.append(piece)
                piece = ""
            piece += char
        return pieces + [piece] if piece else pieces

    def wrap(self, text: str) -> list[str]:
        """Greedy word wrap to ``max_text_width`` pixels; explicit newlines are kept."""
        lines = []
        for paragraph in str(text).splitlines():
            line = ""
            for word in paragraph.split():
                for piece in self._pieces(word):
                    candidate = f"{line} {piece}" if line else piece
                    if line and self.text_width(candidate) > self.max_text_width:
                        lines.append(line)
                        candidate = piece
                    line = candidate
            if line:
                lines.append(line)
        return lines

    def _render_overlay(self, text: str) -> SubtitleOverlay:
        missing = self.missing(text)
        if missing:
            log.warning("subtitle %r: the font %s has no glyph for %r, drawn as boxes; set subtitle_font to a "
                        "font file that has them (e.g. a Noto Sans CJK font for Chinese or Japanese)",
                        text, self.font_path.name, missing)
        lines = tuple(self.wrap(text))
        block_height = len(lines) * self.line_height
        coverage = Image.new("L", (self.width, block_height), 0)  # text + outline
        fill = Image.new("L", (self.width, block_height), 0)      # text only, outline black
        for image, outline in ((coverage, 255), (fill, 0)):
            draw = ImageDraw.Draw(image)
            for i, line in enumerate(lines):
                draw.text((self.width / 2, i * self.line_height + self.stroke), line, font=self.font,
                          anchor="ma", fill=255, stroke_width=self.stroke, stroke_fill=outline)
        top = self.height - self.margin_bottom - block_height
        alpha = np.asarray(coverage, dtype=np.float32)[..., None] / 255
        white = np.asarray(fill, dtype=np.float32)[..., None]
        if top < 0:
            log.warning("subtitle %r needs %d lines and does not fit a %dx%d frame; its first "
                        "lines are cut", text, len(lines), self.width, self.height)
            alpha, white, top = alpha[-top:], white[-top:], 0
        return SubtitleOverlay(lines, top, alpha, white)

    def render(self, frames: np.ndarray, text: str | None) -> np.ndarray:
        """``frames`` (uint8 ``[T, H, W, 3]``) with ``text`` burned in; unchanged (the same
        array) if the text is empty or None."""
        if text is None or not str(text).strip():
            return frames
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3):
            raise ValueError(f"expected uint8 frames [T, {self.height}, {self.width}, 3], "
                             f"got {frames.dtype} {list(frames.shape)}")
        overlay = self.overlay(str(text).strip())
        rows = slice(overlay.top, overlay.top + overlay.height)
        out = frames.copy()
        band = out[:, rows].astype(np.float32)
        out[:, rows] = np.clip(band * (1 - overlay.alpha) + overlay.white + 0.5, 0, 255).astype(np.uint8)
        return out


# ---------------------------------------------------------------------------------- reading


def probe_video(path) -> dict:
    """``{frames, fps, width, height, codec, pix_fmt, seconds}`` of a video file. ``frames`` is
    exact: ffmpeg decodes the whole stream and counts (seconds for long videos)."""
    reader = imageio_ffmpeg.read_frames(str(path))
    try:
        meta = next(reader)
    finally:
        reader.close()
    frames, seconds = imageio_ffmpeg.count_frames_and_secs(str(path))
    width, height = meta["source_size"]
    return {"frames": frames, "fps": meta["fps"], "width": width, "height": height,
            "codec": meta["codec"], "pix_fmt": meta["pix_fmt"].split("(")[0], "seconds": seconds}


def read_video(path) -> np.ndarray:
    """All frames as uint8 ``[T, H, W, 3]`` (holds the whole video in memory: for tests and
    short clips)."""
    reader = imageio_ffmpeg.read_frames(str(path))
    try:
        width, height = next(reader)["size"]
        frames = [np.frombuffer(buf, np.uint8).reshape(height, width, 3) for buf in reader]
    finally:
        reader.close()
    return np.stack(frames) if frames else np.zeros((0, height, width, 3), np.uint8)
