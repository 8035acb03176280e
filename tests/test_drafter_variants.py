"""The parallel-heads and self drafters: lossless in the speculative loop, trainable, saveable."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gemma_mtp
from gemma_mtp import checkpoint
from gemma_mtp import config as config_lib
from gemma_mtp import distill
from gemma_mtp import drafter_kinds
from gemma_mtp import heads_drafter
from gemma_mtp import model as model_lib
from gemma_mtp import params as params_lib
from gemma_mtp import quant
from gemma_mtp import sampling
from gemma_mtp import self_drafter
from tests.test_sampling import FALSE_ALARM, chi2_pvalue
from tests.test_speculative import pool_small_cells

# Small enough to compile fast; sliding ring wraps (window 8), PLE, and a KV-shared last layer.
TARGET = config_lib.tiny(layer_types=(config_lib.SLIDING, config_lib.FULL, config_lib.FULL),
                         num_kv_shared_layers=1, per_layer_dim=8, per_layer_vocab_size=256,
                         embed_dim=32, mlp_dim=64)
PROMPTS = [list(range(5, 16)), [3, 4], [100, 101, 102, 103, 104], list(range(20, 45))]
MAX_NEW = 40


def numpy_target(cfg, seed):
  """`random_target` drawn with numpy: jax.random would compile one sampler per weight shape,
  which costs more than the rest of a test here."""
  rng = np.random.default_rng(seed)

  def init(spec):
    if spec.init != "normal":
      return jnp.full(spec.shape, float(spec.init == "ones"), jnp.float32)
    fan_in = math.prod(spec.shape[a] for a in spec.fan_in_axes)
    return jnp.asarray(rng.normal(size=spec.shape) / np.sqrt(fan_in), jnp.float32)

  return gemma_mtp.Target(cfg, params_lib.map_specs(init, params_lib.param_specs(cfg)))


def heads_for_agreeing_target(target):
  """Head 0 is exact on the residual_scale=0 target (whose logits are head(norm(E[x])), so it
  repeats its last token): its input projection picks the embedding and its final norm is the
  target's. Heads 1 and 2 stay random (mostly rejected)."""
  d = TARGET.embed_dim
  dcfg = heads_drafter.for_target(TARGET, num_heads=3, mlp_dim=16)
  p = heads_drafter.init_params(dcfg, jax.random.PRNGKey(4))
  p["in_proj"] = p["in_proj"].at[0].set(jnp.concatenate([jnp.eye(d), jnp.zeros((d, d))]))
  p["final_norm"] = p["final_norm"].at[0].set(target.params["final_norm"])
  return gemma_mtp.Drafter(dcfg, p)


@pytest.fixture(scope="module")
def agreeing():
  """A target whose layers add nothing to the residual stream (post-norms at zero), as
  test_speculative.agreeing_pair(residual_scale=0)."""
  target = numpy_target(TARGET, seed=0)
  for layer in target.params["layers"]:
    for norm in ("post_attn_norm", "post_ffw_norm"):
      layer[norm] = jnp.zeros_like(layer[norm])
    layer["ple"]["norm"] = jnp.zeros_like(layer["ple"]["norm"])
  return target, gemma_mtp.generate(target, PROMPTS, max_new_tokens=MAX_NEW).tokens


@pytest.fixture(scope="module")
def random_pair():
  target = numpy_target(TARGET, seed=2)
  return target, gemma_mtp.generate(target, PROMPTS, max_new_tokens=MAX_NEW).tokens


def test_heads_greedy_equals_plain_and_exact_head_is_always_accepted(agreeing):
  target, ref = agreeing
  drafter = heads_for_agreeing_target(target)
  out = gemma_mtp.generate(target, PROMPTS, max_new_tokens=MAX_NEW, drafter=drafter,
                           draft_lengths=(1, 3))
  assert out.tokens == ref
  acc = out.stats["acceptance_by_position"]
  assert acc[0] == 1.0 and acc[1] < 0.5, out.stats
  assert sum(out.stats["bucket_counts"].values()) == out.stats["target_forwards"]
  with pytest.raises(ValueError, match="exceed the 3 drafts"):
    gemma_mtp.generate(target, PROMPTS, max_new_tokens=8, drafter=drafter, draft_lengths=(2, 4))


def test_self_greedy_equals_plain(random_pair):
  target, ref = random_pair
  drafter = gemma_mtp.random_drafter(target, kind="self", num_layers=2, adapter_rank=4)
  drafter.params["adapter"]["b"] = 0.3 * jax.random.normal(jax.random.PRNGKey(0), (4, 32))
  out = gemma_mtp.generate(target, PROMPTS, max_new_tokens=MAX_NEW, drafter=drafter,
                           draft_lengths=(2, 3))
  assert out.tokens == ref
  assert 0.2 < out.stats["acceptance_by_position"][0] < 0.95, out.stats  # both outcomes happen
  assert sum(out.stats["bucket_counts"].values()) == out.stats["target_forwards"]


