"""int8 weight-only quantization (quant.py).

Checked: the per-channel rounding bound; which weights are quantized and what they store (int8
bytes, at tiny and at real sizes via eval_shape); the quantized ops equal the float model run on
the dequantized weights (so every einsum, gather and ragged_dot applies the right scales); the
logit error against the float model; plain and speculative decoding of an int8 target (greedy
speculative output = plain greedy output of the same int8 target); Orbax round trip; scale
shardings. The 8-fake-device run of an int8 model is in tests/test_sharding.py.

Measured int8-vs-float logit error (float32 compute, weights and embeddings quantized):
  tiny random model (PLE below), 80 positions: rms(err) / rms(logits) 0.09, top-1 agreement 0.94.
    Random tiny models are sensitive: Gaussian noise of about the int8 rounding error (0.6% of
    each weight's std; int8 measures 0.55-0.70%) added to the float weights moves the logits as
    much (0.08, top-1 0.94), so the bound there is loose;
  the trained demo target (10M parameters), 256 tokens of code: rms ratio 0.010, top-1 agreement
    0.98, KL(float || int8) 7e-4 nats per token.
"""

from __future__ import annotations

import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma_mtp
from gemma_mtp import checkpoint
from gemma_mtp import config as config_lib
from gemma_mtp import demo
from gemma_mtp import layers
from gemma_mtp import model as model_lib
from gemma_mtp import params as params_lib
from gemma_mtp import quant
from tests import sharding_worker
from tests.test_speculative import PROMPTS, agreeing_pair

REPO = pathlib.Path(__file__).resolve().parent.parent
PLE = sharding_worker.ple_config()   # 4 layers: PLE, KV sharing, double-wide MLP
MOE = config_lib.tiny(layer_types=config_lib.pattern(2, 2), num_heads=8, num_kv_heads=4,
                      num_global_kv_heads=2, k_eq_v=True, num_experts=8, num_experts_per_token=2,
                      expert_dim=32)


def _init(cfg, seed=0):
  """Random parameters like params.init_params, drawn with numpy (no per-shape compilation)."""
  rng = np.random.default_rng(seed)

  def one(s):
    if s.init != "normal":
      return jnp.ones(s.shape, jnp.float32)
    fan_in = math.prod(s.shape[a] for a in s.fan_in_axes)
    return jnp.asarray(rng.standard_normal(s.shape, np.float32) / np.sqrt(fan_in))

  return params_lib.map_specs(one, params_lib.param_specs(cfg))


@pytest.fixture(scope="module")
def ple_params():
  return _init(PLE)


# ---- quantize ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,axes,dtype", [
    ((64, 4, 16), (0,), "float32"),      # q [D, N, H]
    ((4, 16, 64), (0, 1), "bfloat16"),   # o [N, H, D]
    ((8, 64, 24), (1,), "float32"),      # expert gate_up [E, D, 2X]
    ((256, 7, 8), (2,), "bfloat16")])    # PLE table [Vp, L, P]
def test_rounding_bound_per_channel(shape, axes, dtype):
  w = (jax.random.normal(jax.random.PRNGKey(0), shape) *
       jnp.exp(jax.random.normal(jax.random.PRNGKey(1), shape))).astype(dtype)
  w = w.at[(0,) * len(shape)].set(0.0)
  zero_channel = tuple(slice(None) if a in axes else 1 for a in range(len(shape)))
  w = w.at[zero_channel].set(0.0)
  qa = quant.quantize(w, axes)
  assert qa.q.dtype == jnp.int8 and qa.q.shape == w.shape and qa.dtype == dtype
  assert qa.scale.dtype == jnp.float32
  assert qa.scale.shape == tuple(1 if a in axes else n for a, n in enumerate(shape))
  assert int(jnp.max(jnp.abs(qa.q.astype(jnp.int32)))) <= quant.QMAX
  wf = w.astype(jnp.float32)
  # In float64; the slack is the float32 rounding of w / scale (a tie may round either way).
  w64, scale = np.asarray(wf, np.float64), np.asarray(qa.scale, np.float64)
  err = np.abs(w64 - np.asarray(qa.q, np.float64) * scale)
  assert np.all(err <= 0.5 * scale + 2.0**-22 * np.abs(w64)), np.max(err / scale)
  # Symmetric absmax: each channel's largest |w| maps to +-127 exactly.
  absmax = jnp.max(jnp.abs(wf), axis=axes, keepdims=True)
  np.testing.assert_allclose(qa.scale, jnp.where(absmax > 0, absmax / 127, 1.0), rtol=1e-7)
  assert bool(jnp.all(qa.q[zero_channel] == 0))
  np.testing.assert_array_equal(quant.dequantize(qa).astype(jnp.float32),
                                (qa.q * qa.scale).astype(dtype).astype(jnp.float32))


