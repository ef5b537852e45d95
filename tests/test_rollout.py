"""The inference rollout on configs/tiny.yaml: events at the planned blocks, constant memory,
determinism."""
import gc

import pytest
import torch

from pipeline.generate import build_models
from pipeline.plan import plan_prompt
from pipeline.rollout import RolloutSettings, plan_blocks, rollout
from utils.config import load_config


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config("configs/tiny.yaml")
    return cfg, build_models(cfg)


def run(cfg, models, prompt, seed=0, cache=None, on_block=None):
    plan = plan_prompt(prompt, cfg, models.vae.temporal_factor)
    settings = RolloutSettings.from_config(cfg)
    latent = models.vae.latent_shape(cfg.height, cfg.width)
    cache = cache or settings.new_cache(models.dit, 1, latent[1:])
    texts = [models.text_encoder([s.text]) for s in plan.segments]
    gen = torch.Generator().manual_seed(seed)
    blocks = rollout(models.dit, cache, settings, plan_blocks(plan.block_events, plan.block_segment, texts),
                     latent_shape=latent, generator=gen)
    for i, (_, block) in enumerate(blocks):
        if on_block:
            on_block(i, block, cache)
    return plan, cache


def test_events_happen_at_planned_blocks(tiny):
    cfg, models = tiny
    settings = RolloutSettings.from_config(cfg)
    latent = models.vae.latent_shape(cfg.height, cfg.width)
    cache = settings.new_cache(models.dit, 1, latent[1:])
    seen, current = [], {}
    flush, cut = cache.flush, cache.cut
    cache.flush = lambda keep: (seen.append(("flush", current["block"], keep)), flush(keep))[-1]
    cache.cut = lambda: (seen.append(("cut", current["block"])), cut())[-1]
    positions = []
    commit = cache.commit

    def spy_commit(n):
        if n == settings.block_frames:  # the clean pass of a block: record where it sat
            current["block"] = current.get("block", 0) + 1
            positions.append(cache.current_runs(n)[0][0])
        commit(n)
    cache.commit = spy_commit
    current["block"] = 0
    prompt = "walks[1.5s] | runs[1.5s] | a new place[1.5s#] | still there[1.5s]"
    plan, _ = run(cfg, models, prompt, cache=cache)
    firsts = [s.first_block for s in plan.segments]
    assert seen == [("flush", firsts[1], cfg.flush_keep), ("flush", firsts[2], cfg.flush_keep),
                    ("cut", firsts[2]), ("flush", firsts[3], cfg.flush_keep)]
    # the cut block (only) sits at shifted positions; relative positions never leave the window
    cut_block = firsts[2]
    assert positions[cut_block] == cfg.sink_size + cfg.flush_keep + cfg.rope_cut_offset
    others = [p for i, p in enumerate(positions) if i != cut_block]
    assert max(others) + settings.block_frames <= cfg.local_attn_size


def live_tensor_bytes() -> int:
    """Bytes of the CPU tensor storages alive (fake tensors that earlier tests left have no storage)."""
    from torch._subclasses.fake_tensor import FakeTensor

    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        try:
            if issubclass(type(obj), torch.Tensor) and not isinstance(obj, FakeTensor) and obj.device.type == "cpu":
                s = obj.untyped_storage()
                storages[s.data_ptr()] = s.nbytes()
        except Exception:  # noqa: BLE001 - some objects refuse inspection
            continue
    return sum(storages.values())


def test_memory_does_not_grow_with_length(tiny):
    cfg, models = tiny
    marks = {}

    def on_block(i, block, cache):
        if i in (12, 75):          # ~10 s and ~60 s of video into the rollout
            marks[i] = (live_tensor_bytes(), cache.memory_bytes())
    plan, _ = run(cfg, models, "a long walk[61s]", on_block=on_block)
    assert plan.total_blocks > 75
    (b10, c10), (b60, c60) = marks[12], marks[75]
    assert c10 == c60
    assert b60 <= b10 * 1.01, (b10, b60)


def test_same_seed_same_latents(tiny):
    cfg, models = tiny
    out = {}
    for key, seed in (("a", 3), ("b", 3), ("c", 4)):
        blocks = []
        run(cfg, models, "a fox runs[1s] | jumps[1s#]", seed=seed,
            on_block=lambda i, b, c: blocks.append(b.clone()))
        out[key] = torch.cat(blocks, dim=1)
    assert torch.equal(out["a"], out["b"])
    assert not torch.allclose(out["a"], out["c"])


