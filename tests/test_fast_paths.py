"""The fast rollout path equals the plain one (within dtype tolerance), and stays fast.

* RoPE: the complex-multiply rotation == the real-valued formula; a whole rollout with keys
  rotated once per block == the naive re-rotation at every forward (through flush and cut);
  the position tables are memoised, so a steady rollout builds none;
* no float64 beyond the (tiny, Wan-exact) sinusoidal time embedding, and no host
  synchronisation op (``.item()``, ``nonzero``, ...) in steady-state blocks; on a GPU the
  rollout runs under ``torch.cuda.set_sync_debug_mode("error")``;
* ``torch.compile`` of the DiT blocks == eager, with no graph break at the cache, one graph per
  cache layout for all layers, and no recompilation in steady state;
* bf16 rollout ≈ fp32 rollout;
* the benchmark's FLOP formula == ``torch.utils.flop_counter``, and the benchmark runs.

The KV-cache oracles at the model level (cached == block-causal full sequence, fast == naive
RoPE bookkeeping through events) are in tests/test_kv_cache.py; constant memory over a long
rollout is in tests/test_rollout.py.
"""
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model.rope import Rope, _rotate_real, apply_rope, rotate
from pipeline.generate import build_models, plan_prompt
from pipeline.rollout import RolloutSettings, plan_blocks, rollout
from utils.config import SWITCHES, load_config
from utils.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
PROMPT = "a walk[3s] | a run[3s#] | a jump[3s] | a rest[3s#]"   # flush, cut, flush, cut


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    return cfg, build_models(cfg)


