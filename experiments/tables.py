r"""Markdown tables of the committed GPU records (what the README's GPU section and
experiments/RESULTS.md show).

  python experiments/tables.py    # the tables of experiments/results/*_h200*.json, and adaptive
                                  # against fixed draft lengths over every GPU-pair record
"""

from __future__ import annotations

import functools
import json
import pathlib

import numpy as np

RESULTS = pathlib.Path(__file__).parent / "results"


def _load(name: str) -> dict:
  return json.loads((RESULTS / name).read_text())


def _row(*cells) -> str:
  return "| " + " | ".join(str(c) for c in cells) + " |"


def decode_table(rec: dict) -> list[str]:
  out = [f"Copy bandwidth measured in the same run: {rec['copy']['gb_per_s']:.0f} GB/s "
         f"(best of {len(rec['copy']['variants_gb_per_s'])} forms).", "",
         _row("shape", "params", "batch", "context", "ms / step", "tokens/s",
              "bytes / step (GB)", "fraction of copy bandwidth"),
         _row(*["---"] * 8)]
  notes = []
  for name, m in rec["models"].items():
    if "note" in m:
      notes.append(f"\\* {name.replace('gemma4_', '')}: {m['note']}")
    for d in m["decode"]:
      alike = _rows_alike(d)
      out.append(_row(name.replace("gemma4_", "") + ("\\*" if "note" in m else ""),
                      f"{m['params'] / 1e9:.1f}B", d["batch"],
                      d["context"], f"{d['ms_per_step']:.2f}", f"{d['tokens_per_second']:.0f}",
                      f"{d['bytes_per_step'] / 1e9:.1f}",
                      f"{d['bandwidth_fraction']:.0%}" + ("\u2020" if alike else "")))
      if alike and ROWS_ALIKE_NOTE not in notes:
        notes.append(ROWS_ALIKE_NOTE)
    for f in m.get("failed", []):
      out.append(_row(name.replace("gemma4_", ""), "", f["case"], "", "out of memory", "", "",
                      ""))
  return out + ([""] + notes if notes else [])


ROWS_ALIKE_NOTE = ("\u2020 timed with one token id in every row and position (before "
                   "`bench.forward_ids`, session 28): every row routed to the same 8 experts a "
                   "layer (the positions of a verification nearly so), where real decoding reads "
                   "~52 distinct ones at batch 8 (~112 at 32), so these steps read fewer expert "
                   "bytes than decoding does and their bandwidth fractions overstate it")


def _rows_alike(d: dict) -> bool:
  """Whether a MoE decode entry of several tokens a step was timed with one repeated token id,
  every token routed alike (entries made before `bench.forward_ids`: no `distinct_ids`)."""
  tokens = d["batch"] * d.get("positions_per_forward", 1)
  return "expert_bytes_routed" in d and tokens > 1 and not d.get("distinct_ids", False)


def cost_table(rec: dict) -> list[str]:
  out = [_row("shape", "verify K=1", "K=2", "K=4", "K=8", "drafter step (released shape)"),
         _row(*["---"] * 6)]
  for name, m in rec["models"].items():
    v = {e["draft_length"]: e["relative_to_decode"] for e in m.get("verify", [])}
    out.append(_row(name.replace("gemma4_", ""),
                    *[f"{v[k]:.3f}" if k in v else "-" for k in (1, 2, 4, 8)],
                    f"{m['drafter']['relative_to_target_step']:.1%} "
                    f"({m['drafter']['params'] / 1e6:.0f}M)" if "drafter" in m else "-"))
  return out


def _decode_at(model: dict, batch: int = 1, context: int = 1024) -> dict | None:
  return next((d for d in model.get("decode", [])
               if d["batch"] == batch and d["context"] == context), None)


def _ours_plain(rec: dict, name: str) -> float:
  """Our plain tokens/s beside `transformers`' for `name`: the end-to-end run's where there is
  one, else the decode loop's at batch 1, 1k context (prefill excluded)."""
  e2e = rec.get("e2e", {}).get(name)
  if e2e:
    return e2e["plain"]["tokens_per_second"]
  return 1e3 / _decode_at(rec["models"][name])["ms_per_step"]


def side_by_side_table(rec: dict) -> list[str]:
  out = [_row("shape", "ours plain", "transformers plain", "ratio", "ours + random assistant K=4",
              "transformers + random assistant K=4"), _row(*["---"] * 6)]
  for name, hf in rec.get("hf", {}).items():
    e2e = rec.get("e2e", {}).get(name)
    ours = _ours_plain(rec, name)
    how, ours_a = ("", f"{e2e['assistant_k4']['tokens_per_second']:.0f}") if e2e else (
        " (decode loop)", "-")
    out.append(_row(name.replace("gemma4_", ""), f"{ours:.0f}{how}",
                    f"{hf['plain']['tokens_per_second']:.1f}",
                    f"{ours / hf['plain']['tokens_per_second']:.1f}x", ours_a,
                    f"{hf['assistant_k4']['tokens_per_second']:.1f}"))
  return out


def _status(values, ok) -> str:
  """met / missed / mixed: whether `ok` holds for every value, none, or some."""
  hits = [ok(v) for v in values]
  return "met" if all(hits) else "missed" if not any(hits) else "mixed"


# The GPU pair's record that the README's table of that target names first (run AM: the drafter
# kernels, plain decoding in the fast mode); the latest H200 record follows it.
PAIR_TARGET_RECORD = "reproduce_gpu_pair_kernels_h200"


