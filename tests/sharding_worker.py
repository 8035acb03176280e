"""Sharding checks that need several (fake CPU) devices; run by tests/test_sharding.py.

The main pytest process has already initialised JAX with one CPU device, so these run in a fresh
process:

  python -m tests.sharding_worker meshes DIR
      8 fake devices; every check on meshes (data, model) = (8, 1), (2, 4), (1, 8) (+ fsdp for
      training) against the one-device result; writes DIR/result.json.
  python -m tests.sharding_worker multiprocess DIR PROCESS_ID NUM_PROCESSES PORT
      one of NUM_PROCESSES processes (4 fake devices each) joined through jax.distributed on
      127.0.0.1:PORT; sharded load, forward and train step over all processes' devices against
      the single-device result computed locally; writes DIR/result_<id>.json. Reads the
      checkpoints that `make_checkpoints` wrote into DIR.
  python -m tests.sharding_worker quant DIR
      8 fake devices; int8-quantized params (quant.py) on (data, model) = (2, 4); writes
      DIR/result.json (used by tests/test_quant.py).

Each record is {name: {"err": max |sharded - single| (normalised, see `rel_err`), ...}}; the
test decides the tolerances.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
import time


def _set_device_count(n: int):
  """n fake CPU devices; must happen before jax is imported.

  Also lowers XLA's CPU backend optimisation: compilation dominates these runs and the checks
  compare programs compiled with the same flags in the same process.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    flags += f" --xla_force_host_platform_device_count={n}"
  if "xla_backend_optimization_level" not in flags:
    flags += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  os.environ["XLA_FLAGS"] = flags.strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


# ---- shared definitions (importable without devices) ---------------------------------------

def ple_config():
  """PLE + KV sharing + double-wide MLP; 8 heads, 4 sliding / 2 full KV heads (so (2, 4) shards
  the sliding KV heads and replicates the full ones, and (1, 8) replicates both)."""
  from gemma_mtp import config as config_lib
  return config_lib.tiny(layer_types=config_lib.pattern(4, 2), num_kv_shared_layers=2,
                         double_wide_mlp=True, per_layer_dim=8, per_layer_vocab_size=256,
                         num_heads=8, num_kv_heads=4, num_global_kv_heads=2)


def moe_config():
  from gemma_mtp import config as config_lib
  return config_lib.tiny(layer_types=config_lib.pattern(4, 2), num_heads=8, num_kv_heads=4,
                         num_global_kv_heads=2, k_eq_v=True, num_experts=8,
                         num_experts_per_token=2, expert_dim=32)


def make_checkpoints(directory: pathlib.Path):
  """HF and Orbax checkpoints of `ple_config()` (written once, by the single-device parent)."""
  import jax
  from gemma_mtp import checkpoint
  from gemma_mtp import params as params_lib
  cfg = ple_config()
  params = params_lib.init_params(cfg, jax.random.PRNGKey(7))
  checkpoint.save_hf(directory / "hf", params, cfg)
  checkpoint.save_params(directory / "orbax", params, cfg)


PROMPTS = [list(range(5, 16)), [3, 4], [100, 101, 102, 103, 104], list(range(20, 45)), [7] * 5,
           [9, 8], [1, 2, 3], [200]]
MESHES = ("data=8", "data=2,model=4", "model=8")
TRAIN_MESHES = MESHES + ("data=2,fsdp=2,model=2",)


def rel_err(a, b) -> float:
  """max |a - b| / max(1, max |b|): float32 rounding scales with the magnitude of the values."""
  import numpy as np
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))


def tree_err(a, b) -> float:
  import jax
  return max(rel_err(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                           jax.tree_util.tree_leaves(b)))


# ---- the computations under test -------------------------------------------------------------

def forward_logits(params, tokens, cfg):
  import jax
  from gemma_mtp import model as model_lib
  fn = jax.jit(lambda p, t: model_lib.forward(p, t, config=cfg).logits)
  return fn(params, tokens)


