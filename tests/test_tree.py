"""Static draft trees (tree.py): topology, the tree-masked forward, path compaction, exact greedy
and stochastic tree verification, tree buckets in the speculative loop.

Stochastic exactness is tested as in tests/test_sampling.py: a Markov-chain target P and a
different drafter chain Q on a 5-token vocabulary; whole speculative procedures (ROUNDS tree
rounds) are simulated NUM_SAMPLES times and the emitted tokens are compared with the target's
exact distributions by chi-square tests at FALSE_ALARM. A power test runs the same statistic on a
deliberately wrong verifier.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma_mtp
from gemma_mtp import config as config_lib
from gemma_mtp import kv_cache
from gemma_mtp import layers
from gemma_mtp import metrics
from gemma_mtp import model as model_lib
from gemma_mtp import params as params_lib
from gemma_mtp import pipeline
from gemma_mtp import sampling
from gemma_mtp import speculative
from gemma_mtp import tree as tree_lib
from gemma_mtp.tree import TreeSpec
from tests.test_sampling import (DRAFT_PARAMS, FALSE_ALARM, NUM_TOKENS, P, V, _drafter_q,
                                 _pvalues, chi2_pvalue, run_rounds)
from tests.test_speculative import (PROMPTS, TARGET, agreeing_pair, exact_first_tokens,
                                    pool_small_cells, random_drafter)

NUM_SAMPLES = 40_000
ROUNDS = NUM_TOKENS
TREE = TreeSpec.from_widths((3, 2, 1))   # 1 + 3 + 6 + 6 = 16 nodes, depth 3


def test_topology():
  t = TreeSpec.from_widths((2, 2, 1))
  assert t.parents == (-1, 0, 0, 1, 1, 2, 2, 3, 4, 5, 6)
  assert t.num_nodes == 11 and t.max_depth == 3
  assert t.depth.tolist() == [0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
  assert t.children[0].tolist() == [1, 2] and t.children[3].tolist() == [7, -1]
  assert t.rank.tolist() == [0, 0, 1, 0, 1, 0, 1, 0, 0, 0, 0]
  assert t.levels == ((0, 1), (1, 3), (3, 7), (7, 11))
  assert t.ancestors[9].tolist() == [True, False, True, False, False, True, False, False, False,
                                     True, False]
  assert TreeSpec.chain(3).parents == (-1, 0, 1, 2)
  for a in (0.3, 0.8):
    np.testing.assert_allclose(TreeSpec.chain(4).expected_tokens(jnp.float32(a)),
                               (1 - a ** 5) / (1 - a), rtol=1e-6)
  with pytest.raises(ValueError, match="BFS"):
    TreeSpec((-1, 0, 1, 0))
  with pytest.raises(ValueError, match="root"):
    TreeSpec((0, 0))
  assert hash(TreeSpec.chain(2)) == hash(TreeSpec.chain(2))
  assert TreeSpec([-1, 0, 0]) == TreeSpec((-1, 0, 0))       # lists are stored as tuples


def test_parse_label_width_and_value():
  t = TreeSpec.parse("3,2,1,1")
  assert t == TreeSpec.parse("3-2-1-1") == TreeSpec.parse(" tree(3,2,1,1) ")
  assert t == TreeSpec.from_widths((3, 2, 1, 1)) and t.num_nodes == 1 + 3 + 6 + 6 + 6
  assert t.label == "tree(3,2,1,1)" and TreeSpec.parse(t.label) == t
  odd = TreeSpec((-1, 0, 0, 0, 2, 2, 4))
  assert odd.label == "tree[-1,0,0,0,2,2,4]" and TreeSpec.parse(odd.label) == odd
  assert (t.max_width, odd.max_width, TreeSpec.chain(4).max_width) == (3, 3, 1)
  for bad in ("3;2", "", "tree(2,x)"):
    with pytest.raises(ValueError, match="widths per depth"):
      TreeSpec.parse(bad)
  with pytest.raises(ValueError, match="positive"):
    TreeSpec.parse("2,0")
  # A chain's value is the chain formula of speculative.best_bucket (node_cost plays no part).
  for a in (0.3, 0.8):
    np.testing.assert_allclose(
        TreeSpec.chain(3).value(jnp.float32(a), draft_cost=0.05, node_cost=0.5),
        (1 - a ** 4) / (1 - a) / (1 + 3 * 0.05), rtol=1e-6)


def test_bucket_policy_with_trees():
  """Trees are buckets after the chains: a wide tree wins at moderate acceptance when its extra
  nodes are cheap, the chain of the same depth wins when drafts are almost always right."""
  wide = TreeSpec.from_widths((3, 1, 1))                  # 10 nodes, depth 3
  cheap = speculative.SpecConfig(draft_lengths=(3,), trees=(wide,), node_cost=0.0)
  dear = speculative.SpecConfig(draft_lengths=(3,), trees=(wide,), node_cost=0.05)
  assert int(speculative.best_bucket(jnp.float32(0.5), cheap)) == 1
  assert int(speculative.best_bucket(jnp.float32(0.99), dear)) == 0
  assert cheap.bucket_labels == (3, "tree(3,1,1)")
  assert (cheap.max_draft, cheap.max_chunk, cheap.max_width) == (3, 10, 3)
  only = speculative.SpecConfig(draft_lengths=(), trees=(wide,), adaptive=False)
  assert (only.max_draft, only.max_chunk) == (3, 10)
  with pytest.raises(ValueError, match="draft_lengths"):
    speculative.SpecConfig(draft_lengths=(), trees=())
  with pytest.raises(ValueError, match="at least one draft"):
    speculative.SpecConfig(trees=(TreeSpec((-1,)),))
  with pytest.raises(ValueError, match="duplicates"):
    speculative.SpecConfig(trees=(wide, TreeSpec.parse("3,1,1")))


def test_attention_mask():
  t = TreeSpec.from_widths((2, 1))        # nodes 0; 1, 2; 3 (child of 1), 4 (child of 2)
  chunk_start = jnp.array([6])
  kv_idx = jnp.arange(14)[None]            # a full buffer; slots 6..10 hold the tree
  q_idx = chunk_start[:, None] + jnp.asarray(t.depth)[None]
  m = np.asarray(tree_lib.attention_mask(q_idx, kv_idx, jnp.array([1]), window=None,
                                         chunk_start=chunk_start, tree=t))[0]
  committed = [False] + [True] * 5          # index 0 is padding (start = 1)
  for n in range(5):
    assert m[n, :6].tolist() == committed
    assert m[n, 6:11].tolist() == t.ancestors[n].tolist()
    assert not m[n, 11:].any()             # stale scratch beyond the chunk
  # Sliding window of 3 at logical index 6 + depth: node 3 (depth 2, index 8) sees 6..8 only.
  m = np.asarray(tree_lib.attention_mask(q_idx, kv_idx, jnp.array([0]), window=3,
                                         chunk_start=chunk_start, tree=t))[0]
  assert m[3, :6].tolist() == [False] * 6 and m[0, :6].tolist() == [False] * 4 + [True] * 2


@pytest.mark.parametrize("window", [None, 2, 3, 8])
def test_chain_tree_mask_equals_causal_mask(window):
  """For TreeSpec.chain(K) the tree mask is the chain's causal / sliding mask, also when the
  window is shorter than the chunk (in-chunk keys obey the window as well)."""
  t = TreeSpec.chain(4)
  chunk_start, start = jnp.array([6, 7]), jnp.array([1, 0])
  kv_idx = jnp.broadcast_to(jnp.arange(14), (2, 14))
  q_idx = chunk_start[:, None] + jnp.arange(5)[None]
  got = tree_lib.attention_mask(q_idx, kv_idx, start, window=window, chunk_start=chunk_start,
                                tree=t)
  want = layers.attention_mask(q_idx, kv_idx, start, window=window)
  np.testing.assert_array_equal(got, want)


def test_verify_greedy_hand_built():
  t = TreeSpec.from_widths((2, 2))         # 0; 1, 2; 3, 4 (of 1); 5, 6 (of 2)
  tokens = jnp.array([[9, 4, 7, 1, 2, 3, 5]] * 3)
  best = jnp.array([
      [7, 0, 5, 0, 0, 0, 0],    # root -> 7 = node 2 (rank 1), node 2 -> 5 = node 6, bonus at 6: 0
      [4, 8, 0, 0, 0, 0, 0],    # root -> node 1, node 1 wants 8: no child, stop
      [6, 0, 0, 0, 0, 0, 0],    # root wants 6: nothing accepted
  ])
  logits = jax.nn.one_hot(best, 10) * 3.0
  path, n, nxt, rej = tree_lib.verify_greedy(tokens, logits, tree=t)
  assert n.tolist() == [2, 1, 0] and nxt.tolist() == [0, 8, 6]
  assert path.tolist() == [[0, 2, 6], [0, 1, 1], [0, 0, 0]]
  assert rej.tolist() == [2, 2, 2]          # rank-0 misses (1 + 1); both children; both children


def test_chain_tree_equals_chain_verification():
  """Greedy verification of TreeSpec.chain(K) = sampling.verify_greedy of the chain."""
  k, b = 4, 256
  logits = jax.random.normal(jax.random.PRNGKey(1), (b, k + 1, V)) * 2
  wrong = jax.random.uniform(jax.random.PRNGKey(2), (b, k)) < 0.25   # drafts mostly agree
  drafts = jnp.where(wrong, jax.random.randint(jax.random.PRNGKey(0), (b, k), 0, V),
                     jnp.argmax(logits[:, :k], axis=-1)).astype(jnp.int32)
  tokens = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), drafts], axis=1)
  path, n, nxt, rej = tree_lib.verify_greedy(tokens, logits, tree=TreeSpec.chain(k))
  n_ref, nxt_ref = sampling.verify_greedy(drafts, logits)
  assert n.tolist() == n_ref.tolist() and nxt.tolist() == nxt_ref.tolist()
  assert len(set(n.tolist())) == k + 1
  np.testing.assert_array_equal(path, np.minimum(np.arange(k + 1)[None], np.asarray(n)[:, None]))
  np.testing.assert_array_equal(rej, np.asarray(n) < k)


# ---- stochastic exactness by simulation ----------------------------------------------------------

def _draw(key, q_row, k, mode):
  if mode == tree_lib.WITHOUT_REPLACEMENT:
    g = jax.random.gumbel(key, q_row.shape)
    return jax.lax.top_k(jnp.log(q_row) + g, k)[1].astype(jnp.int32)
  if mode == tree_lib.WITH_REPLACEMENT:
    return jax.random.categorical(key, jnp.log(q_row), shape=(k,)).astype(jnp.int32)
  return jax.lax.top_k(q_row, k)[1].astype(jnp.int32)


def _tree_round(key, ctx, q_table, p_table, *, tree, mode, verify_mode):
  """Drafts `tree` from the drafter chain and verifies it; returns (tokens [Dm+1], accepted)."""
  keys = jax.random.split(key, tree.num_nodes + 1)
  tokens = [ctx]
  for n in range(tree.num_nodes):
    kids = [c for c in tree.children[n] if c >= 0]
    if kids:
      cand = _draw(keys[n], q_table[tokens[n]], len(kids), mode)
      assert kids[0] == len(tokens)       # BFS: the children come next
      tokens.extend(cand[i] for i in range(len(kids)))
  tokens = jnp.stack([jnp.asarray(x, jnp.int32) for x in tokens])[None]      # [1, N]
  q = q_table[tokens]                                                  # [1, N, V]
  p = p_table[tokens]
  path, n, nxt, _ = tree_lib.verify_stochastic(keys[-1], tokens, q, p, tree=tree,
                                               mode=verify_mode)
  path_tokens = jnp.take_along_axis(tokens, path[:, 1:], axis=1)
  return sampling.accepted_tokens(path_tokens, n, nxt)[0], n[0]


@functools.partial(jax.jit, static_argnames=("tree", "mode", "verify_mode"))
def _simulate(keys, q_table, p_table, *, tree, mode, verify_mode):
  return run_rounds(keys, functools.partial(_tree_round, q_table=q_table, p_table=p_table,
                                            tree=tree, mode=mode, verify_mode=verify_mode),
                    depth=tree.max_depth, rounds=ROUNDS)


def _run(mode, *, seed, verify_mode=None, tree=TREE):
  keys = jax.random.split(jax.random.key(seed), NUM_SAMPLES)
  return _simulate(keys, jnp.asarray(_drafter_q(), jnp.float32), jnp.asarray(P, jnp.float32),
                   tree=tree, mode=mode, verify_mode=verify_mode or mode)


@pytest.mark.parametrize("mode", tree_lib.MODES)
def test_stochastic_tree_verification_is_exact(mode):
  tokens, first_n = _run(mode, seed=3)
  pvals = _pvalues(tokens)
  assert min(pvals) > FALSE_ALARM, pvals
  # Every depth of acceptance occurs (rejections at each depth and the bonus token are exercised).
  assert (np.bincount(np.asarray(first_n), minlength=TREE.max_depth + 1) > 300).all()


def test_statistic_detects_wrong_tree_verification():
  """Candidates drawn without replacement but verified as if i.i.d. (q_i = q): biased."""
  tokens, _ = _run(tree_lib.WITHOUT_REPLACEMENT, seed=4,
                   verify_mode=tree_lib.WITH_REPLACEMENT)
  assert min(_pvalues(tokens)) < FALSE_ALARM


def test_draw_children():
  logits = jnp.log(jnp.asarray(_drafter_q(), jnp.float32))
  toks, q = tree_lib.draw_children(None, logits, k=2,
                                   sampler=sampling.SamplingParams(temperature=0.0))
  assert q is None and toks.tolist() == jnp.argsort(-logits, axis=-1)[:, :2].tolist()
  toks, q = tree_lib.draw_children(jax.random.PRNGKey(0), logits, k=3, sampler=DRAFT_PARAMS)
  assert q.shape == logits.shape
  for row in np.asarray(toks):
    assert len(set(row.tolist())) == 3                 # distinct


# ---- the tree forward, compaction and the loop --------------------------------------------------

# Sliding window 8, a prompt of 21 tokens: the ring wraps before the tree is written.
CFG = config_lib.tiny(layer_types=config_lib.pattern(4, 2), num_kv_shared_layers=1,
                      per_layer_dim=8, per_layer_vocab_size=256)
SMALL = TreeSpec.from_widths((2, 2, 1))     # 11 nodes; depth 3


@pytest.fixture(scope="module")
def tree_setup():
  params = params_lib.init_params(CFG, jax.random.PRNGKey(0))
  prompt = jax.random.randint(jax.random.PRNGKey(1), (1, 21), 0, CFG.vocab_size)
  _, cache = model_lib.prefill(params, prompt, jnp.zeros((1,), jnp.int32), config=CFG,
                               max_len=48, max_chunk=SMALL.num_nodes + 1)
  nodes = jax.random.randint(jax.random.PRNGKey(2), (1, SMALL.num_nodes), 0, CFG.vocab_size)
  res = jax.jit(lambda p, t, c: model_lib.forward(p, t, config=CFG, cache=c, tree=SMALL))(
      params, nodes, cache)
  return params, prompt, cache, nodes, res


def _root_path(tree, n):
  path = [n]
  while tree.parents[path[-1]] > 0:
    path.append(tree.parents[path[-1]])
  return path[::-1]                                  # below the root, root excluded


def test_tree_forward_equals_forward_of_each_root_path(tree_setup):
  """Node n's logits = the no-cache forward of prompt + the tokens on its root path."""
  params, prompt, _, nodes, res = tree_setup
  fwd = jax.jit(lambda p, t: model_lib.forward(p, t, config=CFG).logits[:, -1])
  scale = float(jnp.max(jnp.abs(res.logits)))
  for n in range(SMALL.num_nodes):
    seq = jnp.concatenate([prompt, nodes[:, :1], nodes[:, _root_path(SMALL, n)]], axis=1) \
        if n else jnp.concatenate([prompt, nodes[:, :1]], axis=1)
    want = fwd(params, seq)
    assert float(jnp.max(jnp.abs(res.logits[:, n] - want))) <= 1e-5 * scale, n


