"""The drafter step as Pallas kernels (drafter_kernels) against the XLA step (drafter.step).

Off the GPU the kernels run in Pallas's interpreter; on a GPU the same tests run the compiled
Triton kernels.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma_mtp
from gemma_mtp import config as config_lib
from gemma_mtp import drafter as drafter_lib
from gemma_mtp import drafter_kernels
from gemma_mtp import model as model_lib
from gemma_mtp import quant
from tests.test_speculative import agreeing_pair

# Head dims 32 / 64: the kernels need half a head to be a power of two >= 16.
TARGET = config_lib.tiny(head_dim=32, global_head_dim=64)
SLOTS = {"sliding": 13, "full": 40}   # not multiples of the kernels' chunk sizes


@pytest.fixture
def kernels_on(monkeypatch):
  monkeypatch.setenv(drafter_kernels.ENV, "on")
  jax.clear_caches()                  # programs traced with the kernels off must not be reused
  yield
  jax.clear_caches()


def _case(dtype, *, num_centroids=0, fuse=False, seed=0, target_width=None, embed_dim=32,
          mlp_dim=64):
  """(target params, drafter config, drafter params, step inputs) with random taps and masks."""
  tcfg = TARGET.replace(dtype=dtype, param_dtype=dtype)
  if target_width is not None:
    tcfg = tcfg.replace(embed_dim=target_width)
  dcfg = drafter_lib.for_target(tcfg, embed_dim=embed_dim, num_heads=4, mlp_dim=mlp_dim,
                                num_centroids=num_centroids, centroid_top_k=4)
  tp = gemma_mtp.random_target(tcfg, seed=seed).params
  dp = drafter_lib.init_params(dcfg, jax.random.PRNGKey(seed + 1))
  if fuse:
    dp = model_lib.fuse_projections(dp, dcfg.as_decoder())
    assert "gate_up" in dp["layers"][0]["mlp"]
  rng = np.random.default_rng(seed)
  taps, masks = {}, {}
  b = 2
  for kind, slots in SLOTS.items():
    full = kind == "full"
    kv = dcfg.num_global_kv_heads if full else dcfg.num_kv_heads
    hd = dcfg.global_head_dim if full else dcfg.head_dim
    k, v = (jnp.asarray(rng.normal(size=(b, slots, kv, hd)), dtype) for _ in range(2))
    taps[kind] = model_lib.Tap(k=k, v=v, idx=jnp.zeros((b, slots), jnp.int32))
    masks[kind] = jnp.asarray(rng.random((b, slots)) < 0.6).at[:, 0].set(True)
  inputs = dict(token=jnp.array([3, 200], jnp.int32),
                hidden=jnp.asarray(rng.normal(size=(b, tcfg.embed_dim)), dtype),
                query_pos=jnp.array([17, 5], jnp.int32), taps=taps, masks=masks)
  return tcfg, tp, dcfg, dp, inputs


def _both(tcfg, tp, dcfg, dp, inputs):
  """(XLA logits, XLA hidden, kernel logits, kernel hidden) as float32 numpy arrays; XLA's float32
  matmuls at full precision (a GPU's default is TF32)."""
  with jax.default_matmul_precision("float32"):
    ref = drafter_lib.step(dp, dcfg, target_params=tp, target_config=tcfg, **inputs)
    stepper = drafter_kernels.Stepper(dp, dcfg, tp, tcfg, inputs["taps"], inputs["masks"],
                                      inputs["query_pos"], head=drafter_lib.head)
    got = jax.jit(stepper.__call__)(inputs["token"], inputs["hidden"])
  return [np.asarray(x, np.float32) for x in (*ref, *got)]


@pytest.mark.parametrize("fuse,attention", [(False, "one range"), (True, "one range"),
                                             (False, "ranges"), (False, "looped ranges"),
                                             (False, "combined ranges"),
                                             (False, "capped ranges")])
def test_step_equals_xla_step_float32(kernels_on, monkeypatch, fuse, attention):
  """In float32 only the summation order differs. Attention over the cache: one range per head
  (these short caches by default); 4-slot chunks, so 2-8 ranges per head combined by the o
  kernel, some past the cache's end (empty); the same with each program walking its chunks
  in a loop (the path of long caches); with a tile so small that an o program would take in a
  tile of partials, so a combine kernel merges every layer's ranges (COMBINE); and the same
  tile without it, the ranges capped to what an o program holds (one per full-attention head).
  """
  if attention != "one range":
    monkeypatch.setattr(drafter_kernels, "SLOTS_PER_CHUNK", 4)
  if attention == "ranges":
    assert drafter_kernels._ranges(SLOTS["full"], 64, 4) == (4, 10, 8, False)
  if attention == "looped ranges":
    monkeypatch.setattr(drafter_kernels, "UNROLL", 1)
  if attention in ("combined ranges", "capped ranges"):
    monkeypatch.setattr(drafter_kernels, "TILE", 256)
    combine = attention == "combined ranges"
    monkeypatch.setattr(drafter_kernels, "COMBINE", combine)
    assert drafter_kernels._ranges(SLOTS["full"], 64, 4) == (4, 10, 8 if combine else 1, combine)
    assert drafter_kernels._ranges(SLOTS["sliding"], 32, 4) == (4, 4, 2, combine)
  ref_logits, ref_h, logits, h = _both(*_case("float32", fuse=fuse))
  np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=2e-5 * np.abs(ref_logits).max())
  np.testing.assert_allclose(h, ref_h, rtol=0, atol=2e-5 * np.abs(ref_h).max())


