"""Infinite, action-controllable text-to-video with Infinity-RoPE.

    python inference.py --prompt "a fox runs[5s] | the fox jumps[5s] | a city at night[10s#] ; run | jump | city"
    python inference.py --data_path prompts/infinity_rope_prompts.txt --num_samples 2
    python inference.py --prompt "..." --dry_run                 # print the plan, load nothing
    python inference.py --prompt "..." --config_path configs/tiny.yaml   # CPU, random weights
    python inference.py --live                  # steer the video from a local web page while it plays
    python inference.py --live --stdin           # the same from the terminal: one action per line
    python inference.py --replay outputs/000_a-fox-runs_seed0.json   # render a recorded video again

``key=value`` arguments, anywhere among the flags, override the config (e.g. ``sink_size=2 local_attn_size=7
position_policy=absolute``).
Under ``torchrun`` the prompts are split across ranks, one GPU each.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

from utils.errors import EXIT_USER_ERROR, ConfigError, user_errors_exit

log = logging.getLogger("inference")

DEFAULT_CONFIG = "configs/infinity_rope.yaml"


class _Parser(argparse.ArgumentParser):
    """argparse whose mistakes are one line (``error: ...`` and where to look), exit code 2, like
    every other user mistake; ``-h`` still prints the whole help."""

    def error(self, message: str):
        print(f"error: {message}; see {self.prog} -h", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def parse_args(argv=None):
    p = _Parser(prog="inference.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt in the Infinity-RoPE grammar")
    src.add_argument("--data_path", help="a text file with one prompt per line")
    src.add_argument("--live", action="store_true",
                     help="steer the video while it plays, from a local web page (or the terminal: --stdin)")
    src.add_argument("--replay", metavar="VIDEO.json",
                     help="render a recorded video again from its sidecar (.json, or the .mp4 next to it): its "
                          "prompt, seed, config, checkpoint and start image; key=value and --seed still override")
    p.add_argument("--stdin", action="store_true",
                   help="with --live: read actions from stdin, one per line (automatic when stdin is a pipe or a file)")
    p.add_argument("--host", default=None, help="with --live: address of the page (default live.host, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="with --live: port of the page (default live.port; 0: any)")
    p.add_argument("--config_path", default=None, help=f"the run's config (default {DEFAULT_CONFIG})")
    p.add_argument("--checkpoint_path", default=None, help="overrides checkpoint_path of the config")
    p.add_argument("--use_ema", action="store_true", help="load generator_ema from the checkpoint")
    p.add_argument("--output_folder", default="outputs")
    p.add_argument("--seed", type=int, default=None, help="overrides seed of the config")
    p.add_argument("--num_samples", type=int, default=1, help="videos per prompt (seeds seed, seed+1, ...)")
    p.add_argument("--image", default=None, help="start from this image (first latent frame) instead of noise")
    p.add_argument("--dry_run", action="store_true", help="print the plan as JSON and exit; loads no model")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, anywhere among the flags")
    return p.parse_intermixed_args(argv)  # key=value before, between and after the flags


def read_prompts(args) -> tuple[list[str], list[str] | None]:
    """The prompts to render and, for a prompt file, where each one is (``prompts.txt line 6``,
    for its errors). Blank lines and lines starting with ``#`` are not prompts."""
    if args.prompt is not None:
        return [args.prompt], None
    if args.replay is not None:
        return [args.record["prompt"]], [f"the prompt of {args.replay}"]
    path = Path(args.data_path)
    if path.is_dir():
        raise ConfigError(f"prompt file {path} is a folder; pass a UTF-8 text file with one prompt per line")
    try:
        data = path.read_bytes()
    except OSError as exc:
        why = "it does not exist" if isinstance(exc, FileNotFoundError) else exc.strerror or str(exc)
        raise ConfigError(f"cannot read prompt file {path}: {why}; pass a UTF-8 text file with one "
                          f"prompt per line") from exc
    try:
        text = data.decode("utf-8-sig")  # -sig: a byte-order mark (Notepad) is not text
        if "\0" in text:  # UTF-16 without a byte-order mark decodes, NULs and all
            raise UnicodeDecodeError("utf-8", data, data.index(b"\0"), data.index(b"\0") + 1, "NUL byte")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"prompt file {path} is not UTF-8 text ({not_utf8(data, exc)}); save it as UTF-8 "
                          f"with one prompt per line") from None
    prompts, where = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            prompts.append(line.strip())
            where.append(f"{path} line {number}")
    if not prompts:
        raise ConfigError(f"prompt file {path} has no prompts (one per line; lines starting with # are skipped)")
    return prompts, where


