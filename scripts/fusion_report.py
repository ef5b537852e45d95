#!/usr/bin/env python
"""What a compiled DiT block moves through memory on a GPU, read off inductor on any machine.

    pip install triton            # the compiler's GPU code generator (not needed to run the project)
    python scripts/fusion_report.py [--config_path configs/infinity_rope.yaml] [--kernels]

``torch.compile`` turns a transformer block into extern kernels (GEMMs, attention: cuBLAS and
cuDNN) and inductor's own fused elementwise kernels (norms, modulation, gates, residual adds,
RoPE, the window's concatenation). On a GPU the fused kernels are bound by memory traffic, so
their bytes are their time. This script runs inductor's GPU scheduler on the CPU (inductor's
``cpu_backend="triton"``: the same lowering and fusion decisions as for CUDA), stops it before it
writes code, and reports, per kernel and in total, the bytes each reads and writes as inductor
itself counts them (``get_read_write_buffer_accesses``: every buffer once, a slice by its size).

The block is the config's own (width, heads, FFN, in the config's dtype) at the config's
height and width, one layer of it, in a steady denoising forward: the cache holds a full window
(bookkeeping only, no forward is computed), the block compiled as ``pipeline/generate.py``
compiles it. One layer's forward times the layers times the forwards per block (denoising steps
plus the clean pass) is a block's traffic; at a GPU's memory bandwidth that is a floor for the
fused kernels' time per block. About 15 s on a CPU (inductor plans; nothing is compiled or
run). Layers are all alike, so one stands for all.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from pipeline.generate import resolve_device  # noqa: E402
from utils.config import load_config, torch_dtype  # noqa: E402
from utils.errors import UserError, user_errors_exit  # noqa: E402

MIB = 2 ** 20


class _Scheduled(Exception):
    """Raised from the scheduler once it has planned the kernels: nothing is generated or run."""


def scheduled_kernels(fn, *args) -> list[dict]:
    """The kernels inductor's GPU scheduler plans for ``fn(*args)`` (a compiled module call): kind
    ("fused" for inductor's own, "extern" for library calls), the ops in it, bytes read and written."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._inductor import ir
    from torch._inductor import scheduler as sched

    planned: list[dict] = []

    def record(self):
        for node in self.nodes:
            if isinstance(node, sched.NopKernelSchedulerNode) or isinstance(node.node, ir.MultiOutput):
                continue  # views, and the unpacking of an extern kernel's outputs
            reads = node.get_read_write_buffer_accesses(include_reads=True, include_writes=False)
            writes = node.get_read_write_buffer_accesses(include_reads=False, include_writes=True)
            extern = isinstance(node, sched.ExternKernelSchedulerNode)
            if extern:  # the library call itself
                ops = [str(getattr(node.node, "python_kernel_name", None) or type(node.node).__name__)]
            else:  # the graph's ops fused into the kernel
                ops = sorted({str(o.target).replace("aten.", "").replace(".default", "")
                              for n in node.get_nodes() if getattr(n, "node", None) is not None
                              for o in getattr(n.node, "origins", ()) if o.op == "call_function"})
            planned.append({"kind": "extern" if extern else "fused", "name": node.get_name(), "ops": ops,
                            "read": sum(reads.values()), "written": sum(writes.values())})
        raise _Scheduled

    codegen = sched.Scheduler.codegen
    sched.Scheduler.codegen = record
    try:  # no cache: a graph compiled before (same shapes, same code) would skip the scheduler
        with inductor_config.patch(cpu_backend="triton", fx_graph_cache=False), \
                functorch_config.patch(enable_autograd_cache=False):
            fn(*args)
    except Exception as e:  # inductor wraps what the scheduler raised
        if not any(isinstance(x, _Scheduled) for x in _chain(e)):
            raise
    else:
        raise RuntimeError("inductor's scheduler never ran: nothing was compiled")
    finally:
        sched.Scheduler.codegen = codegen
    return planned


def _chain(e: BaseException):
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def steady_block_kernels(cfg, device: str = "cpu") -> tuple[list[dict], dict]:
    """One layer of the config's DiT, compiled, in a steady denoising forward at the config's size,
    its tensors on ``device`` (on a CPU inductor is asked for its GPU backend)."""
    from omegaconf import OmegaConf

    from model.vae_config import compression_factors, run_config
    import model.wan as wan
    from pipeline.rollout import RolloutSettings

    settings = RolloutSettings.from_config(cfg)
    spatial, _ = compression_factors(run_config(cfg))
    latent_hw = (int(cfg.height) // spatial, int(cfg.width) // spatial)
    dims = dict(OmegaConf.to_container(cfg.model, resolve=True), num_layers=1)
    dtype = torch_dtype(cfg.dtype)
    torch.manual_seed(0)
    dit = wan.WanDiT(**dims).to(device, dtype).eval()
    dit.pack_qkv()  # as build_models: self-attention's q, k, v in one GEMM
    dit.split_attention_keys(cfg.attention_key_splits)  # and its keys in as many kernels as the config says
    cache = settings.new_cache(dit, 1, latent_hw)
    for _ in range(settings.first_steady_block + 1):  # the window full: the steady layout
        cache.commit(settings.block_frames)
    x = torch.randn(1, settings.block_frames, dit.in_dim, *latent_hw, dtype=dtype, device=device)
    t = torch.full((1, settings.block_frames), float(settings.denoising_steps[0]), device=device)
    context = torch.randn(1, dit.text_len, dit.text_embedding[0].in_features, dtype=dtype, device=device)
    feed_forward = wan.feed_forward
    # the feed-forward as a GPU runs it (GELU in the GEMM's epilogue: one extern kernel), on any device
    wan.feed_forward = lambda ffn, h: feed_forward(ffn, h, fused=True)
    try:
        with torch.no_grad():
            dit.blocks[0].compile()
            torch._dynamo.reset()
            kernels = scheduled_kernels(lambda: dit(x, t, context, kv_cache=cache))
    finally:
        wan.feed_forward = feed_forward
    geometry = {"tokens": settings.block_frames * cache.frame_tokens, "held": cache.num_frames * cache.frame_tokens,
                "layers": int(cfg.model.num_layers), "forwards": len(settings.denoising_steps) + 1,
                "dtype": str(dtype).replace("torch.", ""), "latent_hw": latent_hw}
    return kernels, geometry


def report(kernels: list[dict], geometry: dict, show_kernels: bool) -> str:
    fused = [k for k in kernels if k["kind"] == "fused"]
    extern = [k for k in kernels if k["kind"] == "extern"]
    moved = lambda ks: sum(k["read"] + k["written"] for k in ks)  # noqa: E731
    per_block = geometry["layers"] * geometry["forwards"]
    lines = [f"one steady denoising forward of one layer: {geometry['tokens']} block tokens attending to "
             f"{geometry['held']} held ones, latents {geometry['latent_hw'][0]}x{geometry['latent_hw'][1]}, "
             f"{geometry['dtype']}",
             "",
             "| kernels | count | MiB per layer-forward | GB per block |",
             "|---|---:|---:|---:|"]
    for label, ks in (("inductor's fused (elementwise, norms, RoPE, concatenations)", fused),
                      ("extern (GEMMs, attention)", extern)):
        lines.append(f"| {label} | {len(ks)} | {moved(ks) / MIB:.1f} | {moved(ks) * per_block / 1e9:.1f} |")
    lines.append(f"\na block: {geometry['layers']} layers x {geometry['forwards']} forwards (denoising steps and "
                 "the clean pass); GB per block / bandwidth in TB/s = ms per block")
    if show_kernels:
        lines += ["", "| kernel | kind | MiB read | MiB written | ops |", "|---|---|---:|---:|---|"]
        lines += [f"| {k['name']} | {k['kind']} | {k['read'] / MIB:.1f} | {k['written'] / MIB:.1f} | "
                  f"{', '.join(k['ops'])} |" for k in kernels]
    return "\n".join(lines)


@user_errors_exit
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config_path", default=str(REPO / "configs" / "infinity_rope.yaml"))
    p.add_argument("--kernels", action="store_true", help="list every kernel with its bytes and ops")
    p.add_argument("--device", default="cpu", help="where the layer's tensors live: cpu (inductor's GPU "
                                                   "scheduler, no GPU needed) or cuda (nothing is run either way)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = p.parse_args(argv)
    cfg = load_config(args.config_path, args.overrides)
    try:
        import triton  # noqa: F401
    except ImportError:
        raise UserError("inductor's GPU scheduler needs triton: `pip install triton` (no GPU needed)") from None
    kernels, geometry = steady_block_kernels(cfg, str(resolve_device(args.device)))
    print(report(kernels, geometry, args.kernels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
