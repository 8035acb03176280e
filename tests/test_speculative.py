"""Speculative decoding: lossless greedy output, exact sampling, counts, and the compiled loop."""

import contextlib
import dataclasses
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma_mtp
from gemma_mtp import config as config_lib
from gemma_mtp import decoding
from gemma_mtp import drafter as drafter_lib
from gemma_mtp import kv_cache
from gemma_mtp import sampling
from gemma_mtp import speculative
from tests.test_sampling import FALSE_ALARM, chi2_pvalue

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"

TARGET = config_lib.tiny(layer_types=config_lib.pattern(7, 3), num_kv_shared_layers=3,
                         double_wide_mlp=True, per_layer_dim=8, per_layer_vocab_size=256,
                         num_global_kv_heads=2)
PROMPTS = [list(range(5, 16)), [3, 4], [100, 101, 102, 103, 104], list(range(20, 45))]


@dataclasses.dataclass
class Drafter:
  config: drafter_lib.DrafterConfig
  params: dict


def random_drafter(target_cfg, *, seed=5, convention="hf", num_centroids=0):
  dcfg = drafter_lib.for_target(target_cfg, embed_dim=32, num_heads=4, mlp_dim=64,
                                convention=convention, num_centroids=num_centroids,
                                centroid_top_k=4)
  return Drafter(dcfg, drafter_lib.init_params(dcfg, jax.random.PRNGKey(seed)))


def agreeing_pair(target_cfg, *, residual_scale, seed=0, target=None):
  """A target whose next token is mostly a function of the current token, and a drafter computing
  exactly that function.

  The target's attention, FFN and PLE branch outputs are scaled by `residual_scale` (0: the residual
  stream is the token embedding, so logits = head(norm(E[tok])) and the drafter below agrees
  always; 0.3: the context sometimes changes the argmax, so drafts are accepted and rejected).
  The drafter maps [e, h] -> e (pre_proj = [I; 0]), its blocks add nothing, and its head is the
  target's embedding with the target's final norm. `target`: the float target to start from
  (default `random_target(target_cfg, seed)`).
  """
  target = target or gemma_mtp.random_target(target_cfg, seed=seed)
  params = jax.tree_util.tree_map(lambda x: x, target.params)
  for layer in params["layers"]:  # the post-norms set the scale of what each branch adds
    layer["post_attn_norm"] = layer["post_attn_norm"] * residual_scale
    layer["post_ffw_norm"] = layer["post_ffw_norm"] * residual_scale
    if "ple" in layer:
      layer["ple"]["norm"] = layer["ple"]["norm"] * residual_scale
  target = gemma_mtp.Target(target_cfg, params)
  d = target_cfg.embed_dim
  dcfg = drafter_lib.for_target(target_cfg, embed_dim=d, num_heads=4, mlp_dim=64)
  dp = drafter_lib.init_params(dcfg, jax.random.PRNGKey(seed + 1))
  dp["pre_proj"] = jnp.concatenate([jnp.eye(d), jnp.zeros((d, d))], axis=0)
  for layer in dp["layers"]:
    layer["attn"]["o"] = jnp.zeros_like(layer["attn"]["o"])
    layer["mlp"]["down"] = jnp.zeros_like(layer["mlp"]["down"])
  dp["embed"] = params["embed"]
  dp["final_norm"] = params["final_norm"]
  return target, Drafter(dcfg, dp)


@pytest.fixture(scope="module")
def plain_reference():
  target = gemma_mtp.random_target(TARGET)
  return target, gemma_mtp.generate(target, PROMPTS, max_new_tokens=110).tokens


@pytest.mark.parametrize("convention", ["hf", "clean"])
@pytest.mark.parametrize("buckets,adaptive", [((1,), False), ((2,), False), ((4,), False),
                                              ((8,), False), ((1, 2, 4, 8), True)])
