"""model/text_encoder.py: padded UMT5 embeddings, exact zeros past each prompt, offline tokenizers."""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from omegaconf import OmegaConf

from model.text_encoder import TextEncoder, clean_prompt, load_sentencepiece_tokenizer, load_tokenizer
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


def test_padding_is_not_encoded_yet_embeddings_equal_wans(encoder, monkeypatch):
    """Oracle: Wan's (and diffusers' WanPipeline's) encode, all text_len positions with the mask,
    then zeros past each prompt. Ours runs only the longest prompt's tokens through the encoder."""
    ids, mask = encoder.tokenize([SHORT, LONG])
    with torch.no_grad():
        wan = encoder.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    wan = wan * mask[..., None]
    seen = []
    forward = encoder.encoder.forward
    monkeypatch.setattr(encoder.encoder, "forward", lambda **kw: seen.append(kw["input_ids"].shape) or forward(**kw))
    ours = encoder([SHORT, LONG])
    assert seen == [(2, int(mask.sum(1).max()))] and seen[0][1] < 512 // 10
    assert ours.shape == wan.shape
    assert torch.count_nonzero(ours[~mask.bool()]) == 0
    assert (ours - wan).abs().max() <= 1e-5 * wan.abs().max(), (ours - wan).abs().max()
    # one prompt alone gives what it gives in a batch with a longer one (live and batch encode one at a time)
    assert torch.allclose(encoder([SHORT])[0], ours[0], rtol=0, atol=1e-5 * wan.abs().max())


def test_on_a_gpu_the_padding_is_encoded_as_wan_does(encoder, monkeypatch):
    """Off the CPU the padded encode takes milliseconds, so it stays Wan's, bit for bit; either
    way can be asked for (the latency script times both)."""
    _, mask = encoder.tokenize([SHORT, LONG])
    assert encoder.trims and encoder.encoded_positions(mask) == int(mask.sum(1).max()) < 512
    assert encoder.encoded_positions(mask, trim=False) == 512
    ids, _ = encoder.tokenize([SHORT, LONG])
    with torch.no_grad():
        wan = encoder.encoder(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None]
    assert torch.equal(encoder([SHORT, LONG], trim=False), wan)
    monkeypatch.setattr(TextEncoder, "device", property(lambda self: torch.device("cuda")))
    assert not encoder.trims and encoder.encoded_positions(mask) == 512
    assert encoder.encoded_positions(mask, trim=True) < 512


def test_truncation_and_cleaning(spm_file):
    torch.manual_seed(0)
    enc = TextEncoder.from_config(TINY, spm_file, text_len=6)
    emb = enc([LONG, "  a red   fox\n runs  "])
    assert emb.shape == (2, 6, TINY["d_model"])
    assert torch.count_nonzero(emb[0].norm(dim=-1)) == 6  # truncated: no padding left
    ids, _ = enc.tokenize(["  a red   fox\n runs  ", SHORT])
    assert torch.equal(ids[0], ids[1])  # whitespace collapsed like Wan


# Ids the shipped tokenizer (tests/assets/tokenizer/tokenizer.json) gives, computed once and checked
# equal on transformers 4.51.3 / tokenizers 0.21.4, 5.17.0 / 0.23.2 and 5.24.0 / 0.23.3. If this
# fails, the tokenizer loads differently on the installed version: tiny runs would not be comparable.
PINNED = {
    "a fox runs through the snowy forest at dawn": [4, 67, 105, 3, 45, 22, 42, 6, 66, 7, 163, 54, 316, 1],
    "  a red   fox\n runs  ": [4, 5, 11, 126, 67, 105, 3, 1],  # cleaned like Wan first
    "Zebras éat Ω": [5, 2, 9, 39, 11, 169, 5, 2, 50, 8, 5, 2, 1],  # unknown characters → <unk> (2)
}
TRUNCATED = ("The camera pans left to reveal a large castle, 4K!",  # 22 ids untruncated
             [5, 2, 77, 9, 130, 380, 3, 5, 84, 114, 137, 264, 4, 29, 11, 1])


