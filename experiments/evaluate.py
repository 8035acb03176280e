r"""Acceptance and speed of a target + drafter pair on held-out code or any folder of text.

  python experiments/evaluate.py                                  # demo pair, stdlib eval split
  python experiments/evaluate.py --data=path/to/folder --extensions=.py,.md \
      --draft_lengths=1,2,4,8 --out=experiments/results/eval_folder.json
  # any drafter kind (assistant, parallel heads, self-drafter; the kind is in the checkpoint)
  python experiments/evaluate.py --drafter=runs/heads_small/drafter --draft_cost=0.02 \
      --target=runs/target_small/target --tokenizer=data/stdlib/tokenizer.model
  # an untrained self-drafter: the demo target's first 2 layers (c = 2 of 8 layers)
  python experiments/evaluate.py --self_draft_layers=2 --draft_cost=0.25
  # draft trees next to chains (assistant drafter, 'clean' convention): widths per depth
  python experiments/evaluate.py --convention=clean --draft_lengths=3,4 \
      --trees=2-1-1 --trees=3,2,1,1 --speed

Reports, per draft-length bucket and per draft tree (and adaptive chains), greedy and sampled:
mean tokens per target forward and acceptance by draft position (a tree: by depth; also accepted
drafts by sibling rank and positions verified per forward); with --speed also plain vs
speculative tokens/s; with --workload_prompts the timed batch-1 code / prose / mixed workloads
(plain, each fixed K, adaptive, each tree; the adaptive configuration carries its acceptance
estimate from prompt to prompt, as a serving loop would, and the record gives every
configuration's rounds per bucket). The adaptive rule uses the drafter/target step cost and the
verification cost of each K measured on this device. With --trees and --speed, each tree is
timed next to the best fixed chain length (batch 1 and 8).
"""

import dataclasses

from absl import app
from absl import flags
from absl import logging

import gemma_mtp
from gemma_mtp import bench
from gemma_mtp import data
from gemma_mtp import demo
from gemma_mtp import drafter_kinds
from gemma_mtp import metrics
from gemma_mtp import pipeline
from gemma_mtp.tree import TreeSpec

_TARGET = flags.DEFINE_string("target", None, "target checkpoint (ours or HF); default: demo")
_DRAFTER = flags.DEFINE_string("drafter", None, "drafter checkpoint of any kind (ours or HF "
                               "assistant); default: the demo drafter")
_SELF_LAYERS = flags.DEFINE_integer("self_draft_layers", None, "instead of --drafter: a "
                                    "self-drafter of the target's first N layers, no adapter")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "SentencePiece model")
_DATA = flags.DEFINE_string("data", None, "folder of text/code (default: the stdlib eval split)")
_EXTENSIONS = flags.DEFINE_list("extensions", [".py"], "file extensions of --data")
_PROMPTS = flags.DEFINE_integer("prompts", 32, "prompts cut from the data")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 128, "tokens per prompt")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "new tokens per prompt")
_DRAFT_LENGTHS = flags.DEFINE_list("draft_lengths", ["1", "2", "4", "8"], "buckets")
flags.register_validator("draft_lengths", lambda v: all(k.isdigit() and int(k) > 0 for k in v),
                         "draft lengths are positive integers, e.g. 1,2,4,8")
_TREES = flags.DEFINE_multi_string("trees", [], "a draft tree as widths per depth, e.g. 3,2,1,1 "
                                   "or 3-2-1-1 (TreeSpec.parse); repeat the flag for several; "
                                   "needs an assistant drafter and --convention=clean")
_TEMPERATURES = flags.DEFINE_list("temperatures", ["0", "1"], "0 = greedy")
_CONVENTION = flags.DEFINE_enum("convention", None, ["hf", "clean"], "drafter convention")
_SPEED = flags.DEFINE_bool("speed", False, "also time plain vs speculative (batch 1 and 8)")
_DRAFT_COST = flags.DEFINE_float("draft_cost", 0.0, "drafter/target step cost c of the adaptive "
                                 "rule; 0: measure it on this device (assistant drafters; other "
                                 "kinds: SpecConfig's default)")
_VERIFY_COSTS = flags.DEFINE_list("verify_costs", [], "per --draft_lengths entry, the cost of "
                                   "verifying K drafts relative to one decode step (adaptive "
                                   "rule); empty: measure them on this device")
