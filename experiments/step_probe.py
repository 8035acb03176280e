r"""Where the time of one batch-1 decode step goes, and what the fused layout saves (issue 6, run O).

  python experiments/step_probe.py --out=$OUT/step_probe.json --trace_dir=/tmp/traces

For each model (random bf16 weights, batch 1, context 1k) and each parameter layout:
  checkpoint  q, k, v and gate, up as separate matmuls (the layout checkpoints store);
  fused       `model.fuse_projections`: one q|k|v and one gate|up matmul per layer;
  fused_pad   fused, with every one-row matmul padded to two rows whatever the weight's size
              (`quant.PAD_MAX_WEIGHT_SIZE` lifted: a fused gate|up is above it on E4B);
  fused_copy  fused, one-row matmuls padded with a copy of the row (a broadcast XLA can fuse
              into the GEMM) instead of a row of zeros (a pad kernel of its own; run AI);
  fused_nopad fused, no one-row matmul padded (with XLA_FLAGS=--xla_gpu_enable_dot_strength_
              reduction=false XLA keeps one-row matmuls as GEMMs instead of multiply + reduce;
              jax 0.11.2's XLA does not know that flag);
  fused_cudnn fused, attention through `jax.nn.dot_product_attention(implementation='cudnn')`
              (cuDNN's fused kernel where it takes the shapes: bf16, head dim <= 256; other
              layers keep `layers.attention`) instead of the explicit einsum / softmax / einsum
              (5 kernels per layer at batch 1); its decode logits are compared with the
              library's (`attention_check`: one decode step after a 256-token prefill).
              Run U: slower (E4B 4.96 vs 4.03 ms, 26B-A4B 5.19 vs 3.97: one flash kernel of
              ~30-55 us per layer against ~8 us of XLA's kernels) and its logits differ from
              the library's (E4B by up to 1.3 on logits of 4.5, another greedy token), so
              not adopted and not looked into further;
  fused_attn_off  fused, the attention through the cache through XLA's ops instead of
              `decode_attention`'s two kernels a layer (the library's default on one GPU since
              session 19 for decode steps, since session 21 also for verification forwards;
              before, the `fused` entries of the committed records are this);
  fused_attn_on   fused, those kernels at any batch and up to 16 positions a row (the automatic
              switch takes batches <= 4, and <= 5 positions in models of <= 8 query heads);
  fused_attn_range1 / _range2 / _range4  fused, the attention kernel's programs reading about
              1 / 2 / 4 cache chunks each (`decode_attention.RANGE_CHUNKS`: 1 since session
              22, 2 before: runs BG and BU's `fused` entries are range2);
  fused_attn_own  fused, the forward's own tokens as a range of their own in the attention
              kernels at any positions a row, decode steps too
              (`decode_attention.OWN_RANGE_MIN_POSITIONS` 1; session 24; runs CD, CF. Before
              session 25 the library had none, so earlier `fused` entries are `fused_attn_no_own`,
              and runs CD and CF's `fused_attn_own` entries are this variant);
  fused_attn_no_own  fused, the forward's own tokens always in range 0 (the library before
              session 25);
  fused_attn_warps8  fused, the several-positions attention kernel with 8 warps a program
              instead of 4 (`decode_attention.POSITIONS_WARPS`; run CD: slower);
  fused_attn_own_warps8  both own-range and 8 warps;
  fused_ple_off   fused, the end of each PLE layer (E2B, E4B) through XLA's ops instead of
              `ple_kernels`' three kernels a layer (the default on one GPU since session 20;
              before it, the `fused` entries of the committed records are this);
  fused_ple_on    fused, those kernels at any batch;
  fused_ple_split2  fused, the PLE gate kernel's contraction in twice as many parts as the
              library's (`ple_kernels.GATE_PARTS`; in run BJ's record: 2 parts against 1);
  (run CS's fused_fold_down1, fused_fold_split1 and fused_fold_split2_1 split the shared-MLP
  fold's contractions (gate|up, down) (block_config's, 1), (1, 1) and (2, 1) ways instead of
  block_config's (11, 11), each slower on 26B-A4B, so their switch was removed, NOTES;
  run CG's fused_moe_fold and fused_moe_fold_split1 measured the routed experts' MLP as two
  kernel calls with nothing between them, removed after it as slower on 26B-A4B, NOTES;
  runs BJ and BK's `fused` entries and their variants fused_ple_xla_o, fused_o32 and
  fused_o128 measured the PLE layers' o projection and the norms after it as two kernels more,
  removed after them as slower on E4B, NOTES; their `fused_ple_xla_o` is the library's step
  since);
  fused_moe_off   fused, the MoE router (26B-A4B) through XLA's ops instead of `moe_kernels`'
              two kernels a layer (the default on one GPU since session 22; before it, the
              `fused` entries of the committed records are this);
  fused_moe_on    fused, those kernels at any number of tokens (and the MoE layer's end as
              a kernel up to a (token, expert) pair per expert; `moe_kernels.finishes`);
  fused_moe_finish_off  fused, the MoE layer's end after the experts through XLA's ops
              instead of `moe_kernels`' finish kernel (`moe_kernels.FINISH`; the default since
              session 23; before it, the `fused` entries of the committed records are this);
  fused_moe_shared_rows  fused, a token's routed experts reading its row in place instead of a
              copy of it per (token, expert) pair (`matvec.SHARED_ROWS`; session 29);
  fused_moe_shared_mlp  fused, the shared MLP as three more groups of the routed experts' two
              kernel calls where the layer ends with the finish kernel
              (`moe_kernels.SHARED_MLP`; session 30; the library's since run CR);
  fused_moe_shared_mlp_off  fused, the shared MLP through XLA's GEMMs (the library before
              session 30: until then the `fused` entries are this);
  fused_moe_shared_both  fused_moe_shared_rows and fused_moe_shared_mlp together;
  fused_top_k_ranks  fused, the router's top k by rank (`moe_kernels.TOP_K_RANKS`; session 31;
              run CS: a tie);
  fused_attn_block_norms  fused, the several-positions attention kernel's norms as rows of a
              block (`decode_attention.BLOCK_NORMS`; session 32);
  fused_moe_router_end  fused, the step from the o projection to the MLP's input and the
              router's logits as one kernel where the MoE layer ends with the finish kernel
              (`moe_kernels.ROUTER_END`; session 32);
  fused_attn_end  fused, where a layer ends with a tail kernel (PLE or MoE) the step from the o
              projection to the MLP's input as one kernel too (`ple_kernels.ATTENTION_END`;
              session 25; the library's since session 26, after runs CG, CH and CH2: until then
              the `fused` entries are `fused_no_attn_end`);
  fused_no_attn_end  fused, that step through XLA's ops (the library before session 26);
  fused_rms1      fused, every Pallas kernel's RMS norms as one block reduction each instead
              of one a chunk (`drafter_kernels.RMS_ONE_REDUCTION`);
  fused_xla       fused, none of these kernels (the library's step before session 19; the MoE
              router's kernels off too since session 22);
  fused_all_on    fused, all of them at any batch;
the per-step time (slope of a short and a long run of the decode loop, as the benchmark), one
verification of 5 positions (`--verify_positions`), and a profiler trace of `--profile_steps`
steps summarized per step (`bench.kernel_profile`: kernels per step, time the device is busy,
the gaps between kernels, the costliest kernels, the kernels of one step in order). Run once
more under `XLA_FLAGS` to compare compiler options (the flags are recorded with the
environment).
"""

