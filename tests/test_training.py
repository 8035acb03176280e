"""Tests of the training pipeline: tokenizer, corpus, packing, loss, optimizer, resumable fit."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import pathlib
import re
import sysconfig

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gemma_mtp import checkpoint
from gemma_mtp import config as config_lib
from gemma_mtp import data
from gemma_mtp import params as params_lib
from gemma_mtp import tokenizer as tokenizer_lib
from gemma_mtp import train

STDLIB = pathlib.Path(sysconfig.get_paths()["stdlib"])
# Real files with non-ASCII text, and some plain ones; a few hundred KB in all.
STDLIB_FILES = ("getopt.py", "shlex.py", "heapq.py", "fractions.py", "re/_casefix.py",
                "encodings/koi8_t.py", "sqlite3/dbapi2.py", "functools.py", "textwrap.py",
                "bisect.py", "colorsys.py", "contextlib.py", "dataclasses.py", "statistics.py")
SEQ_LEN, BATCH = 32, 8
OPTIMIZER = train.OptimizerConfig(learning_rate=1e-2, warmup_steps=5, total_steps=40,
                                  weight_decay=0.01)


def _tabs(text: str) -> str:
  """The same code indented with tabs (no stdlib file uses tabs)."""
  return re.sub(r"^((?:    )+)", lambda m: "\t" * (len(m.group(1)) // 4), text, flags=re.M)


@pytest.fixture(scope="module")
def docs() -> list[str]:
  texts = [(STDLIB / f).read_bytes().decode("utf-8") for f in STDLIB_FILES]
  assert sum(map(len, texts)) > 200_000
  return texts


@pytest.fixture(scope="module")
def tok(docs, tmp_path_factory) -> tokenizer_lib.Tokenizer:
  prefix = tmp_path_factory.mktemp("tok") / "code"
  return tokenizer_lib.train_tokenizer(documents=docs + [_tabs(d) for d in docs[:3]],
                                       vocab_size=512, model_prefix=prefix)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> pathlib.Path:
  """A written corpus of the test's stdlib files (plus their tab-indented versions)."""
  src = tmp_path_factory.mktemp("src")
  for f in STDLIB_FILES:
    for name, text in ((f, (STDLIB / f).read_bytes().decode("utf-8")),
                       (f.replace(".py", "_tabs.py"), None)):
      out = src / name
      out.parent.mkdir(parents=True, exist_ok=True)
      out.write_text(text if text is not None else _tabs((STDLIB / f).read_text()),
                     encoding="utf-8", newline="")
  corpus = data.build_corpus([src], eval_fraction=0.2)
  return data.write_corpus(corpus, tmp_path_factory.mktemp("corpus"))


def _tiny(vocab: int) -> config_lib.ModelConfig:
  return config_lib.tiny(vocab_size=vocab, layer_types=config_lib.pattern(2, 2), embed_dim=64,
                         mlp_dim=128, sliding_window=16)


# ---- tokenizer ----------------------------------------------------------------------------------

