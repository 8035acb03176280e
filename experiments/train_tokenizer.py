"""Trains a lossless BPE SentencePiece tokenizer on a corpus (default: <corpus_dir>/tokenizer.model).

  python -m experiments.train_tokenizer --corpus_dir=data/stdlib --vocab_size=32768
"""

import pathlib

from absl import app
from absl import flags

from gemma_mtp import data
from gemma_mtp import tokenizer

_CORPUS_DIR = flags.DEFINE_string("corpus_dir", None, "Corpus from build_corpus (its train split).",
                                  required=True)
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 32_768, "Vocabulary size, specials included.")
_MODEL_PREFIX = flags.DEFINE_string("model_prefix", None,
                                    "Output path without .model (default <corpus_dir>/tokenizer).")
_INPUT_SENTENCE_SIZE = flags.DEFINE_integer("input_sentence_size", 500_000,
                                            "Cap on training lines (a random sample).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the line sampling.")


def main(argv):
  del argv
  tokenizer.train_tokenizer(
      files=[data.split_file(_CORPUS_DIR.value, "train")], vocab_size=_VOCAB_SIZE.value,
      model_prefix=_MODEL_PREFIX.value or pathlib.Path(_CORPUS_DIR.value) / "tokenizer",
      input_sentence_size=_INPUT_SENTENCE_SIZE.value, seed=_SEED.value)


if __name__ == "__main__":
  app.run(main)
