"""torchrun / single-process setup, FSDP2 sharding and small collective helpers for training.

``init_distributed`` works under ``torchrun`` (NCCL on GPU, gloo on CPU) and without it (one
process, world size 1, an in-memory store: no port is opened). Models are sharded with FSDP2:
``fully_shard`` on every transformer block, then on the root module, with a
``MixedPrecisionPolicy`` (compute in ``param_dtype``, fp32 master weights, gradients reduced in
``reduce_dtype``). Forward inputs are *not* cast by FSDP: the DiT keeps its residual stream,
timesteps and RoPE tables in float32 and casts what it feeds to its linear layers itself.
"""
from __future__ import annotations

import datetime
import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from utils.errors import ConfigError, UserError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    mesh: DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "cuda", timeout_minutes: float = 30.0) -> DistInfo:
    """Join the torchrun job (or make a one-process group) and build a 1-D device mesh.

    ``device``: ``cuda`` (NCCL; one GPU per process, ``LOCAL_RANK``) or ``cpu`` (gloo)."""
    if device not in ("cuda", "cpu"):
        raise ConfigError(f"device must be cuda or cpu, not '{device}'")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but this machine has no usable CUDA GPU; set device=cpu "
                          "(tiny configs only) or run on a GPU node")
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev, backend = torch.device("cuda", local_rank), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if not dist.is_initialized():
        if under_torchrun:
            dist.init_process_group(backend, timeout=timeout, device_id=dev if device == "cuda" else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh(dev.type, (world,), mesh_dim_names=("dp",))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev, backend=backend, mesh=mesh)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_ranks_ok(ok: bool) -> bool:
    """True on every rank iff ``ok`` is true on every rank (a collective), so that all ranks take
    the same path after a step that can fail on some of them."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return ok
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


class AnotherRankFailed(UserError):
    """Raised on the ranks that did their part when a step failed on another rank (whose own
    error says why), so that every rank stops instead of waiting in the next collective."""


def on_main_rank(fn: Callable[[], T], what: str) -> T | None:
    """Run ``fn`` on rank 0 only, then agree on the outcome (a collective: every rank calls it).
    Returns ``fn``'s result on rank 0 and None elsewhere; when ``fn`` raised, rank 0 re-raises
    its error and the other ranks raise :class:`AnotherRankFailed` (``what``: what rank 0 did)."""
    result, error = None, None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks know
            error = exc
    if not all_ranks_ok(error is None):
        if error is not None:
            raise error
        raise AnotherRankFailed(f"rank 0 failed {what}; its error line says why")
    return result


def mixed_precision(param_dtype: torch.dtype | None, reduce_dtype: torch.dtype | None = torch.float32
                    ) -> MixedPrecisionPolicy:
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)


def shard_dit(model: torch.nn.Module, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy,
              reshard_after_forward: bool = True) -> torch.nn.Module:
    """FSDP2: ``fully_shard`` each transformer block, then the root (embeddings, head)."""
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    return model


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts (base seed, rank, step, purpose...): the same parts give the
    same seed on every machine and Python version, different parts independent streams."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seeded_generator(device: torch.device | str, *parts) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(*parts))
    return g


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Mean of each scalar over the ranks (for logging); every rank must pass the same keys."""
    if not values or not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    reduced = dict(zip(keys, t.tolist()))
    return {k: reduced[k] for k in values}  # the caller's order
