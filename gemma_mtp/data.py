"""Source-code corpora: file discovery and train/eval split, tokenization with a disk cache, packing,
and a deterministic batch loader.

Pipeline:

  build_corpus(roots)        -> Corpus (which files, which split)  [default root: Python's stdlib]
  write_corpus(corpus, dir)  -> dir/train.txt, dir/eval.txt, dir/manifest.json
                                (documents separated by FILE_SEPARATOR, ASCII 0x1C)
  load_tokens(text, tok)     -> [N_tokens] int32, every document followed by EOS; cached as .npy
  pack(tokens, seq_len=T)    -> [N, T + 1] view; row i = tokens[i*T : i*T + T + 1], so consecutive
                                rows overlap by one token and every token is a target exactly once
  Loader(sequences, ...)     -> batch_at(step) = {"tokens": [B, T + 1] int32}

`Loader.batch_at(step)` is a pure function of (seed, step): epoch e uses the permutation
`default_rng((seed, e))`, so a run resumed at step s sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import sysconfig
import time
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

FILE_SEPARATOR = "\x1c"   # ASCII "file separator"; files containing it are skipped
TEST_DIRS = ("test", "tests", "idle_test", "testing", "testdata", "test_data")
# Never descended into unless asked for: installed packages and caches.
PACKAGE_DIRS = ("site-packages", "dist-packages")
SKIP_DIRS = ("__pycache__", ".git", ".hg", ".svn", ".tox", ".venv", "node_modules")
TRAIN_FILE, EVAL_FILE, MANIFEST_FILE = "train.txt", "eval.txt", "manifest.json"
SPLITS = ("train", "eval")


class Progress:
  """Logs "what: i/n (rate/s)" at most every `every_s` seconds and once at the end."""

  def __init__(self, what: str, total: int | None = None, *, unit: str = "files",
               every_s: float = 5.0):
    self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
    self.count = 0
    self.start = self.last = time.perf_counter()

  def update(self, n: int = 1):
    self.count += n
    now = time.perf_counter()
    if now - self.last >= self.every_s:
      self.last = now
      self._log(now)

  def done(self):
    self._log(time.perf_counter())

  def _log(self, now: float):
    total = f"/{self.total}" if self.total is not None else ""
    rate = self.count / max(now - self.start, 1e-9)
    log.info("%s: %d%s %s (%.0f %s/s, %.1f s)", self.what, self.count, total, self.unit, rate,
             self.unit, now - self.start)


# ================================================================================================
# Corpus: which files, which split
# ================================================================================================

@dataclasses.dataclass(frozen=True)
class SourceFile:
  """One file of a corpus.

  Attributes:
    root: the root directory it was found under.
    relpath: its path relative to `root`, '/'-separated (the split is a function of this).
    size: size in bytes.
  """

  root: pathlib.Path
  relpath: str
  size: int

  @property
  def path(self) -> pathlib.Path:
    return self.root / self.relpath


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Attributes:
    train_files, eval_files: the files of each split, sorted by (root, relpath).
    stats: counts and sizes (files / bytes per split, skipped files by reason).
  """

  train_files: tuple[SourceFile, ...]
  eval_files: tuple[SourceFile, ...]
  stats: dict[str, Any]


def default_roots() -> list[pathlib.Path]:
  """The running interpreter's standard library."""
  return [pathlib.Path(sysconfig.get_paths()["stdlib"])]


def is_eval(relpath: str, eval_fraction: float) -> bool:
  """The split of a file: sha1(relpath) read as a fraction in [0, 1) is below `eval_fraction`."""
  h = int.from_bytes(hashlib.sha1(relpath.encode("utf-8")).digest()[:8], "big")
  return h / 2.0**64 < eval_fraction


def _read_text(path: pathlib.Path) -> tuple[str | None, str]:
  """(text, "") or (None, reason) with reason in unreadable / binary / separator."""
  try:
    raw = path.read_bytes()
  except OSError:
    return None, "unreadable"
  if b"\0" in raw:
    return None, "binary"
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError:
    return None, "binary"
  if FILE_SEPARATOR in text:
    return None, "separator"
  return text, ""


