"""The target's attention through the cache as Pallas kernels (decode_attention) against XLA's:
decode steps (one position a row) and a chain's verification forwards (several).

Off the GPU the kernels run in Pallas's interpreter; on a GPU the same tests run the compiled
Triton kernels.
"""

import functools

import jax
import numpy as np
import pytest

import gemma_mtp
from gemma_mtp import config as config_lib
from gemma_mtp import decode_attention
from gemma_mtp import drafter_kernels
from gemma_mtp import ple_kernels
from gemma_mtp import quant
from tests import decode_kernels as dkt

# Head dims 32 / 64 (half a head a power of two >= 16); the last two layers KV-shared (one of
# each kind); a sliding window of 8, so the ring wraps within the prompt.
TINY = config_lib.tiny(head_dim=32, global_head_dim=64, num_kv_shared_layers=2)
MAX_LEN = dkt.MAX_LEN
_target = dkt.fused_target


def _steps(cfg, params, mode, monkeypatch, *, batch=2, positions=1):
  """`decode_kernels.decode_steps` with the kernels switched `mode` (the PLE kernels off): the
  logits, the last cache's buffers, and whether the step's program holds a Pallas kernel."""
  logits, kv, jaxpr = dkt.decode_steps(
      cfg, params, {decode_attention.ENV: mode, ple_kernels.ENV: "off"}, monkeypatch,
      batch=batch, positions=positions)
  return logits, kv, "pallas_call" in jaxpr


@pytest.mark.parametrize("case", ["tiny", "k_eq_v", "looped ranges", "two chunks a range",
                                  "padded rows", "padded rows, int8", "one row",
                                  "own range, k_eq_v, looped, one row"])
def test_decode_steps_equal_xla_float32(monkeypatch, case):
  """In float32 only the summation order differs: five decode steps after a 13-token prompt
  (left-padded rows, the sliding ring wrapped, KV-shared layers of both kinds) give XLA's logits
  and caches. Cases: the tiny model (4-slot chunks: 2-8 ranges a head, some past the cache's end,
  combined by the rows kernel); full layers whose values are their raw keys (k_eq_v, as 31B and
  26B-A4B); each program walking its chunks in a loop (long caches); ranges of about one chunk
  (`RANGE_CHUNKS`, the library's) and of about two (the sliding ring in one range instead of
  two); the o projection's input
  given its padded second row by the rows kernel, as on GPUs (`quant.pad_one_row`), also with
  int8 weights (where the rows kernel leaves the padding to `quant.einsum`); one row; the step's
  own token as a range of its own (`OWN_RANGE_MIN_POSITIONS` 1: the rows kernel skips the
  unwritten partials), with k_eq_v layers, looped ranges and one row."""
  cfg = TINY.replace(k_eq_v=True) if "k_eq_v" in case else TINY
  monkeypatch.setattr(drafter_kernels, "SLOTS_PER_CHUNK", 4)
  if "looped" in case:
    monkeypatch.setattr(drafter_kernels, "UNROLL", 1)
  if case.startswith("own range"):
    monkeypatch.setattr(decode_attention, "OWN_RANGE_MIN_POSITIONS", 1)
  assert decode_attention.RANGE_CHUNKS == 1
  if case == "two chunks a range":
    monkeypatch.setattr(decode_attention, "RANGE_CHUNKS", 2)
    # the sliding ring's 8 slots: one range of two chunks instead of 2 of one
    assert drafter_kernels._chunking(8, 32, 1) == (4, 2, 2)
    assert drafter_kernels._chunking(8, 32, 2) == (4, 2, 1)
  if case.startswith("padded rows"):
    monkeypatch.setattr(quant, "PAD_ONE_ROW_BACKENDS", (jax.default_backend(),))
  assert drafter_kernels._chunking(MAX_LEN, 64) == (4, 10, 8)
  params = _target(cfg)
  if case.endswith("int8"):   # int8 weights: the o projection's input keeps one row
    params = gemma_mtp.quantize_target(gemma_mtp.Target(cfg, params)).params
    assert quant.is_quantized(params["layers"][0]["attn"]["o"])
  if case == "k_eq_v":
    assert "qk" in params["layers"][2]["attn"]
  batch = 1 if case.startswith(("padded rows", "one row")) or case.endswith("one row") else 2
  ref, ref_kv, ref_kernels = _steps(cfg, params, "off", monkeypatch, batch=batch)
  got, kv, kernels = _steps(cfg, params, "on", monkeypatch, batch=batch)
  assert (ref_kernels, kernels) == (False, True)
  np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * np.abs(ref).max())
  for a, b in zip(kv, ref_kv):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())


@pytest.mark.parametrize("case", ["three positions", "k_eq_v, ten positions, looped",
                                  "range 0, k_eq_v, ten positions, looped",
                                  "block norms, k_eq_v, ten positions, looped",
                                  "block norms, range 0, three positions"])
