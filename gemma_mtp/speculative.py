"""Speculative decoding with an MTP drafter: one compiled `lax.while_loop` over draft rounds.

Each round (one loop iteration, a static draft length K chosen from the buckets):
  1. draft: K drafts from (last token, target hidden state) by the drafter's kind
     (`drafter_kinds`: the MTP assistant's K steps on the target's tap K/V, parallel heads' one
     call, or the self-drafter's K steps of the target's first layers); greedy drafts are
     argmaxes, stochastic drafts are samples from the processed drafter distribution q (same
     temperature / top-k / top-p as the target);
  2. verify: one target forward over [last, d_1..d_K] (K + 1 positions) through the cache;
  3. accept per row: greedy = longest prefix equal to the target's argmax, then the target's token;
     stochastic = Leviathan et al. (accept min(1, p/q), resample from norm(max(0, p - q)), bonus
     token from p), so the emitted distribution is exactly the target's;
  4. commit: `cache.length += accepted + 1` (rejected K/V stay in the buffers, invisible);
  5. statistics, and the adaptive choice of the next round's bucket.

Tree buckets (`SpecConfig.trees`, tree.py; design in experiments/tree_drafting_design.md) draft
several candidates per node (top-k greedy, or sampled without replacement) with the drafter kind's
`draft_tree` (the assistant, 'clean' convention), verify the N nodes in one tree-masked target
forward, walk the tree (greedy, or recursive rejection sampling over the siblings: exact), move
the accepted path's K/V into place (`kv_cache.compact`), and commit exactly as a chain round
does (`_commit`). A chain round is unchanged by the presence of tree buckets.

Adaptive draft length (`SpecConfig.adaptive`): an estimator (`AdaptiveState`) keeps discounted
counts, per draft position j, of the rows whose draft j was judged (drafts 1..j-1 accepted) and of
those whose draft j was accepted; every round multiplies all counts by `ema_decay` and adds the
round's rows, so a batch of B rows weighs B times one row (`position_decay='when_judged'`: a
position's counts decay only in the rounds that judged it). The conditional acceptance
    p_j = (accepted_j + w a) / (judged_j + w)        (w = `prior_weight`)
is shrunk toward the pooled per-draft acceptance a (all accepted drafts over all judged
candidates, itself shrunk toward `initial_acceptance`); a position no round has reached (by
default: lately) is estimated by a, so a long K whose first positions look good gets tried. A
chain K then yields
    E[tokens | K] = 1 + sum_{i<=K} prod_{j<=i} p_j
per round at the cost `verify_costs[K] + K c` (c = `draft_cost` of one drafter step, verify_costs
measured by `bench.verify_costs`: a target forward of K + 1 positions relative to one of 1;
default 1). A tree bucket keeps the geometric `tree.TreeSpec.value` at a (its verification cost
interpolated from the chains' measured ones). The bucket of best E[tokens] / cost wins if it
beats the current one by the relative `switch_margin` (hysteresis). The loop body holds one inner
`lax.while_loop` per bucket that runs rounds while the rule keeps that bucket
(`SpecConfig.dispatch='loops'`): a round of the chosen bucket is compiled and run as in a
fixed-K loop, with no conditional, and a change of bucket (4-5% of the rounds on the demo
pair) costs one check per inner loop (designed from runs V-AB; its GPU time is not measured
yet: experiments/NOTES.md, "Not run yet"). `dispatch='switch'` runs every round through a
`lax.switch` over the buckets instead, which XLA's GPU runtime executes by reading the branch
index back to the host: 55-95 us more per round than a fixed-K round on the H200 demo pair
(rounds of 0.6-1.2 ms; experiments/NOTES.md, runs Y, Z), once the switch ended the loop body
(anything after a conditional in a while body made XLA copy every buffer of the loop, the
target's whole K/V cache included, each round: runs V, Y). With `segment_rounds` > 1 the rule
chooses only every that many rounds (not faster on the demo pair: runs R, S). The estimator is
an input and an output of `speculative_generate`, so a serving loop carries it from one call to
the next (`api.generate(adaptive_state=...)`) instead of restarting every call from the prior.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gemma_mtp import decoding
from gemma_mtp import drafter_kinds
from gemma_mtp import kv_cache as kvc
from gemma_mtp import model as model_lib
from gemma_mtp import sampling
from gemma_mtp import tree as tree_lib
from gemma_mtp.config import ModelConfig
from gemma_mtp.kv_cache import KVCache

F32 = jnp.float32


DISPATCHES = ("loops", "switch")   # SpecConfig.dispatch
POSITION_DECAYS = ("every_round", "when_judged")   # SpecConfig.position_decay


@dataclasses.dataclass(frozen=True)
class SpecConfig:
  """Static configuration of the speculative loop.

  Attributes:
    draft_lengths: the static chain buckets K (each compiled once inside the loop); may be ()
      when `trees` is given.
    adaptive: choose the bucket per round from the acceptance estimate (`AdaptiveState`); if
      False, the first bucket is used for every round (the first chain, or the first tree if
      there is none).
    ema_decay: per round, the factor on the estimator's past counts.
    position_decay: which rounds decay a draft position's counts (`judged`, `accepted`; the
      pooled counts decay every round). 'every_round' (the default): all of them, so a position
      no round reaches lately drifts back to the pooled estimate. 'when_judged': only rounds in
      which some running row judged that position, so each position's estimate is a moving
      average over the rounds that reached it, and the deep positions of a long bucket keep
      what was last seen there while shorter buckets run (on the GPU pair's mixed workload
      it was 0.5-4.8% slower than the default in runs AX-AX3: experiments/NOTES.md).
    initial_acceptance: the prior per-draft acceptance (what the pooled estimate starts from).
    prior_weight: pseudo-counts w of the priors: of `initial_acceptance` in the pooled
      estimate, of the pooled estimate in each position's.
    switch_margin: hysteresis: the bucket changes only to one whose value (expected tokens per
      cost) exceeds the current bucket's by this relative margin.
    draft_cost: c, the cost of one drafter step relative to one target forward.
    verify_costs: per chain bucket (same order as `draft_lengths`), the cost of verifying K
      drafts (a target forward of K + 1 positions) relative to a forward of one position
      (`bench.verify_costs`); () = 1 for every K.
    trees: static draft-tree buckets (`tree.TreeSpec`), numbered after the chains; they need a
      drafter that drafts trees (`drafter_kinds.check_trees`: the assistant, 'clean').
    node_cost: the adaptive rule's cost of verifying one tree node beyond a chain of the same
      depth, relative to one target forward (`tree.TreeSpec.value`).
    segment_rounds: adaptive: the rule chooses once per segment of this many rounds (the
      estimator still counts every round). 1 (the default) = choose every round: on the H200
      demo pair segments of 4 were no faster (NOTES.md, runs R, S; with `dispatch='switch'`).
    dispatch: adaptive: how a round runs the chosen bucket. 'loops' (the default): the loop
      body holds one inner `lax.while_loop` per bucket, each running rounds while the rule keeps
      its bucket: a round runs as in a fixed-K loop and only a change of bucket adds the inner
      loops' checks (the rule changes bucket in 4-5% of the demo pair's rounds).
      'switch': a `lax.switch` over the buckets every round (XLA's GPU runtime reads its
      branch index back to the host: 55-95 us more per round than fixed K on the H200 demo
      pair, NOTES.md, runs Y, Z).
  """

  draft_lengths: tuple[int, ...] = (1, 2, 4, 8)
  adaptive: bool = True
  ema_decay: float = 0.9
  position_decay: str = "every_round"
  initial_acceptance: float = 0.6
  prior_weight: float = 4.0
  switch_margin: float = 0.03
  draft_cost: float = 0.05
  verify_costs: tuple[float, ...] = ()
  trees: tuple[tree_lib.TreeSpec, ...] = ()
  node_cost: float = 0.02
  segment_rounds: int = 1
  dispatch: str = "loops"

  def __post_init__(self):
    if not (self.draft_lengths or self.trees) or any(k < 1 for k in self.draft_lengths):
      raise ValueError(f"draft_lengths must be positive integers (or () with trees given), got "
                       f"{self.draft_lengths}")
    if any(not isinstance(t, tree_lib.TreeSpec) or t.num_nodes < 2 for t in self.trees):
      raise ValueError(f"trees must be tree.TreeSpec with at least one draft, got {self.trees}")
    if len(set(self.trees)) != len(self.trees):
      raise ValueError(f"trees has duplicates: {[t.label for t in self.trees]}")
    if len(set(self.draft_lengths)) != len(self.draft_lengths):
      raise ValueError(f"draft_lengths has duplicates: {self.draft_lengths}")
    if not 0.0 <= self.ema_decay < 1.0:
      raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
    if self.position_decay not in POSITION_DECAYS:
      raise ValueError(f"position_decay must be one of {POSITION_DECAYS}, got "
                       f"{self.position_decay!r}")
    if not 0.0 <= self.initial_acceptance <= 1.0:
      raise ValueError(f"initial_acceptance must be in [0, 1], got {self.initial_acceptance}")
    if not self.prior_weight > 0.0:
      raise ValueError(f"prior_weight must be > 0, got {self.prior_weight}")
    if self.segment_rounds < 1:
      raise ValueError(f"segment_rounds must be >= 1, got {self.segment_rounds}")
    if self.dispatch not in DISPATCHES:
      raise ValueError(f"dispatch must be one of {DISPATCHES}, got {self.dispatch!r}")
    if not 0.0 <= self.switch_margin < 1.0:
      raise ValueError(f"switch_margin must be in [0, 1), got {self.switch_margin}")
    if self.verify_costs and (len(self.verify_costs) != len(self.draft_lengths)
                              or any(not c > 0 for c in self.verify_costs)):
      raise ValueError(f"verify_costs must be () or one positive cost per draft length "
                       f"{self.draft_lengths}, got {self.verify_costs}")

  @property
  def max_draft(self) -> int:
    """The deepest bucket (chain length or tree depth)."""
    return max(list(self.draft_lengths) + [t.max_depth for t in self.trees])

  @property
  def max_chunk(self) -> int:
    """The most positions one verification writes (K + 1, or a tree's N nodes)."""
    return max([k + 1 for k in self.draft_lengths] + [t.num_nodes for t in self.trees])

  @property
  def max_width(self) -> int:
    """The most candidates of one node (1 without trees)."""
    return max([1] + [t.max_width for t in self.trees])

  @property
  def bucket_labels(self) -> tuple:
    """Per bucket index: K for a chain, `tree.label` (e.g. 'tree(3,2,1)') for a tree."""
    return tuple(self.draft_lengths) + tuple(t.label for t in self.trees)

  def verify_cost(self, depth: int) -> float:
    """The verification cost of a bucket of this depth: the chain's, interpolated (and held
    constant outside) between the measured chains for a tree; 1 without `verify_costs`."""
    if not self.verify_costs:
      return 1.0
    ks, costs = zip(*sorted(zip(self.draft_lengths, self.verify_costs)))
    return float(np.interp(depth, ks, costs))


@flax.struct.dataclass
class AdaptiveState:
  """The adaptive rule's acceptance estimator (Kmax = `SpecConfig.max_draft`); one belongs to
  one `SpecConfig` (its counts and bucket index are in that configuration's terms).

  Attributes:
    judged: [Kmax] float32 discounted count of chain drafts judged at position j (the row's
      drafts before j accepted).
    accepted: [Kmax] float32 discounted count of those accepted.
    succ, fail: () float32 discounted accepted drafts / rejected candidates of every round
      (chains and trees): the pooled estimate.
    bucket: () int32 the bucket the rule chose last (-1: none yet).
  """

  judged: jax.Array
  accepted: jax.Array
  succ: jax.Array
  fail: jax.Array
  bucket: jax.Array


def initial_adaptive_state(spec: SpecConfig) -> AdaptiveState:
  """The estimator before any round: no counts (every estimate is the prior), no bucket.

  Host arrays, so that building one costs no device work and carries the same shapes and
  dtypes as a returned state (one compiled program for both)."""
  zeros = np.zeros((spec.max_draft,), np.float32)
  return AdaptiveState(judged=zeros, accepted=zeros.copy(), succ=np.float32(0.0),
                       fail=np.float32(0.0), bucket=np.int32(-1))


def pooled_acceptance(est: AdaptiveState, spec: SpecConfig):
  """() per-draft acceptance over all positions and rounds, shrunk toward the prior.

  Plain arithmetic: host (numpy) and device states alike."""
  w = spec.prior_weight
  return (est.succ + w * spec.initial_acceptance) / (est.succ + est.fail + w)


def position_acceptance(est: AdaptiveState, spec: SpecConfig, pooled=None):
  """[Kmax] conditional acceptance of draft j given drafts before j accepted, shrunk toward the
  pooled estimate (positions without recent observations fall back to it)."""
  pooled = pooled_acceptance(est, spec) if pooled is None else pooled
  w = spec.prior_weight
  return (est.accepted + w * pooled) / (est.judged + w)


def bucket_values(p: jax.Array, pooled: jax.Array, spec: SpecConfig) -> jax.Array:
  """[num_buckets] expected tokens per unit of cost of every bucket.

  Args:
    p: [Kmax] conditional acceptance per draft position (chains).
    pooled: () per-candidate acceptance (trees, `tree.TreeSpec.value`).
  """
  # A chain of k drafts yields 1 + sum_{m<k} prod_{j<=m} p_j tokens, accumulated draft by draft
  # in scalar arithmetic: in the loop XLA fuses the rule into one kernel (a cumprod, a cumsum
  # and an argmax were a kernel each, launched every round; NOTES run AF: no measurable change
  # in round time on the H200, kept as the simpler program).
  values, prod, tokens, by_length = [], 1.0, 1.0, {}
  for j in range(max(spec.draft_lengths, default=0)):
    prod = prod * p[j]
    tokens = tokens + prod
    by_length[j + 1] = tokens
  values += [by_length[k] / np.float32(spec.verify_cost(k) + k * spec.draft_cost)
             for k in spec.draft_lengths]
  values += [t.value(pooled, draft_cost=spec.draft_cost, node_cost=spec.node_cost,
                     verify_cost=spec.verify_cost(t.max_depth)) for t in spec.trees]
  return jnp.stack([jnp.asarray(v, F32) for v in values])


def _first_max(values: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(index, value) of the first largest of `values` ([n], n static), as scalar selects: part
  of the fusion that computes them, where `jnp.argmax` is a reduction kernel of its own."""
  best, top = jnp.zeros((), jnp.int32), values[0]
  for i in range(1, values.shape[0]):
    better = values[i] > top
    best, top = jnp.where(better, i, best), jnp.where(better, values[i], top)
  return best, top


def best_bucket(acceptance: jax.Array, spec: SpecConfig) -> jax.Array:
  """Index of the bucket maximising expected tokens per cost when every draft is accepted with
  probability a (geometric acceptance)."""
  a = jnp.asarray(acceptance, F32)
  return _first_max(bucket_values(jnp.full((spec.max_draft,), a), a, spec))[0]


def choose_bucket(est: AdaptiveState, spec: SpecConfig) -> AdaptiveState:
  """The estimator with `bucket` set by the rule: the bucket of best value, unless the current
  one (if any) is within `switch_margin` of it."""
  pooled = pooled_acceptance(est, spec)
  values = bucket_values(position_acceptance(est, spec, pooled), pooled, spec)
  best, top = _first_max(values)
  current = jnp.asarray(est.bucket, jnp.int32)
  held = values[0]   # the current bucket's value (selects, not a gather)
  for i in range(1, values.shape[0]):
    held = jnp.where(current == i, values[i], held)
  keep = (current >= 0) & (top <= held * (1.0 + spec.switch_margin))
  return est.replace(bucket=jnp.where(keep, current, best))


def observe(est: AdaptiveState, spec: SpecConfig, *, n: jax.Array, fails: jax.Array,
            active: jax.Array, k: int, chain: bool = True) -> AdaptiveState:
  """The estimator after one round: every count times `ema_decay`, plus the running rows'.

  Args:
    n: [B] accepted drafts; fails: [B] rejected candidates; active: [B] rows that ran.
    k: the bucket's depth.
    chain: the round judged one candidate per position (a chain); a tree round only feeds the
      pooled counts (its depths hold several candidates, not one conditional draft).
  """
  act = active.astype(jnp.int32)
  d = spec.ema_decay
  pos = jnp.arange(spec.max_draft)[None]                                   # [1, Kmax]
  # [Kmax] rows that judged each position this round (a tree round judges no single chain)
  seen = (jnp.sum(act[:, None] * ((pos <= n[:, None]) & (pos < k)), axis=0) if chain
          else jnp.zeros((spec.max_draft,), jnp.int32))
  pos_d = d if spec.position_decay == "every_round" else jnp.where(seen > 0, d, 1.0)
  judged, accepted = pos_d * est.judged + seen, pos_d * est.accepted
  if chain:   # [B, Kmax] masks summed over the running rows
    accepted = accepted + jnp.sum(act[:, None] * (pos < n[:, None]), axis=0)
  return est.replace(judged=judged, accepted=accepted, succ=d * est.succ + jnp.sum(act * n),
                     fail=d * est.fail + jnp.sum(act * fails))


def per_call_config(spec: SpecConfig, est: AdaptiveState | None
                    ) -> tuple[SpecConfig, AdaptiveState]:
  """Adaptivity per call instead of per round: the chain bucket the rule picks from `est` (with
  its hysteresis), as a non-adaptive copy of `spec` whose first bucket is that one, and `est`
  with its `bucket` set to that choice (an index into `spec`'s buckets).

  The copy keeps `spec`'s buckets (so `max_draft` and the estimator's shapes), so the estimator
  the call returns (`SpecState.adaptive`: a non-adaptive run still counts) carries to the next
  call. The loop then has no `lax.switch`: one compiled program per bucket. Measured on the
  H200 demo pair it loses to choosing every round (mixed code + prose, batch 1: 1.22x vs 1.40x
  over plain decoding; experiments/NOTES.md, run N): a prompt keeps the bucket chosen before it
  even where its acceptance differs, so the switch's cost is the smaller one.
  """
  if spec.trees:
    raise ValueError("per-call adaptivity takes chain buckets only")
  est = initial_adaptive_state(spec) if est is None else est
  chosen = jax.device_get(_choose_jit(_checked(est, spec), spec))
  return first_bucket_config(spec, int(chosen.bucket)), chosen


_choose_jit = jax.jit(choose_bucket, static_argnums=1)   # one small program, not op by op


def first_bucket_config(spec: SpecConfig, b: int) -> SpecConfig:
  """A non-adaptive configuration running chain bucket `b` of `spec` every round, with `spec`'s
  other buckets behind it (same `max_draft`, so the same estimator shapes; the estimator keeps
  `spec`'s decay and priors). Its cost fields are the defaults: a non-adaptive loop does not read
  them, and one compiled program then serves every cost calibration."""
  ks = spec.draft_lengths
  return dataclasses.replace(spec, draft_lengths=(ks[b],) + ks[:b] + ks[b + 1:], adaptive=False,
                             draft_cost=SpecConfig.draft_cost, verify_costs=())


@flax.struct.dataclass
class SpecState:
  """State of the speculative loop (B rows, N = max new tokens, Kmax = largest bucket).

  Attributes:
    cache: target KV cache; `length` = index of `last` (which has no K/V yet).
    last: [B] int32 last emitted token, the first drafter input of the next round.
    hidden: [B, Dt] target final-normed hidden state at index length - 1.
    call_start, call_end: [B] int32 first / last index the previous target forward processed.
    out, count, done: emitted tokens [B, N] (-1 padded), count [B], finished rows [B].
    rng: PRNG key, split every round.
    adaptive: the acceptance estimator (`AdaptiveState`; its `bucket` is the rule's choice).
    bucket: () int32 bucket index of the next round (0 throughout when not adaptive).
    rounds: () int32 target forwards after the prefill.
    row_forwards: () int32 sum over rounds of the rows still running (per-row forwards).
    drafted, accepted: [Kmax] int32 per draft position (tree: depth) j: rows that drafted /
      accepted a draft there.
    accepted_rank: [Rmax] int32 accepted drafts by rank among their siblings (0: the drafter's
      best; Rmax = `SpecConfig.max_width`; a chain's drafts are all rank 0).
    bucket_counts: [num_buckets] int32 rounds per bucket.
    trace: [N] int32 bucket index used by each round (-1 after the last).
    draft_trace: [N, B, Kmax] int32 drafts proposed in each round (-1 beyond its K; a tree
      round records its rank-0 path).
  """

  cache: KVCache
  last: jax.Array
  hidden: jax.Array
  call_start: jax.Array
  call_end: jax.Array
  out: jax.Array
  count: jax.Array
  done: jax.Array
  rng: jax.Array
  adaptive: AdaptiveState
  bucket: jax.Array
  rounds: jax.Array
  row_forwards: jax.Array
  drafted: jax.Array
  accepted: jax.Array
  accepted_rank: jax.Array
  bucket_counts: jax.Array
  trace: jax.Array
  draft_trace: jax.Array


def draft(dparams, dcfg, tparams, tcfg: ModelConfig, state: SpecState, *, k: int,
          sampler: sampling.SamplingParams, key: jax.Array):
  """K drafts from the drafter of any kind (`drafter_kinds`).

  Returns:
    (drafts [B, K] int32, q [B, K, V] drafter probabilities or None (greedy), the target cache to
    verify with: `state.cache`, or (self-drafter) with draft K/V written at length.. that the
    verify forward overwrites).
  """
  return drafter_kinds.draft(dparams, dcfg, tparams, tcfg, state, k=k, sampler=sampler, key=key)


def emit_chunk(out, count, done, tokens, num_valid, *, eos_ids, max_new):
  """Appends tokens[:, :num_valid] per row, stopping a row at EOS or max_new tokens."""
  for j in range(tokens.shape[1]):
    skip = done | (j >= num_valid)
    out, count, new_done = decoding.emit(out, count, skip, tokens[:, j], eos_ids=eos_ids,
                                         max_new=max_new)
    done = jnp.where(j < num_valid, new_done, done)
  return out, count, done


def make_round(k: int, *, dparams, dcfg, tparams, tcfg, sampler, spec: SpecConfig, eos_ids,
               max_new):
  """The loop body for static draft length k."""

  def round_fn(s: SpecState) -> SpecState:
    rng, k_draft, k_verify = jax.random.split(s.rng, 3)
    drafts, q, cache = draft(dparams, dcfg, tparams, tcfg, s, k=k, sampler=sampler, key=k_draft)
    chunk = jnp.concatenate([s.last[:, None], drafts], axis=1)            # [B, k + 1]
    res = model_lib.forward(tparams, chunk, config=tcfg, cache=cache)
    if sampler.is_greedy:
      n, nxt = sampling.verify_greedy(drafts, res.logits)
    else:
      p = sampling.probs(res.logits, sampler)
      n, nxt = sampling.verify_stochastic(k_verify, drafts, q, p)
    rows = jnp.arange(chunk.shape[0])
    return _commit(s, cache=res.cache, hidden=res.hidden[rows, n], drafts=drafts, n=n, nxt=nxt,
                   fails=(n < k).astype(jnp.int32), k=k, written=k, rng=rng, spec=spec,
                   eos_ids=eos_ids, max_new=max_new)

  return round_fn


def make_tree_round(tree: tree_lib.TreeSpec, *, dparams, dcfg, tparams, tcfg, sampler,
                    spec: SpecConfig, eos_ids, max_new):
  """The loop body for a static draft tree (N nodes, depth D)."""
  chain = [0]                                   # rank-0 path: the drafts recorded in draft_trace
  while tree.children[chain[-1], 0] >= 0:
    chain.append(int(tree.children[chain[-1], 0]))
  rank = jnp.asarray(tree.rank)

  def round_fn(s: SpecState) -> SpecState:
    rng, k_draft, k_verify = jax.random.split(s.rng, 3)
    tokens, q, cache = drafter_kinds.draft_tree(dparams, dcfg, tparams, tcfg, s, tree=tree,
                                                sampler=sampler, key=k_draft)   # [B, N]
    res = model_lib.forward(tparams, tokens, config=tcfg, cache=cache, tree=tree)
    if sampler.is_greedy:
      path, n, nxt, fails = tree_lib.verify_greedy(tokens, res.logits, tree=tree)
    else:
      p = sampling.probs(res.logits, sampler)
      path, n, nxt, fails = tree_lib.verify_stochastic(k_verify, tokens, q, p, tree=tree)
    rows = jnp.arange(tokens.shape[0])
    cache = kvc.compact(res.cache, path[:, 1:], jnp.where(s.done, 0, n))
    path_tokens = jnp.take_along_axis(tokens, path[:, 1:], axis=1)      # [B, D]
    return _commit(s, cache=cache, hidden=res.hidden[rows, path[rows, n]], drafts=path_tokens,
                   n=n, nxt=nxt, fails=fails, k=tree.max_depth, written=tree.num_nodes - 1,
                   rng=rng, spec=spec, eos_ids=eos_ids, max_new=max_new,
                   ranks=rank[path[:, 1:]],
                   trace_drafts=jnp.pad(tokens[:, np.array(chain[1:])],
                                        ((0, 0), (0, tree.max_depth + 1 - len(chain))),
                                        constant_values=-1))

  return round_fn


def _commit(s: SpecState, *, cache, hidden, drafts, n, nxt, fails, k, written, rng,
            spec: SpecConfig, eos_ids, max_new, ranks=None, trace_drafts=None) -> SpecState:
  """Emits drafts[:, :n] + nxt per row, advances the cache length, updates the statistics.

  Args:
    cache: the cache after the verify forward (a tree: after compaction).
    hidden: [B, Dt] target hidden state at the last accepted position.
    drafts: [B, k] the drafts along the accepted path (a chain: all its drafts).
    n: [B] accepted drafts; nxt: [B] correction / bonus token.
    fails: [B] int32 candidates rejected this round (a chain: 1 if n < k).
    k: the depth of the bucket; written: positions written after the root (call_end).
    ranks: [B, k] sibling rank of each path draft (default: a chain's, all 0).
    trace_drafts: [B, k] drafts recorded in draft_trace (default `drafts`).
  """
  tokens = sampling.accepted_tokens(drafts, n, nxt)                       # [B, k + 1]
  active = ~s.done
  out, count, done = emit_chunk(s.out, s.count, s.done, tokens, n + 1, eos_ids=eos_ids,
                                max_new=max_new)
  r = jnp.minimum(s.rounds, s.trace.shape[0] - 1)
  length = s.cache.length
  cache = cache.replace(length=jnp.where(active, length + n + 1, length))
  # Statistics over the rows that were running this round.
  act = active.astype(jnp.int32)
  pos = jnp.arange(spec.max_draft)
  drafted = s.drafted + jnp.sum(act[:, None] * (pos[None, :] < k), axis=0)
  accepted = s.accepted + jnp.sum(act[:, None] * (pos[None, :] < n[:, None]), axis=0)
  if ranks is None:
    accepted_rank = s.accepted_rank.at[0].add(jnp.sum(act * n))
  else:   # [B, k, Rmax] one-hot ranks of the accepted path drafts
    hits = (ranks[:, :, None] == jnp.arange(spec.max_width)) & \
        (jnp.arange(k)[None, :, None] < n[:, None, None])
    accepted_rank = s.accepted_rank + jnp.sum(act[:, None, None] * hits, axis=(0, 1))
  adaptive = observe(s.adaptive, spec, n=n, fails=fails, active=active, k=k, chain=ranks is None)
  trace_drafts = drafts if trace_drafts is None else trace_drafts
  return s.replace(
      cache=cache, last=jnp.where(active, nxt, s.last),
      hidden=jnp.where(active[:, None], hidden, s.hidden),
      call_start=jnp.where(active, length, s.call_start),
      call_end=jnp.where(active, length + written, s.call_end),
      out=out, count=count, done=done, rng=rng, adaptive=adaptive,
      rounds=s.rounds + 1, row_forwards=s.row_forwards + jnp.sum(act),
      drafted=drafted, accepted=accepted, accepted_rank=accepted_rank,
      bucket_counts=s.bucket_counts.at[s.bucket].add(1),
      trace=s.trace.at[r].set(s.bucket),
      draft_trace=s.draft_trace.at[r].set(
          jnp.pad(trace_drafts, ((0, 0), (0, spec.max_draft - k)), constant_values=-1)))


@functools.partial(jax.jit, static_argnames=("tcfg", "dcfg", "spec", "sampler", "max_new",
                                             "eos_ids", "max_len"))
def speculative_generate(tparams, dparams, batch: decoding.PromptBatch, rng, *, tcfg: ModelConfig,
                         dcfg, spec: SpecConfig, sampler: sampling.SamplingParams,
                         max_new: int, eos_ids: tuple[int, ...], max_len: int,
                         adaptive_state: AdaptiveState | None = None) -> SpecState:
  """Prefill, then draft/verify rounds until every row is done. Returns the final SpecState.

  `dcfg` is a drafter config of any kind (`drafter_kinds`); its longest draft must cover the
  largest bucket, and tree buckets need a kind that drafts trees (`drafter_kinds.check_trees`).
  `max_len` must leave `spec.max_chunk` positions of slack after the last new token.
  `adaptive_state`: the estimator to start from, a traced input (the final state's `adaptive`
  of an earlier call with this `spec`), None for the prior (`initial_adaptive_state`). The
  prior is host arrays; pass a returned state as host arrays too (`jax.device_get`, as
  `api.generate` does), or it compiles once more for its committed placement. A non-adaptive
  run updates the counts but uses bucket 0.
  """
  longest = drafter_kinds.max_draft(dcfg)
  if longest is not None and spec.max_draft > longest:
    raise ValueError(f"draft_lengths {spec.draft_lengths} exceed the {longest} drafts the "
                     f"{dcfg.kind} drafter makes")
  if spec.trees:
    drafter_kinds.check_trees(dcfg)
  b, t = batch.tokens.shape
  # The sliding rings hold a whole verification chunk (K + 1 or N nodes) plus the round's root.
  out0, cache = model_lib.prefill(tparams, batch.tokens, batch.start, config=tcfg,
                                  max_len=max_len, max_chunk=spec.max_chunk + 1)
  rng, key = jax.random.split(rng)
  first = sampling.sample(key, out0.logits[:, -1], sampler)
  out, count, done = decoding.emit(jnp.full((b, max_new), -1, jnp.int32),
                                   jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool), first,
                                   eos_ids=eos_ids, max_new=max_new)
  nb = len(spec.bucket_labels)
  est = _checked(initial_adaptive_state(spec) if adaptive_state is None else adaptive_state, spec)
  if spec.adaptive:
    est = choose_bucket(est, spec)
  state = SpecState(
      cache=cache, last=first, hidden=out0.hidden[:, -1],
      call_start=batch.start, call_end=jnp.full((b,), t - 1, jnp.int32),
      out=out, count=count, done=done, rng=rng, adaptive=est,
      bucket=est.bucket if spec.adaptive else jnp.zeros((), jnp.int32),
      rounds=jnp.zeros((), jnp.int32), row_forwards=jnp.zeros((), jnp.int32),
      drafted=jnp.zeros((spec.max_draft,), jnp.int32),
      accepted=jnp.zeros((spec.max_draft,), jnp.int32),
      accepted_rank=jnp.zeros((spec.max_width,), jnp.int32),
      bucket_counts=jnp.zeros((nb,), jnp.int32), trace=jnp.full((max_new,), -1, jnp.int32),
      draft_trace=jnp.full((max_new, b, spec.max_draft), -1, jnp.int32))
  kw = dict(dparams=dparams, dcfg=dcfg, tparams=tparams, tcfg=tcfg, sampler=sampler, spec=spec,
            eos_ids=eos_ids, max_new=max_new)
  branches = ([make_round(k, **kw) for k in spec.draft_lengths] +
              [make_tree_round(tr, **kw) for tr in spec.trees])

  def then_choose(round_fn):
    def run(s: SpecState) -> SpecState:
      s = round_fn(s)
      if spec.adaptive:   # (at segment boundaries: the call's rounds so far a multiple)
        chosen = choose_bucket(s.adaptive, spec).bucket
        if spec.segment_rounds > 1:
          chosen = jnp.where(s.rounds % spec.segment_rounds == 0, chosen, s.bucket)
        s = s.replace(adaptive=s.adaptive.replace(bucket=chosen), bucket=chosen)
      return s
    return run

  # The rule runs inside every bucket's code. With 'switch' the switch is then the loop body's
  # result: XLA copies every buffer a conditional returns when anything follows it in a while
  # body (the target's whole K/V cache each round; on the H200 demo pair an adaptive round's
  # time beyond a fixed round of its bucket fell from 136 to 76 us on code, NOTES runs V, Y).
  branches = [then_choose(f) for f in branches]
  if nb == 1 or not spec.adaptive:   # a non-adaptive run stays in bucket 0
    body = branches[0]
  elif spec.dispatch == "switch":
    body = lambda s: jax.lax.switch(s.bucket, branches, s)
  else:
    def body(s: SpecState) -> SpecState:
      for j, f in enumerate(branches):   # bucket j's rounds while the rule keeps bucket j
        s = jax.lax.while_loop(   # (clipped as lax.switch clips: every round runs a bucket)
            lambda t, j=j: (jnp.clip(t.bucket, 0, nb - 1) == j) & ~jnp.all(t.done), f, s)
      return s
  return jax.lax.while_loop(lambda s: ~jnp.all(s.done), body, state)


def _checked(est: AdaptiveState, spec: SpecConfig) -> AdaptiveState:
  """`est` as float32 / int32 arrays; ValueError if its shapes are not `spec`'s."""
  want = jax.tree_util.tree_map(np.shape, initial_adaptive_state(spec))
  got = jax.tree_util.tree_map(np.shape, est)
  if got != want:
    raise ValueError(f"adaptive_state has shapes {got}, expected {want} (a state belongs to "
                     f"the SpecConfig whose run returned it)")
  est = jax.tree_util.tree_map(lambda x: jnp.asarray(x, F32), est)
  return est.replace(bucket=jnp.clip(est.bucket.astype(jnp.int32), -1,
                                     len(spec.bucket_labels) - 1))


def stats_of(state: SpecState, spec: SpecConfig, num_rows: int, *, drafts: bool = False) -> dict:
  """Host-side statistics dict of a finished run (see `api.generate`).

  With `drafts`, also "drafts": per round, per row, the drafts proposed (rows already finished
  in that round included; a tree round: its rank-0 path). With tree buckets, also
  "accepted_by_rank" (accepted drafts by sibling rank, 0 = the drafter's best) and
  "positions_per_forward" (positions verified per target forward: K + 1 or a tree's nodes).
  "final_acceptance_estimate" and "final_acceptance_by_position" are the estimator's pooled and
  per-position acceptance after the last round (`pooled_acceptance`, `position_acceptance`)."""
  s = jax.device_get(state.replace(cache=None))
  new = int(s.count.sum())
  drafted, accepted = s.drafted.tolist(), s.accepted.tolist()
  rounds = int(s.rounds)
  return {
      "target_forwards": rounds,
      "new_tokens": new,
      "drafted": int(sum(drafted)),
      "accepted": int(sum(accepted)),
      "row_forwards": int(s.row_forwards),
      "tokens_per_forward": (new - num_rows) / max(int(s.row_forwards), 1),
      "acceptance_by_position": [a / d if d else None for a, d in zip(accepted, drafted)],
      "bucket_counts": {k: int(c) for k, c in zip(spec.bucket_labels, s.bucket_counts)},
      "bucket_trace": [spec.bucket_labels[i] for i in s.trace[:rounds].tolist()],
      "final_acceptance_estimate": float(pooled_acceptance(s.adaptive, spec)),
      "final_acceptance_by_position": position_acceptance(s.adaptive, spec).tolist(),
      **({"drafts": [[[d for d in row if d >= 0] for row in rnd]
                     for rnd in s.draft_trace[:rounds].tolist()]} if drafts else {}),
      **(_tree_stats(s, spec) if spec.trees else {}),
  }


def _tree_stats(s: SpecState, spec: SpecConfig) -> dict:
  """Statistics that only mean something next to tree buckets (host side, see `stats_of`)."""
  sizes = [k + 1 for k in spec.draft_lengths] + [t.num_nodes for t in spec.trees]
  counts = s.bucket_counts.tolist()
  return {"accepted_by_rank": s.accepted_rank.tolist(),
          "positions_per_forward": sum(c * n for c, n in zip(counts, sizes)) / max(sum(counts), 1)}