def _pair_cell(name: str, rec: dict, workload: str = "code") -> tuple[str, float]:
  """The fastest speculative configuration of a pair record's batch-1 `workload`: (cell, x)."""
  runs = [e for e in rec["evaluation"]["hf"]["workloads"] if e["workload"] == workload]
  plain = next(e for e in runs if e["config"] == "plain")
  best = max((e for e in runs if e["config"] != "plain"), key=lambda e: e["speedup"])
  ms = 1e3 / plain["tokens_per_second"]
  return (f"{best['speedup']:.2f}x {best['config']} ({name}; plain {ms:.2f} ms a token)",
          best["speedup"])


# Benchmark records of the current kernels beside the H200 record (session 28, on an H100): run
# CM's E4B, E2B and 26B-A4B with every part, 31B's batch-1 decode and 5-position verification,
# and 26B-A4B's and E4B's batch-1 figures again in a second process with 5 repeats; run CN's
# 26B-A4B decode with distinct ids (`bench.forward_ids`)
OTHER_BENCH_RECORDS = ("benchmark_kernels_all_h100", "benchmark_31b_h100",
                       "benchmark_b1_repeat_h100", "benchmark_26b_distinct_h100",
                       "benchmark_kernels_all_s31_h100", "benchmark_b1_repeat_s31_h100",
                       "benchmark_26b_all_s31_h100", "benchmark_e4b_b1_s31_h100",
                       "benchmark_31b_s31_h100")


def other_bench_records(names=OTHER_BENCH_RECORDS) -> dict[str, dict]:
  """The committed benchmark records `names`, in time order: their same-run ratios (bandwidth
  fraction, verification and drafter costs) join the targets table."""
  recs = {n: _load(f"{n}.json") for n in names if (RESULTS / f"{n}.json").is_file()}
  return dict(sorted(recs.items(), key=lambda kv: kv[1]["environment"]["time_utc"]))


def _others(others: dict[str, dict], model: str, pick) -> list[tuple[str, float, str]]:
  """(record name, value, cell text) of `pick(model record)` -> (value, text) or None, for the
  records of `others` holding `model`."""
  out = []
  for name, rec in others.items():
    got = pick(rec["models"][model]) if model in rec.get("models", {}) else None
    if got is not None:
      out.append((name, *got))
  return out


def _verify5(model: dict):
  r = next((e["relative_to_decode"] for e in model.get("verify", []) if e["positions"] == 5),
           None)
  return None if r is None else (r, f"**{r:.3f}x**")


def _fraction_b1(model: dict, digits: int = 0):
  d = _decode_at(model)
  return None if d is None else (
      d["bandwidth_fraction"],
      f"{d['ms_per_step']:.2f} ms = **{d['bandwidth_fraction']:.{digits}%}**")


def _drafter(model: dict):
  c = model.get("drafter", {}).get("relative_to_target_step")
  return None if c is None else (c, f"**{c:.1%}**")