def test_tokenizer_round_trip_is_exact(tok, docs):
  assert (tok.vocab_size, tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (512, 0, 1, 2, 3)
  extra = ["", "\n", "\t\tx = 1\t# tab\n", "  lead and trail  \n\n\n", "a\r\nb\rc\n",
           "s = 'é中文🙂 Ωµ'\n", "u = '\u2581 marker \u2581\u2581'\n", "\x00\x07\x1b[0m",
           "if x:\n        y = 12345678901234\n    else:\n  z\n"]
  texts = docs + [_tabs(d) for d in docs] + extra
  for t in texts:
    ids = tok.encode(t)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == t, t[:80]
  assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
  # Indentation after a newline is one piece; digits are split.
  pieces = [tok.id_to_piece(i) for i in tok.encode("def f():\n        return 12\n")]
  assert "\n\u2581\u2581\u2581\u2581\u2581\u2581\u2581\u2581" in pieces
  assert "12" not in pieces


def test_tokenizer_load_and_errors(tok, tmp_path):
  prefix = tmp_path / "t"
  tokenizer_lib.train_tokenizer(documents=["x = 1\n"] * 50 + ["def f(a, b):\n    return a\n"],
                                vocab_size=300, model_prefix=prefix)
  loaded = tokenizer_lib.Tokenizer.load(f"{prefix}.model")
  assert loaded.vocab_size == 300 and loaded.eos_id == 1
  (tmp_path / "dir").mkdir()
  (tmp_path / "dir" / "tokenizer.model").write_bytes((tmp_path / "t.model").read_bytes())
  assert tokenizer_lib.Tokenizer.load(tmp_path / "dir").fingerprint == loaded.fingerprint
  with pytest.raises(FileNotFoundError, match="nope.model"):
    tokenizer_lib.Tokenizer.load(tmp_path / "nope.model")
  (tmp_path / "bad.model").write_text("not a model")
  with pytest.raises(ValueError, match="bad.model"):
    tokenizer_lib.Tokenizer.load(tmp_path / "bad.model")
  with pytest.raises(ValueError, match="vocab_size=100"):
    tokenizer_lib.train_tokenizer(documents=["x"], vocab_size=100, model_prefix=tmp_path / "s")
  with pytest.raises(ValueError, match="exactly one"):
    tokenizer_lib.train_tokenizer(vocab_size=512, model_prefix=tmp_path / "s")


# ---- corpus -------------------------------------------------------------------------------------

def _tree(root: pathlib.Path):
  files = {
      "pkg/a.py": "a = 1\n", "pkg/b.py": "b = 2\n", "pkg/sub/c.py": "c = 3\n",
      "pkg/tests/test_a.py": "t = 1\n", "test/x.py": "x = 1\n", "idlelib/idle_test/y.py": "y\n",
      "site-packages/dep/d.py": "d = 4\n", "notes.md": "# notes\n", "big.py": "#" * 5000,
      "data.py": "x = 1\0\n", "latin.py": None, "sep.py": "x\x1cy\n",
  }
  for i in range(60):
    files[f"many/m{i:02d}.py"] = f"value_{i} = {i}\n"
  for name, text in files.items():
    p = root / name
    p.parent.mkdir(parents=True, exist_ok=True)
    if text is None:
      p.write_bytes(b"s = '\xe9'\n")  # latin-1, not UTF-8
    else:
      p.write_text(text)


def test_corpus_split_is_deterministic_and_disjoint(tmp_path):
  _tree(tmp_path / "src")
  c1 = data.build_corpus([tmp_path / "src"], eval_fraction=0.3, max_file_bytes=4096)
  c2 = data.build_corpus([str(tmp_path / "src")], eval_fraction=0.3, max_file_bytes=4096)
  assert c1 == c2
  train = {f.relpath for f in c1.train_files}
  evals = {f.relpath for f in c1.eval_files}
  assert not train & evals and evals and train
  assert train | evals == {"pkg/a.py", "pkg/b.py", "pkg/sub/c.py"} | {
      f"many/m{i:02d}.py" for i in range(60)}
  assert all(data.is_eval(r, 0.3) for r in evals)
  s = c1.stats
  assert (s["skipped_huge"], s["skipped_binary"], s["skipped_separator"]) == (1, 2, 1)
  assert s["train_files"] + s["eval_files"] == 63
  # The split of a file depends only on its relative path, not on the other files.
  (tmp_path / "src" / "many" / "m00.py").unlink()
  c3 = data.build_corpus([tmp_path / "src"], eval_fraction=0.3, max_file_bytes=4096)
  assert {f.relpath for f in c3.eval_files} == evals - {"many/m00.py"}
  # Options: tests, packages, other extensions.
  c4 = data.build_corpus([tmp_path / "src"], eval_fraction=0.0, exclude_tests=False,
                         include_packages=True, extensions=(".py", ".md"))
  names = {f.relpath for f in c4.train_files}
  assert {"pkg/tests/test_a.py", "test/x.py", "idlelib/idle_test/y.py",
          "site-packages/dep/d.py", "notes.md"} <= names and not c4.eval_files
  with pytest.raises(ValueError, match="eval_fraction=1.5"):
    data.build_corpus([tmp_path / "src"], eval_fraction=1.5)
  with pytest.raises(FileNotFoundError, match="missing"):
    data.build_corpus([tmp_path / "missing"])


def test_stdlib_corpus_default():
  c = data.build_corpus()
  assert c.stats["train_files"] > 300 and c.stats["eval_files"] > 0
  paths = [f.relpath for f in c.train_files + c.eval_files]
  assert len(set(paths)) == len(paths)
  assert not any(p.split("/")[0] in ("test", "site-packages") or "/idle_test/" in p
                 for p in paths)
  assert {f.relpath for f in c.eval_files} == {f.relpath for f in data.build_corpus().eval_files}


def test_write_corpus_round_trips(corpus_dir):
  manifest = json.loads((corpus_dir / data.MANIFEST_FILE).read_text())
  train_docs = data.read_documents(corpus_dir / data.TRAIN_FILE)
  eval_docs = data.read_documents(corpus_dir / data.EVAL_FILE)
  assert len(train_docs) == len(manifest["train"]) and len(eval_docs) == len(manifest["eval"])
  assert len(train_docs) + len(eval_docs) == 2 * len(STDLIB_FILES)
  originals = {(STDLIB / f).read_bytes().decode("utf-8") for f in STDLIB_FILES}
  assert originals <= set(train_docs + eval_docs)
  with pytest.raises(FileNotFoundError, match="build_corpus"):
    data.split_file(corpus_dir / "nope", "train")


# ---- tokens, packing, loader --------------------------------------------------------------------

def test_packing_shapes_and_eos_separators(tok, corpus_dir, tmp_path):
  docs = data.read_documents(corpus_dir / data.TRAIN_FILE)
  tokens = data.load_tokens(corpus_dir / data.TRAIN_FILE, tok, cache_dir=tmp_path)
  assert tokens.dtype == np.int32 and tokens.ndim == 1
  assert int((tokens == tok.eos_id).sum()) == len(docs)
  ends = np.flatnonzero(tokens == tok.eos_id)
  starts = np.concatenate([[0], ends[:-1] + 1])
  for i in (0, len(docs) // 2, len(docs) - 1):
    assert tok.decode(tokens[starts[i]:ends[i]]) == docs[i]
  assert len(list(tmp_path.glob("*.npy"))) == 1
  again = data.load_tokens(corpus_dir / data.TRAIN_FILE, tok, cache_dir=tmp_path)
  np.testing.assert_array_equal(again, tokens)

  seqs = data.pack(tokens, seq_len=SEQ_LEN)
  n = (tokens.size - 1) // SEQ_LEN
  assert seqs.shape == (n, SEQ_LEN + 1)
  np.testing.assert_array_equal(seqs[:, 1:][:-1, -1], seqs[1:, 0])   # one-token overlap
  np.testing.assert_array_equal(seqs[:, :-1].reshape(-1), tokens[:n * SEQ_LEN])
  with pytest.raises(ValueError, match="seq_len=1000000"):
    data.pack(tokens, seq_len=1_000_000)

  loader = data.Loader(seqs, batch_size=BATCH, seed=3)
  b = loader.batch_at(5)["tokens"]
  assert b.shape == (BATCH, SEQ_LEN + 1) and b.dtype == np.int32
  np.testing.assert_array_equal(data.Loader(seqs, batch_size=BATCH, seed=3).batch_at(5)["tokens"],
                                b)
  assert not np.array_equal(data.Loader(seqs, batch_size=BATCH, seed=4).batch_at(5)["tokens"], b)
  # One epoch visits every sequence once, across batch boundaries.
  steps = -(-n // BATCH)
  idx = np.concatenate([loader.indices_at(s) for s in range(steps)])[:n]
  assert sorted(idx.tolist()) == list(range(n))


# ---- training -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup(tok, corpus_dir):
  """(config, loss_fn, tx, loader, make_state) shared so that the train step compiles once."""
  cfg = _tiny(tok.vocab_size)
  loader = data.make_loader(corpus_dir, "train", tok, seq_len=SEQ_LEN, batch_size=BATCH, seed=0)
  tx = train.make_optimizer(OPTIMIZER)
  loss_fn = jax.tree_util.Partial(train.lm_loss, config=cfg)

  def make_state(seed=0):
    k_init, k_train = jax.random.split(jax.random.PRNGKey(seed))
    return train.TrainState.create(params_lib.init_params(cfg, k_init), tx, rng=k_train)

  return cfg, loss_fn, tx, loader, make_state


def _losses(history):
  return [(r["step"], r["loss"]) for r in history if r["split"] == "train"]


def _deterministic() -> bool:
  """CPU runs are bitwise reproducible; GPU runs only with XLA's deterministic ops."""
  return (jax.default_backend() == "cpu"
          or "--xla_gpu_deterministic_ops=true" in os.environ.get("XLA_FLAGS", ""))


def _assert_same(a, b, *, rtol: float):
  """Bitwise where runs are reproducible; else within `rtol` (GPU run-to-run noise grows)."""
  if _deterministic():
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  else:
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol)


def test_loss_falls(setup, tmp_path):
  cfg, loss_fn, _, loader, make_state = setup
  # A functools.partial works as well as a jax.tree_util.Partial.
  eval_fn = train.make_eval_fn(functools.partial(train.lm_loss, config=cfg),
                               [loader.batch_at(1000 + i) for i in range(2)])
  state, history = train.fit(loss_fn, make_state(), loader, steps=30, eval_fn=eval_fn,
                             eval_every=30, log_every=1, metrics_file=tmp_path / "m.jsonl")
  losses = [l for _, l in _losses(history)]
  assert len(losses) == 30 and int(state.step) == 30
  assert losses[0] > 5.5                      # ~ln(512) at init
  assert np.mean(losses[-5:]) < losses[0] - 1.5, losses
  ev = [r for r in history if r["split"] == "eval"]
  assert len(ev) == 1 and ev[0]["loss"] < losses[0] - 1.0
  lines = [json.loads(l) for l in (tmp_path / "m.jsonl").read_text().splitlines()]
  assert len(lines) == 31 and {"loss", "accuracy", "grad_norm", "lr"} <= set(lines[-2])
  assert "tokens_per_s" in lines[5] and lines[5]["step_time_s"] > 0
  assert jax.tree_util.tree_leaves(state.params)[0].dtype == jnp.float32


def test_resume_is_bitwise_identical(setup, tmp_path):
  _, loss_fn, _, loader, make_state = setup
  full, h_full = train.fit(loss_fn, make_state(), loader, steps=20, log_every=1)
  ckpt = tmp_path / "ckpt"
  first, h1 = train.fit(loss_fn, make_state(), loader, steps=10, log_every=1, ckpt_dir=ckpt,
                        ckpt_every=5)
  assert train.checkpoint_steps(ckpt) == [5, 10]
  del first
  # A fresh process would build a fresh state the same way; fit finds and restores step 10.
  resumed, h2 = train.fit(loss_fn, make_state(seed=123), loader, steps=20, log_every=1,
                          ckpt_dir=ckpt, ckpt_every=5, keep_checkpoints=3)
  assert [s for s, _ in _losses(h1) + _losses(h2)] == list(range(1, 21))
  _assert_same([l for _, l in _losses(h1) + _losses(h2)], [l for _, l in _losses(h_full)],
               rtol=1e-2)
  assert train.checkpoint_steps(ckpt) == [10, 15, 20]
  if _deterministic():
    for a, b in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(resumed)):
      _assert_same(a, b, rtol=0)
  # Nothing left to do at the end.
  again, h3 = train.fit(loss_fn, make_state(), loader, steps=20, ckpt_dir=ckpt)
  assert h3 == [] and int(again.step) == 20


def test_checkpoint_restores_state(setup, tmp_path):
  cfg, loss_fn, tx, loader, make_state = setup
  state, _ = train.fit(loss_fn, make_state(), loader, steps=3)
  path = train.save_state(tmp_path, state, metadata={"note": "x"})
  assert train.read_state_metadata(path)["metadata"] == {"note": "x"}
  restored = train.restore_state(path, make_state(seed=9))
  assert restored.tx is tx and int(restored.step) == 3
  for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert train.learning_rate(restored) == pytest.approx(1e-2 * 2 / 5)  # schedule(2): the 3rd update
  other = train.TrainState.create(params_lib.init_params(cfg, jax.random.PRNGKey(0)),
                                  optax.sgd(0.1, momentum=0.9), rng=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="optimizer state does not match"):
    train.restore_state(path, other)
  wider = cfg.replace(mlp_dim=2 * cfg.mlp_dim)
  other = train.TrainState.create(params_lib.init_params(wider, jax.random.PRNGKey(0)), tx,
                                  rng=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match=r"'params.layers.0.mlp.down' is float32\[128, 64\] in the "
                     r"checkpoint, expected float32\[256, 64\]"):
    train.restore_state(path, other)
  # Shipping: bf16 params in a save_params directory.
  exported = train.export_params(restored, dtype="bfloat16")
  assert {x.dtype for x in jax.tree_util.tree_leaves(exported)} == {jnp.dtype("bfloat16")}
  checkpoint.save_params(tmp_path / "target", exported, cfg.replace(param_dtype="bfloat16"),
                         step=3)
  cfg2, p2 = checkpoint.load_params(tmp_path / "target")
  assert cfg2.param_dtype == "bfloat16" and checkpoint.checkpoint_step(tmp_path / "target") == 3
  np.testing.assert_array_equal(np.asarray(p2["embed"]), np.asarray(exported["embed"]))


def test_failed_save_keeps_previous_checkpoint(setup, tmp_path, monkeypatch):
  _, loss_fn, _, loader, make_state = setup
  state, _ = train.fit(loss_fn, make_state(), loader, steps=2, ckpt_dir=tmp_path)
  assert train.checkpoint_steps(tmp_path) == [2]
  good = train.restore_state(train.latest_checkpoint(tmp_path), make_state())
  real_write = train._write_tree

  def failing_write(directory, tree):
    real_write(directory, tree)           # a complete array write...
    raise OSError("disk full")            # ...then the save dies before it is committed

  monkeypatch.setattr(train, "_write_tree", failing_write)
  with pytest.raises(OSError, match="disk full"):
    train.fit(loss_fn, state, loader, steps=4, ckpt_dir=tmp_path, ckpt_every=1)
  # Same-step overwrite fails too: the old directory must survive the atomic swap.
  with pytest.raises(OSError, match="disk full"):
    train.save_state(tmp_path, good)
  assert train.checkpoint_steps(tmp_path) == [2]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002"]
  restored = train.restore_state(train.latest_checkpoint(tmp_path), make_state())
  for a, b in zip(jax.tree_util.tree_leaves(good), jax.tree_util.tree_leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_optimizer_masks_and_non_float_params():
  params = {"w": jnp.ones((3, 4)), "norm": jnp.ones((4,)), "scalar": jnp.ones((1,)),
            "order": jnp.arange(5, dtype=jnp.int32)}
  cfg = train.OptimizerConfig(learning_rate=0.1, warmup_steps=0, total_steps=10,
                              weight_decay=0.5, clip_norm=0.0)
  state = train.TrainState.create(params, train.make_optimizer(cfg), rng=jax.random.key(0))
  assert state.rng.dtype == jnp.uint32

  def zero_loss(p, batch, rng):
    return 0.0 * (p["w"].sum() + p["norm"].sum() + p["scalar"].sum()), {}

  new, metrics = train.train_step(state, {}, zero_loss)
  # Zero gradients: only decay moves weights, and only the matrix.
  np.testing.assert_allclose(new.params["w"], 1 - 0.1 * 0.5, rtol=1e-6)
  np.testing.assert_array_equal(new.params["norm"], 1.0)
  np.testing.assert_array_equal(new.params["scalar"], 1.0)
  np.testing.assert_array_equal(new.params["order"], np.arange(5))
  assert float(metrics["grad_norm"]) == 0.0 and int(new.step) == 1
  with pytest.raises(ValueError, match="warmup_steps=10"):
    train.OptimizerConfig(warmup_steps=10, total_steps=10)


def test_train_target_recipe(tok, corpus_dir, tmp_path):
  tok_path = tmp_path / "tok.model"
  tok_path.write_bytes(tok._sp.serialized_model_proto())
  # The model of `_tiny` and the optimizer of `setup`: the compiled step is reused.
  overrides = {"num_layers": 2, "full_every": 2, "embed_dim": 64, "mlp_dim": 128,
               "sliding_window": 16}
  assert train.target_config("tiny", vocab_size=512, compute_dtype="float32",
                             overrides=overrides) == _tiny(512)
  train.train_target(corpus_dir=corpus_dir, tokenizer_path=tok_path, workdir=tmp_path / "run",
                     model="tiny", model_overrides=overrides, compute_dtype="float32",
                     seq_len=SEQ_LEN, batch_size=BATCH, steps=3, log_every=1, eval_every=3,
                     eval_batches=1, ckpt_every=2, optimizer=OPTIMIZER)
  cfg, _ = checkpoint.load_params(tmp_path / "run" / "target")
  assert (cfg.vocab_size, cfg.num_layers, cfg.param_dtype) == (512, 2, "bfloat16")
  assert train.checkpoint_steps(tmp_path / "run" / "checkpoints") == [2, 3]
  records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [r["split"] for r in records] == ["train", "train", "train", "eval"]
  with pytest.raises(ValueError, match="unknown model fields"):
    train.target_config("tiny", vocab_size=512, overrides={"layers": 3})


@pytest.mark.parametrize("name", ["train_target_small", "train_target_tiny", "train_drafter_small",
                                  "train_drafter_tiny"])
def test_configs_convert(name):
  path = pathlib.Path(__file__).parent.parent / "configs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  opt = train.OptimizerConfig(**c.optimizer.to_dict())
  assert opt.total_steps == c.steps
  c.steps = 7   # total_steps follows steps
  assert c.optimizer.total_steps == 7
  if "target" in name:
    overrides = {k: v for k, v in c.model.items() if k != "preset" and v is not None}
    cfg = train.target_config(c.model.preset, vocab_size=4096, compute_dtype=c.compute_dtype,
                              overrides=overrides)
    assert cfg.param_dtype == "float32" and cfg.vocab_size == 4096
  else:
    assert len(c.step_weights) == c.draft_steps


def test_train_drafter_recipe(tok, corpus_dir, tmp_path):
  pytest.importorskip("gemma_mtp.distill")
  from gemma_mtp import drafter as drafter_lib  # pylint: disable=g-import-not-at-top
  cfg = _tiny(tok.vocab_size)
  checkpoint.save_params(tmp_path / "target", params_lib.init_params(cfg, jax.random.PRNGKey(0)),
                         cfg)
  tok_path = tmp_path / "tok.model"
  tok_path.write_bytes(tok._sp.serialized_model_proto())
  train.train_drafter(target_path=tmp_path / "target", corpus_dir=corpus_dir,
                      tokenizer_path=tok_path, workdir=tmp_path / "run",
                      drafter={"embed_dim": 32, "num_heads": 2, "mlp_dim": 64, "num_layers": 1},
                      draft_steps=1, compute_dtype="float32",
                      seq_len=SEQ_LEN, batch_size=BATCH, steps=2, log_every=1, eval_batches=0,
                      optimizer=OPTIMIZER, export_dtype="bfloat16")
  dcfg, dparams = checkpoint.load_drafter(tmp_path / "run" / "drafter", cfg)
  assert isinstance(dcfg, drafter_lib.DrafterConfig) and dcfg.embed_dim == 32
  records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert len(records) == 2 and "agree_step_0" in records[-1]
  with pytest.raises(ValueError, match="step_weights"):
    train.train_drafter(target_path=tmp_path / "target", corpus_dir=corpus_dir,
                        tokenizer_path=tok_path, workdir=tmp_path / "run2", drafter={},
                        draft_steps=3, step_weights=(1.0,))


@pytest.mark.parametrize("name", ["train_drafter_heads", "train_drafter_self"])
@pytest.mark.parametrize("size", ["small", "tiny"])
def test_variant_drafter_configs_build(name, size):
  from gemma_mtp import drafter_kinds  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(__file__).parent.parent / "configs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(size)
  assert train.OptimizerConfig(**c.optimizer.to_dict()).total_steps == c.steps
  target = config_lib.small() if size == "small" else _tiny(4096)
  dcfg = drafter_kinds.for_target(target, **c.drafter.to_dict())
  checkpoint.check_drafter_matches(dcfg, target)
  assert c.draft_steps <= (drafter_kinds.max_draft(dcfg) or c.draft_steps)
  assert len(c.step_weights) in (0, c.draft_steps)


@pytest.mark.parametrize("drafter", [{"kind": "parallel_heads", "num_heads": 2, "mlp_dim": 32},
                                     {"kind": "self", "num_layers": 1, "adapter_rank": 4}])
def test_train_drafter_recipe_variants(tok, corpus_dir, tmp_path, drafter):
  cfg = _tiny(tok.vocab_size)
  checkpoint.save_params(tmp_path / "target", params_lib.init_params(cfg, jax.random.PRNGKey(0)),
                         cfg)
  tok_path = tmp_path / "tok.model"
  tok_path.write_bytes(tok._sp.serialized_model_proto())
  kw = dict(target_path=tmp_path / "target", corpus_dir=corpus_dir, tokenizer_path=tok_path,
            draft_steps=2, compute_dtype="float32", seq_len=SEQ_LEN, batch_size=BATCH,
            log_every=1, eval_batches=0, optimizer=OPTIMIZER)
  train.train_drafter(workdir=tmp_path / "run", drafter=drafter, steps=2, **kw)
  dcfg, _ = checkpoint.load_drafter(tmp_path / "run" / "drafter", cfg)
  assert dcfg.kind == drafter["kind"]
  run = json.loads((tmp_path / "run" / "run.json").read_text())
  assert run["drafter_kind"] == drafter["kind"]
  records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert len(records) == 2 and "agree_step_1" in records[-1]
  if drafter["kind"] == "self":
    with pytest.raises(ValueError, match="no parameters to train"):
      train.train_drafter(workdir=tmp_path / "run2", drafter={**drafter, "adapter_rank": 0}, **kw)
  else:
    with pytest.raises(ValueError, match="exceeds the 2 drafts"):
      train.train_drafter(workdir=tmp_path / "run2", drafter=drafter, **{**kw, "draft_steps": 3})
