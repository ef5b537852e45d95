"""Wan2.1 VAE (diffusers ``AutoencoderKLWan``): latent normalisation, encode, one-shot and
streaming decode.

Layout at this boundary: the project's latents are ``[B, F, C, h, w]`` (normalised), diffusers'
are ``[B, C, F, h, w]`` (raw); pixels are ``[B, T, 3, H, W]`` in [-1, 1]. ``T = 1 + tf·(F − 1)``
with ``tf`` the temporal factor (4 for Wan): the first latent frame decodes to one frame.

Normalisation follows diffusers' Wan pipelines: ``normalised = (z − mean) / std`` per channel,
with ``latents_mean`` / ``latents_std`` from the VAE's config.

Streaming decode keeps the decoder's causal convolution cache between latent blocks, frame by
frame exactly as ``AutoencoderKLWan._decode`` does internally, so decoding a video block by block
equals decoding it in one shot, bit for bit, while holding only the cache (a couple of frames of
activations per causal conv), never the past frames. That relies on the semi-private
``decoder(..., feat_cache, feat_idx, first_chunk)`` call and ``clear_cache``/``_feat_map``;
``tests/test_vae.py`` pins it and ``pyproject.toml`` pins the diffusers range.
"""
from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from model.vae_config import autoencoder_cls, compression_factors
from utils.config import as_dict
from utils.errors import WAN_DOWNLOAD_HINT, ConfigError, WeightsMissingError, first_line

log = logging.getLogger(__name__)



class ChannelRMSNorm(torch.nn.Module):
    """Diffusers' ``WanRMS_norm`` (``F.normalize`` over the channels, times √C, gamma and bias: an
    RMS norm) as one fused ``F.rms_norm`` over the channels moved last: on a channels-last
    activation they are its innermost dimension (a view, no copy). Float32 inside, rounded once to
    the input's dtype.
    Diffusers' forward makes a float32 copy of a bf16 activation, divides it by its norm, casts it
    back and multiplies twice: ~8 passes over the activation, and two float32 copies alive at the
    decoder's peak (the last up block's, 585 MiB each at 480×832). The same values to the input
    dtype's rounding: ``F.normalize`` divides by max(‖x‖, 1e-12), this by sqrt(‖x‖² + 1e-24).
    Shares the original's parameters (same state-dict names); :meth:`WanVAE.unfuse` puts the
    original back."""

    def __init__(self, original: torch.nn.Module):
        super().__init__()
        self.original = (original,)  # a tuple: not a submodule, its parameters are this module's
        self.gamma = original.gamma
        self.bias = original.bias  # a Parameter, or the float 0.0 (Wan's VAE: no bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x / ‖x‖ · √C is x over its root mean square: rms_norm, whose eps (per channel, 1e-24 / C)
        # stands for F.normalize's clamp of ‖x‖ at 1e-12
        channels = self.gamma.shape[0]
        weight = self.gamma.reshape(channels).to(x.dtype)
        y = torch.nn.functional.rms_norm(x.movedim(1, -1), (channels,), weight, 1e-24 / channels)
        if isinstance(self.bias, torch.Tensor):
            y = y + self.bias.reshape(channels).to(y.dtype)
        return y.movedim(-1, 1)


class NearestUpsample(torch.nn.Upsample):
    """Diffusers' ``WanUpsample`` without its float32 round trip: nearest(-exact) upsampling copies
    input values, so doing it in the input's dtype gives the same tensor, bit for bit, without a
    float32 copy of the 4×-larger output."""

    def __init__(self, original: torch.nn.Upsample):
        super().__init__(size=original.size, scale_factor=original.scale_factor, mode=original.mode,
                         align_corners=original.align_corners,
                         recompute_scale_factor=original.recompute_scale_factor)
        self.original = (original,)


