"""The prompt grammar: ``"a fox runs[5s] | it jumps[5s#] ; run | jump"`` → :class:`Script`.

Grammar (as the seed README documents it, plus escapes)::

    prompt    := actions [ ";" subtitles ]
    actions   := segment ( "|" segment )*
    segment   := text [ "[" duration "]" ]          -- only whitespace may follow "]"
    duration  := number "s" [ "#" ]                 -- whitespace allowed around each part
    number    := digits [ "." digits ] | "." digits  -- integer or decimal, > 0
    subtitles := subtitle ( "|" subtitle )*         -- exactly one per segment

- ``[Ns]`` sets the segment's length in seconds; a segment without brackets gets
  ``default_seconds`` (config ``default_segment_seconds``).
- ``#`` in the brackets (``[10s#]``) is a hard scene cut at the *start* of that segment (the
  README's semantics). On the first segment there is nothing to cut from: it is ignored with a
  warning.
- After ``;``, subtitles are split by ``|``, one per segment; an empty slot means no subtitle
  for that segment, and an empty subtitle part (``"a | b ;"``) means no subtitles at all.
- Texts and subtitles are whitespace-trimmed. A backslash makes the next character literal
  when it is one of ``\\ | ; [ ] #``; any other backslash is itself literal. Outside brackets
  ``#`` is ordinary text; in subtitles ``[``, ``]`` and ``#`` are ordinary text.

Every mistake is a :class:`~utils.errors.PromptError` with the 0-based character ``position``
and the 1-based ``segment`` number, and a one-line message saying what to do.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import NamedTuple

from utils.errors import ConfigError, PromptError

logger = logging.getLogger(__name__)

ESCAPABLE = "\\|;[]#"
_TEXT_SPECIAL = "\\|;[]"      # escaped when rendering action text
_SUBTITLE_SPECIAL = "\\|;"    # escaped when rendering subtitles
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")
_EXAMPLE = "e.g. [5s], [2.5s] or [10s#] for a scene cut"


@dataclass(frozen=True)
class Segment:
    """One action: its text, its requested length, whether a hard cut starts it, its subtitle."""

    text: str
    seconds: float
    cut: bool = False
    subtitle: str | None = None


@dataclass(frozen=True)
class Script:
    segments: tuple[Segment, ...]


class _Char(NamedTuple):
    ch: str
    pos: int        # index of the character in the prompt (of the backslash for an escape)
    special: bool   # an unescaped one of | ; [ ] #


def _lex(prompt: str) -> list[_Char]:
    chars, i = [], 0
    while i < len(prompt):
        ch = prompt[i]
        if ch == "\\" and i + 1 < len(prompt) and prompt[i + 1] in ESCAPABLE:
            chars.append(_Char(prompt[i + 1], i, False))
            i += 2
            continue
        chars.append(_Char(ch, i, ch in "|;[]#"))
        i += 1
    return chars


def _is(c: _Char, ch: str) -> bool:
    return c.special and c.ch == ch


def _split(chars: list[_Char], sep: str) -> list[list[_Char]]:
    parts: list[list[_Char]] = [[]]
    for c in chars:
        if _is(c, sep):
            parts.append([])
        else:
            parts[-1].append(c)
    return parts


def _text(chars: list[_Char]) -> str:
    return "".join(c.ch for c in chars).strip()


def _fail(message: str, position: int, segment: int | None) -> PromptError:
    where = f"segment {segment}, position {position}" if segment else f"position {position}"
    return PromptError(f"prompt {where}: {message}", position=position, segment=segment)


def _strip(chars: list[_Char]) -> list[_Char]:
    start, end = 0, len(chars)
    while start < end and chars[start].ch.isspace():
        start += 1
    while end > start and chars[end - 1].ch.isspace():
        end -= 1
    return chars[start:end]


def _duration(content: list[_Char], open_pos: int, seg: int) -> tuple[float, bool]:
    """Parse what is between ``[`` and ``]``: ``number s [#]`` → (seconds, cut)."""
    body = _strip(content)
    cut = bool(body) and _is(body[-1], "#")
    if cut:
        body = _strip(body[:-1])
    if not body:
        raise _fail(f"the brackets hold no duration; write one, {_EXAMPLE}, or remove the "
                    "brackets to use the default duration", open_pos, seg)
    n = 0
    while n < len(body) and body[n].ch in "0123456789.+-" and not body[n].special:
        n += 1
    number = "".join(c.ch for c in body[:n])
    if not _NUMBER.fullmatch(number):
        raw = "".join(c.ch for c in body)
        if any(_is(c, "#") for c in body):
            raise _fail(f"'#' in '[{raw}]' must come last, right after the unit, e.g. [10s#]",
                        next(c.pos for c in body if _is(c, "#")), seg)
        raise _fail(f"'{raw}' is not a duration; write a positive number of seconds, {_EXAMPLE}",
                    body[0].pos, seg)
    unit_chars = _strip(body[n:])
    unit = "".join(c.ch for c in unit_chars)
    if unit != "s":
        if not unit:
            raise _fail(f"duration '{number}' has no unit; add 's' for seconds, e.g. [{number}s]",
                        body[n - 1].pos + 1, seg)
        comma = re.match(r",(\d+)", unit)
        if comma:
            raise _fail(f"'{number}{unit}' has a decimal comma; write a decimal point, e.g. "
                        f"[{number}.{comma.group(1)}s{'#' if cut else ''}]", unit_chars[0].pos, seg)
        raise _fail(f"unknown unit '{unit}' in the duration; only seconds 's' are supported, "
                    f"{_EXAMPLE}", unit_chars[0].pos, seg)
    seconds = float(number)
    if seconds <= 0:
        raise _fail(f"duration {number}s must be greater than zero, {_EXAMPLE}", body[0].pos, seg)
    if not math.isfinite(seconds):
        raise _fail(f"duration {number[:12]}...s is too large; write a finite number of seconds",
                    body[0].pos, seg)
    return seconds, cut


def _segment(chars: list[_Char], seg: int, start: int, end: int,
             default_seconds: float) -> Segment:
    """One ``text [duration]`` segment; ``start``/``end`` are the prompt indices around it."""
    text: list[_Char] = []
    i = 0
    while i < len(chars) and not _is(chars[i], "["):
        if _is(chars[i], "]"):
            raise _fail("unexpected ']' with no '[' before it; write \\] for a literal bracket",
                        chars[i].pos, seg)
        text.append(chars[i])
        i += 1
    seconds, cut = default_seconds, False
    if i < len(chars):
        open_pos = chars[i].pos
        close = next((j for j in range(i + 1, len(chars)) if _is(chars[j], "]")), None)
        if close is None:
            raise _fail("'[' is never closed; close the duration with ']', " + _EXAMPLE
                        + ", or write \\[ for a literal bracket", open_pos, seg)
        seconds, cut = _duration(chars[i + 1:close], open_pos, seg)
        trailing = _strip(chars[close + 1:])
        if trailing:
            raise _fail("text after the closing ']'; the duration goes at the end of the "
                        "segment's text (put '|' before a new segment)", trailing[0].pos, seg)
    stripped = _strip(chars)
    if not _text(text):
        position = stripped[0].pos if stripped else (end if seg == 1 else start - 1)
        hint = "" if stripped else ", or remove the extra '|'"
        raise _fail("the segment has no action text; describe what happens before the "
                    f"duration, e.g. 'a fox runs[5s]'{hint}", position, seg)
    return Segment(text=_text(text), seconds=seconds, cut=cut)


def parse(prompt: str, default_seconds: float) -> Script:
    """Parse a prompt into a :class:`Script`; raise :class:`PromptError` on any mistake."""
    if not (isinstance(default_seconds, (int, float)) and math.isfinite(default_seconds)
            and default_seconds > 0):
        raise ConfigError(f"default_segment_seconds must be a positive number of seconds, "
                          f"got {default_seconds!r}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate: bytes that were not UTF-8 (a Latin-1 terminal or file)
        raise _fail("the prompt is not valid UTF-8 text (a byte of another encoding, such as Latin-1?); "
                    "write it in UTF-8", exc.start, None) from None
    chars = _lex(prompt)
    semicolons = [c.pos for c in chars if _is(c, ";")]
    if len(semicolons) > 1:
        raise _fail("more than one ';'; a single ';' separates the actions from the subtitles "
                    "(write \\; for a literal semicolon)", semicolons[1], None)
    actions = _split(chars, ";")[0]
    if not _strip(actions) and not any(_is(c, "|") for c in actions):
        raise _fail("the prompt has no action; write one, e.g. 'a fox runs in the snow[5s]'",
                    0, None)

    pieces = _split(actions, "|")
    bars = [c.pos for c in actions if _is(c, "|")]
    ends = bars + [semicolons[0] if semicolons else len(prompt)]
    starts = [0] + [p + 1 for p in bars]
    segments = [_segment(piece, k + 1, starts[k], ends[k], float(default_seconds))
                for k, piece in enumerate(pieces)]

    if segments[0].cut:
        logger.warning("prompt segment 1: '#' (scene cut) on the first segment has nothing to "
                       "cut from; ignored")
        segments[0] = Segment(segments[0].text, segments[0].seconds, cut=False)

    if semicolons:
        slots = [_text(part) for part in _split(_split(chars, ";")[1], "|")]
        if slots != [""]:  # a blank subtitle part means no subtitles at all
            if len(slots) != len(segments):
                raise _fail(f"{len(segments)} segment(s) but {len(slots)} subtitle(s) after ';'; "
                            "give one subtitle per segment separated by '|' (leave a slot "
                            "empty for no subtitle)", semicolons[0], None)
            segments = [Segment(s.text, s.seconds, s.cut, slot or None)
                        for s, slot in zip(segments, slots)]
    return Script(tuple(segments))


def _escape(text: str, special: str) -> str:
    return "".join("\\" + ch if ch in special else ch for ch in text)


def format_seconds(seconds: float) -> str:
    """Shortest decimal (no exponent) that parses back to exactly ``seconds``: 5.0 → '5'."""
    text = format(Decimal(repr(float(seconds))), "f")
    return text[:-2] if text.endswith(".0") else text


def render(script: Script) -> str:
    """A prompt that :func:`parse` turns back into ``script`` (every duration written out)."""
    actions = " | ".join(
        f"{_escape(s.text, _TEXT_SPECIAL)}[{format_seconds(s.seconds)}s{'#' if s.cut else ''}]"
        for s in script.segments)
    if all(s.subtitle is None for s in script.segments):
        return actions
    return actions + " ; " + " | ".join(_escape(s.subtitle or "", _SUBTITLE_SPECIAL)
                                         for s in script.segments)