def build_corpus(
    roots: Sequence[PathLike] | None = None,
    *,
    eval_fraction: float = 0.02,
    exclude_tests: bool = True,
    include_packages: bool = False,
    extensions: Sequence[str] = (".py",),
    max_file_bytes: int = 1_000_000,
) -> Corpus:
  """Finds the source files under `roots` and splits them into train and eval.

  A file is kept if its name ends with one of `extensions`, no directory on its path (relative to
  its root) is excluded, it is at most `max_file_bytes`, and it is readable UTF-8 text without NUL
  bytes or FILE_SEPARATOR. The split depends only on the relative path (`is_eval`), so it is the
  same on every machine and stable as files are added or removed.

  Args:
    roots: directories to scan; default `default_roots()` (the standard library).
    eval_fraction: expected share of files in the eval split, in [0, 1).
    exclude_tests: skip directories named as in TEST_DIRS (test, tests, idlelib/idle_test, ...).
    include_packages: also descend into site-packages / dist-packages below a root.
    extensions: file name endings to keep, e.g. (".py", ".pyi", ".md").
    max_file_bytes: larger files are skipped (generated tables, data blobs).

  Raises:
    ValueError: a bad eval_fraction or empty extensions.
    FileNotFoundError: a root that is not a directory.
  """
  if not 0.0 <= eval_fraction < 1.0:
    raise ValueError(f"eval_fraction={eval_fraction} must be in [0, 1)")
  extensions = tuple(extensions)
  if not extensions or not all(isinstance(e, str) and e for e in extensions):
    raise ValueError(f"extensions={extensions!r} must be non-empty strings such as '.py'")
  roots = [pathlib.Path(r).absolute() for r in (roots or default_roots())]
  for r in roots:
    if not r.is_dir():
      raise FileNotFoundError(f"corpus root {r} is not a directory")
  skip_dirs = set(SKIP_DIRS) | set(() if include_packages else PACKAGE_DIRS) | \
      set(TEST_DIRS if exclude_tests else ())

  skipped = {"huge": 0, "binary": 0, "unreadable": 0, "separator": 0}
  excluded_dirs = 0
  splits: dict[str, list[SourceFile]] = {"train": [], "eval": []}
  progress = Progress("scanning corpus files")
  for root in roots:
    for dirpath, dirnames, filenames in os.walk(root):
      kept = sorted(d for d in dirnames if d not in skip_dirs)
      excluded_dirs += len(dirnames) - len(kept)
      dirnames[:] = kept
      for name in sorted(filenames):
        if not name.endswith(extensions):
          continue
        path = pathlib.Path(dirpath) / name
        if not path.is_file():  # dangling links, sockets, ...
          skipped["unreadable"] += 1
          continue
        size = path.stat().st_size
        if size > max_file_bytes:
          skipped["huge"] += 1
          continue
        _, reason = _read_text(path)
        if reason:
          skipped[reason] += 1
          continue
        relpath = path.relative_to(root).as_posix()
        split = "eval" if is_eval(relpath, eval_fraction) else "train"
        splits[split].append(SourceFile(root, relpath, size))
        progress.update()
  progress.done()
  stats = {
      "roots": [str(r) for r in roots],
      "extensions": list(extensions),
      "eval_fraction": eval_fraction,
      "exclude_tests": exclude_tests,
      "include_packages": include_packages,
      "max_file_bytes": max_file_bytes,
      **{f"{s}_files": len(f) for s, f in splits.items()},
      **{f"{s}_bytes": sum(x.size for x in f) for s, f in splits.items()},
      "excluded_dirs": excluded_dirs,
      **{f"skipped_{k}": v for k, v in skipped.items()},
  }
  if not splits["train"]:
    raise ValueError(f"no {'/'.join(extensions)} files found under {[str(r) for r in roots]} "
                     f"(stats: {stats})")
  return Corpus(tuple(splits["train"]), tuple(splits["eval"]), stats)


