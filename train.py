"""Training of the causal Wan2.1 generator (docs/TRAINING.md): Self-Forcing DMD
(``train.objective: dmd``) or the ODE-initialisation regression before it (``ode``).

    torchrun --nproc_per_node=8 train.py --config_path configs/self_forcing_dmd.yaml --logdir logs/x
    torchrun --nproc_per_node=8 train.py --config_path configs/ode_init.yaml --logdir logs/ode
    python train.py --config_path configs/tiny_dmd.yaml --logdir logs/tiny --disable-wandb   # 1 process

``--resume`` continues from the newest checkpoint in ``<logdir>/checkpoints``; trailing
``key=value`` arguments override the config (e.g. ``train.max_iters=10``).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from utils.config import load_config
from utils.errors import EXIT_USER_ERROR, user_errors_exit
from utils.fs import ensure_writable_dir

log = logging.getLogger("train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Self-Forcing DMD or ODE-initialisation training (torchrun or a "
                                                 "single process)")
    parser.add_argument("--config_path", required=True, help="training config, e.g. configs/self_forcing_dmd.yaml")
    parser.add_argument("--logdir", required=True, help="checkpoints, metrics.jsonl and config.yaml go here")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --logdir")
    parser.add_argument("--disable-wandb", "--disable_wandb", dest="disable_wandb", action="store_true",
                        help="log to the console and <logdir>/metrics.jsonl only")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser.parse_args(argv)


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", force=True)


@user_errors_exit
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    cfg = load_config(args.config_path, args.overrides)

    # Cheap checks first: a user mistake ends the run before any process group or model exists.
    from pipeline.trainer import DMDTrainer, read_prompts, validate_train_config
    from utils.distributed import AnotherRankFailed, cleanup, init_distributed

    validate_train_config(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    if cfg.train.objective == "ode":
        from pipeline.ode import ODETrainer, TrajectorySet, validate_ode_config

        validate_ode_config(cfg)
        trainer_class, data = ODETrainer, TrajectorySet(cfg.train.data_path, cfg)  # checks every shard's header
    else:
        trainer_class, data = DMDTrainer, read_prompts(cfg.train.data_path)
    ensure_writable_dir(args.logdir, "the log folder", "pass --logdir with a folder you can write to")
    dist_info = init_distributed(cfg.device)
    trainer = None
    try:
        trainer = trainer_class(cfg, args.logdir, dist_info, data, resume=args.resume,
                                use_wandb=bool(cfg.train.use_wandb) and not args.disable_wandb)
        trainer.train()
    except AnotherRankFailed as exc:  # that rank prints the error line; one line here, not a second error
        log.warning("stopping: %s", exc)
        sys.exit(EXIT_USER_ERROR)
    finally:
        if trainer is not None:
            trainer.close()
        cleanup()


if __name__ == "__main__":
    main()
