r"""Do the few-row Pallas matmul kernels (gemma_mtp/matvec.py) beat XLA where decoding needs it?

  python experiments/kernel_probe.py --parts=matmul --out=$OUT/kernel_probe.json
  python experiments/kernel_probe.py --parts=decode --models=gemma4_26b_a4b,gemma4_31b

Parts, each into one JSON record:
  matmul  Chains of [M, K] x [K, N] (and back) matmuls of the models' weight shapes, each weight
          repeated in enough copies that the chain streams >= 256 MB (no L2 reuse), for
          M = 1, 5, 8: XLA (as `quant.einsum` compiles it without kernels), the kernel at its
          default tiling, and for M = 1 a sweep of tilings; int8 weights; routed experts
          (26B-A4B: 8 and 64 (token, expert) pairs of 128 experts). Each kernel result is
          checked against XLA's (relative error).
  decode  The decode loop of each model (random bf16 weights; --int8_models also int8) with the
          kernels off and on, at batch 1 and one verification of 5 positions; MoE models also
          at batch 8, and with the gathered expert path at every batch up to one pair per
          expert ('on_gather').
"""

import json
import os
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from gemma_mtp import bench
from gemma_mtp import config as config_lib
from gemma_mtp import layers
from gemma_mtp import matvec
from gemma_mtp import params as params_lib
from gemma_mtp import quant

_OUT = flags.DEFINE_string("out", "kernel_probe.json", "JSON record")
_PARTS = flags.DEFINE_list("parts", ["matmul", "decode"], "what to run")
_MODELS = flags.DEFINE_list("models", ["gemma4_e2b", "gemma4_e4b"], "decode part models")
_SWEEP = flags.DEFINE_bool("sweep", True, "matmul part: sweep tilings at M = 1")
_INT8 = flags.DEFINE_list("int8_models", [], "decode part: models also measured with int8 "
                          "weights (quant.quantize_params)")
_EXPERTS_ONLY = flags.DEFINE_bool("experts_only", False, "matmul part: only the routed experts")
_CONTEXT = flags.DEFINE_integer("context", 1024, "decode context")
_SHORT = flags.DEFINE_integer("short", 16, "short loop")
_LONG = flags.DEFINE_integer("long", 64, "long loop")

SHAPES = {   # name: (K, N) of the first matmul; the chain goes back with [N, K]
    "e2b_mlp": (1536, 6144), "e4b_q": (2560, 2048), "e4b_mlp": (2560, 10240),
    "31b_q": (5376, 8192), "31b_mlp": (5376, 21504),
}
EXPERTS = (128, 2816, 704)   # 26B-A4B: experts, D, expert hidden
CHAIN_BYTES = 256 << 20
_LIBRARY_GATHERS = layers.gathers_experts


def _with_kernels(mode: str):
  os.environ[matvec.ENV] = mode


def _chain_fn(kind: str, cfg):
  """A jitted loop of `n` passes over a chain of weights (x -> x w1_c -> ... -> x w2_c)."""
  def mm(x, w):
    if kind == "xla":
      _with_kernels("off")   # read when tracing
      return quant.einsum("MK,KN->MN", x, w)
    scale = w.scale.reshape(-1) if quant.is_quantized(w) else None
    values = w.q if quant.is_quantized(w) else w
    return matvec.matmul(x, values, scale, cfg=cfg(values.shape)).astype(x.dtype)

  def run(x, w1s, w2s, n):
    def body(_, x):
      for w1, w2 in zip(w1s, w2s):
        x = mm(mm(x, w1), w2)
      return x
    return jax.lax.fori_loop(0, n, body, x)
  return jax.jit(run)


def _time_chain(fn, x, w1s, w2s) -> float:
  run = lambda n: jax.block_until_ready(fn(x, w1s, w2s, jnp.int32(n)))
  return bench.slope_seconds(run, short=3, long=23, repeats=3)["per_step_s"] / (2 * len(w1s))


