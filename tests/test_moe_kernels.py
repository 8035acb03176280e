"""The MoE router and the MoE layer's end as Pallas kernels (moe_kernels) against XLA's.

Off the GPU the kernels run in Pallas's interpreter; on a GPU the same tests run the compiled
Triton kernels.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma_mtp

from gemma_mtp import config as config_lib
from gemma_mtp import decode_attention
from gemma_mtp import layers
from gemma_mtp import matvec
from gemma_mtp import moe_kernels
from gemma_mtp import ple_kernels
from gemma_mtp import quant
from tests import decode_kernels as dkt

# 16 experts, top 4, a 96-wide residual (not a power of two: the kernels' chunks).
TINY = config_lib.tiny(embed_dim=96, num_experts=16, num_experts_per_token=4, expert_dim=16,
                       k_eq_v=True)


def _moe_params(cfg, dtype, seed=0):
  rng = np.random.default_rng(seed)
  d, e = cfg.embed_dim, cfg.num_experts
  f = lambda *shape, scale=1.0: jnp.asarray(rng.normal(size=shape) * scale, dtype)
  return {"router": f(d, e, scale=d ** -0.5), "router_scale": f(d, scale=0.3) + 1,
          "expert_scale": f(e, scale=0.3) + 1, "pre_norm": f(d, scale=0.3) + 1}


def _both(cfg, p, x):
  """(XLA's weights, experts, experts' input; the kernels')."""
  with jax.default_matmul_precision("float32"):
    w, e = layers.route(x, p, top_k=cfg.num_experts_per_token, eps=cfg.rms_eps)
    xn = layers.rms_norm(x, p["pre_norm"], eps=cfg.rms_eps)
    got = moe_kernels.route(x, p, cfg)
  return [np.asarray(a, np.float32) for a in (w, e, xn)], [np.asarray(a, np.float32)
                                                            for a in got]


@pytest.mark.parametrize("ranks", [False, True])
def test_route_equals_xla_float32(monkeypatch, ranks):
  """In float32: the same experts in the same order, and the weights and the experts' input up
  to summation order, on 5 tokens (two parts of the router's contraction, 2 column tiles); the
  top k by k rounds of a max and by rank (`TOP_K_RANKS`)."""
  monkeypatch.setattr(moe_kernels, "TOP_K_RANKS", ranks)
  p = _moe_params(TINY, jnp.float32)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(5, TINY.embed_dim)) * 3, jnp.float32)
  (w, e, xn), (w2, e2, xn2) = _both(TINY, p, x)
  np.testing.assert_array_equal(e2, e)
  np.testing.assert_allclose(w2, w, rtol=2e-6, atol=0)
  np.testing.assert_allclose(xn2, xn, rtol=0, atol=2e-6 * np.abs(xn).max())
  assert len(set(map(tuple, e.tolist()))) == 5           # the tokens route differently


@pytest.mark.parametrize("ranks", [False, True])
def test_ties_go_to_the_lower_index(monkeypatch, ranks):
  """Experts 3 and 9 score the same and highest, the other 14 the same (zero): both pick 3, 9
  and then 0, 1, as `lax.top_k` does (by rounds of a max and by rank)."""
  monkeypatch.setattr(moe_kernels, "TOP_K_RANKS", ranks)
  p = _moe_params(TINY, jnp.float32)
  v = np.random.default_rng(2).normal(size=TINY.embed_dim)
  router = np.zeros((TINY.embed_dim, TINY.num_experts))
  router[:, 3] = router[:, 9] = v
  p = dict(p, router=jnp.asarray(router, jnp.float32), router_scale=jnp.ones(TINY.embed_dim))
  x = jnp.asarray(v[None], jnp.float32)
  (w, e, _), (w2, e2, _) = _both(TINY, p, x)
  np.testing.assert_array_equal(e, [[3, 9, 0, 1]])
  np.testing.assert_array_equal(e2, e)
  np.testing.assert_allclose(w2, w, rtol=2e-6)


