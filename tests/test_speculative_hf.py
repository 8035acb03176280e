"""Our speculative loop against `transformers` assisted generation with a Gemma 4 assistant."""

import pytest

import gemma_mtp
from tests import hf_assist

K = 4
NEW_TOKENS = 40
PROMPTS = ([11, 25, 3, 40, 7, 19, 30, 5, 22, 14, 9, 33, 27, 4, 18, 21, 6, 12, 29, 8], [5, 9, 13])


@pytest.fixture(scope="module", params=["dense", "centroid"])
def pair(request, tmp_path_factory):
  directory = tmp_path_factory.mktemp(request.param)
  hf_target, hf_assistant = hf_assist.make_hf_pair(request.param, directory, num_assistant_tokens=K)
  target = gemma_mtp.load_target(directory / "target")
  drafter = gemma_mtp.load_drafter(directory / "assistant", target)
  return hf_target, hf_assistant, target, drafter


@pytest.mark.parametrize("prompt", PROMPTS, ids=["long_prompt", "short_prompt"])
def test_drafts_of_every_round_equal_the_reference(pair, prompt):
  """Same output as HF assisted and plain greedy decoding, and the same drafts in every round
  (which checks the K/V the drafter sees, its query position and its carried state)."""
  hf_target, hf_assistant, target, drafter = pair
  assert drafter.config.convention == "hf"
  ref = hf_assist.record_hf_assisted(hf_target, hf_assistant, list(prompt),
                                     max_new_tokens=NEW_TOKENS, num_assistant_tokens=K)
  assert ref["new_tokens"] == ref["greedy_new_tokens"]
  out = gemma_mtp.generate(target, [list(prompt)], max_new_tokens=NEW_TOKENS, drafter=drafter,
                           draft_lengths=(K,), adaptive=False, return_drafts=True)
  assert out.tokens[0] == list(ref["new_tokens"])
  assert out.tokens == gemma_mtp.generate(target, [list(prompt)], max_new_tokens=NEW_TOKENS).tokens
  ours = [rnd[0] for rnd in out.stats["drafts"]]
  theirs = [list(r["drafts"]) for r in ref["rounds"]]
  # HF shortens the last rounds to fit max_length (K' = min(K, max_length - L - 1)); ours always
  # drafts K and stops at max_new_tokens, so compare the rounds HF drafted in full.
  full = [i for i, r in enumerate(ref["rounds"]) if len(r["drafts"]) == K]
  assert len(full) >= 5
  assert len(ours) >= len(full)
  for i in full:
    assert ours[i] == theirs[i], f"round {i}"
  # Some rounds reject a draft, so the stale-entry convention is exercised.
  assert any(r["num_accepted"] < K for r in ref["rounds"])
