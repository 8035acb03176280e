"""The public entry points: `load_target`, `score`, `generate`."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemma_mtp import checkpoint
from gemma_mtp import decoding
from gemma_mtp import drafter_kinds
from gemma_mtp import model as model_lib
from gemma_mtp import params as params_lib
from gemma_mtp import quant
from gemma_mtp import speculative
from gemma_mtp.config import ModelConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Target:
  """A target (verifier) model: its architecture and parameters."""

  config: ModelConfig
  params: Any


@dataclasses.dataclass
class GenerateOutput:
  """Attributes:
    tokens: one list of new token ids per row (EOS included, nothing after it).
    stats: counters of the run (`target_forwards`, ... ; see `generate`).
    adaptive_state: with a drafter, the adaptive rule's estimator after the run
      (`speculative.AdaptiveState` of host arrays): pass it to the next `generate` call of the
      same speculative settings to carry the estimate over. None without a drafter.
  """

  tokens: list[list[int]]
  stats: dict
  adaptive_state: Any = None


def random_target(config: ModelConfig, seed: int = 0) -> Target:
  """A target with random parameters (tests, benchmarks)."""
  return Target(config, params_lib.init_params(config, jax.random.PRNGKey(seed)))


def load_target(path: str | os.PathLike, *, dtype: str | None = None) -> Target:
  """Loads a Hugging Face Gemma 4 directory (safetensors) or one of our Orbax directories.

  Args:
    path: directory with `config.json` + `*.safetensors`, or written by `checkpoint.save_params`
      (float or int8-quantized params).
    dtype: compute and parameter dtype ('bfloat16' / 'float32'); default: the checkpoint's.
  """
  cfg, params = checkpoint.load_target(path)
  if dtype is not None and (dtype != cfg.dtype or dtype != cfg.param_dtype):
    cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
    params = quant.cast(params, dtype)
  log.info("loaded target %s from %s", _describe(cfg), os.fspath(path))
  return Target(cfg, params)


def quantize_target(target: Target, *, embeddings: bool = False, donate: bool = False) -> Target:
  """The target with int8 weights (`quant.quantize_params`); forward and decoding take it as is.

  A fused target (`fuse_target`) comes back fused. `donate`: a fused target's weights are freed
  as they are split (peak memory: the float model plus the int8 one); `target` is unusable
  afterwards."""
  cfg, params = target.config, target.params
  fused = params_lib.is_fused(params)
  if fused:
    params = model_lib.unfuse_projections(params, cfg, donate=donate)
  params = quant.quantize_params(params, cfg, embeddings=embeddings)
  return Target(cfg, model_lib.fuse_projections(params, cfg, donate=True) if fused else params)


def fuse_target(target: Target, *, donate: bool = False) -> Target:
  """The target in the fused inference layout (`model.fuse_projections`: one q|k|v and one
  gate|up matmul per layer): the same outputs, faster decoding on a GPU (31B shape at batch 1:
  16.7 -> 16.1 ms per step on an H200). For one device; `donate` frees the original weights as
  they are joined (the target passed in is unusable afterwards)."""
  return Target(target.config, model_lib.fuse_projections(target.params, target.config,
                                                          donate=donate))


def _describe(cfg: ModelConfig) -> str:
  n = params_lib.count_params(params_lib.param_specs(cfg))
  return f"({n / 1e6:.1f}M params, {cfg.num_layers} layers, D={cfg.embed_dim}, {cfg.dtype})"


@functools.partial(jax.jit, static_argnames=("config",))
def _score(params, tokens, *, config):
  return model_lib.forward(params, tokens, config=config).logits


def score(target: Target, tokens) -> jax.Array:
  """Causal logits [B, T, V] (float32) of token ids [B, T], without a cache."""
  tokens = np.asarray(tokens)
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
  v = target.config.vocab_size
  if tokens.size and (tokens.min() < 0 or tokens.max() >= v):
    bad = tokens[(tokens < 0) | (tokens >= v)][0]
    raise ValueError(f"token id {int(bad)} is outside the vocabulary [0, {v})")
  return _score(target.params, jnp.asarray(tokens, jnp.int32), config=target.config)


@functools.partial(jax.jit, static_argnames=("config", "max_len"))
def _prefill_logits(params, batch, *, config, max_len):
  return model_lib.prefill(params, batch.tokens, batch.start, config=config, max_len=max_len)[0].logits


def _time_prefill(target: Target, batch, max_len: int) -> float:
  """Seconds of the prefill alone (a separate program, compiled on its first use)."""
  kw = dict(config=target.config, max_len=decoding.round_up(max_len, decoding.PROMPT_BUCKET))
  jax.block_until_ready(_prefill_logits(target.params, batch, **kw))
  t0 = time.perf_counter()
  jax.block_until_ready(_prefill_logits(target.params, batch, **kw))
  return time.perf_counter() - t0


def generate(target: Target, prompts, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             eos_id: int | list[int] | None = None, drafter=None,
             draft_lengths: tuple[int, ...] = (1, 2, 4, 8), adaptive: bool = True,
             trees: tuple = (), spec_config: speculative.SpecConfig | None = None,
             cache_size: int | None = None, timing: bool = False,
             return_drafts: bool = False,
             adaptive_state: speculative.AdaptiveState | None = None) -> GenerateOutput:
  """Generates up to `max_new_tokens` per row (greedy when temperature == 0).

  Without a drafter: plain decoding, one target forward per token. With a drafter
  (`load_drafter` / `random_drafter`): speculative decoding whose output equals plain decoding
  (greedy: token for token; sampling: in distribution).

  Args:
    prompts: ragged list of token-id lists, or an int array [B, T].
    eos_id: token id(s) that end a row (included in its output).
    drafter: a drafter of any kind for `target` (`drafter_kinds`), or None.
    draft_lengths: static draft-length buckets; `adaptive=False` uses the first for every round.
    trees: static draft-tree buckets after the chains (`TreeSpec`, e.g.
      `TreeSpec.from_widths((3, 2, 1, 1))`; pass draft_lengths=() for trees alone); they need an
      assistant drafter with the 'clean' convention (ValueError otherwise).
    spec_config: full speculative settings (overrides draft_lengths / adaptive / trees).
    cache_size: optional cap on cache positions (prompt + new tokens must fit).
    timing: add `wall_seconds` (blocks until done; includes compilation on a first call) and its
      split into `prefill_seconds` (timed again as a separate program) and `decode_seconds`.
    return_drafts: with a drafter, add `drafts`: per round, per row, the proposed drafts.
    adaptive_state: with a drafter, the estimator to start from: `.adaptive_state` of an earlier
      call with the same speculative settings (what a serving loop does: the acceptance of
      one request predicts the next one's, and no call restarts from the prior; no
      recompilation), or None for the prior.
  Returns:
    GenerateOutput with `.tokens` and `.stats`: target_forwards, new_tokens, tokens_per_forward
    (new tokens per target forward per row, prefill excluded); with a drafter also drafted,
    accepted, acceptance_by_position (per draft position; a tree: per depth), bucket_counts
    {K or tree label: rounds}, bucket_trace (K or tree label per round),
    final_acceptance_estimate and final_acceptance_by_position (the estimator's); with trees
    also accepted_by_rank and positions_per_forward (`speculative.stats_of`).
  """
  cfg = target.config
  sampler = decoding.default_sampler(temperature, top_k, top_p)
  batch = decoding.make_prompt_batch(prompts, vocab_size=cfg.vocab_size)
  rows = batch.tokens.shape[0]
  eos_ids = decoding.normalize_eos(eos_id)
  t0 = time.perf_counter()
  estimator = None
  if drafter is None:
    max_len = decoding.check_capacity(cfg, batch.tokens.shape[1], max_new_tokens,
                                      cache_size=cache_size)
    out, count, steps = decoding.plain_generate(
        target.params, batch, jax.random.PRNGKey(seed), config=cfg, sampler=sampler,
        max_new=max_new_tokens, eos_ids=eos_ids,
        max_len=decoding.round_up(max_len, decoding.PROMPT_BUCKET))
    out, count, steps = jax.device_get((out, count, steps))
    forwards = int(steps)
    stats = {"target_forwards": forwards, "new_tokens": int(count.sum()),
             "tokens_per_forward": (int(count.sum()) - rows) / max(
                 int(np.sum(np.maximum(count - 1, 0))), 1)}
  else:
    spec = spec_config or speculative.SpecConfig(draft_lengths=tuple(draft_lengths),
                                                 adaptive=adaptive, trees=tuple(trees))
    max_len = decoding.check_capacity(cfg, batch.tokens.shape[1], max_new_tokens,
                                      slack=spec.max_chunk, cache_size=cache_size)
    state = speculative.speculative_generate(
        target.params, drafter.params, batch, jax.random.PRNGKey(seed), tcfg=cfg,
        dcfg=drafter.config, spec=spec, sampler=sampler, max_new=max_new_tokens,
        eos_ids=eos_ids, max_len=decoding.round_up(max_len, decoding.PROMPT_BUCKET),
        # Never None here: the prior and a carried state then share one compiled program.
        adaptive_state=(speculative.initial_adaptive_state(spec) if adaptive_state is None
                        else adaptive_state))
    # One transfer; the host estimator passes back in as the prior does (same program).
    state = jax.device_get(state.replace(cache=None))
    stats = speculative.stats_of(state, spec, rows, drafts=return_drafts)
    out, count, estimator = state.out, state.count, state.adaptive
  if timing:
    stats["wall_seconds"] = time.perf_counter() - t0
    stats["prefill_seconds"] = _time_prefill(target, batch, max_len)
    stats["decode_seconds"] = stats["wall_seconds"] - stats["prefill_seconds"]
  return GenerateOutput(tokens=decoding.rows_to_lists(out, count), stats=stats,
                        adaptive_state=estimator)


# ---- drafters ------------------------------------------------------------------------------------

@dataclasses.dataclass
class Drafter:
  """A drafter shaped for one target: its config (of any kind, see `drafter_kinds`: an MTP
  assistant `DrafterConfig`, `ParallelHeadsConfig` or `SelfDrafterConfig`) and parameters."""

  config: Any
  params: Any


def load_drafter(path: str | os.PathLike, target: Target, *,
                 convention: str | None = None) -> Drafter:
  """Loads a HF `Gemma4AssistantForCausalLM` directory or one of our Orbax drafter directories
  (any kind; the kind is stored in the checkpoint).

  The drafter must match `target` (`checkpoint.check_drafter_matches`: width, vocabulary, tap head
  dims / KV heads, window; ValueError naming the values otherwise) and is cast to the target's
  dtype.

  Args:
    convention: 'hf' or 'clean' (see `drafter.tap_masks`; assistant drafters only); default 'hf'
      for HF directories, the stored one for Orbax directories.
  """
  cfg, params = checkpoint.load_drafter(path, target.config, convention=convention)
  log.info("loaded %s from %s", drafter_kinds.describe(cfg), os.fspath(path))
  return Drafter(cfg, params)


def random_drafter(target: Target, *, kind: str = "assistant", seed: int = 0,
                   **config) -> Drafter:
  """A random drafter of `kind` shaped for `target` (for tests and benchmarks).

  Args:
    kind: 'assistant', 'parallel_heads' or 'self' (`drafter_kinds`).
    config: the kind's `for_target` arguments. assistant (`drafter.for_target`): embed_dim,
      num_heads, mlp_dim, num_layers=4 (layers S, ..., S, F), num_centroids=0,
      centroid_top_k=32, convention='hf'; parallel_heads: num_heads, mlp_dim; self: num_layers,
      adapter_rank=0 (its adapter starts at zero, so "random" is the plain layer prefix).
  """
  cfg = drafter_kinds.for_target(target.config, kind=kind, **config)
  checkpoint.check_drafter_matches(cfg, target.config)
  return Drafter(cfg, drafter_kinds.init_params(cfg, jax.random.PRNGKey(seed)))
