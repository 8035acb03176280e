"""SentencePiece tokenizers: Gemma's own `tokenizer.model`, or a BPE model trained here on source code.

A tokenizer trained by `train_tokenizer` is lossless on source code: `decode(encode(x)) == x` for any
string, newlines, tabs, indentation, `\\r` and non-ASCII text included. That holds because

  * nothing is normalized (`identity` rule, no whitespace stripping, no dummy prefix);
  * characters outside the vocabulary fall back to their UTF-8 bytes (`<0x..>` pieces);
  * SentencePiece's whitespace marker U+2581 ('▁'), which it would decode to a space, is encoded as
    its three byte pieces by `Tokenizer.encode`.

Indentation gets its own pieces: "\\n" followed by 1..16 spaces (or 1..4 tabs) is one user-defined
symbol, and runs of spaces inside a line can become whitespace-only pieces.

Special ids follow Gemma: pad=0, eos=1, bos=2, unk=3.
"""

from __future__ import annotations

import io
import hashlib
import logging
import os
import pathlib
import time
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3

# SentencePiece's escaped space; user-defined symbols must be written with it.
_SPACE = "\u2581"
_SPACE_BYTES = tuple(f"<0x{b:02X}>" for b in _SPACE.encode("utf-8"))
# The separator between documents in corpus files (data.FILE_SEPARATOR, ASCII "file separator").
_FILE_SEPARATOR = "\x1c"