@pytest.mark.parametrize("num", [3, 1, 0])
def test_compaction_equals_chain_forward(tree_setup, num):
  """Path 0 -> 2 -> 6 -> 10 (rank 1, rank 1, rank 0): after `compact`, the committed entries and
  the next decode step equal those of a chain forward over the same tokens."""
  params, _, cache, nodes, res = tree_setup
  path = jnp.array([[2, 6, 10]], jnp.int32)
  got = kv_cache.compact(res.cache, path, jnp.array([num]))
  chain_tokens = jnp.concatenate([nodes[:, :1], jnp.take_along_axis(nodes, path, axis=1)], axis=1)
  ref = model_lib.forward(params, chain_tokens, config=CFG, cache=cache).cache
  length = int(cache.length[0])
  committed = np.arange(length, length + num + 1)
  for layer, (a, b) in enumerate(zip(got.k + got.v, ref.k + ref.v)):
    if a is None:
      continue
    s = a.shape[1]   # (float32 entries of forwards over different numbers of positions: equal
    # to rounding, relative to their scale as the logits below; a wrong slot is off by O(1))
    want = b[0, committed % s]
    np.testing.assert_allclose(a[0, committed % s], want,
                               atol=1e-5 * float(jnp.max(jnp.abs(want))), err_msg=layer)
  r = got.ring_size
  np.testing.assert_array_equal(got.ring_idx[0, committed % r], committed)
  step = jax.jit(lambda c, t: model_lib.forward(params, t, config=CFG, cache=c).logits)
  tok = jnp.array([[5]], jnp.int32)
  length = cache.length + num + 1
  a = step(got.replace(length=length), tok)
  b = step(ref.replace(length=length), tok)
  assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * float(jnp.max(jnp.abs(b)))


