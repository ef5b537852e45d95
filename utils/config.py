"""Configuration: ``configs/default.yaml`` merged with a user config and ``key=value`` overrides.

Every key a run may use is documented in ``configs/default.yaml``. A key that is not there (a
typo, a key from another project) is a :class:`ConfigError` naming the key and the file it came
from, so nothing silently falls back to a default. A value must have its default's kind (an
integer where the default is one, a finite number where it is a float, a mapping, a list...), so
a quoted number or a misspelt boolean is an error here, not a traceback later.
"""
from __future__ import annotations

import difflib
import logging
import math
import re
from pathlib import Path
from typing import Iterable

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from utils.errors import ConfigError, first_line

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"

DTYPE_NAMES = ("bfloat16", "float16", "float32")  # what a config's dtype keys may name


def torch_dtype(name: str):
    """The ``torch.dtype`` a config's dtype key names. torch is imported here, not with this
    module: loading a config and planning a prompt do without it (prompt mistakes and ``--dry_run``
    answer at once)."""
    import torch

    if name not in DTYPE_NAMES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, not '{name}'")
    return getattr(torch, name)


def as_dict(config) -> dict:
    """A plain dict from a dict or a DictConfig (nested lists become lists), e.g. a config's
    ``tiny_vae`` for a library's ``from_config``."""
    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)
    return dict(config)


def _read_yaml(path: Path) -> DictConfig:
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; pass a YAML file "
                          f"(see {CONFIG_DIR.relative_to(REPO_ROOT)}/)")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file "
                          f"(see {CONFIG_DIR.relative_to(REPO_ROOT)}/)")
    try:
        cfg = OmegaConf.load(path)
    except Exception as exc:  # OmegaConf's errors, yaml.YAMLError and friends, OSError
        raise ConfigError(f"cannot parse config {path}: {first_line(exc)}") from exc
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config {path} must be a mapping of keys to values")
    return cfg


# Keys whose default is not null but that take null too (documented in default.yaml).
NULLABLE = {"train.generator_ckpt"}
# Keys that take true, false or auto (the speed switches pipeline.generate resolves per device).
SWITCHES = ("compile", "compile_vae", "cuda_graphs", "decode_stream", "vae_channels_last")
# Keys whose default is a whole number but that take any number (fps: 23.976 works).
FRACTIONAL = {"fps"}
# Keys whose default is null, and what they take instead (a path, a mapping the consumer reads).
NULL_DEFAULT_KINDS = {"tiny_text_encoder": DictConfig, "tiny_vae": DictConfig, "tokenizer_path": str,
                      "subtitle_font": str, "train.score_ckpt": str}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _kind_problem(value, default, dotted: str) -> str | None:
    """What ``value`` must be where ``default`` stands, or None when it has the default's kind."""
    if dotted in SWITCHES:
        return None if value in (True, False, "auto") else "true, false or auto"
    if value is None and (default is None or dotted in NULLABLE):
        return None
    if default is None:
        kind = NULL_DEFAULT_KINDS.get(dotted)
        if kind is None or isinstance(value, kind):
            return None  # a null default admits any value; its consumer validates it
        return "null or " + ("a mapping of keys to values" if kind is DictConfig else "a string (quote it in YAML)")
    if isinstance(default, DictConfig):
        return None if isinstance(value, DictConfig) else "a mapping of keys to values"
    if isinstance(default, ListConfig):
        if not isinstance(value, ListConfig):
            return "a list"
        if len(default) and _is_number(default[0]) and not all(_is_number(v) for v in value):
            return "a list of numbers"
        return None
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false"
    if isinstance(default, float) or dotted in FRACTIONAL:
        return None if _is_number(value) else "a finite number"
    if isinstance(default, int):
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if isinstance(default, str):
        return None if isinstance(value, str) else "a string (quote it in YAML)"
    return None


def _shown(value, limit: int = 60) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        text = str(OmegaConf.to_container(value))
    else:
        text = "null" if value is None else repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _drop_unknown(cfg: DictConfig, reference, source: str, prefix: str = "") -> None:
    """Remove from ``cfg`` (in place) the keys ``reference`` does not have, with one warning: a
    config recorded by an older version of the project (a sidecar), not one a user writes."""
    for key in list(cfg.keys()):
        dotted = f"{prefix}{key}"
        if key not in reference:
            log.warning("%s: config key '%s' is no longer read; left out", source, dotted)
            del cfg[key]
        elif isinstance(cfg[key], DictConfig) and isinstance(reference[key], DictConfig) and len(reference[key]):
            _drop_unknown(cfg[key], reference[key], source, f"{dotted}.")