def test_wide_shapes_split_projections_float32(kernels_on, monkeypatch):
  """Widths that are multiples of 16 but not powers of two (target 96, drafter 48, MLP 96, like
  the released assistants' 1536-5376-wide targets), with small tiles: the pre-projection, o and
  down kernels split their contractions in parts that the next kernel adds (pre: 2 parts of e
  and 2 of h; o: one head a part; down: 2 parts), and a q program computes 16 columns of a 32-
  or 64-wide head, which the attention kernel q-norms and rotates."""
  monkeypatch.setattr(drafter_kernels, "TILE", 768)
  monkeypatch.setattr(drafter_kernels, "SPLIT_AT", 512)
  case = _case("float32", target_width=96, embed_dim=48, mlp_dim=96)
  tcfg, dcfg = case[0], case[2]
  assert drafter_kernels._pre_split(dcfg) == (2, 48, 16)
  assert drafter_kernels._cols(dcfg.num_heads * dcfg.head_dim, dcfg.embed_dim) == 16
  assert drafter_kernels._o_split(dcfg, dcfg.head_dim) == (4, 1, 16)
  assert drafter_kernels._down_split(dcfg) == (2, 48, 16)
  assert drafter_kernels.supported(case[3], dcfg, case[1], tcfg) is None
  ref_logits, ref_h, logits, h = _both(*case)
  np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=2e-5 * np.abs(ref_logits).max())
  np.testing.assert_allclose(h, ref_h, rtol=0, atol=2e-5 * np.abs(ref_h).max())


def test_released_assistants_supported():
  """Every released assistant fits the kernels (widths in multiples of 16, no program over
  MAX_WEIGHTS weights); the automatic switch takes the 256-wide ones (E2B, E4B) only."""
  for name in ("e2b", "e4b", "31b", "26b_a4b"):
    dcfg = getattr(drafter_lib, f"gemma4_{name}_assistant")()
    tcfg = getattr(config_lib, f"gemma4_{name}")()
    specs = jax.eval_shape(lambda: drafter_lib.init_params(dcfg, jax.random.PRNGKey(0)))
    target = {"embed": jax.ShapeDtypeStruct((tcfg.vocab_size, tcfg.embed_dim), jnp.bfloat16)}
    assert drafter_kernels.supported(specs, dcfg, target, tcfg) is None, name
    halves, rows, bn = drafter_kernels._pre_split(dcfg)
    assert rows * bn <= drafter_kernels.SPLIT_AT and halves * rows == tcfg.embed_dim, name
    assert (dcfg.embed_dim <= drafter_kernels.AUTO_MAX_WIDTH) == (name in ("e2b", "e4b")), name


