"""The ODE-initialisation stage (CausVid §4.3, the ``ode_init.pt`` Self-Forcing starts DMD from):
regress the causal generator onto points of the base model's ODE trajectories.

1. **Trajectories** (``scripts/ode_trajectories.py``). For each prompt, the frozen bidirectional
   base model (the DMD real score) integrates the flow-matching ODE from seeded noise to a clean
   clip with classifier-free guidance against the negative prompt, with ``ode.sample_steps``
   Euler steps on the shifted schedule. The sampling grid contains the few-step timesteps the
   generator uses (``denoising_step_list``, warped), and the latents at those timesteps plus the
   clean end are stored: ``[P, F, C, h, w]`` per prompt, P = len(denoising_step_list) + 1, in ``ode.storage_dtype``.
   Trajectories go into shard files of ``ode.shard_size`` prompts (``shard_00000.safetensors``:
   ``latents`` ``[n, P, F, C, h, w]``, ``prompt_index`` ``[n]``, the prompts, timesteps and
   settings in its metadata), written atomically. Shard k holds prompts ``[k·S, (k+1)·S)`` and
   belongs to rank ``k mod world``; a rerun skips the shards that exist and check out, so the set
   is resumable and the same for any number of ranks (noise is seeded by prompt index). The last
   rank to finish writes ``trajectories.json``, the manifest the trainer requires.
2. **Regression** (``train.objective: ode``, :class:`ODETrainer`). Per clip and per block, draw
   one of the P stored points; the causal generator sees the clip assembled from those points at
   their timesteps through the full-sequence block-causal forward (a block attends to its own and
   the earlier blocks' noisy latents, within the training window) and predicts x0; the loss is the
   MSE to the trajectory's clean end over the frames that were not already clean.

The exported ``model.pt`` (``generator``) is what ``train.generator_ckpt`` of the DMD configs
reads: from the base Wan2.1 weights alone to a Self-Forcing generator.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors import safe_open
from safetensors.torch import save_file

from model.scheduler import FlowMatchScheduler
from model.wan import WanDiT
from pipeline.rollout import RolloutSettings
from pipeline.trainer import Trainer, base_state_dict, dit_from, latent_shape
from utils.checkpoint import load_dit_state_dict
from utils.config import DTYPE_NAMES, torch_dtype
from utils.distributed import seeded_generator
from utils.errors import ConfigError
from utils.train_checkpoint import ModelAndOptimizer

log = logging.getLogger(__name__)

FORMAT = "infinity-rope-ode-trajectories/1"
MANIFEST = "trajectories.json"
SHARD_GLOB = "shard_*.safetensors"
SETTINGS_KEYS = ("timesteps", "latent_shape", "sample_steps", "guidance_scale", "shift", "seed",
                 "storage_dtype", "negative_prompt")


# ------------------------------------------------------------------------------ the ODE
def trajectory_timesteps(settings: RolloutSettings) -> list[float]:
    """The timesteps of the stored points: the generator's few-step list (warped as at inference)
    and 0, the clean end."""
    return [float(t) for t in settings.timesteps()] + [0.0]


def sampling_sigmas(scheduler: FlowMatchScheduler, stored: list[float], steps: int) -> tuple[torch.Tensor, list[int]]:
    """The Euler grid, σ from 1 down to 0 in float64 (``steps`` uniform steps of the unshifted
    variable, shifted), with every stored timestep's σ on it: a grid point within float32
    rounding of one takes its exact value, otherwise the σ is added. Returns the grid and the
    grid index of each stored point."""
    grid = scheduler.shift_sigma(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)).tolist()
    for t in stored:
        sigma = t / scheduler.num_train_timesteps
        near = min(range(len(grid)), key=lambda j: abs(grid[j] - sigma))
        if abs(grid[near] - sigma) < 1e-6:
            grid[near] = sigma
        else:
            grid.append(sigma)
    grid = sorted(set(grid), reverse=True)
    return torch.tensor(grid, dtype=torch.float64), [grid.index(t / scheduler.num_train_timesteps) for t in stored]


@torch.no_grad()
def sample_trajectory(model: WanDiT, noise: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                      sigmas: torch.Tensor, keep: list[int], guidance_scale: float,
                      num_train_timesteps: int) -> torch.Tensor:
    """Integrate dx/dσ = flow(x, σ) (the model's prediction ε − x0, CFG'd) with Euler steps over
    ``sigmas`` from ``noise`` ``[B, F, C, h, w]``; return the latents at grid indices ``keep``,
    ``[B, P, F, C, h, w]`` float32. Conditional and unconditional passes run as one batch."""
    b, f = noise.shape[:2]
    x = noise.float()
    points: dict[int, torch.Tensor] = {}
    context = torch.cat([cond, uncond.expand(b, -1, -1)])
    for j in range(len(sigmas)):
        if j in keep:
            points[j] = x.clone()
        if j + 1 == len(sigmas):
            break
        t = torch.full((2 * b, f), float(sigmas[j]) * num_train_timesteps, device=x.device)
        flow_c, flow_u = model(torch.cat([x, x]), t, context).float().chunk(2)
        flow = flow_u + guidance_scale * (flow_c - flow_u)
        x = x + float(sigmas[j + 1] - sigmas[j]) * flow
    return torch.stack([points[j] for j in keep], dim=1)


def trajectory_noise(cfg: DictConfig, prompt_index: int, shape: tuple[int, ...], device) -> torch.Tensor:
    """The starting noise of prompt ``prompt_index``'s trajectory (seeded by its index only)."""
    g = seeded_generator("cpu", int(cfg.seed), "ode_trajectory", prompt_index)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(device)


