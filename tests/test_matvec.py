"""The few-row Pallas matmul kernels (gemma_mtp/matvec.py), run by Pallas's interpreter on the CPU.

The kernels compute the same function as XLA's matmul: float32 accumulation over the same bf16
(or int8) values, so they agree with a float32 reference of those values up to summation order.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_mtp import config as config_lib
from gemma_mtp import matvec
from gemma_mtp import model as model_lib
from gemma_mtp import params as params_lib
from gemma_mtp import quant

BF16 = jnp.bfloat16


@pytest.fixture
def kernels_on(monkeypatch):
  """Kernels on (Pallas's interpreter on the CPU), for int8 weights of any size."""
  monkeypatch.setenv(matvec.ENV, "on")
  monkeypatch.setattr(matvec, "MIN_INT8_SIZE", 0)


def _rand(seed, shape, dtype=BF16):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32).astype(dtype)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("split", [1, 4])
def test_matmul_equals_float32_reference(rows, split):
  x, w = _rand(rows, (rows, 256)), _rand(100 + rows, (256, 128))
  cfg = matvec.BlockConfig(block_n=64, block_k=32, split_k=split)
  y = matvec.matmul(x, w, cfg=cfg)
  ref = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision="highest")
  assert y.shape == (rows, 128) and y.dtype == jnp.float32
  assert _rel(y, ref) < 1e-5


def test_matmul_rejects_too_many_rows():
  with pytest.raises(ValueError, match="at most"):
    matvec.matmul(_rand(0, (matvec.MAX_ROWS + 1, 64)), _rand(1, (64, 64)))


def test_int8_matmul_applies_column_scales():
  x, w = _rand(0, (2, 128)), _rand(1, (128, 64))
  qw = quant.quantize(w, (0,))
  y = matvec.matmul(x, qw.q, qw.scale[0], cfg=matvec.BlockConfig(32, 64, 2))
  ref = jnp.dot(x.astype(jnp.float32), qw.q.astype(jnp.float32)) * qw.scale[0]
  assert _rel(y, ref) < 1e-5


def test_gathered_matmul_reads_each_rows_expert():
  experts = _rand(0, (5, 128, 64))
  idx = jnp.array([3, 0, 3, 4, 1, 1])
  x = _rand(1, (6, 128))
  y = matvec.gathered_matmul(x, experts, idx, cfg=matvec.BlockConfig(32, 32, 2))
  ref = jnp.einsum("pk,pkn->pn", x.astype(jnp.float32), experts[idx].astype(jnp.float32))
  assert _rel(y, ref) < 1e-5
  # Rows with the same expert but different inputs differ; a wrong index would show here.
  assert _rel(y[:1], jnp.dot(x[:1].astype(jnp.float32), experts[0].astype(jnp.float32))) > 0.5


def test_gathered_matmul_reads_shared_rows_in_place():
  """`per_row`: pair p reads row p // per_row of x, as if x were copied to a row per pair; rows
  that do not match the experts are refused."""
  experts = _rand(0, (5, 128, 64))
  idx = jnp.array([3, 0, 3, 4, 1, 1])
  x = _rand(1, (3, 128))
  cfg = matvec.BlockConfig(32, 32, 2)
  y = matvec.gathered_matmul(x, experts, idx, cfg=cfg, per_row=2)
  copied = matvec.gathered_matmul(x[jnp.array([0, 0, 1, 1, 2, 2])], experts, idx, cfg=cfg)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(copied))
  # Pairs 2 and 3 read row 1: against row 0 they differ.
  first = matvec.gathered_matmul(jnp.repeat(x[:1], 6, axis=0), experts, idx, cfg=cfg)
  assert _rel(first[2:4], y[2:4]) > 0.5
  with pytest.raises(ValueError, match="experts a row"):
    matvec.gathered_matmul(x, experts, idx, cfg=cfg)