def make_train_step(cfg):
  """Next-token cross entropy + AdamW, one jitted step: (params, opt_state, tokens) -> same + loss.

  eps=1e-3 rather than 1e-8: Adam's first update is lr * g / (|g| + eps) ~ lr * sign(g), so an
  element whose gradient is as small as the float32 rounding of a sharded reduction (~1e-6 of the
  leaf's largest gradient; exactly 0 for the last layer's layer_scalar, which the final RMSNorm
  makes irrelevant) would differ by O(lr) for reasons that have nothing to do with sharding. With
  eps=1e-3 rounding is amplified at most lr / eps = 1x. Gradients are returned too.
  """
  import jax
  import jax.numpy as jnp
  import optax
  from gemma_mtp import model as model_lib
  opt = optax.adamw(1e-3, eps=1e-3, weight_decay=0.1)

  def loss_fn(params, tokens):
    logits = model_lib.forward(params, tokens[:, :-1], config=cfg).logits
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

  @jax.jit
  def step(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, grads

  return jax.jit(opt.init), step


def train_tokens(cfg, rows=8, length=17):
  import jax
  return jax.random.randint(jax.random.PRNGKey(3), (rows, length), 0, cfg.vocab_size)


# ---- 8 devices, one process ------------------------------------------------------------------

def run_meshes(out_dir: pathlib.Path) -> dict:
  import jax
  import numpy as np
  from gemma_mtp import decoding
  from gemma_mtp import drafter as drafter_lib
  from gemma_mtp import params as params_lib
  from gemma_mtp import sampling
  from gemma_mtp import sharding
  from gemma_mtp import speculative

  assert jax.device_count() == 8, jax.devices()
  res: dict = {"timings": {}}
  one = sharding.make_mesh(devices=jax.devices()[:1])
  meshes = {s: sharding.make_mesh(s) for s in TRAIN_MESHES}

  last = [time.perf_counter()]

  def phase(name):  # seconds since the previous phase ended
    now = time.perf_counter()
    res.setdefault("phases", {})[name] = round(now - last[0], 2)
    last[0] = now

  def timed(name, fn):
    t0 = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    res["timings"][name] = round(time.perf_counter() - t0, 2)
    return out

  # Born sharded: same values as a one-device init, and every device holds only its shards.
  cfg = ple_config()
  key = jax.random.PRNGKey(0)
  ref = sharding.init_params_sharded(cfg, key, one)
  specs = params_lib.param_specs(cfg)
  for name in ("data=2,model=4",):
    mesh = meshes[name]
    p = sharding.init_params_sharded(cfg, key, mesh)
    want = sharding.param_shardings(specs, mesh)
    shard_ok = all(
        a.sharding.is_equivalent_to(s, a.ndim) and all(
            sh.data.shape == s.shard_shape(a.shape) for sh in a.addressable_shards)
        for a, s in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(want)))
    q = p["layers"][0]["attn"]["q"]
    res[f"init/{name}"] = {"err": tree_err(p, ref), "shardings_ok": shard_ok,
                           "q_shard": list(q.addressable_shards[0].data.shape)}

  phase("init")

  # Forward logits, PLE/KV-sharing and MoE configs.
  for cname, c in (("ple", cfg), ("moe", moe_config())):
    p_ref = ref if c is cfg else sharding.init_params_sharded(c, key, one)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (8, 16), 0, c.vocab_size)
    want = np.asarray(forward_logits(p_ref, tokens, c))
    for name in MESHES:
      mesh = meshes[name]
      p = sharding.shard_params(p_ref, params_lib.param_specs(c), mesh)
      got = timed(f"forward_{cname}/{name}",
                  lambda: forward_logits(p, sharding.shard_batch(tokens, mesh), c))
      res[f"forward_{cname}/{name}"] = {"err": rel_err(got, want),
                                        "abs_err": float(np.abs(np.asarray(got) - want).max())}

  phase("forward")

  # Greedy speculative and plain generation, token for token.
  dcfg = drafter_lib.for_target(cfg, embed_dim=32, num_heads=4, mlp_dim=64, num_layers=2)
  dref = sharding.init_drafter_sharded(dcfg, jax.random.PRNGKey(5), one)
  batch = decoding.make_prompt_batch(PROMPTS, vocab_size=cfg.vocab_size)
  spec = speculative.SpecConfig(draft_lengths=(3,), adaptive=False)
  greedy = sampling.SamplingParams(temperature=0.0)

  def spec_gen(tp, dp, b):
    return speculative.speculative_generate(
        tp, dp, b, jax.random.PRNGKey(0), tcfg=cfg, dcfg=dcfg, spec=spec, sampler=greedy,
        max_new=12, eos_ids=(), max_len=64)

  def plain_gen(tp, b):
    return decoding.plain_generate(tp, b, jax.random.PRNGKey(0), config=cfg, sampler=greedy,
                                   max_new=12, eos_ids=(), max_len=64)

  s_ref = timed("speculative/one_device", lambda: spec_gen(ref, dref, batch))
  p_ref_out = timed("plain/one_device", lambda: plain_gen(ref, batch))
  res["speculative/one_device"] = {
      "equals_plain": bool(np.array_equal(s_ref.out, p_ref_out[0])), "rounds": int(s_ref.rounds)}
  for name in MESHES:
    mesh = meshes[name]
    tp = sharding.shard_target(Model(cfg, ref), mesh).params
    dp = sharding.shard_drafter(Model(dcfg, dref), mesh).params
    b = sharding.shard_batch(batch, mesh)
    s = timed(f"speculative/{name}", lambda: spec_gen(tp, dp, b))
    want_cache = sharding.cache_shardings(s.cache, mesh)
    cache_ok = all(
        a.sharding.is_equivalent_to(w, a.ndim)
        for a, w in zip(jax.tree_util.tree_leaves(s.cache), jax.tree_util.tree_leaves(want_cache)))
    res[f"speculative/{name}"] = {
        "tokens_equal": bool(np.array_equal(s.out, s_ref.out)),
        "rounds_equal": int(s.rounds) == int(s_ref.rounds),
        "cache_sharding_as_table": cache_ok,
        "cache_k0_spec": str(s.cache.k[0].sharding.spec),
        "out_spec": str(s.out.sharding.spec)}

  mesh = meshes["data=2,model=4"]
  plain = timed("plain/data=2,model=4",
                lambda: plain_gen(sharding.shard_params(ref, specs, mesh),
                                  sharding.shard_batch(batch, mesh)))
  res["plain/data=2,model=4"] = {"tokens_equal": bool(np.array_equal(plain[0], p_ref_out[0]))}

  phase("generate")

  # One training step: loss and updated parameters.
  init_opt, step = make_train_step(cfg)
  tokens = train_tokens(cfg)
  p1_ref, _, loss_ref, g_ref = step(ref, init_opt(ref), tokens)
  for name in TRAIN_MESHES:
    mesh = meshes[name]
    p = sharding.shard_params(ref, specs, mesh)
    p1, _, loss, g = timed(f"train/{name}",
                           lambda: step(p, init_opt(p), sharding.shard_batch(tokens, mesh)))
    same_shardings = all(a.sharding.is_equivalent_to(b.sharding, a.ndim) for a, b in zip(
        jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p)))
    res[f"train/{name}"] = {"loss_err": rel_err(loss, loss_ref), "err": tree_err(p1, p1_ref),
                            "grad_err": tree_err(g, g_ref), "shardings_kept": same_shardings,
                            "gate_spec": str(p1["layers"][0]["mlp"]["gate"].sharding.spec)}

  phase("train")

  # Checkpoints straight into shards.
  from gemma_mtp import checkpoint
  ck = out_dir / "ckpt"
  make_checkpoints(ck)
  host = checkpoint.load_hf_params(ck / "hf", cfg, place=lambda a, s: a)[0]
  mesh = meshes["data=2,model=4"]
  for fmt in ("hf", "orbax"):
    lcfg, p = sharding.load_sharded(ck / fmt, None, mesh)
    want = sharding.param_shardings(specs, mesh)
    res[f"load/{fmt}"] = {
        "err": tree_err(p, host), "cfg_equal": lcfg == cfg,
        "shardings_ok": all(a.sharding.is_equivalent_to(s, a.ndim) for a, s in zip(
            jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(want)))}
  ddir = ck / "drafter"
  checkpoint.save_drafter(ddir, dref, dcfg)
  dcfg2, dp = sharding.load_drafter_sharded(ddir, cfg, mesh)
  res["load/drafter_orbax"] = {"err": tree_err(dp, dref), "cfg_equal": dcfg2 == dcfg,
                               "embed_spec": str(dp["embed"].sharding.spec)}
  phase("load")
  return res