def _clean(drafter):
  return gemma_mtp.Drafter(drafter.config.replace(convention="clean"), drafter.params)


@pytest.fixture(scope="module")
def greedy_pair():
  """A pair whose drafts are right sometimes, and plain greedy decoding of PROMPTS (rows of
  different lengths)."""
  target, drafter = agreeing_pair(TARGET, residual_scale=0.8)
  return target, _clean(drafter), gemma_mtp.generate(target, PROMPTS, max_new_tokens=60).tokens


def test_greedy_tree_rounds_equal_plain_decoding(greedy_pair):
  """Chains and trees as adaptive buckets, rows of different lengths, drafts right sometimes:
  token for token plain greedy decoding."""
  target, drafter, ref = greedy_pair
  irregular = TreeSpec((-1, 0, 0, 0, 2, 2, 4))   # only the rank-1 child of the root branches
  spec = speculative.SpecConfig(draft_lengths=(2,), trees=(SMALL, irregular),
                                initial_acceptance=0.4)
  out = gemma_mtp.generate(target, PROMPTS, max_new_tokens=60, drafter=drafter,
                           spec_config=spec)
  assert out.tokens == ref
  st = out.stats
  counts = st["bucket_counts"]
  assert counts["tree(2,2,1)"] + counts["tree[-1,0,0,0,2,2,4]"] > 0, counts
  acc = [a for a in st["acceptance_by_position"] if a is not None]
  assert 0.2 < acc[0] < 1.0, st
  assert sum(st["accepted_by_rank"]) == st["accepted"], st
  sizes = {2: 3, "tree(2,2,1)": 11, "tree[-1,0,0,0,2,2,4]": 7}
  assert st["positions_per_forward"] == pytest.approx(
      sum(sizes[k] * c for k, c in counts.items()) / sum(counts.values()))


