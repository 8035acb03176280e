"""Helpers of the tests of the target's decode-step kernels (decode_attention, ple_kernels)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

import gemma_mtp
from gemma_mtp import config as config_lib
from gemma_mtp import drafter_kernels
from gemma_mtp import kv_cache as kvc
from gemma_mtp import model as model_lib
from gemma_mtp import params as params_lib

PROMPT, STEPS, MAX_LEN = 13, 5, 40


def _prefill(cfg, max_chunk=1):
  """`model.prefill` for MAX_LEN slots, jitted (eagerly, a tiny model's prefill takes ~6 s)."""
  return jax.jit(functools.partial(model_lib.prefill, config=cfg, max_len=MAX_LEN,
                                   max_chunk=max_chunk))


def decode_steps(cfg, params, env: dict, monkeypatch, *, batch=2, steps=STEPS, positions=1):
  """Prefill (XLA) then `steps` forwards of `positions` positions a row (one: decode steps;
  more: as a chain's verification) with the switches `env` ({variable: mode}) set: the logits
  of every step ([steps, B, V], or [steps, B, positions, V]) and the last cache's buffers as
  float32 numpy arrays, and the step program's jaxpr as text."""
  for name, mode in env.items():
    monkeypatch.setenv(name, mode)
  jax.clear_caches()
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(1, cfg.vocab_size, (batch, PROMPT)), jnp.int32)
  start = jnp.asarray([0, 3, 1, 5][:batch], jnp.int32)       # left padding
  fed = jnp.asarray(rng.integers(1, cfg.vocab_size, (steps, batch, positions)), jnp.int32)
  step = jax.jit(lambda p, tok, cache: model_lib.forward(p, tok, config=cfg, cache=cache))
  with jax.default_matmul_precision("float32"):
    _, cache = _prefill(cfg, positions)(params, tokens, start)
    logits = []
    for tok in fed:          # the same tokens fed to every run (not each run's greedy choice)
      out = step(params, tok, cache)
      cache = out.cache
      logits.append(np.asarray(out.logits[:, 0] if positions == 1 else out.logits, np.float32))
    jaxpr = str(jax.make_jaxpr(step)(params, fed[0], cache))
  jax.clear_caches()
  kv = [np.asarray(x, np.float32) for x in (*cache.k, *cache.v) if x is not None]
  return np.stack(logits), kv, jaxpr


def fused_target(cfg, seed=0):
  t = gemma_mtp.random_target(cfg, seed=seed)
  return model_lib.fuse_projections(t.params, cfg)


def random_norms(params, seed=0):
  """`params` with each layer's [D] norm weights (`*_norm`, in place of their initial ones) drawn
  as 1 + 0.3 * normal, a different vector each."""
  rng = np.random.default_rng(seed)
  draw = lambda w: jnp.asarray(1 + 0.3 * rng.normal(size=w.shape), w.dtype)
  layers = [{k: draw(v) if k.endswith("_norm") else v for k, v in p.items()}
            for p in params["layers"]]
  return {**params, "layers": layers}


def triton_kernels_lowered(cfg, name: str, monkeypatch, *, positions=1) -> tuple[int, int]:
  """(Triton kernels, layers) of a bf16 batch-1 forward of `positions` positions (one: a decode
  step) at a 1k-slot cache, exported for CUDA on the CPU (Triton's own compilation of that IR
  needs a GPU); `name` a preset, cut to two layers of each kind (enough to lower), or "tiny"
  for `cfg`."""
  module, layers = lowered_for_cuda(cfg, name, monkeypatch, positions=positions)
  return module.count("xla.gpu.triton"), layers


def lowered_for_cuda(cfg, name: str, monkeypatch, *, positions=1) -> tuple[str, int]:
  """(StableHLO text, layers) of `triton_kernels_lowered`'s forward."""
  monkeypatch.setattr(drafter_kernels, "_interpret", lambda: False)
  if name != "tiny":
    cfg = config_lib.preset(name)
    layers = tuple(cfg.layer_types[:cfg.layer_types.index("full") + 1]) * 2
    cfg = cfg.replace(layer_types=layers, num_kv_shared_layers=0)
  cfg = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
  params = jax.eval_shape(lambda: model_lib.fuse_projections(
      params_lib.init_params(cfg, jax.random.PRNGKey(0)), cfg))
  cache = jax.eval_shape(lambda: kvc.init_cache(cfg, 1, 1024, max_chunk=positions))
  exported = jax.export.export(
      jax.jit(lambda p, c: model_lib.forward(p, jnp.ones((1, positions), jnp.int32),
                                             config=cfg, cache=c).logits), platforms=["cuda"],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
          params, cache)
  return exported.mlir_module(), cfg.num_layers