def _check_known(cfg, reference, source: str, prefix: str = "") -> None:
    """Raise ConfigError for the first key of ``cfg`` that ``reference`` does not have, or whose
    value is not of the reference value's kind (an integer, a number, a mapping...)."""
    for key in cfg.keys():
        dotted = f"{prefix}{key}"
        if key not in reference:
            names = sorted(str(k) for k in reference.keys())
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean '{prefix}{close[0]}'? " if close else ""
            raise ConfigError(f"unknown config key '{dotted}' in {source}; {hint}"
                              f"known keys here: {', '.join(names)} (documented in configs/default.yaml)")
        if OmegaConf.is_interpolation(cfg, key):
            continue  # a ${...} value is checked once the layers are merged and it is resolved
        sub, ref = cfg[key], reference[key]
        problem = _kind_problem(sub, ref, dotted)
        if problem is not None:
            default = f"default: {_shown(ref)}; " if isinstance(ref, (int, float, ListConfig)) else ""
            raise ConfigError(f"config key '{dotted}' in {source} must be {problem}, not {_shown(sub)} "
                              f"({default}see configs/default.yaml)")
        # Recurse only where the default is itself a mapping with fixed keys; a default of null
        # admits any mapping (e.g. tiny_vae) whose keys the consumer validates.
        if isinstance(sub, DictConfig) and isinstance(ref, DictConfig):
            _check_known(sub, ref, source, prefix=f"{dotted}.")


