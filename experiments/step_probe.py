r"""Where the time of one batch-1 decode step goes, and what the fused layout saves (issue 6, run O).

  python experiments/step_probe.py --out=$OUT/step_probe.json --trace_dir=/tmp/traces

For each model (random bf16 weights, batch 1, context 1k) and each parameter layout:
  checkpoint  q, k, v and gate, up as separate matmuls (the layout checkpoints store);
  fused       `model.fuse_projections`: one q|k|v and one gate|up matmul per layer;
  fused_pad   fused, with every one-row matmul padded to two rows whatever the weight's size
              (`quant.PAD_MAX_WEIGHT_SIZE` lifted: a fused gate|up is above it on E4B);
  fused_nopad fused, no one-row matmul padded (with XLA_FLAGS=--xla_gpu_enable_dot_strength_
              reduction=false XLA keeps one-row matmuls as GEMMs instead of multiply + reduce;
              jax 0.11.2's XLA does not know that flag);
  fused_dpa   fused, attention through `jax.nn.dot_product_attention` (cuDNN's fused kernel where
              it takes the shapes: bf16, head dim <= 256; else XLA's) instead of the explicit
              einsum / softmax / einsum of `layers.attention` (5 kernels per layer at batch 1);
the per-step time (slope of a short and a long run of the decode loop, as the benchmark), one
verification of 5 positions, and a profiler trace of `--profile_steps` steps summarized per step
(`bench.kernel_profile`: kernels per step, time the device is busy, the gaps between kernels,
the costliest kernels). Run once more under `XLA_FLAGS` to compare compiler options (the flags
are recorded with the environment).
"""

import functools
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from gemma_mtp import bench
from gemma_mtp import config as config_lib
from gemma_mtp import layers
from gemma_mtp import model as model_lib
from gemma_mtp import params as params_lib
from gemma_mtp import quant

_OUT = flags.DEFINE_string("out", "step_probe.json", "JSON record")
_TRACE_DIR = flags.DEFINE_string("trace_dir", "/tmp/step_probe_traces", "profiler traces")
_MODELS = flags.DEFINE_list("models", ["gemma4_e4b", "gemma4_26b_a4b", "gemma4_31b",
                                       "gemma4_e2b"], "models, in order")
_VARIANTS = flags.DEFINE_list("variants", ["checkpoint", "fused", "fused_pad"], "layouts")
_VERIFY = flags.DEFINE_list("verify_models", ["gemma4_e4b", "gemma4_31b"],
                            "models also timed verifying 5 positions")
_CONTEXT = flags.DEFINE_integer("context", 1024, "decode context")
_SHORT = flags.DEFINE_integer("short", 16, "short loop")
_LONG = flags.DEFINE_integer("long", 64, "long loop")
_PROFILE_STEPS = flags.DEFINE_integer("profile_steps", 8, "steps in the profiled run (0: none)")

_LIBRARY_PAD_MAX = quant.PAD_MAX_WEIGHT_SIZE
_LIBRARY_PAD_BACKENDS = quant.PAD_ONE_ROW_BACKENDS
_LIBRARY_ATTENTION = layers.attention


def _fused_attention(q, k, v, mask):
  """`layers.attention` through `jax.nn.dot_product_attention` (scale 1: Gemma 4's QK-norm)."""
  if q.shape[-1] > 256 or q.dtype != jnp.bfloat16:
    return _LIBRARY_ATTENTION(q, k, v, mask)
  return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=1.0)


def _measure(model: str, variant: str, cfg, params) -> list[dict]:
  quant.PAD_MAX_WEIGHT_SIZE = (1 << 62) if variant == "fused_pad" else _LIBRARY_PAD_MAX
  quant.PAD_ONE_ROW_BACKENDS = () if variant == "fused_nopad" else _LIBRARY_PAD_BACKENDS
  layers.attention = _fused_attention if variant == "fused_dpa" else _LIBRARY_ATTENTION
  vcfg = bench.variant_config(cfg, variant)
  cases = [bench.DecodeCase(1, _CONTEXT.value)]
  if model in _VERIFY.value:
    cases.append(bench.DecodeCase(1, _CONTEXT.value, chunk=5))
  entries = []
  try:
    for case in cases:
      t0 = time.perf_counter()
      prog = bench.lower_decode(params, vcfg, case, _LONG.value)
      compile_s = time.perf_counter() - t0
      t = bench.time_decode(prog, params, vcfg, case, short=_SHORT.value, long=_LONG.value,
                            repeats=3)
      e = bench.summarize_decode(cfg, case, t, 1.0, params=params)
      e.pop("bandwidth_fraction")
      e.update(variant=variant, compile_s=compile_s)
      if case.chunk == 1 and _PROFILE_STEPS.value:
        e["profile"] = _profile(prog, params, vcfg, case, f"{model}_{variant}")
      entries.append(e)
      print(model, variant, case.name, f"{e['ms_per_step']:.3f} ms",
            e.get("profile", {}).get("kernels_per_step"), flush=True)
      del prog
  finally:
    quant.PAD_MAX_WEIGHT_SIZE = _LIBRARY_PAD_MAX
    quant.PAD_ONE_ROW_BACKENDS = _LIBRARY_PAD_BACKENDS
    layers.attention = _LIBRARY_ATTENTION
  return entries


def _profile(prog, params, cfg, case, name) -> dict:
  n = _PROFILE_STEPS.value
  max_len = case.context + _LONG.value + case.chunk
  holder = {"cache": jax.jit(lambda: bench.synthetic_cache(cfg, case.batch, max_len))()}
  tok = jnp.ones((case.batch,), jnp.int32)

  def run():
    cache, _ = prog(params, holder["cache"], tok, jnp.int32(case.context - n), jnp.int32(n))
    holder["cache"] = jax.block_until_ready(cache)

  res = bench.kernel_profile(run, n, f"{_TRACE_DIR.value}/{name}")
  del holder["cache"]
  return res


def model_entries(model: str) -> list[dict]:
  cfg = config_lib.PRESETS[model]()
  params = bench.random_params(params_lib.param_specs(cfg), cfg, jax.random.PRNGKey(0))
  entries = []
  if "checkpoint" in _VARIANTS.value:
    entries += _measure(model, "checkpoint", cfg, params)
  # Donated: the checkpoint layout is freed layer by layer (the 31B fits only once).
  params = model_lib.fuse_projections(params, cfg, donate=True)
  for variant in _VARIANTS.value:
    if variant != "checkpoint":
      entries += _measure(model, variant, cfg, params)
  return entries


def main(argv):
  del argv
  parts = {m: functools.partial(model_entries, m) for m in _MODELS.value}
  bench.run_probe(_OUT.value, parts, _MODELS.value, context=_CONTEXT.value)


if __name__ == "__main__":
  app.run(main)
