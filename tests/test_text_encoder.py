"""model/text_encoder.py: padded UMT5 embeddings, exact zeros past each prompt, offline tokenizers."""
from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from omegaconf import OmegaConf

from model.text_encoder import TextEncoder, load_sentencepiece_tokenizer, load_tokenizer
from utils.errors import ConfigError, WeightsMissingError

ASSET_TOKENIZER = Path(__file__).parent / "assets" / "tokenizer"
TINY = {"d_model": 32, "d_ff": 64, "num_layers": 2, "num_heads": 2, "d_kv": 16}
SHORT, LONG = "a red fox runs", "the brown dog jumps over the old wooden fence near the river at night"

SENTENCES = [
    "a red fox runs across the snowy field", "the brown dog jumps over the old wooden fence",
    "a small boat sails on the calm blue lake", "the city lights shine at night near the river",
    "two birds fly over the green hills at dawn", "an old man walks his dog along the beach",
    "a girl reads a book under a tall tree", "the train moves slowly through the mountains",
]


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory) -> Path:
    """A sentencepiece unigram model trained here, with T5's special ids."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 4), model_writer=buf, model_type="unigram", vocab_size=150,
        hard_vocab_limit=False, character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        num_threads=1, minloglevel=2)
    path = tmp_path_factory.mktemp("spm") / "test.model"
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture(scope="module")
def encoder(spm_file) -> TextEncoder:
    torch.manual_seed(0)
    return TextEncoder.from_config(TINY, spm_file, text_len=512)


def test_tokenizer_matches_sentencepiece(spm_file):
    tok = load_sentencepiece_tokenizer(spm_file)
    sp = spm.SentencePieceProcessor(model_file=str(spm_file))
    assert len(tok) == sp.get_piece_size() > 50
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    for text in (SHORT, LONG):
        assert tok(text).input_ids == sp.encode(text) + [1]  # T5 appends </s>


def test_padded_embeddings_zero_past_each_prompt(encoder):
    emb = encoder([SHORT, LONG])
    _, mask = encoder.tokenize([SHORT, LONG])
    lengths = mask.sum(1).tolist()
    assert emb.shape == (2, 512, TINY["d_model"]) and emb.dtype == torch.float32
    assert lengths[0] < lengths[1] < 512 and lengths[0] >= 3
    for row, n in zip(emb, lengths):
        assert torch.count_nonzero(row[n:]) == 0  # exactly zero, every padded position
        assert (row[:n].norm(dim=-1) > 1.0).all()  # real tokens carry signal (final RMSNorm: ~sqrt(d))


def test_mask_is_used(encoder):
    """Embeddings of the real tokens equal running the encoder on the unpadded ids alone."""
    emb = encoder([SHORT, LONG])
    ids, mask = encoder.tokenize([SHORT, LONG])
    for b in range(2):
        n = int(mask[b].sum())
        with torch.no_grad():
            ref = encoder.encoder(input_ids=ids[b:b + 1, :n]).last_hidden_state[0]
        assert torch.allclose(emb[b, :n], ref, atol=1e-5), (emb[b, :n] - ref).abs().max()


def test_truncation_and_cleaning(spm_file):
    torch.manual_seed(0)
    enc = TextEncoder.from_config(TINY, spm_file, text_len=6)
    emb = enc([LONG, "  a red   fox\n runs  "])
    assert emb.shape == (2, 6, TINY["d_model"])
    assert torch.count_nonzero(emb[0].norm(dim=-1)) == 6  # truncated: no padding left
    ids, _ = enc.tokenize(["  a red   fox\n runs  ", SHORT])
    assert torch.equal(ids[0], ids[1])  # whitespace collapsed like Wan


def test_shipped_tokenizer_loads():
    model = ASSET_TOKENIZER / "spiece.model"
    assert model.is_file() and model.stat().st_size < 100_000
    tok = load_tokenizer(ASSET_TOKENIZER)
    assert 300 <= len(tok) <= 500
    ids = tok("a fox runs through the forest").input_ids
    assert ids[-1] == tok.eos_token_id == 1 and tok.pad_token_id == 0 and tok.unk_token_id not in ids
    torch.manual_seed(0)
    emb = TextEncoder.from_config(OmegaConf.create(TINY), ASSET_TOKENIZER, text_len=16)(["a fox runs"])
    assert emb.shape == (1, 16, TINY["d_model"])


def test_from_config_rejects_bad_keys(spm_file):
    with pytest.raises(ConfigError, match="d_modle"):
        TextEncoder.from_config({"d_modle": 32}, spm_file, text_len=8)
    with pytest.raises(ConfigError, match="vocab_size"):
        TextEncoder.from_config({**TINY, "vocab_size": 10}, spm_file, text_len=8)


def test_missing_tokenizer_path(tmp_path):
    with pytest.raises(WeightsMissingError, match=re.escape(str(tmp_path / "nope"))):
        TextEncoder.from_config(TINY, tmp_path / "nope", text_len=8)


def test_from_pretrained_missing_weights(tmp_path):
    with pytest.raises(WeightsMissingError) as err:
        TextEncoder.from_pretrained(tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "text_encoder") in msg and "setup_env.sh" in msg and "\n" not in msg
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "text_encoder" / "config.json").write_text("{}")
    with pytest.raises(WeightsMissingError, match=re.escape(str(tmp_path / "tokenizer"))):
        TextEncoder.from_pretrained(tmp_path)


def test_from_pretrained_round_trip(encoder, tmp_path):
    """A saved tiny encoder + tokenizer in Wan's diffusers layout loads back with the same outputs."""
    encoder.encoder.save_pretrained(tmp_path / "text_encoder")
    encoder.tokenizer.save_pretrained(tmp_path / "tokenizer")
    loaded = TextEncoder.from_pretrained(tmp_path, text_len=512, dtype=torch.float32)
    assert loaded.dtype == torch.float32 and loaded.device.type == "cpu"
    assert torch.equal(loaded([SHORT, LONG]), encoder([SHORT, LONG]))
    assert TextEncoder.from_pretrained(tmp_path, text_len=512).dtype == torch.bfloat16


def test_from_pretrained_weights_file_missing(tmp_path):
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "spiece.model").write_bytes((ASSET_TOKENIZER / "spiece.model").read_bytes())
    TextEncoder.from_config(TINY, ASSET_TOKENIZER, 8).encoder.config.save_pretrained(tmp_path / "text_encoder")
    with pytest.raises(WeightsMissingError, match=re.escape(str(tmp_path / "text_encoder"))) as err:
        TextEncoder.from_pretrained(tmp_path)
    assert "\n" not in str(err.value)
