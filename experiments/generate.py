r"""Completes a prompt with speculative decoding and compares it with plain decoding.

With no flags: the shipped demo pair (a small Gemma 4-architecture code model and its MTP drafter)
completes a Python prompt on the CPU, then prints the measured statistics and speedup.

  python experiments/generate.py
  python experiments/generate.py --prompt="def fib(n):" --temperature=0.8 --top_p=0.95
  python experiments/generate.py --target=DIR --drafter=DIR --tokenizer=FILE   # ours or HF dirs
  python experiments/generate.py --drafter=DIR    # a drafter trained for the demo target
  python experiments/generate.py --int8          # int8 weight-only target (gemma_mtp/quant.py)
"""

from absl import app
from absl import flags
from absl import logging

import gemma_mtp
from gemma_mtp import bench
from gemma_mtp import demo
from gemma_mtp import drafter_kinds
from gemma_mtp import metrics

DEFAULT_PROMPT = '''import os


def read_lines(path):
    """Return the lines of a text file without their newlines."""
'''

_TARGET = flags.DEFINE_string("target", None, "target checkpoint (ours or Hugging Face); default: demo")
_DRAFTER = flags.DEFINE_string("drafter", None, "drafter checkpoint (ours or HF assistant)")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "SentencePiece model (ours or Gemma's)")
_PROMPT = flags.DEFINE_string("prompt", DEFAULT_PROMPT, "prompt text")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "tokens to generate per row")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy")
_TOP_K = flags.DEFINE_integer("top_k", None, "top-k sampling")
_TOP_P = flags.DEFINE_float("top_p", None, "nucleus sampling")
_DRAFT_LENGTHS = flags.DEFINE_list("draft_lengths", ["1", "2", "4", "8"], "draft-length buckets")
flags.register_validator("draft_lengths", lambda v: all(k.isdigit() and int(k) > 0 for k in v),
                         "draft lengths are positive integers, e.g. 1,2,4,8")
_ADAPTIVE = flags.DEFINE_bool("adaptive", True, "adaptive bucket choice (else the first bucket)")
_BATCH = flags.DEFINE_integer("batch_size", 1, "copies of the prompt generated together")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed runs after the compiling run (best is kept)")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype")
_RECORD = flags.DEFINE_string("record", None, "also write the measurements to this JSON file")
_INT8 = flags.DEFINE_bool("int8", False, "quantize the target's weights and embeddings to int8 "
                          "(per-output-channel scales); plain and speculative decoding both use it")

_FUSE = flags.DEFINE_bool("fuse", True, "run the target in the fused inference layout "
                          "(gemma_mtp.fuse_target: one q|k|v and one gate|up matmul per layer; "
                          "same outputs, faster on a GPU)")


def load():
  """(target, drafter, tokenizer): the demo pair, the demo target with --drafter (one trained for
  it, e.g. by train_drafter.py), or --target with --drafter and --tokenizer."""
  if _TARGET.value is None:
    if _TOKENIZER.value is not None:
      raise app.UsageError("--tokenizer goes with --target: the demo target has its own")
    target, drafter, tok = demo.load_demo(dtype=_DTYPE.value)
    if _DRAFTER.value is not None:
      drafter = gemma_mtp.load_drafter(_DRAFTER.value, target)
    return target, drafter, tok
  from gemma_mtp import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  if _DRAFTER.value is None or _TOKENIZER.value is None:
    raise app.UsageError("--target needs --drafter and --tokenizer too")
  target = gemma_mtp.load_target(_TARGET.value, dtype=_DTYPE.value)
  return (target, gemma_mtp.load_drafter(_DRAFTER.value, target),
          tokenizer_lib.Tokenizer.load(_TOKENIZER.value))


def main(argv):
  del argv
  target, drafter, tok = load()
  if _INT8.value:
    target = gemma_mtp.quantize_target(target, embeddings=True)
  if _FUSE.value:   # a freshly loaded checkpoint is held by nothing else: join it in place
    target = gemma_mtp.fuse_target(target, donate=_TARGET.value is not None)
  prompt = tok.encode(_PROMPT.value)
  cost = None   # the adaptive rule's drafter/target step cost, measured on this machine
  if _ADAPTIVE.value and drafter.config.kind == drafter_kinds.ASSISTANT:
    cost = bench.draft_cost(target.params, target.config, drafter.params, drafter.config,
                            context=len(prompt) + _MAX_NEW.value)["ratio"]
  result = metrics.compare(
      target, drafter, [prompt] * _BATCH.value, max_new_tokens=_MAX_NEW.value,
      draft_lengths=[int(k) for k in _DRAFT_LENGTHS.value], adaptive=_ADAPTIVE.value,
      temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
      eos_id=tok.eos_id, repeats=_REPEATS.value, seed=_SEED.value, draft_cost=cost)
  out = gemma_mtp.generate(target, [prompt], max_new_tokens=_MAX_NEW.value, drafter=drafter,
                           draft_lengths=[int(k) for k in _DRAFT_LENGTHS.value],
                           adaptive=_ADAPTIVE.value, temperature=_TEMPERATURE.value,
                           top_k=_TOP_K.value, top_p=_TOP_P.value, eos_id=tok.eos_id,
                           seed=_SEED.value)
  print(_PROMPT.value + tok.decode(out.tokens[0]))
  print("-" * 72)
  acc = ", ".join("-" if a is None else f"{a:.2f}" for a in result["acceptance_by_position"])
  rows = [
      ("mean tokens per target forward", f"{result['tokens_per_forward']:.2f}"),
      ("acceptance by draft position", acc),
      ("rounds per draft length", str(result["bucket_counts"])),
      ("plain decoding", f"{result['plain_tokens_per_second']:.1f} tokens/s"),
      ("speculative decoding", f"{result['speculative_tokens_per_second']:.1f} tokens/s"),
      ("speedup", f"{result['speedup']:.2f}x"),
  ]
  if "outputs_equal" in result:
    rows.append(("greedy outputs identical", str(result["outputs_equal"])))
  width = max(len(k) for k, _ in rows)
  for k, v in rows:
    print(f"{k:<{width}}  {v}")
  logging.info("result: %s", result)
  if _RECORD.value:
    metrics.write_record(_RECORD.value, {
        "kind": "generate", "checkpoint": _TARGET.value or "demo", "prompt": _PROMPT.value,
        "int8": _INT8.value, "fused": _FUSE.value, "result": result})


if __name__ == "__main__":
  app.run(main)