def safe_text(text: str) -> str:
    """``text`` with every byte that was not UTF-8 written as ``\\xNN`` (Python hands such bytes of a
    command line or a file name over as lone surrogates, which no UTF-8 file or JSON can hold):
    printable, JSON-safe, and the same string when it was valid text."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape" if _only_escapes(text) else "backslashreplace").decode(
            "utf-8", "backslashreplace")


def _only_escapes(text: str) -> bool:
    """Every surrogate in ``text`` stands for an undecodable byte (U+DC80..U+DCFF)."""
    return all(not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in text)


def parse_overrides(overrides: Iterable[str]) -> DictConfig:
    """``["a.b=1", "c=[1,2]"]`` → a config; a malformed item is a ConfigError."""
    items = list(overrides)
    for item in items:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{safe_text(item)}' is not key=value (e.g. sink_size=2 or model.num_layers=4)")
        if safe_text(item) != item:
            raise ConfigError(f"override '{safe_text(item)}' is not UTF-8 text (a byte of another encoding, such as "
                              f"Latin-1, shown as \\xNN); write it in UTF-8")
    try:
        return OmegaConf.from_dotlist(items)
    except (OmegaConfBaseException, yaml.YAMLError) as exc:  # yaml: control characters and the like
        raise ConfigError(f"cannot parse overrides {items}: {first_line(exc)}") from exc


def load_config(path: str | Path | None = None, overrides: Iterable[str] = (),
                recorded: tuple[str, dict] | None = None) -> DictConfig:
    """Merge default.yaml ← ``path`` ← ``overrides`` and validate every key and a few invariants.
    ``recorded``: ``(where, config)``, a whole config as a video's sidecar keeps it, in the place of
    ``path`` (``inference.py --replay``)."""
    base = _read_yaml(DEFAULT_CONFIG)
    layers = []
    if path is not None:
        user = _read_yaml(Path(path))
        _check_known(user, base, str(path))
        layers.append(user)
    if recorded is not None:
        where, config = recorded
        try:
            layer = OmegaConf.create(config)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"{where} cannot be read as a config: {str(exc).splitlines()[0]}") from exc
        _drop_unknown(layer, base, where)  # a video recorded before a key was renamed still renders
        _check_known(layer, base, where)
        layers.append(layer)
    over = parse_overrides(overrides)
    _check_known(over, base, "the command-line overrides")
    layers.append(over)
    try:
        cfg = OmegaConf.merge(base, *layers)
        OmegaConf.resolve(cfg)  # ${...} interpolations, in place
    except OmegaConfBaseException as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"config values do not fit the defaults or do not resolve: {first}") from exc
    _check_known(cfg, base, "the config (its ${...} resolved)")
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Invariants between keys; each failure names the key and what to change."""

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    _validate_model(cfg, need)
    need(cfg.num_frame_per_block >= 1, "num_frame_per_block must be >= 1")
    need(cfg.sink_size >= 0, "sink_size must be >= 0")
    need(cfg.local_attn_size >= cfg.sink_size + cfg.num_frame_per_block,
         f"local_attn_size ({cfg.local_attn_size}) must hold the sink ({cfg.sink_size}) and one block "
         f"({cfg.num_frame_per_block}); raise local_attn_size")
    context = cfg.local_attn_size - cfg.sink_size - cfg.num_frame_per_block
    need(0 <= cfg.flush_keep <= context,
         f"flush_keep ({cfg.flush_keep}) must be between 0 and the context frames of the window "
         f"(local_attn_size - sink_size - num_frame_per_block = {context})")
    need(cfg.position_policy in ("absolute", "relativistic"),
         f"position_policy must be 'absolute' or 'relativistic', not '{cfg.position_policy}'")
    need(cfg.rope_cut_offset >= 0, "rope_cut_offset must be >= 0")
    need(len(cfg.denoising_step_list) >= 1, "denoising_step_list must have at least one step")
    need(all(0 < s <= cfg.num_train_timestep for s in cfg.denoising_step_list),
         f"denoising_step_list values must lie in (0, num_train_timestep={cfg.num_train_timestep}]")
    need(MIN_FPS <= cfg.fps <= MAX_FPS, f"fps ({cfg.fps}) must be between {MIN_FPS} and {MAX_FPS} frames per second")
    need(isinstance(cfg.device, str) and re.fullmatch(r"cpu|cuda(:\d+)?", cfg.device) is not None,
         f"device must be cpu, cuda or cuda:N (an NVIDIA GPU), not {_shown(cfg.device)}")
    need(cfg.height > 0 and cfg.width > 0, f"height ({cfg.height}) and width ({cfg.width}) must be > 0")
    need(-2**63 <= cfg.seed < 2**63, f"seed ({cfg.seed}) must fit in 64 bits (between -2**63 and 2**63 - 1)")
    for key in ("dtype", "text_encoder_dtype"):
        need(cfg[key] in DTYPE_NAMES, f"{key} must be one of {', '.join(DTYPE_NAMES)}, not '{cfg[key]}'")
    need(cfg.default_segment_seconds > 0, "default_segment_seconds must be > 0")
    need(cfg.attention_key_splits >= 1, f"attention_key_splits ({cfg.attention_key_splits}) must be >= 1 "
         f"(1: one attention kernel over all the keys)")
    if cfg.subtitle_font is not None:  # loaded once the models are built: a wrong path is an error now, not then
        font = Path(cfg.subtitle_font).expanduser()
        what = "is a folder" if font.is_dir() else "does not exist"
        need(font.is_file(), f"subtitle_font {cfg.subtitle_font} {what}; give a .ttf, .otf or .ttc file, or leave "
             f"it null for the bundled font (utils/video.py load_font reads it)")
    need(cfg.live.ahead_blocks >= 1, f"live.ahead_blocks ({cfg.live.ahead_blocks}) must be >= 1")
    need(0 <= cfg.live.port <= 65535, f"live.port ({cfg.live.port}) must be between 0 and 65535")
    need(all(isinstance(o, str) and re.fullmatch(r"https?://[^/\s]+", o) for o in cfg.live.allowed_origins),
         f"live.allowed_origins must be a list of origins such as 'https://my-gpu.example.com' (scheme and host, "
         f"no path), not {_shown(cfg.live.allowed_origins)}")
    need(1 <= cfg.live.jpeg_quality <= 95, f"live.jpeg_quality ({cfg.live.jpeg_quality}) must be between 1 and 95")
    need(cfg.live.max_message_bytes >= 1024 and cfg.live.max_text_chars >= 1,
         "live.max_message_bytes must be >= 1024 and live.max_text_chars >= 1")