def test_context_noise_renoises_the_cache_write(tiny):
    """context_noise > 0 writes a re-noised block into the cache: the first block (no context
    yet) is unchanged, later blocks see a different context; the same seed still repeats."""
    cfg, models = tiny
    runs = {}
    for key, noise in (("clean", 0), ("noisy", 200), ("noisy2", 200)):
        c = load_config("configs/tiny.yaml", [f"context_noise={noise}"])
        blocks = []
        run(c, models, "a fox runs[2s]", seed=1, on_block=lambda i, b, cache: blocks.append(b.clone()))
        runs[key] = blocks
    assert torch.equal(runs["clean"][0], runs["noisy"][0])
    assert not torch.allclose(runs["clean"][1], runs["noisy"][1])
    assert all(torch.equal(a, b) for a, b in zip(runs["noisy"], runs["noisy2"]))


@pytest.mark.parametrize("marked", [True, False], ids=["final-marked", "unmarked"])
@pytest.mark.parametrize("context_noise", [0, 200])
def test_a_block_is_yielded_before_its_clean_pass(tiny, context_noise, marked):
    """The rollout yields a block as soon as it is denoised and runs its clean pass when the next
    block is asked for, before it reads that block's spec: the first block comes after its
    denoising steps alone (one forward sooner), and from the moment a block's spec is read (a
    live action lands) to its latents there are only its own steps. The latents (through a flush
    and a cut, with the clean pass's random re-noising too) are those of the plain order: each
    block denoised, committed, then handed out. A plan marks its last block ``final``: the
    rollout then ends without that block's clean pass (no block reads it); a source that does not
    mark it (a live session) pays it when it ends."""
    from dataclasses import replace

    from pipeline.rollout import apply_event, commit_block, denoise_block

    cfg = load_config("configs/tiny.yaml", [f"context_noise={context_noise}"])
    models = tiny[1]
    prompt = "walks[1.5s] | runs[1s] | a new place[1.5s#]"
    plan = plan_prompt(prompt, cfg, models.vae.temporal_factor)
    settings = RolloutSettings.from_config(cfg)
    steps = len(settings.denoising_steps)
    latent = models.vae.latent_shape(cfg.height, cfg.width)
    texts = [models.text_encoder([s.text]) for s in plan.segments]

    forwards = []  # True for a clean pass; "spec" where the rollout read a block's spec
    hook = models.dit.register_forward_pre_hook(lambda m, a, kw: forwards.append(bool(kw.get("commit"))),
                                                with_kwargs=True)

    def specs():
        for spec in plan_blocks(plan.block_events, plan.block_segment, texts):
            forwards.append("spec")
            yield spec if marked else replace(spec, final=False)
    try:
        cache = settings.new_cache(models.dit, 1, latent[1:])
        gen = torch.Generator().manual_seed(5)
        got, seen = [], []
        for _, block in rollout(models.dit, cache, settings, specs(), latent_shape=latent, generator=gen):
            got.append(block)
            seen.append(list(forwards))
    finally:
        hook.remove()
    blocks = plan.total_blocks
    assert seen[0] == ["spec"] + [False] * steps
    for i in range(1, blocks):
        assert seen[i] == seen[i - 1] + [True, "spec"] + [False] * steps
    if marked:  # asked for more after the final block: the end, no clean pass, no spec read
        assert forwards == seen[-1]
    else:  # asked for more: the last clean pass, then the end of the specs
        assert forwards == seen[-1] + [True]

    cache = settings.new_cache(models.dit, 1, latent[1:])
    gen = torch.Generator().manual_seed(5)
    timesteps, scheduler = settings.timesteps(), settings.scheduler()
    with torch.no_grad():
        for i, event in enumerate(plan.block_events):
            apply_event(cache, event, settings.flush_keep)
            context = texts[plan.block_segment[i]]
            noise = torch.randn((1, settings.block_frames, *latent), generator=gen)
            clean = denoise_block(models.dit, cache, noise, context, timesteps, scheduler, generator=gen)
            commit_block(models.dit, cache, clean, context, settings.context_noise, gen, scheduler)
            assert torch.equal(clean, got[i]), i


def test_an_unknown_event_is_an_error():
    from pipeline.rollout import apply_event

    with pytest.raises(ValueError, match="unknown block event 'flsh'"):
        apply_event(None, "flsh", 2)