class CausalConv3d(torch.nn.Conv3d):
    """Diffusers' ``WanCausalConv3d`` with its zero padding inside the convolution. Diffusers'
    forward concatenates the cached frames in front of the input, then pads the result in time
    and space with ``F.pad`` (a full copy of every input, 1×1×1 shortcuts included) before a
    convolution without padding; here the convolution pads height and width itself (cuDNN reads
    the border as zeros, nothing is copied) and only the causal frames in time are added in front:
    the frames the cache gives, zeros where there are none (the video's first latent frame). The
    same values to float rounding. Shares the original's parameters (same state-dict names);
    :meth:`WanVAE.unfuse` puts the original back."""

    def __init__(self, original: torch.nn.Conv3d):
        pad_w, _, pad_h, _, self.time_padding, _ = original._padding  # (W, W, H, H, 2·T, 0)
        super().__init__(original.in_channels, original.out_channels, original.kernel_size, stride=original.stride,
                         padding=(0, pad_h, pad_w), dilation=original.dilation, groups=original.groups,
                         bias=original.bias is not None, device="meta")  # no weights of its own
        self.weight, self.bias = original.weight, original.bias
        self.original = (original,)  # a tuple: not a submodule, its parameters are this module's

    def forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
        pad = self.time_padding
        if cache_x is not None and pad > 0:
            x = torch.cat([cache_x.to(x.device), x], dim=2)
            pad -= cache_x.shape[2]
        if pad:  # zeros in front (or, as diffusers' F.pad does, the first frames dropped if negative)
            x = torch.nn.functional.pad(x, (0, 0, 0, 0, pad, 0))
        return super().forward(x)


