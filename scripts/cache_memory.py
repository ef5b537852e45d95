#!/usr/bin/env python
"""Memory of the KV cache's bookkeeping at a config's full geometry, without running the model.

    python scripts/cache_memory.py --config_path configs/infinity_rope.yaml [--blocks 12] [--device cuda]

Builds the config's cache (layers, heads, head width, latent grid, window, sink, block, policy),
fills it with random keys and values, and runs the bookkeeping of a rollout: per block
``prepare()`` (held keys turned to their new positions) and ``commit()`` (the block's frames
entering sink and ring: bookkeeping only, the clean pass wrote them), with a KV Flush (kept
frames moved to the front of the ring) and a RoPE Cut on the way. It prints the cache's size
and, per block, the peak memory above what was resident before the bookkeeping: the temporaries
of turning and moving keys, which add to the rollout's peak on top of the weights, the cache and
the forward's activations (``scripts/peak_memory.py`` counts the whole pipeline). On a CPU: the
peak resident set size (``VmHWM``, reset through ``/proc/self/clear_refs``; the script restarts
itself with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors go back to the OS at once); on
a GPU: ``torch.cuda.max_memory_allocated``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from model.vae_config import compression_factors, run_config  # noqa: E402
from pipeline.generate import resolve_device  # noqa: E402
from utils.config import load_config, torch_dtype  # noqa: E402
from utils.errors import user_errors_exit  # noqa: E402

MIB = 2 ** 20


def _proc(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


class Peak:
    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        return _proc("VmRSS")

    def read(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return _proc("VmHWM")


@user_errors_exit
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_path", default="configs/infinity_rope.yaml")
    p.add_argument("--blocks", type=int, default=12)
    p.add_argument("--device", default="cpu")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    device = resolve_device(args.device)  # one line if there is no such device
    if device.type == "cpu" and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))

    from model.wan import WanDiT
    from omegaconf import OmegaConf

    cfg = load_config(args.config_path, args.overrides)
    with torch.device("meta"):
        dit = WanDiT(**OmegaConf.to_container(cfg.model, resolve=True))
    spatial, _ = compression_factors(run_config(cfg))
    latent_hw = (cfg.height // spatial, cfg.width // spatial)
    dtype = torch_dtype(cfg.dtype)
    cache = dit.new_cache(batch_size=1, height=latent_hw[0], width=latent_hw[1],
                          block_frames=int(cfg.num_frame_per_block), local_attn_size=int(cfg.local_attn_size),
                          sink_size=int(cfg.sink_size), policy=str(cfg.position_policy),
                          cut_offset=int(cfg.rope_cut_offset), dtype=dtype, device=device)
    torch.manual_seed(0)
    cache.k_rot.normal_()
    cache.v.normal_()
    flush_at = args.blocks // 2
    cut_at = min(args.blocks - 1, flush_at + 2)
    peak, rows = Peak(device), []
    start = time.perf_counter()
    for block in range(args.blocks):
        before = peak.start()
        if block in (flush_at, cut_at):
            cache.flush(int(cfg.flush_keep))
        if block == cut_at:
            cache.cut()
        cache.prepare()
        cache.commit(int(cfg.num_frame_per_block))
        rows.append(peak.read() - before)
    seconds = time.perf_counter() - start
    print(f"config {args.config_path} · {device.type} · {dit.num_layers} layers × {dit.num_heads} heads × "
          f"{dit.head_dim} · latent grid {cache.grid} ({cache.frame_tokens} tokens per frame) · window "
          f"{cache.capacity} frames · {str(dtype).replace('torch.', '')}")
    print(f"KV cache: {cache.memory_bytes() / MIB:,.0f} MiB")
    print(f"bookkeeping peak above resident, MiB per block (flush before block {flush_at}, flush + cut before "
          f"block {cut_at}): " + ", ".join(f"{r / MIB:,.0f}" for r in rows))
    print(f"largest: {max(rows) / MIB:,.0f} MiB · {1e3 * seconds / args.blocks:.1f} ms per block of bookkeeping")
    return 0


if __name__ == "__main__":
    sys.exit(main())
