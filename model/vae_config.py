"""The Wan VAE's config, read without building the network and without importing torch.

A prompt's plan needs the VAE's temporal compression (video frames per latent frame), and prompt
mistakes and ``--dry_run`` are answered before anything heavy loads, so this module imports only
the standard library and the project's config and errors (diffusers only when a config leaves the
compression to ``AutoencoderKLWan``'s defaults). ``model.vae`` builds and runs the VAE.
"""
from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from pathlib import Path

from utils.config import as_dict
from utils.errors import WAN_DOWNLOAD_HINT, WeightsMissingError, first_line


def autoencoder_cls():
    """diffusers' ``AutoencoderKLWan``, imported on first use (it takes seconds; a plan whose VAE
    config names its compression does without it)."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan


def compression_factors(config: Mapping) -> tuple[int, int]:
    """(spatial, temporal) compression of an ``AutoencoderKLWan`` config (keys it lacks take the
    class defaults, which are Wan2.1's), without building the network: 8 and 4 for Wan2.1."""
    cfg = dict(config)
    if not {"dim_mult", "temperal_downsample"} <= set(cfg):
        defaults = {k: p.default for k, p in inspect.signature(autoencoder_cls().__init__).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        cfg = {**defaults, **cfg}
    levels = len(cfg["dim_mult"]) - 1  # the encoder downsamples after every level but the last
    patch = cfg.get("patch_size") or 1
    return 2 ** levels * patch, 2 ** sum(bool(t) for t in list(cfg["temperal_downsample"])[:levels])


def config_of(random_config: Mapping | None, wan_model_path: str | Path | None) -> dict:
    """The VAE config a run will use, read without loading weights (for plans and dry runs)."""
    if random_config is not None:
        return as_dict(random_config)
    path = Path(wan_model_path or "") / "vae" / "config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # unreadable, truncated, a git-lfs pointer
        raise WeightsMissingError(f"VAE config {path} is not valid JSON ({first_line(exc)}); "
                                  f"{WAN_DOWNLOAD_HINT}") from exc
    if not isinstance(config, dict):
        raise WeightsMissingError(f"VAE config {path} is not a JSON object; {WAN_DOWNLOAD_HINT}")
    return config


def run_config(cfg) -> dict:
    """The VAE config of a run (its merged config), as :func:`config_of` reads it: ``tiny_vae``
    with ``random_init`` (as :func:`pipeline.generate.build_models` builds it), else the Wan VAE's."""
    return config_of(cfg.tiny_vae if cfg.random_init else None, cfg.wan_model_path)
