"""The one-command reproduction (pipeline.run) end to end on a tiny configuration."""

from __future__ import annotations

import json
import pathlib
import sysconfig

import jax
import pytest

from gemma_mtp import api
from gemma_mtp import pipeline

STDLIB = pathlib.Path(sysconfig.get_paths()["stdlib"])
FILES = ("getopt.py", "shlex.py", "heapq.py", "fractions.py", "functools.py", "textwrap.py",
         "bisect.py", "colorsys.py", "contextlib.py", "dataclasses.py", "statistics.py",
         "string.py", "queue.py", "sched.py", "glob.py", "fnmatch.py", "base64.py")


@pytest.fixture(scope="module")
def record(tmp_path_factory):
  src = tmp_path_factory.mktemp("src")
  for f in FILES:
    (src / f).write_bytes((STDLIB / f).read_bytes())
  # A vendored copy of every file under another root: the held-out ones must stay out.
  extra = tmp_path_factory.mktemp("extra")
  for f in FILES:
    (extra / f"vendored_{f}").write_bytes((STDLIB / f).read_bytes())
  prose = tmp_path_factory.mktemp("prose")
  import textwrap  # pylint: disable=g-import-not-at-top
  (prose / "README.md").write_text("\n\n".join(
      textwrap.fill(m.__doc__ or "") for m in (textwrap, pathlib, json, pytest)) * 4)
  cfg = pipeline.PipelineConfig(
      out_dir=str(tmp_path_factory.mktemp("run")), vocab_size=400, seq_len=64, batch_size=4,
      target=dict(embed_dim=32, layer_types=("sliding", "full"), num_heads=2, num_kv_heads=1,
                  num_global_kv_heads=1, head_dim=16, global_head_dim=32, mlp_dim=64,
                  sliding_window=16, max_seq_len=512, dtype="float32", param_dtype="float32"),
      drafter=dict(embed_dim=32, num_heads=2, mlp_dim=64, num_layers=2),
      target_seconds=0, drafter_seconds=0, target_steps=4, drafter_train_steps=3,
      eval_prompts=4, prompt_len=16, max_new_tokens=8, corpus_roots=(str(src),),
      eval_fraction=0.3, extra_train_roots=(str(extra),), full_eval=False, buckets=(1, 2), conventions=("hf",),
      speed_batch=2, workload_prompts=2, prose_roots=(str(prose),), prose_max_bytes=100_000)
  # Dozens of programs compile here; without XLA's optimizations this takes 91 s instead of
  # 150 s on a 2-core CPU, and they matter nowhere (the record's speeds are checked for their
  # structure, not their values).
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    return cfg, pipeline.run(cfg)
  finally:
    jax.config.update("jax_disable_most_optimizations", before)


