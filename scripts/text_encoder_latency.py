#!/usr/bin/env python
"""How long one prompt takes to encode: what a live action waits for before it can land on a
block, and what ``offload_text_encoder=true`` (UMT5 on the CPU) costs per prompt segment.

    # the real umt5-xxl from wan_model_path, on the GPU and on the CPU:
    python scripts/text_encoder_latency.py --config_path configs/infinity_rope.yaml --devices cuda,cpu

    # random weights of the config's tiny_text_encoder geometry (umt5-xxl's: see gpu_check.sh):
    python scripts/text_encoder_latency.py --config_path configs/infinity_rope.yaml --devices cpu \\
        random_init=true "tiny_text_encoder={d_model: 4096, d_ff: 10240, num_layers: 24, ...}"

For each device and prompt it times two encodes of the same embedding, median of ``--repeats``
after a warm-up:

* **padded**: Wan's (and diffusers' ``WanPipeline``'s): all ``text_len`` positions through the
  encoder with the attention mask, then zeros past the prompt;
* **prompt only**: the prompt's tokens alone through the encoder, zeros padded on after: what
  :class:`model.text_encoder.TextEncoder` runs on the CPU (``offload_text_encoder``); on a GPU
  it keeps Wan's padded encode (milliseconds), and the last column says which one it runs;

and how far apart the two embeddings are (max absolute difference over the largest magnitude).
Random weights are drawn once, on the first device, with T5's initialisation, and moved to the
others (bf16 umt5-xxl: ~9 GB with a small vocabulary, which only changes an embedding lookup);
speed does not depend on their values. In float32 the two embeddings agree to ~1e-6; in bf16
they differ by bf16 rounding (different matrix shapes round differently), as much as bf16
differs from float32 itself.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from model.text_encoder import TextEncoder, load_tokenizer  # noqa: E402
from pipeline.generate import resolve_device  # noqa: E402
from utils.config import load_config, torch_dtype  # noqa: E402
from utils.errors import ConfigError, user_errors_exit  # noqa: E402

log = logging.getLogger("text_encoder_latency")

# an action as the grammar's segments usually are, a longer one, and a full Wan-style description
PROMPTS = (
    "the fox pounces into deep snow",
    "a red fox trots through a snowy forest, its breath steaming in the cold morning air",
    "A cinematic tracking shot of a red fox trotting through a snowy pine forest at dawn. Soft golden "
    "light filters through the branches and sparkles on the fresh powder; the fox pauses, ears "
    "pricked, then bounds forward, kicking up small clouds of snow. Shallow depth of field, film "
    "grain, natural colours, a gentle breeze moving the needles, and distant birds calling.",
)


def random_encoder(geometry, tokenizer_path: str, text_len: int, device: torch.device,
                   dtype: torch.dtype) -> TextEncoder:
    """A UMT5 encoder of ``geometry`` with random weights drawn on ``device`` in ``dtype`` (built on
    the meta device first: no float32 copy of a multi-billion-parameter model)."""
    from transformers import UMT5Config, UMT5EncoderModel

    from utils.config import as_dict

    tokenizer = load_tokenizer(tokenizer_path)
    config = as_dict(geometry)
    config.setdefault("vocab_size", len(tokenizer))
    try:
        umt5 = UMT5Config(**config)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"tiny_text_encoder: {exc}") from exc
    with torch.device("meta"):
        encoder = UMT5EncoderModel(umt5)
    encoder = encoder.to_empty(device=device).to(dtype)
    # T5's own initialisation (each projection's std from its fan-in): a plain N(0, 0.02) would
    # saturate the unscaled attention scores, and 24 such layers turn bf16 rounding into noise
    encoder.init_weights()
    return TextEncoder(encoder, tokenizer, text_len)


def timed(fn, device: torch.device, repeats: int) -> tuple[float, torch.Tensor]:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up, and its last output."""
    out = fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def measure(te: TextEncoder, device: torch.device, repeats: int) -> list[dict]:
    rows = []
    for prompt in PROMPTS:
        tokens = min(te.count_tokens(prompt), te.text_len)
        t_pad, ref = timed(lambda: te([prompt], trim=False), device, repeats)
        t_trim, trimmed = timed(lambda: te([prompt], trim=True), device, repeats)
        scale = ref.float().abs().max().item()
        rel = (trimmed.float() - ref.float()).abs().max().item() / scale if scale else 0.0
        rows.append({"device": str(device), "tokens": tokens, "padded_ms": 1e3 * t_pad, "trimmed_ms": 1e3 * t_trim,
                     "rel_diff": rel, "pipeline": "prompt only" if te.trims else "padded"})
    return rows


def table(rows: list[dict], text_len: int, header: str) -> str:
    lines = [header, "", f"| device | prompt tokens | padded to {text_len} (Wan), ms | prompt only, ms | "
             "speed-up | max diff / max | the pipeline runs |", "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['device']} | {r['tokens']} | {r['padded_ms']:,.1f} | {r['trimmed_ms']:,.1f} | "
                     f"{r['padded_ms'] / r['trimmed_ms']:.1f}× | {r['rel_diff']:.1e} | {r['pipeline']} |")
    return "\n".join(lines)


@user_errors_exit
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_path", default="configs/infinity_rope.yaml")
    p.add_argument("--devices", default="cpu", help="where to run the encoder, comma-separated: cuda,cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="also write the table to this markdown file")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config_path, args.overrides)
    devices = [resolve_device(d) for d in args.devices.split(",")]  # one line if one is missing
    dtype = torch_dtype(cfg.text_encoder_dtype)
    text_len = int(cfg.model.text_len)
    title = f"One prompt's encoding ({args.config_path}, {cfg.text_encoder_dtype}, median of {args.repeats})"
    t0 = time.perf_counter()
    if cfg.random_init:  # built once, on the first device, then moved: the same weights everywhere
        if cfg.tiny_text_encoder is None or cfg.tokenizer_path is None:
            raise ConfigError("random_init needs tiny_text_encoder and tokenizer_path (see configs/tiny.yaml)")
        te = random_encoder(cfg.tiny_text_encoder, cfg.tokenizer_path, text_len, devices[0], dtype)
        source = "random weights"
    else:
        te = TextEncoder.from_pretrained(cfg.wan_model_path, text_len=text_len, dtype=dtype, device=devices[0])
        source = f"weights from {cfg.wan_model_path}"
    log.info("UMT5 encoder, %d layers, width %d, %.2fB parameters (%s), %s, built in %.1f s",
             te.encoder.config.num_layers, te.dim, sum(p.numel() for p in te.encoder.parameters()) / 1e9, source,
             dtype, time.perf_counter() - t0)
    rows = []
    for device in devices:
        te = te.to(device)
        if device.type == "cpu":
            log.info("cpu: %d threads", torch.get_num_threads())
        rows += measure(te, device, args.repeats)
        md = table(rows, text_len, title)
        if args.out:  # after each device: a run cut short keeps the devices it finished
            Path(args.out).write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
