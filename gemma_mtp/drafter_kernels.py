"""One assistant-drafter step as a few Pallas (Triton) kernels: the speculative loop on GPUs.

A drafter step at batch 1 reads little (the GPU pair's 4 layers at D = 256: ~8 MB) but, under
XLA, runs ~90 short kernels (pads, one-row GEMMs, norms, softmax reductions; NOTES run AH), so it
costs ~22% of a target step where its bytes would allow ~2%. Here a step is 5 kernels per layer
(6 with a combine kernel), each recomputing the small norms it needs from the vectors the
previous kernel wrote:

  pre:   e = E_t[tok] * scale; z = [e, h] @ pre_proj, S splits of the contraction  grid (B, Da/bn, S)
  per layer:
    q:     finish the previous layer (z += norm(sum of d's splits); z *= scalar), xn = norm(z),
           q = xn @ Wq (z: the sum of pre's splits on layer 0)                    grid (B, N*hd/bn)
    attn:  one query head, q-normed and rotated, over a range of the tap's cache slots: its
           normalised output and log-sum-exp                                      grid (B, N, P)
    comb:  (COMBINE, where an o program would take in TILE partials or more) a head's P
           partials combined into its output                                     grid (B, N, hd/bc)
    o:     combine the P partials of each head (unless comb did), a = attn @ Wo,
           heads in S splits                                                     grid (B, Da/bn, S)
    up:    z += norm(sum of a's splits); g = gelu(norm(z) @ Wg) * (norm(z) @ Wu) grid (B, F/bf)
    down:  d = g @ Wd, S splits of the contraction                               grid (B, Da/bn, S)
  final: finish the last layer, zf = norm(z), h_out = zf @ post_proj             grid (B, Dt/bn)
  head:  logits = zf @ E_d^T (the dense head; the centroid head stays in XLA)     grid (B, V/bv)

A program reads about TILE weights; the pre, o and down kernels split their contraction into S
parts (above SPLIT_AT weights a program) whose partial sums the next kernel adds, so wide targets
(the released assistants read 1536-5376-wide target states) keep every program small.

Measured on an H200 (NOTES run AL, random weights of the GPU pair's shapes, before the q kernel
was tiled by columns and the splits were added): a K = 8 round 1,499 -> 1,102 us against a
519-530 us plain step, ~26 instead of ~92 kernels per drafter step, the per-layer ones
2.6-3.6 us each; a drafter step ~117 -> ~68 us.

Values: the kernels compute in float32 and round to the step's dtype wherever `drafter.step`
rounds (each norm, projection and residual add; a split projection is rounded after its parts
are added). In float32 they agree with it up to summation order; in bfloat16 they are as close
to float32 arithmetic as the XLA step is, not bit-equal (XLA fuses elementwise ops, and
`layers.attention` rounds the softmax's probabilities before the value product, where the split
softmax here normalises after it). A step with no visible slot at all (never the case in the
speculative loop) gives a zero attention output, not the mean value.

Where they run: `choose()` (`why_not()` says why not): the switch (`enabled()`: GPU and one device, or
GEMMA_MTP_DRAFTER_KERNELS=on; off switches them off), `supported()` (float weights; widths
multiples of 16, half a head a power of two, a drafter at most 1024 wide: every released
assistant), and, under the automatic switch, a drafter at most AUTO_MAX_WIDTH wide (the narrow
drafters whose steps are bound by kernel count, as measured; the 1024-wide assistants of 31B
and 26B-A4B read ~0.5-1 GB a step and run them only with =on until measured). Off the GPU the
kernels run in Pallas's interpreter, which is how the tests compare them with `drafter.step`
on the CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from gemma_mtp import matvec
from gemma_mtp import model as model_lib
from gemma_mtp import quant

F32 = jnp.float32
F32_MIN = float(np.finfo(np.float32).min)
ENV = "GEMMA_MTP_DRAFTER_KERNELS"
# Each program reads all it needs at once (no loop whose loads wait on the previous iteration,
# stores last): about TILE weight elements, in statically unrolled chunks of at most CHUNK.
TILE = 8192
CHUNK = 4096
SPLIT_AT = 2 * TILE       # pre, o, down: weights a program reads before its contraction splits
MAX_WEIGHTS = 4 * TILE    # no program reads more (the q, gate|up, post-projection and head ones)
SLOTS_PER_CHUNK = 64      # cache slots an attention program reads at a time (at most)
MAX_SPLITS = 32           # cache ranges per head of the attention kernel
# A head's cache ranges are merged by a kernel of their own (True) wherever an o program would
# otherwise take in at least TILE elements of partials ([ranges, head dim] for each of its
# heads); there an o program becomes a plain matvec, and heads keep all their ranges instead of
# as many as an o program holds (False: the o kernel always merges them, ranges capped to fit).
# The released E2B / E4B assistants: 32 ranges of 2 chunks instead of 8 of 8 for the 512-wide
# full-attention heads, and their sliding layers' o kernel 6.7 -> ~3 us plus a ~1.5 us combine
# kernel; the GPU pair's heads (64 / 128 wide, few ranges) stay as they were below 2k-slot
# caches. Measured (NOTES, runs AR-AU, H100, kernel time a step, with `drafter.head_argmax`):
# E2B's assistant 155 -> 102 us, E4B's 160 -> 106 us.
COMBINE = True
UNROLL = 8                # cache chunks per attention program read without a loop
LSE = 16                  # width of the log-sum-exp vector of an attention partial
NUM_WARPS = 4
# `_inv_rms`'s default: one block reduction a norm instead of one a chunk (the MoE finish kernel
# always takes one; the step probe's variant fused_rms1 measures it for every kernel).
RMS_ONE_REDUCTION = False
AUTO_MAX_WIDTH = 256      # the automatic switch takes drafters at most this wide (see the doc)


def enabled() -> bool:
  """Whether the switch is on in programs traced now (see the module doc)."""
  return matvec.switch(ENV)


def supported(dparams: dict, dcfg, target_params: dict, target_config) -> str | None:
  """None if the kernels can run this drafter, else why not (a sentence)."""
  if quant.is_quantized(target_params["embed"]) or any(
      quant.is_quantized(w) for w in jax.tree_util.tree_leaves(
          dparams, is_leaf=quant.is_quantized)):
    return "int8 weights"
  widths = {"drafter width": dcfg.embed_dim, "target width": target_config.embed_dim,
            "MLP width": dcfg.mlp_dim}
  if not dcfg.num_centroids:
    widths["vocabulary"] = dcfg.vocab_size
  bad = [f"{name} {n} (not a multiple of 16)" for name, n in widths.items() if n < 16 or n % 16]
  dec = dcfg.as_decoder()
  head_dims = sorted({dec.layer_head_dim(i) for i in range(len(dcfg.layer_types))})
  bad += [f"head dim {hd} (half of it not a power of two >= 16)" for hd in head_dims
          if hd // 2 < 16 or hd & (hd - 1)]
  if bad:
    return f"widths the kernels cannot tile: {', '.join(bad)}"
  if 2 * dcfg.embed_dim * 16 > MAX_WEIGHTS:
    return (f"drafter width {dcfg.embed_dim} > {MAX_WEIGHTS // 32}: a gate|up program would "
            f"read more than {MAX_WEIGHTS} weights")
  _, rows, bn = _pre_split(dcfg)
  _, down_rows, down_bn = _down_split(dcfg)
  reads = {"pre-projection": rows * bn, "down": down_rows * down_bn}
  for hd in head_dims:
    _, per_part, bo = _o_split(dcfg, hd)
    reads[f"o (head dim {hd})"] = per_part * hd * bo
  over = [f"a {name} program would read {n} weights" for name, n in reads.items()
          if n > MAX_WEIGHTS]
  if over:
    return f"{'; '.join(over)} (at most {MAX_WEIGHTS})"
  return None


def why_not(dparams: dict, dcfg, target_params: dict, target_config) -> str | None:
  """None if `drafter.round_step` runs this drafter's steps as these kernels in programs traced
  now, else why not: the switch is off, `supported` refuses the drafter, or the automatic switch
  leaves drafters wider than AUTO_MAX_WIDTH to XLA."""
  mode = matvec.switch_mode(ENV)
  if not enabled():
    return f"{ENV} is {mode}" + (" (on with one GPU only)" if mode == "auto" else "")
  reason = supported(dparams, dcfg, target_params, target_config)
  if reason is not None:
    return f"not supported: {reason}"
  if mode == "auto" and dcfg.embed_dim > AUTO_MAX_WIDTH:
    return (f"{ENV} is auto, which takes drafters at most {AUTO_MAX_WIDTH} wide "
            f"(this one is {dcfg.embed_dim}); =on runs them")
  return None


def choose(dparams: dict, dcfg, target_params: dict, target_config) -> bool:
  """Whether `drafter.round_step` runs this drafter's steps as these kernels (`why_not` is None)."""
  return why_not(dparams, dcfg, target_params, target_config) is None