def targets_table(bench: dict, pairs: dict[str, dict],
                  others: dict[str, dict] | None = None) -> list[str]:
  """Issue 6's targets against the committed records: the benchmark record `bench` and the GPU
  pair's records `pairs` (name -> record, in time order; `gpu_pair_records()`). Each row: the
  target, what the records measured, and met / missed / mixed (some of the row's values).
  `others`: more benchmark records (`other_bench_records()`), named in the rows of ratios they
  measured (the tokens/s targets are the H200's)."""
  m = bench["models"]
  others = others or {}
  out = [_row("target", "measured", "status"), _row("---", "---", "---")]

  def row(target, cells, values, ok):
    out.append(_row(target, "; ".join(cells), _status(values, ok)))

  def more(model, pick, label=""):
    got = _others(others, model, pick)
    return ([f"{label}{text} ({name})" for name, _, text in got], [v for _, v, _ in got])

  d = _decode_at(m["gemma4_31b"])
  cells, values = more("gemma4_31b", _fraction_b1)
  row("31B plain decode, batch 1, 1k: >= 92% of copy bandwidth",
      [f"{d['ms_per_step']:.2f} ms = **{d['bandwidth_fraction']:.0%}**, "
       f"{d['tokens_per_second']:.1f} tokens/s"] + cells, [d["bandwidth_fraction"]] + values,
      lambda v: v >= 0.92)
  for name, goal in (("gemma4_e2b", 375), ("gemma4_e4b", 280)):
    d = _decode_at(m[name])
    row(f"{name.removeprefix('gemma4_').upper()} plain decode, batch 1: >= {goal} tokens/s",
        [f"{d['ms_per_step']:.2f} ms = **{d['tokens_per_second']:.0f} tokens/s**"],
        [d["tokens_per_second"]], lambda v, goal=goal: v >= goal)
  d = _decode_at(m["gemma4_26b_a4b"])
  d8 = _decode_at(m["gemma4_26b_a4b"], batch=8)
  batch8 = ("" if _rows_alike(d8) else f" ({d8['bandwidth_fraction']:.0%} at batch 8)")
  # two decimals: records within a rounding of the goal (0.6997) read as what they are
  cells, values = more("gemma4_26b_a4b", functools.partial(_fraction_b1, digits=2))
  row("26B-A4B plain decode, batch 1: >= 70% of copy, routed experts only",
      [f"{d['ms_per_step']:.2f} ms = **{d['bandwidth_fraction']:.2%}**{batch8}"] + cells,
      [d["bandwidth_fraction"]] + values, lambda v: v >= 0.70)
  ratios = {n: next(e["relative_to_decode"] for e in m[n]["verify"] if e["positions"] == 5)
            for n in ("gemma4_31b", "gemma4_e4b")}
  cells, values = [], []
  for n in ratios:
    c, v = more(n, _verify5, f"{n.removeprefix('gemma4_').upper()} ")
    cells, values = cells + c, values + v
  row("verifying 5 positions <= 1.1x a decode step (31B, E4B)",
      [f"{n.removeprefix('gemma4_').upper()} **{r:.3f}x**" for n, r in ratios.items()] + cells,
      list(ratios.values()) + values, lambda v: v <= 1.1)
  goals = {"gemma4_31b": 0.03, "gemma4_e2b": 0.10, "gemma4_e4b": 0.10}
  costs = {n: m[n]["drafter"]["relative_to_target_step"] for n in goals}
  cells, values = [], []
  for n, goal in goals.items():
    c, v = more(n, _drafter, f"{n.removeprefix('gemma4_').upper()} ")
    cells, values = cells + c, values + [x / goal for x in v]
  row("a drafter step <= 3% of a target step (31B), <= 10% (E2B, E4B)",
      [f"{n.removeprefix('gemma4_').upper()} **{c:.1%}**" for n, c in costs.items()] + cells,
      [c / goals[n] for n, c in costs.items()] + values, lambda v: v <= 1.0)
  ratios = {name: _ours_plain(bench, name) / hf["plain"]["tokens_per_second"]
            for name, hf in bench.get("hf", {}).items()}
  row(">= 10x `transformers`' `generate`, plain, same weights and GPU",
      [f"{n.removeprefix('gemma4_').upper()} **{r:.1f}x**" for n, r in ratios.items()],
      list(ratios.values()), lambda v: v >= 10)
  h200 = {n: r for n, r in pairs.items() if "H200" in r["environment"]["device_kind"]}
  named = [n for n in (PAIR_TARGET_RECORD, next(reversed(h200), None)) if n in h200]
  cells = [_pair_cell(n, h200[n]) for n in dict.fromkeys(named)]
  row("GPU-trained pair >= 2.5x our plain decoding, batch 1 greedy, held-out code (H200)",
      [c for c, _ in cells], [x for _, x in cells], lambda v: v >= 2.5)
  gains = {c: [] for c in ADAPTIVE_CONFIGS}
  for rec in pairs.values():
    if rec["environment"].get("pallas_kernels", {}).get("drafter", False):
      for c, a in adaptive_vs_fixed(rec)["adaptive"].items():
        gains[c].append(a["gain"])
  row("adaptive buckets at least as fast as the best fixed length, mixed workload (records "
      "with the drafter kernels)",
      [f"{c} {np.mean(g):+.1%} mean, {sum(x >= 0 for x in g)} of {len(g)} runs >= 0"
       for c, g in gains.items() if g],
      [x for g in gains.values() for x in g], lambda v: v >= 0)
  return out


def pair_tables(rec: dict) -> list[str]:
  ev = rec["evaluation"]["hf"]
  out = [f"Target {rec['target']['params'] / 1e6:.0f}M parameters (eval loss "
         f"{rec['target']['final'][0]['loss']:.2f}, {rec['target']['steps']} steps), drafter "
         f"{rec['drafter']['params'] / 1e6:.1f}M; {rec['train_tokens'] / 1e6:.0f}M training "
         f"tokens; {rec['times']['total_s']:.0f} s end to end.", "",
         _row("greedy, 32 held-out prompts", "tokens / target forward", "acceptance by position"),
         _row("---", "---", "---")]
  for e in ev["acceptance"]:
    label = ("adaptive" if e["adaptive"] else f"K={e['draft_lengths'][0]}") + (
        f", T={e['temperature']:g}" if e["temperature"] else "")
    acc = " ".join(f"{a:.2f}" for a in e["acceptance_by_position"] if a is not None)
    out.append(_row(label, f"{e['tokens_per_forward']:.2f}", acc))
  out += ["", _row("speed (same process)", "batch", "plain tokens/s", "speculative tokens/s",
                   "speedup", "greedy outputs equal"), _row(*["---"] * 6)]
  for s in ev["speed"]:
    label = ("adaptive" if s["adaptive"] else f"K={s['draft_lengths'][0]}") + \
        f", T={s['temperature']:g}"
    out.append(_row(label, s["batch"], f"{s['plain_tokens_per_second']:.0f}",
                    f"{s['speculative_tokens_per_second']:.0f}", f"{s['speedup']:.2f}x",
                    s.get("outputs_equal", "-")))
  out += ["", _row("batch-1 workload", *[e["config"] for e in ev["workloads"]
                                          if e["workload"] == "mixed"]),
          _row(*["---"] * 7)]
  for w in ("code", "prose", "mixed"):
    out.append(_row(w, *[f"{e['speedup']:.2f}x ({e['tokens_per_forward']:.1f})"
                         for e in ev["workloads"] if e["workload"] == w]))
  return out


def int8_table(rec: dict) -> list[str]:
  out = [_row("shape, batch 1", "bf16 ms / step", "int8 ms / step", "int8 tokens/s", "speedup",
              "int8 bytes / step (GB)", "fraction of copy bandwidth"), _row(*["---"] * 7)]
  for name, m in rec["models"].items():
    q = m.get("int8")
    if q:
      out.append(_row(name.replace("gemma4_", "") + (" \\*" if q.get("note") else ""),
                      f"{q['ms_per_step'] * q['speedup_over_bf16']:.2f}",
                      f"{q['ms_per_step']:.2f}", f"{q['tokens_per_second']:.0f}",
                      f"{q['speedup_over_bf16']:.2f}x", f"{q['bytes_per_step'] / 1e9:.1f}",
                      f"{q['bandwidth_fraction']:.0%}"))
  notes = [f"\\* {q['note']}" for m in rec["models"].values() if (q := m.get("int8"))
           and q.get("note")]
  return out + ([""] + notes if notes else [])