def test_verification_forwards_equal_xla_float32(monkeypatch, case):
  """Forwards of several positions a row through the cache, as a chain's verification (a head's
  positions one block of queries, each chunk of the cache read once for all of them; the
  forward's own tokens joined under the causal mask and stored into their slots), give XLA's
  logits and caches in float32 over five forwards on two left-padded rows: three positions a
  row; ten with k_eq_v full layers and each program walking its chunks in a loop, more than
  the sliding window of 8, so that the window hides some of the forward's own tokens from its
  later positions. The forward's own tokens are a range of their own (the library's
  `OWN_RANGE_MIN_POSITIONS`); the range-0 cases join them to range 0 instead. The block-norms
  cases norm the positions' queries, keys and values as rows of a block (`BLOCK_NORMS`), the
  keys and values stored from it."""
  positions = 3 if case.endswith("three positions") else 10
  cfg = TINY.replace(k_eq_v=True) if "k_eq_v" in case else TINY
  assert decode_attention.own_range(positions)
  if "range 0" in case:
    monkeypatch.setattr(decode_attention, "OWN_RANGE_MIN_POSITIONS", None)
  monkeypatch.setattr(decode_attention, "BLOCK_NORMS", case.startswith("block norms"))
  assert positions <= decode_attention.MAX_POSITIONS
  monkeypatch.setattr(drafter_kernels, "SLOTS_PER_CHUNK", 4)
  if "looped" in case:
    monkeypatch.setattr(drafter_kernels, "UNROLL", 1)
  params = _target(cfg)
  ref, ref_kv, ref_kernels = _steps(cfg, params, "off", monkeypatch, positions=positions)
  got, kv, kernels = _steps(cfg, params, "on", monkeypatch, positions=positions)
  assert (ref_kernels, kernels) == (False, True)
  assert got.shape == ref.shape == (dkt.STEPS, 2, positions, cfg.vocab_size)
  np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * np.abs(ref).max())
  for a, b in zip(kv, ref_kv):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())


def test_padded_rows_reach_the_o_projection_without_a_pad(monkeypatch):
  """Where one-row matmuls are padded to two rows, the rows kernel writes the o projection's
  two-row input itself: the traced step pads fewer one-row inputs than XLA's (one per layer,
  the o projection's), and the second row is zero."""
  monkeypatch.setattr(quant, "PAD_ONE_ROW_BACKENDS", (jax.default_backend(),))
  pads = dkt.traced_pads(TINY, _target(TINY), decode_attention.ENV, monkeypatch)
  # XLA's step pads q|k|v (or q) and o, MLP and head per layer; the kernels' step not o.
  assert pads["off"] - pads["on"] >= TINY.num_layers


@pytest.mark.parametrize("positions,own,block", [(1, False, False), (5, False, False),
                                                (5, True, False), (5, True, True)])
def test_bfloat16_as_accurate_as_xla(monkeypatch, positions, own, block):
  """In bfloat16 the kernels round where the model rounds, but normalise the softmax after the
  value product (XLA rounds the probabilities first) and XLA fuses elementwise ops. Measured
  against float32 arithmetic on the same bf16 weights, the kernels' five decode steps (or
  5-position verification forwards) are about as accurate as XLA's (mean relative error of the
  logits at most 1.2x XLA's; measured here: 6.1% against 6.0% for decode steps, 5.1% against
  5.4% for verification forwards), and the first forward's
  greedy tokens are as good as XLA's (`decode_kernels.assert_greedy_as_good`: where float32's
  top two logits are clear of XLA's error, the same token; at near-ties, one XLA could have
  picked). So too with the forward's own tokens as a range of their own (`own`), which at
  5 positions picks another token than XLA's at a three-way near-tie of the tiny bf16 model
  (float32's top logit 0.14 above the next, XLA's logits off by up to ~0.2; neither path picks
  float32's token there). And with the norms of the positions as rows of a block
  (`BLOCK_NORMS`, `block`)."""
  monkeypatch.setattr(decode_attention, "OWN_RANGE_MIN_POSITIONS", 1 if own else None)
  monkeypatch.setattr(decode_attention, "BLOCK_NORMS", block)
  steps = functools.partial(_steps, positions=positions)
  err, err_xla, got, ref, exact = dkt.bfloat16_errors(TINY, steps, monkeypatch)
  assert err <= 1.2 * err_xla, (err, err_xla)
  dkt.assert_greedy_as_good(got[0], ref[0], exact[0])