def test_greedy_tree_accepts_lower_ranked_candidates():
  """A random drafter on an 8-token vocabulary: the target's token is often the drafter's second
  or third choice, so paths through rank-1 and rank-2 nodes get accepted (and compacted); the
  output is still plain greedy decoding, row by row of a ragged batch."""
  cfg = config_lib.tiny(vocab_size=8, layer_types=config_lib.pattern(4, 2))
  target = gemma_mtp.random_target(cfg, seed=3)
  drafter = random_drafter(cfg, seed=11, convention="clean")
  prompts = [[1, 5, 2, 7, 3, 3, 0], [4], [6, 1, 2]]
  ref = gemma_mtp.generate(target, prompts, max_new_tokens=40).tokens
  spec = speculative.SpecConfig(draft_lengths=(), trees=(TreeSpec.from_widths((3, 2, 1)),),
                                adaptive=False)
  out = gemma_mtp.generate(target, prompts, max_new_tokens=40, drafter=drafter,
                           spec_config=spec)
  assert out.tokens == ref
  ranks = out.stats["accepted_by_rank"]
  assert sum(ranks) == out.stats["accepted"] and ranks[1] > 0 and ranks[2] > 0, out.stats
  # An EOS token that occurs early: rows stop wherever it falls in an accepted path.
  eos = ref[0][3]
  ref = gemma_mtp.generate(target, prompts, max_new_tokens=40, eos_id=eos).tokens
  out = gemma_mtp.generate(target, prompts, max_new_tokens=40, drafter=drafter,
                           spec_config=spec, eos_id=eos)
  assert out.tokens == ref and min(len(r) for r in ref) < 40 and all(
      r[-1] == eos for r in ref if len(r) < 40)