def _sweep_configs():
  return [(bn, bk, target) for bn, bk in ((64, 128), (128, 128), (128, 64), (256, 64),
                                          (64, 256), (32, 256)) for target in (256, 1024)]


def _config(bn, bk, target):
  """A tiling maker of block_n, block_k and about `target` programs (split of the contraction)."""
  def make(shape):
    k, n = shape
    bk_ = min(bk, k)
    chunks = k // bk_
    split = next((d for d in range(1, chunks + 1)
                  if chunks % d == 0 and (n // bn) * d >= target), chunks)
    return matvec.BlockConfig(bn, bk_, split)
  return make


def matmul_part() -> list[dict]:
  rows_out = []
  gpu = jax.default_backend() == "gpu"
  shapes = SHAPES if gpu else {"small": (256, 512)}   # CPU: a smoke test of the script
  if _EXPERTS_ONLY.value:
    shapes = {}
  for name, (k, n) in shapes.items():
    copies = max(1, -(-(CHAIN_BYTES if gpu else 1) // (4 * k * n)))
    keys = jax.random.split(jax.random.PRNGKey(0), 2 * copies)
    w1s = [jax.random.normal(keys[i], (k, n), jnp.bfloat16) * k ** -0.5 for i in range(copies)]
    w2s = [jax.random.normal(keys[copies + i], (n, k), jnp.bfloat16) * n ** -0.5
           for i in range(copies)]
    for dtype in ("bfloat16", "int8"):
      if dtype == "int8":
        w1s = [quant.quantize(w, (0,)).astype(jnp.bfloat16) for w in w1s]
        w2s = [quant.quantize(w, (0,)).astype(jnp.bfloat16) for w in w2s]
      nbytes = (1 if dtype == "int8" else 2) * k * n
      for m in ((1, 5, 8) if dtype == "bfloat16" else (1,)):
        x = jax.random.normal(jax.random.PRNGKey(m), (m, k), jnp.bfloat16)
        variants = {"xla": ("xla", None),
                    "kernel": ("kernel", lambda s, it=nbytes // (k * n): matvec.block_config(
                        1, *s, itemsize=it))}
        if _SWEEP.value and m == 1 and dtype == "bfloat16":
          variants.update({f"bn{c[0]}_bk{c[1]}_p{c[2]}": ("kernel", _config(*c))
                           for c in _sweep_configs()})
        ref = None
        for vname, (kind, cfg) in variants.items():
          entry = {"shape": name, "K": k, "N": n, "dtype": dtype, "rows": m, "variant": vname}
          try:
            fn = _chain_fn(kind, cfg)
            y = fn(x, w1s[:1], w2s[:1], jnp.int32(1)).astype(jnp.float32)
            if ref is None:
              ref = y
            entry["rel_err_vs_xla"] = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
            t = _time_chain(fn, x, w1s, w2s)
            entry.update(us_per_matmul=t * 1e6, gb_per_s=nbytes / t / 1e9)
          except Exception as e:  # pylint: disable=broad-except  (a tiling Triton refuses)
            entry["failed"] = repr(e)[:500]
          rows_out.append(entry)
          print(json.dumps(entry), flush=True)
    del w1s, w2s
  rows_out.extend(_experts_part())
  return rows_out


def _experts_part() -> list[dict]:
  e, d, f = EXPERTS if jax.default_backend() == "gpu" else (8, 128, 64)
  kg, kd = jax.random.split(jax.random.PRNGKey(1))
  gate_up = jax.random.normal(kg, (e, d, 2 * f), jnp.bfloat16) * d ** -0.5
  down = jax.random.normal(kd, (e, f, d), jnp.bfloat16) * f ** -0.5
  out = []
  for pairs in (8, 64):
    chain = 8
    idx = jax.random.randint(jax.random.PRNGKey(pairs), (chain, pairs), 0, e)
    x = jax.random.normal(jax.random.PRNGKey(2), (pairs, d), jnp.bfloat16)
    for vname in ("xla", "kernel"):
      def run(x, idx, gate_up, down, n, vname=vname):
        _with_kernels("on" if vname == "kernel" else "off")   # read when tracing
        def body(_, x):
          for c in range(chain):
            ex = idx[c].reshape(pairs, 1)
            h = quant.expert_matmul(x[:, None], gate_up, ex)[:, 0, :f]
            x = quant.expert_matmul(h[:, None], down, ex)[:, 0]
          return x
        return jax.lax.fori_loop(0, n, body, x)
      fn = jax.jit(run)
      entry = {"shape": "a4b_experts", "pairs": pairs, "variant": vname}
      try:
        y = fn(x, idx, gate_up, down, jnp.int32(1)).astype(jnp.float32)
        t = bench.slope_seconds(
            lambda n, fn=fn: jax.block_until_ready(fn(x, idx, gate_up, down, jnp.int32(n))),
            short=3, long=23, repeats=3)["per_step_s"]
        routed = chain * pairs * 3 * d * f * 2
        entry.update(checksum=float(jnp.linalg.norm(y)), us_per_layer=t / chain * 1e6,
                     routed_gb_per_s=routed / t / 1e9)
      except Exception as exc:  # pylint: disable=broad-except
        entry["failed"] = repr(exc)[:500]
      out.append(entry)
      print(json.dumps(entry), flush=True)
  _with_kernels("auto")
  return out


def _gather_all(tokens, top_k, num_experts):
  """The probe's 'gather' variant: the gathered path for every batch up to num_experts pairs."""
  return tokens * top_k <= num_experts


def _decode_variants(name, cfg, params, cases, variants) -> list[dict]:
  entries = []
  for vname, (mode, gathers) in variants.items():
    _with_kernels(mode)
    layers.gathers_experts = gathers
    vcfg = bench.variant_config(cfg, vname)
    t0 = time.perf_counter()
    try:
      progs = bench.side_by_side(lambda c, v=vcfg: bench.lower_decode(params, v, c, _LONG.value),
                                 cases, threads=4)
    except Exception as e:  # pylint: disable=broad-except
      entries.append({"variant": vname, "failed": repr(e)[:1000]})
      print(name, vname, "failed", repr(e)[:300], flush=True)
      continue
    compile_s = time.perf_counter() - t0
    for case, prog in zip(cases, progs):
      t = bench.time_decode(prog, params, vcfg, case, short=_SHORT.value, long=_LONG.value,
                            repeats=3)
      e = bench.summarize_decode(cfg, case, t, 1.0, params=params)
      e.pop("bandwidth_fraction")
      e.update(variant=vname, kernels=mode, compile_s=compile_s)
      entries.append(e)
      print(name, vname, case.name, f"{e['ms_per_step']:.3f} ms", flush=True)
    del progs
  _with_kernels("auto")
  layers.gathers_experts = _LIBRARY_GATHERS
  return entries


def decode_part() -> dict:
  res = {}
  for name in _MODELS.value:
    cfg = config_lib.PRESETS[name]()
    params = bench.random_params(params_lib.param_specs(cfg), cfg, jax.random.PRNGKey(0))
    cases = [bench.DecodeCase(1, _CONTEXT.value), bench.DecodeCase(1, _CONTEXT.value, chunk=5)]
    variants = {"off": ("off", _LIBRARY_GATHERS), "on": ("on", _LIBRARY_GATHERS)}
    if cfg.num_experts:
      cases.append(bench.DecodeCase(8, _CONTEXT.value))
      variants["on_gather"] = ("on", _gather_all)
    if name not in _INT8.value or cfg.num_experts:
      res[name] = _decode_variants(name, cfg, params, cases, variants)
    if name in _INT8.value:
      params = jax.block_until_ready(quant.quantize_params(params, cfg))
      res[name + "_int8"] = _decode_variants(name + "_int8", cfg, params, cases[:2],
                                             {"off": variants["off"], "on": variants["on"]})
    del params
  return res


def main(argv):
  del argv
  bench.run_probe(_OUT.value, {"matmul": matmul_part, "decode": decode_part}, _PARTS.value,
                  context=_CONTEXT.value)


if __name__ == "__main__":
  app.run(main)
