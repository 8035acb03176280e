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
from gemma_mtp import model as model_lib
from gemma_mtp import params as params_lib
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
  """

  tokens: list[list[int]]
  stats: dict


def random_target(config: ModelConfig, seed: int = 0) -> Target:
  """A target with random parameters (tests, benchmarks)."""
  return Target(config, params_lib.init_params(config, jax.random.PRNGKey(seed)))


def load_target(path: str | os.PathLike, *, dtype: str | None = None) -> Target:
  """Loads a Hugging Face Gemma 4 directory (safetensors) or one of our Orbax directories.

  Args:
    path: directory with `config.json` + `*.safetensors`, or written by `checkpoint.save_params`.
    dtype: compute/param dtype override ('bfloat16' / 'float32'); default: the checkpoint's.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
  if checkpoint.is_orbax_dir(path):
    cfg, params = checkpoint.load_params(path)
    if dtype is not None:
      cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
      params = jax.tree_util.tree_map(lambda w: w.astype(dtype), params)
    log.info("loaded Orbax target from %s", path)
    return Target(cfg, params)
  kw = {} if dtype is None else {"dtype": dtype, "param_dtype": dtype}
  cfg = checkpoint.read_hf_config(path, **kw)
  params, report = checkpoint.load_hf_params(path, cfg)
  log.info("loaded Hugging Face target from %s (%s)", path, report.get("summary", ""))
  return Target(cfg, params)


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


def generate(target: Target, prompts, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             eos_id: int | list[int] | None = None, cache_size: int | None = None,
             timing: bool = False) -> GenerateOutput:
  """Generates up to `max_new_tokens` per row (greedy when temperature == 0).

  Args:
    prompts: ragged list of token-id lists, or an int array [B, T].
    eos_id: token id(s) that end a row (included in its output).
    cache_size: optional cap on cache positions (prompt + new tokens must fit).
    timing: add `wall_seconds` to the stats (blocks until the result is ready).
  Returns:
    GenerateOutput with `.tokens` and `.stats` = {target_forwards, new_tokens,
    tokens_per_forward[, wall_seconds]}.
  """
  cfg = target.config
  sampler = decoding.default_sampler(temperature, top_k, top_p)
  batch = decoding.make_prompt_batch(prompts, vocab_size=cfg.vocab_size)
  max_len = decoding.check_capacity(cfg, batch.tokens.shape[1], max_new_tokens,
                                    cache_size=cache_size)
  t0 = time.perf_counter()
  out, count, steps = decoding.plain_generate(
      target.params, batch, jax.random.PRNGKey(seed), config=cfg, sampler=sampler,
      max_new=max_new_tokens, eos_ids=decoding.normalize_eos(eos_id),
      max_len=decoding.round_up(max_len, decoding.PROMPT_BUCKET))
  out, count, steps = jax.device_get((out, count, steps))
  tokens = decoding.rows_to_lists(out, count)
  new = int(np.sum(count))
  stats = {"target_forwards": int(steps), "new_tokens": new,
           "tokens_per_forward": (new - len(tokens)) / max(int(steps), 1) / len(tokens)}
  if timing:
    stats["wall_seconds"] = time.perf_counter() - t0
  return GenerateOutput(tokens=tokens, stats=stats)