def read_record(path: str) -> dict:
    """The sidecar of a video (what ``--replay`` renders again): ``VIDEO.json``, or the ``.mp4``
    it sits next to. Anything else is one line saying what to pass."""
    sidecar = Path(path)
    if sidecar.suffix == ".mp4":
        sidecar = sidecar.with_suffix(".json")
    hint = "pass the .json written next to a video (or the video)"
    shown = f"--replay {path}" if sidecar == Path(path) else f"--replay {path} ({sidecar})"
    if sidecar.is_dir():
        raise ConfigError(f"{shown} is a folder; {hint}")
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{shown}: the file does not exist; {hint}") from None
    except OSError as exc:
        raise ConfigError(f"{shown}: cannot read it: {exc.strerror or exc}; {hint}") from exc
    except ValueError as exc:  # not UTF-8, not JSON
        raise ConfigError(f"{shown} is not a video's sidecar ({exc}); {hint}") from None
    kinds = {"prompt": str, "seed": int, "config": dict, "checkpoint": (str, type(None)), "image": (str, type(None))}
    wrong = [k for k, kind in kinds.items()
             if not isinstance(record.get(k) if isinstance(record, dict) else None, kind)]
    if wrong:
        raise ConfigError(f"{shown} is not a video's sidecar (no valid {', '.join(wrong)}); {hint}")
    if not record["prompt"]:
        raise ConfigError(f"{shown}: the session it records ended before its first block; nothing to render")
    return record