# A video's frame rate: below one frame a second the blocks are slides, and ffmpeg's mp4 timing
# fails at rates near 1e-6; above a thousand no player shows the frames.
MIN_FPS, MAX_FPS = 1, 1000
# model keys that are sizes and counts (widths, channels, heads, blocks, tokens)
MODEL_SIZES = ("dim", "ffn_dim", "freq_dim", "in_dim", "out_dim", "num_heads", "num_layers", "text_len", "text_dim")
# tiny_text_encoder keys (UMT5Config) that are sizes and counts, and tiny_vae's (AutoencoderKLWan)
TEXT_ENCODER_SIZES = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                      "relative_attention_num_buckets", "relative_attention_max_distance")
VAE_SIZES = ("base_dim", "z_dim", "decoder_base_dim")


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate_model(cfg: DictConfig, need) -> None:
    """The DiT's and the tiny models' sizes, before any of them is built: each failure names the
    key (a zero head count would divide by zero, a zero patch build a convolution of no size...)."""
    m = cfg.model
    for key in MODEL_SIZES:  # integers already (their defaults are)
        need(m[key] >= 1, f"model.{key} ({m[key]}) must be a positive integer")
    need(m.freq_dim % 2 == 0, f"model.freq_dim ({m.freq_dim}) must be even: the timestep embedding is "
                              f"a cosine half and a sine half")
    need(m.out_dim == m.in_dim, f"model.out_dim ({m.out_dim}) must equal model.in_dim ({m.in_dim}): the DiT "
                                f"predicts noise - x0 of the latent it is given")
    need(m.eps > 0, f"model.eps ({m.eps}) must be > 0")
    need(m.rope_theta > 0, f"model.rope_theta ({m.rope_theta}) must be > 0 (RoPE frequencies are its powers)")
    patch = m.patch_size
    need(len(patch) == 3 and all(_whole(v) and v >= 1 for v in patch),
         f"model.patch_size ({_shown(patch)}) must be a list of 3 positive integers (t, h, w)")
    need(patch[0] == 1, f"model.patch_size ({_shown(patch)}) must start with 1: every latent frame has a "
                        f"timestep of its own")
    need(m.dim % m.num_heads == 0, f"model.dim ({m.dim}) must be divisible by model.num_heads ({m.num_heads})")
    head_dim = m.dim // m.num_heads
    need(head_dim % 2 == 0 and head_dim >= 6,
         f"head dim model.dim/model.num_heads = {head_dim} must be even and >= 6 for 3D RoPE")
    te = cfg.tiny_text_encoder
    if te is not None:
        for key in TEXT_ENCODER_SIZES:
            need(key not in te or (_whole(te[key]) and te[key] >= 1),
                 f"tiny_text_encoder.{key} must be a positive integer, not {_shown(te.get(key))}")
        need("dropout_rate" not in te or (_is_number(te.dropout_rate) and 0 <= te.dropout_rate < 1),
             f"tiny_text_encoder.dropout_rate must be a number in [0, 1), not {_shown(te.get('dropout_rate'))}")
        need("layer_norm_epsilon" not in te or (_is_number(te.layer_norm_epsilon) and te.layer_norm_epsilon > 0),
             f"tiny_text_encoder.layer_norm_epsilon must be a number > 0, not {_shown(te.get('layer_norm_epsilon'))}")
        need(not cfg.random_init or "d_model" not in te or te.d_model == m.text_dim,
             f"tiny_text_encoder.d_model ({te.get('d_model')}) must equal model.text_dim ({m.text_dim}): the DiT "
             f"reads the text encoder's output")
    vae = cfg.tiny_vae
    if vae is not None:
        for key in VAE_SIZES:
            optional = key == "decoder_base_dim" and vae.get(key) is None  # null: base_dim
            need(key not in vae or optional or (_whole(vae[key]) and vae[key] >= 1),
                 f"tiny_vae.{key} must be a positive integer, not {_shown(vae.get(key))}")
        need("num_res_blocks" not in vae or (_whole(vae.num_res_blocks) and vae.num_res_blocks >= 0),
             f"tiny_vae.num_res_blocks must be an integer >= 0, not {_shown(vae.get('num_res_blocks'))}")
        mult = vae.get("dim_mult")
        need(mult is None or (isinstance(mult, ListConfig) and len(mult) >= 1
                              and all(_whole(v) and v >= 1 for v in mult)),
             f"tiny_vae.dim_mult must be a list of positive integers (a channel multiplier per level), "
             f"not {_shown(mult)}")
        down = vae.get("temperal_downsample")
        need(down is None or (isinstance(down, ListConfig) and all(isinstance(v, bool) for v in down)),
             f"tiny_vae.temperal_downsample must be a list of true/false, not {_shown(down)}")
        need(mult is None or down is None or len(down) == len(mult) - 1,
             f"tiny_vae.temperal_downsample ({_shown(down)}) must have one entry per downsampling level, "
             f"len(tiny_vae.dim_mult) - 1 = {len(mult or ()) - 1}")
        need(not cfg.random_init or "z_dim" not in vae or vae.z_dim == m.in_dim,
             f"tiny_vae.z_dim ({vae.get('z_dim')}) must equal model.in_dim ({m.in_dim}): the DiT's latents are "
             f"the VAE's")