@pytest.mark.parametrize("name", ["tiny", "wide", "e2b", "e4b", "31b", "26b_a4b",
                                  "e2b_no_combine", "e4b_no_combine"])
def test_kernels_lower_for_the_gpu(monkeypatch, name):
  """The step lowers to Triton (Pallas's GPU lowering, run here on the CPU by exporting for
  CUDA): every load and store a power of two, every operation one Triton takes; for the tiny
  and wide test shapes and every released assistant on a 1k-slot full-attention tap (E2B's and
  E4B's every layer with a combine kernel, COMBINE), and E2B's and E4B's without COMBINE. What
  is not checked here is Triton's own compilation of that IR, which needs a GPU."""
  monkeypatch.setattr(drafter_kernels, "_interpret", lambda: False)
  combine = not name.endswith("_no_combine")
  name = name.removesuffix("_no_combine")
  monkeypatch.setattr(drafter_kernels, "COMBINE", combine)
  sds = jax.ShapeDtypeStruct
  if name in ("tiny", "wide"):
    tcfg, _, dcfg, _, _ = _case("bfloat16", **({} if name == "tiny" else
                                                dict(target_width=96, embed_dim=48, mlp_dim=96)))
    slots = SLOTS
  else:
    dcfg = getattr(drafter_lib, f"gemma4_{name}_assistant")()
    tcfg = getattr(config_lib, f"gemma4_{name}")()
    slots = {"sliding": tcfg.sliding_window, "full": 1024}
  bf16 = lambda x: sds(x.shape, jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x
  dp = jax.tree_util.tree_map(bf16, jax.eval_shape(
      lambda: drafter_lib.init_params(dcfg, jax.random.PRNGKey(0))))
  tp = {"embed": sds((tcfg.vocab_size, tcfg.embed_dim), jnp.bfloat16)}
  dec = dcfg.as_decoder()
  taps = {}
  for i, kind in enumerate(dcfg.layer_types):
    shape = (1, slots[kind], dec.layer_kv_heads(i), dec.layer_head_dim(i))
    taps[kind] = (sds(shape, jnp.bfloat16), sds(shape, jnp.bfloat16), sds(shape[:2], jnp.bool_))
  assert drafter_kernels.supported(dp, dcfg, tp, tcfg) is None

  def step(dp, tp, taps, query_pos, token, hidden):
    stepper = drafter_kernels.Stepper(
        dp, dcfg, tp, tcfg, {kind: model_lib.Tap(k=k, v=v, idx=None) for kind, (k, v, _) in
                             taps.items()},
        {kind: m for kind, (_, _, m) in taps.items()}, query_pos, head=drafter_lib.head)
    return stepper(token, hidden)

  exported = jax.export.export(
      jax.jit(step), platforms=["cuda"],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
          dp, tp, taps, sds((1,), jnp.int32), sds((1,), jnp.int32),
          sds((1, tcfg.embed_dim), jnp.bfloat16))
  combined = sum(drafter_kernels._ranges(
      slots[kind], dec.layer_head_dim(i), drafter_kernels._o_split(dcfg, dec.layer_head_dim(i))[1]
  )[3] for i, kind in enumerate(dcfg.layer_types))
  if name in ("e2b", "e4b"):
    assert combined == (dcfg.num_layers if combine else 0)
  if name in ("tiny", "wide"):
    assert combined == 0                  # one range per head
  kernels = 5 * dcfg.num_layers + 2 + (0 if dcfg.num_centroids else 1) + combined
  assert exported.mlir_module().count("xla.gpu.triton") == kernels


def test_bench_drafter_loop_times_the_kernels(monkeypatch):
  """`bench.drafter_loop` (the adaptive rule's measured draft cost, the benchmark's drafter
  column) runs the step `drafter.draft` runs: the kernels when they are on, and the same
  tokens and state as the XLA step."""
  from gemma_mtp import bench  # pylint: disable=g-import-not-at-top
  tcfg, tp, dcfg, dp, _ = _case("float32")
  cache = bench.synthetic_cache(tcfg, 2, 24)
  tok, hid = jnp.array([3, 7], jnp.int32), jnp.ones((2, tcfg.embed_dim), jnp.float32)
  out, kernels = {}, {}
  for mode in ("on", "off"):
    monkeypatch.setenv(drafter_kernels.ENV, mode)
    jax.clear_caches()
    run = lambda: bench.drafter_loop(dp, tp, cache, tok, hid, jnp.int32(3), tcfg=tcfg, dcfg=dcfg)
    kernels[mode] = "pallas_call" in str(jax.make_jaxpr(run)())
    with jax.default_matmul_precision("float32"):
      out[mode] = run()
  jax.clear_caches()
  assert kernels == {"on": True, "off": False}
  np.testing.assert_array_equal(out["on"][0], out["off"][0])
  np.testing.assert_allclose(out["on"][1], out["off"][1], rtol=0,
                             atol=2e-5 * np.abs(out["off"][1]).max())


def _as_float32(tree):
  return jax.tree_util.tree_map(
      lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x, tree)


def test_step_in_bfloat16_as_accurate_as_xla_step(kernels_on):
  """In bfloat16 the kernels round where the XLA step rounds, but not every intermediate the
  same way (XLA fuses elementwise ops; the softmax's probabilities are rounded before the value
  product there, after it here). Measured against float32 arithmetic on the same bf16 values,
  the kernels' step is at least as accurate as the XLA step (here 2.6% vs 3.2% mean relative
  error of the logits after 4 layers), and close to it."""
  tcfg, tp, dcfg, dp, inputs = _case("bfloat16")
  ref_logits, ref_h, logits, h = _both(tcfg, tp, dcfg, dp, inputs)
  f32 = dict(dtype="float32", param_dtype="float32")
  with jax.default_matmul_precision("float32"):
    exact = drafter_lib.step(
        _as_float32(dp), dcfg.replace(**f32), target_params=_as_float32(tp),
        target_config=tcfg.replace(**f32),
        **{**inputs, "hidden": inputs["hidden"].astype(jnp.float32),
           "taps": {kind: t.replace(k=t.k.astype(jnp.float32), v=t.v.astype(jnp.float32))
                    for kind, t in inputs["taps"].items()}})
  rel = lambda a, b: np.abs(a - b).mean() / np.abs(b).mean()
  for got, ref, ex in ((logits, ref_logits, exact[0]), (h, ref_h, exact[1])):
    ex = np.asarray(ex)
    assert rel(got, ex) <= 1.1 * rel(ref, ex), (rel(got, ex), rel(ref, ex))
    assert rel(got, ref) <= 0.04, rel(got, ref)


def test_centroid_head_stays_in_xla(kernels_on):
  ref_logits, ref_h, logits, h = _both(*_case("float32", num_centroids=16))
  np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=2e-5 * np.abs(ref_logits).max())
  np.testing.assert_allclose(h, ref_h, rtol=0, atol=2e-5 * np.abs(ref_h).max())