def _pow2_floor(n: int) -> int:
  """The largest power of two <= n (n >= 1)."""
  return 1 << (n.bit_length() - 1)


def _cols(n: int, k: int) -> int:
  """Output columns per program of an n-wide matvec over k (about TILE weights a program; a
  power of two dividing n, 16-64)."""
  return matvec.pow2_divisor(n, max(16, min(64, TILE // k)))


def _split(units: int, unit_weights: int) -> int:
  """Parts S (a power of two dividing `units`) of a contraction over `units` units of
  `unit_weights` weights a program each: the fewest that keep a part within SPLIT_AT."""
  s = 1
  while (units // s) * unit_weights > SPLIT_AT and units % (2 * s) == 0:
    s *= 2
  return s


def _pre_split(dcfg) -> tuple[int, int, int]:
  """(halves, rows, bn) of the pre-projection: each of e and h is contracted in `halves` parts
  of `rows` rows, bn output columns a program."""
  dt = dcfg.target_embed_dim
  bn = _cols(dcfg.embed_dim, 2 * dt)
  halves = _split(dt // 16, 16 * bn)
  return halves, dt // halves, bn


def _o_split(dcfg, hd: int) -> tuple[int, int, int]:
  """(parts, heads a part, bn) of a layer's o projection with heads of width hd."""
  bn = _cols(dcfg.embed_dim, dcfg.num_heads * hd)
  parts = _split(dcfg.num_heads, hd * bn)
  return parts, dcfg.num_heads // parts, bn


def _chunking(slots: int, hd: int, per_range: int = 2) -> tuple[int, int, int]:
  """(bs, chunks, splits): a `slots`-slot cache with hd-wide heads read in chunks of bs slots,
  `splits` ranges of chunks per head (about `per_range` chunks each, a power of two)."""
  bs = _pow2_floor(min(TILE // hd, SLOTS_PER_CHUNK, slots))
  chunks = -(-slots // bs)
  return bs, chunks, min(MAX_SPLITS, 1 << ((chunks - 1) // per_range).bit_length(),
                         _pow2_floor(chunks))


def _ranges(slots: int, hd: int, per_part: int) -> tuple[int, int, int, bool]:
  """(bs, chunks, splits, combine) of the attention over a `slots`-slot tap with hd-wide heads:
  chunks of bs slots, `splits` ranges of chunks per head (about two chunks each, a power of two),
  and whether a combine kernel merges a head's ranges (COMBINE: where the o kernel's programs,
  `per_part` heads each, would take in at least TILE elements of partials; without it the
  ranges are capped to the most those programs hold)."""
  bs, chunks, splits = _chunking(slots, hd)
  if COMBINE:
    return bs, chunks, splits, splits > 1 and per_part * splits * hd >= TILE
  return bs, chunks, min(splits, _pow2_floor(max(1, TILE // (per_part * hd)))), False


def _down_split(dcfg) -> tuple[int, int, int]:
  """(parts, rows a part, bn) of the down projection."""
  bn = _cols(dcfg.embed_dim, dcfg.mlp_dim)
  parts = _split(dcfg.mlp_dim // 16, 16 * bn)
  return parts, dcfg.mlp_dim // parts, bn


def _rounder(dtype):
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float32:
    return lambda x: x
  return lambda x: x.astype(dtype).astype(F32)


def _interpret() -> bool:
  return jax.default_backend() != "gpu"


def _call(kernel, grid, ins, outs, name, aliases=None, num_warps=None):
  """pallas_call with every input a whole-array block; outs: [(shape, dtype, block, index_map)];
  aliases: {input index: output index} updated in place; num_warps: Triton's warps a program
  (default NUM_WARPS)."""
  whole = lambda a: pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)
  return pl.pallas_call(
      kernel, grid=grid, in_specs=[whole(a) for a in ins],
      out_specs=[pl.BlockSpec(block, index) for _, _, block, index in outs],
      out_shape=[jax.ShapeDtypeStruct(shape, dtype) for shape, dtype, _, _ in outs],
      input_output_aliases=aliases or {},
      compiler_params=plgpu.CompilerParams(num_warps=num_warps or NUM_WARPS, num_stages=2),
      interpret=_interpret(), name=name)(*ins)


# ---- pieces shared by the kernels ------------------------------------------------------------------
#
# Every kernel first reads all it needs (in program order, before any reduction: a reduction
# across warps is a barrier, and loads issued after one wait a memory round trip of their own),
# then computes, then stores. Vectors longer than one matvec chunk are kept as lists of chunks.

def _rows_per_chunk(k: int, n: int) -> int:
  """Contraction rows of one [rows, n] weight chunk (about CHUNK elements; a power of two
  dividing k)."""
  return matvec.pow2_divisor(k, max(16, CHUNK // n))


def _spans(k: int, bk: int, first=0) -> list:
  """Chunks of bk rows of [first, first + k) (first: static, or traced and a multiple of bk)."""
  return [pl.ds(pl.multiple_of(first + start, bk) if isinstance(first, jax.Array)
                else start + first, bk) for start in range(0, k, bk)]


def _f32(x):
  return x.astype(F32)


def _inv_rms(chunks, n: int, eps: float, *, one_reduction: bool | None = None):
  """1 / rms of the chunks: one block reduction a chunk, or (`one_reduction`, default
  RMS_ONE_REDUCTION; chunks of one shape) the chunks' squares added elementwise first and one
  block reduction (each a barrier across the program's warps)."""
  one = RMS_ONE_REDUCTION if one_reduction is None else one_reduction
  if one and len({c.shape for c in chunks}) == 1:
    total = jnp.sum(sum(c * c for c in chunks))
  else:
    total = sum(jnp.sum(c * c) for c in chunks)
  return jax.lax.rsqrt(total / n + eps)


def _matvec(xs, ws):
  """sum_k x[k] w[k, :] over chunks (x: [bk] float32 each, w: [bk, n]) -> [n] float32, with one
  reduction."""
  return jnp.sum(sum(x[:, None] * _f32(w) for x, w in zip(xs, ws)), axis=0)


def _load_parts(ref, b, spans):
  """Chunks of the sum of a split projection's parts (ref: [B, S, n] float32)."""
  return [sum(_f32(ref[b, s, ds]) for s in range(ref.shape[1])) for ds in spans]


def _load_residual(refs, b, spans):
  """The residual stream entering a layer, read in chunks: refs = (pre's parts,) (layer 0) or
  the previous layer's (z after attention, its down parts, post-FFN norm weight, layer scalar)."""
  if len(refs) == 1:
    return (_load_parts(refs[0], b, spans),)
  z, d, w, scalar = refs
  return ([_f32(z[b, ds]) for ds in spans], _load_parts(d, b, spans),
          [_f32(w[ds]) for ds in spans], _f32(scalar[0]))


def _finish_residual(loaded, n, eps, rnd):
  """z chunks from `_load_residual`: z, or (z + rms_norm(d) * w) * scalar as `model.block`."""
  if len(loaded) == 1:
    return [rnd(c) for c in loaded[0]]
  z, d, w, scalar = loaded
  d = [rnd(c) for c in d]
  scale = _inv_rms(d, n, eps)
  scalar = rnd(scalar)
  return [rnd(rnd(zc + rnd(dc * scale * wc)) * scalar) for zc, dc, wc in zip(z, d, w)]


def _norm(chunks, w, n, eps, rnd, *, one_reduction: bool | None = None):
  """rms_norm(x) * w over chunks (w: loaded chunks)."""
  scale = _inv_rms(chunks, n, eps, one_reduction=one_reduction)
  return [rnd(c * scale * wc) for c, wc in zip(chunks, w)]


def _store_chunks(ref, spans, chunks):
  for ds, c in zip(spans, chunks):
    ref[ds] = c.astype(ref.dtype)


def _columns(c, bn):
  return pl.ds(pl.multiple_of(c * bn, bn), bn)


# ---- the kernels -------------------------------------------------------------------------------------

def _pre_kernel(tok_ref, h_ref, emb_ref, scale_ref, w_ref, z_ref, *, halves, rows, bn, rnd,
                rnd_tab):
  """Part s of [e, h] @ pre_proj: rows [s * rows, (s + 1) * rows) of e (s < halves) or of h."""
  b, c, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  tok = tok_ref[b]
  cols = _columns(c, bn)
  bk = _rows_per_chunk(rows, bn)
  of_e = s < halves
  at = (s % halves) * rows                 # the part's first row of e or h
  e = [_f32(emb_ref[tok, ds]) for ds in _spans(rows, bk, at)]
  h = [_f32(h_ref[b, ds]) for ds in _spans(rows, bk, at)]
  w = [w_ref[ds, cols] for ds in _spans(rows, bk, s * rows)]
  scale = _f32(scale_ref[0])
  x = [jnp.where(of_e, rnd(rnd_tab(ec * scale)), rnd(hc)) for ec, hc in zip(e, h)]
  z_ref[...] = _matvec(x, w)               # rounded once the parts are added


def _q_kernel(*refs, da, bn, eps, rnd, n_res):
  res_refs, (norm_ref, wq_ref, q_ref, z_ref) = refs[:n_res], refs[n_res:]
  b, c = pl.program_id(0), pl.program_id(1)
  cols = _columns(c, bn)
  spans = _spans(da, _rows_per_chunk(da, bn))
  loaded = _load_residual(res_refs, b, spans)
  norm_w = [_f32(norm_ref[ds]) for ds in spans]
  w = [wq_ref[ds, cols] for ds in spans]
  z = _finish_residual(loaded, da, eps, rnd)
  xn = _norm(z, norm_w, da, eps, rnd)
  q_ref[...] = rnd(_matvec(xn, w)).astype(q_ref.dtype)
  _store_chunks(z_ref, spans, z)


def _attn_kernel(*refs, group, bs, per_split, slots, hd, eps, rnd, new_at=None, own=None):
  """Head n (q-normed and rotated here) over cache chunks [p * per_split, (p + 1) * per_split):
  the normalised partial output [hd] and its log-sum-exp (F32_MIN where no slot is visible).

  refs: (q [R >= B, C, hd] (head n of C), q-norm weight, cos, sin [B, hd / 2], k, v [B, S, K,
  hd], valid [B, S], out, lse). With `new_at` = (k_at, v_at), the target's one-position decode
  step (`decode_attention`): q is the raw q|k|v projection, a k-norm weight follows q's, the
  token's cache slot [B] follows valid, and the step's own token joins range 0: its key (head
  k_at + g, k-normed and rotated) and value (head v_at + g, v-normed without weight), which are
  also stored into its slot of k and v (two more outputs, aliased to them: every program of KV
  head g stores the same values; valid masks that slot out of the cache pass, so whether a
  program reads it before or after the store does not matter). With `own` (an int, with
  `new_at`), the token is a range of its own instead: programs p < own read the cache, program
  p == own only the token (its partial one key) and, for the first query head of its KV head,
  stores it."""
  (q_ref, qn_ref, kn_ref, cos_ref, sin_ref, k_ref, v_ref, valid_ref, slot_ref, o_ref, lse_ref,
   kout_ref, vout_ref) = _attn_refs(refs, new_at)
  b, n, p = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  g = n // group
  h2 = hd // 2
  lo, hi = pl.ds(0, h2), pl.ds(h2, h2)

  def load(i):
    rows, fresh = _chunk(p, i, per_split, bs, slots)
    keep = (valid_ref[b, rows] != 0) & fresh
    return keep, k_ref[b, rows, g, lo], k_ref[b, rows, g, hi], v_ref[b, rows, g, :]

  def query():     # head n's raw query and its norm's weight halves
    return _f32(q_ref[b, n, lo]), _f32(q_ref[b, n, hi]), _f32(qn_ref[lo]), _f32(qn_ref[hi])

  def token():     # the step's own raw key and value, the k-norm's weight halves, its slot
    k_at, v_at = new_at
    return (_f32(q_ref[b, k_at + g, lo]), _f32(q_ref[b, k_at + g, hi]),
            _f32(q_ref[b, v_at + g, :]), _f32(kn_ref[lo]), _f32(kn_ref[hi]), slot_ref[b])

  def cache_pass(q, chunks):
    def update(carry, chunk):
      keep, k1, k2, v = chunk
      return _online(carry, keep, _scores(k1, k2, *q), v)
    return _walk(_softmax_start(hd), update, load, chunks, per_split)

  def join_token(carry, q, raw, cos, sin, own_range):
    """The token into the running softmax (in range 0, or in its own range): (carry, its key
    halves and value as stored)."""
    nk1, nk2, nv, kn1, kn2, _ = raw
    nk1, nk2 = _rotated(*_head_normed(nk1, nk2, kn1, kn2, hd, eps, rnd), cos, sin, rnd)
    nv = _value_normed(nv, hd, eps, rnd)
    return (_join(carry, jnp.sum(nk1 * q[0]) + jnp.sum(nk2 * q[1]), nv,
                  True if own_range else p == 0), (nk1, nk2, nv))

  def store_token(slot, kv):
    nk1, nk2, nv = kv
    kout_ref[b, slot, g, lo] = nk1.astype(kout_ref.dtype)
    kout_ref[b, slot, g, hi] = nk2.astype(kout_ref.dtype)
    vout_ref[b, slot, g, :] = nv.astype(vout_ref.dtype)

  def rotated_query(raw_q, cos, sin):
    q1, q2, qn1, qn2 = raw_q
    return _rotated(*_head_normed(q1, q2, qn1, qn2, hd, eps, rnd), cos, sin, rnd)

  if own is not None:
    @pl.when(p < own)
    def _cache():
      raw_q, cos, sin = query(), cos_ref[b, :], sin_ref[b, :]
      chunks = [load(i) for i in range(per_split)] if per_split <= UNROLL else None
      o_ref[...], lse_ref[...] = _partial(cache_pass(rotated_query(raw_q, cos, sin), chunks))

    @pl.when(p == own)
    def _token():
      raw_q, raw, cos, sin = query(), token(), cos_ref[b, :], sin_ref[b, :]
      carry, kv = join_token(_softmax_start(hd), rotated_query(raw_q, cos, sin), raw, cos, sin,
                             own_range=True)
      pl.when(n % group == 0)(lambda: store_token(raw[-1], kv))
      o_ref[...], lse_ref[...] = _partial(carry)
    return

  raw_q = query()
  if new_at is not None:
    raw = token()
  cos, sin = cos_ref[b, :], sin_ref[b, :]
  chunks = [load(i) for i in range(per_split)] if per_split <= UNROLL else None
  q = rotated_query(raw_q, cos, sin)
  carry = cache_pass(q, chunks)
  if new_at is not None:                  # the step's own token, in range 0
    carry, kv = join_token(carry, q, raw, cos, sin, own_range=False)
    store_token(raw[-1], kv)
  o_ref[...], lse_ref[...] = _partial(carry)


def _attn_refs(refs, new_at):
  """The attention kernels' refs in one order: (q, q-norm, k-norm, cos, sin, k, v, valid, slot,
  out, lse, k out, v out), the k-norm, slot and k / v outputs None without `new_at`."""
  if new_at is not None:
    return refs
  q, qn, cos, sin, k, v, valid, o, lse = refs
  return q, qn, None, cos, sin, k, v, valid, None, o, lse, None, None


def _chunk(p, i, per_split: int, bs: int, slots: int):
  """(rows, fresh): the bs slots of chunk i of cache range p (the last chunk moved back, not
  read past the cache) and which of them are the chunk's own (not the chunk before's)."""
  first = (p * per_split + i) * bs
  at = jnp.minimum(first, slots - bs)
  return pl.ds(at, bs), at + jnp.arange(bs) >= first


def _walk(carry, update, load, chunks, per_split: int):
  """The cache pass of an attention program: its preloaded chunks in turn, or (None: too many
  to unroll) a loop that loads each of its per_split chunks."""
  if chunks is None:
    return jax.lax.fori_loop(0, per_split, lambda i, c: update(c, load(i)), carry)
  for chunk in chunks:
    carry = update(carry, chunk)
  return carry


# The running softmax of an attention program: (max score m, sum of exp(s - m) l, the values
# weighted by exp(s - m) acc), over chunks of slots and single keys; shared with
# `decode_attention`'s kernel of several positions a row.

def _softmax_start(hd: int):
  return jnp.asarray(F32_MIN, F32), jnp.asarray(0.0, F32), jnp.zeros((hd,), F32)


def _scores(k1, k2, q1, q2):
  """Scores [bs] of a chunk's keys (halves k1, k2 [bs, hd / 2]) against a query's halves."""
  return jnp.sum(_f32(k1) * q1[None, :] + _f32(k2) * q2[None, :], axis=1)


def _online(carry, keep, s, v):
  """A chunk into the running softmax: scores s [bs] where `keep`, values v [bs, hd]."""
  m, l, acc = carry
  s = jnp.where(keep, s, F32_MIN)
  m_new = jnp.maximum(m, jnp.max(s))
  alpha = jnp.exp(m - m_new)
  w = jnp.where(keep, jnp.exp(s - m_new), 0.0)
  return m_new, l * alpha + jnp.sum(w), acc * alpha + jnp.sum(w[:, None] * _f32(v), axis=0)


def _join(carry, s, v, on):
  """One key (score s, value v [hd]) into the running softmax where `on`."""
  m, l, acc = carry
  m_new = jnp.where(on, jnp.maximum(m, s), m)
  alpha = jnp.exp(m - m_new)
  w = jnp.where(on, jnp.exp(s - m_new), 0.0)
  return m_new, l * alpha + w, acc * alpha + w * v


def _partial(carry):
  """(normalised output [hd], log-sum-exp [LSE]; F32_MIN where no key was visible)."""
  m, l, acc = carry
  seen = l > 0
  return (acc / jnp.where(seen, l, 1.0),
          jnp.broadcast_to(jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), F32_MIN), (LSE,)))


def _head_normed(x1, x2, w1, w2, hd: int, eps: float, rnd):
  """rms_norm over the two halves of a head, times the weight's halves w1, w2."""
  scale = jax.lax.rsqrt((jnp.sum(x1 * x1) + jnp.sum(x2 * x2)) / hd + eps)
  return rnd(x1 * scale * w1), rnd(x2 * scale * w2)


def _value_normed(v, hd: int, eps: float, rnd):
  """The weightless v-norm of a value head [hd]."""
  return rnd(v * jax.lax.rsqrt(jnp.sum(v * v) / hd + eps))


def _rotated(x1, x2, cos, sin, rnd):
  """RoPE of a head's halves at one position (cos, sin [hd / 2])."""
  return rnd(rnd(x1 * cos) + rnd(-x2 * sin)), rnd(rnd(x2 * cos) + rnd(x1 * sin))


def _combined(lse, o, rnd):
  """A head's output from the partials of its P ranges: lse [P, LSE] (rows constant), o [P, w]."""
  lse = jnp.max(lse, axis=1)
  w = jnp.exp(lse - jnp.max(lse))
  return rnd(jnp.sum(w[:, None] * o, axis=0) / jnp.sum(w))


def _combine_kernel(o_ref, lse_ref, x_ref, *, bc, rnd):
  """Columns [c * bc, (c + 1) * bc) of head n's output, from its ranges' partials (COMBINE)."""
  b, n, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  lse, o = lse_ref[b, n], o_ref[b, n, :, _columns(c, bc)]           # [P, LSE], [P, bc]
  x_ref[...] = _combined(lse, o, rnd)


def _o_kernel(*refs, per_part, bn, rnd):
  """Part s of attn @ Wo: heads [s * per_part, (s + 1) * per_part); refs: (partials [B, N, P,
  hd], their log-sum-exps, Wo, out), whose partials are combined here, or (heads' outputs [B, N,
  hd] from the combine kernel, Wo, out)."""
  *ins, wo_ref, a_ref = refs
  b, c, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  cols = _columns(c, bn)
  heads = [s * per_part + j for j in range(per_part)]
  loaded = [[ref[b, n] for ref in ins] for n in heads]               # [P, hd] and [P, LSE], or [hd]
  ws = [wo_ref[n, :, cols] for n in heads]                           # [hd, bn]
  xs = ([_combined(lse, o, rnd) for o, lse in loaded] if len(ins) == 2
        else [x for (x,) in loaded])
  a_ref[...] = _matvec(xs, ws)             # rounded once the parts are added


def _up_kernel(z_ref, a_ref, pa_ref, pf_ref, wg_ref, wu_ref, g_ref, z1_ref, *, da, bf, up_at, eps,
               rnd):
  b, c = pl.program_id(0), pl.program_id(1)
  spans = _spans(da, _rows_per_chunk(da, bf))
  start = pl.multiple_of(c * bf, bf)
  z = [_f32(z_ref[b, ds]) for ds in spans]
  a = _load_parts(a_ref, b, spans)
  pa = [_f32(pa_ref[ds]) for ds in spans]
  pf = [_f32(pf_ref[ds]) for ds in spans]
  wg = [wg_ref[ds, pl.ds(start, bf)] for ds in spans]
  wu = [wu_ref[ds, pl.ds(start + up_at, bf)] for ds in spans]
  a = [rnd(ac) for ac in a]
  z1 = [rnd(zc + ac) for zc, ac in zip(z, _norm(a, pa, da, eps, rnd))]
  xn = _norm(z1, pf, da, eps, rnd)
  gate, up = rnd(_matvec(xn, wg)), rnd(_matvec(xn, wu))
  g_ref[...] = rnd(rnd(matvec.gelu_tanh(gate)) * up)
  _store_chunks(z1_ref, spans, z1)


def _down_kernel(g_ref, wd_ref, d_ref, *, rows, bn):
  """Part s of g @ Wd: contraction rows [s * rows, (s + 1) * rows)."""
  b, c, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  cols = _columns(c, bn)
  spans = _spans(rows, _rows_per_chunk(rows, bn), s * rows)
  g = [_f32(g_ref[b, ds]) for ds in spans]
  w = [wd_ref[ds, cols] for ds in spans]
  d_ref[...] = _matvec(g, w)               # rounded once the parts are added


def _final_kernel(z_ref, d_ref, pf_ref, scalar_ref, fn_ref, w_ref, h_ref, zf_ref, *, da, bn, eps,
                  rnd):
  b, c = pl.program_id(0), pl.program_id(1)
  cols = _columns(c, bn)
  spans = _spans(da, _rows_per_chunk(da, bn))
  loaded = _load_residual((z_ref, d_ref, pf_ref, scalar_ref), b, spans)
  fn = [_f32(fn_ref[ds]) for ds in spans]
  w = [w_ref[ds, cols] for ds in spans]
  zf = _norm(_finish_residual(loaded, da, eps, rnd), fn, da, eps, rnd)
  h_ref[...] = rnd(_matvec(zf, w)).astype(h_ref.dtype)
  _store_chunks(zf_ref, spans, zf)


def _head_kernel(zf_ref, emb_ref, o_ref, *, da, bv):
  b, c = pl.program_id(0), pl.program_id(1)
  rows = _columns(c, bv)
  spans = _spans(da, _rows_per_chunk(da, bv))
  zf = [_f32(zf_ref[b, ds]) for ds in spans]
  emb = [emb_ref[rows, ds] for ds in spans]                          # [bv, bk]
  o_ref[...] = jnp.sum(sum(_f32(e) * z[None, :] for e, z in zip(emb, zf)), axis=1)


# ---- a step ----------------------------------------------------------------------------------------

def _vec(b, n, bn):
  """Output spec pieces of a [B, n] float32 vector written bn columns per program."""
  return ((b, n), F32, (None, bn), lambda i, j, *_: (i, j))


def _parts(b, parts, n, bn):
  """Output spec pieces of the [B, S, n] float32 parts of a projection split S ways (grid
  (B, n / bn, S))."""
  return ((b, parts, n), F32, (None, None, bn), lambda i, j, s: (i, s, j))


def _whole_row(b, n):
  """A [B, n] float32 output every program of a row writes in full (the same values)."""
  return ((b, n), F32, (None, n), lambda i, *_: (i, 0))


class Stepper:
  """The kernels of one round: weights cast and rotary tables built once, then `__call__` per
  step (`drafter.round_step`). Same arguments and results as `drafter.step`; `head(params, z,
  cfg)` is `drafter.head` (or `drafter.head_argmax`: greedy tokens), used for the centroid
  head."""

  def __init__(self, dparams, dcfg, target_params, target_config, taps, masks, query_pos, *,
               head):
    dtype = jnp.dtype(dcfg.dtype)
    self.cfg, self.dtype, self.rnd = dcfg, dtype, _rounder(dtype)
    self.params = quant.cast(dparams, dtype)
    table = target_params["embed"]
    self.table = table
    self.table_scale = jnp.asarray([target_config.embed_scale], table.dtype)
    self.head = head
    self.taps = {kind: (t.k, t.v, masks[kind].astype(jnp.int32)) for kind, t in taps.items()}
    self.rope = {}
    for kind in set(dcfg.layer_types):
      freqs = query_pos[:, None].astype(F32) * jnp.asarray(
          model_lib.rope_inv_freq(dcfg, kind))                      # [B, hd / 2]
      self.rope[kind] = tuple(self.rnd(f(freqs)) for f in (jnp.cos, jnp.sin))

  def __call__(self, token, hidden):
    cfg, p, rnd = self.cfg, self.params, self.rnd
    b, da, dt, eps = token.shape[0], cfg.embed_dim, cfg.target_embed_dim, cfg.rms_eps
    halves, rows, bn = _pre_split(cfg)
    (z,) = _call(functools.partial(_pre_kernel, halves=halves, rows=rows, bn=bn, rnd=rnd,
                                   rnd_tab=_rounder(self.table.dtype)),
                 (b, da // bn, 2 * halves), [token.astype(jnp.int32), hidden, self.table,
                                             self.table_scale, p["pre_proj"]],
                 [_parts(b, 2 * halves, da, bn)], "drafter_pre")
    residual = (z,)
    for i, lp in enumerate(p["layers"]):
      residual = self._layer(lp, i, residual, b)
    bn = _cols(dt, da)
    h_out, zf = _call(functools.partial(_final_kernel, da=da, bn=bn, eps=eps, rnd=rnd),
                      (b, dt // bn), [*residual, p["final_norm"], p["post_proj"]],
                      [((b, dt), hidden.dtype, (None, bn), lambda i, j: (i, j)),
                       _whole_row(b, da)], "drafter_final")
    if cfg.num_centroids:
      return self.head(p, zf.astype(self.dtype), cfg), h_out
    bv = _cols(cfg.vocab_size, da)
    (logits,) = _call(functools.partial(_head_kernel, da=da, bv=bv), (b, cfg.vocab_size // bv),
                      [zf, p["embed"]], [_vec(b, cfg.vocab_size, bv)], "drafter_head")
    return logits, h_out

  def _layer(self, lp, i, residual, b):
    """Block i; residual: (pre's parts,) or (z, down's parts, post_ffw_norm, layer_scalar) of the
    previous layer. Returns the residual inputs of the next kernel."""
    cfg, rnd, eps, dec = self.cfg, self.rnd, self.cfg.rms_eps, self.cfg.as_decoder()
    kind = cfg.layer_types[i]
    da, heads, hd = cfg.embed_dim, cfg.num_heads, dec.layer_head_dim(i)
    group = heads // dec.layer_kv_heads(i)
    attn = lp["attn"]
    nh = heads * hd
    bq = _cols(nh, da)
    q, z = _call(functools.partial(_q_kernel, da=da, bn=bq, eps=eps, rnd=rnd,
                                   n_res=len(residual)),
                 (b, nh // bq), [*residual, lp["pre_attn_norm"], attn["q"].reshape(da, nh)],
                 [((b, nh), self.dtype, (None, bq), lambda i, j: (i, j)), _whole_row(b, da)],
                 "drafter_q")
    # The o projection: heads in `o_parts` parts of `per_part` heads, bo columns a program.
    o_parts, per_part, bo = _o_split(cfg, hd)
    k, v, valid = self.taps[kind]
    slots = k.shape[1]
    bs, chunks, splits, combine = _ranges(slots, hd, per_part)
    part = lambda w: ((b, heads, splits, w), F32, (None, None, None, w),
                      lambda i, j, s: (i, j, s, 0))
    cos, sin = self.rope[kind]
    o, lse = _call(functools.partial(_attn_kernel, group=group, bs=bs,
                                     per_split=-(-chunks // splits), slots=slots, hd=hd, eps=eps,
                                     rnd=rnd),
                   (b, heads, splits),
                   [q.reshape(b, heads, hd), attn["q_norm"], cos, sin, k, v, valid],
                   [part(hd), part(LSE)], "drafter_attention")
    heads_in = [o, lse]
    if combine:
      bc = matvec.pow2_divisor(hd, max(16, TILE // splits))
      heads_in = _call(functools.partial(_combine_kernel, bc=bc, rnd=rnd), (b, heads, hd // bc),
                       heads_in, [((b, heads, hd), F32, (None, None, bc),
                                   lambda i, j, c: (i, j, c))], "drafter_combine")
    (a,) = _call(functools.partial(_o_kernel, per_part=per_part, bn=bo, rnd=rnd),
                 (b, da // bo, o_parts), [*heads_in, attn["o"]], [_parts(b, o_parts, da, bo)],
                 "drafter_o")
    mlp = lp["mlp"]
    f = cfg.mlp_dim
    wg, wu, up_at = ((mlp["gate_up"], mlp["gate_up"], f) if "gate_up" in mlp
                     else (mlp["gate"], mlp["up"], 0))
    bf = _cols(f, 2 * da)
    g, z1 = _call(functools.partial(_up_kernel, da=da, bf=bf, up_at=up_at, eps=eps, rnd=rnd),
                  (b, f // bf), [z, a, lp["post_attn_norm"], lp["pre_ffw_norm"], wg, wu],
                  [_vec(b, f, bf), _whole_row(b, da)], "drafter_up")
    d_parts, rows, bn = _down_split(cfg)
    (d,) = _call(functools.partial(_down_kernel, rows=rows, bn=bn),
                 (b, da // bn, d_parts), [g, mlp["down"]], [_parts(b, d_parts, da, bn)],
                 "drafter_down")
    return (z1, d, lp["post_ffw_norm"], lp["layer_scalar"])


__all__ = ["ENV", "enabled", "supported", "why_not", "choose", "Stepper"]
