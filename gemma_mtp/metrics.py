"""Measurements: speculative vs plain generation side by side, and JSON records of runs."""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import time
from typing import Any, Sequence

import jax
import numpy as np


def environment() -> dict[str, Any]:
  """Machine and versions, for every record."""
  import flax  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from gemma_mtp import decode_attention, drafter_kernels, matvec, ple_kernels
  devices = jax.devices()
  return {
      "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "platform": devices[0].platform,
      "device_kind": devices[0].device_kind,
      "device_count": len(devices),
      "host": platform.machine(),
      "cpu_count": os.cpu_count(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "flax": flax.__version__,
      "numpy": np.__version__,
      # whether the Pallas kernels were on for programs traced in this process (auto: one GPU;
      # the decode attention and PLE kernels then up to their AUTO_MAX_BATCH rows)
      "pallas_kernels": {"matvec": matvec.enabled(), "drafter": drafter_kernels.enabled(),
                         "decode_attention": decode_attention.enabled(),
                         "ple": ple_kernels.enabled()},
  } | ({"xla_flags": os.environ["XLA_FLAGS"]} if os.environ.get("XLA_FLAGS") else {})


def write_record(path: str | os.PathLike, record: dict[str, Any]) -> pathlib.Path:
  """Writes `record` (plus `environment`, unless it has one) as indented JSON, atomically, with
  this machine's directories scrubbed (`scrub_paths`); creates parent directories."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  record = {"environment": environment(), **record}
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(scrub_paths(json.dumps(record, indent=2, default=_jsonable)) + "\n")
  os.replace(tmp, path)
  return path


def scrub_paths(text: str) -> str:
  """Replaces this machine's directories in `text` by portable names (records are committed)."""
  import sysconfig  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  paths = sysconfig.get_paths()
  names = [(paths["purelib"], "<site-packages>"), (paths["platlib"], "<site-packages>"),
           (paths["stdlib"], "<stdlib>"), (os.getcwd(), "."),
           (tempfile.gettempdir(), "<tmp>"), (os.path.expanduser("~"), "~")]
  for prefix, name in sorted(names, key=lambda x: -len(x[0])):
    if len(prefix) > 1:
      text = text.replace(prefix, name)
  return text


def _jsonable(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


def timed_generate(generate, target, prompts, *, repeats: int = 3, **kw) -> tuple[Any, float]:
  """Runs `generate` once to compile, then `repeats` times; returns (last output, best seconds)."""
  out = generate(target, prompts, **kw)
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = generate(target, prompts, **kw)
    best = min(best, time.perf_counter() - t0)
  return out, best


def compare(target, drafter, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
            draft_lengths=(1, 2, 4, 8), adaptive=True, temperature=0.0, top_k=None, top_p=None,
            eos_id=None, repeats: int = 3, seed: int = 0,
            draft_cost: float | None = None,
            verify_costs: dict[int, float] | None = None) -> dict[str, Any]:
  """Plain and speculative generation of the same prompts in the same process.

  Returns a dict with tokens/s of both (new tokens / best wall time of `repeats` runs after a
  compiling run), the speedup, and the speculative statistics. With temperature 0 it also checks
  that both outputs are equal (`outputs_equal`). `draft_lengths`: the buckets, chain lengths K
  and/or `tree.TreeSpec`s, chains first (`spec_config`); the record lists them as
  `draft_lengths` (the Ks) and, if any, `trees` (their labels). `draft_cost`, `verify_costs`:
  the adaptive rule's costs (`spec_config`). Every call starts from the prior estimate (the
  timed calls repeat the same prompts, so a carried estimate would have seen them).
  """
  from gemma_mtp import api  # pylint: disable=g-import-not-at-top
  kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            eos_id=eos_id, seed=seed)
  plain, t_plain = timed_generate(api.generate, target, prompts, repeats=repeats, **kw)
  config = spec_config(draft_lengths, adaptive, draft_cost, verify_costs)
  spec, t_spec = timed_generate(api.generate, target, prompts, repeats=repeats, drafter=drafter,
                                spec_config=config, **kw)
  n_plain, n_spec = plain.stats["new_tokens"], spec.stats["new_tokens"]
  result = {
      "batch": len(prompts),
      "max_new_tokens": max_new_tokens,
      "temperature": temperature,
      **bucket_fields(config),
      "adaptive": adaptive,
      "draft_cost": config.draft_cost,
      "verify_costs": list(config.verify_costs),
      "plain_seconds": t_plain,
      "speculative_seconds": t_spec,
      "plain_tokens_per_second": n_plain / t_plain,
      "speculative_tokens_per_second": n_spec / t_spec,
      "speedup": (n_spec / t_spec) / (n_plain / t_plain),
      **{k: v for k, v in spec.stats.items() if k not in ("drafts",)},
  }
  if temperature == 0.0:
    result["outputs_equal"] = plain.tokens == spec.tokens
  return result


def spec_config(draft_lengths, adaptive: bool, draft_cost: float | None = None,
                verify_costs: dict[int, float] | None = None):
  """`SpecConfig` of these buckets, with `draft_cost` if given (else the default).

  `draft_lengths` are buckets: ints K (chains) and/or `tree.TreeSpec` (trees), chains first as
  `SpecConfig` numbers them (ValueError otherwise, so that "the first bucket" of a non-adaptive
  run is the one given first). `verify_costs`: {K: cost of verifying K drafts relative to one
  decode step} (`bench.verify_costs`' "ratio"), covering every chain bucket; None: 1 for all.
  """
  from gemma_mtp import speculative  # pylint: disable=g-import-not-at-top
  from gemma_mtp import tree as tree_lib  # pylint: disable=g-import-not-at-top
  buckets = tuple(draft_lengths)
  is_tree = [isinstance(b, tree_lib.TreeSpec) for b in buckets]
  if is_tree != sorted(is_tree):
    raise ValueError(f"chain lengths must come before trees in the buckets, got "
                     f"{[b.label if t else b for b, t in zip(buckets, is_tree)]}")
  extra = {} if draft_cost is None else {"draft_cost": float(draft_cost)}
  chains = [int(b) for b, t in zip(buckets, is_tree) if not t]
  if verify_costs is not None:
    missing = [k for k in chains if k not in verify_costs]
    if missing:
      raise ValueError(f"verify_costs {verify_costs} has no cost for draft lengths {missing}")
    extra["verify_costs"] = tuple(float(verify_costs[k]) for k in chains)
  return speculative.SpecConfig(draft_lengths=tuple(chains),
                                trees=tuple(b for b, t in zip(buckets, is_tree) if t),
                                adaptive=adaptive, **extra)


def bucket_fields(config) -> dict[str, Any]:
  """The record fields naming a `SpecConfig`'s buckets: draft_lengths [K...], and with trees
  also trees [label...] and tree_nodes [N...]."""
  fields: dict[str, Any] = {"draft_lengths": list(config.draft_lengths)}
  if config.trees:
    fields["trees"] = [t.label for t in config.trees]
    fields["tree_nodes"] = [t.num_nodes for t in config.trees]
  return fields


def leviathan_speedup(acceptance: float, k: int, cost: float) -> float:
  """Expected speedup of K drafts at per-draft acceptance a and drafter/target cost ratio c."""
  a = min(acceptance, 0.999999)
  return (1 - a ** (k + 1)) / ((1 - a) * (k * cost + 1))