def kernel_table(rec: dict) -> list[str]:
  """Decode with the Pallas kernels off and on (kernel_probe record, its 'decode' part)."""
  out = [_row("shape", "case", "XLA ms / step", "kernels ms / step", "speedup",
              "kernels + gathered experts to batch 16 ms / step"), _row(*["---"] * 6)]
  alike = False
  for name, entries in rec["decode"].items():
    by = {}
    for e in entries:
      if "ms_per_step" in e:
        case = f"batch {e['batch']}" + (f", {e['positions_per_forward']} positions"
                                        if e["positions_per_forward"] > 1 else "")
        case += "\u2020" if _rows_alike(e) else ""
        alike = alike or _rows_alike(e)
        by.setdefault(case, {})[e["variant"]] = e["ms_per_step"]
    for case, v in by.items():
      gather = f"{v['on_gather']:.2f}" if "on_gather" in v else "-"
      out.append(_row(name.replace("gemma4_", ""), case, f"{v['off']:.2f}", f"{v['on']:.2f}",
                      f"{v['off'] / v['on']:.2f}x", gather))
  return out + (["", ROWS_ALIKE_NOTE] if alike else [])


def tp_table(rec: dict) -> list[str]:
  out = [_row("31B-shaped decode, batch 1", "ms / token", "tokens/s",
              "GB/s per GPU (weights + cache)"), _row(*["---"] * 4)]
  for name in ("single", "parallel"):
    r = rec[name]
    out.append(_row(f"{r['devices']} GPU" + ("s (tensor parallel)" if r["devices"] > 1 else ""),
                    f"{r['per_token_ms']:.2f}", f"{r['tokens_per_second']:.1f}",
                    f"{r['read_gb_per_s_per_device']:.0f}"))
  return out


def domain_table(rec: dict) -> list[str]:
  out = [_row("drafter trained on", "evaluated on", "tokens / forward, K=4", "adaptive"),
         _row(*["---"] * 4)]
  for key, runs in rec["results"].items():
    trained, evaluated = (p.split("=", 1)[1] for p in key.split(" "))
    out.append(_row(trained, evaluated, *[f"{e['tokens_per_forward']:.2f}" for e in runs]))
  return out


def _params(d: dict) -> str:
  n = f"{d['params'] / 1e6:.2f}M"
  if d["kind"] == "self" and d["int8_weights"]:
    return f"{n} (int8 copies of {d['runs_target_layers']} target layers + adapter)"
  if d["kind"] == "self":
    return f"{n} + {d['runs_target_layers']} target layers ({d['target_layer_params'] / 1e6:.2f}M)"
  if d["kind"] == "parallel_heads":
    return f"{n} + the target's head"
  return n


def variants_tables(rec: dict) -> list[str]:
  """The drafter-variants comparison (gemma_mtp/variants.py) of one record."""
  ev, cfg = rec["evaluation"], rec["config"]
  big, small = max(cfg["batches"]), sorted(b for b in cfg["batches"] if b != max(cfg["batches"]))
  err = rec["int8"]["logit_error"]
  dtype = rec["target"]["config"]["dtype"]
  plain = {(e["target"], e["batch"], e["workload"]): e for e in ev["plain"]}
  int8_plain = ", ".join(f"batch {b} {plain['int8', b, 'mixed']['speedup_vs_float']:.2f}x"
                         for b in sorted(cfg["batches"]))
  dist = ", ".join(f"{k} {d['steps']} steps" for k, d in rec["distilled"].items())
  out = [f"Target {rec['target']['params'] / 1e6:.1f}M parameters ({dtype}); held-out code and "
         f"prose, {cfg['prompts']} + {cfg['prompts']} prompts of {cfg['prompt_len']} tokens at "
         f"batch {big}, {cfg['small_batch_prompts']} + {cfg['small_batch_prompts']} at batch "
         f"{', '.join(map(str, small))}, {cfg['max_new_tokens']} new tokens, greedy. Distilled: "
         f"{dist}; {rec['times']['total_s']:.0f} s end to end.",
         f"int8 target: {rec['int8']['param_bytes'] / 1e6:.1f} MB of weights against "
         f"{rec['target']['param_bytes'] / 1e6:.1f} MB; logit error on held-out code "
         f"({err['positions']} positions, {err['compute_dtype']}): rms {err['rms_rel']:.3f} of "
         f"the logits, top-1 agreement {err['top1_agreement']:.3f}; plain int8 decoding against "
         f"plain {dtype}: {int8_plain}.", ""]
  ks = list(cfg["buckets"])
  speed_cols = [f"speedup batch {b}" for b in sorted(cfg["batches"])]
  out += [_row("variant", "target", "drafter parameters",
               "tokens / target forward, code, K = " + " / ".join(map(str, ks)), "prose",
               "acceptance by position, code, largest K", *speed_cols, "greedy = plain"),
          _row(*["---"] * (7 + len(speed_cols)))]
  for v in ev["variants"]:
    runs = {(r["k"], r["batch"], r["workload"]): r for r in v["runs"]}
    trees = [k for k in v["draft_lengths"] if isinstance(k, str)]   # tree labels, not Ks
    cols = trees or ks
    tpf = lambda w, runs=runs, cols=cols, trees=trees: " / ".join(
        (f"{k} " if trees else "") +
        (f"{runs[k, big, w]['tokens_per_forward']:.2f}" if (k, big, w) in runs else "-")
        for k in cols)
    acc = " ".join(f"{a:.2f}" for a in runs[v["draft_lengths"][-1], big, "code"]
                   ["acceptance_by_position"])
    speeds = []
    for b in sorted(cfg["batches"]):
      k = v.get("fastest_k_by_batch", {}).get(str(b), v["fastest_k"])
      r = runs[k, b, "mixed"]
      vs = f", {r['speedup_vs_float']:.2f}x vs {dtype}" if "speedup_vs_float" in r else ""
      speeds.append(f"{r['speedup']:.2f}x (K={k}{vs})")
    rows = [r["rows_equal"] for r in v["runs"] if r["workload"] == "mixed"]
    equal = "yes" if min(rows) == 1.0 else f"{min(rows):.0%} to {max(rows):.0%} of rows"
    out.append(_row(v["name"], v["target"], _params(v["drafter"]), tpf("code"), tpf("prose"),
                    acc, *speeds, equal))
  out += ["", _row(f"batch-{big} speedup, code + prose (tokens / forward)",
                   *[f"K={k}" for k in ks]), _row(*["---"] * (1 + len(ks)))]
  for v in ev["variants"]:
    runs = {r["k"]: r for r in v["runs"] if r["batch"] == big and r["workload"] == "mixed"}
    if any(isinstance(k, str) for k in runs):   # trees: one cell per tree, labelled
      cells = [f"{k}: {r['speedup']:.2f}x ({r['tokens_per_forward']:.1f})" for k, r in runs.items()]
      out.append(_row(v["name"], *(cells + ["-"] * len(ks))[:len(ks)]))
      continue
    out.append(_row(v["name"], *[
        f"{runs[k]['speedup']:.2f}x ({runs[k]['tokens_per_forward']:.1f})" if k in runs else "-"
        for k in ks]))
  return out


