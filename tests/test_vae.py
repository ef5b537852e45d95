"""model/vae.py: geometry from the config, latent normalisation, encode, streaming == one-shot decode.

The streaming decoder leans on AutoencoderKLWan's semi-private decoder cache; this file is what
catches a diffusers upgrade that changes it.
"""
from __future__ import annotations

import inspect
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan
from omegaconf import OmegaConf

from model.vae import WanVAE
from model.vae_config import config_of
from pipeline.plan import video_frames_after
from utils.errors import ConfigError, WeightsMissingError

log = logging.getLogger(__name__)

TINY_VAE = {"base_dim": 8, "z_dim": 16, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1,
            "temperal_downsample": [False, True, True]}
H, W = 32, 48  # pixels → 4 × 6 latent cells


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    torch.manual_seed(0)
    return WanVAE.from_config(OmegaConf.create(TINY_VAE))  # the config arrives as a DictConfig


def _stats(vae: WanVAE):
    cfg = vae.vae.config
    return torch.tensor(cfg.latents_mean), torch.tensor(cfg.latents_std)


def test_geometry_from_config(vae):
    assert vae.z_dim == 16 and vae.spatial_factor == 8 and vae.temporal_factor == 4
    assert vae.latent_shape(480, 832) == (16, 60, 104)
    assert [video_frames_after(f, 1, vae.temporal_factor) for f in (1, 3, 7, 21)] == [1, 9, 25, 81]
    torch.manual_seed(0)
    two_levels = WanVAE.from_config({**TINY_VAE, "dim_mult": [1, 2, 2], "temperal_downsample": [False, True]})
    assert (two_levels.spatial_factor, two_levels.temporal_factor) == (4, 2)
    with pytest.raises(ConfigError, match="multiples"):
        vae.latent_shape(30, 48)


def test_latent_stats_come_from_config(vae):
    # no stats in the tiny config: diffusers' defaults, which are the Wan2.1 statistics
    defaults = inspect.signature(AutoencoderKLWan.__init__).parameters
    assert vae.vae.config.latents_mean == defaults["latents_mean"].default
    assert vae.vae.config.latents_std == defaults["latents_std"].default
    assert vae.vae.config.latents_mean[0] == -0.7571 and vae.vae.config.latents_std[0] == 2.8184
    custom = WanVAE.from_config({**TINY_VAE, "z_dim": 4, "latents_mean": [0.5, -1.0, 2.0, 0.0],
                                 "latents_std": [2.0, 0.5, 1.0, 4.0]})
    z = torch.ones(1, 1, 4, 1, 1)
    assert custom.normalize(z).flatten().tolist() == [0.25, 4.0, -1.0, 0.25]


def test_normalisation_matches_diffusers_pipeline(vae):
    torch.manual_seed(1)
    z = torch.randn(2, 5, 16, 4, 6)  # raw latents, project layout
    mean, std = _stats(vae)
    # diffusers' WanVideoToVideoPipeline: (z - mean) * (1 / std), layout [B, C, F, h, w]
    ref = (z.permute(0, 2, 1, 3, 4) - mean.view(1, 16, 1, 1, 1)) * (1.0 / std.view(1, 16, 1, 1, 1))
    norm = vae.normalize(z)
    assert torch.allclose(norm, ref.permute(0, 2, 1, 3, 4), atol=1e-6)
    back = vae.denormalize(norm)
    err = (back - z).abs().max().item()
    log.info("normalise/denormalise round trip max abs error %.3g", err)
    assert err < 1e-5


def test_encode_shape_and_mode(vae):
    torch.manual_seed(2)
    video = torch.rand(2, 9, 3, H, W) * 2 - 1
    latents = vae.encode(video)
    assert latents.shape == (2, 3, 16, 4, 6)
    # deterministic posterior mode, normalised like the pipelines do
    raw = vae.vae.encode(video.permute(0, 2, 1, 3, 4)).latent_dist.mode().permute(0, 2, 1, 3, 4)
    assert torch.equal(vae.encode(video), latents)
    assert torch.allclose(vae.denormalize(latents), raw, atol=1e-5)
    with pytest.raises(ValueError, match="1 \\+ 4"):
        vae.encode(video[:, :8])