_WORKLOADS = flags.DEFINE_integer("workload_prompts", 0, "> 0: also batch-1 code / prose / mixed "
                                  "workloads of this many prompts each (timed)")
_CALIBRATE = flags.DEFINE_bool("calibrate", True, "workloads: the adaptive rules use round costs "
                                "measured in the loop by the first workload's fixed-K passes "
                                "(pipeline.round_costs) instead of the step costs")
_PER_CALL = flags.DEFINE_bool("per_call", False, "workloads: also the adaptive rule choosing the "
                              "bucket once per prompt (speculative.per_call_config)")
_SEGMENTS = flags.DEFINE_list("segment_rounds", [], "workloads: also the adaptive rule choosing "
                              "once per this many rounds (the default config: SpecConfig's)")
_DISPATCHES = flags.DEFINE_list("dispatches", [], "workloads: also the adaptive rule with these "
                                "SpecConfig.dispatch values (loops, switch)")
_VARIANTS = flags.DEFINE_list("rule_variants", [], "workloads: also the adaptive rule with these "
                              "SpecConfig fields changed, each 'field=value' (e.g. "
                              "position_decay=when_judged)")
_PASSES = flags.DEFINE_integer("workload_repeats", 1, "workloads: timed passes per configuration, "
                               "interleaved; the median is reported")
_PROSE = flags.DEFINE_list("prose_roots", ["site-packages"], "where prose (.md/.rst/METADATA) is")
_OUT = flags.DEFINE_string("out", None, "JSON record path")


def load():
  """(target, drafter, tokenizer) from the flags."""
  if _DRAFTER.value is not None and _SELF_LAYERS.value is not None:
    raise app.UsageError("pass --drafter or --self_draft_layers, not both")
  if _TARGET.value is None:
    if _TOKENIZER.value is not None:
      raise app.UsageError("--tokenizer goes with --target: the demo target has its own")
    target, drafter, tok = demo.load_demo(
        convention=_CONVENTION.value if _DRAFTER.value is None else None)
  else:
    from gemma_mtp import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
    if _TOKENIZER.value is None or (_DRAFTER.value is None and _SELF_LAYERS.value is None):
      raise app.UsageError("--target needs --tokenizer and --drafter (or --self_draft_layers)")
    target, drafter = gemma_mtp.load_target(_TARGET.value), None
    tok = tokenizer_lib.Tokenizer.load(_TOKENIZER.value)
  if _DRAFTER.value is not None:
    drafter = gemma_mtp.load_drafter(_DRAFTER.value, target, convention=_CONVENTION.value)
  if _SELF_LAYERS.value is not None:
    drafter = gemma_mtp.random_drafter(target, kind="self", num_layers=_SELF_LAYERS.value)
  return target, drafter, tok


def verify_costs(target, buckets) -> dict:
  """{'measured': `bench.verify_costs` (None if given by --verify_costs), 'used': {K: cost}}."""
  if _VERIFY_COSTS.value:
    if len(_VERIFY_COSTS.value) != len(buckets):
      raise app.UsageError(f"--verify_costs needs one cost per draft length {list(buckets)}, "
                           f"got {_VERIFY_COSTS.value}")
    return {"measured": None, "used": dict(zip(buckets, map(float, _VERIFY_COSTS.value)))}
  measured = bench.verify_costs(target.params, target.config, buckets,
                                context=_PROMPT_LEN.value + _MAX_NEW.value)
  return {"measured": measured, "used": measured["ratio"]}


