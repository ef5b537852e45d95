"""Training: what every objective shares (:class:`Trainer`: config checks, data stream, FSDP2,
EMA, logging, checkpoints, resume) and Self-Forcing DMD (:class:`DMDTrainer`). The
ODE-initialisation objective is :class:`pipeline.ode.ODETrainer`.

One DMD iteration (as the reference trains):

* every ``dfake_gen_update_ratio``-th iteration, a **generator step**: self-rollout with gradient
  truncation (``pipeline/self_forcing.py``), DMD loss (``model/dmd.py``), backward, clip, AdamW,
  EMA update;
* every iteration, a **critic step**: a rollout without grad, the critic's flow-matching loss,
  backward, clip, AdamW.

Each step accumulates gradients over ``total_batch_size / (batch_size × world size)``
micro-batches. The generator and the critic are FSDP2-sharded (fp32 master weights, compute in
``dtype``); the real score and the text encoder are frozen and replicated.

Randomness is derived, not carried: every draw comes from a generator seeded with
``(seed, purpose, rank, step, micro-step)``, and the exit step uses a seed without the rank, so
every rank takes the same exit step without a broadcast. A resumed run therefore reproduces the
uninterrupted one exactly (the checkpoint still stores the RNG states).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import resource
import time
import uuid
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from model.dmd import DMD
from model.text_encoder import TextEncoder
from model.wan import WanDiT
from pipeline.rollout import RolloutSettings
from pipeline.self_forcing import draw_exit_steps, self_forcing_rollout
from utils.checkpoint import load_dit_state_dict, load_dit_weights
from utils.config import DTYPE_NAMES, torch_dtype
from utils.distributed import (DistInfo, all_reduce_mean, derive_seed, mixed_precision, on_main_rank,
                               seeded_generator, shard_dit)
from utils.errors import CheckpointError, ConfigError, OutputError, first_line
from utils.fs import reason
from utils.train_checkpoint import (CheckpointLoadError, ModelAndOptimizer, full_state_dict, latest_checkpoint,
                                    load_checkpoint, read_trainer_state, resumable_checkpoints, save_checkpoint)

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
OBJECTIVES = ("dmd", "ode")
PROMPTS_HINT = ("the reference prompts download with `python -m utils.hub --optional train_prompts`; or point "
                "train.data_path at a UTF-8 text file with one prompt per line")


# ------------------------------------------------------------------------------ config
def read_prompts(path: str | Path) -> list[str]:
    """Non-empty lines of the prompt file (``train.data_path``); ConfigError if unusable."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark is not part of the first prompt
    except FileNotFoundError as exc:
        raise ConfigError(f"train.data_path {path} does not exist; {PROMPTS_HINT}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(f"cannot read train.data_path {path} ({reason}); {PROMPTS_HINT}") from exc
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"train.data_path {path} holds no prompts; {PROMPTS_HINT}")
    return prompts


def grad_accumulation(cfg: DictConfig, world_size: int) -> int:
    tc = cfg.train
    per_step = tc.batch_size * world_size
    if tc.total_batch_size < 1 or tc.total_batch_size % per_step:
        raise ConfigError(f"train.total_batch_size ({tc.total_batch_size}) must be a multiple of train.batch_size "
                          f"({tc.batch_size}) x world size ({world_size}) = {per_step}")
    return tc.total_batch_size // per_step