import functools
import gzip
import os
import pathlib
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from gemma_mtp import bench
from gemma_mtp import config as config_lib
from gemma_mtp import decode_attention
from gemma_mtp import drafter_kernels
from gemma_mtp import layers
from gemma_mtp import matvec
from gemma_mtp import model as model_lib
from gemma_mtp import moe_kernels
from gemma_mtp import params as params_lib
from gemma_mtp import ple_kernels
from gemma_mtp import quant

_OUT = flags.DEFINE_string("out", "step_probe.json", "JSON record")
_TRACE_DIR = flags.DEFINE_string("trace_dir", "/tmp/step_probe_traces", "profiler traces")
_MODELS = flags.DEFINE_list("models", ["gemma4_e4b", "gemma4_26b_a4b", "gemma4_31b",
                                       "gemma4_e2b"], "models, in order")
_VARIANTS = flags.DEFINE_list("variants", ["checkpoint", "fused", "fused_pad"], "layouts")
_VERIFY = flags.DEFINE_list("verify_models", ["gemma4_e4b", "gemma4_31b"],
                            "models also timed verifying --verify_positions positions")
_VERIFY_T = flags.DEFINE_list("verify_positions", ["5"], "positions of each verification timed")
_CONTEXT = flags.DEFINE_integer("context", 1024, "decode context")
_BATCH = flags.DEFINE_integer("batch", 1, "decode batch (rows)")
_SHORT = flags.DEFINE_integer("short", 16, "short loop")
_LONG = flags.DEFINE_integer("long", 64, "long loop")
_PROFILE_STEPS = flags.DEFINE_integer("profile_steps", 8, "steps in the profiled run (0: none)")
_HLO_DIR = flags.DEFINE_string("hlo_dir", None, "if set: each batch-1 decode program's optimized "
                               "HLO, gzipped, as <model>_<variant>.hlo.txt.gz (for reading; "
                               "it names the machine's files, so not for committing)")

