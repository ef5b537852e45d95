"""Text → video file: ties the grammar, plan, text encoder, rollout, streaming decoder,
subtitles and the mp4 writer together.

Every latent block is decoded as it comes out of the rollout, its frames get their segment's
subtitle, and they are appended to the mp4 at once: memory is the model, the KV cache and one
block of frames, whatever the length of the video.
"""
from __future__ import annotations

import functools
import importlib.util
import itertools
import json
import logging
import os
import shutil
import sysconfig
import threading
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from model.text_encoder import TextEncoder
from model.vae import WanVAE
from model.wan import WanDiT
from pipeline.plan import Plan, plan_prompt
from pipeline.rollout import BlockSpec, RolloutSettings, plan_blocks, rollout
from utils.checkpoint import load_dit_weights
from utils.config import SWITCHES, safe_text, torch_dtype
from utils.errors import ConfigError, OutputError, first_line
from utils.fs import reason
from utils.video import PendingFrames, SubtitleRenderer, VideoWriteError, VideoWriter, partial_name

log = logging.getLogger(__name__)

# Wan and Self-Forcing precompute RoPE angles for this many temporal positions; plain (absolute)
# Self-Forcing cannot go past it. Only used for a warning: our positions are computed.
ABSOLUTE_TABLE_POSITIONS = 1024


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {name!r}; use cuda, cuda:N or cpu") from exc
    if device.type not in ("cpu", "cuda"):  # the config check says the same for the CLI; scripts come here
        raise ConfigError(f"device must be cpu, cuda or cuda:N (an NVIDIA GPU), not {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device is 'cuda' but no CUDA GPU is available; use the CPU (device=cpu in the config "
                          "or as a trailing override), e.g. with configs/tiny.yaml")
    return device


@dataclass
class DecodedBlock:
    """One block as written to the video: ``frames`` (``len`` n; ``frames.numpy()``: uint8
    ``[n, H, W, 3]``, subtitled, trimmed) are video frames ``first_frame .. first_frame + n`` and
    were decoded from ``latents`` ``[1, f, C, h, w]``; ``spec`` says which event and segment the
    block had."""

    index: int
    spec: BlockSpec
    latents: torch.Tensor
    frames: PendingFrames
    first_frame: int


@dataclass
class Models:
    dit: WanDiT
    text_encoder: TextEncoder
    vae: WanVAE
    device: torch.device


def compile_cache_dir() -> Path:
    """Where ``torch.compile`` keeps what it compiled (inductor's FX graph and autograd caches, the
    Triton kernels): ``TORCHINDUCTOR_CACHE_DIR`` when the user set it, else
    ``~/.cache/infinity-rope/torchinductor`` (``$XDG_CACHE_HOME`` if set). torch's own default is
    under /tmp, which many machines clear at a reboot or after each job; here a later run finds
    the kernels and skips most of the compile. (Importing diffusers already writes torch's
    default into the variable, so that value counts as unset.)"""
    path = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
        torch_default = os.path.abspath(default_cache_dir())
    except ImportError:  # another torch layout: only an unset variable is replaced
        torch_default = None
    if not path or os.path.abspath(path) == torch_default:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        ours = os.path.join(base, "infinity-rope", "torchinductor")
        try:
            os.makedirs(ours, exist_ok=True)
            writable = os.access(ours, os.W_OK)
        except OSError:
            writable = False
        if not writable:  # a read-only home: torch's default it is
            log.warning("cannot write %s; torch.compile caches in %s", ours, path or torch_default)
            return Path(path or torch_default or ours)
        path = os.environ["TORCHINDUCTOR_CACHE_DIR"] = ours
    return Path(path)


