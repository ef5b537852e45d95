import os
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):  # one of `pytest -n N`'s workers (the README's command)
    # one thread per worker (and for the processes its tests start): the models here are tiny, and
    # two workers with two OpenMP threads each on a 2-core machine contend (10 minutes against 15)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"] or 1))

from model.wan import WanDiT  # noqa: E402

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
