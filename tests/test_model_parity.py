"""The decoder against Hugging Face `transformers` on tiny random checkpoints, and cache invariants."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import gemma_mtp
from gemma_mtp import config as config_lib
from gemma_mtp import model as model_lib
from gemma_mtp import params as params_lib
from tests import hf_models

PROMPTS = ([7, 12, 3, 44, 9, 31, 2, 18, 5, 27, 60, 11, 4], [15, 8, 22], [9, 40, 33, 3, 19, 6, 70])
NEW_TOKENS = 64


@pytest.fixture(scope="module", params=hf_models.KINDS)
def pair(request, tmp_path_factory):
  """(kind, HF model, our Target loaded from the HF directory)."""
  directory = tmp_path_factory.mktemp(request.param)
  hf = hf_models.make_hf_target(request.param, directory)
  return request.param, hf, gemma_mtp.load_target(directory)


def test_logits_match_transformers(pair):
  _, hf, target = pair
  assert target.config.dtype == "float32"
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, target.config.vocab_size, size=(3, 3 * target.config.sliding_window))
  ours = np.asarray(gemma_mtp.score(target, tokens))
  with torch.no_grad():
    ref = hf(torch.tensor(tokens)).logits.numpy()
  assert ours.shape == ref.shape
  np.testing.assert_array_less(np.abs(ours - ref).max(), 1e-4)


def hf_greedy(hf, prompt):
  with torch.no_grad():
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                      min_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0)
  return out[0, len(prompt):].tolist()


def test_greedy_generation_matches_transformers(pair):
  _, hf, target = pair
  refs = [hf_greedy(hf, p) for p in PROMPTS]
  for prompt, ref in zip(PROMPTS, refs):
    assert len(ref) == NEW_TOKENS
    assert gemma_mtp.generate(target, [prompt], max_new_tokens=NEW_TOKENS).tokens[0] == ref
  batched = gemma_mtp.generate(target, list(PROMPTS), max_new_tokens=NEW_TOKENS)
  assert batched.tokens == refs


FEATURE_CONFIGS = {
    "ple_kv_sharing": config_lib.tiny(layer_types=config_lib.pattern(5, 2), num_kv_shared_layers=2,
                                      double_wide_mlp=True, per_layer_dim=8,
                                      per_layer_vocab_size=256),
    "k_eq_v": config_lib.tiny(layer_types=config_lib.pattern(4, 2), k_eq_v=True),
    "moe": config_lib.tiny(layer_types=config_lib.pattern(4, 2), k_eq_v=True, num_experts=8,
                           num_experts_per_token=2, expert_dim=32),
}


def cached_vs_full_error(cfg, params, *, chunk):
  """max |logit difference| / max |logit| between prefill + chunked cached decoding and one
  no-cache forward over the same tokens."""
  rng = np.random.default_rng(1)
  t = 4 * cfg.sliding_window
  tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, size=(2, t)), jnp.int32)
  start = jnp.asarray([0, 5], jnp.int32)
  full = model_lib.forward(params, tokens, config=cfg, start=start).logits
  step = jax.jit(lambda c, tok: model_lib.forward(params, tok, config=cfg, cache=c))
  p = cfg.sliding_window + 1
  _, cache = model_lib.prefill(params, tokens[:, :p], start, config=cfg, max_len=t + 8,
                               max_chunk=chunk)
  worst = 0.0
  for i in range(p, t - chunk + 1, chunk):
    out = step(cache, tokens[:, i:i + chunk])
    cache = out.cache.replace(length=out.cache.length + chunk)
    worst = max(worst, float(jnp.max(jnp.abs(out.logits - full[:, i:i + chunk]))))
  return worst / float(jnp.max(jnp.abs(full)))


def perturbed_params(cfg, seed=0):
  """Random params with q/k-norm weights in [0.4, 0.8] (as in hf_models).

  Gemma 4 attention has scale 1 on RMS-normed q and k, so with unit norm weights the scores reach
  ~+-20 and every layer multiplies float32 rounding differences by about that much; trained
  checkpoints have small q/k-norm weights. The other norms keep their initial value of 1 here;
  the parity tests against `transformers` perturb all of them.
  """
  params = params_lib.init_params(cfg, jax.random.PRNGKey(seed))
  rng = np.random.default_rng(seed)

  def draw(path, w):
    name = jax.tree_util.keystr(path)
    if "q_norm" in name or "k_norm" in name:  # see hf_models.perturb_
      return jnp.asarray(rng.uniform(0.4, 0.8, w.shape), w.dtype)
    return w

  return jax.tree_util.tree_map_with_path(draw, params)


@pytest.mark.parametrize("name", sorted(FEATURE_CONFIGS))
@pytest.mark.parametrize("chunk", [1, 3])
def test_cached_decoding_equals_full_forward(name, chunk):
  """One token (or 3) at a time through the cache equals the full forward in float32.

  Over 3 windows of context, so the sliding ring wraps, with a left-padded row. The bound is
  1e-5 of the largest logit (~5 here): the absolute difference is float32 rounding of matmuls of
  different shapes, amplified by scale-1 attention (3e-6..3e-5 absolute on these configs; the
  reference's own float32 cached forward has differed by up to 1.4e-4 on the HF fixtures below).
  A cache bug (a wrong slot, window edge or position) moves logits by 1e-2 or more.
  """
  cfg = FEATURE_CONFIGS[name]
  params = perturbed_params(cfg)
  assert cached_vs_full_error(cfg, params, chunk=chunk) <= 1e-5


def test_cached_decoding_matches_transformers_in_float64(pair):
  """Token-by-token decoding through our cache equals the reference's float64 forward.

  The reference is `transformers`' full forward with the weights in float64 (exact to ~1e-12
  here), not its float32 cached path: that path's own rounding moves with `transformers`'
  versions (against the float64 forward up to 1.4e-4 once, 3.4e-5 in 5.25 on `e2b_like`; ours
  is 7.1e-5 there and 3e-6..1.2e-5 on the others, on logits of ~4-5). Over 4 windows of context,
  so the sliding ring wraps; a cache bug (a wrong slot, window edge or position) moves logits by
  1e-2 or more.
  """
  _, hf, target = pair
  cfg, params = target.config, target.params
  rng = np.random.default_rng(1)
  t, p = 4 * cfg.sliding_window, cfg.sliding_window + 1
  tokens = rng.integers(3, cfg.vocab_size, size=(2, t))
  reference = copy.deepcopy(hf).double()
  if hasattr(reference, "set_experts_implementation"):   # grouped-mm kernels take no float64
    reference.set_experts_implementation("eager")
  with torch.no_grad():
    truth = reference(torch.tensor(tokens)).logits.numpy()
  _, ours_cache = model_lib.prefill(params, jnp.asarray(tokens[:, :p]), jnp.zeros(2, jnp.int32),
                                    config=cfg, max_len=t + 8)
  step = jax.jit(lambda c, tok: model_lib.forward(params, tok, config=cfg, cache=c))
  worst = 0.0
  for i in range(p, t):
    res = step(ours_cache, jnp.asarray(tokens[:, i:i + 1]))
    ours_cache = res.cache.replace(length=res.cache.length + 1)
    worst = max(worst, float(np.abs(np.asarray(res.logits[:, 0]) - truth[:, i]).max()))
  assert worst <= 1e-4


def test_rejected_positions_are_invisible(pair):
  """Writing junk beyond `length` (a rejected draft) and not committing it changes nothing."""
  _, _, target = pair
  cfg, params = target.config, target.params
  rng = np.random.default_rng(2)
  tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, size=(1, 3 * cfg.sliding_window)), jnp.int32)
  p = cfg.sliding_window + 2
  _, cache = model_lib.prefill(params, tokens[:, :p], jnp.zeros(1, jnp.int32), config=cfg,
                               max_len=tokens.shape[1] + 8, max_chunk=4)
  clean = model_lib.forward(params, tokens[:, p:p + 4], config=cfg, cache=cache)
  junk = model_lib.forward(params, jnp.full((1, 4), 5, jnp.int32), config=cfg, cache=cache)
  again = model_lib.forward(params, tokens[:, p:p + 4], config=cfg, cache=junk.cache)
  np.testing.assert_allclose(again.logits, clean.logits, atol=1e-6)


@pytest.mark.parametrize("name", ["gemma4_e2b", "gemma4_e4b", "gemma4_31b", "gemma4_26b_a4b"])
def test_real_presets_build_abstractly(name):
  cfg = config_lib.preset(name)
  abstract = params_lib.abstract_params(cfg)
  tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
  out = jax.eval_shape(lambda p, t: model_lib.forward(p, t, config=cfg), abstract, tokens)
  assert out.logits.shape == (2, 16, cfg.vocab_size)
  assert out.hidden.shape == (2, 16, cfg.embed_dim)
  taps = cfg.tap_layers
  assert out.taps["full"].k.shape[-1] == cfg.global_head_dim
  assert out.taps["sliding"].k.shape[-2] == cfg.num_kv_heads
  assert taps["full"] < cfg.first_shared_layer and taps["sliding"] < cfg.first_shared_layer


def test_bad_inputs_raise():
  target = gemma_mtp.random_target(config_lib.tiny(max_seq_len=64))
  with pytest.raises(ValueError, match="outside the vocabulary"):
    gemma_mtp.generate(target, [[1, 2, 999]], max_new_tokens=2)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    gemma_mtp.score(target, [[1, -1]])
  with pytest.raises(ValueError, match="exceeds the cache"):
    gemma_mtp.generate(target, [list(range(1, 60))], max_new_tokens=10)
  with pytest.raises(ValueError, match="exceeds the cache"):
    gemma_mtp.generate(target, [[1, 2]], max_new_tokens=10, cache_size=20)
  with pytest.raises(ValueError, match="empty"):
    gemma_mtp.generate(target, [[]], max_new_tokens=2)
  with pytest.raises(ValueError, match="unknown preset 'gemma5'"):
    config_lib.preset("gemma5")


def test_sampling_generation_is_reproducible_and_stops_at_eos():
  target = gemma_mtp.random_target(config_lib.tiny())
  kw = dict(max_new_tokens=40, temperature=1.0, top_k=50, top_p=0.9, seed=3)
  a = gemma_mtp.generate(target, [[5, 6, 7], [8]], **kw).tokens
  assert a == gemma_mtp.generate(target, [[5, 6, 7], [8]], **kw).tokens
  eos = a[0][5]
  stopped = gemma_mtp.generate(target, [[5, 6, 7], [8]], eos_id=eos, **kw).tokens
  for row, full in zip(stopped, a):
    cut = full.index(eos) + 1 if eos in full else len(full)
    assert row == full[:cut]
