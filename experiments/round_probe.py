r"""Where a round's time goes (issue 6, runs AA, AH): one batch-1 greedy generation of a pair (the
demo pair, any saved target + assistant drafter, or random weights of the GPU pair's shapes) on
a code prompt, with a fixed draft length and with the adaptive rule, each timed (median wall
seconds per round; plain decoding's per token beside them) and then run under the profiler
(`bench.kernel_profile`, per round: kernels, device-busy time, the gaps between kernels and the
kernels around the largest, time per kernel kind).

  python experiments/round_probe.py --out=$OUT/round_probe.json
  python experiments/round_probe.py --target=runs/gpu/demo/target --drafter=runs/gpu/demo/drafter \
      --tokenizer=runs/gpu/demo/tokenizer.model --fixed=8 --out=$OUT/round_probe_gpu_pair.json
  # the round's costs do not depend on the weights: random ones of configs/reproduce_gpu.py's
  # shapes need no training (with random weights the rounds accept next to nothing)
  python experiments/round_probe.py --shapes=gpu_pair --fixed=8 --out=$OUT/round_probe_shapes.json
"""

import inspect
import json
import os
import pathlib
import statistics
import time

import numpy as np
from absl import app
from absl import flags

import gemma_mtp
from gemma_mtp import api
from gemma_mtp import bench
from gemma_mtp import demo
from gemma_mtp import drafter_kernels
from gemma_mtp import metrics
from gemma_mtp import model as model_lib
from gemma_mtp import quant
from gemma_mtp import tokenizer as tokenizer_lib

_OUT = flags.DEFINE_string("out", "round_probe.json", "JSON record")
_TRACE_DIR = flags.DEFINE_string("trace_dir", "/tmp/round_probe_traces", "profiler traces")
_FIXED = flags.DEFINE_integer("fixed", 4, "the fixed draft length compared")
_BUCKETS = flags.DEFINE_list("draft_lengths", ["2", "4", "8"], "adaptive buckets")
_VERIFY = flags.DEFINE_list("verify_costs", ["1.6", "2.15", "3.06"], "round costs of the buckets "
                            "(calibrated in run Y)")
_NEW = flags.DEFINE_integer("max_new_tokens", 256, "new tokens")
_TARGET = flags.DEFINE_string("target", None, "target checkpoint; default: the demo pair")
_DRAFTER = flags.DEFINE_string("drafter", None, "drafter checkpoint (with --target)")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "SentencePiece model (with --target)")
_SHAPES = flags.DEFINE_enum("shapes", None, ["gpu_pair"], "random weights of this pair's shapes "
                            "(configs/reproduce_gpu.py) instead of a trained pair")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed generations per configuration (median)")
_PROFILE = flags.DEFINE_bool("profile", True, "also run each configuration under the profiler")
_ADAPTIVE = flags.DEFINE_bool("adaptive", True, "also the adaptive rule")
_FUSED = flags.DEFINE_bool("fused", False, "target and drafter in the fused inference layout "
                           "(model.fuse_projections: q|k|v and gate|up each one matmul)")
_PAD_ROWS = flags.DEFINE_enum("pad_rows", "zeros", ["zeros", "copy"], "quant.PAD_ROWS_WITH")
_DRAFTER_WARPS = flags.DEFINE_integer("drafter_warps", drafter_kernels.NUM_WARPS,
                                      "drafter_kernels.NUM_WARPS (warps per program)")
_PAD_MIN = flags.DEFINE_integer("pad_min_weight_size", 0, "quant.PAD_MIN_WEIGHT_SIZE")


def random_pair(name: str):
  """(target, drafter, None): random bf16 weights of a trained pair's shapes; 'gpu_pair' is
  the pair of configs/reproduce_gpu.py (its tokenizer's 8,192-token vocabulary)."""
  config_file = {"gpu_pair": "reproduce_gpu.py"}[name]
  c = bench.config_from_file(pathlib.Path(__file__).parents[1] / "configs" / config_file)
  tcfg = gemma_mtp.ModelConfig(vocab_size=c.vocab_size, **{**c.target, "param_dtype": "bfloat16"})
  target = api.random_target(tcfg)
  return target, api.random_drafter(target, **c.drafter), None


