"""The MoE router (26B-A4B) as two Pallas (Triton) kernels, and the MoE layer's end after the
experts as one more (`tail`), on GPUs.

`layers.route` norms the residual, scales it, multiplies it by the router [D, E], takes a float32
softmax over the E experts and its top k, renormalizes those and scales them per expert; the
experts then read the residual normed by `pre_norm`. At a few rows XLA runs this as ~7 short
kernels a layer (the router GEMM as a reduction, the softmax, two copies, a sort for the top k,
a gather, the experts' norm: ~15 us a layer on an H100, NOTES run BG's step sequence). Here it is
two:

  logits:  part s of rnd(rnd(rnd(norm(x)) * router_scale) * D^-1/2) @ router, the norm's scale
           from all of x                                                   grid (M, E / bn, S)
  top_k:   the parts added and rounded as the GEMM's output; softmax; k rounds of (max, its
           first index, masked) (or by rank: `TOP_K_RANKS`, off); the k weights renormalized
           and scaled per expert; and the experts' input rms_norm(x) * pre_norm      grid (M,)

Measured on an H100 (NOTES run BW): 26B-A4B's batch-1 step 4.283 -> 4.093 ms (-4.4%), batch 8
7.823 -> 7.613 (-2.7%); its 5-position verification the same (6.166 / 6.185).

The layer's end (`tail`, `finishes`): after the experts' down projections, one program a token
takes their weighted sum (float32, as XLA's einsum) and post-norm, the shared MLP's post-norm,
their sum's post-FFW norm, the residual add and the layer scalar, and writes the next layer's
normed input padded as its q|k|v projection takes it (`ple_kernels.call_finish`), each norm
one block reduction (run BX's form, one a 256-wide chunk, took 7.5 us against XLA's ~6 kernels'
8.3). Measured on an H100 (NOTES run BY; against the router kernels alone): batch 1 -2.7%, a
5-position verification -0.4%, batch 8 +0.2%. In a batch-1 decode step the shared MLP runs
as three more groups of the experts' two kernel calls (`SHARED_MLP`, `folds_mlp`,
`matvec.with_dense_chunks`; run CR: -2.4%). Its two calls keep `matvec.block_config`'s
contraction splits (11 each at one 26B-A4B row, their partial sums added by XLA kernels of their
own): run CS measured fewer (down 1, gate|up 1 or 2) slower, +1.8% to +13.2% a step. With
`ROUTER_END` (off until measured) the step from the o projection to the MLP's input
(`ple_kernels.attention_end`) and the logits kernel are one (`attention_end`), its programs
each computing the row they take.

Values: float32 inside, rounded to the model's dtype where `layers.route` rounds (the norm, each
scale, the router logits), so in float32 the experts equal XLA's and the weights agree up to
summation order; ties go to the lower index, as `lax.top_k`.

Where they run: `choose` (the switch `enabled()`: GPU and one device, or
GEMMA_MTP_MOE_KERNELS=on; off switches them off; a forward through a cache; float router
weights, E a power of two >= 16, D a multiple of 16, k a power of two; under the automatic
switch at most AUTO_MAX_ROWS tokens, each of whose programs read the router again). Off the
GPU the kernels run in Pallas's interpreter, which is how the tests compare them with
`layers.route`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from gemma_mtp import drafter_kernels as dk
from gemma_mtp import layers
from gemma_mtp import matvec
from gemma_mtp import ple_kernels
from gemma_mtp import quant
from gemma_mtp.config import ModelConfig

F32 = jnp.float32
ENV = "GEMMA_MTP_MOE_KERNELS"
# The automatic switch takes forwards of up to this many tokens (a decode step's rows, or a
# chain's verification positions): each token's programs read the 0.7 MB router again.
# Measured on an H100 (NOTES run BW; 26B-A4B, 1k context, the forward with against without):
# batch 1 -4.4%, batch 8 -2.7%, a 5-position verification +0.3% (a tie); more not measured.
AUTO_MAX_ROWS = 8
# Where the router kernels run and a forward's (token, expert) pairs are at most the experts (the
# range in which `layers.gathers_experts` reads each pair's expert on a GPU), the layer's end
# after the experts is one more kernel (`tail`, `finishes`); under the automatic switch only up to
# FINISH_MAX_TOKENS tokens. Measured on an H100 (NOTES run BY, 26B-A4B, 1k context, against the
# router kernels alone): batch 1 -2.7%, a 5-position verification -0.4%, batch 8 +0.2%.
FINISH = True
FINISH_MAX_TOKENS = 5
# Where the layer's end is `tail` and the shared (dense) MLP is C experts wide (26B-A4B: 2112 =
# 3 x 704), the shared MLP runs as C more groups of the experts' two kernel calls
# (`matvec.with_dense_chunks`), instead of XLA's GEMMs of its own: its gate|up as C column
# chunks on the pre-FFW-normed row, GELU x up with the experts', its down projection as C row
# chunks whose float32 products the finish kernel adds. Measured on an H100 (NOTES run CR,
# 26B-A4B, 1k context, against the library before): batch-1 decode 3.973 -> 3.879 ms (-2.4%).
# Each token's chunks read the shared MLP's weights again (XLA's GEMM reads them once for all
# rows), so only forwards of up to SHARED_MLP_MAX_TOKENS tokens: batch-1 decode steps.
SHARED_MLP = True
SHARED_MLP_MAX_TOKENS = 1
# The top-k kernel's k experts by rank (each expert's count of experts scoring more, or as much
# at a lower index; slot j takes rank j: one reduction over [E, E], three over [k, E]) instead
# of k rounds of a max, its first index and its scale (3k reductions in turn). The same
# experts, order and weights either way. Measured on an H100 (NOTES run CS, 26B-A4B batch-1
# decode): 3.890 ms against the library's 3.900 and 3.849 in the same process, a tie, so off.
TOP_K_RANKS = False
# Where the layer's end is `tail` and the step from the o projection to the MLP's input is a
# kernel (`ple_kernels.ATTENTION_END`), that step and the router's logits as one kernel
# (`attention_end`): each of the logits kernel's programs computes the residual after attention
# (x + norm(o) * post_attn_norm) itself, the first of a row also stores it and its pre-FFW norm,
# so the layer has one kernel fewer (26B-A4B on an H100: the attention end 3.4 us a layer, NOTES
# run CP's profile; each of the 32 logits programs then also reads o's and the norm's rows,
# 11 KB). Built in session 32, not yet measured on a GPU (step_probe variant
# fused_moe_router_end), so off.
ROUTER_END = False


def enabled() -> bool:
  """Whether the switch is on in programs traced now (see the module doc)."""
  return matvec.switch(ENV)


def supported(cfg: ModelConfig, p: dict) -> str | None:
  """None if the kernels take the MoE block with parameters p, else why not."""
  if quant.is_quantized(p["router"]):
    return "int8 router"
  e = cfg.num_experts
  if e < 16 or e & (e - 1):
    return f"{e} experts (not a power of two >= 16)"
  if cfg.embed_dim % 16:
    return f"width {cfg.embed_dim} (not a multiple of 16)"
  if cfg.num_experts_per_token & (cfg.num_experts_per_token - 1):
    return f"top {cfg.num_experts_per_token} (not a power of two)"
  return None


def choose(cfg: ModelConfig, p: dict, tokens: int, has_cache: bool) -> bool:
  """Whether `model.run_layers` routes a forward's tokens through the kernels: a forward
  through a cache (inference: the kernels have no gradient), under the automatic switch of at
  most AUTO_MAX_ROWS tokens, =on at any number."""
  if not (enabled() and has_cache and supported(cfg, p) is None):
    return False
  return matvec.switch_mode(ENV) == "on" or tokens <= AUTO_MAX_ROWS


def _logits_kernel(x_ref, scale_ref, w_ref, out_ref, *, rows, bn, eps, c, rnd):
  """Part s of the router logits of token m: contraction rows [s * rows, (s + 1) * rows)."""
  m, col, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  n = x_ref.shape[1]
  bk = dk._rows_per_chunk(rows, bn)
  part = dk._spans(rows, bk, s * rows)
  x = [dk._f32(x_ref[m, ds]) for ds in dk._spans(n, dk._rows_per_chunk(n, 1))]
  x_part = [dk._f32(x_ref[m, ds]) for ds in part]
  scale = [dk._f32(scale_ref[ds]) for ds in part]
  w = [w_ref[ds, dk._columns(col, bn)] for ds in part]
  inv = dk._inv_rms(x, n, eps)
  r = [rnd(rnd(rnd(xc * inv) * rnd(sc)) * c) for xc, sc in zip(x_part, scale)]
  out_ref[...] = dk._matvec(r, w)            # rounded once the parts are added


def _top_k_by_rounds(probs, escale, iota, slot):
  """(probabilities, experts, expert scales) [k] of the k best of `probs` [E], ties to the lower
  index: k rounds of the best's value and first index, masked after."""
  k, num = slot.shape[0], probs.shape[0]
  weights, experts = jnp.zeros((k,), F32), jnp.zeros((k,), jnp.int32)
  scales = jnp.zeros((k,), F32)
  for j in range(k):
    top = jnp.max(probs)
    at = jnp.min(jnp.where(probs == top, iota, num))
    weights = jnp.where(slot == j, top, weights)
    experts = jnp.where(slot == j, at, experts)
    scales = jnp.where(slot == j, jnp.sum(jnp.where(iota == at, escale, 0.0)), scales)
    probs = jnp.where(iota == at, -1.0, probs)
  return weights, experts, scales