def benchmark_module():
    spec = importlib.util.spec_from_file_location("benchmark", REPO / "scripts" / "benchmark.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("benchmark", mod)
    spec.loader.exec_module(mod)
    return mod


def blocks_of(cfg, models, prompt=PROMPT, *, naive=False, dit=None, dtype=None, seed=0):
    """A generator of the rollout's latent blocks on a fresh cache."""
    dit = dit or models.dit
    plan = plan_prompt(prompt, cfg, models.vae.temporal_factor)
    settings = RolloutSettings.from_config(cfg)
    latent = models.vae.latent_shape(cfg.height, cfg.width)
    cache = settings.new_cache(dit, 1, latent[1:], naive_rope=naive)
    texts = [models.text_encoder([s.text]).to(dtype or torch.float32) for s in plan.segments]
    gen = torch.Generator().manual_seed(seed)
    blocks = rollout(dit, cache, settings, plan_blocks(plan.block_events, plan.block_segment, texts),
                     latent_shape=latent, generator=gen)
    return (clean for _, clean in blocks)


# ------------------------------------------------------------------------------------- RoPE
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_complex_rotation_equals_real_formula(dtype):
    rope = Rope(128)
    freqs = rope.freqs_for_runs([(0, 1), (4, 2)], 3, 5, "cpu")
    cos, sin = rope.table_for_runs([(0, 1), (4, 2)], 3, 5, "cpu")
    x = torch.randn(2, 3 * 15, 4, 128).to(dtype)
    plain = _rotate_real(x, cos, sin)        # the formulation the fast path replaced
    fast = rotate(x, freqs)
    assert fast.dtype == dtype
    assert torch.allclose(fast.float(), plain.float(), atol=1e-6, rtol=0)
    if dtype == torch.float32:  # the same products and sums: bit for bit (rotate's docstring)
        assert torch.equal(fast, plain)
    assert torch.equal(apply_rope(x, cos, sin), fast)
    # a strided view (a cache slice) is rotated like its contiguous copy
    view = torch.randn(3, 2, 45, 4, 128).to(dtype)[1]
    assert torch.equal(rotate(view, freqs), rotate(view.contiguous(), freqs))


def test_rollout_rotating_once_per_block_equals_naive(tiny):
    cfg, models = tiny
    fast = torch.cat(list(blocks_of(cfg, models)), dim=1)
    naive = torch.cat(list(blocks_of(cfg, models, naive=True)), dim=1)
    assert fast.shape[1] > cfg.local_attn_size  # eviction, flush and cut all happened
    assert torch.allclose(fast, naive, atol=1e-5, rtol=0), (fast - naive).abs().max()


def test_bf16_rollout_turning_stored_keys_equals_naive(tiny):
    """bf16, a long rollout with flushes and cuts: keys stored rotated and turned by position
    differences (no raw copies) against the naive re-rotation of raw keys at every forward. A
    turned key is rounded to bf16 once more per turn; turns are bounded (a frame is turned once
    per layout change while it is in the window, the sink never), so the error does not build up."""
    cfg, models = tiny
    dit16 = build_models(cfg).dit.to(torch.bfloat16)
    prompt = " | ".join(f"part {k}[2s{'#' if k % 3 == 2 else ''}]" for k in range(10))
    fast_cache = []
    real_new_cache = RolloutSettings.new_cache

    def spy(self, *a, **k):
        cache = real_new_cache(self, *a, **k)
        fast_cache.append(cache)
        return cache

    RolloutSettings.new_cache = spy
    try:
        fast = list(blocks_of(cfg, models, prompt, dit=dit16, dtype=torch.bfloat16))
    finally:
        RolloutSettings.new_cache = real_new_cache
    naive = list(blocks_of(cfg, models, prompt, dit=dit16, dtype=torch.bfloat16, naive=True))
    assert len(fast) == len(naive) > 20
    errors = [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(fast, naive)]
    assert all(torch.isfinite(a).all() for a in fast)
    assert max(errors) < 2e-2, errors
    cache = fast_cache[0]
    assert cache.k_raw is None
    # every context frame is turned at most once per block it spends in the window (the sink never)
    ring_frames = cfg.local_attn_size - cfg.sink_size - cfg.num_frame_per_block
    assert 0 < cache.keys_turned <= len(fast) * ring_frames * dit16.num_layers


def test_cache_bookkeeping_allocates_at_most_one_layers_held_keys(tiny, monkeypatch):
    """Turning keys (prepare) and moving slots (commit, flush) work a layer at a time and copy
    buffer to buffer: no temporary of theirs is larger than one layer's held keys, whatever the
    number of layers, in bytes of float32 (at full size the all-layer temporaries were 1.3 GiB
    per block)."""
    from model.kv_cache import KVCache

    cfg, models = tiny
    largest = {}

    class Allocations(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if not func.is_view and not name.endswith("_") and isinstance(out, torch.Tensor):
                largest[name] = max(largest.get(name, 0), out.numel() * out.element_size())
            return out

    for method in ("prepare", "commit", "flush"):
        def watched(self, *a, _real=getattr(KVCache, method), **k):
            with Allocations():
                return _real(self, *a, **k)
        monkeypatch.setattr(KVCache, method, watched)
    n = sum(1 for _ in blocks_of(cfg, models, " | ".join(f"part {k}[2s{'#' if k % 2 else ''}]" for k in range(6))))
    assert n > 6 and largest, "the rollout turned and moved keys"
    heads, head_dim = cfg.model.num_heads, cfg.model.dim // cfg.model.num_heads
    grid = models.dit.grid(*models.vae.latent_shape(cfg.height, cfg.width)[1:])
    held_one_layer = (cfg.local_attn_size - cfg.num_frame_per_block) * grid[0] * grid[1] * heads * head_dim
    assert max(largest.values()) <= held_one_layer * 4, (largest, held_one_layer * 4)  # float32 bytes


def test_cache_memory_script_reports_every_block():
    import subprocess

    out = subprocess.run([sys.executable, str(REPO / "scripts" / "cache_memory.py"), "--config_path",
                          str(REPO / "configs" / "tiny.yaml"), "--blocks", "8"], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    per_block = next(line for line in out.stdout.splitlines() if line.startswith("bookkeeping peak"))
    assert "flush before block 4, flush + cut before block 6" in per_block
    assert len(per_block.split("): ")[1].split(", ")) == 8


def test_position_tables_are_memoised_in_steady_state(tiny):
    """Relativistic positions take a handful of layouts: once each has been seen, a rollout of
    any length with any number of flushes and cuts builds no new table."""
    cfg, models = tiny
    rope = models.dit.rope
    for _ in blocks_of(cfg, models):
        pass
    seen = rope.tables_built
    longer = " | ".join(f"part {k}[2s{'#' if k % 3 == 2 else ''}]" for k in range(12))
    for _ in blocks_of(cfg, models, longer):
        pass
    assert rope.tables_built == seen


def test_text_keys_values_computed_once_per_segment(tiny):
    """Cross-attention keys/values of a prompt are projected once per segment (a flush drops
    them), not at every forward."""
    cfg, models = tiny
    calls = []
    for i, block in enumerate(models.dit.blocks):
        block.cross_attn.project_kv = (lambda f, i: lambda x: (calls.append(i), f(x))[1])(block.cross_attn.project_kv, i)
    try:
        n_blocks = sum(1 for _ in blocks_of(cfg, models))
    finally:
        for block in models.dit.blocks:
            del block.cross_attn.project_kv
    segments = len(plan_prompt(PROMPT, cfg, models.vae.temporal_factor).segments)
    assert n_blocks > segments and len(calls) == segments * cfg.model.num_layers


# -------------------------------------------------------------------- float64 and host syncs
SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select", "unique", "_unique2",
            "equal", "allclose", "tolist"}


class OpRecorder(TorchDispatchMode):
    """Records every ATen op, and the largest float64 tensor any op touches."""

    def __init__(self):
        super().__init__()
        self.ops, self.float64 = set(), {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.ops.add(name)
        flat = list(args) + list((kwargs or {}).values()) + (list(out) if isinstance(out, (tuple, list)) else [out])
        for t in flat:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                self.float64[name] = max(self.float64.get(name, 0), t.numel())
        return out


def test_no_float64_and_no_host_sync_in_steady_state(tiny):
    cfg, models = tiny
    for _ in blocks_of(cfg, models):  # every position layout of this prompt is now memoised
        pass
    blocks = blocks_of(cfg, models)
    next(blocks)  # the first block (the step list is made once per rollout)
    recorder = OpRecorder()
    with recorder:
        for _ in blocks:
            pass
    assert not recorder.ops & SYNC_OPS, recorder.ops & SYNC_OPS
    # the only float64 left is Wan's sinusoidal time embedding: one row of freq_dim/2 angles
    # per latent frame, as Wan computes it (exactness over a few elements, no KV-sized tensor)
    per_forward = cfg.num_frame_per_block * cfg.model.freq_dim
    assert max(recorder.float64.values(), default=0) <= per_forward, recorder.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_rollout_never_synchronises_the_gpu(tiny):
    cfg, models = tiny
    dit = models.dit.to("cuda")
    try:
        plan = plan_prompt(PROMPT, cfg, models.vae.temporal_factor)
        settings = RolloutSettings.from_config(cfg)
        latent = models.vae.latent_shape(cfg.height, cfg.width)
        cache = settings.new_cache(dit, 1, latent[1:])
        texts = [models.text_encoder([s.text]).cuda() for s in plan.segments]
        gen = torch.Generator(device="cuda").manual_seed(0)
        blocks = rollout(dit, cache, settings, plan_blocks(plan.block_events, plan.block_segment, texts),
                         latent_shape=latent, generator=gen)
        next(blocks)  # the first block copies the step list to the GPU once
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            n = sum(1 for _ in blocks)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert n == plan.total_blocks - 1
    finally:
        models.dit.to("cpu")


# --------------------------------------------------------------------------- torch.compile
def cuda_bf16_blocks(cfg, models):
    """The rollout's latent blocks of PROMPT on the GPU, bf16 (the model already moved there)."""
    plan = plan_prompt(PROMPT, cfg, models.vae.temporal_factor)
    settings = RolloutSettings.from_config(cfg)
    latent = models.vae.latent_shape(cfg.height, cfg.width)
    cache = settings.new_cache(models.dit, 1, latent[1:])
    texts = [models.text_encoder([s.text]).to("cuda", torch.bfloat16) for s in plan.segments]
    gen = torch.Generator(device="cuda").manual_seed(0)
    blocks = rollout(models.dit, cache, settings, plan_blocks(plan.block_events, plan.block_segment, texts),
                     latent_shape=latent, generator=gen)
    return (clean for _, clean in blocks)


def compiled_vs_eager(cfg, backend, key_splits=1):
    """The plain eager rollout, and the compiled one (its attention's keys in ``key_splits``)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    models = build_models(cfg)  # a fresh model: compilation is in place
    eager = torch.cat(list(blocks_of(cfg, models)), dim=1)
    models.dit.split_attention_keys(key_splits)
    for block in models.dit.blocks:
        block.compile(backend=backend)
    warm = blocks_of(cfg, models)
    outs = [next(warm) for _ in range(3)]  # compiles the first-block and full-window shapes
    with torch._dynamo.config.patch(error_on_recompile=True):  # steady state: no recompilation
        outs += list(warm)
    stats = {"graphs": counters["stats"]["unique_graphs"], "breaks": sum(counters["graph_break"].values())}
    torch._dynamo.reset()
    return eager, torch.cat(outs, dim=1), stats


@pytest.mark.parametrize("key_splits", [1, 2], ids=["one_kernel", "split_keys"])
def test_compiled_blocks_equal_eager_and_do_not_recompile(tiny, key_splits):
    """Dynamo's tracing of the blocks through the cache with the quick "eager" backend (the
    inductor run is marked slow): no graph break, one graph per cache layout shared by every
    layer (the first block attends to nothing held, every later one to sink + context: 2), and
    no recompilation through flushes and cuts once both were seen; the same with attention's
    keys in two kernels (``attention_key_splits``), against the plain eager rollout."""
    eager, compiled, stats = compiled_vs_eager(tiny[0], "eager", key_splits)
    assert torch.allclose(compiled, eager, atol=1e-5, rtol=0), (compiled - eager).abs().max()
    assert stats == {"graphs": 2, "breaks": 0}, stats


def test_cached_forward_traces_without_graph_breaks(tiny):
    """The whole cached forward (embeddings, every block through the cache, the head) is one
    graph to Dynamo: the cache's bookkeeping happens before the blocks, and a block reads and
    writes its layer's buffers as plain tensors."""
    cfg, models = tiny
    settings = RolloutSettings.from_config(cfg)
    latent = models.vae.latent_shape(cfg.height, cfg.width)
    cache = settings.new_cache(models.dit, 1, latent[1:])
    ctx = models.text_encoder(["a fox"])
    x, t = torch.randn(1, cfg.num_frame_per_block, *latent), torch.full((1, cfg.num_frame_per_block), 1000.0)
    with torch.no_grad():
        models.dit(x, t, ctx, kv_cache=cache, commit=True)  # something held, so the block attends to it
        explained = torch._dynamo.explain(models.dit)(x, t, ctx, kv_cache=cache)
    torch._dynamo.reset()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.slow
@pytest.mark.parametrize("key_splits", [1, 2], ids=["one_kernel", "split_keys"])
def test_inductor_compiled_blocks_equal_eager(tiny, key_splits):
    eager, compiled, _ = compiled_vs_eager(tiny[0], "inductor", key_splits)
    assert torch.allclose(compiled, eager, atol=1e-4, rtol=0), (compiled - eager).abs().max()


COMPILED_RUN = """
import json, os, torch
from torch._dynamo.utils import counters
from pipeline.generate import VideoGenerator, build_models
from pipeline.rollout import plan_blocks, rollout
from utils.config import load_config
cfg = load_config("configs/tiny.yaml", ["compile=true"])
gen = VideoGenerator(cfg, build_models(cfg))
plan = gen.plan("a fox runs[2s]")
blocks = rollout(gen.m.dit, gen.cache, gen.settings, plan_blocks(plan.block_events, plan.block_segment,
                 gen.encode_texts(plan)), latent_shape=gen.latent_shape, generator=torch.Generator().manual_seed(0))
for _ in zip(range(2), blocks):  # the first block and a later one: both graphs
    pass
print(json.dumps({"dir": os.environ["TORCHINDUCTOR_CACHE_DIR"], "hit": counters["inductor"]["fxgraph_cache_hit"],
                  "miss": counters["inductor"]["fxgraph_cache_miss"]}))
"""


@pytest.mark.slow
def test_compiled_kernels_are_cached_across_runs(tmp_path, monkeypatch):
    """``compile=true``: the first run compiles into ~/.cache/infinity-rope/torchinductor (here
    under $XDG_CACHE_HOME), not /tmp; a second process finds every graph there (inductor's FX
    graph cache: hits, no miss). A TORCHINDUCTOR_CACHE_DIR the user set is kept."""
    import json
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")

    def run(env):
        out = subprocess.run([sys.executable, "-c", COMPILED_RUN], capture_output=True, text=True, cwd=REPO,
                             env=env, timeout=600)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    first, second = run(env), run(env)
    assert first["dir"] == str(tmp_path / "xdg" / "infinity-rope" / "torchinductor")
    assert first["miss"] >= 2 and first["hit"] == 0, first
    assert second["hit"] == first["miss"] and second["miss"] == 0, second
    assert any((tmp_path / "xdg" / "infinity-rope" / "torchinductor").rglob("*.py"))  # the generated kernels
    from pipeline.generate import compile_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    (tmp_path / "file").write_text("")  # a cache home that cannot hold folders: torch's default stays
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    assert compile_cache_dir() != tmp_path / "file" / "infinity-rope" / "torchinductor"
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("key_splits", [1, 2], ids=["one_kernel", "split_keys"])
def test_cuda_bf16_compiled_rollout_close_to_eager(tiny, key_splits):
    """The issue's GPU criterion: a bf16 rollout through a flush and a cut, blocks compiled with
    inductor (and q, k, v packed, as build_models makes them; attention's keys in one kernel or,
    ``attention_key_splits``, two parts in one cuDNN call, merged) against eager bf16 with the three
    projections and one SDPA call: every block within 2e-2 relative, every latent finite."""
    cfg = tiny[0]
    torch._dynamo.reset()
    models = build_models(cfg)
    dit = models.dit.to("cuda", torch.bfloat16)
    try:
        def run():
            return [b.float() for b in cuda_bf16_blocks(cfg, models)]
        dit.pack_qkv(False)
        eager = run()
        dit.pack_qkv()
        dit.split_attention_keys(key_splits)
        for block in dit.blocks:
            block.compile()
        compiled = run()
        errors = [((a - b).norm() / b.norm()).item() for a, b in zip(compiled, eager)]
        assert all(torch.isfinite(a).all() for a in compiled)
        assert max(errors) < 2e-2, errors
    finally:
        torch._dynamo.reset()


# ----------------------------------------------------------------------------- CUDA graphs
def test_cuda_graph_dry_run_equals_eager_through_flush_and_cut(tiny):
    """The graphed forward on the CPU (``capture=False``: a replay reruns the captured forward on
    exactly its captured arguments, what a CUDA graph reads) equals eager bit for bit through
    flushes, cuts and new prompts: one graph per cache layout (nothing held; sink + context; each
    for the denoising steps and for the clean pass, which also writes the frames that stay),
    captured at the layout's second forward, reused by a second video on the same cache (which
    captures the first block's clean pass: once per video, it ran eagerly in the first)."""
    cfg = tiny[0]
    models = build_models(cfg)
    eager = torch.cat(list(blocks_of(cfg, models)), dim=1)
    models.dit.use_cuda_graphs(capture=False)
    graphs = models.dit.cuda_graphs
    settings = RolloutSettings.from_config(cfg)
    latent = models.vae.latent_shape(cfg.height, cfg.width)
    cache = settings.new_cache(models.dit, 1, latent[1:])
    real_new_cache = RolloutSettings.new_cache
    RolloutSettings.new_cache = lambda self, *a, **k: cache  # both videos on one cache, as VideoGenerator does
    try:
        first = torch.cat(list(blocks_of(cfg, models)), dim=1)
        assert len(graphs) == 3 and graphs.stats["captured"] == 3 and graphs.stats["failed"] == 0
        assert graphs.stats["eager"] == 4, "a layout runs eagerly once, then replays"
        second = torch.cat(list(blocks_of(cfg, models)), dim=1)
    finally:
        RolloutSettings.new_cache = real_new_cache
    assert torch.equal(first, eager) and torch.equal(second, eager)
    assert graphs.stats["captured"] == 4 and graphs.stats["eager"] == 4, "the second video replays (and captures " \
        "the first block's clean pass)"
    assert cache.text_allocs == 1, "every prompt's text keys/values went into the same buffers"


def test_cuda_graph_dry_run_through_batch_inference_and_an_image_start(tiny, tmp_path):
    """The generator's own path (render: rollout, streaming decode, writer thread) with graphs,
    over three videos on the generator's one cache, one of them starting from an image (its
    first latent frame is committed alone, then the first block attends to it: two more
    layouts): every latent block equals eager."""
    import numpy as np
    from PIL import Image

    from pipeline.generate import VideoGenerator
    from utils.video import VideoWriter

    cfg = tiny[0]
    models = build_models(cfg)
    gen = VideoGenerator(cfg, models)
    image = tmp_path / "start.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (cfg.height, cfg.width, 3), dtype=np.uint8)).save(image)

    def video(prompt, start=None):
        plan = gen.plan(prompt, image_start=start is not None)
        contexts = gen.encode_texts(plan)
        with VideoWriter(tmp_path / "v.mp4", fps=float(cfg.fps), width=int(cfg.width), height=int(cfg.height),
                         background=True) as writer:
            return torch.cat([b.latents for b in gen.render(
                plan_blocks(plan.block_events, plan.block_segment, contexts), writer, seed=0,
                subtitles=[seg.subtitle for seg in plan.segments], total_frames=plan.total_frames,
                image_latent=None if start is None else gen.image_latent(start))], dim=1)

    videos = [(PROMPT, None), ("a door opens[2s] | it closes[2s]", image), ("a walk[2s]", None)]
    eager = [video(*v) for v in videos]
    models.dit.use_cuda_graphs(capture=False)
    graphed = [video(*v) for v in videos]
    assert all(torch.equal(a, b) for a, b in zip(graphed, eager))
    stats = models.dit.cuda_graphs.stats
    assert stats["failed"] == 0 and stats["replayed"] > 4 * stats["eager"] and len(models.dit.cuda_graphs) >= 3, stats


def test_cuda_graph_dry_run_catches_buffers_that_move(tiny, monkeypatch):
    """The dry run is able to fail: with text keys/values in new tensors at every prompt (what
    the cache did before its text buffers), a replay reads the first prompt's text and the
    blocks from the second prompt on differ from eager."""
    from model.kv_cache import KVCache

    def fresh_tensors(self, context, make_layer):
        if self._text_context is not context:
            self.text_kv, self._text_context = [make_layer(i) for i in range(len(self.k_rot))], context

    cfg = tiny[0]
    models = build_models(cfg)
    eager = list(blocks_of(cfg, models))
    monkeypatch.setattr(KVCache, "set_text", fresh_tensors)
    models.dit.use_cuda_graphs(capture=False)
    graphed = list(blocks_of(cfg, models))
    same = [torch.equal(a, b) for a, b in zip(graphed, eager)]
    events = list(plan_prompt(PROMPT, cfg, models.vae.temporal_factor).block_events)
    second_prompt = next(i for i, e in enumerate(events) if e in ("flush", "cut"))
    assert all(same[:second_prompt]) and not any(same[second_prompt:]), same


def test_cuda_graph_dry_run_catches_a_clean_pass_run_twice(tiny, monkeypatch):
    """The dry run is able to fail: a capture that ran its forward twice (the warm-up, then a
    replay in the same call, as the capture did before the clean pass wrote the held slots) runs
    the clean pass over the block it has just written, and every block from the one after that
    capture on differs from eager."""
    from model import cuda_graphs

    def warm_up_then_replay(self, pool, side):
        self.core(self.x, self.t, self.rope, self.layers)
        return self.replay(self.x, self.t, self.rope)

    cfg = tiny[0]
    models = build_models(cfg)
    eager = list(blocks_of(cfg, models))
    monkeypatch.setattr(cuda_graphs._Captured, "capture", warm_up_then_replay)
    models.dit.use_cuda_graphs(capture=False)
    graphed = list(blocks_of(cfg, models))
    same = [torch.equal(a, b) for a, b in zip(graphed, eager)]
    # block 0: the first layout's capture (denoising, harmless twice); block 1: its clean pass
    # (first use: eager) and the steady denoising capture; block 2: the steady clean pass is
    # captured and runs twice, so block 3 attends to a wrong context
    assert all(same[:3]) and not any(same[3:]), same


@pytest.mark.slow  # ~15 s on 2 cores: CI runs it, the GPU check's test step leaves it out
def test_warm_up_leaves_nothing_once_per_process_for_the_first_video(tiny, tmp_path):
    """``VideoGenerator.warm_up`` (a live server's, before its first action): afterwards the first
    real video, with flushes and cuts, captures nothing and runs no forward eagerly (CUDA graphs'
    dry run, which counts them; without the warm-up the same video does both), leaves no trace in
    the output (every block equal to a generator that never warmed up), and holds no decoder
    cache. With the sessions' start picture, the same for a video that starts from it (a warm-up
    without the picture leaves that video's own layouts to it)."""
    import numpy as np
    from PIL import Image

    from pipeline.generate import VideoGenerator, needs_warm_up
    from utils.video import VideoWriter

    cfg = tiny[0]
    picture = tmp_path / "start.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (cfg.height, cfg.width, 3), dtype=np.uint8)).save(picture)

    def first_video(warm: bool, image=None, warm_image=None, prompt=PROMPT):
        models = build_models(cfg)
        models.dit.use_cuda_graphs(capture=False)
        gen = VideoGenerator(cfg, models)
        if warm:
            assert gen.warm_up(image=warm_image) > 0
            assert models.dit.cuda_graphs.stats["failed"] == 0
            assert not any(isinstance(t, torch.Tensor) for t in gen.decoder._cache)
        models.dit.cuda_graphs.stats.clear()
        plan = gen.plan(prompt, image_start=image is not None)
        with VideoWriter(tmp_path / "v.mp4", fps=float(cfg.fps), width=int(cfg.width),
                         height=int(cfg.height)) as writer:
            latents = [b.latents for b in gen.render(
                plan_blocks(plan.block_events, plan.block_segment, gen.encode_texts(plan)), writer, seed=3,
                subtitles=[None] * len(plan.segments), image_latent=image and gen.image_latent(image))]
        return latents, dict(models.dit.cuda_graphs.stats)

    cold, cold_stats = first_video(False)
    warm, warm_stats = first_video(True)
    assert cold_stats["eager"] > 0 and cold_stats["captured"] > 0
    assert warm_stats == {"replayed": warm_stats["replayed"]} and warm_stats["replayed"] > 0
    assert len(warm) == len(cold) and all(torch.equal(a, b) for a, b in zip(warm, cold))

    short = "a door opens[1s] | it closes[1s#]"
    _, stats = first_video(True, image=picture, warm_image=picture, prompt=short)
    assert stats == {"replayed": stats["replayed"]} and stats["replayed"] > 0
    _, stats = first_video(True, image=picture, prompt=short)
    assert stats["eager"] > 0

    assert not needs_warm_up(cfg, torch.device("cpu"))  # tiny: eager on a CPU, nothing to warm
    assert needs_warm_up(cfg, torch.device("cuda"))
    assert all(needs_warm_up(load_config(REPO / "configs" / "tiny.yaml", [f"{k}=true"]), torch.device("cpu"))
               for k in ("compile", "compile_vae"))


def test_cuda_graphs_dropped_when_the_weights_or_the_cache_change(tiny):
    cfg = tiny[0]
    models = build_models(cfg)
    models.dit.use_cuda_graphs(capture=False)
    graphs = models.dit.cuda_graphs
    for _ in blocks_of(cfg, models, "a walk[3s]"):  # 4 blocks (the last one's clean pass is skipped)
        pass
    assert len(graphs) == 3  # the first block's denoising steps; a later block's, and its clean pass
    models.dit.to(torch.float64).to(torch.float32)  # the weights a graph reads moved
    assert len(graphs) == 0
    blocks = blocks_of(cfg, models, "a walk[3s]")
    next(blocks), next(blocks), next(blocks)
    assert len(graphs) == 2, "block 2's clean pass runs when a fourth block is asked for"
    next(blocks, None)
    assert len(graphs) == 3
    next(blocks_of(cfg, models, "a walk[2s]"))  # a fresh cache: the graphs of the old one go
    assert len(graphs) == 1, "only the new cache's first layout, captured at its second forward"

    # a text of another length needs new text buffers: the graphs reading the old ones go
    settings = RolloutSettings.from_config(cfg)
    latent = models.vae.latent_shape(cfg.height, cfg.width)
    cache = settings.new_cache(models.dit, 1, latent[1:])
    x, t = torch.randn(1, cfg.num_frame_per_block, *latent), torch.full((1, cfg.num_frame_per_block), 500.0)
    text_len = cfg.model.text_len
    long_text, short_text = (torch.randn(1, n, cfg.model.text_dim) for n in (text_len, text_len // 4))
    with torch.no_grad():
        for _ in range(3):
            models.dit(x, t, long_text, kv_cache=cache)
        assert len(graphs) == 1 and cache.text_allocs == 1
        graphed = models.dit(x, t, short_text, kv_cache=cache)
        assert cache.text_allocs == 2 and len(graphs) == 0
        models.dit.use_cuda_graphs(False)
        cache.drop_cross_attention()
        assert torch.equal(graphed, models.dit(x, t, short_text, kv_cache=cache))


def test_a_failed_capture_turns_the_graphs_off(tiny, monkeypatch, caplog):
    """A graph that cannot be recorded: the call's forward (the warm-up, which did run) is its
    output, no other capture is tried (one warning), and every forward runs eagerly, equal to
    eager throughout."""
    from model import cuda_graphs

    def unsupported(self, pool):
        raise RuntimeError("operation not permitted when stream is capturing")

    cfg = tiny[0]
    models = build_models(cfg)
    eager = torch.cat(list(blocks_of(cfg, models)), dim=1)
    models.dit.use_cuda_graphs(capture=False)
    graphs = models.dit.cuda_graphs
    monkeypatch.setattr(cuda_graphs._Captured, "record", unsupported)
    with caplog.at_level("WARNING", logger="model.cuda_graphs"):
        graphed = torch.cat(list(blocks_of(cfg, models)), dim=1)
    assert torch.equal(graphed, eager)
    assert graphs.stats["failed"] == 1 and graphs.stats["replayed"] == 0 and len(graphs) == 0
    assert graphs.stats["eager"] == sum(graphs.stats.values()) - 1 and "capturing" in graphs.failed
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "CUDA graphs are off" in warnings[0] and "capturing" in warnings[0]


@pytest.mark.parametrize("key", ["cuda_graphs", "decode_stream"])
def test_cuda_only_switches_on_a_cpu_are_a_config_error(tiny, key):
    from pipeline.generate import VideoGenerator
    from utils.errors import ConfigError

    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"{key}=true"])
    with pytest.raises(ConfigError, match=f"{key}=true needs device: cuda"):
        build_models(cfg)
    with pytest.raises(ConfigError, match=f"{key}=true needs device: cuda"):
        VideoGenerator(cfg, tiny[1])  # models built on the CPU elsewhere


def test_vae_channels_last_switch_reaches_the_decoder(monkeypatch):
    """``vae_channels_last=true`` (``auto``: on a GPU): the VAE's convolutions are built in the
    channels-last layout (3-D and 2-D), cuDNN autotunes them and the norms, upsamplers and causal
    convolutions are fused; ``false`` leaves all three alone. (The decode's equality with
    diffusers' contiguous VAE: ``tests/test_vae.py``.)"""
    from model.vae import FUSED

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    layouts = {torch.nn.Conv3d: torch.channels_last_3d, torch.nn.Conv2d: torch.channels_last}

    def conv_weights(models):
        return [(m.weight, layout) for m in models.vae.vae.modules() for kind, layout in layouts.items()
                if isinstance(m, kind)]

    def fused(models):
        return sum(isinstance(m, FUSED) for m in models.vae.modules())

    off = build_models(load_config(REPO / "configs" / "tiny.yaml", ["vae_channels_last=false"]))
    assert all(w.is_contiguous() for w, _ in conv_weights(off)) and not torch.backends.cudnn.benchmark
    assert fused(off) == 0
    on = build_models(load_config(REPO / "configs" / "tiny.yaml", ["vae_channels_last=true"]))
    assert {layout for _, layout in conv_weights(on)} == set(layouts.values())  # both kinds are there
    assert all(w.is_contiguous(memory_format=layout) for w, layout in conv_weights(on))
    assert not all(w.is_contiguous() for w, _ in conv_weights(on))
    assert torch.backends.cudnn.benchmark and fused(on) > 0


def test_auto_switches_resolve_per_device(monkeypatch, caplog, tmp_path):
    """``auto`` (compile's default): on a GPU that can run it, off elsewhere; resolved in place,
    once; an explicit ``true`` the device cannot run is a one-line config error. CUDA is simulated:
    Triton present or not, a GPU new or old enough for it, a C compiler and Python's headers
    (Triton's launcher build) there or not."""
    import importlib.util
    import shutil
    import sysconfig

    from pipeline import generate
    from utils.errors import ConfigError

    cfg = load_config(REPO / "configs" / "infinity_rope.yaml", ["cuda_graphs=auto", "decode_stream=auto"])
    assert load_config(REPO / "configs" / "infinity_rope.yaml").compile == "auto"  # the default

    def resolved(overrides, device):
        c = cfg.copy()
        for item in overrides:
            key, value = item.split("=")
            c[key] = {"true": True, "false": False}.get(value, value)
        generate.resolve_switches(c, torch.device(device))
        return {k: c[k] for k in SWITCHES}

    everything_off = dict.fromkeys(SWITCHES, False)
    assert resolved([], "cpu") == everything_off
    assert resolved(["compile=true"], "cpu") == {**everything_off, "compile": True}  # inductor's C++ backend
    assert resolved(["compile_vae=true"], "cpu") == {**everything_off, "compile_vae": True}
    # a layout any device runs: auto leaves it to the GPU, where it was measured; true is kept
    assert resolved(["vae_channels_last=true"], "cpu") == {**everything_off, "vae_channels_last": True}

    find_spec = importlib.util.find_spec
    triton = {"present": True}

    def find_triton(name, *args):
        if name == "triton":
            return object() if triton["present"] else None
        return find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_triton)
    capability = {"value": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["value"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Old GPU")
    compilers = {"gcc": "/usr/bin/gcc"}
    monkeypatch.setattr(shutil, "which", lambda name, *a, **kw: compilers.get(name))
    monkeypatch.delenv("CC", raising=False)
    (tmp_path / "Python.h").touch()
    paths = sysconfig.get_paths()
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **kw: dict(paths, include=str(tmp_path)))
    assert resolved([], "cuda") == dict.fromkeys(SWITCHES, True)
    assert resolved(["compile=false", "decode_stream=false", "vae_channels_last=false"], "cuda") == {
        **everything_off, "cuda_graphs": True, "compile_vae": True}

    triton["present"] = False
    with caplog.at_level("INFO", logger="pipeline.generate"):
        assert resolved([], "cuda") == {**dict.fromkeys(SWITCHES, True), "compile": False, "compile_vae": False}
    assert {k for k in ("compile", "compile_vae") for r in caplog.records
            if r.getMessage().startswith(f"{k}=auto: off") and "Triton is not installed" in r.getMessage()} == {
        "compile", "compile_vae"}
    for key in ("compile", "compile_vae"):
        with pytest.raises(ConfigError, match=f"{key}=true cannot run on cuda: Triton is not installed.*{key}=false"):
            resolved([f"{key}=true"], "cuda")

    triton["present"], capability["value"] = True, (6, 1)
    assert resolved([], "cuda")["compile"] is resolved([], "cuda")["compile_vae"] is False
    with pytest.raises(ConfigError, match="Old GPU has compute capability 6.1; Triton needs 7.0"):
        resolved(["compile=true"], "cuda")

    capability["value"] = (9, 0)
    compilers.clear()
    assert resolved([], "cuda")["compile"] is False
    with pytest.raises(ConfigError, match="no C compiler found, which Triton builds its kernel launcher with"):
        resolved(["compile=true"], "cuda")
    monkeypatch.setenv("CC", "/opt/cc")
    assert resolved([], "cuda")["compile"] is True
    (tmp_path / "Python.h").unlink()
    with pytest.raises(ConfigError, match=r"Python's headers are missing \(.*Python.h\).*-dev"):
        resolved(["compile=true"], "cuda")
    (tmp_path / "Python.h").touch()

    c = cfg.copy()
    generate.resolve_switches(c, torch.device("cuda"))
    generate.resolve_switches(c, torch.device("cuda"))  # a second call (VideoGenerator's) changes nothing
    assert [c[k] for k in SWITCHES] == [True] * len(SWITCHES)
    for bad in ("compile=maybe", "compile_vae=fast", "decode_stream=2", "vae_channels_last=nchw"):
        with pytest.raises(ConfigError, match=f"'{bad.split('=')[0]}' in the command-line overrides must be true, "
                                              f"false or auto"):
            load_config(REPO / "configs" / "tiny.yaml", [bad])


def in_line_and_decode_stream_videos(overrides: list[str], tmp_path):
    """Two videos (PROMPT's flushes and cuts; an image start with a cut) rendered by a generator
    decoding in line and by one with ``decode_stream=true`` on the same models: per block, the
    latents and the frames as written, for each."""
    import numpy as np
    from PIL import Image

    from pipeline.generate import VideoGenerator
    from utils.video import VideoWriter

    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides)
    models = build_models(cfg)
    image = tmp_path / "start.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (cfg.height, cfg.width, 3), dtype=np.uint8)).save(image)

    def videos(gen):
        out = []
        for prompt, start in ((PROMPT, None), ("a door opens[2s] | it closes[2s#]", image)):
            plan = gen.plan(prompt, image_start=start is not None)
            contexts = gen.encode_texts(plan)
            with VideoWriter(tmp_path / "v.mp4", fps=float(cfg.fps), width=int(cfg.width), height=int(cfg.height),
                             background=True) as writer:
                out += [(b.latents.cpu(), b.frames.numpy().copy()) for b in gen.render(
                    plan_blocks(plan.block_events, plan.block_segment, contexts), writer, seed=0,
                    subtitles=[seg.subtitle for seg in plan.segments], total_frames=plan.total_frames,
                    image_latent=None if start is None else gen.image_latent(start))]
        return out

    gen = VideoGenerator(load_config(REPO / "configs" / "tiny.yaml", overrides + ["decode_stream=true"]), models)
    assert gen.decode_stream is not None
    return videos(VideoGenerator(cfg, models)), videos(gen)


def test_render_frees_the_decoders_cache_when_the_video_ends(tiny, tmp_path):
    """The VAE's causal cache (1.8 GiB at full size) belongs to one video: held while it renders,
    freed when it ends, finished or stopped early, not kept until the next render."""
    from pipeline.generate import VideoGenerator
    from utils.video import VideoWriter

    cfg, models = tiny
    gen = VideoGenerator(cfg, models)
    plan = gen.plan(PROMPT)
    contexts = gen.encode_texts(plan)

    def held():
        return sum(t.numel() for t in gen.decoder._cache if isinstance(t, torch.Tensor))

    for stop_after in (None, 1):
        with VideoWriter(tmp_path / "v.mp4", fps=float(cfg.fps), width=int(cfg.width),
                         height=int(cfg.height)) as writer:
            blocks = gen.render(plan_blocks(plan.block_events, plan.block_segment, contexts), writer, seed=0,
                                subtitles=[None] * len(plan.segments))
            for block in blocks:
                assert held() > 0  # the cache the next block's decode reads
                if block.index + 1 == stop_after:
                    blocks.close()
                    break
            assert block.index + 1 == (stop_after or plan.total_blocks)
        assert held() == 0


def test_decode_stream_path_on_a_cpu_with_the_stream_calls_stubbed(tmp_path, monkeypatch):
    """The decode-stream path of ``render`` where the CPU has no streams (CUDA's stream calls
    stubbed, the switch's device check off): every decode, the image start's lead frame
    included, waits for the main stream and takes its latents; the video is the in-line one.
    The GPU check runs the same on real streams."""
    import contextlib

    import numpy as np

    from pipeline import generate

    waits, recorded = [], []

    class Stream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            waits.append(other)

    resolve = generate.resolve_switches

    def resolve_as_if_the_cpu_had_streams(cfg, device):
        wanted, cfg.decode_stream = cfg.decode_stream, False
        resolve(cfg, device)
        cfg.decode_stream = wanted

    monkeypatch.setattr(generate, "resolve_switches", resolve_as_if_the_cpu_had_streams)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "main")
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: recorded.append(self.shape))
    in_line, overlapped = in_line_and_decode_stream_videos([], tmp_path)
    assert len(overlapped) == len(in_line) > 4
    assert all(torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(in_line, overlapped))
    assert waits == ["main"] * (len(overlapped) + 1) and len(recorded) == len(waits)  # + the lead frame


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_decode_stream_renders_the_same_video(tmp_path):
    """The decode on a stream of its own, alongside the next block's DiT (bf16, a flush and a
    cut, an image start, two videos on one generator): the same latents and the same frames,
    byte for byte, as the decode in line."""
    import numpy as np

    in_line, overlapped = in_line_and_decode_stream_videos(["device=cuda", "dtype=bfloat16", "compile=false"],
                                                           tmp_path)
    assert len(overlapped) == len(in_line) > 4
    for (lat_a, frames_a), (lat_b, frames_b) in zip(in_line, overlapped):
        assert torch.equal(lat_a, lat_b) and np.array_equal(frames_a, frames_b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_cuda_bf16_graphed_rollout_close_to_eager(tiny, compiled):
    """Real CUDA graphs (bf16, through flushes and cuts, blocks compiled or not) against eager
    bf16: every block within 2e-2 relative, every latent finite, one graph per layout, no failed
    capture; and a steady graphed block never synchronises the GPU."""
    cfg = tiny[0]
    torch._dynamo.reset()
    models = build_models(cfg)
    dit = models.dit.to("cuda", torch.bfloat16)
    try:
        def run(check_sync=False):
            blocks = cuda_bf16_blocks(cfg, models)
            # every capture happens in the first 4 blocks (the steady clean pass's, a capture that
            # synchronises, at its second run: block 2's clean pass, run when block 3 is asked for)
            out = [next(blocks).float() for _ in range(4)]
            if check_sync:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            try:
                out += [b.float() for b in blocks]
            finally:
                torch.cuda.set_sync_debug_mode("default")
            return out
        if compiled:
            for block in dit.blocks:
                block.compile()
        eager = run()
        dit.use_cuda_graphs()
        graphed = run(check_sync=True)
        stats = dit.cuda_graphs.stats
        errors = [((a - b).norm() / b.norm()).item() for a, b in zip(graphed, eager)]
        assert all(torch.isfinite(a).all() for a in graphed)
        assert max(errors) < 2e-2, errors
        assert stats["failed"] == 0 and stats["captured"] == 3 and stats["replayed"] > stats["eager"], stats
    finally:
        dit.use_cuda_graphs(False)
        torch._dynamo.reset()


# ----------------------------------------------------------------------------------- bf16
def test_bf16_rollout_close_to_fp32(tiny):
    cfg, models = tiny
    blocks = 3  # the first block, the window filling, a full window (errors compound after)
    ref = torch.cat([b for _, b in zip(range(blocks), blocks_of(cfg, models))], dim=1)
    dit16 = build_models(cfg).dit.to(torch.bfloat16)  # same seed: same weights, rounded
    low = torch.cat([b for _, b in zip(range(blocks), blocks_of(cfg, models, dit=dit16, dtype=torch.bfloat16))],
                    dim=1)
    assert low.dtype == torch.bfloat16
    rel = ((low.float() - ref).norm() / ref.norm()).item()
    assert rel < 0.015, rel


# ----------------------------------------------------------------------------- benchmark
def short_run(bench, variant: str, tmp_path, profile_blocks: int = 0) -> dict:
    """One variant of the benchmark, a 2 s video of the tiny config, in this process."""
    opts = {"config_path": str(REPO / "configs" / "tiny.yaml"), "overrides": [], "threads": 0, "out": str(tmp_path),
            "warmup_blocks": 1, "repeats": 1, "pipeline_repeats": 1, "skip_pipeline": False, "per_block": False,
            "keep_videos": False, "profile_blocks": profile_blocks}
    return bench.run_variant(bench.parse_variant(variant), [2.0], opts)


def test_benchmark_times_the_render_path(tmp_path):
    """The ``render`` variant times ``VideoGenerator.render`` itself (what ``decode_stream`` needs:
    no stage boundaries): one time per block, every frame written, no split in the table."""
    bench = benchmark_module()
    out = short_run(bench, "render", tmp_path)
    run, = out["runs"]
    assert run["frames_written"] == 32 and run["pipeline_video_fps"] > 0 and run["split_ms_per_block"] is None
    assert math.isnan(run["dit_vae_video_fps"])
    table = bench.markdown({"config_path": "configs/tiny.yaml", "command": "python scripts/benchmark.py ...",
                            "video": "96x64", "variants": [out]})
    assert "| render | 2 s | 3 |" in table
    assert bench.parse_variant("decode_stream")["render"]


def test_benchmark_checks_gpu_runs_against_the_realtime_targets():
    """A GPU run's table says, per run, which of the issue's targets it meets (DiT ≥ 60 fps, first
    block ≤ 0.25 s, pipeline ≥ 30 fps, peak ≤ 8 GiB); a CPU run's does not."""
    bench = benchmark_module()
    run = {"seconds": 10.0, "blocks": 14, "first_block_s": 0.21, "dit_blocks_per_s": 4.3, "dit_video_fps": 52.1,
           "dit_video_fps_best": 53.0, "pipeline_video_fps": float("nan"), "split_ms_per_block": None,
           "memory": {"peak_bytes": int(7.5 * 2 ** 30)}, "floor_fraction": 0.6}
    assert bench.realtime_check(run) == ("DiT 52.1 fps (≥ 60: NO), first block 0.21 s (≤ 0.25: yes), "
                                         "pipeline not measured, peak 7.5 GiB (≤ 8: yes)")
    assert "peak not measured" in bench.realtime_check(dict(run, memory=None))
    variant = {"variant": "fast", "dtype": "bfloat16", "dit_parameters": 1, "runs": [run], "sdpa_ops": [],
               "flops": {"per_block_steady": 1e12, "per_forward_first_counted": None,
                         "per_forward_first_formula": 1e11}, "geometry": {"forwards_per_block": 5, "q_tokens": 1,
                                                                          "kv_tokens_steady": 1},
               "matmul": {"flops_per_s": 1e15, "dtype": "bfloat16", "n": 8192}, "nominal_peak": None,
               "config": {"num_frame_per_block": 3, "compile": True}, "build_s": 1.0}
    for device, expected in (("cuda", 1), ("cpu", 0)):
        variant["device"] = {"type": device, "name": "X", "torch": "2", "threads": 1}
        table = bench.markdown({"config_path": "c.yaml", "command": "…", "video": "v", "variants": [variant]})
        assert table.count("`fast` 10 s against the real-time targets: DiT 52.1 fps (≥ 60: NO)") == expected
        assert "speed switches on: `fast` compile" in table


# Kernel names as torch.profiler reports them on Hopper GPUs (torch 2.x, cuBLAS, cuDNN, inductor)
KERNELS = {
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, "
    "cutlass::bfloat16_t>, false, false, false, true>(pytorch_flash::Flash_fwd_params)": "attention",
    "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0": "attention",
    "fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel)": "attention",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_kernel__5x_cublas": "GEMM",
    "nvjet_tst_192x192_64x4_1x2_h_bz_coopB_TNT": "GEMM",
    "triton_tem_fused_addmm_0": "GEMM",
    "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64": "convolution",
    "triton_poi_fused__to_copy_add_mul_3": "fused by inductor",
    # names an H200 ran: cuDNN's attention, cuBLAS's GEMM, and an inductor kernel named after the
    # attention whose inputs it prepares (it is no attention)
    "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_cga1x1x1_kernel0_0":
        "attention",
    "nvjet_sm90_tst_192x144_64x5_2x1_v_bz_coopB_bias_TNT": "GEMM",
    "triton_red_fused__fused_rms_norm__scaled_dot_product_cudnn_attention__to_copy_add_copy_mul_select_slice_"
    "stack_sub_transpose_unsqueeze_view_5": "fused by inductor",
    "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_1": "fused by inductor",
    "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float>(int, float, float const*)":
        "norm",
    "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)"
    "::{lambda()#3}::operator()() const::{lambda(float)#1}>": "copy, cast, cat",
    "void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::(anonymous namespace)::OpaqueType<2u>>":
        "copy, cast, cat",
    "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>, "
    "std::array<char*, 3ul> >(int, at::native::CUDAFunctor_add<float>, std::array<char*, 3ul>)": "elementwise",
    "void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl(at::TensorIteratorBase&, "
    "at::native::GeluType)::{lambda()#2}>": "elementwise",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MeanOps<float, float>>>":
        "reduction",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<c10::BFloat16, at::native::NormTwoOps<"
    "c10::BFloat16, float, float>, unsigned int, c10::BFloat16, 4>>": "norm",
    "void at::native::(anonymous namespace)::upsample_nearest2d_out_frame<c10::BFloat16, "
    "&at::native::nearest_neighbor_exact_compute_source_index>": "copy, cast, cat",
    "Memcpy DtoD (Device -> Device)": "memcpy, memset",
    "Memset (Device)": "memcpy, memset",
    "void cudnn::ops::nchwToNhwcKernel<float, float, float, true, false>": "other",
    # ATen ops, a CPU profile's names
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention", "aten::addmm": "GEMM",
    "aten::slow_conv3d_forward": "convolution", "aten::copy_": "copy, cast, cat", "aten::addcmul": "elementwise",
    "aten::native_layer_norm": "norm", "aten::view": "views, allocation", "aten::empty_strided": "views, allocation",
    "aten::linalg_vector_norm": "norm", "aten::_upsample_nearest_exact2d": "copy, cast, cat",
}


def test_profile_kinds_of_kernels():
    bench = benchmark_module()
    assert {name: bench.kernel_kind(name) for name in KERNELS} == KERNELS
    summary = bench.time_by_kind([("aten::addmm", 3000.0), ("aten::addmm", 1000.0), ("aten::view", 500.0),
                                  ("Memset (Device)", 500.0)], blocks=2)
    assert summary["ms_per_block"] == 2.5 and summary["calls_per_block"] == 2
    assert summary["by_kind_ms_per_block"] == {"GEMM": 2.0, "views, allocation": 0.25, "memcpy, memset": 0.25}
    assert summary["top"][0] == {"name": "aten::addmm", "ms_per_block": 2.0, "calls_per_block": 1.0, "kind": "GEMM"}


def test_gpu_idle_counts_the_gaps_between_kernels():
    """The profile's GPU idle time: gaps in the union of kernel intervals (overlapping kernels,
    as with the decode stream, are one busy span), launch spacing below the threshold ignored,
    the longest gaps named by the kernels around them."""
    bench = benchmark_module()
    kernels = [("e", 300.0, 310.0), ("a", 0.0, 10.0), ("b", 5.0, 20.0), ("inside_b", 6.0, 8.0), ("c", 100.0, 110.0),
               ("d", 111.0, 120.0)]
    idle = bench.gpu_idle(kernels, blocks=2, top=2)
    assert idle["ms_per_block"] == (80 + 180) / 1e3 / 2 and idle["gaps_per_block"] == 1.0
    assert idle["all_ms_per_block"] == (80 + 1 + 180) / 1e3 / 2  # the 1 µs launch spacing too
    assert idle["longest"] == [{"ms": 0.18, "after": "d", "before": "e"}, {"ms": 0.08, "after": "b", "before": "c"}]
    # the split by gap size: the 1 µs spacing, the 80 µs and the 180 µs gaps, per block of 2
    split = {b["up_to_us"]: (b["ms_per_block"], b["gaps_per_block"]) for b in idle["by_gap_us"]}
    assert split == {5.0: (0.0005, 0.5), 20.0: (0.0, 0.0), 50.0: (0.0, 0.0), 500.0: (0.13, 1.0),
                     float("inf"): (0.0, 0.0)}
    assert bench.idle_split(idle) == "≤ 5 µs: 0.0 ms in 0.5 gaps; ≤ 500 µs: 0.1 ms in 1.0 gaps"
    assert bench.gpu_idle([], blocks=1)["ms_per_block"] == 0 and bench.idle_split(bench.gpu_idle([], 1)) == ""


def test_compile_variants_compile_the_blocks_with_their_options(monkeypatch):
    """The benchmark's ``static_compile``, ``autotune_compile`` and ``pdl_compile`` variants replace
    the default's compile of each block by one with ``dynamic=False`` / inductor's autotuning mode /
    its Programmatic Dependent Launch option (combined, they add up: a mode with options becomes
    the mode's options, which torch.compile takes alone) before anything is traced; without
    ``compile`` they change nothing."""
    bench = benchmark_module()
    # build_models with compile=true points TORCHINDUCTOR_CACHE_DIR at our cache for the process:
    # undone after the test, so that later subprocesses (some run as another user) do not inherit it
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "unset")  # recorded (set or not), restored after the test
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    calls = []
    real = torch.nn.Module.compile

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", spy)
    cfg = bench.load_bench_config(str(REPO / "configs" / "tiny.yaml"), ["compile=true"])
    layers = cfg.model.num_layers
    autotune = {"mode": "max-autotune-no-cudagraphs"}
    from torch._inductor import list_mode_options

    pdl = {"options": {"triton.enable_pdl": True}}
    autotune_pdl = {"options": {**list_mode_options(autotune["mode"]), **pdl["options"]}}
    for variant, options in (("static_compile", {"dynamic": False}), ("autotune_compile", autotune),
                             ("static_compile+autotune_compile", {"dynamic": False, **autotune}),
                             ("pdl_compile", pdl), ("autotune_compile+pdl_compile", autotune_pdl),
                             ("pdl_compile+static_compile", {**pdl, "dynamic": False})):
        calls.clear()
        bench.Bench(cfg, bench.parse_variant(variant))
        assert calls == [{}] * layers + [options] * layers, variant
    calls.clear()
    bench.Bench(bench.load_bench_config(str(REPO / "configs" / "tiny.yaml"), []), bench.parse_variant("static_compile"))
    assert calls == []


