"""The target's attention through the cache as two Pallas (Triton) kernels a layer, on GPUs:
decode steps (one position a row) and a chain's verification forwards (a few).

A decode step of the small targets is bound by its kernel count, not by its bytes (E4B: ~1,200
kernels, 4.0 ms where its weights allow ~2.3; NOTES runs O, P, U). XLA runs a layer's attention
as ~11 short kernels: the q|k|v norms, RoPE, slices, the two cache writes, the score GEMM, two
softmax reductions, a convert, the value GEMM and the pad of the o projection's input to two rows
(`quant.pad_one_row`). Here that is two kernels:

  attn:  one query head (q-normed and rotated in the kernel) over a range of the cache's slots,
         the normalised partial output and its log-sum-exp; range 0 also takes the step's own
         token, its key k-normed and rotated and its value v-normed in the kernel, and stores
         them into the token's cache slot, in place (`drafter_kernels._attn_kernel`, shared
         with the drafter step)                                              grid (B, N, P)
         With T > 1 positions a row (`_positions_kernel`): the head's T queries as the rows of
         a 16-row block, scores and values as tensor-core products, each cache chunk read once
         for all T; range 0 takes the forward's T tokens under the causal mask.
  rows:  a head's ranges combined into its output, in the model's dtype, with the zero rows of
         the o projection's two-row input where `quant` pads (so no pad kernel)
                                                                        grid (R * T, N, H / bc)

The forward's own slots are masked out of the cache pass (its tokens join from their
projection), so programs may read them before or after they are stored. In forwards of
several positions a row (OWN_RANGE_MIN_POSITIONS) the forward's own tokens are a range of their
own: program P of each head takes only them (and the first query head of each KV head stores
them), the cache's P ranges skip them, and the rows kernel combines the P + 1 written partials
(held in 2P slots, a power of two, the rest not read); decode steps keep them in range 0.
The attention kernel reads row b of the q|k|v projection's padded two-row output itself (no
slice kernel). KV-shared layers run the same kernel without the new tokens.

Measured on an H100 (NOTES runs BA-BF; step time against the same step with the switch off, in
the same process): batch 1, 1k context: E4B 4.86 -> 4.56 ms (1,198 -> 914 kernels a step),
E2B 2.96 -> 2.76, 26B-A4B 4.63 -> 4.35, 31B 22.15 -> 21.91; 8k context: E4B -9.0%, E2B -1.6%,
26B-A4B -4.9%, 31B a tie; batch 8: slower (E2B +4.3%), hence AUTO_MAX_BATCH. Verification
forwards of 2-5 positions, E4B / E2B: -1.7% to -3.8%; 26B-A4B and 31B slower (AUTO_MAX_POSITIONS);
the own tokens' range another -1.0% to -2.8% (batch 1) and -5% to -6% (batch 4, 5 positions).

Where it runs: `choose` (the switch `enabled()`: GPU and one device, or
GEMMA_MTP_ATTENTION_KERNELS=on; off switches it off; up to MAX_POSITIONS positions a row, a
cache, no tree, head dims whose half is a power of two >= 16, and under the automatic switch at
most AUTO_MAX_BATCH rows, and several positions only as AUTO_MAX_POSITIONS says), in the layers
of the fused projection layout and the KV-shared layers.
Off the GPU the kernels run in Pallas's interpreter, which is how the tests compare them with
XLA's attention.
Values: as `drafter_kernels` (float32 inside, rounded to the dtype where the model rounds; the
softmax is normalised after the value product, where `layers.attention` rounds the probabilities
first), so float32 agrees with XLA up to summation order and bfloat16 is as close to float32
arithmetic as XLA's path is, not bit-equal.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from gemma_mtp import drafter_kernels as dk
from gemma_mtp import layers
from gemma_mtp import matvec
from gemma_mtp import quant
from gemma_mtp.config import ModelConfig

F32 = jnp.float32
ENV = "GEMMA_MTP_ATTENTION_KERNELS"
# The automatic switch takes batches up to this. Measured on an H100 (NOTES runs BC, BD; step
# time with against without): E4B -6.3% / -6.1% / -4.3% at batch 1 / 2 / 4 and +0.8% at batch 8,
# E2B -7.0% / -6.6% / -4.6% and +4.3% (a head's 4-8 programs read the same keys and values, which
# XLA's batched GEMMs read once).
AUTO_MAX_BATCH = 4
# Cache chunks a program reads (about; `drafter_kernels._chunking`): fewer make more, shorter
# programs (E4B's 512-slot sliding layers: 8 heads x 16 ranges of one chunk of 32 slots). A knob
# for the step probe's variants (fused_attn_range2 / _range4). Measured on an H100 (NOTES runs
# BG, BU, BV; decode step against 2 chunks, the drafter's): batch 1 E4B -2.3% (twice), E2B
# -0.3% / -1.0%, 26B-A4B -0.2%; 4 chunks +3% to +9%; 5-position verification and E4B at batch 4
# the same.
RANGE_CHUNKS = 1
# Positions a row the kernels take (a chain's verification: K + 1), and under the automatic
# switch, which takes several positions only for models of at most AUTO_MAX_VERIFY_HEADS query
# heads. Measured on an H100 (NOTES runs BO-BS; batch 1, 1k context, the forward with against
# without): E4B (8 heads) 2 / 3 / 5 / 9 / 16 positions -2.9% / -3.0% / -3.3% / -0.8% / +37%,
# E2B (8) 2 / 5 / 9: -1.7% / -3.8% / +1.5%; 5 positions of 26B-A4B (16 heads) +1.3%, of 31B
# (32) +4.4% (a program per query head reads its KV head's keys again for each of them).
# The forward's own tokens (layers that own their K/V) as a cache range of their own in forwards
# of at least this many positions a row (None: never, 1: decode steps too): a program a head
# takes only them and stores them, while the cache's ranges skip them, instead of range 0
# taking both (its program then the longest). Run CC's profile (an H100, E4B): the owners'
# kernels take 10.4 (sliding) and 28 us (full) a call at 5 positions against 8 and 14.7 for the
# KV-shared layers'. Measured (NOTES runs CD, CF; an H100, 1k context, against range 0 in the
# same process): E4B batch 1, 2 / 3 / 5 positions -1.1% / -1.0% / -2.8% (and -1.8% in run CD),
# batch 4, 5 positions: E4B -6.2%, E2B -5.1%; decode steps mixed (E4B batch 1 0.0% / -1.0%,
# batch 4 -1.3%; E2B batch 1 -0.4%, batch 4 +1.9%), so they keep range 0.
OWN_RANGE_MIN_POSITIONS: int | None = 2
# Warps a program of the several-positions kernel (None: drafter_kernels.NUM_WARPS, 4). A guess
# after run CC (the full layers' [16, 512] float32 blocks may not fit 4 warps' registers) that
# run CD refuted: 8 warps made E4B's 5-position forward +5.7% slower (+3.4% with the own range).
POSITIONS_WARPS = None
# The several-positions kernel's q-, k- and v-norms as row-wise reductions over a block of the T
# positions (one a norm's half) instead of one block reduction a position and half (q: 2T, k:
# 2T, v: T in the program that takes the forward's own tokens); the tokens' keys and values
# then leave the block for their stores as masked sums (exact). Each block reduction waits on
# all of the program's warps: run CC's profile put E4B's programs at 8.0-10.4 us at 5 positions
# against 3.4-4.2 at one. Built in session 32, not yet measured on a GPU (step_probe variant
# fused_attn_block_norms), so off.
BLOCK_NORMS = False
MAX_POSITIONS = 16        # (at most BLOCK_ROWS)
AUTO_MAX_POSITIONS = 5
AUTO_MAX_VERIFY_HEADS = 8
BLOCK_ROWS = 16           # a program's query block (tensor-core products need 16 rows)


def enabled() -> bool:
  """Whether the switch is on in programs traced now (see the module doc)."""
  return matvec.switch(ENV)


def supported(cfg: ModelConfig) -> str | None:
  """None if the kernels take `cfg`'s heads, else why not."""
  bad = sorted({hd for hd in (cfg.head_dim, cfg.global_head_dim)
                if hd // 2 < 16 or hd & (hd - 1)})
  if bad:
    return f"head dims {bad} (half of a head must be a power of two >= 16)"
  return None


def own_range(tokens_per_row: int) -> bool:
  """Whether a forward of `tokens_per_row` positions a row takes its own tokens (layers that own
  their K/V) as a range of their own (OWN_RANGE_MIN_POSITIONS)."""
  least = OWN_RANGE_MIN_POSITIONS
  return least is not None and tokens_per_row >= least


def choose(cfg: ModelConfig, rows: int, tokens_per_row: int, has_cache: bool, tree) -> bool:
  """Whether `model.run_layers` runs this forward's attention as these kernels: through a cache,
  no tree, at most MAX_POSITIONS positions a row. The automatic switch takes batches up to
  AUTO_MAX_BATCH, and forwards of several positions a row (verification) only up to
  AUTO_MAX_POSITIONS of them and for models of at most AUTO_MAX_VERIFY_HEADS query heads; =on
  takes any."""
  if not (enabled() and has_cache and tree is None and tokens_per_row <= MAX_POSITIONS
          and supported(cfg) is None):
    return False
  return matvec.switch_mode(ENV) == "on" or auto_takes(cfg, rows, tokens_per_row)


def auto_takes(cfg: ModelConfig, rows: int, tokens_per_row: int) -> bool:
  """The automatic switch's rule for a forward the kernels can run (see `choose`)."""
  return rows <= AUTO_MAX_BATCH and (tokens_per_row == 1 or (
      tokens_per_row <= AUTO_MAX_POSITIONS and cfg.num_heads <= AUTO_MAX_VERIFY_HEADS))


def _combine_rows_kernel(o_ref, lse_ref, x_ref, *, rows, bc, zeros, rnd, block=None,
                         written=None):
  """Columns [c * bc, (c + 1) * bc) of head n's output for row b from its ranges' partials;
  the padding rows b >= rows zero (`zeros`) or row rows - 1 again. `block` = (T, rows a block):
  row b is position b % T of query block b // T (the partials' rows in blocks). `written`: the
  ranges whose partials were written (the rest of the power-of-two count are not read)."""
  b, n, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  src = jnp.minimum(b, rows - 1)
  if block is not None:
    src = (src // block[0]) * block[1] + src % block[0]
  lse, o = lse_ref[src, n], o_ref[src, n, :, dk._columns(c, bc)]
  if written is not None:
    keep = jnp.arange(lse.shape[0])[:, None] < written
    lse, o = jnp.where(keep, lse, dk.F32_MIN), jnp.where(keep, o, 0.0)
  x = dk._combined(lse, o, rnd)
  if zeros:
    x = jnp.where(b < rows, x, 0.0)
  x_ref[...] = x.astype(x_ref.dtype)


def _dot_t(a, b):
  """a @ b.T in float32: a tensor-core product (float32 inputs multiplied exactly, not as TF32)
  where every dimension is at least 16, else products and sums (Triton's bf16 MMA needs 16:
  a cache chunk of 8 slots gave wrong values, run BT)."""
  if min(a.shape + b.shape) < 16:
    return jnp.sum(a[:, None, :].astype(F32) * b[None, :, :].astype(F32), axis=2)
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=jax.lax.Precision.HIGHEST,
                             preferred_element_type=F32)


def _dot(a, b):
  """a @ b in float32, as `_dot_t`."""
  if min(a.shape + b.shape) < 16:
    return jnp.sum(a[:, :, None].astype(F32) * b[None, :, :].astype(F32), axis=1)
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=jax.lax.Precision.HIGHEST,
                             preferred_element_type=F32)


def _rows(vectors, dtype):
  """[BLOCK_ROWS, w] in `dtype`: row t the t-th vector [w], the rest zero."""
  rows = jnp.arange(BLOCK_ROWS)[:, None]
  out = jnp.zeros((BLOCK_ROWS, vectors[0].shape[0]), F32)
  for t, v in enumerate(vectors):
    out = jnp.where(rows == t, v[None, :], out)
  return out.astype(dtype)


def _block_normed(x1, x2, w1, w2, hd: int, eps: float, rnd):
  """`drafter_kernels._head_normed` of each row of the halves x1, x2 [BLOCK_ROWS, hd / 2], one
  row-wise reduction a half."""
  scale = jax.lax.rsqrt((jnp.sum(x1 * x1, axis=1) + jnp.sum(x2 * x2, axis=1)) / hd + eps)
  return rnd(x1 * scale[:, None] * w1[None, :]), rnd(x2 * scale[:, None] * w2[None, :])


def _block_value_normed(v, hd: int, eps: float, rnd):
  """`drafter_kernels._value_normed` of each row of v [BLOCK_ROWS, hd]: one row-wise
  reduction."""
  return rnd(v * jax.lax.rsqrt(jnp.sum(v * v, axis=1) / hd + eps)[:, None])


def _block_online(carry, keep, s, v):
  """A chunk into the running softmaxes of a block of rows (m, l [rows], acc [rows, hd]): scores
  s [rows, bs] where `keep`, values v [bs, hd] (the weights rounded to v's dtype for the value
  product, as `layers.attention` rounds its probabilities)."""
  m, l, acc = carry
  s = jnp.where(keep, s, dk.F32_MIN)
  m_new = jnp.maximum(m, jnp.max(s, axis=1))
  alpha = jnp.exp(m - m_new)
  w = jnp.where(keep, jnp.exp(s - m_new[:, None]), 0.0)
  return (m_new, l * alpha + jnp.sum(w, axis=1),
          acc * alpha[:, None] + _dot(w.astype(v.dtype), v))


def _positions_kernel(*refs, positions, group, bs, per_split, slots, hd, eps, rnd, new_at,
                      window, own=None):
  """`drafter_kernels._attn_kernel` for T = `positions` positions of row b: head n's T queries
  (q-normed and rotated here) as the rows of a [BLOCK_ROWS, hd] block (the rest zero) over cache
  chunks [p * per_split, (p + 1) * per_split), scores and values as tensor-core products, so
  each chunk is read once for all T; the normalised partial outputs and log-sum-exps of the
  block's rows, out [B, BLOCK_ROWS, N, P, hd] and lse [B, BLOCK_ROWS, N, P, LSE].

  refs: (raw [B, T, C, hd], q-norm weight, (k-norm weight,) cos, sin [B, T, hd / 2], k, v
  [B, S, K, hd], valid [B, BLOCK_ROWS, S] (each position's visible slots; rows >= T none),
  (slot [B, T],) out, lse, (k, v out)). With `new_at` = (k_at, v_at) the forward's own T tokens
  join range 0 under the causal (and sliding) mask: their keys k-normed and rotated, their
  values v-normed, and stored into their slots of k and v (aliased; valid masks those slots out
  of the cache pass). With `own` (an int, with `new_at`) they are a range of their own instead:
  programs p < own read the cache, program p == own only the T tokens and, for the first query
  head of its KV head, stores them."""
  (q_ref, qn_ref, kn_ref, cos_ref, sin_ref, k_ref, v_ref, valid_ref, slot_ref, o_ref, lse_ref,
   kout_ref, vout_ref) = dk._attn_refs(refs, new_at)
  b, n, p = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  g = n // group
  h2 = hd // 2
  lo, hi = pl.ds(0, h2), pl.ds(h2, h2)
  ts = range(positions)
  f32, dtype = dk._f32, k_ref.dtype

  def load(i):
    rows, fresh = dk._chunk(p, i, per_split, bs, slots)
    keep = (valid_ref[b, :, rows] != 0) & fresh[None, :]
    return keep, k_ref[b, rows, g, lo], k_ref[b, rows, g, hi], v_ref[b, rows, g, :]

  def queries():   # the T raw queries of head n, the q-norm's weight halves
    return ([(f32(q_ref[b, t, n, lo]), f32(q_ref[b, t, n, hi])) for t in ts],
            f32(qn_ref[lo]), f32(qn_ref[hi]))

  def tokens():    # the T raw keys and values, the k-norm's weight halves, their slots
    k_at, v_at = new_at
    return ([(f32(q_ref[b, t, k_at + g, lo]), f32(q_ref[b, t, k_at + g, hi])) for t in ts],
            [f32(q_ref[b, t, v_at + g, :]) for t in ts], f32(kn_ref[lo]), f32(kn_ref[hi]),
            [slot_ref[b, t] for t in ts])

  def rope_block(rope):         # cos, sin as [BLOCK_ROWS, hd / 2] float32 blocks
    return tuple(_rows([r[i] for r in rope], F32) for i in (0, 1))

  def query_block(raw, rope):   # the normed, rotated queries as two [BLOCK_ROWS, hd / 2] blocks
    qs, qn1, qn2 = raw
    if BLOCK_NORMS:
      halves = _block_normed(*(_rows([q[i] for q in qs], F32) for i in (0, 1)), qn1, qn2, hd,
                             eps, rnd)
      return tuple(h.astype(dtype) for h in dk._rotated(*halves, *rope_block(rope), rnd))
    qs = [dk._rotated(*dk._head_normed(*q, qn1, qn2, hd, eps, rnd), *r, rnd)
          for q, r in zip(qs, rope)]
    return _rows([q[0] for q in qs], dtype), _rows([q[1] for q in qs], dtype)

  def token_blocks(raw, rope):
    """The T keys (k-normed, rotated: two halves) and values (v-normed) as [BLOCK_ROWS, w]
    blocks in `dtype`, and as float32 blocks (BLOCK_NORMS) or per token ([(k1, k2)], [v])."""
    nks, nvs, kn1, kn2, _ = raw
    if BLOCK_NORMS:
      k1, k2 = _block_normed(*(_rows([k[i] for k in nks], F32) for i in (0, 1)), kn1, kn2, hd,
                             eps, rnd)
      blocks = (*dk._rotated(k1, k2, *rope_block(rope), rnd),
                _block_value_normed(_rows(nvs, F32), hd, eps, rnd))
      return tuple(x.astype(dtype) for x in blocks), blocks
    nks = [dk._rotated(*dk._head_normed(*k, kn1, kn2, hd, eps, rnd), *r, rnd)
           for k, r in zip(nks, rope)]
    nvs = [dk._value_normed(v, hd, eps, rnd) for v in nvs]
    return (_rows([k[0] for k in nks], dtype), _rows([k[1] for k in nks], dtype),
            _rows(nvs, dtype)), (nks, nvs)

  def cache_pass(carry, q1, q2, chunks):
    def update(carry, chunk):
      keep, k1, k2, v = chunk
      return _block_online(carry, keep, _dot_t(q1, k1) + _dot_t(q2, k2), v)
    return dk._walk(carry, update, load, chunks, per_split)

  def join_tokens(carry, q1, q2, raw, rope, own_range):
    """The T tokens under the causal (and sliding) mask (in range 0, or in their own range):
    (carry, their keys and values as `token_blocks` gives them for the stores)."""
    (k1, k2, v), kv = token_blocks(raw, rope)
    row = jnp.arange(BLOCK_ROWS)[:, None]
    col = jnp.arange(BLOCK_ROWS)[None, :]
    keep = (col <= row) & (col < positions) & (True if own_range else p == 0)
    if window is not None:
      keep &= row - col < window
    s = _dot_t(q1, k1) + _dot_t(q2, k2)
    return _block_online(carry, keep, s, v), kv

  def store_tokens(slots_, kv):
    for t, slot in enumerate(slots_):
      if BLOCK_NORMS:   # row t of each block (a masked sum of one nonzero row: exact)
        at = jnp.arange(BLOCK_ROWS)[:, None] == t
        k1, k2, v = (jnp.sum(jnp.where(at, x, 0.0), axis=0) for x in kv)
      else:
        (k1, k2), v = kv[0][t], kv[1][t]
      kout_ref[b, slot, g, lo] = k1.astype(kout_ref.dtype)
      kout_ref[b, slot, g, hi] = k2.astype(kout_ref.dtype)
      vout_ref[b, slot, g, :] = v.astype(vout_ref.dtype)

  def finish(carry):
    m, l, acc = carry
    seen = l > 0
    o_ref[b, :, n, p, :] = acc / jnp.where(seen, l, 1.0)[:, None]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), dk.F32_MIN)
    lse_ref[b, :, n, p, :] = jnp.broadcast_to(lse[:, None], (BLOCK_ROWS, dk.LSE))

  start = (jnp.full((BLOCK_ROWS,), dk.F32_MIN, F32), jnp.zeros((BLOCK_ROWS,), F32),
           jnp.zeros((BLOCK_ROWS, hd), F32))
  rope_of = lambda: [(cos_ref[b, t, :], sin_ref[b, t, :]) for t in ts]
  if own is not None:
    @pl.when(p < own)
    def _cache():
      raw_q, rope = queries(), rope_of()
      chunks = [load(i) for i in range(per_split)] if per_split <= dk.UNROLL else None
      finish(cache_pass(start, *query_block(raw_q, rope), chunks))

    @pl.when(p == own)
    def _tokens():
      raw_q, raw, rope = queries(), tokens(), rope_of()
      carry, kv = join_tokens(start, *query_block(raw_q, rope), raw, rope, own_range=True)
      pl.when(n % group == 0)(lambda: store_tokens(raw[-1], kv))
      finish(carry)
    return

  raw_q = queries()
  if new_at is not None:
    raw = tokens()
  rope = rope_of()
  chunks = [load(i) for i in range(per_split)] if per_split <= dk.UNROLL else None
  q1, q2 = query_block(raw_q, rope)
  carry = cache_pass(start, q1, q2, chunks)
  if new_at is not None:                  # the forward's own tokens, in range 0
    carry, kv = join_tokens(carry, q1, q2, raw, rope, own_range=False)
    store_tokens(raw[-1], kv)
  finish(carry)