def generate_off_and_on(cfg, env: str, monkeypatch, traced: list, *,
                        speculative=({"draft_lengths": (2,), "adaptive": False},),
                        other_env: dict | None = None, **drafter):
  """Greedy plain decoding of two ragged prompts (longer than the sliding window) with the
  switch `env` off and on, in float32, and speculative decoding with it on, once with each of
  `speculative`'s `generate` arguments: (tokens off, tokens on, [speculative tokens]). The
  switches `other_env` ({variable: mode}) stay set throughout; `drafter`: `random_drafter`'s
  arguments past its shape. `traced`, filled by the caller's hook on the kernels, must still be
  empty when each mode starts (so the off run traced none)."""
  target = gemma_mtp.fuse_target(gemma_mtp.random_target(cfg, seed=3))
  drafter = gemma_mtp.random_drafter(target, seed=4, embed_dim=32, num_heads=4, mlp_dim=64,
                                     **drafter)
  rng = np.random.default_rng(1)
  prompts = [rng.integers(1, cfg.vocab_size, n).tolist() for n in (11, 6)]
  for name, mode in (other_env or {}).items():
    monkeypatch.setenv(name, mode)
  out = {}
  for mode in ("off", "on"):
    monkeypatch.setenv(env, mode)
    assert not traced, (mode, traced)
    jax.clear_caches()
    with jax.default_matmul_precision("float32"):
      out[mode] = np.asarray(gemma_mtp.generate(target, prompts, max_new_tokens=8).tokens)
      if mode == "on":
        spec = [np.asarray(gemma_mtp.generate(target, prompts, max_new_tokens=8,
                                              drafter=drafter, **kw).tokens)
                for kw in speculative]
  jax.clear_caches()
  return out["off"], out["on"], spec


def bfloat16_errors(cfg, steps, monkeypatch):
  """Mean relative errors of the logits of five bf16 decode steps with the switch off and on,
  against float32 arithmetic on the same bf16 weights (`steps(cfg, params, mode, monkeypatch)`
  -> (logits, ...)), and the logits: (error on, error off, logits on, logits off, float32)."""
  cfg = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
  params = fused_target(cfg)
  ref = steps(cfg, params, "off", monkeypatch)[0]
  got = steps(cfg, params, "on", monkeypatch)[0]
  f32 = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params)
  exact = steps(cfg.replace(dtype="float32", param_dtype="float32"), f32, "off", monkeypatch)[0]
  err = lambda x: np.abs(x - exact).mean() / np.abs(exact).mean()
  return err(got), err(ref), got, ref, exact


def assert_greedy_as_good(got, ref, exact):
  """The kernels' greedy tokens (`got`'s argmax) against XLA's (`ref`'s) in bf16, judged by
  float32 arithmetic (`exact`'s logits): where exact's top two logits are further apart than
  XLA's largest error on the forward, the kernels pick the exact top token; at the near-ties
  left, where bf16 rounding decides (in the tiny bf16 models even XLA's token is not always
  exact's there), the kernels' token scores under exact arithmetic within XLA's largest error
  of XLA's token. At least one position must be clear."""
  got, ref, exact = (np.asarray(x, np.float32) for x in (got, ref, exact))
  worst = np.abs(ref - exact).max()
  top2 = np.sort(exact, axis=-1)[..., -2:]
  clear = top2[..., 1] - top2[..., 0] > worst
  assert clear.any(), "no position's top two logits are clear of XLA's error"
  np.testing.assert_array_equal(got.argmax(-1)[clear], exact.argmax(-1)[clear])
  score = lambda x: np.take_along_axis(exact, x.argmax(-1)[..., None], axis=-1)[..., 0]
  assert (score(got) >= score(ref) - worst).all(), (score(got), score(ref), worst)


def traced_pads(cfg, params, env: str, monkeypatch) -> dict:
  """{mode: one-row inputs padded (concatenates) in a traced batch-1 decode step} with the
  switch `env` off and on."""
  pads = {}
  for mode in ("off", "on"):
    monkeypatch.setenv(env, mode)
    _, cache = _prefill(cfg)(params, jnp.ones((1, PROMPT), jnp.int32),
                             jnp.zeros((1,), jnp.int32))
    jaxpr = str(jax.make_jaxpr(lambda p, c: model_lib.forward(
        p, jnp.ones((1, 1), jnp.int32), config=cfg, cache=c).logits)(params, cache))
    pads[mode] = jaxpr.count("concatenate")
  return pads
