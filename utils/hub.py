"""Downloads of the weights users need, with huggingface_hub, into documented folders.

Run ``python -m utils.hub`` (``setup_env.sh`` does) from the repository root. Layout under
``--dest`` (default: the repository root)::

    wan_models/Wan2.1-T2V-1.3B-Diffusers/     Wan-AI/Wan2.1-T2V-1.3B-Diffusers
        model_index.json
        text_encoder/  tokenizer/  vae/       umt5-xxl encoder + tokenizer, Wan2.1 VAE
        transformer/                          optional `transformer`: the base DiT (training's
                                              real/fake score init)
    checkpoints/
        infinite_forcing/*.pt                 SOTAMak1r/Infinite-Forcing (the generator)
        infinite_forcing.pt -> infinite_forcing/<the .pt>   (config default checkpoint_path)
        self_forcing_dmd.pt                   optional `self_forcing`: gdhe17/Self-Forcing
        ode_init.pt                           optional `ode_init`: gdhe17/Self-Forcing (training init)
        causal_forcing/chunkwise/causal_forcing.pt   optional `causal_forcing`: zhuhz22/Causal-Forcing
    prompts/vidprom_filtered_extended.txt     optional `train_prompts`: gdhe17/Self-Forcing

A folder that is already complete is not fetched again. ``HF_HUB_OFFLINE=1`` fetches nothing and
only checks the folders. When the hub cannot be reached the command stops within seconds with one
line (exit code 2) naming what is missing and where to put it by hand.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

# Read by huggingface_hub at import: keep a dead network from hanging a download for minutes.
os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")

from utils.errors import WeightsMissingError, user_errors_exit  # noqa: E402

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
PROBE_TIMEOUT_S = 5.0
WAN_DIR = "wan_models/Wan2.1-T2V-1.3B-Diffusers"
WAN_REPO = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
GENERATOR_LINK = "checkpoints/infinite_forcing.pt"


@dataclass(frozen=True)
class Item:
    """One thing to fetch: ``files`` (exact repo paths) or ``patterns`` (a snapshot's allow list)
    from ``repo`` into ``dest/local_dir``; ``expect`` says when it is complete: each entry is
    globs under local_dir, ``|``-separated alternatives, one of which must match a non-empty file."""

    name: str
    repo: str
    local_dir: str
    what: str
    expect: tuple[str, ...]
    files: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()
    optional: bool = False
    link: str | None = field(default=None)  # make this path point at the single weight file

    def shown(self) -> str:
        if self.files:
            return ", ".join(f"{self.repo}/{f} -> {Path(self.local_dir, f).as_posix()}"
                             for f in self.files)
        return f"{self.repo} [{' '.join(self.patterns)}] -> {self.local_dir}/"


ITEMS: tuple[Item, ...] = (
    Item("wan", WAN_REPO, WAN_DIR, "UMT5 text encoder, tokenizer and VAE (diffusers format)",
         # what loading needs: a half-downloaded folder must not pass (shards: _index_complete)
         expect=("model_index.json", "text_encoder/config.json",
                 "text_encoder/model.safetensors|text_encoder/model.safetensors.index.json",
                 "tokenizer/tokenizer_config.json", "tokenizer/tokenizer.json|tokenizer/spiece.model",
                 "vae/config.json", "vae/diffusion_pytorch_model.safetensors"),
         patterns=("model_index.json", "text_encoder/*", "tokenizer/*", "vae/*")),
    Item("infinite_forcing", "SOTAMak1r/Infinite-Forcing", "checkpoints/infinite_forcing",
         "the causal generator Infinity-RoPE runs (Self-Forcing DMD + attention sink)",
         expect=("**/*.pt",), patterns=("*.pt",), link=GENERATOR_LINK),
    Item("transformer", WAN_REPO, WAN_DIR, "base Wan2.1 DiT (training: real and fake score)",
         expect=("transformer/config.json", "transformer/*.safetensors"),
         patterns=("transformer/*",), optional=True),
    Item("self_forcing", "gdhe17/Self-Forcing", ".", "Self-Forcing DMD generator",
         expect=("checkpoints/self_forcing_dmd.pt",), files=("checkpoints/self_forcing_dmd.pt",),
         optional=True),
    Item("ode_init", "gdhe17/Self-Forcing", ".", "ODE-initialised causal generator (training init)",
         expect=("checkpoints/ode_init.pt",), files=("checkpoints/ode_init.pt",), optional=True),
    Item("causal_forcing", "zhuhz22/Causal-Forcing", "checkpoints/causal_forcing",
         "Causal-Forcing chunk-wise generator (blocks of 3 frames)",
         expect=("chunkwise/causal_forcing.pt",), files=("chunkwise/causal_forcing.pt",),
         optional=True),
    Item("train_prompts", "gdhe17/Self-Forcing", "prompts", "training prompts (VidProM, extended)",
         expect=("vidprom_filtered_extended.txt",), files=("vidprom_filtered_extended.txt",),
         optional=True),
)
BY_NAME = {item.name: item for item in ITEMS}
OPTIONAL = tuple(item.name for item in ITEMS if item.optional)


# ---------------------------------------------------------------------------- completeness
def _index_complete(folder: Path, patterns: tuple[str, ...]) -> bool:
    """Every shard named by every ``*.index.json`` the item fetched is present."""
    indexes = {p for pattern in patterns for p in folder.glob(pattern)
               if p.name.endswith(".index.json")}
    for index in indexes:
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except Exception:
            return False
        if not all((index.parent / s).is_file() for s in shards):
            return False
    return True


def is_complete(item: Item, dest: Path) -> bool:
    folder = dest / item.local_dir
    if not folder.is_dir():
        return False
    for alternatives in item.expect:
        if not any(p.is_file() and p.stat().st_size > 0
                   for pattern in alternatives.split("|") for p in folder.glob(pattern)):
            return False
    return _index_complete(folder, item.patterns)


def _link_generator(item: Item, dest: Path) -> None:
    """Point ``item.link`` at the one weight file fetched, so the config default finds it."""
    if not item.link:
        return
    link = dest / item.link
    found = sorted(p for p in (dest / item.local_dir).rglob("*.pt") if ".cache" not in p.parts)
    if link.exists() or link.is_symlink():
        if link.exists():
            return
        link.unlink()  # a dangling link from an earlier layout
    if len(found) != 1:
        log.warning("%s holds %d .pt files (%s); set checkpoint_path to the one you want",
                    dest / item.local_dir, len(found), ", ".join(p.name for p in found))
        return
    target = os.path.relpath(found[0], link.parent)
    try:
        link.symlink_to(target)
    except OSError:
        os.link(found[0], link)
    log.info("%s -> %s", link, target)


# ------------------------------------------------------------------------------- network
def _endpoint() -> tuple[str, int]:
    """Host and port a download would connect to first (the HTTPS proxy if one is set)."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy or os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """A TCP connect to the hub (or proxy) within ``timeout`` seconds, DNS included."""
    host, port = _endpoint()
    result: list[str] = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append("")
        except OSError as exc:
            result.append(str(exc) or type(exc).__name__)

    thread = threading.Thread(target=probe, daemon=True)  # getaddrinfo ignores socket timeouts
    thread.start()
    thread.join(timeout)
    if not result:
        return False, f"cannot reach {host}:{port} (no answer in {timeout:.0f} s)"
    if result[0]:
        return False, f"cannot reach {host}:{port} ({result[0]})"
    return True, ""


def _fetch(item: Item, dest: Path) -> None:
    import huggingface_hub as hf

    local_dir = dest / item.local_dir
    timeout = float(os.environ["HF_HUB_ETAG_TIMEOUT"])
    log.info("fetching %s: %s", item.name, item.shown())
    if item.files:
        for name in item.files:
            hf.hf_hub_download(item.repo, name, local_dir=local_dir, etag_timeout=timeout)
    else:
        hf.snapshot_download(item.repo, local_dir=local_dir, allow_patterns=list(item.patterns),
                             etag_timeout=timeout)


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__


# ------------------------------------------------------------------------------------ main
def download(names: list[str], dest: Path) -> list[Path]:
    """Fetch ``names`` (keys of :data:`BY_NAME`) into ``dest``; skip complete ones.

    Raises :class:`WeightsMissingError` (one line) naming every item still missing.
    """
    items = [BY_NAME[n] for n in names]
    todo = [item for item in items if not is_complete(item, dest)]
    for item in items:
        if item not in todo:
            log.info("already complete: %s (%s)", dest / item.local_dir, item.name)
            _link_generator(item, dest)
    failed: list[tuple[Item, str]] = []
    if todo:
        if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
            failed = [(item, "HF_HUB_OFFLINE is set") for item in todo]
        else:
            ok, why = hub_reachable()
            if not ok:
                failed = [(item, why) for item in todo]
            else:
                for item in todo:
                    try:
                        _fetch(item, dest)
                    except Exception as exc:  # connection, 401/404, disk full: report, go on
                        failed.append((item, _reason(exc)))
                        continue
                    if not is_complete(item, dest):
                        failed.append((item, f"the repo has no files matching {item.expect}"))
                        continue
                    _link_generator(item, dest)
    if failed:
        reasons = sorted({why for _, why in failed})
        what = "; ".join(item.shown() for item, _ in failed)
        raise WeightsMissingError(
            f"could not fetch weights ({' / '.join(reasons)}): {what} (paths under {dest}); "
            f"download them where the hub is reachable (`hf download REPO FILES --local-dir DIR`) "
            f"and copy them into those folders, then rerun `python -m utils.hub` to check")
    return [dest / item.local_dir for item in items]


def _parser() -> argparse.ArgumentParser:
    names = "\n".join(f"  {i.name:16s} {i.what}; {i.shown()}" for i in ITEMS)
    parser = argparse.ArgumentParser(
        prog="python -m utils.hub", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Download the weights infinity-rope needs (always: wan, infinite_forcing).",
        epilog=f"items:\n{names}\n\nHF_HUB_OFFLINE=1 checks the folders without fetching.\n")
    parser.add_argument("--all", action="store_true", help="also fetch every optional item")
    parser.add_argument("--optional", nargs="+", default=[], metavar="NAME", choices=OPTIONAL,
                        help=f"also fetch these optional items: {', '.join(OPTIONAL)}")
    parser.add_argument("--dest", type=Path, default=REPO_ROOT,
                        help="root of the layout (default: the repository root)")
    return parser


@user_errors_exit
def main(argv: list[str] | None = None) -> list[Path]:
    args = _parser().parse_args(argv)
    if not logging.getLogger().handlers:  # progress on stdout; a failure is the one stderr line
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    names = [i.name for i in ITEMS if not i.optional]
    names += list(OPTIONAL) if args.all else [n for n in args.optional if n not in names]
    dest = args.dest.expanduser().resolve()
    paths = download(list(dict.fromkeys(names)), dest)
    log.info("weights ready under %s", dest)
    return paths


if __name__ == "__main__":
    main()