def _atomic_write_text(path: pathlib.Path, text: str):
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  with open(tmp, "w", encoding="utf-8", newline="") as f:
    f.write(text)
  os.replace(tmp, path)


def write_corpus(corpus: Corpus, out_dir: PathLike) -> pathlib.Path:
  """Writes train.txt / eval.txt (documents joined by FILE_SEPARATOR) and manifest.json.

  The manifest lists every file of each split (root-relative) and the corpus stats.
  """
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  progress = Progress("writing corpus", len(corpus.train_files) + len(corpus.eval_files))
  for split, files, name in (("train", corpus.train_files, TRAIN_FILE),
                             ("eval", corpus.eval_files, EVAL_FILE)):
    docs = []
    for f in files:
      text, reason = _read_text(f.path)
      if text is None:  # changed since build_corpus
        raise ValueError(f"{f.path} became {reason} after build_corpus; rebuild the corpus")
      docs.append(text)
      progress.update()
    _atomic_write_text(out / name, FILE_SEPARATOR.join(docs))
  progress.done()
  manifest = {
      "stats": corpus.stats,
      "train": [f"{f.root.name}/{f.relpath}" for f in corpus.train_files],
      "eval": [f"{f.root.name}/{f.relpath}" for f in corpus.eval_files],
  }
  _atomic_write_text(out / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")
  log.info("corpus -> %s: %s", out, {k: v for k, v in corpus.stats.items() if k != "roots"})
  return out


def split_file(corpus_dir: PathLike, split: str) -> pathlib.Path:
  """Path of a split's text file; FileNotFoundError naming the directory if it is missing."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r}; expected one of {SPLITS}")
  path = pathlib.Path(corpus_dir) / (TRAIN_FILE if split == "train" else EVAL_FILE)
  if not path.is_file():
    raise FileNotFoundError(f"{path} does not exist: {corpus_dir} is not a corpus directory "
                            "(write one with experiments/build_corpus.py)")
  return path


def read_documents(path: PathLike) -> list[str]:
  """The documents of a corpus text file (split at FILE_SEPARATOR; an empty file has none)."""
  text = pathlib.Path(path).read_bytes().decode("utf-8")
  return text.split(FILE_SEPARATOR) if text else []


# ================================================================================================
# Tokens
# ================================================================================================

def tokenize_documents(docs: Sequence[str], tokenizer, *, chunk: int = 256) -> np.ndarray:
  """[N_tokens] int32: the documents' tokens, each followed by `tokenizer.eos_id`."""
  eos = tokenizer.eos_id
  if eos < 0:
    raise ValueError(f"{tokenizer} has no EOS id; documents could not be separated")
  parts = []
  progress = Progress("tokenizing", len(docs), unit="docs")
  for i in range(0, len(docs), chunk):
    for ids in tokenizer.encode_batch(docs[i:i + chunk]):
      parts.append(np.asarray(ids + [eos], np.int32))
    progress.update(len(docs[i:i + chunk]))
  progress.done()
  return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


def load_tokens(text_file: PathLike, tokenizer, *, cache_dir: PathLike | None = None) -> np.ndarray:
  """Tokens of a corpus text file (see `tokenize_documents`), memory-mapped from an .npy cache.

  The cache file `<cache_dir>/<stem>.<key>.npy` (default cache_dir: `tokens/` next to the text)
  is keyed by the text's sha1 and the tokenizer's fingerprint, so editing either re-tokenizes.
  """
  text_file = pathlib.Path(text_file)
  raw = text_file.read_bytes()
  key = hashlib.sha1(raw + tokenizer.fingerprint.encode()).hexdigest()[:16]
  cache = pathlib.Path(cache_dir) if cache_dir is not None else text_file.parent / "tokens"
  path = cache / f"{text_file.stem}.{key}.npy"
  if not path.is_file():
    start = time.perf_counter()
    tokens = tokenize_documents(read_documents(text_file), tokenizer)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npy")
    np.save(tmp, tokens)
    os.replace(tmp, path)
    log.info("tokenized %s: %d tokens (%.2f bytes/token) in %.1f s -> %s", text_file,
             tokens.size, len(raw) / max(tokens.size, 1), time.perf_counter() - start, path)
  return np.load(path, mmap_mode="r")


def pack(tokens: np.ndarray, *, seq_len: int) -> np.ndarray:
  """[N, seq_len + 1] read-only view of a token stream; row i = tokens[i*T : i*T + T + 1].

  Inputs are row[:-1], targets row[1:]; the trailing partial row is dropped.
  """
  tokens = np.asarray(tokens) if not isinstance(tokens, np.ndarray) else tokens
  if tokens.ndim != 1:
    raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
  if seq_len < 1:
    raise ValueError(f"seq_len={seq_len} must be >= 1")
  n = (tokens.size - 1) // seq_len
  if n < 1:
    raise ValueError(f"{tokens.size} tokens cannot fill one sequence of seq_len={seq_len} (+1)")
  windows = np.lib.stride_tricks.sliding_window_view(tokens, seq_len + 1)
  return windows[:n * seq_len:seq_len]


class Loader:
  """Shuffled batches of packed sequences, a pure function of (seed, step).

  Sample j of the stream (j = step * B + b) is row `perm_e[j mod N]` of epoch e = j // N, with
  `perm_e = default_rng((seed, e)).permutation(N)` (identity when shuffle=False).

  Attributes:
    sequences: [N, T + 1] int32 (e.g. a `pack` view of a memory-mapped .npy).
    batch_size: B.
    seed: shuffling seed.
    shuffle: permute the rows each epoch.
  """

  def __init__(self, sequences: np.ndarray, *, batch_size: int, seed: int = 0,
               shuffle: bool = True):
    if sequences.ndim != 2 or sequences.shape[0] < 1:
      raise ValueError(f"sequences must be [N >= 1, T + 1], got shape {sequences.shape}")
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size} must be >= 1")
    self.sequences, self.batch_size, self.seed, self.shuffle = (
        sequences, batch_size, seed, shuffle)
    self._perms: dict[int, np.ndarray] = {}

  @property
  def num_sequences(self) -> int:
    return self.sequences.shape[0]

  @property
  def seq_len(self) -> int:
    return self.sequences.shape[1] - 1

  @property
  def steps_per_epoch(self) -> float:
    return self.num_sequences / self.batch_size

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      if len(self._perms) > 4:
        self._perms.pop(min(self._perms))
      n = self.num_sequences
      self._perms[epoch] = (np.random.default_rng((self.seed, epoch)).permutation(n)
                            if self.shuffle else np.arange(n))
    return self._perms[epoch]

  def indices_at(self, step: int) -> np.ndarray:
    """[B] row indices of batch `step`."""
    if step < 0:
      raise ValueError(f"step={step} must be >= 0")
    j = step * self.batch_size + np.arange(self.batch_size)
    epochs, within = np.divmod(j, self.num_sequences)
    return np.array([self._perm(int(e))[w] for e, w in zip(epochs, within)], np.int64)

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    """{"tokens": [B, T + 1] int32} of step `step`."""
    return {"tokens": np.ascontiguousarray(self.sequences[self.indices_at(step)], np.int32)}

  def __repr__(self) -> str:
    return (f"Loader({self.num_sequences} sequences of {self.seq_len}+1 tokens, "
            f"batch_size={self.batch_size}, seed={self.seed}, shuffle={self.shuffle})")


def make_loader(corpus_dir: PathLike, split: str, tokenizer, *, seq_len: int, batch_size: int,
                seed: int = 0, shuffle: bool = True) -> Loader:
  """A `Loader` over a split of a corpus directory written by `write_corpus`."""
  tokens = load_tokens(split_file(corpus_dir, split), tokenizer)
  loader = Loader(pack(tokens, seq_len=seq_len), batch_size=batch_size, seed=seed,
                  shuffle=shuffle)
  log.info("%s split of %s: %d tokens, %s", split, corpus_dir, tokens.size, loader)
  return loader
