"""Prompt batching and plain autoregressive generation as one compiled `lax.while_loop`."""

from __future__ import annotations

import functools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gemma_mtp import model as model_lib
from gemma_mtp import sampling
from gemma_mtp.config import ModelConfig
from gemma_mtp.kv_cache import KVCache

PAD_ID = 0
PROMPT_BUCKET = 16  # prompts are left-padded to a multiple of this, to share compiled programs


def round_up(n: int, m: int) -> int:
  return -(-n // m) * m


@flax.struct.dataclass
class PromptBatch:
  """Left-padded prompts.

  Attributes:
    tokens: [B, T] int32, row b = start[b] pads then its prompt.
    start: [B] int32 index of each row's first prompt token.
  """

  tokens: jax.Array
  start: jax.Array


def make_prompt_batch(prompts, *, vocab_size: int, bucket: int = PROMPT_BUCKET) -> PromptBatch:
  """Validates token-id prompts (ragged list of lists, or an int array [B, T]) and left-pads them."""
  if isinstance(prompts, (np.ndarray, jax.Array)):
    arr = np.asarray(prompts)
    if arr.ndim != 2:
      raise ValueError(f"prompts array must be [batch, length], got shape {arr.shape}")
    rows = [list(r) for r in arr]
  else:
    rows = [list(r) for r in prompts]
  if not rows:
    raise ValueError("prompts is empty")
  for b, r in enumerate(rows):
    if not r:
      raise ValueError(f"prompt {b} is empty")
    bad = [t for t in r if not 0 <= int(t) < vocab_size]
    if bad:
      raise ValueError(f"prompt {b} has token id {int(bad[0])} outside the vocabulary "
                       f"[0, {vocab_size})")
  t = round_up(max(len(r) for r in rows), bucket)
  tokens = np.full((len(rows), t), PAD_ID, np.int32)
  start = np.zeros((len(rows),), np.int32)
  for b, r in enumerate(rows):
    tokens[b, t - len(r):] = r
    start[b] = t - len(r)
  return PromptBatch(tokens=jnp.asarray(tokens), start=jnp.asarray(start))


def check_capacity(cfg: ModelConfig, prompt_len: int, max_new_tokens: int, slack: int = 0,
                   cache_size: int | None = None) -> int:
  """Cache slots needed for a padded prompt plus new tokens; raises if it does not fit."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  need = prompt_len + max_new_tokens + slack
  limit = cfg.max_seq_len if cache_size is None else min(cache_size, cfg.max_seq_len)
  if need > limit:
    raise ValueError(f"prompt ({prompt_len} tokens after padding) + {max_new_tokens} new tokens "
                     f"+ {slack} slack = {need} exceeds the cache ({limit} positions)")
  return need


def is_eos(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
  if not eos_ids:
    return jnp.zeros(tokens.shape, bool)
  return jnp.isin(tokens, jnp.asarray(eos_ids, jnp.int32))


@flax.struct.dataclass
class DecodeState:
  """State of the plain decoding loop.

  Attributes:
    cache: KV cache; `length` is where the next input token goes.
    last: [B] int32 last emitted token (next input).
    out: [B, N] int32 emitted tokens, -1 beyond `count`.
    count: [B] int32 tokens emitted per row.
    done: [B] bool row finished (EOS emitted or N tokens reached).
    steps: () int32 target forwards after the prefill.
    rng: PRNG key, split every step.
  """

  cache: KVCache
  last: jax.Array
  out: jax.Array
  count: jax.Array
  done: jax.Array
  steps: jax.Array
  rng: jax.Array


def emit(out, count, done, tokens, *, eos_ids, max_new):
  """Appends one token per unfinished row; returns (out, count, done)."""
  rows = jnp.arange(out.shape[0])
  out = out.at[rows, jnp.minimum(count, max_new - 1)].set(
      jnp.where(done, out[rows, jnp.minimum(count, max_new - 1)], tokens))
  count = count + (~done).astype(jnp.int32)
  done = done | is_eos(tokens, eos_ids) | (count >= max_new)
  return out, count, done


@functools.partial(jax.jit, static_argnames=("config", "sampler", "max_new", "eos_ids", "max_len"))
def plain_generate(params, batch: PromptBatch, rng, *, config: ModelConfig,
                   sampler: sampling.SamplingParams, max_new: int, eos_ids: tuple[int, ...],
                   max_len: int):
  """Prefill, then one target forward per token inside a `lax.while_loop`.

  Returns:
    (out [B, max_new] int32 padded with -1, count [B], steps ()).
  """
  b = batch.tokens.shape[0]
  out0, cache = model_lib.prefill(params, batch.tokens, batch.start, config=config,
                                  max_len=max_len)
  rng, key = jax.random.split(rng)
  first = sampling.sample(key, out0.logits[:, -1], sampler)
  out, count, done = emit(jnp.full((b, max_new), -1, jnp.int32), jnp.zeros((b,), jnp.int32),
                          jnp.zeros((b,), bool), first, eos_ids=eos_ids, max_new=max_new)
  state = DecodeState(cache=cache, last=first, out=out, count=count, done=done,
                      steps=jnp.zeros((), jnp.int32), rng=rng)

  def body(s: DecodeState) -> DecodeState:
    res = model_lib.forward(params, s.last[:, None], config=config, cache=s.cache)
    rng, key = jax.random.split(s.rng)
    tok = sampling.sample(key, res.logits[:, 0], sampler)
    out, count, done = emit(s.out, s.count, s.done, tok, eos_ids=eos_ids, max_new=max_new)
    cache = res.cache.replace(length=res.cache.length + 1)
    return DecodeState(cache=cache, last=tok, out=out, count=count, done=done,
                       steps=s.steps + 1, rng=rng)

  state = jax.lax.while_loop(lambda s: ~jnp.all(s.done), body, state)
  return state.out, state.count, state.steps


def normalize_eos(eos_id) -> tuple[int, ...]:
  if eos_id is None:
    return ()
  if isinstance(eos_id, (int, np.integer)):
    return (int(eos_id),)
  return tuple(int(e) for e in eos_id)


def rows_to_lists(out: np.ndarray, count: np.ndarray) -> list[list[int]]:
  return [[int(t) for t in out[b, :count[b]]] for b in range(out.shape[0])]


def default_sampler(temperature: float, top_k: int | None, top_p: float | None
                    ) -> sampling.SamplingParams:
  return sampling.SamplingParams(temperature=float(temperature), top_k=top_k, top_p=top_p)


__all__: Sequence[str] = ("PromptBatch", "make_prompt_batch", "plain_generate", "DecodeState")