@pytest.mark.parametrize("chunk_axis", [0, 1])
def test_with_dense_chunks_runs_experts_and_a_dense_weight(chunk_axis):
  """Token t's k experts, then the 3 chunks of a dense weight (its columns, as a gate|up's, on
  a row of their own; or its rows, as a down projection's, a row a group) in one call: each
  group equals its own product; shapes that do not match are refused."""
  m, k, c = 2, 2, 3
  experts, idx = _rand(0, (5, 128, 64)), jnp.array([[3, 0], [4, 3]])
  cfg = matvec.BlockConfig(32, 32, 2)
  f32 = lambda a: np.asarray(a, np.float32)
  if chunk_axis == 1:
    x, dense_x, dense = _rand(1, (m, 128)), _rand(2, (m + 1, 128)), _rand(3, (128, c * 64))
    xs = np.repeat(f32(x)[:, None], k, axis=1)
    want = f32(dense_x[:m]) @ f32(dense)                         # [M, C * N]: the chunks' columns
  else:
    x, dense_x, dense = _rand(1, (m * (k + c), 128)), None, _rand(3, (c * 128, 64))
    xs = f32(x).reshape(m, k + c, 128)[:, :k]
    rows = f32(x).reshape(m, k + c, 128)[:, k:]
    want = np.einsum("mck,ckn->mcn", rows, f32(dense).reshape(c, 128, 64))
  y = matvec.with_dense_chunks(x, experts, idx, dense, chunks=c, chunk_axis=chunk_axis,
                               dense_x=dense_x, cfg=cfg)
  assert y.shape == (m, k + c, 64)
  routed = np.einsum("mjk,mjkn->mjn", xs, f32(experts)[np.asarray(idx)])
  assert _rel(y[:, :k], routed) < 1e-5
  assert _rel(y[:, k:].reshape(want.shape), want) < 1e-5
  with pytest.raises(ValueError, match="chunks of"):
    matvec.with_dense_chunks(x, experts, idx, dense[:-32], chunks=c, chunk_axis=chunk_axis,
                             dense_x=dense_x, cfg=cfg)
  with pytest.raises(ValueError, match="rows"):
    matvec.with_dense_chunks(x[:-1], experts, idx, dense, chunks=c, chunk_axis=chunk_axis,
                             dense_x=dense_x, cfg=cfg)


@pytest.mark.parametrize("shared", [False, True])
def test_gathered_matmul_lowers_to_triton(monkeypatch, shared):
  """The routed experts' kernel lowers to Triton for CUDA (exported on the CPU), with a row per
  pair and with a row per token read by its 4 pairs (`per_row`) and nothing else around it."""
  monkeypatch.setattr(matvec, "_interpret", lambda: False)
  experts = jax.ShapeDtypeStruct((16, 256, 128), BF16)
  x = jax.ShapeDtypeStruct((2 if shared else 8, 256), BF16)
  idx = jax.ShapeDtypeStruct((8,), jnp.int32)
  fn = jax.jit(lambda x, w, i: matvec.gathered_matmul(x, w, i, per_row=4 if shared else 1))
  exported = jax.export.export(
      fn, platforms=["cuda"],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
          x, experts, idx)
  module = exported.mlir_module()
  assert module.count("xla.gpu.triton") == 1 and "iota" not in module


def test_block_config_tiles_the_contraction_exactly():
  for groups, k, n in [(1, 2560, 2048), (1, 10240, 2560), (8, 2816, 1408), (1, 5376, 21504),
                       (64, 704, 2816)]:
    cfg = matvec.block_config(groups, k, n)
    assert n % cfg.block_n == 0 and k % (cfg.block_k * cfg.split_k) == 0
  assert matvec.block_config(1, 100, 128) is None     # no power-of-two block of >= 32
  assert matvec.block_config(1, 128, 48) is None


def test_enabled_reads_the_environment(monkeypatch):
  monkeypatch.setenv(matvec.ENV, "off")
  assert not matvec.enabled()
  monkeypatch.setenv(matvec.ENV, "on")
  assert matvec.enabled()
  monkeypatch.setenv(matvec.ENV, "auto")
  assert matvec.enabled() == (jax.default_backend() == "gpu" and jax.device_count() == 1)
  monkeypatch.setenv(matvec.ENV, "sometimes")
  with pytest.raises(ValueError, match="auto, on or off"):
    matvec.enabled()


