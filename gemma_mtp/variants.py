"""Drafter variants compared on one target: distill, quantize, evaluate, one JSON record.

`run(cfg)` is what `experiments/variants.py` calls. On the shipped demo target (`gemma_mtp/demo`,
trained on an H200 on the standard library's train split plus `transformers`' source), or any
target / assistant / tokenizer given by path:

  1. the train / held-out split is rebuilt as the target was trained (`pipeline.build_split`);
  2. a parallel-heads drafter and a pruned self-drafter (the target's first N layers + a low-rank
     adapter) are distilled on the train split by `train.train_drafter`, the recipe of
     `experiments/train_drafter.py`, each within a seconds (or steps) budget;
  3. the target is quantized to int8 (`api.quantize_target`) and its logit error against the
     float target is measured on held-out code;
  4. every `Variant` (a target, a drafter and speculative settings) runs greedy on held-out code
     and prose: at the largest batch every draft length K, for tokens per target forward,
     acceptance by draft position and speed; at the smaller batches (batch 1) the K that was
     fastest at the largest batch. Plain decoding of each target runs the same prompts in the
     same process, so every speculative run has its speedup (and, on the int8 target, its speedup
     over the float target too) and its check that its greedy output equals plain greedy output.
     Every program is compiled side by side before anything is timed.

The default variants (`default_variants`):

  assistant        the shipped MTP assistant, float target
  parallel_heads   the distilled parallel heads, float target
  self             the distilled self-drafter, float target
  int8_target      the shipped assistant on the int8 target
  int8_self        the distilled self-drafter on int8 copies of its layers, float target
  tree             multi-candidate drafting: the shipped assistant ('clean' convention) drafts
                   each static tree of `trees` (top-k branching), verified in one forward

Adding a design is one more `Variant` in that list: its `spec` holds the extra
`speculative.SpecConfig` fields, `draft_lengths` its own Ks if the configured buckets do not
apply, `trees` its draft trees.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import shutil
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from gemma_mtp import api
from gemma_mtp import bench
from gemma_mtp import data
from gemma_mtp import demo
from gemma_mtp import drafter_kinds
from gemma_mtp import metrics
from gemma_mtp import params as params_lib
from gemma_mtp import pipeline
from gemma_mtp import quant
from gemma_mtp import self_drafter
from gemma_mtp import speculative
from gemma_mtp import tokenizer as tokenizer_lib
from gemma_mtp import train
from gemma_mtp import tree as tree_lib

log = logging.getLogger(__name__)

FLOAT = "float"   # the target as loaded (bf16 on accelerators)
INT8 = "int8"     # its int8 weight-only quantization
PromptSet = Sequence[Sequence[int]]


@dataclasses.dataclass(frozen=True)
class VariantsConfig:
  """See configs/variants_gpu.py for the meaning of each field."""

  out_dir: str
  heads: dict
  self_drafter: dict
  record: str = ""
  target: str = ""
  assistant: str = ""
  tokenizer: str = ""
  dtype: str = "bfloat16"
  corpus_roots: tuple[str, ...] = ()
  eval_fraction: float = 0.02
  extra_train_roots: tuple[str, ...] = ()
  extra_train_max_bytes: int = 0
  prose_roots: tuple[str, ...] = ("site-packages",)
  prose_max_bytes: int = 4_000_000
  int8_embeddings: bool = False
  logit_sequences: int = 8
  logit_seq_len: int = 512
  buckets: tuple[int, ...] = (1, 2, 4, 8)
  trees: tuple[str, ...] = ()
  batches: tuple[int, ...] = (1, 8)
  prompts: int = 32
  small_batch_prompts: int = 8
  small_batch_all_k: bool = False
  prompt_len: int = 128
  max_new_tokens: int = 128
  repeats: int = 2
  compile_threads: int = 0
  seed: int = 0

  def __post_init__(self):
    big = max(self.batches)
    if self.prompts % big:
      raise ValueError(f"prompts={self.prompts} must be a multiple of the largest batch {big} "
                       "(a smaller last call would compile another program while timed)")
    for b in self.batches:
      if b != big and (self.small_batch_prompts % b or self.small_batch_prompts > self.prompts):
        raise ValueError(f"small_batch_prompts={self.small_batch_prompts} must be a multiple of "
                         f"batch {b} and at most prompts={self.prompts}")


@dataclasses.dataclass(frozen=True)
class Variant:
  """One drafting design to compare.

  Attributes:
    name: its label in the record and the table.
    target: which target verifies (FLOAT or INT8, keys of the targets dict).
    drafter: the drafter (any kind, `drafter_kinds`).
    spec: further `speculative.SpecConfig` fields; each run sets draft_lengths=(K,) (or one tree)
      and adaptive=False.
    draft_lengths: the Ks evaluated; None: the configured buckets the drafter can make.
    trees: instead of chains, static draft trees (`tree.TreeSpec.parse` text, e.g. '3,2,1,1'),
      each evaluated as the only bucket; its "K" in the record is the tree's label.
  """

  name: str
  target: str
  drafter: api.Drafter
  spec: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  draft_lengths: tuple[int, ...] | None = None
  trees: tuple[str, ...] = ()

  def lengths(self, buckets: Sequence[int]) -> tuple[int | str, ...]:
    if self.trees:
      return tuple(tree_lib.TreeSpec.parse(t).label for t in self.trees)
    if self.draft_lengths is not None:
      return tuple(self.draft_lengths)
    longest = drafter_kinds.max_draft(self.drafter.config)
    return tuple(k for k in buckets if longest is None or k <= longest)

  def spec_config(self, k: int | str) -> speculative.SpecConfig:
    if isinstance(k, str):
      return speculative.SpecConfig(draft_lengths=(), trees=(tree_lib.TreeSpec.parse(k),),
                                    adaptive=False, **self.spec)
    return speculative.SpecConfig(draft_lengths=(k,), adaptive=False, **self.spec)


def _depth(k: int | str) -> int:
  """Draft positions of bucket k (a chain's length or a tree label's depth)."""
  return tree_lib.TreeSpec.parse(k).max_depth if isinstance(k, str) else k


def _order(key: tuple) -> tuple:
  """Sort key of (name, k, batch, workload) run keys whose k are ints (chains) or labels."""
  return (isinstance(key[1], str), str(key[1]) if isinstance(key[1], str) else key[1], key[2])


def default_variants(*, assistant: api.Drafter, heads: api.Drafter, self_draft: api.Drafter,
                     int8_self: api.Drafter, tree_assistant: api.Drafter | None = None,
                     trees: Sequence[str] = ()) -> list[Variant]:
  """The compared designs; `tree_assistant` (the assistant in the 'clean' convention, which
  tree drafting needs) drafts each of `trees` (multi-candidate drafting)."""
  out = [
      Variant("assistant", FLOAT, assistant),
      Variant("parallel_heads", FLOAT, heads),
      Variant("self", FLOAT, self_draft),
      Variant("int8_target", INT8, assistant),
      Variant("int8_self", FLOAT, int8_self),
  ]
  if trees and tree_assistant is not None:
    out.append(Variant("tree", FLOAT, tree_assistant, trees=tuple(trees)))
  return out


# ---- parts --------------------------------------------------------------------------------------

def distill(recipe: Mapping[str, Any], *, target_path, corpus_dir, tokenizer_path, workdir,
            target: api.Target) -> tuple[api.Drafter, dict[str, Any]]:
  """A drafter distilled by `train.train_drafter` (experiments/train_drafter.py's recipe).

  Args:
    recipe: `train_drafter` keyword arguments as in configs/train_drafter_*.py (`drafter` with
      its `kind`, draft_steps, step_weights, loss_type, compute_dtype, seq_len, batch_size,
      steps, seconds, optimizer as a dict, ...). The run starts afresh in `workdir`; unless the
      recipe says otherwise it evaluates (on the held-out split) and checkpoints only at its end.
  Returns:
    (the exported drafter loaded for `target` as users load it, {"steps", "seconds", "final"
    (the last evaluation), "recipe"}).
  """
  kw = dict(recipe)
  opt = dict(kw.pop("optimizer", {}))
  opt.setdefault("total_steps", kw.get("steps", 10_000))   # a seconds budget refits it
  kw["step_weights"] = tuple(kw.get("step_weights", ())) or None
  kw.setdefault("eval_every", 1 << 30)
  kw.setdefault("ckpt_every", 0)
  workdir = pathlib.Path(workdir)
  shutil.rmtree(workdir, ignore_errors=True)
  t0 = time.perf_counter()
  state = train.train_drafter(target_path=target_path, corpus_dir=corpus_dir,
                              tokenizer_path=tokenizer_path, workdir=workdir, resume=False,
                              optimizer=train.OptimizerConfig(**opt), **kw)
  seconds = time.perf_counter() - t0
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  drafter = api.load_drafter(workdir / "drafter", target)
  return drafter, {"steps": int(state.step), "seconds": seconds, "recipe": dict(recipe),
                   "final": [r for r in records if r["split"] == "eval"][-1:]}


def int8_logit_error(target: api.Target, qtarget: api.Target, tokens: np.ndarray, *,
                     sequences: int, seq_len: int) -> dict[str, Any]:
  """`quant.logit_error` of the int8 target against the float one on `sequences` x `seq_len`
  tokens cut from `tokens` (both in the float target's compute dtype)."""
  seq_len = min(seq_len, int(tokens.size) - 1)
  rows = np.asarray(data.pack(tokens, seq_len=seq_len)[:sequences, :-1])
  err = quant.logit_error(api.score(qtarget, rows), api.score(target, rows))
  return {**err, "sequences": int(rows.shape[0]), "positions": int(rows.size),
          "compute_dtype": target.config.dtype}


def drafter_summary(drafter: api.Drafter, target: api.Target) -> dict[str, Any]:
  """Kind, description, parameters (its own tree; int8 weights and their scales counted as
  values) and bytes; for self-drafters also the target layers they run."""
  cfg = drafter.config
  leaves = jax.tree_util.tree_leaves(drafter.params, is_leaf=quant.is_quantized)
  out = {"kind": cfg.kind, "describe": drafter_kinds.describe(cfg),
         "params": params_lib.count_params(drafter_kinds.param_specs(cfg)),
         "int8_weights": sum(x.size for x in leaves if quant.is_quantized(x)),
         "param_bytes": quant.nbytes(drafter.params), "config": dataclasses.asdict(cfg)}
  if cfg.kind == drafter_kinds.SELF:
    prefix = self_drafter.prefix_config(target.config, cfg.num_layers)
    out["runs_target_layers"] = cfg.num_layers
    out["target_layer_params"] = params_lib.count_params(
        params_lib.param_specs(prefix)["layers"])
  return out


# ---- evaluation ---------------------------------------------------------------------------------

def _generate(target: api.Target, prompts: PromptSet, *, max_new_tokens: int,
              variant: Variant | None = None, k: int | str = 0) -> api.GenerateOutput:
  if variant is None:
    return api.generate(target, list(prompts), max_new_tokens=max_new_tokens)
  return api.generate(target, list(prompts), max_new_tokens=max_new_tokens,
                      drafter=variant.drafter, spec_config=variant.spec_config(k))


def _pass(target: api.Target, prompts: PromptSet, *, batch: int, max_new_tokens: int,
          repeats: int, variant: Variant | None = None, k: int | str = 0
          ) -> tuple[list[list[int]], dict[str, Any]]:
  """Every prompt, `batch` rows per call (programs compiled already); the best of `repeats`
  passes. Returns (new tokens per prompt, counters; `_figures` derives the rates)."""
  best, outs = math.inf, []
  for _ in range(repeats):
    t0 = time.perf_counter()
    outs = [_generate(target, prompts[i:i + batch], max_new_tokens=max_new_tokens,
                      variant=variant, k=k) for i in range(0, len(prompts), batch)]
    best = min(best, time.perf_counter() - t0)
  counts = {"seconds": best, "prompts": len(prompts),
            "new_tokens": sum(o.stats["new_tokens"] for o in outs)}
  if variant is not None:
    # A round of one fixed bucket drafts every position of it on every running row, so position
    # j's accepted count is its acceptance rate times the call's per-row target forwards.
    forwards = [o.stats["row_forwards"] for o in outs]
    counts["row_forwards"] = sum(forwards)
    counts["accepted_by_position"] = [
        sum(f * (o.stats["acceptance_by_position"][j] or 0.0) for f, o in zip(forwards, outs))
        for j in range(_depth(k))]
  return [row for o in outs for row in o.tokens], counts


def _add(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
  return {key: ([x + y for x, y in zip(a[key], b[key])] if isinstance(a[key], list)
                else a[key] + b[key]) for key in a}


def _figures(c: dict[str, Any]) -> dict[str, Any]:
  f = {"prompts": c["prompts"], "new_tokens": c["new_tokens"], "seconds": c["seconds"],
       "tokens_per_second": c["new_tokens"] / c["seconds"]}
  if "row_forwards" in c:
    rf = max(c["row_forwards"], 1e-9)
    f["tokens_per_forward"] = (c["new_tokens"] - c["prompts"]) / rf
    f["acceptance_by_position"] = [a / rf for a in c["accepted_by_position"]]
  return f


def _prefix_agreement(rows: list[list[int]], ref: list[list[int]]) -> float:
  """Mean share of each reference row that `rows` reproduce before the first difference."""
  shares = []
  for a, b in zip(rows, ref):
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    shares.append(n / max(len(b), 1))
  return float(np.mean(shares))


def evaluate(targets: Mapping[str, api.Target], variants: Sequence[Variant],
             workloads: Mapping[str, PromptSet], *, buckets: Sequence[int],
             batches: Sequence[int], small_batch_prompts: int, max_new_tokens: int,
             repeats: int = 1, threads: int | None = None,
             small_batch_all_k: bool = False) -> dict[str, Any]:
  """Greedy plain and speculative decoding of every variant on every workload.

  At the largest batch: plain decoding of every target and every variant at each of its Ks over
  all prompts (tokens per target forward, acceptance by position, speed). At each smaller batch:
  plain decoding and every variant at the K that was fastest at the largest batch (over all
  workloads), or with `small_batch_all_k` at every K (the fastest K differs with the batch), on
  the first `small_batch_prompts` prompts of each workload. Programs are compiled side by side
  before timing (those of the smaller batches after the K is known unless all are run).
  `fastest_k_by_batch` of each variant: its fastest K at each batch (code + prose).

  Returns {"plain": [...], "variants": [...], "times": {...}}: one entry per (target or variant,
  K, batch, workload) plus the workload "mixed" (all workloads together); speculative entries have
  `speedup` over plain decoding of their own target, `speedup_vs_float` on the int8 target,
  `outputs_equal` (every row equal to plain greedy output of the same target) and `rows_equal`
  (the share of such rows: in bf16, verifying K + 1 positions at once and decoding one at a time
  round differently, so a few rows may diverge; in float32 none do).
  """
  big, times = max(batches), {}
  small = sorted(b for b in batches if b != big)
  used = sorted({v.target for v in variants} | {FLOAT})
  first = next(iter(workloads.values()))
  kw = dict(max_new_tokens=max_new_tokens)

  def compile_all(jobs):
    t0 = time.perf_counter()
    bench.side_by_side(lambda j: _generate(targets[j[0]], first[:j[1]], variant=j[2], k=j[3],
                                           **kw), jobs, threads)
    return time.perf_counter() - t0

  jobs = [(t, b, None, 0) for t in used for b in batches]
  jobs += [(v.target, big, v, k) for v in variants for k in v.lengths(buckets)]
  if small_batch_all_k:
    jobs += [(v.target, b, v, k) for v in variants for k in v.lengths(buckets) for b in small]
  times["compile_s"] = compile_all(jobs)
  log.info("compiled %d programs side by side in %.1f s", len(jobs), times["compile_s"])

  plain: dict[tuple, tuple] = {}
  runs: dict[tuple, tuple] = {}
  t0 = time.perf_counter()
  for w, prompts in workloads.items():
    for t in used:
      plain[t, big, w] = _pass(targets[t], prompts, batch=big, repeats=repeats, **kw)
    for v in variants:
      for k in v.lengths(buckets):
        runs[v.name, k, big, w] = _pass(targets[v.target], prompts, batch=big, repeats=repeats,
                                        variant=v, k=k, **kw)
  times[f"batch{big}_s"] = time.perf_counter() - t0

  def mixed_seconds(v, k):
    return sum(runs[v.name, k, big, w][1]["seconds"] for w in workloads)

  fastest = {v.name: min(v.lengths(buckets), key=lambda k, v=v: mixed_seconds(v, k))
             for v in variants}
  small_ks = {v.name: (v.lengths(buckets) if small_batch_all_k else (fastest[v.name],))
              for v in variants}
  if small:
    if not small_batch_all_k:
      jobs = [(v.target, b, v, fastest[v.name]) for v in variants for b in small]
      times["compile_small_batches_s"] = compile_all(jobs)
    t0 = time.perf_counter()
    for b in small:
      for w, prompts in workloads.items():
        some = prompts[:small_batch_prompts]
        for t in used:
          plain[t, b, w] = _pass(targets[t], some, batch=b, repeats=repeats, **kw)
        for v in variants:
          for k in small_ks[v.name]:
            runs[v.name, k, b, w] = _pass(targets[v.target], some, batch=b, repeats=repeats,
                                          variant=v, k=k, **kw)
    times["small_batches_s"] = time.perf_counter() - t0

  def with_mixed(table):
    """{key[:-1] + (workload,): counters} plus key[:-1] + ('mixed',): their sum."""
    out = {}
    for key, (_, counts) in table.items():
      out[key] = counts
      mixed = key[:-1] + ("mixed",)
      out[mixed] = _add(out[mixed], counts) if mixed in out else dict(counts)
    return out

  plain_counts, run_counts = with_mixed(plain), with_mixed(runs)
  plain_entries = []
  for (t, b, w), c in sorted(plain_counts.items(), key=lambda kv: kv[0][:2]):
    e = {"target": t, "batch": b, "workload": w, **_figures(c)}
    if t != FLOAT:
      e["speedup_vs_float"] = e["tokens_per_second"] / _figures(
          plain_counts[FLOAT, b, w])["tokens_per_second"]
      if w != "mixed":
        e["greedy_agreement_with_float"] = _prefix_agreement(plain[t, b, w][0],
                                                             plain[FLOAT, b, w][0])
    plain_entries.append(e)
  variant_entries = []
  for v in variants:
    entries = []
    for (name, k, b, w), c in sorted(run_counts.items(), key=lambda kv: _order(kv[0])):
      if name != v.name:
        continue
      e = {"k": k, "batch": b, "workload": w, **_figures(c)}
      base = _figures(plain_counts[v.target, b, w])["tokens_per_second"]
      e["speedup"] = e["tokens_per_second"] / base
      if v.target != FLOAT:
        e["speedup_vs_float"] = e["tokens_per_second"] / _figures(
            plain_counts[FLOAT, b, w])["tokens_per_second"]
      ws = list(workloads) if w == "mixed" else [w]
      same = [a == r for x in ws
              for a, r in zip(runs[name, k, b, x][0], plain[v.target, b, x][0])]
      e["outputs_equal"], e["rows_equal"] = all(same), float(np.mean(same))
      entries.append(e)
    by_batch = {}
    for b in small:
      by_batch[b] = min(small_ks[v.name], key=lambda k, v=v, b=b: sum(
          runs[v.name, k, b, w][1]["seconds"] for w in workloads))
    by_batch[big] = fastest[v.name]
    variant_entries.append({"name": v.name, "target": v.target, "spec": dict(v.spec),
                            "draft_lengths": list(v.lengths(buckets)),
                            "fastest_k": fastest[v.name],
                            "fastest_k_by_batch": {str(b): k for b, k in by_batch.items()},
                            "runs": entries})
  return {"plain": plain_entries, "variants": variant_entries, "times": times}


# ---- the experiment -----------------------------------------------------------------------------

def run(cfg: VariantsConfig) -> dict[str, Any]:
  """Everything of the module docstring; writes the record (cfg.record, default
  <out_dir>/variants.json) and returns it."""
  out = pathlib.Path(cfg.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  times: dict[str, float] = {}
  t_start = t = time.perf_counter()
  target_path = pathlib.Path(cfg.target or demo.TARGET_DIR)
  tokenizer_path = pathlib.Path(cfg.tokenizer or demo.TOKENIZER_FILE)
  target = api.load_target(target_path, dtype=cfg.dtype)
  assistant = api.load_drafter(cfg.assistant or demo.DRAFTER_DIR, target)
  tok = tokenizer_lib.Tokenizer.load(tokenizer_path)
  times["load_s"] = time.perf_counter() - t

  t = time.perf_counter()
  corpus, corpus_dir = pipeline.build_split(
      out / "corpus", corpus_roots=cfg.corpus_roots, eval_fraction=cfg.eval_fraction,
      extra_train_roots=cfg.extra_train_roots, extra_train_max_bytes=cfg.extra_train_max_bytes)
  code = data.load_tokens(data.split_file(corpus_dir, "eval"), tok)
  prose = pipeline.prose_tokens(cfg.prose_roots, tok, max_bytes=cfg.prose_max_bytes)
  if prose.size <= cfg.prompt_len + 1:
    raise ValueError(f"{prose.size} tokens of prose under {cfg.prose_roots}: too few for prompts "
                     f"of {cfg.prompt_len} tokens")
  workloads = {name: pipeline.eval_prompts(tokens, num=cfg.prompts, prompt_len=cfg.prompt_len,
                                           seed=cfg.seed)
               for name, tokens in (("code", code), ("prose", prose))}
  times["data_s"] = time.perf_counter() - t

  distilled, drafters = {}, {}
  for name, recipe in (("parallel_heads", cfg.heads), ("self", cfg.self_drafter)):
    t = time.perf_counter()
    drafters[name], distilled[name] = distill(
        recipe, target_path=target_path, corpus_dir=corpus_dir, tokenizer_path=tokenizer_path,
        workdir=out / name, target=target)
    times[f"distill_{name}_s"] = time.perf_counter() - t
    log.info("distilled %s: %s", drafters[name].config.kind, distilled[name])

  t = time.perf_counter()
  qtarget = api.quantize_target(target, embeddings=cfg.int8_embeddings)
  int8_self = api.Drafter(*self_drafter.with_int8_layers(
      drafters["self"].config, drafters["self"].params, qtarget.params, target.config))
  logit_error = int8_logit_error(target, qtarget, code, sequences=cfg.logit_sequences,
                                 seq_len=cfg.logit_seq_len)
  log.info("int8 logit error on held-out code: %s", logit_error)
  times["int8_s"] = time.perf_counter() - t

  record = {
      "kind": "variants",
      "complete": False,
      "config": dataclasses.asdict(cfg),
      "corpus": corpus.stats,
      "eval_tokens": {"code": int(code.size), "prose": int(prose.size)},
      "target": {"path": str(target_path), "config": dataclasses.asdict(target.config),
                 "params": params_lib.count_params(params_lib.param_specs(target.config)),
                 "param_bytes": quant.nbytes(target.params)},
      "int8": {"embeddings": cfg.int8_embeddings, "param_bytes": quant.nbytes(qtarget.params),
               "logit_error": logit_error},
      "distilled": distilled,
      "times": times,
  }
  path = cfg.record or out / "variants.json"
  metrics.write_record(path, record)   # so far; replaced when the evaluation is done

  tree_assistant = None
  if cfg.trees:
    tree_assistant = api.load_drafter(cfg.assistant or demo.DRAFTER_DIR, target,
                                      convention="clean")
  variants = default_variants(assistant=assistant, heads=drafters["parallel_heads"],
                              self_draft=drafters["self"], int8_self=int8_self,
                              tree_assistant=tree_assistant, trees=cfg.trees)
  targets = {FLOAT: target, INT8: qtarget}
  t = time.perf_counter()
  evaluation = evaluate(targets, variants, workloads, buckets=cfg.buckets, batches=cfg.batches,
                        small_batch_prompts=cfg.small_batch_prompts,
                        max_new_tokens=cfg.max_new_tokens, repeats=cfg.repeats,
                        threads=cfg.compile_threads or None,
                        small_batch_all_k=cfg.small_batch_all_k)
  for entry, v in zip(evaluation["variants"], variants):
    entry["drafter"] = drafter_summary(v.drafter, targets[v.target])
  times["evaluate_s"] = time.perf_counter() - t
  times["total_s"] = time.perf_counter() - t_start

  record.update(complete=True, evaluation=evaluation, times=times)
  metrics.write_record(path, record)
  log.info("wrote %s (%.0f s in all)", path, times["total_s"])
  return record


def config_from_dict(c: Mapping[str, Any]) -> VariantsConfig:
  """A VariantsConfig from a ConfigDict's `to_dict()` (lists become tuples)."""
  def tuples(x):
    if isinstance(x, dict):
      return {k: tuples(v) for k, v in x.items()}
    return tuple(tuples(v) for v in x) if isinstance(x, list) else x
  return VariantsConfig(**tuples(dict(c)))