def test_shipped_tokenizer_loads():
    assert (ASSET_TOKENIZER / "tokenizer.json").is_file()
    model = ASSET_TOKENIZER / "spiece.model"
    assert model.is_file() and model.stat().st_size < 100_000
    tok = load_tokenizer(ASSET_TOKENIZER)
    assert len(tok) == 400 and not [t for t in tok.get_vocab() if t.startswith("<extra_id")]  # no sentinels
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    for text in (*PINNED, TRUNCATED[0]):  # tokenizer.json encodes like the sentencepiece model it came from
        assert tok(clean_prompt(text)).input_ids == sp.encode(clean_prompt(text)) + [1]
    torch.manual_seed(0)
    emb = TextEncoder.from_config(OmegaConf.create(TINY), ASSET_TOKENIZER, text_len=16)(["a fox runs"])
    assert emb.shape == (1, 16, TINY["d_model"])


def test_shipped_tokenizer_pinned_ids():
    torch.manual_seed(0)
    enc = TextEncoder.from_config(TINY, ASSET_TOKENIZER, text_len=16)
    assert enc.encoder.config.vocab_size == 400
    ids, mask = enc.tokenize([*PINNED, TRUNCATED[0]])
    assert ids.shape == mask.shape == (4, 16)
    for row, row_mask, expected in zip(ids.tolist(), mask.tolist(), PINNED.values()):
        n = len(expected)
        assert row == expected + [0] * (16 - n)  # padded with <pad> to text_len
        assert row_mask == [1] * n + [0] * (16 - n)
    assert ids[3].tolist() == TRUNCATED[1] and mask[3].all()  # truncated to text_len, </s> kept last
    assert len(enc.tokenizer(TRUNCATED[0]).input_ids) == 22


def test_unconvertible_sentencepiece_model_is_a_config_error(spm_file, monkeypatch):
    """transformers 5.17's protobuf conversion raises a bare Exception for some models: say what to do."""
    import transformers
    if not hasattr(transformers.T5Tokenizer, "convert_to_native_format"):
        pytest.skip("transformers 4 reads .model files with sentencepiece itself")

    def fail(*args, **kwargs):
        raise Exception("Error while attempting to build Precompiled normalizer: Cannot parse precompiled_charsmap")

    monkeypatch.setattr(transformers.T5Tokenizer, "convert_to_native_format", fail)
    with pytest.raises(ConfigError, match="tokenizer.json") as err:
        load_tokenizer(spm_file)
    assert str(spm_file) in str(err.value) and "precompiled_charsmap" in str(err.value)


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


def test_from_pretrained_truncated_weights(encoder, tmp_path):
    encoder.encoder.save_pretrained(tmp_path / "text_encoder")
    encoder.tokenizer.save_pretrained(tmp_path / "tokenizer")
    weights = tmp_path / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # an interrupted download
    with pytest.raises(WeightsMissingError, match=re.escape(str(tmp_path / "text_encoder"))) as err:
        TextEncoder.from_pretrained(tmp_path)
    assert "corrupt" in str(err.value) and "download it again" in str(err.value) and "\n" not in str(err.value)


def test_from_pretrained_config_that_does_not_fit_the_weights(encoder, tmp_path):
    encoder.encoder.save_pretrained(tmp_path / "text_encoder")
    encoder.tokenizer.save_pretrained(tmp_path / "tokenizer")
    config_file = tmp_path / "text_encoder" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "d_ff": 128}))
    with pytest.raises(WeightsMissingError, match=re.escape(str(tmp_path / "text_encoder"))) as err:
        TextEncoder.from_pretrained(tmp_path)
    assert "not the Wan2.1 umt5-xxl encoder" in str(err.value) and "\n" not in str(err.value)