ADAPTIVE_CONFIGS = ("adaptive", "adaptive, warm")


def adaptive_vs_fixed(rec: dict, workload: str = "mixed") -> dict:
  """One record's batch-1 `workload`: the best fixed draft length against each adaptive config.

  Each configuration's `seconds` is the median of its interleaved passes. `gain` is the best
  fixed length's seconds over the adaptive one's, minus 1 (> 0: adaptive faster); `pairs_won`
  counts the (adaptive pass, fixed pass) pairs where the adaptive pass was faster, of `pairs`.
  """
  runs = [e for e in rec["evaluation"]["hf"]["workloads"] if e["workload"] == workload]
  fixed = [e for e in runs if e["config"].startswith("K=")]
  if not fixed:
    raise ValueError(f"no fixed draft length in the {workload!r} workload")
  best = min(fixed, key=lambda e: e["seconds"])
  out = {"best_fixed": best["config"], "best_fixed_speedup": best["speedup"], "adaptive": {}}
  best_runs = best.get("seconds_runs", [best["seconds"]])
  for e in runs:
    if e["config"] not in ADAPTIVE_CONFIGS:
      continue
    mine = e.get("seconds_runs", [e["seconds"]])
    out["adaptive"][e["config"]] = {
        "speedup": e["speedup"], "gain": best["seconds"] / e["seconds"] - 1,
        "pairs_won": sum(a < b for a in mine for b in best_runs),
        "pairs": len(mine) * len(best_runs)}
  return out


def adaptive_table(records: dict[str, dict], workload: str = "mixed") -> list[str]:
  """`adaptive_vs_fixed` for each record (name -> record, in time order) and the mean gains."""
  out = [_row("record", "card", "drafter step", "best fixed", *ADAPTIVE_CONFIGS),
         _row(*["---"] * (4 + len(ADAPTIVE_CONFIGS)))]
  gains = {c: [] for c in ADAPTIVE_CONFIGS}
  for name, rec in records.items():
    r = adaptive_vs_fixed(rec, workload)
    env = rec["environment"]
    kernels = env.get("pallas_kernels", {}).get("drafter", False)
    cells = []
    for c in ADAPTIVE_CONFIGS:
      a = r["adaptive"].get(c)
      if a is None:
        cells.append("-")
        continue
      gains[c].append(a["gain"])
      cells.append(f"{a['speedup']:.2f}x ({a['gain']:+.1%}, {a['pairs_won']}/{a['pairs']})")
    out.append(_row(name, env["device_kind"].replace("NVIDIA ", "").split(" ")[0],
                    "kernels" if kernels else "XLA",
                    f"{r['best_fixed']} {r['best_fixed_speedup']:.2f}x", *cells))
  summary = [f"{np.mean(g):+.1%} mean, {sum(x >= 0 for x in g)} of {len(g)} runs >= 0"
             if g else "-" for g in gains.values()]
  return out + [_row("**all runs**", "", "", "", *summary)]


