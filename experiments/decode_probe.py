r"""Diagnostics behind the small-model and MoE decode misses of the benchmark (issue 6, run F).

  python experiments/decode_probe.py --out=$OUT/decode_probe.json --hlo_dir=$OUT

Three questions, each answered by timings in one JSON record:
  matmul   Is a one-row matmul ([1, D] x [D, F], XLA's matrix-vector case) slower than a two-row
           one? Chained matmuls of the E2B / E4B / 26B-A4B projection shapes in one compiled loop,
           with 1, 2 and 8 rows, and with one row padded to two inside the program.
  decode   E2B / E4B decode at batch 1 with one-row matmuls as XLA compiles them and padded to
           two rows (`quant.pad_one_row`), at batch 2, and 2 positions per forward.
  moe      26B-A4B decode at batch 1 and 8 with each way of running the routed experts
           (`--moe_paths`): the library's path, the gathered einsum on two rows per (token,
           expert) pair, a loop over pairs with dynamic slices (two rows), the grouped
           `ragged_dot`.
`--hlo_dir` also saves the optimized HLO of the E4B batch-1 decode program (one and two rows).
"""

import contextlib
import functools
import json
import pathlib
import threading
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from gemma_mtp import bench
from gemma_mtp import config as config_lib
from gemma_mtp import layers
from gemma_mtp import params as params_lib
from gemma_mtp import quant

_OUT = flags.DEFINE_string("out", "decode_probe.json", "JSON record")
_HLO_DIR = flags.DEFINE_string("hlo_dir", None, "where to save optimized HLO text")
_PARTS = flags.DEFINE_list("parts", ["matmul", "decode", "moe"], "what to run")
_DENSE = flags.DEFINE_list("dense_models", ["gemma4_e2b", "gemma4_e4b"], "decode part models")
_MOE_PATHS = flags.DEFINE_list("moe_paths", ["library", "gathered2", "loop2", "grouped"],
                                "moe part ('library': layers.moe as shipped)")
_MOE_MODEL = flags.DEFINE_string("moe_model", "gemma4_26b_a4b", "moe part model ('tiny_moe': CPU "
                                 "smoke test)")
_CONTEXT = flags.DEFINE_integer("context", 1024, "decode context")
_SHORT = flags.DEFINE_integer("short", 16, "short loop")
_LONG = flags.DEFINE_integer("long", 64, "long loop")

_LOCAL = threading.local()   # per-thread variant, read while tracing (compiles run on threads)


# ---- variants, switched per tracing thread ---------------------------------------------------------

_library_pad = quant.pad_one_row
_library_gathered = layers._expert_ffn_gathered  # pylint: disable=protected-access


def _pad_one_row():
  pad = getattr(_LOCAL, "pad_rows", None)
  return _library_pad() if pad is None else pad


def _rows2(x):
  """[M, D] -> [M, 2, D]: each token and a zero row (a two-row GEMM instead of a reduction)."""
  return jnp.stack([x, jnp.zeros_like(x)], axis=1)


def _experts_gathered2(x, weights, experts, p):
  """The gathered einsum with two rows per (token, expert) pair."""
  x_dim = p["down"].shape[1]
  gate_up = jnp.einsum("MRD,MkDF->MkRF", _rows2(x), jnp.take(p["gate_up"], experts, axis=0))
  h = layers.gelu(gate_up[..., :x_dim]) * gate_up[..., x_dim:]            # [M, k, 2, X]
  out = jnp.einsum("MkRX,MkXD->MkRD", h, jnp.take(p["down"], experts, axis=0))[:, :, 0]
  return jnp.einsum("MkD,Mk->MD", out.astype(jnp.float32), weights).astype(x.dtype)


def _experts_loop2(x, weights, experts, p):
  """One (token, expert) pair at a time: dynamic slices of the stacked weights, two rows."""
  m, k = experts.shape
  x_dim = p["down"].shape[1]
  flat_e, flat_w = experts.reshape(-1), weights.reshape(-1)

  def pair(j, acc):
    t = j // k
    w1 = jax.lax.dynamic_index_in_dim(p["gate_up"], flat_e[j], keepdims=False)  # [D, 2X]
    w2 = jax.lax.dynamic_index_in_dim(p["down"], flat_e[j], keepdims=False)     # [X, D]
    xt = jax.lax.dynamic_index_in_dim(x, t, keepdims=True)                      # [1, D]
    gu = jnp.concatenate([xt, jnp.zeros_like(xt)]) @ w1
    h = layers.gelu(gu[:, :x_dim]) * gu[:, x_dim:]
    y = (h @ w2)[:1].astype(jnp.float32) * flat_w[j]
    return jax.lax.dynamic_update_index_in_dim(
        acc, jax.lax.dynamic_index_in_dim(acc, t, keepdims=True) + y, t, 0)

  out = jax.lax.fori_loop(0, m * k, pair, jnp.zeros(x.shape, jnp.float32))
  return out.astype(x.dtype)


def _experts(x, weights, experts, p):
  path = getattr(_LOCAL, "moe", "library")
  if path == "gathered2":
    return _experts_gathered2(x, weights, experts, p)
  if path == "loop2":
    return _experts_loop2(x, weights, experts, p)
  if path == "grouped":
    return layers._expert_ffn_grouped(x, weights, experts, p)  # pylint: disable=protected-access
  return _library_gathered(x, weights, experts, p)


quant.pad_one_row = _pad_one_row
layers._expert_ffn_gathered = _experts  # pylint: disable=protected-access


