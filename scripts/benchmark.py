#!/usr/bin/env python
"""Speed and memory of the Infinity-RoPE rollout, per video length, on whatever device the config names.

    # CPU, tiny random-weight models (every stage of the real pipeline), four lengths:
    python scripts/benchmark.py --config_path configs/tiny.yaml --seconds 10 60 240 600 --out benchmarks/out

    # GPU, the full 1.3B DiT and the full Wan VAE with random weights at 480x832 (a tiny random
    # text encoder of the right width stands in for umt5-xxl: it runs once per prompt):
    python scripts/benchmark.py --config_path configs/infinity_rope.yaml --seconds 10 60 240 \\
        --out benchmarks/out random_init=true

    # before/after of a fast path (rows per variant; DiT only):
    python scripts/benchmark.py --config_path configs/tiny.yaml --seconds 60 --variants fast naive_rope \\
        --skip_pipeline --tag rope

For each (variant, length) it measures

* **first block**: seconds from the start of a rollout to the first latent block (DiT only);
* **DiT only**: steady-state latent blocks/s and video frames/s of the rollout (median over
  ``--repeats`` rollouts of the whole video); steady state = the blocks after the attention
  window has filled (the first block attends to fewer frames);
* **pipeline**: the real inference path (rollout → streaming VAE decode → uint8 → subtitles →
  mp4), video frames/s over the same steady-state blocks, and its time split per block: DiT
  forward, RoPE + KV-cache bookkeeping (inside the DiT), VAE decode, writing (queueing the uint8
  conversion and the device→host copy, and handing the block to the writer thread, which waits
  for the copy, burns in the subtitle and pipes the frames to ffmpeg while the next block is
  generated; variant ``sync_write`` does all of it on the critical path instead). Stage
  boundaries synchronise the device (the stages depend on each other anyway); the RoPE/cache
  share is timed with CUDA events on a GPU (no extra synchronisation) and with ``perf_counter``
  on a CPU;
* **peak memory** of the measured passes, after a warm-up: ``torch.cuda.max_memory_allocated``
  (peak stats reset after the warm-up) on a GPU; on a CPU the peak resident set size (VmHWM,
  reset after the warm-up through ``/proc/self/clear_refs``), each length in a fresh
  subprocess so peaks never carry over from one length to the next;
* the **arithmetic floor**: DiT FLOPs per block (:func:`dit_forward_flops`, cross-checked against
  ``torch.utils.flop_counter`` on the first forward) divided by a measured matmul rate of the
  device in the model's dtype (and by the nominal peak on known GPUs), and the achieved fraction
  of that floor.

Writes ``<out>/<tag>.json`` (every number; each block's times with ``--per_block``) and ``<out>/<tag>.md``
(the table, also printed). Random weights: speed does not depend on their values. Trailing
``key=value`` arguments override the config as in ``inference.py``.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import logging
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python scripts/benchmark.py` from a checkout
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from utils.config import SWITCHES  # noqa: E402

log = logging.getLogger("benchmark")

# Named variants: config overrides and runtime switches. Combine with "+", e.g.
# naive_rope+rope_f64 (the reference's re-rotation of the whole window in float64 at every forward).
VARIANTS = {
    "default": {},  # the defaults, as `bash inference.sh` runs them (compile=auto: compiled on a GPU, eager on a CPU)
    "fast": {},     # the same (its older name: every fast path on, against the "before" variants below)
    # the DiT and the VAE decoder without compile or CUDA graphs
    "eager": {"overrides": ["compile=false", "compile_vae=false", "cuda_graphs=false"]},
    # the "before" of each fast path (runtime switches that restore the plain code path):
    "naive_rope": {"naive_rope": True},       # re-rotate every cached key at every forward (the oracle)
    "rope_f64": {"legacy": ["rope_f64"]},     # rotate in float64 (the reference implementation)
    "real_rope": {"legacy": ["real_rope"]},   # real-valued rotation formula instead of one complex multiply
    "text_kv_per_forward": {"legacy": ["text_kv_per_forward"]},  # text keys/values projected at every forward
    # the feed-forward's GELU as a pass of its own (the modules), not in the first GEMM's epilogue (§23)
    "ffn_gelu_pass": {"legacy": ["ffn_gelu_pass"]},
    # self-attention's q, k, v as three GEMMs, not one packed GEMM (§24)
    "qkv_separate": {"qkv_separate": True},
    "sync_write": {"sync_write": True},       # frames piped to ffmpeg on the critical path (no writer thread)
    # later parts override earlier ones: eager+cuda_graphs is CUDA graphs of eager blocks
    "compile": {"overrides": ["compile=true"]},
    # the compiled blocks traced with static shapes (torch.compile(dynamic=False)): one graph per
    # cache layout instead of one dynamic in the held length (docs/PERFORMANCE.md §9; runtime switch)
    "static_compile": {"compile_options": {"dynamic": False}},
    # the compiled blocks with inductor's autotuned GEMM templates, which can fuse the GELU, the gates
    # and the residual adds into the GEMMs' epilogues (a longer one-time compile; no CUDA graphs)
    "autotune_compile": {"compile_options": {"mode": "max-autotune-no-cudagraphs"}},
    # inductor's kernels launched with Programmatic Dependent Launch (Hopper and later): a kernel's
    # launch and prologue overlap the tail of the one before it (a GPU's launch gaps; no effect elsewhere)
    "pdl_compile": {"compile_options": {"options": {"triton.enable_pdl": True}}},
    # self-attention's keys in two halves, one kernel call, merged by their log-sum-exps (attention_key_splits, §25-§26)
    "split_keys": {"overrides": ["attention_key_splits=2"]},
    "cuda_graphs": {"overrides": ["cuda_graphs=true"]},  # cached forwards replayed as CUDA graphs (GPU only)
    "fp32": {"overrides": ["dtype=float32"]},
    "bf16": {"overrides": ["dtype=bfloat16"]},
    "sdpa_flash": {"sdpa": "flash"},
    "sdpa_cudnn": {"sdpa": "cudnn"},
    "sdpa_efficient": {"sdpa": "efficient"},
    "sdpa_math": {"sdpa": "math"},
    # the VAE's convolutions: channels-last weights with cuDNN autotuning (the default on a GPU
    # since an H200 measured it), and its "before", the contiguous layout without autotuning
    "vae_channels_last": {"overrides": ["vae_channels_last=true"]},
    "vae_contiguous": {"overrides": ["vae_channels_last=false"]},
    # the channels-last VAE with diffusers' own norms, upsamplers and causal convolutions back (WanVAE.unfuse)
    "vae_unfused": {"vae_unfused": True},
    "cudnn_benchmark": {"cudnn_benchmark": True},  # cuDNN autotunes each convolution shape once (runtime switch)
    "compile_vae": {"overrides": ["compile_vae=true"]},  # torch.compile of the VAE decoder (a GPU's default)
    # the VAE decoder not compiled: compile_vae's before (the default on a GPU until §22)
    "vae_uncompiled": {"overrides": ["compile_vae=false"]},
    # the pipeline timed as VideoGenerator.render runs it: one time per block, no stage boundaries
    # (nothing synchronises between the DiT, the decode and the writing, as in a real render)
    "render": {"render": True},
    # the decode of block n on a CUDA stream of its own, alongside the DiT's block n + 1 (GPU only)
    "decode_stream": {"overrides": ["decode_stream=true"], "render": True},
}

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets.
NOMINAL_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0,
                       "L40S": 362.0, "RTX 4090": 165.0}

# The real-time issue's targets on one H100/H200 in bf16 (docs/PERFORMANCE.md §0): (label, what
# a run holds, ≥ or ≤, bound); checked for runs on a GPU
REALTIME_TARGETS = (("DiT", "dit_video_fps", "≥", 60.0, "fps"), ("first block", "first_block_s", "≤", 0.25, "s"),
                    ("pipeline", "pipeline_video_fps", "≥", 30.0, "fps"), ("peak", "peak_gib", "≤", 8.0, "GiB"))

TEXTS = ("a red fox trots through a snowy forest", "the fox pounces into deep snow",
         "a quiet harbour at sunrise", "fishing boats rock gently on the water")


# ----------------------------------------------------------------------------------- arithmetic
def dit_forward_flops(*, dim: int, ffn_dim: int, num_layers: int, text_len: int, in_dim: int, out_dim: int,
                      patch: tuple[int, int, int], q_tokens: int, kv_tokens: int) -> int:
    """FLOPs (multiply-add = 2) of one cached DiT forward: ``q_tokens`` query tokens (the block)
    attending to ``kv_tokens`` keys (held frames + the block) and to ``text_len`` text tokens.

    Per layer and query token:
      self-attention q, k, v, o projections   8·dim²
      cross-attention q, o projections        4·dim²   (text keys/values: once per prompt, cached)
      feed-forward                            4·dim·ffn_dim
      self-attention scores and values        4·kv_tokens·dim
      cross-attention scores and values       4·text_len·dim
    plus the patch embedding and the head (2·in·prod(patch)·dim and 2·dim·out·prod(patch) per
    token). Norms, modulation, RoPE and softmax are elementwise and left out (they are memory
    bound, not FLOP bound); so is the time embedding (a handful of rows)."""
    p = math.prod(patch)
    per_token_layer = 12 * dim * dim + 4 * dim * ffn_dim + 4 * kv_tokens * dim + 4 * text_len * dim
    embed = 2 * in_dim * p * dim + 2 * dim * out_dim * p
    return q_tokens * (num_layers * per_token_layer + embed)


def vae_block_flops(cfg, latent_shape: tuple[int, int, int]) -> tuple[int, int]:
    """FLOPs of the streaming VAE decode of (the first, a later) block, counted by
    ``torch.utils.flop_counter`` on a copy of the VAE on the meta device (shapes only, no compute,
    no memory): convolutions dominate and are counted exactly."""
    from diffusers import AutoencoderKLWan
    from torch.utils.flop_counter import FlopCounterMode

    from model.vae import WanVAE
    from model.vae_config import run_config

    config = run_config(cfg)
    with torch.device("meta"):
        decoder = WanVAE(AutoencoderKLWan.from_config(config)).streaming_decoder()
    counts = []
    for _ in range(2):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            decoder.decode_block(torch.zeros(1, int(cfg.num_frame_per_block), *latent_shape, device="meta"))
        counts.append(int(counter.get_total_flops()))
    return counts[0], counts[1]


def block_geometry(cfg, latent_hw: tuple[int, int], patch) -> dict:
    """Tokens of a block and of the attention window, steady state and first block."""
    tokens_per_frame = (latent_hw[0] // patch[1]) * (latent_hw[1] // patch[2])
    fpb, window = int(cfg.num_frame_per_block), int(cfg.local_attn_size)
    return {"tokens_per_frame": tokens_per_frame, "q_tokens": fpb * tokens_per_frame,
            "kv_tokens_steady": window * tokens_per_frame, "kv_tokens_first": fpb * tokens_per_frame,
            "forwards_per_block": len(cfg.denoising_step_list) + 1}


def block_flops(cfg, latent_hw, first: bool = False) -> int:
    """DiT FLOPs of one block: every denoising step plus the clean pass that writes the cache."""
    m = cfg.model
    geo = block_geometry(cfg, latent_hw, m.patch_size)
    kv = geo["kv_tokens_first"] if first else geo["kv_tokens_steady"]
    one = dit_forward_flops(dim=m.dim, ffn_dim=m.ffn_dim, num_layers=m.num_layers, text_len=m.text_len,
                            in_dim=m.in_dim, out_dim=m.out_dim, patch=tuple(m.patch_size),
                            q_tokens=geo["q_tokens"], kv_tokens=kv)
    return one * geo["forwards_per_block"]


# ----------------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_batches(call, device: torch.device, seconds: float) -> list[float]:
    """Seconds per call of ``call()`` in five timed batches, after a warm-up, each batch of enough
    calls to last about a fifth of ``seconds``."""
    for _ in range(3):
        call()
    synchronize(device)
    per, reps = 0.0, 1
    while per < seconds / 5:
        start = time.perf_counter()
        for _ in range(reps):
            call()
        synchronize(device)
        per = time.perf_counter() - start
        if per < seconds / 5:
            reps *= 2
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reps):
            call()
        synchronize(device)
        times.append((time.perf_counter() - start) / reps)
    return times


def matmul_rate(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> dict:
    """Measured dense matmul rate (FLOP/s) of the device in ``dtype``: square products, warm-up,
    the best of five timed batches (and their median)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    rates = [2 * n ** 3 / t for t in timed_batches(lambda: a @ b, device, seconds)]
    # the best batch: a shared or throttled machine only ever makes a batch slower
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "flops_per_s": max(rates),
            "median_flops_per_s": statistics.median(rates)}