def test_route_bfloat16_as_xla():
  """In bfloat16, rounded where `layers.route` rounds: XLA's experts on 16 random tokens, the
  weights within bf16 logits' spread, the experts' input within one bf16 step."""
  cfg = TINY.replace(dtype="bfloat16", param_dtype="bfloat16")
  p = _moe_params(cfg, jnp.bfloat16)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(16, cfg.embed_dim)) * 3, jnp.bfloat16)
  (w, e, xn), (w2, e2, xn2) = _both(cfg, p, x)
  np.testing.assert_array_equal(e2, e)
  np.testing.assert_allclose(w2, w, rtol=2e-2)
  np.testing.assert_allclose(xn2, xn, rtol=2 ** -7)


@pytest.mark.parametrize("case", ["float32, two rows", "float32, one row padded with zeros",
                                  "bfloat16, one row padded with copies", "bfloat16, 5 rows"])
def test_router_end_equals_attention_end_and_route(monkeypatch, case):
  """`attention_end` (ROUTER_END: the attention end and the router's logits in one kernel)
  gives what `ple_kernels.attention_end` then `route` give, bit for bit: the residual after
  attention, the MLP's normed input (with the padding row its GEMM takes, zeros or a copy), and
  through `top_k` the same weights, experts and experts' input. a carries a padded row past
  the B real ones, which both ignore."""
  dtype = jnp.bfloat16 if case.startswith("bfloat16") else jnp.float32
  cfg = TINY.replace(dtype=jnp.dtype(dtype).name, param_dtype=jnp.dtype(dtype).name)
  monkeypatch.setattr(quant, "PAD_ONE_ROW_BACKENDS", (jax.default_backend(),))
  monkeypatch.setattr(quant, "PAD_ROWS_WITH", "copy" if "copies" in case else "zeros")
  b = {"two": 2, "one": 1, "5": 5}[case.split(", ")[1].split()[0]]
  rng = np.random.default_rng(4)
  d = cfg.embed_dim
  f = lambda *shape, scale=1.0: jnp.asarray(rng.normal(size=shape) * scale, dtype)
  p = {"moe": _moe_params(cfg, dtype), "post_attn_norm": f(d, scale=0.3) + 1,
       "pre_ffw_norm": f(d, scale=0.3) + 1, "mlp": {"gate_up": f(d, 2 * cfg.mlp_dim)}}
  x, a = f(b, 1, d, scale=3), f(b + 1, 1, d, scale=2)
  x1, xs = ple_kernels.attention_end(x, a, p, cfg)
  want = moe_kernels.route(x1.reshape(b, d), p["moe"], cfg)
  got_x1, got_xs, more = moe_kernels.attention_end(x, a, p, cfg)
  assert xs.shape == got_xs.shape == ((2, 1, d) if b == 1 else (b, 1, d))
  np.testing.assert_array_equal(np.asarray(got_x1, np.float32), np.asarray(x1, np.float32))
  np.testing.assert_array_equal(np.asarray(got_xs, np.float32), np.asarray(xs, np.float32))
  got = moe_kernels.top_k(more["logits"], got_x1.reshape(b, d), p["moe"], cfg)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
  assert len(set(map(tuple, np.asarray(want[1]).tolist()))) == b   # the rows route apart
  if b == 1:   # the padding row: zeros, or the real row again
    pad = np.asarray(got_xs[1], np.float32)
    np.testing.assert_array_equal(pad, 0 * pad if "zeros" in case
                                  else np.asarray(got_xs[0], np.float32))


def test_choose(monkeypatch):
  """The switch: off on the CPU (auto), on with =on; the 26B-A4B router taken through a cache
  (not in training forwards: no gradient), the automatic switch up to AUTO_MAX_ROWS tokens;
  why not otherwise."""
  cfg = config_lib.preset("gemma4_26b_a4b")
  p = _moe_params(TINY, jnp.float32)
  assert moe_kernels.supported(cfg, p) is None
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert not moe_kernels.choose(cfg, p, 1, True)                   # auto off the GPU
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert moe_kernels.choose(cfg, p, moe_kernels.AUTO_MAX_ROWS, True)
  assert not moe_kernels.choose(cfg, p, moe_kernels.AUTO_MAX_ROWS + 1, True)
  assert not moe_kernels.choose(cfg, p, 1, False)
  monkeypatch.setattr(jax, "device_count", lambda: 2)                # sharded: XLA's path
  assert not moe_kernels.choose(cfg, p, 1, True)
  monkeypatch.setenv(moe_kernels.ENV, "on")
  assert moe_kernels.choose(cfg, p, 1024, True) and not moe_kernels.choose(cfg, p, 1, False)
  monkeypatch.setenv(moe_kernels.ENV, "off")
  assert not moe_kernels.choose(cfg, p, 1, True)
  assert "experts" in moe_kernels.supported(TINY.replace(num_experts=8), p)
  assert "top 3" in moe_kernels.supported(TINY.replace(num_experts_per_token=3), p)