def test_chain_tree_bucket_equals_chain_bucket(greedy_pair):
  """TreeSpec.chain(3) as a tree bucket makes the same drafts, the same tokens and the same
  statistics as the chain bucket K = 3: the tree path (draft_tree, tree-masked forward, tree
  walk, compaction) reduces to the chain path."""
  target, drafter, ref = greedy_pair
  kw = dict(max_new_tokens=60, drafter=drafter, return_drafts=True)
  chain = gemma_mtp.generate(target, PROMPTS, spec_config=speculative.SpecConfig(
      draft_lengths=(3,), adaptive=False), **kw)
  tree = gemma_mtp.generate(target, PROMPTS, spec_config=speculative.SpecConfig(
      draft_lengths=(), trees=(TreeSpec.chain(3),), adaptive=False), **kw)
  assert chain.tokens == tree.tokens == ref
  for key in ("drafts", "target_forwards", "drafted", "accepted", "acceptance_by_position",
              "final_acceptance_estimate"):
    assert chain.stats[key] == tree.stats[key], key
  assert 0 < chain.stats["accepted"] < chain.stats["drafted"]
  assert tree.stats["accepted_by_rank"] == [chain.stats["accepted"]]


def test_greedy_tree_rounds_need_compaction(greedy_pair, monkeypatch):
  """Power of the equality test above: with the accepted path left where the tree forward wrote
  it (no `kv_cache.compact`), the output differs from plain decoding."""
  target, drafter, ref = greedy_pair
  monkeypatch.setattr(kv_cache, "compact", lambda cache, src, num: cache)
  # A node_cost no other test uses: this program is compiled (and cached) for this test only.
  spec = speculative.SpecConfig(draft_lengths=(), trees=(SMALL,), adaptive=False,
                                node_cost=0.0123)
  try:
    out = gemma_mtp.generate(target, PROMPTS, max_new_tokens=60, drafter=drafter,
                             spec_config=spec)
  finally:
    jax.clear_caches()
  assert out.tokens != ref


