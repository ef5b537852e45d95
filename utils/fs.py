"""Folders the project writes into, checked before any model loads or any GPU time is spent.

:func:`ensure_writable_dir` creates the folder if needed and proves it can be written (a file
is created and removed), so a read-only file system, missing permission, a path through a
file, a full disk or a folder that cannot be created ends the run at once with one line
naming the folder and the reason, instead of a traceback after minutes of work.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from utils.errors import ConfigError

# Below this much free space a render or a checkpoint cannot get far: refuse to start.
MIN_FREE_BYTES = 1 << 20

_REASONS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.ENOENT: "it cannot be created there (no such file or directory)",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (a file-size limit)",
    errno.EEXIST: "a file of that name exists (not a folder)",
}


def reason(exc: OSError) -> str:
    """A short, plain reason for a file-system error."""
    return _REASONS.get(exc.errno) or exc.strerror or str(exc) or type(exc).__name__


def ensure_writable_dir(path: str | Path, what: str, hint: str) -> Path:
    """Create ``path`` (and its parents) if needed and check that files can be written in it;
    otherwise raise :class:`ConfigError`: ``cannot write <what> <path>: <reason>; <hint>``."""
    path = Path(path)

    def fail(why: str) -> ConfigError:
        return ConfigError(f"cannot write {what} {path}: {why}; {hint}")

    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise fail(_REASONS[errno.EEXIST]) from None
    except OSError as exc:
        raise fail(reason(exc)) from exc
    if not path.is_dir():
        raise fail(_REASONS[errno.EEXIST])
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-") as probe:
            probe.write(b"0")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        raise fail(reason(exc)) from exc
    free = shutil.disk_usage(path).free
    if free < MIN_FREE_BYTES:
        raise fail(f"no space left on the device ({free} bytes free)")
    return path