def test_quantized_weights_and_bytes(ple_params):
  params = ple_params
  for embeddings in (False, True):
    qp = quant.quantize_params(params, PLE, embeddings=embeddings)
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(
        qp, is_leaf=quant.is_quantized)[0]}
    qnames = {n for n, v in flat.items() if quant.is_quantized(v)}
    want = {"['layers'][0]['attn']['q']", "['layers'][0]['attn']['o']",
            "['layers'][0]['attn']['k']", "['layers'][0]['attn']['v']",
            "['layers'][0]['mlp']['gate']", "['layers'][3]['mlp']['down']",
            "['layers'][0]['ple']['gate']", "['layers'][0]['ple']['proj']", "['ple']['proj']"}
    assert want <= qnames
    assert all(n.endswith(("['q']", "['k']", "['v']", "['o']", "['gate']", "['up']", "['down']",
                           "['proj']", "['embed']")) for n in qnames)
    assert ("['embed']" in qnames) == embeddings == ("['ple']['embed']" in qnames)
    assert not quant.is_quantized(qp["layers"][0]["pre_attn_norm"])
    assert quant.describe(qp) == {"method": quant.METHOD, "embeddings": embeddings}
    # Structure = quantized_specs, shapes and dtypes included.
    want_abs = params_lib.abstract_params(PLE, quant.quantized_specs(PLE,
                                                                        embeddings=embeddings))
    got_abs = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), qp)
    assert jax.tree_util.tree_structure(got_abs) == jax.tree_util.tree_structure(want_abs)
    assert jax.tree_util.tree_leaves(got_abs) == jax.tree_util.tree_leaves(want_abs)
    # Stored bytes: int8 values + one float32 scale per output channel, against bf16.
    qleaves = [v for v in flat.values() if quant.is_quantized(v)]
    stored = sum(v.q.nbytes + v.scale.nbytes for v in qleaves)
    assert all(v.q.dtype == jnp.int8 for v in qleaves)
    bf16 = sum(2 * v.size for v in qleaves)
    assert stored == sum(v.size + 4 * v.scale.size for v in qleaves)
    assert stored / bf16 < 0.56, stored / bf16     # D = 64: the scales add ~6% of int8


@pytest.mark.parametrize("preset", ["gemma4_e2b", "gemma4_26b_a4b"])
def test_real_sizes_store_half_of_bf16(preset):
  """quantize_params traced at real size (eval_shape, no memory) = quantized_specs; bytes ~1/2."""
  cfg = config_lib.preset(preset)
  abstract = params_lib.abstract_params(cfg)
  traced = jax.eval_shape(lambda p: quant.quantize_params(p, cfg, embeddings=True), abstract)
  specs = params_lib.abstract_params(cfg, quant.quantized_specs(cfg, embeddings=True))
  assert jax.tree_util.tree_structure(traced) == jax.tree_util.tree_structure(specs)
  assert jax.tree_util.tree_leaves(traced) == jax.tree_util.tree_leaves(specs)
  ratio = quant.nbytes(traced) / quant.nbytes(abstract)      # abstract is bf16
  assert 0.5 < ratio < 0.51, ratio


# ---- the quantized model ------------------------------------------------------------------------

def _logit_error(logits, ref):
  """(rms(err) / rms(ref), top-1 agreement, mean KL(ref || logits)) over positions."""
  e = quant.logit_error(logits, ref)
  return e["rms_rel"], e["top1_agreement"], e["kl"]


def _assert_close(got, want):
  # Only float32 rounding differs ((x @ q) * s against x @ (q * s)), amplified by the random
  # model (measured <= 3e-5 of the logit range); a scale on a wrong axis costs O(1).
  assert float(jnp.max(jnp.abs(got - want))) <= 1e-4 * float(jnp.max(jnp.abs(want)))


def test_forward_equals_dequantized_model_and_logit_error(ple_params):
  """int8 forward (scales applied to matmul outputs) = float forward on q * scale; and the
  int8-vs-float logit error of the random model (loose: see the module docstring)."""
  qp = quant.quantize_params(ple_params, PLE, embeddings=True)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 40), 0, PLE.vocab_size)
  fwd = jax.jit(lambda p: model_lib.forward(p, tokens, config=PLE).logits)
  got = fwd(qp)
  _assert_close(got, fwd(quant.dequantize_params(qp)))
  err, top1, _ = _logit_error(got, fwd(ple_params))
  assert err < 0.2 and top1 > 0.85, (err, top1)     # measured 0.09, 0.94
  text = fwd.lower(qp).as_text()
  d, n, h = PLE.embed_dim, PLE.num_heads, PLE.head_dim
  assert f"tensor<{d}x{n}x{h}xi8>" in text        # layer q weights enter the program as int8


