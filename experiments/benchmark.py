r"""GPU benchmark of decoding: bandwidth, verification and drafter costs, predicted and measured speedups.

One JSON record per run (rewritten after every part, so a run cut short keeps what it measured):

  copy      elementwise copy bandwidth of this GPU (the ceiling every fraction refers to);
  decode    plain decode latency per step for each model shape (random bf16 weights) at each
            batch and context: bytes one step must read / time = achieved bandwidth, and
            `bandwidth_fraction` = achieved / copy bandwidth;
  verify    one forward of K + 1 positions relative to one decode step (batch 1, first context);
  drafter   one step of the released drafter shape of each model relative to one target step;
  predict   Leviathan speedups from those costs for acceptance 0.6-0.9;
  int8      batch-1 decode (first context) of the --int8_models shapes with int8 weight-only
            weights (quant.py, embeddings included) next to the same run's bf16 step;
  e2e       end-to-end `generate` (prompt 512, 128 new tokens, batch 1) of the E2B and 31B
            shapes, plain and with a random assistant at K = 4, tokens/s (compare with `hf`);
  hf        the same shapes through `transformers` `generate` (torch; run it as its own process,
            see below), plain and with a random assistant;
  pair      the measured speculative speedups of the GPU-trained pair (from its reproduction
            record, --pair_record), copied in so that the plot shows them next to the predictions.

  python experiments/benchmark.py                                  # everything but hf, all shapes
  python experiments/benchmark.py --parts=hf --out=experiments/results/benchmark_hf.json
  python experiments/benchmark.py --models=tiny --batches=1,2 --contexts=64 --verify_k=1,2 \
      --verify_models=tiny --parts=copy,decode,verify,drafter,predict --copy_mb=64  # CPU smoke test

The target weights are in the fused inference layout (`model.fuse_projections`) unless
--layout=checkpoint. Decode steps are timed inside one compiled loop (gemma_mtp/bench.py): the
per-step time is the slope between a short and a long run of the same program. All programs of
one model compile side by side on --compile_threads threads before any is timed.
"""

from __future__ import annotations

import json
import os
import pathlib
import time

from absl import app
from absl import flags
from absl import logging

import jax
import jax.numpy as jnp
import numpy as np

from gemma_mtp import api
from gemma_mtp import bench
from gemma_mtp import config as config_lib
from gemma_mtp import drafter as drafter_lib
from gemma_mtp import drafter_kernels
from gemma_mtp import metrics
from gemma_mtp import model as model_lib
from gemma_mtp import params as params_lib

_MODELS = flags.DEFINE_list("models", ["gemma4_e2b", "gemma4_e4b", "gemma4_31b", "gemma4_26b_a4b"],
                            "model presets (config.PRESETS; 'tiny' for smoke tests)")
PARTS = ("copy", "decode", "verify", "drafter", "predict", "int8", "e2e", "hf", "pair")
_PARTS = flags.DEFINE_list("parts", ["copy", "decode", "verify", "drafter", "predict", "e2e",
                                     "pair"], "what to measure (see the module docstring): "
                           + ", ".join(PARTS))
_BATCHES = flags.DEFINE_list("batches", ["1", "8", "32"], "decode batch sizes")
_CONTEXTS = flags.DEFINE_list("contexts", ["1024", "8192"], "decode context lengths")
_VERIFY_K = flags.DEFINE_list("verify_k", ["1", "2", "4", "8"], "draft lengths K (K+1 positions)")
_VERIFY_MODELS = flags.DEFINE_list("verify_models", ["gemma4_e2b", "gemma4_e4b", "gemma4_31b"],
                                   "models whose verification cost is measured ('tiny' too)")
_INT8_MODELS = flags.DEFINE_list("int8_models", ["gemma4_31b", "gemma4_e4b"],
                                 "models whose int8 decode is measured (int8 part)")
_SHORT = flags.DEFINE_integer("short_steps", 8, "steps of the short timed run")
_LONG = flags.DEFINE_integer("long_steps", 40, "steps of the long timed run")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed runs per length (best is kept)")
_COPY_MB = flags.DEFINE_integer("copy_mb", 4096, "buffer of the copy-bandwidth measurement")
_THREADS = flags.DEFINE_integer("compile_threads", 8, "programs compiled side by side")
_DEADLINE = flags.DEFINE_float("deadline_s", 0.0, "skip what would start after this many seconds "
                               "(0: no limit)")
_E2E_MODELS = flags.DEFINE_list("e2e_models", ["gemma4_e2b", "gemma4_31b"],
                                "shapes of the end-to-end and transformers comparisons")