@pytest.mark.parametrize("spec,xs,ws,contracted,uses_kernel", [
    ("BTD,DNH->BTNH", (1, 1, 64), (64, 2, 32), (0,), True),
    ("BTNH,NHD->BTD", (1, 1, 2, 32), (2, 32, 64), (0, 1), True),
    ("...D,DI->...I", (1, 1, 64), (64, 128), (0,), True),
    ("BTD,VD->BTV", (1, 1, 64), (128, 64), (1,), False),     # contracted axis last: XLA
    ("BTD,DI->BTI", (1, 5, 64), (64, 128), (0,), False),     # several rows: XLA
])
def test_quant_einsum_through_the_kernel_equals_xla(kernels_on, monkeypatch, spec, xs, ws,
                                                    contracted, uses_kernel):
  calls = _count_calls(monkeypatch, "matmul")
  x, w = _rand(0, xs), _rand(1, ws)
  for weight in (w, quant.quantize(w, contracted).astype(BF16)):
    calls.clear()
    y = quant.einsum(spec, x, weight)
    # Only one-row int8 matmuls go through the kernel (otherwise XLA is as fast, see matvec).
    assert bool(calls) == (uses_kernel and quant.is_quantized(weight))
    monkeypatch.setenv(matvec.ENV, "off")
    ref = quant.einsum(spec, x, weight)
    monkeypatch.setenv(matvec.ENV, "on")
    assert y.shape == ref.shape and y.dtype == ref.dtype
    assert _rel(y.astype(jnp.float32), ref.astype(jnp.float32)) < 1e-2


def test_small_int8_weights_stay_with_xla(monkeypatch):
  monkeypatch.setenv(matvec.ENV, "on")
  calls = _count_calls(monkeypatch, "matmul")
  w = quant.quantize(_rand(1, (64, 128)), (0,)).astype(BF16)
  quant.einsum("MD,DF->MF", _rand(0, (1, 64)), w)
  assert not calls and w.size < matvec.MIN_INT8_SIZE


def _count_calls(monkeypatch, name: str) -> list:
  calls = []
  real = getattr(matvec, name)
  monkeypatch.setattr(matvec, name, lambda *a, **k: calls.append(1) or real(*a, **k))
  return calls


@pytest.mark.parametrize("moe", [False, True])
def test_bf16_model_forward_with_kernels_matches_xla(kernels_on, monkeypatch, moe):
  """int8 dense weights and routed experts (bf16 and int8) go through the kernels (the experts
  also with a token's row shared by its pairs, `matvec.SHARED_ROWS`)."""
  kw = dict(num_experts=8, num_experts_per_token=2, expert_dim=64) if moe else {}
  cfg = config_lib.tiny(dtype="bfloat16", param_dtype="bfloat16", **kw)
  params = params_lib.init_params(cfg, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 1), 0, cfg.vocab_size)
  dense, routed = _count_calls(monkeypatch, "matmul"), _count_calls(monkeypatch, "gathered_matmul")

  def logits(p, mode):
    monkeypatch.setenv(matvec.ENV, mode)
    return model_lib.forward(p, tokens, config=cfg).logits.astype(jnp.float32)

  y, ref = logits(params, "on"), logits(params, "off")
  assert not dense and len(routed) == (2 * cfg.num_layers if moe else 0)
  if moe:   # a token's row read in place by its experts (matvec.SHARED_ROWS): the same logits
    monkeypatch.setattr(matvec, "SHARED_ROWS", True)
    np.testing.assert_array_equal(np.asarray(logits(params, "on")), np.asarray(y))
    monkeypatch.setattr(matvec, "SHARED_ROWS", False)
    routed.clear()
  assert _rel(y, ref) < 2e-2
  assert jnp.argmax(y[0, -1]) == jnp.argmax(ref[0, -1])
  qparams = quant.quantize_params(params, cfg)
  routed.clear()
  yq, refq = logits(qparams, "on"), logits(qparams, "off")
  assert len(dense) >= 6 * cfg.num_layers     # q, k, v (or k only), o, gate, up, down
  assert len(routed) == (2 * cfg.num_layers if moe else 0)
  assert _rel(yq, refq) < 2e-2
  assert jnp.argmax(yq[0, -1]) == jnp.argmax(refq[0, -1])