def test_speculative_with_kernels_equals_plain_and_xla_drafts(monkeypatch):
  """Greedy speculative decoding through the kernels is plain greedy decoding, with the same
  acceptance as the XLA drafter step (float32: the same drafts)."""
  target, drafter = agreeing_pair(TARGET, residual_scale=0.8)
  keys = jax.random.split(jax.random.PRNGKey(3), 2)
  for layer in drafter.params["layers"]:   # attention and FFN outputs that matter, but not much
    layer["attn"]["o"] = 0.02 * jax.random.normal(keys[0], layer["attn"]["o"].shape)
    layer["mlp"]["down"] = 0.02 * jax.random.normal(keys[1], layer["mlp"]["down"].shape)
  prompts = [list(range(5, 16)), [3, 4], [100, 101, 102, 103, 104]]
  ref = gemma_mtp.generate(target, prompts, max_new_tokens=40).tokens
  stats = {}
  for mode in ("on", "off"):
    monkeypatch.setenv(drafter_kernels.ENV, mode)
    jax.clear_caches()
    out = gemma_mtp.generate(target, prompts, max_new_tokens=40, drafter=drafter,
                             draft_lengths=(3,), adaptive=False)
    assert out.tokens == ref, mode
    stats[mode] = [out.stats[k] for k in ("accepted", "drafted", "acceptance_by_position")]
  jax.clear_caches()
  assert stats["on"] == stats["off"]
  assert stats["on"][0] > 10, stats     # drafts are accepted, so their values are compared