def test_moe_block_equals_dequantized():
  """Both expert paths: grouped ragged_dot (many tokens) and per-token expert gather (few)."""
  p = quant.quantize_params(_init(MOE), MOE)["layers"][0]["moe"]
  assert quant.is_quantized(p["gate_up"]) and not quant.is_quantized(p["router"])
  moe = jax.jit(lambda p, x: layers.moe(x, p, top_k=MOE.num_experts_per_token, eps=MOE.rms_eps))
  for rows in (24, 1):    # 48 (token, expert) pairs > 8 / 4: grouped; 2 <= 8 / 4: gathered
    assert layers.gathers_experts(rows, MOE.num_experts_per_token, MOE.num_experts) == (rows == 1)
    x = jax.random.normal(jax.random.PRNGKey(rows), (rows, MOE.embed_dim))
    _assert_close(moe(p, x), moe(quant.dequantize_params(p), x))


def test_logit_error_trained_demo_target():
  target, _, tok = demo.load_demo(dtype="float32")
  ids = tok.encode((REPO / "gemma_mtp" / "kv_cache.py").read_text())[:256]
  tokens = jnp.asarray([ids], jnp.int32)
  fwd = jax.jit(lambda p: model_lib.forward(p, tokens, config=target.config).logits)
  qt = gemma_mtp.quantize_target(target, embeddings=True)
  err, top1, kl = _logit_error(fwd(qt.params), fwd(target.params))
  assert err < 0.02 and top1 > 0.95 and kl < 3e-3, (err, top1, kl)  # measured 0.010, 0.98, 7e-4


def test_int8_target_plain_and_speculative_greedy(ple_params):
  """Greedy speculative decoding of an int8 target = its own plain greedy decoding (prefill and
  cached decode of the int8 model); the drafter reads the int8 target's embedding (quantized too)
  and its tap K/V."""
  target, drafter = agreeing_pair(PLE, residual_scale=0.3,
                                  target=gemma_mtp.Target(PLE, ple_params))
  qt = gemma_mtp.quantize_target(target, embeddings=True)
  plain = gemma_mtp.generate(qt, PROMPTS, max_new_tokens=40)
  spec = gemma_mtp.generate(qt, PROMPTS, max_new_tokens=40, drafter=drafter,
                            draft_lengths=(4,), adaptive=False)
  assert spec.tokens == plain.tokens
  assert spec.stats["accepted"] > 0 and spec.stats["tokens_per_forward"] > 1.5, spec.stats


# ---- checkpoints ---------------------------------------------------------------------------------

def test_orbax_round_trip(tmp_path, ple_params):
  qp = quant.quantize_params(ple_params, PLE)
  checkpoint.save_params(tmp_path / "q", qp, PLE, step=3)
  assert checkpoint.stored_quantization(tmp_path / "q") == {"method": quant.METHOD,
                                                            "embeddings": False}
  cfg, loaded = checkpoint.load_params(tmp_path / "q")
  assert cfg == PLE
  assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(qp)
  for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(qp)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  target = gemma_mtp.load_target(tmp_path / "q")            # api: stays quantized
  assert quant.is_quantized(target.params["layers"][0]["attn"]["q"])
  with pytest.raises(ValueError, match="int8-quantized"):
    checkpoint.save_hf(tmp_path / "hf", qp, PLE)
  with pytest.raises(ValueError, match="already quantized"):
    quant.quantize_params(qp, PLE)


# ---- sharding ------------------------------------------------------------------------------------

def test_scale_shardings_follow_weights():
  """Scales take their weights' mesh axes on the output dims, at real sizes and several meshes."""
  from jax.sharding import NamedSharding
  from gemma_mtp import sharding
  for preset in ("gemma4_31b", "gemma4_26b_a4b", "gemma4_e2b"):
    cfg = config_lib.preset(preset)
    specs = quant.quantized_specs(cfg, embeddings=True)
    for sizes in ({"data": 1, "fsdp": 2, "model": 8}, {"data": 2, "fsdp": 1, "model": 4}):
      mesh = jax.sharding.AbstractMesh(tuple(sizes.values()), tuple(sizes))
      for s in jax.tree_util.tree_leaves(sharding.param_shardings(specs, mesh),
                                         is_leaf=quant.is_quantized):
        if not quant.is_quantized(s):
          assert isinstance(s, NamedSharding)
          continue
        q = tuple(s.q.spec) + (None,) * 4
        for i, entry in enumerate(tuple(s.scale.spec)):
          assert entry is None or entry == q[i]