_E2E_PROMPT = flags.DEFINE_integer("e2e_prompt", 512, "prompt tokens (e2e, hf)")
_E2E_NEW = flags.DEFINE_integer("e2e_new", 128, "new tokens (e2e, hf)")
_PAIR_RECORD = flags.DEFINE_string("pair_record", None, "reproduction record of the GPU pair")
_OUT = flags.DEFINE_string("out", None, "record path; default experiments/results/"
                           "benchmark_<device>_<time>.json")
_PLOT = flags.DEFINE_bool("plot", True, "write <out>.png next to the record")
_LAYOUT = flags.DEFINE_enum("layout", "fused", ["fused", "checkpoint"], "target parameter layout "
                             "(model.fuse_projections, or as checkpoints store it)")
_UPDATE = flags.DEFINE_bool("update", False, "add this run's parts to the existing record at --out "
                            "(keeps its other parts and its machine description)")

_T0 = time.perf_counter()


def _late(what: str) -> bool:
  if _DEADLINE.value and time.perf_counter() - _T0 > _DEADLINE.value:
    logging.warning("deadline: skipping %s", what)
    return True
  return False


def model_config(name: str) -> config_lib.ModelConfig:
  if name == "tiny":
    return config_lib.tiny(dtype="float32", param_dtype="float32")
  return config_lib.preset(name).replace(dtype="bfloat16", param_dtype="bfloat16")


def drafter_config(name: str, cfg: config_lib.ModelConfig) -> drafter_lib.DrafterConfig:
  if name == "tiny":
    return drafter_lib.for_target(cfg, embed_dim=32, num_heads=2, mlp_dim=64, num_layers=2)
  preset = drafter_lib.DRAFTER_PRESETS[f"{name}_assistant"]()
  return preset.replace(dtype=cfg.dtype, param_dtype=cfg.param_dtype)


