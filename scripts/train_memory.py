#!/usr/bin/env python
"""Per-GPU memory of a Self-Forcing DMD run at another world size, from a measured 1-GPU run.

    python train.py --config_path configs/self_forcing_dmd.yaml --logdir logs/probe --disable-wandb \\
        random_init=true train.max_iters=3 train.total_batch_size=1 ...
    python scripts/train_memory.py --config_path configs/self_forcing_dmd.yaml --metrics logs/probe/metrics.jsonl --world 8

What FSDP2 shards over the ranks (``utils/distributed.shard_dit``): the generator's and the
critic's fp32 master weights, fp32 gradients and the two AdamW moments (16 bytes per parameter
each), and the generator's fp32 EMA (4 bytes per parameter). What every rank keeps whole: the
frozen real score (in the compute dtype), the text encoder (unless offloaded), the KV cache and
the activations of its own clips (batch per rank is the same at any world size). So

    per GPU at world W ≈ measured peak at W = 1 − (1 − 1/W) × sharded bytes

(an estimate: allocator slack and the all-gathered block being computed are in the measured
peak already). Parameter counts come from the config (models built on the meta device).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model.wan import WanDiT  # noqa: E402
from utils.config import load_config  # noqa: E402

GIB = 2 ** 30


def dit_parameters(cfg) -> int:
    from omegaconf import OmegaConf

    with torch.device("meta"):
        model = WanDiT(**OmegaConf.to_container(cfg.model, resolve=True))
    return sum(p.numel() for p in model.parameters())


def sharded_bytes(params: int, ema: bool) -> int:
    """Generator + critic: fp32 weights, grads and two AdamW moments; the generator's fp32 EMA."""
    return 2 * 16 * params + (4 * params if ema else 0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_path", default="configs/self_forcing_dmd.yaml")
    p.add_argument("--metrics", required=True, help="metrics.jsonl of a 1-GPU run (peak_mem_gb, step_time)")
    p.add_argument("--world", type=int, nargs="+", default=[8])
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    cfg = load_config(args.config_path, args.overrides)
    rows = [json.loads(line) for line in Path(args.metrics).read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "peak_mem_gb" in r]
    if not steps:
        raise SystemExit(f"{args.metrics} has no step with peak_mem_gb")
    peak_gb = max(r["peak_mem_gb"] for r in steps)
    params = dit_parameters(cfg)
    ema = float(cfg.train.ema_weight) > 0
    shard_gib = sharded_bytes(params, ema) / GIB
    times = [r["step_time"] for r in steps[1:]] or [steps[0]["step_time"]]
    print(f"DiT parameters: {params:,} (generator, critic and real score each)")
    print(f"measured at world size 1: peak {peak_gb:.2f} GiB, {sum(times) / len(times):.2f} s per iteration "
          f"(iterations after the first; {len(steps)} logged)")
    print(f"sharded by FSDP2 (generator + critic fp32 weights, grads, AdamW moments{', EMA' if ema else ''}): "
          f"{shard_gib:.2f} GiB in all")
    print("\n| world size | per-GPU memory, GiB (estimate) |\n|---:|---:|")
    for world in args.world:
        print(f"| {world} | {peak_gb - (1 - 1 / world) * shard_gib:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