_LIBRARY_PAD_MAX = quant.PAD_MAX_WEIGHT_SIZE
_LIBRARY_PAD_BACKENDS = quant.PAD_ONE_ROW_BACKENDS
_LIBRARY_ATTENTION = layers.attention
_LIBRARY_PAD_ROWS = quant.PAD_ROWS_WITH
_LIBRARY_ATTN_SWITCH = os.environ.get(decode_attention.ENV, "auto")
_LIBRARY_RANGE_CHUNKS = decode_attention.RANGE_CHUNKS
_LIBRARY_OWN_RANGE = decode_attention.OWN_RANGE_MIN_POSITIONS
_LIBRARY_POSITIONS_WARPS = decode_attention.POSITIONS_WARPS
_LIBRARY_PLE_SWITCH = os.environ.get(ple_kernels.ENV, "auto")
_LIBRARY_MOE_SWITCH = os.environ.get(moe_kernels.ENV, "auto")
_LIBRARY_GATE_PARTS = ple_kernels.GATE_PARTS
_LIBRARY_MOE_FINISH = moe_kernels.FINISH
_LIBRARY_ATTENTION_END = ple_kernels.ATTENTION_END
_LIBRARY_RMS_ONE = drafter_kernels.RMS_ONE_REDUCTION
_LIBRARY_SHARED_ROWS = matvec.SHARED_ROWS
_LIBRARY_SHARED_MLP = moe_kernels.SHARED_MLP
_LIBRARY_TOP_K_RANKS = moe_kernels.TOP_K_RANKS
_LIBRARY_ROUTER_END = moe_kernels.ROUTER_END
_LIBRARY_BLOCK_NORMS = decode_attention.BLOCK_NORMS
_CUDNN_CALLS = {"cudnn": 0, "library": 0}


def _cudnn_attention(q, k, v, mask):
  """`layers.attention` through cuDNN's fused attention (scale 1: Gemma 4's QK-norm) where
  `jax.nn.dot_product_attention` takes the shapes, else the library's."""
  try:
    out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=1.0,
                                       implementation="cudnn")
  except (NotImplementedError, ValueError, RuntimeError):   # shapes or dtype cuDNN does not take
    _CUDNN_CALLS["library"] += 1
    return _LIBRARY_ATTENTION(q, k, v, mask)
  _CUDNN_CALLS["cudnn"] += 1
  return out


