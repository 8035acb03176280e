"""The fused inference layout (`model.fuse_projections`): one q|k|v matmul and one gate|up matmul
per layer compute what the checkpoint layout does.

Checked on tiny models with every attention variant the layout touches (KV-shared layers, which
keep their q alone; k_eq_v full layers, fused as q|k; the MoE block's shared dense MLP; PLE):
logits and hidden states with and without a cache, float and int8; greedy plain and speculative
decoding emit the same tokens; `unfuse_projections` restores the checkpoint layout exactly;
checkpoint writers and sharding refuse the fused layout with a message that names the way back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma_mtp
from gemma_mtp import checkpoint
from gemma_mtp import model as model_lib
from gemma_mtp import params as params_lib
from gemma_mtp import quant
from gemma_mtp import sharding
from tests.test_quant import MOE, PLE, _init
from tests.test_speculative import PROMPTS, agreeing_pair


def _assert_close(a, b):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)


def _assert_same_tree(a, b):
  la, ta = jax.tree_util.tree_flatten(a, is_leaf=quant.is_quantized)
  lb, tb = jax.tree_util.tree_flatten(b, is_leaf=quant.is_quantized)
  assert ta == tb
  for x, y in zip(jax.tree_util.tree_leaves(la), jax.tree_util.tree_leaves(lb)):
    assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("cfg", [PLE, MOE], ids=["ple_kv_shared", "moe_k_eq_v"])
@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
def test_fused_forward_equals_checkpoint_layout(cfg, int8):
  params = _init(cfg)
  if int8:
    params = quant.quantize_params(params, cfg)
  fused = model_lib.fuse_projections(params, cfg)
  assert params_lib.is_fused(fused) and not params_lib.is_fused(params)
  for i, (p, f) in enumerate(zip(params["layers"], fused["layers"])):
    owns_kv = not cfg.is_kv_shared(i)
    want = ({"qkv"} if "v" in p["attn"] else {"qk"}) if owns_kv else {"q"}
    assert want <= set(f["attn"]) and not {"k", "v"} & set(f["attn"])
    assert "gate_up" in f["mlp"] and "gate" not in f["mlp"]
  assert any("qk" in f["attn"] for f in fused["layers"]) == cfg.k_eq_v

  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, cfg.vocab_size)
  ref = model_lib.forward(params, tokens, config=cfg)
  got = model_lib.forward(fused, tokens, config=cfg)
  _assert_close(got.logits, ref.logits)
  _assert_close(got.hidden, ref.hidden)
  # With a cache: a prefill of 6 positions, then 3 positions written and attended to.
  start = jnp.asarray([0, 2], jnp.int32)
  outs = []
  for p in (params, fused):
    _, cache = model_lib.prefill(p, tokens[:, :6], start, config=cfg, max_len=16, max_chunk=3)
    step = model_lib.forward(p, tokens[:, 6:], config=cfg, cache=cache)
    outs.append(step)
  _assert_close(outs[1].logits, outs[0].logits)
  for k_ref, k_got in zip(outs[0].cache.k, outs[1].cache.k):
    if k_ref is not None:
      _assert_close(k_got, k_ref)

  _assert_same_tree(model_lib.unfuse_projections(fused, cfg), params)
  assert model_lib.fuse_projections(fused, cfg) is fused   # already fused: returned as is


def test_fused_greedy_plain_and_speculative_decoding():
  target, drafter = agreeing_pair(PLE, residual_scale=0.3)
  fused = gemma_mtp.Target(PLE, model_lib.fuse_projections(target.params, PLE))
  plain = gemma_mtp.generate(target, PROMPTS, max_new_tokens=24).tokens
  assert gemma_mtp.generate(fused, PROMPTS, max_new_tokens=24).tokens == plain
  spec = gemma_mtp.generate(fused, PROMPTS, max_new_tokens=24, drafter=drafter, draft_lengths=(3,))
  assert spec.tokens == plain
  assert spec.stats["target_forwards"] < 24 * len(PROMPTS)   # the drafts were accepted at times


def test_donated_fusion_frees_the_originals():
  params = _init(PLE)
  expected = model_lib.fuse_projections(params, PLE)
  q = params["layers"][0]["attn"]["q"]
  fused = model_lib.fuse_projections(params, PLE, donate=True)
  assert q.is_deleted()
  _assert_same_tree(fused, expected)


def test_checkpoint_writers_and_sharding_refuse_the_fused_layout(tmp_path):
  params = _init(PLE)
  fused = model_lib.fuse_projections(params, PLE)
  with pytest.raises(ValueError, match="unfuse_projections"):
    checkpoint.save_params(tmp_path / "ckpt", fused, PLE)
  assert not (tmp_path / "ckpt").exists()
  with pytest.raises(ValueError, match="unfuse_projections"):
    sharding.shard_target(gemma_mtp.Target(PLE, fused), sharding.make_mesh(None, devices=jax.devices()[:1]))
  checkpoint.save_params(tmp_path / "ckpt", model_lib.unfuse_projections(fused, PLE), PLE)
  _, loaded = checkpoint.load_params(tmp_path / "ckpt")
  _assert_same_tree(loaded, params)


def test_fusing_with_another_config_is_refused():
  with pytest.raises(ValueError, match="query heads"):
    model_lib.fuse_projections(_init(PLE), MOE.replace(num_heads=4))


def test_concatenate_checks_quantized_axes():
  w = jnp.ones((4, 3))
  qw = quant.quantize(w, (0,))
  with pytest.raises(ValueError, match="mixed"):
    quant.concatenate([w, qw], axis=1)
  with pytest.raises(ValueError, match="contracted"):
    quant.concatenate([qw, qw], axis=0)
  joined = quant.concatenate([qw, quant.quantize(2 * w, (0,))], axis=1)
  np.testing.assert_allclose(quant.dequantize(joined), np.concatenate([w, 2 * w], axis=1))
  back = quant.split(joined, [3, 3], axis=1)
  np.testing.assert_allclose(quant.dequantize(back[1]), 2 * w)


# ---- batch-1 decoding on two equal rows (model.pairs_rows) ---------------------------------------

def _one_row_dots(jaxpr) -> int:
  """dot_generals (at any depth) whose left operand has one row outside the contracted axes."""
  n = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contract, _), (batch, _) = eqn.params["dimension_numbers"]
      shape = eqn.invars[0].aval.shape
      n += int(np.prod([d for i, d in enumerate(shape) if i not in contract + batch]) == 1)
    for v in eqn.params.values():
      for sub in v if isinstance(v, (tuple, list)) else (v,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          n += _one_row_dots(sub)
  return n


@pytest.mark.parametrize("cfg,fuse", [(PLE, True), (PLE, False), (MOE, True)],
                         ids=["ple_fused", "ple_checkpoint", "moe_fused"])
def test_paired_rows_decode_step_equals_one_row(monkeypatch, cfg, fuse):
  """A batch-1 decode step on a backend that pads one-row matmuls (forced on the CPU) runs its
  token as two equal positions: the same logits, hidden state and cache as one row, only the
  first copy written; no matmul of the layers is left with one row (the head's slice is)."""
  params = _init(cfg)
  params = model_lib.fuse_projections(params, cfg) if fuse else params
  tokens = jax.random.randint(jax.random.PRNGKey(2), (1, 8), 0, cfg.vocab_size)
  _, cache = model_lib.prefill(params, tokens[:, :7], jnp.zeros((1,), jnp.int32), config=cfg,
                               max_len=12, max_chunk=1)

  def step(p, c):
    return model_lib.forward(p, tokens[:, 7:], config=cfg, cache=c)

  ref = step(params, cache)
  ref_dots = _one_row_dots(jax.make_jaxpr(step)(params, cache).jaxpr)
  assert not model_lib.pairs_rows(params, cfg, (1, 1), cached=True)   # the CPU: off
  monkeypatch.setattr(quant, "PAD_ONE_ROW_BACKENDS", (jax.default_backend(),))
  jax.clear_caches()   # traces are cached per function: none made under the other policy
  try:
    _check_paired_step(params, cfg, step, cache, ref, ref_dots)
  finally:
    jax.clear_caches()
  # Above the size limit the step keeps one row.
  monkeypatch.setattr(model_lib, "PAIR_MAX_WEIGHT_SIZE", 1)
  assert not model_lib.pairs_rows(params, cfg, (1, 1), cached=True)


def _check_paired_step(params, cfg, step, cache, ref, ref_dots):
  assert model_lib.pairs_rows(params, cfg, (1, 1), cached=True)
  assert not model_lib.pairs_rows(params, cfg, (1, 1), cached=False)
  assert not model_lib.pairs_rows(params, cfg, (1, 2), cached=True)
  assert not model_lib.pairs_rows(params, cfg, (2, 1), cached=True)
  assert not model_lib.pairs_rows(quant.quantize_params(_init(cfg), cfg), cfg, (1, 1), cached=True)
  got = step(params, cache)
  assert got.logits.shape == ref.logits.shape and got.hidden.shape == ref.hidden.shape
  _assert_close(got.logits, ref.logits)
  _assert_close(got.hidden, ref.hidden)
  for a, b in zip(got.cache.k + got.cache.v, ref.cache.k + ref.cache.v):
    if a is not None:
      assert a.shape == b.shape
      _assert_close(a, b)
  assert np.array_equal(got.cache.ring_idx, ref.cache.ring_idx)
  dots = _one_row_dots(jax.make_jaxpr(step)(params, cache).jaxpr)
  if "moe" not in params["layers"][0]:   # (routed experts run on the kept copy alone)
    assert dots == 0 < ref_dots           # the head is padded as before: these weights are small


def test_paired_rows_greedy_plain_and_speculative_decoding(monkeypatch):
  target, drafter = agreeing_pair(PLE, residual_scale=0.3)
  fused = gemma_mtp.Target(PLE, model_lib.fuse_projections(target.params, PLE))
  plain = gemma_mtp.generate(fused, PROMPTS[:1], max_new_tokens=16).tokens
  spec = gemma_mtp.generate(fused, PROMPTS[:1], max_new_tokens=16, drafter=drafter,
                            draft_lengths=(1, 3))
  monkeypatch.setattr(quant, "PAD_ONE_ROW_BACKENDS", (jax.default_backend(),))
  jax.clear_caches()
  try:
    assert gemma_mtp.generate(fused, PROMPTS[:1], max_new_tokens=16).tokens == plain
    got = gemma_mtp.generate(fused, PROMPTS[:1], max_new_tokens=16, drafter=drafter,
                             draft_lengths=(1, 3))
    assert got.tokens == spec.tokens == plain
  finally:
    jax.clear_caches()
