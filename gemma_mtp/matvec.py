"""Few-row matmuls as Pallas (Triton) kernels: routed experts and int8 weights on GPUs.

A decode step at batch 1 multiplies one activation row by each weight, so it is a pass over the
weights: its floor is bytes / HBM bandwidth. Two of the model's matmuls miss that floor under
XLA on GPUs, because XLA cannot express the read the step needs:
  * routed experts (MoE): XLA has no in-place read of the experts a token routes to; it gathers
    them into a copy first (or runs grouped `ragged_dot`s with a large fixed cost);
  * int8 weights: XLA converts them to bf16 in a pass of its own before its GEMM, so the step
    moves more bytes than the bf16 model.
`gathered_matmul(x [P, K], w [E, K, N], idx [P])` reads expert idx[p] in place for row p, and
`matmul(x [M, K], w [K, N])` reads int8 weights as int8 and converts them in registers (the
per-column scales are applied to the output). Both split the work into (output columns /
block_n) x split_k programs, each streaming a [K / split_k, block_n] slab of weights in block_k
chunks; partial sums over the split are added afterwards. One row goes through multiply-and-sum,
several through a dot on 16 padded rows.

Measured on an H200 (experiments/results/kernel_probe_h200.json, runs J and K of
experiments/NOTES.md): 26B-A4B decode 5.43 -> 4.03 ms at batch 1 and 16.1 -> 7.25 ms at batch 8
(the kernel streams routed experts at 2.7-3.8 TB/s); the 31B shape with int8 weights 19.7 ->
15.2 ms at batch 1. For bf16 dense weights the kernel is not faster than
XLA's GEMM (E4B's MLP 2.7 vs 2.9 TB/s; the E4B step 4.78 vs 4.13 ms), nor for int8 weights with
several rows (31B, 5 positions: 18.7 vs 14.7 ms), so `quant` uses it only for one-row int8
matmuls of large weights and `layers` for routed experts.

A fold of a token's experts' whole MLP into these two calls with nothing between them (the
gate|up call reading each token's row once for its k experts, the down call adding gate|up's
split-K parts and applying gelu(gate) * up in its loads) was built in session 25 and removed
after run CG measured it slower on an H100: 26B-A4B's batch-1 step +6.4%, batch 8 +2.7%
(NOTES).

Where they run: `enabled()` (GPU, one device, not switched off with GEMMA_MTP_KERNELS=off) and
`block_config` finds a tiling (column and contraction sizes with power-of-two divisors of at
least 32); otherwise callers keep XLA's ops. Off the GPU the kernels run in Pallas's interpreter
(`interpret=True`), which is how the tests check them on the CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

F32 = jnp.float32
MAX_ROWS = 16            # rows handled by one dot (padded); more rows use XLA's GEMM
TARGET_PROGRAMS = 512    # enough thread blocks for a few waves over an H200's 132 SMs
# int8 weights of fewer elements stay with XLA (quant.einsum): on an H200, at one row, the kernel
# reads int8 weights of 26M elements and more 1.2-1.4x faster than XLA, smaller ones about as
# fast (E4B's q projection [2560, 2048]: 7.6 vs 7.3 us; experiments/results/kernel_probe_h200.json).
MIN_INT8_SIZE = 16 << 20
# Routed experts on a token's one row (`quant.expert_matmul` with x [M, D]): True passes the
# kernel x itself, pair p reading row p // k (`gathered_matmul`'s per_row = k, a static
# division in the kernel); False broadcasts x to a row per pair first, an XLA kernel of its own (26B-A4B on an H100:
# 1.25 us a layer, 30 a step, NOTES run CO's profile). Measured on an H100 (NOTES run CR,
# step_probe variant fused_moe_shared_rows, 26B-A4B at 1k): batch 1 +0.6%, batch 8 -0.3%, a
# tie, so off.
SHARED_ROWS = False
ENV = "GEMMA_MTP_KERNELS"  # auto (default): GPU and one device; on; off


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """Tiling of one kernel call: block_n output columns per program, the contraction split into
  split_k ranges each read in block_k chunks, Triton's warps and pipeline stages."""

  block_n: int
  block_k: int
  split_k: int
  num_warps: int = 4
  num_stages: int = 3


def switch_mode(env: str) -> str:
  """The setting of the Pallas kernels' switch `env`: 'auto' (the default), 'on' or 'off'."""
  mode = os.environ.get(env, "auto").lower()
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"{env} must be auto, on or off, got {mode!r}")
  return mode


