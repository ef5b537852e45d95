"""Checkpoints of the Wan2.1 T2V DiT: formats, the Wan <-> diffusers key adapter, safe loading.

Users bring the causal generator in several shapes; :func:`load_dit_state_dict` turns any of
them into one state dict with Wan's own parameter names, the names :class:`model.wan.WanDiT` uses:

* a Self-Forcing-family ``.pt``/``.pth`` (Self-Forcing, Infinite-Forcing, Causal-Forcing, the
  ODE-init file): a dict with ``generator`` and/or ``generator_ema`` state dicts whose keys carry
  a ``model.`` prefix and sometimes FSDP's ``_fsdp_wrapped_module.``; also a bare state dict.
  Loaded with ``torch.load(weights_only=True)``: a pickle from the internet can run code;
* a Wan-named ``.safetensors`` file, or a folder of them (sharded with an ``*.index.json``);
* a diffusers ``transformer/`` folder as ``WanTransformer3DModel.save_pretrained`` writes it
  (``config.json`` + ``diffusion_pytorch_model.safetensors``, maybe sharded), or a diffusers-named
  safetensors file; its keys are renamed to Wan's.

Which naming a file uses is read from its keys. Every problem a user can cause (a missing path, a
truncated download, a file of some other network, a checkpoint of another model size) is a
:class:`CheckpointError` or :class:`WeightsMissingError` with one line saying what, where and what
to do.

The key map is diffusers' ``convert_wan_transformer_to_diffusers`` written out as an explicit,
invertible table. Its three traps: Wan ``norm3`` (the affine cross-attention LayerNorm) is
diffusers ``norm2``; Wan's per-block ``modulation`` is diffusers' per-block ``scale_shift_table``;
Wan ``head.modulation`` is diffusers' top-level ``scale_shift_table``.
"""
from __future__ import annotations

import json
import logging
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import Iterable, Mapping, MutableMapping

import torch

from utils.errors import CheckpointError, WeightsMissingError, first_line

log = logging.getLogger(__name__)

FETCH_HINT = "`bash setup_env.sh` (or `python -m utils.hub`) downloads the weights"

# ------------------------------------------------------------------------------ the key map
# (Wan name, diffusers name); {n} is a block index, {p} is weight|bias.
_KEY_TABLE: tuple[tuple[str, str], ...] = (
    ("patch_embedding.{p}", "patch_embedding.{p}"),
    ("text_embedding.0.{p}", "condition_embedder.text_embedder.linear_1.{p}"),
    ("text_embedding.2.{p}", "condition_embedder.text_embedder.linear_2.{p}"),
    ("time_embedding.0.{p}", "condition_embedder.time_embedder.linear_1.{p}"),
    ("time_embedding.2.{p}", "condition_embedder.time_embedder.linear_2.{p}"),
    ("time_projection.1.{p}", "condition_embedder.time_proj.{p}"),
    *(
        (f"blocks.{{n}}.{wan_attn}.{wan}.{{p}}", f"blocks.{{n}}.{hf_attn}.{hf}.{{p}}")
        for wan_attn, hf_attn in (("self_attn", "attn1"), ("cross_attn", "attn2"))
        for wan, hf in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"),
                        ("norm_q", "norm_q"), ("norm_k", "norm_k"))
    ),
    ("blocks.{n}.norm3.{p}", "blocks.{n}.norm2.{p}"),  # trap 1: the affine cross-attn norm
    ("blocks.{n}.ffn.0.{p}", "blocks.{n}.ffn.net.0.proj.{p}"),
    ("blocks.{n}.ffn.2.{p}", "blocks.{n}.ffn.net.2.{p}"),
    ("blocks.{n}.modulation", "blocks.{n}.scale_shift_table"),  # trap 2
    ("head.head.{p}", "proj_out.{p}"),
    ("head.modulation", "scale_shift_table"),  # trap 3
)


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template)
    pattern = pattern.replace(re.escape("{n}"), r"(?P<n>\d+)").replace(re.escape("{p}"),
                                                                        r"(?P<p>weight|bias)")
    return re.compile(pattern + r"\Z")