class Step:
  """The per-forward pieces of a forward's attention (the masks and RoPE tables of each layer
  kind, made once), and `__call__` per layer.

  Args:
    cfg: the model.
    kv_idx: {kind: [B, S] sequence index held by each slot} (the sliding ring's labels already
      updated for this forward's tokens).
    idx: [B, T] the forward's sequence indices; start: [B]; positions: [B, T] RoPE positions.
  """

  def __init__(self, cfg: ModelConfig, kv_idx: dict, idx, start, positions):
    self.cfg = cfg
    self.dtype = jnp.dtype(cfg.dtype)
    self.rnd = dk._rounder(self.dtype)
    self.positions = idx.shape[1]
    self.valid, self.rope, self.slot = {}, {}, {}
    from gemma_mtp import model as model_lib   # (model imports this module)
    one = (lambda a: a[:, 0]) if self.positions == 1 else (lambda a: a)
    # several positions: the masks' rows padded to a program's query block
    block = one if self.positions == 1 else (
        lambda a: jnp.pad(a, ((0, 0), (0, BLOCK_ROWS - a.shape[1]), (0, 0))))
    for kind, slots in kv_idx.items():
      window = cfg.sliding_window if kind == "sliding" else None
      mask = layers.attention_mask(idx, slots, start, window=window)             # [B, T, S]
      # owners mask the forward's own slots out (the kernel takes those tokens from their
      # projection and stores them); shared layers read them
      owners = mask & (slots[:, None, :] < idx[:, :1, None])
      self.valid[kind] = {True: block(owners.astype(jnp.int32)),
                          False: block(mask.astype(jnp.int32))}
      self.slot[kind] = one(idx % slots.shape[1])
      freqs = positions[..., None].astype(F32) * jnp.asarray(model_lib.rope_inv_freq(cfg, kind))
      self.rope[kind] = tuple(self.rnd(one(f(freqs))) for f in (jnp.cos, jnp.sin))

  def __call__(self, raw, q_norm, k, v, kind: str, *, new_at=None, k_norm=None, o_weight=None):
    """Attention of one layer.

    Args:
      raw: [R, T, C, H] the raw projection (R >= B rows, the first B real: `quant.einsum`'s
        `padded_rows`): q heads first (N of them), then (with `new_at`) the forward's keys and
        value heads.
      q_norm, k_norm: the norms' weights [H].
      k, v: [B, S, K, H] the cache before this forward's write (owners) or the source layer's
        (KV-shared layers, `new_at` None).
      new_at: (k_at, v_at) the first key and value heads in `raw` (owners); None (shared).
      o_weight: the o projection's weight: the output's rows are padded as `quant.einsum` pads
        a one-row input for it (float weights).
    Returns:
      (out [R, T, N, H] (R >= B rows: the padded rows as `quant.PAD_ROWS_WITH`), and with
      `new_at` k and v with the forward's keys and values in their slots (updated in place),
      else None, None).
    """
    cfg, rnd, t = self.cfg, self.rnd, self.positions
    b, hd = k.shape[0], raw.shape[-1]
    heads, slots, kv_heads = cfg.num_heads, k.shape[1], k.shape[2]
    bs, chunks, splits = dk._chunking(slots, hd, RANGE_CHUNKS)
    cos, sin = self.rope[kind]
    per_split = -(-chunks // splits)
    # the own range: program `splits` of a head takes the forward's own tokens; its partials go
    # into a power-of-two count of slots (the rows kernel's loads), the last ones not written
    own = splits if new_at is not None and own_range(t) else None
    ranges, parts = (splits, splits) if own is None else (splits + 1, 2 * splits)
    kw = dict(group=heads // kv_heads, bs=bs, per_split=per_split, slots=slots, hd=hd,
              eps=cfg.rms_eps, rnd=rnd, new_at=new_at, own=own)
    if t == 1:   # one program a head and range writes its partial's block
      ins = [raw.reshape(raw.shape[0], -1, hd), q_norm]
      outs = [((b, heads, parts, w), F32, (None, None, None, w),
               lambda i, j, s: (i, j, s, 0)) for w in (hd, dk.LSE)]
      kernel = functools.partial(dk._attn_kernel, **kw)
    else:        # ... stores its query block's partials by index
      ins = [raw[:b], q_norm]
      outs = [((b, BLOCK_ROWS, heads, parts, w), F32, (b, BLOCK_ROWS, heads, parts, w),
               lambda *_: (0,) * 5) for w in (hd, dk.LSE)]
      kernel = functools.partial(_positions_kernel, positions=t, **kw,
                                 window=cfg.sliding_window if kind == "sliding" else None)
    if new_at is not None:
      ins.append(k_norm)
    ins += [cos, sin]
    at_k = len(ins)
    ins += [k, v, self.valid[kind][new_at is not None]]
    aliases = None
    if new_at is not None:   # the tokens' slots; k and v come back with them written, in place
      ins.append(self.slot[kind])
      outs += [(c.shape, c.dtype, c.shape, lambda *_: (0, 0, 0, 0)) for c in (k, v)]
      aliases = {at_k: 2, at_k + 1: 3}
    res = dk._call(kernel, (b, heads, ranges), ins, outs, "decode_attention", aliases=aliases,
                   num_warps=None if t == 1 else POSITIONS_WARPS)
    partials = [r.reshape((-1,) + r.shape[-3:]) for r in res[:2]]   # [B * (T or block), N, P, w]
    # the o projection's two-row input, where `quant.einsum` would pad it (float weights: an
    # int8 one may go through `matvec`'s one-row kernel instead)
    rows = b * t
    if (rows == 1 and o_weight is not None and not quant.is_quantized(o_weight)
        and quant.pads_one_row(o_weight)):
      rows = 2
    bc = matvec.pow2_divisor(hd, max(16, dk.TILE // parts))
    (out,) = dk._call(functools.partial(_combine_rows_kernel, rows=b * t, bc=bc, rnd=rnd,
                                        zeros=quant.PAD_ROWS_WITH == "zeros",
                                        block=None if t == 1 else (t, BLOCK_ROWS),
                                        written=None if own is None else ranges),
                      (rows, heads, hd // bc), partials,
                      [((rows, heads, hd), self.dtype, (None, None, bc),
                        lambda i, j, c: (i, j, c))], "decode_attention_rows")
    out = out.reshape(-1, t, heads, hd)
    if new_at is None:
      return out, None, None
    return out, res[2], res[3]
