"""The MoE router as Pallas kernels (moe_kernels) against `layers.route`.

Off the GPU the kernels run in Pallas's interpreter; on a GPU the same tests run the compiled
Triton kernels.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_mtp import config as config_lib
from gemma_mtp import decode_attention
from gemma_mtp import layers
from gemma_mtp import moe_kernels
from gemma_mtp import ple_kernels
from tests import decode_kernels as dkt

# 16 experts, top 4, a 96-wide residual (not a power of two: the kernels' chunks).
TINY = config_lib.tiny(embed_dim=96, num_experts=16, num_experts_per_token=4, expert_dim=16,
                       k_eq_v=True)


def _moe_params(cfg, dtype, seed=0):
  rng = np.random.default_rng(seed)
  d, e = cfg.embed_dim, cfg.num_experts
  f = lambda *shape, scale=1.0: jnp.asarray(rng.normal(size=shape) * scale, dtype)
  return {"router": f(d, e, scale=d ** -0.5), "router_scale": f(d, scale=0.3) + 1,
          "expert_scale": f(e, scale=0.3) + 1, "pre_norm": f(d, scale=0.3) + 1}


def _both(cfg, p, x):
  """(XLA's weights, experts, experts' input; the kernels')."""
  with jax.default_matmul_precision("float32"):
    w, e = layers.route(x, p, top_k=cfg.num_experts_per_token, eps=cfg.rms_eps)
    xn = layers.rms_norm(x, p["pre_norm"], eps=cfg.rms_eps)
    got = moe_kernels.route(x, p, cfg)
  return [np.asarray(a, np.float32) for a in (w, e, xn)], [np.asarray(a, np.float32)
                                                            for a in got]


def test_route_equals_xla_float32():
  """In float32: the same experts in the same order, and the weights and the experts' input up
  to summation order, on 5 tokens (two parts of the router's contraction, 2 column tiles)."""
  p = _moe_params(TINY, jnp.float32)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(5, TINY.embed_dim)) * 3, jnp.float32)
  (w, e, xn), (w2, e2, xn2) = _both(TINY, p, x)
  np.testing.assert_array_equal(e2, e)
  np.testing.assert_allclose(w2, w, rtol=2e-6, atol=0)
  np.testing.assert_allclose(xn2, xn, rtol=0, atol=2e-6 * np.abs(xn).max())
  assert len(set(map(tuple, e.tolist()))) == 5           # the tokens route differently


def test_ties_go_to_the_lower_index():
  """Experts 3 and 9 score the same and highest, the other 14 the same (zero): both pick 3, 9
  and then 0, 1, as `lax.top_k` does."""
  p = _moe_params(TINY, jnp.float32)
  v = np.random.default_rng(2).normal(size=TINY.embed_dim)
  router = np.zeros((TINY.embed_dim, TINY.num_experts))
  router[:, 3] = router[:, 9] = v
  p = dict(p, router=jnp.asarray(router, jnp.float32), router_scale=jnp.ones(TINY.embed_dim))
  x = jnp.asarray(v[None], jnp.float32)
  (w, e, _), (w2, e2, _) = _both(TINY, p, x)
  np.testing.assert_array_equal(e, [[3, 9, 0, 1]])
  np.testing.assert_array_equal(e2, e)
  np.testing.assert_allclose(w2, w, rtol=2e-6)


def test_route_bfloat16_as_xla():
  """In bfloat16, rounded where `layers.route` rounds: XLA's experts on 16 random tokens, the
  weights within bf16 logits' spread, the experts' input within one bf16 step."""
  cfg = TINY.replace(dtype="bfloat16", param_dtype="bfloat16")
  p = _moe_params(cfg, jnp.bfloat16)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(16, cfg.embed_dim)) * 3, jnp.bfloat16)
  (w, e, xn), (w2, e2, xn2) = _both(cfg, p, x)
  np.testing.assert_array_equal(e2, e)
  np.testing.assert_allclose(w2, w, rtol=2e-2)
  np.testing.assert_allclose(xn2, xn, rtol=2 ** -7)


def test_choose(monkeypatch):
  """The switch: off on the CPU (auto), on with =on; the 26B-A4B router taken through a cache
  (not in training forwards: no gradient), the automatic switch up to AUTO_MAX_ROWS tokens;
  why not otherwise."""
  cfg = config_lib.preset("gemma4_26b_a4b")
  p = _moe_params(TINY, jnp.float32)
  assert moe_kernels.supported(cfg, p) is None
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert not moe_kernels.choose(cfg, p, 1, True)                   # auto off the GPU
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert moe_kernels.choose(cfg, p, moe_kernels.AUTO_MAX_ROWS, True)
  assert not moe_kernels.choose(cfg, p, moe_kernels.AUTO_MAX_ROWS + 1, True)
  assert not moe_kernels.choose(cfg, p, 1, False)
  monkeypatch.setattr(jax, "device_count", lambda: 2)                # sharded: XLA's path
  assert not moe_kernels.choose(cfg, p, 1, True)
  monkeypatch.setenv(moe_kernels.ENV, "on")
  assert moe_kernels.choose(cfg, p, 1024, True) and not moe_kernels.choose(cfg, p, 1, False)
  monkeypatch.setenv(moe_kernels.ENV, "off")
  assert not moe_kernels.choose(cfg, p, 1, True)
  assert "experts" in moe_kernels.supported(TINY.replace(num_experts=8), p)
  assert "top 3" in moe_kernels.supported(TINY.replace(num_experts_per_token=3), p)


def test_decode_steps_equal_xla_float32(monkeypatch):
  """Five decode steps after a 13-token prompt (two left-padded rows) through the whole model
  give XLA's logits and caches with the router kernels on (every layer), in float32."""
  params = dkt.fused_target(TINY)
  env = {decode_attention.ENV: "off", ple_kernels.ENV: "off"}
  ref, ref_kv, ref_jaxpr = dkt.decode_steps(TINY, params, {**env, moe_kernels.ENV: "off"},
                                            monkeypatch)
  got, kv, jaxpr = dkt.decode_steps(TINY, params, {**env, moe_kernels.ENV: "on"}, monkeypatch)
  # the step's layers (the prefill, a forward without a cache, is XLA's either way)
  assert (ref_jaxpr.count("name=moe_router"), jaxpr.count("name=moe_router")) == (
      0, TINY.num_layers)
  np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * np.abs(ref).max())
  for a, b in zip(kv, ref_kv):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())


def test_kernels_lower_for_the_gpu(monkeypatch):
  """A 26B-A4B-shaped bf16 decode step lowers to Triton (exported for CUDA on the CPU): two
  kernels a layer more with the router kernels on than off."""
  monkeypatch.setenv(decode_attention.ENV, "off")
  counts = []
  for mode in ("off", "on"):
    monkeypatch.setenv(moe_kernels.ENV, mode)
    counts.append(dkt.triton_kernels_lowered(TINY, "gemma4_26b_a4b", monkeypatch))
  (off, layers_off), (on, layers_on) = counts
  assert layers_on == layers_off and on - off == 2 * layers_on
