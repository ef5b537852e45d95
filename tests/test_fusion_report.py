"""scripts/fusion_report.py: inductor's GPU scheduler, run on the CPU, plans a compiled block's
kernels; the bytes its fused kernels move are the elementwise work a GPU pays for per block.

The traffic test needs triton (inductor's GPU code generator, which PyPI's CUDA builds of torch
bring and the CPU build does not): it runs on the GPU check and wherever triton is installed.
"""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from utils.config import load_config

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("fusion_report", REPO / "scripts" / "fusion_report.py")
fusion_report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fusion_report)


def test_without_triton_the_report_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "triton", None)  # what `import triton` meets without it
    with pytest.raises(SystemExit) as exit_:
        fusion_report.main(["--config_path", str(REPO / "configs" / "tiny.yaml")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and "pip install triton" in err
    assert len(err.strip().splitlines()) == 1


def test_a_compiled_block_moves_what_its_arithmetic_needs():
    """A steady bf16 denoising forward of one layer, in units of one block-sized bf16 activation
    A (tokens x width x 2 bytes): inductor's fused kernels move ~36 A (the norms, modulation and
    gates over the float32 residual stream, RoPE, the window's concatenation; 35 A before q, k, v
    were packed, when the v GEMM wrote the block's values into the window). Before the window
    was one concatenation, RoPE a sum of loaded tables and the GELU in the GEMM's epilogue they
    moved ~61 A (at full size 65 A against 31 A now: 889 against 430 MiB; ~39 A with the sign of
    the sines selected in the kernel). The GELU runs as the first FFN GEMM's epilogue, one extern
    kernel, and self-attention's q, k, v one GEMM: five GEMMs (q k v, o, the cross-attention's q
    and o, the FFN's second) besides it."""
    pytest.importorskip("triton")
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["dtype=bfloat16"])
    kernels, geometry = fusion_report.steady_block_kernels(cfg, "cuda" if torch.cuda.is_available() else "cpu")
    unit = geometry["tokens"] * cfg.model.dim * 2
    fused = sum(k["read"] + k["written"] for k in kernels if k["kind"] == "fused")
    externs = [op for k in kernels if k["kind"] == "extern" for op in k["ops"]]
    assert any("_addmm_activation" in op for op in externs), externs
    assert sum(op.endswith(".addmm") or op == "addmm" for op in externs) == 5, externs
    assert not any("gelu" in op or "tanh" in op for k in kernels if k["kind"] == "fused" for op in k["ops"])
    assert fused / unit < 38, fusion_report.report(kernels, geometry, True)