_WAN_TO_HF = tuple((_compile(wan), hf) for wan, hf in _KEY_TABLE)
_HF_TO_WAN = tuple((_compile(hf), wan) for wan, hf in _KEY_TABLE)


def _translate(key: str, rules) -> str | None:
    for pattern, template in rules:
        m = pattern.match(key)
        if m:
            return template.format(**m.groupdict())
    return None


def wan_to_diffusers_key(key: str) -> str:
    """Diffusers (``WanTransformer3DModel``) name of a Wan DiT parameter; KeyError if unknown."""
    out = _translate(key, _WAN_TO_HF)
    if out is None:
        raise KeyError(f"not a Wan2.1 T2V DiT parameter name: {key!r}")
    return out


def diffusers_to_wan_key(key: str) -> str:
    """Wan name of a diffusers ``WanTransformer3DModel`` parameter; KeyError if unknown."""
    out = _translate(key, _HF_TO_WAN)
    if out is None:
        raise KeyError(f"not a diffusers WanTransformer3DModel (T2V) parameter name: {key!r}")
    return out


def _convert(state_dict: Mapping[str, torch.Tensor], rules, strict: bool, what: str):
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        new = _translate(key, rules)
        if new is None:
            unknown.append(key)
            new = key
        if new in out:
            raise CheckpointError(f"two keys of the {what} state dict map to the same name {new!r} "
                                  f"(one is {key!r}); the file mixes Wan and diffusers names")
        out[new] = value
    if strict and unknown:
        raise CheckpointError(f"{len(unknown)} keys are not {what} DiT parameters "
                              f"(e.g. {', '.join(unknown[:5])})")
    return out


def wan_to_diffusers_state_dict(state_dict: Mapping[str, torch.Tensor],
                                strict: bool = True) -> dict[str, torch.Tensor]:
    """Rename a Wan-named state dict to diffusers names (tensors are shared, not copied).

    ``strict``: unknown keys raise :class:`CheckpointError`; otherwise they pass through unchanged.
    """
    return _convert(state_dict, _WAN_TO_HF, strict, "Wan")


def diffusers_to_wan_state_dict(state_dict: Mapping[str, torch.Tensor],
                                strict: bool = True) -> dict[str, torch.Tensor]:
    """Rename a diffusers-named state dict to Wan names (tensors are shared, not copied)."""
    return _convert(state_dict, _HF_TO_WAN, strict, "diffusers")


def detect_naming(keys: Iterable[str]) -> str | None:
    """``"wan"``, ``"diffusers"`` or None (neither: not a Wan2.1 DiT) from a state dict's keys."""
    wan = hf = 0
    for key in keys:
        is_wan = _translate(key, _WAN_TO_HF) is not None
        is_hf = _translate(key, _HF_TO_WAN) is not None
        if is_wan and not is_hf:
            wan += 1
        elif is_hf and not is_wan:
            hf += 1
    if wan == hf == 0:
        return None
    return "wan" if wan >= hf else "diffusers"


# ------------------------------------------------------------------------- prefixes, formats
# Wrapper names that may appear anywhere in a key (FSDP, activation checkpointing, torch.compile).
_INNER_WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
# Prefixes stripped while every key carries them (Self-Forcing's WanDiffusionWrapper puts the DiT
# under `model.`; ComfyUI-style files use `model.diffusion_model.`; DDP uses `module.`).
_OUTER_PREFIXES = ("model.", "diffusion_model.", "module.")
_PT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_EXPECTED = ("expected a Wan2.1 DiT checkpoint: a .safetensors file or folder (Wan or diffusers "
             "names) or a Self-Forcing-style .pt")