def _top_k_by_rank(probs, escale, iota, slot):
  """(probabilities, experts, expert scales) [k] of the k best of `probs` [E], ties to the lower
  index (`TOP_K_RANKS`): expert i's rank is the count of experts scoring more, or as much at a
  lower index; slot j holds the one expert of rank j."""
  p_i, p_j = probs[:, None], probs[None, :]
  beats = (p_j > p_i) | ((p_j == p_i) & (iota[None, :] < iota[:, None]))
  rank = jnp.sum(beats.astype(jnp.int32), axis=1)                        # [E]
  at = rank[None, :] == slot[:, None]                                    # [k, E]: one each
  pick = lambda v, zero: jnp.sum(jnp.where(at, v[None, :], zero), axis=1)
  return pick(probs, 0.0), pick(iota, 0), pick(escale, 0.0)


def _top_k_kernel(parts_ref, expert_scale_ref, x_ref, pre_ref, w_ref, e_ref, xn_ref, *, k, eps,
                  rnd, ranks):
  """Token m's top-k experts and weights from the logits' parts, and its experts' input."""
  m = pl.program_id(0)
  n, num = x_ref.shape[1], parts_ref.shape[2]
  spans = dk._spans(n, dk._rows_per_chunk(n, 1))
  logits = rnd(sum(parts_ref[m, s, :] for s in range(parts_ref.shape[1])))
  escale = dk._f32(expert_scale_ref[...])
  x = [dk._f32(x_ref[m, ds]) for ds in spans]
  pre = [dk._f32(pre_ref[ds]) for ds in spans]
  e = jnp.exp(logits - jnp.max(logits))
  probs = e / jnp.sum(e)
  iota = jax.lax.broadcasted_iota(jnp.int32, (num,), 0)
  slot = jax.lax.broadcasted_iota(jnp.int32, (k,), 0)
  top_k = _top_k_by_rank if ranks else _top_k_by_rounds
  weights, experts, scales = top_k(probs, escale, iota, slot)
  w_ref[...] = weights / jnp.sum(weights) * scales
  e_ref[...] = experts
  dk._store_chunks(xn_ref, spans, dk._norm(x, pre, n, eps, rnd))


