"""Building blocks of the GPU benchmarks: random weights, decode-step timing, bytes per step.

A decode step is timed inside one compiled `lax.fori_loop` whose trip count is an argument, so one
compilation serves a short and a long run, and the per-step time is the slope between them
(dispatch, synchronisation and the loop's entry cancel). The cache is synthetic: its buffers are
allocated at the context length under test and `length` is set so the timed steps attend to
`context` positions, which costs what a real cache of that length costs (attention reads every
slot) without a prefill.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import importlib.util
import math
import os
import pathlib
import re
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from gemma_mtp import drafter as drafter_lib
from gemma_mtp import kv_cache as kvc
from gemma_mtp import metrics
from gemma_mtp import model as model_lib
from gemma_mtp import params as params_lib
from gemma_mtp.config import ModelConfig


def random_params(specs, cfg, key: jax.Array, shardings=None):
  """Random weights of `specs`, one tensor at a time and directly in the parameter dtype.

  Unlike `params.init_from_specs` no float32 copy of the whole model is ever live, so a 31B
  model fits next to its bf16 weights. Values are normal(0, 1/sqrt(fan_in)) and norms are ones.
  `shardings`: a matching tree of shardings (None: the default device).
  """
  leaves, treedef = jax.tree_util.tree_flatten(specs, is_leaf=params_lib.is_spec)
  shard_leaves = (jax.tree_util.tree_leaves(shardings) if shardings is not None
                  else [None] * len(leaves))
  keys = jax.random.split(key, len(leaves))
  out = []
  for spec, k, sharding in zip(leaves, keys, shard_leaves):
    out.append(_random_leaf(k, spec.shape, str(params_lib.spec_dtype(spec, cfg)), spec.init,
                            math.prod(spec.shape[a] for a in spec.fan_in_axes), sharding))
  return jax.tree_util.tree_unflatten(treedef, out)


def _random_leaf(key, shape, dtype, init, fan_in, sharding):
  return _leaf_fn(shape, dtype, init, fan_in, sharding)(key)


@functools.lru_cache(maxsize=None)
def _leaf_fn(shape, dtype, init, fan_in, sharding):
  def make(key):
    if init == "ones":
      return jnp.ones(shape, dtype)
    if init == "zeros":
      return jnp.zeros(shape, dtype)
    return (jax.random.normal(key, shape, dtype) * (fan_in ** -0.5)).astype(dtype)
  return jax.jit(make, out_shardings=sharding)


# ---- bytes a step must read -----------------------------------------------------------------------

def _nbytes(tree) -> int:
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree_util.tree_leaves(tree))


def expected_experts_read(cfg: ModelConfig, tokens: int) -> float:
  """Expert weight matrices one MoE layer must read for `tokens` routed tokens: the expected
  number of distinct experts routed to under uniform routing (which random weights give); k at
  one token. The gathered path (`layers.gathers_experts`) reads an expert again for each pair
  routed to it, so at several tokens it moves more bytes than this floor.
  """
  e, k = cfg.num_experts, cfg.num_experts_per_token
  return e * (1.0 - (1.0 - k / e) ** tokens)


def weight_bytes_per_step(cfg: ModelConfig, batch: int, tokens_per_row: int = 1, *,
                          params=None) -> dict[str, float]:
  """Weight bytes one forward of `batch` x `tokens_per_row` positions must read.

  Every matrix is read once, the tied embedding once (by the output head; the input lookup reads
  B rows), the per-layer embedding table only at the B looked-up rows, and MoE experts only for
  the experts routed to (see `expected_experts_read`). `params`: the actual tree (e.g. int8 with
  its scales) instead of `cfg`'s float parameters.
  Returns {'total', 'dense', 'experts_routed', 'experts_all'} in bytes.
  """
  abstract = params_lib.abstract_params(cfg) if params is None else params
  total = float(_nbytes(abstract))
  experts_all = 0.0
  experts_routed = 0.0
  if "ple" in abstract:
    table = abstract["ple"]["embed"]
    row = _nbytes(table) / table.shape[0]
    total -= _nbytes(table) - batch * tokens_per_row * row
  for layer in abstract["layers"]:
    if "moe" in layer:
      ex = _nbytes({k: layer["moe"][k] for k in ("gate_up", "down")})
      experts_all += ex
      experts_routed += ex * expected_experts_read(cfg, batch * tokens_per_row) / cfg.num_experts
  total += experts_routed - experts_all
  return {"total": total, "dense": total - experts_routed, "experts_routed": experts_routed,
          "experts_all": experts_all}


def kv_bytes(cfg: ModelConfig, batch: int, context: int) -> float:
  """K/V bytes of `context` positions that attention must read (sliding layers: the window)."""
  total = 0
  itemsize = jnp.dtype(cfg.dtype).itemsize
  for layer in range(cfg.num_layers):
    if cfg.is_kv_shared(layer):
      continue
    span = context if cfg.is_full(layer) else min(context, cfg.sliding_window)
    total += 2 * batch * span * cfg.layer_kv_heads(layer) * cfg.layer_head_dim(layer) * itemsize
  return float(total)


# ---- timed loops ----------------------------------------------------------------------------------

def synthetic_cache(cfg: ModelConfig, batch: int, max_len: int, chunk: int = 1):
  """A zero cache of `max_len` slots (attention reads every slot whatever `length` says)."""
  return kvc.init_cache(cfg, batch, max_len, max_chunk=chunk)


def forward_ids(tokens: jax.Array, chunk: int, vocab: int) -> jax.Array:
  """The (B, chunk) token ids of one timed forward: `tokens` (B,) made distinct across rows and
  positions (row r, position j: tokens[r] + r * chunk + j, mod `vocab`).

  A MoE layer routes equal ids alike: B rows of one token read k experts a layer where real
  decoding of B sequences reads ~`expected_experts_read(cfg, B)` distinct ones, the bytes the
  record counts. Records made before session 28 fed one token to every row and position: their
  decode entries lack `distinct_ids`, and their 26B-A4B figures above one position a step
  overstate the bandwidth (batch 8 read 8 experts a layer, not the ~52 counted).
  """
  b = tokens.shape[0]
  offsets = jnp.arange(b * chunk, dtype=jnp.int32).reshape(b, chunk)
  return (tokens[:, None] + offsets) % vocab


@functools.partial(jax.jit, static_argnames=("config", "chunk"), donate_argnums=(1,))
def decode_loop(params, cache, tokens, length, steps, *, config: ModelConfig, chunk: int = 1):
  """`steps` target forwards of `chunk` positions per row starting at cache index `length`.

  Each forward commits one position (plain decoding: chunk = 1; a verification of K drafts that
  all get rejected: chunk = K + 1) and feeds back its greedy token, spread by `forward_ids` to
  distinct ids in every row and position. Returns (cache, tokens).
  """
  b = tokens.shape[0]
  cache = cache.replace(length=jnp.full((b,), length, jnp.int32))

  def body(_, carry):
    cache, tok = carry
    res = model_lib.forward(params, forward_ids(tok, chunk, config.vocab_size), config=config,
                            cache=cache)
    nxt = jnp.argmax(res.logits[:, -1], axis=-1).astype(jnp.int32)
    return res.cache.replace(length=cache.length + 1), nxt

  return jax.lax.fori_loop(0, steps, body, (cache, tokens))


@functools.partial(jax.jit, static_argnames=("tcfg", "dcfg"))
def drafter_loop(dparams, tparams, cache, tokens, hidden, steps, *, tcfg: ModelConfig,
                 dcfg: drafter_lib.DrafterConfig):
  """`steps` drafter steps (greedy) on the target cache's taps, through the step the speculative
  loop runs (`drafter.round_step`: the Pallas kernels where they take the drafter). Returns
  (tokens, hidden)."""
  taps = {kind: model_lib.Tap(k=cache.k[layer], v=cache.v[layer],
                              idx=cache.slot_indices(tcfg.is_full(layer)))
          for kind, layer in tcfg.tap_layers.items()}
  b = tokens.shape[0]
  last = jnp.full((b,), cache.max_len - 1, jnp.int32)
  masks, query = drafter_lib.tap_masks(
      taps, convention=dcfg.convention, window=tcfg.sliding_window, start=cache.start,
      last_idx=last, call_start=last - 4, call_end=last)

  step = drafter_lib.round_step(dparams, dcfg, tparams, tcfg, taps, masks, query, greedy=True)
  return jax.lax.fori_loop(0, steps, lambda _, carry: step(*carry), (tokens, hidden))


def draft_cost(tparams, tcfg: ModelConfig, dparams, dcfg: drafter_lib.DrafterConfig, *,
               batch: int = 1, context: int = 512, short: int = 4, long: int = 20,
               drafter_long: int = 100, repeats: int = 5) -> dict:
  """Measured cost of one drafter step relative to one target decode step on this device.

  This is the `draft_cost` c of the adaptive bucket rule (`speculative.SpecConfig`): its best
  draft length depends on it, and on small models c is far from the ratio of their sizes (both
  are bound by per-step overhead). The drafter's slope runs `drafter_long` steps, as its steps
  are several times shorter than the target's: over 16 steps (~1 ms on the GPU pair) one
  process of run CK measured 0.43 where the others measured 0.12-0.15. Returns
  {'target_step_s', 'drafter_step_s', 'ratio'}.
  """
  context = min(context, tcfg.max_seq_len - long - 1)
  max_len = context + long + 1
  holder = {"cache": jax.jit(lambda: synthetic_cache(tcfg, batch, max_len))()}
  tok = jnp.ones((batch,), jnp.int32)

  def target_run(n):
    cache, _ = decode_loop(tparams, holder["cache"], tok, jnp.int32(context), jnp.int32(n),
                           config=tcfg)
    holder["cache"] = jax.block_until_ready(cache)

  target = slope_seconds(target_run, short=short, long=long, repeats=repeats)["per_step_s"]
  hid = jnp.ones((batch, tcfg.embed_dim), tcfg.dtype)
  cache = holder["cache"]
  drafter = slope_seconds(
      lambda n: jax.block_until_ready(drafter_loop(dparams, tparams, cache, tok, hid,
                                                   jnp.int32(n), tcfg=tcfg, dcfg=dcfg)),
      short=short, long=max(drafter_long, long), repeats=repeats)["per_step_s"]
  return {"target_step_s": target, "drafter_step_s": drafter,
          "ratio": max(drafter, 0.0) / max(target, 1e-9)}


def verify_costs(tparams, tcfg: ModelConfig, draft_lengths, *, batch: int = 1,
                 context: int = 512, short: int = 4, long: int = 20, repeats: int = 3) -> dict:
  """Measured cost of verifying K drafts (one target forward of K + 1 positions) relative to one
  decode step on this device, for each K of `draft_lengths`.

  This is `speculative.SpecConfig.verify_costs` (the benchmark's verify part measures the same
  `decode_loop` programs at larger sizes). Returns {'decode_step_s', 'verify_step_s': {K: s},
  'measured': {K: ratio}, 'ratio': {K: cost}}: 'ratio' is 'measured' made at least 1 and
  non-decreasing in K (verifying more positions never costs less; a lower figure is timing
  noise, and the rule would take it for a bargain).
  """
  ks = sorted(set(int(k) for k in draft_lengths))
  context = max(min(context, tcfg.max_seq_len - long - max(ks) - 2), long)
  seconds = {}
  for chunk in [1] + [k + 1 for k in ks]:
    case = DecodeCase(batch, context, chunk)
    seconds[chunk] = time_decode(lower_decode(tparams, tcfg, case, long), tparams, tcfg, case,
                                 short=short, long=long, repeats=repeats)["per_step_s"]
  base = max(seconds[1], 1e-9)
  measured = {k: seconds[k + 1] / base for k in ks}
  ratio, floor = {}, 1.0
  for k in ks:
    floor = ratio[k] = max(floor, measured[k])
  return {"decode_step_s": seconds[1], "verify_step_s": {k: seconds[k + 1] for k in ks},
          "measured": measured, "ratio": ratio}


def kernel_profile(run: Callable[[], Any], steps: int, trace_dir: str, *, top: int = 30,
                   sequence: bool = False) -> dict:
  """What the device does in `steps` steps of `run()` (which must block): one profiler trace
  (written under `trace_dir`) summarized per step by `summarize_kernels`, plus 'lines' (every
  device line's event count). Kernels are the events of the device lines named 'Stream ...'
  (CUPTI), else of the device's busiest line; {} where no device plane exists (the CPU).
  """
  run()
  with jax.profiler.trace(trace_dir):
    run()
  files = sorted(pathlib.Path(trace_dir).rglob("*.xplane.pb"), key=lambda f: f.stat().st_mtime)
  if not files:
    return {}
  data = jax.profiler.ProfileData.from_file(str(files[-1]))
  planes = [p for p in data.planes if p.name.startswith("/device:")]
  if not planes:
    return {}
  lines = list(planes[0].lines)
  counts = {line.name: sum(1 for _ in line.events) for line in lines}
  streams = [line for line in lines if line.name.startswith("Stream")] or [
      max(lines, key=lambda line: counts[line.name])]
  events = [(e.start_ns, e.duration_ns, e.name, dict(e.stats).get("hlo_op", ""))
            for line in streams for e in line.events]
  return {**summarize_kernels(events, steps, top=top, sequence=sequence), "lines": counts}


def summarize_kernels(events, steps: int, *, top: int = 30, sequence: bool = False) -> dict:
  """Per-step figures of kernel events (start_ns, duration_ns, name, hlo_op) covering `steps`.

  Returns {'kernels_per_step', 'busy_us_per_step' (union of kernel intervals), 'span_us_per_step'
  (first start to last end), 'gap_us_per_step' (span - busy), 'by_kind' (calls and microseconds
  per step by kernel kind: the name without its numeric suffixes, e.g. 'gemm_fusion_dot' or
  'loop_pad_fusion'), 'top' (the `top` kernel names by time, with their HLO op), 'gaps' (where
  the device waits: idle time per step by the pair of kernels around it, 'before -> after', the
  `top` largest)}; {} without events. With `sequence`, also 'step_sequence': [name,
  microseconds] of one step's kernels in order (the middle step, cut by count: kernels / steps
  from the start of that step).
  """
  events = sorted(events)
  if not events:
    return {}
  busy, end = 0.0, -math.inf
  gaps: dict[str, list] = {}
  last = None
  for start, dur, name, _ in events:   # union of intervals (streams may overlap)
    if last is not None and start > end:
      entry = gaps.setdefault(f"{last[:80]} -> {name[:80]}", [0, 0.0])
      entry[0] += 1
      entry[1] += start - end
    busy += max(0.0, start + dur - max(start, end))
    if start + dur >= end:
      end, last = start + dur, name
  span = end - events[0][0]

  def per_step(groups):
    return {k: {"calls_per_step": c / steps, "us_per_step": d / steps / 1e3}
            for k, (c, d) in sorted(groups.items(), key=lambda kv: -kv[1][1])}

  by_name: dict[str, list] = {}
  by_kind: dict[str, list] = {}
  ops = {}
  for _, dur, name, op in events:
    for groups, key in ((by_name, name[:160]), (by_kind, re.sub(r"_\d+", "", name[:160]))):
      entry = groups.setdefault(key, [0, 0.0])
      entry[0] += 1
      entry[1] += dur
    ops.setdefault(name[:160], op)
  top_names = list(per_step(by_name).items())[:top]
  return {
      "steps": steps, "kernels_per_step": len(events) / steps,
      "busy_us_per_step": busy / steps / 1e3, "span_us_per_step": span / steps / 1e3,
      "gap_us_per_step": (span - busy) / steps / 1e3,
      "by_kind": per_step(by_kind),
      "top": [{"name": n, "hlo_op": ops[n], **v} for n, v in top_names],
      "gaps": [{"between": k, **v} for k, v in list(per_step(gaps).items())[:top]],
  } | ({"step_sequence": _step_sequence(events, steps)} if sequence else {})


def _step_sequence(events, steps: int) -> list:
  per = round(len(events) / steps)
  first = per * (steps // 2)
  return [[name[:160], dur / 1e3] for _, dur, name, _ in events[first:first + per]]


def slope_seconds(run: Callable[[int], Any], *, short: int, long: int, repeats: int) -> dict:
  """Per-step seconds as (best time of `long` steps - best of `short`) / (long - short).

  `run(n)` must block until its result is ready. The first call (compilation, if any) is not
  timed. Where noise makes that slope <= 0 (steps far shorter than the timing's jitter, e.g. on a
  loaded CPU), `per_step_s` is the long run's time per step instead, which includes the fixed
  cost of a call, and the record says so (`fallback`, `slope_s`).
  """
  run(short)
  best = {}
  for n in (short, long):
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      run(n)
      times.append(time.perf_counter() - t0)
    best[n] = min(times)
  per_step = (best[long] - best[short]) / (long - short)
  res = {"per_step_s": per_step, "short_steps": short, "long_steps": long,
         "short_s": best[short], "long_s": best[long]}
  if per_step <= 0:   # noise larger than the steps (a loaded machine): fall back to an upper bound
    res.update(per_step_s=best[long] / long, slope_s=per_step, fallback="long_s / long_steps")
  return res


def copy_bandwidth(num_bytes: int = 4 << 30, repeats: int = 10, inner: int = 8) -> dict:
  """Bytes moved per second by an elementwise copy (read + write) of a `num_bytes` buffer.

  Several forms (bf16 / f32 / u32 elements; one copy per call, or `inner` copies chained in one
  compiled loop so dispatch is amortized); `gb_per_s` is the best of them, the ceiling that
  `bandwidth_fraction` refers to. All forms are in `variants`.
  """
  variants = {}
  for dtype in ("bfloat16", "float32", "uint32"):
    n = num_bytes // jnp.dtype(dtype).itemsize
    x = jnp.zeros((n,), dtype)
    one = jax.jit(lambda a: a + jnp.asarray(1, a.dtype))
    # The barrier keeps XLA from fusing the chained copies into one pass.
    step = lambda _, b: jax.lax.optimization_barrier(b + jnp.asarray(1, b.dtype))
    loop = jax.jit(lambda a: jax.lax.fori_loop(0, inner, step, a), donate_argnums=0)
    for name, fn, copies in (("single", one, 1), ("loop", loop, inner)):
      x = jax.block_until_ready(fn(x))
      best = float("inf")
      for _ in range(repeats):
        t0 = time.perf_counter()
        y = jax.block_until_ready(fn(x))
        best = min(best, time.perf_counter() - t0)
        if name == "loop":
          x = y
      variants[f"{dtype}_{name}"] = 2 * num_bytes * copies / best / 1e9
    del x
  best_name = max(variants, key=variants.get)
  return {"bytes": num_bytes, "gb_per_s": variants[best_name], "best": best_name,
          "variants_gb_per_s": variants}


def config_from_file(path) -> Any:
  """`get_config()` of a config file (configs/*.py: an ml_collections ConfigDict)."""
  path = pathlib.Path(path)
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def run_probe(out: str, parts: dict[str, Callable[[], Any]], selected, **fields) -> dict:
  """A diagnostic probe's JSON record at `out`: the machine, `fields`, the copy bandwidth, then
  each `selected` part in turn (a part that raises records its error and the others still run),
  written after every part so a killed run keeps what it measured."""
  record = {"environment": metrics.environment(), **fields}
  record["copy"] = copy_bandwidth(
      num_bytes=(4 << 30) if jax.default_backend() == "gpu" else (16 << 20))
  print("copy", record["copy"]["gb_per_s"], flush=True)
  for part in selected:
    t0 = time.perf_counter()
    try:
      record[part] = parts[part]()
    except Exception as e:  # pylint: disable=broad-except  (keep the other parts' figures)
      record[part] = {"failed": repr(e)[:2000]}
    record.setdefault("seconds", {})[part] = time.perf_counter() - t0
    metrics.write_record(out, record)
  return record


def side_by_side(fn, items, threads: int | None = None) -> list[Any]:
  """[fn(x) for x in items] on `threads` threads (default: a quarter of the CPUs, at most 8).

  XLA compiles outside the GIL, so the first (compiling) calls of independent programs overlap.
  Not for timing what the calls run.
  """
  threads = threads or max(1, min(8, (os.cpu_count() or 1) // 4))
  with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
    return list(pool.map(fn, items))


def compile_all(jobs: dict[str, Callable[[], Any]], threads: int) -> tuple[dict, dict]:
  """Runs `jobs` (each lowers and compiles one program) side by side on `threads` threads.

  Returns ({name: result}, {name: seconds}).
  """
  def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0

  done = side_by_side(timed, list(jobs.values()), threads)
  return ({n: out for n, (out, _) in zip(jobs, done)},
          {n: sec for n, (_, sec) in zip(jobs, done)})


@dataclasses.dataclass(frozen=True)
class DecodeCase:
  """One decode (or verify) measurement: rows, context, positions per forward."""

  batch: int
  context: int
  chunk: int = 1

  @property
  def name(self) -> str:
    return f"b{self.batch}_ctx{self.context}_t{self.chunk}"


def variant_config(cfg: ModelConfig, name: str) -> ModelConfig:
  """A copy of `cfg` of a class of its own: jit caches programs by the static config, so a probe
  whose variants differ only in what is read while tracing (a module switch) needs distinct
  configs, or every variant reuses the first one's program."""
  cls = type(f"{type(cfg).__name__}_{name}", (type(cfg),), {})
  return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})


def lower_decode(params, cfg: ModelConfig, case: DecodeCase, steps_max: int):
  """Lowers and compiles `decode_loop` for `case` from abstract shapes (no allocation)."""
  max_len = case.context + steps_max + case.chunk
  cache = jax.eval_shape(lambda: synthetic_cache(cfg, case.batch, max_len, case.chunk))
  tok = jax.ShapeDtypeStruct((case.batch,), jnp.int32)
  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  return decode_loop.lower(params, cache, tok, scalar, scalar, config=cfg,
                           chunk=case.chunk).compile()


def memory_needed(compiled) -> int | None:
  """Bytes a compiled program allocates beyond its (donated) arguments, if XLA reports it."""
  try:
    m = compiled.memory_analysis()
    return int(m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)
  except Exception:  # pylint: disable=broad-except  (not every backend reports it)
    return None


def time_decode(compiled, params, cfg: ModelConfig, case: DecodeCase, *, short: int, long: int,
                repeats: int) -> dict:
  """Per-step time of a compiled `decode_loop`; the steps cover context - long .. context."""
  max_len = case.context + long + case.chunk
  holder = {"cache": jax.jit(lambda: synthetic_cache(cfg, case.batch, max_len, case.chunk))()}
  tok = jnp.ones((case.batch,), jnp.int32)

  def run(n):
    cache, _ = compiled(params, holder["cache"], tok, jnp.int32(case.context - n),
                        jnp.int32(n))
    holder["cache"] = jax.block_until_ready(cache)

  res = slope_seconds(run, short=short, long=long, repeats=repeats)
  del holder["cache"]
  return res


def summarize_decode(cfg: ModelConfig, case: DecodeCase, timing: dict, copy_gb_per_s: float, *,
                     params=None) -> dict:
  """Figures of one decode measurement: latency, tokens/s, bytes, bandwidth and its fraction."""
  per_step = timing["per_step_s"]
  w = weight_bytes_per_step(cfg, case.batch, case.chunk, params=params)
  kv = kv_bytes(cfg, case.batch, case.context)
  read = w["total"] + kv
  gbs = read / per_step / 1e9
  entry = {
      "batch": case.batch, "context": case.context, "positions_per_forward": case.chunk,
      "ms_per_step": per_step * 1e3,
      "tokens_per_second": case.batch / per_step if case.chunk == 1 else None,
      "weight_bytes": w["total"], "kv_bytes": kv, "bytes_per_step": read,
      "achieved_gb_per_s": gbs, "bandwidth_fraction": gbs / copy_gb_per_s,
      "timing": timing, "distinct_ids": True,   # forward_ids: rows and positions route apart
  }
  if w["experts_all"]:
    entry["expert_bytes_routed"] = w["experts_routed"]
    entry["expert_bytes_all"] = w["experts_all"]
  return entry


def leviathan_table(verify_cost: dict[int, float], draft_cost: float,
                    acceptances=(0.6, 0.7, 0.8, 0.9)) -> list[dict]:
  """Predicted speedups: E[tokens] / (K c_draft + c_verify(K)) per acceptance a and draft length K.

  verify_cost[K]: one forward of K + 1 positions relative to one decode step; draft_cost: one
  drafter step relative to one decode step. E[tokens] = (1 - a^(K+1)) / (1 - a).
  """
  rows = []
  for a in acceptances:
    for k, cv in sorted(verify_cost.items()):
      tokens = (1 - a ** (k + 1)) / (1 - a)
      rows.append({"acceptance": a, "draft_length": k, "expected_tokens": tokens,
                   "cost": k * draft_cost + cv, "speedup": tokens / (k * draft_cost + cv)})
  return rows