def normalize_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop FSDP/compile wrapper names and common ``model.``/``module.`` prefixes from keys."""
    out = {}
    for key, value in state_dict.items():
        for wrapper in _INNER_WRAPPERS:
            key = key.replace(wrapper, "")
        out[key] = value
    changed = True
    while changed and out:
        changed = False
        for prefix in _OUTER_PREFIXES:
            if all(k.startswith(prefix) for k in out):
                out = {k[len(prefix):]: v for k, v in out.items()}
                changed = True
    return out


def _describe_keys(keys: Iterable[str], n: int = 4) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:n])
    return f"{len(keys)} keys like {shown}" if keys else "no keys"


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # SafetensorError, OSError, ...: the file is not readable as safetensors
        raise CheckpointError(f"cannot read {path} as safetensors ({first_line(exc)[:200]}): the file is "
                              f"truncated or corrupt; delete it and download it again; "
                              f"{FETCH_HINT}") from exc


def _read_sharded(index_path: Path) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except Exception as exc:
        raise CheckpointError(f"cannot read the shard index {index_path} ({first_line(exc)[:200]}); "
                              f"expected JSON with a 'weight_map' as save_pretrained writes it") from exc
    missing = [s for s in shards if not (index_path.parent / s).is_file()]
    if missing:
        raise WeightsMissingError(f"{index_path} lists {len(shards)} shards but "
                                  f"{', '.join(missing[:3])} {'is' if len(missing) == 1 else 'are'} "
                                  f"missing in {index_path.parent}; {FETCH_HINT}")
    state_dict: dict[str, torch.Tensor] = {}
    for shard in shards:
        state_dict.update(_read_safetensors(index_path.parent / shard))
    absent = [k for k in weight_map if k not in state_dict]
    if absent:
        raise CheckpointError(f"{index_path}: {len(absent)} tensors listed in the index are not in "
                              f"its shards (e.g. {', '.join(absent[:3])}); download the folder again")
    return state_dict


def _looks_like_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 0 < n < 100_000_000 and head[8:9] == b"{"


def _read_pt(path: Path, use_ema: bool) -> dict[str, torch.Tensor]:
    is_zip = zipfile.is_zipfile(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PK\x03\x04" and not is_zip:
        raise CheckpointError(f"{path} is truncated (a torch zip archive without its end, "
                              f"{path.stat().st_size} bytes); delete it and download it again; "
                              f"{FETCH_HINT}")
    if not is_zip and magic[:1] != b"\x80":  # neither torch's zip format nor a legacy pickle
        raise CheckpointError(f"{path} is not a torch checkpoint (it starts with {magic!r}, not a "
                              f"zip archive or a pickle); {_EXPECTED}")
    try:
        try:
            # mmap keeps a multi-GB checkpoint out of RAM until its tensors go into the model.
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
        except (RuntimeError, ValueError):
            if not is_zip:
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # e.g. an old layout
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower():  # a broken pickle stream, not a refused class
            raise CheckpointError(f"cannot read {path} with torch.load ({first_line(exc)[:200]}): the "
                                  f"file is truncated or corrupt; {FETCH_HINT}") from exc
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        what = f"an object of type {found.group(1)}" if found else first_line(exc)[:200]
        raise CheckpointError(f"refusing to load {path}: it holds {what}, and .pt files are loaded "
                              f"with torch.load(weights_only=True) because a pickle can run code; "
                              f"{_EXPECTED}") from exc
    except Exception as exc:  # RuntimeError (zip), EOFError, OSError: truncated or not a torch file
        raise CheckpointError(f"cannot read {path} with torch.load ({first_line(exc)[:200]}): the file "
                              f"is truncated, corrupt or not a torch checkpoint; {_EXPECTED}") from exc
    return _pick_state_dict(obj, path, use_ema)


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _pick_state_dict(obj, path: Path, use_ema: bool) -> dict[str, torch.Tensor]:
    """The generator's state dict out of a loaded ``.pt`` object."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a dict of tensors; "
                              f"{_EXPECTED}")
    top = ", ".join(str(k) for k in list(obj)[:8]) or "nothing"
    if use_ema:
        if "generator_ema" not in obj:
            raise CheckpointError(f"use_ema=true but {path} has no 'generator_ema' (its top-level "
                                  f"keys: {top}); set use_ema=false to load its generator")
        chosen, name = obj["generator_ema"], "generator_ema"
    elif "generator" in obj:
        chosen, name = obj["generator"], "generator"
    elif "generator_ema" in obj:
        log.warning("%s has only 'generator_ema'; loading the EMA weights", path)
        chosen, name = obj["generator_ema"], "generator_ema"
    elif "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        chosen, name = obj["state_dict"], "state_dict"
    elif _is_state_dict(obj):
        chosen, name = obj, None
    else:
        raise CheckpointError(f"{path} is not a DiT checkpoint: top-level keys are {top}; expected "
                              f"'generator'/'generator_ema' (Self-Forcing) or a state dict of tensors")
    if not _is_state_dict(chosen):
        where = f"{path}['{name}']" if name else str(path)
        bad = [k for k, v in chosen.items() if not isinstance(v, torch.Tensor)][:3] \
            if isinstance(chosen, Mapping) else []
        raise CheckpointError(f"{where} is not a state dict of tensors"
                              f"{' (non-tensor entries: ' + ', '.join(map(str, bad)) + ')' if bad else ''}; "
                              f"{_EXPECTED}")
    if name:
        log.info("loading '%s' from %s", name, path)
    return dict(chosen)