def trajectory_settings(cfg: DictConfig) -> dict:
    """What a trajectory set was made with; a set and a config that disagree cannot be mixed."""
    settings = Trainer.rollout_settings(cfg)
    return {"timesteps": trajectory_timesteps(settings),
            "latent_shape": [int(cfg.train.num_training_frames), *latent_shape(cfg)],
            "sample_steps": int(cfg.ode.sample_steps), "guidance_scale": float(cfg.ode.guidance_scale),
            "shift": float(cfg.timestep_shift), "seed": int(cfg.seed), "storage_dtype": str(cfg.ode.storage_dtype),
            "negative_prompt": str(cfg.negative_prompt)}


# ------------------------------------------------------------------------------ files
def shard_name(k: int) -> str:
    return f"shard_{k:05d}.safetensors"


def shard_ranges(num_prompts: int, shard_size: int) -> list[range]:
    return [range(a, min(a + shard_size, num_prompts)) for a in range(0, num_prompts, shard_size)]


def write_shard(path: Path, latents: torch.Tensor, indices: list[int], prompts: list[str], settings: dict) -> None:
    """Write one shard atomically (a temporary file renamed into place)."""
    tmp = path.with_name(f".tmp_{path.name}")
    meta = {"format": FORMAT, "prompts": json.dumps(prompts, ensure_ascii=False),
            **{k: json.dumps(v, ensure_ascii=False) for k, v in settings.items()}}
    save_file({"latents": latents.contiguous(), "prompt_index": torch.tensor(indices, dtype=torch.int64)},
              str(tmp), metadata=meta)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def check_shard(path: Path, want: range, settings: dict, prompts: list[str] | None = None) -> tuple[str | None, bool]:
    """``(why shard path cannot serve prompts want, made with settings; None if it can, foreign)``.
    ``foreign``: it is readable but belongs to another set (other settings or prompts), which is
    never overwritten; otherwise it is damaged (unreadable, truncated) and can be made again.
    Reads the header and the small index tensor only."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            shape = f.get_slice("latents").get_shape()
            index = f.get_tensor("prompt_index").tolist()
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError for damaged files
        return f"{path.name} cannot be read ({str(exc).splitlines()[0][:120] or type(exc).__name__})", False
    if meta.get("format") != FORMAT:
        return f"{path.name} is not a trajectory shard (format {meta.get('format')!r}, expected {FORMAT!r})", True
    for key in SETTINGS_KEYS:
        have = json.loads(meta.get(key, "null"))
        if have != settings[key]:
            return f"{path.name} was made with {key} {have}, this config has {settings[key]}", True
    stored_prompts = json.loads(meta.get("prompts", "[]"))
    if prompts is not None and stored_prompts != prompts:
        return f"{path.name} holds other prompts than lines {want.start + 1}..{want.stop} of the prompt file", True
    want_shape = [len(want), len(settings["timesteps"]), *settings["latent_shape"]]
    if list(shape) != want_shape:
        return f"{path.name} holds latents of shape {list(shape)}, expected {want_shape} " \
               f"([prompts, points, frames, channels, h, w])", False
    if index != list(want) or len(stored_prompts) != len(want):
        return f"{path.name} holds prompt indices {index}, expected {want.start}..{want.stop - 1}", False
    return None, False


def write_manifest(folder: Path, num_prompts: int, shard_size: int, settings: dict, prompts_file: str) -> None:
    tmp = folder / f".tmp_{MANIFEST}"
    shards = [{"file": shard_name(k), "first": r.start, "count": len(r)}
              for k, r in enumerate(shard_ranges(num_prompts, shard_size))]
    tmp.write_text(json.dumps({"format": FORMAT, "num_prompts": num_prompts, "shard_size": shard_size,
                               "prompts_file": prompts_file, **settings, "shards": shards}, indent=1,
                              ensure_ascii=False))
    os.replace(tmp, folder / MANIFEST)


@dataclass(frozen=True)
class _Item:
    shard: Path
    row: int
    prompt: str


class TrajectorySet:
    """A finished trajectory folder, checked against the config before anything trains on it:
    the manifest, every shard's header (format, settings, shape, prompt indices and prompts), and
    that the shards cover the manifest's prompts. Items load one at a time (memory stays flat)."""

    def __init__(self, folder: str | Path, cfg: DictConfig):
        self.folder = Path(folder)
        self.settings = trajectory_settings(cfg)
        hint = ("run `torchrun --nproc_per_node=<gpus> scripts/ode_trajectories.py --config_path <this config>` "
                "(it resumes an unfinished set)")
        manifest_path = self.folder / MANIFEST
        if not self.folder.is_dir():
            raise ConfigError(f"train.data_path {self.folder} is not a folder of ODE trajectories; {hint}")
        if not manifest_path.is_file():
            raise ConfigError(f"{self.folder} has no {MANIFEST}: the trajectory set is unfinished or this is "
                              f"not one; {hint}")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {manifest_path} ({exc}); delete it and {hint}") from exc
        if manifest.get("format") != FORMAT:
            raise ConfigError(f"{manifest_path} is format {manifest.get('format')!r}, this version reads {FORMAT!r}")
        for key in SETTINGS_KEYS:
            if manifest.get(key) != self.settings[key]:
                raise ConfigError(f"the trajectories in {self.folder} were made with {key} {manifest.get(key)}, "
                                  f"this config trains with {self.settings[key]}; make a new set or change the config")
        self.items: list[_Item] = []
        for k, entry in enumerate(manifest["shards"]):
            want = range(entry["first"], entry["first"] + entry["count"])
            path = self.folder / entry["file"]
            if not path.is_file():
                raise ConfigError(f"{path} is missing from the trajectory set; {hint}")
            problem, _ = check_shard(path, want, self.settings)
            if problem:
                raise ConfigError(f"trajectory set {self.folder}: {problem}; delete that file and {hint}")
            with safe_open(str(path), framework="pt") as f:
                prompts = json.loads(f.metadata()["prompts"])
            self.items += [_Item(path, row, prompt) for row, prompt in enumerate(prompts)]
        if len(self.items) != manifest["num_prompts"] or not self.items:
            raise ConfigError(f"trajectory set {self.folder} holds {len(self.items)} trajectories, its manifest "
                              f"says {manifest['num_prompts']}; {hint}")
        self.timesteps = torch.tensor(self.settings["timesteps"], dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.items)

    def load(self, indices: list[int], device) -> tuple[torch.Tensor, list[str]]:
        """Trajectories ``[B, P, F, C, h, w]`` float32 on ``device`` and their prompts."""
        rows = []
        for i in indices:
            item = self.items[i]
            try:
                with safe_open(str(item.shard), framework="pt") as f:
                    rows.append(f.get_slice("latents")[item.row:item.row + 1])
            except (OSError, ValueError, RuntimeError) as exc:
                raise ConfigError(f"cannot read trajectory {i} from {item.shard} ({exc}); the file changed since "
                                  f"training started") from exc
        return torch.cat(rows).to(device, torch.float32), [self.items[i].prompt for i in indices]


