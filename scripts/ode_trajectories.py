#!/usr/bin/env python
"""Make the ODE-trajectory set of the ODE-initialisation stage (pipeline/ode.py, docs/TRAINING.md).

    torchrun --nproc_per_node=8 scripts/ode_trajectories.py --config_path configs/ode_init.yaml
    python scripts/ode_trajectories.py --config_path configs/tiny_ode.yaml        # one process

Every rank samples the base model's ODE for its shards of the prompt file (``ode.prompts_path``)
and writes them into ``train.data_path``; rerunning the same command resumes (finished shards are
kept, damaged or half-written ones made again). The last rank to finish writes the manifest the
trainer reads. No process group is formed: the ranks share nothing but the folder, so a slow rank
never times out a collective. Trailing ``key=value`` arguments override the config.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python scripts/ode_trajectories.py` from a checkout
    sys.path.insert(0, str(REPO))

from utils.config import load_config  # noqa: E402
from utils.errors import ConfigError, OutputError, user_errors_exit  # noqa: E402
from utils.fs import ensure_writable_dir, reason  # noqa: E402

log = logging.getLogger("ode_trajectories")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="ODE trajectories of the base model for the ODE-initialisation stage")
    p.add_argument("--config_path", required=True, help="an ODE config, e.g. configs/ode_init.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p.parse_args(argv)


@user_errors_exit
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stderr, force=True,
                        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config_path, args.overrides)

    import torch
    from tqdm import tqdm

    from pipeline.ode import (MANIFEST, SHARD_GLOB, TrajectorySet, check_shard, sample_trajectory,
                              sampling_sigmas, shard_name, shard_ranges, storage_dtype, trajectory_noise,
                              trajectory_settings, validate_ode_config, write_manifest, write_shard)
    from pipeline.trainer import base_state_dict, build_text_encoder, dit_from, read_prompts
    from utils.config import torch_dtype
    from model.scheduler import FlowMatchScheduler

    validate_ode_config(cfg)
    prompts = read_prompts(cfg.ode.prompts_path)
    if cfg.ode.max_prompts > 0:
        prompts = prompts[:cfg.ode.max_prompts]
    settings = trajectory_settings(cfg)
    out = Path(cfg.train.data_path)
    ensure_writable_dir(out, "the trajectory folder (train.data_path)",
                        "set train.data_path to a folder you can write to")
    shard_size = int(cfg.ode.shard_size)
    ranges = shard_ranges(len(prompts), shard_size)

    if (out / MANIFEST).is_file():
        TrajectorySet(out, cfg)  # checks it against this config; a mismatch is a one-line error
        log.info("%s is complete (%d trajectories); nothing to do", out, len(prompts))
        return
    # Every existing shard's header, read once. A shard of another set (other settings or
    # prompts) is never overwritten; a damaged one of this rank is made again.
    problems = {k: check_shard(out / shard_name(k), want, settings, prompts[want.start:want.stop])
                for k, want in enumerate(ranges) if (out / shard_name(k)).is_file()}
    for problem, foreign in problems.values():
        if foreign:
            raise ConfigError(f"{out} holds another trajectory set ({problem}); choose another train.data_path "
                              f"or delete the folder")
    extra = sorted(p.name for p in out.glob(SHARD_GLOB) if p.name not in {shard_name(k) for k in range(len(ranges))})
    if extra:
        raise ConfigError(f"{out} holds shards past this prompt list ({', '.join(extra[:3])}): another trajectory set; "
                          f"choose another train.data_path or delete the folder")

    mine = [(k, r) for k, r in enumerate(ranges) if k % world == rank]
    todo = []
    for k, want in mine:
        path = out / shard_name(k)
        path.with_name(f".tmp_{path.name}").unlink(missing_ok=True)  # a write cut short by a crash
        if k in problems:
            if problems[k][0] is None:
                continue
            log.warning("making %s again: %s", path.name, problems[k][0])
        todo.append((k, want))
    done = sum(len(r) for _, r in mine) - sum(len(r) for _, r in todo)
    log.info("%d prompts in %d shards of %d over %d rank(s); this rank: %d to make, %d already made",
             len(prompts), len(ranges), shard_size, world, sum(len(r) for _, r in todo), done)

    if todo:
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device=cuda but this machine has no usable CUDA GPU; set device=cpu (tiny configs only)")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cfg.device == "cuda" \
            else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        encoder = build_text_encoder(cfg, device, int(cfg.seed))
        base, source = base_state_dict(cfg, int(cfg.seed))
        model = dit_from(cfg, base, source).to(device, torch_dtype(cfg.dtype)).eval().requires_grad_(False)
        del base
        log.info("base model from %s; %d Euler steps, CFG %.3g, stored timesteps %s", source,
                 cfg.ode.sample_steps, cfg.ode.guidance_scale, [round(t, 2) for t in settings["timesteps"]])
        scheduler = FlowMatchScheduler(cfg.timestep_shift, cfg.num_train_timestep)
        sigmas, keep = sampling_sigmas(scheduler, settings["timesteps"], int(cfg.ode.sample_steps))
        with torch.no_grad():
            uncond = encoder([cfg.negative_prompt]).to(device)
        bar = tqdm(total=sum(len(r) for _, r in todo), desc="trajectories", unit="prompt", disable=rank != 0,
                   dynamic_ncols=True)
        start = time.perf_counter()
        for k, want in todo:
            rows = []
            for i in want:
                with torch.no_grad():
                    cond = encoder([prompts[i]]).to(device)
                noise = trajectory_noise(cfg, i, (1, *settings["latent_shape"]), device)
                rows.append(sample_trajectory(model, noise, cond, uncond, sigmas, keep, float(cfg.ode.guidance_scale),
                                              int(cfg.num_train_timestep)).to("cpu", storage_dtype(cfg)))
                bar.update(1)
            path = out / shard_name(k)
            try:
                write_shard(path, torch.cat(rows), list(want), prompts[want.start:want.stop], settings)
            except OSError as exc:
                path.with_name(f".tmp_{path.name}").unlink(missing_ok=True)
                raise OutputError(f"cannot write {path}: {reason(exc)}; free some space and run the same command "
                                  f"again (it resumes)") from exc
        bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        made, elapsed = sum(len(r) for _, r in todo), time.perf_counter() - start
        peak = f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" \
            if device.type == "cuda" else ""
        log.info("rank %d made %d trajectories in %.1f s: %.3f s per Euler step (a CFG pair of forwards)%s",
                 rank, made, elapsed, elapsed / (made * len(sigmas[:-1])), peak)

    # The last rank to finish sees every shard and writes the manifest (several may: same content).
    missing = [shard_name(k) for k, want in enumerate(ranges)
               if check_shard(out / shard_name(k), want, settings)[0] is not None]
    if missing:
        log.info("this rank's shards are done; %d shard(s) of other ranks are not yet (%s...): the last rank to "
                 "finish writes %s", len(missing), missing[0], MANIFEST)
        return
    try:
        write_manifest(out, len(prompts), shard_size, settings, str(cfg.ode.prompts_path))
    except OSError as exc:
        raise OutputError(f"cannot write {out / MANIFEST}: {reason(exc)}; free some space and run again") from exc
    log.info("trajectory set complete: %d trajectories in %s", len(prompts), out)


if __name__ == "__main__":
    main()
