"""Peak memory of one streaming VAE decode, eager against the compiled decoder, counted on the CPU.

The full Wan2.1 VAE (random weights, channels-last and fused as on a GPU) decodes a few blocks at a
small resolution; every allocation and free of the measured block is recorded by torch.profiler's
memory events, and the peak is reported with the causal cache it starts from, in units of one
activation of the decoder's last level (96 channels × 4 frames × the video's pixels): those scale
with the resolution, so the units carry over to 480×832, where one is 292.5 MiB in bf16
(docs/PERFORMANCE.md §21-§22). A compiled variant compiles the decoder with inductor on the CPU first
(a minute or two): its buffers are planned by the same scheduler as on a GPU.

    python scripts/vae_decode_memory.py --latent 8 12 --variants eager compiled
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.vae import WanVAE  # noqa: E402

log = logging.getLogger("vae_decode_memory")


def measured_peak(decode, before, block) -> int:
    """Bytes alive at the peak of ``decode(block)`` above what was alive when it began. The block
    before is decoded under the profiler too: it makes the cache the measured block frees, and the
    profiler sees only the frees of what it saw allocated."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        decode(before)
        with torch.profiler.record_function("measured"):
            decode(block)
    events = list(prof.profiler.kineto_results.events())
    mark = next(e for e in events if e.name() == "measured")
    alive, base, peak = 0, None, 0
    for event in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        if base is None and event.start_ns() >= mark.start_ns():
            base = peak = alive
        alive += event.nbytes()
        if base is not None and event.start_ns() <= mark.end_ns():
            peak = max(peak, alive)
    return peak - base


def run(variant: str, latent: tuple[int, int], blocks: int, block: int) -> dict:
    """Decode ``blocks`` blocks of ``block`` latent frames; measure the last."""
    torch.manual_seed(0)
    vae = WanVAE.from_config({}).to_channels_last().fuse()  # Wan2.1's geometry: diffusers' defaults
    if variant == "compiled":
        vae.compile_decoder()
    h, w = latent
    z = torch.randn(1, block * blocks, vae.z_dim, h, w)
    stream = vae.streaming_decoder()
    start = time.perf_counter()
    for i in range(0, block * (blocks - 2), block):  # the cache fills and a compiled decoder compiles
        stream.decode_block(z[:, i:i + block])
    warm = time.perf_counter() - start
    peak = measured_peak(stream.decode_block, z[:, -2 * block:-block], z[:, -block:])
    cache = sum(c.nbytes for c in stream._cache if isinstance(c, torch.Tensor))  # as the next block finds it
    # one activation of the last level: base_dim channels, one latent frame's video frames, full size
    unit = (vae.vae.config.base_dim * vae.temporal_factor * (h * vae.spatial_factor) * (w * vae.spatial_factor)
            * z.element_size())
    return {"variant": variant, "warm_s": warm, "cache": cache / unit, "peak": peak / unit,
            "total": (cache + peak) / unit, "unit_mib": unit / 2**20}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latent", type=int, nargs=2, default=(8, 12), metavar=("H", "W"),
                        help="latent height and width (pixels: 8 times)")
    parser.add_argument("--config_path", default=str(Path(__file__).resolve().parents[1] / "configs" / "default.yaml"),
                        help="the config whose num_frame_per_block sets the block")
    parser.add_argument("--blocks", type=int, default=5, help="blocks decoded; the last is measured")
    parser.add_argument("--variants", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    args = parser.parse_args(argv)
    if args.blocks < 3 or min(args.latent) < 1:
        parser.error("--blocks must be at least 3 and --latent positive")
    from utils.config import load_config
    from utils.errors import ConfigError

    try:
        block = int(load_config(args.config_path).num_frame_per_block)
    except ConfigError as exc:
        parser.exit(2, f"error: {exc}\n")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print("| decoder | cache at the block's start | peak above it | peak in all | warm-up s |")
    print("|---|---:|---:|---:|---:|")
    for variant in args.variants:
        r = run(variant, tuple(args.latent), args.blocks, block)
        print(f"| {variant} | {r['cache']:.1f} | {r['peak']:.1f} | {r['total']:.1f} | {r['warm_s']:.1f} |", flush=True)
    print(f"\nunits: one activation of the last level, here {r['unit_mib']:.2f} MiB (float32; blocks of {block}); "
          "at 480×832 in bf16, 292.5 MiB")


if __name__ == "__main__":
    main()