def _steps(cfg, params, mode, monkeypatch, *, batch=2, positions=1, attention="off"):
  """`decode_kernels.decode_steps` with the MoE kernels switched `mode` (the PLE kernels off,
  the attention kernels `attention`): the logits, the last cache's buffers, and the step
  program's Pallas kernels by name."""
  env = {moe_kernels.ENV: mode, decode_attention.ENV: attention, ple_kernels.ENV: "off"}
  logits, kv, jaxpr = dkt.decode_steps(cfg, params, env, monkeypatch, batch=batch,
                                       positions=positions)
  names = {n: len(re.findall(rf"name={n}\b", jaxpr))
           for n in ("moe_router", "moe_top_k", "moe_finish", "attention_end", "moe_router_end")}
  return logits, kv, names


@pytest.mark.parametrize("case", ["two rows", "padded row, copies, the attention kernels",
                                  "padded row, zeros", "verification, router only",
                                  "two rows, router only", "two rows, int8 experts",
                                  "padded row, copies, the attention kernels, the router end"])
def test_decode_steps_equal_xla_float32(monkeypatch, case):
  """Five forwards after a 13-token prompt (left-padded rows) through the whole model give XLA's
  logits and caches with the kernels on, in float32 (only the summation order differs): the
  router's two kernels a layer, and the layer's end as one more where the forward's (token,
  expert) pairs are at most the experts, with the step from the o projection to the MLP's
  input as another there (`ple_kernels.ATTENTION_END`). Cases: decode steps of two rows (8
  pairs); one row whose next layer's input the finish kernel pads to two rows, as on GPUs
  (`quant.pad_one_row`), with copies into the attention kernels (which take the padded input as
  it is) or with zeros into XLA's attention (which slices it); a chain's verification of three
  positions on two rows (24 pairs: the router kernels only); `moe_kernels.FINISH` off; the
  int8-quantized target (`quantize_target`: the experts and MLPs int8, the router float); the
  attention end and the router's logits as one kernel (`moe_kernels.ROUTER_END`).
  The layers' norm weights are drawn apart (they start as ones), so a swapped norm shows."""
  if case.startswith("padded row"):
    monkeypatch.setattr(quant, "PAD_ONE_ROW_BACKENDS", (jax.default_backend(),))
    monkeypatch.setattr(quant, "PAD_ROWS_WITH", "copy" if "copies" in case else "zeros")
  if case == "two rows, router only":
    monkeypatch.setattr(moe_kernels, "FINISH", False)
  router_end = case.endswith("the router end")
  monkeypatch.setattr(moe_kernels, "ROUTER_END", router_end)
  batch, positions = (2, 3) if case.startswith("verification") else (
      (1, 1) if case.startswith("padded") else (2, 1))
  attention = "on" if "attention kernels" in case else "off"
  params = dkt.random_norms(dkt.fused_target(TINY))
  if "int8" in case:
    params = gemma_mtp.quantize_target(gemma_mtp.Target(TINY, params)).params
    assert quant.is_quantized(params["layers"][0]["moe"]["down"])
  run = lambda mode: _steps(TINY, params, mode, monkeypatch, batch=batch, positions=positions,
                            attention=attention)
  ref, ref_kv, ref_names = run("off")
  got, kv, names = run("on")
  # the step's layers (the prefill, a forward without a cache, is XLA's either way)
  finish = 0 if "router only" in case else TINY.num_layers
  assert set(ref_names.values()) == {0}
  ends = 0 if router_end else finish      # the attention end with the router's logits, or not
  assert names == {"moe_router": TINY.num_layers - (finish - ends), "moe_top_k": TINY.num_layers,
                   "moe_finish": finish, "attention_end": ends,
                   "moe_router_end": finish - ends}, names
  np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * np.abs(ref).max())
  for a, b in zip(kv, ref_kv):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())


