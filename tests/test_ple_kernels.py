"""The end of a PLE layer at one position a row as Pallas kernels (ple_kernels) against XLA's.

Off the GPU the kernels run in Pallas's interpreter; on a GPU the same tests run the compiled
Triton kernels.
"""

import jax
import numpy as np
import pytest

import gemma_mtp
from gemma_mtp import config as config_lib
from gemma_mtp import decode_attention
from gemma_mtp import params as params_lib
from gemma_mtp import ple_kernels
from gemma_mtp import quant
from tests import decode_kernels as dkt

# Per-layer inputs of 32, a 96-wide residual (not a power of two: the kernels' chunks), four
# layers (sliding, full) x 2, the last two KV-shared with double-wide MLPs; head dims the
# attention kernels take.
TINY = config_lib.tiny(embed_dim=96, head_dim=32, global_head_dim=64, num_kv_shared_layers=2,
                       layer_types=config_lib.pattern(4, 2), per_layer_dim=32,
                       per_layer_vocab_size=256, double_wide_mlp=True)
_target = dkt.fused_target


def _steps(cfg, params, mode, monkeypatch, *, batch=2, attention="on", positions=1):
  """`decode_kernels.decode_steps` with the PLE kernels switched `mode` (and the attention
  kernels `attention`): the logits, the last cache's buffers, and the step program's Pallas
  kernels by name."""
  logits, kv, jaxpr = dkt.decode_steps(
      cfg, params, {ple_kernels.ENV: mode, decode_attention.ENV: attention}, monkeypatch,
      batch=batch, positions=positions)
  names = {n: jaxpr.count(f"name={n}")
           for n in ("ple_gate", "ple_proj", "ple_finish", "attention_end")}
  return logits, kv, names


@pytest.mark.parametrize("case", ["verification, two rows", "padded rows",
                                  "padded rows, copies, the attention kernels",
                                  "one row, one gate part, checkpoint layout",
                                  "attention end, verification, two rows",
                                  "attention end, padded rows, copies, the attention kernels"])
def test_decode_steps_equal_xla_float32(monkeypatch, case):
  """In float32 only the summation order differs: five forwards after a 13-token prompt
  (left-padded rows, KV-shared layers) give XLA's logits and caches, with three kernels a layer.
  Cases (XLA's attention, which slices a padded input back to its rows, unless named): forwards
  of three positions a row, as a chain's verification, on two rows (six rows of the kernels);
  one row whose next projections' inputs the finish kernel pads to two rows, as on GPUs
  (`quant.pad_one_row`), with zeros, or with copies of the row into the attention kernels,
  which take the padded input as it is; one row, no padding, the PLE gate in one contraction
  part instead of two, in the checkpoint layout (q, k, v separate); and with the step from the
  o projection to the MLP's input as a kernel too (`ATTENTION_END`), on two rows of three
  positions and on one row padded for the MLP's projections."""
  attention_end = case.startswith("attention end")
  monkeypatch.setattr(ple_kernels, "ATTENTION_END", attention_end)
  if case.endswith("checkpoint layout"):
    monkeypatch.setattr(ple_kernels, "GATE_PARTS", 1)
    assert ple_kernels._gate_split(96, 32)[0] == 1
  if "padded rows" in case:
    monkeypatch.setattr(quant, "PAD_ONE_ROW_BACKENDS", (jax.default_backend(),))
  if "copies" in case:
    monkeypatch.setattr(quant, "PAD_ROWS_WITH", "copy")
  params = (gemma_mtp.random_target(TINY).params if case.endswith("checkpoint layout")
            else _target(TINY))
  if attention_end:   # norm weights apart (they start as ones), so a swapped norm shows
    params = dkt.random_norms(params)
  verification = "verification" in case
  batch, positions = (2, 3) if verification else (1, 1)
  attention = "on" if "attention kernels" in case else "off"
  ref, ref_kv, ref_names = _steps(TINY, params, "off", monkeypatch, batch=batch,
                                  attention=attention, positions=positions)
  got, kv, names = _steps(TINY, params, "on", monkeypatch, batch=batch, attention=attention,
                          positions=positions)
  assert set(ref_names.values()) == {0}
  layers = TINY.num_layers
  assert names == {"ple_gate": layers, "ple_proj": layers, "ple_finish": layers,
                   "attention_end": layers if attention_end else 0}, names
  np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * np.abs(ref).max())
  for a, b in zip(kv, ref_kv):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())


@pytest.mark.parametrize("attention_end", [False, True], ids=["tails", "attention end"])
def test_no_pads_between_layers(monkeypatch, attention_end):
  """Where one-row matmuls are padded to two rows, the finish kernel writes the next layer's
  q|k|v input with its second row, and the PLE gate and projection GEMMs are kernels: the
  traced step pads three one-row inputs fewer a layer (the gate's, the projection's, the next
  q|k|v input) than XLA's, bar the first layer's (the attention kernels on in both, which take the
  padded input; XLA's attention would slice and pad it again). With `ATTENTION_END` two fewer
  again: the MLP's gate|up input comes padded, so its down projection's input has two rows too."""
  monkeypatch.setattr(quant, "PAD_ONE_ROW_BACKENDS", (jax.default_backend(),))
  monkeypatch.setattr(ple_kernels, "ATTENTION_END", attention_end)
  monkeypatch.setenv(decode_attention.ENV, "on")
  pads = dkt.traced_pads(TINY, _target(TINY), ple_kernels.ENV, monkeypatch)
  fewer = (5 if attention_end else 3) * TINY.num_layers - 1
  assert pads["off"] - pads["on"] == fewer, pads


