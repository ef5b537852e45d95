"""3D RoPE: the split, the rotation against a complex-number oracle, and no position ceiling."""
import torch

from model.rope import Rope, apply_rope, rope_split


def test_split_of_wan_head():
    assert rope_split(128) == (44, 42, 42)
    assert rope_split(16) == (8, 4, 4)


def complex_oracle(x, t_pos, gh, gw, head_dim, theta=10000.0):
    """Wan's formulation: per part, freqs 1/θ^(2i/d_part); multiply consecutive pairs as complex
    numbers in float64."""
    parts = rope_split(head_dim)
    freqs = [1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d) for d in parts]
    rows = []
    for f in t_pos:
        for i in range(gh):
            for j in range(gw):
                rows.append(torch.cat([f * freqs[0], i * freqs[1], j * freqs[2]]))
    angles = torch.stack(rows)                                     # [L, d/2]
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * torch.polar(torch.ones_like(angles), angles)[None, :, None]).flatten(-2)


def test_rotation_matches_complex_oracle_at_large_positions():
    head_dim, gh, gw = 32, 3, 2
    rope = Rope(head_dim)
    pos = [0, 5, 1023, 1024, 50_000]   # beyond the reference's 1024-entry table
    x = torch.randn(2, len(pos) * gh * gw, 3, head_dim, dtype=torch.float64)
    cos, sin = rope.table(torch.tensor(pos), gh, gw)
    got = apply_rope(x.float(), cos, sin)
    want = complex_oracle(x, pos, gh, gw, head_dim)
    assert (got.double() - want).abs().max() < 5e-5
    # the runs form gives the same table
    cos2, sin2 = rope.table_for_runs([(0, 1), (5, 1), (1023, 2), (50_000, 1)], gh, gw, "cpu")
    assert torch.equal(cos, cos2) and torch.equal(sin, sin2)


def test_rotation_is_relative():
    """q·k after rotation depends only on the temporal distance: shifting every position by the
    same amount changes nothing (what makes re-indexing positions in a window legitimate)."""
    rope = Rope(16)
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 4, 1, 16)
    def score(p_q, p_k):
        cq, sq = rope.table(torch.tensor([p_q]), 2, 2)
        ck, sk = rope.table(torch.tensor([p_k]), 2, 2)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()
    assert torch.allclose(score(5, 2), score(45, 42), atol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 3), atol=1e-3)