@dataclasses.dataclass
class Model:
  """(config, params), as api.Target / api.Drafter, for shard_target / shard_drafter."""

  config: object
  params: object


# ---- several processes -----------------------------------------------------------------------

def run_multiprocess(out_dir: pathlib.Path, process_id: int, num_processes: int,
                     port: int) -> dict:
  import jax
  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except (AttributeError, ValueError):  # option renamed or removed in a later jax
    pass
  from gemma_mtp import sharding
  joined = sharding.maybe_initialize_distributed(f"127.0.0.1:{port}", num_processes, process_id)
  import numpy as np
  from jax.experimental import multihost_utils
  from gemma_mtp import checkpoint

  res: dict = {"joined": joined, "process_count": jax.process_count(),
               "device_count": jax.device_count(), "local_device_count": jax.local_device_count()}
  cfg = ple_config()
  local = sharding.make_mesh(devices=jax.local_devices()[:1])
  mesh = sharding.make_mesh("data=2,model=4")   # data spans the processes, model stays inside
  res["mesh_processes"] = [[d.process_index for d in row.ravel()] for row in mesh.devices]
  gather = lambda x: multihost_utils.process_allgather(x, tiled=True)

  ck = out_dir / "ckpt"
  host = checkpoint.load_hf_params(ck / "hf", cfg, place=lambda a, s: a)[0]
  for fmt in ("hf", "orbax"):
    _, p = sharding.load_sharded(ck / fmt, cfg, mesh)
    res[f"load/{fmt}"] = {"err": tree_err(gather(p), host),
                          "addressable_shards": len(p["embed"].addressable_shards)}
  ref = jax.device_put(host, local.devices.flat[0])

  tokens = jax.random.randint(jax.random.PRNGKey(1), (8, 16), 0, cfg.vocab_size)
  want = np.asarray(forward_logits(ref, tokens, cfg))
  got = forward_logits(p, sharding.shard_batch(tokens, mesh), cfg)
  res["forward"] = {"err": rel_err(gather(got), want)}
  born = sharding.init_params_sharded(cfg, jax.random.PRNGKey(0), mesh)
  born_ref = sharding.init_params_sharded(cfg, jax.random.PRNGKey(0), local)
  res["init"] = {"err": tree_err(gather(born), born_ref)}

  init_opt, step = make_train_step(cfg)
  tokens = np.asarray(train_tokens(cfg))
  p1_ref, _, loss_ref, _ = step(ref, init_opt(ref), tokens)
  # Each process feeds only its half of the rows (process-local data loading).
  rows = len(tokens) // num_processes
  mine = tokens[process_id * rows:(process_id + 1) * rows]
  p1, _, loss, _ = step(p, init_opt(p), sharding.shard_batch(mine, mesh, process_local=True))
  res["train"] = {"loss_err": rel_err(gather(loss), loss_ref), "err": tree_err(gather(p1), p1_ref)}
  return res


