"""The drafter-variants experiment (variants.run) end to end on a tiny self-made pair."""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import sysconfig
import textwrap

import jax
import numpy as np
import pytest

import gemma_mtp
from gemma_mtp import checkpoint
from gemma_mtp import config as config_lib
from gemma_mtp import drafter_kinds
from gemma_mtp import params as params_lib
from gemma_mtp import tokenizer as tokenizer_lib
from gemma_mtp import variants

REPO = pathlib.Path(__file__).resolve().parents[1]
STDLIB = pathlib.Path(sysconfig.get_paths()["stdlib"])
FILES = ("getopt.py", "shlex.py", "heapq.py", "fractions.py", "functools.py", "textwrap.py",
         "bisect.py", "colorsys.py", "contextlib.py", "dataclasses.py", "statistics.py",
         "string.py", "queue.py", "sched.py", "glob.py", "fnmatch.py", "base64.py")
NAMES = ["assistant", "parallel_heads", "self", "int8_target", "int8_self", "tree"]


def _load(path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """configs/variants_cpu.py with a tiny random target, assistant and tokenizer of our own, a
  17-file corpus and one prose file; returns (config, record, target, assistant)."""
  src = tmp_path_factory.mktemp("src")
  for f in FILES:
    (src / f).write_bytes((STDLIB / f).read_bytes())
  prose = tmp_path_factory.mktemp("prose")
  (prose / "README.md").write_text("\n\n".join(
      textwrap.fill(m.__doc__ or "") for m in (textwrap, pathlib, json, pytest)) * 4)
  pair = tmp_path_factory.mktemp("pair")
  tok = tokenizer_lib.train_tokenizer(
      documents=[(src / f).read_text() for f in FILES], vocab_size=400,
      model_prefix=pair / "tok")
  tcfg = config_lib.tiny(vocab_size=tok.vocab_size, embed_dim=32,
                         layer_types=(config_lib.SLIDING,) * 2 + (config_lib.FULL,),
                         num_heads=2, num_kv_heads=1, head_dim=16, global_head_dim=32,
                         mlp_dim=64, sliding_window=16, max_seq_len=512)
  target = gemma_mtp.random_target(tcfg, seed=0)
  assistant = gemma_mtp.random_drafter(target, embed_dim=32, num_heads=2, mlp_dim=64,
                                       num_layers=2, seed=1)
  checkpoint.save_params(pair / "target", target.params, tcfg)
  checkpoint.save_drafter(pair / "assistant", assistant.params, assistant.config)

  c = _load(REPO / "configs" / "variants_cpu.py").get_config().to_dict()
  out = tmp_path_factory.mktemp("run")
  c.update(out_dir=str(out), record=str(out / "rec" / "variants.json"),
           target=str(pair / "target"), assistant=str(pair / "assistant"),
           tokenizer=str(pair / "tok.model"), corpus_roots=[str(src)], eval_fraction=0.3,
           prose_roots=[str(prose)], logit_sequences=2, logit_seq_len=32, prompts=4,
           small_batch_prompts=2, prompt_len=16, max_new_tokens=8)
  for r in (c["heads"], c["self_drafter"]):
    r.update(steps=2, seq_len=32, batch_size=2)
  c["heads"]["drafter"]["mlp_dim"] = 16
  c["self_drafter"]["drafter"].update(num_layers=1, adapter_rank=8)
  cfg = variants.config_from_dict(c)
  # ~20 programs compile here; XLA's optimizations would double the time and matter nowhere.
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    return cfg, variants.run(cfg), target, assistant
  finally:
    jax.config.update("jax_disable_most_optimizations", before)


def test_record_is_written_and_scrubbed(run):
  cfg, rec, _, _ = run
  text = pathlib.Path(cfg.record).read_text()
  assert json.loads(text)["kind"] == rec["kind"] == "variants" and rec["complete"]
  assert cfg.out_dir not in text and cfg.corpus_roots[0] not in text   # paths are scrubbed
  assert {"environment", "config", "corpus", "int8", "distilled", "evaluation", "times"} <= set(
      json.loads(text))
  assert rec["times"]["total_s"] > rec["times"]["evaluate_s"] > 0
  assert rec["corpus"]["eval_files"] > 0
  for name in ("parallel_heads", "self"):
    assert rec["distilled"][name]["steps"] == 2


def test_int8_logit_error(run):
  err = run[1]["int8"]["logit_error"]
  assert math.isfinite(err["rms_rel"]) and err["rms_rel"] > 0
  assert 0.0 <= err["top1_agreement"] <= 1.0 and err["kl"] >= 0
  assert err["positions"] == 2 * 32
  assert run[1]["int8"]["param_bytes"] < run[1]["target"]["param_bytes"]


def test_every_variant_has_acceptance_per_position_for_each_k(run):
  cfg, rec, _, _ = run
  ev = rec["evaluation"]
  assert [v["name"] for v in ev["variants"]] == NAMES
  big, small = max(cfg.batches), min(cfg.batches)
  for v in ev["variants"]:
    trees = {"tree(2,1)": 2} if v["name"] == "tree" else {}   # configs/variants_cpu.py: '2,1'
    assert v["draft_lengths"] == (list(trees) or list(cfg.buckets))
    runs = {(r["k"], r["batch"], r["workload"]): r for r in v["runs"]}
    for k in trees or cfg.buckets:
      for w in ("code", "prose", "mixed"):
        r = runs[k, big, w]
        acc = r["acceptance_by_position"]
        assert len(acc) == trees.get(k, k) and all(0.0 <= a <= 1.0 for a in acc)
        # Each row-round emits accepted + 1 tokens (fewer when a row hits max_new_tokens).
        assert 1.0 <= r["tokens_per_forward"] <= 1.0 + sum(acc) + 1e-9
        assert r["new_tokens"] == r["prompts"] * cfg.max_new_tokens
        assert r["speedup"] > 0
    assert v["fastest_k"] in (list(trees) or cfg.buckets)
    assert {(b, w) for (k, b, w) in runs if b == small} == {
        (small, w) for w in ("code", "prose", "mixed")}
    # configs/variants_cpu.py runs every K at the smaller batch too (small_batch_all_k).
    assert {k for (k, b, _) in runs if b == small} == set(trees or cfg.buckets)
    assert v["fastest_k_by_batch"][str(small)] in (list(trees) or cfg.buckets)
    assert v["fastest_k_by_batch"][str(big)] == v["fastest_k"]
    assert ("speedup_vs_float" in v["runs"][0]) == (v["target"] == variants.INT8)
  plain = {(e["target"], e["batch"], e["workload"]) for e in ev["plain"]}
  assert plain == {(t, b, w) for t in ("float", "int8") for b in cfg.batches
                   for w in ("code", "prose", "mixed")}


def test_greedy_speculative_output_equals_plain_for_every_variant(run):
  ev = run[1]["evaluation"]
  for v in ev["variants"]:
    assert all(r["outputs_equal"] and r["rows_equal"] == 1.0 for r in v["runs"]), v["name"]
  # The self-drafters are the target's own first layer: some drafts are accepted, some not.
  self_acc = [a for v in ev["variants"] if v["name"] in ("self", "int8_self")
              for r in v["runs"] for a in r["acceptance_by_position"]]
  assert 0 < max(self_acc) and min(self_acc) < 1


def test_parameter_counts_match_the_drafter_trees(run):
  cfg, rec, target, assistant = run
  out = pathlib.Path(cfg.out_dir)
  trees = {"assistant": assistant,
           "parallel_heads": gemma_mtp.load_drafter(out / "parallel_heads" / "drafter", target),
           "self": gemma_mtp.load_drafter(out / "self" / "drafter", target)}
  qt = gemma_mtp.quantize_target(target)
  size = lambda tree: sum(x.size for x in jax.tree_util.tree_leaves(tree))
  summary = {v["name"]: v["drafter"] for v in rec["evaluation"]["variants"]}
  for name, d in trees.items():
    assert summary[name]["params"] == size(d.params) > 0, name
    assert summary[name]["params"] == params_lib.count_params(
        drafter_kinds.param_specs(d.config))
  assert summary["int8_target"]["params"] == summary["assistant"]["params"]
  assert summary["tree"]["params"] == summary["assistant"]["params"]
  assert summary["tree"]["config"]["convention"] == "clean"
  # The int8 self-drafter's own parameters: its adapter and int8 copies of the target's layer.
  assert summary["int8_self"]["params"] == size(trees["self"].params) + size(
      qt.params["layers"][:1])
  assert summary["int8_self"]["int8_weights"] > 0 == summary["self"]["int8_weights"]
  assert summary["self"]["runs_target_layers"] == 1
  assert summary["self"]["target_layer_params"] == params_lib.count_params(
      params_lib.param_specs(target.config)["layers"][:1])


def test_readme_table(run):
  tables = _load(REPO / "experiments" / "tables.py")
  lines = tables.variants_tables(run[1])
  rows = [line for line in lines if line.startswith("| ") and "---" not in line]
  assert [r.split(" | ")[0][2:] for r in rows] == (
      ["variant", *NAMES, "batch-2 speedup, code + prose (tokens / forward)", *NAMES])
  assert all(r.count(" | ") == rows[0].count(" | ") for r in rows[1:7])
  assert np.all(["yes |" in r for r in rows[1:7]])


def test_distill_within_a_seconds_budget(run, tmp_path):
  """A seconds budget (what configs/variants_gpu.py uses) calibrates the step count and fits the
  optimizer's schedule to it: the learning rate has decayed to its end value at the last step."""
  cfg, _, target, _ = run
  recipe = dict(cfg.heads, steps=1000, seconds=0.5)
  out = pathlib.Path(cfg.out_dir)
  drafter, info = variants.distill(recipe, target_path=cfg.target, tokenizer_path=cfg.tokenizer,
                                   corpus_dir=out / "corpus", workdir=tmp_path / "heads",
                                   target=target)
  assert 20 <= info["steps"] < 1000            # at least the 20 calibration steps' worth
  assert drafter.config.num_heads == cfg.heads["drafter"]["num_heads"]
  lines = (tmp_path / "heads" / "metrics.jsonl").read_text().splitlines()
  last = [r for r in map(json.loads, lines) if r["split"] == "train"][-1]
  assert last["step"] == info["steps"]
  opt = cfg.heads["optimizer"]
  end = opt["learning_rate"] * opt["end_lr_fraction"]
  assert end <= last["lr"] < end + 0.05 * (opt["learning_rate"] - end), last
