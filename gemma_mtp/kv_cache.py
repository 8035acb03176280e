"""KV cache: full-context buffers for full-attention layers, ring buffers for sliding layers.

Sequences are left-padded: row b's real tokens occupy sequence indices start[b], start[b] + 1, ...
and its RoPE position is index - start[b]. A full layer stores index i in slot i; a sliding layer
stores it in slot i % R, with R = window + max_chunk - 1 so that writing a chunk of up to max_chunk
positions never evicts a key that a query of the chunk still sees. `ring_idx` records which index
each ring slot holds, so masks need no modular arithmetic and stale slots are harmless.

Only the forward pass writes K/V; it never advances `length`. The caller commits how many of the
written positions are kept (plain decoding: all; speculative decoding: the accepted ones), so a
rejected draft costs a length update, never a copy: its entries are overwritten next round and are
invisible until then because they lie in the future of every later query. A draft-tree round
(tree.py) writes its nodes at length + node and `compact` moves the accepted path's K/V to
length + 1.. before the same length update.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from gemma_mtp.config import ModelConfig


@flax.struct.dataclass
class KVCache:
  """Per-layer K/V plus the bookkeeping shared by all layers.

  Attributes:
    k, v: tuple over layers; entry l is [B, S_l, K_l, H_l] for layers that own K/V (S_l = max_len
      for full layers, R for sliding layers) and None for KV-shared layers.
    ring_idx: [B, R] int32, sequence index held by each sliding ring slot (-1: empty).
    start: [B] int32, index of each row's first real token.
    length: [B] int32, index at which each row's next token will be written.
    max_len: (static) slots of the full-layer buffers, the longest sequence the cache holds.
  """

  k: tuple
  v: tuple
  ring_idx: jax.Array
  start: jax.Array
  length: jax.Array
  max_len: int = flax.struct.field(pytree_node=False)

  @property
  def ring_size(self) -> int:
    return self.ring_idx.shape[1]

  def slot_indices(self, is_full: bool) -> jax.Array:
    """[B, S] sequence index held by each slot of a full (S = max_len) or sliding layer buffer."""
    if is_full:
      b = self.start.shape[0]
      return jnp.broadcast_to(jnp.arange(self.max_len, dtype=jnp.int32), (b, self.max_len))
    return self.ring_idx


def ring_size(cfg: ModelConfig, max_len: int, max_chunk: int) -> int:
  return min(cfg.sliding_window + max_chunk - 1, max_len)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, *, max_chunk: int = 1,
               start: jax.Array | None = None, dtype=None) -> KVCache:
  """An empty cache for `batch` rows of up to `max_len` sequence indices.

  Args:
    max_chunk: the most positions one forward will write (1 for plain decoding, K + 1 for
      speculative verification of K drafts; a prefill may be longer, see `write`).
    start: [B] first real index of each row (default 0).
  """
  dtype = jnp.dtype(dtype or cfg.dtype)
  r = ring_size(cfg, max_len, max_chunk)
  ks, vs = [], []
  for layer in range(cfg.num_layers):
    if cfg.is_kv_shared(layer):
      ks.append(None)
      vs.append(None)
      continue
    s = max_len if cfg.is_full(layer) else r
    shape = (batch, s, cfg.layer_kv_heads(layer), cfg.layer_head_dim(layer))
    ks.append(jnp.zeros(shape, dtype))
    vs.append(jnp.zeros(shape, dtype))
  start = jnp.zeros((batch,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
  return KVCache(k=tuple(ks), v=tuple(vs), ring_idx=jnp.full((batch, r), -1, jnp.int32),
                 start=start, length=start * 0, max_len=max_len)


def write(buf: jax.Array, new: jax.Array, idx: jax.Array) -> jax.Array:
  """Writes new[b, t] into slot idx[b, t] % S of buf [B, S, K, H].

  A chunk longer than the buffer (a prefill longer than the sliding ring) keeps its last S
  entries, which are the only ones a later query can see.
  """
  s, t = buf.shape[1], new.shape[1]
  if t > s:
    new, idx = new[:, t - s:], idx[:, t - s:]
  rows = jnp.arange(buf.shape[0])[:, None]
  return buf.at[rows, idx % s].set(new.astype(buf.dtype))


def compact(cache: KVCache, src: jax.Array, num: jax.Array) -> KVCache:
  """Moves the accepted path of a tree round into place (see tree.py).

  The K/V a tree forward wrote at index length + src[b, i] (BFS node src[b, i], the (i + 1)-th
  node of the path below the root) moves to index length + 1 + i, for i < num[b]; other entries
  are untouched, and the sliding rings' `ring_idx` labels the moved slots with their new index.
  All sources are read before any destination is written, so overlapping ranges are fine. For a
  chain (src[b, i] = i + 1) this is the identity.

  Args:
    src: [B, M] int32 path node indices below the root (node index = offset from `length`).
    num: [B] int32 accepted path length (<= M).
  """
  b, m = src.shape
  rows = jnp.arange(b)[:, None]
  dst = cache.length[:, None] + 1 + jnp.arange(m, dtype=jnp.int32)       # [B, M]
  src = cache.length[:, None] + src
  keep = jnp.arange(m) < num[:, None]

  def move(buf):
    if buf is None:
      return None
    s = buf.shape[1]
    # [B, M, K, H]: the path's entries where kept, else what the destination already holds.
    moved = jnp.where(keep[:, :, None, None], buf[rows, src % s], buf[rows, dst % s])
    return buf.at[rows, dst % s].set(moved)

  r = cache.ring_size
  labels = jnp.where(keep, dst, cache.ring_idx[rows, dst % r])
  return cache.replace(k=tuple(move(x) for x in cache.k), v=tuple(move(x) for x in cache.v),
                       ring_idx=cache.ring_idx.at[rows, dst % r].set(labels))


def write_ring_idx(ring_idx: jax.Array, idx: jax.Array) -> jax.Array:
  r, t = ring_idx.shape[1], idx.shape[1]
  if t > r:
    idx = idx[:, t - r:]
  rows = jnp.arange(ring_idx.shape[0])[:, None]
  return ring_idx.at[rows, idx % r].set(idx)