def test_greedy_equals_plain_random_drafter(plain_reference, convention, buckets, adaptive):
  target, ref = plain_reference
  out = gemma_mtp.generate(target, PROMPTS, max_new_tokens=110,
                           drafter=random_drafter(TARGET, convention=convention),
                           draft_lengths=buckets, adaptive=adaptive)
  assert out.tokens == ref
  assert sum(out.stats["bucket_counts"].values()) == out.stats["target_forwards"]


@pytest.mark.parametrize("buckets,adaptive", [((3,), False), ((1, 2, 4, 8), True)])
def test_greedy_equals_plain_with_rejections(buckets, adaptive):
  """A drafter that is right often but not always: accepted and rejected drafts in the ring
  buffers across window wraps, rows accepting different counts, all equal to plain decoding."""
  target, drafter = agreeing_pair(TARGET, residual_scale=0.8)
  ref = gemma_mtp.generate(target, PROMPTS, max_new_tokens=120).tokens
  out = gemma_mtp.generate(target, PROMPTS, max_new_tokens=120, drafter=drafter,
                           draft_lengths=buckets, adaptive=adaptive)
  assert out.tokens == ref
  acc = [a for a in out.stats["acceptance_by_position"] if a is not None]
  assert 0.2 < acc[0] < 0.95, out.stats  # both outcomes happen
  assert out.stats["tokens_per_forward"] > 1.2


@pytest.mark.parametrize("k", [1, 3, 8])
def test_always_agreeing_drafter_gives_k_plus_one_tokens(k):
  target, drafter = agreeing_pair(TARGET, residual_scale=0.0)
  rounds = 6
  out = gemma_mtp.generate(target, [[7, 8, 9]], max_new_tokens=1 + rounds * (k + 1),
                           drafter=drafter, draft_lengths=(k,), adaptive=False)
  assert out.stats["target_forwards"] == rounds
  assert out.stats["tokens_per_forward"] == k + 1
  assert out.stats["accepted"] == out.stats["drafted"] == rounds * k


@pytest.mark.parametrize("segment", [1, 4])
def test_adaptive_picks_long_drafts_when_they_are_accepted(segment):
  """From the prior the rule starts at K = 4; it moves to K = 8 after the first segment (one
  round, or four) and stays there."""
  target, drafter = agreeing_pair(TARGET, residual_scale=0.0)
  spec = speculative.SpecConfig(segment_rounds=segment)
  out = gemma_mtp.generate(target, [[7, 8, 9]], max_new_tokens=100, drafter=drafter,
                           spec_config=spec)
  trace = out.stats["bucket_trace"]
  assert trace[:segment] == [4] * segment and set(trace[segment:]) == {8}


@pytest.mark.parametrize("dispatch", speculative.DISPATCHES)
@pytest.mark.parametrize("segment", [1, 3])
def test_adaptive_segments_choose_between_segments_only(segment, dispatch):
  """With rejections the rule switches buckets, but only at segment boundaries (each call's
  rounds counted from 0), and the output is plain greedy decoding, with either dispatch."""
  target, drafter = agreeing_pair(TARGET, residual_scale=0.8)
  ref = gemma_mtp.generate(target, PROMPTS[:2], max_new_tokens=80).tokens
  spec = speculative.SpecConfig(draft_lengths=(1, 2, 4, 8), segment_rounds=segment,
                                switch_margin=0.0, dispatch=dispatch)
  out = gemma_mtp.generate(target, PROMPTS[:2], max_new_tokens=80, drafter=drafter,
                           spec_config=spec)
  assert out.tokens == ref
  trace = out.stats["bucket_trace"]
  switches = [i for i in range(1, len(trace)) if trace[i] != trace[i - 1]]
  assert switches and all(i % segment == 0 for i in switches), trace


