"""UMT5 text encoder: prompts → ``[B, text_len, d_model]`` embeddings, zero past each prompt.

Wan2.1 (and diffusers' ``WanPipeline``) tokenize to a fixed ``text_len`` (512), run the
umt5-xxl encoder with the attention mask, and then set every embedding past the prompt's true
token count to exactly 0. The DiT's cross-attention attends all ``text_len`` positions with no
mask, so those zeros matter: they become ``text_embedding``'s bias after projection. On the
CPU the encoder runs on the prompt's tokens only and the zeros are padded on after: the same
embeddings to float rounding, without 512 positions of work for a 20-token prompt
(:meth:`TextEncoder.encoded_positions`).

Two ways to build one:

- :meth:`TextEncoder.from_pretrained` — the real encoder from a Wan2.1 diffusers folder
  (``<wan_model_path>/text_encoder`` and ``<wan_model_path>/tokenizer``), local files only;
- :meth:`TextEncoder.from_config` — a small randomly initialised UMT5 (``tiny_text_encoder``
  in the config) with a sentencepiece tokenizer, for tests and CPU-sized runs.
"""
from __future__ import annotations

import html
import logging
import re
import threading
from collections.abc import Mapping
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

from utils.config import as_dict
from utils.errors import WAN_DOWNLOAD_HINT, ConfigError, WeightsMissingError, first_line

log = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model")
# transformers 5 renamed from_pretrained's torch_dtype to dtype (4.x knows only torch_dtype).
_DTYPE_KWARG = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning: undo HTML escapes and collapse whitespace (ftfy too when installed)."""
    try:
        import ftfy  # optional, as in Wan; without it only HTML entities and whitespace are fixed
        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


def load_sentencepiece_tokenizer(model_file: str | Path):
    """A T5 tokenizer (pad 0, eos 1, unk 2, no sentinels) from a sentencepiece ``.model`` file."""
    import sentencepiece as spm

    model_file = str(model_file)
    try:
        pieces = spm.SentencePieceProcessor(model_file=model_file).get_piece_size()
    except (OSError, RuntimeError) as exc:  # truncated or not a sentencepiece model at all
        raise WeightsMissingError(f"sentencepiece model {model_file} is corrupt ({first_line(exc)}); "
                                  f"replace it, for the Wan tokenizer: {WAN_DOWNLOAD_HINT}") from exc
    cls = transformers.T5Tokenizer
    if hasattr(cls, "convert_to_native_format"):
        # transformers 5: the constructor ignores vocab_file (it silently builds a 4-token
        # vocabulary); the .model must be converted first, which needs protobuf.
        try:
            import google.protobuf  # noqa: F401
        except ImportError as exc:
            raise ConfigError(f"reading the sentencepiece tokenizer {model_file} needs the protobuf package "
                              f"with transformers 5; run `pip install protobuf`") from exc
        try:
            tokenizer = cls(**cls.convert_to_native_format(vocab_file=model_file, extra_ids=0))
        except Exception as exc:  # tokenizers raises a bare Exception (e.g. transformers 5.17 + tokenizers
            # 0.23.2 with a model that has no NFKC map: "Cannot parse precompiled_charsmap")
            raise ConfigError(f"transformers {transformers.__version__} cannot convert the sentencepiece model "
                              f"{model_file} ({first_line(exc)}); point tokenizer_path at a folder with a "
                              f"tokenizer.json instead (scripts/make_test_tokenizer.py shows how to write "
                              f"one)") from exc
    else:  # transformers 4: the sentencepiece-backed slow tokenizer reads the file itself
        tokenizer = cls(vocab_file=model_file, extra_ids=0)
    if len(tokenizer) != pieces:
        raise RuntimeError(f"T5Tokenizer built from {model_file} has {len(tokenizer)} tokens, "
                           f"the sentencepiece model has {pieces}")
    return tokenizer


def load_tokenizer(path: str | Path):
    """Tokenizer from a folder (``tokenizer.json``/``tokenizer_config.json`` or ``spiece.model``)
    or from a sentencepiece ``.model`` file.

    A folder's ``tokenizer.json`` wins over its ``spiece.model``: the ``tokenizers`` library reads
    it as is on every transformers version, while converting a ``.model`` depends on the version.
    That is why ``tests/assets/tokenizer`` ships one (see scripts/make_test_tokenizer.py).
    """
    path = Path(path)
    if path.is_file():
        return load_sentencepiece_tokenizer(path)
    if path.is_dir():
        found = {name for name in _TOKENIZER_FILES if (path / name).is_file()}
        if found == {"tokenizer_config.json"}:  # alone, transformers 5 builds a 4-token T5Tokenizer from it
            raise WeightsMissingError(f"tokenizer at {path} is incomplete: tokenizer_config.json without "
                                      f"tokenizer.json or spiece.model; for the Wan tokenizer: {WAN_DOWNLOAD_HINT}")
        if found & {"tokenizer.json", "tokenizer_config.json"}:
            try:
                return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            except Exception as exc:  # truncated JSON, missing files; tokenizers raises a bare Exception
                raise WeightsMissingError(f"tokenizer at {path} is incomplete or corrupt ({first_line(exc)}); "
                                          f"replace it, for the Wan tokenizer: {WAN_DOWNLOAD_HINT}") from exc
        if found:
            return load_sentencepiece_tokenizer(path / "spiece.model")
    raise WeightsMissingError(
        f"tokenizer not found at {path}: expected a folder with tokenizer.json or spiece.model (and "
        f"tokenizer_config.json) or a sentencepiece .model file; set tokenizer_path (tests/assets/tokenizer "
        f"has a tiny one) or, for the Wan tokenizer, {WAN_DOWNLOAD_HINT}")


class TextEncoder(torch.nn.Module):
    """UMT5 encoder + tokenizer; ``forward(prompts)`` → ``[B, text_len, d_model]``."""

    def __init__(self, encoder: UMT5EncoderModel, tokenizer, text_len: int):
        super().__init__()
        if text_len < 1:
            raise ConfigError(f"model.text_len must be >= 1, not {text_len}")
        self.encoder = encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "right"  # as Wan: the prompt first, padding after (which may be trimmed)
        self.text_len = int(text_len)
        # A fast tokenizer sets its padding and truncation on every call and refuses a second thread
        # meanwhile ("Already borrowed"): a live session counts a new action's tokens while its
        # rollout thread encodes another's.
        self._tokenizer_lock = threading.Lock()

    @property
    def dim(self) -> int:
        return self.encoder.config.d_model

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.encoder.parameters()).dtype

    def tokenize(self, prompts: list[str]):
        """Token ids and attention mask, both ``[B, text_len]`` (padded, truncated, eos added)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        with self._tokenizer_lock:
            tokens = self.tokenizer([clean_prompt(p) for p in prompts], padding="max_length",
                                    max_length=self.text_len, truncation=True, add_special_tokens=True,
                                    return_attention_mask=True, return_tensors="pt")
        return tokens.input_ids, tokens.attention_mask

    def count_tokens(self, prompt: str) -> int:
        """Tokens of ``prompt`` before truncation (eos included): more than ``text_len`` means
        the encoder reads only the first ``text_len``."""
        with self._tokenizer_lock:
            return len(self.tokenizer(clean_prompt(prompt), add_special_tokens=True).input_ids)

    def encoded_positions(self, mask: torch.Tensor, trim: bool | None = None) -> int:
        """How many positions go through the encoder. Wan encodes all ``text_len`` with the mask;
        a masked key adds exactly nothing to attention (its score is the dtype's minimum, exp()
        of it 0) and the padded outputs are zeroed, so the prompt's own tokens alone give the same
        embeddings to float rounding, at n/text_len of the cost (a 20-token prompt: 4 % of 512).
        On the CPU (``offload_text_encoder``) that is the difference between ~16 s and ~1.4 s per
        prompt for umt5-xxl, what a live action waits for (docs/PERFORMANCE.md §14), so only the
        longest prompt's tokens are encoded there. On a GPU the padded encode takes milliseconds,
        so it stays as Wan runs it, bit for bit. ``trim`` overrides the rule (the benchmark times
        both ways)."""
        return int(mask.sum(1).max()) if (self.trims if trim is None else trim) else self.text_len

    @property
    def trims(self) -> bool:
        """Whether :meth:`forward` leaves the padding out here: on the CPU (see
        :meth:`encoded_positions`)."""
        return self.device.type == "cpu"

    @torch.no_grad()
    def forward(self, prompts: list[str], trim: bool | None = None) -> torch.Tensor:
        ids, mask = self.tokenize(prompts)
        n = self.encoded_positions(mask, trim)
        ids, mask = ids[:, :n].to(self.device), mask[:, :n].to(self.device)
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        # Exactly zero past each prompt's length (masked_fill, not a multiply: 0 * nan is nan).
        hidden = hidden.masked_fill(~mask.bool().unsqueeze(-1), 0.0)
        return torch.nn.functional.pad(hidden, (0, 0, 0, self.text_len - n))

    @classmethod
    def from_pretrained(cls, wan_model_path: str | Path, text_len: int = 512,
                        dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu") -> "TextEncoder":
        """umt5-xxl from ``<wan_model_path>/text_encoder`` and ``<wan_model_path>/tokenizer``."""
        root = Path(wan_model_path)
        encoder_dir, tokenizer_dir = root / "text_encoder", root / "tokenizer"
        for path in (root, encoder_dir, encoder_dir / "config.json"):
            if not path.exists():
                raise WeightsMissingError(f"text encoder weights missing: {path} does not exist; {WAN_DOWNLOAD_HINT}")
        if not tokenizer_dir.is_dir() or not any((tokenizer_dir / f).is_file() for f in _TOKENIZER_FILES):
            raise WeightsMissingError(f"tokenizer missing: {tokenizer_dir} holds neither tokenizer.json nor "
                                      f"spiece.model (with tokenizer_config.json); {WAN_DOWNLOAD_HINT}")
        try:
            encoder = UMT5EncoderModel.from_pretrained(str(encoder_dir), local_files_only=True, use_safetensors=True,
                                                       **{_DTYPE_KWARG: dtype})
        except OSError as exc:  # a shard or index file missing / unreadable
            raise WeightsMissingError(f"cannot load the text encoder from {encoder_dir}: {first_line(exc)}; "
                                      f"{WAN_DOWNLOAD_HINT}") from exc
        except SafetensorError as exc:  # a truncated or damaged shard
            raise WeightsMissingError(f"a text encoder weights file in {encoder_dir} is corrupt ({first_line(exc)}); "
                                      f"download it again: {WAN_DOWNLOAD_HINT}") from exc
        except (RuntimeError, ValueError) as exc:  # weight shapes that config.json does not describe
            raise WeightsMissingError(f"the text encoder in {encoder_dir} is not the Wan2.1 umt5-xxl encoder "
                                      f"(config.json and the weights disagree: {first_line(exc)}); "
                                      f"download it again: {WAN_DOWNLOAD_HINT}") from exc
        tokenizer = load_tokenizer(tokenizer_dir)
        log.info("loaded UMT5 text encoder from %s (%s, %s)", encoder_dir, dtype, device)
        return cls(encoder.to(device), tokenizer, text_len)

    @classmethod
    def from_config(cls, config: Mapping, tokenizer_path: str | Path, text_len: int) -> "TextEncoder":
        """A randomly initialised UMT5 (``UMT5Config(**config)``) for tests and tiny runs.

        ``vocab_size`` defaults to the tokenizer's size. The caller seeds torch. fp32 on the CPU.
        """
        config = as_dict(config)
        known = set(UMT5Config().to_dict())
        unknown = sorted(set(config) - known)
        if unknown:
            raise ConfigError(f"tiny_text_encoder has unknown key(s) {', '.join(unknown)}; use UMT5Config "
                              f"arguments such as vocab_size, d_model, d_ff, num_layers, num_heads, d_kv")
        tokenizer = load_tokenizer(tokenizer_path)
        config.setdefault("vocab_size", len(tokenizer))
        if config["vocab_size"] < len(tokenizer):
            raise ConfigError(f"tiny_text_encoder.vocab_size ({config['vocab_size']}) is smaller than the "
                              f"tokenizer at {tokenizer_path} ({len(tokenizer)} tokens); raise it or leave it out")
        encoder = UMT5EncoderModel(UMT5Config(**config))
        return cls(encoder, tokenizer, text_len)