@pytest.mark.parametrize("x_dim", [2, 3])
def test_expert_matmul_with_shared_rows_equals_a_row_per_pair(kernels_on, monkeypatch, x_dim):
  """`matvec.SHARED_ROWS` reads a token's row in place for its k experts ([M, D] x) and gives
  the broadcast path's values bit for bit; [M, k, D] x (the down projection's input) keeps a
  row per pair either way. Both through the kernel, bf16 and int8 experts."""
  w = _rand(0, (8, 64, 32))
  experts = jnp.array([[3, 5], [0, 3], [7, 1]])
  x = _rand(1, (3, 64) if x_dim == 2 else (3, 2, 64))
  calls = _count_calls(monkeypatch, "gathered_matmul")
  for weights in (w, quant.quantize(w, (1,))):
    out = {}
    for shared in (False, True):
      monkeypatch.setattr(matvec, "SHARED_ROWS", shared)
      out[shared] = np.asarray(quant.expert_matmul(x, weights, experts).astype(jnp.float32))
    np.testing.assert_array_equal(out[True], out[False])
    monkeypatch.setenv(matvec.ENV, "off")
    ref = np.asarray(quant.expert_matmul(x, weights, experts).astype(jnp.float32))
    monkeypatch.setenv(matvec.ENV, "on")
    assert _rel(out[True], ref) < 1e-2
  assert len(calls) == 4


def test_gathered_expert_path_reaches_one_pair_per_expert_with_the_kernel(monkeypatch):
  from gemma_mtp import layers  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv(matvec.ENV, "on")
  assert layers.gathers_experts(16, 8, 128) and not layers.gathers_experts(17, 8, 128)
  monkeypatch.setenv(matvec.ENV, "off")
  assert layers.gathers_experts(4, 8, 128) and not layers.gathers_experts(5, 8, 128)


def test_expected_experts_read_counts_distinct_experts():
  from gemma_mtp import bench  # pylint: disable=g-import-not-at-top
  cfg = config_lib.tiny(num_experts=128, num_experts_per_token=8, expert_dim=64)
  assert bench.expected_experts_read(cfg, 1) == pytest.approx(8)
  # 8 tokens: fewer distinct experts than the 64 pairs (some are shared).
  assert 8 * 8 * 0.8 < bench.expected_experts_read(cfg, 8) < 64


def test_benchmark_forwards_route_rows_and_positions_apart(monkeypatch):
  """The benchmark's timed forwards feed distinct ids, so a MoE layer reads experts for every row
  and position as real decoding does (one repeated id would route all of them to k experts and
  read far fewer bytes than the record counts)."""
  from gemma_mtp import bench, layers  # pylint: disable=g-import-not-at-top
  ids = bench.forward_ids(jnp.ones((8,), jnp.int32), 5, 1000)
  assert ids.shape == (8, 5) and len(np.unique(np.asarray(ids))) == 40
  assert int(bench.forward_ids(jnp.array([999], jnp.int32), 2, 1000)[0, 1]) == 0   # mod vocab


  cfg = config_lib.tiny(num_experts=16, num_experts_per_token=2, expert_dim=32,
                        layer_types=config_lib.pattern(2, 2))
  params = bench.random_params(params_lib.param_specs(cfg), cfg, jax.random.PRNGKey(0))
  routed, real = [], layers.route
  def spy(x, p, **kw):
    weights, experts = real(x, p, **kw)
    jax.debug.callback(lambda e: routed.append(np.asarray(e)), experts)
    return weights, experts
  monkeypatch.setattr(layers, "route", spy)
  batch, chunk = 4, 2
  cache = bench.synthetic_cache(cfg, batch, 16, chunk)
  bench.decode_loop(params, cache, jnp.ones((batch,), jnp.int32), jnp.int32(4), jnp.int32(1),
                    config=cfg, chunk=chunk)
  jax.effects_barrier()
  assert routed and all(e.shape == (batch * chunk, 2) for e in routed)
  # 8 tokens over 16 experts, 2 each: ~10 distinct expected under uniform routing; 2 if alike.
  assert all(len(np.unique(e)) > 4 for e in routed), [np.unique(e) for e in routed]