def test_carried_adaptive_state_stays_lossless():
  """A second call that starts from the first call's estimator (other prompts, same shapes: the
  programs of test_greedy_equals_plain_with_rejections) is still plain greedy decoding."""
  target, drafter = agreeing_pair(TARGET, residual_scale=0.8)
  kw = dict(max_new_tokens=120, drafter=drafter, draft_lengths=(1, 2, 4, 8), adaptive=True)
  first = gemma_mtp.generate(target, PROMPTS, **kw)
  prompts = [p[::-1] for p in PROMPTS[::-1]]
  ref = gemma_mtp.generate(target, prompts, max_new_tokens=120).tokens
  out = gemma_mtp.generate(target, prompts, adaptive_state=first.adaptive_state, **kw)
  assert out.tokens == ref
  assert 0 < out.stats["accepted"] < out.stats["drafted"]


def test_per_call_adaptivity_is_lossless_and_follows_the_estimator():
  """Buckets chosen per call from the carried estimator (`speculative.per_call_config`): each
  call is plain greedy decoding; with drafts always accepted the prior's K = 4 gives way to
  K = 8 once the estimator has seen a call."""
  target, drafter = agreeing_pair(TARGET, residual_scale=0.0)
  spec = speculative.SpecConfig(draft_lengths=(1, 2, 4, 8))
  ref = gemma_mtp.generate(target, PROMPTS, max_new_tokens=60).tokens
  state, ks = None, []
  for _ in range(2):
    fixed, state = speculative.per_call_config(spec, state)
    ks.append(fixed.draft_lengths[0])
    out = gemma_mtp.generate(target, PROMPTS, max_new_tokens=60, drafter=drafter,
                             spec_config=fixed, adaptive_state=state)
    assert out.tokens == ref and set(out.stats["bucket_trace"]) == {ks[-1]}
    state = out.adaptive_state
  assert ks == [4, 8]


def test_divergences_locate_where_outputs_part_and_price_the_gap():
  """`pipeline.divergences`: per prompt whose tokens leave plain decoding's, the first position,
  both tokens and the plain token's logit lead there in a causal forward over the plain path;
  a prompt that stops early has no tokens to compare; equal outputs give no record."""
  from gemma_mtp import pipeline  # pylint: disable=g-import-not-at-top
  target = gemma_mtp.random_target(TARGET, seed=3)
  prompts = PROMPTS[:2]
  plain = gemma_mtp.generate(target, prompts, max_new_tokens=12).tokens
  row = np.asarray(gemma_mtp.score(target, [prompts[1] + plain[1]])[0])[len(prompts[1]) + 4]
  assert int(np.argmax(row)) == plain[1][5]      # the row that chose new token 5
  runner_up = int(np.argsort(row)[-2])
  parted = [plain[0], plain[1][:5] + [runner_up] + plain[1][6:]]
  found = pipeline.divergences(target, "code", prompts, plain, parted)
  assert found == [dict(workload="code", prompt=1, position=5, plain_token=plain[1][5],
                        token=runner_up, logit_gap=pytest.approx(
                            float(row[plain[1][5]] - row[runner_up]), abs=1e-4))]
  assert found[0]["logit_gap"] > 0
  assert pipeline.divergences(target, "prose", prompts, plain, [plain[0][:7], plain[1]]) == [
      dict(workload="prose", prompt=0, position=7, plain_token=None, token=None, logit_gap=None)]
  assert pipeline.divergences(target, "code", prompts, plain, plain) == []


