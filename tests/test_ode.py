"""The ODE-initialisation stage on tiny configs: the sampler against a closed-form ODE, the
trajectory files (sharded over ranks, resumable, checked on load), the regression (its inputs,
its loss falling), and the chain trajectories → regression → a .pt that DMD training and
inference load."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from model.scheduler import FlowMatchScheduler
from pipeline.ode import (MANIFEST, ODETrainer, TrajectorySet, ode_regression_loss, sample_trajectory,
                          sampling_sigmas, shard_name, trajectory_settings, write_shard)
from pipeline.trainer import DMDTrainer, read_prompts
from utils.config import load_config
from utils.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
TINY_ODE = REPO / "configs" / "tiny_ode.yaml"
SCRIPT = REPO / "scripts" / "ode_trajectories.py"
NUM_PROMPTS = len(read_prompts(REPO / "tests" / "assets" / "train_prompts.txt"))


def make_set(out: Path, *overrides: str, ranks: int = 1) -> subprocess.CompletedProcess:
    cmd = [str(SCRIPT), "--config_path", str(TINY_ODE), f"train.data_path={out}", *overrides]
    if ranks > 1:
        cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def latents_of(folder: Path) -> dict[str, torch.Tensor]:
    return {p.name: load_file(p)["latents"] for p in sorted(folder.glob("shard_*.safetensors"))}


def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip() and " INFO " not in line
             and " WARNING " not in line]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trajectory_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ode") / "set"
    result = make_set(out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


# ------------------------------------------------------------------------------ the ODE
class LinearFlow(torch.nn.Module):
    """A 'model' whose flow is a·x, a = mean of the text embedding: dx/dσ = a·x has Euler steps
    x ← (1 + a·Δσ)·x, so every stored point has a closed form."""

    def forward(self, x, t, context):
        self.seen_t = t
        return context.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1) * x


def test_sampler_is_euler_with_cfg_and_stores_the_few_step_points():
    scheduler = FlowMatchScheduler(5.0, 1000)
    stored = [1000.0, 937.5, 833.3333129882812, 625.0, 0.0]
    sigmas, keep = sampling_sigmas(scheduler, stored, 10)
    assert sigmas[0] == 1 and sigmas[-1] == 0 and bool((sigmas[1:] < sigmas[:-1]).all())
    assert torch.allclose(sigmas[keep], torch.tensor(stored, dtype=torch.float64) / 1000, atol=1e-7)
    # the ten-step grid holds s = 1, 0.5 and 0 (σ 1, 0.8333, 0); s = 0.75 and 0.25 (σ 0.9375, 0.625) are added
    assert len(sigmas) == 11 + 2
    noise = torch.randn(2, 3, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    cond, uncond = torch.full((2, 5, 8), 0.3), torch.full((1, 5, 8), -0.2)
    g = 2.5
    out = sample_trajectory(LinearFlow(), noise, cond, uncond, sigmas, keep, g, 1000)
    a = -0.2 + g * (0.3 - -0.2)
    factor, want = 1.0, []
    for j in range(len(sigmas)):
        if j in keep:
            want.append(factor * noise)
        if j + 1 < len(sigmas):
            factor *= 1 + a * float(sigmas[j + 1] - sigmas[j])
    assert out.shape == (2, 5, 3, 4, 2, 2)
    torch.testing.assert_close(out, torch.stack(want, dim=1), rtol=1e-6, atol=1e-6)
    assert torch.equal(out[:, 0], noise)  # the first point is the noise itself


def test_sampler_converges_to_the_exact_solution():
    """With many steps the Euler end approaches x·exp(−a) (σ runs from 1 to 0)."""
    scheduler = FlowMatchScheduler(5.0, 1000)
    sigmas, keep = sampling_sigmas(scheduler, [1000.0, 0.0], 4000)
    noise = torch.ones(1, 1, 1, 1, 1)
    out = sample_trajectory(LinearFlow(), noise, torch.full((1, 1, 1), 0.7), torch.full((1, 1, 1), 0.7), sigmas,
                            keep, 1.0, 1000)
    assert abs(float(out[0, -1]) - torch.exp(torch.tensor(-0.7)).item()) < 1e-3


# ------------------------------------------------------------------------------ regression
class Recorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, context, **kw):
        self.x, self.t, self.kw = x, t, kw
        return x * self.w  # flow 0 at w = 0: x0 = x_t


def test_regression_draws_one_point_per_block_and_skips_clean_frames():
    cfg = load_config(TINY_ODE, ["train.num_training_frames=9"])
    settings = ODETrainer.rollout_settings(cfg)
    timesteps = torch.tensor(trajectory_settings(cfg)["timesteps"])
    b, p, f = 3, len(timesteps), 9
    traj = torch.arange(p, dtype=torch.float32).view(1, p, 1, 1, 1, 1).expand(b, p, f, 2, 1, 1).clone()
    model = Recorder()
    loss, info = ode_regression_loss(model, traj, timesteps, torch.zeros(b, 4, 8), settings,
                                     torch.Generator().manual_seed(3), settings.scheduler())
    drawn = model.x[:, :, 0, 0, 0].long()  # [B, F]: the point index each frame was taken from
    assert torch.equal(drawn, drawn[:, ::3].repeat_interleave(3, dim=1))  # one draw per block of 3
    assert len(set(drawn.flatten().tolist())) > 1
    assert torch.equal(model.t, timesteps[drawn])
    assert model.kw == {"num_frame_per_block": 3, "local_attn_size": -1, "sink_size": 0}
    noisy = drawn != p - 1
    err = (drawn.float() - (p - 1)).square()  # x0 = x_t = the point's value; the clean end is p - 1
    assert torch.isclose(loss, (err * noisy).sum() / noisy.sum())
    assert info["noisy_frames"] == pytest.approx(noisy.float().mean().item())
    loss.backward()
    assert model.w.grad is not None


def test_method_window_reaches_the_forward():
    cfg = load_config(TINY_ODE, ["train.num_training_frames=9", "train.local_attn_size=6", "train.sink_size=1"])
    settings = ODETrainer.rollout_settings(cfg)
    model = Recorder()
    traj = torch.zeros(1, 5, 9, 2, 1, 1)
    ode_regression_loss(model, traj, torch.tensor(trajectory_settings(cfg)["timesteps"]), torch.zeros(1, 4, 8),
                        settings, torch.Generator().manual_seed(0), settings.scheduler())
    assert model.kw == {"num_frame_per_block": 3, "local_attn_size": 6, "sink_size": 1}
    with pytest.raises(ConfigError, match="position_policy=absolute"):
        from pipeline.trainer import validate_train_config
        validate_train_config(load_config(TINY_ODE, ["train.num_training_frames=9", "train.local_attn_size=6",
                                                     "train.position_policy=relativistic"]))


# ------------------------------------------------------------------------------ the files
@pytest.mark.slow
def test_set_is_complete_and_rerun_is_a_no_op(trajectory_set):
    manifest = json.loads((trajectory_set / MANIFEST).read_text())
    assert manifest["num_prompts"] == NUM_PROMPTS and len(manifest["shards"]) == -(-NUM_PROMPTS // 2)
    with safe_open(str(trajectory_set / shard_name(0)), framework="pt") as f:
        assert f.get_tensor("prompt_index").tolist() == [0, 1]
        assert json.loads(f.metadata()["prompts"]) == read_prompts(REPO / "tests/assets/train_prompts.txt")[:2]
        assert list(f.get_slice("latents").get_shape()) == [2, 5, 6, 4, 4, 6]
    before = {p.name: p.stat().st_mtime_ns for p in trajectory_set.iterdir()}
    result = make_set(trajectory_set)
    assert result.returncode == 0 and "nothing to do" in result.stderr
    assert before == {p.name: p.stat().st_mtime_ns for p in trajectory_set.iterdir()}


@pytest.mark.slow
def test_resume_remakes_only_what_is_missing_or_damaged(trajectory_set, tmp_path):
    """An interrupted run (a shard missing, one cut short, a half-written temporary, no manifest)
    resumes to the same set bit for bit, keeping the good shards as they are."""
    out = tmp_path / "set"
    out.mkdir()
    for p in trajectory_set.glob("shard_*"):
        (out / p.name).write_bytes(p.read_bytes())
    (out / shard_name(1)).unlink()
    data = (out / shard_name(2)).read_bytes()
    (out / shard_name(2)).write_bytes(data[:len(data) // 2])
    (out / f".tmp_{shard_name(3)}").write_bytes(b"partial")
    kept = (out / shard_name(0)).stat().st_mtime_ns
    result = make_set(out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "making shard_00002.safetensors again" in result.stderr
    assert "4 to make, 3 already made" in result.stderr  # shards 1 and 2 (2 prompts each) are made again
    assert (out / shard_name(0)).stat().st_mtime_ns == kept
    assert not (out / f".tmp_{shard_name(3)}").exists()
    want, got = latents_of(trajectory_set), latents_of(out)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    TrajectorySet(out, load_config(TINY_ODE))


@pytest.mark.slow
def test_two_ranks_make_the_same_set(trajectory_set, tmp_path):
    result = make_set(tmp_path / "set", ranks=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "set" / MANIFEST).is_file()
    want, got = latents_of(trajectory_set), latents_of(tmp_path / "set")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.slow
def test_another_sets_folder_is_refused_not_overwritten(trajectory_set, tmp_path):
    out = tmp_path / "set"
    out.mkdir()
    (out / shard_name(0)).write_bytes((trajectory_set / shard_name(0)).read_bytes())
    one_line_error(make_set(out, "ode.guidance_scale=5.0"), "another trajectory set", "guidance_scale")
    assert (out / shard_name(0)).read_bytes() == (trajectory_set / shard_name(0)).read_bytes()
    done = make_set(trajectory_set, "ode.sample_steps=9")  # a finished set made with other settings
    one_line_error(done, "sample_steps 8", "9")
    one_line_error(make_set(tmp_path / "x", "ode.shard_size=0"), "ode.shard_size")


def copy_set(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


@pytest.mark.slow
def test_trajectories_are_checked_on_load(trajectory_set, tmp_path):
    cfg = load_config(TINY_ODE)
    assert len(TrajectorySet(trajectory_set, cfg)) == NUM_PROMPTS

    def refused(folder, *needles, config=cfg):
        with pytest.raises(ConfigError) as err:
            TrajectorySet(folder, config)
        assert "\n" not in str(err.value)
        for needle in needles:
            assert needle in str(err.value), str(err.value)

    refused(tmp_path / "nothing", "not a folder of ODE trajectories")
    unfinished = copy_set(trajectory_set, tmp_path / "unfinished")
    (unfinished / MANIFEST).unlink()
    refused(unfinished, "no trajectories.json", "resumes")
    # shape: the config trains on 9 frames, the set holds 6
    refused(trajectory_set, "latent_shape [6, 4, 4, 6]", "[9, 4, 4, 6]",
            config=load_config(TINY_ODE, ["train.num_training_frames=9"]))
    # count: other few-step timesteps mean other stored points
    refused(trajectory_set, "timesteps", config=load_config(TINY_ODE, ["denoising_step_list=[1000,500]"]))
    missing = copy_set(trajectory_set, tmp_path / "missing")
    (missing / shard_name(1)).unlink()
    refused(missing, "shard_00001.safetensors is missing")
    damaged = copy_set(trajectory_set, tmp_path / "damaged")
    data = (damaged / shard_name(2)).read_bytes()
    (damaged / shard_name(2)).write_bytes(data[:100])
    refused(damaged, "shard_00002.safetensors cannot be read")
    # prompt index: a shard holding the wrong prompts' trajectories
    wrong = copy_set(trajectory_set, tmp_path / "wrong")
    shard = load_file(wrong / shard_name(1))
    with safe_open(str(wrong / shard_name(1)), framework="pt") as f:
        prompts = json.loads(f.metadata()["prompts"])
    write_shard(wrong / shard_name(1), shard["latents"], [4, 5], prompts, trajectory_settings(cfg))
    refused(wrong, "shard_00001.safetensors holds prompt indices [4, 5], expected 2..3")
    shape = copy_set(trajectory_set, tmp_path / "shape")
    write_shard(shape / shard_name(1), shard["latents"][:, :4], [2, 3], prompts, trajectory_settings(cfg))
    refused(shape, "shape [2, 4, 6, 4, 4, 6]", "expected [2, 5, 6, 4, 4, 6]")
    count = copy_set(trajectory_set, tmp_path / "count")
    manifest = json.loads((count / MANIFEST).read_text())
    manifest["num_prompts"] += 1
    (count / MANIFEST).write_text(json.dumps(manifest))
    refused(count, f"holds {NUM_PROMPTS} trajectories, its manifest says {NUM_PROMPTS + 1}")


@pytest.mark.slow
def test_train_cli_refuses_an_unfinished_set_in_one_line(trajectory_set, tmp_path):
    unfinished = copy_set(trajectory_set, tmp_path / "unfinished")
    (unfinished / MANIFEST).unlink()
    result = subprocess.run([sys.executable, "train.py", "--config_path", str(TINY_ODE), "--logdir",
                             str(tmp_path / "log"), "--disable-wandb", f"train.data_path={unfinished}"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    one_line_error(result, "no trajectories.json")


# ------------------------------------------------------------------------------ training
def params(model) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


@pytest.mark.slow
def test_regression_loss_falls(trajectory_set, tmp_path, one_process):
    """150 CPU steps on the fixed tiny set: the loss falls well below where it starts (the last 50
    steps' mean is 0.14 of the first 50's on torch 2.13)."""
    cfg = load_config(TINY_ODE, [f"train.data_path={trajectory_set}", "train.max_iters=150", "train.save_every=0"])
    trainer = ODETrainer(cfg, tmp_path, one_process, TrajectorySet(trajectory_set, cfg))
    trainer.train()
    losses = [json.loads(line)["ode_loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if "ode_loss" in line]
    assert len(losses) == 150
    first, last = sum(losses[:50]) / 50, sum(losses[-50:]) / 50
    assert last < 0.25 * first, (first, last)


def tiny_wan_folder(root: Path, cfg) -> Path:
    """A Wan2.1-Diffusers-shaped folder of tiny random parts (text encoder, tokenizer, VAE)."""
    from model.text_encoder import TextEncoder
    from model.vae import WanVAE

    enc = TextEncoder.from_config(cfg.tiny_text_encoder, cfg.tokenizer_path, cfg.model.text_len)
    enc.encoder.save_pretrained(root / "text_encoder")
    enc.tokenizer.save_pretrained(root / "tokenizer")
    WanVAE.from_config(cfg.tiny_vae).vae.save_pretrained(root / "vae")
    return root


@pytest.mark.slow
def test_chain_from_base_weights_to_dmd_and_inference(tmp_path, one_process):
    """Trajectories → ODE regression → model.pt → DMD training starts from it → inference loads it."""
    arch = ["model.in_dim=16", "model.out_dim=16", "model.text_len=64",  # configs/tiny.yaml's DiT
            "tiny_text_encoder.num_layers=2"]
    traj = tmp_path / "traj"
    assert make_set(traj, *arch).returncode == 0
    cfg = load_config(TINY_ODE, [*arch, f"train.data_path={traj}", "train.max_iters=3", "train.save_every=3"])
    ode = ODETrainer(cfg, tmp_path / "ode", one_process, TrajectorySet(traj, cfg))
    ode.train()
    exported = tmp_path / "ode" / "checkpoints" / "step_000003" / "model.pt"
    trained = params(ode.generator)

    dmd_cfg = load_config(REPO / "configs" / "tiny_dmd.yaml", [*arch, f"train.generator_ckpt={exported}",
                                                               "train.max_iters=1", "train.save_every=0"])
    dmd = DMDTrainer(dmd_cfg, tmp_path / "dmd", one_process, read_prompts(dmd_cfg.train.data_path))
    assert all(torch.equal(trained[n], p) for n, p in params(dmd.generator).items())
    dmd.train()

    tiny = load_config(REPO / "configs" / "tiny.yaml")
    wan = tiny_wan_folder(tmp_path / "wan", tiny)
    result = subprocess.run([sys.executable, "inference.py", "--config_path", "configs/tiny.yaml", "--prompt",
                             "a fox runs[1s]", "--checkpoint_path", str(exported), "--output_folder",
                             str(tmp_path / "videos"), "random_init=false", f"wan_model_path={wan}"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((tmp_path / "videos").glob("*.mp4"))) == 1