def test_self_logits_are_the_layer_prefix(random_pair):
  """Without cache, the self-drafter equals the decoder cut to its first N layers (params sliced,
  PLE included) and, for N = all, the target."""
  p = random_pair[0].params
  tokens = jnp.asarray([list(range(3, 23))], jnp.int32)
  cut = TARGET.replace(layer_types=TARGET.layer_types[:2], num_kv_shared_layers=0)
  cut_params = {"embed": p["embed"], "final_norm": p["final_norm"], "layers": p["layers"][:2],
                "ple": {"embed": p["ple"]["embed"][:, :2], "proj": p["ple"]["proj"][:, :2],
                        "norm": p["ple"]["norm"]}}

  @jax.jit
  def logits(p, cut_params):
    ours = [self_drafter.logits_seq({}, self_drafter.for_target(TARGET, num_layers=n),
                                    target_params=p, target_config=TARGET, tokens=tokens)[0]
            for n in (3, 2)]
    return ours, [model_lib.forward(p, tokens, config=TARGET).logits,
                  model_lib.forward(cut_params, tokens, config=cut).logits]

  ours, ref = logits(p, cut_params)
  np.testing.assert_allclose(ours[0], ref[0], atol=1e-5)
  np.testing.assert_allclose(ours[1], ref[1], atol=1e-5)


CHI2_TARGET = config_lib.tiny(vocab_size=8, layer_types=(config_lib.FULL, config_lib.FULL),
                              num_kv_shared_layers=1, final_logit_softcap=None, embed_dim=32,
                              mlp_dim=64)
CHI2_PROMPT = [1, 5, 2, 7]


@pytest.fixture(scope="module")
def chi2_target():
  """The target and the exact joint distribution [V, V, V] of its first 3 sampled tokens."""
  target = numpy_target(CHI2_TARGET, seed=3)
  v = CHI2_TARGET.vocab_size
  # One forward over prompt + every (a, b): its last 3 positions give p1, p2(a), p3(a, b).
  pairs = np.stack(np.meshgrid(np.arange(v), np.arange(v), indexing="ij"), -1).reshape(-1, 2)
  seqs = np.concatenate([np.tile(CHI2_PROMPT, (v * v, 1)), pairs], axis=1)
  logits = gemma_mtp.score(target, seqs)[:, -3:]
  p = np.asarray(sampling.probs(logits, sampling.SamplingParams(temperature=1.0)), np.float64)
  joint = p[0, 0][:, None, None] * p[:, 1].reshape(v, v, v)[:, 0][:, :, None] \
      * p[:, 2].reshape(v, v, v)
  return target, joint / joint.sum()


def sample(target, drafter, rows):
  """4 tokens per row: the first from the prefill, then one round of K = 2 drafts + 1."""
  return gemma_mtp.generate(target, [CHI2_PROMPT] * rows, max_new_tokens=4, temperature=1.0,
                            seed=7, drafter=drafter, draft_lengths=(2,), adaptive=False)


@pytest.mark.parametrize("kind,kw", [("parallel_heads", dict(num_heads=2, mlp_dim=16)),
                                     ("self", dict(num_layers=2, adapter_rank=4))])
def test_speculative_sampling_is_exact(chi2_target, kind, kw):
  """First 3 tokens (2 drafted) of 6,000 samples vs the exact target distribution (chi-square,
  false alarm 1e-4) with a drafter that differs from the target. The self-drafter runs all layers
  (through the KV-shared one) with a nonzero adapter; with its adapter at zero it is the target,
  so every sampled draft must be accepted: K + 1 tokens per forward on every row."""
  target, exact = chi2_target
  drafter = gemma_mtp.random_drafter(target, kind=kind, seed=11, **kw)
  zero = drafter.params
  if kind == "self":
    drafter.params = {"adapter": {"a": zero["adapter"]["a"],
                                  "b": jax.random.normal(jax.random.PRNGKey(1), (4, 32))}}
  rows = 6_000
  out = sample(target, drafter, rows)
  assert 0 < out.stats["accepted"] < out.stats["drafted"]
  counts = np.zeros([CHI2_TARGET.vocab_size] * 3)
  for row in out.tokens:
    counts[tuple(row[:3])] += 1
  assert chi2_pvalue(*pool_small_cells(counts, exact, rows)) > FALSE_ALARM
  if kind == "self":
    out = sample(target, gemma_mtp.Drafter(drafter.config, zero), rows)
    assert out.stats["target_forwards"] == 1
    assert out.stats["accepted"] == out.stats["drafted"] == 2 * rows
    assert out.stats["tokens_per_forward"] == 3


@pytest.mark.parametrize("kind,kw", [("parallel_heads", dict(num_heads=3, mlp_dim=32)),
                                     ("self", dict(num_layers=1, adapter_rank=8))])
