#!/usr/bin/env python
"""Peak GPU memory of inference at a config's full size, estimated on any machine (no GPU).

    python scripts/peak_memory.py --config_path configs/infinity_rope.yaml [--blocks 8] [--skip_vae]
    python scripts/peak_memory.py --device cuda   # on a GPU: the same count next to the allocator's own

The config's DiT and VAE are built with fake tensors (torch's ``FakeTensorMode``: shapes,
dtypes and strides, no data, no arithmetic), and the real inference path runs on them: the
rollout over the KV cache (a KV Flush and a RoPE Cut on the way), the streaming VAE decode of
every block and the frames' uint8 conversion, as the eager DiT runs on a GPU (the VAE laid out
as ``vae_channels_last`` says for the device counted for: fake tensors stand for a GPU). A dispatch
mode counts the bytes of every tensor storage from the operator that creates it until Python
frees it, each rounded up to 512 bytes as CUDA's caching allocator rounds a block: the number
``torch.cuda.max_memory_allocated`` reports, less what is not a tensor (cuBLAS/cuDNN
workspaces, tens of MiB) and what a compiled or graphed forward plans differently.

It prints what stays resident after the first block (weights, KV cache, text keys/values),
the peak of each stage above it, the overall peak with the operator that reached it, the
largest tensors alive at that moment, and each stage's memory traffic per block: the bytes its
operators read and write, each as one unfused kernel would (a floor for the eager path's time at
the GPU's bandwidth; a compiled stage fuses some of them away). About a minute on a CPU at full
size, so it can run in CI: a change that adds a full-size temporary shows up here before it reaches a GPU. With ``--device cuda`` the
models get random weights on the GPU and run for real under the same count, and the report
adds ``torch.cuda.max_memory_allocated`` of the same blocks: the difference is what the count
cannot see. It also records CUDA's allocator history over those blocks and lists what is alive
at the allocator's own peak, by the line of this repository that asked for it.
"""
from __future__ import annotations

import argparse
import sys
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402
from torch.utils.weak import WeakIdKeyDictionary  # noqa: E402

from pipeline.generate import resolve_device  # noqa: E402
from utils.config import load_config, torch_dtype  # noqa: E402
from utils.errors import user_errors_exit  # noqa: E402

MIB = 2 ** 20
ALLOCATOR_ROUND = 512  # CUDA's caching allocator hands out multiples of 512 bytes


