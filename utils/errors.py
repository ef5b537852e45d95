"""One error type for user mistakes, and the CLI wrapper that prints it as one line.

Anything a user can cause (a bad prompt, a missing file, a wrong config key) raises a subclass
of :class:`UserError`. The CLIs catch it, print ``error: <message>`` and exit with code 2.
Internal bugs raise ordinary exceptions and keep their tracebacks.
"""
from __future__ import annotations

import functools
import logging
import sys

EXIT_USER_ERROR = 2

# what to do about missing or damaged Wan weights (text encoder, tokenizer, VAE)
WAN_DOWNLOAD_HINT = ("run `bash setup_env.sh` (downloads Wan-AI/Wan2.1-T2V-1.3B-Diffusers into wan_models/) "
                     "or place the files there by hand")


class UserError(Exception):
    """A mistake the user can fix; the message says what, where and what to do."""


class ConfigError(UserError):
    pass


class CheckpointError(UserError):
    pass


class WeightsMissingError(UserError):
    pass


class OutputError(UserError):
    """An output (video, sidecar, checkpoint) could not be written: disk full, quota, read-only."""


class PromptError(UserError):
    """A malformed prompt. ``position`` is the 0-based character index into the prompt where the
    problem is (``len(prompt)`` means "at the end"); ``segment`` is the 1-based segment number,
    or None when the problem is not inside one segment. ``str(exc)`` is the one-line message."""

    def __init__(self, message: str, position: int | None = None, segment: int | None = None):
        super().__init__(message)
        self.position = position
        self.segment = segment


def user_errors_exit(main):
    """Decorate a CLI ``main``: a :class:`UserError` becomes one line on stderr and exit 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            logging.getLogger(__name__).debug("user error", exc_info=True)
            message = " ".join(str(exc).split("\n"))
            print(f"error: {message}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)

    return wrapper


def first_line(exc: BaseException) -> str:
    """The first line of a library's error, for a one-line message (two when the first only
    introduces the second, as ``Error(s) in loading state_dict for X:`` does)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    first = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    return first.rstrip(".")
