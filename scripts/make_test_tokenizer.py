"""Train the tiny tokenizer shipped in ``tests/assets/tokenizer/`` (``spiece.model`` + ``tokenizer.json``).

Tiny runs (``random_init: true`` with ``tiny_text_encoder``) need a tokenizer but must not download
umt5-xxl's. This script trains a small unigram sentencepiece model on the English text below, with
T5's special ids (pad 0, eos 1, unk 2, no bos), and writes it beside a ``tokenizer.json`` built from
its pieces and scores with the ``tokenizers`` library.

Why ``tokenizer.json``: it is what the real umt5-xxl folder ships, and ``AutoTokenizer`` reads it
with the ``tokenizers`` library as is. Loading ``spiece.model`` instead goes through transformers'
conversions, which differ by version: 5.x's ``T5Tokenizer(vocab_file=...)`` silently builds a
4-token vocabulary, and its protobuf conversion fails on 5.17 / tokenizers 0.23.2 for a model
without an NFKC map ("Cannot parse precompiled_charsmap"). ``tests/test_text_encoder.py`` pins the
ids it gives. Training is deterministic for a given sentencepiece version; the result is
committed, so rerun only to change it (``--json_only`` rewrites tokenizer.json from the committed
``spiece.model``)::

    python scripts/make_test_tokenizer.py [--out_dir tests/assets/tokenizer] [--vocab_size 400] [--json_only]
"""
from __future__ import annotations

import argparse
import io
import json
import logging
from pathlib import Path

import sentencepiece as spm
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram

log = logging.getLogger("make_test_tokenizer")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "tests" / "assets" / "tokenizer"
SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2, as in T5

# Short scene descriptions in the style of text-to-video prompts, plus connective words.
CORPUS = """
a fox runs through the snowy forest at dawn
the fox jumps over a fallen tree and lands softly
a city at night with neon lights and rain on the street
a woman walks along the beach while the waves roll in
a man rides a bicycle down a quiet country road
a cat sleeps on a sunny windowsill next to a plant
a dog chases a red ball across the green park
two children build a sandcastle near the water
an astronaut floats slowly inside the space station
a train crosses a bridge over a deep mountain valley
the camera pans left to reveal a large castle on a hill
a small boat sails across the calm blue lake
birds fly over the field as the sun sets behind the trees
a chef cuts fresh vegetables in a busy kitchen
a dancer spins on the stage under a bright spotlight
snow falls gently on the roofs of a small village
a horse gallops across the open plain in the evening
the old man reads a book by the fire in a cozy room
a car drives fast through the wet streets of the city
waves crash against the rocks and white foam sprays into the air
a girl plays the piano in a large empty hall
the wind moves the tall grass in a wide meadow
a bear catches a fish in the cold river
a robot walks slowly through the ruins of an old building
people walk under umbrellas on a rainy afternoon
a close up of a flower opening in the morning light
the camera follows a runner along the river path
a butterfly lands on a yellow flower in the garden
fireworks explode over the harbor at midnight
a panda eats bamboo in the forest and looks at the camera
cinematic shot, high quality, detailed, realistic, slow motion
wide angle view of the mountains covered with clouds
the sky turns orange and purple as the day ends
a young boy throws a stone into the pond and watches the ripples
an eagle soars high above the canyon
the river flows past the village and under the stone bridge
a musician plays the guitar on a street corner
a group of friends laugh around a campfire at night
the lights of the city reflect on the surface of the water
a skier rushes down the steep white slope
a jellyfish drifts through the dark ocean, glowing softly
a family shares breakfast at a wooden table in the countryside
the volcano erupts and glowing lava pours down its side
a painter adds bright colours to a huge canvas in her studio
an owl blinks from a branch under the full moon
thunderstorm clouds gather quickly above the desert highway
a squirrel gathers acorns beneath an autumn maple tree
the spaceship lands gently on a strange purple planet
a knight in silver armour draws his sword before the dragon
a crowded market full of spices, fruit and colourful fabrics
a surfer catches a giant wave and glides toward the shore
steam rises from a cup of coffee beside an open laptop
the ballerina leaps gracefully across the wooden floor
a lighthouse shines its beam over stormy black water
autumn leaves swirl in the wind along an empty sidewalk
a hummingbird hovers beside a pink blossom, wings blurring
an elderly couple dance together in their small kitchen
the submarine descends past schools of silver fish
a magician pulls a white rabbit from his black hat
soldiers march through the muddy trenches in heavy rain
a kitten tumbles playfully with a ball of blue yarn
the waterfall thunders into a misty emerald pool
a cyclist climbs the winding pass toward snowy peaks
lanterns float upward into the warm summer night
a chemist pours glowing liquid between glass bottles
the clock tower strikes twelve above the frozen square
a whale breaches, splashing enormous waves everywhere
zebras and giraffes wander across the dusty savanna
a pilot checks the controls before takeoff at sunrise
quick brown foxes jump over lazy dogs
vivid, moody, dramatic lighting, shallow depth of field, bokeh
""".strip()

# One more pass over the words in different orders so every word gets enough counts.
WORDS = sorted(set(CORPUS.replace(",", " ").split()))


def corpus_lines() -> list[str]:
    lines = CORPUS.splitlines()
    lines += [" ".join(WORDS[i:i + 8]) for i in range(0, len(WORDS), 8)]
    lines += [" ".join(reversed(WORDS[i:i + 8])) for i in range(0, len(WORDS), 8)]
    return lines


def train(out: Path, vocab_size: int) -> Path:
    """Train the unigram model and write it to ``out``; return ``out``."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # the corpus is small; take what it supports up to vocab_size
        character_coverage=1.0,
        normalization_rule_name="identity",  # no NFKC table: keeps the file a few KB (T5 uses nmt_nfkc)
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1,  # T5's layout
        pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        num_threads=1,
        minloglevel=2,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.getvalue())
    return out


def write_tokenizer_json(model_file: Path, out_dir: Path) -> Path:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` for ``model_file`` into ``out_dir``.

    The pipeline of umt5-xxl's tokenizer.json without its Precompiled (NFKC) normalizer, which the
    model has none of (identity normalization): collapse runs of spaces, Metaspace with a "▁"
    prefix, Unigram over the sentencepiece pieces and scores, ``</s>`` appended.
    """
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    if [sp.id_to_piece(i) for i in range(3)] != list(SPECIALS) or sp.unk_id() != 2:
        raise ValueError(f"{model_file} does not have T5's special pieces {SPECIALS} at ids 0-2")
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    out = out_dir / "tokenizer.json"
    tok.save(str(out), pretty=True)
    # PreTrainedTokenizerFast takes tokenizer.json as is on transformers 4 and 5 (T5TokenizerFast
    # would rebuild the pipeline on 5.x and, without extra_ids=0, add 100 sentinel tokens).
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "eos_token": "</s>",
              "unk_token": "<unk>"}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--vocab_size", type=int, default=400)
    parser.add_argument("--json_only", action="store_true", help="keep spiece.model, rewrite tokenizer.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = args.out_dir / "spiece.model"
    if not args.json_only:
        train(path, args.vocab_size)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    log.info("%s %s (%d bytes, %d pieces)", "kept" if args.json_only else "wrote", path,
             path.stat().st_size, sp.get_piece_size())
    log.info("wrote %s", write_tokenizer_json(path, args.out_dir))


if __name__ == "__main__":
    main()
