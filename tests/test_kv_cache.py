"""The cached rollout is the causal model, proven against independent oracles:

* cached block-by-block forward == full-sequence block-causal forward (sink + window mask);
* block-relativistic positions == absolute positions until the window fills;
* the fast RoPE bookkeeping == a naive rotation of every raw key at its current position,
  at every step, through eviction, flush and cut; the positions themselves come from an
  independent model of the policies written here from their definitions;
* flush keeps exactly the sink + the last frames asked for; a cut shifts one block.
"""
import pytest
import torch

from model.rope import apply_rope

H, W = 4, 6          # latent grid → 2 x 3 tokens per frame with patch (1, 2, 2)
BLOCK, WINDOW, SINK = 3, 6, 1


def inputs(num_frames, seed=1, batch=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, num_frames, 4, H, W, generator=g)
    t = torch.rand(batch, num_frames, generator=g) * 1000
    ctx = torch.randn(batch, 8, 12, generator=g)
    return x, t, ctx


def cache_for(model, policy="absolute", naive=False, window=WINDOW, sink=SINK, cut_offset=42):
    return model.new_cache(batch_size=1, height=H, width=W, block_frames=BLOCK, local_attn_size=window,
                           sink_size=sink, policy=policy, cut_offset=cut_offset, naive_rope=naive)