def test_reproduction_writes_a_complete_record(record):
  cfg, rec = record
  out = pathlib.Path(cfg.out_dir)
  text = (out / "reproduce.json").read_text()
  assert json.loads(text)["kind"] == "reproduce"
  assert cfg.corpus_roots[0] not in text and cfg.out_dir not in text   # paths are scrubbed
  assert rec["target"]["steps"] == 4 and rec["drafter"]["steps"] == 3
  # Held-out files were vendored under the extra root: their copies are not trained on.
  assert rec["corpus"]["extra_train_eval_duplicates"] == rec["corpus"]["eval_files"] > 0
  assert rec["corpus"]["extra_train_files"] == len(FILES) - rec["corpus"]["eval_files"]
  # The adaptive rule's drafter cost was measured on this device and used by every adaptive run.
  cost = rec["evaluation"]["draft_cost"]
  assert cost["used"] == cost["measured"]["ratio"] > 0
  # So were the verification costs of each bucket (at least 1, non-decreasing in K).
  verify = rec["evaluation"]["verify_costs"]
  assert sorted(verify["used"]) == [1, 2] and 1.0 <= verify["used"][1] <= verify["used"][2]
  assert verify["measured"]["decode_step_s"] > 0
  ev = rec["evaluation"]["hf"]
  assert all(s["draft_cost"] == cost["used"] for s in ev["speed"])
  assert all(s["verify_costs"] == [verify["used"][k] for k in s["draft_lengths"]]
             for s in ev["speed"])
  assert [(e["draft_lengths"], e["adaptive"], e["temperature"]) for e in ev["acceptance"]] == [
      ([2], False, 0.0), ([1, 2], True, 0.0), ([1, 2], True, 1.0)]
  speed = ev["speed"]
  assert [(s["batch"], s["temperature"], s["adaptive"]) for s in speed] == [
      (1, 0.0, False), (1, 0.0, True), (2, 0.0, False), (2, 0.0, True), (1, 1.0, True),
      (2, 1.0, True)]
  assert all(s["outputs_equal"] for s in speed if s["temperature"] == 0.0)
  # Workloads: code and prose, each configuration, and their union.
  work = ev["workloads"]
  configs = ["plain", "K=1", "K=2", "adaptive"]
  for w in ("code", "prose", "mixed"):
    assert [e["config"] for e in work if e["workload"] == w] == configs
  for e in work:
    assert e["new_tokens"] == e["prompts"] * cfg.max_new_tokens
    assert 1.0 <= e["tokens_per_forward"] <= 3.0
    assert e["speedup"] > 0
    # Rounds per bucket: one bucket for a fixed K, the adaptive rule's choices otherwise.
    rounds = sum(e["bucket_counts"].values())
    if e["config"] != "plain":
      assert rounds == round((e["new_tokens"] - e["prompts"]) / e["tokens_per_forward"]), e
    assert set(e["bucket_counts"]) == {"K=1": {"1"}, "K=2": {"2"}}.get(
        e["config"], {"1", "2"} if e["config"].startswith("adaptive") else set())
    if e["config"].startswith("adaptive") and e["workload"] != "mixed":
      assert e["costs"]["verify_costs"] == verify["used"] and not e["costs"]["calibrated"]
  plain = [e for e in work if e["config"] == "plain"]
  assert all(e["tokens_per_forward"] == 1.0 and e["speedup"] == 1.0 for e in plain)
  # The shipped pair loads as users load it.
  target = api.load_target(out / "demo" / "target")
  api.load_drafter(out / "demo" / "drafter", target)


def test_adaptive_rule_prefers_shorter_drafts_when_drafting_costs_more():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from gemma_mtp import speculative  # pylint: disable=g-import-not-at-top
  ks = (1, 2, 4, 8)
  pick = lambda a, c: ks[int(speculative.best_bucket(
      jnp.float32(a), speculative.SpecConfig(draft_lengths=ks, draft_cost=c)))]
  # The pair of reproduce_gpu_h200.json: acceptance ~0.85 per draft; with a drafter step at 5% of
  # a target step the rule picks K = 8, at the measured ~20% it picks K = 4 (the faster one).
  assert pick(0.85, 0.05) == 8 and pick(0.85, 0.2) == 4
  assert [pick(a, 0.2) for a in (0.3, 0.6, 0.95)] == [1, 2, 8]


def test_records_carry_the_compiler_flags(tmp_path, monkeypatch):
  """A record written under XLA_FLAGS says so (options change the figures), scrubbed of this
  machine's paths like the rest of it; without the variable the key is absent."""
  from gemma_mtp import metrics  # pylint: disable=g-import-not-at-top
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  assert "xla_flags" not in metrics.environment()
  flags = f"--xla_dump_to={tmp_path}/dump --xla_gpu_enable_command_buffer=+CONDITIONAL"
  monkeypatch.setenv("XLA_FLAGS", flags)
  path = metrics.write_record(tmp_path / "r.json", {"figure": 1})
  record = json.loads(path.read_text())
  assert "--xla_gpu_enable_command_buffer=+CONDITIONAL" in record["environment"]["xla_flags"]
  assert str(tmp_path) not in path.read_text()
