"""Resumable training checkpoints: sharded with ``torch.distributed.checkpoint``, written atomically.

Layout under ``<logdir>/checkpoints/``::

    step_000050/                one complete checkpoint (a directory is complete once it has
        .metadata, *.distcp     this name: it is renamed into place as the last act of a save)
        trainer_state.json      step, data position, whether the EMA exists, wandb run id, ...
        rng_rank<r>.pt          each rank's torch / CUDA / Python RNG states
        model.pt                {"generator": ..., "generator_ema": ...} full state dicts with Wan
                                names: ``inference.py --checkpoint_path`` / ``load_dit_state_dict``
    .tmp_step_000100/           a save in progress (or one that crashed): ignored, removed later

A save writes everything into ``.tmp_step_N`` and then renames it to ``step_N`` (one atomic
``rename`` on a POSIX file system), so a crash at any point leaves the previous checkpoints
untouched. A save that fails (disk full, quota) removes its ``.tmp_step_N`` and stops the run
with one line: the previous checkpoint is what ``--resume`` picks. On resume, each checkpoint is
checked before it is loaded (state file, DCP metadata, every shard as long as the metadata says);
a damaged one is reported and the one before it is tried (:func:`resumable_checkpoints`). A
checkpoint that is whole but does not fit the model/config being trained (a missing or extra
key, another shape) is reported as such, not as damage. Only the newest ``keep`` complete
checkpoints are kept; older ones are renamed away before they are deleted, so a crash while
pruning never leaves a half-deleted ``step_N``.
The sharded state is resharded on load by DCP, so it can be read by a different world size
(the data position and the per-rank RNG streams then continue only approximately).
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.checkpoint.stateful import Stateful

from utils.distributed import all_ranks_ok, barrier
from utils.errors import CheckpointError, OutputError, first_line
from utils.fs import reason

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"step_(\d+)\Z")
STATE_FILE = "trainer_state.json"
EXPORT_FILE = "model.pt"


# DCP's own words (and _StrictLoadPlanner's) for a checkpoint whose keys or shapes differ from the state loaded
MISMATCH = ("Missing key in checkpoint state_dict", "Size mismatch between saved", "Unexpected key in checkpoint")


class _StrictLoadPlanner(dcp.DefaultLoadPlanner):
    """DCP's planner that also refuses checkpoint entries the state lacks: DCP skips them, so a
    model with fewer blocks would silently resume from a part of a bigger one."""

    def create_local_plan(self):
        plan = super().create_local_plan()
        extra = sorted(set(self.metadata.state_dict_metadata) - set(self.state_dict))
        if extra:
            raise RuntimeError(f"Unexpected key in checkpoint state_dict: {extra[0]} (and {len(extra) - 1} more)"
                               if len(extra) > 1 else f"Unexpected key in checkpoint state_dict: {extra[0]}")
        return plan


class CheckpointLoadError(CheckpointError):
    """A checkpoint that passed :func:`checkpoint_problem` but did not load. ``reason``: one line
    (DCP's first failure); ``mismatch``: the checkpoint is whole but holds another model/config."""

    def __init__(self, message: str, reason: str, mismatch: bool):
        super().__init__(message)
        self.reason, self.mismatch = reason, mismatch


class ModelAndOptimizer(Stateful):
    """A model and its optimizer as one DCP entry (sharded DTensor state, resharded on load)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optimizer": optim_sd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state_dict["model"],
                       optim_state_dict=state_dict["optimizer"])


def full_state_dict(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) state dict on rank 0's CPU, Wan names; ``{}`` on other ranks.
    A collective: every rank must call it."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: (v.to(dtype) if dtype is not None else v) for k, v in sd.items()}


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under ``root``, oldest first."""
    root = Path(root)
    found = []
    if root.is_dir():
        for path in root.iterdir():
            m = STEP_DIR.match(path.name)
            if m and path.is_dir() and (path / STATE_FILE).is_file() and (path / ".metadata").is_file():
                found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def checkpoint_problem(path: str | Path) -> str | None:
    """Why checkpoint folder ``path`` cannot be resumed from (None: it looks whole). Reads only
    the small files: the trainer state, the DCP metadata, and the shards' sizes."""
    path = Path(path)
    try:
        state = json.loads((path / STATE_FILE).read_text())
        int(state["step"])
    except FileNotFoundError:
        return f"{STATE_FILE} is missing"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{STATE_FILE} is unreadable ({type(exc).__name__})"
    if not (path / ".metadata").is_file():
        return "its DCP .metadata is missing"
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as exc:  # noqa: BLE001 - a truncated pickle raises anything
        return f"its DCP .metadata is unreadable ({type(exc).__name__})"
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        shard = path / name
        if not shard.is_file():
            return f"shard {name} is missing"
        if shard.stat().st_size < size:
            return f"shard {name} is truncated ({shard.stat().st_size} of {size} bytes)"
    return None


def resumable_checkpoints(root: str | Path) -> tuple[list[Path], list[str]]:
    """The checkpoints under ``root`` that look whole, newest first, and a line for each one that
    does not (damaged step folders, unfinished saves left by a killed run)."""
    root = Path(root)
    good, problems = [], []
    if not root.is_dir():
        return good, problems
    steps = sorted(((int(m.group(1)), p) for p in root.iterdir()
                    if (m := STEP_DIR.match(p.name)) and p.is_dir()), reverse=True)
    for _, path in steps:
        why = checkpoint_problem(path)
        if why is None:
            good.append(path)
        else:
            problems.append(f"{path.name}: {why}")
    for path in sorted(root.glob(".tmp_step_*")):
        problems.append(f"{path.name}: an unfinished save (the run was stopped while saving)")
    return good, problems


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    path = Path(path) / STATE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path} ({exc}); the checkpoint is damaged: delete "
                              f"{path.parent} to resume from the one before it") from exc


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _save_file(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _remove_leftovers(root: Path) -> None:
    """Crashed saves (``.tmp_step_*``) and interrupted prunes (``.old_step_*``)."""
    for path in root.iterdir():
        if path.name.startswith((".tmp_step_", ".old_step_")):
            shutil.rmtree(path, ignore_errors=True)


def _prune(root: Path, keep: int) -> None:
    found = complete_checkpoints(root)
    for step, path in found[:max(0, len(found) - keep)]:
        trash = root / f".old_{path.name}"
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
        log.info("removed old checkpoint %s", path)


def save_checkpoint(root: str | Path, step: int, state: dict[str, Any], trainer_state: dict[str, Any], *,
                    rank: int, export: dict[str, dict[str, torch.Tensor]] | None = None,
                    keep: int = 3) -> Path:
    """Write checkpoint ``step`` atomically; a collective (every rank calls it).

    ``state``: what DCP saves (Stateful objects, DTensor dicts). ``trainer_state``: JSON-able
    bookkeeping (rank 0's is written). ``export``: rank 0's full state dicts for ``model.pt``."""
    root = Path(root)
    tmp, final = root / f".tmp_step_{step:06d}", root / f"step_{step:06d}"
    error: BaseException | None = None
    try:
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            _remove_leftovers(root)
            tmp.mkdir()
    except OSError as exc:
        error = exc
    if all_ranks_ok(error is None):
        try:
            dcp.save(state, checkpoint_id=str(tmp))  # a collective: a failed write raises on every rank
        except (Exception, dcp.CheckpointException) as exc:  # noqa: BLE001 - DCP wraps the ranks' errors
            error = exc
    if error is None:
        try:
            _save_file(_rng_state(), tmp / f"rng_rank{rank}.pt")
            if rank == 0:
                if export:
                    _save_file(export, tmp / EXPORT_FILE)
                (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
        except OSError as exc:
            error = exc
    if not all_ranks_ok(error is None):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(root)
        kept = f"{previous.name} is intact and --resume continues from it" if previous else "no earlier checkpoint"
        why = _failure_reason(error) if error is not None else "another rank could not write its part"
        raise OutputError(f"saving checkpoint step {step} in {root} failed ({why}); {kept}; free some space "
                          f"and resume") from error
    if rank == 0:
        if final.exists():  # the same step saved again: replace it
            os.replace(final, root / f".old_{final.name}")
        os.replace(tmp, final)
        _fsync_dir(root)
        _remove_leftovers(root)
        _prune(root, keep)
        log.info("saved checkpoint %s", final)
    barrier()
    return final


def _failure_reason(exc: BaseException) -> str:
    """The first file-system error inside ``exc`` (DCP keeps each rank's under ``failures``)."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            return reason(e)
        for failure in (getattr(e, "failures", None) or {}).values():
            todo.append(failure[0] if isinstance(failure, tuple) else failure)
        todo += [e.__cause__, e.__context__]
    return first_line(exc)[:200]


def _load_failure(exc: BaseException) -> tuple[str, bool]:
    """One line on why ``dcp.load`` failed (the lowest rank's own error, not DCP's wrapper whose
    text is a traceback), and whether it is a key or shape mismatch rather than damage."""
    failures = getattr(exc, "failures", None) or {}
    inner = failures[min(failures)] if failures else exc
    inner = inner[0] if isinstance(inner, tuple) else inner
    text = str(inner).strip()
    line = text.splitlines()[0].split(". ")[0].rstrip(".") if text else ""  # its first sentence
    if line.startswith(MISMATCH):
        return line[:300], True
    line = f"{type(inner).__name__}: {line}" if line else type(inner).__name__
    return (line if len(line) <= 200 else line[:199] + "…"), False


def load_checkpoint(path: str | Path, state: dict[str, Any], *, rank: int) -> dict[str, Any]:
    """Load ``state`` (the same structure as saved) in place from checkpoint ``path``, restore this
    rank's RNG states; returns the trainer state."""
    path = Path(path)
    trainer_state = read_trainer_state(path)
    try:
        dcp.load(state, checkpoint_id=str(path), planner=_StrictLoadPlanner())
    except (Exception, dcp.CheckpointException) as exc:  # noqa: BLE001 - DCP's own is a BaseException
        why, mismatch = _load_failure(exc)
        if mismatch:
            raise CheckpointLoadError(f"the training checkpoint {path} does not fit this model/config ({why}); "
                                      f"resume with the config it was written with", why, True) from exc
        raise CheckpointLoadError(f"cannot load the training checkpoint {path} ({why}); it is damaged: delete it "
                                  f"to resume from the one before it", why, False) from exc
    rng = path / f"rng_rank{rank}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    else:
        log.warning("%s has no RNG state for rank %d (different world size?); keeping the current one", path, rank)
    return trainer_state