def _set_variant(variant: str):
  quant.PAD_MAX_WEIGHT_SIZE = (1 << 62) if variant == "fused_pad" else _LIBRARY_PAD_MAX
  quant.PAD_ONE_ROW_BACKENDS = () if variant == "fused_nopad" else _LIBRARY_PAD_BACKENDS
  layers.attention = _cudnn_attention if variant == "fused_cudnn" else _LIBRARY_ATTENTION
  quant.PAD_ROWS_WITH = "copy" if variant == "fused_copy" else _LIBRARY_PAD_ROWS
  # fused_attn_off: the one-position attention through XLA's ops, not decode_attention's kernels
  os.environ[decode_attention.ENV] = {"fused_attn_off": "off", "fused_attn_on": "on",
                                      "fused_xla": "off", "fused_all_on": "on"}.get(
      variant, _LIBRARY_ATTN_SWITCH)
  decode_attention.RANGE_CHUNKS = {"fused_attn_range1": 1, "fused_attn_range2": 2,
                                   "fused_attn_range4": 4}.get(
      variant, _LIBRARY_RANGE_CHUNKS)
  decode_attention.OWN_RANGE_MIN_POSITIONS = {"fused_attn_own": 1, "fused_attn_own_warps8": 1,
                                              "fused_attn_no_own": None}.get(
      variant, _LIBRARY_OWN_RANGE)
  decode_attention.POSITIONS_WARPS = 8 if variant in ("fused_attn_warps8",
                                                      "fused_attn_own_warps8") else (
      _LIBRARY_POSITIONS_WARPS)
  ple_kernels.GATE_PARTS = _LIBRARY_GATE_PARTS * (2 if variant == "fused_ple_split2" else 1)
  # fused_ple_off: the end of a PLE layer through XLA's ops, not ple_kernels' kernels
  os.environ[ple_kernels.ENV] = {"fused_ple_off": "off", "fused_ple_on": "on",
                                 "fused_xla": "off", "fused_all_on": "on"}.get(
      variant, _LIBRARY_PLE_SWITCH)
  # fused_moe_off: the MoE router through XLA's ops, not moe_kernels' two kernels a layer
  os.environ[moe_kernels.ENV] = {"fused_moe_off": "off", "fused_moe_on": "on",
                                 "fused_xla": "off", "fused_all_on": "on"}.get(
      variant, _LIBRARY_MOE_SWITCH)
  moe_kernels.FINISH = _LIBRARY_MOE_FINISH and variant != "fused_moe_finish_off"
  matvec.SHARED_ROWS = _LIBRARY_SHARED_ROWS or variant in ("fused_moe_shared_rows",
                                                           "fused_moe_shared_both")
  moe_kernels.SHARED_MLP = (_LIBRARY_SHARED_MLP or variant in (
      "fused_moe_shared_mlp", "fused_moe_shared_both")) and variant != "fused_moe_shared_mlp_off"
  moe_kernels.TOP_K_RANKS = variant == "fused_top_k_ranks" or _LIBRARY_TOP_K_RANKS
  moe_kernels.ROUTER_END = variant == "fused_moe_router_end" or _LIBRARY_ROUTER_END
  decode_attention.BLOCK_NORMS = variant == "fused_attn_block_norms" or _LIBRARY_BLOCK_NORMS
  ple_kernels.ATTENTION_END = (_LIBRARY_ATTENTION_END or variant == "fused_attn_end") and (
      variant != "fused_no_attn_end")
  # fused_rms1: every kernel's norms as one block reduction (`drafter_kernels.RMS_ONE_REDUCTION`)
  drafter_kernels.RMS_ONE_REDUCTION = variant == "fused_rms1" or _LIBRARY_RMS_ONE


def attention_check(cfg, params) -> dict:
  """One batch-1 decode step after a 256-token prefill, its attention through cuDNN and through
  `layers.attention`: the logits' largest difference and the greedy tokens."""
  _CUDNN_CALLS.update(cudnn=0, library=0)
  tokens = jax.random.randint(jax.random.PRNGKey(3), (1, 257), 0, cfg.vocab_size)
  _, cache = jax.jit(functools.partial(model_lib.prefill, config=cfg, max_len=320, max_chunk=1))(
      params, tokens[:, :256], jnp.zeros((1,), jnp.int32))
  logits = {}
  for variant in ("fused", "fused_cudnn"):
    _set_variant(variant)
    step = jax.jit(lambda p, c: model_lib.forward(p, tokens[:, 256:], config=cfg, cache=c).logits)
    logits[variant] = jax.device_get(step(params, cache)).astype("float32")[0, -1]
  _set_variant("fused")
  ref, got = logits["fused"], logits["fused_cudnn"]
  return {"max_abs_logit_diff": float(abs(got - ref).max()),
          "logit_scale": float(abs(ref).max()),
          "greedy_equal": bool(ref.argmax() == got.argmax()),
          "attention_calls": dict(_CUDNN_CALLS)}


