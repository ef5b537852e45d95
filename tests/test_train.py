"""train.py end to end on the CPU: torchrun with 2 gloo processes (FSDP2), resume, export, errors.

The tiny config (configs/tiny_dmd.yaml) trains a 2-layer DiT on 6 latent frames of 4x6 with a
tiny random text encoder: an iteration takes a fraction of a second; a torchrun launch costs a
few seconds of imports.
"""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import train
import utils.train_checkpoint as train_ckpt
from model.wan import WanDiT
from pipeline.trainer import DMDTrainer, PromptStream, read_prompts
from utils.checkpoint import load_dit_state_dict, load_dit_weights, save_dit_state_dict
from utils.config import load_config
from utils.errors import CheckpointError, OutputError

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny_dmd.yaml"


# ------------------------------------------------------------------------------ helpers
def torchrun(logdir: Path, *extra: str, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "--config_path", str(TINY), "--logdir", str(logdir), "--disable-wandb", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def metrics(logdir: Path) -> list[dict]:
    return [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def training_state(ckpt: Path, tmp: Path) -> dict:
    """Every tensor of a DCP checkpoint (models, optimizers, EMA), read without a process group."""
    out = tmp / f"{ckpt.parent.parent.name}_{ckpt.name}.pt"
    dcp_to_torch_save(ckpt, out)
    return flat(torch.load(out, weights_only=False))


def tiny_model_config() -> dict:
    return dict(load_config(TINY).model)


def params(model) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


# ------------------------------------------------------------ 2 processes, torchrun (slow)
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A: 4 iterations uninterrupted (checkpoints at 2 and 4). B: stopped after 2, resumed to 4."""
    root = tmp_path_factory.mktemp("train")
    a, b = root / "a", root / "b"
    ra = torchrun(a)
    log.info("2-process run:\n%s", "\n".join(line for line in ra.stderr.splitlines() if "pipeline.trainer" in line
                                              or "train_checkpoint" in line))
    torchrun(b, "train.max_iters=2")
    rb = torchrun(b, "--resume")
    return {"a": a, "b": b, "root": root, "resume_log": rb.stderr}


@pytest.mark.slow
def test_two_process_run_trains(runs):
    a = runs["a"]
    lines = metrics(a)
    steps = [m for m in lines if "critic_loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    assert [m["step"] for m in steps if "generator_loss" in m] == [1, 3]  # dfake_gen_update_ratio 2
    for m in steps:
        for key in ("critic_loss", "critic_grad_norm", "step_time", "samples_per_s", "lr", "lr_critic"):
            assert math.isfinite(m[key]) and m[key] >= 0, (key, m)
        if "generator_loss" in m:
            assert math.isfinite(m["generator_loss"]) and math.isfinite(m["generator_grad_norm"])
    log.info("tiny 2-process step times: %s s; peak RSS %.2f GiB",
             [round(m["step_time"], 3) for m in steps], max(m["peak_mem_gb"] for m in steps))
    final = lines[-1]
    assert final["real_score_checksum_start"] == final["real_score_checksum_end"]  # the real score is frozen


@pytest.mark.slow
def test_two_process_weights_change_and_ema_lags(runs, tmp_path):
    ckpts = runs["a"] / "checkpoints"
    s2 = training_state(ckpts / "step_000002", tmp_path)
    s4 = training_state(ckpts / "step_000004", tmp_path)
    for model in ("generator", "critic"):
        keys = [k for k in s2 if k.startswith(f"{model}.model.")]
        assert keys
        changed = sum(not torch.equal(s2[k], s4[k]) for k in keys)
        assert changed == len(keys), f"{model}: only {changed}/{len(keys)} tensors changed"
    export = torch.load(ckpts / "step_000004" / "model.pt", weights_only=True)
    assert set(export) == {"generator", "generator_ema"}
    gen, ema = export["generator"], export["generator_ema"]
    assert gen.keys() == ema.keys()
    assert any(not torch.equal(gen[k], ema[k]) for k in gen)  # EMA (0.99) lags the live weights
    assert all(torch.equal(gen[k], s4[f"generator.model.{k}"]) for k in gen)  # export == sharded state


@pytest.mark.slow
@pytest.mark.parametrize("use_ema", [False, True])
def test_exported_pt_loads_into_wandit(runs, use_ema):
    path = runs["a"] / "checkpoints" / "step_000004" / "model.pt"
    sd = load_dit_state_dict(path, use_ema=use_ema)
    model = load_dit_weights(WanDiT(**tiny_model_config()), sd)
    assert all(torch.equal(p, sd[n]) for n, p in model.named_parameters())


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(runs, tmp_path):
    assert "resumed from" in runs["resume_log"] and "at step 2" in runs["resume_log"]
    a = training_state(runs["a"] / "checkpoints" / "step_000004", tmp_path)
    b = training_state(runs["b"] / "checkpoints" / "step_000004", tmp_path)
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:
        if isinstance(a[k], torch.Tensor):
            if a[k].numel():
                worst = max(worst, (a[k].double() - b[k].double()).abs().max().item())
        else:
            assert a[k] == b[k], k
    log.info("resume: %d entries compared, max |uninterrupted - resumed| = %g", len(a), worst)
    assert worst <= 1e-6
    assert [m["critic_loss"] for m in metrics(runs["a"]) if m.get("step") in (3, 4) and "critic_loss" in m] == \
        [m["critic_loss"] for m in metrics(runs["b"]) if m.get("step") in (3, 4) and "critic_loss" in m]


@pytest.mark.slow
def test_a_rank0_only_failure_stops_every_rank_with_one_line(tmp_path):
    """Only rank 0 writes config.yaml (and starts wandb): when that fails, rank 0 prints the one
    error line and rank 1 stops with one log line, not a traceback from a collective whose peer
    left (or, with NCCL, a wait for the collective timeout)."""
    (tmp_path / "config.yaml").mkdir()  # rank 0 cannot write config.yaml
    r = torchrun(tmp_path, "train.max_iters=1", check=False)
    assert r.returncode == 1  # torchrun's own code once a worker failed (both exit 2: "exitcode  : 2")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "config.yaml" in errors[0], r.stderr[-4000:]
    assert "[rank1]: Traceback" not in r.stderr and "Connection closed" not in r.stderr, r.stderr[-4000:]
    assert "[rank1] WARNING train: stopping: rank 0 failed to write" in r.stderr, r.stderr[-4000:]
    assert not (tmp_path / "checkpoints").exists()


# ------------------------------------------------------------------ one process, in-process
def make_trainer(logdir, info, *overrides, resume=False) -> DMDTrainer:
    cfg = load_config(TINY, list(overrides))
    return DMDTrainer(cfg, logdir, info, read_prompts(cfg.train.data_path), resume=resume)


@pytest.mark.slow
def test_single_process_accumulates_and_updates(tmp_path, one_process):
    trainer = make_trainer(tmp_path, one_process, "train.max_iters=3", "train.save_every=100")
    assert trainer.accum == 2  # total_batch_size 2 = 1 process x batch 1 x 2 micro-batches
    real0, gen0, critic0 = params(trainer.real_score), params(trainer.generator), params(trainer.critic)
    trainer.train()
    assert trainer.data.position == 2 * 2 + 2 * 3  # 2 generator + 3 critic steps, 2 micro-batches each
    assert all(torch.equal(real0[n], p) for n, p in params(trainer.real_score).items())
    assert all(not torch.equal(gen0[n], p) for n, p in params(trainer.generator).items())
    assert all(not torch.equal(critic0[n], p) for n, p in params(trainer.critic).items())
    assert all(not p.requires_grad for p in trainer.real_score.parameters())
    live = params(trainer.generator)
    ema = {n: t.full_tensor() for n, t in trainer.ema.shadow.items()}  # started at 1, updated at iteration 2
    assert any(not torch.equal(live[n], ema[n]) for n in live)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000003"]


@pytest.mark.slow
def test_training_with_the_methods_sink_window_and_positions(tmp_path, one_process):
    """Sink 1 + a window that evicts inside the clip, relativistic positions, checkpointing on:
    the configuration of configs/self_forcing_dmd.yaml at tiny size trains."""
    trainer = make_trainer(tmp_path, one_process, "train.max_iters=2", "train.save_every=100",
                           "train.num_training_frames=9", "train.local_attn_size=4", "train.sink_size=1",
                           "train.position_policy=relativistic", "train.gradient_checkpointing=true")
    assert (trainer.settings.local_attn_size, trainer.settings.sink_size, trainer.settings.policy) == \
        (4, 1, "relativistic")
    gen0 = params(trainer.generator)
    trainer.train()
    assert any(not torch.equal(gen0[n], p) for n, p in params(trainer.generator).items())
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(v) for m in lines for v in m.values() if isinstance(v, float))


@pytest.mark.slow
def test_crash_mid_save_keeps_the_last_checkpoint_and_resume(tmp_path, one_process, monkeypatch):
    trainer = make_trainer(tmp_path, one_process, "train.max_iters=1")
    trainer.train()
    root = tmp_path / "checkpoints"
    assert train_ckpt.latest_checkpoint(root).name == "step_000001"

    real_save = train_ckpt.dcp.save

    def crash(state, checkpoint_id):
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(train_ckpt.dcp, "save", crash)
    trainer.step = 2
    with pytest.raises(OutputError, match="disk full") as failed:  # one line; the partial save is removed
        trainer.save()
    assert "step_000001 is intact" in str(failed.value) and "\n" not in str(failed.value)
    assert train_ckpt.latest_checkpoint(root).name == "step_000001"
    assert not (root / ".tmp_step_000002").exists()

    monkeypatch.setattr(train_ckpt.dcp, "save", real_save)
    trainer.save()
    assert sorted(p.name for p in root.iterdir()) == ["step_000001", "step_000002"]
    trainer.step = 3
    trainer.save()  # keep_checkpoints: 2
    assert sorted(p.name for p in root.iterdir()) == ["step_000002", "step_000003"]

    with pytest.raises(CheckpointError, match="--resume"):
        make_trainer(tmp_path, one_process)
    resumed = make_trainer(tmp_path, one_process, resume=True)
    assert resumed.step == 3 and resumed.data.position == trainer.data.position and resumed.ema is not None
    want = params(trainer.generator)
    assert all(torch.equal(want[n], p) for n, p in params(resumed.generator).items())


@pytest.mark.slow
def test_final_metrics_line_that_cannot_be_written_is_a_warning(tmp_path, one_process, caplog):
    """The real-score checksum line appended after the last save: a file system gone read-only (or
    full) by then costs that line and a warning, not a traceback after a finished run."""
    trainer = make_trainer(tmp_path, one_process, "train.max_iters=1", "train.save_every=0")
    trainer.train()
    trainer.metrics.path = tmp_path / "gone" / "metrics.jsonl"  # opening it for append fails (ENOENT)
    with caplog.at_level(logging.WARNING, logger="pipeline.trainer"):
        trainer.finish()
    assert [r.message for r in caplog.records if "cannot append to" in r.message and "gone" in r.message]


@pytest.mark.slow
def test_init_from_base_folder_and_ode_init_pt(tmp_path, one_process):
    """Critic and real score from a diffusers-named base DiT, generator from a Self-Forcing-style
    .pt; the critic's updates must not leak into the frozen real score."""
    torch.manual_seed(1)
    base = WanDiT(**tiny_model_config()).state_dict()
    save_dit_state_dict(base, tmp_path / "transformer", naming="diffusers")
    torch.manual_seed(2)
    ode = WanDiT(**tiny_model_config()).state_dict()
    torch.save({"generator": {f"model.{k}": v for k, v in ode.items()}}, tmp_path / "ode_init.pt")
    trainer = make_trainer(tmp_path / "log", one_process, "random_init=false", "train.max_iters=1",
                           f"train.score_ckpt={tmp_path / 'transformer'}",
                           f"train.generator_ckpt={tmp_path / 'ode_init.pt'}")
    for model, want in ((trainer.generator, ode), (trainer.critic, base), (trainer.real_score, base)):
        assert all(torch.equal(want[n], p) for n, p in params(model).items())
    trainer.train()
    assert all(torch.equal(base[n], p) for n, p in params(trainer.real_score).items())
    assert any(not torch.equal(base[n], p) for n, p in params(trainer.critic).items())


@pytest.mark.parametrize("name, window, sink, policy", [("self_forcing_dmd", 6, 1, "relativistic"),
                                                        ("self_forcing_dmd_plain", 21, 0, "absolute")])
@pytest.mark.parametrize("world", [1, 2, 8, 64])
def test_reference_config_loads_and_splits_the_batch(world, name, window, sink, policy):
    from pipeline.trainer import grad_accumulation, latent_shape, validate_train_config

    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert (cfg.train.local_attn_size, cfg.train.sink_size, cfg.train.position_policy) == (window, sink, policy)
    validate_train_config(cfg, world)
    assert grad_accumulation(cfg, world) == 64 // world
    assert latent_shape(cfg) == (16, 60, 104) and cfg.train.num_training_frames == 21
    assert (cfg.train.lr, cfg.train.lr_critic, cfg.train.beta1, cfg.train.beta2) == (2e-6, 4e-7, 0.0, 0.999)
    assert (cfg.train.guidance_scale, cfg.train.dfake_gen_update_ratio, cfg.train.ema_weight,
            cfg.train.ema_start_step) == (3.0, 5, 0.99, 200)


def test_prompt_stream_deals_every_prompt_per_epoch():
    prompts = [f"p{i}" for i in range(7)]
    streams = [PromptStream(prompts, r, 2, seed=0) for r in range(2)]
    epoch = [s.next_batch(1)[0] for s in streams for _ in range(4)]  # ceil(7/2) = 4 per rank
    assert set(epoch) == set(prompts)  # one prompt repeats to pad the epoch to 8
    again = PromptStream(prompts, 1, 2, seed=0)
    again.position = 2
    streams[1].position = 2
    assert again.next_batch(1) == streams[1].next_batch(1)


# ---------------------------------------------------------------------------- user errors
def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", "--config_path", str(TINY), "--logdir", "/nonexistent/x",
                           "--disable-wandb", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def assert_one_line(stderr: str, *needles: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.slow
def test_cli_wrong_key_and_missing_prompts_exit_2():
    r = cli("train.lrr=1")
    assert r.returncode == 2
    assert_one_line(r.stderr, "train.lrr")
    r = cli("train.data_path=/nonexistent/prompts.txt")
    assert r.returncode == 2
    assert_one_line(r.stderr, "train.data_path", "/nonexistent/prompts.txt")


@pytest.mark.parametrize("make", ["dir", "empty", "binary"])
def test_unreadable_prompt_file_is_one_line(tmp_path, make, capsys, monkeypatch):
    monkeypatch.setattr(train, "setup_logging", lambda: None)
    path = tmp_path / "prompts.txt"
    if make == "dir":
        path.mkdir()
    elif make == "empty":
        path.write_text("\n  \n")
    else:
        path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(SystemExit) as exc:
        train.main(["--config_path", str(TINY), "--logdir", str(tmp_path / "log"), f"train.data_path={path}"])
    assert exc.value.code == 2
    assert_one_line(capsys.readouterr().err, "train.data_path", str(path))


def test_bad_batch_split_is_a_config_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "setup_logging", lambda: None)
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exc:
        train.main(["--config_path", str(TINY), "--logdir", str(tmp_path), "train.batch_size=2",
                    "train.total_batch_size=3"])
    assert exc.value.code == 2
    assert_one_line(capsys.readouterr().err, "train.total_batch_size")
