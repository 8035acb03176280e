r"""Where the time of one released assistant's drafter step goes (issue 6; NOTES, run AN's lead).

  python experiments/drafter_probe.py --out=$OUT/drafter_probe.json --trace_dir=/tmp/traces

For each model (random bf16 target and assistant of the released shapes, batch 1, the target's
cache at `--context`) and each `GEMMA_MTP_DRAFTER_KERNELS` mode of `--modes`: the per-step time
of the drafter loop the speculative loop and the benchmark run (`bench.drafter_loop`: greedy
steps through `drafter.round_step`; slope of a short and a long run), and a profiler trace of
`--profile_steps` steps summarized per step (`bench.kernel_profile`: kernels per step, busy
time, the costliest kernels with their HLO ops, one step's kernels in order), so that the
centroid head's share (top-k of the centroids, the candidates' gather and logits, the greedy
argmax) can be read off, for each of `--variants` (VARIANTS: the step's unmeasured options set
one way or the other). The record is written after every model, so a run cut short keeps what
it measured.

  python experiments/drafter_probe.py --modes=on --variants=run_aq,full_row,no_combine,base
"""

import functools
import os
import pathlib

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from gemma_mtp import bench
from gemma_mtp import config as config_lib
from gemma_mtp import drafter as drafter_lib
from gemma_mtp import drafter_kernels
from gemma_mtp import params as params_lib

_OUT = flags.DEFINE_string("out", "drafter_probe.json", "JSON record")
_TRACE_DIR = flags.DEFINE_string("trace_dir", "/tmp/drafter_probe_traces", "profiler traces")
_MODELS = flags.DEFINE_list("models", ["gemma4_e2b", "gemma4_e4b"],
                            "targets whose released assistants are probed")
_MODES = flags.DEFINE_list("modes", ["off", "on"], "GEMMA_MTP_DRAFTER_KERNELS values")
_CONTEXT = flags.DEFINE_integer("context", 1024, "target cache length the drafter reads")
_SHORT = flags.DEFINE_integer("short", 4, "short loop")
_LONG = flags.DEFINE_integer("long", 20, "long loop")
_PROFILE_STEPS = flags.DEFINE_integer("profile_steps", 8, "steps in the profiled run")

# name -> {(module, attribute): value}; attributes not named keep the defaults ('base').
VARIANTS = {
    "base": {},
    # The step as run AQ timed it: greedy drafts from the full row, 8 ranges per 512-wide head.
    "run_aq": {(drafter_lib, "GREEDY_CANDIDATES"): False, (drafter_kernels, "COMBINE"): False},
    # Greedy drafts as the argmax of the centroid head's full [B, V] row (runs AN and AQ).
    "full_row": {(drafter_lib, "GREEDY_CANDIDATES"): False},
    # Heads in as many ranges as the o kernel's programs hold, no combine kernel.
    "no_combine": {(drafter_kernels, "COMBINE"): False},
    # Warps per kernel program other than the default 4: fewer (fewer barriers in the
    # reductions; run AY: slower, 2 warps +18 us on E2B's step) or more (more loads in flight).
    "warps1": {(drafter_kernels, "NUM_WARPS"): 1},
    "warps2": {(drafter_kernels, "NUM_WARPS"): 2},
    "warps8": {(drafter_kernels, "NUM_WARPS"): 8},
}
_VARIANTS = flags.DEFINE_list("variants", ["base"], f"of {sorted(VARIANTS)}")


def _settings(variant: str) -> dict:
  """Every option VARIANTS names, at its value in `variant` (else the default)."""
  defaults = {key: getattr(*key) for v in VARIANTS.values() for key in v}
  return {**defaults, **VARIANTS[variant]}


