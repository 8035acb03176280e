"""End-to-end reproduction: corpus -> tokenizer -> target -> drafter -> evaluation -> records.

`run(cfg)` is what `experiments/reproduce_gpu.py` calls. Training phases are budgeted in seconds
rather than steps: a short calibration measures the step time, then the step count (and so the
cosine schedule) is fixed to fill the budget, so one command fits a device lease on any GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import pathlib
import shutil
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gemma_mtp import api
from gemma_mtp import bench
from gemma_mtp import checkpoint
from gemma_mtp import data
from gemma_mtp import distill
from gemma_mtp import drafter as drafter_lib
from gemma_mtp import metrics
from gemma_mtp import params as params_lib
from gemma_mtp import quant
from gemma_mtp import speculative
from gemma_mtp import tokenizer as tokenizer_lib
from gemma_mtp import train
from gemma_mtp.config import ModelConfig

log = logging.getLogger(__name__)


def add_train_files(corpus: data.Corpus, roots: Sequence[str], *, max_bytes: int) -> data.Corpus:
  """Adds the files under `roots` to the train split only ('site-packages' or 'site-packages/X'
  name this interpreter's installed packages).

  A deterministic subset (ordered by a hash of the path) of at most `max_bytes` (0 = all), so the
  held-out split stays the standard library's.
  """
  import sysconfig  # pylint: disable=g-import-not-at-top
  purelib = sysconfig.get_paths()["purelib"]
  paths = [purelib + r[len("site-packages"):] if r.startswith("site-packages") else r
           for r in roots]
  extra = data.build_corpus(paths, eval_fraction=0.0)
  files = sorted(extra.train_files, key=lambda f: hashlib.sha1(f.relpath.encode()).hexdigest())
  digest = lambda f: hashlib.sha1(f.path.read_bytes()).digest()
  held_out = {digest(f) for f in corpus.eval_files}
  chosen, total, duplicates = [], 0, 0
  for f in files:
    if max_bytes and total + f.size > max_bytes:
      continue
    if digest(f) in held_out:   # a vendored copy of a held-out file stays out of training
      duplicates += 1
      continue
    chosen.append(f)
    total += f.size
  stats = dict(corpus.stats, extra_train_files=len(chosen), extra_train_bytes=total,
               extra_train_roots=[str(p) for p in paths], extra_train_eval_duplicates=duplicates)
  return data.Corpus(corpus.train_files + tuple(chosen), corpus.eval_files, stats)


def build_split(out_dir: str | pathlib.Path, *, corpus_roots: Sequence[str] = (),
                eval_fraction: float, extra_train_roots: Sequence[str] = (),
                extra_train_max_bytes: int = 0) -> tuple[data.Corpus, pathlib.Path]:
  """The train / held-out split of `run` (and of the shipped demo pair), written to `out_dir`.

  Held-out files are the standard library's (or `corpus_roots`') chosen by path hash
  (`data.is_eval`), so the split is the same on every machine; `extra_train_roots` add training
  files only (`add_train_files`). Returns (corpus, the directory `data.write_corpus` wrote).
  """
  corpus = data.build_corpus(list(corpus_roots) or None, eval_fraction=eval_fraction)
  if extra_train_roots:
    corpus = add_train_files(corpus, extra_train_roots, max_bytes=extra_train_max_bytes)
  return corpus, data.write_corpus(corpus, out_dir)


def train_model(loss_fn, params, loader, *, seconds: float, lr: float, warmup: int, seed: int,
                eval_fn=None, metrics_file=None, steps: int = 0) -> tuple[Any, list[dict], int]:
  """AdamW with warmup + cosine decay for `steps` (0: as many as fit in `seconds`)."""
  def make_state(total):
    opt = train.OptimizerConfig(learning_rate=lr, warmup_steps=min(warmup, total - 1),
                                total_steps=total)
    # A copy each time: train steps donate the state's buffers.
    return train.TrainState.create(jax.tree_util.tree_map(jnp.array, params),
                                   train.make_optimizer(opt), rng=jax.random.PRNGKey(seed))

  if not steps:
    steps = train.budgeted_steps(loss_fn, make_state, loader, seconds=seconds)
  state, history = train.fit(loss_fn, make_state(steps), loader, steps=steps, eval_fn=eval_fn,
                             eval_every=max(steps // 4, 1), log_every=max(steps // 20, 1),
                             metrics_file=metrics_file)
  return state.params, history, steps


def eval_prompts(tokens: np.ndarray, *, num: int, prompt_len: int, seed: int = 0) -> list[list[int]]:
  """`num` prompts of `prompt_len` tokens cut at random offsets of an eval token stream."""
  rng = np.random.default_rng(seed)
  starts = rng.integers(0, len(tokens) - prompt_len - 1, size=num)
  return [tokens[s:s + prompt_len].tolist() for s in starts]


def evaluate_pair(target, drafter, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                  acceptance_runs: Sequence[tuple[float, tuple[int, ...], bool]] = (),
                  speed_runs: Sequence[tuple[float, int, tuple[int, ...], bool]] = (),
                  eos_id=None, repeats: int = 2, draft_cost: float | None = None,
                  verify_costs: dict[int, float] | None = None) -> dict[str, Any]:
  """Tokens per target forward, acceptance by position, and speculative vs plain speed.

  Buckets (`draft_lengths` below) are chain lengths K and/or `tree.TreeSpec` draft trees, chains
  first (`metrics.spec_config`); entries name them as `draft_lengths` (Ks) and, with trees,
  `trees` (labels) and `tree_nodes` (`metrics.bucket_fields`).

  Args:
    acceptance_runs: (temperature, draft_lengths, adaptive) runs over all prompts as one batch
      (run side by side: they are not timed).
    speed_runs: (temperature, batch, draft_lengths, adaptive) timings on the first `batch`
      prompts (`metrics.compare`: plain and speculative in the same process, compiled side by side
      first, then timed one after the other). A draft_lengths of () means "the best fixed length
      of the greedy acceptance runs" (chains only: a tree's tokens per forward buy more verified
      positions, so it is timed only when asked for).
    draft_cost: drafter/target step cost of the adaptive rule (None: `SpecConfig`'s default;
      `bench.draft_cost` measures it).
    verify_costs: {K: verification cost relative to a decode step} of the adaptive rule
      (`metrics.spec_config`; None: 1; `bench.verify_costs` measures them).
  """
  costs = dict(draft_cost=draft_cost, verify_costs=verify_costs)
  results: dict[str, Any] = {"acceptance": [], "speed": []}

  def accept(run):
    temperature, buckets, adaptive = run
    config = metrics.spec_config(buckets, adaptive, **costs)
    out = api.generate(target, list(prompts), max_new_tokens=max_new_tokens, drafter=drafter,
                       spec_config=config, temperature=temperature, eos_id=eos_id, seed=1)
    entry = {"temperature": temperature, **metrics.bucket_fields(config), "adaptive": adaptive,
             "prompts": len(prompts)}
    entry.update({k: v for k, v in out.stats.items() if k != "bucket_trace"})
    return entry

  # Untimed, so the runs (and their compilations) go side by side.
  results["acceptance"] = bench.side_by_side(accept, acceptance_runs)
  for entry in results["acceptance"]:
    log.info("acceptance %s", entry)
  fixed = [e for e in results["acceptance"]
           if not e["adaptive"] and e["temperature"] == 0.0 and "trees" not in e]
  best = tuple(max(fixed, key=lambda e: e["tokens_per_forward"])["draft_lengths"]) if fixed else (4,)
  runs = [(t, b, buckets or best, adaptive) for t, b, buckets, adaptive in speed_runs]
  calls = []
  for temperature, b, buckets, adaptive in runs:
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, eos_id=eos_id)
    calls.append(functools.partial(api.generate, target, list(prompts[:b]), **kw))
    calls.append(functools.partial(api.generate, target, list(prompts[:b]), drafter=drafter,
                                   spec_config=metrics.spec_config(buckets, adaptive, **costs),
                                   **kw))
  bench.side_by_side(lambda call: call(), calls)
  for temperature, b, buckets, adaptive in runs:
    r = metrics.compare(target, drafter, list(prompts[:b]), max_new_tokens=max_new_tokens,
                        draft_lengths=buckets, adaptive=adaptive, temperature=temperature,
                        eos_id=eos_id, repeats=repeats, **costs)
    r.pop("bucket_trace", None)
    results["speed"].append(r)
    log.info("speed %s", r)
  return results


def prose_tokens(roots: Sequence[str], tok, *, max_bytes: int) -> np.ndarray:
  """Tokens of prose found on this machine: Markdown / reStructuredText files and package
  METADATA descriptions under `roots` ('site-packages' as in `add_train_files`), at most
  `max_bytes` of them in a deterministic order."""
  import sysconfig  # pylint: disable=g-import-not-at-top
  purelib = sysconfig.get_paths()["purelib"]
  paths = [purelib + r[len("site-packages"):] if r.startswith("site-packages") else r
           for r in roots]
  found = data.build_corpus(paths, eval_fraction=0.0, extensions=(".md", ".rst", "METADATA"))
  docs, total = [], 0
  for f in sorted(found.train_files, key=lambda f: hashlib.sha1(f.relpath.encode()).hexdigest()):
    if total >= max_bytes:
      break
    text = f.path.read_text(encoding="utf-8")
    if len(text) >= 2000:
      docs.append(text)
      total += len(text)
  return data.tokenize_documents(docs, tok)


def evaluate_workloads(target, drafter, workloads: dict[str, Sequence[Sequence[int]]], *,
                       buckets: tuple[int, ...], max_new_tokens: int, eos_id=None,
                       temperature: float = 0.0, draft_cost: float | None = None,
                       verify_costs: dict[int, float] | None = None, trees: tuple = (),
                       calibrate: bool = False, per_call: bool = False,
                       segment_rounds: Sequence[int] = (), dispatches: Sequence[str] = (),
                       rule_variants: Sequence[str] = (),
                       repeats: int = 1) -> list[dict[str, Any]]:
  """Batch-1 generation over each workload's prompts, one after the other, for plain decoding,
  every fixed draft length, every fixed draft tree of `trees` (`tree.TreeSpec`; configuration
  named by its label), adaptive chain buckets chosen every round ('adaptive') and, with
  `per_call`, chosen once per prompt ('adaptive per call', `speculative.per_call_config`: no
  `lax.switch` in the loop; slower on the H200 demo pair, NOTES run N); plus the 'mixed'
  workload (all of them). 'adaptive' chooses every `SpecConfig.segment_rounds` rounds (the
  default: every round); each other n of `segment_rounds` adds 'adaptive, segment=n', each
  other `SpecConfig.dispatch` in `dispatches` 'adaptive, dispatch=d', and each 'field=value' of
  `rule_variants` (a `SpecConfig` field, e.g. 'position_decay=when_judged', 'ema_decay=0.8')
  'adaptive, field=value' (with 'adaptive, warm' also 'adaptive, warm, field=value').

  Every configuration is compiled first (side by side), then each runs through every prompt of a
  workload in turn; seconds are the wall time of that pass. The adaptive configurations carry
  their acceptance estimator from one prompt to the next within a pass
  (`api.generate(adaptive_state=)`), as a serving loop would; each pass starts from the prior.
  Their costs are `draft_cost` / `verify_costs` (`metrics.spec_config`), or with `calibrate` the
  round costs measured in the loop by calibration passes (one untimed, then `repeats`, the
  fastest) of plain decoding and every fixed K over the first workload, before any timed pass
  (`round_costs`: what a round of each K costs relative to a plain decoding step, everything in
  the round included; `costs` carries the calibration's fastest seconds), and with chain
  buckets only also 'adaptive, warm': the same rule, each pass starting from the estimator that
  the longest fixed K's last calibration pass left, where 'adaptive' starts from the prior, so
  that the first prompt of a pass does not pay for the rule's warm-up (run AM: code's first
  prompt took 30 rounds adaptive against K = 8's 20). The timed passes of the adaptive
  configurations are then interleaved with the fixed ones like any other (NOTES run AC: run
  after all the fixed passes of a workload, right after their compilation, they were sometimes
  20% slower).

  With `repeats` > 1 every workload's passes run that many times, interleaved (all
  configurations once, then again), so that drifts of the machine fall on every configuration
  alike; an entry's `seconds` is the median pass and `seconds_runs` lists them all ('mixed':
  per repeat, the sum over the workloads). The counts of a pass do not change between repeats
  (greedy decoding, each pass from the prior), only its time.

  Returns one entry per (workload, configuration) with tokens/s, tokens per target forward,
  the speedup over plain decoding, the rounds per bucket (`bucket_counts`), the changes of
  bucket between rounds of a call (`bucket_changes`: what the 'loops' dispatch pays for), and
  per prompt in order the target forwards (`prompt_forwards`) and the median over passes of its
  wall seconds (`prompt_seconds`, the host's bookkeeping between calls included); the
  adaptive entries also with the costs their rule used (`costs`: draft_cost, verify_costs by K)
  and `seconds_at_fixed_rounds` (their rounds at the fixed-K passes' seconds per round: the
  rule's choices apart from the cost of choosing; NOTES runs Y, Z); at temperature 0 every
  entry also with `outputs_equal_plain`: each of its passes emitted plain decoding's tokens, and
  `divergences`: where its first pass left them, per prompt (`divergences`).
  """
  if repeats < 1:
    raise ValueError(f"repeats must be >= 1, got {repeats}")
  for v in rule_variants:   # before any compilation
    spec_variant(speculative.SpecConfig(), v)
  fixed = {"plain": {}}
  fixed.update({f"K={k}": dict(drafter=drafter, draft_lengths=(k,), adaptive=False)
                for k in buckets})
  fixed.update({t.label: dict(drafter=drafter, spec_config=metrics.spec_config(
      (t,), False, draft_cost)) for t in trees})
  kw = dict(max_new_tokens=max_new_tokens, eos_id=eos_id, temperature=temperature, seed=1)
  first = next(iter(workloads.values()))[0]

  used = {}

  def adaptive_configs(costs_draft, costs_verify):
    spec = metrics.spec_config(buckets, True, costs_draft, costs_verify)
    used.update(draft_cost=spec.draft_cost, verify_costs=dict(zip(
        spec.draft_lengths, spec.verify_costs or [1.0] * len(buckets))),
                calibrated=calibrate)
    configs = {"adaptive": dict(drafter=drafter, spec_config=spec)}
    for n in segment_rounds:
      if n != spec.segment_rounds:
        configs[f"adaptive, segment={n}"] = dict(
            drafter=drafter, spec_config=dataclasses.replace(spec, segment_rounds=n))
    for d in dispatches:
      if d != spec.dispatch:
        configs[f"adaptive, dispatch={d}"] = dict(
            drafter=drafter, spec_config=dataclasses.replace(spec, dispatch=d))
    for v in rule_variants:
      configs[f"adaptive, {v}"] = dict(drafter=drafter, spec_config=spec_variant(spec, v))
    if per_call:
      configs["adaptive per call"] = dict(drafter=drafter, per_call=spec)
    return configs

  def warm(configs):   # compile side by side (the per-call configuration: one program per K)
    for c in configs.values():
      if "per_call" in c:
        speculative.per_call_config(c["per_call"], None)   # the bucket choice's own program
    calls = [c for c in configs.values() if "per_call" not in c and "start_state" not in c]
    calls += [dict(drafter=drafter, spec_config=speculative.first_bucket_config(c["per_call"], b))
              for c in configs.values() if "per_call" in c for b in range(len(buckets))]
    bench.side_by_side(lambda c: api.generate(target, [first], **kw, **c), calls)

  adaptive = None if calibrate else adaptive_configs(draft_cost, verify_costs)
  warm({**fixed, **(adaptive or {})})
  totals: dict[str, dict[str, Any]] = {}
  entries = []

  def passes(wname, prompts, configs):
    runs = {cname: [] for cname in configs}
    for _ in range(repeats):
      for cname, c in configs.items():
        runs[cname].append(_timed_pass(target, prompts, c, kw))
    for cname, done in runs.items():
      tot = totals.setdefault(cname, dict(seconds_runs=[0.0] * repeats, new=0, forwards=0,
                                          prompts=0, drafted=0, accepted=0, changes=0,
                                          buckets={}))
      counts = {**done[0], "prompt_seconds": np.median(   # per prompt: the median pass
          [r["prompt_seconds"] for r in done], axis=0).tolist()}
      if temperature == 0.0:   # greedy: every pass's tokens are plain decoding's
        plain_out = runs["plain"][0]["outputs"]
        counts["unequal"] = sum(r["outputs"] != plain_out for r in done)
        counts["divergences"] = divergences(target, wname, prompts, plain_out,
                                            done[0]["outputs"])
      _add_counts(tot, {k: v for k, v in counts.items() if k not in _NOT_COUNTS})
      tot["seconds_runs"] = [a + r["seconds"] for a, r in zip(tot["seconds_runs"], done)]
      entries.append(_workload_entry(wname, cname, {**counts, "seconds_runs": [
          r["seconds"] for r in done]}))

  calibration = None
  if adaptive is None:   # calibration passes of plain and fixed K over the first workload
    wname, prompts = next(iter(workloads.items()))
    chains = {cname: c for cname, c in fixed.items() if cname == "plain" or cname[:2] == "K="}
    # One untimed pass each first: right after compilation, passes can run slow (NOTES run AC).
    for c in chains.values():
      _timed_pass(target, prompts, c, kw)
    done = {cname: [] for cname in chains}
    for _ in range(repeats):
      for cname, c in chains.items():
        done[cname].append(_timed_pass(target, prompts, c, kw))
    # Each configuration's fastest pass: timing noise only adds (NOTES run CK: one process's
    # calibration put a round of K=8 at 2.54 plain steps, its timed passes at 2.26).
    calibration = [_workload_entry(wname, cname, {**runs[0], "seconds_runs": [
        min(r["seconds"] for r in runs)]}) for cname, runs in done.items()]
    adaptive = adaptive_configs(0.0, round_costs(calibration, buckets))
    # 'adaptive, warm': the rule's estimator starts each pass where the longest fixed K's last
    # calibration prompt left it (a fixed-K run counts its rounds and keeps the prior's bucket,
    # none), as a serving loop that has run earlier requests would, instead of from the prior.
    if not trees:   # (a tree's depth may change the estimator's shape)
      start = done[f"K={max(buckets)}"][-1]["adaptive_state"]
      adaptive["adaptive, warm"] = dict(adaptive["adaptive"], start_state=start)
      for v in rule_variants:   # (each the program of its 'adaptive, v', another input)
        adaptive[f"adaptive, warm, {v}"] = dict(adaptive[f"adaptive, {v}"], start_state=start)
    warm(adaptive)
  for wname, prompts in workloads.items():   # every configuration's passes interleaved
    passes(wname, prompts, {**fixed, **adaptive})
  entries += [_workload_entry("mixed", cname, tot) for cname, tot in totals.items()]
  plain = {e["workload"]: e["seconds"] for e in entries if e["config"] == "plain"}
  per_round = {(e["workload"], e["config"]): e["seconds"] / max(e["forwards"], 1)
               for e in entries}
  for e in entries:
    e["speedup"] = plain[e["workload"]] / e["seconds"]
    if e["config"].startswith("adaptive"):
      e["costs"] = used if calibration is None else {
          **used, "calibration_seconds": {c["config"]: c["seconds"] for c in calibration}}
      e["seconds_at_fixed_rounds"] = _at_fixed_rounds(e, per_round)
    log.info("workload %s %s: %.1f tokens/s, %.2f tokens/forward, %.2fx", e["workload"],
             e["config"], e["tokens_per_second"], e["tokens_per_forward"], e["speedup"])
  return entries


def spec_variant(spec: speculative.SpecConfig, text: str) -> speculative.SpecConfig:
  """`spec` with one field set from 'field=value' text (the value parsed as the field's current
  type: int, float, bool or str), e.g. 'position_decay=when_judged' or 'ema_decay=0.8'."""
  name, sep, value = text.partition("=")
  fields = {f.name for f in dataclasses.fields(spec)}
  current = getattr(spec, name, None)
  if not sep or name not in fields or not isinstance(current, (bool, int, float, str)):
    raise ValueError(f"a rule variant is 'field=value' for a scalar SpecConfig field, got "
                     f"{text!r}")
  if isinstance(current, bool):
    if value.lower() not in ("true", "false"):
      raise ValueError(f"{name} takes true or false, got {value!r}")
    parsed = value.lower() == "true"
  else:
    try:
      parsed = type(current)(value)
    except ValueError as e:
      raise ValueError(f"{name} takes a {type(current).__name__}, got {value!r}") from e
  return dataclasses.replace(spec, **{name: parsed})


def _at_fixed_rounds(entry: dict[str, Any], per_round: dict) -> float | None:
  """What an adaptive entry's rounds would take at the seconds per round of the same workload's
  fixed-K passes: the worth of the rule's choices without the cost of choosing (each pass's
  per-prompt costs, prefill included, spread over its rounds). None where a bucket has no
  fixed-K pass (a tree)."""
  keys = [(entry["workload"], f"K={k}") for k in entry["bucket_counts"]]
  if not all(key in per_round for key in keys):
    return None
  return float(sum(per_round[key] * n for key, n in zip(keys, entry["bucket_counts"].values())))


def round_costs(entries: Sequence[dict[str, Any]], buckets: Sequence[int]) -> dict[int, float]:
  """{K: seconds per round of the fixed-K pass / seconds per step of the plain pass} from the
  first workload's entries (`_workload_entry`s): the whole round (drafting, verification,
  acceptance, commit, the loop's own overhead) relative to one plain decoding step, made at
  least 1 and non-decreasing in K (a round drafts and verifies more than a plain step does; a
  lower figure is timing noise)."""
  wname = entries[0]["workload"]
  per_round = {e["config"]: e["seconds"] / max(e["forwards"], 1) for e in entries
               if e["workload"] == wname}
  costs, last = {}, 1.0
  for k in sorted(buckets):
    last = max(last, per_round[f"K={k}"] / per_round["plain"])
    costs[k] = last
  return costs


def _timed_pass(target, prompts, config, kw) -> dict[str, Any]:
  """One timed pass of configuration `config` over `prompts`: its counts and `seconds`."""
  t0 = time.perf_counter()
  st = _run_prompts(target, prompts, **kw, **config)
  st["seconds"] = time.perf_counter() - t0
  return st


_NOT_COUNTS = ("seconds", "outputs", "adaptive_state")   # what `_run_prompts` adds to its counts


def _run_prompts(target, prompts, *, per_call=None, start_state=None, **kw) -> dict[str, Any]:
  """Generates each prompt alone, in turn; an adaptive configuration (a `spec_config` with
  `adaptive`, or `per_call`: a chain SpecConfig whose bucket is chosen per prompt) carries its
  estimator from prompt to prompt, starting from `start_state` (None: the prior). Sums new
  tokens, target forwards, drafted / accepted drafts, rounds per bucket and changes of bucket
  between a call's rounds; also returns every prompt's tokens (`outputs`) and the estimator
  the last prompt returned (`adaptive_state`; a fixed-K run's counts too)."""
  tot = dict(new=0, forwards=0, prompts=len(prompts), drafted=0, accepted=0, changes=0,
             buckets={}, prompt_seconds=[], prompt_forwards=[], outputs=[])
  spec = kw.get("spec_config")
  carry = per_call is not None or (spec is not None and spec.adaptive)
  state = start_state if carry else None
  for p in prompts:
    t0 = time.perf_counter()
    if per_call is not None:
      kw["spec_config"], state = speculative.per_call_config(per_call, state)
    out = api.generate(target, [p], adaptive_state=state, **kw)   # (returns host arrays)
    state = out.adaptive_state if carry else None
    tot["adaptive_state"] = out.adaptive_state
    tot["outputs"].append(out.tokens[0])
    st = out.stats
    trace = st.get("bucket_trace", [])
    _add_counts(tot, dict(new=st["new_tokens"], forwards=st["target_forwards"],
                          drafted=st.get("drafted", 0), accepted=st.get("accepted", 0),
                          changes=sum(a != b for a, b in zip(trace, trace[1:])),
                          buckets=st.get("bucket_counts", {}),
                          prompt_seconds=[time.perf_counter() - t0],
                          prompt_forwards=[st["target_forwards"]]))
  return tot


def divergences(target, workload: str, prompts, plain_outputs, outputs) -> list[dict[str, Any]]:
  """Where greedy `outputs` first leave plain decoding's `plain_outputs`, one record per prompt
  that does: its index, the position among the new tokens, both tokens, and `logit_gap`, the
  plain token's logit minus the other's at that position in one causal forward of the target
  over the prompt and plain decoding's tokens (`api.score`, zero-padded to one shape for all).

  Greedy speculative decoding emits plain decoding's tokens in exact arithmetic; in bf16 on a GPU
  a forward of K + 1 positions rounds differently from one of 1, so where the two best logits
  are closer than that rounding the paths may part: a gap of the order of the logits' bf16
  spacing says that is what happened, a large one would be a bug."""
  parted = [(i, next((j for j, (a, b) in enumerate(zip(ref, out)) if a != b),
                     min(len(ref), len(out))))
            for i, (ref, out) in enumerate(zip(plain_outputs, outputs)) if ref != out]
  if not parted:
    return []
  width = max(len(p) + len(r) for p, r in zip(prompts, plain_outputs))
  found = []
  for i, j in parted:
    ref, out = plain_outputs[i], outputs[i]
    if j >= len(ref) or j >= len(out):   # one stopped (EOS or budget) where the other went on
      found.append(dict(workload=workload, prompt=i, position=j, plain_token=None, token=None,
                        logit_gap=None))
      continue
    seq = list(prompts[i]) + list(ref)
    logits = np.asarray(api.score(target, [seq + [0] * (width - len(seq))])[0])
    row = logits[len(prompts[i]) + j - 1]            # the logits that chose new token j
    found.append(dict(workload=workload, prompt=i, position=j, plain_token=int(ref[j]),
                      token=int(out[j]), logit_gap=float(row[ref[j]] - row[out[j]])))
  return found


def _add_counts(tot: dict[str, Any], st: dict[str, Any]) -> None:
  """Adds the counts of `st` (numbers, and `buckets` {label: rounds}) into `tot`."""
  for k, v in st.items():
    if k == "buckets":
      for label, c in v.items():
        tot["buckets"][label] = tot["buckets"].get(label, 0) + c
    elif isinstance(v, list):   # per prompt: concatenated
      tot[k] = tot.get(k, []) + v
    else:
      tot[k] = tot.get(k, 0) + v


def _workload_entry(wname: str, cname: str, tot: dict[str, Any]) -> dict[str, Any]:
  """An entry of `evaluate_workloads` from a pass's counts and its `seconds_runs` (the median is
  `seconds`)."""
  runs = tot["seconds_runs"]
  seconds = float(np.median(runs))
  return dict(workload=wname, config=cname, prompts=tot["prompts"], seconds=seconds,
              seconds_runs=list(runs),
              new_tokens=tot["new"], tokens_per_second=tot["new"] / seconds,
              tokens_per_forward=(tot["new"] - tot["prompts"]) / max(tot["forwards"], 1),
              draft_acceptance=tot["accepted"] / tot["drafted"] if tot["drafted"] else None,
              forwards=tot["forwards"], bucket_changes=tot["changes"],
              **({"outputs_equal_plain": tot["unequal"] == 0,
                  "divergences": tot.get("divergences", [])} if "unequal" in tot else {}),
              bucket_counts={str(k): v for k, v in tot["buckets"].items()},
              prompt_seconds=tot["prompt_seconds"], prompt_forwards=tot["prompt_forwards"])


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """See configs/reproduce_*.py for the meaning of each field."""

  out_dir: str
  vocab_size: int
  seq_len: int
  batch_size: int
  target: dict
  drafter: dict
  target_seconds: float
  drafter_seconds: float
  target_lr: float = 3e-3
  drafter_lr: float = 3e-3
  drafter_steps: int = 4
  drafter_step_weights: tuple[float, ...] = (1.0, 0.8, 0.6, 0.4)
  eval_prompts: int = 32
  prompt_len: int = 128
  max_new_tokens: int = 128
  export_dtype: str = "bfloat16"
  measure_speed: bool = True
  corpus_roots: tuple[str, ...] = ()
  eval_fraction: float = 0.02
  extra_train_roots: tuple[str, ...] = ()
  extra_train_max_bytes: int = 0
  target_steps: int = 0
  drafter_train_steps: int = 0
  full_eval: bool = True
  buckets: tuple[int, ...] = (1, 2, 4, 8)
  draft_cost: float = 0.0
  conventions: tuple[str, ...] = ("hf", "clean")
  speed_batch: int = 8
  workload_prompts: int = 0
  prose_roots: tuple[str, ...] = ("site-packages",)
  prose_max_bytes: int = 4_000_000
  workload_calibrate: bool = False
  workload_repeats: int = 1
  workload_rule_variants: tuple[str, ...] = ()
  seed: int = 0


def run(cfg: PipelineConfig) -> dict[str, Any]:
  """Builds everything under cfg.out_dir and returns the summary record (also written there)."""
  for v in cfg.workload_rule_variants:   # a typo fails here, not after the training
    spec_variant(speculative.SpecConfig(), v)
  out = pathlib.Path(cfg.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  times: dict[str, float] = {}
  t0 = time.perf_counter()

  corpus, corpus_dir = build_split(
      out / "corpus", corpus_roots=cfg.corpus_roots, eval_fraction=cfg.eval_fraction,
      extra_train_roots=cfg.extra_train_roots, extra_train_max_bytes=cfg.extra_train_max_bytes)
  times["corpus_s"] = time.perf_counter() - t0

  t = time.perf_counter()
  tok = tokenizer_lib.train_tokenizer(files=[data.split_file(corpus_dir, "train")],
                                      vocab_size=cfg.vocab_size, model_prefix=out / "tokenizer")
  times["tokenizer_s"] = time.perf_counter() - t

  t = time.perf_counter()
  train_loader = data.make_loader(corpus_dir, "train", tok, seq_len=cfg.seq_len,
                                  batch_size=cfg.batch_size, seed=cfg.seed)
  eval_tokens = data.load_tokens(data.split_file(corpus_dir, "eval"), tok)
  eval_loader = data.Loader(data.pack(eval_tokens, seq_len=cfg.seq_len),
                            batch_size=cfg.batch_size, shuffle=False)
  eval_batches = [eval_loader.batch_at(i) for i in range(min(4, int(eval_loader.steps_per_epoch)))]
  times["tokenize_s"] = time.perf_counter() - t

  tcfg = ModelConfig(vocab_size=tok.vocab_size, **cfg.target)
  t = time.perf_counter()
  lm = jax.tree_util.Partial(train.lm_loss, config=tcfg)
  tparams, t_hist, t_steps = train_model(
      lm, params_lib.init_params(tcfg, jax.random.PRNGKey(cfg.seed)), train_loader,
      seconds=cfg.target_seconds, lr=cfg.target_lr, warmup=200, seed=cfg.seed,
      eval_fn=train.make_eval_fn(lm, eval_batches), metrics_file=out / "target_metrics.jsonl",
      steps=cfg.target_steps)
  times["target_train_s"] = time.perf_counter() - t

  # The drafter trains against the frozen target as it will run: bf16 compute.
  frozen = quant.cast(tparams, tcfg.dtype)
  dcfg = drafter_lib.for_target(tcfg, **cfg.drafter)
  t = time.perf_counter()

  def dloss(dparams, batch, rng):
    del rng
    return distill.drafter_loss(dparams, dcfg=dcfg, tparams=frozen, tcfg=tcfg,
                                tokens=batch["tokens"], steps=cfg.drafter_steps,
                                step_weights=cfg.drafter_step_weights)

  dloss = jax.tree_util.Partial(dloss)
  dparams, d_hist, d_steps = train_model(
      dloss, drafter_lib.init_params(dcfg, jax.random.PRNGKey(cfg.seed + 1)), train_loader,
      seconds=cfg.drafter_seconds, lr=cfg.drafter_lr, warmup=100, seed=cfg.seed + 1,
      eval_fn=train.make_eval_fn(dloss, eval_batches[:2]),
      metrics_file=out / "drafter_metrics.jsonl", steps=cfg.drafter_train_steps)
  times["drafter_train_s"] = time.perf_counter() - t

  # Export (bf16) and reload exactly as users will.
  export_t = train.export_params(tparams, dtype=cfg.export_dtype)
  export_d = train.export_params(dparams, dtype=cfg.export_dtype)
  ship = out / "demo"
  shutil.rmtree(ship, ignore_errors=True)
  ship_t = tcfg.replace(param_dtype=cfg.export_dtype)
  checkpoint.save_params(ship / "target", export_t, ship_t)
  checkpoint.save_drafter(ship / "drafter", export_d,
                          dcfg.replace(param_dtype=cfg.export_dtype))
  shutil.copy(out / "tokenizer.model", ship / "tokenizer.model")

  t = time.perf_counter()
  target = api.load_target(ship / "target", dtype="bfloat16")
  results = {}
  prompts = eval_prompts(eval_tokens, num=cfg.eval_prompts, prompt_len=cfg.prompt_len)
  buckets = tuple(cfg.buckets)
  sb = cfg.speed_batch
  cost = None
  for convention in cfg.conventions:
    drafter = api.load_drafter(ship / "drafter", target, convention=convention)
    main = convention == dcfg.convention
    if cost is None:   # the adaptive rule's drafter/target step cost, measured on this device
      measured = bench.draft_cost(target.params, target.config, drafter.params, drafter.config,
                                  context=cfg.prompt_len + cfg.max_new_tokens)
      cost = cfg.draft_cost or measured["ratio"]
      results["draft_cost"] = {"measured": measured, "used": cost}
      verify = bench.verify_costs(target.params, target.config, buckets,
                                  context=cfg.prompt_len + cfg.max_new_tokens)
      results["verify_costs"] = {"measured": verify, "used": verify["ratio"]}
      log.info("draft cost: %s; verify costs: %s", results["draft_cost"],
               results["verify_costs"])
    fixed = buckets if main and cfg.full_eval else (4 if 4 in buckets else buckets[-1],)
    acceptance = [(0.0, (k,), False) for k in fixed] + [(0.0, buckets, True)]
    speed = []
    if main:
      acceptance.append((1.0, buckets, True))
      if cfg.measure_speed:
        speed = [(0.0, 1, (), False), (0.0, 1, buckets, True), (0.0, sb, (), False),
                 (0.0, sb, buckets, True), (1.0, 1, buckets, True), (1.0, sb, buckets, True)]
    results[convention] = evaluate_pair(target, drafter, prompts, acceptance_runs=acceptance,
                                        speed_runs=speed, max_new_tokens=cfg.max_new_tokens,
                                        draft_cost=cost, verify_costs=verify["ratio"])
    if main and cfg.workload_prompts:
      n = cfg.workload_prompts
      workloads = {"code": eval_prompts(eval_tokens, num=n, prompt_len=cfg.prompt_len, seed=1)}
      prose = prose_tokens(cfg.prose_roots, tok, max_bytes=cfg.prose_max_bytes)
      if prose.size > cfg.prompt_len + 1:
        workloads["prose"] = eval_prompts(prose, num=n, prompt_len=cfg.prompt_len, seed=1)
      results[convention]["workloads"] = evaluate_workloads(
          target, drafter, workloads, buckets=buckets, max_new_tokens=cfg.max_new_tokens,
          draft_cost=cost, verify_costs=verify["ratio"], calibrate=cfg.workload_calibrate,
          rule_variants=cfg.workload_rule_variants, repeats=cfg.workload_repeats)
  times["evaluate_s"] = time.perf_counter() - t
  times["total_s"] = time.perf_counter() - t0

  record = {
      "kind": "reproduce",
      "config": dataclasses.asdict(cfg),
      "corpus": corpus.stats,
      "tokenizer_vocab": tok.vocab_size,
      "train_tokens": int(train_loader.num_sequences * cfg.seq_len),
      "eval_tokens": int(eval_tokens.size),
      "target": {"config": dataclasses.asdict(tcfg), "steps": t_steps,
                 "params": params_lib.count_params(params_lib.param_specs(tcfg)),
                 "final": [h for h in t_hist if h["split"] == "eval"][-1:]},
      "drafter": {"config": dataclasses.asdict(dcfg), "steps": d_steps,
                  "params": params_lib.count_params(drafter_lib.param_specs(dcfg)),
                  "final": [h for h in d_hist if h["split"] == "eval"][-1:]},
      "evaluation": results,
      "times": times,
  }
  metrics.write_record(out / "reproduce.json", record)
  log.info("summary: %s", json.dumps({k: record[k] for k in ("times",)}))
  return record