def measure_model(name: str, copy_gbs: float, parts: set[str]) -> dict:
  """decode / verify / drafter / predict entries of one model shape."""
  cfg = model_config(name)
  entry: dict = {"params": params_lib.count_params(params_lib.param_specs(cfg)),
                 "layers": cfg.num_layers, "dtype": cfg.dtype,
                 "measured_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "copy_gb_per_s": copy_gbs}
  t0 = time.perf_counter()
  params = bench.random_params(params_lib.param_specs(cfg), cfg, jax.random.PRNGKey(0))
  if _LAYOUT.value == "fused":
    params = model_lib.fuse_projections(params, cfg, donate=True)
  jax.block_until_ready(params)
  entry["init_s"] = time.perf_counter() - t0
  entry["layout"] = _LAYOUT.value

  contexts = [int(c) for c in _CONTEXTS.value]
  cases = []
  if "decode" in parts:
    cases += [bench.DecodeCase(int(b), c) for b in _BATCHES.value for c in contexts]
  verify = "verify" in parts and name in _VERIFY_MODELS.value
  if verify:
    base = bench.DecodeCase(1, contexts[0])
    cases += [bench.DecodeCase(1, contexts[0], k + 1) for k in map(int, _VERIFY_K.value)]
    if base not in cases:
      cases.append(base)
  if ("int8" in parts and name in _INT8_MODELS.value
      and bench.DecodeCase(1, contexts[0]) not in cases):   # int8's bf16 baseline
    cases.append(bench.DecodeCase(1, contexts[0]))
  jobs = {c.name: (lambda c=c: bench.lower_decode(params, cfg, c, _LONG.value)) for c in cases}
  dcfg = None
  if "drafter" in parts:
    dcfg = drafter_config(name, cfg)
    dparams = bench.random_params(drafter_lib.param_specs(dcfg), dcfg, jax.random.PRNGKey(1))
    base = bench.DecodeCase(1, contexts[0])
    if base not in cases:
      cases.append(base)
      jobs[base.name] = lambda: bench.lower_decode(params, cfg, base, _LONG.value)
    dcache = jax.eval_shape(lambda: bench.synthetic_cache(cfg, 1, contexts[0]))
    tok = jax.ShapeDtypeStruct((1,), jnp.int32)
    hid = jax.ShapeDtypeStruct((1, cfg.embed_dim), cfg.dtype)
    n = jax.ShapeDtypeStruct((), jnp.int32)
    jobs["drafter"] = lambda: bench.drafter_loop.lower(
        dparams, params, dcache, tok, hid, n, tcfg=cfg, dcfg=dcfg).compile()
  t0 = time.perf_counter()
  compiled, compile_s = bench.compile_all(jobs, _THREADS.value)
  entry["compile_s"] = compile_s
  entry["compile_wall_s"] = time.perf_counter() - t0
  logging.info("%s: compiled %d programs", name, len(compiled))

  timed = {}
  for case in cases:
    if _late(f"{name} {case.name}"):
      break
    extra = bench.memory_needed(compiled[case.name])
    try:
      t = bench.time_decode(compiled[case.name], params, cfg, case, short=_SHORT.value,
                            long=_LONG.value, repeats=_REPEATS.value)
    except jax.errors.JaxRuntimeError as e:   # out of memory: record it and go on
      logging.warning("%s %s failed: %s", name, case.name, str(e)[:300])
      entry.setdefault("failed", []).append(
          {"case": case.name, "error": str(e)[:300], "program_extra_bytes": extra})
      continue
    timed[case] = bench.summarize_decode(cfg, case, t, copy_gbs)
    timed[case]["program_extra_bytes"] = extra
    logging.info("%s %s: %.3f ms/step, %.0f GB/s (%.0f%% of copy)", name, case.name,
                 timed[case]["ms_per_step"], timed[case]["achieved_gb_per_s"],
                 100 * timed[case]["bandwidth_fraction"])
  entry["decode"] = [v for c, v in timed.items() if c.chunk == 1 and
                     ("decode" in parts or c == bench.DecodeCase(1, contexts[0]))]
  base = timed.get(bench.DecodeCase(1, contexts[0]))
  if verify and base:
    entry["verify"] = [
        {"draft_length": c.chunk - 1, "positions": c.chunk, "ms": v["ms_per_step"],
         "relative_to_decode": v["ms_per_step"] / base["ms_per_step"]}
        for c, v in timed.items() if c.chunk > 1]
  if dcfg is not None and base and not _late(f"{name} drafter"):
    cache = jax.jit(lambda: bench.synthetic_cache(cfg, 1, contexts[0]))()
    tok = jnp.ones((1,), jnp.int32)
    hid = jnp.ones((1, cfg.embed_dim), cfg.dtype)
    fn = compiled["drafter"]
    t = bench.slope_seconds(
        lambda k: jax.block_until_ready(fn(dparams, params, cache, tok, hid, jnp.int32(k))),
        short=_SHORT.value, long=_LONG.value, repeats=_REPEATS.value)
    entry["drafter"] = {
        "shape": {"embed_dim": dcfg.embed_dim, "layers": dcfg.num_layers,
                  "num_centroids": dcfg.num_centroids},
        "params": params_lib.count_params(drafter_lib.param_specs(dcfg)),
        "pallas_kernels": drafter_kernels.choose(dparams, dcfg, params, cfg),
        "ms_per_step": t["per_step_s"] * 1e3,
        "relative_to_target_step": t["per_step_s"] * 1e3 / base["ms_per_step"],
        "timing": t}
    logging.info("%s drafter: %.3f ms/step = %.1f%% of a target step (Pallas kernels: %s)", name,
                 entry["drafter"]["ms_per_step"], 100 * entry["drafter"]["relative_to_target_step"],
                 entry["drafter"]["pallas_kernels"])
  if "int8" in parts and name in _INT8_MODELS.value and base and not _late(f"{name} int8"):
    case = bench.DecodeCase(1, contexts[0])
    qparams = api.quantize_target(api.Target(cfg, params), embeddings=True, donate=True).params
    del params
    prog = bench.lower_decode(qparams, cfg, case, _LONG.value)
    t = bench.time_decode(prog, qparams, cfg, case, short=_SHORT.value, long=_LONG.value,
                          repeats=_REPEATS.value)
    q = bench.summarize_decode(cfg, case, t, copy_gbs, params=qparams)
    q["speedup_over_bf16"] = base["ms_per_step"] / q["ms_per_step"]
    entry["int8"] = q
    logging.info("%s int8: %.3f ms/step (%.2fx bf16), %.0f%% of copy", name, q["ms_per_step"],
                 q["speedup_over_bf16"], 100 * q["bandwidth_fraction"])
  if "predict" in parts and "verify" in entry and "drafter" in entry:
    costs = {v["draft_length"]: v["relative_to_decode"] for v in entry["verify"]}
    entry["predicted_speedups"] = bench.leviathan_table(
        costs, entry["drafter"]["relative_to_target_step"])
  return entry


def end_to_end(name: str) -> dict:
  """tokens/s of `api.generate` (prefill included), plain and with a random assistant, K = 4."""
  cfg = model_config(name)
  dcfg = drafter_config(name, cfg)
  target = api.Target(cfg, bench.random_params(params_lib.param_specs(cfg), cfg,
                                               jax.random.PRNGKey(0)))
  if _LAYOUT.value == "fused":
    target = api.fuse_target(target, donate=True)
  drafter = api.Drafter(dcfg, bench.random_params(drafter_lib.param_specs(dcfg), dcfg,
                                                  jax.random.PRNGKey(1)))
  prompt = np.random.default_rng(0).integers(3, cfg.vocab_size, (1, _E2E_PROMPT.value)).tolist()
  out = {}
  for label, kw in (("plain", {}),
                    ("assistant_k4", dict(drafter=drafter, draft_lengths=(4,), adaptive=False))):
    if _late(f"e2e {name} {label}"):
      break
    res, best = metrics.timed_generate(api.generate, target, prompt, repeats=2,
                                       max_new_tokens=_E2E_NEW.value, **kw)
    out[label] = {"seconds": best, "new_tokens": res.stats["new_tokens"],
                  "tokens_per_second": res.stats["new_tokens"] / best,
                  **({"tokens_per_forward": res.stats["tokens_per_forward"]} if kw else {})}
    logging.info("e2e %s %s: %.1f tokens/s", name, label, out[label]["tokens_per_second"])
  return out


def hf_generate(name: str) -> dict:
  """The same shapes through `transformers` (torch, bf16, default `generate`)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from gemma_mtp import checkpoint  # pylint: disable=g-import-not-at-top
  cfg = model_config(name)
  dcfg = drafter_config(name, cfg)
  dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  torch.manual_seed(0)
  with dev:
    model = transformers.Gemma4ForCausalLM._from_config(  # pylint: disable=protected-access
        transformers.Gemma4TextConfig.from_dict(checkpoint.hf_text_config(cfg)),
        dtype=torch.bfloat16).eval()
    assistant = transformers.Gemma4AssistantForCausalLM._from_config(  # pylint: disable=protected-access
        transformers.Gemma4AssistantConfig.from_dict(checkpoint.hf_drafter_config(dcfg)),
        dtype=torch.bfloat16).eval()
  assistant.generation_config.num_assistant_tokens = 4
  assistant.generation_config.num_assistant_tokens_schedule = "constant"
  prompt = torch.from_numpy(np.random.default_rng(0).integers(
      3, cfg.vocab_size, (1, _E2E_PROMPT.value))).to(dev)
  out = {"transformers": transformers.__version__, "torch": torch.__version__}
  for label, kw in (("plain", {}), ("assistant_k4", {"assistant_model": assistant})):
    if _late(f"hf {name} {label}"):
      break
    gen = lambda n, kw=kw: model.generate(prompt, max_new_tokens=n, min_new_tokens=n,
                                          do_sample=False, **kw)
    with torch.inference_mode():
      gen(8)
      if dev.type == "cuda":
        torch.cuda.synchronize()
      t0 = time.perf_counter()
      res = gen(_E2E_NEW.value)
      if dev.type == "cuda":
        torch.cuda.synchronize()
      sec = time.perf_counter() - t0
    n = int(res.shape[1] - prompt.shape[1])
    out[label] = {"seconds": sec, "new_tokens": n, "tokens_per_second": n / sec}
    logging.info("hf %s %s: %.1f tokens/s", name, label, n / sec)
  del model, assistant
  if dev.type == "cuda":
    torch.cuda.empty_cache()
  return out


def pair_entries(path: str) -> dict:
  """The speed entries of a reproduction record (plain vs speculative in the same process)."""
  rec = json.loads(pathlib.Path(path).read_text())
  keep = ("batch", "temperature", "draft_lengths", "adaptive", "plain_tokens_per_second",
          "speculative_tokens_per_second", "speedup", "tokens_per_forward", "outputs_equal",
          "workload")
  ev = rec["evaluation"]
  return {"source": pathlib.Path(path).name,
          "target_params": rec["target"]["params"], "drafter_params": rec["drafter"]["params"],
          "speed": [{k: e[k] for k in keep if k in e} for conv in ev.values()
                    for e in conv.get("speed", [])],
          "workloads": [w for conv in ev.values() for w in conv.get("workloads", [])]}


def plot(record: dict, path: pathlib.Path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  models = {k: v for k, v in record.get("models", {}).items() if v.get("decode")}
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
  ax = axes[0]
  labels, fracs = [], []
  for name, m in models.items():
    for d in m["decode"]:
      labels.append(f"{name.replace('gemma4_', '').replace('_a4b', '')}\nB{d['batch']} {d['context'] // 1024}k")
      fracs.append(d["bandwidth_fraction"])
  ax.bar(range(len(fracs)), fracs, color="tab:blue")
  ax.set_xticks(range(len(fracs)), labels, fontsize=6)
  ax.axhline(1.0, color="gray", lw=0.8)
  ax.set_ylabel("achieved / copy bandwidth")
  ax.set_title("plain decode: bytes per step / time")
  ax = axes[1]
  for name, m in models.items():
    rows = [r for r in m.get("predicted_speedups", []) if r["draft_length"] == 4]
    if rows:
      ax.plot([r["acceptance"] for r in rows], [r["speedup"] for r in rows], marker="o",
              label=f"{name.replace('gemma4_', '')} predicted, K=4")
  pair = record.get("pair", {})
  for s in pair.get("speed", []):
    if s.get("batch") == 1 and s.get("temperature") == 0.0:
      ax.axhline(s["speedup"], ls="--", lw=0.8, color="tab:red" if s["adaptive"] else "tab:green",
                 label=f"GPU pair measured, B1 greedy {'adaptive' if s['adaptive'] else 'K=' + str(s['draft_lengths'])}")
  ax.set_xlabel("per-draft acceptance")
  ax.set_ylabel("speedup over plain decoding")
  ax.set_title("speculative decoding")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  parts = set(_PARTS.value)
  if not parts or parts - set(PARTS):
    what = f"unknown {sorted(parts - set(PARTS))}" if parts else "none given"
    raise app.UsageError(f"--parts: {what}; known: {', '.join(PARTS)}")
  unknown = [m for m in _MODELS.value if m not in config_lib.PRESETS]
  if unknown:
    raise app.UsageError(f"--models: unknown {unknown}; known: {', '.join(config_lib.PRESETS)}")
  if parts <= {"hf", "pair"}:
    # JAX only describes the machine here: leave the GPU's memory to torch.
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  stamp = time.strftime("%Y%m%d-%H%M%S")
  device = jax.devices()[0].device_kind.replace(" ", "_")
  out = pathlib.Path(_OUT.value or pathlib.Path(__file__).parent / "results" /
                     f"benchmark_{device}_{stamp}.json")
  run_flags = {f.name: f.value for f in flags.FLAGS.get_key_flags_for_module(__name__)}
  record: dict = {"experiment": "benchmark", "flags": run_flags, "models": {}}
  if _UPDATE.value:
    if not out.is_file():
      raise app.UsageError(f"--update: no record at {out}")
    record = json.loads(out.read_text())
    record.setdefault("updates", []).append(
        {"parts": sorted(parts), "environment": metrics.environment(), "flags": run_flags})

  def save():
    metrics.write_record(out, record)   # an existing "environment" (--update) is kept

  copy_gbs = None
  if "copy" in parts:
    record["copy"] = bench.copy_bandwidth(_COPY_MB.value << 20)
    copy_gbs = record["copy"]["gb_per_s"]
    logging.info("copy bandwidth: %.0f GB/s", copy_gbs)
    save()
  if parts & {"decode", "verify", "drafter", "predict", "int8"}:
    if copy_gbs is None:
      raise app.UsageError("decode figures need the copy part (bandwidth_fraction)")
    for name in _MODELS.value:   # (--update) replaces the measured parts of these models
      if _late(name):
        break
      entry = measure_model(name, copy_gbs, parts)
      if _UPDATE.value and "decode" not in parts:   # keep the stored decode table (the entry
        entry.pop("decode", None)                   # holds only the int8 / verify baseline)
      record["models"][name] = {**record["models"].get(name, {}), **entry}
      save()
  if "e2e" in parts:
    record["e2e"] = {}
    for name in _E2E_MODELS.value:
      if _late(f"e2e {name}"):
        break
      record["e2e"][name] = end_to_end(name)
      save()
  if "hf" in parts:
    record["hf"] = {}
    for name in _E2E_MODELS.value:
      record["hf"][name] = hf_generate(name)
      save()
  if "pair" in parts and _PAIR_RECORD.value:
    record["pair"] = pair_entries(_PAIR_RECORD.value)
  record["total_s" if not _UPDATE.value else "update_s"] = time.perf_counter() - _T0
  save()
  if _PLOT.value and record["models"]:
    plot(record, out.with_suffix(".png"))
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
