"""WanDiT is Wan2.1: same random weights as diffusers' WanTransformer3DModel, same output."""
import logging

import pytest
import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel

import model.wan as wan
from model.wan import WanDiT
from tests.conftest import TINY_DIT, randomize
from utils.checkpoint import diffusers_to_wan_state_dict

log = logging.getLogger(__name__)


def diffusers_twin(cfg):
    ref = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=cfg["num_heads"], attention_head_dim=cfg["dim"] // cfg["num_heads"],
        in_channels=cfg["in_dim"], out_channels=cfg["out_dim"], text_dim=cfg["text_dim"], freq_dim=cfg["freq_dim"],
        ffn_dim=cfg["ffn_dim"], num_layers=cfg["num_layers"], cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=cfg["eps"])
    return randomize(ref, seed=7, std=0.2).eval()


def compare(monkeypatch=None, frames=5, packed=False):
    # head dim 32: RoPE parts 12/10/10 exercise an uneven split
    cfg = dict(TINY_DIT, dim=64, num_heads=2, ffn_dim=96, num_layers=3)
    ref = diffusers_twin(cfg)
    ours = WanDiT(**cfg).eval()
    if packed:  # packed before the load: the load writes the packed weights through the views
        ours.pack_qkv()
    ours.load_state_dict(diffusers_to_wan_state_dict(ref.state_dict()), strict=True)
    g = torch.Generator().manual_seed(0)
    b, h, w = 2, 6, 8
    x = torch.randn(b, frames, cfg["in_dim"], h, w, generator=g)
    ctx = torch.randn(b, cfg["text_len"], cfg["text_dim"], generator=g)
    ctx[0, 5:] = 0  # a padded prompt, as the text encoder hands it over
    t = torch.tensor([[1000.0, 937.5, 833.3333, 625.0, 0.0], [3.0, 250.0, 500.0, 750.0, 999.0]])[:, :frames]
    with torch.no_grad():
        got = ours(x, t, ctx)
        tokens_per_frame = (h // 2) * (w // 2)
        want = ref(x.transpose(1, 2), t.repeat_interleave(tokens_per_frame, dim=1), ctx).sample.transpose(1, 2)
    assert got.shape == want.shape == (b, frames, cfg["out_dim"], h, w)
    return (got - want).abs().max().item(), want.abs().max().item()


def test_matches_diffusers_per_frame_timesteps():
    err, scale = compare()
    log.info("WanDiT vs diffusers: max abs err %.3g (output max %.3g)", err, scale)
    # Wan computes the sinusoidal time embedding in float64, diffusers in float32: at t≈1000
    # the float32 angles are off by ~1e-4 rad, which is the whole of this difference.
    assert err < 2e-5 * scale, err


def test_packed_qkv_matches_diffusers():
    """Self-attention's q, k, v as one GEMM (inference, ``WanDiT.pack_qkv``) against diffusers'
    three projections, as close as the separate ones."""
    err, scale = compare(packed=True)
    assert err < 2e-5 * scale, err


@pytest.mark.parametrize("splits,keys", [(2, 126), (3, 126), (7, 126), (126, 126), (2, 125)])
def test_split_key_attention_equals_one_kernel_over_all_keys(monkeypatch, splits, keys):
    """Attention with its keys in equal parts, stacked on the batch dimension and attended to in
    one kernel call, merged by their log-sum-exps (``attention_key_splits``), against SDPA over all
    the keys in float64: float32 rounding, for strided inputs as a block passes them (``[B, L, H,
    D]`` transposed), two batch entries, one key per part; keys that do not divide into equal
    parts take SDPA. bf16 in, bf16 out, as close as SDPA's own bf16."""
    calls = []
    real = wan.attention_with_lse
    monkeypatch.setattr(wan, "attention_with_lse", lambda q, k, v: calls.append((q.shape, k.shape)) or real(q, k, v))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 3, 16, generator=g).transpose(1, 2) for n in (37, keys, keys))
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    split = wan.split_key_attention(q, k, v, splits)
    assert split.dtype == torch.float32 and ((split.double() - exact).norm() / exact.norm()) < 1e-6
    parts = splits if keys % splits == 0 else None
    assert calls == ([((2 * parts, 3, 37, 16), (2 * parts, 3, keys // parts, 16))] if parts else [])
    half = [x.bfloat16() for x in (q, k, v)]
    split, plain = wan.split_key_attention(*half, splits), F.scaled_dot_product_attention(*half)
    assert split.dtype == torch.bfloat16
    assert (split.double() - exact).norm() < 2 * (plain.double() - exact).norm() + 1e-6


def test_split_keys_only_where_inference_runs_them(monkeypatch):
    """``key_splits`` reaches a block's self-attention without autograd and without a mask; with
    autograd (training) or a mask (the block-causal oracle), SDPA runs."""
    calls = []
    real = wan.split_key_attention
    monkeypatch.setattr(wan, "split_key_attention", lambda *a: calls.append(a[-1]) or real(*a))
    attn = wan.Attention(16, 2, qk_norm=True, eps=1e-6)
    attn.key_splits = 3
    q, k, v = (torch.randn(1, n, 2, 8) for n in (5, 9, 9))
    with torch.no_grad():
        split = attn.out(q, k, v)
        masked = attn.out(q, k, v, torch.ones(5, 9, dtype=torch.bool))
    plain = attn.out(q, k, v)  # autograd on
    assert calls == [3]
    torch.testing.assert_close(split, plain.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(masked, plain.detach(), rtol=1e-5, atol=1e-6)


def test_matches_diffusers_tightly_with_float32_time_embedding(monkeypatch):
    """With diffusers' float32 sinusoid, what is left is float32 rounding (~1e-7 relative)."""
    def sinusoid32(t, dim):
        half = dim // 2
        freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(half, dtype=torch.float32) / half)
        a = t.float()[:, None] * freqs[None]
        return torch.cat([a.cos(), a.sin()], dim=1)

    monkeypatch.setattr(wan, "sinusoidal_embedding", sinusoid32)
    err, scale = compare()
    log.info("WanDiT vs diffusers (float32 sinusoid): max abs err %.3g (output max %.3g)", err, scale)
    assert err < 2e-6 * scale, err


def test_block_causal_differs_from_bidirectional_and_first_block_matches(tiny_dit):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 6, 4, 4, 6, generator=g)
    t = torch.full((1, 6), 500.0)
    ctx = torch.randn(1, 8, 12, generator=g)
    with torch.no_grad():
        bi = tiny_dit(x, t, ctx)
        causal = tiny_dit(x, t, ctx, num_frame_per_block=3)
        first = tiny_dit(x[:, :3], t[:, :3], ctx)
    assert torch.allclose(causal[:, :3], first, atol=1e-5)
    assert not torch.allclose(causal[:, 3:], bi[:, 3:], atol=1e-3)


def test_bf16_runs_and_stays_close(tiny_dit):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 3, 4, 4, 6, generator=g)
    t = torch.full((1, 3), 937.5)
    ctx = torch.randn(1, 8, 12, generator=g)
    with torch.no_grad():
        ref = tiny_dit(x, t, ctx)
        out = tiny_dit.to(torch.bfloat16)(x, t, ctx)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_config_contract():
    """Wan's own config.json keys build the model; the 1.3B preset has Wan's parameter count."""
    with torch.device("meta"):
        m = WanDiT(**wan.WAN_1_3B, patch_size=[1, 2, 2], qk_norm=True, cross_attn_norm=True,
                   model_type="t2v", window_size=[-1, -1])
    n = sum(p.numel() for p in m.parameters())
    assert 1.40e9 < n < 1.43e9, n  # Wan2.1-T2V-1.3B: 1,418,996,800 parameters
    with pytest.raises(TypeError):
        WanDiT(**TINY_DIT, not_a_wan_key=1)


def test_a_window_without_blocks_is_an_error(tiny_dit):
    """A sink or window only means something for a block-causal forward: without
    num_frame_per_block it would silently run bidirectional attention."""
    x, t, ctx = torch.randn(1, 3, 4, 4, 6), torch.full((1, 3), 500.0), torch.randn(1, 8, 12)
    with pytest.raises(ValueError, match="num_frame_per_block"):
        tiny_dit(x, t, ctx, local_attn_size=2, sink_size=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_residual_stream_is_contiguous_float32_through_every_block(dtype):
    """Every norm reduces over the residual stream's innermost dim: it enters each block as one
    contiguous float32 [B, F, S, dim] tensor (the patch embedding's output, permuted, is
    dim-strided: kept that way, each norm of every block read across strides) and leaves it so."""
    dit = WanDiT(**dict(TINY_DIT, num_layers=2)).to(dtype).eval()
    seen = []
    hook = lambda module, args, out: seen.append((args[0], out))  # noqa: E731
    for block in dit.blocks:
        block.register_forward_hook(hook)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        dit(torch.randn(1, 3, 4, 4, 6, generator=g), torch.full((1, 3), 500.0), torch.randn(1, 8, 12, generator=g))
    assert len(seen) == 2
    for x in (t for pair in seen for t in pair):
        assert x.dtype == torch.float32 and x.is_contiguous() and x.shape[-1] == TINY_DIT["dim"], x.stride()


def test_fused_feed_forward_is_linear_gelu_linear():
    """The fused feed-forward (a GPU's inference path: bias and GELU in the first GEMM's epilogue)
    is the modules' linear → GELU → linear, shapes and bias included. On the CPU the op's GELU is
    the exact one (the CUDA test below checks the tanh epilogue), and by default the plain modules
    run, bit for bit."""
    from model.wan import WanBlock, feed_forward

    ffn = randomize(WanBlock(16, 40, 2, True, True, 1e-6), seed=3, std=0.3).ffn
    h = torch.randn(2, 3, 5, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fused = feed_forward(ffn, h, fused=True)
        exact = ffn[2](torch.nn.functional.gelu(ffn[0](h)))
        assert fused.shape == (2, 3, 5, 16)
        torch.testing.assert_close(fused, exact, rtol=1e-5, atol=1e-6)
        assert torch.equal(feed_forward(ffn, h), ffn(h))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_cuda_fused_feed_forward_is_as_close_to_float32_as_the_modules(compiled):
    """Wan's widths, a block of 480x832 tokens, bf16 on the GPU: the GELU epilogue (the default
    there, eager and inside an inductor graph) is no further from the float32 feed-forward than
    the modules run in bf16 (it rounds once where they round twice), and within 2e-2 of them."""
    from model.vae_config import compression_factors, config_of
    from model.wan import WAN_1_3B, WanBlock, feed_forward

    dim, heads = WAN_1_3B["dim"], WAN_1_3B["num_heads"]
    ffn = randomize(WanBlock(dim, WAN_1_3B["ffn_dim"], heads, True, True, 1e-6), seed=3, std=0.02).ffn.cuda()
    spatial, _ = compression_factors(config_of(None, None))  # Wan2.1's VAE; patches of 2x2 latents
    tokens = (480 // spatial // 2) * (832 // spatial // 2)
    h = torch.randn(1, 3, tokens, dim, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        want = ffn(h)
        ffn16 = ffn.to(torch.bfloat16)
        run = torch.compile(feed_forward) if compiled else feed_forward
        fused, plain = run(ffn16, h.bfloat16()).float(), ffn16(h.bfloat16()).float()
    torch._dynamo.reset()
    err = lambda a: ((a - want).norm() / want.norm()).item()  # noqa: E731
    assert err(fused) <= 1.05 * err(plain), (err(fused), err(plain))
    assert ((fused - plain).norm() / plain.norm()).item() < 2e-2


# ------------------------------------------------------------------------- packed q, k, v
def packed_twin(dit: WanDiT) -> WanDiT:
    twin = WanDiT(**TINY_DIT).eval()
    twin.load_state_dict(dit.state_dict())
    twin.pack_qkv()
    return twin


def test_packed_qkv_rollout_equals_the_three_projections(tiny_dit):
    """A cached rollout (window eviction, a KV Flush, a RoPE Cut) with q, k, v projected by one
    GEMM equals the one with three, in float32 to 1e-5 relative."""
    from pipeline.rollout import BlockSpec, RolloutSettings, rollout

    settings = RolloutSettings(block_frames=2, local_attn_size=6, sink_size=1, flush_keep=1, policy="relativistic",
                               cut_offset=4, denoising_steps=(1000, 750, 500, 250), warp=True, shift=5.0,
                               num_train_timestep=1000, context_noise=0.0)
    g = torch.Generator().manual_seed(3)
    texts = [torch.randn(1, 8, 12, generator=g) for _ in range(2)]
    events = ["start", None, None, "flush", None, "cut", None]

    def latents(dit):
        specs = (BlockSpec(e, texts[i >= 3]) for i, e in enumerate(events))
        return torch.cat([x for _, x in rollout(dit, settings.new_cache(dit, 1, (4, 6)), settings, specs,
                                                latent_shape=(4, 4, 6), generator=torch.Generator().manual_seed(0))],
                         dim=1)

    packed = packed_twin(tiny_dit)
    assert all(b.self_attn.qkv_weight is not None for b in packed.blocks)
    want, got = latents(tiny_dit), latents(packed)
    assert got.shape == (1, 2 * len(events), 4, 4, 6)
    assert ((got - want).norm() / want.norm()).item() < 1e-5


def test_packed_qkv_adds_no_memory_keeps_the_state_dict_and_follows_moves_and_loads(tiny_dit):
    """The packed weights are the parameters' storage (no copy), outside the state dict; a cast,
    a load in place and a load that assigns new tensors all leave the packed GEMM computing what
    the three projections compute."""
    packed = packed_twin(tiny_dit)
    storages = lambda m: {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()  # noqa: E731
                          for t in [*m.parameters(), *m.buffers()]}
    assert sum(storages(packed).values()) == sum(storages(tiny_dit).values())
    assert list(packed.state_dict()) == list(tiny_dit.state_dict())
    attn = packed.blocks[0].self_attn
    dim = attn.q.out_features
    x = torch.randn(2, 5, dim)

    def same_as_three():
        with torch.no_grad():
            one = attn.project_qkv(x.to(attn.q.weight.dtype))
            three = (attn.project_q(x.to(attn.q.weight.dtype)), *attn.project_kv(x.to(attn.q.weight.dtype)))
        return all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(one, three))

    assert same_as_three()
    packed.double()
    assert attn.qkv_weight.dtype == torch.float64 and same_as_three()
    assert sum(storages(packed).values()) == 2 * sum(storages(tiny_dit).values())  # the old copies went
    packed.float()
    new = {k: torch.randn_like(v) for k, v in tiny_dit.state_dict().items()}
    packed.load_state_dict(new)  # copied into the views
    assert torch.equal(attn.qkv_weight[dim:2 * dim], new["blocks.0.self_attn.k.weight"]) and same_as_three()
    packed.load_state_dict({k: 2 * v for k, v in new.items()}, assign=True)  # new tensors: packed again
    assert torch.equal(attn.qkv_bias[2 * dim:], 2 * new["blocks.0.self_attn.v.bias"]) and same_as_three()
    packed.pack_qkv(False)
    assert attn.qkv_weight is None and list(packed.state_dict()) == list(tiny_dit.state_dict())


def test_packed_qkv_trains_the_three_parameters(tiny_dit):
    """With autograd on, self-attention takes the three modules: the gradients reach q, k, v's
    parameters, the same as without packing."""
    packed = packed_twin(tiny_dit)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(1, 3, 4, 4, 6, generator=g), torch.randn(1, 8, 12, generator=g)
    t = torch.full((1, 3), 500.0)
    for model in (tiny_dit, packed):
        model(x, t, ctx, num_frame_per_block=3).square().mean().backward()
    for name in ("q", "k", "v"):
        for p in ("weight", "bias"):
            got = getattr(getattr(packed.blocks[1].self_attn, name), p).grad
            want = getattr(getattr(tiny_dit.blocks[1].self_attn, name), p).grad
            assert got is not None and torch.allclose(got, want, rtol=1e-5, atol=1e-7), (name, p)
