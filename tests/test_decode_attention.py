"""The target's one-position attention as Pallas kernels (decode_attention) against XLA's.

Off the GPU the kernels run in Pallas's interpreter; on a GPU the same tests run the compiled
Triton kernels.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma_mtp
from gemma_mtp import config as config_lib
from gemma_mtp import decode_attention
from gemma_mtp import drafter_kernels
from gemma_mtp import kv_cache as kvc
from gemma_mtp import model as model_lib
from gemma_mtp import params as params_lib
from gemma_mtp import quant

# Head dims 32 / 64 (half a head a power of two >= 16); the last two layers KV-shared (one of
# each kind); a sliding window of 8, so the ring wraps within the prompt.
TINY = config_lib.tiny(head_dim=32, global_head_dim=64, num_kv_shared_layers=2)
PROMPT, STEPS, MAX_LEN = 13, 5, 40


def _steps(cfg, params, mode, monkeypatch, *, batch=2, steps=STEPS):
  """Prefill (XLA) then `steps` one-position forwards with the kernels switched `mode`: the
  logits of every step [steps, B, V] and the last cache's buffers, as float32 numpy arrays, and
  whether the step's program holds a Pallas kernel."""
  monkeypatch.setenv(decode_attention.ENV, mode)
  jax.clear_caches()
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(1, cfg.vocab_size, (batch, PROMPT)), jnp.int32)
  start = jnp.asarray([0, 3, 1, 5][:batch], jnp.int32)       # left padding
  fed = jnp.asarray(rng.integers(1, cfg.vocab_size, (steps, batch, 1)), jnp.int32)
  step = jax.jit(lambda p, tok, cache: model_lib.forward(p, tok, config=cfg, cache=cache))
  with jax.default_matmul_precision("float32"):
    _, cache = model_lib.prefill(params, tokens, start, config=cfg, max_len=MAX_LEN)
    logits = []
    for tok in fed:          # the same tokens fed to every run (not each run's greedy choice)
      out = step(params, tok, cache)
      cache = out.cache
      logits.append(np.asarray(out.logits[:, 0], np.float32))
    kernels = "pallas_call" in str(jax.make_jaxpr(step)(params, fed[0], cache))
  jax.clear_caches()
  kv = [np.asarray(x, np.float32) for x in (*cache.k, *cache.v) if x is not None]
  return np.stack(logits), kv, kernels


def _target(cfg, seed=0):
  t = gemma_mtp.random_target(cfg, seed=seed)
  return model_lib.fuse_projections(t.params, cfg)


@pytest.mark.parametrize("case", ["tiny", "k_eq_v", "looped ranges", "one chunk a range",
                                  "padded rows", "padded rows, int8", "one row"])
def test_decode_steps_equal_xla_float32(monkeypatch, case):
  """In float32 only the summation order differs: five decode steps after a 13-token prompt
  (left-padded rows, the sliding ring wrapped, KV-shared layers of both kinds) give XLA's logits
  and caches. Cases: the tiny model (4-slot chunks: 2-8 ranges a head, some past the cache's end,
  combined by the rows kernel); full layers whose values are their raw keys (k_eq_v, as 31B and
  26B-A4B); each program walking its chunks in a loop (long caches); ranges of about one chunk
  (`RANGE_CHUNKS`: the sliding ring in two ranges instead of one); the o projection's input
  given its padded second row by the rows kernel, as on GPUs (`quant.pad_one_row`), also with
  int8 weights (where the rows kernel leaves the padding to `quant.einsum`); one row."""
  cfg = TINY.replace(k_eq_v=True) if case == "k_eq_v" else TINY
  monkeypatch.setattr(drafter_kernels, "SLOTS_PER_CHUNK", 4)
  if case == "looped ranges":
    monkeypatch.setattr(drafter_kernels, "UNROLL", 1)
  if case == "one chunk a range":
    monkeypatch.setattr(decode_attention, "RANGE_CHUNKS", 1)
    # the sliding ring's 8 slots: 2 ranges of one chunk instead of one of two
    assert drafter_kernels._chunking(8, 32, 1) == (4, 2, 2)
    assert drafter_kernels._chunking(8, 32) == (4, 2, 1)
  if case.startswith("padded rows"):
    monkeypatch.setattr(quant, "PAD_ONE_ROW_BACKENDS", (jax.default_backend(),))
  assert drafter_kernels._chunking(MAX_LEN, 64) == (4, 10, 8)
  params = _target(cfg)
  if case.endswith("int8"):   # int8 weights: the o projection's input keeps one row
    params = gemma_mtp.quantize_target(gemma_mtp.Target(cfg, params)).params
    assert quant.is_quantized(params["layers"][0]["attn"]["o"])
  if case == "k_eq_v":
    assert "qk" in params["layers"][2]["attn"]
  batch = 1 if case.startswith(("padded rows", "one row")) else 2
  ref, ref_kv, ref_kernels = _steps(cfg, params, "off", monkeypatch, batch=batch)
  got, kv, kernels = _steps(cfg, params, "on", monkeypatch, batch=batch)
  assert (ref_kernels, kernels) == (False, True)
  np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * np.abs(ref).max())
  for a, b in zip(kv, ref_kv):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())