def _read_folder(path: Path, use_ema: bool) -> tuple[dict[str, torch.Tensor], bool]:
    if (path / "model_index.json").is_file() and (path / "transformer").is_dir():
        path = path / "transformer"  # a whole diffusers pipeline folder: take its DiT
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(f"{path} holds several shard indexes ({', '.join(p.name for p in indexes)});"
                              f" point checkpoint_path at one of them")
    if indexes:
        return _read_sharded(indexes[0]), False
    files = sorted(path.glob("*.safetensors"))
    if files:
        state_dict: dict[str, torch.Tensor] = {}
        for file in files:
            part = _read_safetensors(file)
            clash = next((k for k in part if k in state_dict), None)
            if clash is not None:
                raise CheckpointError(f"{path}: {clash} appears in more than one .safetensors file; "
                                      f"keep one checkpoint per folder or point at a single file")
            state_dict.update(part)
        return state_dict, False
    pts = sorted(p for p in path.iterdir() if p.suffix in _PT_SUFFIXES and p.is_file())
    if len(pts) == 1:
        return _read_pt(pts[0], use_ema), True
    if len(pts) > 1:
        raise CheckpointError(f"{path} holds several checkpoints ({', '.join(p.name for p in pts[:5])});"
                              f" point checkpoint_path at one of them")
    raise WeightsMissingError(f"{path} holds no weights (no .safetensors, no .pt); {FETCH_HINT}")


