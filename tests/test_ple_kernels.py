"""The end of a PLE layer at one position a row as Pallas kernels (ple_kernels) against XLA's.

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
from gemma_mtp import kv_cache as kvc
from gemma_mtp import model as model_lib
from gemma_mtp import params as params_lib
from gemma_mtp import ple_kernels
from gemma_mtp import quant

# Per-layer inputs of 32, a 96-wide residual (not a power of two: the kernels' chunks), the last
# two layers KV-shared, double-wide MLPs there; head dims the attention kernels take.
TINY = config_lib.tiny(embed_dim=96, head_dim=32, global_head_dim=64, num_kv_shared_layers=2,
                       per_layer_dim=32, per_layer_vocab_size=256, double_wide_mlp=True)
PROMPT, STEPS, MAX_LEN = 13, 5, 40


def _steps(cfg, params, mode, monkeypatch, *, batch=2, attention="on"):
  """Prefill (XLA) then STEPS one-position forwards with the PLE kernels switched `mode` (and
  the attention kernels `attention`): the logits of every step [STEPS, B, V] and the last
  cache's buffers as float32 numpy arrays, and the step program's Pallas kernels by name."""
  monkeypatch.setenv(ple_kernels.ENV, mode)
  monkeypatch.setenv(decode_attention.ENV, attention)
  jax.clear_caches()
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(1, cfg.vocab_size, (batch, PROMPT)), jnp.int32)
  start = jnp.asarray([0, 3, 1, 5][:batch], jnp.int32)       # left padding
  fed = jnp.asarray(rng.integers(1, cfg.vocab_size, (STEPS, batch, 1)), jnp.int32)
  step = jax.jit(lambda p, tok, cache: model_lib.forward(p, tok, config=cfg, cache=cache))
  with jax.default_matmul_precision("float32"):
    _, cache = model_lib.prefill(params, tokens, start, config=cfg, max_len=MAX_LEN)
    logits = []
    for tok in fed:          # the same tokens fed to every run
      out = step(params, tok, cache)
      cache = out.cache
      logits.append(np.asarray(out.logits[:, 0], np.float32))
    jaxpr = str(jax.make_jaxpr(step)(params, fed[0], cache))
  jax.clear_caches()
  kv = [np.asarray(x, np.float32) for x in (*cache.k, *cache.v) if x is not None]
  names = {n: jaxpr.count(f"name={n}") for n in ("ple_gate", "ple_proj", "ple_finish")}
  return np.stack(logits), kv, names


def _target(cfg, seed=0):
  t = gemma_mtp.random_target(cfg, seed=seed)
  return model_lib.fuse_projections(t.params, cfg)


@pytest.mark.parametrize("case", ["batch 2", "padded rows",
                                  "padded rows, copies, the attention kernels",
                                  "one row, one gate part", "checkpoint layout"])
def test_decode_steps_equal_xla_float32(monkeypatch, case):
  """In float32 only the summation order differs: five decode steps after a 13-token prompt
  (left-padded rows, KV-shared layers) give XLA's logits and caches, with three kernels a layer.
  Cases (XLA's attention, which slices a padded input back to its rows, unless named): two
  rows; one row whose next projections' inputs the finish kernel pads to two rows, as on GPUs
  (`quant.pad_one_row`), with zeros, or with copies of the row into the attention kernels,
  which take the padded input as it is; one row, no padding, the PLE gate in one contraction
  part instead of two; the checkpoint layout (q, k, v separate)."""
  if case.endswith("one gate part"):
    monkeypatch.setattr(ple_kernels, "GATE_PARTS", 1)
    assert ple_kernels._gate_split(96, 32)[0] == 1
  if case.startswith("padded rows"):
    monkeypatch.setattr(quant, "PAD_ONE_ROW_BACKENDS", (jax.default_backend(),))
  if "copies" in case:
    monkeypatch.setattr(quant, "PAD_ROWS_WITH", "copy")
  params = (gemma_mtp.random_target(TINY).params if case == "checkpoint layout"
            else _target(TINY))
  batch = 2 if case == "batch 2" else 1
  attention = "on" if "attention kernels" in case else "off"
  ref, ref_kv, ref_names = _steps(TINY, params, "off", monkeypatch, batch=batch,
                                  attention=attention)
  got, kv, names = _steps(TINY, params, "on", monkeypatch, batch=batch, attention=attention)
  assert set(ref_names.values()) == {0}
  assert set(names.values()) == {TINY.num_layers}, names
  np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * np.abs(ref).max())
  for a, b in zip(kv, ref_kv):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())


def test_no_pads_between_layers(monkeypatch):
  """Where one-row matmuls are padded to two rows, the finish kernel writes the next layer's
  q|k|v input with its second row, and the PLE gate and projection GEMMs are kernels: the
  traced step pads three one-row inputs fewer a layer (the gate's, the projection's, the next
  q|k|v input) than XLA's, bar the first layer's (the attention kernels on in both, which take the
  padded input; XLA's attention would slice and pad it again)."""
  monkeypatch.setattr(quant, "PAD_ONE_ROW_BACKENDS", (jax.default_backend(),))
  monkeypatch.setenv(decode_attention.ENV, "on")
  params = _target(TINY)
  pads = {}
  for mode in ("off", "on"):
    monkeypatch.setenv(ple_kernels.ENV, mode)
    _, cache = model_lib.prefill(params, jnp.ones((1, PROMPT), jnp.int32), jnp.zeros((1,),
                                 jnp.int32), config=TINY, max_len=MAX_LEN)
    jaxpr = str(jax.make_jaxpr(lambda p, c: model_lib.forward(
        p, jnp.ones((1, 1), jnp.int32), config=TINY, cache=c).logits)(params, cache))
    pads[mode] = jaxpr.count("concatenate")
  assert pads["off"] - pads["on"] == 3 * TINY.num_layers - 1, pads


def test_bfloat16_as_accurate_as_xla(monkeypatch):
  """In bfloat16 the kernels round where the model rounds (XLA fuses elementwise ops and may
  round less). Measured against float32 arithmetic on the same bf16 weights, the kernels' five
  steps are about as accurate as XLA's (mean relative error of the logits at most 1.2x XLA's),
  and the greedy tokens of the first step agree."""
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
  """The kernels take one position a row with a cache and no tree, in models with per-layer
  inputs, no MoE and float PLE weights (E2B and E4B, not 31B or 26B-A4B); the automatic switch
  only up to AUTO_MAX_BATCH rows and only on one GPU, =on at any batch, =off never."""
  shapes = lambda cfg: jax.eval_shape(lambda: params_lib.init_params(cfg, jax.random.PRNGKey(0)))
  for name in ("gemma4_e2b", "gemma4_e4b"):
    cfg = config_lib.preset(name)
    assert ple_kernels.supported(cfg, shapes(cfg)) is None, name
  assert "no per-layer" in ple_kernels.supported(config_lib.tiny(), {"layers": []})
  moe = config_lib.tiny(per_layer_dim=16, per_layer_vocab_size=256, num_experts=4,
                        num_experts_per_token=2, expert_dim=32)
  assert ple_kernels.supported(moe, shapes(moe)) == "MoE layers"
  params = _target(TINY)
  int8 = gemma_mtp.quantize_target(gemma_mtp.Target(TINY, params)).params
  assert ple_kernels.supported(TINY, int8) == "int8 PLE weights"
  big = ple_kernels.AUTO_MAX_BATCH + 1
  monkeypatch.setenv(ple_kernels.ENV, "on")
  assert ple_kernels.choose(TINY, params, big, 1, True, None)
  assert not ple_kernels.choose(TINY, params, 1, 2, True, None)     # verification, prefill
  assert not ple_kernels.choose(TINY, params, 1, 1, False, None)    # no cache
  monkeypatch.setenv(ple_kernels.ENV, "off")
  assert not ple_kernels.choose(TINY, params, 1, 1, True, None)
  monkeypatch.setenv(ple_kernels.ENV, "auto")
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  assert ple_kernels.choose(TINY, params, ple_kernels.AUTO_MAX_BATCH, 1, True, None)
  assert not ple_kernels.choose(TINY, params, big, 1, True, None)
  monkeypatch.setattr(jax, "device_count", lambda: 2)                # sharded: XLA's path
  assert not ple_kernels.choose(TINY, params, 1, 1, True, None)


@pytest.mark.parametrize("name", ["tiny", "gemma4_e4b", "gemma4_e2b"])
def test_kernels_lower_for_the_gpu(monkeypatch, name):
  """A decode step lowers to Triton (exported for CUDA on the CPU): three kernels a layer (the
  attention kernels off), for the tiny model and the E4B and E2B shapes. What is not checked
  here is Triton's own compilation of that IR, which needs a GPU."""
  from gemma_mtp import drafter_kernels
  monkeypatch.setattr(drafter_kernels, "_interpret", lambda: False)
  monkeypatch.setenv(ple_kernels.ENV, "on")
  monkeypatch.setenv(decode_attention.ENV, "off")
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
  assert exported.mlir_module().count("xla.gpu.triton") == 3 * cfg.num_layers


def test_generate_with_kernels_equals_xla(monkeypatch):
  """Plain greedy decoding (`api.generate`: the decode loop) emits the same tokens with the
  kernels as without, in float32, on ragged prompts longer than the sliding window; and
  speculative decoding with a drafter still emits plain decoding's tokens while the plain steps
  run the kernels."""
  target = gemma_mtp.fuse_target(gemma_mtp.random_target(TINY, seed=3))
  drafter = gemma_mtp.random_drafter(target, seed=4, embed_dim=32, num_heads=4, mlp_dim=64)
  rng = np.random.default_rng(1)
  prompts = [rng.integers(1, TINY.vocab_size, n).tolist() for n in (11, 6)]
  traced = []
  tail = ple_kernels.tail
  monkeypatch.setattr(ple_kernels, "tail", lambda *a, **k: traced.append(1) or tail(*a, **k))
  out = {}
  for mode in ("off", "on"):
    monkeypatch.setenv(ple_kernels.ENV, mode)
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