@pytest.mark.parametrize("attention_end", [False, True], ids=["tails", "attention end"])
def test_bfloat16_as_accurate_as_xla(monkeypatch, attention_end):
  """In bfloat16 the kernels round where the model rounds (XLA fuses elementwise ops and may
  round less). Measured against float32 arithmetic on the same bf16 weights, the kernels' five
  steps are about as accurate as XLA's (mean relative error of the logits at most 1.2x XLA's;
  measured here: 4.9% against 5.1%), and the first step's greedy tokens are as good as XLA's
  (`decode_kernels.assert_greedy_as_good`); so too with `ATTENTION_END`."""
  monkeypatch.setattr(ple_kernels, "ATTENTION_END", attention_end)
  err, err_xla, got, ref, exact = dkt.bfloat16_errors(TINY, _steps, monkeypatch)
  assert err <= 1.2 * err_xla, (err, err_xla)
  dkt.assert_greedy_as_good(got[0], ref[0], exact[0])


def test_choose(monkeypatch):
  """The kernels take forwards through a cache without a tree (decode steps and chains'
  verification), in models with per-layer inputs, no MoE and float PLE weights (E2B and E4B,
  not 31B or 26B-A4B); the automatic switch only up to AUTO_MAX_BATCH positions in all (or
  AUTO_MAX_POSITIONS in one row) and only on one GPU, =on at any number, =off never."""
  shapes = lambda cfg: jax.eval_shape(lambda: params_lib.init_params(cfg, jax.random.PRNGKey(0)))
  for name in ("gemma4_e2b", "gemma4_e4b"):
    cfg = config_lib.preset(name)
    assert ple_kernels.supported(cfg, shapes(cfg)) is None, name
  assert "no per-layer" in ple_kernels.supported(config_lib.tiny(), {"layers": []})
  moe = config_lib.tiny(per_layer_dim=16, per_layer_vocab_size=256, num_experts=4,
                        num_experts_per_token=2, expert_dim=32)
  assert ple_kernels.supported(moe, shapes(moe)) == "MoE layers"
  params = _target(TINY)
  int8 = gemma_mtp.quantize_target(gemma_mtp.Target(TINY, params)).params
  assert ple_kernels.supported(TINY, int8) == "int8 PLE weights"
  big = ple_kernels.AUTO_MAX_BATCH + 1
  monkeypatch.setenv(ple_kernels.ENV, "on")
  assert ple_kernels.choose(TINY, params, big, 1, True, None)
  assert ple_kernels.choose(TINY, params, big, 5, True, None)       # verification
  assert not ple_kernels.choose(TINY, params, 1, 1, False, None)    # no cache: prefill
  tree = gemma_mtp.TreeSpec.parse("2,1")
  assert not ple_kernels.choose(TINY, params, 1, tree.num_nodes, True, tree)
  monkeypatch.setenv(ple_kernels.ENV, "off")
  assert not ple_kernels.choose(TINY, params, 1, 1, True, None)
  monkeypatch.setenv(ple_kernels.ENV, "auto")
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  assert ple_kernels.choose(TINY, params, ple_kernels.AUTO_MAX_BATCH, 1, True, None)
  assert ple_kernels.choose(TINY, params, 1, ple_kernels.AUTO_MAX_BATCH, True, None)
  assert ple_kernels.choose(TINY, params, 1, 5, True, None)         # verifying 4 drafts
  assert not ple_kernels.choose(TINY, params, 1, ple_kernels.AUTO_MAX_POSITIONS + 1, True, None)
  assert not ple_kernels.choose(TINY, params, big, 1, True, None)
  assert not ple_kernels.choose(TINY, params, 2, 3, True, None)     # 6 positions
  assert not ple_kernels.choose(TINY, params, 2, 5, True, None)     # 10 positions
  monkeypatch.setattr(jax, "device_count", lambda: 2)                # sharded: XLA's path
  assert not ple_kernels.choose(TINY, params, 1, 1, True, None)


@pytest.mark.parametrize("name", ["tiny", "gemma4_e4b", "gemma4_e2b"])
def test_kernels_lower_for_the_gpu(monkeypatch, name):
  """A decode step lowers to Triton (exported for CUDA on the CPU): four kernels a layer (the
  PLE kernels' three and the attention end; the attention kernels off), for the tiny model and
  the E4B and E2B shapes."""
  monkeypatch.setenv(ple_kernels.ENV, "on")
  monkeypatch.setenv(decode_attention.ENV, "off")
  kernels, layers = dkt.triton_kernels_lowered(TINY, name, monkeypatch)
  assert kernels == 4 * layers


def test_generate_with_kernels_equals_xla(monkeypatch):
  """Plain greedy decoding (`api.generate`: the decode loop) emits the same tokens with the
  kernels as without, in float32, on ragged prompts longer than the sliding window; and
  speculative decoding with a drafter, whose verification forwards (3 positions a row) run the
  kernels too, still emits plain decoding's tokens."""
  traced = []                      # the layers traced through the kernels, by positions a row
  tail = ple_kernels.tail
  monkeypatch.setattr(ple_kernels, "tail",
                      lambda p, x1, *a, **k: traced.append(x1.shape[1]) or tail(p, x1, *a, **k))
  off, on, (spec,) = dkt.generate_off_and_on(TINY, ple_kernels.ENV, monkeypatch, traced)
  # one plain decode program and one verification program (K = 2), with the switch on
  assert sorted(traced) == [1] * TINY.num_layers + [3] * TINY.num_layers
  np.testing.assert_array_equal(on, off)
  np.testing.assert_array_equal(spec, on)