def gpu_pair_records() -> dict[str, dict]:
  """The committed GPU-pair records with interleaved workload passes, in time order: those of
  `reproduce_gpu.py` and those of `evaluate.py` timing a trained pair in a process of its own
  (`evaluate_gpu_pair_*`: its workloads read as a reproduction's 'hf' evaluation)."""
  recs = {}
  for path in sorted(RESULTS.glob("*gpu*.json")):
    rec = json.loads(path.read_text())
    if "workloads" in rec:
      rec = {**rec, "evaluation": {"hf": {"workloads": rec["workloads"]}}}
    ev = rec.get("evaluation", {})
    w = ev.get("hf", {}).get("workloads", []) if isinstance(ev, dict) else []
    if w and "seconds_runs" in w[0]:
      recs[path.stem] = rec
  return dict(sorted(recs.items(), key=lambda kv: kv[1]["environment"]["time_utc"]))


# step_probe variants: the attention kernels off, and on (`fused` = the automatic switch: on at one
# position a row up to decode_attention.AUTO_MAX_BATCH rows, and at every batch in records made
# before that limit, whose environment does not name the switch: run BC's batch 8)
ATTENTION_OFF, ATTENTION_ON = "fused_attn_off", "fused_attn_on"


def _attention_side(variant: str, batch: int, env: dict, positions: int = 1,
                    **_) -> str | None:
  """'off' / 'on' / None: which side of the attention kernels' comparison a step-probe entry is
  (`positions` > 1: a verification, which kept XLA's attention either way in these records of
  sessions 19-20, compared as is; session 21's verification records are step_probe_verify_*)."""
  del positions
  if variant == ATTENTION_OFF:
    return "off"
  if variant == ATTENTION_ON:
    return "on"
  if variant == "fused":
    from gemma_mtp import decode_attention  # pylint: disable=g-import-not-at-top
    before_limit = "decode_attention" not in env.get("pallas_kernels", {})
    return "on" if before_limit or batch <= decode_attention.AUTO_MAX_BATCH else "off"
  return None


def attention_kernel_rows(records: dict[str, dict]) -> dict[tuple, dict]:
  """{(model, batch, context, positions): {off, on, change}} (ms a step) from step-probe records
  holding both `fused_attn_off` and an attention-kernel variant of the same case; a later record
  replaces an earlier one's case (records in the order given)."""
  return _switch_rows(records, _attention_side)


def _tokens_side(kind: str, limit):
  """A side function (see `_switch_rows`): `fused_{kind}_off` is 'off'; `fused_{kind}_on`, or
  `fused` where the automatic switch took the kernels, 'on'. That is the entry's recorded
  `{kind}_kernels` (the step probe's, session 21 on; `fused` is 'off' where it records False),
  else at most `limit()` tokens (rows x positions: the automatic switch's rule when records
  had no such key; since session 29 the PLE switch also takes one row of 5 positions)."""
  def side(variant: str, batch: int, env: dict, positions: int = 1, *,
           entry: dict | None = None) -> str | None:
    del env
    recorded = (entry or {}).get(f"{kind}_kernels")
    if variant == f"fused_{kind}_off" or (variant == "fused" and recorded is False):
      return "off"
    took = batch * positions <= limit() if recorded is None else recorded
    if variant == f"fused_{kind}_on" or (variant == "fused" and took):
      return "on"
    return None
  return side


def _ple_limit() -> int:
  from gemma_mtp import ple_kernels  # pylint: disable=g-import-not-at-top
  return ple_kernels.AUTO_MAX_BATCH


def _moe_limit() -> int:
  from gemma_mtp import moe_kernels  # pylint: disable=g-import-not-at-top
  return moe_kernels.AUTO_MAX_ROWS


_ple_side = _tokens_side("ple", _ple_limit)
_moe_side = _tokens_side("moe", _moe_limit)


def _finish_side(variant: str, batch: int, env: dict, positions: int = 1, *,
                 entry: dict) -> str | None:
  """`fused_moe_finish_off` is 'off'; an entry that ran the MoE finish kernel (its recorded
  `moe_finish`, session 23) 'on'."""
  del batch, env, positions
  if variant == "fused_moe_finish_off":
    return "off"
  return "on" if entry.get("moe_finish") else None


def _both_side(variant: str, batch: int, env: dict, positions: int = 1,
               **_) -> str | None:
  del env
  if positions > 1:   # (the attention kernels took one position a row until session 21)
    return None
  from gemma_mtp import decode_attention, ple_kernels  # pylint: disable=g-import-not-at-top
  if variant == "fused_xla":
    return "off"
  limit = min(decode_attention.AUTO_MAX_BATCH, ple_kernels.AUTO_MAX_BATCH)
  if variant == "fused_all_on" or (variant == "fused" and batch <= limit):
    return "on"
  return None


def ple_kernel_rows(records: dict[str, dict], *, against_xla: bool = False) -> dict[tuple, dict]:
  """As `attention_kernel_rows` for the PLE kernels (session 20): `fused_ple_off` (the attention
  kernels only) against the PLE kernels on; with `against_xla`, `fused_xla` (neither kind)
  against both."""
  return _switch_rows(records, _both_side if against_xla else _ple_side)


def _switch_rows(records: dict[str, dict], side_of) -> dict[tuple, dict]:
  """{case: {off, on, change}} from the records' entries that `side_of(variant, batch, env,
  positions, entry=the entry)` calls 'off' or 'on' (the first of each side a case in a record; later records
  replace a case); `alike`: True where a MoE case was timed with one token in every row and
  position (`_rows_alike`)."""
  rows = {}
  for rec in records.values():
    for model, entries in rec.items():
      if not isinstance(entries, list):
        continue
      ms, alike = {}, set()
      for e in entries:
        if "ms_per_step" in e:
          case = (model, e["batch"], e["context"], e["positions_per_forward"])
          side = side_of(e["variant"], e["batch"], rec.get("environment", {}), case[3],
                         entry=e)
          if side and side not in ms.get(case, {}):
            ms.setdefault(case, {})[side] = e["ms_per_step"]
          if _rows_alike(e):
            alike.add(case)
      for case, m in ms.items():
        if "off" in m and "on" in m:
          rows[case] = {**m, "change": m["on"] / m["off"] - 1,
                        **({"alike": True} if case in alike else {})}
  return rows