def test_bfloat16_as_accurate_as_xla(monkeypatch):
  """In bfloat16 the kernels round where the model rounds (XLA fuses elementwise ops and may
  round less; the finish kernel sums the experts in float32 as XLA's einsum). Against float32
  arithmetic on the same bf16 weights, five decode steps with the kernels are about as accurate
  as XLA's (mean relative error of the logits at most 1.2x XLA's), and the first step's greedy
  tokens are as good as XLA's (`decode_kernels.assert_greedy_as_good`)."""
  err, err_xla, got, ref, exact = dkt.bfloat16_errors(TINY, _steps, monkeypatch)
  assert err <= 1.2 * err_xla, (err, err_xla)
  dkt.assert_greedy_as_good(got[0], ref[0], exact[0])


def test_finishes(monkeypatch):
  """The layer's end is a kernel where the router's are, with FINISH, in models whose every layer
  is an MoE one, and up to a (token, expert) pair per expert (26B-A4B: 16 tokens under =on;
  the automatic switch up to FINISH_MAX_TOKENS, the measured range)."""
  cfg = config_lib.preset("gemma4_26b_a4b")
  moe = _moe_params(TINY, jnp.float32)
  params = {"layers": [{"moe": moe}] * cfg.num_layers}
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  limit = moe_kernels.FINISH_MAX_TOKENS
  assert moe_kernels.finishes(cfg, params, limit, True)
  assert not moe_kernels.finishes(cfg, params, limit + 1, True)
  assert moe_kernels.choose(cfg, moe, limit + 1, True)               # the router's kernels
  assert not moe_kernels.finishes(cfg, params, 1, False)
  monkeypatch.setenv(moe_kernels.ENV, "on")
  pairs = cfg.num_experts // cfg.num_experts_per_token
  assert moe_kernels.finishes(cfg, params, pairs, True)
  assert not moe_kernels.finishes(cfg, params, pairs + 1, True)
  assert moe_kernels.choose(cfg, moe, pairs + 1, True)              # the router's kernels
  mixed = {"layers": [{"moe": moe}, {}] * (cfg.num_layers // 2)}
  assert not moe_kernels.finishes(cfg, mixed, 1, True)
  monkeypatch.setattr(moe_kernels, "FINISH", False)
  assert not moe_kernels.finishes(cfg, params, 1, True)


def test_kernels_lower_for_the_gpu(monkeypatch):
  """A 26B-A4B-shaped bf16 decode step lowers to Triton (exported for CUDA on the CPU): four
  kernels a layer more with the MoE kernels on than off (the router's two, the layer's end, and
  the step from the o projection to the MLP's input: `ple_kernels.ATTENTION_END`)."""
  monkeypatch.setenv(decode_attention.ENV, "off")
  counts = []
  for mode in ("off", "on"):
    monkeypatch.setenv(moe_kernels.ENV, mode)
    counts.append(dkt.triton_kernels_lowered(TINY, "gemma4_26b_a4b", monkeypatch))
  (off, layers_off), (on, layers_on) = counts
  assert layers_on == layers_off and on - off == 4 * layers_on


def test_top_k_by_rank_lowers_for_the_gpu(monkeypatch):
  """The router's two kernels on 26B-A4B's shapes (128 experts, top 8, bf16) with the top k by
  rank (`TOP_K_RANKS`: [128, 128] and [8, 128] reductions) lower to Triton (exported for CUDA
  on the CPU)."""
  monkeypatch.setattr(moe_kernels, "TOP_K_RANKS", True)
  monkeypatch.setattr(moe_kernels.dk, "_interpret", lambda: False)
  cfg = config_lib.preset("gemma4_26b_a4b")
  d, e = cfg.embed_dim, cfg.num_experts
  arg = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  p = {"router": arg(d, e), "router_scale": arg(d), "expert_scale": arg(e), "pre_norm": arg(d)}
  exported = jax.export.export(
      jax.jit(lambda x, p: moe_kernels.route(x, p, cfg)), platforms=["cuda"],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
          arg(1, d), p)
  module = exported.mlir_module()
  assert module.count("xla.gpu.triton") == 2
  assert re.search(r"tensor<1x%dxi32>" % cfg.num_experts_per_token, module)


def test_shared_rows_and_mlp_lower_without_their_xla_kernels(monkeypatch):
  """A 26B-A4B-shaped bf16 decode step (MoE and expert kernels on, exported for CUDA on the CPU)
  runs the same 6 Triton kernels a layer (router 2, experts 2, finish, attention end) with
  either switch: without them, one [1, k, D] broadcast of the experts' input a layer and two
  GEMMs on the shared MLP's weights ([2816, 4224] gate|up, [2112, 2816] down); with
  `matvec.SHARED_ROWS` no broadcast, and with `moe_kernels.SHARED_MLP` neither (its calls take
  the experts' input [M, D] as it is) nor the GEMMs; with `moe_kernels.ROUTER_END` too, 5
  kernels a layer (the attention end and the router's logits one)."""
  monkeypatch.setenv(decode_attention.ENV, "off")
  monkeypatch.setenv(moe_kernels.ENV, "on")
  monkeypatch.setenv(matvec.ENV, "on")
  monkeypatch.setattr(matvec, "_interpret", lambda: False)
  cfg = config_lib.preset("gemma4_26b_a4b")
  copy = re.compile(r"broadcast_in_dim[^\n]*-> tensor<1x%dx%dxbf16>"
                    % (cfg.num_experts_per_token, cfg.embed_dim))
  gemm = re.compile(r"dot_general[^\n]*tensor<(%d|%d)x(%d|%d)xbf16>" % (
      cfg.embed_dim, cfg.mlp_dim, 2 * cfg.mlp_dim, cfg.embed_dim))
  found = {}
  for rows, mlp, end in ((False, False, False), (True, False, False), (False, True, False),
                         (False, True, True)):
    monkeypatch.setattr(matvec, "SHARED_ROWS", rows)
    monkeypatch.setattr(moe_kernels, "SHARED_MLP", mlp)
    monkeypatch.setattr(moe_kernels, "ROUTER_END", end)
    module, layers = dkt.lowered_for_cuda(TINY, "gemma4_26b_a4b", monkeypatch)
    found[rows, mlp, end] = (len(copy.findall(module)), len(gemm.findall(module)),
                             module.count("xla.gpu.triton"))
  assert found[False, False, False] == (layers, 2 * layers, 6 * layers)
  assert found[True, False, False] == (0, 2 * layers, 6 * layers)
  assert found[False, True, False] == (0, 0, 6 * layers)
  assert found[False, True, True] == (0, 0, 5 * layers)


def _spy_on_fold(monkeypatch, what) -> list:
  """`what(xn)` of each call of the fold (`moe_kernels._experts_and_mlp`) traced from now on, xn
  its experts' input."""
  seen = []
  fold = moe_kernels._experts_and_mlp
  monkeypatch.setattr(moe_kernels, "_experts_and_mlp",
                      lambda xn, *a: seen.append(what(xn)) or fold(xn, *a))
  return seen


# TINY with 32-wide experts (the expert kernels' smallest tiling) and a shared MLP of three of
# their widths, as 26B-A4B's 2112 = 3 x 704 (`moe_kernels.folds_mlp`).
FOLD = TINY.replace(expert_dim=32, mlp_dim=96)


@pytest.mark.parametrize("batch", [1, 2])
def test_shared_mlp_as_more_expert_groups(monkeypatch, batch):
  """`moe_kernels.SHARED_MLP`: the shared MLP as three more groups of the experts' two kernel
  calls gives XLA's logits and caches in float32 over five decode steps (one row, padded as on
  GPUs; and two rows, past SHARED_MLP_MAX_TOKENS, so raised for the test); without the expert
  kernels (`matvec`) or the layer's end as a kernel (`finishes`: the MoE kernels off, no
  cache), past the token limit, with experts too narrow or weights unfused, the layer keeps its
  own MLP."""
  monkeypatch.setattr(quant, "PAD_ONE_ROW_BACKENDS", (jax.default_backend(),))
  monkeypatch.setenv(matvec.ENV, "on")
  params = dkt.random_norms(dkt.fused_target(FOLD))
  ref, ref_kv, _ = _steps(FOLD, params, "off", monkeypatch, batch=batch)
  monkeypatch.setattr(moe_kernels, "SHARED_MLP", True)
  assert not moe_kernels.folds_mlp(FOLD, params, 1, True)        # the MoE kernels off
  monkeypatch.setenv(moe_kernels.ENV, "on")
  assert moe_kernels.folds_mlp(FOLD, params, 1, True)
  assert not moe_kernels.folds_mlp(FOLD, params, 2, True)
  assert not moe_kernels.folds_mlp(FOLD, params, 1, False)       # no cache: no finish kernel
  monkeypatch.setattr(moe_kernels, "SHARED_MLP_MAX_TOKENS", batch)
  assert moe_kernels.folds_mlp(FOLD, params, batch, True)
  folded = _spy_on_fold(monkeypatch, lambda xn: xn.shape)   # the layers traced with the fold
  got, kv, names = _steps(FOLD, params, "on", monkeypatch, batch=batch)
  assert names["moe_finish"] == FOLD.num_layers
  assert folded and set(folded) == {(batch, FOLD.embed_dim)}
  np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * np.abs(ref).max())
  for a, b in zip(kv, ref_kv):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())
  assert not moe_kernels.folds_mlp(TINY, dkt.fused_target(TINY), batch, True)  # 16-wide experts
  unfused = gemma_mtp.random_target(FOLD).params
  assert not moe_kernels.folds_mlp(FOLD, unfused, batch, True)
  monkeypatch.setenv(matvec.ENV, "off")
  assert not moe_kernels.folds_mlp(FOLD, params, batch, True)