def load_dit_state_dict(path: str | Path, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """A Wan-named DiT state dict (CPU tensors, dtype as stored) from any supported checkpoint.

    ``path``: a ``.pt``/``.pth`` (Self-Forcing family or bare state dict), a ``.safetensors``
    file, a ``*.safetensors.index.json``, or a folder (diffusers ``transformer/``, a diffusers
    pipeline root, a folder of Wan safetensors shards, or a folder with exactly one ``.pt``).
    ``use_ema``: take ``generator_ema`` from a Self-Forcing ``.pt``.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise WeightsMissingError(f"checkpoint {path} does not exist; {FETCH_HINT}, or set "
                                  f"checkpoint_path to your file")
    if path.is_dir():
        raw, from_pt = _read_folder(path, use_ema)
    elif path.name.endswith(".index.json"):
        raw, from_pt = _read_sharded(path), False
    elif path.suffix == ".safetensors":
        raw, from_pt = _read_safetensors(path), False
    elif path.suffix in _PT_SUFFIXES or zipfile.is_zipfile(path):
        raw, from_pt = _read_pt(path, use_ema), True
    elif _looks_like_safetensors(path):
        raw, from_pt = _read_safetensors(path), False
    else:
        raise CheckpointError(f"{path} is not a checkpoint file (suffix {path.suffix or 'none'}, "
                              f"neither safetensors nor a torch zip); {_EXPECTED}")
    if use_ema and not from_pt:
        raise CheckpointError(f"use_ema=true but {path} is safetensors, which holds one set of "
                              f"weights and no 'generator_ema'; set use_ema=false")
    return to_wan_state_dict(raw, source=str(path))


def to_wan_state_dict(state_dict: Mapping[str, torch.Tensor],
                      source: str = "state dict") -> dict[str, torch.Tensor]:
    """Normalise prefixes and rename diffusers keys to Wan's; CheckpointError if foreign."""
    state_dict = normalize_keys(state_dict)
    naming = detect_naming(state_dict)
    if naming is None:
        raise CheckpointError(f"{source} is not a Wan2.1 DiT checkpoint: found "
                              f"{_describe_keys(state_dict)}; {_EXPECTED}")
    if naming == "diffusers":
        log.info("%s uses diffusers names; renaming to Wan's", source)
        state_dict = diffusers_to_wan_state_dict(state_dict, strict=False)
    return state_dict


# ------------------------------------------------------------------------------ into a model
def _shape(t: torch.Tensor) -> str:
    return "[" + ",".join(str(s) for s in t.shape) + "]"


def load_dit_weights(model: torch.nn.Module, state_dict_or_path, use_ema: bool = False,
                     source: str | None = None) -> torch.nn.Module:
    """Load a checkpoint (path or state dict, any naming) into a Wan-named DiT, strictly.

    Tensors are cast to each parameter's dtype (the model may be bf16). Missing or unexpected
    keys and shape mismatches raise :class:`CheckpointError`. A model on the meta device gets the
    tensors assigned. Returns ``model``.
    """
    if isinstance(state_dict_or_path, (str, Path)):
        source = source or str(state_dict_or_path)
        state_dict = load_dit_state_dict(state_dict_or_path, use_ema=use_ema)
    else:
        source = source or "the given state dict"
        state_dict = to_wan_state_dict(state_dict_or_path, source=source)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:5])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:5])})")
        raise CheckpointError(f"{source} does not fit the model: {' and '.join(parts)}; check that it "
                              f"is a Wan2.1 T2V DiT checkpoint and that model.* in the config matches it")
    for key, target in expected.items():
        if state_dict[key].shape != target.shape:
            raise CheckpointError(f"{source} is for a different model size: {key} has "
                                  f"{_shape(state_dict[key])}, model expects {_shape(target)}; "
                                  f"check model.* in the config")
        if target.is_floating_point() and not state_dict[key].is_floating_point():
            raise CheckpointError(f"{source} holds {key} as {state_dict[key].dtype}, not floating-point weights; "
                                  f"check that it is a Wan2.1 T2V DiT checkpoint (not a quantised or other file)")
    on_meta = any(t.is_meta for t in expected.values())
    cast = {k: state_dict[k].to(dtype=expected[k].dtype) for k in expected}
    if on_meta:
        cast = {k: v.to(device="cpu") for k, v in cast.items()}
    model.load_state_dict(cast, strict=True, assign=on_meta)
    log.info("loaded %d tensors from %s", len(cast), source)
    return model


# ---------------------------------------------------------------------------------- writing
def save_dit_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | Path,
                        naming: str = "wan", max_shard_bytes: int | None = None) -> Path:
    """Write a DiT state dict as safetensors; returns what was written.

    ``path`` ending in ``.safetensors``: one file. Otherwise a folder holding
    ``diffusion_pytorch_model.safetensors`` or, with ``max_shard_bytes``, shards
    ``diffusion_pytorch_model-0000i-of-0000n.safetensors`` plus their ``.index.json`` (the layout
    diffusers' ``save_pretrained`` uses). ``naming``: ``"wan"`` keeps the keys (Wan names, after
    normalising prefixes), ``"diffusers"`` renames them to diffusers'.
    """
    from safetensors.torch import save_file

    if naming not in ("wan", "diffusers"):
        raise ValueError(f"naming must be 'wan' or 'diffusers', not {naming!r}")
    sd = to_wan_state_dict(state_dict)
    if naming == "diffusers":
        sd = wan_to_diffusers_state_dict(sd, strict=True)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    path = Path(path)
    meta = {"format": "pt"}
    if path.suffix == ".safetensors":
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(path), metadata=meta)
        return path
    path.mkdir(parents=True, exist_ok=True)
    if not max_shard_bytes:
        save_file(sd, str(path / "diffusion_pytorch_model.safetensors"), metadata=meta)
        return path
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, value in sd.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    weight_map: MutableMapping[str, str] = {}
    for i, shard in enumerate(shards, 1):
        name = f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / name), metadata=meta)
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    (path / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(weight_map)}, indent=2))
    return path