@pytest.mark.parametrize("spec,shape,one_row", [
    ("BTD,DNH->BTNH", (1, 1, 8), True), ("BTD,DNH->BTNH", (1, 2, 8), False),
    ("BTD,DNH->BTNH", (2, 1, 8), False), ("...D,DI->...I", (1, 1, 8), True),
    ("...D,DI->...I", (3, 8), False), ("BTHD,HDI->BTHI", (1, 1, 4, 8), True),
    ("MD,MkDF->MkF", (1, 8), False),    # the rows axis is shared with the weight: not padded
])
def test_one_row_detection(spec, shape, one_row):
  assert quant._one_row(spec, jnp.zeros(shape)) == one_row  # pylint: disable=protected-access


def test_one_row_padding_keeps_values_and_greedy_decoding(monkeypatch, ple_params):
  """The GPU's two-row padding of one-row matmuls (forced on the CPU here) changes no value of
  note: float and int8 matmuls agree, and plain greedy decoding emits the same tokens."""
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 1, PLE.embed_dim))
  w = jax.random.normal(jax.random.PRNGKey(1), (PLE.embed_dim, 3, 5))
  qw = quant.quantize(w, (0,))
  spec = "BTD,DNH->BTNH"
  plain = [quant.einsum(spec, x, v) for v in (w, qw)]
  target = gemma_mtp.Target(PLE, ple_params)
  prompt = PROMPTS[:1]                                # batch 1: decoding matmuls have one row
  tokens = gemma_mtp.generate(target, prompt, max_new_tokens=12).tokens
  monkeypatch.setattr(quant, "PAD_ONE_ROW_BACKENDS", (jax.default_backend(),))
  jax.clear_caches()
  assert quant.pad_one_row()
  text = jax.jit(lambda a, b: quant.einsum(spec, a, b)).lower(x, w).as_text()
  assert "tensor<2x1x" in text                        # the matmul ran on two rows
  for v, ref in zip((w, qw), plain):
    got = quant.einsum(spec, x, v)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  assert jnp.array_equal(gemma_mtp.generate(target, prompt, max_new_tokens=12).tokens, tokens)
  # The second row as a copy of the first (a broadcast, no pad): the same values.
  monkeypatch.setattr(quant, "PAD_ROWS_WITH", "copy")
  text = jax.jit(lambda a, b: quant.einsum(spec, a, b)).lower(x, w).as_text()
  assert "tensor<2x1x" in text and "broadcast_in_dim" in text and "concatenate" not in text
  for v, ref in zip((w, qw), plain):
    np.testing.assert_allclose(quant.einsum(spec, x, v), ref, rtol=1e-5, atol=1e-5)
  # Weights below PAD_MIN_WEIGHT_SIZE keep their one row.
  monkeypatch.setattr(quant, "PAD_MIN_WEIGHT_SIZE", w.size + 1)
  assert "tensor<2x1x" not in jax.jit(lambda a, b: quant.einsum(spec, a, b)).lower(x, w).as_text()
  jax.clear_caches()


def test_bf16_forward_keeps_int8_values_and_float32_scales(ple_params):
  """In a bf16 forward the int8 weights reach their matmuls as int8 and the scales stay float32:
  no scale is rounded to bf16 (model.forward once converted every leaf of the tree, QArray
  children included, to the compute dtype)."""
  cfg = PLE.replace(dtype="bfloat16")
  qp = quant.quantize_params(ple_params, PLE)
  tokens = jnp.asarray([[3, 4, 5]], jnp.int32)
  jaxpr = jax.make_jaxpr(lambda p: model_lib.forward(p, tokens, config=cfg).logits)(qp)
  leaves = jax.tree_util.tree_leaves(qp, is_leaf=quant.is_quantized)
  scale_shapes = {tuple(x.scale.shape) for x in leaves if quant.is_quantized(x)}
  rounded = [e for e in jaxpr.eqns if e.primitive.name == "convert_element_type"
             and e.invars[0].aval.dtype == jnp.float32
             and e.params["new_dtype"] == jnp.bfloat16
             and tuple(e.invars[0].aval.shape) in scale_shapes]
  assert scale_shapes and not rounded, [e.invars[0].aval for e in rounded]
