"""The experiment binaries as a user runs them: flags they cannot honour are refused with a clear
message rather than ignored (a --drafter or --tokenizer given without --target used to run the
demo pair, and benchmark.py wrote an empty record for parts it does not know), and
benchmark.py's smoke run writes a record whose figures follow from its timings."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(script: str, *flags: str, cwd: pathlib.Path = REPO) -> subprocess.CompletedProcess:
  """experiments/SCRIPT with FLAGS in a process of its own on the CPU."""
  return subprocess.run([sys.executable, str(REPO / "experiments" / script), *flags], cwd=cwd,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                        text=True, timeout=600, check=False)


@pytest.mark.parametrize("script, flags, message", [
    ("generate.py", ["--tokenizer=tok.model"], "--tokenizer goes with --target"),
    ("generate.py", ["--target=pair/target"], "--target needs --drafter and --tokenizer"),
    ("generate.py", ["--drafter=no/such/drafter"], "'no/such/drafter' does not exist"),
    ("evaluate.py", ["--tokenizer=tok.model"], "--tokenizer goes with --target"),
    ("evaluate.py", ["--draft_lengths=1,x"], "draft lengths are positive integers"),
    ("generate.py", ["--draft_lengths=0,4"], "draft lengths are positive integers"),
    ("round_probe.py", ["--drafter=pair/drafter"], "--drafter and --tokenizer go with --target"),
    ("benchmark.py", ["--parts=copy,decoding"], "--parts: unknown ['decoding']"),
    ("benchmark.py", ["--models=gemma4_e9b"], "--models: unknown ['gemma4_e9b']"),
])
def test_bad_flags_fail_with_a_clear_message(script, flags, message):
  run = _run(script, *flags)
  assert run.returncode != 0, run.stdout[-2000:]
  assert message in run.stderr, run.stderr[-2000:]


def test_benchmark_smoke_run_writes_a_consistent_record(tmp_path):
  """benchmark.py's CPU smoke test (its docstring's command at batch 1) on the tiny preset: a
  record with the copy bandwidth, decode figures that follow from their timings, verification
  costs relative to the decode step, the drafter step's cost, the Leviathan predictions from
  those, and the plot."""
  out = tmp_path / "bench.json"
  run = _run("benchmark.py", "--models=tiny", "--batches=1", "--contexts=64", "--verify_k=1,2",
             "--verify_models=tiny", "--copy_mb=64", "--parts=copy,decode,verify,drafter,predict",
             f"--out={out}", cwd=tmp_path)
  assert run.returncode == 0, run.stderr[-3000:]
  rec = json.loads(out.read_text())
  assert out.with_suffix(".png").is_file()
  copy = rec["copy"]["gb_per_s"]
  assert copy == max(rec["copy"]["variants_gb_per_s"].values()) > 0
  tiny = rec["models"]["tiny"]
  (step,) = tiny["decode"]
  assert (step["batch"], step["context"], step["positions_per_forward"]) == (1, 64, 1)
  ms = step["ms_per_step"]
  assert ms == pytest.approx(1e3 * step["timing"]["per_step_s"]) and ms > 0
  assert step["tokens_per_second"] == pytest.approx(1e3 / ms)
  assert step["achieved_gb_per_s"] == pytest.approx(step["bytes_per_step"] / ms / 1e6)
  assert step["bandwidth_fraction"] == pytest.approx(step["achieved_gb_per_s"] / copy)
  assert [(v["draft_length"], v["positions"]) for v in tiny["verify"]] == [(1, 2), (2, 3)]
  for v in tiny["verify"]:
    assert v["relative_to_decode"] == pytest.approx(v["ms"] / ms)
  draft = tiny["drafter"]["relative_to_target_step"]
  assert draft == pytest.approx(tiny["drafter"]["ms_per_step"] / ms)
  cost = {v["draft_length"]: v["relative_to_decode"] for v in tiny["verify"]}
  rows = tiny["predicted_speedups"]
  assert {(r["acceptance"], r["draft_length"]) for r in rows} == {
      (a, k) for a in (0.6, 0.7, 0.8, 0.9) for k in (1, 2)}
  for r in rows:
    a, k = r["acceptance"], r["draft_length"]
    assert r["expected_tokens"] == pytest.approx(sum(a ** i for i in range(k + 1)))
    assert r["speedup"] == pytest.approx(r["expected_tokens"] / (k * draft + cost[k]))
