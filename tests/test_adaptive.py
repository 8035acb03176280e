"""The adaptive draft-length rule as pure functions: the estimator (`speculative.observe`), the
per-position estimates and their fallback, the bucket choice with hysteresis, on synthetic
rounds whose per-position acceptance is known."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_mtp import metrics
from gemma_mtp import speculative
from gemma_mtp.tree import TreeSpec

# Conditional acceptance of draft j (given drafts before j accepted) in three regimes.
STEEP = [0.97, 0.95, 0.92, 0.9, 0.5, 0.4, 0.3, 0.2]   # best K = 4; geometric a would say 8
LOW = [0.35, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25]   # best K = 1
HIGH = [0.98, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92, 0.9]   # best K = 8
SPEC = speculative.SpecConfig(draft_lengths=(1, 2, 4, 8), draft_cost=0.1,
                              verify_costs=(1.0, 1.05, 1.15, 1.4))


def true_value(profile, k, *, draft_cost, verify_cost):
  """Expected tokens per unit of cost of K drafts: (1 + sum_i prod_{j<=i} p_j) / (v_K + K c)."""
  return (1 + np.cumsum(np.cumprod(profile))[k - 1]) / (verify_cost + k * draft_cost)


def true_values(profile, spec) -> dict[int, float]:
  costs = spec.verify_costs or (1.0,) * len(spec.draft_lengths)
  return {k: true_value(profile, k, draft_cost=spec.draft_cost, verify_cost=v)
          for k, v in zip(spec.draft_lengths, costs)}


def true_best(profile, spec):
  values = true_values(profile, spec)
  return max(values, key=values.get)


@functools.partial(jax.jit, static_argnames=("spec",))
def _round(est, n, k, spec):
  est = speculative.observe(est, spec, n=n, fails=(n < k).astype(jnp.int32),
                            active=jnp.ones(n.shape, bool), k=k)
  return speculative.choose_bucket(est, spec)


def simulate(spec, regimes, *, batch, seed=0):
  """Chain rounds of `batch` rows; `regimes`: [(profile, rounds)] in turn. Returns the K of
  every round (the rule's choice before it) and the final estimator."""
  rng = np.random.default_rng(seed)
  est = speculative.choose_bucket(speculative.initial_adaptive_state(spec), spec)
  picks = []
  for profile, rounds in regimes:
    for _ in range(rounds):
      k = spec.draft_lengths[int(est.bucket)]
      picks.append(k)
      hit = rng.random((batch, k)) < np.asarray(profile)[None, :k]
      n = np.argmin(np.concatenate([hit, np.zeros((batch, 1), bool)], axis=1), axis=1)
      est = _round(est, jnp.asarray(n, jnp.int32), jnp.int32(k), spec)
  return picks, est


def test_regimes_have_the_intended_best_buckets():
  """The synthetic regimes: STEEP's best K is 4 while a geometric estimate of its acceptance
  (what the rule used before, pooled over the positions a K = 4 round judges) prefers 8."""
  assert [true_best(p, SPEC) for p in (STEEP, LOW, HIGH)] == [4, 1, 8]
  reach = np.concatenate([[1.0], np.cumprod(STEEP)[:3]])
  pooled = np.cumprod(STEEP)[:4].sum() / reach.sum()
  assert SPEC.draft_lengths[int(speculative.best_bucket(jnp.float32(pooled), SPEC))] == 8


@pytest.mark.parametrize("batch,efficiency", [(1, 0.95), (4, 0.975)])
def test_rule_finds_the_best_bucket_and_follows_regime_changes(batch, efficiency):
  """After a warm-up, the rule picks the bucket of best true expected tokens per cost in most
  rounds, in each of three regimes one after the other (so it switches when they change), and
  its rounds are worth `efficiency` of the best bucket's on average. Longer drafts than the best
  are tried now and then (positions beyond it fall back to the pooled estimate once their
  counts have decayed): that exploration costs ~4% on STEEP at batch 1, ~2% at batch 4. A rule
  on one geometric acceptance alternates K = 4 and K = 8 on STEEP (~90%)."""
  warm, rounds = 40, 200
  regimes = [(STEEP, warm + rounds), (LOW, warm + rounds), (HIGH, warm + rounds)]
  picks, _ = simulate(SPEC, regimes, batch=batch)
  for i, (profile, _) in enumerate(regimes):
    settled = picks[i * (warm + rounds) + warm:(i + 1) * (warm + rounds)]
    values = true_values(profile, SPEC)
    counts = {k: settled.count(k) for k in SPEC.draft_lengths}
    assert max(counts, key=counts.get) == true_best(profile, SPEC), (i, counts)
    got = np.mean([values[k] for k in settled]) / max(values.values())
    assert got >= efficiency, (i, counts, got)


def test_hysteresis_keeps_a_near_tie_from_flapping():
  """Two buckets of nearly equal true value (K = 2: 1.500, K = 3: 1.499 at p = 0.7, c = 0.23):
  without a margin the noisy batch-1 estimate flips between them; with one it stays."""
  profile = [0.7] * 3
  switches = {}
  for margin in (0.0, 0.1):
    spec = speculative.SpecConfig(draft_lengths=(2, 3), draft_cost=0.23, switch_margin=margin)
    assert abs(true_value(profile, 2, draft_cost=0.23, verify_cost=1.0)
               - true_value(profile, 3, draft_cost=0.23, verify_cost=1.0)) < 0.002
    picks, _ = simulate(spec, [(profile, 300)], batch=1)
    switches[margin] = sum(a != b for a, b in zip(picks, picks[1:]))
  assert switches[0.0] >= 15 and switches[0.1] <= 2, switches


def test_hysteresis_margin_is_relative():
  """The current bucket is kept while the best one beats it by at most the margin."""
  spec = speculative.SpecConfig(draft_lengths=(1, 2), draft_cost=0.0, switch_margin=0.2)
  est = speculative.initial_adaptive_state(spec)
  # p = 0.15 everywhere: K = 1 is worth 1.15, K = 2 1.1725 (2% more): K = 1 stays.
  est = est.replace(judged=np.full(2, 1e4, np.float32), accepted=np.full(2, 1.5e3, np.float32),
                    succ=np.float32(3e3), fail=np.float32(1.7e4), bucket=np.int32(0))
  assert int(speculative.choose_bucket(est, spec).bucket) == 0
  # p = 0.9: K = 2 is worth 2.71 / 1.9 = 43% more than K = 1: it switches.
  est = est.replace(accepted=np.full(2, 9e3, np.float32), succ=np.float32(1.8e4),
                    fail=np.float32(2e3))
  assert int(speculative.choose_bucket(est, spec).bucket) == 1
  # No current bucket (-1, the prior's): the best one, whatever the margin.
  assert int(speculative.choose_bucket(est.replace(bucket=np.int32(-1)), spec).bucket) == 1


def test_observe_counts_judged_and_accepted_drafts_per_position():
  spec = speculative.SpecConfig(draft_lengths=(2, 4), ema_decay=0.5)
  est = speculative.initial_adaptive_state(spec)
  n = jnp.asarray([0, 2, 4, 1], jnp.int32)
  active = jnp.asarray([True, True, True, False])
  est = speculative.observe(est, spec, n=n, fails=(n < 4).astype(jnp.int32), active=active, k=4)
  # Rows 0-2 ran: row 0 had draft 1 judged (rejected), row 1 drafts 1-3 (third rejected),
  # row 2 drafts 1-4 (all accepted); row 3 had finished.
  np.testing.assert_array_equal(est.judged, [3, 2, 2, 1])
  np.testing.assert_array_equal(est.accepted, [2, 2, 1, 1])
  assert (float(est.succ), float(est.fail)) == (6.0, 2.0)
  # Every count decays by ema_decay per round; a tree round (several candidates per depth)
  # feeds only the pooled counts.
  tree = speculative.observe(est, spec, n=jnp.asarray([1, 0, 0, 0], jnp.int32),
                             fails=jnp.asarray([2, 3, 0, 0], jnp.int32), active=active, k=3,
                             chain=False)
  np.testing.assert_allclose(tree.judged, np.asarray(est.judged) * 0.5)
  np.testing.assert_allclose(tree.accepted, np.asarray(est.accepted) * 0.5)
  assert (float(tree.succ), float(tree.fail)) == (4.0, 6.0)


def test_when_judged_positions_decay_only_in_rounds_that_judge_them():
  """position_decay='when_judged': a K = 1 round decays and counts position 1 only, so K = 8's
  deep positions keep what the last K = 8 rounds saw there; 'every_round' decays them all (and
  toward the pooled estimate). The pooled counts decay every round in both."""
  base = speculative.SpecConfig(draft_lengths=(1, 8), ema_decay=0.5)
  est = speculative.initial_adaptive_state(base).replace(
      judged=np.full(8, 10.0, np.float32), accepted=np.full(8, 9.0, np.float32),
      succ=np.float32(80.0), fail=np.float32(8.0))
  n, active = jnp.asarray([1, 0], jnp.int32), jnp.asarray([True, True])
  kw = dict(n=n, fails=(n < 1).astype(jnp.int32), active=active, k=1)
  every = speculative.observe(est, base, **kw)
  held = speculative.observe(
      est, dataclasses.replace(base, position_decay="when_judged"), **kw)
  np.testing.assert_allclose(every.judged, [7.0] + [5.0] * 7)
  np.testing.assert_allclose(every.accepted, [5.5] + [4.5] * 7)
  np.testing.assert_allclose(held.judged, [7.0] + [10.0] * 7)
  np.testing.assert_allclose(held.accepted, [5.5] + [9.0] * 7)
  assert (float(held.succ), float(held.fail)) == (float(every.succ), float(every.fail)) == (
      41.0, 5.0)
  # A round in which no running row reached a position leaves it alone too; a tree round
  # (no chain position judged) decays none of them.
  n = jnp.asarray([1, 3], jnp.int32)
  deep = speculative.observe(est, dataclasses.replace(base, position_decay="when_judged"),
                             n=n, fails=(n < 8).astype(jnp.int32), active=active, k=8)
  np.testing.assert_allclose(deep.judged, [7.0, 7.0, 6.0, 6.0] + [10.0] * 4)
  tree = speculative.observe(est, dataclasses.replace(base, position_decay="when_judged"),
                             n=n, fails=jnp.asarray([2, 0], jnp.int32), active=active, k=3,
                             chain=False)
  np.testing.assert_allclose(tree.judged, est.judged)
  with pytest.raises(ValueError, match="position_decay must be one of"):
    speculative.SpecConfig(position_decay="never")


def test_unobserved_positions_fall_back_to_the_pooled_estimate():
  """Only K = 2 has run: positions 1-2 are estimated from their counts (shrunk toward the pooled
  estimate), positions 3-8 are the pooled estimate, so the rule considers K = 8."""
  spec = speculative.SpecConfig(draft_lengths=(2, 8), draft_cost=0.05, prior_weight=4.0,
                                initial_acceptance=0.6)
  est = speculative.initial_adaptive_state(spec).replace(
      judged=np.asarray([100, 95, 0, 0, 0, 0, 0, 0], np.float32),
      accepted=np.asarray([95, 90, 0, 0, 0, 0, 0, 0], np.float32),
      succ=np.float32(185), fail=np.float32(10))
  pooled = float(speculative.pooled_acceptance(est, spec))
  assert pooled == pytest.approx((185 + 4 * 0.6) / (195 + 4))
  p = np.asarray(speculative.position_acceptance(est, spec))
  np.testing.assert_allclose(p[2:], pooled, rtol=1e-6)
  assert p[0] == pytest.approx((95 + 4 * pooled) / 104) and pooled < p[0] < 0.95
  assert int(speculative.choose_bucket(est, spec).bucket) == 1          # K = 8 gets tried
  # With no counts at all every position is the prior: the geometric rule at a = 0.6.
  prior = speculative.initial_adaptive_state(spec)
  np.testing.assert_allclose(speculative.position_acceptance(prior, spec), 0.6, rtol=1e-6)
  assert int(speculative.choose_bucket(prior, spec).bucket) == int(
      speculative.best_bucket(jnp.float32(0.6), spec))


def test_verify_costs_change_the_choice():
  """Measured verification costs make long chains dearer: at a = 0.85, c = 0.05 the rule picks
  K = 8 when every verification costs one decode step, K = 4 when 9 positions cost 1.6."""
  ks = (1, 2, 4, 8)
  pick = lambda spec: ks[int(speculative.best_bucket(jnp.float32(0.85), spec))]
  assert pick(speculative.SpecConfig(draft_lengths=ks, draft_cost=0.05)) == 8
  assert pick(speculative.SpecConfig(draft_lengths=ks, draft_cost=0.05,
                                     verify_costs=(1.0, 1.0, 1.1, 1.6))) == 4
  # A tree's verification is the chains' at its depth, interpolated between measured ones.
  spec = speculative.SpecConfig(draft_lengths=(2, 4), verify_costs=(1.2, 1.4),
                                trees=(TreeSpec.from_widths((2, 1, 1)),))
  assert spec.verify_cost(3) == pytest.approx(1.3) and spec.verify_cost(8) == pytest.approx(1.4)
  assert speculative.SpecConfig().verify_cost(3) == 1.0


def test_config_validation_and_spec_config_costs():
  for bad, match in ((dict(switch_margin=-0.1), "switch_margin"),
                     (dict(prior_weight=0.0), "prior_weight"),
                     (dict(verify_costs=(1.0, 1.1)), "verify_costs"),
                     (dict(verify_costs=(1.0, 1.0, 0.0, 1.0)), "verify_costs"),
                     (dict(initial_acceptance=1.5), "initial_acceptance"),
                     (dict(segment_rounds=0), "segment_rounds"),
                     (dict(dispatch="cond"), "dispatch must be one of")):
    with pytest.raises(ValueError, match=match):
      speculative.SpecConfig(**bad)
  cfg = metrics.spec_config((2, 4), True, 0.2, {1: 1.0, 2: 1.1, 4: 1.3, 8: 2.0})
  assert cfg.verify_costs == (1.1, 1.3) and cfg.draft_cost == 0.2
  assert metrics.spec_config((2,), False).verify_costs == ()
  with pytest.raises(ValueError, match=r"no cost for draft lengths \[8\]"):
    metrics.spec_config((2, 8), True, None, {2: 1.1})


def test_per_call_config_runs_the_chosen_bucket_and_carries_the_estimator():
  """Per-call adaptivity: the rule's choice becomes the first (only used) bucket of a fixed
  configuration with the same estimator shapes; the choice follows the carried counts."""
  fixed, est = speculative.per_call_config(SPEC, None)
  prior_k = SPEC.draft_lengths[int(est.bucket)]
  assert not fixed.adaptive and fixed.draft_lengths[0] == prior_k
  assert sorted(fixed.draft_lengths) == sorted(SPEC.draft_lengths)
  assert fixed.max_draft == SPEC.max_draft and not fixed.verify_costs
  for profile in (HIGH, LOW, STEEP):
    _, est = simulate(SPEC, [(profile, 300)], batch=1)
    fixed, chosen = speculative.per_call_config(SPEC, jax.device_get(est))
    assert fixed.draft_lengths[0] == SPEC.draft_lengths[int(chosen.bucket)] == true_best(
        profile, SPEC)
  # One program per bucket, whatever the costs of the adaptive configuration.
  cheap = dataclasses.replace(SPEC, draft_cost=0.01, verify_costs=())
  assert speculative.first_bucket_config(cheap, 2) == speculative.first_bucket_config(SPEC, 2)
  with pytest.raises(ValueError, match="chain buckets only"):
    speculative.per_call_config(dataclasses.replace(SPEC, trees=(TreeSpec.parse("2,1"),)), None)


def test_round_costs_divide_round_time_by_plain_step_time():
  from gemma_mtp import pipeline  # pylint: disable=g-import-not-at-top
  entries = [dict(workload="code", config="plain", seconds=1.0, forwards=1000),
             dict(workload="code", config="K=1", seconds=0.7, forwards=500),
             dict(workload="code", config="K=2", seconds=0.5, forwards=300),
             dict(workload="code", config="K=4", seconds=0.3, forwards=200),
             dict(workload="prose", config="plain", seconds=9.0, forwards=1)]
  costs = pipeline.round_costs(entries, (1, 2, 4))
  assert costs[1] == pytest.approx(1.4) and costs[2] == pytest.approx(5 / 3)
  assert costs[4] == pytest.approx(5 / 3)   # 1.5 measured, held non-decreasing in K
  entries[1]["seconds"] = 0.4                # 0.8 of a plain step: noise, held at 1
  assert pipeline.round_costs(entries, (1, 2, 4))[1] == 1.0


def test_slope_falls_back_when_noise_exceeds_the_steps():
  """A slope <= 0 (the long run timed faster than the short one) is not a step time: the long
  run's time per step stands in, and the record says so."""
  from gemma_mtp import bench  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  t = bench.slope_seconds(lambda n: time.sleep(0.02 if n == 2 else 0.01), short=2, long=4,
                          repeats=1)
  assert t["slope_s"] < 0 and t["fallback"]
  assert t["per_step_s"] == pytest.approx(t["long_s"] / 4)
  t = bench.slope_seconds(lambda n: time.sleep(0.005 * n), short=2, long=4, repeats=2)
  assert "fallback" not in t and t["per_step_s"] == pytest.approx(0.005, rel=0.5)


def test_kernel_summary_per_step_and_by_kind():
  """`bench.summarize_kernels` (the profile of a GPU trace): busy time is the union of kernel
  intervals, and kernels group by kind without their numeric suffixes."""
  from gemma_mtp import bench  # pylint: disable=g-import-not-at-top
  events = [(0, 10_000, "gemm_fusion_dot_7", "cb"), (5_000, 10_000, "gemm_fusion_dot_9", "cb"),
            (20_000, 2_000, "loop_pad_fusion_3", "cb"), (30_000, 2_000, "loop_pad_fusion_4", "")]
  got = bench.summarize_kernels(events, steps=2, top=1)
  assert got["kernels_per_step"] == 2
  assert got["busy_us_per_step"] == pytest.approx(19 / 2)     # [0, 15] + [20, 22] + [30, 32] us
  assert got["span_us_per_step"] == pytest.approx(32 / 2)
  assert got["gap_us_per_step"] == pytest.approx(13 / 2)
  assert got["by_kind"] == {"gemm_fusion_dot": {"calls_per_step": 1, "us_per_step": 10},
                            "loop_pad_fusion": {"calls_per_step": 1, "us_per_step": 2}}
  assert [t["name"] for t in got["top"]] == ["gemm_fusion_dot_7"]
  # Idle [15, 20] after the second GEMM (it ends last) and [22, 30] after the first pad.
  assert got["gaps"] == [{"between": "loop_pad_fusion_3 -> loop_pad_fusion_4",
                          "calls_per_step": 0.5, "us_per_step": 4}]
  gaps = bench.summarize_kernels(events, steps=2, top=2)["gaps"]
  assert gaps[1] == {"between": "gemm_fusion_dot_9 -> loop_pad_fusion_3", "calls_per_step": 0.5,
                     "us_per_step": 2.5}
  assert "step_sequence" not in got
  seq = bench.summarize_kernels(events, steps=2, sequence=True)["step_sequence"]
  assert seq == [["loop_pad_fusion_3", 2.0], ["loop_pad_fusion_4", 2.0]]   # the second step
  assert bench.summarize_kernels([], steps=2) == {}


@pytest.mark.parametrize("buckets, costs, draft_cost", [
    ((1, 2, 4, 8), (1.0, 1.05, 1.15, 1.4), 0.1), ((2, 4, 8), (1.56, 2.07, 2.93), 0.0),
    ((3,), (1.2,), 0.05)])
def test_rule_equals_the_formula_on_random_estimators(buckets, costs, draft_cost):
  """The rule's values and choice (written as scalar arithmetic so that it compiles to a few
  elementwise kernels) against the documented formula in numpy: per-position estimates shrunk
  toward the pooled one, values (1 + sum_{m<k} prod_{j<=m} p_j) / (v_k + k c), the first best
  bucket, kept while within the switch margin of it."""
  spec = speculative.SpecConfig(draft_lengths=buckets, verify_costs=costs, draft_cost=draft_cost)
  rule = jax.jit(lambda est: speculative.choose_bucket(est, spec))
  rng = np.random.default_rng(len(buckets))
  kmax, w, a0 = spec.max_draft, spec.prior_weight, spec.initial_acceptance
  near = 0
  for _ in range(200):
    judged = rng.uniform(0, 40, kmax).astype(np.float32)
    accepted = (judged * rng.uniform(0, 1, kmax)).astype(np.float32)
    succ, fail = np.float32(rng.uniform(0, 80)), np.float32(rng.uniform(0, 40))
    current = np.int32(rng.integers(-1, len(buckets)))
    est = speculative.AdaptiveState(judged=judged, accepted=accepted, succ=succ, fail=fail,
                                    bucket=current)
    pooled = (succ + w * a0) / (succ + fail + w)
    p = (accepted + w * pooled) / (judged + w)
    want = np.array([true_value(p, k, draft_cost=draft_cost, verify_cost=v)
                     for k, v in zip(buckets, costs)])
    got = speculative.bucket_values(p, pooled, spec)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    best = int(np.argmax(want))
    keep = current >= 0 and want[best] <= want[current] * (1 + spec.switch_margin)
    top2 = np.sort(want)[-2:] if len(want) > 1 else want
    if abs(want[best] - want[current] * (1 + spec.switch_margin)) < 1e-5 or (
        len(want) > 1 and top2[1] - top2[0] < 1e-5):
      near += 1   # a float32 tie: either choice is the formula's
      continue
    assert int(rule(est).bucket) == (current if keep else best)
  assert near < 5


def test_rule_compiles_without_reductions():
  """The rule runs every round of an adaptive loop: written as scalar arithmetic it has no
  cumulative sums or products and no argmax, each of which was a kernel of its own per round."""
  est = jax.tree_util.tree_map(jnp.asarray, speculative.initial_adaptive_state(SPEC))
  hlo = jax.jit(lambda e: speculative.choose_bucket(e, SPEC)).lower(est).compile().as_text()
  assert " reduce(" not in hlo and "reduce-window(" not in hlo
  assert " fusion(" in hlo   # (the check reads real compiled text)