def _truncate(path: Path) -> None:
    path.write_text(path.read_text()[:len(path.read_text()) // 2])


@pytest.mark.parametrize("damage", [
    lambda tok: _truncate(tok / "tokenizer.json"),
    lambda tok: _truncate(tok / "tokenizer_config.json"),
    lambda tok: (tok / "tokenizer.json").unlink(),  # tokenizer_config.json alone
], ids=["tokenizer.json truncated", "tokenizer_config.json truncated", "tokenizer.json missing"])
def test_damaged_tokenizer_folder(encoder, tmp_path, damage):
    encoder.tokenizer.save_pretrained(tmp_path)
    for extra in ("spiece.model", "tokenizer.model"):  # only the JSON files, as the Wan folder has besides
        (tmp_path / extra).unlink(missing_ok=True)
    damage(tmp_path)
    with pytest.raises(WeightsMissingError, match=re.escape(str(tmp_path))) as err:
        load_tokenizer(tmp_path)
    assert "incomplete" in str(err.value) and "\n" not in str(err.value)


def test_truncated_sentencepiece_model(spm_file, tmp_path):
    model = tmp_path / "spiece.model"
    model.write_bytes(spm_file.read_bytes()[:500])
    with pytest.raises(WeightsMissingError, match=re.escape(str(model))) as err:
        load_tokenizer(tmp_path)
    assert "corrupt" in str(err.value) and "\n" not in str(err.value)


def test_latency_script_times_both_encodes_of_one_embedding(tmp_path):
    """scripts/text_encoder_latency.py on the tiny config: one row per prompt, the two encodes
    equal to float rounding; a prompt longer than text_len counts as text_len tokens."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "latency.md"
    run = subprocess.run([sys.executable, str(repo / "scripts" / "text_encoder_latency.py"), "--config_path",
                          str(repo / "configs" / "tiny.yaml"), "--repeats", "1", "--out", str(out)],
                         capture_output=True, text=True, cwd=repo, timeout=120)
    assert run.returncode == 0, run.stderr
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| cpu")]
    text_len = OmegaConf.load(repo / "configs" / "tiny.yaml").model.text_len
    tokens = [int(r[1]) for r in rows]
    assert len(rows) == 3 and tokens[0] < tokens[1] and tokens[-1] == text_len
    assert all(float(r[5]) < 1e-5 for r in rows) and all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows)
    assert all(r[6].strip() == "prompt only" for r in rows)  # what the pipeline runs on the CPU
    for args in (["--devices", "gpu"], ["--devices", "cpu", "nokey=1"], ["--config_path", "nope.yaml"],
                 ["--devices", "cpu,mps"]):  # a device torch knows but the project does not run on
        bad = subprocess.run([sys.executable, str(repo / "scripts" / "text_encoder_latency.py"), *args],
                             capture_output=True, text=True, cwd=repo, timeout=120)
        assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr, bad.stderr
    assert "device must be cpu, cuda or cuda:N (an NVIDIA GPU), not 'mps'" in bad.stderr


def test_two_threads_tokenize_and_count_without_mixing_settings():
    """A live session counts a new action's tokens (its server or stdin thread) while its rollout
    thread tokenizes another: a fast tokenizer keeps its padding and truncation as state, so
    unguarded, one call ran with the other's (a count of text_len, an unpadded batch)."""
    import sys
    import threading

    from utils.config import load_config

    cfg = load_config("configs/tiny.yaml")  # the shipped test tokenizer (a fast one)
    encoder = TextEncoder.from_config(cfg.tiny_text_encoder, cfg.tokenizer_path, text_len=cfg.model.text_len)

    texts = [f"the fox {i} jumps high into the air" for i in range(50)]
    want = {t: encoder.count_tokens(t) for t in texts}
    wrong = []

    def tokenize():
        for i in range(1500):
            ids, _ = encoder.tokenize([f"a fox number {i} runs through the snow"])
            if ids.shape[1] != encoder.text_len:
                wrong.append(tuple(ids.shape))

    def count():
        for i in range(1500):
            if encoder.count_tokens(texts[i % 50]) != want[texts[i % 50]]:
                wrong.append(texts[i % 50])
    threads = [threading.Thread(target=tokenize), threading.Thread(target=count)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: unguarded, hundreds of calls go wrong
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert wrong == []