def compile_unsupported(device: torch.device) -> str | None:
    """Why ``torch.compile`` cannot generate kernels for ``device``, or None. On a GPU inductor
    writes Triton kernels, so it needs Triton, a GPU that Triton supports (compute capability 7.0
    or newer), and what Triton builds its kernel launcher with: a C compiler (``$CC``, gcc or
    clang) and Python's headers. On a CPU it writes C++, and a failed compile names what is
    missing."""
    if device.type != "cuda":
        return None
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (torch's Linux CUDA wheels bring it: pip install triton)"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 7:
        return (f"{torch.cuda.get_device_name(device)} has compute capability {major}.{minor}; "
                f"Triton needs 7.0 or newer")
    if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
        return "no C compiler found, which Triton builds its kernel launcher with (install gcc, or set CC)"
    headers = sysconfig.get_paths()["include"]
    if not os.path.isfile(os.path.join(headers, "Python.h")):
        return (f"Python's headers are missing ({headers}/Python.h), which Triton builds its kernel launcher "
                f"with (install python{sysconfig.get_python_version()}-dev or your distribution's equivalent)")
    return None


def resolve_switches(cfg, device: torch.device) -> None:
    """Turn each ``auto`` speed switch into true or false for ``device``, in place (so everything
    downstream, the run's sidecar included, sees what ran), and refuse an explicit ``true`` the
    device cannot run: ``compile`` and ``compile_vae`` need Triton on a GPU, ``cuda_graphs`` and
    ``decode_stream`` a GPU (``vae_channels_last`` is a layout any device runs). Idempotent.
    ``auto`` turns each on for a GPU only: on a CPU the first blocks would spend seconds to
    minutes compiling C++ for a gain that the GPU numbers are about, and the channels-last VAE
    was measured on a GPU."""
    why_not_compile = compile_unsupported(device)
    for key in SWITCHES:
        value = cfg[key]
        possible = {"compile": why_not_compile is None, "compile_vae": why_not_compile is None,
                    "vae_channels_last": True}.get(key, device.type == "cuda")
        if value == "auto":
            cfg[key] = device.type == "cuda" and possible
            if device.type == "cuda" and not possible:
                log.info("%s=auto: off, %s", key, why_not_compile)
        elif value and not possible:
            if key in ("compile", "compile_vae"):
                raise ConfigError(f"{key}=true cannot run on {device}: {why_not_compile}; set {key}=false")
            raise ConfigError(f"{key}=true needs device: cuda (this run is on {device.type}); set {key}=false")


RANDOM_WEIGHTS_SEED = 0  # random_init: every model's weights are drawn from this seed


def build_models(cfg, checkpoint_path: str | None = None, use_ema: bool | None = None,
                 device: torch.device | None = None) -> Models:
    """The DiT (from the checkpoint, or random with ``random_init``), UMT5 and the VAE."""
    device = device or resolve_device(cfg.device)
    resolve_switches(cfg, device)  # before any weights load
    dtype = torch_dtype(cfg.dtype)
    text_dtype = torch_dtype(cfg.text_encoder_dtype)
    text_device = torch.device("cpu") if cfg.offload_text_encoder else device
    wan_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    if cfg.random_init:
        if cfg.tiny_text_encoder is None or cfg.tokenizer_path is None:
            raise ConfigError("random_init needs tiny_text_encoder and tokenizer_path "
                              "(see configs/tiny.yaml)")
        # the weights do not depend on the run's seed, which draws only the noise (as with real
        # weights): a live session started with another seed replays with that --seed
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        with torch.device(device):  # drawn where they run: a 1.3B DiT takes ~10 s to draw on a CPU
            dit = WanDiT(**wan_cfg)
            vae = WanVAE.from_config(cfg.tiny_vae if cfg.tiny_vae is not None else {})
        text_encoder = TextEncoder.from_config(cfg.tiny_text_encoder, cfg.tokenizer_path, cfg.model.text_len)
        log.info("random weights: DiT with %d parameters", sum(p.numel() for p in dit.parameters()))
    else:
        # Build on the meta device, then load: no 1.3B random init, no double memory.
        with torch.device("meta"):
            dit = WanDiT(**wan_cfg)
        dit.to_empty(device="cpu")
        load_dit_weights(dit, checkpoint_path or cfg.checkpoint_path,
                         use_ema=cfg.use_ema if use_ema is None else use_ema)
        text_encoder = TextEncoder.from_pretrained(cfg.wan_model_path, text_len=cfg.model.text_len,
                                                   dtype=text_dtype, device=text_device)
        vae = WanVAE.from_pretrained(cfg.wan_model_path, dtype=dtype, device=device)
    if text_encoder.dim != cfg.model.text_dim:
        raise ConfigError(f"text encoder width {text_encoder.dim} != model.text_dim {cfg.model.text_dim}")
    dit = dit.to(device=device, dtype=dtype).eval().requires_grad_(False)
    text_encoder = text_encoder.to(device=text_device, dtype=text_dtype).eval()
    vae = vae.to(device=device, dtype=dtype).eval()
    if cfg.random_init and device.type == "cuda":
        torch.cuda.empty_cache()  # the float32 weights drawn on the GPU, now cast
    log.info("speed switches on %s: %s", device,
             ", ".join(f"{k}={str(bool(cfg[k])).lower()}" for k in SWITCHES))
    if cfg.compile or cfg.compile_vae:
        log.info("torch.compile: the first blocks compile (once; the kernels are cached in %s, "
                 "TORCHINDUCTOR_CACHE_DIR, for later runs)", compile_cache_dir())
    dit.pack_qkv()  # self-attention's q, k, v in one GEMM (no memory added; docs/PERFORMANCE.md §24)
    if cfg.attention_key_splits > 1:  # before the compile, which bakes it in
        check_split_attention(dit, device, dtype, cfg.attention_key_splits)
        dit.split_attention_keys(cfg.attention_key_splits)
    if cfg.compile:
        for block in dit.blocks:
            block.compile()
    if cfg.cuda_graphs:
        dit.use_cuda_graphs()
    if cfg.vae_channels_last:
        # the VAE channels-last and in its dtype throughout: its norms one pass over the (innermost)
        # channels, no float32 copies, no padded copies before its convolutions; cuDNN times its
        # algorithms once per convolution shape (a few, the streaming decode's) and keeps the
        # fastest (docs/PERFORMANCE.md §17)
        vae.to_channels_last().fuse()
        torch.backends.cudnn.benchmark = True
    if cfg.compile_vae:
        vae.compile_decoder()
    return Models(dit=dit, text_encoder=text_encoder, vae=vae, device=device)


def check_split_attention(dit: WanDiT, device: torch.device, dtype: torch.dtype, splits: int) -> None:
    """``attention_key_splits`` > 1 calls the attention kernel that returns log-sum-exps itself
    (cuDNN's on a GPU, which needs bf16/fp16 and a recent GPU): one call on a few tokens says
    whether it runs here, so that a config it cannot serve is one line now, not a traceback in
    the first block."""
    import model.wan as wan

    probe = torch.ones(1, dit.num_heads, 8, dit.head_dim, device=device, dtype=dtype)  # (no random draw)
    try:
        wan.attention_with_lse(probe, probe, probe)
    except RuntimeError as exc:
        raise ConfigError(f"attention_key_splits={splits} needs an attention kernel that returns its log-sum-exp, "
                          f"which {device} cannot run in {str(dtype).replace('torch.', '')} ({first_line(exc)}); "
                          "set attention_key_splits=1") from exc


def load_image(path: str | Path, width: int, height: int) -> torch.Tensor:
    """An image file → ``[1, 1, 3, height, width]`` in [-1, 1], resized to cover and centre-cropped."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        img = ImageOps.exif_transpose(Image.open(path))  # a phone photo's orientation tag, applied
        if img.mode.startswith("I"):  # 16-bit greyscale: RGB conversion would clip it to white
            img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257).clip(0, 255).astype(np.uint8))
        img = img.convert("RGB")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise ConfigError(f"cannot read image {path}: {exc}; pass a PNG or JPEG file") from exc
    scale = max(width / img.width, height / img.height)
    size = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
    img = img.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    img = img.crop((left, top, left + width, top + height))
    pixels = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()) / 127.5 - 1.0
    return pixels.permute(2, 0, 1)[None, None]


SLUG_CHARS = 48  # the most characters of a video's name taken from its first action


def slug(text: str) -> str:
    """The words of ``text`` for a file name: its letters (any script, with their accents) and
    digits, lower case, ``-`` for everything between them, at most :data:`SLUG_CHARS` characters
    and no ``-`` at either end; ``video`` when it has none. ``Ünïcödé fox`` → ``ünïcödé-fox``."""
    text = unicodedata.normalize("NFC", text).lower()
    kept = "".join(c if c.isalnum() or unicodedata.category(c).startswith("M") else " " for c in text)
    return "-".join(kept.split())[:SLUG_CHARS].strip("-") or "video"


def output_name(folder: Path, index: int, text: str, seed: int, reserve: bool = False) -> Path:
    """A safe, unique file name: ``003_a-fox-runs_seed42.mp4`` (``-1``, ``-2``… if taken) from the
    prompt's number, its first segment's ``text`` (:func:`slug`; a live session: its first action)
    and the seed. ``reserve``: take it atomically for a :class:`VideoWriter` by creating its (empty)
    partial file, so renders running at once into one folder never pick the same name."""
    stem = f"{index:03d}_{slug(text)}_seed{seed}"
    for n in itertools.count():
        path = folder / (f"{stem}-{n}.mp4" if n else f"{stem}.mp4")
        if path.exists() or path.with_suffix(".json").exists() or partial_name(path).exists():
            continue
        if not reserve:
            return path
        try:
            partial_name(path).open("x").close()
        except FileExistsError:  # another render is writing it
            continue
        if not path.exists():
            return path
        partial_name(path).unlink()  # finished by another render between the check and the reservation


def needs_warm_up(cfg, device: torch.device) -> bool:
    """Whether a live session should warm up first (:meth:`VideoGenerator.warm_up`): on a GPU
    (kernel plans, and the compile and captures of the defaults) or when anything compiles."""
    return device.type == "cuda" or bool(cfg.compile or cfg.cuda_graphs or cfg.compile_vae)


class _DiscardFrames:
    """A writer for the warm-up: finishes each block's frames (the uint8 conversion and the copy
    to the host, as a real writer's thread would) and keeps nothing."""

    def write(self, frames: PendingFrames) -> None:
        frames.numpy()


class VideoGenerator:
    TEXTS_KEPT = 64  # distinct texts whose embeddings are kept (encode_text)

    def __init__(self, cfg, models: Models):
        self.cfg, self.m = cfg, models
        self.settings = RolloutSettings.from_config(cfg)
        self.latent_shape = models.vae.latent_shape(int(cfg.height), int(cfg.width))
        p = models.dit.patch_size
        if self.latent_shape[1] % p[1] or self.latent_shape[2] % p[2]:
            raise ConfigError(f"latent size {self.latent_shape[1:]} must be divisible by the patch size {p[1:]}; "
                              f"change height/width")
        if self.latent_shape[0] != models.dit.in_dim:
            raise ConfigError(f"VAE z_dim {self.latent_shape[0]} != model.in_dim {models.dit.in_dim}")
        self.cache = self.settings.new_cache(models.dit, 1, self.latent_shape[1:])
        self.decoder = models.vae.streaming_decoder()
        # decode_stream: each block decoded on a stream of its own, while the DiT generates the next
        resolve_switches(cfg, models.device)
        self.decode_stream = torch.cuda.Stream(models.device) if cfg.decode_stream else None
        self.subtitles = SubtitleRenderer(int(cfg.width), int(cfg.height), font_path=cfg.subtitle_font)
        self.lock = threading.Lock()  # held by a live session: one rollout at a time on this cache
        self._kept: OrderedDict[str, torch.Tensor] = OrderedDict()  # text -> embedding (host), see encode_text
        self._kept_lock = threading.Lock()  # live actions are encoded in threads of their own

    def plan(self, prompt: str, image_start: bool = False) -> Plan:
        return plan_prompt(prompt, self.cfg, self.m.vae.temporal_factor, image_start)

    def encode_text(self, text: str) -> torch.Tensor:
        """One prompt's embedding ``[1, text_len, text_dim]`` on the DiT's device and dtype.
        Batch and live inference both encode one text at a time, so a live session and the
        replay of its transcript see the same embeddings, bit for bit. The embeddings of the
        last :attr:`TEXTS_KEPT` distinct texts stay in host memory (4 MiB each at full size), so a
        text seen again (a live session going back to "the fox walks", a prompt file's repeated
        segment) costs a copy instead of an encode (1.4 s for umt5-xxl offloaded to a 2-core CPU)."""
        return self.keep_text(text).to(self.m.device)

    def keep_text(self, text: str) -> torch.Tensor:
        """The embedding of ``text`` in host memory, encoded now unless it is among the last
        :attr:`TEXTS_KEPT` distinct texts (:meth:`encode_text` copies it to the device); a live
        session encodes an action when it is sent, before it lands."""
        with self._kept_lock:
            kept = self._kept.pop(text, None)
            if kept is not None:
                self._kept[text] = kept  # the most recently used go last
        if kept is None:
            kept = self.m.text_encoder([text]).to("cpu", torch_dtype(self.cfg.dtype))
            with self._kept_lock:
                self._kept[text] = kept
                while len(self._kept) > self.TEXTS_KEPT:
                    self._kept.popitem(last=False)
        return kept

    def encode_texts(self, plan: Plan) -> list[torch.Tensor]:
        """One embedding per segment, computed once per distinct text."""
        by_text = {t: self.encode_text(t) for t in dict.fromkeys(s.text for s in plan.segments)}
        return [by_text[s.text] for s in plan.segments]

    def image_latent(self, image: str | Path) -> torch.Tensor:
        """The first latent frame ``[1, 1, C, h, w]`` of an image start."""
        pixels = load_image(image, int(self.cfg.width), int(self.cfg.height))
        return self.m.vae.encode(pixels).to(self.m.device, torch_dtype(self.cfg.dtype))

    def warn_absolute_positions(self, latent_frames: int) -> None:
        if self.settings.policy == "absolute" and latent_frames > ABSOLUTE_TABLE_POSITIONS:
            log.warning("position_policy=absolute: %d latent frames reach temporal positions past %d, where the "
                        "reference implementation's RoPE table ends (the model was trained on far fewer); "
                        "expect the video to degrade; position_policy=relativistic has no such limit",
                        latent_frames, ABSOLUTE_TABLE_POSITIONS)

    def render(self, blocks: Iterable[BlockSpec], writer: VideoWriter, *, seed: int,
               subtitles: Sequence[str | None], image_latent: torch.Tensor | None = None,
               total_frames: int | None = None) -> Iterator[DecodedBlock]:
        """The one inference path, batch and live: roll out ``blocks`` (read lazily, see
        :func:`~pipeline.rollout.rollout`), decode each latent block as it comes, burn in its
        segment's subtitle (``subtitles[segment]``), append the frames to ``writer`` and yield
        the block. ``total_frames`` trims the last block (a plan's exact length); an
        ``image_latent``'s frame is written first, as part of block 0."""
        generator = torch.Generator(device=self.m.device).manual_seed(int(seed))
        self.decoder.reset()
        try:
            lead = None if image_latent is None else self._decode(image_latent).numpy()
            written = 0
            for index, (spec, latents) in enumerate(rollout(self.m.dit, self.cache, self.settings, blocks,
                                                            latent_shape=self.latent_shape, generator=generator,
                                                            image_latent=image_latent)):
                # uint8 conversion and device→host copy queued on the GPU; the subtitle, and the waiting,
                # happen where the frames are needed (the writer's thread for a batch render)
                frames = self._decode(latents, lead=lead, finish=functools.partial(
                    self.subtitles.render, text=subtitles[spec.segment]),
                    stop=None if total_frames is None else total_frames - written)
                lead = None
                writer.write(frames)
                yield DecodedBlock(index, spec, latents, frames, written)
                written += len(frames)
        finally:
            # the decoder's causal cache (1.8 GiB at full size) is this video's: freed when it ends,
            # however it ends, not held until the next render (an idle live server, a DiT-only run)
            self.decoder.reset()

    def warm_up(self, image: str | Path | None = None) -> float:
        """Run every kind of block this rollout has through the whole path (rollout, decode,
        frames), each at least twice, so that what a process does once (``torch.compile``'s
        compiling, a CUDA graph's capture, cuBLAS's and cuDNN's plans, the decoder's first frames)
        happens now instead of in a user's first blocks; a live session's first action then
        takes the steady time. The layouts: the first block, the blocks until the window is full
        and a steady one, after a KV Flush and after a RoPE Cut, the first block's clean pass of a
        second video, and with ``image`` (the sessions' start picture) the picture's frame
        committed alone and the first block attending to it. Nothing is written, and every render
        starts from a reset cache and decoder anyway, so the videos after it are the ones without
        it. Returns its seconds."""
        start = time.perf_counter()
        context = self.encode_text("warm-up")
        first = ["start"] + [None] * (self.settings.first_steady_block + 1)
        videos = [(first + ["flush", None, "flush", None, "cut", None, "cut", None], None), (["start"], None)]
        if image is not None:
            videos += [(["start"], self.image_latent(image))] * 2
        for events, image_latent in videos:
            for _ in self.render((BlockSpec(e, context) for e in events), _DiscardFrames(), seed=0,
                                 subtitles=[None], image_latent=image_latent):
                pass
        if self.m.device.type == "cuda":
            torch.cuda.synchronize(self.m.device)
        return time.perf_counter() - start

    def _decode(self, latents: torch.Tensor, **pending) -> PendingFrames:
        """Decode a latent block and queue its frames' uint8 conversion and copy to the host.
        With a decode stream, that work is queued there after the latents are ready, and the
        DiT's next block, queued next on the main stream, runs alongside it; the decoder's state
        lives on that stream, and the latents are kept from reuse until it has read them."""
        if self.decode_stream is None:
            return PendingFrames(self.decoder.decode_block(latents)[0], **pending)
        self.decode_stream.wait_stream(torch.cuda.current_stream(self.m.device))
        latents.record_stream(self.decode_stream)
        with torch.cuda.stream(self.decode_stream):
            return PendingFrames(self.decoder.decode_block(latents)[0], **pending)

    def generate(self, prompt: str, path: Path, seed: int, checkpoint: str | None = None,
                 image: str | Path | None = None) -> dict:
        """Render ``prompt`` into ``path`` (mp4) and a sidecar ``path.json``; returns the record.
        ``image``: start from this picture (encoded as the first latent frame) instead of noise."""
        try:
            plan = self.plan(prompt, image_start=image is not None)
            contexts = self.encode_texts(plan)
            image_latent = None if image is None else self.image_latent(image)
            # the config as this video ran: its seed is this video's (seed, seed + 1... of --num_samples)
            record = {"prompt": prompt, "seed": int(seed), **recorded_paths(self.cfg, checkpoint, image),
                      "plan": plan.to_json_dict(),
                      "config": {**OmegaConf.to_container(self.cfg, resolve=True), "seed": int(seed)},
                      "video": path.name, "frames_written": 0, "complete": False}
            sidecar_bytes(record)  # a record that cannot be written fails now, not after the render
        except BaseException:
            _unreserve(path)
            raise
        self.warn_absolute_positions(plan.total_blocks * plan.frames_per_block + plan.lead_frames)
        start = time.perf_counter()
        written = 0
        try:
            # background: ffmpeg is fed by a thread while the next block is generated
            with VideoWriter(path, fps=float(self.cfg.fps), width=int(self.cfg.width),
                             height=int(self.cfg.height), background=True) as writer:
                blocks = self.render(plan_blocks(plan.block_events, plan.block_segment, contexts), writer,
                                     seed=seed, subtitles=[s.subtitle for s in plan.segments],
                                     image_latent=image_latent, total_frames=plan.total_frames)
                for block in tqdm(blocks, total=plan.total_blocks, desc=path.stem[:24], unit="block"):
                    written = block.first_frame + len(block.frames)
            record["complete"] = True
        except VideoWriteError as exc:  # disk full & co: the frames ffmpeg finished are kept
            written, record["error"] = exc.frames_kept, safe_text(str(exc))
            raise
        finally:
            record["frames_written"] = written
            record["seconds_elapsed"] = round(time.perf_counter() - start, 3)
            if path.exists():
                try:
                    write_sidecar(path, record)
                except OutputError as exc:
                    if record["complete"]:
                        raise
                    log.error("%s", exc)  # the video's own error is the one reported
        log.info("wrote %s: %d frames (%.2f s of video) in %.1f s", path, written, written / float(self.cfg.fps),
                 record["seconds_elapsed"])
        return record


def _unreserve(path: Path) -> None:
    """Give back a name :func:`output_name` reserved and no writer took (its empty partial file)."""
    partial = partial_name(path)
    if partial.is_file() and partial.stat().st_size == 0:
        partial.unlink(missing_ok=True)


def recorded_paths(cfg, checkpoint: str | Path | None, image: str | Path | None) -> dict:
    """The checkpoint (none with random weights) and start image of a video as its sidecar records
    them: text a JSON file holds (a byte of the path that is not UTF-8 as ``\\xNN``)."""
    return {"checkpoint": None if cfg.random_init or checkpoint is None else safe_text(str(checkpoint)),
            "image": None if image is None else safe_text(str(image))}


def sidecar_bytes(record: dict) -> bytes:
    """A video's record as the sidecar holds it: UTF-8 JSON (a text that is not UTF-8 raises)."""
    return json.dumps(record, indent=2, ensure_ascii=False).encode("utf-8")


def write_sidecar(video: Path, record: dict) -> None:
    """The record of a video as ``<video>.json``, replaced atomically (a reader never sees half)."""
    target = video.with_suffix(".json")
    tmp = target.with_name(f".{target.name}.tmp")
    data = sidecar_bytes(record)  # fails before any file is opened
    try:
        tmp.write_bytes(data)
        os.replace(tmp, target)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if not isinstance(exc, OSError):
            raise
        raise OutputError(f"cannot write {target}: {reason(exc)}; free some space or pass another "
                          f"--output_folder") from exc