def _alike_name(model: str, m: dict) -> str:
  """A `_switch_rows` row's model name, with a dagger where its case was timed rows alike."""
  return model + ("\u2020" if m.get("alike") else "")


def _alike_note(rows: dict[tuple, dict]) -> list[str]:
  """The lines closing a table of `_switch_rows` rows: ROWS_ALIKE_NOTE where a row has a dagger."""
  return ["", ROWS_ALIKE_NOTE] if any(m.get("alike") for m in rows.values()) else []


def _off_on_table(rows: dict[tuple, dict], off_name: str) -> list[str]:
  """One row a case (model, batch, context, positions) of {off, on, change}."""
  out = [_row("model", "batch", "context", "positions", off_name, "the kernels", "change"),
         _row(*["---"] * 7)]
  for (model, b, ctx, t), m in sorted(rows.items()):
    out.append(_row(_alike_name(model, m), b, ctx, t,
                    f"{m['off']:.3f} ms", f"{m['on']:.3f} ms", f"{m['change']:+.1%}"))
  return out + _alike_note(rows)


def attention_kernel_table(records: dict[str, dict]) -> list[str]:
  """`attention_kernel_rows` as a table, one row a (model, batch, context, positions; 5
  positions: a verification forward, which keeps XLA's attention either way)."""
  return _off_on_table(attention_kernel_rows(records), "XLA's attention")


def ple_kernel_table(records: dict[str, dict]) -> list[str]:
  """Each case of `ple_kernel_rows` (positions > 1: a verification forward, whose attention
  kernels run as their switch takes them: up to 5 positions since session 21): the step with
  the attention kernels only, with the PLE kernels too, and (where the record has it) with
  neither."""
  both = ple_kernel_rows(records, against_xla=True)
  out = [_row("model", "batch", "context", "positions", "attention kernels only",
              "and the PLE kernels", "change", "neither (XLA)", "both against neither"),
         _row(*["---"] * 9)]
  for (model, b, ctx, t), m in sorted(ple_kernel_rows(records).items()):
    x = both.get((model, b, ctx, t))
    x = x if x and x["on"] == m["on"] else None   # (the same record's entries only)
    out.append(_row(model, b, ctx, t, f"{m['off']:.3f} ms", f"{m['on']:.3f} ms",
                    f"{m['change']:+.1%}", f"{x['off']:.3f} ms" if x else "-",
                    f"{x['change']:+.1%}" if x else "-"))
  return out


# Run BQ's record ran while the automatic switch took verification forwards at any head count
# (session 21, before AUTO_MAX_VERIFY_HEADS): its `fused` entries ran the attention kernels.
# Records since carry each entry's `attention_kernels`.
_FUSED_RAN_ATTENTION_KERNELS = ("step_probe_verify_31b_h100",)


def _verify_side(variant: str, batch: int, env: dict, positions: int = 1,
                 **_) -> str | None:
  del batch, env, positions
  return {ATTENTION_OFF: "off", ATTENTION_ON: "on"}.get(variant)


def _switch_variant(entry: dict, record: str) -> dict:
  """A `fused` entry as the attention-kernel variant whose program it ran, where known: from its
  `attention_kernels` (recorded since session 22), or from `_FUSED_RAN_ATTENTION_KERNELS`."""
  if entry.get("variant") != "fused":
    return entry
  ran = entry.get("attention_kernels", True if record in _FUSED_RAN_ATTENTION_KERNELS else None)
  if ran is None:
    return entry
  return dict(entry, variant=ATTENTION_ON if ran else ATTENTION_OFF)


def verification_kernel_rows(records: dict[str, dict]) -> dict[tuple, dict]:
  """{(model, batch, context, positions): {off, on, change}} (ms a forward) from the
  verification records (step_probe_verify_*, session 21): XLA's attention (`fused_attn_off`)
  against the attention kernels (`fused_attn_on`, or a `fused` entry that ran them: the library's
  switch is otherwise the same program as one of the two), one-position steps included."""
  named = {}
  for name, rec in records.items():
    rec = dict(rec)
    for model, entries in rec.items():
      if isinstance(entries, list):
        rec[model] = [_switch_variant(e, name) for e in entries]
    named[name] = rec
  return _switch_rows(named, _verify_side)


def verification_kernel_table(records: dict[str, dict]) -> list[str]:
  """`verification_kernel_rows` as a table: per (model, positions) XLA's attention, the kernels,
  the change, and the forward against a decode step each as the automatic switch runs them
  (`decode_attention.auto_takes`: e.g. 31B verifies through XLA's attention and decodes through
  the kernels)."""
  # pylint: disable-next=g-import-not-at-top
  from gemma_mtp import config as config_lib, decode_attention
  rows = verification_kernel_rows(records)
  out = [_row("model", "batch", "context", "positions", "XLA's attention", "the kernels",
              "change", "against a decode step, as switched"), _row(*["---"] * 8)]
  for (model, b, ctx, t), m in sorted(rows.items()):
    one = rows.get((model, b, ctx, 1))
    if t == 1:
      continue
    ratio = "-"
    if one:
      side = lambda n: "on" if decode_attention.auto_takes(
          config_lib.PRESETS[model](), b, n) else "off"
      ratio = f"{m[side(t)] / one[side(1)]:.3f} ({side(t)} / {side(1)})"
    out.append(_row(_alike_name(model, m), b, ctx, t,
                    f"{m['off']:.3f} ms", f"{m['on']:.3f} ms", f"{m['change']:+.1%}", ratio))
  return out + _alike_note(rows)