class Tokenizer:
  """A SentencePiece model with `encode` / `decode` on plain Python strings and id lists.

  Attributes:
    vocab_size: number of pieces (ids are in [0, vocab_size)).
    pad_id, eos_id, bos_id, unk_id: special ids (-1 where the model has none).
    fingerprint: 16 hex digits identifying the model (caches of token ids are keyed by it).
  """

  def __init__(self, processor: spm.SentencePieceProcessor):
    self._sp = processor
    # Ids spelling U+2581 byte by byte; None when the model has no byte pieces.
    ids = [processor.piece_to_id(p) for p in _SPACE_BYTES]
    unk = processor.unk_id()
    self._space_ids = None if any(i == unk for i in ids) else ids
    proto = processor.serialized_model_proto()
    self.fingerprint = hashlib.sha1(proto).hexdigest()[:16]

  @classmethod
  def load(cls, path: PathLike) -> "Tokenizer":
    """Loads a SentencePiece `.model` file (Gemma's `tokenizer.model` or one from `train_tokenizer`).

    `path` may also be a directory holding `tokenizer.model`.
    """
    path = pathlib.Path(path)
    if path.is_dir():
      path = path / "tokenizer.model"
    if not path.is_file():
      raise FileNotFoundError(f"tokenizer model {path} does not exist (expected a SentencePiece "
                              ".model file or a directory holding tokenizer.model)")
    sp = spm.SentencePieceProcessor()
    try:
      sp.load(str(path))
    except (OSError, RuntimeError) as e:
      raise ValueError(f"{path} is not a SentencePiece model: {e}") from None
    return cls(sp)

  @property
  def vocab_size(self) -> int:
    return self._sp.vocab_size()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(i)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text` (no BOS / EOS added)."""
    if self._space_ids is None or _SPACE not in text:
      return self._sp.encode(text)
    ids: list[int] = []
    for i, part in enumerate(text.split(_SPACE)):
      if i:
        ids.extend(self._space_ids)
      ids.extend(self._sp.encode(part))
    return ids

  def encode_batch(self, texts: Sequence[str], *, num_threads: int = 0) -> list[list[int]]:
    """`[encode(t) for t in texts]`, encoded on `num_threads` threads (0: all cores)."""
    plain = [i for i, t in enumerate(texts) if self._space_ids is None or _SPACE not in t]
    out: list[list[int]] = [[] for _ in texts]
    if plain:
      encoded = self._sp.encode([texts[i] for i in plain], num_threads=num_threads or -1)
      for i, ids in zip(plain, encoded):
        out[i] = ids
    for i, t in enumerate(texts):
      if self._space_ids is not None and _SPACE in t:
        out[i] = self.encode(t)
    return out

  def decode(self, ids: Iterable[int]) -> str:
    """The text of `ids`; special ids (pad, eos, bos) decode to nothing."""
    return self._sp.decode([int(i) for i in ids])

  def __repr__(self) -> str:
    return (f"Tokenizer(vocab_size={self.vocab_size}, pad={self.pad_id}, eos={self.eos_id}, "
            f"bos={self.bos_id}, unk={self.unk_id}, fingerprint={self.fingerprint})")


def indentation_symbols(*, max_spaces: int = 16, max_tabs: int = 4) -> list[str]:
  """User-defined symbols for line breaks and indentation, in SentencePiece's escaped spelling."""
  return (["\n", "\t"] + ["\n" + _SPACE * k for k in range(1, max_spaces + 1)]
          + ["\n" + "\t" * k for k in range(1, max_tabs + 1)])


def _lines(documents: Iterable[str]) -> Iterator[str]:
  """Training sentences: one per source line, with the line break in front (as encode sees it)."""
  for doc in documents:
    for line in doc.split("\n"):
      yield "\n" + line


def _read_documents(files: Sequence[PathLike]) -> Iterator[str]:
  for f in files:
    try:
      text = pathlib.Path(f).read_bytes().decode("utf-8")
    except OSError as e:
      raise FileNotFoundError(f"cannot read tokenizer training file {f}: {e}") from None
    except UnicodeDecodeError as e:
      raise ValueError(f"tokenizer training file {f} is not UTF-8 text: {e}") from None
    yield from text.split(_FILE_SEPARATOR)


def train_tokenizer(
    *,
    files: Sequence[PathLike] | None = None,
    documents: Iterable[str] | None = None,
    vocab_size: int,
    model_prefix: PathLike,
    input_sentence_size: int = 500_000,
    max_indent_spaces: int = 16,
    character_coverage: float = 0.9995,
    seed: int = 0,
    num_threads: int = 0,
) -> Tokenizer:
  """Trains a lossless BPE tokenizer for source code; writes `<model_prefix>.model` and `.vocab`.

  Exactly one of `files` (text files; corpus files from `data.write_corpus` are split into their
  documents) and `documents` (strings) must be given. Every source line is one training sentence;
  at most `input_sentence_size` of them (a random subset, fixed by `seed`) are used, which keeps
  training on tens of MB of code under a minute on a CPU.

  Args:
    files: text files to train on.
    documents: strings to train on.
    vocab_size: size of the vocabulary, specials, byte pieces (256) and indentation symbols included.
    model_prefix: output path without extension.
    input_sentence_size: cap on training sentences (lines).
    max_indent_spaces: "\\n" + 1..max_indent_spaces spaces are single pieces.
    character_coverage: share of characters that get their own piece (the rest use bytes).
    seed: seed of the sentence sampling.
    num_threads: trainer threads (0: all cores).

  Returns:
    The trained tokenizer (pad=0, eos=1, bos=2, unk=3).
  """
  if (files is None) == (documents is None):
    raise ValueError("train_tokenizer needs exactly one of files= and documents=")
  symbols = indentation_symbols(max_spaces=max_indent_spaces)
  minimum = 4 + 256 + len(symbols) + 1
  if vocab_size < minimum:
    raise ValueError(f"vocab_size={vocab_size} is too small: 4 specials, 256 byte pieces and "
                     f"{len(symbols)} indentation symbols need at least {minimum}")
  docs = _read_documents(files) if files is not None else documents
  prefix = pathlib.Path(model_prefix)
  prefix.parent.mkdir(parents=True, exist_ok=True)
  spm.set_random_generator_seed(seed)
  start = time.perf_counter()
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=_lines(docs), model_writer=model, vocab_size=vocab_size,
      model_type="bpe", byte_fallback=True, split_digits=True,
      normalization_rule_name="identity", remove_extra_whitespaces=False,
      add_dummy_prefix=False, allow_whitespace_only_pieces=True, user_defined_symbols=symbols,
      character_coverage=character_coverage, input_sentence_size=input_sentence_size,
      shuffle_input_sentence=True, pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
      num_threads=num_threads or os.cpu_count() or 1, minloglevel=2)
  proto = model.getvalue()
  sp = spm.SentencePieceProcessor(model_proto=proto)
  tmp = prefix.with_name(prefix.name + ".model.tmp")
  tmp.write_bytes(proto)
  os.replace(tmp, prefix.with_name(prefix.name + ".model"))
  with open(prefix.with_name(prefix.name + ".vocab"), "w", encoding="utf-8") as f:
    for i in range(sp.vocab_size()):
      f.write(f"{sp.id_to_piece(i)!r}\t{sp.get_score(i)}\n")
  log.info("trained a %d-piece BPE tokenizer in %.1f s -> %s.model", sp.vocab_size(),
           time.perf_counter() - start, prefix)
  return Tokenizer(sp)