def test_padded_rows_reach_the_o_projection_without_a_pad(monkeypatch):
  """Where one-row matmuls are padded to two rows, the rows kernel writes the o projection's
  two-row input itself: the traced step pads fewer one-row inputs than XLA's (one per layer,
  the o projection's), and the second row is zero."""
  monkeypatch.setattr(quant, "PAD_ONE_ROW_BACKENDS", (jax.default_backend(),))
  params = _target(TINY)
  pads = {}
  for mode in ("off", "on"):
    monkeypatch.setenv(decode_attention.ENV, mode)
    _, cache = model_lib.prefill(params, jnp.ones((1, PROMPT), jnp.int32), jnp.zeros((1,),
                                 jnp.int32), config=TINY, max_len=MAX_LEN)
    jaxpr = str(jax.make_jaxpr(lambda p, c: model_lib.forward(
        p, jnp.ones((1, 1), jnp.int32), config=TINY, cache=c).logits)(params, cache))
    pads[mode] = jaxpr.count("concatenate")
  # XLA's step pads q|k|v (or q) and o, MLP and head per layer; the kernels' step not o.
  assert pads["off"] - pads["on"] >= TINY.num_layers


def test_bfloat16_as_accurate_as_xla(monkeypatch):
  """In bfloat16 the kernels round where the model rounds, but normalise the softmax after the
  value product (XLA rounds the probabilities first) and XLA fuses elementwise ops. Measured
  against float32 arithmetic on the same bf16 weights, the kernels' five steps are about as
  accurate as XLA's (mean relative error of the logits at most 1.2x XLA's; measured here: 6.1%
  against 6.0%), and the greedy tokens of the first step agree."""
  cfg = TINY.replace(dtype="bfloat16", param_dtype="bfloat16")
  params = _target(cfg)
  ref, _, _ = _steps(cfg, params, "off", monkeypatch)
  got, _, _ = _steps(cfg, params, "on", monkeypatch)
  f32 = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params)
  exact, _, _ = _steps(cfg.replace(dtype="float32", param_dtype="float32"), f32, "off",
                       monkeypatch)
  err = lambda x: np.abs(x - exact).mean() / np.abs(exact).mean()
  assert err(got) <= 1.2 * err(ref), (err(got), err(ref))
  np.testing.assert_array_equal(got[0].argmax(-1), ref[0].argmax(-1))