def test_choose(monkeypatch):
  """The kernels take up to MAX_POSITIONS positions a row with a cache and no tree, and heads
  whose half is a power of two >= 16 (every released shape; not the tiny default's 16 / 32);
  the automatic switch only on a GPU, up to AUTO_MAX_BATCH rows, and several positions only up
  to AUTO_MAX_POSITIONS and for models of at most AUTO_MAX_VERIFY_HEADS query heads (E2B and
  E4B, not 26B-A4B or 31B); =on at any batch, =off never."""
  for name in ("gemma4_e2b", "gemma4_e4b", "gemma4_31b", "gemma4_26b_a4b"):
    assert decode_attention.supported(config_lib.preset(name)) is None, name
  assert "half of a head" in decode_attention.supported(config_lib.tiny())
  big = decode_attention.AUTO_MAX_BATCH + 1
  monkeypatch.setenv(decode_attention.ENV, "on")
  assert decode_attention.choose(TINY, big, 1, True, None)
  assert decode_attention.choose(TINY, big, decode_attention.MAX_POSITIONS, True, None)
  assert not decode_attention.choose(TINY, 1, decode_attention.MAX_POSITIONS + 1, True, None)
  assert not decode_attention.choose(TINY, 1, 3, True, object())    # a tree
  assert not decode_attention.choose(TINY, 1, 1, False, None)       # no cache
  assert not decode_attention.choose(config_lib.tiny(), 1, 1, True, None)
  monkeypatch.setenv(decode_attention.ENV, "off")
  assert not decode_attention.choose(TINY, 1, 1, True, None)
  monkeypatch.setenv(decode_attention.ENV, "auto")
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  assert decode_attention.choose(TINY, decode_attention.AUTO_MAX_BATCH, 1, True, None)
  assert decode_attention.choose(TINY, 1, decode_attention.AUTO_MAX_POSITIONS, True, None)
  assert not decode_attention.choose(TINY, big, 1, True, None)
  assert not decode_attention.choose(TINY, 1, decode_attention.AUTO_MAX_POSITIONS + 1, True,
                                     None)
  for name, verifies in (("gemma4_e2b", True), ("gemma4_e4b", True), ("gemma4_26b_a4b", False),
                         ("gemma4_31b", False)):
    cfg = config_lib.preset(name)
    assert decode_attention.choose(cfg, 1, 1, True, None), name
    assert decode_attention.choose(cfg, 1, 5, True, None) == verifies, name
  monkeypatch.setattr(jax, "device_count", lambda: 2)                # sharded: XLA's path
  assert not decode_attention.choose(TINY, 1, 1, True, None)


@pytest.mark.parametrize("name,positions,own", [("tiny", 1, False), ("gemma4_e4b", 1, False),
                                                ("gemma4_31b", 1, False), ("gemma4_e4b", 5, False),
                                                ("gemma4_e4b", 1, True), ("gemma4_e4b", 5, True),
                                                ("gemma4_e4b", 5, "block norms")])
def test_kernels_lower_for_the_gpu(monkeypatch, name, positions, own):
  """A decode step, and a 5-position verification forward, lower to Triton (exported for CUDA
  on the CPU): two kernels a layer, for the tiny model and the E4B and 31B shapes at a 1k-slot
  cache (the PLE kernels off); E4B's also with the forward's own tokens as a range of their own
  (the kernel's branches on the program's range), and so with the positions' norms as rows of a
  block (`BLOCK_NORMS`)."""
  monkeypatch.setattr(decode_attention, "OWN_RANGE_MIN_POSITIONS", 1 if own else None)
  monkeypatch.setattr(decode_attention, "BLOCK_NORMS", own == "block norms")
  monkeypatch.setenv(decode_attention.ENV, "on")
  monkeypatch.setenv(ple_kernels.ENV, "off")
  kernels, layers = dkt.triton_kernels_lowered(TINY, name, monkeypatch, positions=positions)
  assert kernels == 2 * layers


def test_generate_with_kernels_equals_xla(monkeypatch):
  """Plain greedy decoding (`api.generate`: the decode loop, the cache updated in place in its
  while loop) emits the same tokens with the kernels as without, in float32, on ragged prompts
  longer than the sliding window; and speculative decoding with a drafter still emits plain
  decoding's tokens while its verification forwards (3 positions a row) and plain steps run
  the kernels."""
  traced = []                      # the layers traced through the kernels, by positions a row
  call = decode_attention.Step.__call__
  monkeypatch.setattr(decode_attention.Step, "__call__",
                      lambda self, *a, **k: traced.append(a[0].shape[1]) or call(self, *a, **k))
  off, on, (spec,) = dkt.generate_off_and_on(TINY, decode_attention.ENV, monkeypatch, traced)
  # one plain decode program and the speculative loop's verification (with the switch on)
  assert sorted(traced) == [1] * TINY.num_layers + [3] * TINY.num_layers
  np.testing.assert_array_equal(on, off)
  np.testing.assert_array_equal(spec, on)