def switch(env: str) -> bool:
  """The Pallas kernels' switch `env` (auto, the default: on with one GPU; on; off), read when a
  program is traced."""
  mode = switch_mode(env)
  if mode != "auto":
    return mode == "on"
  return jax.default_backend() == "gpu" and jax.device_count() == 1


def enabled() -> bool:
  """Whether model matmuls use these kernels in programs traced now (see the module doc)."""
  return switch(ENV)


def pow2_divisor(n: int, cap: int) -> int:
  """The largest power of two <= cap dividing n."""
  d = 1
  while d * 2 <= cap and n % (d * 2) == 0:
    d *= 2
  return d


def block_config(groups: int, k: int, n: int, *, itemsize: int = 2,
                 target_programs: int = TARGET_PROGRAMS) -> BlockConfig | None:
  """A tiling for `groups` weight slabs [k, n] (None: shapes the kernel does not take).

  block_n = 128 columns (256 bytes of bf16 per row read), block_k = 128 (256 for int8), and the
  contraction split into the fewest ranges that give about `target_programs` programs.
  """
  block_n = pow2_divisor(n, 128)
  block_k = pow2_divisor(k, 256 if itemsize == 1 else 128)
  if block_n < 32 or block_k < 32:
    return None
  chunks = k // block_k
  splits = [d for d in range(1, chunks + 1) if chunks % d == 0]
  split = next((d for d in splits if groups * (n // block_n) * d >= target_programs), chunks)
  return BlockConfig(block_n=block_n, block_k=block_k, split_k=split)


def gelu_tanh(x):
  """tanh-approximated GELU (`layers.gelu`) of a float32 value inside a kernel (the drafter and
  PLE kernels)."""
  inner = np.float32(np.sqrt(2.0 / np.pi)) * (x + np.float32(0.044715) * x * x * x)
  return 0.5 * x * (1.0 + jnp.tanh(inner))


def _row_times_slab(chunk, steps: int, cfg: BlockConfig) -> jax.Array:
  """One row times a [steps * block_k, block_n] slab of weights, summed in float32 over the
  chunks `chunk(i) -> (x [block_k], w [block_k, block_n])`."""
  def body(i, acc):
    xk, wk = chunk(i)
    return acc + jnp.sum(xk.astype(F32).reshape(cfg.block_k, 1) * wk.astype(F32), axis=0)
  return jax.lax.fori_loop(0, steps, body, jnp.zeros((cfg.block_n,), F32))


def _kernel(idx_ref, x_ref, w_ref, o_ref, *, cfg: BlockConfig, steps: int, rows: int,
            per_row: int):
  """One program: rows g // per_row of x times columns [n * block_n, +block_n) of weight
  idx[g], over the contraction range of split s, into o_ref [rows, block_n] (float32 partial
  sums)."""
  g, n, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  e = idx_ref[g]
  src = g if per_row == 1 else g // per_row
  cols = pl.ds(pl.multiple_of(n * cfg.block_n, cfg.block_n), cfg.block_n)
  start = s * (steps * cfg.block_k)

  def chunk(i):
    kk = pl.ds(pl.multiple_of(start + i * cfg.block_k, cfg.block_k), cfg.block_k)
    return x_ref[src, :, kk], w_ref[e, kk, cols]

  if rows == 1:
    o_ref[...] = _row_times_slab(chunk, steps, cfg).reshape(1, cfg.block_n)
  else:
    def body(i, acc):
      xk, wk = chunk(i)
      return acc + jnp.dot(xk, wk.astype(xk.dtype), preferred_element_type=F32)
    o_ref[...] = jax.lax.fori_loop(0, steps, body, jnp.zeros((rows, cfg.block_n), F32))


def _call(x: jax.Array, w: jax.Array, idx: jax.Array, cfg: BlockConfig,
          interpret: bool, per_row: int = 1) -> jax.Array:
  """x [G / per_row, R, K], w [E, K, N], idx [G] -> [G, R, N] float32: group g is
  x[g // per_row] times w[idx[g]] (R is 1 or MAX_ROWS)."""
  _, rows, k = x.shape
  g = idx.shape[0]
  n = w.shape[-1]
  steps = k // (cfg.split_k * cfg.block_k)
  kernel = functools.partial(_kernel, cfg=cfg, steps=steps, rows=rows, per_row=per_row)
  return _split_sum(kernel, (g, n // cfg.block_n, cfg.split_k), [idx, x, w], (g, rows, n), cfg,
                    interpret)


def _split_sum(kernel, grid, ins, shape, cfg: BlockConfig, interpret: bool) -> jax.Array:
  """The few-row matmul kernel over `grid` (groups, column blocks, split), each input read
  whole, its float32 output `shape` [G, R, N] summed over the contraction's split."""
  g, rows, n = shape
  whole = lambda a: pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)
  parts = pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=[whole(a) for a in ins],
      out_specs=pl.BlockSpec((None, None, rows, cfg.block_n), lambda gi, ni, si: (si, gi, 0, ni)),
      out_shape=jax.ShapeDtypeStruct((cfg.split_k, g, rows, n), F32),
      compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      interpret=interpret,
      name="few_row_matmul",
  )(*ins)
  return parts[0] if cfg.split_k == 1 else jnp.sum(parts, axis=0)


def _with_dense_kernel(idx_ref, x_ref, w_ref, *refs, cfg: BlockConfig, steps: int, k: int,
                       chunks: int, chunk_axis: int):
  """One program of `with_dense_chunks`: group g is slot j = g % (k + chunks) of token
  t = g // (k + chunks); j < k: token t's j-th expert idx[t * k + j] of w, else chunk j - k of
  the dense weight dw (its rows, chunk_axis 0, or its columns, chunk_axis 1)."""
  if len(refs) == 3:
    dx_ref, dw_ref, o_ref = refs
  else:
    (dw_ref, o_ref), dx_ref = refs, None
  g, n, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  t, j = g // (k + chunks), g % (k + chunks)
  kc = w_ref.shape[1]
  start = s * (steps * cfg.block_k)
  col0 = pl.multiple_of(n * cfg.block_n, cfg.block_n)
  ks = lambda i, at=0: pl.ds(pl.multiple_of(at + start + i * cfg.block_k, cfg.block_k),
                             cfg.block_k)
  row = lambda ref, i, r: ref[r, ks(i)]
  own = (lambda i: row(x_ref, i, t)) if dx_ref is not None else (lambda i: row(x_ref, i, g))
  dense_row = (lambda i: row(dx_ref, i, t)) if dx_ref is not None else own

  def routed():
    e = idx_ref[t * k + jnp.minimum(j, k - 1)]
    return _row_times_slab(lambda i: (own(i), w_ref[e, ks(i), pl.ds(col0, cfg.block_n)]),
                           steps, cfg)

  def dense():
    c = j - k
    if chunk_axis == 0:     # rows [c * K, (c + 1) * K) of dw [chunks * K, N]
      load = lambda i: dw_ref[ks(i, c * kc), pl.ds(col0, cfg.block_n)]
    else:                   # columns [c * N, (c + 1) * N) of dw [K, chunks * N]
      n_all = dw_ref.shape[1] // chunks
      load = lambda i: dw_ref[ks(i), pl.ds(pl.multiple_of(c * n_all + col0, cfg.block_n),
                                           cfg.block_n)]
    return _row_times_slab(lambda i: (dense_row(i), load(i)), steps, cfg)

  o_ref[...] = jax.lax.cond(j < k, routed, dense).reshape(1, cfg.block_n)


def with_dense_chunks(x: jax.Array, w: jax.Array, idx: jax.Array, dense_w: jax.Array, *,
                      chunks: int, chunk_axis: int, dense_x: jax.Array | None = None,
                      cfg: BlockConfig | None = None) -> jax.Array:
  """Each token's k routed experts and the `chunks` chunks of a dense weight in one kernel call
  (MoE layers whose shared MLP is `chunks` experts wide: 26B-A4B's 2112 = 3 x 704).

  Args:
    x: the experts' rows: [M, K] (a token's row, read by its k experts; then `dense_x` [M, K]
      (rows past M ignored: a padded GEMM input) is the row its dense chunks read) or
      [M * (k + chunks), K] (a row a group, token-major,
      its k experts' first: then the dense chunks read their own rows, and dense_x is None).
    w: [E, K, N] the experts; idx: [M, k] each token's experts.
    dense_w: [chunks * K, N] (chunk_axis 0: chunk c its rows c * K ...) or [K, chunks * N]
      (chunk_axis 1: its columns c * N ...), float as w.
  Returns:
    [M, k + chunks, N] float32: token t's k experts' products, then its dense chunks'.
  """
  m, k = idx.shape
  kdim, n = w.shape[1], w.shape[2]
  if dense_w.shape != ((chunks * kdim, n) if chunk_axis == 0 else (kdim, chunks * n)):
    raise ValueError(f"with_dense_chunks: a dense weight {dense_w.shape} is not {chunks} chunks "
                     f"of [{kdim}, {n}] along axis {chunk_axis}")
  rows = m if dense_x is not None else m * (k + chunks)
  if x.shape != (rows, kdim) or (dense_x is not None and (dense_x.shape[0] < m
                                                          or dense_x.shape[1] != kdim)):
    dense = None if dense_x is None else dense_x.shape
    raise ValueError(f"with_dense_chunks: rows {x.shape} (dense rows {dense}) for {m} tokens of "
                     f"{k} experts and {chunks} chunks")
  groups = m * (k + chunks)
  cfg = cfg or _require_config(groups, kdim, n, w.dtype.itemsize)
  steps = kdim // (cfg.split_k * cfg.block_k)
  kernel = functools.partial(_with_dense_kernel, cfg=cfg, steps=steps, k=k, chunks=chunks,
                             chunk_axis=chunk_axis)
  ins = [idx.reshape(-1).astype(jnp.int32), x, w] + ([] if dense_x is None else [dense_x])
  y = _split_sum(kernel, (groups, n // cfg.block_n, cfg.split_k), ins + [dense_w],
                 (groups, 1, n), cfg, _interpret())
  return y.reshape(m, k + chunks, n)


def _interpret() -> bool:
  return jax.default_backend() != "gpu"


def _rows(x: jax.Array) -> tuple[jax.Array, int]:
  """x [G, M, K] padded to the kernel's row count (1 stays 1; 2..MAX_ROWS -> MAX_ROWS)."""
  m = x.shape[1]
  if m == 1 or m == MAX_ROWS:
    return x, m
  return jnp.pad(x, ((0, 0), (0, MAX_ROWS - m), (0, 0))), m


def matmul(x: jax.Array, w: jax.Array, scale: jax.Array | None = None, *,
           cfg: BlockConfig | None = None) -> jax.Array:
  """x [M, K] @ w [K, N] (float, or int8 with per-column `scale` [N]) -> [M, N] float32.

  M <= MAX_ROWS; `cfg` defaults to `block_config` (ValueError if the shapes have no tiling).
  """
  m, k = x.shape
  if m > MAX_ROWS:
    raise ValueError(f"matvec.matmul takes at most {MAX_ROWS} rows, got {m}")
  cfg = cfg or _require_config(1, k, w.shape[1], w.dtype.itemsize)
  xg, m = _rows(x[None])
  y = _call(xg, w[None], jnp.zeros((1,), jnp.int32), cfg, _interpret())[0, :m]
  return y if scale is None else y * scale.astype(F32)


def gathered_matmul(x: jax.Array, w: jax.Array, idx: jax.Array, scale: jax.Array | None = None,
                    *, cfg: BlockConfig | None = None, per_row: int = 1) -> jax.Array:
  """Row p // per_row of x [P / per_row, K] times expert idx[p] of w [E, K, N] -> [P, N]
  float32, reading only the experts named in idx (int8 w: per-(expert, column) `scale`
  [E, N]). per_row > 1: a token's per_row experts read its one row in place, without a copy of
  the row per pair."""
  p, k = idx.shape[0], x.shape[1]
  if x.shape[0] * per_row != p:
    raise ValueError(f"gathered_matmul: {x.shape[0]} rows x {per_row} experts a row for {p} "
                     "experts")
  cfg = cfg or _require_config(p, k, w.shape[2], w.dtype.itemsize)
  idx = idx.astype(jnp.int32)
  y = _call(x[:, None], w, idx, cfg, _interpret(), per_row=per_row)[:, 0]
  return y if scale is None else y * jnp.take(scale.astype(F32), idx, axis=0)


def _require_config(groups, k, n, itemsize) -> BlockConfig:
  cfg = block_config(groups, k, n, itemsize=itemsize)
  if cfg is None:
    raise ValueError(f"no kernel tiling for a [{k}, {n}] weight (each side needs a power-of-two "
                     f"divisor of at least 32)")
  return cfg


__all__ = ["BlockConfig", "switch_mode", "switch", "enabled", "pow2_divisor", "block_config", "matmul",
           "gathered_matmul", "with_dense_chunks", "MAX_ROWS", "ENV"]