def load():
  """(target, drafter, tokenizer): the demo pair, or the checkpoints named by the flags."""
  if _SHAPES.value is not None:
    return random_pair(_SHAPES.value)
  if _TARGET.value is None:
    if _DRAFTER.value is not None or _TOKENIZER.value is not None:
      raise app.UsageError("--drafter and --tokenizer go with --target")
    return demo.load_demo(dtype="bfloat16")
  if _DRAFTER.value is None or _TOKENIZER.value is None:
    raise app.UsageError("--target needs --drafter and --tokenizer")
  target = gemma_mtp.load_target(_TARGET.value)
  return (target, gemma_mtp.load_drafter(_DRAFTER.value, target),
          tokenizer_lib.Tokenizer.load(_TOKENIZER.value))


def main(argv):
  del argv
  target, drafter, tok = load()
  quant.PAD_ROWS_WITH, quant.PAD_MIN_WEIGHT_SIZE = _PAD_ROWS.value, _PAD_MIN.value
  drafter_kernels.NUM_WARPS = _DRAFTER_WARPS.value
  if _FUSED.value:
    target = api.fuse_target(target)
    drafter = api.Drafter(drafter.config, model_lib.fuse_projections(
        drafter.params, drafter.config.as_decoder()))
  if tok is None:
    prompt = [int(t) for t in np.random.default_rng(0).integers(
        1, target.config.vocab_size, 128)]
  else:
    prompt = tok.encode(inspect.getsource(json.decoder))[:128]
  buckets = tuple(int(k) for k in _BUCKETS.value)
  configs = {f"K={_FIXED.value}": dict(draft_lengths=(_FIXED.value,), adaptive=False)}
  if _ADAPTIVE.value:
    configs["adaptive"] = dict(spec_config=metrics.spec_config(
        buckets, True, 0.0, dict(zip(buckets, map(float, _VERIFY.value)))))
  source = _SHAPES.value or _TARGET.value or "demo"
  record = {"prompt_tokens": len(prompt), "target": source,
            "drafter": _SHAPES.value or _DRAFTER.value or "demo",
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "fused": _FUSED.value,
            "pad_rows": _PAD_ROWS.value, "pad_min_weight_size": _PAD_MIN.value, "configs": {}}
  record["drafter_kernels"] = drafter_kernels.why_not(
      drafter.params, drafter.config, target.params, target.config) or "on"
  record["drafter_warps"] = drafter_kernels.NUM_WARPS
  plain_tokens = None
  for name, kw in {"plain": None, **configs}.items():
    def run(kw=kw):
      if kw is None:
        return api.generate(target, [prompt], max_new_tokens=_NEW.value)
      return api.generate(target, [prompt], max_new_tokens=_NEW.value, drafter=drafter, **kw)
    out = run()
    rounds = out.stats["target_forwards"]
    times = []
    for _ in range(_REPEATS.value):   # generate blocks: its results come back to the host
      t0 = time.perf_counter()
      run()
      times.append(time.perf_counter() - t0)
    entry = {"rounds": rounds, "new_tokens": out.stats["new_tokens"],
             "seconds": times, "us_per_round": statistics.median(times) / rounds * 1e6}
    if kw is None:
      plain_tokens = out.tokens
    else:
      entry["bucket_counts"] = out.stats["bucket_counts"]
      # Lossless output is a float32 property (the tests); with random bf16 weights nearly tied
      # logits round differently in a verification and a plain step, so this is often False.
      entry["equals_plain"] = out.tokens == plain_tokens
    if _PROFILE.value:
      prof = bench.kernel_profile(run, rounds, f"{_TRACE_DIR.value}/{name}", top=15)
      prof["by_kind"] = dict(list(prof.get("by_kind", {}).items())[:15])
      entry["profile"] = prof
    record["configs"][name] = entry
    print(name, rounds, round(entry["us_per_round"], 1), entry.get("equals_plain"), {
        k: entry.get("profile", {}).get(k) for k in (
            "kernels_per_step", "busy_us_per_step", "span_us_per_step", "gap_us_per_step")})
  metrics.write_record(_OUT.value, record)


if __name__ == "__main__":
  app.run(main)