def validate_train_config(cfg: DictConfig, world_size: int = 1) -> None:
    """Invariants of the ``train`` section; each failure names the key."""
    tc = cfg.train

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    block = cfg.num_frame_per_block
    need(tc.num_training_frames >= block and tc.num_training_frames % block == 0,
         f"train.num_training_frames ({tc.num_training_frames}) must be a positive multiple of "
         f"num_frame_per_block ({block})")
    need(tc.local_attn_size == -1 or tc.local_attn_size >= tc.sink_size + block,
         f"train.local_attn_size ({tc.local_attn_size}) must be -1 (the whole clip) or hold train.sink_size "
         f"({tc.sink_size}) + one block ({block})")
    need(tc.sink_size >= 0, "train.sink_size must be >= 0")
    need(tc.position_policy in ("absolute", "relativistic"),
         f"train.position_policy must be absolute or relativistic, not '{tc.position_policy}'")
    need(tc.objective in OBJECTIVES, f"train.objective must be one of {', '.join(OBJECTIVES)}, not '{tc.objective}'")
    window = tc.local_attn_size if tc.local_attn_size > 0 else tc.num_training_frames
    need(tc.objective != "ode" or tc.position_policy == "absolute" or window >= tc.num_training_frames,
         "train.objective=ode trains through the full-sequence block-causal forward, whose positions are "
         "absolute; set train.position_policy=absolute (relativistic equals it while the window holds the clip)")
    need(tc.batch_size >= 1, "train.batch_size must be >= 1")
    grad_accumulation(cfg, world_size)
    need(tc.max_iters >= 0, "train.max_iters must be >= 0")
    need(tc.dfake_gen_update_ratio >= 1, "train.dfake_gen_update_ratio must be >= 1")
    need(0.0 <= tc.ema_weight < 1.0, "train.ema_weight must lie in [0, 1) (0: no EMA)")
    need(tc.ema_start_step >= 0, "train.ema_start_step must be >= 0")
    need(0 <= tc.min_score_timestep < cfg.num_train_timestep,
         f"train.min_score_timestep must lie in [0, num_train_timestep={cfg.num_train_timestep})")
    need(tc.grad_clip > 0, "train.grad_clip must be > 0")
    need(tc.lr > 0 and tc.lr_critic > 0, "train.lr and train.lr_critic must be > 0")
    need(tc.save_every >= 0, "train.save_every must be >= 0 (0: no checkpoints)")
    need(tc.keep_checkpoints >= 1 and tc.log_every >= 1, "train.keep_checkpoints and train.log_every must be >= 1")
    need(not (tc.mixed_precision and cfg.dtype == "float16"),
         "training computes in bfloat16 or float32 (float16 would need loss scaling); set dtype=bfloat16 "
         "or train.mixed_precision=false")
    need(tc.export_dtype in DTYPE_NAMES,
         f"train.export_dtype must be one of {', '.join(DTYPE_NAMES)}, not '{tc.export_dtype}'")
    need(cfg.random_init or cfg.tiny_text_encoder is not None or cfg.wan_model_path,
         "set wan_model_path (the text encoder and the base DiT are read from it)")


def latent_shape(cfg: DictConfig) -> tuple[int, int, int]:
    """(C, h, w) of one latent frame of the training clips, from height/width and the VAE factor."""
    from model.vae_config import compression_factors, run_config

    factor = compression_factors(run_config(cfg))[0]
    _, ph, pw = cfg.model.patch_size
    if cfg.height % (factor * ph) or cfg.width % (factor * pw):
        raise ConfigError(f"height ({cfg.height}) and width ({cfg.width}) must be multiples of the VAE factor "
                          f"({factor}) x the patch size ({ph}, {pw})")
    return cfg.model.in_dim, cfg.height // factor, cfg.width // factor


