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
