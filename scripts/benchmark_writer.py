#!/usr/bin/env python
"""How much of the writing sits on the critical path: in line, with the writer thread piping
finished frames, and with the thread also finishing them (``PendingFrames``: uint8, subtitle).

    python scripts/benchmark_writer.py --height 480 --width 832 --blocks 40 --gpu_ms 300

Each block is 12 frames of smooth moving content as the decoder gives them (float ``[T, 3, H, W]``
in [-1, 1]) with a subtitle burned in. Between writes the host waits ``--gpu_ms`` (the DiT and
VAE working on the next block: on a GPU the host thread is idle then, so a sleep stands in for
it). Reported per block: the time the caller is held (uint8 conversion, subtitle, ``write()``)
and the wall time. On a GPU the default path also queues the device→host copy instead of
waiting for it, which a CPU cannot show.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils.video import PendingFrames, SubtitleRenderer, VideoWriter, frames_to_uint8  # noqa: E402

SUBTITLE = "the fox jumps over the fence"
MODES = (("in line (sync_write)", "inline"), ("thread pipes finished frames (before)", "pipe"),
         ("thread finishes and pipes them (default)", "pending"))


def frames(block: int, height: int, width: int, n: int = 12) -> torch.Tensor:
    t = (block * n + np.arange(n))[:, None, None]
    y, x = np.arange(height)[None, :, None], np.arange(width)[None, None, :]
    r = 0.8 * np.sin(x / 37.0 + t / 9.0)
    g = 0.8 * np.sin(y / 23.0 - t / 7.0)
    b = 0.5 * np.sin((x + y) / 51.0 + t / 5.0)
    return torch.from_numpy(np.stack(np.broadcast_arrays(r, g, b), axis=1).astype(np.float32))


def run(mode: str, args) -> dict:
    blocks = [frames(i, args.height, args.width) for i in range(args.blocks)]
    renderer = SubtitleRenderer(args.width, args.height)
    held, walls = [], []
    with tempfile.TemporaryDirectory() as tmp:
        with VideoWriter(Path(tmp) / "w.mp4", 16, args.width, args.height, background=mode != "inline") as writer:
            for block in blocks:
                t0 = time.perf_counter()
                time.sleep(args.gpu_ms / 1000)
                t1 = time.perf_counter()
                if mode == "pending":
                    writer.write(PendingFrames(block, finish=lambda a: renderer.render(a, SUBTITLE)))
                else:
                    writer.write(renderer.render(frames_to_uint8(block), SUBTITLE))
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
          f"per block\n\n| writer | the caller is held, ms/block | wall ms/block | close ms |\n|---|---:|---:|---:|")
    for name, mode in MODES:
        r = run(mode, args)
        print(f"| {name} | {r['write_ms']:.1f} | {r['block_ms']:.1f} | {r['close_ms']:.0f} |")


if __name__ == "__main__":
    main()