# ------------------------------------------------------------------------------- data
class PromptStream:
    """This rank's endless stream of prompts: each epoch a seeded permutation of the whole file,
    padded by wrapping to a multiple of the world size and dealt out ``rank::world`` (as
    ``DistributedSampler``). ``position`` (batches consumed) is all that a checkpoint needs."""

    def __init__(self, prompts: list[str], rank: int, world_size: int, seed: int):
        self.prompts, self.rank, self.world, self.seed = prompts, rank, world_size, seed
        self.per_rank = math.ceil(len(prompts) / world_size)
        self.position = 0
        self._epoch, self._order = -1, []

    def _indices(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "data", epoch))
            perm = torch.randperm(len(self.prompts), generator=g).tolist()
            perm = (perm * math.ceil(self.per_rank * self.world / len(perm)))[:self.per_rank * self.world]
            self._epoch, self._order = epoch, perm[self.rank::self.world]
        return self._order

    def next_batch(self, batch_size: int) -> list[str]:
        out = []
        for j in range(batch_size):
            k = self.position * batch_size + j
            out.append(self.prompts[self._indices(k // self.per_rank)[k % self.per_rank]])
        self.position += 1
        return out


# -------------------------------------------------------------------------------- EMA
class ShardedEMA:
    """EMA of a (sharded) model's parameters, kept as fp32 tensors of the same placement."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for name, p in model.named_parameters():
            self.shadow[name].mul_(self.decay).add_(p.detach().float(), alpha=1 - self.decay)

    def full_state_dict(self, dtype: torch.dtype, is_main: bool) -> dict[str, torch.Tensor]:
        """Gathered on rank 0's CPU (``{}`` elsewhere); a collective."""
        out = {}
        for name, t in self.shadow.items():
            full = t.full_tensor() if isinstance(t, DTensor) else t
            if is_main:
                out[name] = full.to("cpu", dtype)
        return out


# ---------------------------------------------------------------------------- logging
class MetricsLog:
    """Rank 0: console line, ``<logdir>/metrics.jsonl`` and (when enabled) wandb."""

    def __init__(self, logdir: Path, wandb_run=None):
        self.path, self.wandb_run = logdir / METRICS_FILE, wandb_run
        self.write_failed = False

    def log(self, step: int, metrics: dict[str, float]) -> None:
        shown = " | ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        log.info("step %d | %s", step, shown)
        self.append({"step": step, **metrics})
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def append(self, record: dict) -> None:
        """One line of ``metrics.jsonl``; a failed write is a warning (once per run of failures)."""
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.write_failed = False
        except OSError as exc:  # a full disk must not stop training here; the next checkpoint will say
            if not self.write_failed:
                log.warning("cannot append to %s (%s); the metrics still go to the console and wandb",
                            self.path, reason(exc))
            self.write_failed = True


def start_wandb(cfg: DictConfig, logdir: Path, run_id: str | None):
    """A wandb run (rank 0 only); honours WANDB_MODE (e.g. offline)."""
    try:
        import wandb
    except ImportError as exc:
        raise ConfigError("wandb is not installed; `pip install wandb` or pass --disable-wandb") from exc
    tc = cfg.train
    run_id = run_id or uuid.uuid4().hex[:8]  # kept in the checkpoints: a resumed run continues this one
    try:
        return wandb.init(project=tc.wandb_project, entity=tc.wandb_entity, name=tc.wandb_run_name,
                          dir=str(logdir), id=run_id, resume="allow",
                          config=OmegaConf.to_container(cfg, resolve=True))
    except Exception as exc:  # not logged in, no network, bad entity: all fixable by the user
        raise ConfigError(f"wandb could not start ({first_line(exc)}); run `wandb login`, set WANDB_MODE=offline, "
                          f"or pass --disable-wandb") from exc


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux → GiB


def param_checksum(model: torch.nn.Module) -> float:
    """A cheap fingerprint of a (replicated) model's weights."""
    with torch.no_grad():
        return float(sum((p.double().sum() + p.double().square().sum()).item() for p in model.parameters()))


def _scalar(x) -> float:
    if isinstance(x, DTensor):
        x = x.full_tensor()
    return float(x)


# ---------------------------------------------------------------------------- models
def build_text_encoder(cfg: DictConfig, device: torch.device, seed: int) -> TextEncoder:
    """The frozen UMT5 encoder (on the CPU with ``offload_text_encoder``); a tiny random one
    with ``tiny_text_encoder``."""
    device = torch.device("cpu") if cfg.offload_text_encoder else device
    if cfg.tiny_text_encoder is not None:
        if cfg.tokenizer_path is None:
            raise ConfigError("tiny_text_encoder needs tokenizer_path (tests/assets/tokenizer has a tiny one)")
        torch.manual_seed(derive_seed(seed, "text_encoder_init"))
        enc = TextEncoder.from_config(cfg.tiny_text_encoder, cfg.tokenizer_path, cfg.model.text_len)
        enc = enc.to(device, torch_dtype(cfg.text_encoder_dtype))
    else:
        enc = TextEncoder.from_pretrained(cfg.wan_model_path, cfg.model.text_len,
                                          torch_dtype(cfg.text_encoder_dtype), device)
    if enc.dim != cfg.model.text_dim:
        raise ConfigError(f"the text encoder's width ({enc.dim}) differs from model.text_dim ({cfg.model.text_dim})")
    return enc.eval().requires_grad_(False)


def new_dit(cfg: DictConfig, meta: bool = False) -> WanDiT:
    kwargs = OmegaConf.to_container(cfg.model, resolve=True)
    if meta:
        with torch.device("meta"):
            return WanDiT(**kwargs)
    return WanDiT(**kwargs)


def base_state_dict(cfg: DictConfig, seed: int) -> tuple[dict[str, torch.Tensor], str]:
    """The base (bidirectional) Wan2.1 DiT's weights and where they came from: the real score of
    DMD, the critic's start, the ODE stage's teacher and student start. ``random_init``: seeded
    random weights (the same in every objective and script, so a tiny chain is consistent)."""
    if cfg.random_init:
        torch.manual_seed(derive_seed(seed, "score_init"))
        return new_dit(cfg).state_dict(), "random_init"
    path = cfg.train.score_ckpt or str(Path(cfg.wan_model_path) / "transformer")
    return load_dit_state_dict(path), path


def dit_from(cfg: DictConfig, state_dict: dict[str, torch.Tensor], source: str) -> WanDiT:
    """A DiT holding its own copy of ``state_dict`` (loading into a meta model assigns the
    tensors: without the copy two models would share, and train, the same storage)."""
    return load_dit_weights(new_dit(cfg, meta=True), {k: v.clone() for k, v in state_dict.items()}, source=source)


# ---------------------------------------------------------------------------- trainer
class Trainer:
    """What every objective shares: config, logging, the text encoder, the data stream, the
    generator's EMA, the loop, checkpoints and resume. An objective (:class:`DMDTrainer`,
    :class:`pipeline.ode.ODETrainer`) builds its models in :meth:`build`, runs one optimizer
    iteration in :meth:`train_iteration` and names what a checkpoint holds in :meth:`_state`.
    ``data``: the items the stream deals out (prompts for DMD, trajectory indices for ODE)."""

    def __init__(self, cfg: DictConfig, logdir: str | Path, dist: DistInfo, data: list, *,
                 use_wandb: bool = False, resume: bool = False):
        validate_train_config(cfg, dist.world_size)
        self.cfg, self.tc, self.dist = cfg, cfg.train, dist
        self.logdir = Path(logdir)
        self.ckpt_root = self.logdir / CHECKPOINT_DIR
        self.device = dist.device
        self.seed = int(cfg.seed)
        self.accum = grad_accumulation(cfg, dist.world_size)
        self.num_frames = int(self.tc.num_training_frames)
        self.latent_shape = latent_shape(cfg)
        self.compute_dtype = torch_dtype(cfg.dtype) if self.tc.mixed_precision else torch.float32
        self.settings = self.rollout_settings(cfg)
        self.num_blocks = self.num_frames // self.settings.block_frames

        candidates = self._checkpoints_to_resume(resume)
        trainer_state = read_trainer_state(candidates[0]) if candidates else {}
        # Rank-0-only steps go through on_main_rank: when one fails, every rank stops with it.
        if not candidates:  # a resumed run's config.yaml stays the checkpoints' own until one loads
            on_main_rank(self._write_config, f"to write {self.logdir / CONFIG_FILE}")
        self.wandb_run = on_main_rank(lambda: start_wandb(cfg, self.logdir, trainer_state.get("wandb_run_id")),
                                      "to start wandb") if use_wandb else None
        self.metrics = MetricsLog(self.logdir, self.wandb_run) if dist.is_main else None

        torch.manual_seed(derive_seed(self.seed, "global", dist.rank))
        self.text_encoder = build_text_encoder(cfg, self.device, self.seed)
        self.data = PromptStream(data, dist.rank, dist.world_size, self.seed)
        self.generator: WanDiT
        self.gen_opt: torch.optim.Optimizer
        self.build()
        self.ema: ShardedEMA | None = None
        self.step = 0
        if candidates:
            self._resume(candidates)
            on_main_rank(self._write_config, f"to write {self.logdir / CONFIG_FILE}")
        log.info("%s training: world %d, %d micro-batch(es) of %d per rank per step (total %d), clip %d frames "
                 "(%d blocks) of %s, window %d, compute %s, generator %.4gM params", self.tc.objective.upper(),
                 dist.world_size, self.accum, self.tc.batch_size, self.tc.total_batch_size, self.num_frames,
                 self.num_blocks, "x".join(map(str, self.latent_shape)), self.settings.local_attn_size,
                 self.compute_dtype, sum(p.numel() for p in self.generator.parameters()) / 1e6)

    def _write_config(self) -> None:
        """``<logdir>/config.yaml``: the config (overrides included) that the checkpoints fit."""
        path = self.logdir / CONFIG_FILE
        try:
            self.logdir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(self.cfg, path)
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {reason(exc)}; free some space or pass another --logdir") \
                from exc

    # ------------------------------------------------------------------ what an objective defines
    def build(self) -> None:
        """Build ``self.generator`` and ``self.gen_opt`` (and whatever else the objective trains)."""
        raise NotImplementedError

    def train_iteration(self) -> dict[str, float]:
        """One optimizer iteration; returns the metrics (reduced over ranks)."""
        raise NotImplementedError

    def _state(self) -> dict:
        """What DCP saves: the trained models and optimizers (the EMA is added here)."""
        raise NotImplementedError

    def finish(self) -> None:
        """Called once after the last iteration."""

    # ------------------------------------------------------------------ shared pieces
    def shard_trained(self, model: WanDiT) -> WanDiT:
        """fp32 master weights on this device, FSDP2-sharded, computing in ``compute_dtype``."""
        policy = mixed_precision(self.compute_dtype if self.tc.mixed_precision else None, torch.float32)
        model.float().to(self.device).train()
        model.gradient_checkpointing = bool(self.tc.gradient_checkpointing)
        return shard_dit(model, self.dist.mesh, policy, reshard_after_forward=bool(self.tc.reshard_after_forward))

    def adamw(self, model: WanDiT, lr: float, betas: tuple[float, float]) -> torch.optim.AdamW:
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=self.tc.weight_decay)

    def optimizer_step(self, model: WanDiT, opt: torch.optim.Optimizer, logs: list[dict[str, torch.Tensor | float]],
                       name: str) -> dict[str, float]:
        """Clip ``model``'s accumulated gradients, step ``opt`` (and the EMA after a generator
        step); return the micro-batches' mean metrics (read from the device once, here, not
        between a forward and its backward) and ``<name>_grad_norm``."""
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), self.tc.grad_clip)
        opt.step()
        if model is self.generator and self.ema is not None:
            self.ema.update(self.generator)
        out = {k: _scalar(sum(d[k] for d in logs) / len(logs)) for k in logs[0]}
        out[f"{name}_grad_norm"] = _scalar(norm)
        return out

    def finish_iteration(self, metrics: dict[str, float], start: float, clips: int) -> dict[str, float]:
        """Advance the step, start the EMA when due, and add the common metrics."""
        self.step += 1
        if self.ema is None and self.tc.ema_weight > 0 and self.step >= self.tc.ema_start_step:
            self.ema = ShardedEMA(self.generator, self.tc.ema_weight)
            log.info("EMA (%.4g) of the generator starts at step %d", self.tc.ema_weight, self.step)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        metrics = all_reduce_mean(metrics, self.device)
        metrics.update(lr=self.gen_opt.param_groups[0]["lr"], step_time=elapsed, samples_per_s=clips / elapsed,
                       peak_mem_gb=peak_memory_gb(self.device))
        return metrics

    @staticmethod
    def rollout_settings(cfg: DictConfig) -> RolloutSettings:
        """The training self-rollout's settings: the inference ones with the ``train.`` window,
        sink and position policy (a window of -1 holds the whole clip)."""
        tc = cfg.train
        window = tc.local_attn_size if tc.local_attn_size > 0 else tc.num_training_frames
        return dataclasses.replace(RolloutSettings.from_config(cfg), local_attn_size=int(window),
                                   sink_size=int(tc.sink_size), policy=str(tc.position_policy))

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self.text_encoder(prompts).to(self.device)

    def train(self) -> None:
        max_iters = int(self.tc.max_iters)
        bar = tqdm(total=max_iters, initial=self.step, desc="training", unit="it", disable=not self.dist.is_main,
                   dynamic_ncols=True)
        while self.step < max_iters:
            metrics = self.train_iteration()
            if self.metrics is not None and (self.step % self.tc.log_every == 0 or self.step == max_iters):
                self.metrics.log(self.step, metrics)
            every = int(self.tc.save_every)  # 0: no checkpoints (probes, benchmarks)
            if every and (self.step % every == 0 or self.step == max_iters):
                self.save()
            bar.update(1)
        bar.close()
        self.finish()

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None

    # ------------------------------------------------------------------ checkpoints
    def with_ema(self, state: dict) -> dict:
        if self.ema is not None:
            state["generator_ema"] = self.ema.shadow
        return state

    def save(self) -> Path:
        dtype = torch_dtype(self.tc.export_dtype)
        export = {"generator": full_state_dict(self.generator, dtype)}
        if self.ema is not None:
            export["generator_ema"] = self.ema.full_state_dict(dtype, self.dist.is_main)
        trainer_state = {"step": self.step, "data_position": self.data.position, "has_ema": self.ema is not None,
                         "world_size": self.dist.world_size, "seed": self.seed,
                         "wandb_run_id": self.wandb_run.id if self.wandb_run is not None else None}
        return save_checkpoint(self.ckpt_root, self.step, self._state(), trainer_state, rank=self.dist.rank,
                               export=export if self.dist.is_main else None, keep=int(self.tc.keep_checkpoints))

    def _checkpoints_to_resume(self, resume: bool) -> list[Path]:
        """The checkpoints to try for ``--resume``, newest first (damaged ones reported and left
        out). Without ``--resume`` a folder that holds checkpoints is refused."""
        if not resume:
            latest = latest_checkpoint(self.ckpt_root)
            if latest is not None:
                raise CheckpointError(f"{self.ckpt_root} already holds checkpoints (latest {latest.name}); pass "
                                      f"--resume to continue that run, or choose another --logdir")
            return []
        good, problems = resumable_checkpoints(self.ckpt_root)
        for problem in problems:
            log.warning("--resume: skipping %s", problem)
        if not good and problems:
            raise CheckpointError(f"--resume: no checkpoint in {self.ckpt_root} can be resumed from "
                                  f"({'; '.join(problems)}); delete them to start this run over, or choose "
                                  f"another --logdir")
        if not good:
            log.warning("--resume: no checkpoint in %s; starting from scratch", self.ckpt_root)
        return good

    def _resume(self, candidates: list[Path]) -> None:
        """Load the newest of ``candidates`` that loads; a failure moves on to the one before."""
        failures, mismatched = [], 0
        for path in candidates:
            trainer_state = read_trainer_state(path)
            self.ema = ShardedEMA(self.generator, self.tc.ema_weight) if trainer_state.get("has_ema") else None
            try:
                load_checkpoint(path, self._state(), rank=self.dist.rank)
            except CheckpointLoadError as exc:
                failures.append(f"{path.name}: {exc.reason}")
                mismatched += exc.mismatch
                log.warning("--resume: %s cannot be loaded (%s); trying the checkpoint before it", path.name,
                            exc.reason)
                continue
            saved_world = trainer_state.get("world_size")
            if saved_world != self.dist.world_size:
                log.warning("checkpoint was written by %s ranks, resuming on %d: weights and optimizer states are "
                            "resharded; the data order and noise streams continue differently", saved_world,
                            self.dist.world_size)
            self.step = int(trainer_state["step"])
            self.data.position = int(trainer_state["data_position"])
            log.info("resumed from %s at step %d", path, self.step)
            return
        if mismatched == len(failures):  # whole checkpoints of another model/config: keep them
            saved = self.logdir / CONFIG_FILE
            config = f"its config, `--config_path {saved}`" if saved.is_file() else "the config it was written with"
            raise CheckpointError(f"--resume: the checkpoints in {self.ckpt_root} were written by a different "
                                  f"model/config than this one ({failures[0]}); to continue that run resume with "
                                  f"{config}, or choose another --logdir to start a new one")
        raise CheckpointError(f"--resume: no checkpoint in {self.ckpt_root} loads ({'; '.join(failures)}); "
                              f"delete them to start this run over, or choose another --logdir")