@pytest.mark.parametrize("variant", ["real_rope", "rope_f64"])
def test_rope_levers_rotate_as_the_fast_path(variant):
    """The benchmark's RoPE "before" variants take the tables the cache hands out and rotate the
    keys and queries as the fast path does, to float32 rounding."""
    import model.kv_cache as kv_cache
    import model.wan as wan

    bench = benchmark_module()
    freqs = Rope(16).freqs_for_runs([(0, 1), (4, 2)], 3, 5, "cpu")
    x = torch.randn(2, freqs.shape[0], 3, 16)
    fast = rotate(x, freqs)
    with bench.legacy_paths(bench.parse_variant(variant)["legacy"]):
        assert wan.rotate is kv_cache.rotate is not rotate
        before = wan.rotate(x, freqs)
    assert wan.rotate is rotate
    torch.testing.assert_close(before, fast, rtol=1e-6, atol=1e-6)


def test_ffn_gelu_pass_variant_runs_the_feed_forward_as_modules(monkeypatch):
    """The ``ffn_gelu_pass`` lever (§23's before): inside it every block's feed-forward is the
    plain modules (the GELU a pass of its own), never the GEMM with the GELU epilogue; after it
    the fused path is back."""
    import model.wan as wan

    bench = benchmark_module()
    fused = wan.feed_forward
    ffn = wan.WanBlock(8, 16, 2, True, True, 1e-6).ffn
    h = torch.randn(1, 3, 4, 8)

    def no_epilogue(*args, **kwargs):
        raise AssertionError("the GELU epilogue ran")

    monkeypatch.setattr(torch, "_addmm_activation", no_epilogue)
    with bench.legacy_paths(bench.parse_variant("ffn_gelu_pass")["legacy"]), torch.no_grad():
        assert torch.equal(wan.feed_forward(ffn, h), ffn(h))
    assert wan.feed_forward is fused
    with pytest.raises(AssertionError, match="epilogue"), torch.no_grad():
        wan.feed_forward(ffn, h, fused=True)