# ------------------------------------------------------------------------------ regression
def ode_regression_loss(model: WanDiT, trajectories: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                        settings: RolloutSettings, generator: torch.Generator,
                        scheduler: FlowMatchScheduler) -> tuple[torch.Tensor, dict[str, float]]:
    """The ODE regression loss of a batch of trajectories ``[B, P, F, C, h, w]`` (float32).

    Per clip and per block, one of the P points is drawn uniformly; the clip made of the drawn
    points goes through the block-causal forward at the points' timesteps (sink + window of
    ``settings``) and the predicted x0 is regressed onto the clean end over the frames whose
    point was noisy (a frame drawn at its clean end is context only)."""
    b, p, f = trajectories.shape[:3]
    block = settings.block_frames
    draw = torch.randint(p, (b, f // block), generator=generator, device=generator.device)
    index = draw.repeat_interleave(block, dim=1).to(trajectories.device)  # [B, F]
    x_t = torch.gather(trajectories, 1, index.view(b, 1, f, 1, 1, 1).expand(-1, 1, -1, *trajectories.shape[3:]))
    x_t = x_t.squeeze(1)
    t = timesteps.to(trajectories.device)[index]
    window = settings.local_attn_size if settings.local_attn_size < f else -1
    flow = model(x_t, t, context, num_frame_per_block=block, local_attn_size=window, sink_size=settings.sink_size)
    x0 = scheduler.x0_from_flow(flow.float(), x_t, t)
    noisy = (t != 0)
    err = (x0 - trajectories[:, -1]).square().mean(dim=(2, 3, 4))  # [B, F]
    # all-clean draws give a zero loss that still reaches every parameter (FSDP needs a backward)
    loss = (err * noisy).sum() / noisy.sum().clamp(min=1)
    return loss, {"ode_loss": loss.item(), "noisy_frames": noisy.float().mean().item()}


class ODETrainer(Trainer):
    """``train.objective: ode``: the generator regressed onto the base model's trajectories.
    ``data``: the :class:`TrajectorySet` (the stream deals out its indices)."""

    def __init__(self, cfg: DictConfig, logdir, dist, trajectories: TrajectorySet, **kw):
        self.trajectories = trajectories
        super().__init__(cfg, logdir, dist, list(range(len(trajectories))), **kw)

    def build(self) -> None:
        cfg, tc = self.cfg, self.tc
        if tc.generator_ckpt:
            generator, source = dit_from(cfg, load_dit_state_dict(tc.generator_ckpt), tc.generator_ckpt), \
                tc.generator_ckpt
        else:  # the causal student starts from the base model's weights (CausVid)
            base, source = base_state_dict(cfg, self.seed)
            generator = dit_from(cfg, base, source)
            del base
        log.info("ODE regression: generator from %s, %d trajectories of %d points at timesteps %s", source,
                 len(self.trajectories), len(self.trajectories.timesteps),
                 [round(float(t), 2) for t in self.trajectories.timesteps])
        self.generator = self.shard_trained(generator)
        self.gen_opt = self.adamw(self.generator, tc.lr, (tc.beta1, tc.beta2))
        self.scheduler = self.settings.scheduler()

    def train_iteration(self) -> dict[str, float]:
        start = time.perf_counter()
        self.gen_opt.zero_grad(set_to_none=True)
        logs = []
        for micro in range(self.accum):
            trajectories, prompts = self.trajectories.load(self.data.next_batch(self.tc.batch_size), self.device)
            cond = self.encode(prompts)
            draws = seeded_generator("cpu", self.seed, "ode_points", self.dist.rank, self.step, micro)
            loss, info = ode_regression_loss(self.generator, trajectories, self.trajectories.timesteps, cond,
                                             self.settings, draws, self.scheduler)
            (loss / self.accum).backward()
            logs.append(info)
        metrics = self.optimizer_step(self.generator, self.gen_opt, logs, "generator")
        return self.finish_iteration(metrics, start, self.tc.total_batch_size)

    def _state(self) -> dict:
        return self.with_ema({"generator": ModelAndOptimizer(self.generator, self.gen_opt)})


def storage_dtype(cfg: DictConfig) -> torch.dtype:
    return torch_dtype(cfg.ode.storage_dtype)


def validate_ode_config(cfg: DictConfig) -> None:
    """Invariants of the ``ode`` section; each failure names the key."""
    o = cfg.ode
    if o.sample_steps < 1:
        raise ConfigError(f"ode.sample_steps ({o.sample_steps}) must be >= 1")
    if o.guidance_scale < 0:
        raise ConfigError(f"ode.guidance_scale ({o.guidance_scale}) must be >= 0 (1: no guidance)")
    if o.shard_size < 1:
        raise ConfigError(f"ode.shard_size ({o.shard_size}) must be >= 1")
    if o.max_prompts == 0 or o.max_prompts < -1:
        raise ConfigError(f"ode.max_prompts ({o.max_prompts}) must be -1 (all) or >= 1")
    if o.storage_dtype not in DTYPE_NAMES:
        raise ConfigError(f"ode.storage_dtype must be one of {', '.join(DTYPE_NAMES)}, not '{o.storage_dtype}'")
    f, block = cfg.train.num_training_frames, cfg.num_frame_per_block
    if f < block or f % block:
        raise ConfigError(f"train.num_training_frames ({f}) must be a positive multiple of num_frame_per_block "
                          f"({block})")