def test_workloads_with_per_call_adaptivity_and_calibrated_costs(monkeypatch):
  """`pipeline.evaluate_workloads(calibrate=True, per_call=True, repeats=3, dispatches=...)`: the
  adaptive rules use the round costs of calibration passes of the fixed K run before the timed
  passes, whose configurations, adaptive ones included, run interleaved; the per-call
  configuration runs one bucket per prompt, the switch dispatch runs the default's rounds, every
  configuration emits every token, and each reports the median of its three passes ('mixed' of
  one workload: the same passes)."""
  from gemma_mtp import pipeline  # pylint: disable=g-import-not-at-top
  order, passes, timed_pass = [], [], pipeline._timed_pass   # pylint: disable=protected-access

  def recording(target, prompts, config, kw):
    spec = config.get("spec_config")
    order.append("A" if "per_call" in config or (spec and spec.adaptive) else "F")
    passes.append(timed_pass(target, prompts, config, kw))
    return passes[-1]

  monkeypatch.setattr(pipeline, "_timed_pass", recording)
  target, drafter = agreeing_pair(TARGET, residual_scale=0.0)
  work = pipeline.evaluate_workloads(target, drafter, {"code": PROMPTS[:2]}, buckets=(1, 2),
                                     max_new_tokens=24, calibrate=True, per_call=True, repeats=3,
                                     dispatches=("loops", "switch"),
                                     rule_variants=("position_decay=when_judged",))
  # Calibration (plain, K=1, K=2; once untimed, then three times), then the timed passes, all
  # nine configurations in turn, three times.
  assert "".join(order) == "FFF" * 4 + "FFFAAAAAA" * 3
  configs = ["plain", "K=1", "K=2", "adaptive", "adaptive, dispatch=switch",
             "adaptive, position_decay=when_judged", "adaptive per call", "adaptive, warm",
             "adaptive, warm, position_decay=when_judged"]
  assert [e["config"] for e in work if e["workload"] == "code"] == configs
  for e in work:
    assert e["new_tokens"] == 2 * 24 and e["outputs_equal_plain"] and e["divergences"] == []
    assert len(e["seconds_runs"]) == 3 and e["seconds"] == sorted(e["seconds_runs"])[1]
    # Per prompt: its forwards and its median wall time (each within the passes' span).
    assert len(e["prompt_forwards"]) == len(e["prompt_seconds"]) == 2
    assert sum(e["prompt_forwards"]) == e["forwards"]
    assert 0 < sum(e["prompt_seconds"]) <= sum(e["seconds_runs"])
  runs = {(e["workload"], e["config"]): e["seconds_runs"] for e in work}
  assert all(runs["mixed", c] == runs["code", c] for c in configs)
  costs = next(e["costs"] for e in work if e["config"] == "adaptive per call")
  assert costs["calibrated"] and costs["draft_cost"] == 0.0
  # The calibration's costs come from each configuration's fastest timed pass (not the untimed
  # first ones).
  fastest = {c: min(p["seconds"] for p in passes[3 + i:12:3])
             for i, c in enumerate(("plain", "K=1", "K=2"))}
  assert costs["calibration_seconds"] == fastest
  forwards = {c: passes[i]["forwards"] for i, c in enumerate(("plain", "K=1", "K=2"))}
  step = fastest["plain"] / forwards["plain"]
  want = {1: max(1.0, fastest["K=1"] / forwards["K=1"] / step)}
  want[2] = max(want[1], fastest["K=2"] / forwards["K=2"] / step)
  assert costs["verify_costs"] == pytest.approx(want)
  assert 1.0 <= costs["verify_costs"][1] <= costs["verify_costs"][2]
  # Drafts always accepted: a prompt run at K takes ceil(23 / (K + 1)) rounds (the first of its
  # 24 tokens comes from the prefill). Per call, each bucket's rounds are whole prompts.
  counts = {e["config"]: e["bucket_counts"] for e in work if e["workload"] == "code"}
  per_prompt = {k: -(-23 // (int(k) + 1)) for k in ("1", "2")}
  assert sum(c // per_prompt[k] for k, c in counts["adaptive per call"].items()) == 2
  assert all(c % per_prompt[k] == 0 for k, c in counts["adaptive per call"].items())
  assert counts["adaptive, dispatch=switch"] == counts["adaptive"]   # the same rounds
  changes = {e["config"]: e["bucket_changes"] for e in work if e["workload"] == "code"}
  assert changes["plain"] == changes["K=1"] == changes["K=2"] == 0
  assert changes["adaptive per call"] == 0                          # one bucket per call
  assert changes["adaptive, dispatch=switch"] == changes["adaptive"] < sum(
      counts["adaptive"].values())
  # Each adaptive entry's rounds costed at the fixed-K passes' seconds per round.
  by = {(e["workload"], e["config"]): e for e in work}
  for (wname, cname), e in by.items():
    if cname.startswith("adaptive"):
      want = sum(n * by[wname, f"K={k}"]["seconds"] / by[wname, f"K={k}"]["forwards"]
                 for k, n in e["bucket_counts"].items())
      assert e["seconds_at_fixed_rounds"] == pytest.approx(want)
    else:
      assert "seconds_at_fixed_rounds" not in e


def test_draft_cost_times_the_drafter_over_more_steps(monkeypatch):
  """`bench.draft_cost`: the drafter's slope runs `drafter_long` steps (its steps are several
  times shorter than the target's, and 16 of them are within a GPU's timing jitter), and the
  ratio is the drafter's step over the target's."""
  from gemma_mtp import bench  # pylint: disable=g-import-not-at-top
  target, drafter = agreeing_pair(TARGET, residual_scale=0.0)
  calls = []

  def slope(run, *, short, long, repeats):
    calls.append((short, long, repeats))
    run(short)   # each loop still runs (compiles and executes) at its short length
    return {"per_step_s": 0.004 if len(calls) == 1 else 0.001}

  monkeypatch.setattr(bench, "slope_seconds", slope)
  cost = bench.draft_cost(target.params, target.config, drafter.params, drafter.config,
                          context=64)
  assert calls == [(4, 20, 5), (4, 100, 5)]   # target, then drafter
  assert cost == {"target_step_s": 0.004, "drafter_step_s": 0.001, "ratio": 0.25}


def test_rule_variants_parse_as_their_fields_type():
  """`pipeline.spec_variant`: 'field=value' sets a scalar SpecConfig field, the value parsed as
  the field's type; anything else is a clear error (and `evaluate_workloads` checks its
  variants before compiling anything)."""
  from gemma_mtp import pipeline  # pylint: disable=g-import-not-at-top
  spec = speculative.SpecConfig()
  assert pipeline.spec_variant(spec, "position_decay=when_judged").position_decay == (
      "when_judged")
  assert pipeline.spec_variant(spec, "ema_decay=0.8").ema_decay == 0.8
  assert pipeline.spec_variant(spec, "segment_rounds=4").segment_rounds == 4
  assert pipeline.spec_variant(spec, "adaptive=False").adaptive is False
  for bad, match in (("ema_decay", "'field=value'"), ("no_such=1", "'field=value'"),
                     ("draft_lengths=(1,2)", "'field=value'"), ("ema_decay=high", "takes a float"),
                     ("adaptive=yes", "true or false"), ("ema_decay=1.5", "ema_decay must be"),
                     ("position_decay=never", "position_decay must be one of")):
    with pytest.raises(ValueError, match=match):
      pipeline.spec_variant(spec, bad)
  with pytest.raises(ValueError, match="takes a float"):
    pipeline.evaluate_workloads(None, None, {}, buckets=(1,), max_new_tokens=1,
                                rule_variants=("ema_decay=x",))


def test_workload_passes_start_from_a_given_estimator():
  """`pipeline._run_prompts(start_state=)` (what 'adaptive, warm' runs): an adaptive pass starts
  from the given estimator, not the prior, and carries it from prompt to prompt; a fixed-K pass
  ignores it. Each returns its prompts' tokens (plain decoding's) and the last estimator."""
  from gemma_mtp import metrics  # pylint: disable=g-import-not-at-top
  from gemma_mtp import pipeline  # pylint: disable=g-import-not-at-top
  target, drafter = agreeing_pair(TARGET, residual_scale=0.0)   # drafts always accepted
  prompts = PROMPTS[:2]
  kw = dict(max_new_tokens=24, eos_id=None, temperature=0.0, seed=1)
  ref = [gemma_mtp.generate(target, [p], **kw).tokens[0] for p in prompts]
  spec = metrics.spec_config((1, 4), True)
  ones, zeros = np.full((4,), 50.0, np.float32), np.zeros((4,), np.float32)
  state = lambda acc: speculative.AdaptiveState(   # 50 judged drafts per position
      judged=ones, accepted=acc, succ=np.float32(acc.sum()), fail=np.float32(50 - acc[0]),
      bucket=np.int32(-1))
  rounds = {}
  for name, start in (("good", state(ones)), ("bad", state(zeros))):
    got = pipeline._run_prompts(target, prompts, drafter=drafter, spec_config=spec,
                                start_state=start, **kw)   # pylint: disable=protected-access
    assert got["outputs"] == ref
    rounds[name] = got["buckets"]
  # Told every draft is accepted, the rule drafts 4 from the first round on; told none is, it
  # starts at K = 1 until the (always accepted) drafts outweigh the start.
  assert rounds["good"].get(1, 0) == 0 and rounds["good"][4] > 0
  assert rounds["bad"][1] > 0
  fixed = pipeline._run_prompts(target, prompts, drafter=drafter, draft_lengths=(4,),
                                adaptive=False, start_state=state(zeros), **kw)
  assert fixed["buckets"] == {4: rounds["good"][4]} and fixed["outputs"] == ref
  # A fixed-K pass's estimator counts its rounds: every draft accepted at every position.
  est = fixed["adaptive_state"]
  assert est.judged[3] > 0 and np.all(est.accepted == est.judged) and est.fail == 0
  assert int(est.bucket) == -1   # the prior's (none): it starts an adaptive run as it is


@contextlib.contextmanager
def count_compiles():
  """Yields a list that gets one entry per XLA compilation inside the block."""
  seen = []
  listener = lambda event, secs, **kw: seen.append(event) if event == BACKEND_COMPILE else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield seen
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def test_carried_adaptive_state_warms_the_first_round_without_recompiling():
  """Drafts always accepted: from the prior (a = 0.6) the first round drafts K = 4, from the
  estimator of an earlier call K = 8; calls with a carried state compile nothing new, also with
  parameters committed to a device (as loaded checkpoints are)."""
  target, drafter = agreeing_pair(TARGET, residual_scale=0.0)
  dev = jax.devices()[0]
  target = gemma_mtp.Target(target.config, jax.device_put(target.params, dev))
  drafter = Drafter(drafter.config, jax.device_put(drafter.params, dev))
  kw = dict(max_new_tokens=120, drafter=drafter)
  cold = gemma_mtp.generate(target, PROMPTS, **kw)
  assert cold.stats["bucket_trace"][0] == 4 and cold.stats["bucket_trace"][-1] == 8
  assert cold.stats["final_acceptance_estimate"] > 0.95
  with count_compiles() as compiles:
    warm = gemma_mtp.generate(target, PROMPTS, adaptive_state=cold.adaptive_state, **kw)
    again = gemma_mtp.generate(target, PROMPTS, adaptive_state=warm.adaptive_state, **kw)
  assert not compiles
  assert warm.stats["bucket_trace"][0] == 8 and again.stats["bucket_trace"][0] == 8
  assert warm.stats["bucket_counts"][8] == warm.stats["target_forwards"]
  assert warm.tokens == again.tokens == cold.tokens
  # A state belongs to the configuration that made it.
  with pytest.raises(ValueError, match="adaptive_state has shapes"):
    gemma_mtp.generate(target, PROMPTS, adaptive_state=cold.adaptive_state,
                       max_new_tokens=120, drafter=drafter, draft_lengths=(1, 2))


def test_eos_and_max_tokens_per_row():
  target, drafter = agreeing_pair(TARGET, residual_scale=0.8)
  ref = gemma_mtp.generate(target, PROMPTS, max_new_tokens=50).tokens
  eos = ref[0][7]
  plain = gemma_mtp.generate(target, PROMPTS, max_new_tokens=50, eos_id=eos).tokens
  spec = gemma_mtp.generate(target, PROMPTS, max_new_tokens=50, eos_id=eos, drafter=drafter,
                            draft_lengths=(4,), adaptive=False).tokens
  assert spec == plain
  assert plain[0][-1] == eos and len(plain[0]) <= 8


def test_drafter_equal_to_target_accepts_every_sampled_draft():
  cfg = TARGET.replace(final_logit_softcap=None)
  target, drafter = agreeing_pair(cfg, residual_scale=0.0)
  out = gemma_mtp.generate(target, [[7, 8, 9]] * 8, max_new_tokens=41, drafter=drafter,
                           draft_lengths=(4,), adaptive=False, temperature=1.0, seed=1)
  assert out.stats["accepted"] == out.stats["drafted"] > 0


def exact_first_tokens(target, prompt, sampler):
  """Exact joint distribution [V, V, V] of the first 3 sampled tokens, by enumerating prefixes."""
  v = target.config.vocab_size

  def dist(prefixes):  # next-token distributions after prompt + each prefix: [len(prefixes), V]
    logits = gemma_mtp.score(target, np.array([prompt + list(p) for p in prefixes]))[:, -1]
    return np.asarray(sampling.probs(logits, sampler), np.float64)

  p1 = dist([()])[0]
  p2 = dist([(a,) for a in range(v)])                                   # [V, V]
  p3 = dist(list(itertools.product(range(v), repeat=2))).reshape(v, v, v)
  joint = p1[:, None, None] * p2[:, :, None] * p3
  return joint / joint.sum()


def pool_small_cells(counts, probs, n, min_expected=5.0):
  """Merges the least likely cells until every cell expects >= min_expected of n samples."""
  order = np.argsort(probs.ravel())
  counts, probs = counts.ravel()[order], probs.ravel()[order]
  cut = 0
  while probs[:cut].sum() * n < min_expected or (probs[cut] * n < min_expected and cut < probs.size):
    cut += 1
  return np.append(counts[cut:], counts[:cut].sum()), np.append(probs[cut:], probs[:cut].sum())


@pytest.mark.parametrize("top_k", [None, 6])
def test_speculative_sampling_is_exact(top_k):
  """First 3 tokens of 24,000 speculative samples vs the exact target distribution (chi-square,
  false alarm 1e-4), with a deliberately different drafter; plain sampling as a control."""
  cfg = config_lib.tiny(vocab_size=8, layer_types=config_lib.pattern(4, 2), final_logit_softcap=None)
  target = gemma_mtp.random_target(cfg, seed=3)
  drafter = random_drafter(cfg, seed=11)
  prompt, n, rows = [1, 5, 2, 7], 3, 24_000
  sampler = sampling.SamplingParams(temperature=1.0, top_k=top_k)
  exact = exact_first_tokens(target, prompt, sampler)
  kw = dict(max_new_tokens=n, temperature=1.0, top_k=top_k, seed=7)
  spec = gemma_mtp.generate(target, [prompt] * rows, drafter=drafter, draft_lengths=(2,),
                            adaptive=False, **kw)
  plain = gemma_mtp.generate(target, [prompt] * rows, **kw)
  assert 0 < spec.stats["accepted"] < spec.stats["drafted"]
  for out in (spec, plain):
    counts = np.zeros([cfg.vocab_size] * n)
    for row in out.tokens:
      counts[tuple(row)] += 1
    assert chi2_pvalue(*pool_small_cells(counts, exact, rows)) > FALSE_ALARM


def test_loop_is_one_program_without_host_transfers():
  target, drafter = agreeing_pair(TARGET, residual_scale=0.8)
  spec = speculative.SpecConfig()
  sampler = sampling.SamplingParams()
  kw = dict(tcfg=TARGET, dcfg=drafter.config, spec=spec, sampler=sampler, max_new=40,
            eos_ids=(), max_len=96)
  batches = [decoding.make_prompt_batch(p, vocab_size=TARGET.vocab_size)
             for p in (PROMPTS, [[9] * 11, [1, 2], [3, 4, 5], [6] * 25])]
  args = [jax.device_put(x) for x in (target.params, drafter.params, jax.random.PRNGKey(0))]
  state = speculative.speculative_generate(args[0], args[1], batches[0], args[2], **kw)
  jax.block_until_ready(state)
  before = speculative.speculative_generate._cache_size()
  batch = jax.device_put(batches[1])
  with jax.transfer_guard("disallow"):
    state = speculative.speculative_generate(args[0], args[1], batch, args[2], **kw)
    jax.block_until_ready(state.out)
  assert speculative.speculative_generate._cache_size() == before  # no recompilation
  assert int(state.rounds) > 0 and bool(jnp.all(state.done))


def test_bucket_policy():
  spec = speculative.SpecConfig(draft_lengths=(1, 2, 4, 8), draft_cost=0.05)
  picks = [spec.draft_lengths[int(speculative.best_bucket(jnp.float32(a), spec))]
           for a in (0.05, 0.5, 0.8, 0.95)]
  assert picks == sorted(picks) and picks[0] == 1 and picks[-1] == 8
  with pytest.raises(ValueError, match="draft_lengths"):
    speculative.SpecConfig(draft_lengths=(0, 2))


def test_adaptive_loop_keeps_the_cache_in_place():
  """No round of the adaptive loop copies the target's K/V cache, with either dispatch and with
  segments. (With the rule after the `lax.switch` XLA copied every buffer the conditional
  returned, the whole cache each round: ~135 us per round on the H200 demo pair, NOTES run V.)
  Read from the compiled program: no cache-shaped copy in the loop's code ('loops') or beside the
  switch ('switch'); a conditional with 'switch' only."""
  target, drafter = agreeing_pair(TARGET, residual_scale=0.3)
  batch = decoding.make_prompt_batch(PROMPTS[:1], vocab_size=TARGET.vocab_size)
  for dispatch, segment_rounds in itertools.product(speculative.DISPATCHES, (1, 3)):
    spec = speculative.SpecConfig(draft_lengths=(1, 2, 4), segment_rounds=segment_rounds,
                                  dispatch=dispatch)
    max_len = decoding.round_up(decoding.check_capacity(
        TARGET, batch.tokens.shape[1], 16, slack=spec.max_chunk), decoding.PROMPT_BUCKET)
    text = speculative.speculative_generate.lower(
        target.params, drafter.params, batch, jax.random.PRNGKey(0), tcfg=TARGET,
        dcfg=drafter.config, spec=spec, sampler=decoding.default_sampler(0.0, None, None),
        max_new=16, eos_ids=(), max_len=max_len,
        adaptive_state=speculative.initial_adaptive_state(spec)).compile().as_text()
    cache = kv_cache.init_cache(TARGET, 1, max_len, max_chunk=spec.max_chunk + 1)
    shapes = {f"[{','.join(map(str, b.shape))}]" for b in cache.k if b is not None}
    comps = re.split(r"\n(?=\S)", text)
    # 'loops': all the loop's code; 'switch': the loop body holding the switch (XLA still copies
    # some buffers inside all but one branch of it, which 'loops' has no need of).
    checked = [c for c in comps if not c.startswith("ENTRY") and (
        dispatch == "loops" or " conditional(" in c)]
    copies = [line for c in checked for line in c.splitlines()
              if " copy(" in line and any(x in line.split("copy(")[0] for x in shapes)]
    assert checked and shapes and not copies, (dispatch, segment_rounds, copies[:3])
    assert (" conditional(" in text) == (dispatch == "switch")