def allocator_bytes(nbytes: int) -> int:
    return -(-nbytes // ALLOCATOR_ROUND) * ALLOCATOR_ROUND


@dataclass
class Alloc:
    nbytes: int
    what: str   # operator, shape and dtype of the tensor that created the storage
    stage: str
    serial: int


@dataclass
class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages alive, as a GPU's caching allocator counts them.

    Every operator's outputs are looked at; a storage seen for the first time is counted (its
    size rounded up to 512 bytes) until it is garbage-collected. Views and in-place results
    share their input's storage and count once. ``stage`` labels what runs (set it between
    stages); ``mark()`` starts a measurement: storages alive then are "resident", the peak and
    the tensors alive at it are kept from then on."""

    stage: str = "build"
    now: int = 0
    peak: int = 0
    peak_at: str = ""
    stage_peaks: dict = field(default_factory=dict)
    at_peak: list = field(default_factory=list)
    _serial: int = 0
    _mark: int | None = None
    paused: bool = False  # ops run while paused are not counted (see as_on_a_gpu)
    traffic: dict = field(default_factory=dict)  # stage → {operator: bytes it read and wrote}, from mark()

    def __post_init__(self):
        super().__init__()
        self.allocs = WeakIdKeyDictionary()  # storage → Alloc

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.paused:
            return out
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        for t in outs:
            self._track(t, func)
        if self._mark is not None and outs:
            self._count_traffic(func, [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)], outs)
        return out

    def _count_traffic(self, func, ins: list, outs: list) -> None:
        """The bytes an operator reads (its tensor arguments) and writes (its outputs), as an
        unfused kernel moves them through memory: views (in place too) and allocations move none;
        ``copy_``, ``fill_``, ``zero_`` and ``out=`` do not read what they overwrite; a broadcast
        operand counts its storage, not its expanded size."""
        name = func.__name__.split(".")[0]
        if name.startswith(("empty", "new_empty")) or torch.Tag.inplace_view in func.tags:
            return  # an allocation, or a view changed in place (t_, unsqueeze_, ...)
        storages = {t.untyped_storage()._cdata for t in ins}
        if not func._schema.is_mutable and all(t.untyped_storage()._cdata in storages for t in outs):
            return  # a view (or an alias) of an input
        if name in ("copy_", "fill_", "zero_"):  # write-only
            ins = ins[1:]
        if func._overloadname.startswith("out"):  # an out= variant writes its out tensor, does not read it
            ins = [t for t in ins if not any(t is o for o in outs)]
        self.moved(name, sum(min(t.numel() * t.element_size(), t.untyped_storage().nbytes()) for t in (*ins, *outs)))

    def moved(self, name: str, nbytes: int) -> None:
        """Count ``nbytes`` of memory traffic for operator ``name`` in the current stage."""
        if self._mark is not None:
            ops = self.traffic.setdefault(self.stage, {})
            ops[name] = ops.get(name, 0) + nbytes

    def _track(self, t: torch.Tensor, func) -> None:
        storage = t.untyped_storage()
        if storage in self.allocs:
            return
        nbytes = allocator_bytes(storage.nbytes())
        self._serial += 1
        self.allocs[storage] = Alloc(nbytes, f"{func.__name__} {list(t.shape)} {str(t.dtype).replace('torch.', '')}",
                                     self.stage, self._serial)
        weakref.finalize(storage, self._free, nbytes)
        self.now += nbytes
        self.stage_peaks[self.stage] = max(self.stage_peaks.get(self.stage, 0), self.now)
        if self._mark is not None and self.now > self.peak:
            self.peak, self.peak_at = self.now, f"{func.__name__} in {self.stage}"
            self.at_peak = sorted(((a.nbytes, a.what, a.stage) for a in self.allocs.values() if a.serial > self._mark),
                                  reverse=True)

    def _free(self, nbytes: int) -> None:
        self.now -= nbytes

    def mark(self) -> int:
        """Start measuring: returns the bytes resident now; peaks are kept from here."""
        self._mark, self.peak, self.at_peak, self.stage_peaks, self.traffic = self._serial, self.now, [], {}, {}
        return self.now

    def bytes_of(self, tensors) -> int:
        """Counted bytes of the distinct storages among ``tensors`` (e.g. a module's weights)."""
        seen = {}
        for t in tensors:
            alloc = self.allocs.get(t.untyped_storage())
            if alloc is not None:
                seen[id(alloc)] = alloc.nbytes
        return sum(seen.values())


def allocator_peak(trace: list[dict], top: int = 8) -> dict:
    """The peak of one device's CUDA allocator history (``torch.cuda.memory._snapshot()
    ["device_traces"][i]``: ``alloc`` / ``free_completed`` events with their size, address and
    Python frames) above what was allocated when the history started, and what was alive at it,
    summed by the innermost frame in this repository (the line that asked for the memory; the
    library frame under it when there is one). Frees of older allocations are ignored."""
    def name(frame: dict) -> str:
        path = Path(frame["filename"])
        path = path.relative_to(REPO) if path.is_relative_to(REPO) else path.name
        return f"{path}:{frame['line']} {frame['name']}"

    def site(frames: list[dict]) -> str:  # innermost first
        if not frames:
            return "?"
        ours = next((f for f in frames if Path(f["filename"]).is_relative_to(REPO)), None)
        if ours is None or ours is frames[0]:
            return name(ours or frames[0])
        return f"{name(ours)} → {name(frames[0])}"

    def replay(stop: int | None = None):
        live, now, best, best_at = {}, 0, 0, -1
        for i, e in enumerate(trace[:stop]):
            if e["action"] == "alloc":
                live[e["addr"]] = e
                now += e["size"]
            elif e["action"] == "free_completed" and e["addr"] in live:
                now -= live.pop(e["addr"])["size"]
            if now > best:
                best, best_at = now, i
        return live, best, best_at

    _, peak, at = replay()
    alive, _, _ = replay(at + 1)
    sites: dict[str, int] = {}
    for e in alive.values():
        key = site(e.get("frames", []))
        sites[key] = sites.get(key, 0) + e["size"]
    return {"peak_above_start": peak, "events": len(trace),
            "alive_at_peak": sorted(((n, k) for k, n in sites.items()), reverse=True)[:top]}


def tensors_in(items):
    """The tensors among ``items``, lists, tuples and Nones included (e.g. a cache's buffers)."""
    for item in items:
        if isinstance(item, torch.Tensor):
            yield item
        elif isinstance(item, (list, tuple)):
            yield from tensors_in(item)


def record_history():
    """Start CUDA's allocator history (every allocation with its Python stack); the returned
    call stops it and gives :func:`allocator_peak` of it, or the reason there is none."""
    try:
        torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
    except Exception as exc:  # noqa: BLE001 - a diagnostic: the measurement goes on without it
        reason = f"{type(exc).__name__}: {exc}"
        return lambda: {"error": reason}

    base = torch.cuda.memory_allocated()

    def stop() -> dict:
        try:
            snapshot = torch.cuda.memory._snapshot()
            return dict(allocator_peak(snapshot["device_traces"][torch.cuda.current_device()]), base=base)
        except Exception as exc:  # noqa: BLE001
            return {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
    return stop


def as_on_a_gpu(live: "LiveBytes"):
    """``F.rms_norm`` counted as a GPU runs it: one fused kernel (``aten::_fused_rms_norm``) that
    allocates its output and a float32 scale per row. On a CPU, and on fake tensors like on any
    tensor subclass, the op takes its composite form, whose full-size float32 temporaries a GPU
    never allocates (the VAE's fused norms would count 1.2 GiB too much at 480×832): the value is
    computed with the count paused and copied into what the fused kernel would allocate."""
    from unittest import mock

    real = torch.nn.functional.rms_norm

    def fused(input, normalized_shape, weight=None, eps=None):
        normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        out = torch.empty_like(input)
        torch.empty((*input.shape[:input.dim() - len(normalized_shape)], *[1] * len(normalized_shape)),
                    dtype=torch.float32, device=input.device)  # the per-row scale, dropped at once
        live.paused = True
        try:
            out.copy_(real(input, normalized_shape, weight, eps))
        finally:
            live.paused = False
        live.moved("rms_norm", 2 * out.numel() * out.element_size())  # the kernel reads the input, writes out
        return out

    return mock.patch.object(torch.nn.functional, "rms_norm", fused)


def estimate(cfg, blocks: int, with_vae: bool = True, device: str | None = None) -> dict:
    """Run ``blocks`` blocks of the eager inference path on fake tensors (``device`` None) or on
    ``device`` with random weights; returns every number."""
    import contextlib

    from omegaconf import OmegaConf
    from torch._subclasses.fake_tensor import FakeTensorMode

    from model.vae import WanVAE
    from model.wan import WanDiT
    from pipeline.rollout import BlockSpec, RolloutSettings, rollout
    from utils.video import _uint8_frames

    dtype = torch_dtype(cfg.dtype)
    settings = RolloutSettings.from_config(cfg)
    flush_at = max(1, blocks // 2)
    cut_at = min(blocks - 1, flush_at + 2)
    events = ["start"] + [("flush" if i == flush_at else "cut" if i == cut_at else None) for i in range(1, blocks)]
    live = LiveBytes()
    default_dtype = torch.get_default_dtype()
    cuda = device is not None and torch.device(device).type == "cuda"
    # the VAE as build_models lays it out on the device counted for (fake tensors count for a GPU)
    channels_last = cfg.vae_channels_last is True or (cfg.vae_channels_last == "auto" and (device is None or cuda))
    where = torch.device(device) if device is not None else contextlib.nullcontext()
    gpu_norms = contextlib.nullcontext() if cuda else as_on_a_gpu(live)  # a GPU runs its own fused kernel
    with FakeTensorMode() if device is None else contextlib.nullcontext(), where, live, gpu_norms:
        torch.set_default_dtype(dtype)  # built directly in the run's dtype, as .to(dtype) leaves it
        try:
            dit = WanDiT(**OmegaConf.to_container(cfg.model, resolve=True)).eval().requires_grad_(False)
            dit.pack_qkv()  # as build_models
            vae_cfg = OmegaConf.to_container(cfg.tiny_vae, resolve=True) if cfg.tiny_vae is not None else {}
            vae = WanVAE.from_config(vae_cfg).eval()
            if channels_last:
                vae.to_channels_last().fuse()
                if cuda:  # as build_models: cuDNN's autotuned algorithms, and their workspaces
                    torch.backends.cudnn.benchmark = True
        finally:
            torch.set_default_dtype(default_dtype)
        latent_shape = vae.latent_shape(int(cfg.height), int(cfg.width))
        live.stage = "KV cache"
        cache = settings.new_cache(dit, 1, latent_shape[1:], dtype=dtype)
        live.stage = "text embedding"
        context = torch.zeros(1, int(cfg.model.text_len), int(cfg.model.text_dim), dtype=dtype)
        decoder = vae.streaming_decoder()
        specs = (BlockSpec(event, context) for event in events)
        resident = {}
        live.stage = "DiT"
        for i, (_, latents) in enumerate(rollout(dit, cache, settings, specs, latent_shape=latent_shape)):
            if with_vae:
                live.stage = "VAE decode"
                frames = decoder.decode_block(latents)[0]
                live.stage = "uint8 frames"  # queued on the GPU as the render does (PendingFrames)
                u8 = _uint8_frames(frames)
                del frames, u8
            if i == 0:  # warmed up: the text keys/values and the decoder's causal cache exist
                live.stage = "resident"
                resident = {"DiT weights": live.bytes_of(dit.parameters()),
                            "VAE weights": live.bytes_of(vae.parameters()),
                            "KV cache (held keys/values, text keys/values)": live.bytes_of(
                                tensors_in([cache.k_rot, cache.v, cache.k_raw, cache.text_kv])),
                            "VAE causal cache": live.bytes_of(tensors_in(decoder._cache))}
                resident["other"] = live.now - sum(resident.values())
                start = live.mark()
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    history = record_history()
            live.stage = "DiT"
    measured = history_peak = None
    if cuda:
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated()
        history_peak = history()
    return {"measured": measured, "history": history_peak, "device": device or "fake", "resident": resident,
            "vae_layout": "channels-last, fused" if channels_last else "contiguous",
            "resident_bytes": start,
            "peak": live.peak, "peak_at": live.peak_at, "stage_peaks": live.stage_peaks, "at_peak": live.at_peak[:8],
            "traffic": live.traffic,
            "cache_bytes": cache.memory_bytes(), "events": events, "latent_shape": latent_shape, "dtype": dtype}


def report(cfg, r: dict, config_path: str) -> str:
    c, h, w = r["latent_shape"]
    events = ", ".join(f"{e} before block {i}" for i, e in enumerate(r["events"]) if e in ("flush", "cut"))
    lines = [f"config {config_path} · {cfg.height}×{cfg.width} (latent {c}×{h}×{w}) · "
             f"{str(r['dtype']).replace('torch.', '')} · eager DiT, VAE {r['vae_layout']} · "
             f"{len(r['events'])} blocks ({events}) · "
             + ("fake tensors" if r["device"] == "fake" else f"random weights on {r['device']}")
             + ", sizes rounded as CUDA's caching allocator rounds them",
             f"resident after the first block: {r['resident_bytes'] / MIB:,.0f} MiB"]
    lines += [f"  {name:<54} {nbytes / MIB:>8,.0f} MiB" for name, nbytes in r["resident"].items()]
    lines.append("peak of each stage after the first block, MiB above resident: " + ", ".join(
        f"{stage} {(peak - r['resident_bytes']) / MIB:,.0f}" for stage, peak in r["stage_peaks"].items()))
    lines.append(f"peak: {r['peak'] / MIB:,.0f} MiB = {r['peak'] / 2 ** 30:.2f} GiB (reached by {r['peak_at']})")
    lines.append("largest tensors alive at the peak besides the resident ones: " + "; ".join(
        f"{what} ({nbytes / MIB:,.1f} MiB, {stage})" for nbytes, what, stage in r["at_peak"]))
    steady = len(r["events"]) - 1  # the blocks after the first, where the traffic is counted
    for stage, ops in r["traffic"].items():
        unit, size = ("GiB", 2 ** 30) if sum(ops.values()) / steady >= 2 ** 30 else ("MiB", MIB)
        top = sorted(ops.items(), key=lambda item: -item[1])[:6]
        lines.append(f"memory traffic of {stage}, per block: {sum(ops.values()) / steady / size:,.1f} {unit} read and "
                     "written by its operators, unfused (most: " + ", ".join(
                         f"{op} {nbytes / steady / size:,.1f}" for op, nbytes in top) + ")")
    if r["measured"] is not None:
        lines.append(f"torch.cuda.max_memory_allocated of the same blocks: {r['measured'] / MIB:,.0f} MiB "
                     f"({(r['measured'] - r['peak']) / MIB:+,.0f} MiB: workspaces and what else the count misses)")
    h = r.get("history")
    if h and "error" in h:
        lines.append(f"allocator history: none ({h['error']})")
    elif h:
        lines.append(f"allocator history of the same blocks ({h['events']:,} events): peak "
                     f"{(h['base'] + h['peak_above_start']) / MIB:,.0f} MiB ({h['base'] / MIB:,.0f} allocated after "
                     f"the first block + {h['peak_above_start'] / MIB:,.0f}); allocated since then and alive at that "
                     f"peak, by the line that asked (ours → the library's): " + "; ".join(
                         f"{n / MIB:,.1f} MiB {where}" for n, where in h["alive_at_peak"]))
    return "\n".join(lines)


@user_errors_exit
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_path", default="configs/infinity_rope.yaml")
    p.add_argument("--blocks", type=int, default=8, help="blocks to roll out (≥ 4: a flush and a cut on the way)")
    p.add_argument("--skip_vae", action="store_true", help="the DiT rollout alone")
    p.add_argument("--device", default=None, help="run for real on this device (random weights) instead of on "
                                                  "fake tensors, e.g. cuda")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    cfg = load_config(args.config_path, args.overrides)
    start = time.perf_counter()
    device = str(resolve_device(args.device)) if args.device else None  # one line if there is no such device
    r = estimate(cfg, max(4, args.blocks), with_vae=not args.skip_vae, device=device)
    print(report(cfg, r, args.config_path))
    print(f"({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
