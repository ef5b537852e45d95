from pathlib import Path

import pytest
import torch

from model.wan import WanDiT

# A DiT small enough for CPU tests; head dim 16 splits into RoPE parts 8/4/4.
TINY_DIT = dict(dim=32, ffn_dim=64, freq_dim=16, in_dim=4, out_dim=4, num_heads=2, num_layers=2,
                text_len=8, text_dim=12, eps=1e-6)


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Non-trivial random weights everywhere (default inits leave norms at 1 and biases at 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture
def tiny_dit():
    return randomize(WanDiT(**TINY_DIT)).eval()


@pytest.fixture
def single_thread():
    """Tiny tensors gain nothing from threads; two OpenMP threads on a busy 2-core box can stall."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_process(monkeypatch):
    """A training world of one (gloo, in-memory store), run from the repository root. One thread:
    the tiny ops gain nothing from more, and two OpenMP threads on a loaded 2-core machine can
    stall for seconds."""
    from utils.distributed import cleanup, init_distributed

    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    yield info
    cleanup()
    torch.set_num_threads(threads)
