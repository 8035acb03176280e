"""Tests of gemma_mtp.sampling: parity with `transformers`' warpers and exactness of verification.

The distribution tests are chi-square goodness-of-fit tests. Each asserts a p-value above
`FALSE_ALARM = 1e-4`, so a correct implementation fails one of them by chance with probability 1e-4
(seeds are fixed, so a given run is deterministic). The power tests run the same statistics on
deliberately wrong verifiers and require p-values below that threshold: the statistics can see the
errors that matter.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation import logits_process as hf

from gemma_mtp import sampling
from gemma_mtp.sampling import SamplingParams

FALSE_ALARM = 1e-4


def chi2_sf(x: float, df: int) -> float:
  """Survival function of the chi-square distribution: Q(df / 2, x / 2)."""
  return float(jax.scipy.special.gammaincc(df / 2.0, x / 2.0))


def chi2_pvalue(counts: np.ndarray, expected_probs: np.ndarray) -> float:
  """Pearson chi-square goodness-of-fit p-value; 0 if a cell of probability 0 is not empty."""
  counts = np.asarray(counts, np.float64).ravel()
  expected_probs = np.asarray(expected_probs, np.float64).ravel()
  assert abs(expected_probs.sum() - 1.0) < 1e-9
  impossible = expected_probs == 0
  if counts[impossible].sum() > 0:
    return 0.0
  n = counts.sum()
  exp = n * expected_probs[~impossible]
  assert exp.min() >= 5, 'too few expected counts for the chi-square approximation'
  stat = float(((counts[~impossible] - exp) ** 2 / exp).sum())
  return chi2_sf(stat, int((~impossible).sum()) - 1)


def test_chi2_sf_matches_closed_form():
  # For 4 degrees of freedom the survival function is exp(-x/2) (1 + x/2).
  for x in [0.5, 3.0, 9.49, 23.5128]:
    assert chi2_sf(x, 4) == pytest.approx(math.exp(-x / 2) * (1 + x / 2), rel=1e-4)
  assert chi2_sf(23.5128, 4) == pytest.approx(1e-4, rel=1e-3)  # the tabulated 1e-4 critical value


# ----------------------------------------------------------------------------------------------------
# SamplingParams and logits processing.


@pytest.mark.parametrize('kwargs', [
    dict(temperature=-0.1), dict(temperature=float('nan')), dict(temperature='1'),
    dict(temperature=1.0, top_k=0), dict(temperature=1.0, top_k=2.5), dict(temperature=1.0, top_k=True),
    dict(temperature=1.0, top_p=0.0), dict(temperature=1.0, top_p=1.5), dict(temperature=1.0, top_p=-0.2),
])
def test_params_validation(kwargs):
  with pytest.raises(ValueError, match='SamplingParams'):
    SamplingParams(**kwargs)


def test_params_hashable_and_static_under_jit():
  a = SamplingParams(temperature=0.7, top_k=4, top_p=0.9)
  assert hash(a) == hash(SamplingParams(temperature=0.7, top_k=4, top_p=0.9))
  assert SamplingParams().is_greedy and not a.is_greedy
  fn = jax.jit(sampling.process_logits, static_argnames='params')
  x = jax.random.normal(jax.random.key(0), (3, 2, 17))
  np.testing.assert_allclose(fn(x, params=a), sampling.process_logits(x, a), rtol=1e-6)


def _hf_process(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
  warpers = hf.LogitsProcessorList([hf.TemperatureLogitsWarper(float(params.temperature))])
  if params.top_k is not None:
    warpers.append(hf.TopKLogitsWarper(params.top_k))
  if params.top_p is not None and params.top_p < 1.0:
    warpers.append(hf.TopPLogitsWarper(params.top_p))
  scores = torch.from_numpy(np.array(logits, np.float32))
  ids = torch.zeros((scores.shape[0], 1), dtype=torch.long)
  return warpers(ids, scores).numpy()


PARITY_SETTINGS = [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.0, top_k=1),
    SamplingParams(temperature=1.0, top_k=5),
    SamplingParams(temperature=1.5, top_k=1000),  # k > V
    SamplingParams(temperature=1.3, top_p=0.9),
    SamplingParams(temperature=0.5, top_p=0.3),
    SamplingParams(temperature=1.0, top_p=1.0),
    SamplingParams(temperature=0.8, top_k=10, top_p=0.8),
    SamplingParams(temperature=2.0, top_k=40, top_p=0.95),
    SamplingParams(temperature=1.0, top_k=3, top_p=0.05),
]


@pytest.mark.parametrize('params', PARITY_SETTINGS, ids=str)
def test_process_logits_matches_transformers(params):
  logits = np.asarray(jax.random.normal(jax.random.key(1), (64, 97)) * 3.0)
  ours = np.asarray(sampling.process_logits(jnp.asarray(logits), params))
  theirs = _hf_process(logits, params)
  keep = np.isfinite(theirs)
  np.testing.assert_array_equal(np.isfinite(ours), keep)
  their_probs = torch.softmax(torch.from_numpy(theirs), -1).numpy()
  np.testing.assert_allclose(np.exp(ours), their_probs, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.exp(ours).sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize('params', PARITY_SETTINGS, ids=str)
def test_process_logits_ties_match_transformers(params):
  # Logits on a grid of step 0.5: many ties, including at the top-k and top-p boundaries.
  logits = np.round(np.asarray(jax.random.normal(jax.random.key(2), (128, 40))) * 2.0) / 2.0
  logits = logits.astype(np.float32)
  ours = np.asarray(sampling.process_logits(jnp.asarray(logits), params))
  theirs = _hf_process(logits, params)
  our_keep, their_keep = np.isfinite(ours), np.isfinite(theirs)
  if params.top_k is not None and params.top_k < 40 and params.top_p is None:
    assert (their_keep.sum(-1) > params.top_k).any()  # ties at the k-th value do occur
  if params.top_p is None or params.top_p == 1.0:
    # Top-k keeps everything >= the k-th largest value, exactly like TopKLogitsWarper.
    np.testing.assert_array_equal(our_keep, their_keep)
  else:
    # TopPLogitsWarper keeps an arbitrary (unstable-sort dependent) subset of the tokens tied with its
    # smallest kept value; we keep all of them, and nothing else differs.
    their_min = np.where(their_keep, logits, np.inf).min(-1, keepdims=True)
    np.testing.assert_array_equal(our_keep, logits >= their_min)
    assert (our_keep != their_keep).any()  # the tie case is exercised
  # Where the kept sets agree, the probabilities agree.
  rows = (our_keep == their_keep).all(-1)
  their_probs = torch.softmax(torch.from_numpy(theirs), -1).numpy()
  np.testing.assert_allclose(np.exp(ours)[rows], their_probs[rows], rtol=1e-5, atol=1e-7)


def test_greedy_path():
  logits = jnp.array([[0.1, 2.0, 2.0, -1.0], [5.0, 0.0, 0.0, 0.0]])  # argmax ties -> first index
  params = SamplingParams(temperature=0.0, top_k=2, top_p=0.5)
  np.testing.assert_array_equal(sampling.greedy(logits), [1, 0])
  assert sampling.greedy(logits).dtype == jnp.int32
  np.testing.assert_array_equal(sampling.probs(logits, params), np.eye(4)[[1, 0]])
  np.testing.assert_array_equal(sampling.sample(jax.random.key(0), logits, params), [1, 0])


def test_probs_and_sample_leading_axes():
  params = SamplingParams(temperature=0.9, top_k=6, top_p=0.9)
  logits = jax.random.normal(jax.random.key(3), (2, 3, 4, 50), dtype=jnp.bfloat16)
  p = sampling.probs(logits, params)
  assert p.shape == logits.shape and p.dtype == jnp.float32
  np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(
      p, jax.vmap(lambda l: sampling.probs(l, params))(logits.reshape(-1, 50)).reshape(p.shape))
  toks = sampling.sample(jax.random.key(4), logits, params)
  assert toks.shape == (2, 3, 4) and toks.dtype == jnp.int32
  assert (jnp.take_along_axis(p, toks[..., None], -1) > 0).all()


def test_sample_distribution():
  params = SamplingParams(temperature=0.8, top_k=5, top_p=0.95)
  logits = jnp.array([1.0, 0.5, 0.2, 0.2, -0.3, -1.0, 2.0, -3.0])
  p = np.asarray(sampling.probs(logits, params), np.float64)
  n = 40_000
  draw = jax.jit(jax.vmap(lambda k: sampling.sample(k, logits, params)))
  toks = np.asarray(draw(jax.random.split(jax.random.key(5), n)))
  assert chi2_pvalue(np.bincount(toks, minlength=8), p / p.sum()) > FALSE_ALARM


# ----------------------------------------------------------------------------------------------------
# Greedy verification.


def _logits_with_argmax(argmax_tokens, vocab):
  return jax.nn.one_hot(jnp.asarray(argmax_tokens), vocab) * 4.0 - 1.0


def test_verify_greedy_hand_built():
  target = [[3, 1, 4, 2], [3, 1, 4, 2], [3, 1, 4, 2], [3, 1, 4, 2], [0, 0, 0, 5]]
  drafts = jnp.array([
      [3, 1, 4],  # all accepted -> bonus = argmax at K
      [2, 1, 4],  # first rejected (later ones would match: the prefix rule must stop at 0)
      [3, 0, 4],  # middle rejected
      [3, 1, 5],  # last rejected
      [0, 0, 0],  # all accepted, bonus 5
  ], dtype=jnp.int32)
  n, nxt = jax.jit(sampling.verify_greedy)(drafts, _logits_with_argmax(target, 6))
  np.testing.assert_array_equal(n, [3, 0, 1, 2, 3])
  np.testing.assert_array_equal(nxt, [2, 3, 1, 4, 5])
  assert n.dtype == jnp.int32 and nxt.dtype == jnp.int32
  toks = sampling.accepted_tokens(drafts, n, nxt)
  np.testing.assert_array_equal(toks, [
      [3, 1, 4, 2], [3, -1, -1, -1], [3, 1, -1, -1], [3, 1, 4, -1], [0, 0, 0, 5]])
  np.testing.assert_array_equal(sampling.accepted_tokens(drafts, n, nxt, pad=0)[1], [3, 0, 0, 0])


def test_verify_greedy_rejects_bad_shapes():
  with pytest.raises(ValueError, match='K\\+1'):
    sampling.verify_greedy(jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3, 7)))


# ----------------------------------------------------------------------------------------------------
# Stochastic verification: exactness by simulation of the whole speculative procedure.

V, K = 5, 3
NUM_SAMPLES = 40_000
CONTEXT = 0  # the token before the first draft
NUM_TOKENS = 4  # tokens generated per sample; ROUNDS rounds always emit at least that many
ROUNDS = NUM_TOKENS

# Target: a Markov chain p(x_t | x_{t-1}) with some impossible transitions.
P = np.array([
    [0.40, 0.25, 0.20, 0.15, 0.00],
    [0.10, 0.00, 0.30, 0.30, 0.30],
    [0.05, 0.45, 0.05, 0.05, 0.40],
    [0.30, 0.30, 0.00, 0.20, 0.20],
    [0.20, 0.20, 0.20, 0.20, 0.20],
])
# Drafter: a deliberately different chain, built with the library's own top-k processing (so q has
# zeros where p does not, and the reverse).
DRAFT_LOGITS = np.array([
    [0.0, 1.5, 0.2, -1.0, 1.0],
    [1.0, 0.5, -0.5, 0.0, 2.0],
    [0.3, -0.2, 1.2, 0.0, -1.0],
    [-1.0, 1.0, 1.0, 1.0, 0.0],
    [2.0, 0.0, 0.5, -0.5, 0.1],
])
DRAFT_PARAMS = SamplingParams(temperature=1.0, top_k=3)


def _drafter_q():
  return np.asarray(sampling.probs(jnp.asarray(DRAFT_LOGITS), DRAFT_PARAMS), np.float64)


def _exact_stats():
  """Exact target distributions of token 0, of (token 0, token 1) and of (token 2, token 3)."""
  m0 = P[CONTEXT]
  m2 = m0 @ P @ P
  return m0, m0[:, None] * P, m2[:, None] * P


def _one_round(key, ctx, q_table, p_table, *, greedy_drafts, verify, soft_q_for_greedy=False):
  """Drafts K tokens from the drafter chain and verifies them; returns (tokens [K+1], num_accepted)."""
  draft_keys = jax.random.split(key, K + 1)
  prev, drafts, qs = ctx, [], []
  for j in range(K):
    row = q_table[prev]
    if greedy_drafts:
      d = jnp.argmax(row).astype(jnp.int32)
      q = row if soft_q_for_greedy else jax.nn.one_hot(d, V)
    else:
      d = jax.random.categorical(draft_keys[j], jnp.log(row)).astype(jnp.int32)
      q = row
    drafts.append(d)
    qs.append(q)
    prev = d
  drafts = jnp.stack(drafts)  # [K]
  target_probs = p_table[jnp.concatenate([jnp.array([ctx]), drafts])]  # [K+1, V]
  n, nxt = verify(draft_keys[K], drafts[None], jnp.stack(qs)[None], target_probs[None])
  return sampling.accepted_tokens(drafts[None], n, nxt)[0], n[0]


def run_rounds(keys, round_fn, *, depth: int, rounds: int = ROUNDS):
  """`rounds` speculative rounds per key, each `round_fn(key, ctx) -> (tokens [depth + 1],
  accepted n)`; returns (first NUM_TOKENS tokens [keys, NUM_TOKENS], first-round accepts)."""

  def one(key):
    out = jnp.full((NUM_TOKENS,), -1, jnp.int32)
    count, ctx, first_n = jnp.int32(0), jnp.int32(CONTEXT), jnp.int32(0)
    pos = jnp.arange(NUM_TOKENS)
    for r, k in enumerate(jax.random.split(key, rounds)):
      toks, n = round_fn(k, ctx)
      fill = (pos >= count) & (pos <= count + n)
      out = jnp.where(fill, toks[jnp.clip(pos - count, 0, depth)], out)
      count, ctx = count + n + 1, toks[n]
      first_n = n if r == 0 else first_n
    return out, first_n

  return jax.vmap(one)(keys)


@functools.partial(jax.jit, static_argnames=('greedy_drafts', 'verify', 'soft_q_for_greedy'))
def _simulate(keys, q_table, p_table, *, greedy_drafts, verify, soft_q_for_greedy=False):
  """Runs ROUNDS speculative rounds per key; returns (first NUM_TOKENS tokens, first-round accepts)."""
  return run_rounds(keys, functools.partial(
      _one_round, q_table=q_table, p_table=p_table, greedy_drafts=greedy_drafts, verify=verify,
      soft_q_for_greedy=soft_q_for_greedy), depth=K)


def _pvalues(tokens):
  tokens = np.asarray(tokens)
  assert (tokens >= 0).all()
  m0, j01, j23 = _exact_stats()
  return (
      chi2_pvalue(np.bincount(tokens[:, 0], minlength=V), m0),
      chi2_pvalue(np.bincount(tokens[:, 0] * V + tokens[:, 1], minlength=V * V), j01),
      chi2_pvalue(np.bincount(tokens[:, 2] * V + tokens[:, 3], minlength=V * V), j23),
  )


def _run(verify, *, greedy_drafts, seed, soft_q_for_greedy=False, q_table=None):
  keys = jax.random.split(jax.random.key(seed), NUM_SAMPLES)
  q_table = jnp.asarray(_drafter_q() if q_table is None else q_table, jnp.float32)
  return _simulate(keys, q_table, jnp.asarray(P, jnp.float32), greedy_drafts=greedy_drafts,
                   verify=verify, soft_q_for_greedy=soft_q_for_greedy)


def test_drafter_really_differs_from_target():
  q = _drafter_q()
  assert np.abs(q - P).sum(-1).min() > 0.3
  assert ((q > 0) & (P == 0)).any() and ((q == 0) & (P > 0)).any()


def test_stochastic_verification_is_exact():
  tokens, first_n = _run(sampling.verify_stochastic, greedy_drafts=False, seed=10)
  pvals = _pvalues(tokens)
  assert min(pvals) > FALSE_ALARM, pvals
  # Every acceptance count occurs, so rejection at each position and the bonus token are exercised.
  assert (np.bincount(np.asarray(first_n), minlength=K + 1) > 500).all()


def test_stochastic_verification_of_greedy_drafts_is_exact():
  tokens, first_n = _run(sampling.verify_stochastic, greedy_drafts=True, seed=11)
  pvals = _pvalues(tokens)
  assert min(pvals) > FALSE_ALARM, pvals
  assert (np.bincount(np.asarray(first_n), minlength=K + 1) > 500).all()


def test_drafter_equal_to_target_accepts_everything():
  _, first_n = _run(sampling.verify_stochastic, greedy_drafts=False, seed=12, q_table=P)
  assert (np.asarray(first_n) == K).all()
  # Same with processed distributions (top-k and top-p zeros) of random logits, batched.
  params = SamplingParams(temperature=0.9, top_k=20, top_p=0.9)
  kl, kd, kv = jax.random.split(jax.random.key(13), 3)
  logits = jax.random.normal(kl, (256, K + 1, 100)) * 2.0
  p = sampling.probs(logits, params)
  drafts = sampling.sample(kd, logits[:, :K], params)
  n, nxt = jax.jit(sampling.verify_stochastic)(kv, drafts, p[:, :K], p)
  assert (np.asarray(n) == K).all()
  assert (np.take_along_axis(np.asarray(p[:, K]), np.asarray(nxt)[:, None], -1) > 0).all()


def test_verify_stochastic_edge_cases():
  # The target puts all mass on token 2, the draft is 1: rejected, and the residual forces token 2.
  q = jnp.array([[[0.1, 0.6, 0.3, 0.0]]])
  p = jnp.array([[[0.0, 0.0, 1.0, 0.0], [0.25, 0.25, 0.25, 0.25]]])
  n, nxt = sampling.verify_stochastic(jax.random.key(0), jnp.array([[1]]), q, p)
  assert int(n[0]) == 0 and int(nxt[0]) == 2
  # p == q but the draft lies outside their support: rejected with a zero residual; falls back to p
  # instead of producing NaN or an impossible token.
  pq = jnp.array([0.5, 0.5, 0.0, 0.0])
  keys = jax.random.split(jax.random.key(1), 200)
  n, nxt = jax.vmap(lambda k: sampling.verify_stochastic(
      k, jnp.array([[3]]), pq[None, None], jnp.stack([pq, pq])[None]))(keys)
  assert (np.asarray(n) == 0).all()
  assert set(np.asarray(nxt).ravel().tolist()) == {0, 1}
  with pytest.raises(ValueError, match='target_probs'):
    sampling.verify_stochastic(jax.random.key(0), jnp.zeros((1, 2), jnp.int32), q, p)


# ----------------------------------------------------------------------------------------------------
# Power: the same statistics detect plausible verification bugs.


def _verify_resample_from_p(key, draft_tokens, draft_probs, target_probs):
  """Bug: on rejection, resamples from p_j instead of normalize(max(0, p_j - q_j))."""
  k1, k2 = jax.random.split(key)
  n, _ = sampling.verify_stochastic(k1, draft_tokens, draft_probs, target_probs)
  p_n = jnp.take_along_axis(target_probs, n[:, None, None], axis=-2)[:, 0]
  return n, jax.random.categorical(k2, jnp.log(p_n), axis=-1).astype(jnp.int32)


def _verify_no_prefix(key, draft_tokens, draft_probs, target_probs):
  """Bug: counts every accepted draft instead of stopping at the first rejection."""
  k1, k2 = jax.random.split(key)
  q_d = jnp.take_along_axis(draft_probs, draft_tokens[..., None], -1)[..., 0]
  p_d = jnp.take_along_axis(target_probs[:, :-1], draft_tokens[..., None], -1)[..., 0]
  accept = jax.random.uniform(k1, q_d.shape) * q_d < p_d
  n = jnp.sum(accept, -1).astype(jnp.int32)
  _, nxt = sampling.verify_stochastic(k2, draft_tokens, draft_probs, target_probs)
  return n, nxt


@pytest.mark.parametrize('bug', ['resample_from_p', 'no_prefix', 'greedy_drafts_soft_q'])
def test_statistic_detects_wrong_verification(bug):
  if bug == 'resample_from_p':
    tokens, _ = _run(_verify_resample_from_p, greedy_drafts=False, seed=20)
  elif bug == 'no_prefix':
    tokens, _ = _run(_verify_no_prefix, greedy_drafts=False, seed=21)
  else:  # drafts are argmax of q but verified as if sampled from q (a known trap)
    tokens, _ = _run(sampling.verify_stochastic, greedy_drafts=True, seed=22, soft_q_for_greedy=True)
  pvals = _pvalues(tokens)
  assert min(pvals) < FALSE_ALARM, pvals