def main(argv):
  del argv
  target, drafter, tok = load()
  trees = tuple(TreeSpec.parse(t) for t in _TREES.value)
  if trees:
    try:
      drafter_kinds.check_trees(drafter.config)
    except ValueError as e:
      raise app.UsageError(f"--trees: {e}") from e
  if _DATA.value is None:
    files = data.build_corpus().eval_files
    source = "stdlib eval split"
  else:
    files = data.build_corpus([_DATA.value], eval_fraction=0.0,
                              extensions=tuple(_EXTENSIONS.value)).train_files
    source = _DATA.value
  docs = [f.path.read_text(encoding="utf-8") for f in files]
  tokens = data.tokenize_documents(docs, tok)
  prompts = pipeline.eval_prompts(tokens, num=_PROMPTS.value, prompt_len=_PROMPT_LEN.value)
  buckets = tuple(int(k) for k in _DRAFT_LENGTHS.value)
  temps = [float(t) for t in _TEMPERATURES.value]
  runs = ([(t, (k,), False) for t in temps for k in buckets] +
          [(t, (tree,), False) for t in temps for tree in trees] +
          [(t, buckets, True) for t in temps])
  speed = []
  if _SPEED.value:
    speed = [(t, b, buckets, True) for t in temps for b in (1, 8)]
    if trees:   # each tree next to the best fixed chain (draft_lengths () in evaluate_pair)
      speed += [(t, b, bucket, False) for t in temps for b in (1, 8)
                for bucket in [()] + [(tree,) for tree in trees]]
  measured = None
  if drafter.config.kind == drafter_kinds.ASSISTANT:
    measured = bench.draft_cost(target.params, target.config, drafter.params, drafter.config,
                                context=_PROMPT_LEN.value + _MAX_NEW.value)
  cost = _DRAFT_COST.value or (measured["ratio"] if measured else None)
  logging.info("draft cost: measured %s, used %s", measured and measured["ratio"], cost)
  verify = verify_costs(target, buckets)
  logging.info("verify costs: %s", verify)
  costs = dict(draft_cost=cost, verify_costs=verify["used"])
  result = pipeline.evaluate_pair(target, drafter, prompts, acceptance_runs=runs,
                                  speed_runs=speed, max_new_tokens=_MAX_NEW.value, **costs)
  result["draft_cost"] = {"measured": measured, "used": cost}
  result["verify_costs"] = verify
  if _WORKLOADS.value:
    n = _WORKLOADS.value
    workloads = {"code": pipeline.eval_prompts(tokens, num=n, prompt_len=_PROMPT_LEN.value,
                                               seed=1)}
    prose = pipeline.prose_tokens(_PROSE.value, tok, max_bytes=4_000_000)
    if prose.size > _PROMPT_LEN.value + 1:
      workloads["prose"] = pipeline.eval_prompts(prose, num=n, prompt_len=_PROMPT_LEN.value,
                                                 seed=1)
    result["workloads"] = pipeline.evaluate_workloads(
        target, drafter, workloads, buckets=buckets, max_new_tokens=_MAX_NEW.value,
        trees=trees, calibrate=_CALIBRATE.value, per_call=_PER_CALL.value,
        segment_rounds=[int(n) for n in _SEGMENTS.value], dispatches=_DISPATCHES.value,
        rule_variants=_VARIANTS.value, repeats=_PASSES.value, **costs)
    for e in result["workloads"]:
      adaptive = e["config"].startswith("adaptive")
      print(f"{e['workload']:6s} {e['config']:21s} {e['tokens_per_second']:8.1f} tokens/s "
            f"{e['tokens_per_forward']:.2f} tokens/forward {e['speedup']:.2f}x"
            + (f" rounds per bucket {e['bucket_counts']}, {e['bucket_changes']} changes"
               if adaptive else "")
            + (f"; at fixed-K round times {e['seconds']:.3f} -> {fixed:.3f} s"
               if adaptive and (fixed := e["seconds_at_fixed_rounds"]) else ""))
    print("adaptive costs:", next((e["costs"] for e in result["workloads"]
                                   if e["config"].startswith("adaptive")), None))
  for e in result["acceptance"] + result["speed"]:
    buckets = e["draft_lengths"] + e.get("trees", [])
    acc = " ".join(f"{a:.2f}" for a in e["acceptance_by_position"] if a is not None)
    print(f"T={e['temperature']:<4} buckets={str(buckets):<18} adaptive={e['adaptive']!s:<5} "
          + (f"batch={e['batch']:<2} {e['speedup']:.2f}x " if "speedup" in e else "")
          + f"tokens/forward={e['tokens_per_forward']:.2f} acceptance by position/depth: {acc}")
  if _OUT.value:
    metrics.write_record(_OUT.value, {
        "kind": "evaluate", "data": source, "files": len(files), "tokens": int(tokens.size),
        "drafter_kind": drafter.config.kind, "drafter_config": dataclasses.asdict(drafter.config),
        "convention": getattr(drafter.config, "convention", None),
        "draft_cost": _DRAFT_COST.value, "trees": [t.label for t in trees], **result})
    logging.info("wrote %s", _OUT.value)


if __name__ == "__main__":
  app.run(main)