def test_qkv_separate_variant_projects_q_k_v_with_three_gemms(tmp_path):
    """The ``qkv_separate`` lever (§24's before): the default DiT packs self-attention's q, k, v
    (one GEMM), the variant's does not, and its rollout is the default's to float32 rounding."""
    bench = benchmark_module()
    opts = {"config_path": str(REPO / "configs" / "tiny.yaml"), "overrides": []}
    runs = {}
    for name in ("default", "qkv_separate"):
        b = bench.Bench(bench.load_bench_config(opts["config_path"], []), bench.parse_variant(name))
        packed = [blk.self_attn.qkv_weight is not None for blk in b.models.dit.blocks]
        assert packed == [name == "default"] * len(packed), name
        runs[name] = torch.cat(list(blocks_of(b.cfg, b.models, dit=b.models.dit)), dim=1)
    torch.testing.assert_close(runs["qkv_separate"], runs["default"], rtol=1e-5, atol=1e-5)


def test_split_keys_variant_and_config_split_every_blocks_attention(tmp_path):
    """``attention_key_splits`` (the ``split_keys`` lever: 2) reaches every block's self-attention
    through build_models, and the rollout through flushes and cuts is the one-kernel default's to
    float32 rounding; 0 is a config error, and so is a split the device cannot run."""
    bench = benchmark_module()
    path = str(REPO / "configs" / "tiny.yaml")
    runs = {}
    for name in ("default", "split_keys"):
        spec = bench.parse_variant(name)
        b = bench.Bench(bench.load_bench_config(path, spec["overrides"]), spec)
        assert {blk.self_attn.key_splits for blk in b.models.dit.blocks} == {2 if name == "split_keys" else 1}
        runs[name] = torch.cat(list(blocks_of(b.cfg, b.models, dit=b.models.dit)), dim=1)
    torch.testing.assert_close(runs["split_keys"], runs["default"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match=r"attention_key_splits \(0\) must be >= 1"):
        load_config(path, ["attention_key_splits=0"])
    # a device that cannot run the kernel (cuDNN's, on a GPU: bf16/fp16, a recent GPU): one line at build time
    import model.wan as wan

    def unsupported(*args):
        raise RuntimeError("No available kernel.\nmore detail")

    real, wan.attention_with_lse = wan.attention_with_lse, unsupported
    try:
        with pytest.raises(ConfigError, match=r"^attention_key_splits=2 needs an attention kernel that returns its "
                                              r"log-sum-exp, which cpu cannot run in float32 \(No available kernel\); "
                                              r"set attention_key_splits=1$"):
            build_models(load_config(path, ["attention_key_splits=2"]))
    finally:
        wan.attention_with_lse = real
    # the benchmark's "attention alone" line times the split path with its kernels
    rate = bench.attention_rate(torch.device("cpu"), torch.float32, heads=2, head_dim=8, q_tokens=5, kv_tokens=9,
                                seconds=0.01, key_splits=2)
    assert rate["key_splits"] == 2 and rate["kernel"] == ["aten::_scaled_dot_product_flash_attention_for_cpu"]


def test_interleave_refuses_variants_whose_models_differ():
    """``--interleave`` builds one model for all its variants: a variant applied at build time
    (static_compile, autotune_compile, vae_unfused, render) would be measured as the first one, so
    it is refused."""
    bench = benchmark_module()
    opts = {"config_path": str(REPO / "configs" / "tiny.yaml"), "overrides": [], "threads": 0}
    for other in ("static_compile", "autotune_compile", "vae_unfused", "qkv_separate", "render", "compile"):
        with pytest.raises(SystemExit, match="--interleave needs variants that share"):
            bench.run_interleaved([bench.parse_variant("default"), bench.parse_variant(other)], [2.0], opts)


def test_sdpa_kernel_ops_are_the_backends_alone():
    """The "SDPA kernel" line names the backend ops, not the dispatcher op nor the inductor kernels
    and autotuning records that a compiled block's profile names after the attention (an H200's
    profile of the compiled default listed those)."""
    bench = benchmark_module()
    seen = ["aten::scaled_dot_product_attention", "aten::_scaled_dot_product_cudnn_attention",
            "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_efficient_attention_forward",
            "triton_poi_fused__scaled_dot_product_cudnn_attention__to_copy_copy_slice_transpose_view_3",
            "CachingAutotuner.benchmark_all_configs_data: kernel_name=triton_red_fused__fused_rms_norm__"
            "scaled_dot_product_cudnn_attention_transpose_view_10"]
    assert [n for n in seen if bench.is_sdpa_kernel_op(n)] == [
        "aten::_scaled_dot_product_cudnn_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_efficient_attention_forward"]


def test_benchmark_profiles_steady_blocks(tmp_path):
    """``--profile_blocks``: torch.profiler over steady DiT blocks, then over the VAE decode of the
    same blocks; on a CPU each ATen op's own time, by kind: the DiT's matmuls and attention, the
    decoder's convolutions, and the kinds add up to the total."""
    bench = benchmark_module()
    out = short_run(bench, "fast", tmp_path, profile_blocks=2)
    assert set(out["profile"]) == {"dit", "vae"}
    for stage, prof in out["profile"].items():
        assert prof["blocks"] == 2
        assert prof["first_block"] == bench.steady_start(load_config(REPO / "configs" / "tiny.yaml"))
        kinds = prof["by_kind_ms_per_block"]
        assert math.isclose(sum(kinds.values()), prof["ms_per_block"], rel_tol=1e-9)
        assert 0 < prof["ms_per_block"] <= prof["wall_ms_per_block"] and prof["calls_per_block"] > 100
        assert kinds.get("other", 0) < 0.05 * prof["ms_per_block"], kinds  # the kinds cover what runs
    dit, vae = out["profile"]["dit"]["by_kind_ms_per_block"], out["profile"]["vae"]["by_kind_ms_per_block"]
    assert dit["GEMM"] > 0 and dit["attention"] > 0 and dit["elementwise"] > 0
    assert max(vae, key=vae.get) == "convolution" and "GEMM" not in vae, vae  # its mid-block attention aside
    table = bench.markdown({"config_path": "configs/tiny.yaml", "command": "python scripts/benchmark.py ...",
                            "video": "96x64", "variants": [out]})
    assert "`fast` where a steady block's DiT time goes" in table
    assert "`fast` where a steady block's VAE decode time goes" in table


def test_flop_formula_matches_flop_counter(tiny):
    cfg, models = tiny
    bench = benchmark_module()
    b = bench.Bench(cfg, bench.parse_variant("fast"))
    plan = b.gen.plan(bench.bench_prompt(1.0))
    counted = b.counted_flops(b.gen.encode_texts(plan))
    latent_hw = tuple(b.gen.latent_shape[1:])
    formula = bench.block_flops(cfg, latent_hw, first=True) // (len(cfg.denoising_step_list) + 1)
    # the counter also sees the time embedding (a few rows), which the formula leaves out
    assert formula <= counted <= 1.02 * formula, (counted, formula)


def test_full_size_floor_numbers():
    """The numbers docs/PERFORMANCE.md quotes: Wan2.1-1.3B, 480x832, blocks of 3, window 6."""
    bench = benchmark_module()
    cfg = load_config(REPO / "configs" / "infinity_rope.yaml")
    per_block = bench.block_flops(cfg, (60, 104))
    per_forward = per_block // 5
    assert round(per_forward / 1e12, 2) == 20.22
    assert round(per_block / 1e12, 1) == 101.1
    floor_ms = 1e3 * per_block / 989e12
    assert math.isclose(floor_ms, 102.2, abs_tol=0.1)


def test_benchmark_measures_a_short_video(tmp_path):
    """One variant, one length, every number the table shows (in this process)."""
    bench = benchmark_module()
    out = short_run(bench, "fast", tmp_path)
    run, = out["runs"]
    assert run["blocks"] == 3 and run["frames"] == 32 and run["frames_written"] == 32
    # (two passes, each timed on its own: on a loaded machine either can be the faster, so no order)
    assert run["first_block_s"] > 0 and run["dit_video_fps"] > 0 and run["pipeline_video_fps"] > 0
    assert set(run["split_ms_per_block"]) == {"dit_forward", "rope_cache", "vae_decode", "write_mp4_subtitles"}
    assert all(v >= 0 for v in run["split_ms_per_block"].values())
    assert run["memory"]["peak_bytes"] > 0 and run["cache_bytes"] > 0
    assert 0 < run["floor_fraction"] and 0 < run["dit_vae_floor_fraction"]
    assert out["sdpa_ops"] == ["aten::_scaled_dot_product_flash_attention_for_cpu"]
    geo = out["geometry"]
    assert {k: (a["q_tokens"], a["kv_tokens"]) for k, a in out["attention"].items()} == \
        {"self": (geo["q_tokens"], geo["kv_tokens_steady"]), "cross": (geo["q_tokens"], out["config"]["model"]["text_len"])}
    assert all(a["kernel"] == out["sdpa_ops"] and a["flops_per_s"] > 0 for a in out["attention"].values())
    assert out["flops"]["vae_per_block_steady"] > out["flops"]["vae_per_block_first"] > 0
    assert not list(tmp_path.rglob("*.mp4"))  # the videos are written, measured and removed
    report = {"config_path": "configs/tiny.yaml", "command": "python scripts/benchmark.py ...", "video": "96x64",
              "variants": [out]}
    table = bench.markdown(report)
    assert "| fast | 2 s | 3 |" in table and "DiT + VAE floor" in table and "attention alone (SDPA" in table
    # on a GPU the line names the attention's kernel too (cuDNN's name carries its tile sizes)
    assert all(a["gpu_kernel"] is None for a in out["attention"].values())
    out["attention"]["self"]["gpu_kernel"] = "sdpa_sm90_flash_fprop_128x128x128"
    assert "(aten::_scaled_dot_product_flash_attention_for_cpu: sdpa_sm90_flash_fprop_128x128x128)" in \
        bench.markdown(report)