def test_decode_matches_diffusers_pipeline(vae):
    torch.manual_seed(3)
    latents = torch.randn(1, 3, 16, 4, 6)
    frames = vae.decode(latents)
    assert frames.shape == (1, 9, 3, H, W)
    mean, std = _stats(vae)
    # diffusers' WanPipeline: latents / (1 / std) + mean, then vae.decode
    z = latents.permute(0, 2, 1, 3, 4) / (1.0 / std.view(1, 16, 1, 1, 1)) + mean.view(1, 16, 1, 1, 1)
    with torch.no_grad():
        ref = vae.vae.decode(z).sample.permute(0, 2, 1, 3, 4)
    assert torch.allclose(frames, ref, atol=1e-5)
    assert frames.min() >= -1 and frames.max() <= 1 and frames.std() > 0.05


def test_streaming_decode_equals_one_shot(vae):
    torch.manual_seed(4)
    latents = torch.randn(2, 7, 16, 4, 6)
    one_shot = vae.decode(latents)
    assert one_shot.shape == (2, 25, 3, H, W)

    stream = vae.streaming_decoder()
    blocks = []
    for start in (0, 3, 6):  # blocks of 3, 3, 1 latent frames
        blocks.append(stream.decode_block(latents[:, start:start + 3]))
        vae.decode(latents[:1, :2])  # other use of the VAE in between must not disturb the stream
        # constant memory: the cache holds at most 2 frames of activations per causal conv
        assert all(c is None or c.shape[2] <= 2 for c in stream._cache)
    assert [b.shape[1] for b in blocks] == [9, 12, 4]
    streamed = torch.cat(blocks, dim=1)
    assert streamed.shape == one_shot.shape == (2, 25, 3, H, W)
    err = (streamed - one_shot).abs().max().item()
    log.info("streaming vs one-shot decode: max abs error %.3g", err)
    assert err <= 1e-6

    stream.reset()  # a new video starts from an empty cache
    assert torch.equal(stream.decode_block(latents[:, :3]), blocks[0])


def test_from_config_rejects_bad_config():
    with pytest.raises(ConfigError, match="base_dimm"):
        WanVAE.from_config({"base_dimm": 8})
    with pytest.raises(ConfigError, match="latents_mean"):
        WanVAE.from_config({**TINY_VAE, "z_dim": 4})  # default stats have 16 values


def test_from_pretrained_missing_weights(tmp_path):
    with pytest.raises(WeightsMissingError, match=re.escape(str(tmp_path / "vae"))) as err:
        WanVAE.from_pretrained(tmp_path, dtype=torch.float32)
    assert "setup_env.sh" in str(err.value) and "\n" not in str(err.value)


def test_from_pretrained_round_trip(vae, tmp_path):
    vae.vae.save_pretrained(tmp_path / "vae")
    loaded = WanVAE.from_pretrained(tmp_path, dtype=torch.float32)
    torch.manual_seed(5)
    latents = torch.randn(1, 2, 16, 4, 6)
    assert torch.equal(loaded.decode(latents), vae.decode(latents))
    assert WanVAE.from_pretrained(tmp_path).dtype == torch.bfloat16


def test_from_pretrained_weights_file_missing(vae, tmp_path):
    vae.vae.save_config(tmp_path / "vae")  # config.json but no diffusion_pytorch_model.safetensors
    with pytest.raises(WeightsMissingError, match=re.escape(str(tmp_path / "vae"))) as err:
        WanVAE.from_pretrained(tmp_path, dtype=torch.float32)
    assert "safetensors" in str(err.value) and "\n" not in str(err.value)


LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:0123abcd\nsize 712\n"


@pytest.mark.parametrize("text", ["{", LFS_POINTER, "[1, 2]"])
def test_corrupt_config_is_one_line_error(tmp_path, text):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(text)
    with pytest.raises(WeightsMissingError, match=re.escape(str(tmp_path / "vae" / "config.json"))) as err:
        config_of(None, tmp_path)
    assert "setup_env.sh" in str(err.value) and "\n" not in str(err.value)


def test_corrupt_config_dry_run_exits_2(tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(LFS_POINTER)
    repo = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, "inference.py", "--config_path", "configs/tiny.yaml", "--prompt", "a fox[1s]",
                          "--dry_run", "random_init=false", f"wan_model_path={tmp_path}"],
                         cwd=repo, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.startswith("error: ") and str(tmp_path / "vae" / "config.json") in run.stderr