def attention_rate(device: torch.device, dtype: torch.dtype, *, heads: int, head_dim: int, q_tokens: int,
                   kv_tokens: int, seconds: float = 0.5, key_splits: int = 1, compiled: bool = False) -> dict:
    """SDPA alone at one attention shape of the rollout (a block's queries over ``kv_tokens``
    keys): the kernel it dispatches to (profiler) and its rate, 4·heads·q·kv·head_dim FLOPs per
    call (scores and values), the best of five timed batches. ``key_splits`` > 1: the keys in that
    many parts in one kernel call and their merge (``model.wan.split_key_attention``), compiled as the blocks are
    when ``compiled`` (one fused merge kernel)."""
    import torch.nn.functional as F
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from model.wan import split_key_attention

    # [B, tokens, heads, head_dim] seen as [B, heads, tokens, head_dim], as the model calls it
    q = torch.randn(1, q_tokens, heads, head_dim, device=device).to(dtype).transpose(1, 2)
    k, v = (torch.randn(1, kv_tokens, heads, head_dim, device=device).to(dtype).transpose(1, 2) for _ in range(2))
    if key_splits > 1:
        split = torch.compile(split_key_attention, dynamic=False) if compiled else split_key_attention
        call = functools.partial(split, q, k, v, key_splits)
    else:
        call = functools.partial(F.scaled_dot_product_attention, q, k, v)
    call()  # a compile, if any, outside the profile and the timing
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        call()
        synchronize(device)
    kernel = sorted({e.key for e in prof.key_averages() if is_sdpa_kernel_op(e.key)})
    # on a GPU, the longest kernel by name: cuDNN's names carry its tile sizes (how many thread blocks run)
    gpu = sorted(((e.device_time_total, e.key) for e in prof.key_averages() if e.device_type == DeviceType.CUDA),
                 reverse=True)[:1] if cuda else []
    best = min(timed_batches(call, device, seconds))
    flops = 4 * heads * q_tokens * kv_tokens * head_dim
    return {"q_tokens": q_tokens, "kv_tokens": kv_tokens, "kernel": kernel, "ms": 1e3 * best,
            "flops_per_s": flops / best, "key_splits": key_splits, "gpu_kernel": gpu[0][1] if gpu else None}


def is_sdpa_kernel_op(name: str) -> bool:
    """An ATen op that is one SDPA backend (``aten::_scaled_dot_product_cudnn_attention``...), not
    the dispatcher op above it nor an inductor kernel or autotuning record named after it."""
    return (name.startswith("aten::_scaled_dot_product") or name.startswith("aten::_flash_attention")
            or name.startswith("aten::_efficient_attention"))