def _mode_entry(model: str, mode: str, variant: str, cfg, params, dcfg, dparams) -> dict:
  os.environ[drafter_kernels.ENV] = mode
  settings = _settings(variant)
  saved = {key: getattr(*key) for key in settings}
  for (module, name), value in settings.items():
    setattr(module, name, value)
  try:
    return _timed_entry(model, mode, variant, cfg, params, dcfg, dparams) | {
        "settings": {f"{module.__name__.split('.')[-1]}.{name}": value
                     for (module, name), value in settings.items()}}
  finally:
    for (module, name), value in saved.items():
      setattr(module, name, value)


def _timed_entry(model: str, mode: str, variant: str, cfg, params, dcfg, dparams) -> dict:
  jax.clear_caches()   # the switch and the options are read while tracing: trace the loop again
  cache = jax.jit(lambda: bench.synthetic_cache(cfg, 1, _CONTEXT.value))()
  tok = jnp.ones((1,), jnp.int32)
  hid = jnp.ones((1, cfg.embed_dim), cfg.dtype)

  def run(n):
    return jax.block_until_ready(bench.drafter_loop(dparams, params, cache, tok, hid,
                                                    jnp.int32(n), tcfg=cfg, dcfg=dcfg))

  timing = bench.slope_seconds(run, short=_SHORT.value, long=_LONG.value, repeats=3)
  n = _PROFILE_STEPS.value
  profile = bench.kernel_profile(functools.partial(run, n), n,
                                 f"{_TRACE_DIR.value}/{model}_{mode}_{variant}", sequence=True)
  entry = {"model": model, "mode": mode, "variant": variant,
           "kernels": drafter_kernels.choose(dparams, dcfg, params, cfg),
           "step_us": timing["per_step_s"] * 1e6, "timing": timing, "profile": profile}
  print(model, mode, variant, f"{entry['step_us']:.1f} us/step",
        "kernels:", entry["kernels"], "kernels/step:", profile.get("kernels_per_step"), flush=True)
  return entry


def configs(model: str):
  """(target, assistant) configs: a released shape in bf16, 'gpu_pair' (the shapes of the pair
  configs/reproduce_gpu.py trains) or 'tiny' (a CPU smoke test)."""
  if model == "gpu_pair":
    c = bench.config_from_file(pathlib.Path(__file__).parents[1] / "configs/reproduce_gpu.py")
    cfg = config_lib.ModelConfig(vocab_size=c.vocab_size, **{**c.target, "param_dtype": "bfloat16"})
    return cfg, drafter_lib.for_target(cfg, **c.drafter)
  if model == "tiny":
    cfg = config_lib.tiny(dtype="float32", param_dtype="float32")
    return cfg, drafter_lib.for_target(cfg, embed_dim=32, num_heads=2, mlp_dim=64, num_layers=2)
  cfg = config_lib.preset(model).replace(dtype="bfloat16", param_dtype="bfloat16")
  return cfg, drafter_lib.DRAFTER_PRESETS[f"{model}_assistant"]().replace(
      dtype=cfg.dtype, param_dtype=cfg.param_dtype)


def model_entries(model: str) -> list[dict]:
  cfg, dcfg = configs(model)
  params = bench.random_params(params_lib.param_specs(cfg), cfg, jax.random.PRNGKey(0))
  dparams = bench.random_params(drafter_lib.param_specs(dcfg), dcfg, jax.random.PRNGKey(1))
  return [_mode_entry(model, mode, variant, cfg, params, dcfg, dparams)
          for mode in _MODES.value for variant in _VARIANTS.value]


def main(argv):
  del argv
  unknown = sorted(set(_MODES.value) - {"off", "on", "auto"})
  if unknown:
    raise app.UsageError(f"unknown --modes {unknown}; known: off, on, auto")
  unknown = sorted(set(_VARIANTS.value) - set(VARIANTS))
  if unknown:
    raise app.UsageError(f"unknown --variants {unknown}; known: {', '.join(sorted(VARIANTS))}")
  parts = {m: functools.partial(model_entries, m) for m in _MODELS.value}
  bench.run_probe(_OUT.value, parts, _MODELS.value, context=_CONTEXT.value)


if __name__ == "__main__":
  app.run(main)