def test_from_pretrained_config_that_does_not_fit_the_weights(vae, tmp_path):
    vae.vae.save_pretrained(tmp_path / "vae")
    config_file = tmp_path / "vae" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "base_dim": 16}))
    with pytest.raises(WeightsMissingError, match=re.escape(str(tmp_path / "vae"))) as err:
        WanVAE.from_pretrained(tmp_path, dtype=torch.float32)
    assert "does not match its config" in str(err.value) and "size mismatch" in str(err.value)
    assert "\n" not in str(err.value)


def _random_norm_weights(vae: WanVAE, seed: int = 5) -> WanVAE:
    """Gamma away from its init (ones), so that a norm that dropped or misplaced it would show."""
    g = torch.Generator().manual_seed(seed)
    for name, p in vae.named_parameters():
        if name.endswith("gamma"):
            p.data = 1 + 0.5 * torch.randn(p.shape, generator=g)
    return vae


def test_channels_last_decoder_equals_the_default_layout(vae):
    """``vae_channels_last`` (the default on a GPU): the convolutions channels-last and the norms
    fused (:meth:`WanVAE.fuse`) decode the same frames, streaming, as diffusers' modules in
    the contiguous layout (fp32)."""
    import copy

    torch.manual_seed(3)
    z = torch.randn(1, 6, 16, H // 8, W // 8)
    plain = _random_norm_weights(copy.deepcopy(vae))
    want = torch.cat([plain.streaming_decoder().decode_block(z[:, i:i + 3]) for i in (0, 3)], dim=1)
    last = copy.deepcopy(plain).to_channels_last().fuse()
    assert any(p.dim() == 5 and p.is_contiguous(memory_format=torch.channels_last_3d) and not p.is_contiguous()
               for p in last.parameters())
    got = torch.cat([last.streaming_decoder().decode_block(z[:, i:i + 3]) for i in (0, 3)], dim=1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    video = torch.rand(1, 5, 3, H, W) * 2 - 1  # the encoder (a start picture) runs the same way
    torch.testing.assert_close(last.encode(video), plain.encode(video), rtol=1e-4, atol=1e-5)


def test_fuse_swaps_diffusers_modules_and_back(vae):
    """Every channel RMS norm, nearest upsampler and causal convolution of the decoder and the
    encoder, and the decoder's time upsamplers, are swapped, the parameters stay the same objects
    under the same state-dict names, and unfuse restores diffusers' modules."""
    import copy

    from diffusers.models.autoencoders import autoencoder_kl_wan as lib

    from model.vae import CausalConv3d, CausalResample, ChannelRMSNorm, NearestUpsample

    v = copy.deepcopy(vae)
    kinds = lambda m: sorted(type(c).__name__ for c in m.modules())  # noqa: E731
    before, keys = kinds(v), list(v.state_dict())
    time_up = lambda c: isinstance(c, lib.WanResample) and c.mode == "upsample3d"  # noqa: E731
    pairs = ((lambda c: isinstance(c, lib.WanRMS_norm), ChannelRMSNorm), (time_up, CausalResample),
             (lambda c: isinstance(c, lib.WanUpsample), NearestUpsample),
             (lambda c: isinstance(c, lib.WanCausalConv3d), CausalConv3d))
    counts = [sum(map(theirs, v.modules())) for theirs, _ in pairs]
    assert all(n > 0 for n in counts)
    params = {n: id(p) for n, p in v.named_parameters()}
    v.fuse()
    assert [sum(isinstance(c, ours) for c in v.modules()) for _, ours in pairs] == counts
    assert not any(theirs(c) for c in v.modules() for theirs, _ in pairs)
    assert any(isinstance(c, lib.WanResample) for c in v.modules())  # the encoder's downsamplers stay
    assert list(v.state_dict()) == keys and {n: id(p) for n, p in v.named_parameters()} == params
    after = kinds(v)
    assert kinds(v.fuse()) == after  # a second call finds them fused and changes nothing
    assert {n: id(p) for n, p in v.named_parameters()} == params
    loaded = {k: t + 1 for k, t in v.state_dict().items()}
    v.load_state_dict(loaded, assign=True)  # new parameter objects in the fused modules
    assert kinds(v.unfuse()) == before
    assert all(torch.equal(t, loaded[k]) for k, t in v.state_dict().items())  # diffusers' modules got them
    assert list(v.state_dict()) == keys
    compiled = copy.deepcopy(vae).compile_decoder(backend="eager")  # swaps the time upsamplers itself
    assert [sum(isinstance(c, ours) for c in compiled.modules()) for _, ours in pairs] == [0, counts[1], 0, 0]
    assert sum(isinstance(c, CausalResample) for c in compiled.fuse().unfuse().modules()) == counts[1]  # kept
    assert list(compiled.state_dict()) == keys


@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d"])
def test_causal_resample_equals_diffusers_bit_for_bit(layout):
    """:class:`CausalResample` against diffusers' ``WanResample`` in ``upsample3d`` mode (the
    oracle), through every state of its cache (empty, the first frame's marker, one cached frame,
    two) and without a cache: the same output, in the same memory layout, and the same cache, bit
    for bit."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanResample

    from model.vae import CausalResample

    torch.manual_seed(3)
    theirs = WanResample(6, "upsample3d", upsample_out_dim=4)
    if layout == "channels_last_3d":
        for conv, fmt in ((theirs.time_conv, torch.channels_last_3d), (theirs.resample[1], torch.channels_last)):
            conv.weight.data = conv.weight.data.contiguous(memory_format=fmt)  # as WanVAE.to_channels_last does
    ours = CausalResample(theirs)
    fmt = getattr(torch, layout) if layout != "contiguous" else torch.contiguous_format
    x = lambda t: torch.randn(2, 6, t, 5, 7).contiguous(memory_format=fmt)  # noqa: E731
    cache_theirs, cache_ours = [None], [None]
    for frames in (1, 1, 1, 2, 3):  # the decoder's calls: one latent frame at a time, more in later blocks
        inp = x(frames)
        want = theirs(inp, feat_cache=cache_theirs, feat_idx=[0])
        idx = [0]
        got = ours(inp, feat_cache=cache_ours, feat_idx=idx)
        assert idx == [1] and torch.equal(got, want) and got.stride() == want.stride()
        assert type(cache_ours[0]) is type(cache_theirs[0])
        assert cache_ours[0] == "Rep" if isinstance(cache_theirs[0], str) else torch.equal(*cache_ours, *cache_theirs)
    inp = x(2)
    assert torch.equal(ours(inp), theirs(inp))  # no cache: spatial upsampling only


@pytest.mark.parametrize("kernel, padding, stride", [(3, 1, 1), (1, 0, 1), ((3, 1, 1), (1, 0, 0), 1),
                                                     ((3, 1, 1), 0, (2, 1, 1))])
@pytest.mark.parametrize("cache_frames", [None, 1, 2, 3])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d"])
def test_causal_conv_with_inner_padding_equals_diffusers(kernel, padding, stride, cache_frames, layout):
    """:class:`CausalConv3d` against diffusers' ``WanCausalConv3d`` (the oracle), with every
    kernel the Wan VAE has (3×3×3 and 1×1×1 in the residual blocks, 3×1×1 in the upsamplers'
    time convolutions, 3×1×1 with a time stride in the encoder's downsamplers): no cache, and a
    cache of fewer, as many and more frames than the causal padding (diffusers' negative padding
    drops input frames then), in both layouts."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    from model.vae import CausalConv3d

    g = torch.Generator().manual_seed(2)
    theirs = WanCausalConv3d(6, 5, kernel, stride=stride, padding=padding)
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(theirs.weight.shape, generator=g))
        theirs.bias.copy_(torch.randn(theirs.bias.shape, generator=g))
    ours = CausalConv3d(theirs)
    x = torch.randn(2, 6, 4, 5, 7, generator=g)
    cache = None if cache_frames is None else torch.randn(2, 6, cache_frames, 5, 7, generator=g)
    if layout == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
        ours.weight.data = ours.weight.data.contiguous(memory_format=torch.channels_last_3d)
    want = theirs(x, cache)
    assert want.shape[2] > 0
    torch.testing.assert_close(ours(x, cache), want, rtol=1e-5, atol=1e-5)
    assert ours.weight is theirs.weight and ours.bias is theirs.bias


@pytest.mark.parametrize("shape, layout", [((2, 24, 3, 5, 7), "channels_last_3d"), ((2, 24, 3, 5, 7), "contiguous"),
                                           ((3, 24, 5, 7), "contiguous")])
def test_fused_channel_norm_equals_diffusers_norm(shape, layout):
    """:class:`ChannelRMSNorm` against diffusers' ``WanRMS_norm`` (the oracle): fp32 to float
    rounding; bf16 no further from the exact norm of the same bf16 input than diffusers' own bf16
    path (which rounds after each of its steps, this once); a zero channel vector stays 0."""
    import copy

    from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

    from model.vae import ChannelRMSNorm

    g = torch.Generator().manual_seed(1)
    theirs = WanRMS_norm(shape[1], images=len(shape) == 4)
    theirs.gamma.data = 1 + 0.5 * torch.randn(theirs.gamma.shape, generator=g)
    ours = ChannelRMSNorm(theirs)
    x = 3 * torch.randn(shape, generator=g)
    x[0, :, 0] = 0  # a zero channel vector (a padded border)
    if layout == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(ours(x), theirs(x), rtol=2e-6, atol=1e-6)
    assert (ours(x)[0, :, 0] == 0).all()
    xb = x.to(torch.bfloat16)
    theirs.bfloat16()  # ours shares its gamma
    truth = copy.deepcopy(theirs).double()(xb.double())  # the exact norm of the bf16 input and weights
    err = {name: ((m(xb).double() - truth).abs() / (truth.abs() + 1e-3)).max().item()
           for name, m in (("ours", ours), ("theirs", theirs))}
    assert err["ours"] <= 2 ** -8 and err["ours"] <= err["theirs"], err  # one rounding against several
    assert ours(xb).dtype == torch.bfloat16


def test_nearest_upsample_in_bf16_is_bit_identical():
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanUpsample

    from model.vae import NearestUpsample

    theirs = WanUpsample(scale_factor=(2.0, 2.0), mode="nearest-exact")
    x = torch.randn(3, 8, 5, 7).to(torch.bfloat16)
    out = NearestUpsample(theirs)(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, theirs(x))
    assert torch.equal(NearestUpsample(theirs)(x.contiguous(memory_format=torch.channels_last)), theirs(x))


def test_bf16_decode_with_fused_norms_is_as_close_to_fp32_as_diffusers(vae):
    """The whole streaming decode in bf16: channels-last and fused against diffusers'
    modules, each against the fp32 decode: the fused VAE is no further from it (bf16 rounding)."""
    import copy

    torch.manual_seed(4)
    z = torch.randn(1, 6, 16, H // 8, W // 8)
    plain = _random_norm_weights(copy.deepcopy(vae))

    def decode(v):
        return torch.cat([v.streaming_decoder().decode_block(z[:, i:i + 3]) for i in (0, 3)], dim=1).float()

    truth = decode(plain)
    low = copy.deepcopy(plain).to(torch.bfloat16)
    fused = copy.deepcopy(low).to_channels_last().fuse()
    err = {name: ((decode(v) - truth).norm() / truth.norm()).item() for name, v in (("theirs", low), ("ours", fused))}
    assert err["ours"] < 5e-2 and err["ours"] <= 1.1 * err["theirs"], err


def test_compile_decoder_asks_inductor_for_pointwise_concatenation(vae, monkeypatch):
    """With inductor (the default backend), ``compile_decoder`` asks for the causal cache's
    concatenations as pointwise kernels (measured on the CPU: the decode's peak 27 → 22
    activations of the last level, docs/PERFORMANCE.md §21) where its torch has the option; a
    caller's own options are kept, and another backend gets none."""
    import copy

    from torch._inductor import config as inductor_config

    from model.vae import decode_into_cache

    seen = []

    def fake_compile(fn, **kwargs):
        assert fn is decode_into_cache
        seen.append(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    copy.deepcopy(vae).compile_decoder()
    copy.deepcopy(vae).compile_decoder(options={"max_autotune": True})
    copy.deepcopy(vae).compile_decoder(backend="eager")
    if not hasattr(inductor_config, "force_pointwise_cat"):  # a torch without the option: compiled as asked
        assert seen == [{}, {"options": {"max_autotune": True}}, {"backend": "eager"}]
        return
    assert seen == [{"options": {"force_pointwise_cat": True}},
                    {"options": {"force_pointwise_cat": True, "max_autotune": True}},
                    {"backend": "eager"}]


def _graph_runner(runs: list | None = None):
    """A Dynamo backend that runs the traced graph as it is (counting its calls in ``runs``)."""
    def backend(gm, example_inputs):
        def run(*args):
            if runs is not None:
                runs.append(1)
            return gm.forward(*args)
        return run
    return backend


def test_compiled_decoder_writes_its_cache_in_place(vae):
    """Once the cache is full the compiled decode writes each slot's new frames into the slot
    itself (a graph that returned the new cache held two, and inductor's slots kept whole
    activations alive: docs/PERFORMANCE.md §21-§22): from the first compiled frame to the last
    block, and in the next video, the cache is the same tensors in the same memory, each a
    buffer of its own in the VAE's layout (settled once, when the cache is full, even where the
    plain forward left a slot in another layout or as a view into a larger buffer), one graph,
    and the frames equal the plain decoder's."""
    import copy

    from torch._dynamo.utils import counters

    torch.manual_seed(6)
    z = torch.randn(1, 9, 16, H // 8, W // 8)
    plain = vae.streaming_decoder()
    want = [plain.decode_block(z[:, i:i + 3]) for i in (0, 3, 6)]

    fast = copy.deepcopy(vae).to_channels_last()
    torch._dynamo.reset()
    counters.clear()
    fast.compile_decoder(backend=_graph_runner())
    stream = fast.streaming_decoder()

    def where(cache):
        return [(id(c), c.data_ptr()) for c in cache if isinstance(c, torch.Tensor)]

    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            got = [stream.decode_block(z[:, :3])]  # two frames fill the cache, the third is compiled
            slots = where(stream._cache)
            got += [stream.decode_block(z[:, i:i + 3]) for i in (3, 6)]
            assert where(stream._cache) == slots
            stream.reset()
            assert torch.equal(stream.decode_block(z[:, :3]), got[0])  # the next video: the same graph
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert graphs == 1
    cached = [c for c in stream._cache if isinstance(c, torch.Tensor)]
    assert cached and all(c.is_contiguous(memory_format=torch.channels_last_3d) for c in cached)
    assert all(c.untyped_storage().nbytes() == c.nbytes for c in cached)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    # settled once the cache is full, whatever layout the plain forward left a slot in
    stream.reset()
    filled = []
    original = fast.vae.decoder.forward

    def forward_leaving_odd_slots(*args, feat_cache, **kwargs):
        out = original(*args, feat_cache=feat_cache, **kwargs)
        filled.append(1)
        if len(filled) == stream.cache_frames:  # the frame that fills the cache: half contiguous, half views
            for i, c in enumerate(feat_cache):
                if isinstance(c, torch.Tensor):
                    feat_cache[i] = c.contiguous() if i % 2 else \
                        c.new_empty(2 * c.numel()).as_strided(c.shape, c.stride(), c.numel()).copy_(c)
        return out

    fast.vae.decoder.forward = forward_leaving_odd_slots
    try:
        stream.decode_block(z[:, :stream.cache_frames])  # the plain forward fills the cache, then it is settled
    finally:
        del fast.vae.decoder.forward
    cached = [c for c in stream._cache if isinstance(c, torch.Tensor)]
    assert len(filled) == stream.cache_frames
    assert all(c.is_contiguous(memory_format=torch.channels_last_3d) for c in cached)
    assert all(c.untyped_storage().nbytes() == c.nbytes for c in cached)


@pytest.mark.slow
def test_inductor_decoder_equals_eager_and_holds_no_more_at_its_peak():
    """``compile_vae`` with inductor, as a GPU runs it (here its CPU backend: the same graph and
    the same scheduler of buffers): a VAE of Wan2.1's structure at a small width decodes as the
    plain decoder does, in one graph, and the peak of a steady block (its cache included, every
    allocation and free counted by torch.profiler as ``scripts/vae_decode_memory.py`` counts
    them) is no higher than the plain decoder's. Before the cache was written in place the
    compiled decode held 1.13 times the plain one's here (1.8 times at full size: 14 GiB on an
    H200, docs/PERFORMANCE.md §21-§22)."""
    import copy
    import importlib.util

    from torch._dynamo.utils import counters

    spec = importlib.util.spec_from_file_location("vae_decode_memory", Path(__file__).parents[1] / "scripts"
                                                  / "vae_decode_memory.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    torch.manual_seed(0)
    wan_like = WanVAE.from_config({**TINY_VAE, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2})  # Wan2.1's, narrow
    wan_like.to_channels_last().fuse()
    z = torch.randn(1, 12, 16, 2 * H // 8, 2 * W // 8)
    results = {}
    torch._dynamo.reset()
    counters.clear()
    try:
        for name in ("eager", "compiled"):
            vae = copy.deepcopy(wan_like)
            if name == "compiled":
                vae.compile_decoder()
            stream = vae.streaming_decoder()
            with torch._dynamo.config.patch(error_on_recompile=True):
                frames = [stream.decode_block(z[:, i:i + 3]) for i in (0, 3)]
                peak = script.measured_peak(stream.decode_block, z[:, 6:9], z[:, 9:12])
            cache = sum(c.nbytes for c in stream._cache if isinstance(c, torch.Tensor))
            results[name] = frames, cache + peak
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert graphs == 1
    for a, b in zip(results["compiled"][0], results["eager"][0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert results["compiled"][1] <= results["eager"][1], {k: v[1] for k, v in results.items()}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_cuda_bf16_fused_decode_is_as_close_to_fp32_as_diffusers(vae, compiled):
    """What ``build_models`` makes of the VAE on a GPU (channels-last, fused, cuDNN autotuning;
    with ``compile_vae`` inductor's decoder): four blocks decoded in bf16 on the GPU, each
    decode against the fp32 one on the CPU, are no further from it than diffusers' modules in
    bf16, contiguous, on the same GPU (cuDNN's channels-last kernels and inductor's fusions
    change the rounding, not the result), and every frame is finite."""
    import copy

    torch.manual_seed(4)
    z = torch.randn(1, 12, 16, H // 8, W // 8)
    plain = _random_norm_weights(copy.deepcopy(vae))

    def decode(v):
        stream = v.streaming_decoder()
        frames = [stream.decode_block(z[:, i:i + 3].to(v.device)) for i in range(0, 12, 3)]
        return torch.cat(frames, dim=1).float().cpu()

    truth = decode(plain)
    low = copy.deepcopy(plain).to("cuda", torch.bfloat16)
    fast = copy.deepcopy(low).to_channels_last().fuse()
    if compiled:
        fast.compile_decoder()
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        got = {"theirs": decode(low), "ours": decode(fast)}
    finally:
        torch.backends.cudnn.benchmark = before
        torch._dynamo.reset()
    assert torch.isfinite(got["ours"]).all()
    err = {name: ((out - truth).norm() / truth.norm()).item() for name, out in got.items()}
    assert err["ours"] < 5e-2 and err["ours"] <= 1.1 * err["theirs"], err


def test_compiled_streaming_decoder_equals_eager_and_stops_compiling(vae):
    """``compile_vae``: the decoder traces through its full causal cache without a graph break
    (Dynamo with a backend that runs the graph as traced and counts its calls; inductor is the GPU
    check's business): one graph, run for every latent frame once the cache is full (the first
    two of each video run the plain forward while it fills), equal output, and no recompilation,
    on every torch the project supports (diffusers' time upsamplers, which break the graph on
    torch 2.8 to 2.12, are swapped for :class:`CausalResample` first)."""
    import copy

    from torch._dynamo.utils import counters

    torch.manual_seed(5)
    z = torch.randn(1, 12, 16, H // 8, W // 8)
    plain = vae.streaming_decoder()
    want = [plain.decode_block(z[:, i:i + 3]) for i in range(0, 12, 3)]
    torch._dynamo.reset()
    counters.clear()
    runs = []
    compiled = copy.deepcopy(vae).compile_decoder(backend=_graph_runner(runs))
    stream = compiled.streaming_decoder()
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = [stream.decode_block(z[:, i:i + 3]) for i in range(0, 12, 3)]
        stream.reset()  # a new video: the same graph
        assert torch.equal(stream.decode_block(z[:, :3]), got[0])
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    torch._dynamo.reset()
    assert (graphs, breaks) == (1, 0), (graphs, dict(counters["graph_break"]))
    assert len(runs) == (12 - 2) + (3 - 2)  # every latent frame after the first two of each video
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_vae_decode_memory_script_mistakes_are_one_line():
    """``scripts/vae_decode_memory.py`` (docs/PERFORMANCE.md §21) answers a bad argument in one
    line with exit code 2, before it builds the VAE."""
    out = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "scripts" / "vae_decode_memory.py"),
                          "--blocks", "2"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].endswith("--blocks must be at least 3 "
                                                                                 "and --latent positive")