def test_trees_need_a_clean_assistant_drafter(greedy_pair):
  target, _, _ = greedy_pair
  spec = speculative.SpecConfig(draft_lengths=(2,), trees=(SMALL,))
  hf = random_drafter(TARGET, convention="hf")
  heads = gemma_mtp.random_drafter(target, kind="parallel_heads", num_heads=3, mlp_dim=16)
  own = gemma_mtp.random_drafter(target, kind="self", num_layers=2)
  for drafter, match in ((hf, "'clean' convention, got convention 'hf'"),
                         (heads, "'parallel_heads' drafter drafts chains only"),
                         (own, "'self' drafter drafts chains only")):
    with pytest.raises(ValueError, match=match):
      gemma_mtp.generate(target, PROMPTS, max_new_tokens=4, drafter=drafter, spec_config=spec)


def test_tree_sampling_is_exact():
  """First 3 tokens of 24,000 samples with a (2, 1) tree bucket vs the exact target
  distribution (chi-square at FALSE_ALARM), drafts sampled without replacement."""
  cfg = config_lib.tiny(vocab_size=8, layer_types=config_lib.pattern(4, 2),
                        final_logit_softcap=None)
  target = gemma_mtp.random_target(cfg, seed=3)
  drafter = random_drafter(cfg, seed=11, convention="clean")
  prompt, n, rows = [1, 5, 2, 7], 3, 24_000
  sampler = sampling.SamplingParams(temperature=1.0)
  exact = exact_first_tokens(target, prompt, sampler)
  spec = speculative.SpecConfig(draft_lengths=(), trees=(TreeSpec.from_widths((2, 1)),),
                                adaptive=False)
  out = gemma_mtp.generate(target, [prompt] * rows, drafter=drafter, spec_config=spec,
                           max_new_tokens=n, temperature=1.0, seed=7)
  assert 0 < out.stats["accepted"] < out.stats["drafted"]
  assert out.stats["accepted_by_rank"][1] > 0         # the second candidate gets accepted too
  counts = np.zeros([cfg.vocab_size] * n)
  for row in out.tokens:
    counts[tuple(row)] += 1
  assert chi2_pvalue(*pool_small_cells(counts, exact, rows)) > FALSE_ALARM