def nominal_peak(device: torch.device) -> tuple[str, float] | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(NOMINAL_BF16_TFLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key.lower() in name.lower():
            return name, NOMINAL_BF16_TFLOPS[key] * 1e12
    return None


# ----------------------------------------------------------------------------------- where the time goes
# A kernel's name (GPU) or an ATen op's (CPU) → what it does. First match wins, so the specific
# patterns come first: a dtype cast is an "elementwise" kernel, a layer norm a "vectorized" one,
# an inductor matmul template a triton kernel.
KERNEL_KINDS = (
    ("attention", ("flash", "fmha", "sdpa", "scaled_dot_product", "attention")),
    ("convolution", ("conv3d", "conv2d", "convolution", "convolve", "slow_conv", "fprop")),
    ("GEMM", ("gemm", "cutlass", "xmma", "nvjet", "triton_tem_", "aten::mm", "aten::addmm", "aten::bmm",
              "aten::baddbmm", "aten::_addmm_activation", "aten::linear")),
    ("fused by inductor", ("triton_",)),
    ("norm", ("layer_norm", "rms_norm", "group_norm", "norm_kernel", "vector_norm", "normtwoops")),
    ("copy, cast, cat", ("copy", "aten::cat", "aten::clone", "aten::index", "aten::slice_scatter",
                         "aten::constant_pad_nd", "aten::pad", "aten::stack", "upsample", "aten::fill_",
                         "aten::zero_", "aten::ones")),
    ("memcpy, memset", ("memcpy", "memset")),
    ("elementwise", ("elementwise", "aten::add", "aten::mul", "aten::sub", "aten::div", "aten::gelu",
                     "aten::silu", "aten::sigmoid", "aten::tanh", "aten::exp", "aten::rsqrt", "aten::pow",
                     "aten::neg", "aten::where", "aten::masked_fill", "aten::lerp", "aten::clamp", "aten::sin",
                     "aten::cos", "aten::randn", "aten::normal_", "aten::rand")),
    ("reduction", ("reduce_kernel", "aten::sum", "aten::mean", "aten::amax", "aten::max", "aten::min")),
    # no kernel of their own: the host's cost of an op (CPU profiles; on a GPU, no device time)
    ("views, allocation", ("aten::view", "aten::as_strided", "aten::empty", "aten::transpose", "aten::t",
                           "aten::unsqueeze", "aten::squeeze", "aten::slice", "aten::select", "aten::to",
                           "aten::unbind", "aten::unflatten", "aten::flatten", "aten::reshape", "aten::permute",
                           "aten::alias", "aten::expand", "aten::contiguous", "aten::type_as", "aten::resolve_conj",
                           "aten::resize_", "aten::result_type", "aten::detach", "aten::split", "aten::chunk",
                           "aten::narrow", "aten::_unsafe_view", "aten::_reshape_alias", "aten::arange",
                           "aten::dropout", "aten::_nnpack_available")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    if low.startswith("triton_"):  # inductor names a kernel after every op it fused, attention's neighbours too
        return "GEMM" if low.startswith("triton_tem_") else "fused by inductor"
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


# upper bounds (µs) of the gap sizes gpu_idle sums separately: a queued kernel starts a few µs after
# the one before it; tens of µs mean the GPU ran out of queued work (the host was issuing launches)
IDLE_GAP_BINS_US = (5.0, 20.0, 50.0, 500.0, float("inf"))


def gpu_idle(kernels: list[tuple[str, float, float]], blocks: int, top: int = 3, min_gap_us: float = 50.0) -> dict:
    """``(name, start µs, end µs)`` of every kernel of ``blocks`` blocks → how long the GPU ran
    nothing between its first kernel and its last, per block, in gaps of at least ``min_gap_us``
    (shorter ones are launch spacing), the ``top`` longest gaps with the kernels around them
    (the one after a gap is the launch the GPU waited for), and all the idle time split by gap
    size (``by_gap_us``: ms per block and gaps per block in gaps up to each of
    :data:`IDLE_GAP_BINS_US`): many short gaps are the kernels' launch spacing, which fewer
    kernels or a CUDA graph shorten; long ones are the host falling behind."""
    kernels = sorted(kernels, key=lambda k: k[1])
    gaps, busy_until, before, all_us = [], None, None, 0.0
    bins = {bound: [0.0, 0] for bound in IDLE_GAP_BINS_US}
    for name, start, end in kernels:
        if busy_until is not None and start > busy_until:
            gap = start - busy_until
            all_us += gap
            acc = bins[next(bound for bound in IDLE_GAP_BINS_US if gap <= bound)]
            acc[0] += gap
            acc[1] += 1
            if gap >= min_gap_us:
                gaps.append((gap, before, name))
        if busy_until is None or end > busy_until:
            busy_until, before = end, name
    idle_us = sum(g for g, _, _ in gaps)
    longest = sorted(gaps, key=lambda g: g[0], reverse=True)[:top]
    return {"ms_per_block": idle_us / 1e3 / blocks, "gaps_per_block": len(gaps) / blocks, "min_gap_us": min_gap_us,
            "all_ms_per_block": all_us / 1e3 / blocks,
            "by_gap_us": [{"up_to_us": bound, "ms_per_block": us / 1e3 / blocks, "gaps_per_block": n / blocks}
                          for bound, (us, n) in bins.items()],
            "longest": [{"ms": g / 1e3, "after": a, "before": b} for g, a, b in longest]}


def idle_split(idle: dict) -> str:
    """``gpu_idle``'s split by gap size, one line: "≤ 5 µs: 3.1 ms in 2,400.0 gaps; ..." per block."""
    return "; ".join(f"{'≤ %g µs' % b['up_to_us'] if b['up_to_us'] != float('inf') else 'longer'}: "
                     f"{b['ms_per_block']:,.1f} ms in {b['gaps_per_block']:,.1f} gaps"
                     for b in idle.get("by_gap_us", []) if b["gaps_per_block"])


def time_by_kind(entries: list[tuple[str, float]], blocks: int, top: int = 8) -> dict:
    """``(name, microseconds)`` of every kernel (or op) of ``blocks`` blocks → ms per block by kind
    and the ``top`` names by time."""
    kinds: dict[str, float] = {}
    names: dict[str, list[float]] = {}
    for name, us in entries:
        kinds[kernel_kind(name)] = kinds.get(kernel_kind(name), 0.0) + us
        acc = names.setdefault(name, [0.0, 0])
        acc[0] += us
        acc[1] += 1
    total = sum(kinds.values())
    return {"ms_per_block": total / 1e3 / blocks, "calls_per_block": len(entries) / blocks,
            "by_kind_ms_per_block": {k: v / 1e3 / blocks for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top": [{"name": n, "ms_per_block": us / 1e3 / blocks, "calls_per_block": c / blocks,
                     "kind": kernel_kind(n)} for n, (us, c) in sorted(names.items(), key=lambda kv: -kv[1][0])[:top]]}


class RegionTimer:
    """Time spent inside some functions (outermost calls only): CUDA events on a GPU (recorded
    on the stream, read after the caller's synchronisation), ``perf_counter`` on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.depth = 0
        self.spans: list = []

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def wrap(self, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if self.depth:
                return fn(*args, **kwargs)
            self.depth += 1
            start = self._mark()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spans.append((start, self._mark()))
                self.depth -= 1
        return timed

    def take(self) -> float:
        """Seconds in the wrapped functions since the last call (the device must be synchronised)."""
        if self.cuda:
            total = sum(a.elapsed_time(b) for a, b in self.spans) / 1e3
        else:
            total = sum(b - a for a, b in self.spans)
        self.spans = []
        return total

    @contextlib.contextmanager
    def patched(self, targets):
        saved = [(owner, name, getattr(owner, name)) for owner, name in targets]
        try:
            for owner, name, fn in saved:
                setattr(owner, name, self.wrap(fn))
            yield self
        finally:
            for owner, name, fn in saved:
                setattr(owner, name, fn)


def rope_cache_targets():
    """What counts as "RoPE + cache bookkeeping": every KVCache method the model and the rollout
    call (staging, re-rotation, commit, flush, cut, position tables, cross-attention cache) and
    the rotation of the current block's queries and keys inside the DiT."""
    import model.wan as wan
    from model.kv_cache import KVCache, LayerKV

    targets = [(KVCache, name) for name in ("prepare", "set_text", "commit", "flush", "cut", "current_table",
                                            "context_table", "check_block", "reset")]
    targets += [(LayerKV, name) for name in ("attend", "cross")]
    targets += [(wan, "rotate")]
    return targets


# ----------------------------------------------------------------------------------- memory
def _proc_status(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def graph_pool_bytes(device: torch.device) -> int | None:
    """Bytes the private memory pools (the CUDA graphs') hold on ``device``, from the allocator's
    snapshot; None where this torch's snapshot does not say which pool a segment is in."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    segments = [s for s in torch.cuda.memory_snapshot() if s.get("device", index) == index]
    if any("segment_pool_id" not in s for s in segments):
        return None
    return sum(s["total_size"] for s in segments if tuple(s["segment_pool_id"]) != (0, 0))


class PeakMemory:
    """Peak memory of the measured passes: CUDA peak allocated on a GPU, peak RSS on a CPU.
    ``graphs``: the DiT replays CUDA graphs, whose temporaries live in their private pool, which
    the allocator's peak does not count (they were allocated and freed at capture, before the
    reset, and a replay allocates nothing): the pool's bytes are added, an upper bound (the
    graphs' static inputs and outputs are counted twice); where the pool cannot be told apart,
    the peak reserved is the peak."""

    def __init__(self, device: torch.device, graphs: bool = False):
        self.device, self.graphs = device, graphs

    def reset(self) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "torch.cuda.max_memory_allocated (reset after warm-up)"
            if self.graphs:
                self.method += " + the CUDA graphs' memory pool"
            self.baseline = torch.cuda.memory_allocated(self.device)
            return
        self.baseline = _proc_status("VmRSS")
        try:  # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "VmHWM (peak RSS, reset after warm-up; fresh process per length)"
        except OSError:
            self.method = "ru_maxrss (peak RSS of the whole process; fresh process per length)"

    def read(self) -> dict:
        if self.device.type == "cuda":
            synchronize(self.device)
            out = {"method": self.method, "peak_bytes": torch.cuda.max_memory_allocated(self.device),
                   "peak_reserved_bytes": torch.cuda.max_memory_reserved(self.device),
                   "baseline_bytes": self.baseline}
            if self.graphs:
                out["graph_pool_bytes"] = pool = graph_pool_bytes(self.device)
                if pool is None:
                    out.update(peak_bytes=out["peak_reserved_bytes"], method="torch.cuda.max_memory_reserved "
                               "(reset after warm-up; this torch's snapshot does not name the CUDA graphs' pool)")
                else:
                    out["peak_bytes"] += pool
            return out
        peak = _proc_status("VmHWM") if self.method.startswith("VmHWM") else None
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"method": self.method, "peak_bytes": peak, "baseline_bytes": self.baseline,
                "rss_end_bytes": _proc_status("VmRSS")}


# ----------------------------------------------------------------------------------- one run
def bench_prompt(seconds: float, segment_seconds: float = 5.0) -> str:
    """A prompt of ``seconds`` seconds in segments of about ``segment_seconds``: a KV Flush at every
    segment, a RoPE Cut at every fourth, a subtitle on each (every event kind is exercised)."""
    n = max(1, round(seconds / segment_seconds))
    seg = seconds / n
    parts = [f"{TEXTS[k % len(TEXTS)]}[{seg:.6g}s{'#' if k % 4 == 3 else ''}]" for k in range(n)]
    return " | ".join(parts) + " ; " + " | ".join(f"part {k + 1}" for k in range(n))


def parse_variant(name: str) -> dict:
    spec = {"name": name, "overrides": [], "naive_rope": False, "sdpa": None, "legacy": [], "sync_write": False,
            "cudnn_benchmark": False, "render": False, "compile_options": {}, "vae_unfused": False,
            "qkv_separate": False}
    for part in name.split("+"):
        if part not in VARIANTS:
            raise SystemExit(f"unknown variant {part!r}; known: {', '.join(VARIANTS)} (combine with +)")
        v = VARIANTS[part]
        spec["overrides"] += v.get("overrides", [])
        spec["naive_rope"] |= v.get("naive_rope", False)
        spec["sdpa"] = v.get("sdpa", spec["sdpa"])
        spec["legacy"] += v.get("legacy", [])
        spec["sync_write"] |= v.get("sync_write", False)
        spec["cudnn_benchmark"] |= v.get("cudnn_benchmark", False)
        spec["render"] |= v.get("render", False)
        before, more = spec["compile_options"], v.get("compile_options", {})
        spec["compile_options"] = {**before, **more}
        if "options" in before or "options" in more:  # inductor's options add up
            spec["compile_options"]["options"] = {**before.get("options", {}), **more.get("options", {})}
        spec["vae_unfused"] |= v.get("vae_unfused", False)
        spec["qkv_separate"] |= v.get("qkv_separate", False)
    return spec


def _rotate_real(x, freqs):
    from model.rope import _rotate_real as real
    from model.rope import cos_sin

    return real(x, *cos_sin(freqs))


def _rotate_f64(x, freqs):
    xc = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    table = torch.view_as_complex(freqs[:, 0]).to(torch.complex128)  # the table's (cos, sin) pairs
    return torch.view_as_real(xc * table[None, :, None, :]).flatten(-2).to(x.dtype)


def _text_kv_per_forward(self, make):
    return make()


@contextlib.contextmanager
def legacy_paths(names: list[str]):
    """Swap a fast path back for the plain code it replaced, for before/after numbers."""
    import model.kv_cache as kv_cache
    import model.wan as wan

    saved = []

    def swap(owner, attr, value):
        saved.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, value)

    try:
        for name in names:
            if name in ("real_rope", "rope_f64"):
                fn = _rotate_real if name == "real_rope" else _rotate_f64
                swap(wan, "rotate", fn)
                swap(kv_cache, "rotate", fn)
            elif name == "text_kv_per_forward":
                swap(kv_cache.LayerKV, "cross", _text_kv_per_forward)
                swap(kv_cache.KVCache, "set_text", lambda self, context, make_layer: None)
            elif name == "ffn_gelu_pass":
                swap(wan, "feed_forward", lambda ffn, h: ffn(h))
        yield
    finally:
        for owner, attr, value in reversed(saved):
            setattr(owner, attr, value)


@contextlib.contextmanager
def runtime_context(spec: dict):
    """A variant's runtime switches: the SDPA backend, the legacy code paths, cuDNN autotuning."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = saved or spec.get("cudnn_benchmark", False)
    try:
        with sdpa_context(spec["sdpa"]), legacy_paths(spec["legacy"]):
            yield
    finally:
        torch.backends.cudnn.benchmark = saved


def sdpa_context(backend: str | None):
    if backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    return sdpa_kernel([names[backend]])


def load_bench_config(config_path: str | None, overrides: list[str]):
    """The config with the benchmark's defaults for ``random_init``: a tiny random UMT5 of the
    DiT's text width (it runs once per prompt, outside the measured loop) and the test tokenizer;
    the DiT and the VAE keep the sizes the config gives (full size unless it says otherwise)."""
    from utils.config import load_config

    cfg = load_config(config_path, overrides)
    if cfg.random_init and cfg.tiny_text_encoder is None:
        extra = [f"tiny_text_encoder={{d_model: {cfg.model.text_dim}, d_ff: 64, num_layers: 1, num_heads: 2, "
                 f"d_kv: 16}}"]
        if cfg.tokenizer_path is None:
            extra.append(f"tokenizer_path={REPO / 'tests' / 'assets' / 'tokenizer'}")
        cfg = load_config(config_path, list(overrides) + extra)
    return cfg


class Bench:
    """Models and pipeline pieces for one config and variant, reused across lengths in-process."""

    def __init__(self, cfg, variant: dict):
        from pipeline.generate import VideoGenerator, build_models

        self.cfg, self.variant = cfg, variant
        t0 = time.perf_counter()
        self.models = build_models(cfg)
        self.build_s = time.perf_counter() - t0
        self.device = self.models.device
        self.gen = VideoGenerator(cfg, self.models)
        self.settings = self.gen.settings
        if variant.get("compile_options") and cfg.compile:
            options = dict(variant["compile_options"])
            if "mode" in options and "options" in options:  # torch.compile takes one of them: the mode's as options
                import torch._inductor

                options["options"] = {**torch._inductor.list_mode_options(options.pop("mode")), **options["options"]}
            for block in self.models.dit.blocks:  # nothing is compiled yet: this replaces build_models' compile
                block.compile(**options)
        if variant.get("vae_unfused"):
            self.models.vae.unfuse()
        if variant.get("qkv_separate"):  # before the first forward, which compiles
            self.models.dit.pack_qkv(False)
        if variant["naive_rope"]:
            self.gen.cache = self.settings.new_cache(self.models.dit, 1, self.gen.latent_shape[1:], naive_rope=True)
        self.cache = self.gen.cache
        self.seed = int(cfg.seed)

    # -- the rollout of a plan -------------------------------------------------------------
    def blocks(self, plan, contexts):
        from pipeline.rollout import plan_blocks, rollout

        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        return rollout(self.models.dit, self.cache, self.settings,
                       plan_blocks(plan.block_events, plan.block_segment, contexts),
                       latent_shape=self.gen.latent_shape, generator=generator)

    def second_video(self, plan, contexts) -> None:
        """After a warm-up rollout, two blocks of another: the first block's clean pass (run when
        the second block is asked for) is a layout met once per video, so it compiles in the first
        video and is captured as a CUDA graph in the second; the timed rollouts then replay it
        instead of capturing it in one of their steady blocks."""
        self.dit_pass(plan, contexts, max_blocks=2, desc="warm-up, a second video")

    def dit_pass(self, plan, contexts, max_blocks: int | None = None, desc: str = "DiT") -> list[float]:
        """Seconds per block of a rollout (device synchronised at each block boundary)."""
        times = []
        synchronize(self.device)
        t0 = time.perf_counter()
        total = plan.total_blocks if max_blocks is None else min(max_blocks, plan.total_blocks)
        for i, _ in enumerate(tqdm(self.blocks(plan, contexts), total=total, desc=desc, unit="block",
                                   leave=False, disable=None)):
            synchronize(self.device)
            t1 = time.perf_counter()
            times.append(t1 - t0)
            t0 = t1
            if i + 1 >= total:
                break
        return times

    def profile_pass(self, plan, contexts, blocks: int, vae: bool = True) -> dict:
        """``torch.profiler`` over ``blocks`` steady blocks of a DiT rollout (the blocks before them
        run unprofiled), as the variant runs them (compiled, replayed graphs and all), then over
        the streaming VAE decode of the same blocks (``vae``; the blocks before them decoded
        first, so the decoder's cache is full): on a GPU every kernel's device time, on a CPU
        every ATen op's own CPU time, by kind; and the host's wall time per block, which above
        the kernels' time means the GPU waits for its launches. (On a CPU a compiled variant's
        own C++ kernels are not ATen ops: only its extern calls, the matmuls and attention, are
        seen.) Returns ``{"dit": ..., "vae": ...}``."""
        start = min(steady_start(self.cfg), plan.total_blocks - 1)
        blocks = min(blocks, plan.total_blocks - start)
        rollout = iter(self.blocks(plan, contexts))
        latents = [next(rollout)[1] for _ in range(start)]
        out = {"dit": self._profiled(lambda: latents.append(next(rollout)[1]), blocks, start)}
        rollout.close()
        if vae:
            decoder = self.gen.decoder
            decoder.reset()
            for x in latents[:start]:
                decoder.decode_block(x)
            steady = iter(latents[start:])
            out["vae"] = self._profiled(lambda: decoder.decode_block(next(steady)), blocks, start)
            decoder.reset()
        return out

    def _profiled(self, step, blocks: int, first_block: int) -> dict:
        """``step()`` ``blocks`` times under ``torch.profiler``: time by kind of kernel (op), per block."""
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        cuda = self.device.type == "cuda"
        synchronize(self.device)
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            t0 = time.perf_counter()
            for _ in range(blocks):
                step()
            synchronize(self.device)
            wall = time.perf_counter() - t0
        events = prof.events()
        idle = None
        if cuda:
            kernels = [e for e in events if e.device_type == DeviceType.CUDA]
            entries = [(e.name, e.time_range.elapsed_us()) for e in kernels]
            idle = gpu_idle([(e.name, e.time_range.start, e.time_range.end) for e in kernels], blocks)
        else:
            entries = [(e.name, e.self_cpu_time_total) for e in events
                       if e.device_type == DeviceType.CPU and e.name.startswith("aten::")]
        return dict(time_by_kind(entries, blocks), blocks=blocks, first_block=first_block,
                    wall_ms_per_block=1e3 * wall / blocks, timed="kernels (device time)" if cuda
                    else "ATen ops (own CPU time)", idle=idle)

    def pipeline_pass(self, plan, contexts, path: Path, max_blocks: int | None = None,
                      split: bool = True, desc: str = "pipeline") -> dict:
        """The inference path of ``VideoGenerator.generate`` with stage timers: per block, seconds
        in the DiT (of which RoPE + cache bookkeeping), the VAE decode, and writing (what the
        generation waits for: queueing the uint8 conversion and copy, handing the block to the
        writer; with ``sync_write`` also the copy, the subtitle and the pipe to ffmpeg)."""
        from utils.video import PendingFrames, VideoWriter

        gen, cfg = self.gen, self.cfg
        total = plan.total_blocks if max_blocks is None else min(max_blocks, plan.total_blocks)
        if self.variant.get("render"):
            return self.render_pass(plan, contexts, path, total, desc)
        timer = RegionTimer(self.device)
        per_block = {"dit": [], "rope_cache": [], "vae": [], "write": []}
        written = 0
        patch = timer.patched(rope_cache_targets()) if split else contextlib.nullcontext()
        gen.decoder.reset()
        synchronize(self.device)
        start = time.perf_counter()
        with patch, VideoWriter(path, fps=float(cfg.fps), width=int(cfg.width), height=int(cfg.height),
                                background=not self.variant.get("sync_write", False)) as writer:
            blocks = self.blocks(plan, contexts)
            for _ in tqdm(range(total), desc=desc, unit="block", leave=False, disable=None):
                t0 = time.perf_counter()
                spec, latents = next(blocks)
                synchronize(self.device)
                t1 = time.perf_counter()
                frames = gen.decoder.decode_block(latents)[0]
                synchronize(self.device)
                t2 = time.perf_counter()
                frames = PendingFrames(frames, stop=plan.total_frames - written,
                                       finish=functools.partial(gen.subtitles.render,
                                                                text=plan.segments[spec.segment].subtitle))
                writer.write(frames)
                written += len(frames)
                t3 = time.perf_counter()
                per_block["dit"].append(t1 - t0)
                per_block["rope_cache"].append(timer.take() if split else float("nan"))
                per_block["vae"].append(t2 - t1)
                per_block["write"].append(t3 - t2)
            blocks.close()
            gen.decoder.reset()  # the VAE's causal cache freed with the video, as render does
            t_close = time.perf_counter()
        close_s = time.perf_counter() - t_close  # ffmpeg flushing the last frames and the index
        return {"per_block": per_block, "close_s": close_s, "wall_s": time.perf_counter() - start,
                "frames_written": written}

    def render_pass(self, plan, contexts, path: Path, total: int, desc: str) -> dict:
        """The pipeline as ``VideoGenerator.render`` runs it, timed per block only (variants
        ``render`` and ``decode_stream``): nothing synchronises between the stages, as in a real
        render, so the host queues the next block while the GPU works and, with a decode stream,
        the VAE decode overlaps the next block's DiT; there are no stage boundaries to time. The
        host runs ahead of the GPU by up to the writer's bounded queue, a lead that grows over the
        first blocks: so the GPU is waited for after the first block (its latency), before the
        first steady block and after the last, and the steady blocks' intervals add up to the
        time from an idle GPU to an idle GPU. The whole block time is reported as "dit", the
        other stages as 0. (What the writer's thread still has queued at the end, a block or two
        of the uint8 copy, subtitle and pipe, is in ``close_s``.)"""
        from pipeline.rollout import plan_blocks
        from utils.video import VideoWriter

        gen, cfg = self.gen, self.cfg
        per_block = {"dit": [], "rope_cache": [], "vae": [], "write": []}
        first_steady = min(steady_start(cfg), total - 1)
        synchronize(self.device)
        start = t0 = time.perf_counter()
        with VideoWriter(path, fps=float(cfg.fps), width=int(cfg.width), height=int(cfg.height),
                         background=not self.variant.get("sync_write", False)) as writer:
            blocks = gen.render(plan_blocks(plan.block_events, plan.block_segment, contexts), writer, seed=self.seed,
                                subtitles=[s.subtitle for s in plan.segments], total_frames=plan.total_frames)
            written = 0
            for block in tqdm(blocks, total=total, desc=desc, unit="block", leave=False, disable=None):
                if block.index == 0 or block.index + 1 in (first_steady, total):
                    synchronize(self.device)
                t1 = time.perf_counter()
                for key, value in (("dit", t1 - t0), ("rope_cache", float("nan")), ("vae", 0.0), ("write", 0.0)):
                    per_block[key].append(value)
                written, t0 = block.first_frame + len(block.frames), t1
                if block.index + 1 >= total:
                    break
            blocks.close()
            t_close = time.perf_counter()
        close_s = time.perf_counter() - t_close
        return {"per_block": per_block, "close_s": close_s, "wall_s": time.perf_counter() - start,
                "frames_written": written, "overlapped": True}

    # -- diagnostics on one forward ----------------------------------------------------------
    def probe_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A noise block and the first denoising timestep, for the probes' single forwards."""
        s, dtype = self.settings, next(self.models.dit.parameters()).dtype
        x = torch.randn((1, s.block_frames, *self.gen.latent_shape), device=self.device).to(dtype)
        return x, s.timesteps(self.device)[0].expand(1, s.block_frames)

    def one_forward(self, contexts):
        """One cached forward of a block at the first denoising step (fresh cache)."""
        dit = self.models.dit
        self.cache.reset()
        x, t = self.probe_inputs()
        with torch.no_grad():
            dit(x, t, contexts[0], kv_cache=self.cache)

    def ops_per_forward(self, contexts) -> dict | None:
        """ATen ops one eager cached forward dispatches (the second over a fresh cache: the text
        keys/values are cached), views left out: about the kernels it launches, each a host call
        (what a CUDA graph replays in one launch), and of them the dtype conversions."""
        from torch.utils._python_dispatch import TorchDispatchMode

        if self.cfg.compile:
            return None
        counts: dict[str, int] = {}

        class Count(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if not func.is_view:
                    name = func.overloadpacket.__name__
                    counts[name] = counts.get(name, 0) + 1
                return func(*args, **(kwargs or {}))

        dit = self.models.dit
        self.cache.reset()
        x, t = self.probe_inputs()
        with self.ungraphed(), torch.no_grad():
            dit(x, t, contexts[0], kv_cache=self.cache)
            with Count():
                dit(x, t, contexts[0], kv_cache=self.cache)
        self.cache.reset()
        return {"ops": sum(counts.values()), "dtype_conversions": counts.get("_to_copy", 0), "by_op": counts}

    @contextlib.contextmanager
    def ungraphed(self):
        """The model's forwards run eagerly (profiler and FLOP-counter probes must see every op)."""
        dit = self.models.dit
        graphs, dit.cuda_graphs = dit.cuda_graphs, None
        try:
            yield
        finally:
            dit.cuda_graphs = graphs

    def sdpa_backend_used(self, contexts) -> list[str]:
        """The SDPA kernels one forward dispatched to (ATen op names, from the profiler)."""
        from torch.profiler import ProfilerActivity, profile

        with self.ungraphed(), profile(activities=[ProfilerActivity.CPU]) as prof:
            self.one_forward(contexts)
        return sorted({e.key for e in prof.key_averages() if is_sdpa_kernel_op(e.key)})

    def counted_flops(self, contexts) -> int | None:
        """FLOPs of one first-block forward counted by ``torch.utils.flop_counter`` (a cross-check of
        :func:`dit_forward_flops`): the second forward over a fresh cache, so the text keys/values
        (once per prompt) are already cached, with SDPA's math backend, whose matmuls the counter
        sees on every device."""
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.utils.flop_counter import FlopCounterMode

        if self.cfg.compile:
            return None
        dit = self.models.dit
        self.cache.reset()
        x, t = self.probe_inputs()
        counter = FlopCounterMode(display=False)
        with self.ungraphed(), torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
            dit(x, t, contexts[0], kv_cache=self.cache)
            with counter:
                dit(x, t, contexts[0], kv_cache=self.cache)
        self.cache.reset()
        return int(counter.get_total_flops())


def steady_start(cfg) -> int:
    """Index of the first block that attends to a full window (sink + context + block)."""
    from pipeline.rollout import RolloutSettings

    return RolloutSettings.from_config(cfg).first_steady_block


def steady_blocks(plan, cfg) -> tuple[range, int]:
    """The steady-state blocks of a plan and the video frames they hold."""
    first_steady = min(steady_start(cfg), plan.total_blocks - 1)
    steady = range(first_steady, plan.total_blocks)
    return steady, sum(plan.block_frames(i)[1] - plan.block_frames(i)[0] for i in steady)


def dit_summary(dit_runs: list[list[float]], plan, cfg, seconds: float, opts: dict) -> dict:
    """First-block latency and steady-state rates of DiT-only rollouts: medians over the runs
    (and the best run, the least disturbed on a shared machine)."""
    steady, steady_frames = steady_blocks(plan, cfg)
    dit_steady = [sum(run[i] for i in steady) for run in dit_runs]
    dit_s = statistics.median(dit_steady)
    return {
        "seconds": seconds, "blocks": plan.total_blocks, "frames": plan.total_frames,
        "segments": len(plan.segments), "steady_blocks": len(steady), "steady_frames": steady_frames,
        "repeats": len(dit_runs),
        "first_block_s": statistics.median(run[0] for run in dit_runs),
        "first_block_best_s": min(run[0] for run in dit_runs),
        "dit_steady_s": dit_s, "dit_blocks_per_s": len(steady) / dit_s,
        "dit_video_fps": steady_frames / dit_s,
        "dit_video_fps_best": steady_frames / min(dit_steady),
        "dit_block_ms_median": 1e3 * statistics.median(t for run in dit_runs for t in (run[i] for i in steady)),
        "dit_runs_block_s": [[round(t, 6) for t in run] for run in dit_runs] if opts["per_block"] else None,
    }


def measure(bench: Bench, seconds: float, opts: dict, workdir: Path) -> dict:
    """Every number for one (variant, length) on a warmed-up ``bench``."""
    cfg, device = bench.cfg, bench.device
    plan = bench.gen.plan(bench_prompt(seconds))
    t0 = time.perf_counter()
    contexts = bench.gen.encode_texts(plan)
    synchronize(device)
    text_s = time.perf_counter() - t0
    steady, steady_frames = steady_blocks(plan, cfg)

    # warm-up: kernels, allocator, compilation, the VAE cache, ffmpeg
    warm = bench.pipeline_pass(plan, contexts, workdir / "warmup.mp4", max_blocks=opts["warmup_blocks"],
                               split=False, desc="warm-up")
    bench.second_video(plan, contexts)
    memory = PeakMemory(device, graphs=bool(cfg.cuda_graphs))
    memory.reset()

    dit_runs = [bench.dit_pass(plan, contexts, desc=f"DiT {seconds:g}s #{r + 1}") for r in range(opts["repeats"])]
    memory_dit = memory.read()
    result = dit_summary(dit_runs, plan, cfg, seconds, opts)
    result.update({"text_encode_s": text_s, "warmup_blocks": opts["warmup_blocks"], "warmup_wall_s": warm["wall_s"]})

    memory_pipeline = None
    if not opts["skip_pipeline"]:
        memory.reset()
        split = not (cfg.compile or cfg.cuda_graphs)  # the split's timers cannot run inside compiled or captured code
        runs = [bench.pipeline_pass(plan, contexts, workdir / f"run{r}.mp4", split=split,
                                    desc=f"pipeline {seconds:g}s #{r + 1}")
                for r in range(opts["pipeline_repeats"])]
        totals = [sum(run["per_block"][k][i] for k in ("dit", "vae", "write") for i in steady) for run in runs]
        run = runs[sorted(range(len(runs)), key=totals.__getitem__)[len(runs) // 2]]  # the median run
        pb = run["per_block"]
        stage = {k: sum(pb[k][i] for i in steady) / len(steady) for k in pb}
        total_s = sum(pb[k][i] for k in ("dit", "vae", "write") for i in steady)
        overlapped = run.get("overlapped", False)  # decode_stream: one time per block, no stages
        result.update({
            "pipeline_video_fps": steady_frames / total_s,
            "dit_vae_video_fps": float("nan") if overlapped else
            steady_frames / sum(pb[k][i] for k in ("dit", "vae") for i in steady),
            "pipeline_first_frames_s": statistics.median(r["per_block"]["dit"][0] + r["per_block"]["vae"][0]
                                                         + r["per_block"]["write"][0] for r in runs),
            "split_ms_per_block": None if overlapped else {
                # without the split's timers (compiled or captured DiT) the DiT's time is all "dit_forward"
                "dit_forward": 1e3 * (stage["dit"] - (0.0 if math.isnan(stage["rope_cache"]) else stage["rope_cache"])),
                "rope_cache": 1e3 * stage["rope_cache"],
                "vae_decode": 1e3 * stage["vae"], "write_mp4_subtitles": 1e3 * stage["write"]},
            "mp4_close_s": run["close_s"], "pipeline_wall_s": [r["wall_s"] for r in runs],
            "frames_written": run["frames_written"],
            "pipeline_runs_block_s": [r["per_block"] for r in runs] if opts["per_block"] else None,
        })
        memory_pipeline = memory.read()
    # peak of the measured passes: the DiT-only rollouts and the full pipeline, each phase's
    # peak counter reset at its start
    phases = [m for m in (memory_dit, memory_pipeline) if m is not None]
    result["memory"] = dict(max(phases, key=lambda m: m["peak_bytes"]), dit_only=memory_dit, pipeline=memory_pipeline)
    result["cache_bytes"] = bench.cache.memory_bytes()
    graphs = bench.models.dit.cuda_graphs
    if graphs is not None:  # forwards run eagerly / captured / replayed / failed captures, warm-up included
        result["cuda_graphs"] = dict(graphs.stats, graphs=len(graphs))
        log.info("CUDA graphs: %s", result["cuda_graphs"])
    return result


def describe_device(device: torch.device) -> dict:
    info = {"type": device.type, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gib=round(props.total_memory / 2 ** 30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    flash_sdp=torch.backends.cuda.flash_sdp_enabled(),
                    cudnn_sdp=torch.backends.cuda.cudnn_sdp_enabled(),
                    mem_efficient_sdp=torch.backends.cuda.mem_efficient_sdp_enabled())
    else:
        try:
            model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("model name"))
            info["name"] = model
        except (OSError, StopIteration):
            info["name"] = info["cpu"]
    return info


def describe_bench(bench: Bench, spec: dict, matmul: dict | None = None) -> dict:
    """Everything about a variant that does not depend on the video length."""
    cfg, device = bench.cfg, bench.device
    latent_hw = tuple(bench.gen.latent_shape[1:])
    dtype = next(bench.models.dit.parameters()).dtype
    out = {"variant": spec["name"], "device": describe_device(device), "dtype": str(dtype).replace("torch.", ""),
           "build_s": bench.build_s, "config": {k: v for k, v in _plain(cfg).items() if k != "negative_prompt"},
           "geometry": block_geometry(cfg, latent_hw, cfg.model.patch_size),
           "dit_parameters": sum(p.numel() for p in bench.models.dit.parameters())}
    probe_ctx = bench.gen.encode_texts(bench.gen.plan(bench_prompt(1.0)))
    out["sdpa_ops"] = bench.sdpa_backend_used(probe_ctx)
    geo, m = out["geometry"], cfg.model
    splits = bench.models.dit.blocks[0].self_attn.key_splits  # cross-attention is never split
    out["attention"] = {name: attention_rate(device, dtype, heads=m.num_heads, head_dim=m.dim // m.num_heads,
                                             q_tokens=geo["q_tokens"], kv_tokens=kv, key_splits=n,
                                             compiled=bool(cfg.compile))
                        for name, kv, n in (("self", geo["kv_tokens_steady"], splits), ("cross", m.text_len, 1))}
    counted = bench.counted_flops(probe_ctx)
    out["ops_per_forward"] = bench.ops_per_forward(probe_ctx)
    formula_first = block_flops(cfg, latent_hw, first=True) // out["geometry"]["forwards_per_block"]
    out["flops"] = {"per_block_steady": block_flops(cfg, latent_hw), "per_block_first": block_flops(cfg, latent_hw, True),
                    "per_forward_first_formula": formula_first, "per_forward_first_counted": counted}
    try:
        out["flops"]["vae_per_block_first"], out["flops"]["vae_per_block_steady"] = \
            vae_block_flops(cfg, tuple(bench.gen.latent_shape))
    except Exception as exc:  # noqa: BLE001 - a diagnostic; the timings do not depend on it
        log.warning("could not count the VAE's FLOPs on the meta device: %s", exc)
    out["matmul"] = matmul or matmul_rate(device, dtype)
    peak = nominal_peak(device)
    out["nominal_peak"] = {"device": peak[0], "flops_per_s": peak[1]} if peak else None
    return out


def add_floor(out: dict) -> dict:
    """Floor time per block (FLOPs ÷ the best measured matmul rate) and the achieved fraction."""
    for run in out["runs"]:
        floor = out["flops"]["per_block_steady"] / out["matmul"]["flops_per_s"]
        run["floor_s_per_block"] = floor
        run["floor_fraction"] = floor / (run["dit_steady_s"] / run["steady_blocks"])
        if out["nominal_peak"]:
            nominal = out["flops"]["per_block_steady"] / out["nominal_peak"]["flops_per_s"]
            run["nominal_floor_s_per_block"] = nominal
            run["nominal_floor_fraction"] = nominal / (run["dit_steady_s"] / run["steady_blocks"])
        vae = out["flops"].get("vae_per_block_steady")
        split = run.get("split_ms_per_block")
        if vae and split:  # DiT + VAE: floor against the pipeline's measured DiT + decode time
            both = (out["flops"]["per_block_steady"] + vae) / out["matmul"]["flops_per_s"]
            rope_cache = 0.0 if math.isnan(split["rope_cache"]) else split["rope_cache"]  # not split: in dit_forward
            measured = (split["dit_forward"] + rope_cache + split["vae_decode"]) / 1e3
            run["dit_vae_floor_s_per_block"] = both
            run["dit_vae_floor_fraction"] = both / measured
    return out


def _best_matmul(a: dict, b: dict) -> dict:
    return a if a["flops_per_s"] >= b["flops_per_s"] else b


def run_variant(spec: dict, seconds_list: list[float], opts: dict) -> dict:
    """Build the models once for a variant and measure every length in this process."""
    cfg = load_bench_config(opts["config_path"], opts["overrides"] + spec["overrides"])
    if opts["threads"]:
        torch.set_num_threads(opts["threads"])
    from torch._dynamo.utils import counters

    cached = dict(counters["inductor"])  # inductor's FX graph cache lookups of this variant: the difference
    with runtime_context(spec):
        bench = Bench(cfg, spec)
        out = describe_bench(bench, spec)
        workdir = Path(tempfile.mkdtemp(prefix="bench_", dir=opts["out"]))
        try:
            out["runs"] = []
            for seconds in seconds_list:
                log.info("%s: %g s of video", spec["name"], seconds)
                out["runs"].append(measure(bench, seconds, opts, workdir))
            if opts["profile_blocks"]:
                plan = bench.gen.plan(bench_prompt(seconds_list[0]))
                out["profile"] = bench.profile_pass(plan, bench.gen.encode_texts(plan), opts["profile_blocks"],
                                                    vae=not opts["skip_pipeline"])
        finally:
            if not opts["keep_videos"]:
                shutil.rmtree(workdir, ignore_errors=True)
        if cfg.compile or cfg.compile_vae:  # compiled kernels found on disk (an earlier run's) or compiled now
            from pipeline.generate import compile_cache_dir

            out["compile_cache"] = {"dir": str(compile_cache_dir()), **{
                k: counters["inductor"][f"fxgraph_cache_{k}"] - cached.get(f"fxgraph_cache_{k}", 0)
                for k in ("hit", "miss")}}
        # the matmul rate once more at the end: the better of the two (a busy moment only slows it)
        out["matmul"] = _best_matmul(out["matmul"], matmul_rate(bench.device, next(bench.models.dit.parameters()).dtype))
    device = bench.device
    del bench  # free the models before the next variant builds its own (in-process on a GPU)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return add_floor(out)


def run_interleaved(specs: list[dict], seconds_list: list[float], opts: dict) -> list[dict]:
    """DiT-only before/after numbers for variants that share one model (runtime switches):
    one process, the variants' rollouts alternating round after round, so that a busy spell on
    a shared machine hits every variant alike. No memory numbers (one process for all)."""
    built = ("compile_options", "vae_unfused", "qkv_separate", "render")  # applied when a variant's models are built
    def models_of(s):  # the compile options compare whatever order the variant named them in
        return repr([sorted(s[k].items()) if isinstance(s[k], dict) else s[k] for k in built])
    if len({tuple(s["overrides"]) for s in specs}) > 1 or len({models_of(s) for s in specs}) > 1:
        raise SystemExit("--interleave needs variants that share the config and the built models (naive_rope, "
                         "rope_f64, real_rope, text_kv_per_forward, sdpa_*); run config variants (compile, fp32, "
                         "bf16, *_compile, vae_*, render) without it")
    cfg = load_bench_config(opts["config_path"], opts["overrides"] + specs[0]["overrides"])
    if opts["threads"]:
        torch.set_num_threads(opts["threads"])
    bench = Bench(cfg, dict(specs[0], naive_rope=False))
    caches = {False: bench.cache}

    @contextlib.contextmanager
    def switched(spec):
        naive = spec["naive_rope"]
        if naive not in caches:
            caches[naive] = bench.settings.new_cache(bench.models.dit, 1, bench.gen.latent_shape[1:], naive_rope=naive)
        bench.cache = caches[naive]
        with runtime_context(spec):
            yield

    outs, matmul = [], None
    for spec in specs:
        with switched(spec):
            outs.append(dict(describe_bench(bench, spec, matmul), runs=[]))
            matmul = outs[-1]["matmul"]
    for seconds in seconds_list:
        plan = bench.gen.plan(bench_prompt(seconds))
        contexts = bench.gen.encode_texts(plan)
        runs: dict[str, list] = {spec["name"]: [] for spec in specs}
        for spec in specs:
            with switched(spec):
                bench.dit_pass(plan, contexts, max_blocks=opts["warmup_blocks"], desc=f"warm-up {spec['name']}")
                bench.second_video(plan, contexts)
        for r in range(opts["repeats"]):
            for spec in specs[r % len(specs):] + specs[:r % len(specs)]:  # rotate the order each round
                with switched(spec):
                    runs[spec["name"]].append(bench.dit_pass(plan, contexts, desc=f"{spec['name']} {seconds:g}s #{r + 1}"))
        for out, spec in zip(outs, specs):
            run = dit_summary(runs[spec["name"]], plan, cfg, seconds, opts)
            run.update(memory=None, cache_bytes=caches[spec["naive_rope"]].memory_bytes())
            out["runs"].append(run)
    rate = matmul_rate(bench.device, next(bench.models.dit.parameters()).dtype)
    for out in outs:
        out["matmul"] = _best_matmul(out["matmul"], rate)
        out["interleaved"] = True
        add_floor(out)
    return outs


def _plain(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


# ----------------------------------------------------------------------------------- report
def merge_runs(results: list[dict]) -> list[dict]:
    """One entry per variant (subprocess results of the same variant merged, lengths in order)."""
    merged: dict[str, dict] = {}
    for r in results:
        if r["variant"] in merged:
            merged[r["variant"]]["runs"] += r["runs"]
        else:
            merged[r["variant"]] = r
    return list(merged.values())


def _fmt(x, digits=3):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def realtime_check(run: dict) -> str:
    """``DiT 52.1 fps (≥ 60: NO), first block 0.21 s (≤ 0.25: yes), …`` for one run."""
    values = dict(run, peak_gib=run["memory"]["peak_bytes"] / 2 ** 30 if run.get("memory") else None)
    parts = []
    for label, key, sense, bound, unit in REALTIME_TARGETS:
        value = values.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            parts.append(f"{label} not measured")
            continue
        met = value >= bound if sense == "≥" else value <= bound
        parts.append(f"{label} {_fmt(value)} {unit} ({sense} {bound:g}: {'yes' if met else 'NO'})")
    return ", ".join(parts)


def markdown(report: dict) -> str:
    variants = report["variants"]
    first = variants[0]
    dev = first["device"]
    cuda = dev["type"] == "cuda"
    mem_label = "peak alloc MiB" if cuda else "peak RSS MiB"
    lines = [f"Device: {dev.get('name', dev['type'])} ({dev['type']}, torch {dev['torch']}, "
             f"{dev['threads']} threads) · config `{report['config_path']}` · dtype {first['dtype']} · "
             f"DiT {_count(first['dit_parameters'])} parameters · {report['video']}",
             "",
             "| variant | video | blocks | first block s | DiT blocks/s | DiT fps (best) | DiT+VAE fps | pipeline fps "
             "| DiT ms/blk | RoPE+cache ms/blk | VAE ms/blk | write ms/blk "
             f"| {mem_label} | DiT floor % | DiT+VAE floor % |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v in variants:
        for r in v["runs"]:
            split = r.get("split_ms_per_block") or {}
            lines.append("| " + " | ".join([
                v["variant"], f"{r['seconds']:g} s", str(r["blocks"]), _fmt(r["first_block_s"]),
                _fmt(r["dit_blocks_per_s"]), f"{_fmt(r['dit_video_fps'])} ({_fmt(r['dit_video_fps_best'])})",
                _fmt(r.get("dit_vae_video_fps")),
                _fmt(r.get("pipeline_video_fps")), _fmt(split.get("dit_forward")), _fmt(split.get("rope_cache")),
                _fmt(split.get("vae_decode")), _fmt(split.get("write_mp4_subtitles")),
                f"{r['memory']['peak_bytes'] / 2 ** 20:,.1f}" if r["memory"] else "—",
                f"{100 * r['floor_fraction']:.3g}",
                f"{100 * r['dit_vae_floor_fraction']:.3g}" if r.get("dit_vae_floor_fraction") else "—"]) + " |")
    lines.append("")
    if cuda:
        lines += [f"- `{v['variant']}` {r['seconds']:g} s against the real-time targets: {realtime_check(r)}"
                  for v in variants for r in v["runs"]]
    groups: dict = {}
    for v in variants:  # one floor line per distinct (FLOPs, matmul rate)
        groups.setdefault((v["flops"]["per_block_steady"], v["matmul"]["flops_per_s"]), []).append(v)
    for group in groups.values():
        v = group[0]
        fl, rate = v["flops"], v["matmul"]["flops_per_s"]
        steady_floor = fl["per_block_steady"] / rate
        frames = int(v["config"]["num_frame_per_block"]) * 4  # video frames per steady block (Wan: 4 per latent)
        counted = fl["per_forward_first_counted"]
        check = (f"; torch.utils.flop_counter on a first-block forward: {counted / 1e9:,.4g} GFLOP vs formula "
                 f"{fl['per_forward_first_formula'] / 1e9:,.4g}") if counted else ""
        names = ", ".join(f"`{x['variant']}`" for x in group)
        lines.append(f"- {names}: DiT {fl['per_block_steady'] / 1e12:.4g} TFLOP per steady block "
                     f"({v['geometry']['forwards_per_block']} forwards of {v['geometry']['q_tokens']} query tokens "
                     f"over {v['geometry']['kv_tokens_steady']} keys){check}; measured matmul "
                     f"{rate / 1e12:.4g} TFLOP/s ({v['matmul']['dtype']}, {v['matmul']['n']}³) → floor "
                     f"{1e3 * steady_floor:.4g} ms/block = {frames / steady_floor:,.1f} video fps ceiling"
                     + (f"; nominal {v['nominal_peak']['flops_per_s'] / 1e12:.0f} TFLOP/s "
                        f"({v['nominal_peak']['device']}) → {1e3 * fl['per_block_steady'] / v['nominal_peak']['flops_per_s']:.4g} ms/block"
                        if v["nominal_peak"] else ""))
        if fl.get("vae_per_block_steady"):
            both = (fl["per_block_steady"] + fl["vae_per_block_steady"]) / rate
            lines.append(f"  VAE decode {fl['vae_per_block_steady'] / 1e12:.4g} TFLOP per steady block "
                         f"(torch.utils.flop_counter, meta device) → DiT + VAE floor {1e3 * both:.4g} ms/block = "
                         f"{frames / both:,.1f} video fps ceiling at the measured rate")

    def switched_on(v):  # the speed switches as run (compile=auto resolved for the device)
        on = [k for k in SWITCHES if v["config"].get(k) is True]
        return f"`{v['variant']}` " + (", ".join(on) or "none")

    lines.append("- speed switches on: " + "; ".join(map(switched_on, variants)))
    ops = {v["variant"]: ", ".join(v["sdpa_ops"]) or "—" for v in variants}
    if len(set(ops.values())) == 1:
        lines.append(f"- SDPA kernel: {next(iter(ops.values()))}")
    else:
        lines.append("- SDPA kernels: " + "; ".join(f"`{k}` {o}" for k, o in ops.items()))
    for v in variants:  # one-time costs, apart from the steady numbers
        first = v["runs"][0] if v["runs"] else {}
        if "warmup_wall_s" in first:
            graphs = first.get("cuda_graphs")
            lines.append(f"- `{v['variant']}` one-time: models built in {v['build_s']:.3g} s; warm-up of "
                         f"{first['warmup_blocks']} blocks through the pipeline (kernels, compilation, graph "
                         f"capture, the VAE's cache, ffmpeg) {first['warmup_wall_s']:.3g} s"
                         + ("; CUDA graphs (forwards of the run, warm-up included): "
                            + ", ".join(f"{k} {n}" for k, n in sorted(graphs.items())) if graphs else "")
                         + (f"; inductor's FX graph cache ({v['compile_cache']['dir']}): "
                            f"{v['compile_cache']['hit']} graphs found, {v['compile_cache']['miss']} compiled"
                            if v.get("compile_cache") else ""))
    for v in variants:
        ops = v.get("ops_per_forward")
        if ops:
            lines.append(f"- `{v['variant']}` ATen ops per eager cached forward (views left out): {ops['ops']:,}, "
                         f"of which {ops['dtype_conversions']:,} dtype conversions")
    for v in variants:
        att = v.get("attention")
        if att:
            lines.append(f"- `{v['variant']}` attention alone (SDPA, {v['dtype']}): " + "; ".join(
                f"{name} {a['q_tokens']}×{a['kv_tokens']} tokens"
                f"{' in %d parts, one call, merged' % a['key_splits'] if a.get('key_splits', 1) > 1 else ''} {a['ms']:.3g} ms = "
                f"{a['flops_per_s'] / 1e12:.3g} TFLOP/s ({', '.join(a['kernel']) or '?'}"
                f"{': ' + a['gpu_kernel'] if a.get('gpu_kernel') else ''})" for name, a in att.items()))
    for v in variants:
        peaks = [r["memory"]["peak_bytes"] for r in v["runs"] if r["memory"]]
        if len(peaks) > 1:
            spread = max(peaks) / min(peaks) - 1
            lines.append(f"- `{v['variant']}` peak memory across lengths: {min(peaks) / 2 ** 20:,.1f}–"
                         f"{max(peaks) / 2 ** 20:,.1f} MiB, spread {100 * spread:.2f}% "
                         f"({'within' if spread <= 0.05 else 'NOT within'} 5%); {v['runs'][0]['memory']['method']}; "
                         f"KV cache {v['runs'][0]['cache_bytes'] / 2 ** 20:,.2f} MiB")
            default = [r["memory_default_allocator"]["peak_bytes"] for r in v["runs"] if r.get("memory_default_allocator")]
            if default:
                lines.append("  (the timing processes, glibc's default allocator: "
                             + ", ".join(f"{b / 2 ** 20:,.0f}" for b in default) + " MiB)")
    for v, stage, prof in ((v, stage, prof) for v in variants for stage, prof in (v.get("profile") or {}).items()):
        if prof:
            total = prof["ms_per_block"]
            lines.append(f"- `{v['variant']}` where a steady block's {'DiT' if stage == 'dit' else 'VAE decode'} "
                         f"time goes (torch.profiler, {prof['blocks']} "
                         f"blocks from block {prof['first_block']}; {prof['timed']}): {total:,.1f} ms in "
                         f"{prof['calls_per_block']:,.0f} calls per block, host wall "
                         f"{prof['wall_ms_per_block']:,.1f} ms (profiler on): "
                         + ", ".join(f"{k} {100 * ms / (total or 1):.0f} %"  # 0: no kernel seen
                                     for k, ms in prof["by_kind_ms_per_block"].items()))
            lines.append("  top: " + "; ".join(f"{t['name'][:70]} {t['ms_per_block']:.2f} ms "
                                               f"×{t['calls_per_block']:.0f}" for t in prof["top"][:5]))
            idle = prof.get("idle")
            if idle:
                lines.append(f"  GPU idle between kernels (profiler on): {idle['all_ms_per_block']:,.1f} ms per block, "
                             f"{idle['ms_per_block']:,.1f} of it in {idle['gaps_per_block']:,.1f} gaps of ≥ "
                             f"{idle['min_gap_us']:g} µs; longest: "
                             + ("; ".join(f"{g['ms']:.2f} ms after {g['after'][:50]}, before {g['before'][:50]}"
                                          for g in idle["longest"]) or "none"))
                lines.append(f"  idle by gap size, per block: {idle_split(idle) or 'no gaps'}")
    lines.append("")
    lines.append("Steady state = blocks after the attention window fills (all but the first). fps = video frames "
                 "per second (median of the repeats; best repeat in brackets); DiT = the rollout alone, DiT+VAE and "
                 "pipeline = with streaming decode, and with uint8 + subtitles + mp4 writing; ms/blk = the "
                 "pipeline's time split per steady block; floor % = FLOP floor at the measured matmul rate ÷ "
                 "measured time per block (DiT: the DiT-only rollout; DiT+VAE: the pipeline's DiT + decode time)."
                 + (" Variants measured interleaved in one process (no memory numbers)."
                    if any(v.get("interleaved") for v in variants) else ""))
    lines.append(f"Command: `{report['command']}`")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_path", default="configs/tiny.yaml")
    p.add_argument("--seconds", type=float, nargs="+", default=[10, 60, 240])
    p.add_argument("--variants", nargs="+", default=["default"],
                   help=f"named variants ({', '.join(VARIANTS)}), combined with '+'")
    p.add_argument("--repeats", type=int, default=3, help="DiT-only rollouts per length (median)")
    p.add_argument("--pipeline_repeats", type=int, default=1, help="full-pipeline rollouts per length (median)")
    p.add_argument("--warmup_blocks", type=int, default=4)
    p.add_argument("--skip_pipeline", action="store_true", help="DiT only: no VAE decode, no mp4")
    p.add_argument("--isolate", choices=("auto", "process", "none"), default="auto",
                   help="a fresh subprocess per (variant, length) (auto: on CPU, where peak RSS cannot be "
                        "reset otherwise; a GPU resets its peak stats in-process)")
    p.add_argument("--interleave", action="store_true",
                   help="one process, variants alternating round by round (DiT only; runtime-switch variants)")
    p.add_argument("--no_memory_pass", action="store_true",
                   help="CPU: skip the separate memory process per length (peak RSS then comes from the timing "
                        "process, with glibc's default allocator)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--out", default="benchmarks/out")
    p.add_argument("--tag", default=None, help="output file stem (default: <config>_<device>)")
    p.add_argument("--per_block", action="store_true", help="store every per-block time in the JSON")
    p.add_argument("--profile_blocks", type=int, default=0, metavar="N",
                   help="profile N steady DiT blocks per variant (torch.profiler): time by kind of kernel")
    p.add_argument("--keep_videos", action="store_true")
    p.add_argument("--render", default=None, metavar="JSON", help="print the table of a stored JSON report and exit")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_args(argv)


def _opts(args) -> dict:
    return {"config_path": args.config_path, "overrides": list(args.overrides), "repeats": args.repeats,
            "pipeline_repeats": args.pipeline_repeats, "warmup_blocks": args.warmup_blocks,
            "skip_pipeline": args.skip_pipeline, "threads": args.threads, "out": str(args.out),
            "per_block": args.per_block, "keep_videos": args.keep_videos, "profile_blocks": args.profile_blocks}


def measure_memory(spec: dict, seconds: float, opts: dict) -> dict:
    """Peak RSS of one DiT-only rollout and one full-pipeline rollout after a warm-up (CPU; run
    in a fresh process started with :data:`MEMORY_ENV`)."""
    cfg = load_bench_config(opts["config_path"], opts["overrides"] + spec["overrides"])
    if opts["threads"]:
        torch.set_num_threads(opts["threads"])
    with runtime_context(spec):
        bench = Bench(cfg, spec)
        plan = bench.gen.plan(bench_prompt(seconds))
        contexts = bench.gen.encode_texts(plan)
        workdir = Path(tempfile.mkdtemp(prefix="bench_mem_", dir=opts["out"]))
        try:
            bench.pipeline_pass(plan, contexts, workdir / "warmup.mp4", max_blocks=opts["warmup_blocks"], split=False,
                                desc="warm-up")
            bench.second_video(plan, contexts)
            memory = PeakMemory(bench.device, graphs=bool(bench.cfg.cuda_graphs))
            memory.reset()
            bench.dit_pass(plan, contexts, desc=f"memory DiT {seconds:g}s")
            dit = memory.read()
            memory.reset()
            if not opts["skip_pipeline"]:
                bench.pipeline_pass(plan, contexts, workdir / "run.mp4", split=False, desc=f"memory pipeline {seconds:g}s")
            pipe = memory.read() if not opts["skip_pipeline"] else None
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    method = (f"VmHWM (peak RSS) with {' '.join(f'{k}={v}' for k, v in MEMORY_ENV.items())}: glibc gives freed "
              f"tensors back at once, so the peak is live memory, not heap retention; fresh process per length, "
              f"peak reset after warm-up")
    peak = max((m for m in (dit, pipe) if m), key=lambda m: m["peak_bytes"])
    return dict(peak, method=method, dit_only=dit, pipeline=pipe, cache_bytes=bench.cache.memory_bytes())


# Environment of the CPU memory measurement: with glibc's default dynamic mmap threshold, freed
# activation buffers stay in the heap by chance of allocation order, and the peak RSS of two
# identical runs can differ by 100+ MB; a fixed threshold returns them at once. It slows large
# allocations (page faults), which is why the timing runs do not use it.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def worker(spec_path: str) -> int:
    job = json.loads(Path(spec_path).read_text())
    spec = parse_variant(job["variant"])
    if job.get("memory_only"):
        result = measure_memory(spec, job["seconds"][0], job["opts"])
    else:
        result = run_variant(spec, job["seconds"], job["opts"])
    Path(job["result"]).write_text(json.dumps(result))
    return 0


def run_worker(job: dict, env: dict | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        job = dict(job, result=str(Path(tmp) / "result.json"))
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(Path(tmp) / "job.json")],
                       check=True, cwd=os.getcwd(), env=dict(os.environ, **(env or {})))
        return json.loads((Path(tmp) / "result.json").read_text())


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipeline.plan").setLevel(logging.ERROR)  # segments snapping to blocks: expected here
    if args.worker:
        return worker(args.worker)
    if args.render:
        print(markdown(json.loads(Path(args.render).read_text())))
        return 0
    from utils.errors import UserError

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    opts = _opts(args)
    specs = [parse_variant(v) for v in args.variants]
    try:
        cfg = load_bench_config(args.config_path, opts["overrides"])
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    isolate = args.isolate == "process" or (args.isolate == "auto" and cfg.device == "cpu")
    results = []
    if args.interleave:
        opts["skip_pipeline"] = True
        results = run_interleaved(specs, list(args.seconds), opts)
        specs = []
    failed = []

    def write_report(final: bool) -> None:
        """The report of the variants measured so far (rewritten after each one: a run stopped
        by a time limit keeps what it finished)."""
        variants = merge_runs(results)
        device = variants[0]["device"]["type"]
        tag = args.tag or f"{Path(args.config_path).stem}_{device}"
        command = "python scripts/benchmark.py " + " ".join(
            [f"--config_path {args.config_path}", "--seconds " + " ".join(f"{s:g}" for s in args.seconds)]
            + (["--variants " + " ".join(args.variants)] if args.variants != ["fast"] else [])
            + [f"--repeats {args.repeats}", f"--pipeline_repeats {args.pipeline_repeats}",
               f"--warmup_blocks {args.warmup_blocks}"]
            + (["--skip_pipeline"] if args.skip_pipeline else []) + (["--interleave"] if args.interleave else [])
            + (["--no_memory_pass"] if args.no_memory_pass else [])
            + ([f"--threads {args.threads}"] if args.threads else [])
            + ([f"--profile_blocks {args.profile_blocks}"] if args.profile_blocks else [])
            + [f"--out {args.out}"] + ([f"--tag {args.tag}"] if args.tag else []) + list(args.overrides))
        report = {"config_path": args.config_path, "overrides": opts["overrides"], "command": command,
                  "video": f"{cfg.width}x{cfg.height} @ {cfg.fps:g} fps, {len(cfg.denoising_step_list)} steps, "
                           f"sink {cfg.sink_size} + window {cfg.local_attn_size}, blocks of {cfg.num_frame_per_block}",
                  "isolated_processes": isolate, "variants": variants, "failed_variants": failed}
        table = markdown(report)
        (out / f"{tag}.json").write_text(json.dumps(report, indent=1))
        (out / f"{tag}.md").write_text(table + "\n")
        if final:
            print(table)
            log.info("wrote %s and %s", out / f"{tag}.json", out / f"{tag}.md")

    for spec in specs:
        if not isolate:
            try:
                results.append(run_variant(spec, list(args.seconds), opts))
            except UserError as exc:
                print(f"error: variant {spec['name']}: {exc}", file=sys.stderr)
                return 2
            except Exception:  # noqa: BLE001 - one variant's failure must not lose the others' numbers
                log.exception("variant %s failed; going on with the others", spec["name"])
                failed.append(spec["name"])
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            write_report(final=False)
            continue
        for k, seconds in enumerate(args.seconds):  # the first length's process also profiles
            job = {"variant": spec["name"], "seconds": [seconds],
                   "opts": dict(opts, profile_blocks=opts["profile_blocks"] if k == 0 else 0)}
            log.info("subprocess: variant %s, %g s (timing)", spec["name"], seconds)
            result = run_worker(job)
            if cfg.device == "cpu" and not args.no_memory_pass:
                log.info("subprocess: variant %s, %g s (memory)", spec["name"], seconds)
                mem = run_worker(dict(job, memory_only=True), env=MEMORY_ENV)
                run = result["runs"][0]
                run["memory_default_allocator"] = run["memory"]
                run["memory"] = mem
            results.append(result)
            write_report(final=False)
    if not results:
        log.error("no variant finished: %s", ", ".join(failed))
        return 1
    write_report(final=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
