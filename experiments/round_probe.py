r"""Where a round's time goes (issue 6, runs AA, AG): one batch-1 greedy generation of a pair (the
demo pair, or any saved target + assistant drafter) on a code prompt, with a fixed draft length
and with the adaptive rule, each under the profiler (`bench.kernel_profile`, per round: kernels,
device-busy time, the gaps between kernels, time per kernel kind).

  python experiments/round_probe.py --out=$OUT/round_probe.json
  python experiments/round_probe.py --target=runs/gpu/demo/target --drafter=runs/gpu/demo/drafter \
      --tokenizer=runs/gpu/demo/tokenizer.model --fixed=8 --out=$OUT/round_probe_gpu_pair.json
"""

import inspect
import json

from absl import app
from absl import flags

import gemma_mtp
from gemma_mtp import api
from gemma_mtp import bench
from gemma_mtp import demo
from gemma_mtp import metrics
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


def load():
  """(target, drafter, tokenizer): the demo pair, or the checkpoints named by the flags."""
  if _TARGET.value is None:
    return demo.load_demo(dtype="bfloat16")
  if _DRAFTER.value is None or _TOKENIZER.value is None:
    raise app.UsageError("--target needs --drafter and --tokenizer")
  target = gemma_mtp.load_target(_TARGET.value)
  return (target, gemma_mtp.load_drafter(_DRAFTER.value, target),
          tokenizer_lib.Tokenizer.load(_TOKENIZER.value))


def main(argv):
  del argv
  target, drafter, tok = load()
  prompt = tok.encode(inspect.getsource(json.decoder))[:128]
  buckets = tuple(int(k) for k in _BUCKETS.value)
  configs = {
      f"K={_FIXED.value}": dict(draft_lengths=(_FIXED.value,), adaptive=False),
      "adaptive": dict(spec_config=metrics.spec_config(
          buckets, True, 0.0, dict(zip(buckets, map(float, _VERIFY.value))))),
  }
  record = {"prompt_tokens": len(prompt), "target": _TARGET.value or "demo",
            "drafter": _DRAFTER.value or "demo", "configs": {}}
  for name, kw in configs.items():
    def run(kw=kw):
      return api.generate(target, [prompt], max_new_tokens=_NEW.value, drafter=drafter, **kw)
    out = run()
    rounds = out.stats["target_forwards"]
    prof = bench.kernel_profile(run, rounds, f"{_TRACE_DIR.value}/{name}", top=15)
    prof["by_kind"] = dict(list(prof.get("by_kind", {}).items())[:15])
    record["configs"][name] = {"rounds": rounds, "bucket_counts": out.stats["bucket_counts"],
                               "new_tokens": out.stats["new_tokens"], "profile": prof}
    print(name, rounds, {k: prof.get(k) for k in ("kernels_per_step", "busy_us_per_step",
                                                   "span_us_per_step", "gap_us_per_step")})
  metrics.write_record(_OUT.value, record)


if __name__ == "__main__":
  app.run(main)