@torch.no_grad()
def rollout(model, cache, x, t, ctx):
    outs = []
    for b in range(x.shape[1] // BLOCK):
        sl = slice(b * BLOCK, (b + 1) * BLOCK)
        outs.append(model(x[:, sl], t[:, sl], ctx, kv_cache=cache, commit=True))
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("window,sink", [(6, 0), (6, 1), (8, 1), (10, 4), (4, 1)],
                         ids=["ring3", "ring2", "ring4", "sink4-ring3", "no-ring"])
def test_cached_equals_block_causal_full_sequence(tiny_dit, window, sink):
    """Five blocks (15 frames) of blocks of 3: the window fills and then evicts; rings shorter and
    longer than a block (held frames shift), a sink that takes two blocks to fill, no ring."""
    x, t, ctx = inputs(15)
    with torch.no_grad():
        full = tiny_dit(x, t, ctx, num_frame_per_block=BLOCK, local_attn_size=window, sink_size=sink)
    cached = rollout(tiny_dit, cache_for(tiny_dit, "absolute", sink=sink, window=window), x, t, ctx)
    err = (cached - full).abs().max().item()
    assert err < 2e-5 * full.abs().max().item(), err
    # and the mask really is causal: changing a later block does not change earlier outputs
    x2 = x.clone()
    x2[:, 9:] += 1
    with torch.no_grad():
        full2 = tiny_dit(x2, t, ctx, num_frame_per_block=BLOCK, local_attn_size=window, sink_size=sink)
    assert torch.equal(full2[:, :9], full[:, :9]) and not torch.allclose(full2[:, 9:], full[:, 9:])


def test_unbounded_window_equals_plain_block_causal(tiny_dit):
    """A window as long as the video is plain block-causal attention (no sink, no eviction)."""
    x, t, ctx = inputs(9)
    with torch.no_grad():
        full = tiny_dit(x, t, ctx, num_frame_per_block=BLOCK)
    cached = rollout(tiny_dit, cache_for(tiny_dit, "absolute", window=9, sink=0), x, t, ctx)
    assert (cached - full).abs().max().item() < 2e-5 * full.abs().max().item()


def test_relativistic_equals_absolute_until_window_fills(tiny_dit):
    x, t, ctx = inputs(15)
    absolute = rollout(tiny_dit, cache_for(tiny_dit, "absolute"), x, t, ctx)
    relative = rollout(tiny_dit, cache_for(tiny_dit, "relativistic"), x, t, ctx)
    first_window = WINDOW // BLOCK * BLOCK
    assert torch.equal(relative[:, :first_window], absolute[:, :first_window])
    # after the window is full the positions differ, and so do the outputs
    assert not torch.allclose(relative[:, first_window:], absolute[:, first_window:])


# ------------------------------------------------------------------ independent policy model
class PolicyModel:
    """What the cache must hold and at which positions, written from the definitions only:
    sink = the first SINK frames; context = the most recent committed frames since the last flush
    (kept frames included), at most WINDOW - SINK - BLOCK; relativistic positions are the order
    of (sink, context, current); absolute positions are global indices; a cut adds the offset to
    the next block only."""

    def __init__(self, policy, cut_offset):
        self.policy, self.cut_offset = policy, cut_offset
        self.sink, self.context, self.next_frame, self.cut = [], [], 0, False

    def commit(self, n):
        for _ in range(n):
            if len(self.sink) < SINK:
                self.sink.append(self.next_frame)
            else:
                self.context.append(self.next_frame)
            self.next_frame += 1
        self.context = self.context[len(self.context) - (WINDOW - SINK - BLOCK):] if WINDOW - SINK - BLOCK else []
        self.cut = False

    def flush(self, keep):
        self.context = self.context[len(self.context) - keep:] if keep else []

    def held_positions(self):
        frames = self.sink + self.context
        if self.policy == "relativistic":
            return {g: i for i, g in enumerate(frames)}
        return {g: g for g in frames}

    def current_positions(self, n):
        start = len(self.sink) + len(self.context) if self.policy == "relativistic" else self.next_frame
        start += self.cut_offset if self.cut else 0
        return list(range(start, start + n))


@pytest.mark.parametrize("policy", ["absolute", "relativistic"])
def test_fast_rope_equals_naive_recompute_through_events(tiny_dit, policy):
    fast, naive = cache_for(tiny_dit, policy), cache_for(tiny_dit, policy, naive=True)
    oracle = PolicyModel(policy, cut_offset=42)
    # (event before the block, denoising steps) — covers fill, eviction, flush, cut, cut after cut
    script = [(None, 3), (None, 2), (None, 2), ("flush", 2), (None, 2), ("cut", 2), (None, 2),
              (None, 1), ("cut", 1), ("cut", 1), ("flush", 1), (None, 1), (None, 1)]
    x, t, ctx = inputs(len(script) * BLOCK * 4, seed=3)
    step, worst = 0, 0.0
    for event, steps in script:
        for cache in (fast, naive):
            if event in ("flush", "cut"):
                cache.flush(2)
            if event == "cut":
                cache.cut()
        if event in ("flush", "cut"):
            oracle.flush(2)
        oracle.cut = oracle.cut or event == "cut"
        # positions handed out == the independent model's
        held, current = fast.positions(BLOCK)
        want_held = oracle.held_positions()
        assert [want_held[fast.slot_frame[s]] for s in range(fast.num_frames)] == held
        assert current == oracle.current_positions(BLOCK)
        for i in range(steps + 1):  # denoising steps, then the clean pass that commits
            sl = slice(step * BLOCK, (step + 1) * BLOCK)
            step += 1
            commit = i == steps
            with torch.no_grad():
                a = tiny_dit(x[:, sl], t[:, sl], ctx, kv_cache=fast, commit=commit)
                b = tiny_dit(x[:, sl], t[:, sl], ctx, kv_cache=naive, commit=commit)
            # float32 rounding only: a turned key is rotated twice (at its old position, then
            # by the difference), the naive one once
            err = ((a - b).abs().max() / b.abs().max()).item()
            worst = max(worst, err)
            assert err < 2e-6, err
            if commit:
                oracle.commit(BLOCK)
                continue
            # every held key the fast path attended to (stored rotated only, turned by position
            # differences) equals the naive cache's raw copy of it rotated at its position now
            n = fast.num_frames * fast.frame_tokens
            if n:
                assert fast.slot_frame[:fast.num_frames] == naive.slot_frame[:naive.num_frames]
                for layer in range(tiny_dit.num_layers):
                    cos, sin = tiny_dit.rope.table(torch.tensor(held), *fast.grid)
                    want = apply_rope(naive.k_raw[layer, :, :n], cos, sin)
                    assert torch.allclose(fast.k_rot[layer, :, :n], want, atol=1e-5), (layer, held)


def test_flush_keeps_sink_and_last_frames(tiny_dit):
    cache = cache_for(tiny_dit, "relativistic", window=8)   # sink 1 + ring 4 + block 3
    x, t, ctx = inputs(12)
    rollout(tiny_dit, cache, x, t, ctx)                     # frames 0..11 seen
    assert cache.num_frames == 5 and cache.slot_frame[:5] == [0, 8, 9, 10, 11]  # sink, then the ring in order
    with torch.no_grad():
        tiny_dit(x[:, :3], t[:, :3], ctx, kv_cache=cache)   # fills the cross-attention cache
    by_frame = {cache.slot_frame[s]: cache.k_rot[:, :, cache._tokens(s)].clone() for s in range(5)}
    assert cache.has_text
    cache.flush(2)
    assert cache.slot_frame[:cache.num_frames] == [0, 10, 11]
    for s in range(cache.num_frames):
        assert torch.equal(cache.k_rot[:, :, cache._tokens(s)], by_frame[cache.slot_frame[s]])
    assert not cache.has_text, "a flush drops the cross-attention cache"
    held, current = cache.positions(BLOCK)
    assert held == [0, 1, 2] and current == [3, 4, 5]
    cache.flush(0)
    assert cache.slot_frame[:cache.num_frames] == [0]


def test_cut_shifts_exactly_one_block(tiny_dit):
    cache = cache_for(tiny_dit, "relativistic", cut_offset=42)
    x, t, ctx = inputs(9)
    rollout(tiny_dit, cache, x, t, ctx)
    cache.flush(2)
    cache.cut()
    assert cache.positions(BLOCK) == ([0, 1, 2], [45, 46, 47])   # the reference's 45, 46, 47
    with torch.no_grad():
        tiny_dit(x[:, :3], t[:, :3], ctx, kv_cache=cache, commit=True)
    held, current = cache.positions(BLOCK)   # held positions are in slot order (the ring wrapped)
    assert sorted(held) == [0, 1, 2] and current == [3, 4, 5]


def test_positions_bounded_for_any_length(tiny_dit):
    """Bookkeeping only (commit without a forward): relative positions never leave the window,
    absolute ones grow with the video."""
    rel, ab = cache_for(tiny_dit, "relativistic"), cache_for(tiny_dit, "absolute")
    for block in range(2000):
        for c in (rel, ab):
            if block % 37 == 5:
                c.flush(2)
            c.commit(BLOCK)
    held, current = rel.positions(BLOCK)
    assert max(held + current) == WINDOW - 1
    assert max(ab.positions(BLOCK)[1]) == 2000 * BLOCK + BLOCK - 1
    # fixed at allocation: the held frames (the window less the block), rotated keys and values
    # only (a layer's window is made while the layer runs and let go after it)
    assert rel.k_rot.shape[2] == (WINDOW - BLOCK) * rel.frame_tokens and rel.k_raw is None
    assert rel.memory_bytes() == 2 * rel.k_rot.numel() * rel.k_rot.element_size()


def test_clean_pass_writes_only_the_frames_that_stay(tiny_dit):
    """The cache holds sink + ring (the window less the block); each layer attends to its held
    frames then the block's. A denoising step leaves the held slots alone; a clean pass writes the
    frames that stay (first block: all three into sink + ring; then the block's last two into
    the ring, the sink untouched) and nothing else."""
    cache = cache_for(tiny_dit, "relativistic")
    tokens = cache.frame_tokens
    assert cache.k_rot.shape[2] == (WINDOW - BLOCK) * tokens
    x, t, ctx = inputs(6)
    assert cache._commit_plan(BLOCK)[2] == [(0, 0, 3)]
    with torch.no_grad():
        tiny_dit(x[:, :3], t[:, :3], ctx, kv_cache=cache, commit=True)
        assert cache.writes == () and cache.slot_frame == [0, 1, 2]
        assert cache._commit_plan(BLOCK)[2] == [(1, 4, 2)]  # window: sink, ring (2), block (3)
        before = cache.k_rot.clone(), cache.v.clone()
        tiny_dit(x[:, 3:], t[:, 3:], ctx, kv_cache=cache)  # a denoising step
        assert torch.equal(cache.k_rot, before[0]) and torch.equal(cache.v, before[1])
        tiny_dit(x[:, 3:], t[:, 3:], ctx, kv_cache=cache, commit=True)
    assert cache.slot_frame == [0, 4, 5]
    sink = slice(0, tokens)
    assert torch.equal(cache.k_rot[:, :, sink], before[0][:, :, sink]) and torch.equal(cache.v[:, :, sink],
                                                                                     before[1][:, :, sink])
    assert not torch.equal(cache.v[:, :, tokens:], before[1][:, :, tokens:])


def test_a_clean_pass_under_autograd_is_refused(tiny_dit):
    cache = cache_for(tiny_dit, "relativistic")
    x, t, ctx = inputs(3)
    with pytest.raises(ValueError, match="without autograd"):
        tiny_dit(x, t, ctx, kv_cache=cache, commit=True)
    assert cache.num_frames == 0


def test_each_layer_attends_to_its_own_window_let_go_after_it(tiny_dit, monkeypatch):
    """A layer attends to its held frames then the block's, one concatenation, kept only until the
    layer's block finished (a clean pass copies from it first): no window outlives its layer, so
    the cache's memory is the held slots alone."""
    from model.kv_cache import KVCache, LayerKV

    seen, made = [], []
    finish, layer = LayerKV.finish, KVCache.layer

    def recording_finish(self):
        seen.append((self.held, self.window[0].shape[1], self.window[1].shape[1]))
        finish(self)

    def recording_layer(self, i):
        made.append(out := layer(self, i))
        return out

    monkeypatch.setattr(LayerKV, "finish", recording_finish)
    monkeypatch.setattr(KVCache, "layer", recording_layer)
    cache = cache_for(tiny_dit, "relativistic")
    tokens, block = cache.frame_tokens, BLOCK * cache.frame_tokens
    x, t, ctx = inputs(6)
    with torch.no_grad():
        tiny_dit(x[:, :3], t[:, :3], ctx, kv_cache=cache, commit=True)
        tiny_dit(x[:, 3:], t[:, 3:], ctx, kv_cache=cache)
    layers_n = len(tiny_dit.blocks)
    assert seen == [(0, block, block)] * layers_n + [(3 * tokens, 3 * tokens + block, 3 * tokens + block)] * layers_n
    assert len(made) == 2 * layers_n and all(kv.window is None for kv in made)