def test_shared_mlp_in_bfloat16_as_accurate_as_its_own_gemms(monkeypatch):
  """In bfloat16, five decode steps of two rows (`SHARED_MLP_MAX_TOKENS` raised to take them)
  with the shared MLP folded into the experts' kernel calls are as accurate as the same kernels
  with the shared MLP's own GEMMs (the fold rounds its down projection once, after adding the
  chunks in float32), against float32 arithmetic on the same bf16 weights: mean relative
  error of the logits within 2% of theirs, and greedy tokens as good."""
  monkeypatch.setenv(matvec.ENV, "on")
  monkeypatch.setattr(moe_kernels, "SHARED_MLP_MAX_TOKENS", 2)
  cfg = FOLD.replace(dtype="bfloat16", param_dtype="bfloat16")
  params = dkt.fused_target(cfg)
  folded = _spy_on_fold(monkeypatch, lambda xn: xn.dtype)
  logits = {}
  for on in (False, True):
    monkeypatch.setattr(moe_kernels, "SHARED_MLP", on)
    logits[on] = _steps(cfg, params, "on", monkeypatch)[0]
    assert bool(folded) == on
  f32 = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params)
  exact = _steps(FOLD, f32, "off", monkeypatch)[0]
  err = {on: np.abs(x - exact).mean() / np.abs(exact).mean() for on, x in logits.items()}
  assert set(folded) == {jnp.dtype(jnp.bfloat16)}
  assert err[True] <= 1.02 * err[False], err
  dkt.assert_greedy_as_good(logits[True][0], logits[False][0], exact[0])