def test_supported_and_enabled(monkeypatch):
  tcfg, tp, dcfg, dp, _ = _case("float32")
  assert drafter_kernels.supported(dp, dcfg, tp, tcfg) is None
  int8 = {**dp, "pre_proj": quant.quantize(dp["pre_proj"], (0,))}
  assert drafter_kernels.supported(int8, dcfg, tp, tcfg) == "int8 weights"
  small = drafter_lib.for_target(config_lib.tiny(), embed_dim=32, num_heads=4, mlp_dim=40)
  reason = drafter_kernels.supported(drafter_lib.init_params(small, jax.random.PRNGKey(0)),
                                     small, gemma_mtp.random_target(config_lib.tiny()).params,
                                     config_lib.tiny())
  assert "MLP width 40 (not a multiple of 16)" in reason and "head dim 16 (half" in reason
  wide = dcfg.replace(embed_dim=2048)
  assert "drafter width 2048 > 1024" in drafter_kernels.supported(dp, wide, tp, tcfg)
  # An FFN of 16 x 2049 rows cannot split its down projection into parts: too much a program.
  odd = dcfg.replace(mlp_dim=16 * 2049)
  assert "a down program would read 524544 weights" in drafter_kernels.supported(dp, odd, tp,
                                                                                 tcfg)
  monkeypatch.setenv(drafter_kernels.ENV, "off")
  assert not drafter_kernels.enabled()
  assert not drafter_kernels.choose(dp, dcfg, tp, tcfg)
  assert drafter_kernels.why_not(dp, dcfg, tp, tcfg) == "GEMMA_MTP_DRAFTER_KERNELS is off"
  monkeypatch.setenv(drafter_kernels.ENV, "on")
  assert drafter_kernels.enabled()
  assert drafter_kernels.choose(dp, dcfg, tp, tcfg)
  assert drafter_kernels.why_not(dp, dcfg, tp, tcfg) is None
  assert not drafter_kernels.choose(int8, dcfg, tp, tcfg)
  assert drafter_kernels.why_not(int8, dcfg, tp, tcfg) == "not supported: int8 weights"
  monkeypatch.setenv(drafter_kernels.ENV, "sometimes")
  with pytest.raises(ValueError, match="GEMMA_MTP_DRAFTER_KERNELS must be auto, on or off"):
    drafter_kernels.enabled()
  # The automatic switch (here forced on, as on one GPU) takes narrow drafters only.
  monkeypatch.setenv(drafter_kernels.ENV, "auto")
  monkeypatch.setattr(drafter_kernels, "enabled", lambda: True)
  assert drafter_kernels.choose(dp, dcfg, tp, tcfg)
  monkeypatch.setattr(drafter_kernels, "AUTO_MAX_WIDTH", dcfg.embed_dim // 2)
  assert not drafter_kernels.choose(dp, dcfg, tp, tcfg)
  assert "takes drafters at most 16 wide" in drafter_kernels.why_not(dp, dcfg, tp, tcfg)
  monkeypatch.setenv(drafter_kernels.ENV, "on")
  assert drafter_kernels.choose(dp, dcfg, tp, tcfg)