def _logits_tiling(cfg: ModelConfig, dtype) -> tuple[int, int, float]:
  """(columns a program bn, contraction parts S, the router's scale D^-1/2 rounded as
  `layers.route` rounds it) of the logits kernel."""
  d, e = cfg.embed_dim, cfg.num_experts
  bn = dk._cols(e, d)
  c = float(np.asarray(d ** -0.5, jnp.dtype(dtype)).astype(np.float32))
  return bn, dk._split(d // 16, 16 * bn), c


def route(x: jax.Array, p: dict, cfg: ModelConfig):
  """`layers.route(x, p)` and `rms_norm(x, p['pre_norm'])` as the two kernels.

  Args:
    x: [M, D] the residual stream after attention (M tokens).
    p: the MoE block's parameters (router, router_scale, expert_scale, pre_norm).
  Returns:
    (weights [M, k] float32, experts [M, k] int32, the experts' input [M, D] in x's dtype).
  """
  rnd = dk._rounder(x.dtype)
  m, d = x.shape
  bn, parts, c = _logits_tiling(cfg, x.dtype)
  e = cfg.num_experts
  (logits,) = dk._call(
      functools.partial(_logits_kernel, rows=d // parts, bn=bn, eps=cfg.rms_eps, c=c, rnd=rnd),
      (m, e // bn, parts), [x, p["router_scale"], p["router"]], [dk._parts(m, parts, e, bn)],
      "moe_router")
  return top_k(logits, x, p, cfg)


def top_k(logits: jax.Array, x: jax.Array, p: dict, cfg: ModelConfig):
  """`route`'s second kernel: from the logits' parts [M, S, E] (float32) and x [M, D], the
  weights, experts and experts' input as `route` returns them."""
  rnd = dk._rounder(x.dtype)
  m, d = x.shape
  k = cfg.num_experts_per_token
  outs = [((m, k), F32, (None, k), lambda i: (i, 0)),
          ((m, k), jnp.int32, (None, k), lambda i: (i, 0)),
          ((m, d), x.dtype, (None, d), lambda i: (i, 0))]
  return tuple(dk._call(functools.partial(_top_k_kernel, k=k, eps=cfg.rms_eps, rnd=rnd,
                                          ranks=TOP_K_RANKS),
                        (m,), [logits, p["expert_scale"], x, p["pre_norm"]], outs, "moe_top_k"))


def _end_logits_kernel(x_ref, a_ref, post_ref, scale_ref, w_ref, next_ref, logits_ref, x1_ref,
                       xn_ref, *, rows, part_rows, bn, eps, c, rnd, zeros):
  """Program (r, col, s) (`attention_end`): row src = min(r, rows - 1)'s residual after
  attention x1 = x + norm(a) * post (all of it: the router's norm takes its scale from all of
  x1), then part s of its router logits (as `_logits_kernel`); program (r, 0, 0) also stores x1
  and its pre-FFW norm (`ple_kernels.store_layer_end`: rows r >= rows the padding)."""
  r, col, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  src = jnp.minimum(r, rows - 1)
  n = x_ref.shape[1]
  spans = dk._spans(n, dk._rows_per_chunk(n, 1))
  a = [dk._f32(a_ref[src, ds]) for ds in spans]
  a_scale = dk._inv_rms(a, n, eps)
  # x1's elements at ds (a's there: ac), as `ple_kernels._x2` computes them
  x1_at = lambda ds, ac: rnd(dk._f32(x_ref[src, ds]) + rnd(ac * a_scale * dk._f32(post_ref[ds])))
  x1 = [x1_at(ds, ac) for ds, ac in zip(spans, a)]

  @pl.when(r < rows)
  def _logits():
    part = dk._spans(part_rows, dk._rows_per_chunk(part_rows, bn), s * part_rows)
    x1_part = [x1_at(ds, dk._f32(a_ref[src, ds])) for ds in part]
    inv = dk._inv_rms(x1, n, eps)
    w = [w_ref[ds, dk._columns(col, bn)] for ds in part]
    scaled = [rnd(rnd(rnd(xc * inv) * rnd(dk._f32(scale_ref[ds]))) * c)
              for xc, ds in zip(x1_part, part)]
    logits_ref[...] = dk._matvec(scaled, w)

  @pl.when((col == 0) & (s == 0))
  def _store():
    ple_kernels.store_layer_end(x1, r, rows, spans, next_ref, x1_ref, xn_ref, n=n, eps=eps,
                                rnd=rnd, zeros=zeros)


def attention_end(x, a, p: dict, cfg: ModelConfig):
  """`ple_kernels.attention_end` and the MoE router's logits as one kernel (ROUTER_END; grid
  (R, E / bn, S) of the logits kernel, R the MLP input's rows).

  Args:
    x: [B, T, D] the layer's input; a: [R', T, D] the o projection's output (rows past B
      ignored); p: the layer's parameters (post_attn_norm, pre_ffw_norm, mlp, moe).
  Returns:
    (x1 [B, T, D] the residual after attention, the MLP's normed input as
    `ple_kernels.attention_end`'s, {'logits': [B * T, S, E] float32 parts} for `tail`).
  """
  shape, dim = x.shape, x.shape[-1]
  b = shape[0] * shape[1]
  mlp, moe = p["mlp"], p["moe"]
  rows = ple_kernels.rows_for(mlp["gate_up"] if "gate_up" in mlp else mlp["gate"], b)
  bn, parts, c = _logits_tiling(cfg, x.dtype)
  e = cfg.num_experts
  last = lambda i: jnp.minimum(i, b - 1)
  outs = [((b, parts, e), F32, (None, None, bn), lambda i, j, s: (last(i), s, j)),
          ((b, dim), x.dtype, (None, dim), lambda i, *_: (last(i), 0)),
          ((rows, dim), x.dtype, (None, dim), lambda i, *_: (i, 0))]
  kernel = functools.partial(_end_logits_kernel, rows=b, part_rows=dim // parts, bn=bn,
                             eps=cfg.rms_eps, c=c, rnd=dk._rounder(x.dtype),
                             zeros=quant.PAD_ROWS_WITH == "zeros")
  logits, x1, xn = dk._call(
      kernel, (rows, e // bn, parts),
      [x.reshape(b, dim), a.reshape(-1, dim), p["post_attn_norm"], moe["router_scale"],
       moe["router"], p["pre_ffw_norm"]], outs, "moe_router_end")
  return x1.reshape(shape), (xn.reshape(shape) if rows == b else xn[:, None]), {"logits": logits}


def finishes(cfg: ModelConfig, params: dict, tokens: int, has_cache: bool) -> bool:
  """Whether `model.run_layers` ends each layer with `tail`: the router kernels chosen (`choose`),
  FINISH, every layer an MoE one, the forward's tokens x k at most the experts, and under the
  automatic switch at most FINISH_MAX_TOKENS tokens."""
  layer_params = params["layers"][:cfg.num_layers]
  if not (FINISH and all("moe" in p for p in layer_params)):
    return False
  if not choose(cfg, layer_params[0]["moe"], tokens, has_cache):
    return False
  auto_ok = matvec.switch_mode(ENV) == "on" or tokens <= FINISH_MAX_TOKENS
  return auto_ok and tokens * cfg.num_experts_per_token <= cfg.num_experts


def folds_mlp(cfg: ModelConfig, params: dict, tokens: int, has_cache: bool) -> bool:
  """Whether `model.run_layers` ends each layer with `tail` (`finishes`) running the shared MLP
  too: SHARED_MLP, at most SHARED_MLP_MAX_TOKENS tokens, the expert kernels on
  (`matvec.enabled()`), float weights in the fused layout (`gate_up`), a shared width of C
  experts' widths and tilings for the experts' two calls with C groups a token more."""
  if not (SHARED_MLP and tokens <= SHARED_MLP_MAX_TOKENS and matvec.enabled()
          and finishes(cfg, params, tokens, has_cache)):
    return False
  p = params["layers"][0]
  mlp, moe = p["mlp"], p["moe"]
  if "gate_up" not in mlp:
    return False
  weights = (mlp["gate_up"], mlp["down"], moe["gate_up"], moe["down"])
  if any(quant.is_quantized(w) or w.dtype != weights[0].dtype for w in weights):
    return False
  d, width, hidden = moe["down"].shape[2], moe["down"].shape[1], mlp["down"].shape[0]
  if hidden % width:
    return False
  groups = tokens * (cfg.num_experts_per_token + hidden // width)
  return (matvec.block_config(groups, d, 2 * width) is not None
          and matvec.block_config(groups, width, d) is not None)


def _finish_kernel(*refs, rows, k, eps, rnd, zeros, with_next, chunks):
  """Row r: the layer's output from the residual after attention x1, the shared MLP's down
  projection d, and the k experts' down projections and weights; with_next the next layer's
  normed input (`ple_kernels.store_layer_end`). chunks > 0 (`folds_mlp`): no d; the experts'
  outputs [M, k + chunks, D] are float32, the k experts' rounded as their GEMM's output, and the
  shared MLP's down projection the sum of the chunks' (rounded once)."""
  ins, outs = ple_kernels.finish_refs(refs, 7 if chunks else 8, with_next)
  if chunks:
    (x1_ref, e_ref, w_ref, dense_ref, post_ref, ffw_ref, scalar_ref), d_ref = ins, None
  else:
    x1_ref, d_ref, e_ref, w_ref, dense_ref, post_ref, ffw_ref, scalar_ref = ins
  r = pl.program_id(0)
  src = jnp.minimum(r, rows - 1)
  n = x1_ref.shape[1]
  spans = dk._spans(n, dk._rows_per_chunk(n, 1))
  load = lambda ref: [dk._f32(ref[ds]) for ds in spans]
  norm = functools.partial(dk._norm, n=n, eps=eps, rnd=rnd, one_reduction=True)
  out = (lambda j, ds: rnd(e_ref[src, j, ds])) if chunks else (
      lambda j, ds: dk._f32(e_ref[src, j, ds]))
  mix = [0.0] * len(spans)
  for j in range(k):
    wj = w_ref[src, j]
    mix = [m + wj * out(j, ds) for m, ds in zip(mix, spans)]
  experts = norm([rnd(m) for m in mix], load(post_ref))
  if chunks:
    d = [rnd(sum(e_ref[src, k + c, ds] for c in range(chunks))) for ds in spans]
  else:
    d = [dk._f32(d_ref[src, ds]) for ds in spans]
  dense = norm(d, load(dense_ref))
  ffw = norm([rnd(a + c) for a, c in zip(dense, experts)], load(ffw_ref))
  scalar = rnd(dk._f32(scalar_ref[0]))
  x = [rnd(rnd(dk._f32(x1_ref[src, ds]) + f) * scalar) for ds, f in zip(spans, ffw)]
  ple_kernels.store_layer_end(x, r, rows, spans, *outs, n=n, eps=eps, rnd=rnd, zeros=zeros,
                              one_reduction=True)


def _experts_and_mlp(xn, experts, moe: dict, xs, mlp: dict) -> jax.Array:
  """`layers.expert_outputs` with the shared MLP `mlp` as C more groups of its two kernel calls
  (`folds_mlp`): xn [M, D] the experts' input, xs [R >= M, D] the shared
  MLP's (rows past M ignored).

  Returns:
    [M, k + C, D] float32: each token's k experts' down projections, then its shared MLP's C
    chunks' (their sum the shared MLP's down projection).
  """
  m, k = experts.shape
  width = moe["down"].shape[1]
  chunks = mlp["down"].shape[0] // width
  gate_up = matvec.with_dense_chunks(xn, moe["gate_up"], experts, mlp["gate_up"], chunks=chunks,
                                     chunk_axis=1, dense_x=xs).astype(xn.dtype)
  routed = layers.gelu(gate_up[:, :k, :width]) * gate_up[:, :k, width:]        # [M, k, X]
  dense = gate_up[:, k:].reshape(m, 2, chunks * width)       # the columns of [gate | up]
  dense = (layers.gelu(dense[:, 0]) * dense[:, 1]).reshape(m, chunks, width)  # [M, C, X]
  h = jnp.concatenate([routed, dense], axis=1).reshape(m * (k + chunks), width)
  return matvec.with_dense_chunks(h, moe["down"], experts, mlp["down"], chunks=chunks,
                                  chunk_axis=0)


def tail(p: dict, x1, d, ple, cfg: ModelConfig, *, next_norm=None, next_rows: int = 0,
         mlp_input: bool = False, logits=None):
  """The end of MoE layer p after its shared MLP (`model.block`'s `tail`, chosen by `finishes`):
  the router kernels, the experts per (token, expert) pair, then one kernel a position for the
  rest of `model.feed_forward` and `model.block` (the experts' weighted sum and post-norm, the
  shared MLP's post-norm, their sum's post-FFW norm, the residual add, the layer scalar) and
  the next layer's pre-attention norm, padded as `ple_kernels.tail`'s.

  Args:
    p: the layer's parameters (moe, post_ffw_norm, layer_scalar; with mlp_input mlp).
    x1: [B, T, D] the residual after attention; d: [R, T, D] the shared MLP's down projection,
      or with mlp_input (`folds_mlp`) its normed input, which the experts' calls then take
      (R >= B rows at T = 1: the rows past B `quant.einsum`'s padding, ignored).
    ple: None (no per-layer inputs in the MoE models).
    next_norm, next_rows: as `ple_kernels.tail`'s.
    logits: the router's logits' parts from `attention_end` (ROUTER_END), or None (the router's
      first kernel here).
  Returns:
    (x [B, T, D] the layer's output, the next layer's normed input or None).
  """
  del ple
  moe = p["moe"]
  shape, dim = x1.shape, x1.shape[-1]
  x = x1.reshape(-1, dim)
  weights, experts, xn = route(x, moe, cfg) if logits is None else top_k(logits, x, moe, cfg)
  if mlp_input:
    outs = _experts_and_mlp(xn, experts, moe, d.reshape(-1, dim), p["mlp"])
    chunks, dense = outs.shape[1] - experts.shape[1], []
  else:
    outs = layers.expert_outputs(xn, experts, moe)
    chunks, dense = 0, [d.reshape(-1, dim)]
  kernel = functools.partial(_finish_kernel, k=cfg.num_experts_per_token, eps=cfg.rms_eps,
                             rnd=dk._rounder(x1.dtype), chunks=chunks)
  ins = [x, *dense, outs, weights, moe["dense_post_norm"], moe["post_norm"],
         p["post_ffw_norm"], p["layer_scalar"]]
  return ple_kernels.call_finish(kernel, ins, shape, x1.dtype, "moe_finish",
                                 next_norm=next_norm, next_rows=next_rows)