def test_generate_with_kernels_equals_xla(monkeypatch):
  """Plain greedy decoding (the decode loop) emits the same tokens with the MoE kernels as
  without, in float32, on two ragged prompts; speculative decoding through them still emits
  plain decoding's tokens, with chains of one draft (verification of 2 positions a row: 16
  (token, expert) pairs, so the finish kernel runs), with a draft tree of 2 nodes (a tree
  forward, its attention masked by the tree: the finish kernel too) and with one of 3 nodes (24
  pairs: the router's kernels only)."""
  traced = []                      # the layers that ran the finish kernel, by positions a row
  tail = moe_kernels.tail
  monkeypatch.setattr(moe_kernels, "tail",
                      lambda p, x1, *a, **k: traced.append(x1.shape[1]) or tail(p, x1, *a, **k))
  chain = {"draft_lengths": (1,), "adaptive": False}
  trees = [{"draft_lengths": (), "trees": (gemma_mtp.TreeSpec.parse(t),), "adaptive": False}
           for t in ("1", "2")]
  off, on, spec = dkt.generate_off_and_on(
      TINY, moe_kernels.ENV, monkeypatch, traced, speculative=(chain, *trees),
      other_env={decode_attention.ENV: "off"}, convention="clean")
  # one plain decode program, one chain and one 2-node tree verification program (switch on)
  assert sorted(traced) == [1] * TINY.num_layers + [2] * 2 * TINY.num_layers, traced
  np.testing.assert_array_equal(on, off)
  for tokens in spec:
    np.testing.assert_array_equal(tokens, on)