class DMDTrainer(Trainer):
    """Self-Forcing DMD: the generator's self-rollout scored by a frozen real score (the base
    model, CFG) against a trained critic (fake score). The module docstring has the iteration."""

    def build(self) -> None:
        cfg, tc = self.cfg, self.tc
        self.uncond = self.encode([cfg.negative_prompt])
        base, source = base_state_dict(cfg, self.seed)
        real, critic = dit_from(cfg, base, source), dit_from(cfg, base, source)
        if tc.generator_ckpt:
            generator = dit_from(cfg, load_dit_state_dict(tc.generator_ckpt), tc.generator_ckpt)
        elif cfg.random_init:
            torch.manual_seed(derive_seed(self.seed, "generator_init"))
            generator = new_dit(cfg)
        else:
            generator = dit_from(cfg, base, source)
        del base
        log.info("generator from %s; critic and real score from %s",
                 tc.generator_ckpt or ("random_init" if cfg.random_init else source), source)
        self.generator, self.critic = self.shard_trained(generator), self.shard_trained(critic)
        self.real_score = real.to(self.device, self.compute_dtype).eval().requires_grad_(False)
        self.gen_opt = self.adamw(self.generator, tc.lr, (tc.beta1, tc.beta2))
        self.critic_opt = self.adamw(self.critic, tc.lr_critic, (tc.beta1_critic, tc.beta2_critic))
        self.dmd = DMD(self.real_score, self.critic, self.settings.scheduler(),
                       guidance_scale=tc.guidance_scale, min_score_timestep=tc.min_score_timestep)
        self.cache = self.settings.new_cache(self.generator, tc.batch_size, self.latent_shape[1:],
                                             dtype=self.compute_dtype, device=self.device)
        self.cache.precompute_text = False  # FSDP gathers a block's weights only inside its forward
        self.real_checksum = param_checksum(self.real_score)

    # ------------------------------------------------------------------ one iteration
    def _rng(self, phase: str, micro: int) -> tuple[torch.Generator, list[int]]:
        noise = seeded_generator(self.device, self.seed, "noise", self.dist.rank, self.step, phase, micro)
        shared = seeded_generator("cpu", self.seed, "exit", self.step, phase, micro)  # same on every rank
        exits = draw_exit_steps(self.num_blocks, len(self.settings.denoising_steps),
                                bool(self.tc.same_step_across_blocks), shared)
        return noise, exits

    def _rollout(self, cond: torch.Tensor, noise: torch.Generator, exits: list[int], grad: bool) -> torch.Tensor:
        return self_forcing_rollout(self.generator, self.cache, self.settings, cond, num_frames=self.num_frames,
                                    latent_shape=self.latent_shape, exit_steps=exits, generator=noise, grad=grad,
                                    dtype=self.compute_dtype)

    def generator_step(self) -> dict[str, float]:
        self.gen_opt.zero_grad(set_to_none=True)
        logs = []
        for micro in range(self.accum):
            prompts = self.data.next_batch(self.tc.batch_size)
            cond = self.encode(prompts)
            uncond = self.uncond.expand(len(prompts), -1, -1)
            noise, exits = self._rng("generator", micro)
            clip = self._rollout(cond, noise, exits, grad=True)
            loss, info = self.dmd.generator_loss(clip, cond, uncond, noise)
            (loss / self.accum).backward()
            logs.append({"generator_loss": loss.detach(), **info, "exit_step": float(exits[0])})
        return self.optimizer_step(self.generator, self.gen_opt, logs, "generator")

    def critic_step(self) -> dict[str, float]:
        self.critic_opt.zero_grad(set_to_none=True)
        logs = []
        for micro in range(self.accum):
            prompts = self.data.next_batch(self.tc.batch_size)
            cond = self.encode(prompts)
            noise, exits = self._rng("critic", micro)
            with torch.no_grad():
                clip = self._rollout(cond, noise, exits, grad=False)
            loss, info = self.dmd.critic_loss(clip, cond, noise)
            (loss / self.accum).backward()
            logs.append({"critic_loss": loss.detach(), **info})
        return self.optimizer_step(self.critic, self.critic_opt, logs, "critic")

    def train_iteration(self) -> dict[str, float]:
        """One iteration: maybe a generator step, then a critic step; returns rank-0 metrics."""
        start = time.perf_counter()
        train_gen = self.step % self.tc.dfake_gen_update_ratio == 0
        metrics = self.generator_step() if train_gen else {}
        metrics.update(self.critic_step())
        metrics = self.finish_iteration(metrics, start, self.tc.total_batch_size * (2 if train_gen else 1))
        metrics["lr_critic"] = self.critic_opt.param_groups[0]["lr"]
        return metrics

    def _state(self) -> dict:
        state = {"generator": ModelAndOptimizer(self.generator, self.gen_opt),
                 "critic": ModelAndOptimizer(self.critic, self.critic_opt)}
        return self.with_ema(state)

    def finish(self) -> None:
        end = param_checksum(self.real_score)
        log.info("real score checksum: start %.17g end %.17g (%s)", self.real_checksum, end,
                 "unchanged" if end == self.real_checksum else "CHANGED")
        if self.metrics is not None:
            self.metrics.append({"step": self.step, "real_score_checksum_start": self.real_checksum,
                                 "real_score_checksum_end": end})
