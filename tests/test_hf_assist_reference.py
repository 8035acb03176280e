"""Pins down HF (transformers 5.24) assisted generation with a Gemma 4 assistant on tiny random pairs.

The rules asserted here are those of experiments/hf_assisted_reference.md; the recorder is tests/hf_assist.py.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests import hf_assist  # noqa: E402

SLIDING, FULL = hf_assist.SLIDING, hf_assist.FULL
K = 4


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
  out = {}
  for kind in hf_assist.KINDS:
    d = tmp_path_factory.mktemp(f"hf_{kind}")
    out[kind] = hf_assist.make_hf_pair(kind, d, num_assistant_tokens=K)
    assert os.path.exists(os.path.join(d, "target", "config.json"))
    assert os.path.exists(os.path.join(d, "assistant", "model.safetensors"))
  return out


def _prompt(n, seed):
  return np.random.default_rng(seed).integers(hf_assist.FIRST_NORMAL_TOKEN, hf_assist.VOCAB, size=n).tolist()


def expected_visibility(L, prev_start, prev_n, W):
  """The documented rule: (full visible, sliding buffer kept, sliding visible) as lists of absolute positions.

  prev_start/prev_n: first position and number of inputs of the target call the round drafts from.
  """
  e = prev_start + prev_n - 1
  b = 0 if prev_start == 0 else max(0, prev_start - (W - 1))  # prefill returns the whole prompt
  full = list(range(0, min(e, L - 1) + 1))
  end = min(e, b + L - 1)  # `[:, :, :L]` slice by buffer index
  kept = list(range(b, end + 1))
  sliding = list(range(max(b, end - W), end + 1))  # last W+1 entries
  return full, kept, sliding


def check_record(rec, *, greedy: bool):
  P, W, max_len = rec["prompt_len"], rec["sliding_window"], rec["max_length"]
  seq, rounds, calls = rec["sequence"], rec["rounds"], rec["target_calls"]
  assert rec["assistant_sliding_window"] == W
  assert len(seq) == max_len  # EOS disabled
  assert len(calls) == len(rounds) + 1
  assert calls[0]["start"] == 0 and calls[0]["n_inputs"] == P  # prefill
  assert rounds[0]["seq_len"] == P + 1
  saw = {"full_accept": 0, "reject": 0, "stale_beyond_query": 0, "cut_from_0": 0, "cut_from_b": 0}
  for i, r in enumerate(rounds):
    L, prev = r["seq_len"], calls[i]
    # ---- (c) number of drafts per round ----
    assert r["num_drafts"] == max(0, min(K, max_len - L - 1)), (i, L, r["num_drafts"])
    assert len(r["drafts"]) == len(r["steps"]) == r["num_drafts"]
    n = r["num_accepted"]
    assert 0 <= n <= r["num_drafts"]
    assert r["accepted_tokens"][:n] == r["drafts"][:n]
    assert len(r["accepted_tokens"]) == n + 1
    if i + 1 < len(rounds):
      assert rounds[i + 1]["seq_len"] == L + n + 1
    assert calls[i + 1]["start"] == L - 1 and calls[i + 1]["n_inputs"] == r["num_drafts"] + 1
    if greedy:  # greedy acceptance: leading drafts equal to the target's own greedy continuation
      ref = rec["greedy_sequence"]
      m = 0
      while m < r["num_drafts"] and r["drafts"][m] == ref[L + m]:
        m += 1
      assert n == m and r["accepted_tokens"] == ref[L:L + n + 1]
    if not r["steps"]:
      continue
    saw["full_accept" if n == r["num_drafts"] else "reject"] += 1
    # ---- (c) hidden state / token / position of every step ----
    assert r["hidden_source"] == L - 2
    h_row = L - 2 - prev["start"]
    np.testing.assert_array_equal(r["steps"][0]["h_in"], prev["hidden"][h_row])
    assert r["steps"][0]["token_id"] == seq[L - 1]
    for j, s in enumerate(r["steps"]):
      assert s["position_ids"] == [L - 1]
      assert s["argmax"] == int(np.argmax(s["logits"])) == r["drafts"][j]  # drafts = argmax, also when sampling
      if j:
        assert s["token_id"] == r["steps"][j - 1]["argmax"]
        np.testing.assert_array_equal(s["h_in"], r["steps"][j - 1]["h_out"])
    # ---- (b) K/V visibility: the rule, from (L, W, previous call) only, vs. shapes + masks + attention probs ----
    full, kept, sliding = expected_visibility(L, prev["start"], prev["n_inputs"], W)
    assert r["taps"][FULL]["positions"].tolist() == full
    assert r["taps"][SLIDING]["positions"].tolist() == kept
    e = prev["start"] + prev["n_inputs"] - 1
    if kept[-1] < e and prev["start"] > 0:  # the `[:L]` slice removed entries of the sliding buffer
      saw["cut_from_b" if kept[0] > 0 else "cut_from_0"] += 1
    for s in r["steps"]:
      assert s["visible"][FULL].tolist() == full
      assert s["visible"][SLIDING].tolist() == sliding
      assert len(sliding) == min(W + 1, len(kept))
      for typ in (FULL, SLIDING):
        assert s["attended"][typ], "no eager attention probabilities recorded"
        for li, pos in s["attended"][typ].items():
          assert pos.tolist() == s["visible"][typ].tolist(), (typ, li)
        # stale = K/V of rejected drafts = visible positions >= L-1 (only after a rejection). Also when sampling:
        # a rejected draft has p < q, so the residual max(p - q, 0) never resamples it.
        assert s["stale"][typ].tolist() == [p for p in s["visible"][typ].tolist() if p >= L - 1], (i, typ)
      if any(p > L - 1 for p in s["stale"][SLIDING].tolist()):
        saw["stale_beyond_query"] += 1
    if i > 0 and rounds[i - 1]["num_accepted"] < rounds[i - 1]["num_drafts"]:
      assert L - 1 in r["steps"][0]["stale"][FULL].tolist()  # rejected draft d_{n+1} at the bonus position
  return saw


@pytest.mark.parametrize("kind", hf_assist.KINDS)
def test_greedy_long_prompt(pairs, kind):
  target, assistant = pairs[kind]
  rec = hf_assist.record_hf_assisted(target, assistant, _prompt(20, 1), max_new_tokens=40, num_assistant_tokens=K)
  assert rec["prompt_len"] > rec["sliding_window"] + 1
  assert rec["sequence"] == rec["greedy_sequence"]  # assisted greedy == plain greedy
  # round 1 right after prefill: full 0..P-1, sliding the last W+1 prompt positions
  r0, P, W = rec["rounds"][0], rec["prompt_len"], rec["sliding_window"]
  assert r0["steps"][0]["visible"][FULL].tolist() == list(range(P))
  assert r0["steps"][0]["visible"][SLIDING].tolist() == list(range(P - 1 - W, P))
  saw = check_record(rec, greedy=True)
  assert saw["full_accept"] and saw["reject"] and saw["stale_beyond_query"], saw


@pytest.mark.parametrize("kind", hf_assist.KINDS)
@pytest.mark.parametrize("prompt_len,seed,new_tokens,cut", [(3, 2, 18, "cut_from_0"), (8, 0, 12, "cut_from_b")])
def test_greedy_short_prompt(pairs, kind, prompt_len, seed, new_tokens, cut):
  """Short sequences: the `[:L]` slice cuts the sliding buffer (buffer starting at 0, or at b > 0 when L < W+K')."""
  target, assistant = pairs[kind]
  rec = hf_assist.record_hf_assisted(target, assistant, _prompt(prompt_len, seed), max_new_tokens=new_tokens,
                                     num_assistant_tokens=K)
  assert rec["sequence"] == rec["greedy_sequence"]
  saw = check_record(rec, greedy=True)
  assert saw[cut], saw


def test_sampling_rules(pairs):
  target, assistant = pairs["centroid"]
  rec = hf_assist.record_hf_assisted(target, assistant, _prompt(12, 3), max_new_tokens=24, num_assistant_tokens=K,
                                     do_sample=True, seed=0, temperature=0.8, top_k=0, top_p=1.0)
  check_record(rec, greedy=False)


def test_centroid_head_fill_value(pairs):
  """Non-candidate logits = min(candidate logits) - 1; 64 candidates (4 clusters x 16)."""
  target, assistant = pairs["centroid"]
  rec = hf_assist.record_hf_assisted(target, assistant, _prompt(10, 4), max_new_tokens=6, num_assistant_tokens=K)
  ordering = assistant.masked_embedding.token_ordering.numpy()
  for r in rec["rounds"]:
    for s in r["steps"]:
      lg = s["logits"]
      fill = lg.min()
      cand = np.nonzero(lg != fill)[0]
      assert len(cand) == hf_assist.CENTROID_TOP_K * hf_assist.VOCAB // hf_assist.NUM_CENTROIDS
      np.testing.assert_allclose(fill, lg[cand].min() - 1.0, rtol=1e-6)
      clusters = {int(np.nonzero(ordering == c)[0][0]) // (hf_assist.VOCAB // hf_assist.NUM_CENTROIDS) for c in cand}
      assert len(clusters) == hf_assist.CENTROID_TOP_K