def not_utf8(data: bytes, exc: UnicodeDecodeError) -> str:
    """Where a file stops being UTF-8, in words: its line and byte, or the other encoding it names."""
    for bom, name in ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
                      (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16")):
        if data.startswith(bom):
            return f"it starts with a {name} byte-order mark"
    data = exc.object  # what was decoded: after a UTF-8 byte-order mark, which exc.start does not count
    line = data.count(b"\n", 0, exc.start) + 1
    if data[exc.start] == 0:
        return f"line {line} has a NUL byte: UTF-16 text, or not text at all"
    return f"line {line} has the byte 0x{data[exc.start]:02x}, from another encoding such as Latin-1 or cp1252"


def dist_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


@user_errors_exit
def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world, local_rank = dist_info()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(args, rank, world, local_rank)
    except KeyboardInterrupt:
        # a render, a live session, the model loading and the warm-up answer Ctrl-C themselves (what
        # they wrote is closed); one that gets here came while starting up (imports, config, plans)
        log.warning("interrupted while starting up; nothing was written")
        return 130


def run(args, rank: int, world: int, local_rank: int) -> int:
    # heavy imports after argument parsing: --help and --dry_run stay quick
    from model.vae_config import compression_factors, run_config
    from pipeline.plan import check_prompts
    from utils.config import load_config

    overrides = list(args.overrides) + ([f"seed={args.seed}"] if args.seed is not None else [])
    overrides += [f"live.host={args.host}"] if args.host is not None else []
    overrides += [f"live.port={args.port}"] if args.port is not None else []
    if args.replay is not None:
        if args.config_path is not None:
            raise ConfigError("--replay takes the config from the sidecar; change a key with key=value instead "
                              "of --config_path")
        args.record = read_record(args.replay)
        if args.image is None and args.record["image"] is not None:  # --image: the picture moved
            args.image = args.record["image"]
            if not Path(args.image).is_file():
                raise ConfigError(f"--replay {args.replay}: its start image {args.image} is not there (a path "
                                  f"relative to where it was rendered?); pass --image with where it is now")
        # the video's own seed first (older sidecars of --num_samples kept the first seed in their config)
        cfg = load_config(None, [f"seed={args.record['seed']}", *overrides],
                          recorded=(f"the config of {args.replay}", args.record["config"]))
        if args.record["checkpoint"] is not None and args.checkpoint_path is None:
            cfg.checkpoint_path = args.record["checkpoint"]  # the checkpoint it loaded
    else:
        cfg = load_config(args.config_path or DEFAULT_CONFIG, overrides)
    if args.num_samples < 1:
        raise ConfigError("--num_samples must be >= 1")
    last_seed = cfg.seed + args.num_samples - 1  # the samples' seeds are seed, seed + 1, ...
    if last_seed >= 2**63:
        raise ConfigError(f"--num_samples {args.num_samples} from seed {cfg.seed} needs seeds up to {last_seed}, "
                          f"past the largest, 2**63 - 1 = {2**63 - 1}; pass a smaller --seed")
    if not args.live and (args.stdin or args.host is not None or args.port is not None):
        raise ConfigError("--stdin, --host and --port go with --live")
    checkpoint_of(args, cfg)  # flags a random-weights run would not read: an error even in a dry run
    # the flags become the config's keys, so the config a sidecar records is the one the video ran with
    if args.checkpoint_path is not None:
        cfg.checkpoint_path = args.checkpoint_path
    if args.use_ema:
        cfg.use_ema = True
    if args.live:
        return live(args, cfg, rank, world)
    prompts, where = read_prompts(args)
    temporal = compression_factors(run_config(cfg))[1]
    plans = check_prompts(prompts, cfg, temporal, image_start=args.image is not None, where=where)
    check_image(args, cfg, decode=not args.dry_run)
    if args.dry_run:
        for plan in plans:
            print(json.dumps(plan.to_json_dict(), ensure_ascii=False))
        return 0
    folder = output_folder(args)

    import torch
    from pipeline.generate import output_name, resolve_device
    from utils.video import sigterm_as_interrupt

    device = resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    checkpoint = checkpoint_of(args, cfg)
    try:
        gen = load_generator(args, cfg, checkpoint, device)
    except KeyboardInterrupt as exc:
        return _exit_code(exc)
    jobs = [(i, p, cfg.seed + k) for i, p in enumerate(prompts) for k in range(args.num_samples)]  # i: NNN
    mine = jobs[rank::world]
    log.info("%d video(s) to render on %s (rank %d of %d)", len(mine), device, rank, world)
    try:
        with sigterm_as_interrupt():  # SIGTERM closes the mp4 like Ctrl-C does
            for index, prompt, seed in mine:
                path = output_name(folder, index, plans[index].segments[0].text, seed, reserve=True)
                gen.generate(prompt, path, seed, checkpoint=checkpoint, image=args.image)
    except KeyboardInterrupt as exc:
        log.warning("%s: the video being written was closed and stays playable", _stopped_by(exc))
        return _exit_code(exc)
    return 0


def check_image(args, cfg, decode: bool = True) -> None:
    """``--image`` read once before any model loads: a file that is not a usable picture is an
    error now, not after minutes of loading. ``decode=False`` (a dry run, which imports no torch):
    only its header is read."""
    if args.image is None:
        return
    path = Path(args.image)
    if path.is_dir():
        raise ConfigError(f"--image {args.image} is a folder; pass a PNG or JPEG file")
    if not path.is_file():
        raise ConfigError(f"--image {args.image} does not exist; pass a PNG or JPEG file")
    if not decode:
        from PIL import Image, UnidentifiedImageError

        try:
            Image.open(path).close()
        except (OSError, UnidentifiedImageError) as exc:
            raise ConfigError(f"cannot read image {args.image}: {exc}; pass a PNG or JPEG file") from exc
        return
    from pipeline.generate import load_image

    load_image(args.image, int(cfg.width), int(cfg.height))


def checkpoint_of(args, cfg) -> str:
    """The generator checkpoint to load: ``--checkpoint_path``, else the config's. A checkpoint
    named on the command line of a random-weights run, or ``--use_ema`` there, would silently not
    be read: an error."""
    for flag, given in (("--checkpoint_path", args.checkpoint_path), ("--use_ema", args.use_ema)):
        if cfg.random_init and given:
            shown = f"{flag} {given}" if flag == "--checkpoint_path" else flag
            raise ConfigError(f"{shown} is not read with random_init=true (random weights); add random_init=false "
                              f"to render from a checkpoint")
    return args.checkpoint_path or cfg.checkpoint_path


def load_generator(args, cfg, checkpoint: str, device=None):
    """The models and the :class:`~pipeline.generate.VideoGenerator` over them. Ctrl-C or SIGTERM
    stops the loading: one line, nothing written, and the KeyboardInterrupt (its ``signum`` for
    SIGTERM) goes on to the caller, whose exit code says which."""
    from pipeline.generate import VideoGenerator, build_models
    from utils.video import sigterm_as_interrupt

    try:
        with sigterm_as_interrupt():  # SIGTERM stops the loading as Ctrl-C does
            models = build_models(cfg, checkpoint_path=checkpoint, use_ema=args.use_ema or cfg.use_ema,
                                  device=device)
            return VideoGenerator(cfg, models)
    except KeyboardInterrupt as exc:
        log.warning("%s while loading the models; nothing was written", _stopped_by(exc))
        raise


def _stopped_by(exc: KeyboardInterrupt) -> str:
    """``interrupted`` (Ctrl-C) or ``terminated`` (SIGTERM, through ``sigterm_as_interrupt``)."""
    return "terminated" if getattr(exc, "signum", None) == signal.SIGTERM else "interrupted"


def _exit_code(exc: KeyboardInterrupt) -> int:
    """The shell's code for the signal that stopped the run: 130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + getattr(exc, "signum", signal.SIGINT)


def output_folder(args) -> Path:
    """The output folder, created and proven writable before any model loads."""
    from utils.fs import ensure_writable_dir

    return ensure_writable_dir(args.output_folder, "the output folder",
                               "pass --output_folder with a folder you can write to")


def stdin_is_piped() -> bool:
    """stdin is a pipe or a file (actions to read), not a terminal or /dev/null."""
    import stat

    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (OSError, ValueError, AttributeError):  # closed or replaced stdin
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode)


def live(args, cfg, rank: int, world: int) -> int:
    """``--live``: load the models once, then steer sessions from the page (or stdin)."""
    if world > 1:
        raise ConfigError("--live runs one session on one GPU; start it without torchrun")
    if args.dry_run or args.num_samples != 1:
        raise ConfigError("--dry_run and --num_samples do not apply to --live")
    check_image(args, cfg)
    use_stdin = args.stdin or stdin_is_piped()
    folder = output_folder(args)
    if not use_stdin:
        check_can_listen(str(cfg.live.host), int(cfg.live.port))  # before minutes of model loading

    import asyncio

    from pipeline.generate import needs_warm_up
    from utils.video import sigterm_as_interrupt

    checkpoint = checkpoint_of(args, cfg)
    try:
        gen = load_generator(args, cfg, checkpoint)
    except KeyboardInterrupt as exc:
        return _exit_code(exc)
    if needs_warm_up(cfg, gen.m.device):  # the one-time costs before the first action, not in it
        log.info("live: warming up (compiling, capturing CUDA graphs, planning kernels; once per start)")
        try:
            with sigterm_as_interrupt():
                log.info("live: warmed up in %.1f s", gen.warm_up(image=args.image))
        except KeyboardInterrupt as exc:
            log.warning("%s while warming up; nothing was written", _stopped_by(exc))
            return _exit_code(exc)
    if use_stdin:
        from pipeline.live_terminal import run_terminal

        lines, before = _Lines(sys.stdin), videos_in(folder)
        try:
            with sigterm_as_interrupt():  # SIGTERM closes the mp4 like Ctrl-C does
                session = run_terminal(gen, lines, ahead_blocks=int(cfg.live.ahead_blocks), seed=int(cfg.seed),
                                       output_folder=folder, checkpoint=checkpoint, image=args.image)
        except KeyboardInterrupt as exc:
            if videos_in(folder) - before:
                log.warning("%s: the video was closed and stays playable", _stopped_by(exc))
            else:  # before the first action, or before its first frame
                log.warning("%s before the first frame; nothing was written", _stopped_by(exc))
            return _exit_code(exc)
        if session is None and lines.had_text:
            raise ConfigError("--live --stdin: the input ended without a usable first action (the lines given "
                              "were refused, see above); start with the action's text, e.g. 'a red fox trots "
                              "through the snow'")
        return 0
    from pipeline.live_server import LiveServer

    server = LiveServer(gen, output_folder=folder, seed=int(cfg.seed), checkpoint=checkpoint, image=args.image)
    try:
        asyncio.run(server.serve(str(cfg.live.host), int(cfg.live.port)))
    except OSError as exc:  # taken in the meantime
        raise ConfigError(listen_error(str(cfg.live.host), int(cfg.live.port), exc)) from exc
    return 0


class _Lines:
    """stdin as ``--live --stdin`` reads it (line by line), noting whether a line held any text: an
    input that ends before a usable first action is a mistake if it gave one, not if it gave none."""

    def __init__(self, stream):
        self.stream, self.had_text = stream, False

    def readline(self) -> str:
        line = self.stream.readline()
        self.had_text = self.had_text or bool(line.strip())
        return line


def videos_in(folder: Path) -> set[str]:
    """The videos in ``folder`` (a live recording has its final name from its first frame)."""
    return {p.name for p in folder.glob("*.mp4") if not p.name.startswith(".")}


def listen_error(host: str, port: int, exc: OSError) -> str:
    return (f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another port with --port "
            f"(0: any free port) or another address with --host")


def check_can_listen(host: str, port: int) -> None:
    """Fail now, in one line, if the page's address cannot be bound (port taken, foreign address)."""
    import socket

    try:
        with socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET):
            pass
    except OSError as exc:
        raise ConfigError(listen_error(host, port, exc)) from exc


if __name__ == "__main__":
    sys.exit(main())