def _measure(model: str, variant: str, cfg, params) -> list[dict]:
  _set_variant(variant)
  vcfg = bench.variant_config(cfg, variant)
  cases = [bench.DecodeCase(_BATCH.value, _CONTEXT.value)]
  if model in _VERIFY.value:
    cases += [bench.DecodeCase(_BATCH.value, _CONTEXT.value, chunk=int(t))
              for t in _VERIFY_T.value]
  entries = []
  try:
    for case in cases:
      t0 = time.perf_counter()
      prog = bench.lower_decode(params, vcfg, case, _LONG.value)
      compile_s = time.perf_counter() - t0
      t = bench.time_decode(prog, params, vcfg, case, short=_SHORT.value, long=_LONG.value,
                            repeats=3)
      e = bench.summarize_decode(cfg, case, t, 1.0, params=params)
      e.pop("bandwidth_fraction")
      e.update(variant=variant, compile_s=compile_s,
               # which kernels this forward ran (the switches' decisions under the variant)
               attention_kernels=decode_attention.choose(vcfg, case.batch, case.chunk, True,
                                                         None),
               ple_kernels=ple_kernels.choose(vcfg, params, case.batch, case.chunk, True, None),
               moe_kernels=any(moe_kernels.choose(vcfg, lp["moe"], case.batch * case.chunk,
                                                  True) for lp in params["layers"] if "moe" in lp),
               moe_finish=moe_kernels.finishes(vcfg, params, case.batch * case.chunk, True),
               moe_shared_rows=matvec.SHARED_ROWS,
               moe_shared_mlp=moe_kernels.folds_mlp(vcfg, params, case.batch * case.chunk,
                                                    True),
               moe_top_k_ranks=moe_kernels.TOP_K_RANKS,
               moe_router_end=moe_kernels.ROUTER_END and ple_kernels.ATTENTION_END
               and moe_kernels.finishes(vcfg, params, case.batch * case.chunk, True),
               attention_end=ple_kernels.ATTENTION_END,
               attention_own_range=decode_attention.choose(vcfg, case.batch, case.chunk, True,
                                                           None)
               and decode_attention.own_range(case.chunk),
               attention_positions_warps=decode_attention.POSITIONS_WARPS,
               attention_block_norms=decode_attention.BLOCK_NORMS and case.chunk > 1
               and decode_attention.choose(vcfg, case.batch, case.chunk, True, None))
      if case.chunk == 1 and _HLO_DIR.value:
        path = pathlib.Path(_HLO_DIR.value) / f"{model}_{variant}.hlo.txt.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(gzip.compress(prog.as_text().encode()))
      if _PROFILE_STEPS.value:   # (a verification's forwards too, since session 22)
        e["profile"] = _profile(prog, params, vcfg, case, f"{model}_{variant}_{case.name}")
      entries.append(e)
      print(model, variant, case.name, f"{e['ms_per_step']:.3f} ms",
            e.get("profile", {}).get("kernels_per_step"), flush=True)
      del prog
  finally:
    _set_variant("fused")
  return entries


def _profile(prog, params, cfg, case, name) -> dict:
  n = _PROFILE_STEPS.value
  max_len = case.context + _LONG.value + case.chunk
  holder = {"cache": jax.jit(lambda: bench.synthetic_cache(cfg, case.batch, max_len,
                                                           case.chunk))()}
  tok = jnp.ones((case.batch,), jnp.int32)

  def run():
    cache, _ = prog(params, holder["cache"], tok, jnp.int32(case.context - n), jnp.int32(n))
    holder["cache"] = jax.block_until_ready(cache)

  res = bench.kernel_profile(run, n, f"{_TRACE_DIR.value}/{name}", sequence=True)
  del holder["cache"]
  return res


def model_entries(model: str) -> list[dict]:
  cfg = config_lib.PRESETS[model]()
  params = bench.random_params(params_lib.param_specs(cfg), cfg, jax.random.PRNGKey(0))
  entries = []
  if "checkpoint" in _VARIANTS.value:
    entries += _measure(model, "checkpoint", cfg, params)
  # Donated: the checkpoint layout is freed layer by layer (the 31B fits only once).
  params = model_lib.fuse_projections(params, cfg, donate=True)
  for variant in _VARIANTS.value:
    if variant != "checkpoint":
      entries += _measure(model, variant, cfg, params)
  if "fused_cudnn" in _VARIANTS.value:
    entries.append({"variant": "fused_cudnn", "attention_check": attention_check(cfg, params)})
    print(model, entries[-1], flush=True)
  return entries


VARIANTS = ("checkpoint", "fused", "fused_pad", "fused_copy", "fused_nopad", "fused_cudnn",
            "fused_attn_off", "fused_attn_on", "fused_attn_range1", "fused_attn_range2",
            "fused_attn_range4", "fused_attn_own", "fused_attn_no_own",
            "fused_attn_warps8", "fused_attn_own_warps8",
            "fused_ple_off", "fused_ple_on", "fused_ple_split2", "fused_moe_off", "fused_moe_on",
            "fused_moe_finish_off", "fused_moe_shared_rows", "fused_moe_shared_mlp",
            "fused_moe_shared_mlp_off", "fused_moe_shared_both", "fused_top_k_ranks",
            "fused_moe_router_end", "fused_attn_block_norms", "fused_attn_end",
            "fused_no_attn_end", "fused_rms1",
            "fused_xla", "fused_all_on")


def main(argv):
  del argv
  unknown = sorted(set(_VARIANTS.value) - set(VARIANTS))
  if unknown:
    raise app.UsageError(f"unknown --variants {unknown}; known: {', '.join(VARIANTS)} "
                         "(fused_unpaired, runs U and X, needs commit 51422b0)")
  parts = {m: functools.partial(model_entries, m) for m in _MODELS.value}
  bench.run_probe(_OUT.value, parts, _MODELS.value, context=_CONTEXT.value)


if __name__ == "__main__":
  app.run(main)
