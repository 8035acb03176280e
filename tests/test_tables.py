"""The README's adaptive-against-fixed summary (experiments/tables.py) on made-up and committed records."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _tables():
  path = REPO / "experiments" / "tables.py"
  spec = importlib.util.spec_from_file_location("tables", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _entry(workload, config, runs, plain=2.0):
  seconds = sorted(runs)[len(runs) // 2]
  return {"workload": workload, "config": config, "seconds": seconds, "seconds_runs": runs,
          "speedup": plain / seconds}


def _record(time, entries):
  return {"environment": {"time_utc": time, "device_kind": "NVIDIA H100 80GB HBM3",
                          "pallas_kernels": {"drafter": True}},
          "evaluation": {"hf": {"workloads": entries}}}


def test_adaptive_against_the_best_fixed_length():
  tables = _tables()
  rec = _record("t1", [
      _entry("code", "K=8", [0.1, 0.1, 0.1]),            # another workload: ignored
      _entry("mixed", "plain", [2.0, 2.0, 2.0]),         # not a fixed length
      _entry("mixed", "K=4", [0.60, 0.61, 0.62]),
      _entry("mixed", "K=8", [0.50, 0.52, 0.54]),        # the best fixed length (median 0.52)
      _entry("mixed", "adaptive", [0.53, 0.55, 0.49]),   # median 0.53: 1.9% slower
      _entry("mixed", "adaptive, warm", [0.51, 0.50, 0.505])])  # median 0.505: 3.0% faster
  r = tables.adaptive_vs_fixed(rec)
  assert r["best_fixed"] == "K=8"
  assert r["best_fixed_speedup"] == pytest.approx(2.0 / 0.52)
  a, w = r["adaptive"]["adaptive"], r["adaptive"]["adaptive, warm"]
  assert a["gain"] == pytest.approx(0.52 / 0.53 - 1)
  assert w["gain"] == pytest.approx(0.52 / 0.505 - 1)
  # 0.49 beats all three K = 8 passes, 0.53 beats 0.54 only, 0.55 none.
  assert (a["pairs_won"], a["pairs"]) == (4, 9)
  assert (w["pairs_won"], w["pairs"]) == (6, 9)    # none beats 0.50 (a tie is no win)

  cold = _record("t0", [_entry("mixed", "K=2", [1.0]), _entry("mixed", "adaptive", [0.9])])
  lines = tables.adaptive_table({"late": rec, "early": cold})
  assert lines[2].startswith("| late | H100 | kernels | K=8 3.85x | 3.77x (-1.9%, 4/9) |")
  assert lines[3].endswith("| K=2 2.00x | 2.22x (+11.1%, 1/1) | - |")
  mean = ((0.52 / 0.53 - 1) + (1.0 / 0.9 - 1)) / 2
  assert lines[-1] == (f"| **all runs** |  |  |  | {mean:+.1%} mean, 1 of 2 runs >= 0 | "
                       f"{0.52 / 0.505 - 1:+.1%} mean, 1 of 1 runs >= 0 |")

  with pytest.raises(ValueError, match="no fixed draft length"):
    tables.adaptive_vs_fixed(_record("t", [_entry("mixed", "adaptive", [1.0])]))


def test_committed_gpu_pair_records_summarize():
  """Every committed GPU-pair record with interleaved passes has a row, in time order."""
  tables = _tables()
  records = tables.gpu_pair_records()
  assert "reproduce_gpu_pair_decay_rep2_h100" in records
  times = [r["environment"]["time_utc"] for r in records.values()]
  assert times == sorted(times)
  lines = tables.adaptive_table(records)
  assert len(lines) == len(records) + 3
  assert all(line.count(" | ") == lines[0].count(" | ") for line in lines)