class CausalResample(torch.nn.Module):
    """Diffusers' ``WanResample`` in its ``upsample3d`` mode (the decoder's time-and-space
    upsampler) with the same submodules and computation, written so that Dynamo traces it.
    On the video's first latent frame the upsampler marks its cache slot with the string ``"Rep"``
    (no time upsampling yet) and later tests the slot with ``== "Rep"``. Once the slot holds a
    tensor, that comparison returns ``NotImplemented``, and Dynamo of torch 2.8 to 2.12 breaks the
    graph there, inside the decoder's loop over its up blocks, so ``compile_vae`` compiled the
    decoder in pieces. Here the marker is told apart by its type.
    The same computation and memory layout, bit for bit (``tests/test_vae.py``)."""

    def __init__(self, original: torch.nn.Module):
        super().__init__()
        self.original = (original,)  # a tuple: not a submodule, its submodules are this module's
        self.mode, self.resample, self.time_conv = original.mode, original.resample, original.time_conv
        self.cache_frames = inspect.getmodule(type(original)).CACHE_T  # frames of its input a cache slot keeps

    def forward(self, x: torch.Tensor, feat_cache: list | None = None, feat_idx: list = [0]) -> torch.Tensor:
        if feat_cache is not None:
            idx = feat_idx[0]
            cached = feat_cache[idx]
            if cached is None:  # the first latent frame: no time upsampling, the slot marked
                feat_cache[idx] = "Rep"
            else:
                first = isinstance(cached, str)  # the second latent frame: nothing cached before it
                cache_x = x[:, :, -self.cache_frames:].clone()
                if cache_x.shape[2] < self.cache_frames:
                    before = torch.zeros_like(cache_x) if first else cached[:, :, -1:].to(cache_x.device)
                    cache_x = torch.cat([before, cache_x], dim=2)
                x = self.time_conv(x) if first else self.time_conv(x, cached)  # [b, 2c, t, h, w]
                halves = x.unflatten(1, (2, x.shape[1] // 2))  # frame j's two halves: frames 2j and 2j + 1
                x = torch.stack((halves[:, 0], halves[:, 1]), 3).flatten(2, 3)
                feat_cache[idx] = cache_x
            feat_idx[0] += 1
        b, c, t, h, w = x.shape
        images = self.resample(x.transpose(1, 2).reshape(b * t, c, h, w))  # a view for a channels-last x
        return images.view(b, t, *images.shape[1:]).transpose(1, 2)


FUSED = (ChannelRMSNorm, NearestUpsample, CausalConv3d, CausalResample)  # what WanVAE.fuse swaps in


def _swap_in(parent: torch.nn.Module, kinds: dict) -> int:
    """Replace, depth first, every child whose exact type is in ``kinds`` by ``kinds[type](child)``,
    then look inside the replacement (whose children are the original's). Returns the count."""
    swapped = 0
    for name, child in list(parent.named_children()):
        swap = kinds.get(type(child))
        if swap is not None and _swappable(swap, child):
            child = swap(child)
            setattr(parent, name, child)
            swapped += 1
        swapped += _swap_in(child, kinds)
    return swapped


def _swappable(swap: type, child: torch.nn.Module) -> bool:
    if swap is ChannelRMSNorm:
        return child.channel_first
    if swap is NearestUpsample:
        return child.mode in ("nearest", "nearest-exact")
    if swap is CausalResample:
        return child.mode == "upsample3d"
    return True


def _swap_out(parent: torch.nn.Module, keep: tuple = ()) -> None:
    """Put back the originals of :data:`FUSED` modules but those of the types in ``keep``, children
    first (so that a convolution inside a swapped upsampler hands its parameters back before the
    upsampler goes)."""
    for name, child in list(parent.named_children()):
        _swap_out(child, keep)
        if isinstance(child, FUSED) and not isinstance(child, keep):
            original = child.original[0]
            # the parameters as they are now (reassigned by a load, say)
            if isinstance(child, ChannelRMSNorm):
                original.gamma, original.bias = child.gamma, child.bias
            elif isinstance(child, CausalConv3d):
                original.weight, original.bias = child.weight, child.bias
            elif isinstance(child, CausalResample):
                original.resample, original.time_conv = child.resample, child.time_conv
            setattr(parent, name, original)


class WanVAE(torch.nn.Module):
    """``AutoencoderKLWan`` behind the project's shapes and latent normalisation."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.compiled_decode_into_cache = None  # compile_decoder() sets it
        self.cache_layout = torch.contiguous_format  # the layout of activations; to_channels_last() sets it
        cfg = vae.config
        for name in ("latents_mean", "latents_std"):
            values = getattr(cfg, name)
            if values is None or len(values) != cfg.z_dim:
                raise ConfigError(f"VAE config {name} has {0 if values is None else len(values)} values but "
                                  f"z_dim is {cfg.z_dim}; give one value per latent channel")
        if any(s <= 0 for s in cfg.latents_std):
            raise ConfigError("VAE config latents_std must be > 0 for every channel")
        # Python floats, not buffers: module.to(dtype) must not round them.
        self._mean = [float(v) for v in cfg.latents_mean]
        self._std = [float(v) for v in cfg.latents_std]
        self._stats_on: dict = {}  # device → (mean, std) tensors, see _stats
        self._spatial, self._temporal = compression_factors(cfg)
        for key, derived in (("scale_factor_spatial", self._spatial), ("scale_factor_temporal", self._temporal)):
            stated = getattr(cfg, key, None)
            if stated is not None and stated != derived:
                log.debug("VAE config %s=%s, architecture gives %s; using %s", key, stated, derived, derived)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, wan_model_path: str | Path, dtype: torch.dtype = torch.bfloat16,
                        device: str | torch.device = "cpu") -> "WanVAE":
        """The Wan2.1 VAE from ``<wan_model_path>/vae`` (local files only)."""
        root = Path(wan_model_path)
        vae_dir = root / "vae"
        for path in (root, vae_dir, vae_dir / "config.json"):
            if not path.exists():
                raise WeightsMissingError(f"VAE weights missing: {path} does not exist; {WAN_DOWNLOAD_HINT}")
        try:
            vae = autoencoder_cls().from_pretrained(str(vae_dir), torch_dtype=dtype, local_files_only=True,
                                                   use_safetensors=True)  # never unpickle weights
        except OSError as exc:  # weights file missing / unreadable
            raise WeightsMissingError(f"cannot load the VAE from {vae_dir}: {first_line(exc)}; "
                                      f"{WAN_DOWNLOAD_HINT}") from exc
        except (RuntimeError, ValueError) as exc:  # weight shapes that config.json does not describe
            raise WeightsMissingError(f"the VAE in {vae_dir} does not match its config.json ({first_line(exc)}); "
                                      f"download it again: {WAN_DOWNLOAD_HINT}") from exc
        log.info("loaded Wan VAE from %s (%s, %s)", vae_dir, dtype, device)
        return cls(vae.to(device))

    @classmethod
    def from_config(cls, config: Mapping) -> "WanVAE":
        """``AutoencoderKLWan(**config)`` with random weights (fp32; the caller seeds torch)."""
        config = as_dict(config)
        known = set(inspect.signature(autoencoder_cls().__init__).parameters) - {"self"}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ConfigError(f"tiny_vae has unknown key(s) {', '.join(unknown)}; use AutoencoderKLWan "
                              f"arguments such as base_dim, z_dim, dim_mult, num_res_blocks, temperal_downsample")
        return cls(autoencoder_cls()(**config))

    # ------------------------------------------------------------------ geometry
    @property
    def z_dim(self) -> int:
        return int(self.vae.config.z_dim)

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent cell along H and W (8 for Wan2.1)."""
        return self._spatial

    @property
    def temporal_factor(self) -> int:
        """Video frames per latent frame after the first (4 for Wan2.1)."""
        return self._temporal

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """``(C, h, w)`` of one latent frame for a ``height`` × ``width`` video."""
        f = self.spatial_factor
        if height % f or width % f:
            raise ConfigError(f"height ({height}) and width ({width}) must be multiples of the VAE's "
                              f"spatial factor {f}; change height/width in the config")
        return self.z_dim, height // f, width // f

    # ------------------------------------------------------------------ normalisation
    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Made once per device: a tensor built from a Python list is a host-to-device copy, and
        # the streaming decoder asks for these at every block.
        stats = self._stats_on
        key = str(like.device)
        if key not in stats:
            shape = (1, 1, self.z_dim, 1, 1)  # project layout [B, F, C, h, w]
            stats[key] = (torch.tensor(self._mean, dtype=torch.float32, device=like.device).view(shape),
                          torch.tensor(self._std, dtype=torch.float32, device=like.device).view(shape))
        return stats[key]

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents ``[B, F, C, h, w]`` → normalised: (z − mean) / std (float32 math)."""
        mean, std = self._stats(z)
        return ((z.float() - mean) / std).to(z.dtype)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``[B, F, C, h, w]`` → raw VAE latents: latents · std + mean."""
        mean, std = self._stats(latents)
        return (latents.float() * std + mean).to(latents.dtype)

    # ------------------------------------------------------------------ encode / decode
    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, T, 3, H, W]`` in [-1, 1] → normalised latents ``[B, F, C, h, w]`` (posterior mode)."""
        if video.ndim != 5:
            raise ValueError(f"video must be [B, T, 3, H, W], got shape {tuple(video.shape)}")
        t = video.shape[1]
        if (t - 1) % self.temporal_factor:
            raise ValueError(f"video has {t} frames; the VAE needs 1 + {self.temporal_factor}·k frames")
        x = video.permute(0, 2, 1, 3, 4).to(device=self.device, dtype=self.dtype)
        z = self.vae.encode(x).latent_dist.mode()  # [B, C, F, h, w]
        return self.normalize(z.permute(0, 2, 1, 3, 4))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``[B, F, C, h, w]`` → frames ``[B, T, 3, H, W]`` in [-1, 1], one shot."""
        z = self.denormalize(latents).permute(0, 2, 1, 3, 4).to(device=self.device, dtype=self.dtype)
        frames = self.vae.decode(z).sample  # diffusers clamps to [-1, 1]
        return frames.permute(0, 2, 1, 3, 4)

    def to_channels_last(self) -> "WanVAE":
        """Put the convolutions' weights in the channels-last layout (3-D ones channels-last 3-D,
        the upsamplers' and the attention's 2-D ones channels-last): cuDNN's preferred layout on
        recent GPUs, where the convolutions then produce channels-last activations and take them
        without a layout transform or a per-call copy of the weight. The default on a GPU
        (``vae_channels_last``, with cuDNN autotuning); the benchmark's ``vae_contiguous``
        variant is its before."""
        layouts = {torch.nn.Conv3d: torch.channels_last_3d, torch.nn.Conv2d: torch.channels_last}
        for module in self.vae.modules():
            for kind, layout in layouts.items():
                if isinstance(module, kind):
                    module.weight.data = module.weight.data.contiguous(memory_format=layout)
        self.cache_layout = torch.channels_last_3d
        return self

    def fuse(self) -> "WanVAE":
        """Swap diffusers' modules for ones that move fewer bytes (made for the
        channels-last layout of :meth:`to_channels_last`): its channel RMS norms for
        :class:`ChannelRMSNorm` (one pass over the innermost channels, no float32 copies), its
        nearest upsamplers for :class:`NearestUpsample` (no float32 round trip), its causal
        convolutions for :class:`CausalConv3d` (the zero padding inside the convolution, not a
        padded copy of every input), and its time upsamplers for :class:`CausalResample` (the
        same bytes, but traceable by Dynamo as one graph): the VAE in its dtype throughout. Same
        frames to the dtype's rounding (``tests/test_vae.py``). Idempotent; returns ``self``."""
        if not self._swap(("WanRMS_norm", ChannelRMSNorm), ("WanUpsample", NearestUpsample),
                          ("WanCausalConv3d", CausalConv3d), ("WanResample", CausalResample)):
            log.warning("fuse: no WanRMS_norm, WanUpsample, WanCausalConv3d or WanResample found in diffusers' %s; "
                        "the VAE runs as it is", type(self.vae).__name__)
        return self

    def _swap(self, *swaps: tuple[str, type]) -> int:
        """Swap diffusers' modules named in ``swaps`` (``(class name, replacement)``) for their
        replacements, those not swapped already; returns how many are swapped now."""
        library = inspect.getmodule(autoencoder_cls())
        kinds = {getattr(library, name, None): swap for name, swap in swaps}
        kinds.pop(None, None)
        before = sum(isinstance(m, tuple(kinds.values())) for m in self.vae.modules())
        return before + _swap_in(self.vae, kinds)

    def unfuse(self) -> "WanVAE":
        """Put back the modules :meth:`fuse` swapped (the benchmark's before). Once the decoder is
        compiled its time upsamplers stay :class:`CausalResample`: diffusers' would break its graph."""
        _swap_out(self.vae, keep=(CausalResample,) if self.decoder_compiled else ())
        return self

    def compile_decoder(self, **compile_kwargs) -> "WanVAE":
        """``torch.compile`` the streaming decode of one latent frame over a full causal cache
        (:func:`decode_into_cache`: the decoder, then its new cache written into the old slots in
        place), which :class:`StreamingDecoder` runs for every latent frame once the cache is full:
        one graph, without a graph break, and no recompilation after. The first latent frames of
        a video, while the cache fills (its slots hold nothing, a marker, fewer frames), run the
        plain forward (compiling them would make three graphs, three times the one-time compile,
        for two frames a video), and so does a one-shot :meth:`decode`. Diffusers' time upsamplers break
        the graph on torch 2.8 to 2.12, so they are swapped for :class:`CausalResample` first (what
        :meth:`fuse` does too). With inductor, the causal cache's concatenations are asked for as
        pointwise kernels (``force_pointwise_cat``) where the installed torch has the option.

        Why in place: a compiled decoder that returned its new cache (as the plain forward's list
        does) held the old and the new cache at once, and inductor drops the decoder's copies of
        the last frames as no-ops, so each slot came back as a view that kept a whole activation
        alive: a peak 1.8 times the plain decoder's, 14 GiB for the pipeline on an H200. Written
        into the slots, each copy is a real kernel that frees its activation when it has run, and
        there is one cache: the peak counted on the CPU is the plain decoder's or below
        (docs/PERFORMANCE.md §22). ``compile_vae`` in the config (on by default on a GPU);
        ``scripts/benchmark.py --variants default vae_uncompiled`` measures what it buys."""
        self._swap(("WanResample", CausalResample))
        if compile_kwargs.get("backend", "inductor") == "inductor":
            from torch._inductor import config as inductor_config

            if hasattr(inductor_config, "force_pointwise_cat"):
                # each causal convolution's concatenation as one kernel, run once its input is ready:
                # inductor otherwise allocates it when it copies the cached frames into it, which
                # needs only the graph's inputs, so early that every one is alive at once (§21)
                options = {"force_pointwise_cat": True, **compile_kwargs.get("options", {})}
                compile_kwargs = {**compile_kwargs, "options": options}
        self.compiled_decode_into_cache = torch.compile(decode_into_cache, **compile_kwargs)
        return self

    @property
    def decoder_compiled(self) -> bool:
        """Whether :meth:`compile_decoder` ran: the streaming decode then runs the compiled graph."""
        return self.compiled_decode_into_cache is not None

    def streaming_decoder(self) -> "StreamingDecoder":
        """A fresh :class:`StreamingDecoder` over this VAE (one per video stream)."""
        return StreamingDecoder(self)


def decode_into_cache(decoder: torch.nn.Module, x: torch.Tensor, cache: list) -> torch.Tensor:
    """Decode one latent frame ``x`` with diffusers' ``decoder`` over a full causal ``cache``
    (every slot a tensor, or ``None`` for a convolution that keeps none) and write each slot's
    new frames into the slot itself; returns the frame's pixels. The same values as the plain
    forward, which replaces the list's items; what :meth:`WanVAE.compile_decoder` compiles."""
    new = list(cache)
    out = decoder(x, feat_cache=new, feat_idx=[0], first_chunk=False)
    for slot, value in zip(cache, new):
        if slot is not None:
            slot.copy_(value)
    return out


class StreamingDecoder:
    """Decode consecutive latent blocks of one video, keeping the decoder's causal cache.

    ``reset()`` starts a new video; ``decode_block(latents [B, f, C, h, w])`` returns frames
    ``[B, T, 3, H, W]`` in [-1, 1]: ``1 + tf·(f − 1)`` frames for the first block, ``tf·f`` after.
    The cache is this object's own list, so other calls on the VAE (a one-shot ``decode``, an
    ``encode``, another stream) do not disturb it.
    """

    def __init__(self, vae: WanVAE):
        self.wan_vae = vae
        # latent frames until every cache slot holds what it holds from then on (one frame per call)
        self.cache_frames = inspect.getmodule(autoencoder_cls()).CACHE_T
        self.reset()

    def reset(self) -> None:
        """Forget the previous video: empty cache, next block is the first."""
        vae = self.wan_vae.vae
        vae.clear_cache()  # sizes _feat_map: one slot per causal conv of the decoder
        self._cache: list = [None] * len(vae._feat_map)
        self.num_latent_frames = 0  # latent frames decoded since reset

    @torch.no_grad()
    def decode_block(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.ndim != 5 or latents.shape[2] != self.wan_vae.z_dim:
            raise ValueError(f"latents must be [B, f, {self.wan_vae.z_dim}, h, w], got {tuple(latents.shape)}")
        vae = self.wan_vae.vae
        z = self.wan_vae.denormalize(latents).permute(0, 2, 1, 3, 4)
        x = vae.post_quant_conv(z.to(device=self.wan_vae.device, dtype=self.wan_vae.dtype))  # 1×1×1 conv
        outs = []
        for i in range(x.shape[2]):
            frame = x[:, :, i:i + 1]
            if self.wan_vae.decoder_compiled and self.num_latent_frames >= self.cache_frames:
                outs.append(self.wan_vae.compiled_decode_into_cache(vae.decoder, frame, self._cache))
            else:  # the plain forward refills the list; a compiled decoder's cache is still filling
                outs.append(vae.decoder(frame, feat_cache=self._cache, feat_idx=[0],
                                        first_chunk=self.num_latent_frames == 0))
            self.num_latent_frames += 1
            if self.wan_vae.decoder_compiled and self.num_latent_frames == self.cache_frames:
                self._settle_cache()
        out = torch.cat(outs, dim=2)
        if vae.config.patch_size is not None:  # Wan2.2-style patchified VAE; None for Wan2.1
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify
            out = unpatchify(out, patch_size=vae.config.patch_size)
        return out.clamp(-1.0, 1.0).permute(0, 2, 1, 3, 4)

    def _settle_cache(self) -> None:
        """Once the cache is full, before the compiled decoder first writes into it: give every
        slot a buffer of its own with the exact strides of the VAE's layout (channels-last 3-D
        once :meth:`WanVAE.to_channels_last`, else contiguous), copying those that differ. The
        compiled graph is guarded on its inputs' strides and keeps each slot for the rest of the
        video, so every video meets the graph it compiled, and no slot pins a larger activation it
        is a view of."""
        layout = self.wan_vae.cache_layout
        for i, cached in enumerate(self._cache):
            if not isinstance(cached, torch.Tensor):
                continue
            strides = torch.empty(cached.shape, device="meta", memory_format=layout).stride()
            if cached.stride() != strides or cached.untyped_storage().nbytes() > cached.nbytes:
                self._cache[i] = torch.empty_strided(cached.shape, strides, dtype=cached.dtype,
                                                     device=cached.device).copy_(cached)
