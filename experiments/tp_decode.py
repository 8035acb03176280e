r"""Decode latency with tensor parallelism over all visible devices vs one device.

A target with random weights (default: Gemma 4 31B shapes in bfloat16) decodes greedily with
`bench.decode_loop` (the model's decode step in one compiled loop, greedy), once on a `model=N`
mesh over every visible device and once on one device. Per-token latency is the slope between a
short and a long run of the same program (so dispatch cancels), best of --repeats after a
compiling run; the timed steps attend to --prompt_len .. --prompt_len + --new_tokens positions.
Achieved bandwidth per device is the bytes of its weight shards + its KV-cache shards (whole
buffers, since attention reads every slot) divided by the latency. One JSON record goes to --out.

  python experiments/tp_decode.py                                  # 31B, all GPUs vs GPU 0
  python experiments/tp_decode.py --num_layers=12 --batch=4        # fewer layers: faster compile
  python experiments/tp_decode.py --preset=tiny --dtype=float32 --cpu_devices=2 \
      --prompt_len=16 --new_tokens=8 --repeats=1                   # CPU smoke test
"""

from __future__ import annotations

import pathlib
import time

from absl import app
from absl import flags
from absl import logging

import jax
import jax.numpy as jnp
import numpy as np

from gemma_mtp import bench
from gemma_mtp import config as config_lib
from gemma_mtp import metrics
from gemma_mtp import params as params_lib
from gemma_mtp import sharding

_PRESET = flags.DEFINE_string("preset", "gemma4_31b", "architecture preset (config.PRESETS)")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", 0, "keep the first N layers (last made full); "
                                   "0: all")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "weights and compute")
_BATCH = flags.DEFINE_integer("batch", 1, "rows decoded together")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 1024, "context before the timed steps")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 128, "tokens of the long run (short: a quarter)")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed runs per length after compiling")
_MESH = flags.DEFINE_string("mesh", "model=-1", "mesh of the parallel run (sharding.make_mesh)")
_SINGLE = flags.DEFINE_bool("single", True, "also run on one device for the speedup")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "fake CPU devices (smoke tests); 0: as is")
_OUT = flags.DEFINE_string("out", None, "JSON record; default experiments/results/"
                           "tp_decode_<preset>_<time>.json")


def model_config() -> config_lib.ModelConfig:
  cfg = config_lib.preset(_PRESET.value)
  n = _NUM_LAYERS.value
  if n:
    if not cfg.num_kv_shared_layers < n <= cfg.num_layers:
      raise app.UsageError(f"--num_layers={n} must be in ({cfg.num_kv_shared_layers}, "
                           f"{cfg.num_layers}]")
    cfg = cfg.replace(layer_types=cfg.layer_types[:n - 1] + (config_lib.FULL,))
  return cfg.replace(dtype=_DTYPE.value, param_dtype=_DTYPE.value)


def bytes_per_device(tree) -> dict[int, int]:
  """Bytes of the shards of every array in `tree` held by each device id."""
  out: dict[int, int] = {}
  for leaf in jax.tree_util.tree_leaves(tree):
    for shard in leaf.addressable_shards:
      out[shard.device.id] = out.get(shard.device.id, 0) + shard.data.nbytes
  return out


def measure(cfg, mesh) -> dict:
  """Per-token decode latency and bandwidth on `mesh` (weights and cache sharded by the rules)."""
  specs = params_lib.param_specs(cfg)
  t0 = time.perf_counter()
  params = bench.random_params(specs, cfg, jax.random.PRNGKey(0),
                               sharding.param_shardings(specs, mesh))
  jax.block_until_ready(params)
  init_s = time.perf_counter() - t0
  long_n, short_n = _NEW_TOKENS.value, max(2, _NEW_TOKENS.value // 4)
  context = _PROMPT_LEN.value + long_n
  max_len = context + 1
  abstract = jax.eval_shape(lambda: bench.synthetic_cache(cfg, _BATCH.value, max_len))
  holder = {"cache": jax.jit(lambda: bench.synthetic_cache(cfg, _BATCH.value, max_len),
                             out_shardings=sharding.cache_shardings(abstract, mesh))()}
  tok = jax.device_put(np.ones((_BATCH.value,), np.int32),
                       sharding.batch_sharding((_BATCH.value,), mesh))

  def run(n):
    cache, _ = bench.decode_loop(params, holder["cache"], tok, jnp.int32(context - n),
                                 jnp.int32(n), config=cfg)
    holder["cache"] = jax.block_until_ready(cache)

  t0 = time.perf_counter()
  run(short_n)
  first_s = time.perf_counter() - t0
  timing = bench.slope_seconds(run, short=short_n, long=long_n, repeats=_REPEATS.value)
  latency = timing["per_step_s"]
  weights = max(bytes_per_device(params).values())
  cache = max(bytes_per_device(holder["cache"]).values())
  del params, holder
  rec = {
      "devices": mesh.devices.size,
      "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "init_seconds": init_s,
      "first_run_seconds": first_s,
      "timing": timing,
      "per_token_ms": latency * 1e3,
      "tokens_per_second": _BATCH.value / latency,
      "weight_bytes_per_device": weights,
      "cache_bytes_per_device": cache,
      "weight_gb_per_s_per_device": weights / latency / 1e9,
      "read_gb_per_s_per_device": (weights + cache) / latency / 1e9,
  }
  logging.info("%d device(s): %.2f ms/token, %.0f GB/s per device (weights + cache)",
               rec["devices"], rec["per_token_ms"], rec["read_gb_per_s_per_device"])
  return rec


def main(argv):
  del argv
  if _CPU_DEVICES.value:
    jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)
  cfg = model_config()
  n_params = params_lib.count_params(params_lib.param_specs(cfg))
  logging.info("%s: %.2fB params, %d layers, %s, %d devices", _PRESET.value, n_params / 1e9,
               cfg.num_layers, cfg.dtype, jax.device_count())
  runs = {"parallel": measure(cfg, sharding.make_mesh(_MESH.value))}
  if _SINGLE.value and jax.device_count() > 1:
    runs["single"] = measure(cfg, sharding.make_mesh(devices=jax.devices()[:1]))
    runs["speedup"] = runs["single"]["per_token_ms"] / runs["parallel"]["per_token_ms"]
  stamp = time.strftime("%Y%m%d-%H%M%S")
  out = _OUT.value or (pathlib.Path(__file__).parent / "results" /
                       f"tp_decode_{_PRESET.value}_{jax.device_count()}dev_{stamp}.json")
  record = {
      "experiment": "tp_decode",
      "preset": _PRESET.value,
      "num_layers": cfg.num_layers,
      "params": n_params,
      "dtype": cfg.dtype,
      "batch": _BATCH.value,
      "prompt_len": _PROMPT_LEN.value,
      "new_tokens": _NEW_TOKENS.value,
      **runs,
  }
  path = metrics.write_record(out, record)
  print(f"wrote {path}")
  for name in ("parallel", "single"):
    if name in runs:
      r = runs[name]
      print(f"{name:8s} {r['devices']} device(s): {r['per_token_ms']:.2f} ms/token, "
            f"{r['weight_gb_per_s_per_device']:.0f} GB/s weights, "
            f"{r['read_gb_per_s_per_device']:.0f} GB/s weights+cache per device")
  if "speedup" in runs:
    print(f"speedup {runs['speedup']:.2f}x")


if __name__ == "__main__":
  app.run(main)