def moe_kernel_rows(records: dict[str, dict]) -> dict[tuple, dict]:
  """As `attention_kernel_rows` for the MoE router's kernels (session 22, step_probe_moe*):
  `fused_moe_off` against `fused_moe_on`, or `fused` up to the automatic switch's tokens."""
  return _switch_rows(records, _moe_side)


def moe_kernel_table(records: dict[str, dict]) -> list[str]:
  """`moe_kernel_rows` as a table (positions > 1: a verification forward)."""
  return _off_on_table(moe_kernel_rows(records), "XLA's router")


def moe_finish_rows(records: dict[str, dict]) -> dict[tuple, dict]:
  """As `moe_kernel_rows` for the MoE layer's end as a kernel (session 23, step_probe_finish*):
  `fused_moe_finish_off` (the router's kernels only) against the entries that ran it too."""
  return _switch_rows(records, _finish_side)


def moe_finish_table(records: dict[str, dict]) -> list[str]:
  """`moe_finish_rows` as a table (positions > 1: a verification forward)."""
  return _off_on_table(moe_finish_rows(records), "the router's kernels only")


def step_probe_records(pattern: str = "step_probe_attn*.json") -> dict[str, dict]:
  """The committed step-probe records matching `pattern`, in time order: by default the
  attention kernels' (runs BA-BF); "step_probe_ple*.json": the PLE kernels' (runs BH-BM)."""
  recs = {p.stem: json.loads(p.read_text()) for p in RESULTS.glob(pattern)}
  return dict(sorted(recs.items(), key=lambda kv: kv[1]["environment"]["time_utc"]))


def main():
  sections = [
      ("Decode (benchmark_h200.json)", decode_table, "benchmark_h200.json"),
      ("Decode on an H100 with session 28's kernels (benchmark_kernels_all_h100.json)",
       decode_table, "benchmark_kernels_all_h100.json"),
      ("Decode on an H100 at session 31's library (benchmark_kernels_all_s31_h100.json)",
       decode_table, "benchmark_kernels_all_s31_h100.json"),
      ("... 26B-A4B in a process of its own (benchmark_26b_all_s31_h100.json)", decode_table,
       "benchmark_26b_all_s31_h100.json"),
      ("26B-A4B on an H100 with distinct ids in every row (benchmark_26b_distinct_h100.json)",
       decode_table, "benchmark_26b_distinct_h100.json"),
      ("... and at 8k context (benchmark_26b_distinct8k_h100.json)", decode_table,
       "benchmark_26b_distinct8k_h100.json"),
      ("Verification and drafter cost relative to one decode step", cost_table,
       "benchmark_h200.json"),
      ("Side by side with transformers", side_by_side_table, "benchmark_h200.json"),
      ("int8 weight-only decode", int8_table, "benchmark_h200.json"),
      ("Pallas kernels off and on (kernel_probe_h200.json)", kernel_table,
       "kernel_probe_h200.json"),
      ("GPU-trained pair (reproduce_gpu_h200.json)", pair_tables, "reproduce_gpu_h200.json"),
      ("Tensor parallelism (tp_decode_31b_2xh200.json)", tp_table, "tp_decode_31b_2xh200.json"),
      ("New domain (new_domain_h200.json)", domain_table, "new_domain_h200.json"),
      ("Drafter variants (variants_h200.json)", variants_tables, "variants_h200.json"),
  ]
  for title, fn, name in sections:
    if (RESULTS / name).is_file():
      print(f"**{title}**\n")
      print("\n".join(fn(_load(name))))
      print()
  records = gpu_pair_records()
  if records:
    print("**GPU-trained pair, mixed batch-1 workload: adaptive against the best fixed length "
          "(speedup over plain decoding; gain over the best fixed length; pass pairs won)**\n")
    print("\n".join(adaptive_table(records)))
  if (RESULTS / "benchmark_h200.json").is_file():
    print("\n**Against the targets of issue 6 (benchmark_h200.json, the GPU-pair records)**\n")
    print("\n".join(targets_table(_load("benchmark_h200.json"), records,
                                   other_bench_records())))
  probes = [
      ("step_probe_attn*.json", "The target's attention kernels against XLA's attention",
       attention_kernel_table),
      ("step_probe_ple*.json", "The PLE layers' end as kernels against XLA's ops",
       ple_kernel_table),
      ("step_probe_moe*.json", "The MoE router as kernels against XLA's ops", moe_kernel_table),
      ("step_probe_finish*.json", "The MoE layer's end as a kernel, the router's kernels on in "
       "both", moe_finish_table),
      ("step_probe_verify_*.json",
       "Verification forwards: the attention kernels against XLA's attention",
       verification_kernel_table),
  ]
  for pattern, title, table in probes:
    records = step_probe_records(pattern)
    if records:
      print(f"\n**{title} ({pattern.removesuffix('.json')}, same process)**\n")
      print("\n".join(table(records)))


if __name__ == "__main__":
  main()
