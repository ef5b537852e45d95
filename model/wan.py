"""WanDiT: the Wan2.1 text-to-video DiT, with Wan's own parameter names, per-frame timesteps,
and three ways to run attention:

* full sequence, bidirectional (the base Wan2.1 model, the DMD real/fake scores);
* full sequence, block-causal: a frame attends to every frame of its own and earlier blocks
  (optionally restricted to sink + a local window), the oracle for the cached path;
* one block at a time over a :class:`~model.kv_cache.KVCache`, the causal rollout.

Shapes: latents ``x`` ``[B, F, C, H, W]``, timesteps ``t`` ``[B, F]`` (one per latent frame),
text ``context`` ``[B, L, text_dim]``; the output is the flow prediction ``noise - x0``,
``[B, F, C_out, H, W]``.

Numerics follow Wan: the residual stream, the time embedding, the modulation and the norms run
in float32; the linear layers and attention in the parameters' dtype (bf16 on GPU).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from model.cuda_graphs import CachedForwardGraphs
from model.kv_cache import KVCache, LayerKV
from model.rope import Rope, rotate

WAN_1_3B = dict(dim=1536, ffn_dim=8960, freq_dim=256, in_dim=16, out_dim=16, num_heads=12,
                num_layers=30, text_len=512, text_dim=4096, eps=1e-6)


def sinusoidal_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """[N] float timesteps → [N, dim] (cos half, then sin half), computed in float64 as Wan does."""
    half = dim // 2
    t = timesteps.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, device=t.device, dtype=torch.float64) / half)
    angles = t[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def linear32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A linear layer evaluated in float32 whatever its parameter dtype (embeddings, modulation)."""
    bias = layer.bias.float() if layer.bias is not None else None
    return F.linear(x.float(), layer.weight.float(), bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalised in float32 whatever x's dtype (one fused kernel on a GPU), scaled by the weight
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 (Wan's WanLayerNorm); returns float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA over ``[B, H, L, D]`` and its log-sum-exp ``[B, H, Lq, 1]`` (float32, natural log):
    cuDNN's flash kernel on a GPU (SDPA's choice on a Hopper), the flash kernel on a CPU."""
    if q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
    return out, lse.reshape(*q.shape[:3], 1)


def split_key_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, splits: int) -> torch.Tensor:
    """SDPA over ``[B, H, L, D]`` with the keys in ``splits`` equal contiguous parts attended to
    in **one** kernel call, merged by their log-sum-exps: softmax(s) v = sum_i w_i softmax(s_i) v_i
    with w = softmax_i(lse_i), in float32 (elementwise: one fused kernel compiled, which writes the
    result in the output projection's ``[B, L, H, D]`` layout), in q's dtype.

    The parts are stacked on the batch dimension, ``[B * splits, H, L / splits, D]`` (a view of a
    contiguous window: no copy), and the queries repeated for each (one copy of q). A flash
    kernel's grid is batch x heads x query tiles: when that is a few waves and a fraction over a
    GPU's SMs (the 1.3B model's 12 heads x 37 tiles of 128 queries are 3.4 waves of an H200's 132),
    the last wave leaves most SMs idle; one call over ``splits`` times the tiles, each over
    1/``splits`` of the keys, runs in fuller waves (6.7 of 7 for two parts), for the merge's
    cost. (Consecutive calls, one per part, would each have the same partial last wave.) Keys
    that do not divide into equal parts take one SDPA call over all of them. Whether the split
    pays is the GPU's to say (docs/PERFORMANCE.md §25-§26)."""
    b, h, lq, d = q.shape
    if k.shape[2] % splits:
        return F.scaled_dot_product_attention(q, k, v)
    stacked = lambda x: x.transpose(1, 2).reshape(b * splits, -1, h, d).transpose(1, 2)  # noqa: E731
    queries = torch.cat([q.transpose(1, 2).unsqueeze(1)] * splits, dim=1).flatten(0, 1)
    out, lse = attention_with_lse(queries.transpose(1, 2), stacked(k), stacked(v))  # [B * splits, H, Lq, ...]
    weights = torch.softmax(lse.unflatten(0, (b, splits)), dim=1)  # [B, splits, H, Lq, 1], float32
    merged = (out.unflatten(0, (b, splits)).transpose(2, 3) * weights.transpose(2, 3)).sum(1)  # [B, Lq, H, D]
    return merged.to(q.dtype).transpose(1, 2)


class Attention(nn.Module):
    """Wan attention projections (``q k v o`` + RMSNorm over the full width before the head split).

    :meth:`pack_qkv` (inference) stores ``q k v``'s weights and biases in one tensor each, the
    three parameters views into it, so that self-attention projects its input with one GEMM
    (:meth:`project_qkv`) instead of three: the input read once, two launches fewer, and a GEMM
    three times as wide, which fills a large GPU's SMs in fuller waves. The parameters keep
    Wan's names and values (``state_dict`` is unchanged) and no memory is added."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.key_splits = 1  # > 1: attention's keys in that many parts, one call (split_key_attention; inference)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        # pack_qkv(): q, k, v's weights and biases as one tensor each (buffers outside the state dict)
        self.register_buffer("qkv_weight", None, persistent=False)
        self.register_buffer("qkv_bias", None, persistent=False)
        # a load with assign=True puts new tensors in the parameters: pack those (after the children loaded)
        self.register_load_state_dict_post_hook(Attention._after_load)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim))

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.norm_k(self.k(x))), self.heads(self.v(x))

    def project_q(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(self.norm_q(self.q(x)))

    def out(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None):
        """q, k, v ``[B, L, H, D]`` → ``[B, Lq, dim]`` through SDPA and the output projection
        (with :attr:`key_splits` > 1, unmasked and without autograd: :func:`split_key_attention`)."""
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.key_splits > 1 and mask is None and not torch.is_grad_enabled():
            y = split_key_attention(q, k, v, self.key_splits)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(y.transpose(1, 2).flatten(2))

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``q, k, v`` of ``x``, each ``[..., H, D]``: one GEMM when packed and autograd is off
        (training's gradients reach the three parameters through their own modules)."""
        if self.qkv_weight is None or torch.is_grad_enabled():
            return self.project_q(x), *self.project_kv(x)
        q, k, v = F.linear(x, self.qkv_weight, self.qkv_bias).chunk(3, dim=-1)
        return self.heads(self.norm_q(q)), self.heads(self.norm_k(k)), self.heads(v)

    def pack_qkv(self) -> None:
        """Put ``q k v``'s weights (and biases) in one ``[3 * dim, dim]`` tensor (``[3 * dim]``),
        rows in that order, and make the three parameters views into it. The packed tensors are
        buffers outside the state dict: they move with the module, and loading into the
        parameters (or an in-place update) writes them. For inference (``build_models``):
        training, whose FSDP puts sharded tensors in the parameters, keeps them separate."""
        linears = (self.q, self.k, self.v)
        rows = self.q.out_features
        for name in ("weight", "bias"):
            with torch.no_grad():
                whole = torch.cat([getattr(m, name) for m in linears])
            setattr(self, f"qkv_{name}", whole)
            for i, m in enumerate(linears):
                old = getattr(m, name)
                setattr(m, name, nn.Parameter(whole[i * rows:(i + 1) * rows], requires_grad=old.requires_grad))

    def unpack_qkv(self) -> None:
        """Three separate parameters again (what :meth:`pack_qkv` undoes)."""
        if self.qkv_weight is None:
            return
        for m in (self.q, self.k, self.v):
            for name in ("weight", "bias"):
                old = getattr(m, name)
                setattr(m, name, nn.Parameter(old.detach().clone(), requires_grad=old.requires_grad))
        self.qkv_weight = self.qkv_bias = None

    def _packed_intact(self) -> bool:
        """Whether each of ``q k v``'s parameters is still a view at its place in the packed tensors."""
        rows = self.q.out_features
        return all(p.device == whole.device and p.dtype == whole.dtype and p.data_ptr() == whole[i * rows].data_ptr()
                   for name, whole in (("weight", self.qkv_weight), ("bias", self.qkv_bias))
                   for i, p in enumerate(getattr(m, name) for m in (self.q, self.k, self.v)))

    def _repack(self) -> None:
        if self.qkv_weight is not None and not self._packed_intact():
            self.pack_qkv()

    @staticmethod
    def _after_load(module: "Attention", incompatible_keys) -> None:
        module._repack()

    def _apply(self, fn, recurse=True):
        # .to() / .half() give each parameter (and the packed buffers) a tensor of its own: pack
        # the parameters again, so that the two cannot drift apart and no weight is held twice
        out = super()._apply(fn, recurse)
        self._repack()
        return out


def feed_forward(ffn: nn.Sequential, h: torch.Tensor, fused: bool | None = None) -> torch.Tensor:
    """Wan's feed-forward ``Linear → GELU(tanh) → Linear`` over ``h`` ``[..., dim]``.

    ``fused`` (default: on a CUDA device without autograd) computes the first linear layer and
    its GELU as one GEMM whose epilogue adds the bias and applies the GELU
    (``torch._addmm_activation``: cuBLASLt's GELU epilogue, the tanh approximation Wan uses, on
    the float32 accumulator): the hidden activation, ``ffn_dim / dim`` times the block's width,
    is written once instead of written, read and written again by a GELU pass (160 MiB per layer
    and forward at 480x832, docs/PERFORMANCE.md §23). Inductor keeps the op as one extern kernel.
    Autograd (training) takes the plain modules. Off CUDA the op's GELU is the exact one, so
    ``fused`` is only for a test of its plumbing there."""
    up, _, down = ffn  # the GELU module between them: Wan's tanh form, which the epilogue computes
    if fused is None:
        fused = h.is_cuda and not torch.is_grad_enabled() and up.bias is not None
    if not fused:
        return ffn(h)
    hidden = torch._addmm_activation(up.bias, h.reshape(-1, h.shape[-1]), up.weight.t(), use_gelu=True)
    return down(hidden.view(*h.shape[:-1], -1))


class WanBlock(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, num_heads: int, qk_norm: bool, cross_attn_norm: bool, eps: float):
        super().__init__()
        self.norm1 = LayerNorm32(dim, eps, elementwise_affine=False)
        self.self_attn = Attention(dim, num_heads, qk_norm, eps)
        self.norm3 = LayerNorm32(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.cross_attn = Attention(dim, num_heads, qk_norm, eps)
        self.norm2 = LayerNorm32(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)

    def forward(self, x, e, context, rope_cur, mask=None, kv: LayerKV | None = None):
        """x ``[B, F, S, dim]`` float32 residual stream; e ``[B, F, 6, dim]`` float32 modulation;
        ``kv``: this layer's part of the KV cache in a cached forward."""
        dtype = self.self_attn.q.weight.dtype
        # Mixed-dtype elementwise ops (float32 with the weights' dtype) promote to float32 inside
        # one kernel: Wan's float32 arithmetic without a separate conversion pass per operand.
        shift, scale, gate, c_shift, c_scale, c_gate = (e + self.modulation[:, None]).unbind(2)
        shift, scale, gate, c_shift, c_scale, c_gate = (m[:, :, None]
                                                        for m in (shift, scale, gate, c_shift, c_scale, c_gate))
        b, f, s, d = x.shape

        # self-attention (rotated by explicit positions; over the cache when there is one)
        h = torch.addcmul(shift, self.norm1(x), 1 + scale).to(dtype).flatten(1, 2)
        q, k, v = self.self_attn.project_qkv(h)
        q = rotate(q, rope_cur)
        k_rot = rotate(k, rope_cur)
        if kv is not None:
            k_rot, v = kv.attend(k, k_rot, v)
        y = self.self_attn.out(q, k_rot, v, mask)
        x = torch.addcmul(x, y.view(b, f, s, d), gate)

        # cross-attention to the text (keys/values computed once per prompt during a rollout)
        h = self.norm3(x).to(dtype).flatten(1, 2)
        q = self.cross_attn.project_q(h)
        make = lambda: self.cross_attn.project_kv(context())  # noqa: E731
        ck, cv = kv.cross(make) if kv is not None else make()
        x = x + self.cross_attn.out(q, ck, cv).view(b, f, s, d)

        # feed-forward
        h = torch.addcmul(c_shift, self.norm2(x), 1 + c_scale).to(dtype)
        x = torch.addcmul(x, feed_forward(self.ffn, h), c_gate)
        return x


class _LazyText:
    """The text embedding of a context, computed on first use (cached rollouts rarely need it)."""

    def __init__(self, model: "WanDiT", context: torch.Tensor):
        self.model, self.raw, self.value = model, context, None

    def __call__(self) -> torch.Tensor:
        if self.value is None:
            m = self.model
            self.value = m.text_embedding(self.raw.to(m.text_embedding[0].weight.dtype))
        return self.value


def _no_text():
    raise RuntimeError("a CUDA-graphed forward found a layer without the prompt's text keys/values in the cache")


class Head(nn.Module):
    def __init__(self, dim: int, out_features: int, eps: float):
        super().__init__()
        self.norm = LayerNorm32(dim, eps, elementwise_affine=False)
        self.head = nn.Linear(dim, out_features)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim ** 0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x ``[B, F, S, dim]`` float32, e ``[B, F, dim]`` float32 (the time embedding)."""
        shift, scale = (e[:, :, None] + self.modulation[:, None]).unbind(2)
        h = torch.addcmul(shift[:, :, None], self.norm(x), 1 + scale[:, :, None])
        return self.head(h.to(self.head.weight.dtype))


class WanDiT(nn.Module):
    def __init__(self, dim: int = 1536, ffn_dim: int = 8960, freq_dim: int = 256, in_dim: int = 16,
                 out_dim: int = 16, num_heads: int = 12, num_layers: int = 30, text_len: int = 512,
                 text_dim: int = 4096, eps: float = 1e-6, patch_size=(1, 2, 2), qk_norm: bool = True,
                 cross_attn_norm: bool = True, rope_theta: float = 10000.0, **wan_extra):
        super().__init__()
        # Wan's config.json also carries keys that do not change the T2V network; accept them.
        unknown = set(wan_extra) - {"model_type", "window_size", "_class_name", "_diffusers_version", "dtype"}
        if unknown:
            raise TypeError(f"WanDiT got unknown config keys {sorted(unknown)}")
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.patch_size = tuple(int(p) for p in patch_size)
        if self.patch_size[0] != 1:
            raise ValueError("per-frame timesteps need a temporal patch size of 1")
        self.dim, self.freq_dim, self.text_len = dim, freq_dim, text_len
        self.in_dim, self.out_dim, self.num_heads, self.num_layers = in_dim, out_dim, num_heads, num_layers
        self.head_dim = dim // num_heads
        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(
            WanBlock(dim, ffn_dim, num_heads, qk_norm, cross_attn_norm, eps) for _ in range(num_layers))
        self.head = Head(dim, out_dim * math.prod(self.patch_size), eps)
        self.rope = Rope(self.head_dim, rope_theta)
        self.gradient_checkpointing = False
        self.cuda_graphs: CachedForwardGraphs | None = None  # use_cuda_graphs()

    # ------------------------------------------------------------------------ helpers
    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (h, w) of one latent frame."""
        return height // self.patch_size[1], width // self.patch_size[2]

    def new_cache(self, *, batch_size: int, height: int, width: int, block_frames: int, local_attn_size: int,
                  sink_size: int, policy: str = "relativistic", cut_offset: int = 0, dtype=None, device=None,
                  naive_rope: bool = False) -> KVCache:
        """A preallocated cache sized for latents of ``height`` x ``width``."""
        p = next(self.parameters())
        return KVCache(num_layers=self.num_layers, num_heads=self.num_heads, head_dim=self.head_dim,
                       grid=self.grid(height, width), block_frames=block_frames, local_attn_size=local_attn_size,
                       sink_size=sink_size, rope=self.rope, policy=policy, cut_offset=cut_offset,
                       batch_size=batch_size, dtype=dtype or p.dtype, device=device or p.device,
                       naive_rope=naive_rope)

    @staticmethod
    def block_causal_mask(num_frames: int, frame_tokens: int, block_frames: int, local_attn_size: int = -1,
                          sink_size: int = 0, device=None) -> torch.Tensor:
        """Boolean ``[L, L]`` mask: frame i sees frame j iff j's block is not after i's and, with a
        local window, j is one of the ``sink_size`` sink frames or among the last
        ``local_attn_size - sink_size`` frames ending at the end of i's block: exactly what the
        cache holds when i's block is generated."""
        idx = torch.arange(num_frames, device=device)
        block_end = (idx // block_frames + 1) * block_frames  # exclusive end of each frame's block
        visible = idx[None, :] < block_end[:, None]
        if local_attn_size > 0:
            recent = idx[None, :] >= (block_end[:, None] - (local_attn_size - sink_size))
            visible &= recent | (idx[None, :] < sink_size)
        return visible.repeat_interleave(frame_tokens, 0).repeat_interleave(frame_tokens, 1)

    def _embed_time(self, t: torch.Tensor):
        """Per-frame time embedding e ``[B, F, dim]`` and modulation e0 ``[B, F, 6, dim]`` (float32)."""
        b, f = t.shape
        s = sinusoidal_embedding(t.reshape(-1), self.freq_dim).float()
        e = linear32(self.time_embedding[2], F.silu(linear32(self.time_embedding[0], s)))
        e0 = linear32(self.time_projection[1], F.silu(e))
        return e.view(b, f, self.dim), e0.view(b, f, 6, self.dim)

    # ------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, *,
                num_frame_per_block: int | None = None, local_attn_size: int = -1, sink_size: int = 0,
                kv_cache: KVCache | None = None, commit: bool = False) -> torch.Tensor:
        """Flow prediction for latents ``x`` ``[B, F, C, H, W]`` at per-frame timesteps ``t`` ``[B, F]``.

        * default: full sequence, bidirectional, frames at positions 0..F-1;
        * ``num_frame_per_block=n``: full sequence, block-causal (blocks of n frames), optionally
          restricted to ``sink_size`` sink frames + a ``local_attn_size``-frame window;
        * ``kv_cache=cache``: ``x`` is the next block; it attends to the frames the cache holds at
          the positions the cache hands out. ``commit=True`` (the clean pass) also writes the
          block into the cache (sink, then ring).
        """
        b, f, _, height, width = x.shape
        if t.shape != (b, f):
            raise ValueError(f"timesteps must be [B, F] = {[b, f]}, got {list(t.shape)}")
        gh, gw = self.grid(height, width)
        text = _LazyText(self, context)
        if num_frame_per_block is None and (local_attn_size > 0 or sink_size > 0):
            raise ValueError("local_attn_size and sink_size restrict a block-causal forward: "
                             "pass num_frame_per_block too")
        if kv_cache is None:
            rope_cur = self.rope.freqs_for_runs([(0, f)], gh, gw, x.device)
            mask = None
            if num_frame_per_block is not None:
                mask = self.block_causal_mask(f, gh * gw, num_frame_per_block, local_attn_size, sink_size, x.device)
            return self._core(x, t, text, rope_cur, mask, None)

        kv_cache.check_block(b, f)
        if commit and torch.is_grad_enabled():
            raise ValueError("the clean pass (commit=True) runs without autograd; wrap it in torch.no_grad()")
        if kv_cache.grid != (gh, gw):
            raise ValueError(f"cache grid {kv_cache.grid} does not match latents grid {(gh, gw)}")
        kv_cache.prepare()  # held keys to their current positions (once per layout)
        kv_cache.begin_forward(f, commit)  # the clean pass writes the frames that stay into the held slots
        if not torch.is_grad_enabled():  # the prompt's text keys/values, once per prompt
            kv_cache.set_text(context, lambda i: self.blocks[i].cross_attn.project_kv(text()))
        rope_cur = kv_cache.current_table(f)
        if self.cuda_graphs is not None and not torch.is_grad_enabled() and kv_cache.has_text:
            out = self.cuda_graphs(self._graphed_core, kv_cache, x, t, rope_cur)
        else:
            checkpointing = self.gradient_checkpointing and torch.is_grad_enabled()
            # A checkpointed block is recomputed in backward, after later blocks changed the cache:
            # it must see the cache as it was during this forward (PinnedKV).
            held = kv_cache.pinned() if checkpointing else kv_cache
            out = self._core(x, t, text, rope_cur, None, [held.layer(i) for i in range(self.num_layers)])
        if commit:
            kv_cache.commit(f)
        return out

    def _graphed_core(self, x, t, rope_cur, layers):
        """The cached forward as a CUDA graph runs it: every layer's text keys/values are in the
        cache (the prompt embedding itself is not an input of the graph)."""
        return self._core(x, t, _no_text, rope_cur, None, layers)

    def _core(self, x, t, text, rope_cur, mask, layers):
        """Embeddings, the blocks (over ``layers``, one :class:`LayerKV` per block, or none) and the head."""
        b, f = x.shape[:2]
        dtype = self.patch_embedding.weight.dtype
        tokens = self.patch_embedding(x.to(dtype).transpose(1, 2))  # [B, dim, F, h, w]
        gh, gw = tokens.shape[-2:]
        # [B, F, S, dim] residual stream, float32 and contiguous: every norm reduces over the
        # innermost dim, and the elementwise ops after it keep this layout through all blocks
        h = tokens.flatten(3).permute(0, 2, 3, 1).contiguous().float()
        e, e0 = self._embed_time(t)
        checkpointing = self.gradient_checkpointing and torch.is_grad_enabled()
        if checkpointing:
            text()  # embed the text outside the checkpointed blocks (a recompute finds it computed)
        for i, block in enumerate(self.blocks):
            kv = layers[i] if layers is not None else None
            if checkpointing:
                h = checkpoint(block, h, e0, text, rope_cur, mask, kv, use_reentrant=False)
            else:
                h = block(h, e0, text, rope_cur, mask, kv)
            if kv is not None:  # a clean pass: the frames that stay, into the held slots; the window let go
                kv.finish()

        out = self.head(h, e)  # [B, F, S, pt*ph*pw*C]
        pt, ph, pw = self.patch_size
        out = out.view(b, f, gh, gw, pt, ph, pw, self.out_dim)
        out = out.permute(0, 1, 4, 7, 2, 5, 3, 6).reshape(b, f * pt, self.out_dim, gh * ph, gw * pw)
        return out

    def pack_qkv(self, pack: bool = True) -> None:
        """Each block's self-attention projects q, k, v with one GEMM (:meth:`Attention.pack_qkv`;
        inference: autograd takes the three modules); ``pack=False`` undoes it."""
        for block in self.blocks:
            if pack:
                block.self_attn.pack_qkv()
            else:
                block.self_attn.unpack_qkv()

    def split_attention_keys(self, splits: int) -> None:
        """Each block's self-attention runs its keys in ``splits`` parts in one kernel call,
        merged (:func:`split_key_attention`; 1: one SDPA call). Inference only: autograd and masks take
        SDPA. On a GPU the kernels are cuDNN's (bf16/fp16)."""
        for block in self.blocks:
            block.self_attn.key_splits = int(splits)

    # ------------------------------------------------------------------------ CUDA graphs
    def use_cuda_graphs(self, enable: bool = True, *, capture: bool = True) -> None:
        """Replay the cached no-grad forwards as CUDA graphs, one per cache layout
        (:mod:`model.cuda_graphs`); ``capture=False`` is the CPU dry run of the tests."""
        self.cuda_graphs = CachedForwardGraphs(capture=capture) if enable else None

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() / .half() may move the weights a captured graph reads: drop the graphs
        if getattr(self, "cuda_graphs", None) is not None:
            self.cuda_graphs.reset()
        return super()._apply(fn, recurse)