# ---- int8 weights on 8 devices (tests/test_quant.py) -----------------------------------------

def run_quant(out_dir: pathlib.Path) -> dict:
  """Quantized params placed by `param_shardings(quantized_specs)` on (data, model) = (2, 4):
  forward logits vs one device, scale layouts, a sharded load of a quantized Orbax checkpoint."""
  import jax
  import numpy as np
  from gemma_mtp import checkpoint
  from gemma_mtp import params as params_lib
  from gemma_mtp import quant
  from gemma_mtp import sharding

  assert jax.device_count() == 8, jax.devices()
  res: dict = {}
  mesh = sharding.make_mesh("data=2,model=4")
  for cname, c in (("ple", ple_config()), ("moe", moe_config())):
    qp = quant.quantize_params(params_lib.init_params(c, jax.random.PRNGKey(0)), c,
                               embeddings=True)
    qspecs = quant.quantized_specs(c, embeddings=True)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (8, 16), 0, c.vocab_size)
    want = np.asarray(forward_logits(qp, tokens, c))
    placed = sharding.shard_params(qp, qspecs, mesh)
    got = forward_logits(placed, sharding.shard_batch(tokens, mesh), c)
    q = placed["layers"][0]["attn"]["q"]
    res[f"forward_{cname}"] = {
        "err": rel_err(got, want),
        "q_spec": str(q.q.sharding.spec), "q_scale_spec": str(q.scale.sharding.spec),
        "o_spec": str(placed["layers"][0]["attn"]["o"].q.sharding.spec),
        "o_scale_spec": str(placed["layers"][0]["attn"]["o"].scale.sharding.spec),
        "int8": all(x.q.dtype == np.int8 for x in jax.tree_util.tree_leaves(
            placed, is_leaf=quant.is_quantized) if quant.is_quantized(x))}
    if cname == "ple":
      checkpoint.save_params(out_dir / "qckpt", qp, c)
      _, loaded = sharding.load_sharded(out_dir / "qckpt", None, mesh)
      same_layout = all(
          a.sharding.is_equivalent_to(b.sharding, a.ndim)
          for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(placed)))
      res["load_sharded"] = {"err": tree_err(loaded, qp), "same_layout": same_layout,
                             "quantized": quant.describe(loaded)}
  return res


def main(argv):
  case, out_dir = argv[1], pathlib.Path(argv[2])
  t0 = time.perf_counter()
  if case == "meshes":
    _set_device_count(8)
    res = run_meshes(out_dir)
    name = "result.json"
  elif case == "multiprocess":
    process_id, num_processes, port = map(int, argv[3:6])
    _set_device_count(4)
    res = run_multiprocess(out_dir, process_id, num_processes, port)
    name = f"result_{process_id}.json"
  elif case == "quant":
    _set_device_count(8)
    res = run_quant(out_dir)
    name = "result.json"
  else:
    raise SystemExit(f"unknown case {case!r}; expected 'meshes', 'multiprocess' or 'quant'")
  res["seconds"] = round(time.perf_counter() - t0, 2)
  (out_dir / name).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
  main(sys.argv)