@contextlib.contextmanager
def variant(**kw):
  old = {k: getattr(_LOCAL, k, None) for k in kw}
  for k, v in kw.items():
    setattr(_LOCAL, k, v)
  try:
    yield
  finally:
    for k, v in old.items():
      setattr(_LOCAL, k, v)


# ---- parts ---------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("pad",))
def _matmul_chain(x, w1, w2, n, *, pad: bool):
  def body(_, x):
    xin = jnp.concatenate([x, jnp.zeros_like(x)], axis=0) if pad else x
    y = jnp.einsum("MD,DF->MF", xin, w1)
    z = jnp.einsum("MF,FD->MD", y, w2)
    z = z[:x.shape[0]] if pad else z
    return layers.rms_norm(z, eps=1e-6)
  return jax.lax.fori_loop(0, n, body, x)


def matmul_part() -> list[dict]:
  shapes = {"e2b_mlp": (1536, 6144), "e4b_mlp": (2560, 10240), "e4b_q": (2560, 2048),
            "a4b_expert": (2816, 1408), "31b_mlp": (5376, 21504)}
  rows = []
  if jax.default_backend() == "cpu":   # smoke test
    shapes = {"small": (64, 256)}
  for name, (d, f) in shapes.items():
    key = jax.random.PRNGKey(0)
    w1 = jax.random.normal(key, (d, f), jnp.bfloat16) * d ** -0.5
    w2 = jax.random.normal(key, (f, d), jnp.bfloat16) * f ** -0.5
    for m, pad in ((1, False), (1, True), (2, False), (8, False)):
      x = jnp.ones((m, d), jnp.bfloat16)
      run = lambda n: jax.block_until_ready(_matmul_chain(x, w1, w2, jnp.int32(n), pad=pad))
      t = bench.slope_seconds(run, short=20, long=200, repeats=3)["per_step_s"] / 2
      rows.append({"shape": name, "D": d, "F": f, "rows": m, "padded_to_2": pad,
                   "us_per_matmul": t * 1e6, "gb_per_s": 2 * d * f / t / 1e9})
      print(json.dumps(rows[-1]), flush=True)
    del w1, w2
  return rows


def _decode_cases(cfg, params, named_variants, cases):
  """Compiles every (variant, case) side by side, then times them one by one."""
  cfgs = {v: bench.variant_config(cfg, v) for v in named_variants}

  def build(item):
    (vname, kw), case = item
    with variant(**kw):
      return bench.lower_decode(params, cfgs[vname], case, _LONG.value)

  items = [(v, c) for v in named_variants.items() for c in cases]
  t0 = time.perf_counter()
  compiled = bench.side_by_side(build, items, threads=6)
  compile_s = time.perf_counter() - t0
  out = []
  for ((vname, _), case), prog in zip(items, compiled):
    t = bench.time_decode(prog, params, cfgs[vname], case, short=_SHORT.value, long=_LONG.value,
                          repeats=3)
    e = bench.summarize_decode(cfg, case, t, 1.0)
    e.pop("bandwidth_fraction")
    e["variant"] = vname
    out.append(e)
    print(vname, case.name, f"{e['ms_per_step']:.3f} ms", flush=True)
  return out, compiled, items, compile_s


def decode_part() -> dict:
  res = {}
  for name in _DENSE.value:
    cfg = config_lib.PRESETS[name]()
    params = bench.random_params(params_lib.param_specs(cfg), cfg, jax.random.PRNGKey(0))
    cases = [bench.DecodeCase(1, _CONTEXT.value), bench.DecodeCase(2, _CONTEXT.value),
             bench.DecodeCase(1, _CONTEXT.value, chunk=2)]
    entries, compiled, items, compile_s = _decode_cases(
        cfg, params, {"one_row": {"pad_rows": False}, "pad_rows": {"pad_rows": True}}, cases)
    res[name] = {"entries": entries, "compile_s": compile_s}
    if _HLO_DIR.value and name == "gemma4_e4b":
      for ((vname, _), case), prog in zip(items, compiled):
        if case.batch == 1 and case.chunk == 1:
          path = pathlib.Path(_HLO_DIR.value) / f"e4b_b1_{vname}.hlo.txt"
          path.write_text(prog.as_text())
    del params, compiled
  return res


def moe_part() -> dict:
  if _MOE_MODEL.value == "tiny_moe":
    cfg = config_lib.tiny(num_experts=8, num_experts_per_token=2, expert_dim=32)
  else:
    cfg = config_lib.PRESETS[_MOE_MODEL.value]()
  params = bench.random_params(params_lib.param_specs(cfg), cfg, jax.random.PRNGKey(0))
  cases = [bench.DecodeCase(1, _CONTEXT.value), bench.DecodeCase(8, _CONTEXT.value)]
  named = {p: {"moe": p} for p in _MOE_PATHS.value}
  named.update({p + "_onerow": {"moe": p, "pad_rows": False} for p in ("library",)
                if p in _MOE_PATHS.value})
  entries, _, _, compile_s = _decode_cases(cfg, params, named, cases)
  for e in entries:
    e["routed_gb_per_s"] = (e["bytes_per_step"] / e["ms_per_step"] / 1e6)
  return {"entries": entries, "compile_s": compile_s}


def main(argv):
  del argv
  bench.run_probe(_OUT.value, {"matmul": matmul_part, "decode": decode_part, "moe": moe_part}, _PARTS.value,
                  context=_CONTEXT.value)


if __name__ == "__main__":
  app.run(main)
