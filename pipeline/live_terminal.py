"""Live control from a terminal or a pipe (``inference.py --live --stdin``): one line per action.

    a red fox trots through the snow        the first line starts the session
    the fox pounces                         next action (KV Flush, same shot)
    # a quiet harbour at sunrise            new scene (RoPE Cut)
    the boats rock ; the harbour            '; subtitle' adds a subtitle (\\; is a literal ';')
    (empty line or end of input)            stop, once the actions already sent have landed

A file or a pipe that delivers its lines at once (``--live < actions.txt``) therefore gives each
action one block before the session stops. Generation is paced like the page's: at most
``live.ahead_blocks`` blocks ahead of real-time playback, so an action typed now shows about a
second of video later. Each event is one log line; a bad line is reported and skipped; input that
is not UTF-8 counts as its end (before the first action: a one-line error).
"""
from __future__ import annotations

import logging
import re
import shlex
import threading
import time
from pathlib import Path
from typing import TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from pipeline.generate import VideoGenerator
from pipeline.live import LiveError, LiveSession, PlaybackClock, paced
from pipeline.plan import CUT, FLUSH

log = logging.getLogger("live")

_SUBTITLE_SPLIT = re.compile(r"(?<!\\);")


def replay_command(video: Path) -> str:
    """The command that renders a session's video again, as a POSIX shell runs it: ``--replay``
    with its sidecar, which holds the transcript, the seed, the whole config, the checkpoint and
    the start image (quoted with ``shlex.quote``; ``--replay=`` so that a path starting with ``-``
    is not taken for an option)."""
    return f"python inference.py --replay={shlex.quote(str(Path(video).with_suffix('.json')))}"


def parse_line(line: str) -> tuple[str, str, str | None] | None:
    """A terminal line → ``(kind, text, subtitle)``, kind ``flush`` or ``cut`` (a leading
    ``#``); None for an empty line (stop)."""
    line = line.strip()
    if not line:
        return None
    kind = FLUSH
    if line.startswith("#"):
        kind, line = CUT, line[1:]
    text, subtitle = (_SUBTITLE_SPLIT.split(line, maxsplit=1) + [""])[:2]
    return kind, text.replace("\\;", ";").strip(), subtitle.replace("\\;", ";").strip() or None


def read_line(lines: TextIO) -> str:
    """The next line ("" at the end); input that cannot be decoded raises :class:`LiveError`."""
    try:
        return lines.readline()
    except UnicodeDecodeError as exc:
        raise LiveError(f"the input is not UTF-8 text ({exc.reason}); send the actions in UTF-8") from None


def steer_from(session: LiveSession, lines: TextIO) -> None:
    """Queue one action per line until an empty line, the end of input or of the session; a bad
    line is reported in one log line and skipped."""
    for line in iter(lambda: read_line(lines), ""):
        parsed = parse_line(line)
        if parsed is None:
            return
        kind, text, subtitle = parsed
        steer = session.new_scene if kind == CUT else session.next_action
        try:
            action = steer(text, subtitle)
        except LiveError as exc:
            log.error("%s", exc)
            if session.stopping.is_set():
                return
            continue
        except Exception as exc:  # noqa: BLE001 - one line must not leave the session running unsteered
            log.error("line skipped: %s: %s", type(exc).__name__, exc)
            continue
        log.info("queued action %d (%s): %r", action.id, "new scene" if kind == CUT else "next action", action.text)


def run_terminal(gen: VideoGenerator, lines: TextIO, *, ahead_blocks: int, seed: int, output_folder: Path,
                 checkpoint: str | None = None, image: str | None = None) -> LiveSession | None:
    """Run one live session steered by ``lines`` (stdin); returns it once stopped (None if no
    action was given). Bad lines are reported and skipped; the session goes on."""
    log.info("type the first action and press Enter; then one line per action ('text': next action, "
             "'# text': new scene, 'text ; subtitle'); an empty line or end of input stops "
             "(after the actions already sent)")
    session = None
    for line in iter(lambda: read_line(lines), ""):  # input that is not UTF-8 ends the run (LiveError)
        parsed = parse_line(line)
        if parsed is None:
            break
        kind, text, subtitle = parsed
        if kind == CUT:
            log.warning("'#' on the first action: there is no scene to cut from yet; starting with it")
        try:
            session = LiveSession(gen, text, seed=seed, subtitle=subtitle, output_folder=output_folder,
                                  checkpoint=checkpoint, image=image)
            break
        except LiveError as exc:
            log.error("%s", exc)
    if session is None:
        log.info("no action given; nothing generated")
        return None
    clock = PlaybackClock(float(gen.cfg.fps))

    def read_actions():
        try:
            steer_from(session, lines)
        except LiveError as exc:  # input that is not UTF-8
            log.error("%s; taken as the end of input", exc)
        finally:  # whatever ends the input, the session stops
            # the actions already queued land first (one block each), as the lines of a file would
            # otherwise all be dropped by the stop that the end of the file sends at once
            if session.pending:
                log.info("end of input: stopping once the %d queued action(s) have landed", len(session.pending))
            while session.pending and not session.finished:
                time.sleep(0.02)
            if not session.stopping.is_set():
                log.info("stopping after the block being generated")
            session.stop()
            clock.wake()

    threading.Thread(target=read_actions, name="live-stdin", daemon=True).start()
    fps = float(gen.cfg.fps)
    with logging_redirect_tqdm(), tqdm(desc=session.path.stem[:24], unit="block") as bar:
        for block in paced(session, clock, ahead_blocks):
            if block.landed is not None:
                a = block.landed
                on_screen = (clock.buffered - len(block.frames)) / fps  # frames still to play before it
                log.info("block %d: action %d %s %r landed %.2f s after it was entered, plays in %.2f s",
                         block.index, a.id, a.kind, a.text, a.landed - a.submitted, max(0.0, on_screen))
            bar.update(1)
            bar.set_postfix(video=f"{session.frames_written / fps:.1f}s",
                            gen_fps=f"{len(block.frames) / max(block.seconds, 1e-9):.1f}",
                            ahead=f"{clock.buffered / fps:.2f}s")
    log.info("%d blocks, %d frames (%.2f s) in %s; render it again with: %s", session.blocks_done,
             session.frames_written, session.frames_written / fps, session.path, replay_command(session.path))
    return session