def test_distillation_lowers_the_loss(random_pair, kind, kw):
  target = random_pair[0]
  dcfg = drafter_kinds.for_target(TARGET, kind=kind, **kw)
  dparams = drafter_kinds.init_params(dcfg, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 24), 3, TARGET.vocab_size)
  opt = optax.adam(1e-2)
  loss_kw = dict(dcfg=dcfg, tparams=target.params, tcfg=TARGET, tokens=tokens, steps=3,
                 step_weights=(1.0, 0.7, 0.5))

  @jax.jit
  def update(p, s):
    (loss, m), g = jax.value_and_grad(lambda p: distill.drafter_loss(p, **loss_kw),
                                      has_aux=True)(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, loss, m

  state = opt.init(dparams)
  losses = []
  for _ in range(25):
    dparams, state, loss, m = update(dparams, state)
    losses.append(float(loss))
  assert losses[-1] < 0.8 * losses[0], losses
  assert {"loss_step_2", "agree_step_2", "agree_all"} <= set(m)
  if kind == "parallel_heads":
    with pytest.raises(ValueError, match="exceeds the 3 drafts"):
      distill.drafter_loss(dparams, **{**loss_kw, "steps": 4, "step_weights": (1.0,) * 4})


@pytest.mark.parametrize("kind,kw", [("parallel_heads", dict(num_heads=3, mlp_dim=16)),
                                     ("self", dict(num_layers=2, adapter_rank=4)),
                                     ("self", dict(num_layers=2))])
def test_save_load_round_trip(random_pair, kind, kw, tmp_path):
  target = random_pair[0]
  drafter = gemma_mtp.random_drafter(target, kind=kind, seed=5, **kw)
  drafter.params = jax.tree_util.tree_map(lambda x: x + 0.5, drafter.params)  # nonzero adapter
  checkpoint.save_drafter(tmp_path / "d", drafter.params, drafter.config, step=9)
  meta = json.loads((tmp_path / "d" / checkpoint.ORBAX_CONFIG).read_text())
  assert meta["drafter_kind"] == kind
  cfg, params = checkpoint.load_drafter_params(tmp_path / "d")
  assert cfg == drafter.config
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, drafter.params)
  again = gemma_mtp.load_drafter(tmp_path / "d", target)
  assert again.config == drafter.config
  with pytest.raises(ValueError, match="assistant drafters only"):
    gemma_mtp.load_drafter(tmp_path / "d", target, convention="clean")
  with pytest.raises(ValueError, match="does not match the target"):
    gemma_mtp.load_drafter(tmp_path / "d", gemma_mtp.Target(TARGET.replace(embed_dim=64), None))


def test_self_drafter_with_int8_layers(random_pair, tmp_path):
  """A self-drafter on int8 copies of the target's layers drafts for the float target: greedy =
  plain; its logits are the int8 prefix's (not the float layers', and close to them); its own
  parameters are the int8 layers and the adapter; it saves and loads (scales stay float32)."""
  target, ref = random_pair
  base = gemma_mtp.random_drafter(target, kind="self", num_layers=2, adapter_rank=4)
  qt = gemma_mtp.quantize_target(target)
  cfg, params = self_drafter.with_int8_layers(base.config, base.params, qt.params, TARGET)
  assert set(params) == {"adapter", "layers"} and len(params["layers"]) == 2
  assert quant.is_quantized(params["layers"][0]["attn"]["q"])
  leaves = jax.tree_util.tree_leaves(params)
  assert params_lib.count_params(drafter_kinds.param_specs(cfg)) == sum(x.size for x in leaves)
  drafter = gemma_mtp.Drafter(cfg, params)
  out = gemma_mtp.generate(target, PROMPTS, max_new_tokens=MAX_NEW, drafter=drafter,
                           draft_lengths=(3,), adaptive=False)
  assert out.tokens == ref
  assert 0.2 < out.stats["acceptance_by_position"][0] < 0.95, out.stats  # measured 0.52

  tokens = jnp.asarray([list(range(3, 23))], jnp.int32)
  logits = jax.jit(lambda dp, c: self_drafter.logits_seq(dp, c, target_params=target.params,
                                                         target_config=TARGET, tokens=tokens)[0],
                   static_argnums=1)
  got, want = logits(params, cfg), logits(base.params, base.config)
  rel = float(jnp.sqrt(jnp.mean((got - want) ** 2) / jnp.mean(want ** 2)))
  assert 0 < rel < 0.1, rel                                    # measured 0.025

  checkpoint.save_drafter(tmp_path / "d", params, cfg)
  again = gemma_mtp.load_drafter(tmp_path / "d", target)
  assert again.config == cfg
  assert again.params["layers"][0]["attn"]["q"].scale.dtype == jnp.float32
  jax.tree_util.tree_map(np.testing.assert_array_equal, again.params, params)
  with pytest.raises(ValueError, match="int8 layers are not shaped"):
    checkpoint.check_drafter_matches(cfg, TARGET.replace(mlp_dim=128))
  with pytest.raises(ValueError, match="with_int8_layers"):
    drafter_kinds.init_params(cfg, jax.random.PRNGKey(0))
