#!/usr/bin/env python
"""How much of the mp4 writing sits on the critical path, with and without the writer thread.

    python scripts/benchmark_writer.py --height 480 --width 832 --blocks 40 --gpu_ms 300

Each block is 12 frames of smooth moving content (what x264 sees from the decoder, roughly) at
the given size. Between writes the host waits ``--gpu_ms`` (the DiT and VAE working on the next
block: on a GPU the host thread is idle then, so a sleep stands in for it). Reported: the time a
``write()`` call holds the caller per block (uint8 frames already made) and the wall time per
block, for ``VideoWriter(background=False)`` (frames piped to ffmpeg in line) and ``True`` (a
thread pipes them while the next block is made).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils.video import VideoWriter  # noqa: E402


def frames(block: int, height: int, width: int, n: int = 12) -> np.ndarray:
    t = (block * n + np.arange(n))[:, None, None]
    y, x = np.arange(height)[None, :, None], np.arange(width)[None, None, :]
    r = 128 + 100 * np.sin(x / 37.0 + t / 9.0)
    g = 128 + 100 * np.sin(y / 23.0 - t / 7.0)
    b = 128 + 60 * np.sin((x + y) / 51.0 + t / 5.0)
    return np.stack(np.broadcast_arrays(r, g, b), axis=-1).astype(np.uint8)


def run(background: bool, args) -> dict:
    blocks = [frames(i, args.height, args.width) for i in range(args.blocks)]
    held, walls = [], []
    with tempfile.TemporaryDirectory() as tmp:
        with VideoWriter(Path(tmp) / "w.mp4", 16, args.width, args.height, background=background) as writer:
            for block in blocks:
                t0 = time.perf_counter()
                time.sleep(args.gpu_ms / 1000)
                t1 = time.perf_counter()
                writer.write(block)
                t2 = time.perf_counter()
                held.append(t2 - t1)
                walls.append(t2 - t0)
            t3 = time.perf_counter()
        close = time.perf_counter() - t3
    steady = slice(2, None)
    return {"write_ms": 1000 * statistics.median(held[steady]), "block_ms": 1000 * statistics.median(walls[steady]),
            "close_ms": 1000 * close}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--blocks", type=int, default=40)
    p.add_argument("--gpu_ms", type=float, default=300.0, help="host idle time per block (GPU busy)")
    args = p.parse_args()
    print(f"{args.width}x{args.height}, 12 frames per block, {args.blocks} blocks, {args.gpu_ms:g} ms of GPU work "
          f"per block\n\n| writer | write() holds the caller, ms/block | wall ms/block | close ms |\n|---|---:|---:|---:|")
    for name, background in (("in line (sync_write)", False), ("thread (default)", True)):
        r = run(background, args)
        print(f"| {name} | {r['write_ms']:.1f} | {r['block_ms']:.1f} | {r['close_ms']:.0f} |")


if __name__ == "__main__":
    main()