# ---- measurement: trees in metrics / pipeline records --------------------------------------------

def test_spec_config_buckets_mix_chains_and_trees():
  tree = TreeSpec.from_widths((2, 1))
  cfg = metrics.spec_config((2, 4, tree), False, 0.1)
  assert cfg.draft_lengths == (2, 4) and cfg.trees == (tree,) and cfg.draft_cost == 0.1
  assert metrics.bucket_fields(cfg) == {"draft_lengths": [2, 4], "trees": ["tree(2,1)"],
                                        "tree_nodes": [5]}
  assert metrics.bucket_fields(metrics.spec_config((1, 2), True)) == {"draft_lengths": [1, 2]}
  with pytest.raises(ValueError, match="before trees"):
    metrics.spec_config((tree, 2), False)


def test_evaluate_pair_reports_trees_next_to_chains():
  """Acceptance and timed runs of a tree beside chains (pipeline.evaluate_pair -> metrics.compare):
  the tree entries name the tree and report tokens per forward, acceptance by depth and the
  ranks accepted; "()" still times the best fixed chain, and greedy outputs equal plain ones."""
  cfg = config_lib.tiny(vocab_size=8, layer_types=config_lib.pattern(4, 2))
  target = gemma_mtp.random_target(cfg, seed=3)
  drafter = random_drafter(cfg, seed=11, convention="clean")
  tree = TreeSpec.from_widths((3, 1))
  prompts = [[1, 5, 2, 7, 3, 3, 0], [4], [6, 1, 2]]
  res = pipeline.evaluate_pair(
      target, drafter, prompts, max_new_tokens=12, repeats=1,
      acceptance_runs=[(0.0, (1,), False), (0.0, (2,), False), (0.0, (tree,), False)],
      speed_runs=[(0.0, 2, (), False), (0.0, 2, (tree,), False)])
  chains, (tree_run,) = res["acceptance"][:2], res["acceptance"][2:]
  assert all("trees" not in e for e in chains)
  assert tree_run["draft_lengths"] == [] and tree_run["trees"] == ["tree(3,1)"]
  assert tree_run["tree_nodes"] == [7] and tree_run["positions_per_forward"] == 7
  assert len(tree_run["acceptance_by_position"]) == 2
  assert sum(tree_run["accepted_by_rank"]) == tree_run["accepted"]
  best = max(chains, key=lambda e: e["tokens_per_forward"])["draft_lengths"]
  chain_speed, tree_speed = res["speed"]
  assert chain_speed["draft_lengths"] == best and "trees" not in chain_speed
  assert tree_speed["trees"] == ["tree(3,1)"] and tree_speed["batch"] == 2
  assert chain_speed["outputs_equal"] and tree_speed["outputs_equal"]
  assert tree_speed["speculative_tokens_per_second"] > 0 and tree_speed["tokens_per_forward"] > 1