def test_choose(monkeypatch):
  """The kernels take one position a row with a cache and no tree, and heads whose half is a
  power of two >= 16 (every released shape; not the tiny default's 16 / 32); the automatic
  switch only up to AUTO_MAX_BATCH rows and only on a GPU, =on at any batch, =off never."""
  for name in ("gemma4_e2b", "gemma4_e4b", "gemma4_31b", "gemma4_26b_a4b"):
    assert decode_attention.supported(config_lib.preset(name)) is None, name
  assert "half of a head" in decode_attention.supported(config_lib.tiny())
  big = decode_attention.AUTO_MAX_BATCH + 1
  monkeypatch.setenv(decode_attention.ENV, "on")
  assert decode_attention.choose(TINY, big, 1, True, None)
  assert not decode_attention.choose(TINY, 1, 2, True, None)        # verification, prefill
  assert not decode_attention.choose(TINY, 1, 1, False, None)       # no cache
  assert not decode_attention.choose(config_lib.tiny(), 1, 1, True, None)
  monkeypatch.setenv(decode_attention.ENV, "off")
  assert not decode_attention.choose(TINY, 1, 1, True, None)
  monkeypatch.setenv(decode_attention.ENV, "auto")
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  assert decode_attention.choose(TINY, decode_attention.AUTO_MAX_BATCH, 1, True, None)
  assert not decode_attention.choose(TINY, big, 1, True, None)
  monkeypatch.setattr(jax, "device_count", lambda: 2)                # sharded: XLA's path
  assert not decode_attention.choose(TINY, 1, 1, True, None)


@pytest.mark.parametrize("name", ["tiny", "gemma4_e4b", "gemma4_31b"])
def test_kernels_lower_for_the_gpu(monkeypatch, name):
  """A decode step lowers to Triton (exported for CUDA on the CPU): two kernels a layer, for the
  tiny model and the E4B and 31B shapes at a 1k-slot cache. What is not checked here is
  Triton's own compilation of that IR, which needs a GPU."""
  monkeypatch.setattr(drafter_kernels, "_interpret", lambda: False)
  monkeypatch.setenv(decode_attention.ENV, "on")
  cfg = TINY if name == "tiny" else config_lib.preset(name)
  if name != "tiny":   # two layers of each kind are enough to lower
    layers = tuple(cfg.layer_types[:cfg.layer_types.index("full") + 1]) * 2
    cfg = cfg.replace(layer_types=layers, num_kv_shared_layers=0)
  cfg = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
  params = jax.eval_shape(lambda: model_lib.fuse_projections(
      params_lib.init_params(cfg, jax.random.PRNGKey(0)), cfg))
  cache = jax.eval_shape(lambda: kvc.init_cache(cfg, 1, 1024))
  exported = jax.export.export(
      jax.jit(lambda p, c: model_lib.forward(p, jnp.ones((1, 1), jnp.int32), config=cfg,
                                             cache=c).logits), platforms=["cuda"],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
          params, cache)
  assert exported.mlir_module().count("xla.gpu.triton") == 2 * cfg.num_layers


def test_generate_with_kernels_equals_xla(monkeypatch):
  """Plain greedy decoding (`api.generate`: the decode loop, the cache updated in place in its
  while loop) emits the same tokens with the kernels as without, in float32, on ragged prompts
  longer than the sliding window; and speculative decoding with a drafter still emits plain
  decoding's tokens while the plain steps run the kernels."""
  target = gemma_mtp.fuse_target(gemma_mtp.random_target(TINY, seed=3))
  drafter = gemma_mtp.random_drafter(target, seed=4, embed_dim=32, num_heads=4, mlp_dim=64)
  rng = np.random.default_rng(1)
  prompts = [rng.integers(1, TINY.vocab_size, n).tolist() for n in (11, 6)]
  traced = []                      # the layers traced through the kernels
  call = decode_attention.Step.__call__
  monkeypatch.setattr(decode_attention.Step, "__call__",
                      lambda self, *a, **k: traced.append(a[-1]) or call(self, *a, **k))
  out = {}
  for mode in ("off", "on"):
    monkeypatch.setenv(decode_attention.ENV, mode)
    assert len(traced) == 0
    jax.clear_caches()
    with jax.default_matmul_precision("float32"):
      out[mode] = np.asarray(gemma_mtp.generate(target, prompts, max_new_tokens=8).tokens)
      if mode == "on":
        spec = gemma_mtp.generate(target, prompts, max_new_tokens=8, drafter=drafter,
                                  draft_lengths=(2,), adaptive=False)
  jax.clear_caches()
  assert len(traced) == TINY.num_layers      # one plain decode program, every layer
  np.testing.assert_array_equal(out["on"], out["off"])
  np.testing.assert_array_equal(np.asarray(spec.tokens), out["on"])
